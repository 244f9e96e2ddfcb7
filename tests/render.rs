//! `burnish render`: the examples SFT would train on, with their targets, against TRL's
//! `assistant_masks` (`fixtures/templates/trl_renders.jsonl`, written by transformers) and a
//! hand-written ChatML rendering.

mod common;

use common::{fixtures, run, run_ok};
use serde_json::Value;

fn render_json(args: &[&str]) -> Vec<Value> {
    let model = fixtures().join("models/tiny-qwen2");
    let mut all = vec!["render", model.to_str().unwrap()];
    all.extend_from_slice(args);
    all.push("--json");
    let out = run(&all, &fixtures());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed = v["examples"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.get("error").is_some());
    assert_eq!(
        out.status.success(),
        !failed,
        "exit code 1 when a record fails"
    );
    v["examples"].as_array().unwrap().clone()
}

#[test]
fn generation_template_targets_are_trls_assistant_masks() {
    let template = fixtures().join("templates/trl/qwen2_5_training.jinja");
    let examples = render_json(&[
        "--data",
        "templates/conversations.jsonl",
        "--n",
        "100",
        "--chat-template",
        template.to_str().unwrap(),
    ]);
    let refs = std::fs::read_to_string(fixtures().join("templates/trl_renders.jsonl")).unwrap();
    let ids = [
        "basic",
        "system_multi",
        "list_content",
        "tools",
        "tools_openai",
        "thinking",
        "prompt",
        "prompt_no_thinking",
        "developer",
    ];
    assert_eq!(examples.len(), ids.len());
    let mut compared = 0;
    for line in refs.lines().skip(1) {
        let r: Value = serde_json::from_str(line).unwrap();
        if r["template"] != "qwen2_5_training.jinja" || r.get("assistant_masks").is_none() {
            continue;
        }
        let i = ids.iter().position(|id| r["id"] == *id).unwrap();
        let ex = &examples[i];
        assert_eq!(
            ex["record"],
            format!("templates/conversations.jsonl:{}", i + 1)
        );
        assert_eq!(ex["text"], r["text"], "{}", r["id"]);
        assert_eq!(ex["ids"], r["input_ids"], "{}", r["id"]);
        let ours: Vec<bool> = serde_json::from_value(ex["targets"].clone()).unwrap();
        let theirs: Vec<u8> = serde_json::from_value(r["assistant_masks"].clone()).unwrap();
        // Token 0 is never a target: nothing predicts it.
        let theirs: Vec<bool> = theirs
            .iter()
            .enumerate()
            .map(|(j, &m)| j > 0 && m == 1)
            .collect();
        assert_eq!(ours, theirs, "{}", r["id"]);
        assert!(ours.iter().any(|&t| t), "{}: no targets", r["id"]);
        compared += 1;
    }
    // The conversations that end with an assistant turn (not the two prompts), less the one
    // transformers fails on too (list content: "can only concatenate str"), which is shown
    // with its error.
    assert_eq!(compared, 6);
    let failed: Vec<&Value> = examples
        .iter()
        .filter(|e| e.get("error").is_some())
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["record"], "templates/conversations.jsonl:3");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("qwen2_5_training.jinja, line 28"),
        "{}",
        failed[0]["error"]
    );
}

#[test]
fn chatml_targets_are_the_assistant_turns_marked() {
    let out = run_ok(
        &[
            "render",
            fixtures().join("models/tiny-qwen2").to_str().unwrap(),
            "--data",
            "data/chat.jsonl",
            "--n",
            "2",
        ],
        &fixtures(),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("targets: assistant turns (found by rendering prefixes)"),
        "{text}"
    );
    assert!(
        text.contains(
            "--- data/chat.jsonl:2: 57 tokens, 12 targets ---\n\
             <|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n\
             <|im_start|>assistant\n[[Tokyo.<|im_end|>]]\n\
             <|im_start|>user\nSpell it backwards.<|im_end|>\n\
             <|im_start|>assistant\n[[oykoT<|im_end|>]]\n"
        ),
        "{text}"
    );
    assert_eq!(text.matches("\n--- data/chat.jsonl:").count(), 2);
}

#[test]
fn render_refuses_what_it_cannot_show() {
    let model = fixtures().join("models/tiny-qwen2");
    let model = model.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--data", "data/prefs.jsonl", "--format", "preference"],
            "--format preference: render shows chat datasets",
        ),
        (
            &["--data", "data/chat.jsonl", "--chat-template", "nope"],
            "--chat-template: `nope` is neither a template name",
        ),
        (
            &["--data", "data/chat.jsonl", "--column", "messages"],
            "--column `messages`: expected FIELD=COLUMN",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["render", model];
        all.extend_from_slice(args);
        let out = run(&all, &fixtures());
        let err = String::from_utf8_lossy(&out.stderr).replace('\n', " ");
        let err = err
            .split_whitespace()
            .filter(|w| *w != "|")
            .collect::<Vec<_>>()
            .join(" ");
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
