//! Every chat template TRL ships, rendered by burnish and by transformers on the same
//! conversations: the same text, or an error in both; and for templates with `{% generation %}`
//! blocks, the same targets as the `assistant_masks` TRL's `assistant_only_loss` trains on.
//!
//! The references are `fixtures/templates/trl_renders.jsonl`, written by
//! `fixtures/templates/make_trl_renders.py` from `fixtures/templates/conversations.jsonl`
//! (which this test reads through burnish's `chat` format, as a dataset stage would).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burnish_stages::data::formats::{Format, normalize};
use burnish_stages::data::records::{ChatRecord, Record};
use burnish_stages::data::source::read_rows;
use burnish_stages::text::{
    ChatTemplate, Conversation, TemplateVars, TextError, TextTokenizer, encode_conversation,
};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// One conversation of `conversations.jsonl`, with how it is rendered.
struct Case {
    record: ChatRecord,
    add_generation_prompt: bool,
    kwargs: Map<String, Value>,
}

/// The conversations, read as a `chat` dataset (the rendering options taken out of each row
/// first: they are not data).
fn cases() -> BTreeMap<String, Case> {
    let mut rows = read_rows(&fixtures().join("templates/conversations.jsonl")).unwrap();
    let mut options = Vec::new();
    for row in &mut rows {
        let id = row.fields.remove("id").unwrap();
        let agp = row.fields.remove("add_generation_prompt");
        let kwargs = row.fields.remove("kwargs");
        options.push((id, agp, kwargs));
    }
    let records = normalize(Format::Chat, &BTreeMap::new(), &rows).unwrap();
    records
        .into_iter()
        .zip(options)
        .map(|(rec, (id, agp, kwargs))| {
            let Record::Chat(record) = rec else {
                panic!("not a chat record")
            };
            let kwargs = match kwargs {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            };
            let case = Case {
                record,
                add_generation_prompt: agp == Some(Value::Bool(true)),
                kwargs,
            };
            (id.as_str().unwrap().to_owned(), case)
        })
        .collect()
}

/// What the render of one case gave, and what transformers gave.
#[derive(Default)]
struct Tally {
    same_text: usize,
    same_error: usize,
    same_masks: usize,
    differ: Vec<String>,
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[test]
fn trl_templates_render_as_transformers() {
    let tok = TextTokenizer::from_dir(&fixtures().join("models/tiny-qwen2")).unwrap();
    let cases = cases();
    let refs = fs::read_to_string(fixtures().join("templates/trl_renders.jsonl")).unwrap();
    let mut lines = refs.lines();
    let head: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        head["date"], "2024-07-26",
        "the references' strftime_now date"
    );
    let mut compiled: BTreeMap<String, Result<ChatTemplate, TextError>> = BTreeMap::new();
    let mut tally = Tally::default();
    for line in lines {
        let r: Value = serde_json::from_str(line).unwrap();
        let name = r["template"].as_str().unwrap();
        let id = r["id"].as_str().unwrap();
        let case = &cases[id];
        let template = compiled.entry(name.to_owned()).or_insert_with(|| {
            ChatTemplate::from_file(name, &fixtures().join("templates/trl").join(name))
        });
        let what = format!("{name} × {id}");
        let template = match template {
            Ok(t) => t.clone().with_vars(TemplateVars {
                kwargs: case.kwargs.clone(),
                ..TemplateVars::default()
            }),
            Err(e) => {
                tally.differ.push(format!("{what}: does not compile: {e}"));
                continue;
            }
        };
        let conv = Conversation::of(&case.record);
        let ours =
            template.render_spans(conv.messages, conv.tools, case.add_generation_prompt, &tok);
        match (&ours, r.get("text"), r.get("error")) {
            (Ok(got), Some(Value::String(want)), _) if got.text == *want => tally.same_text += 1,
            (Ok(got), Some(Value::String(want)), _) => {
                let at = got
                    .text
                    .char_indices()
                    .zip(want.chars())
                    .find(|((_, a), b)| a != b)
                    .map_or(got.text.len().min(want.len()), |((i, _), _)| i);
                tally.differ.push(format!(
                    "{what}: texts differ at byte {at}: ours {:?}, transformers {:?}",
                    &got.text[at.saturating_sub(20).min(got.text.len())..]
                        .chars()
                        .take(60)
                        .collect::<String>(),
                    want[at.saturating_sub(20).min(want.len())..]
                        .chars()
                        .take(60)
                        .collect::<String>(),
                ))
            }
            (Err(e), _, Some(Value::String(want))) => {
                // A template's own `raise_exception` message must come through as written.
                let raised = want.strip_prefix("TemplateError: ");
                let ours = e.to_string();
                match raised {
                    Some(m) if !ours.contains(first_line(m)) => tally.differ.push(format!(
                        "{what}: both fail, but transformers raised {m:?} and we said {ours:?}"
                    )),
                    _ => tally.same_error += 1,
                }
            }
            (Ok(got), _, Some(Value::String(want))) => tally.differ.push(format!(
                "{what}: transformers fails ({want}), we render {:?}",
                got.text.chars().take(80).collect::<String>()
            )),
            (Err(e), _, _) => tally
                .differ
                .push(format!("{what}: transformers renders, we fail: {e}")),
            (Ok(_), _, _) => panic!("{what}: a reference with neither text nor error"),
        }
        let (Some(want_ids), Some(want_mask)) = (r.get("input_ids"), r.get("assistant_masks"))
        else {
            continue;
        };
        let want_ids: Vec<u32> = serde_json::from_value(want_ids.clone()).unwrap();
        let want_mask: Vec<u8> = serde_json::from_value(want_mask.clone()).unwrap();
        match encode_conversation(&tok, &template, conv, false, 0) {
            Ok(ex) if ex.ids != want_ids => tally
                .differ
                .push(format!("{what}: token ids differ from transformers'")),
            Ok(ex) => {
                // Token 0 is never a target (nothing predicts it); TRL's label there is unused.
                let ours: Vec<u8> = ex.targets.iter().map(|&t| t as u8).collect();
                let theirs: Vec<u8> = std::iter::once(0)
                    .chain(want_mask.iter().skip(1).copied())
                    .collect();
                if ours == theirs {
                    tally.same_masks += 1;
                } else {
                    let at = ours.iter().zip(&theirs).position(|(a, b)| a != b);
                    tally.differ.push(format!(
                        "{what}: targets differ from assistant_masks at token {at:?}"
                    ));
                }
            }
            Err(e) => tally.differ.push(format!(
                "{what}: transformers masks, we fail to encode: {e}"
            )),
        }
    }
    eprintln!(
        "{} identical texts, {} errors in both, {} identical masks, {} differences",
        tally.same_text,
        tally.same_error,
        tally.same_masks,
        tally.differ.len()
    );
    assert!(
        tally.differ.is_empty(),
        "{} renders differ from transformers':\n{}",
        tally.differ.len(),
        tally.differ.join("\n")
    );
    // The references' counts (make_trl_renders.py prints them).
    assert_eq!(
        (tally.same_text, tally.same_error, tally.same_masks),
        (530, 118, 185),
        "texts, errors and masks"
    );
}
