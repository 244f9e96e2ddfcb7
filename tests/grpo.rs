//! `train.grpo` end to end: a SIGKILLed run resumes from its checkpoint and ends with the same
//! bits as an uninterrupted one (its rollouts are functions of the step); bad fields are
//! reported at validation, every one, on their manifest lines.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{burnish, find, lock, metric, run, run_ok, write_manifest};

/// A fresh tiny model on 2-digit sums, then GRPO rewarding a digit anywhere in the completion (a
/// fresh model's sums are all wrong and it never stops within 6 tokens, but about one completion
/// in five holds a digit): `grpo` holds the trainer's own lines.
fn manifest(grpo: &str) -> String {
    format!(
        "pipeline: grpo-test
seed: 3
backend: cpu
stages:
  problems: {{kind: data.generate, task: arithmetic, count: 200, digits: 2, style: compact}}
  chat: {{kind: data.convert, data: problems, to: chat, completion: \"{{answer}}\"}}
  tok: {{kind: tokenizer.train, data: chat, vocab_size: 259, special_tokens: [\"<pad>\", \"<eos>\"], eos_token: \"<eos>\"}}
  base:
    kind: model
    init: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_positions: 32}}
    tokenizer: tok
    tie_embeddings: true
  grpo:
    kind: train.grpo
    model: base
    data: problems
    chat_template: plain
{grpo}"
    )
}

const RESUMABLE: &str = "    rewards: [{kind: format, regex: '(?s).*[0-9].*'}]
    num_generations: 4
    batch_size: 4
    grad_accum: 2
    max_completion_length: 6
    top_k: 50
    lr: 1.0e-3
    beta: 0.04
    steps: 24
    num_iterations: 2
    checkpoint_every: 2
";

#[test]
fn sigkilled_grpo_resumes_to_the_same_bits_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let text = manifest(RESUMABLE);

    let straight = tmp.path().join("straight");
    let m = write_manifest(&straight, &text);
    run_ok(&["run", m.to_str().unwrap(), "-q"], &straight);
    let l = lock(&straight);
    assert!(
        metric(&l, "grpo", "reward_std") > 0.0,
        "no reward signal: {l:#}"
    );
    assert!(
        metric(&l, "grpo", "kl") > 0.0,
        "the policy never moved: {l:#}"
    );

    let killed = tmp.path().join("killed");
    let m = write_manifest(&killed, &text);
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
        if !find(&killed.join(".burnish/scratch"), "latest").is_empty() {
            child.0.kill().unwrap(); // SIGKILL on Unix
            child.0.wait().unwrap();
            killed_mid_way = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(killed_mid_way, "no checkpoint appeared within 120 s");
    run_ok(&["run", m.to_str().unwrap(), "-q"], &killed);
    let logs = find(&killed.join(".burnish/runs"), "grpo.log");
    assert!(
        logs.iter().any(|l| std::fs::read_to_string(l)
            .unwrap()
            .contains("resuming from checkpoint at step")),
        "the rerun did not resume from the checkpoint"
    );
    let weights = |dir: &std::path::Path| -> Vec<Vec<u8>> {
        find(&dir.join(".burnish/entries"), "model.safetensors")
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect()
    };
    let (a, b) = (weights(&straight), weights(&killed));
    // base and grpo
    assert_eq!((a.len(), b.len()), (2, 2));
    assert!(
        a.iter().all(|w| b.contains(w)),
        "the resumed run ended elsewhere"
    );
    assert_ne!(a[0], a[1], "GRPO did not change the weights");
}

#[test]
fn bad_grpo_fields_are_reported_on_their_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let text = manifest(
        "    rewards: []
    num_generations: 1
    epsilon: 1.5
    eval_data: problems
",
    );
    let m = write_manifest(tmp.path(), &text);
    let out = run(&["validate", m.to_str().unwrap()], tmp.path());
    assert!(!out.status.success());
    // Messages wrap at the terminal's width: compare without the frame.
    let err = String::from_utf8_lossy(&out.stderr)
        .split_whitespace()
        .filter(|w| *w != "│")
        .collect::<Vec<_>>()
        .join(" ");
    for want in [
        "rewards is empty",
        "num_generations must be at least 2, found 1",
        "epsilon must be in (0, 1), found 1.5",
        "train.grpo does not score held-out data",
    ] {
        assert!(err.contains(want), "no `{want}` in:\n{err}");
    }
    // The lines of the fields (the manifest's 18th line is `rewards: []`).
    for line in ["18", "19", "20", "21"] {
        assert!(
            err.contains(&format!("pipeline.yaml:{line}:")),
            "line {line} not named in:\n{err}"
        );
    }
}
