//! The data stages run standalone on the committed fixtures (`fixtures/data/`, written by
//! `cargo run -p burnish-stages --example make_data_fixtures`).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burnish_engine::de::NodeDeserializer;
use burnish_engine::stage::{
    Artifact, ArtifactKind, ArtifactType, DatasetFamily, RunContext, Stage, StageError,
    StageOutcome,
};
use burnish_stages::data::{
    ConvertStage, DatasetStage, DedupStage, FilterStage, MixStage, SelectStage, SplitStage,
    hf::resolve_hf_in,
    records::{ChatRecord, Dataset, INFO_FILE, RECORDS_FILE, Record},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tempfile::TempDir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data")
}

/// One finished stage: its outputs (name → directory) kept alive by the temp dir.
struct Ran {
    _tmp: TempDir,
    outputs: BTreeMap<String, PathBuf>,
    outcome: StageOutcome,
}

impl Ran {
    fn dir(&self, name: &str) -> &Path {
        &self.outputs[name]
    }
    fn main(&self) -> &Path {
        self.dir("main")
    }
    fn records(&self, name: &str) -> String {
        fs::read_to_string(self.dir(name).join(RECORDS_FILE)).unwrap()
    }
    fn lines(&self, name: &str) -> Vec<String> {
        self.records(name).lines().map(str::to_owned).collect()
    }
    fn json(&self, name: &str) -> Vec<Value> {
        self.lines(name)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    fn metric(&self, name: &str) -> u64 {
        self.outcome.metrics[name].as_u64().unwrap()
    }
    /// This run's output as an input artifact for the next stage.
    fn artifact(&self, name: &str) -> Artifact {
        let ds = Dataset::read(self.dir(name)).unwrap();
        Artifact {
            ty: ArtifactType::dataset(ds.family),
            dir: self.dir(name).to_path_buf(),
            digest: String::new(),
        }
    }
}

fn params<P: DeserializeOwned>(v: Value) -> P {
    serde_json::from_value(v).unwrap()
}

/// Run a stage with the given inputs (field → artifact), files and outputs.
fn run<S: Stage>(
    p: Value,
    seed: u64,
    inputs: &[(&str, Artifact)],
    files: &[(&str, PathBuf)],
    outputs: &[&str],
) -> Result<Ran, StageError> {
    let p: S::Params = params(p);
    assert!(S::check(&p).is_empty(), "check: {:?}", S::check(&p));
    let tmp = TempDir::new().unwrap();
    let mut cx = RunContext::standalone("test", tmp.path(), seed);
    for (field, art) in inputs {
        cx = cx.with_input(field, art.clone());
    }
    for (field, path) in files {
        cx = cx.with_file(field, path.clone());
    }
    let mut dirs = BTreeMap::new();
    for name in outputs {
        let dir = tmp.path().join("out").join(name);
        fs::create_dir_all(&dir).unwrap();
        cx = cx.with_output(name, dir.clone());
        dirs.insert((*name).to_owned(), dir);
    }
    let outcome = S::run(&p, &mut cx)?;
    Ok(Ran {
        _tmp: tmp,
        outputs: dirs,
        outcome,
    })
}

/// Load a fixture (path relative to fixtures/data) with a format and optional columns.
fn load(file: &str, format: &str, columns: Value) -> Result<Ran, StageError> {
    let mut p = json!({"path": file, "format": format});
    if !columns.is_null() {
        p["columns"] = columns;
    }
    run::<DatasetStage>(p, 42, &[], &[("path", fixtures().join(file))], &["main"])
}

fn load_ok(file: &str, format: &str, columns: Value) -> Ran {
    load(file, format, columns).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn err_text(r: Result<Ran, StageError>) -> (String, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => (
            e.to_string(),
            e.code().map(|c| c.to_string()).unwrap_or_default(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// formats

#[test]
fn text_code_snippets() {
    let r = load_ok("code.jsonl", "text", Value::Null);
    assert_eq!(r.metric("records"), 48);
    let lines = r.lines("main");
    assert_eq!(lines.len(), 48);
    assert_eq!(
        lines[0],
        r#"{"text":"fn add_alpha(x: i64) -> i64 {\n    x + 2\n}\n","meta":{"language":"rust"}}"#
    );
    let info: Value =
        serde_json::from_str(&fs::read_to_string(r.main().join(INFO_FILE)).unwrap()).unwrap();
    assert_eq!(info, json!({"family": "text", "records": 48}));
}

#[test]
fn alpaca_jsonl() {
    let r = load_ok("alpaca.jsonl", "alpaca", Value::Null);
    assert_eq!(r.metric("records"), 40);
    let lines = r.lines("main");
    assert_eq!(
        lines[0],
        r#"{"messages":[{"role":"user","content":"Add the two numbers.\n\n1 and 2"},{"role":"assistant","content":"1 + 2 = 3"}]}"#
    );
    // An empty input leaves the instruction alone.
    assert_eq!(
        lines[2],
        r#"{"messages":[{"role":"user","content":"What is the capital of France?"},{"role":"assistant","content":"The capital of France is Paris."}]}"#
    );
    // Quotes, commas and newlines survive.
    let rec: Value = serde_json::from_str(&lines[4]).unwrap();
    assert_eq!(
        rec["messages"][1]["content"],
        "\"adapter\" has 7 letters,\nstarts with 'a',\nand ends with 'r'."
    );
}

#[test]
fn alpaca_json_csv_parquet_match_jsonl_byte_for_byte() {
    let reference = load_ok("alpaca.jsonl", "alpaca", Value::Null).records("main");
    for file in ["alpaca.json", "alpaca.csv", "alpaca.parquet"] {
        let r = load_ok(file, "alpaca", Value::Null);
        assert_eq!(r.records("main"), reference, "{file}");
        assert_eq!(r.metric("records"), 40, "{file}");
    }
}

#[test]
fn chat_messages_jsonl_and_parquet() {
    let r = load_ok("chat.jsonl", "chat", Value::Null);
    assert_eq!(r.metric("records"), 24);
    let recs = r.json("main");
    assert_eq!(
        recs[1],
        json!({"messages": [
            {"role": "user", "content": "What is the capital of Japan?"},
            {"role": "assistant", "content": "Tokyo."},
            {"role": "user", "content": "Spell it backwards."},
            {"role": "assistant", "content": "oykoT"},
        ]})
    );
    assert_eq!(recs[0]["messages"][0]["role"], "system");
    // A Parquet LIST<STRUCT<role, content>> column reads the same.
    let p = load_ok("chat.parquet", "chat", Value::Null);
    assert_eq!(p.records("main"), r.records("main"));
}

#[test]
fn prompt_completion() {
    let r = load_ok("prompt_completion.jsonl", "prompt_completion", Value::Null);
    assert_eq!(r.metric("records"), 20);
    assert_eq!(
        r.lines("main")[0],
        r#"{"messages":[{"role":"user","content":"Continue the sequence: 1, 2, 3,"},{"role":"assistant","content":" 4, 5, 6"}]}"#
    );
}

#[test]
fn sharegpt_conversations() {
    let r = load_ok("sharegpt.jsonl", "sharegpt", Value::Null);
    assert_eq!(r.metric("records"), 20);
    let recs = r.json("main");
    assert_eq!(
        recs[0],
        json!({
            "messages": [
                {"role": "system", "content": "You are a careful math tutor."},
                {"role": "user", "content": "What is 4 times 9?"},
                {"role": "assistant", "content": "4 × 9 = 36."},
            ],
            "meta": {"id": "sg-000"},
        })
    );
    assert_eq!(recs[1]["messages"].as_array().unwrap().len(), 4);
}

#[test]
fn preference_text() {
    let r = load_ok("prefs.jsonl", "preference", Value::Null);
    assert_eq!(r.metric("records"), 30);
    assert_eq!(
        r.lines("main")[0],
        r#"{"prompt":[{"role":"user","content":"What is the capital of France?"}],"chosen":[{"role":"assistant","content":"The capital of France is Paris."}],"rejected":[{"role":"assistant","content":"I think it might be Tokyo, but I am not sure."}]}"#
    );
}

#[test]
fn preference_orca_with_system_and_column_mapping() {
    let r = load_ok(
        "orca_prefs.jsonl",
        "preference",
        json!({"prompt": "question"}),
    );
    assert_eq!(r.metric("records"), 20);
    let recs = r.json("main");
    // An empty system adds no message.
    assert_eq!(
        recs[0]["prompt"],
        json!([{"role": "user", "content": "A shop sells 12 apples in the morning and 1 in the afternoon. How many apples does it sell in total?"}])
    );
    assert_eq!(
        recs[1]["prompt"][0],
        json!({"role": "system", "content": "You are an AI assistant. Provide a detailed answer so the user does not need to search elsewhere."})
    );
    assert_eq!(recs[1]["prompt"].as_array().unwrap().len(), 2);
    assert_eq!(
        recs[1]["chosen"],
        json!([{"role": "assistant", "content": "In the morning it sells 13 apples and in the afternoon 4. In total: 13 + 4 = 17 apples."}])
    );
    assert_eq!(
        recs[1]["rejected"],
        json!([{"role": "assistant", "content": "52 apples."}])
    );
    assert!(recs.iter().all(|r| r.get("meta").is_none()));
}

#[test]
fn preference_hh_transcripts() {
    let r = load_ok("hh_prefs.jsonl", "preference", Value::Null);
    assert_eq!(r.metric("records"), 20);
    let recs = r.json("main");
    assert_eq!(
        recs[0],
        json!({
            "prompt": [
                {"role": "user", "content": "Can you help me with the word \"burnish\"?"},
                {"role": "assistant", "content": "Of course. What would you like to know about it?"},
                {"role": "user", "content": "How many letters does it have?"},
            ],
            "chosen": [{"role": "assistant", "content": "It has 7 letters."}],
            "rejected": [{"role": "assistant", "content": "It has a lot of letters."}],
        })
    );
    assert_eq!(
        recs[1]["prompt"],
        json!([{"role": "user", "content": "Can you use it in a sentence? (the word is \"gradient\")"}])
    );
}

#[test]
fn kto_prompt_completion_label() {
    let r = load_ok("kto.jsonl", "kto", Value::Null);
    assert_eq!(r.metric("records"), 30);
    let recs = r.json("main");
    assert_eq!(recs.iter().filter(|r| r["label"] == true).count(), 20);
    assert_eq!(
        recs[2],
        json!({
            "prompt": [{"role": "user", "content": "What is 4 × 9?"}],
            "completion": [{"role": "assistant", "content": "4 × 9 = 39."}],
            "label": false,
        })
    );
}

#[test]
fn claudesidian_as_chat_keeps_labels() {
    let r = load_ok(
        "claudesidian.jsonl",
        "chat",
        json!({"messages": "conversations"}),
    );
    assert_eq!(r.metric("records"), 40);
    let recs = r.json("main");
    assert_eq!(recs.iter().filter(|r| r["label"] == true).count(), 30);
    assert_eq!(recs.iter().filter(|r| r["label"] == false).count(), 10);
    assert_eq!(recs[3]["label"], false);
    assert_eq!(recs[3]["messages"].as_array().unwrap().len(), 5);
    assert_eq!(recs[3]["messages"][4]["content"], "Done! I added it.");
    assert!(
        recs[0]["messages"][2]["content"]
            .as_str()
            .unwrap()
            .starts_with("<tool_call>{\"name\": \"search_notes\"")
    );
}

#[test]
fn claudesidian_as_kto_splits_the_final_turn() {
    let r = load_ok("claudesidian.jsonl", "kto", Value::Null);
    assert_eq!(r.metric("records"), 40);
    let recs = r.json("main");
    assert_eq!(recs.iter().filter(|r| r["label"] == true).count(), 30);
    assert_eq!(recs[0]["prompt"].as_array().unwrap().len(), 6);
    assert_eq!(
        recs[0]["completion"],
        json!([{"role": "assistant", "content": "Meetings/2024-03-04.md lists two items: item 0 and item 1."}])
    );
    assert_eq!(recs[0]["label"], true);
}

#[test]
fn ranking_sorted_best_first() {
    let r = load_ok("ranking.jsonl", "ranking", Value::Null);
    assert_eq!(r.metric("records"), 15);
    assert_eq!(
        r.json("main")[0],
        json!({
            "prompt": [{"role": "user", "content": "How do you spell \"burnish\"?"}],
            "responses": [
                {"text": "It is spelled burnish.", "rank": 1},
                {"text": "\"burnish\" is spelled b-u-r-n-i-s-h.", "rank": 2},
                {"text": "I don't know how to spell it.", "rank": 3},
            ],
        })
    );
}

#[test]
fn reasoning_gsm8k_splits_at_hashes() {
    let r = load_ok("gsm8k.jsonl", "reasoning", Value::Null);
    assert_eq!(r.metric("records"), 25);
    assert_eq!(
        r.json("main")[0],
        json!({
            "prompt": [{"role": "user", "content": "Mia has 3 marbles and finds 5 more. She then buys 2 times as many as she has. How many marbles did she buy?"}],
            "reasoning": "Mia has 3 + 5 = <<3+5=8>>8 marbles.\nShe buys 8 * 2 = <<8*2=16>>16 marbles.",
            "answer": "16",
        })
    );
}

#[test]
fn extra_columns_go_to_meta() {
    let r = load_ok("scored.jsonl", "text", Value::Null);
    assert_eq!(
        r.lines("main")[1],
        r#"{"text":"Sample passage 1 about gradient.","meta":{"score":0.37,"source":"books"}}"#
    );
}

// ---------------------------------------------------------------------------------------------
// bad data

fn bad(file: &str, format: &str) -> (String, String) {
    err_text(load(&format!("bad/{file}"), format, Value::Null))
}

#[test]
fn malformed_line_names_file_and_line() {
    let (msg, code) = bad("malformed.jsonl", "alpaca");
    assert!(
        msg.starts_with("bad/malformed.jsonl:3: malformed json: EOF while parsing"),
        "{msg}"
    );
    assert_eq!(code, "burnish::data::malformed");
}

#[test]
fn missing_field_names_file_line_and_field() {
    let (msg, code) = bad("missing_field.jsonl", "alpaca");
    assert_eq!(msg, "bad/missing_field.jsonl:2: missing field `output`");
    assert_eq!(code, "burnish::data::missing_field");
}

#[test]
fn mistyped_field_names_file_line_field_and_value() {
    let (msg, code) = bad("mistyped_field.jsonl", "alpaca");
    assert_eq!(
        msg,
        "bad/mistyped_field.jsonl:4: field `output` should be a string, found a number 4"
    );
    assert_eq!(code, "burnish::data::wrong_type");
}

#[test]
fn unknown_role_names_the_message() {
    let (msg, code) = bad("bad_role.jsonl", "chat");
    assert!(
        msg.starts_with(
            "bad/bad_role.jsonl:2: field `messages[1].role`: unknown role \"narrator\""
        ),
        "{msg}"
    );
    assert_eq!(code, "burnish::data::bad_value");
}

#[test]
fn string_label_is_rejected() {
    let (msg, _) = bad("bad_label.jsonl", "kto");
    assert_eq!(
        msg,
        "bad/bad_label.jsonl:3: field `label` should be a boolean, found a string \"yes\""
    );
}

#[test]
fn ragged_csv_row_names_its_line() {
    let (msg, code) = bad("ragged.csv", "alpaca");
    assert_eq!(
        msg,
        "bad/ragged.csv:3: malformed csv: expected 3 fields as in the header, found 4"
    );
    assert_eq!(code, "burnish::data::malformed");
}

#[test]
fn json_array_errors_name_the_index_and_parquet_the_row() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("rows.json");
    fs::write(
        &file,
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "c"}]"#,
    )
    .unwrap();
    let r = run::<DatasetStage>(
        json!({"path": "rows.json", "format": "alpaca"}),
        1,
        &[],
        &[("path", file)],
        &["main"],
    );
    assert_eq!(err_text(r).0, "rows.json[1]: missing field `output`");

    let (msg, _) = err_text(load("alpaca.parquet", "text", Value::Null));
    assert_eq!(msg, "alpaca.parquet row 0: missing field `text`");
}

#[test]
fn missing_field_error_helps_with_columns() {
    let r = load("orca_prefs.jsonl", "preference", Value::Null);
    let err = r.err().unwrap();
    // Without `columns: {prompt: question}` the Orca rows are not HH transcripts either.
    assert!(
        err.to_string()
            .starts_with("orca_prefs.jsonl:1: field `chosen`: there is no `prompt` field"),
        "{err}"
    );
    let r = load("alpaca.jsonl", "reasoning", Value::Null);
    let err = r.err().unwrap();
    assert_eq!(
        err.to_string(),
        "alpaca.jsonl:1: missing field `problem` or `question`"
    );
    let help = err.help().unwrap().to_string();
    assert!(
        help.contains("the row has: input, instruction, output"),
        "{help}"
    );
}

fn load_text(name: &str, content: &str, format: &str) -> Result<Ran, StageError> {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join(name);
    fs::write(&file, content).unwrap();
    run::<DatasetStage>(
        json!({"path": name, "format": format}),
        1,
        &[],
        &[("path", file)],
        &["main"],
    )
}

#[test]
fn csv_cells_may_hold_message_lists() {
    let csv = "messages,label\n\
               \"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"hi\"\"}, {\"\"role\"\": \"\"assistant\"\", \"\"content\"\": \"\"hello, you\"\"}]\",true\n";
    let r = load_text("chat.csv", csv, "chat").unwrap();
    assert_eq!(
        r.lines("main"),
        [
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello, you"}],"label":true}"#
        ]
    );
    // Preference cells that are plain text stay text, even when they start with a bracket.
    let csv = "prompt,chosen,rejected\nq,[1] is right,[2] is wrong\n";
    let r = load_text("p.csv", csv, "preference").unwrap();
    assert_eq!(
        r.json("main")[0]["chosen"],
        json!([{"role": "assistant", "content": "[1] is right"}])
    );
}

#[test]
fn kto_conversation_must_end_with_the_assistant() {
    let row = json!({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "label": true});
    let (msg, _) = err_text(load_text("k.jsonl", &format!("{row}\n"), "kto"));
    assert!(
        msg.starts_with(
            "k.jsonl:1: field `conversations`: the last message is from the user, not the assistant"
        ),
        "{msg}"
    );
    let (msg, _) = err_text(load_text("one.json", "{\n  \"text\": \"x\"\n}\n", "text"));
    assert_eq!(
        msg,
        "one.json: malformed json: expected a top-level array of objects (or one object per line), found one object"
    );
    // A `.json` file of JSON Lines reads like `.jsonl`.
    let r = load_text(
        "lines.json",
        "{\"text\": \"x\"}\n{\"text\": \"y\"}\n",
        "text",
    )
    .unwrap();
    assert_eq!(r.metric("records"), 2);
}

#[test]
fn wrong_family_record_in_an_artifact() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("art");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join(RECORDS_FILE),
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n",
    )
    .unwrap();
    fs::write(
        dir.join(INFO_FILE),
        r#"{"family": "preference", "records": 1}"#,
    )
    .unwrap();
    let art = Artifact {
        ty: ArtifactType::dataset(DatasetFamily::Preference),
        dir: dir.clone(),
        digest: String::new(),
    };
    let r = run::<DedupStage>(json!({"data": "x"}), 1, &[("data", art)], &[], &["main"]);
    let (msg, code) = err_text(r);
    assert!(
        msg.contains("records.jsonl:1: not a preference record: unknown field `messages`"),
        "{msg}"
    );
    assert_eq!(code, "burnish::data::wrong_record");
}

// ---------------------------------------------------------------------------------------------
// data.split

fn split(src: &Ran, fraction: f64, seed: Option<u64>, cx_seed: u64) -> Ran {
    let mut p = json!({"data": "src", "eval_fraction": fraction});
    if let Some(s) = seed {
        p["seed"] = json!(s);
    }
    run::<SplitStage>(
        p,
        cx_seed,
        &[("data", src.artifact("main"))],
        &[],
        &["train", "eval"],
    )
    .unwrap()
}

#[test]
fn split_counts_determinism_and_union() {
    let code = load_ok("code.jsonl", "text", Value::Null);
    let a = split(&code, 0.25, None, 42);
    assert_eq!((a.metric("train"), a.metric("eval")), (36, 12));
    assert_eq!((a.lines("train").len(), a.lines("eval").len()), (36, 12));
    assert_eq!(
        Dataset::read(a.dir("eval")).unwrap().family,
        DatasetFamily::Text
    );

    // Same seed, same split; another seed, another split.
    let b = split(&code, 0.25, None, 42);
    assert_eq!(a.records("eval"), b.records("eval"));
    assert_eq!(a.records("train"), b.records("train"));
    let c = split(&code, 0.25, None, 43);
    assert_ne!(a.records("eval"), c.records("eval"));
    // An explicit seed overrides the pipeline seed.
    let d1 = split(&code, 0.25, Some(7), 1);
    let d2 = split(&code, 0.25, Some(7), 2);
    assert_eq!(d1.records("eval"), d2.records("eval"));

    // train ∪ eval = input, and each side keeps the input order.
    let input = code.lines("main");
    let mut union = a.lines("train");
    union.extend(a.lines("eval"));
    union.sort();
    let mut sorted_input = input.clone();
    sorted_input.sort();
    assert_eq!(union, sorted_input);
    let pos = |l: &String| input.iter().position(|x| x == l).unwrap();
    let eval_pos: Vec<usize> = a.lines("eval").iter().map(pos).collect();
    assert!(eval_pos.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn split_rejects_an_empty_side() {
    let dedup = load_ok("dedup.jsonl", "text", Value::Null);
    let r = run::<SplitStage>(
        json!({"data": "d", "eval_fraction": 0.05}),
        1,
        &[("data", dedup.artifact("main"))],
        &[],
        &["train", "eval"],
    );
    let (msg, code) = err_text(r);
    assert_eq!(
        msg,
        "the eval output of data.split left no records: eval_fraction 0.05 of 7 records rounds to 0"
    );
    assert_eq!(code, "burnish::data::empty");
    let bad: burnish_stages::data::SplitParams = params(json!({"data": "d", "eval_fraction": 1.0}));
    assert_eq!(SplitStage::check(&bad).len(), 1);
    assert_eq!(SplitStage::check(&bad)[0].field, "eval_fraction");
}

// ---------------------------------------------------------------------------------------------
// data.filter, data.dedup

fn texts(r: &Ran) -> Vec<String> {
    r.json("main")
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn filter_by_length_and_fields() {
    let dedup = load_ok("dedup.jsonl", "text", Value::Null);
    let r = run::<FilterStage>(
        json!({"data": "d", "min_chars": 12, "max_chars": 14}),
        1,
        &[("data", dedup.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((r.metric("kept"), r.metric("dropped")), (4, 3));
    assert_eq!(
        texts(&r),
        [
            "hello, world!",
            "Hello   World",
            "Goodbye world",
            "Goodbye world."
        ]
    );

    let scored = load_ok("scored.jsonl", "text", Value::Null);
    let r = run::<FilterStage>(
        json!({"data": "s", "where": {"meta.source": "web"}}),
        1,
        &[("data", scored.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((r.metric("kept"), r.metric("dropped")), (10, 10));

    let claud = load_ok(
        "claudesidian.jsonl",
        "chat",
        json!({"messages": "conversations"}),
    );
    let r = run::<FilterStage>(
        json!({"data": "c", "where": {"label": false}}),
        1,
        &[("data", claud.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((r.metric("kept"), r.metric("dropped")), (10, 30));

    let r = run::<FilterStage>(
        json!({"data": "s", "where": {"meta.source": "tv"}}),
        1,
        &[("data", scored.artifact("main"))],
        &[],
        &["main"],
    );
    assert_eq!(
        err_text(r).0,
        "data.filter left no records: all 20 records were dropped by meta.source = \"tv\""
    );
}

#[test]
fn filter_by_comparisons() {
    // scored.jsonl: scores 0.0, 0.37, 0.74, … (20 rows), sources alternating web, books.
    let scored = load_ok("scored.jsonl", "text", Value::Null);
    let kept = |cond: Value| {
        let r = run::<FilterStage>(
            json!({"data": "s", "where": cond}),
            1,
            &[("data", scored.artifact("main"))],
            &[],
            &["main"],
        )
        .unwrap();
        (r.metric("kept"), r.metric("dropped"))
    };
    // Counted by hand from the fixture.
    assert_eq!(kept(json!({"meta.score": {"ge": 0.5}})), (9, 11));
    assert_eq!(
        kept(json!({"meta.score": {"ge": 0.5}, "meta.source": "web"})),
        (5, 15)
    );
    assert_eq!(
        kept(json!({"meta.score": {"gt": 0.2, "le": 0.74}, "meta.source": {"ne": "web"}})),
        (5, 15)
    );
    assert_eq!(kept(json!({"meta.score": {"lt": 0.1}})), (3, 17));
    assert_eq!(
        kept(json!({"meta.source": {"in": ["books", "tv"]}})),
        (10, 10)
    );
    // `eq` compares numbers by value; a text field fails a numeric bound.
    assert_eq!(kept(json!({"meta.score": {"eq": 0.7}})), (1, 19));
    let r = run::<FilterStage>(
        json!({"data": "s", "where": {"text": {"ge": 0}}}),
        1,
        &[("data", scored.artifact("main"))],
        &[],
        &["main"],
    );
    assert_eq!(
        err_text(r).0,
        "data.filter left no records: all 20 records were dropped by text ≥ 0"
    );
}

#[test]
fn filter_check_reports_empty_comparisons() {
    let p: burnish_stages::data::FilterParams = params(json!(
        {"data": "s", "where": {"meta.a": {}, "meta.b": {"ge": 1}, "meta.c": {"other": 1}}}
    ));
    // `{other: 1}` is not a comparison map: it is a value to equal.
    let fields: Vec<String> = FilterStage::check(&p)
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["where.meta.a"]);
}

#[test]
fn dedup_exact_and_normalized() {
    let dedup = load_ok("dedup.jsonl", "text", Value::Null);
    let exact = run::<DedupStage>(
        json!({"data": "d"}),
        1,
        &[("data", dedup.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((exact.metric("kept"), exact.metric("removed")), (6, 1));
    let norm = run::<DedupStage>(
        json!({"data": "d", "mode": "normalized"}),
        1,
        &[("data", dedup.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((norm.metric("kept"), norm.metric("removed")), (3, 4));
    assert_eq!(
        texts(&norm),
        ["Hello world", "Goodbye world", "Something else entirely"]
    );
}

#[test]
fn dedup_of_preferences_keys_on_all_text() {
    let prefs = load_ok("prefs.jsonl", "preference", Value::Null);
    let r = run::<DedupStage>(
        json!({"data": "p"}),
        1,
        &[("data", prefs.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!(r.metric("kept"), 30);

    // Same prompt and chosen, another rejected: kept. The same text as another part: kept.
    // A repeat with only `meta` differing: removed.
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("p.jsonl");
    let rows = [
        json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
        json!({"prompt": "q", "chosen": "a", "rejected": "c"}),
        json!({"prompt": "q", "chosen": "b", "rejected": "a"}),
        json!({"prompt": "q", "chosen": "a", "rejected": "b", "id": 7}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    fs::write(&file, text).unwrap();
    let src = run::<DatasetStage>(
        json!({"path": "p.jsonl", "format": "preference"}),
        1,
        &[],
        &[("path", file)],
        &["main"],
    )
    .unwrap();
    let r = run::<DedupStage>(
        json!({"data": "p"}),
        1,
        &[("data", src.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((r.metric("kept"), r.metric("removed")), (3, 1));
}

/// A text dataset of `texts` (one record each) loaded through the `dataset` stage.
fn text_dataset(texts: &[&str]) -> Ran {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("t.jsonl");
    let body: String = texts
        .iter()
        .map(|t| format!("{}\n", json!({"text": t})))
        .collect();
    fs::write(&file, body).unwrap();
    let ds = run::<DatasetStage>(
        json!({"path": "t.jsonl", "format": "text"}),
        1,
        &[],
        &[("path", file)],
        &["main"],
    )
    .unwrap();
    assert_eq!(ds.lines("main").len(), texts.len());
    ds
}

#[test]
fn dedup_normalized_folds_unicode() {
    let rows = [
        "Caf\u{e9}",                // NFC
        "Cafe\u{301}",              // NFD: the same text
        "cafe",                     // no accent: another text
        "\u{fb01}sh",               // the ﬁ ligature
        "fish",                     // = ﬁsh under NFKC
        "Stra\u{df}e",              // ß
        "STRASSE",                  // = Straße under full case folding (not under to_lowercase)
        "\u{ff21}\u{ff22}\u{ff23}", // full-width ＡＢＣ
        "abc",                      // = ＡＢＣ
        "CAF\u{c9}!",               // = Café (case, punctuation)
        "strasse",                  // = Straße
    ];
    let ds = text_dataset(&rows);
    let exact = run::<DedupStage>(
        json!({"data": "d"}),
        1,
        &[("data", ds.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((exact.metric("kept"), exact.metric("removed")), (11, 0));
    let norm = run::<DedupStage>(
        json!({"data": "d", "mode": "normalized"}),
        1,
        &[("data", ds.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!((norm.metric("kept"), norm.metric("removed")), (5, 6));
    assert_eq!(
        texts(&norm),
        [
            "Caf\u{e9}",
            "cafe",
            "\u{fb01}sh",
            "Stra\u{df}e",
            "\u{ff21}\u{ff22}\u{ff23}"
        ]
    );
}

/// `normalize_text` against Python's `unicodedata` and `str.casefold` (full case folding), the
/// compatibility caseless form of Unicode §3.13 D146 composed to NFC, with Python's `isalnum` /
/// `isspace` for the filter (the strings avoid the few characters where those differ from
/// Rust's). Skips when Python does not run, unless `BURNISH_REQUIRE_PY=1`.
#[test]
fn normalized_key_matches_python_unicodedata() {
    use burnish_stages::data::dedup::normalize_text;
    let cases = [
        "Caf\u{e9}",
        "Cafe\u{301}",
        "CAFE\u{301}",
        "\u{fb01}sh \u{fb02}ow",
        "Stra\u{df}e STRASSE",
        "\u{ff21}\u{ff22}\u{ff23}\u{ff11}\u{ff12}",
        "\u{3a3}\u{399}\u{3a3}\u{3a5}\u{3a6}\u{39f}\u{3a3} \u{3c3}\u{3c2}",
        "\u{1e9e} \u{130} \u{131} \u{17f} \u{212b} \u{2126}",
        "\u{1f88} \u{1fb3} \u{390} \u{3b0}",
        "\u{2460} \u{2167} x\u{b2} \u{bd} \u{2122} \u{2103}",
        "\u{d55c}\u{1100}\u{1161}\u{11a8} \u{30ac} \u{30ab}\u{3099} \u{ff76}\u{ff9e}",
        "  Hello,\t\u{a0}World!\u{3000}\r\n\u{200b}ok  ",
        "\u{4e2d}\u{6587} \u{1f600} \u{2764}\u{fe0f} na\u{ef}ve \u{1e9b}\u{323}",
        "\u{fb00}\u{fb03}\u{fb06} \u{149} \u{1f0} \u{587}",
    ];
    let script = r#"
import json, sys, unicodedata as u
def key(s):
    f = u.normalize("NFKD", u.normalize("NFKD", u.normalize("NFD", s).casefold()).casefold())
    f = u.normalize("NFC", f)
    return " ".join("".join(c for c in f if c.isalnum() or c.isspace()).split())
print(json.dumps([key(s) for s in json.loads(sys.argv[1])]))
"#;
    let arg = serde_json::to_string(&cases).unwrap();
    let Some(stdout) = common::run_python(script, &arg, "the normalization reference") else {
        return;
    };
    let theirs: Vec<String> = serde_json::from_str(stdout.trim()).unwrap();
    let ours: Vec<String> = cases.iter().map(|s| normalize_text(s)).collect();
    assert_eq!(ours, theirs);
}

// ---------------------------------------------------------------------------------------------
// data.select

fn select(src: &Ran, p: Value, seed: u64) -> Result<Ran, StageError> {
    let mut p = p;
    p["data"] = json!("s");
    run::<SelectStage>(p, seed, &[("data", src.artifact("main"))], &[], &["main"])
}

fn passage_numbers(r: &Ran) -> Vec<usize> {
    texts(r)
        .iter()
        .map(|t| t.split(' ').nth(2).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn select_top_k_threshold_and_sample() {
    // Scores are (37·i mod 100) / 100: 0.96 at i=8, 0.92 at 16, 0.85 at 5, 0.81 at 13, …
    let scored = load_ok("scored.jsonl", "text", Value::Null);
    let top = select(&scored, json!({"by": "meta.score", "top_k": 3}), 1).unwrap();
    assert_eq!(passage_numbers(&top), [5, 8, 16]);
    assert_eq!((top.metric("kept"), top.metric("dropped")), (3, 17));

    let thr = select(&scored, json!({"by": "meta.score", "threshold": 0.8}), 1).unwrap();
    assert_eq!(passage_numbers(&thr), [5, 8, 13, 16]);

    let s1 = select(&scored, json!({"sample": 5, "seed": 3}), 1).unwrap();
    let s2 = select(&scored, json!({"sample": 5, "seed": 3}), 99).unwrap();
    assert_eq!(passage_numbers(&s1), passage_numbers(&s2));
    let picked = passage_numbers(&s1);
    assert_eq!(picked.len(), 5);
    assert!(picked.windows(2).all(|w| w[0] < w[1]));
    // Pinned: the seeded draw must not drift between versions of burnish's (or rand's) code.
    assert_eq!(picked, PINNED_SAMPLE);
    let other = select(&scored, json!({"sample": 5, "seed": 4}), 1).unwrap();
    assert_ne!(passage_numbers(&other), picked);
}

const PINNED_SAMPLE: [usize; 5] = [1, 4, 5, 9, 15];

#[test]
fn select_errors_name_record_and_field() {
    let scored = load_ok("scored.jsonl", "text", Value::Null);
    let (msg, code) = err_text(select(&scored, json!({"by": "meta.nope", "top_k": 2}), 1));
    assert_eq!(msg, "record 0: field `meta.nope` is missing");
    assert_eq!(code, "burnish::data::not_numeric");
    let (msg, _) = err_text(select(
        &scored,
        json!({"by": "meta.source", "threshold": 1}),
        1,
    ));
    assert_eq!(
        msg,
        "record 0: field `meta.source` is a string \"web\", not a number"
    );
    let (msg, _) = err_text(select(&scored, json!({"sample": 21}), 1));
    assert_eq!(msg, "data.select cannot sample 21 of 20 records");
}

#[test]
fn select_check_reports_conflicts() {
    let p: burnish_stages::data::SelectParams =
        params(json!({"data": "s", "by": "meta.score", "top_k": 3, "sample": 2}));
    let fields: Vec<String> = SelectStage::check(&p)
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["sample"]);
    let p: burnish_stages::data::SelectParams = params(json!({"data": "s", "by": "meta.score"}));
    let fields: Vec<String> = SelectStage::check(&p)
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["data", "by"]);
    let p: burnish_stages::data::SelectParams = params(json!({"data": "s", "top_k": 3, "seed": 1}));
    let fields: Vec<String> = SelectStage::check(&p)
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["top_k", "seed"]);
    let p: burnish_stages::data::SelectParams = params(json!({"data": "s", "sample": 3}));
    assert!(SelectStage::check(&p).is_empty());
    assert!(SelectStage::sensitivity(&p).seed);
}

// ---------------------------------------------------------------------------------------------
// data.mix

#[test]
fn mix_counts_follow_weights() {
    let code = load_ok("code.jsonl", "text", Value::Null); // 48
    let scored = load_ok("scored.jsonl", "text", Value::Null); // 20
    let dedup = load_ok("dedup.jsonl", "text", Value::Null); // 7
    let inputs = [
        ("sources[0].data", code.artifact("main")),
        ("sources[1].data", scored.artifact("main")),
        ("sources[2].data", dedup.artifact("main")),
    ];
    // 11 × (0.5, 0.3, 0.2) = 5.5, 3.3, 2.2 → floors 5, 3, 2; the one left over goes to the
    // largest remainder (0.5): 6, 3, 2.
    let p = json!({
        "sources": [
            {"data": "code", "weight": 0.5},
            {"data": "scored", "weight": 0.3},
            {"data": "dedup", "weight": 0.2},
        ],
        "total": 11,
        "seed": 5,
    });
    let r = run::<MixStage>(p.clone(), 1, &inputs, &[], &["main"]).unwrap();
    assert_eq!(r.metric("records"), 11);
    assert_eq!(
        (
            r.metric("source_0"),
            r.metric("source_1"),
            r.metric("source_2")
        ),
        (6, 3, 2)
    );
    let lines = r.lines("main");
    let from = |src: &Ran| {
        let pool = src.lines("main");
        lines.iter().filter(|l| pool.contains(l)).count()
    };
    assert_eq!((from(&code), from(&scored), from(&dedup)), (6, 3, 2));
    // Without replacement no record repeats.
    let mut uniq = lines.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 11);
    // Deterministic.
    let again = run::<MixStage>(p, 2, &inputs, &[], &["main"]).unwrap();
    assert_eq!(again.records("main"), r.records("main"));
}

#[test]
fn mix_too_small_without_replacement() {
    let code = load_ok("code.jsonl", "text", Value::Null);
    let dedup = load_ok("dedup.jsonl", "text", Value::Null);
    let inputs = [
        ("sources[0].data", code.artifact("main")),
        ("sources[1].data", dedup.artifact("main")),
    ];
    let p = json!({
        "sources": [{"data": "code", "weight": 1}, {"data": "dedup", "weight": 3}],
        "total": 40,
    });
    let (msg, code_) = err_text(run::<MixStage>(p.clone(), 1, &inputs, &[], &["main"]));
    assert_eq!(
        msg,
        "sources[1].data (`dedup`) has 7 records, but its weight 3 asks for 30 of 40"
    );
    assert_eq!(code_, "burnish::data::too_small");
    let mut p = p;
    p["replace"] = json!(true);
    let r = run::<MixStage>(p, 1, &inputs, &[], &["main"]).unwrap();
    assert_eq!((r.metric("source_0"), r.metric("source_1")), (10, 30));
    let pool = dedup.lines("main");
    assert_eq!(
        r.lines("main").iter().filter(|l| pool.contains(l)).count(),
        30
    );
}

#[test]
fn mix_rejects_mixed_families() {
    let code = load_ok("code.jsonl", "text", Value::Null);
    let chat = load_ok("chat.jsonl", "chat", Value::Null);
    let p = json!({
        "sources": [{"data": "code", "weight": 1}, {"data": "chat", "weight": 1}],
        "total": 4,
    });
    let mp: burnish_stages::data::MixParams = params(p.clone());
    let mut types = BTreeMap::new();
    types.insert(
        "sources[0].data".to_owned(),
        ArtifactType::dataset(DatasetFamily::Text),
    );
    types.insert(
        "sources[1].data".to_owned(),
        ArtifactType::dataset(DatasetFamily::Chat),
    );
    assert_eq!(
        MixStage::outputs(&mp, &types)[0].ty,
        ArtifactType::of(ArtifactKind::Dataset)
    );
    types.insert(
        "sources[1].data".to_owned(),
        ArtifactType::dataset(DatasetFamily::Text),
    );
    assert_eq!(
        MixStage::outputs(&mp, &types)[0].ty,
        ArtifactType::dataset(DatasetFamily::Text)
    );
    let inputs = [
        ("sources[0].data", code.artifact("main")),
        ("sources[1].data", chat.artifact("main")),
    ];
    let (msg, code_) = err_text(run::<MixStage>(p, 1, &inputs, &[], &["main"]));
    assert!(
        msg.starts_with(
            "sources[1].data (`chat`) is a chat dataset, expected text like sources[0].data"
        ),
        "{msg}"
    );
    assert_eq!(code_, "burnish::data::wrong_family");
}

// ---------------------------------------------------------------------------------------------
// data.convert

#[test]
fn convert_ranking_to_preference_pairs() {
    let ranking = load_ok("ranking.jsonl", "ranking", Value::Null);
    let all = run::<ConvertStage>(
        json!({"data": "r", "to": "preference"}),
        1,
        &[("data", ranking.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    // 12 rankings of 3 → 3 pairs each, 3 of 4 → 6 pairs each.
    assert_eq!(all.metric("records"), 12 * 3 + 3 * 6);
    let recs = all.json("main");
    let answer = |v: &Value| v[0]["content"].as_str().unwrap().to_owned();
    let first: Vec<(String, String)> = recs[..3]
        .iter()
        .map(|r| (answer(&r["chosen"]), answer(&r["rejected"])))
        .collect();
    let spelled = "\"burnish\" is spelled b-u-r-n-i-s-h.".to_owned();
    let good = "It is spelled burnish.".to_owned();
    let bad = "I don't know how to spell it.".to_owned();
    assert_eq!(
        first,
        [
            (good.clone(), spelled.clone()),
            (good.clone(), bad.clone()),
            (spelled, bad.clone())
        ]
    );
    assert_eq!(
        recs[0]["prompt"],
        json!([{"role": "user", "content": "How do you spell \"burnish\"?"}])
    );

    let bw = run::<ConvertStage>(
        json!({"data": "r", "to": "preference", "pairs": "best_worst"}),
        1,
        &[("data", ranking.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!(bw.metric("records"), 15);
    let recs = bw.json("main");
    assert_eq!(
        (answer(&recs[0]["chosen"]), answer(&recs[0]["rejected"])),
        (good, bad)
    );
    assert_eq!(answer(&recs[14]["rejected"]), "Spelling is not important.");
}

#[test]
fn convert_preference_to_kto_doubles() {
    let prefs = load_ok("prefs.jsonl", "preference", Value::Null);
    let r = run::<ConvertStage>(
        json!({"data": "p", "to": "kto"}),
        1,
        &[("data", prefs.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!(r.metric("records"), 60);
    let recs = r.json("main");
    assert_eq!(recs.iter().filter(|r| r["label"] == true).count(), 30);
    assert_eq!(
        recs[0],
        json!({
            "prompt": [{"role": "user", "content": "What is the capital of France?"}],
            "completion": [{"role": "assistant", "content": "The capital of France is Paris."}],
            "label": true,
        })
    );
    assert_eq!(recs[1]["label"], false);
    assert_eq!(
        recs[1]["completion"][0]["content"],
        "I think it might be Tokyo, but I am not sure."
    );
    assert_eq!(
        Dataset::read(r.main()).unwrap().family,
        DatasetFamily::Labeled
    );
}

#[test]
fn convert_reasoning_to_chat_round_trips_gsm8k() {
    let r = load_ok("gsm8k.jsonl", "reasoning", Value::Null);
    let c = run::<ConvertStage>(
        json!({"data": "g", "to": "chat"}),
        1,
        &[("data", r.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    let rows = c.json("main");
    // The default completion is GSM8K's own answer field again.
    let first = &rows[0];
    assert_eq!(first["messages"][0]["role"], "user");
    assert_eq!(
        first["messages"][1]["content"],
        "Mia has 3 + 5 = <<3+5=8>>8 marbles.\nShe buys 8 * 2 = <<8*2=16>>16 marbles.\n#### 16"
    );
    assert_eq!(first["meta"]["answer"], "16");
    assert_eq!(Dataset::read(c.main()).unwrap().family, DatasetFamily::Chat);
    let tagged = run::<ConvertStage>(
        json!({"data": "g", "to": "chat", "completion": "<answer>{answer}</answer>"}),
        1,
        &[("data", r.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    assert_eq!(
        tagged.json("main")[1]["messages"][1]["content"],
        "<answer>33</answer>"
    );
    let p: burnish_stages::data::ConvertParams =
        params(json!({"data": "g", "to": "chat", "completion": "{reasoning} {gold}"}));
    let problems = ConvertStage::check(&p);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].message, "`{gold}` is not a placeholder");
}

#[test]
fn convert_declares_and_enforces_its_input_family() {
    let p: burnish_stages::data::ConvertParams = params(json!({"data": "x", "to": "kto"}));
    let accepts = &ConvertStage::inputs(&p)[0].accepts;
    assert!(accepts.admits(&ArtifactType::dataset(DatasetFamily::Preference)));
    assert!(accepts.admits(&ArtifactType::dataset(DatasetFamily::Chat)));
    assert!(!accepts.admits(&ArtifactType::dataset(DatasetFamily::Text)));
    let text = load_ok("code.jsonl", "text", Value::Null);
    let (msg, code) = err_text(run::<ConvertStage>(
        json!({"data": "x", "to": "kto"}),
        1,
        &[("data", text.artifact("main"))],
        &[],
        &["main"],
    ));
    assert_eq!(
        msg,
        "input `data` is a text dataset, expected preference or chat"
    );
    assert_eq!(code, "burnish::data::wrong_family");
    // Chat records need a label to become KTO examples.
    let chat = load_ok("chat.jsonl", "chat", Value::Null);
    let (msg, _) = err_text(run::<ConvertStage>(
        json!({"data": "x", "to": "kto"}),
        1,
        &[("data", chat.artifact("main"))],
        &[],
        &["main"],
    ));
    assert!(msg.contains("chat record 0 has no `label`"), "{msg}");
}

#[test]
fn labelled_chat_transcripts_convert_to_kto() {
    // The tool-use fixture: 40 transcripts, 30 desirable. The prompt is everything before the
    // first assistant turn (system + user); the rest, tool results included, is the completion.
    let tools = load_ok(
        "claudesidian.jsonl",
        "chat",
        json!({"messages": "conversations"}),
    );
    let out = run::<ConvertStage>(
        json!({"data": "x", "to": "kto"}),
        1,
        &[("data", tools.artifact("main"))],
        &[],
        &["main"],
    )
    .unwrap();
    let rows = out.json("main");
    assert_eq!(rows.len(), 40);
    assert_eq!(
        rows.iter().filter(|r| r["label"] == json!(true)).count(),
        30
    );
    let first = &rows[0];
    let roles = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(roles(&first["prompt"]), ["system", "user"]);
    assert_eq!(
        roles(&first["completion"]),
        ["assistant", "user", "assistant", "user", "assistant"]
    );
}

// ---------------------------------------------------------------------------------------------
// hf://

fn fake_hub(files: &[&str]) -> TempDir {
    let hub = TempDir::new().unwrap();
    let repo = hub.path().join("datasets--org--name");
    let snap = repo.join("snapshots").join("0123abcd");
    for f in files {
        let p = snap.join(f);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::copy(fixtures().join("alpaca.jsonl"), &p).unwrap();
    }
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    hub
}

#[test]
fn hf_resolves_the_single_data_file() {
    let hub = fake_hub(&["data/train.jsonl", "README.md", "dataset_infos.json"]);
    let caches = [PathBuf::from("/nonexistent/hub"), hub.path().to_path_buf()];
    let path = resolve_hf_in("hf://org/name", &caches).unwrap();
    assert!(path.ends_with("datasets--org--name/snapshots/0123abcd/data/train.jsonl"));

    // The dataset stage reads the resolved file as the engine hands it over.
    let r = run::<DatasetStage>(
        json!({"path": "hf://org/name", "format": "alpaca"}),
        1,
        &[],
        &[("path", path)],
        &["main"],
    )
    .unwrap();
    assert_eq!(r.metric("records"), 40);
}

#[test]
fn hf_names_a_file_or_complains() {
    let hub = fake_hub(&["train.jsonl", "test.jsonl"]);
    let caches = [hub.path().to_path_buf()];
    let err = resolve_hf_in("hf://org/name", &caches).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("holds 2 data files; name one as hf://org/name/<file>"),
        "{msg}"
    );
    assert_eq!(
        miette::Diagnostic::help(&err).unwrap().to_string(),
        "data files in the snapshot: test.jsonl, train.jsonl"
    );
    let p = resolve_hf_in("hf://org/name/test.jsonl", &caches).unwrap();
    assert!(p.ends_with("test.jsonl"));

    let err = resolve_hf_in("hf://org/other", &caches).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`hf://org/other` is not in the local hugging face cache (searched {})",
            hub.path().join("datasets--org--other").display()
        )
    );
    assert_eq!(
        miette::Diagnostic::code(&err).unwrap().to_string(),
        "burnish::data::hf_not_found"
    );
}

// ---------------------------------------------------------------------------------------------
// registry, schema, manifest-side parsing

#[test]
fn registry_holds_every_data_kind_with_a_schema() {
    let reg = burnish_stages::registry();
    assert_eq!(
        reg.kind_names(),
        [
            "data.convert",
            "data.dedup",
            "data.filter",
            "data.generate",
            "data.mix",
            "data.select",
            "data.split",
            "dataset",
            "eval",
            "export.gguf",
            "export.hf",
            "generate",
            "logprobs",
            "merge",
            "model",
            "tokenizer.train",
            "train.cpt",
            "train.dpo",
            "train.grpo",
            "train.kto",
            "train.orpo",
            "train.sft"
        ]
    );
    let mut generator = schemars::SchemaGenerator::default();
    for k in reg.public_kinds() {
        let schema = k.params_schema(&mut generator).to_value();
        assert_eq!(schema["type"], "object", "{}", k.kind);
        assert_eq!(schema["additionalProperties"], false, "{}", k.kind);
        assert!(k.version >= 1);
    }
    let format = serde_json::to_string(&generator.definitions()["Format"]).unwrap();
    assert!(
        format.contains("sharegpt") && format.contains("prompt_completion"),
        "{format}"
    );
    assert!(
        format.contains("ShareGPT `conversations`"),
        "doc comments become descriptions"
    );
}

fn from_yaml<P: DeserializeOwned>(text: &str) -> P {
    let node = burnish_engine::yaml::parse(text, 0).unwrap();
    P::deserialize(NodeDeserializer::new(&node)).unwrap()
}

#[test]
fn params_read_from_yaml() {
    let p: burnish_stages::data::FilterParams = from_yaml(
        "data: c\nwhere: {label: true, meta.source: web, meta.reward: {ge: 1}}\nmin_chars: 10\n",
    );
    use burnish_stages::data::filter::{Comparisons, Condition};
    assert_eq!(p.where_["label"], Condition::Equals(json!(true)));
    assert_eq!(p.where_["meta.source"], Condition::Equals(json!("web")));
    assert_eq!(
        p.where_["meta.reward"],
        Condition::Compare(Comparisons {
            ge: Some(1.0),
            ..Comparisons::default()
        })
    );
    let p: burnish_stages::data::MixParams =
        from_yaml("sources:\n  - {data: a, weight: 2}\n  - {data: b, weight: 0.5}\ntotal: 10\n");
    assert_eq!(p.sources[0].weight, 2.0);
    assert!(!p.replace);
    let inputs = MixStage::inputs(&p);
    assert_eq!(inputs[1].field, "sources[1].data");
    assert_eq!(inputs[1].reference.0, "b");
    let p: burnish_stages::data::DatasetParams = from_yaml(
        "path: ../fixtures/data/claudesidian.jsonl\nformat: chat\ncolumns: {messages: conversations}\n",
    );
    assert!(DatasetStage::check(&p).is_empty());
    assert!(!DatasetStage::sensitivity(&p).seed);
    assert_eq!(DatasetStage::files(&p)[0].field, "path");
    let p: burnish_stages::data::DatasetParams =
        from_yaml("path: data.txt\nformat: chat\ncolumns: {conversation: x}\n");
    let fields: Vec<String> = DatasetStage::check(&p)
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["path", "columns.conversation"]);
}

// ---------------------------------------------------------------------------------------------
// tool calls, reasoning and per-turn weights

/// The records' messages as a chat record reads them back.
fn chat_records(r: &Ran) -> Vec<ChatRecord> {
    r.lines("main")
        .iter()
        .map(|l| match Record::parse(DatasetFamily::Chat, l).unwrap() {
            Record::Chat(c) => c,
            other => panic!("not a chat record: {other:?}"),
        })
        .collect()
}

#[test]
fn openai_tool_calls_round_trip_with_nothing_dropped() {
    let r = load_ok("tools/openai.jsonl", "chat", Value::Null);
    let source: Vec<Value> = fs::read_to_string(fixtures().join("tools/openai.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let recs = r.json("main");
    for (rec, src) in recs.iter().zip(&source) {
        // Every key of every message, as the source wrote it (`content: null` included).
        assert_eq!(rec["messages"], src["messages"]);
        assert_eq!(rec.get("tools"), src.get("tools"));
    }
    let chats = chat_records(&r);
    let targets: Vec<Vec<bool>> = chats
        .iter()
        .map(|c| c.messages.iter().map(|m| m.is_target()).collect())
        .collect();
    // Tool turns and `weight: 0` turns are context; the tool call itself is a target.
    assert_eq!(
        targets,
        [
            vec![false, false, true, false, true],
            vec![false, false, false, false, true]
        ]
    );
    assert_eq!(chats[0].messages[2].text(), "");
    assert_eq!(chats[0].messages[3].name.as_deref(), Some("get_weather"));
    assert_eq!(
        chats[1].messages[4].extra["metadata"],
        json!({"source": "hand"})
    );
}

#[test]
fn sharegpt_function_call_turns_become_tool_calls() {
    let r = load_ok("tools/sharegpt.jsonl", "sharegpt", Value::Null);
    let recs = r.json("main");
    assert_eq!(
        recs[0]["messages"],
        json!([
            {"role": "system", "content": "You may call add(a, b)."},
            {"role": "user", "content": "What is 17 + 25?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 17, "b": 25}}}
            ]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "17 + 25 = 42."}
        ])
    );
    assert_eq!(recs[0]["tools"][0]["function"]["name"], "add");
    let chats = chat_records(&r);
    let targets: Vec<bool> = chats[0].messages.iter().map(|m| m.is_target()).collect();
    assert_eq!(targets, [false, false, true, false, true]);
}

#[test]
fn claudesidian_tool_turns_keep_their_text() {
    // The seed's tool-use set writes calls inline (`<tool_call>{…}</tool_call>`) and results as
    // user turns (`<tool_result>…`): kept verbatim, turn by turn.
    let r = load_ok(
        "claudesidian.jsonl",
        "chat",
        json!({"messages": "conversations"}),
    );
    let source: Vec<Value> = fs::read_to_string(fixtures().join("claudesidian.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let recs = r.json("main");
    assert_eq!(recs.len(), source.len());
    for (rec, src) in recs.iter().zip(&source) {
        assert_eq!(rec["messages"], src["conversations"]);
        assert_eq!(rec["label"], src["label"]);
    }
    let calls = recs
        .iter()
        .flat_map(|r| r["messages"].as_array().unwrap().clone())
        .filter(|m| m["content"].as_str().unwrap().contains("<tool_call>"))
        .count();
    assert!(calls >= 40, "{calls} tool calls");
}

/// Arrow and Parquet files whose footers lie (found by fuzzing, kept under
/// `fuzz/regressions/dataset/`: the first byte picks the file type there, the rest is the file):
/// each is an error naming the file and what it claims, not an allocation of what it claims or a
/// panic inside the decoder.
#[test]
fn arrow_and_parquet_files_whose_footers_lie_are_errors() {
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/dataset");
    let cases = [
        (
            "arrow-block-6tb",
            "lie.arrow",
            "block 0 (record batch) claims",
        ),
        (
            "arrow-block-1.8gb",
            "lie.arrow",
            "claims 1836610676 metadata",
        ),
        (
            "arrow-block-unwrap-996",
            "lie.arrow",
            "-5687137033252765584 body bytes",
        ),
        (
            "arrow-block-unwrap-997",
            "lie.arrow",
            "claims -201326304 metadata",
        ),
        (
            "parquet-negative-column-range",
            "lie.parquet",
            "outside the file of 529 bytes",
        ),
        (
            "parquet-dict-byte-array-short",
            "lie.parquet",
            "outside the file of 565 bytes",
        ),
    ];
    for (case, name, expect) in cases {
        let tmp = TempDir::new().unwrap();
        let bytes = fs::read(regressions.join(case)).unwrap();
        let file = tmp.path().join(name);
        fs::write(&file, &bytes[1..]).unwrap();
        let p = json!({"path": name, "format": "text"});
        let (msg, _) = err_text(run::<DatasetStage>(
            p,
            42,
            &[],
            &[("path", file)],
            &["main"],
        ));
        assert!(
            msg.starts_with(name) && msg.contains(expect),
            "{case}: {msg}"
        );
    }
}
