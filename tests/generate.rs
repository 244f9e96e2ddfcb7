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

/// The greedy completion text of every gsm8k fixture prompt (max 6 new tokens).
fn greedy_texts(dir: &std::path::Path) -> Vec<String> {
    let m = write_manifest(dir, &manifest("    max_new_tokens: 6\n"));
    run_ok(&["run", m.to_str().unwrap(), "-q"], dir);
    records(dir)
        .iter()
        .map(|r| {
            let messages = r["messages"].as_array().unwrap();
            messages.last().unwrap()["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// HumanEval's pass@k by exact binomials: `1 − C(n−c, k)/C(n, k)`.
fn pass_at(n: u64, c: u64, k: u64) -> f64 {
    let choose = |n: u64, k: u64| -> f64 {
        if k > n {
            return 0.0;
        }
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    };
    1.0 - choose(n - c, k) / choose(n, k)
}

#[test]
fn eval_scores_exact_match_pass_at_k_and_mean_reward_from_its_samples() {
    let tmp = tempfile::tempdir().unwrap();
    // Answers the fixture model gets right by construction: the even prompts' answers are
    // their greedy completions, the odd ones' something it never writes.
    let texts = greedy_texts(&tmp.path().join("first"));
    let questions: Vec<Value> = std::fs::read_to_string(fixtures().join("data/gsm8k.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut data = String::new();
    let mut right = 0;
    for (i, (q, text)) in questions.iter().zip(&texts).enumerate() {
        let answer = if i % 2 == 0 && !text.trim().is_empty() && !text.contains("####") {
            right += 1;
            text.trim().to_owned()
        } else {
            "never-this".to_owned()
        };
        let rec = serde_json::json!({"question": q["question"], "answer": format!("work\n#### {answer}")});
        data.push_str(&format!("{rec}\n"));
    }
    assert!(right >= 10, "{texts:?}");
    let dir = tmp.path().join("eval");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("probe.jsonl"), data).unwrap();
    let m = write_manifest(
        &dir,
        &format!(
            "pipeline: evalgen
seed: 3
backend: cpu
stages:
  base: {{kind: model, from: {}}}
  probe: {{kind: dataset, path: probe.jsonl, format: reasoning}}
  score:
    kind: eval
    model: base
    data: probe
    metrics: [exact_match, pass_at_k, mean_reward]
    generation:
      max_new_tokens: 6
      n: 4
      k: [1, 2, 4]
      sampling: {{do_sample: true, temperature: 0.4}}
      rewards:
        - {{kind: exact_answer, name: right, regex: '(?s)^(.*)$'}}
        - {{kind: contains, name: has_e, text: e, weight: 0.5}}
",
            fixtures().join("models/tiny-llama").display()
        ),
    );
    run_ok(&["run", m.to_str().unwrap(), "-q"], &dir);
    let l = lock(&dir);
    let got = |name: &str| metric(&l, "score", name);
    assert!(
        (got("exact_match") - right as f64 / 25.0).abs() < 1e-6,
        "{l:#}"
    );
    // The sampled pass, as samples.jsonl keeps it after the 25 greedy records.
    let samples: Vec<Value> = std::fs::read_to_string(&find(&dir, "samples.jsonl")[0])
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 25 + 100);
    let sampled = &samples[25..];
    let mut correct = [0u64; 25];
    let mut total = 0.0;
    for s in sampled {
        let meta = &s["meta"];
        let p = meta["prompt_index"].as_u64().unwrap() as usize;
        correct[p] += u64::from(meta["rewards"]["right"].as_f64().unwrap() == 1.0);
        total += meta["reward"].as_f64().unwrap();
    }
    // Low temperature: most samples are the greedy one, some are not.
    let hits: u64 = correct.iter().sum();
    assert!(hits > 20 && hits < 100, "{correct:?}");
    for k in [1, 2, 4] {
        let want = correct.iter().map(|&c| pass_at(4, c, k)).sum::<f64>() / 25.0;
        assert!(
            (got(&format!("pass@{k}")) - want).abs() < 1e-6,
            "pass@{k}: {} vs {want}",
            got(&format!("pass@{k}"))
        );
    }
    assert!(got("pass@4") >= got("pass@2") && got("pass@2") >= got("pass@1"));
    assert!((got("mean_reward") - total / 100.0).abs() < 1e-5, "{l:#}");
    assert!((got("rewards/right/mean") - hits as f64 / 100.0).abs() < 1e-6);
}

#[test]
fn rationalization_samples_unsolved_prompts_again_with_a_hint_it_leaves_out() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &manifest(
            "    max_new_tokens: 6
    rewards: [{kind: exact_answer}]
    rationalize: {hint: ' (the answer is {answer})'}
",
        ),
    );
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    let recs = records(tmp.path());
    let first: Vec<&Value> = recs.iter().take(25).collect();
    let unsolved: Vec<u64> = first
        .iter()
        .filter(|r| r["meta"]["reward"].as_f64().unwrap() < 1.0)
        .map(|r| r["meta"]["prompt_index"].as_u64().unwrap())
        .collect();
    // A random fixture model solves nothing: every prompt is sampled again.
    assert_eq!(unsolved.len(), 25);
    assert_eq!(metric(&l, "gen", "rationalized_prompts"), 25.0);
    assert_eq!(recs.len(), 50);
    let mut changed = 0;
    for (a, b) in first.iter().zip(&recs[25..]) {
        assert_eq!(b["meta"]["rationalized"], true);
        assert_eq!(b["meta"]["prompt_index"], a["meta"]["prompt_index"]);
        assert_eq!(b["meta"]["sample"], 1);
        assert!(a["meta"].get("rationalized").is_none());
        // The record keeps the prompt without the hint…
        let (ma, mb) = (
            a["messages"].as_array().unwrap(),
            b["messages"].as_array().unwrap(),
        );
        assert_eq!(ma[..ma.len() - 1], mb[..mb.len() - 1]);
        assert!(!b.to_string().contains("the answer is"));
        // …while the model saw it: greedy completions of the hinted prompts differ.
        changed += usize::from(ma.last() != mb.last());
    }
    assert!(changed > 10, "{changed} of 25 hinted completions changed");

    let bad = write_manifest(
        &tmp.path().join("bad"),
        &manifest("    rationalize: {hint: ' (a hint)'}\n"),
    );
    let out = run(&["validate", bad.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["rationalize needs rewards", "has no `{answer}`"] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}

#[test]
fn eval_generation_settings_are_checked_at_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let m = write_manifest(
        tmp.path(),
        &format!(
            "pipeline: evalbad
backend: cpu
stages:
  base: {{kind: model, from: {}}}
  probe: {{kind: dataset, path: {}, format: reasoning}}
  score:
    kind: eval
    model: base
    data: probe
    metrics: [pass_at_k, mean_reward]
    generation: {{n: 4, k: [1, 8], sampling: {{do_sample: false}}}}
",
            fixtures().join("models/tiny-llama").display(),
            fixtures().join("data/gsm8k.jsonl").display(),
        ),
    );
    let out = run(&["validate", m.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "pass@8 needs 1 ≤ k ≤ n, and n is 4",
        "n is 4 but decoding is greedy",
        "mean_reward needs rewards to average",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}
