//! End-to-end preference tuning on the fixture Llama: DPO raises held-out reward accuracy,
//! KTO raises the held-out reward margin of desirable over undesirable completions, ORPO runs,
//! and the reference log-probs are a cached step that a `beta` change does not recompute.

mod common;

use common::{fixtures, lock, metric, run, run_ok, write_manifest};

/// The fixture model, preference and KTO data split into train/eval, and `body` stages.
fn manifest(body: &str) -> String {
    let f = fixtures();
    format!(
        "pipeline: pref
seed: 11
backend: cpu
stages:
  base: {{kind: model, from: {}}}
  prefs: {{kind: dataset, path: {}, format: preference}}
  kto_data: {{kind: dataset, path: {}, format: kto}}
  tools: {{kind: dataset, path: {}, format: chat, columns: {{messages: conversations}}}}
  tools_kto: {{kind: data.convert, data: tools, to: kto}}
  psplit: {{kind: data.split, data: prefs, eval_fraction: 0.3}}
  ksplit: {{kind: data.split, data: tools_kto, eval_fraction: 0.3}}
{body}",
        f.join("models/tiny-llama").display(),
        f.join("data/prefs.jsonl").display(),
        f.join("data/kto.jsonl").display(),
        f.join("data/claudesidian.jsonl").display(),
    )
}

const DPO: &str = "  ref:
    kind: logprobs
    model: base
    data: psplit.train
    seq_len: 96
  dpo:
    kind: train.dpo
    model: base
    data: psplit.train
    eval_data: psplit.eval
    reference: ref
    lora: {rank: 8, alpha: 16}
    seq_len: 96
    batch_size: 4
    epochs: 6
    lr: 2.0e-3
    beta: BETA
";

#[test]
fn dpo_raises_held_out_reward_accuracy_and_beta_does_not_recompute_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(tmp.path(), &manifest(&DPO.replace("BETA", "0.1")));
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    // Before training the policy is the reference (the SFT'd model of a real pipeline): every
    // reward is 0, so the accuracy (chosen strictly above rejected) and the margin are 0. After
    // 6 epochs on 21 pairs: 5 of the 9 held-out pairs ranked right (0.556), mean margin ≈ 2.9.
    let acc = metric(&l, "dpo", "eval_rewards/accuracy");
    let margin = metric(&l, "dpo", "eval_rewards/margin");
    assert!(acc > 0.5, "held-out DPO reward accuracy {acc}");
    assert!(margin > 1.0, "held-out DPO reward margin {margin}");
    let first_ref = l["stages"]["ref"]["fingerprint"].clone();

    // Change beta: the trainer reruns, the reference log-probs stay cached.
    std::fs::write(&m, manifest(&DPO.replace("BETA", "0.2"))).unwrap();
    let plan = run_ok(&["plan", m.to_str().unwrap()], tmp.path());
    let plan = String::from_utf8_lossy(&plan.stdout);
    let line = |stage: &str| {
        plan.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(stage))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("ref").starts_with("cached"), "{plan}");
    assert!(line("dpo").starts_with("stale"), "{plan}");
    assert!(plan.contains("`beta` changed 0.1 → 0.2"), "{plan}");
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l2 = lock(tmp.path());
    assert_eq!(l2["stages"]["ref"]["fingerprint"], first_ref);
    assert_ne!(
        l2["stages"]["dpo"]["fingerprint"],
        l["stages"]["dpo"]["fingerprint"]
    );
}

#[test]
fn kto_raises_the_held_out_margin_of_desirable_over_undesirable() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &manifest(
            "  kref: {kind: logprobs, model: base, data: ksplit.train, seq_len: 256}
  kto:
    kind: train.kto
    model: base
    data: ksplit.train
    eval_data: ksplit.eval
    reference: kref
    lora: {rank: 8, alpha: 16}
    seq_len: 256
    batch_size: 4
    epochs: 6
    lr: 2.0e-3
    balance: auto
",
        ),
    );
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    // Tool-use transcripts (fixtures/data/claudesidian.jsonl): undesirable ones skip the tool
    // call or claim success after an error. At the start the policy equals the reference, so
    // the held-out margin mean β·Δ(desirable) − mean β·Δ(undesirable) is 0; after: ≈ 4.
    let margin = metric(&l, "kto", "eval_rewards/margin");
    assert!(margin > 1.0, "held-out KTO reward margin {margin}");
    // balance: auto on the 28 training examples, 22 desirable : 6 undesirable (3.67 > 4/3)
    // → λ_U = 22 / (6·4/3) = 2.75.
    assert_eq!(metric(&l, "kto", "desirable_weight"), 1.0);
    assert!((metric(&l, "kto", "undesirable_weight") - 2.75).abs() < 1e-9);
}

#[test]
fn orpo_trains_without_a_reference_and_kto_refuses_batches_of_one() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &manifest(
            "  orpo:
    kind: train.orpo
    model: base
    data: psplit.train
    eval_data: psplit.eval
    lora: {rank: 4}
    seq_len: 96
    steps: 12
    lr: 5.0e-3
",
        ),
    );
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    assert!(metric(&l, "orpo", "loss_last") < metric(&l, "orpo", "loss_first"));

    let bad = write_manifest(
        &tmp.path().join("bad"),
        &manifest("  kto: {kind: train.kto, model: base, data: ksplit.train, batch_size: 1}\n"),
    );
    let out = run(&["validate", bad.to_str().unwrap()], tmp.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.kto needs batch_size of at least 2, found 1"),
        "{err}"
    );
    assert!(err.contains("pipeline.yaml:"), "{err}");
}
