//! End-to-end preference tuning on the fixture Llama: DPO raises held-out reward accuracy,
//! KTO raises the held-out reward margin of desirable over undesirable completions, ORPO runs,
//! and the reference log-probs are a cached step that a `beta` change does not recompute.

mod common;

use common::{find, fixtures, lock, metric, run, run_ok, write_manifest};

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
    assert!(
        plan.contains("· reference model: the policy as it starts: `base` under fresh adapters"),
        "{plan}"
    );
    assert!(
        plan.contains("· reference log-probs: cached by `ref`"),
        "{plan}"
    );
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

/// An SFT LoRA adapter (a few steps, so its B matrices are not zero), then preference trainers
/// stepping once from it and from the base: before the first update the policy is the
/// reference, so every DPO reward is 0 and the loss log 2, and KTO's KL estimate and rewards are
/// 0 (loss 1 − σ(0) = 0.5), whatever the upstream: a Model, an Adapter (the reference keeps
/// it), QLoRA (the reference is on the same NF4 base) or bf16 compute.
const START: &str = "  alpaca: {kind: dataset, path: ALPACA, format: alpaca}
  sft:
    kind: train.sft
    model: base
    data: alpaca
    lora: {rank: 4, alpha: 8}
    seq_len: 96
    steps: 6
    lr: 5.0e-3
  sft_q:
    kind: train.sft
    model: base
    data: alpaca
    eval_data: alpaca
    qlora: {rank: 4, alpha: 8}
    seq_len: 96
    steps: 4
    lr: 5.0e-3
  q_eval: {kind: eval, model: sft_q, data: alpaca, seq_len: 96}
  dpo_model: {kind: train.dpo, model: base, data: psplit.train, lora: {rank: 4}, seq_len: 96, steps: 1}
  dpo_adapter: {kind: train.dpo, model: sft, data: psplit.train, seq_len: 96, steps: 1}
  dpo_qlora: {kind: train.dpo, model: base, data: psplit.train, qlora: {rank: 4}, seq_len: 96, steps: 1}
  dpo_q_adapter: {kind: train.dpo, model: sft_q, data: psplit.train, seq_len: 96, steps: 1}
  dpo_bf16: {kind: train.dpo, model: sft, data: psplit.train, dtype: bf16, seq_len: 96, steps: 1}
  dpo_dropout:
    kind: train.dpo
    model: sft
    data: psplit.train
    lora: {rank: 4, alpha: 8, dropout: 0.5}
    seq_len: 96
    steps: 1
  dpo_dropout_on:
    kind: train.dpo
    model: sft
    data: psplit.train
    lora: {rank: 4, alpha: 8, dropout: 0.5}
    disable_dropout: false
    seq_len: 96
    steps: 1
  kto_adapter: {kind: train.kto, model: sft, data: ksplit.train, seq_len: 256, steps: 1}
  lp_adapter: {kind: logprobs, model: sft, data: psplit.train, seq_len: 96}
  merged: {kind: merge, model: sft}
  lp_merged: {kind: logprobs, model: merged, data: psplit.train, seq_len: 96}
  dpo_cached: {kind: train.dpo, model: sft, data: psplit.train, reference: lp_adapter, seq_len: 96, steps: 1}
";

#[test]
fn the_reference_is_the_policy_as_it_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let body = START.replace(
        "ALPACA",
        &fixtures().join("data/alpaca.jsonl").display().to_string(),
    );
    let m = write_manifest(tmp.path(), &manifest(&body));
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    let ln2 = std::f64::consts::LN_2;
    for stage in [
        "dpo_model",
        "dpo_adapter",
        "dpo_qlora",
        "dpo_q_adapter",
        "dpo_bf16",
        "dpo_dropout",
        "dpo_cached",
    ] {
        let loss = metric(&l, stage, "loss_first");
        assert!((loss - ln2).abs() < 1e-6, "{stage}: first loss {loss}");
        for r in ["rewards/chosen", "rewards/rejected", "rewards/margin"] {
            let v = metric(&l, stage, &format!("first_{r}"));
            assert!(v.abs() < 1e-6, "{stage}: first {r} {v}");
        }
    }
    // QLoRA: the reference is on the NF4 base, and an adapter trained with QLoRA keeps it.
    assert_eq!(
        l["stages"]["dpo_qlora"]["metrics"]["reference_precision"],
        "nf4/f32"
    );
    assert_eq!(
        l["stages"]["dpo_q_adapter"]["metrics"]["reference_precision"],
        "nf4/f32"
    );
    assert_eq!(
        l["stages"]["dpo_bf16"]["metrics"]["reference_precision"],
        "bf16"
    );
    // With dropout on (0.5 on the adapter's input), the policy's log-probs are noisy against
    // the deterministic reference: the first loss is no longer log 2.
    let noisy = metric(&l, "dpo_dropout_on", "loss_first");
    assert!((noisy - ln2).abs() > 1e-4, "dropout on: first loss {noisy}");
    let kto_loss = metric(&l, "kto_adapter", "loss_first");
    assert!((kto_loss - 0.5).abs() < 1e-6, "KTO first loss {kto_loss}");
    for r in ["rewards/desirable", "rewards/undesirable"] {
        let v = metric(&l, "kto_adapter", &format!("first_{r}"));
        assert!(v.abs() < 1e-6, "KTO first {r} {v}");
    }
    // The KL estimate is a mean of log-prob sums over ~100 tokens (not scaled by β): f32 noise
    // from the different padding of the reference's and the policy's batches, not 32.6.
    let kl = metric(&l, "kto_adapter", "first_kl");
    assert!(kl.abs() < 1e-4, "KTO first kl {kl}");
    // An adapter's log-probs are its merged model's, completion by completion.
    let a = metric(&l, "lp_adapter", "mean_logp");
    let b = metric(&l, "lp_merged", "mean_logp");
    assert!((a - b).abs() < 1e-5, "adapter {a} vs merged {b}");
    let files = find(tmp.path(), "logprobs.jsonl");
    assert_eq!(files.len(), 2, "{files:?}");
    let read = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (x, y) = (read(&files[0]), read(&files[1]));
    assert_eq!(x.len(), y.len());
    assert!(!x.is_empty());
    for (p, q) in x.iter().zip(&y) {
        assert_eq!(p["index"], q["index"]);
        for side in ["a", "b"] {
            let (u, v) = (
                p[side]["sum"].as_f64().unwrap(),
                q[side]["sum"].as_f64().unwrap(),
            );
            // A sum over ~100 tokens in f32: equal to a relative 1e-6 (a wrong merge is off
            // by more than 1e-3).
            assert!(
                (u - v).abs() < 1e-6 * u.abs().max(1.0),
                "record {}: {side} {u} vs {v}",
                p["index"]
            );
            assert_eq!(p[side]["tokens"], q[side]["tokens"]);
        }
    }
    assert_eq!(
        l["stages"]["lp_adapter"]["metrics"]["model_kind"],
        "adapter"
    );
    // The eval stage on a QLoRA adapter scores it on its NF4 base, as its training loop did.
    let in_loop = metric(&l, "sft_q", "eval_loss");
    let staged = metric(&l, "q_eval", "mean_nll");
    assert!(
        (in_loop - staged).abs() < 1e-5,
        "QLoRA in-loop eval {in_loop} vs eval stage {staged}"
    );
}

#[test]
fn a_reference_artifact_of_another_precision_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &manifest(
            "  lp: {kind: logprobs, model: base, data: psplit.train, seq_len: 96}
  dpo: {kind: train.dpo, model: base, data: psplit.train, reference: lp, qlora: {rank: 4}, seq_len: 96, steps: 1}
",
        ),
    );
    let out = run(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("were computed at precision `f32`") && err.contains("`nf4/f32`"),
        "{err}"
    );
}
