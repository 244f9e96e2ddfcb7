//! Tokenizers, chat templates, loss masks, packing and `tokenizer.train`, on the tiny model
//! fixtures (`fixtures/models/`, written by `fixtures/models/make_models.py`: byte-level BPE,
//! vocab 512, `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2) and on tokenizers trained here.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burnish_engine::stage::{
    Artifact, ArtifactType, DatasetFamily, RunContext, Stage, StageError, StageOutcome,
};
use burnish_stages::data::records::{
    ChatRecord, Dataset, Message, PreferenceRecord, Record, TextRecord,
};
use burnish_stages::text::{
    ChatTemplate, CptPacking, Example, TemplateChoice, TemplateDate, TemplateVars, TextError,
    TextTokenizer, TrainTokenizerParams, TrainTokenizerStage, encode_chat, encode_cpt,
    encode_documents, encode_sft, pack_bfd, pack_wrapped,
};
use miette::Diagnostic;
use serde_json::{Value, json};
use tempfile::TempDir;

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/models")
        .join(name)
}

fn qwen() -> TextTokenizer {
    TextTokenizer::from_dir(&model_dir("tiny-qwen2")).unwrap()
}

fn llama() -> TextTokenizer {
    TextTokenizer::from_dir(&model_dir("tiny-llama")).unwrap()
}

fn chatml() -> ChatTemplate {
    ChatTemplate::builtin(TemplateChoice::Chatml).unwrap()
}

fn conversation() -> Vec<Message> {
    vec![
        Message::system("You are terse."),
        Message::user("What is 2+2?"),
        Message::assistant("4."),
        Message::user("And 3+3?"),
        Message::assistant("Six, of course."),
    ]
}

const CONVERSATION_CHATML: &str = "<|im_start|>system\nYou are terse.<|im_end|>\n\
<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
<|im_start|>assistant\n4.<|im_end|>\n\
<|im_start|>user\nAnd 3+3?<|im_end|>\n\
<|im_start|>assistant\nSix, of course.<|im_end|>\n";

fn chat(messages: Vec<Message>) -> ChatRecord {
    ChatRecord {
        messages,
        tools: Vec::new(),
        label: None,
        meta: BTreeMap::new(),
    }
}

fn text(t: &str) -> TextRecord {
    TextRecord {
        text: t.to_owned(),
        meta: BTreeMap::new(),
    }
}

/// The decoded runs of consecutive target tokens.
fn target_runs(tok: &TextTokenizer, ex: &Example) -> Vec<String> {
    assert_eq!(ex.ids.len(), ex.targets.len());
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for (&id, &t) in ex.ids.iter().zip(&ex.targets) {
        if t {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur).unwrap());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur).unwrap());
    }
    runs
}

fn code<E: Diagnostic>(e: &E) -> String {
    e.code().map(|c| c.to_string()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// tokenizers

#[test]
fn fixture_tokenizer_special_tokens() {
    for tok in [qwen(), llama()] {
        assert_eq!(tok.vocab_size(), 512);
        assert_eq!(tok.eos(), Some(("<|im_end|>", 2)));
        assert_eq!(tok.pad_id(), Some(0));
        assert_eq!(tok.bos(), None);
        assert!(!tok.add_bos());
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        let ids = tok
            .encode("<|im_start|>user\nhello world<|im_end|>")
            .unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(*ids.last().unwrap(), 2);
        assert_eq!(
            tok.decode(&ids).unwrap(),
            "<|im_start|>user\nhello world<|im_end|>"
        );
        let unicode = "naïve café — 東京 🎉";
        assert_eq!(tok.decode(&tok.encode(unicode).unwrap()).unwrap(), unicode);
    }
    // The llama fixture's template is in chat_template.jinja, the qwen fixture's in the config.
    assert!(
        llama()
            .checkpoint_template()
            .unwrap()
            .contains("<|im_start|>")
    );
    assert!(
        qwen()
            .checkpoint_template()
            .unwrap()
            .contains("<|im_start|>")
    );
}

/// A directory with the fixture's tokenizer.json and the given other files.
fn tokenizer_dir(files: &[(&str, &str)]) -> TempDir {
    let tmp = TempDir::new().unwrap();
    fs::copy(
        model_dir("tiny-qwen2").join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    for (name, content) in files {
        fs::write(tmp.path().join(name), content).unwrap();
    }
    tmp
}

#[test]
fn config_added_token_objects_and_template_lists() {
    let cfg = json!({
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false},
        "eos_token": {"content": "<|im_end|>"},
        "pad_token": null,
        "add_bos_token": true,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ messages[0].content }}"}
        ]
    });
    let dir = tokenizer_dir(&[("tokenizer_config.json", &cfg.to_string())]);
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos(), Some(("<|endoftext|>", 0)));
    assert_eq!(tok.eos(), Some(("<|im_end|>", 2)));
    assert_eq!(tok.pad_id(), None);
    assert!(tok.add_bos());
    assert_eq!(
        tok.checkpoint_template(),
        Some("DEFAULT {{ messages[0].content }}")
    );

    // With add_bos, encode_chat puts bos first (not a target).
    let tpl = ChatTemplate::resolve(TemplateChoice::Chatml, &tok).unwrap();
    let ex = encode_chat(&tok, &tpl, &conversation(), false).unwrap();
    assert_eq!(ex.ids[0], 0);
    assert!(!ex.targets[0]);
    assert_eq!(
        target_runs(&tok, &ex),
        ["4.<|im_end|>", "Six, of course.<|im_end|>"]
    );

    // chat_template.jinja wins over the config's.
    let dir = tokenizer_dir(&[
        ("tokenizer_config.json", &cfg.to_string()),
        ("chat_template.jinja", "FROM FILE"),
    ]);
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.checkpoint_template(), Some("FROM FILE"));
    let tpl = ChatTemplate::resolve(TemplateChoice::Auto, &tok).unwrap();
    assert_eq!(tpl.name(), "checkpoint");
    assert_eq!(tpl.render(&[], false, &tok).unwrap(), "FROM FILE");
}

#[test]
fn tokenizer_errors_name_the_file() {
    // Malformed tokenizer.json.
    let tmp = TempDir::new().unwrap();
    fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = TextTokenizer::from_dir(tmp.path()).unwrap_err();
    assert_eq!(code(&e), "burnish::text::tokenizer_json");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");

    // Missing tokenizer.json.
    let tmp = TempDir::new().unwrap();
    let e = TextTokenizer::from_dir(tmp.path()).unwrap_err();
    assert_eq!(code(&e), "burnish::text::io");

    // An eos token the vocabulary lacks.
    let dir = tokenizer_dir(&[("tokenizer_config.json", r#"{"eos_token": "</s>"}"#)]);
    let e = TextTokenizer::from_dir(dir.path()).unwrap_err();
    assert_eq!(code(&e), "burnish::text::unknown_token");
    assert!(
        e.to_string().ends_with(
            "tokenizer_config.json: eos_token `</s>` is not in the tokenizer's vocabulary"
        ),
        "{e}"
    );

    // A special token of the wrong type, a template list without a default, bad json.
    for (cfg, expect) in [
        (
            r#"{"eos_token": 5}"#,
            "`eos_token` should be a string, null or an object with `content`, found a number",
        ),
        (
            r#"{"chat_template": [{"name": "rag", "template": "x"}]}"#,
            "`chat_template` lists `rag` but none named `default`",
        ),
        (
            r#"{"add_bos_token": "yes"}"#,
            "`add_bos_token` should be a boolean, found a string",
        ),
        ("{", "malformed json"),
    ] {
        let dir = tokenizer_dir(&[("tokenizer_config.json", cfg)]);
        let e = TextTokenizer::from_dir(dir.path()).unwrap_err();
        assert_eq!(code(&e), "burnish::text::tokenizer_config");
        assert!(e.to_string().contains(expect), "{e}");
        assert!(e.to_string().contains("tokenizer_config.json"), "{e}");
    }
}

#[test]
fn save_to_copies_tokenizer_files() {
    let out = TempDir::new().unwrap();
    llama().save_to(out.path()).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert_eq!(
            fs::read(out.path().join(f)).unwrap(),
            fs::read(model_dir("tiny-llama").join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!out.path().join("special_tokens_map.json").exists());
    let again = TextTokenizer::from_dir(out.path()).unwrap();
    assert_eq!(again.checkpoint_template(), llama().checkpoint_template());
}

// ---------------------------------------------------------------------------------------------
// templates

#[test]
fn checkpoint_templates_render_chatml() {
    for tok in [llama(), qwen()] {
        let tpl = ChatTemplate::resolve(TemplateChoice::Auto, &tok).unwrap();
        assert_eq!(tpl.name(), "checkpoint");
        let tpl2 = ChatTemplate::resolve(TemplateChoice::Checkpoint, &tok).unwrap();
        assert_eq!(tpl2.source(), tpl.source());
        assert_eq!(
            tpl.render(&conversation(), false, &tok).unwrap(),
            CONVERSATION_CHATML
        );
        assert_eq!(
            tpl.render(&conversation()[..4], true, &tok).unwrap(),
            "<|im_start|>system\nYou are terse.<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n4.<|im_end|>\n\
             <|im_start|>user\nAnd 3+3?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // The built-in chatml renders the same.
        assert_eq!(
            chatml().render(&conversation(), false, &tok).unwrap(),
            CONVERSATION_CHATML
        );
    }
}

#[test]
fn checkpoint_choice_without_template() {
    let dir = tokenizer_dir(&[]);
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.checkpoint_template(), None);
    assert_eq!(tok.eos(), None);
    let e = ChatTemplate::resolve(TemplateChoice::Checkpoint, &tok).unwrap_err();
    assert_eq!(code(&e), "burnish::text::no_template");
    assert!(e.help().is_some());
    let auto = ChatTemplate::resolve(TemplateChoice::Auto, &tok).unwrap();
    assert_eq!(auto.name(), "chatml");
    for (choice, name) in [
        (TemplateChoice::Chatml, "chatml"),
        (TemplateChoice::Llama3, "llama3"),
        (TemplateChoice::Alpaca, "alpaca"),
    ] {
        assert_eq!(ChatTemplate::resolve(choice, &tok).unwrap().name(), name);
    }
    assert_eq!(
        serde_json::from_value::<TemplateChoice>(json!("llama3")).unwrap(),
        TemplateChoice::Llama3
    );
    assert_eq!(TemplateChoice::default(), TemplateChoice::Auto);
}

#[test]
fn sandbox_include_fails() {
    let tok = qwen();
    for src in [
        "{% include \"x\" %}",
        "{% extends \"base\" %}",
        "{% import \"m\" as m %}{{ m.f() }}",
    ] {
        let tpl = ChatTemplate::compile("evil", "evil.jinja", src.to_owned()).unwrap();
        let e = tpl.render(&conversation(), false, &tok).unwrap_err();
        assert!(
            matches!(e, TextError::TemplateRender { .. }),
            "{src}: {e:?}"
        );
        assert_eq!(code(&e), "burnish::text::template_render");
        assert!(e.to_string().contains("evil.jinja, line 1"), "{e}");
        assert!(e.to_string().contains("template not found"), "{e}");
    }
}

#[test]
fn raise_exception_surfaces_its_message() {
    let tok = qwen();
    let src = "{% for m in messages %}\n{% if m.role == 'system' %}\n{{ raise_exception('System role not supported') }}\n{% endif %}\n{% endfor %}";
    let tpl =
        ChatTemplate::compile("checkpoint", "/m/chat_template.jinja", src.to_owned()).unwrap();
    let e = tpl.render(&conversation(), false, &tok).unwrap_err();
    assert_eq!(code(&e), "burnish::text::template_raised");
    assert_eq!(
        e.to_string(),
        "chat template /m/chat_template.jinja, line 3 raised an exception: System role not supported"
    );
    // In encode_sft the record is named.
    let records = [
        chat(vec![Message::user("hi"), Message::assistant("yo")]),
        chat(conversation()),
    ];
    let e = encode_sft(&tok, &tpl, &records, 64, false, false).unwrap_err();
    assert_eq!(code(&e), "burnish::text::record");
    // Records are numbered from 1, as lines are: the second record fails.
    assert!(e.to_string().starts_with("record 2: chat template"), "{e}");
    assert!(e.help().is_some());
}

#[test]
fn template_syntax_and_render_errors() {
    let e =
        ChatTemplate::compile("checkpoint", "t.jinja", "hello\n{% for %}".to_owned()).unwrap_err();
    assert_eq!(code(&e), "burnish::text::template_syntax");
    assert!(
        e.to_string()
            .starts_with("chat template t.jinja, line 2: syntax error"),
        "{e}"
    );

    let tok = qwen();
    let tpl =
        ChatTemplate::compile("checkpoint", "t.jinja", "{{ utcnow('%Y') }}".to_owned()).unwrap();
    let e = tpl.render(&[], false, &tok).unwrap_err();
    assert_eq!(code(&e), "burnish::text::template_render");
    assert!(e.to_string().contains("unknown function"), "{e}");
}

#[test]
fn python_methods_and_tojson() {
    let tok = qwen();
    let src = "{{ messages[0].content.strip().upper() }}|{{ messages[0].content.startswith('  hi') }}|\
{{ messages[0].content.split() | join(',') }}|{{ messages[0] | tojson }}|\
{% for k, v in messages[0].items() %}{{ k }}={{ v.strip() }};{% endfor %}|\
{{ messages[0].get('missing', 'dflt') }}|{{ 'a-b-c'.split('-', 1) | join('+') }}|{{ eos_token }}|{{ bos_token is defined }}";
    let tpl = ChatTemplate::compile("t", "t", src.to_owned()).unwrap();
    let out = tpl
        .render(&[Message::user("  hi there ")], false, &tok)
        .unwrap();
    assert_eq!(
        out,
        r#"HI THERE|True|hi,there|{"role": "user", "content": "  hi there "}|role=user;content=hi there;|dflt|a+b-c|<|im_end|>|False"#
    );
}

// ---------------------------------------------------------------------------------------------
// masks

#[test]
fn chatml_masks_only_assistant_turns() {
    let tok = qwen();
    let tpl = ChatTemplate::resolve(TemplateChoice::Auto, &tok).unwrap();
    let ex = encode_chat(&tok, &tpl, &conversation(), false).unwrap();
    assert_eq!(ex.ids, tok.encode(CONVERSATION_CHATML).unwrap());
    assert!(!ex.targets[0]);
    assert_eq!(
        target_runs(&tok, &ex),
        ["4.<|im_end|>", "Six, of course.<|im_end|>"]
    );
    // The newline after the last <|im_end|> is not a target.
    assert_eq!(tok.decode(&ex.ids[ex.ids.len() - 1..]).unwrap(), "\n");
    assert!(!ex.targets[ex.ids.len() - 1]);
    let t = ex.target_ids();
    assert_eq!(t.iter().filter(|&&id| id == 2).count(), 2);

    // train_on_prompt: everything but token 0.
    let all = encode_chat(&tok, &tpl, &conversation(), true).unwrap();
    assert_eq!(all.ids, ex.ids);
    assert!(!all.targets[0]);
    assert!(all.targets[1..].iter().all(|&t| t));
    assert_eq!(all.target_count(), all.len() - 1);
}

#[test]
fn llama3_builtin_masks() {
    // A tokenizer that knows llama 3's special tokens, trained here.
    let texts: Vec<String> = (0..60)
        .map(|i| format!("Six, of course. What is {i}+{i}? You are terse."))
        .collect();
    let ran = train_tokenizer(
        &texts,
        json!({
            "vocab_size": 320,
            "special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "eos_token": "<|eot_id|>"
        }),
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(ran.main()).unwrap();
    assert_eq!(tok.eos(), Some(("<|eot_id|>", 3)));
    let tpl = ChatTemplate::resolve(TemplateChoice::Llama3, &tok).unwrap();
    assert_eq!(
        tpl.render(&conversation()[..3], false, &tok).unwrap(),
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    );
    let ex = encode_chat(&tok, &tpl, &conversation(), false).unwrap();
    assert_eq!(
        target_runs(&tok, &ex),
        ["4.<|eot_id|>", "Six, of course.<|eot_id|>"]
    );

    // With the fixture tokenizer the llama 3 markers are plain text, still masked right.
    let tok = qwen();
    let tpl = ChatTemplate::resolve(TemplateChoice::Llama3, &tok).unwrap();
    let ex = encode_chat(&tok, &tpl, &conversation()[..3], false).unwrap();
    assert_eq!(target_runs(&tok, &ex), ["4.<|eot_id|>"]);
}

#[test]
fn alpaca_builtin_masks() {
    let tok = qwen();
    let tpl = ChatTemplate::resolve(TemplateChoice::Alpaca, &tok).unwrap();
    assert_eq!(
        tpl.render(&conversation(), false, &tok).unwrap(),
        "You are terse.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4.<|im_end|>\n\n\
         ### Instruction:\nAnd 3+3?\n\n### Response:\nSix, of course.<|im_end|>"
    );
    assert_eq!(
        tpl.render(&[Message::user("Name a color.")], true, &tok)
            .unwrap(),
        "### Instruction:\nName a color.\n\n### Response:\n"
    );
    let ex = encode_chat(&tok, &tpl, &conversation(), false).unwrap();
    assert_eq!(
        target_runs(&tok, &ex),
        ["4.<|im_end|>", "Six, of course.<|im_end|>"]
    );
    let ex = encode_chat(
        &tok,
        &tpl,
        &[
            Message::user("Name a color.\n\nOne word."),
            Message::assistant("Blue"),
        ],
        false,
    )
    .unwrap();
    assert_eq!(target_runs(&tok, &ex), ["Blue<|im_end|>"]);
}

#[test]
fn prefix_mismatch_is_an_error() {
    // A template that renders the last assistant turn differently from earlier ones.
    let src = "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
    let tok = qwen();
    let tpl =
        ChatTemplate::compile("checkpoint", "/m/chat_template.jinja", src.to_owned()).unwrap();
    let e = encode_chat(&tok, &tpl, &conversation(), false).unwrap_err();
    assert_eq!(code(&e), "burnish::text::template_prefix");
    assert!(e.to_string().contains("/m/chat_template.jinja"), "{e}");
    assert!(e.to_string().contains("message 2"), "{e}");
    // train_on_prompt needs no assistant spans.
    assert!(encode_chat(&tok, &tpl, &conversation(), true).is_ok());
}

// ---------------------------------------------------------------------------------------------
// truncation, packing, continued pretraining

#[test]
fn truncation_and_packing() {
    let tok = qwen();
    let tpl = chatml();
    let long_prompt = "word ".repeat(80);
    let long_answer = "answer ".repeat(80);
    let records = vec![
        chat(vec![
            Message::user("Hi"),
            Message::assistant("Hello there, friend."),
        ]),
        chat(vec![
            Message::user(long_prompt.trim()),
            Message::assistant("Ok."),
        ]),
        chat(vec![
            Message::user("Q"),
            Message::assistant(long_answer.trim()),
        ]),
        chat(vec![Message::user("no answer")]),
    ];
    let full: Vec<Example> = records
        .iter()
        .map(|r| encode_chat(&tok, &tpl, &r.messages, false).unwrap())
        .collect();
    let len0 = full[0].len();
    let seq_len = 48;
    assert!(len0 < seq_len, "{len0}");
    // Record 1's answer starts after seq_len; record 2 is cut inside its answer.
    let first_target = |ex: &Example| ex.targets.iter().position(|&t| t).unwrap();
    assert!(first_target(&full[1]) >= seq_len);
    assert!(first_target(&full[2]) < seq_len && full[2].len() > seq_len);
    assert_eq!(full[3].target_count(), 0);

    let enc = encode_sft(&tok, &tpl, &records, seq_len, false, false).unwrap();
    assert_eq!(enc.truncated, 3);
    assert_eq!(enc.examples.len(), 2);
    assert_eq!(enc.examples[0], full[0]);
    assert_eq!(enc.examples[1].ids, full[2].ids[..seq_len]);
    assert_eq!(enc.examples[1].targets, full[2].targets[..seq_len]);
    assert_eq!(enc.tokens, len0 + seq_len);
    assert_eq!(
        enc.target_tokens,
        full[0].target_count() + full[2].targets[..seq_len].iter().filter(|&&t| t).count()
    );

    // Packed (best-fit decreasing): the cut example fills a row alone; the two short ones share
    // the second row, the longer first, each its own document.
    let mut more = records.clone();
    more.push(chat(vec![Message::user("Hi"), Message::assistant("Ok.")]));
    let short = encode_chat(&tok, &tpl, &more[4].messages, false).unwrap();
    assert!(short.len() < len0 && len0 + short.len() <= seq_len);
    let packed = encode_sft(&tok, &tpl, &more, seq_len, false, true).unwrap();
    assert_eq!(packed.truncated, 3);
    assert_eq!(packed.examples.len(), 2);
    assert_eq!(packed.examples[0], enc.examples[1]);
    assert!(packed.examples[0].doc_starts.is_empty());
    let row = &packed.examples[1];
    assert_eq!(row.ids, [full[0].ids.clone(), short.ids.clone()].concat());
    assert_eq!(
        row.targets,
        [full[0].targets.clone(), short.targets.clone()].concat()
    );
    assert_eq!(row.doc_starts, [len0]);
    assert!(!row.targets[0] && !row.targets[len0]);
    assert_eq!(packed.tokens, enc.tokens + short.len());
    assert_eq!(
        packed.target_tokens,
        enc.target_tokens + short.target_count()
    );

    // train_on_prompt keeps record 1 and 3 (cut, but with targets).
    let all = encode_sft(&tok, &tpl, &records, seq_len, true, false).unwrap();
    assert_eq!(all.examples.len(), 4);
    assert_eq!(all.truncated, 2);

    // seq_len below 2 is refused.
    let e = encode_sft(&tok, &tpl, &records, 1, false, false).unwrap_err();
    assert_eq!(code(&e), "burnish::text::seq_len");
}

#[test]
fn pack_wrapped_blocks() {
    let ex = |n: u32| Example {
        ids: (0..n).collect(),
        targets: (0..n).map(|i| i > 0).collect(),
        doc_starts: Vec::new(),
    };
    let blocks = pack_wrapped(vec![ex(5), ex(6), ex(3)], 4);
    let lens: Vec<usize> = blocks.iter().map(Example::len).collect();
    assert_eq!(lens, [4, 4, 4, 2]);
    assert_eq!(blocks[1].ids, [4, 0, 1, 2]);
    assert_eq!(blocks[1].targets, [false, false, true, true]);
    assert!(blocks.iter().all(|b| b.doc_starts.is_empty()));
    // A final block of one token has no target and is dropped.
    let blocks = pack_wrapped(vec![ex(5)], 4);
    assert_eq!(blocks.len(), 1);
}

/// Example `i` of length `n`: ids `100·i + j`, every token but the first a target.
fn numbered(lengths: &[usize]) -> Vec<Example> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| Example {
            ids: (0..n as u32).map(|j| 100 * i as u32 + j).collect(),
            targets: (0..n).map(|j| j > 0).collect(),
            doc_starts: Vec::new(),
        })
        .collect()
}

/// Each row as the indices of its examples, in order (ids `100·i + j`, see [`numbered`]).
fn row_members(rows: &[Example]) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|r| {
            let mut starts = vec![0];
            starts.extend(&r.doc_starts);
            starts.iter().map(|&s| r.ids[s] / 100).collect()
        })
        .collect()
}

#[test]
fn bfd_packing_matches_trl() {
    // Expected rows from TRL 1.16.0's `trl.data_utils._pack_bfd` on a pyarrow table of
    // `input_ids` with these lengths (ids 100·i + j): for [5, 3, 7, 2, 4] into 8,
    // seq_lengths [[7], [5, 3], [4, 2]]. By hand: 7 opens row 0 (room 1); 5 fits no row and
    // opens row 1 (room 3); 4 opens row 2 (room 4); 3 takes row 1, the least room that holds it
    // (3 of 3 and 4); 2 takes row 2 (room 4; row 0 has 1).
    let rows = pack_bfd(numbered(&[5, 3, 7, 2, 4]), 8);
    assert_eq!(row_members(&rows), [vec![2], vec![0, 1], vec![4, 3]]);
    let lens: Vec<usize> = rows.iter().map(Example::len).collect();
    assert_eq!(lens, [7, 8, 6]);
    assert_eq!(rows[1].doc_starts, [5]);
    assert_eq!(rows[2].doc_starts, [4]);
    // Each document's first token is not a target; the rest keep theirs.
    assert_eq!(rows[2].targets, [false, true, true, true, false, true]);
    assert_eq!(rows[1].ids[5..], [100, 101, 102]);
    // Ties: equal lengths keep their order, and of rows with equal room the first to get it
    // is filled. TRL gives [[6, 2], [4, 4], [4, 3, 1], [2]] (examples [[5, 3], [0, 1],
    // [2, 7, 6], [4]]).
    let rows = pack_bfd(numbered(&[4, 4, 4, 2, 2, 6, 1, 3]), 8);
    assert_eq!(
        row_members(&rows),
        [vec![5, 3], vec![0, 1], vec![2, 7, 6], vec![4]]
    );
    assert_eq!(rows[2].doc_starts, [4, 7]);
    // An example longer than the row is cut to it and fills a row; empty ones are dropped.
    // TRL: [[8], [5, 3]] for [3, 9, 0, 5].
    let rows = pack_bfd(numbered(&[3, 9, 0, 5]), 8);
    assert_eq!(row_members(&rows), [vec![1], vec![3, 0]]);
    assert_eq!(rows[0].len(), 8);
}

#[test]
fn cpt_blocks_and_eos() {
    let tok = qwen();
    let records = [
        text("hello world"),
        text(""),
        text("the quick brown fox jumps"),
    ];
    let a = tok.encode("hello world").unwrap();
    let b = tok.encode("the quick brown fox jumps").unwrap();
    let mut stream = a.clone();
    stream.push(2);
    stream.extend(&b);
    stream.push(2);

    let seq_len = 4;
    let enc = encode_cpt(&tok, &records, seq_len, CptPacking::Wrapped).unwrap();
    let full_blocks = stream.len() / seq_len;
    let rest = stream.len() % seq_len;
    let expected = full_blocks + usize::from(rest >= 2);
    assert_eq!(enc.examples.len(), expected);
    for (i, ex) in enc.examples.iter().enumerate() {
        let start = i * seq_len;
        assert_eq!(ex.ids, stream[start..(start + seq_len).min(stream.len())]);
        assert!(!ex.targets[0]);
        assert!(ex.targets[1..].iter().all(|&t| t));
        assert!(ex.doc_starts.is_empty());
    }
    assert_eq!(enc.truncated, 0);
    assert_eq!(
        enc.tokens,
        full_blocks * seq_len + if rest >= 2 { rest } else { 0 }
    );
    assert_eq!(enc.target_tokens, enc.tokens - enc.examples.len());

    // Documents (the default): the same blocks; the block holding the second document's start
    // marks it, and its first token is not a target.
    let docs = encode_cpt(&tok, &records, seq_len, CptPacking::default()).unwrap();
    let second = a.len() + 1;
    assert_eq!(docs.examples.len(), enc.examples.len());
    for (i, (d, w)) in docs.examples.iter().zip(&enc.examples).enumerate() {
        assert_eq!(d.ids, w.ids);
        let start = i * seq_len;
        let want: Vec<usize> = (start + 1..start + d.len())
            .filter(|&s| s == second)
            .map(|s| s - start)
            .collect();
        assert_eq!(d.doc_starts, want, "block {i}");
        let targets: Vec<bool> = (0..d.len()).map(|j| j > 0 && !want.contains(&j)).collect();
        assert_eq!(d.targets, targets, "block {i}");
    }
    let split = usize::from(!second.is_multiple_of(seq_len));
    assert_eq!(docs.target_tokens, enc.target_tokens - split);

    // One block holding everything: eos after each text, none for the empty one.
    for packing in [CptPacking::Wrapped, CptPacking::Documents] {
        let enc = encode_cpt(&tok, &records, 1024, packing).unwrap();
        assert_eq!(enc.examples.len(), 1);
        assert_eq!(enc.examples[0].ids, stream);
        assert_eq!(enc.examples[0].ids[a.len()], 2);
        assert_eq!(
            tok.decode(&enc.examples[0].ids).unwrap(),
            "hello world<|im_end|>the quick brown fox jumps<|im_end|>"
        );
        assert_eq!(enc.tokens, a.len() + b.len() + 2);
        match packing {
            CptPacking::Wrapped => assert_eq!(enc.target_tokens, enc.tokens - 1),
            CptPacking::Documents => {
                assert_eq!(enc.examples[0].doc_starts, [second]);
                assert!(!enc.examples[0].targets[second]);
                assert_eq!(enc.target_tokens, enc.tokens - 2);
            }
        }
    }

    // Scoring documents one at a time: each alone, a long one in rolling windows; every
    // token but a document's first scored once.
    let docs = encode_documents(&tok, &records, seq_len).unwrap();
    let mut want = Vec::new();
    for d in [&stream[..second], &stream[second..]] {
        want.extend_from_slice(&d[1..]);
    }
    let scored: Vec<u32> = docs.examples.iter().flat_map(Example::target_ids).collect();
    assert_eq!(scored, want);
    assert!(
        docs.examples
            .iter()
            .all(|e| e.len() <= seq_len && e.doc_starts.is_empty())
    );
    assert!(docs.examples.iter().all(|e| !e.targets[0]));
    // No window mixes the two documents: the first document's last window ends at its eos,
    // the next window is the second document's start.
    let last = docs
        .examples
        .iter()
        .position(|e| e.ids.last() == Some(&2))
        .unwrap();
    assert_eq!(docs.examples[last].ids, stream[second - seq_len..second]);
    let next = &docs.examples[last + 1];
    assert_eq!(next.ids, stream[second..second + next.len()]);
    assert_eq!(docs.target_tokens, stream.len() - 2);
    let whole = encode_documents(&tok, &records, 1024).unwrap();
    assert_eq!(whole.examples.len(), 2);
    assert_eq!(whole.examples[0].ids, stream[..second]);
    assert_eq!(whole.examples[1].ids, stream[second..]);
}

// ---------------------------------------------------------------------------------------------
// tokenizer.train

/// One finished stage run: its output dir kept alive by the temp dir.
struct Ran {
    _tmp: TempDir,
    out: PathBuf,
    outcome: StageOutcome,
}

impl Ran {
    fn main(&self) -> &Path {
        &self.out
    }
}

fn dataset_artifact(tmp: &Path, ds: &Dataset) -> Artifact {
    let dir = tmp.join("data");
    fs::create_dir_all(&dir).unwrap();
    ds.write(&dir).unwrap();
    Artifact {
        ty: ArtifactType::dataset(ds.family),
        dir,
        digest: String::new(),
    }
}

fn run_train(ds: &Dataset, mut p: Value) -> Result<Ran, StageError> {
    p["data"] = json!("corpus");
    let params: TrainTokenizerParams = serde_json::from_value(p).unwrap();
    assert!(
        TrainTokenizerStage::check(&params).is_empty(),
        "{:?}",
        TrainTokenizerStage::check(&params)
    );
    let tmp = TempDir::new().unwrap();
    let art = dataset_artifact(tmp.path(), ds);
    let out = tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let mut cx = RunContext::standalone("tok", tmp.path(), 7)
        .with_input("data", art)
        .with_output("main", out.clone());
    let outcome = TrainTokenizerStage::run(&params, &mut cx)?;
    Ok(Ran {
        _tmp: tmp,
        out,
        outcome,
    })
}

fn train_tokenizer(texts: &[String], p: Value) -> Result<Ran, StageError> {
    let records = texts.iter().map(|t| Record::Text(text(t))).collect();
    run_train(&Dataset::new(DatasetFamily::Text, records), p)
}

fn corpus() -> Vec<String> {
    let words = [
        "the", "model", "learns", "tokens", "from", "text", "and", "merges", "frequent", "pairs",
        "into", "new", "symbols", "quickly",
    ];
    (0..120)
        .map(|i| {
            (0..9)
                .map(|j| words[(i * 7 + j * 3 + i / 5) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
                + &format!(" #{i}.")
        })
        .collect()
}

#[test]
fn train_tokenizer_round_trips() {
    let ran = train_tokenizer(&corpus(), json!({"vocab_size": 300})).unwrap();
    let m = &ran.outcome.metrics;
    assert_eq!(m["vocab_size"], json!(300));
    assert_eq!(m["merges"], json!(300 - 256 - 3));
    let tpc = m["tokens_per_char"].as_f64().unwrap();
    assert!(tpc > 0.0 && tpc < 1.0, "{tpc}");

    let tok = TextTokenizer::from_dir(ran.main()).unwrap();
    assert_eq!(tok.vocab_size(), 300);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.eos(), Some(("<|im_end|>", 2)));
    assert_eq!(tok.pad_id(), Some(0));
    assert_eq!(tok.bos(), None);
    assert!(!tok.add_bos());
    for s in [
        "the model learns tokens from text",
        "unseen wörds → 東京 🎉 and\ttabs\n\nnewlines",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), s);
    }
    // A frequent word became fewer tokens than its bytes.
    assert!(tok.encode("the model").unwrap().len() < "the model".len());

    // Qwen2's pipeline (the default `pre_tokenizer`), as transformers' Qwen2Tokenizer builds it.
    let json: Value =
        serde_json::from_str(&fs::read_to_string(ran.main().join("tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(json["normalizer"], json!({"type": "NFC"}));
    assert_eq!(
        json["pre_tokenizer"],
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": burnish_stages::text::train_tokenizer::QWEN2_SPLIT_REGEX},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]})
    );
    assert_eq!(
        burnish_stages::export::vocab::detect_pre(&json),
        Some("qwen2")
    );
    assert_eq!(json["post_processor"], Value::Null);
    assert_eq!(json["decoder"]["type"], json!("ByteLevel"));
    assert_eq!(json["model"]["type"], json!("BPE"));
    let added: Vec<(u64, &str)> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        added,
        [(0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>")]
    );
    assert_eq!(json["model"]["merges"].as_array().unwrap().len(), 41);

    // The config names the tokens and carries the chatml template.
    let cfg: Value = serde_json::from_str(
        &fs::read_to_string(ran.main().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["eos_token"], json!("<|im_end|>"));
    assert_eq!(cfg["pad_token"], json!("<|endoftext|>"));
    assert_eq!(cfg["bos_token"], Value::Null);
    let tpl = ChatTemplate::resolve(TemplateChoice::Checkpoint, &tok).unwrap();
    assert_eq!(tpl.source(), chatml().source());
    assert_eq!(
        tpl.render(&conversation(), false, &tok).unwrap(),
        CONVERSATION_CHATML
    );
}

#[test]
fn train_tokenizer_is_deterministic() {
    let texts = corpus();
    let a = train_tokenizer(&texts, json!({"vocab_size": 320, "min_frequency": 1})).unwrap();
    let b = train_tokenizer(&texts, json!({"vocab_size": 320, "min_frequency": 1})).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let x = fs::read(a.main().join(f)).unwrap();
        let y = fs::read(b.main().join(f)).unwrap();
        assert!(x == y, "{f} differs between two runs");
    }
    assert_eq!(a.outcome, b.outcome);
    // A different vocab size gives a different tokenizer.
    let c = train_tokenizer(&texts, json!({"vocab_size": 310, "min_frequency": 1})).unwrap();
    assert_ne!(
        fs::read(a.main().join("tokenizer.json")).unwrap(),
        fs::read(c.main().join("tokenizer.json")).unwrap()
    );
}

#[test]
fn train_tokenizer_on_chat_data() {
    let records: Vec<Record> = (0..40)
        .map(|i| {
            Record::Chat(chat(vec![
                Message::user(format!("question {i} about tokens")),
                Message::assistant("tokens are merged byte pairs"),
            ]))
        })
        .collect();
    let ran = run_train(
        &Dataset::new(DatasetFamily::Chat, records),
        json!({"vocab_size": 280, "min_frequency": 3}),
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(ran.main()).unwrap();
    assert_eq!(tok.vocab_size(), 280);
    assert_eq!(ran.outcome.metrics["merges"], json!(21));
    let s = "tokens are merged byte pairs";
    let ids = tok.encode(s).unwrap();
    assert!(ids.len() < s.len() / 2, "{}", ids.len());
    assert_eq!(tok.decode(&ids).unwrap(), s);

    // Preference data is refused.
    let pref = Record::Preference(PreferenceRecord {
        prompt: vec![Message::user("q")],
        chosen: vec![Message::assistant("a")],
        rejected: vec![Message::assistant("b")],
        meta: BTreeMap::new(),
    });
    let e = match run_train(
        &Dataset::new(DatasetFamily::Preference, vec![pref]),
        json!({"vocab_size": 280}),
    ) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    assert_eq!(
        e.code().map(|c| c.to_string()).as_deref(),
        Some("burnish::data::wrong_family")
    );
}

#[test]
fn train_tokenizer_checks_params() {
    let params = |v: Value| -> TrainTokenizerParams { serde_json::from_value(v).unwrap() };
    let problems = TrainTokenizerStage::check(&params(json!({"data": "d", "vocab_size": 259})));
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "vocab_size");
    assert_eq!(
        problems[0].message,
        "vocab_size must be at least 260 (256 byte tokens + 3 special tokens + 1 merge), found 259"
    );
    assert!(
        TrainTokenizerStage::check(&params(json!({"data": "d", "vocab_size": 260}))).is_empty()
    );

    let problems = TrainTokenizerStage::check(&params(json!({
        "data": "d", "vocab_size": 1000,
        "special_tokens": ["<pad>", "<pad>", "</s>"], "eos_token": "<eos>"
    })));
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["special_tokens[1]", "eos_token"]);
    assert_eq!(
        problems[1].message,
        "eos_token `<eos>` is not one of special_tokens"
    );

    // Unknown fields are rejected; defaults are filled in.
    assert!(
        serde_json::from_value::<TrainTokenizerParams>(
            json!({"data": "d", "vocab_size": 300, "vocab": 1})
        )
        .is_err()
    );
    let p = params(json!({"data": "d", "vocab_size": 300}));
    assert_eq!(p.min_frequency, 2);
    assert_eq!(p.eos_token, "<|im_end|>");
    assert_eq!(
        p.pre_tokenizer,
        burnish_stages::text::train_tokenizer::PreTokenizer::Qwen2
    );
    assert_eq!(
        p.special_tokens,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
}

#[test]
fn registered_in_the_registry() {
    let reg = burnish_stages::registry();
    assert!(reg.kind_names().contains(&"tokenizer.train"));
}

/// Every non-blank string in a JSON value except metadata (what make_models.py trains on).
fn text_leaves<'a>(v: &'a Value, key: Option<&str>, out: &mut Vec<&'a str>) {
    const META_KEYS: [&str; 5] = ["role", "from", "id", "language", "source"];
    match v {
        Value::String(s)
            if !key.is_some_and(|k| META_KEYS.contains(&k)) && !s.trim().is_empty() =>
        {
            out.push(s)
        }
        Value::Object(map) => map.iter().for_each(|(k, v)| text_leaves(v, Some(k), out)),
        Value::Array(items) => items.iter().for_each(|v| text_leaves(v, key, out)),
        _ => {}
    }
}

#[test]
fn train_tokenizer_matches_the_python_fixture() {
    // make_models.py trains the fixture tokenizer with Python `tokenizers` on the text fields of
    // fixtures/data/*.jsonl (GPT-2's ByteLevel pipeline, vocab 512, min_frequency 2, the default
    // special tokens): the same
    // data through tokenizer.train's trainer gives the same vocabulary and merges.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data");
    let mut files: Vec<PathBuf> = fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "jsonl"))
        // make_models.py leaves out the seed-sized copy of the tool-use set.
        .filter(|p| !p.ends_with("claudesidian_1k.jsonl"))
        .collect();
    files.sort();
    let records: Vec<Value> = files
        .iter()
        .flat_map(|p| {
            fs::read_to_string(p)
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut texts = Vec::new();
    for r in &records {
        text_leaves(r, None, &mut texts);
    }
    let params: TrainTokenizerParams =
        serde_json::from_value(json!({"data": "d", "vocab_size": 512, "pre_tokenizer": "gpt2"}))
            .unwrap();
    let trained = burnish_stages::text::train_tokenizer::train_bpe(&texts, &params).unwrap();
    let ours: Value = serde_json::from_str(&trained.to_string(false).unwrap()).unwrap();
    let fixture: Value = serde_json::from_str(
        &fs::read_to_string(model_dir("tiny-qwen2").join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours["model"]["vocab"], fixture["model"]["vocab"]);
    assert_eq!(ours["model"]["merges"], fixture["model"]["merges"]);
    assert_eq!(ours, fixture);
}

// ---------------------------------------------------------------------------------------------
// Real-world chat data: tool calls, weights, the template context, `{% generation %}`.

fn vars(kwargs: Value, date: Option<&str>) -> TemplateVars {
    let date = date.map(|d| serde_json::from_value(json!(d)).unwrap());
    TemplateVars {
        kwargs: kwargs.as_object().cloned().unwrap_or_default(),
        date: date.unwrap_or_default(),
        ..TemplateVars::default()
    }
}

#[test]
fn strftime_now_formats_the_manifest_date_never_the_clock() {
    let tok = qwen();
    let src = "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%Y-%m-%d %H:%M') }}";
    let tpl = ChatTemplate::compile("t", "t", src.to_owned()).unwrap();
    assert_eq!(
        tpl.render(&[], false, &tok).unwrap(),
        "26 Jul 2024|2024-07-26 00:00"
    );
    let tpl = tpl.with_vars(vars(json!({}), Some("2025-03-01T09:30")));
    assert_eq!(
        tpl.render(&[], false, &tok).unwrap(),
        "01 Mar 2025|2025-03-01 09:30"
    );
    // A format chrono cannot read (found by fuzzing: it panicked) is the template's error.
    let tpl = ChatTemplate::compile("t", "t", "{{ strftime_now('%-%m-%d') }}".into()).unwrap();
    let err = tpl.render(&[], false, &tok).unwrap_err().to_string();
    assert!(err.contains("`%-%m-%d` is not a strftime format"), "{err}");
    // A date that is not one is refused when the manifest is read.
    let bad: Result<TemplateDate, _> = serde_json::from_value(json!("26/07/2024"));
    assert!(bad.unwrap_err().to_string().contains("is not a date"));
}

#[test]
fn tojson_is_python_json_dumps() {
    let tok = qwen();
    // Values as Python's json.dumps writes them (insertion order, repr floats, escapes).
    let kwargs = json!({"x": {"b": 1, "a": [1.0, 1e20, 0.00001, 2.5, "é\n\"q\""]}});
    let cases = [
        (
            "{{ x | tojson }}",
            r#"{"b": 1, "a": [1.0, 1e+20, 1e-05, 2.5, "é\n\"q\""]}"#,
        ),
        (
            "{{ x | tojson(ensure_ascii=true) }}",
            r#"{"b": 1, "a": [1.0, 1e+20, 1e-05, 2.5, "\u00e9\n\"q\""]}"#,
        ),
        (
            "{{ x | tojson(sort_keys=true) }}",
            r#"{"a": [1.0, 1e+20, 1e-05, 2.5, "é\n\"q\""], "b": 1}"#,
        ),
        (
            "{{ x | tojson(separators=[',', ':']) }}",
            r#"{"b":1,"a":[1.0,1e+20,1e-05,2.5,"é\n\"q\""]}"#,
        ),
        ("{{ x.a[:2] | tojson(indent=2) }}", "[\n  1.0,\n  1e+20\n]"),
        ("{{ {} | tojson(indent=2) }}|{{ [] | tojson }}", "{}|[]"),
    ];
    for (src, want) in cases {
        let tpl = ChatTemplate::compile("t", "t", src.to_owned())
            .unwrap()
            .with_vars(vars(kwargs.clone(), None));
        assert_eq!(tpl.render(&[], false, &tok).unwrap(), want, "{src}");
    }
}

#[test]
fn the_template_sees_tools_documents_and_kwargs() {
    let tok = qwen();
    let src = "{{ tools is none }}|{{ documents is none }}|{{ enable_thinking | default('unset') }}|\
{% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls | default([]) %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{{ m.tool_call_id | default('') }};{% endfor %}";
    let tpl = ChatTemplate::compile("t", "t", src.to_owned()).unwrap();
    let rows = read_rows_jsonl(
        r#"{"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "weather?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]}, {"role": "tool", "tool_call_id": "c1", "content": "21"}, {"role": "assistant", "content": "21 C", "weight": 0}], "tools": [{"type": "function", "function": {"name": "get_weather"}}]}"#,
    );
    let Record::Chat(rec) = &rows[0] else {
        panic!("a chat record")
    };
    assert_eq!(rec.tools.len(), 1);
    assert_eq!(rec.messages[2].tool_calls[0].id.as_deref(), Some("c1"));
    assert_eq!(rec.messages[3].tool_call_id.as_deref(), Some("c1"));
    assert_eq!(rec.messages[4].weight, Some(0));
    assert!(!rec.messages[4].is_target() && rec.messages[2].is_target());
    let out = tpl.render(&rec.messages, false, &tok).unwrap();
    assert_eq!(
        out,
        "True|True|unset|developer:be brief;user:weather?;assistant:[get_weather {\"city\": \"Paris\", \"unit\": \"c\"}];tool:21c1;assistant:21 C;"
    );
    let with_tools = tpl
        .clone()
        .with_vars(vars(json!({"enable_thinking": false}), None));
    let r = with_tools
        .render_spans(&rec.messages, &rec.tools, false, &tok)
        .unwrap();
    assert!(r.text.starts_with("False|True|False|"), "{}", r.text);
    // The record round-trips through records.jsonl with nothing dropped.
    let line = serde_json::to_string(&rows[0]).unwrap();
    assert_eq!(
        Record::parse(DatasetFamily::Chat, &line).unwrap(),
        rows[0].clone()
    );
}

fn read_rows_jsonl(line: &str) -> Vec<Record> {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("rows.jsonl");
    fs::write(&path, format!("{line}\n")).unwrap();
    let rows = burnish_stages::data::source::read_rows(&path).unwrap();
    burnish_stages::data::formats::normalize(
        burnish_stages::data::Format::Chat,
        &BTreeMap::new(),
        &rows,
    )
    .unwrap()
}

#[test]
fn generation_spans_are_the_targets_and_weight_zero_turns_are_context() {
    let tok = qwen();
    let src = "{%- for m in messages %}
{%- if m.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- generation %}
{{- m.content + '<|im_end|>' }}
{%- endgeneration %}
{{- '\\n' }}
{%- else %}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}";
    let tpl = ChatTemplate::compile("t", "t", src.to_owned()).unwrap();
    assert!(tpl.has_generation());
    let msgs = vec![
        Message::user("a"),
        Message::assistant("bb"),
        Message::user("c"),
        Message::assistant("dd"),
    ];
    let r = tpl.render_spans(&msgs, &[], false, &tok).unwrap();
    let chatml_text = chatml().render(&msgs, false, &tok).unwrap();
    // The markers leave no trace: the text is chatml's.
    assert_eq!(r.text, chatml_text);
    let spans: Vec<&str> = r.generation.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, ["bb<|im_end|>", "dd<|im_end|>"]);
    let ex = encode_chat(&tok, &tpl, &msgs, false).unwrap();
    assert_eq!(
        tok.decode(&ex.target_ids()).unwrap(),
        "bb<|im_end|>dd<|im_end|>"
    );
    // weight 0 makes the first reply context, under either rule.
    let mut weighted = msgs.clone();
    weighted[1].weight = Some(0);
    for t in [&tpl, &chatml()] {
        let ex = encode_chat(&tok, t, &weighted, false).unwrap();
        assert_eq!(tok.decode(&ex.target_ids()).unwrap(), "dd<|im_end|>");
    }
}

#[test]
fn an_unclosed_generation_tag_is_a_syntax_error() {
    let e = ChatTemplate::compile(
        "t",
        "t.jinja",
        "{% generation %}{{ messages[0].content }}".to_owned(),
    )
    .unwrap_err();
    assert_eq!(code(&e), "burnish::text::template_syntax");
    assert_eq!(
        e.to_string(),
        "chat template t.jinja: syntax error: 1 {% generation %} tags but 0 {% endgeneration %}"
    );
}

#[test]
fn a_template_that_loops_without_end_runs_out_of_fuel() {
    // Two nested 10,000-step loops (what hung `burnish run` at 5 GB): an error, in about a second.
    let src =
        "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}";
    let tpl = ChatTemplate::compile("t", "models/x/chat_template.jinja", src.to_owned()).unwrap();
    let start = std::time::Instant::now();
    let e = tpl.render(&conversation(), false, &qwen()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("models/x/chat_template.jinja"), "{msg}");
    assert!(msg.contains("exceeded the fuel limit of 20000000"), "{msg}");
    eprintln!("ran out of fuel after {:?}", start.elapsed());
    // A real template on a long conversation stays far inside the limit.
    let long: Vec<Message> = (0..500)
        .flat_map(|i| {
            [
                Message::user(format!("q{i}")),
                Message::assistant(format!("a{i}")),
            ]
        })
        .collect();
    let tpl = ChatTemplate::from_file(
        "qwen3",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/templates/trl/qwen3.jinja"),
    )
    .unwrap();
    assert!(tpl.render(&long, false, &qwen()).is_ok());
}
