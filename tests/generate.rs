//! `generate` end to end: the stage samples a dataset's prompts into records a later stage can
//! read, reruns from the cache, refuses bad settings at validation; `burnish generate` gives
//! transformers' greedy ids for a raw-text prompt.

mod common;

use common::{find, fixtures, lock, metric, run, run_ok, write_manifest};
use serde_json::Value;

fn manifest(generate: &str) -> String {
    let f = fixtures();
    format!(
        "pipeline: gen
seed: 5
backend: cpu
stages:
  base: {{kind: model, from: {}}}
  problems: {{kind: dataset, path: {}, format: reasoning}}
  gen:
    kind: generate
    model: base
    data: problems
{generate}",
        f.join("models/tiny-llama").display(),
        f.join("data/gsm8k.jsonl").display(),
    )
}

/// The generate stage's records: the one `records.jsonl` in the cache with a finish reason.
fn records(dir: &std::path::Path) -> Vec<Value> {
    let file = find(dir, "records.jsonl")
        .into_iter()
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"finish_reason\"")))
        .expect("the generate stage's records");
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_stage_samples_every_prompt_n_times_and_reruns_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &manifest(
            "    n: 2
    max_new_tokens: 6
    batch_size: 5
    sampling: {do_sample: true, temperature: 0.8, top_p: 0.95}
",
        ),
    );
    let m = m.to_str().unwrap();
    run_ok(&["run", m, "-q"], tmp.path());
    let l = lock(tmp.path());
    assert_eq!(metric(&l, "gen", "prompts"), 25.0);
    assert_eq!(metric(&l, "gen", "completions"), 50.0);
    let recs = records(tmp.path());
    assert_eq!(recs.len(), 50);
    for (i, r) in recs.iter().enumerate() {
        let meta = &r["meta"];
        assert_eq!(meta["prompt_index"], i / 2);
        assert_eq!(meta["sample"], i % 2);
        let tokens = meta["tokens"].as_u64().unwrap();
        assert!((1..=6).contains(&tokens));
        assert_eq!(
            meta["finish_reason"],
            if tokens == 6 { "length" } else { "stop" }
        );
        assert!(meta["logprob"].as_f64().unwrap() < 0.0);
        // The reasoning record's answer travels with the sample; the prompt is the question,
        // the completion the assistant's turn.
        assert!(meta["answer"].as_str().is_some_and(|a| !a.is_empty()));
        let messages = r["messages"].as_array().unwrap();
        assert_eq!(messages.last().unwrap()["role"], "assistant");
        assert_eq!(messages[messages.len() - 2]["role"], "user");
    }
    // Two samples of a prompt differ somewhere (their own streams).
    assert!(recs.chunks(2).any(|p| p[0]["messages"] != p[1]["messages"]));

    let again = run_ok(&["run", m], tmp.path());
    let text = String::from_utf8_lossy(&again.stderr).to_string()
        + &String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("cached"), "{text}");
}

#[test]
fn generate_settings_are_checked_at_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &manifest(
            "    n: 3
    sampling: {temperature: 0, top_p: 1.5}
    stop: ['']
",
        ),
    );
    let out = run(&["validate", m.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "temperature must be above 0, got 0",
        "top_p must be in (0, 1], got 1.5",
        "n is 3 but decoding is greedy",
        "a stop string is empty",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}

#[test]
fn generate_command_gives_transformers_greedy_ids() {
    let dir = fixtures().join("models/tiny-llama");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation.json")).unwrap())
            .unwrap();
    let prompt = reference["prompts"][1].as_str().unwrap();
    let out = run_ok(
        &[
            "generate",
            dir.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "24",
            "--json",
        ],
        &fixtures(),
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &got["completions"][0];
    assert_eq!(c["token_ids"], reference["alone"][1]);
    assert_eq!(c["finish_reason"], "length");
    assert!(c["text"].as_str().is_some_and(|t| !t.is_empty()));
}
