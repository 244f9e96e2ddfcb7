//! End-to-end training on the fixture model (`fixtures/models/tiny-llama`) through the binary:
//! a SIGKILLed `train.sft` resumes from its checkpoint and ends with the same bits as an
//! uninterrupted run; SFT, full and LoRA, lowers held-out loss by a clear margin.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{burnish, find, fixtures, lock, metric, run, run_ok, write_manifest};

/// A manifest training the fixture Llama on alpaca with the given `sft` body lines.
fn manifest(sft: &str) -> String {
    let f = fixtures();
    format!(
        "pipeline: train-test
seed: 7
backend: cpu
stages:
  base: {{kind: model, from: {}}}
  alpaca: {{kind: dataset, path: {}, format: alpaca}}
  split: {{kind: data.split, data: alpaca, eval_fraction: 0.25}}
  base_eval: {{kind: eval, model: base, data: split.eval, chat_template: chatml}}
  sft:
    kind: train.sft
    model: base
    data: split.train
    eval_data: split.eval
    chat_template: chatml
    seq_len: 96
    batch_size: 4
{sft}",
        f.join("models/tiny-llama").display(),
        f.join("data/alpaca.jsonl").display(),
    )
}

const RESUMABLE: &str = "    lora: {rank: 4, alpha: 8, dropout: 0.1}
    steps: 60
    grad_accum: 2
    lr: 3.0e-3
    warmup_steps: 5
    schedule: cosine
    checkpoint_every: 5
";

#[test]
fn sigkilled_sft_resumes_to_the_same_bits_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let text = manifest(RESUMABLE);

    let straight = tmp.path().join("straight");
    let m = write_manifest(&straight, &text);
    run_ok(&["run", m.to_str().unwrap(), "-q"], &straight);

    // Kill the run as soon as the trainer has written a checkpoint (mid-way through its 60
    // steps), then run again to the end.
    let killed = tmp.path().join("killed");
    let m = write_manifest(&killed, &text);
    // Killed and reaped on every path, including a failed assertion.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reaped(
        burnish()
            .args(["run", m.to_str().unwrap(), "-q"])
            .current_dir(&killed)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let mut killed_mid_way = false;
    while started.elapsed() < Duration::from_secs(120) {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the run finished ({status}) before a checkpoint was seen");
        }
        let pointers = find(&killed.join(".burnish/scratch"), "latest");
        if !pointers.is_empty() {
            child.0.kill().unwrap(); // SIGKILL on Unix
            child.0.wait().unwrap();
            killed_mid_way = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(killed_mid_way, "no checkpoint appeared within 120 s");
    assert!(
        find(
            &killed.join(".burnish/entries"),
            "adapter_model.safetensors"
        )
        .is_empty(),
        "the killed run must not have published the trainer's output"
    );
    run_ok(&["run", m.to_str().unwrap(), "-q"], &killed);

    let logs = find(&killed.join(".burnish/runs"), "sft.log");
    let resumed = logs.iter().any(|l| {
        std::fs::read_to_string(l)
            .unwrap()
            .contains("resuming from checkpoint at step")
    });
    assert!(resumed, "the rerun did not resume from the checkpoint");

    let a = find(
        &straight.join(".burnish/entries"),
        "adapter_model.safetensors",
    );
    let b = find(
        &killed.join(".burnish/entries"),
        "adapter_model.safetensors",
    );
    assert_eq!((a.len(), b.len()), (1, 1));
    assert!(
        std::fs::read(&a[0]).unwrap() == std::fs::read(&b[0]).unwrap(),
        "adapter weights differ between the resumed and the uninterrupted run"
    );
    // Same loss curve, same lock (fingerprints, output digests, metrics).
    let la = find(&straight.join(".burnish/entries"), "train_log.jsonl");
    let lb = find(&killed.join(".burnish/entries"), "train_log.jsonl");
    let (la, lb) = (
        std::fs::read_to_string(&la[0]).unwrap(),
        std::fs::read_to_string(&lb[0]).unwrap(),
    );
    for (i, (x, y)) in la.lines().zip(lb.lines()).enumerate() {
        assert_eq!(x, y, "training log line {} differs", i + 1);
    }
    assert_eq!(la.lines().count(), lb.lines().count());
    assert_eq!(lock(&straight), lock(&killed));
}

/// Held-out loss on assistant tokens before (`base_eval`) and after SFT.
fn sft_gain(sft: &str) -> (f64, f64, serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(tmp.path(), &manifest(sft));
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    (
        metric(&l, "base_eval", "mean_nll"),
        metric(&l, "sft", "eval_loss"),
        l,
    )
}

#[test]
fn lora_sft_lowers_held_out_loss_and_trains_only_what_rank_implies() {
    let (before, after, l) = sft_gain(
        "    lora: {rank: 8, alpha: 16, targets: [q_proj, v_proj]}
    epochs: 6
    lr: 3.0e-3
    warmup_steps: 4
",
    );
    // The fixture model never saw the chat template; SFT on 30 instructions teaches it.
    assert!(
        after < before * 0.8,
        "LoRA SFT: held-out loss {before:.4} → {after:.4}, wanted at least a 20% drop"
    );
    // 2 layers × r=8 × [(64 in + 64 out) q_proj + (64 in + 32 out) v_proj] = 3584
    assert_eq!(metric(&l, "sft", "trainable_params"), 3584.0);
}

#[test]
fn full_sft_lowers_held_out_loss() {
    let (before, after, l) = sft_gain(
        "    epochs: 6
    lr: 1.0e-3
    warmup_steps: 4
",
    );
    assert!(
        after < before * 0.8,
        "full SFT: held-out loss {before:.4} → {after:.4}, wanted at least a 20% drop"
    );
    assert_eq!(metric(&l, "sft", "trainable_params"), 158_016.0);
}

#[test]
fn a_fresh_model_from_a_trained_tokenizer_pretrains_and_evaluates() {
    let f = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &format!(
            "pipeline: train
seed: 3
backend: cpu
stages:
  code: {{kind: dataset, path: {}, format: text}}
  tok: {{kind: tokenizer.train, data: code, vocab_size: 300}}
  fresh:
    kind: model
    init: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
    tokenizer: tok
  cpt: {{kind: train.cpt, model: fresh, data: code, seq_len: 32, batch_size: 8, steps: 30, lr: 1.0e-2}}
  before: {{kind: eval, model: fresh, data: code, seq_len: 32}}
  after: {{kind: eval, model: cpt, data: code, seq_len: 32}}
",
            f.join("data/code.jsonl").display()
        ),
    );
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    assert_eq!(metric(&l, "tok", "vocab_size"), 300.0);
    assert_eq!(metric(&l, "fresh", "vocab_size"), 300.0);
    // 300×32 embed + 300×32 head + one layer (4·32·32 attention + 3·32·64 MLP + 2·32 norms) + 32
    assert_eq!(metric(&l, "fresh", "params"), 29_536.0);
    // A random model is near uniform: perplexity ≈ vocab size.
    let before = metric(&l, "before", "perplexity");
    assert!(
        (200.0..400.0).contains(&before),
        "fresh perplexity {before}"
    );
    let after = metric(&l, "after", "perplexity");
    assert!(
        after < before / 3.0,
        "perplexity {before} → {after} after 30 steps"
    );
}

#[test]
fn a_diverging_run_fails_with_the_step_number() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &manifest(
            "    steps: 10
    lr: 1.0e+30
    max_grad_norm: null
",
        ),
    );
    let out = burnish()
        .args(["run", m.to_str().unwrap(), "-q"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("burnish::train::non_finite"), "{err}");
    assert!(err.contains("at step 2 (the last finite loss was"), "{err}");
    // Nothing of the failed trainer is cached, and no lock file claims the run.
    let kinds: Vec<String> = std::fs::read_dir(tmp.path().join(".burnish/entries"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("record.json")).ok())
        .map(|r| serde_json::from_str::<serde_json::Value>(&r).unwrap()["kind"].to_string())
        .collect();
    assert!(!kinds.iter().any(|k| k.contains("train.")), "{kinds:?}");
    assert!(!m.with_extension("lock").exists());
}

#[test]
fn qlora_sft_trains_over_an_nf4_base_and_lowers_held_out_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("../pipelines/qlora-sft.yaml"))
        .unwrap()
        .replace("../fixtures", &fixtures().display().to_string())
        .replace("backend: auto", "backend: cpu");
    let m = tmp.path().join("pipeline.yaml");
    std::fs::write(&m, text).unwrap();
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    // The frozen base's 7 projections per layer in NF4: 4 bits + 8 bits per 64 values + one f32
    // second-level scale per tensor here (fewer than 256 blocks each) + one f32 mean.
    let bits = metric(&l, "sft", "base_bits_per_param");
    assert!(
        (4.12..4.2).contains(&bits),
        "{bits} bits per base parameter"
    );
    // 2 layers × r=8 × [q 128 + k 96 + v 96 + o 128 + gate 240 + up 240 + down 240] = 18,688
    assert_eq!(metric(&l, "sft", "trainable_params"), 18_688.0);
    let (before, after) = (
        metric(&l, "eval_base", "mean_nll"),
        metric(&l, "eval", "mean_nll"),
    );
    assert!(
        after < before * 0.8,
        "QLoRA SFT: held-out loss {before:.4} → {after:.4}, wanted at least a 20% drop"
    );
}

#[test]
fn bf16_compute_sft_lowers_held_out_loss() {
    let (before, after, l) = sft_gain(
        "    lora: {rank: 8, alpha: 16, targets: [q_proj, v_proj]}
    dtype: bf16
    epochs: 6
    lr: 3.0e-3
    warmup_steps: 4
",
    );
    assert_eq!(l["stages"]["sft"]["metrics"]["dtype"], "bf16");
    assert!(
        after < before * 0.8,
        "bf16 LoRA SFT: held-out loss {before:.4} → {after:.4}, wanted at least a 20% drop"
    );
}

#[test]
fn a_template_error_names_the_users_file_and_the_record() {
    // The checkpoint's template raises on a system turn; record 2 has one. The model is copied
    // into the cache, yet the error names the file the manifest points at.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("models/raiser");
    std::fs::create_dir_all(&model).unwrap();
    let src = fixtures().join("models/tiny-qwen2");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if !f
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("reference")
        {
            std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        model.join("chat_template.jinja"),
        "{% for m in messages %}{% if m.role == 'system' %}\
         {{ raise_exception('System role not supported') }}{% endif %}\
         {{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("chat.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n\
         {\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .unwrap();
    let m = write_manifest(
        tmp.path(),
        "pipeline: template-error
backend: cpu
stages:
  base: {kind: model, from: models/raiser}
  chat: {kind: dataset, path: chat.jsonl, format: chat}
  sft: {kind: train.sft, model: base, data: chat, chat_template: checkpoint, seq_len: 64, steps: 1}
",
    );
    let out = run(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err
        .split_whitespace()
        .filter(|w| *w != "│" && *w != "|")
        .collect::<Vec<_>>()
        .join(" ");
    assert!(err.contains("System role not supported"), "{err}");
    assert!(err.contains("models/raiser/chat_template.jinja"), "{err}");
    assert!(!err.contains(".burnish"), "names the cached copy: {err}");
    assert!(err.contains("record 2"), "{err}");
}

/// Two LoRA trainers side by side (`--jobs 2`), SIGKILLed at a random moment of a run 20
/// times, each time from a fresh cache and then run to the end: every trial ends with the lock
/// an uninterrupted run writes (fingerprints, output digests, metrics) and `verify` passes.
#[test]
fn twenty_sigkills_at_random_moments_under_two_trainers_end_like_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let trainer = |name: &str, lr: &str| {
        format!(
            "  {name}:
    kind: train.sft
    model: base
    data: split.train
    chat_template: chatml
    seq_len: 64
    batch_size: 2
    lora: {{rank: 4, alpha: 8}}
    steps: 16
    lr: {lr}
    checkpoint_every: 2
"
        )
    };
    let text = manifest(RESUMABLE)
        .split("  sft:\n")
        .next()
        .unwrap()
        .to_owned()
        + &trainer("sft_a", "2.0e-3")
        + &trainer("sft_b", "4.0e-3");
    let straight = tmp.path().join("straight");
    let m = write_manifest(&straight, &text);
    let t0 = Instant::now();
    run_ok(
        &["run", m.to_str().unwrap(), "-q", "--jobs", "2"],
        &straight,
    );
    let full = t0.elapsed();
    let reference = lock(&straight);

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut killed = 0;
    for trial in 0..20 {
        let dir = tmp.path().join(format!("trial{trial}"));
        let m = write_manifest(&dir, &text);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = full.mul_f64((seed % 1000) as f64 / 1000.0);
        let mut child = burnish()
            .args(["run", m.to_str().unwrap(), "-q", "--jobs", "2"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL on Unix
            killed += 1;
        }
        child.wait().unwrap();
        run_ok(&["run", m.to_str().unwrap(), "-q", "--jobs", "2"], &dir);
        assert_eq!(
            lock(&dir),
            reference,
            "trial {trial} (killed after {at:?}) ends unlike an uninterrupted run"
        );
        let out = run_ok(&["verify", m.to_str().unwrap()], &dir);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains("0 bad"), "trial {trial}: {report}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert!(killed >= 12, "only {killed} of 20 runs were killed mid-way");
    let line = format!(
        "sigkill: {killed} of 20 runs killed mid-way (a full run takes {full:?}); 20 of 20 ended like an uninterrupted run\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}
