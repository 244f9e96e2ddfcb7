//! Fuzzing harnesses: one function per reader of hostile input, each taking arbitrary bytes.
//!
//! The fuzz targets under `fuzz/` call these (cargo-fuzz, libFuzzer), and
//! `tests/fuzz_regressions.rs` replays the crash inputs kept in `fuzz/regressions/<target>/` and
//! the fixtures through them on stable. A harness ignores what the reader returns: it only fails
//! by panicking, hanging or allocating without bound, which is what a fuzzer reports.
//!
//! Readers that take a path get the bytes written to a file in a scratch directory of their own
//! (one per thread, emptied before each input). Targets that read several files take them from
//! one input split at [`SEPARATOR`] lines.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use burnish_engine::cache::Cache;
use burnish_engine::exec::RunRecord;
use burnish_engine::lock::LockFile;
use burnish_engine::manifest;
use burnish_engine::stage::Registry;
use serde_json::Value;

use crate::data::formats::{Format, normalize};
use crate::data::records::{Message, Record};
use crate::data::source::read_rows;
use crate::export::gguf::GgufFile;
use crate::model::checkpoint::Checkpoint;
use crate::text::encode::{Conversation, encode_chat, encode_conversation};
use crate::text::template::{ChatTemplate, TemplateChoice, TemplateVars};
use crate::text::tokenizer::TextTokenizer;

/// The line that separates the files of one input: `main.yaml` from the `base.yaml` it may
/// extend, `config.json` from the safetensors file, and so on.
pub const SEPARATOR: &[u8] = b"\n---8<---\n";

/// A harness: any bytes in, nothing out.
pub type Harness = fn(&[u8]);

/// Every target: its name (the file under `fuzz/fuzz_targets/` and the directory of its corpus
/// and regressions) and its harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("manifest", manifest),
    ("dataset", dataset),
    ("checkpoint", checkpoint),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("gguf", gguf),
    ("lock", lock),
    ("record", record),
];

/// A manifest as `burnish validate` reads it: `main.yaml`, then (after a [`SEPARATOR`]) a
/// `base.yaml` that `main.yaml` may name in `extends`; errors are rendered as the CLI prints them.
pub fn manifest(data: &[u8]) {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(crate::registry);
    let parts = split(data, 2);
    let Some(dir) = scratch("manifest") else {
        return;
    };
    let main = dir.join("main.yaml");
    if !put(&main, parts[0]) || !parts.get(1).is_none_or(|b| put(&dir.join("base.yaml"), b)) {
        return;
    }
    match manifest::load(&main, &REGISTRY) {
        Ok(m) => {
            let _ = (m.stem(), m.stages.len());
        }
        Err(e) => {
            let _ = e.render(100, false);
            let _ = e.to_string();
        }
    }
}

/// The data files a `dataset` stage reads, by extension (gzip'ed ones included).
const DATA_FILES: [&str; 8] = [
    "data.jsonl",
    "data.json",
    "data.csv",
    "data.tsv",
    "data.parquet",
    "data.arrow",
    "data.jsonl.gz",
    "data.csv.gz",
];

/// Every `format` of a `dataset` stage.
const FORMATS: [Format; 9] = [
    Format::Text,
    Format::Alpaca,
    Format::PromptCompletion,
    Format::Chat,
    Format::Sharegpt,
    Format::Preference,
    Format::Kto,
    Format::Ranking,
    Format::Reasoning,
];

/// The byte that [`dataset`] reads `file` (an index into its file types: jsonl, json, csv, tsv,
/// parquet, arrow, jsonl.gz, csv.gz) as `format` with.
pub fn dataset_choice(file: usize, format: Format) -> u8 {
    let f = FORMATS.iter().position(|&x| x == format).unwrap_or(0);
    (f * DATA_FILES.len() + file % DATA_FILES.len()) as u8
}

/// A data file read and normalized as a `dataset` stage does it: the first byte picks the file
/// type (its value modulo 8) and the format (divided by 8, modulo 9; see [`dataset_choice`]),
/// the rest is the file. Each record is then written and read back as a Dataset artifact holds it.
pub fn dataset(data: &[u8]) {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let choice = usize::from(choice);
    let name = DATA_FILES[choice % DATA_FILES.len()];
    let format = FORMATS[choice / DATA_FILES.len() % FORMATS.len()];
    let Some(dir) = scratch("dataset") else {
        return;
    };
    let path = dir.join(name);
    if !put(&path, body) {
        return;
    }
    let Ok(rows) = read_rows(&path) else {
        return;
    };
    let Ok(records) = normalize(format, &BTreeMap::new(), &rows) else {
        return;
    };
    for r in &records {
        let _ = Record::parse(format.family(), &r.to_json().to_string());
    }
}

/// The largest data section [`checkpoint`] makes for a header given alone (a sparse file).
const MAX_SPARSE_DATA: u64 = 1 << 36;

/// A model directory opened as the checkpoint loader opens it, up to reading tensors:
/// `config.json`, then (after a [`SEPARATOR`]) `model.safetensors`. A safetensors part that opens
/// with `{` is its header alone: the file gets the length prefix and a data section of zeros (a
/// sparse file) as long as the header's largest end offset, so headers reach the shape checks
/// without carrying their data.
pub fn checkpoint(data: &[u8]) {
    let parts = split(data, 2);
    let Some(dir) = scratch("checkpoint") else {
        return;
    };
    if !put(&dir.join("config.json"), parts[0]) {
        return;
    }
    if let Some(weights) = parts.get(1)
        && !safetensors_file(&dir.join("model.safetensors"), weights)
    {
        return;
    }
    let Ok(c) = Checkpoint::open(&dir) else {
        return;
    };
    let _ = (c.num_params(), c.adapter_params(), c.config.num_params());
    for t in c.tensors() {
        if c.stored_bytes(t) <= 1 << 16 && c.is_stored_as_is(t) {
            let _ = c.read(t);
        }
    }
}

fn safetensors_file(path: &Path, part: &[u8]) -> bool {
    if part.first() != Some(&b'{') {
        return put(path, part);
    }
    let end = serde_json::from_slice::<Value>(part)
        .ok()
        .and_then(|v| {
            v.as_object()?
                .values()
                .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                .max()
        })
        .unwrap_or(0);
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(path)?;
        f.write_all(&(part.len() as u64).to_le_bytes())?;
        f.write_all(part)?;
        if end <= MAX_SPARSE_DATA {
            f.set_len(8 + part.len() as u64 + end)?;
        }
        Ok(())
    };
    write().is_ok()
}

/// A tokenizer directory as a model's tokenizer is loaded: `tokenizer.json`, then (after a
/// [`SEPARATOR`]) `tokenizer_config.json` (special tokens, `chat_template`), then a text. The text
/// is encoded and decoded, and a conversation of it rendered through the checkpoint's template
/// (or chatml) and encoded with its targets, as SFT encodes it.
pub fn tokenizer(data: &[u8]) {
    let parts = split(data, 3);
    let Some(dir) = scratch("tokenizer") else {
        return;
    };
    if !put(&dir.join("tokenizer.json"), parts[0])
        || !parts
            .get(1)
            .is_none_or(|c| put(&dir.join("tokenizer_config.json"), c))
    {
        return;
    }
    let text = parts.get(2).map_or("Hello, world!".into(), |t| {
        String::from_utf8_lossy(t).into_owned()
    });
    let Ok(tok) = TextTokenizer::from_dir(&dir) else {
        return;
    };
    if let Ok(ids) = tok.encode(&text) {
        let _ = tok.decode(&ids);
    }
    let _ = tok.encode_with_offsets(&text);
    for id in 0..tok.vocab_size().min(4) {
        let _ = tok.id_to_token(id as u32);
    }
    if let Ok(template) = ChatTemplate::resolve(TemplateChoice::Auto, &tok) {
        let messages = [
            Message::system("You are terse."),
            Message::user(text.as_str()),
            Message::assistant(text.as_str()),
        ];
        let _ = encode_chat(&tok, &template, &messages, false);
    }
}

/// The tokenizer [`chat_template`] renders with: the fixtures' tiny Llama's.
static FIXTURE_TOKENIZER: LazyLock<Option<TextTokenizer>> = LazyLock::new(|| {
    let dir = scratch("fixture-tokenizer")?;
    let files: [(&str, &[u8]); 2] = [
        (
            "tokenizer.json",
            include_bytes!("../../fixtures/models/tiny-llama/tokenizer.json"),
        ),
        (
            "tokenizer_config.json",
            include_bytes!("../../fixtures/models/tiny-llama/tokenizer_config.json"),
        ),
    ];
    for (name, bytes) in files {
        if !put(&dir.join(name), bytes) {
            return None;
        }
    }
    TextTokenizer::from_dir(&dir).ok()
});

/// A chat template (`chat_template.jinja`) compiled and rendered with a conversation: after a
/// [`SEPARATOR`], a JSON object with `messages` and optional `tools`, `documents`, `kwargs`,
/// `date` and `add_generation_prompt` (a line of the fixtures' `conversations.jsonl`), or a list
/// of messages. The rendering is then encoded with its targets, as SFT encodes a conversation.
pub fn chat_template(data: &[u8]) {
    let Some(tok) = FIXTURE_TOKENIZER.as_ref() else {
        return;
    };
    let parts = split(data, 2);
    let Some(dir) = scratch("chat_template") else {
        return;
    };
    let path = dir.join("chat_template.jinja");
    if !put(&path, parts[0]) {
        return;
    }
    let Ok(template) = ChatTemplate::from_file("checkpoint", &path) else {
        return;
    };
    let conv: Value = parts
        .get(1)
        .and_then(|c| serde_json::from_slice(c).ok())
        .unwrap_or(Value::Null);
    let field = |key: &str| -> Option<Value> {
        match &conv {
            Value::Array(_) if key == "messages" => Some(conv.clone()),
            _ => conv.get(key).cloned(),
        }
    };
    fn parsed<T: serde::de::DeserializeOwned>(v: Option<Value>) -> Option<T> {
        serde_json::from_value(v?).ok()
    }
    let messages: Vec<Message> = parsed(field("messages")).unwrap_or_else(|| {
        vec![
            Message::user("What is 2 + 3?"),
            Message::assistant("2 + 3 = 5."),
        ]
    });
    let tools: Vec<Value> = parsed(field("tools")).unwrap_or_default();
    let vars = TemplateVars {
        kwargs: parsed(field("kwargs")).unwrap_or_default(),
        tools: Vec::new(),
        documents: parsed(field("documents")).unwrap_or_default(),
        date: parsed(field("date")).unwrap_or_default(),
    };
    let prompt = parsed(field("add_generation_prompt")).unwrap_or(false);
    let template = template.with_vars(vars);
    let _ = template.render_spans(&messages, &tools, prompt, tok);
    let conv = Conversation {
        messages: &messages,
        tools: &tools,
    };
    let _ = encode_conversation(tok, &template, conv, false, 0);
}

/// A GGUF file read as `burnish inspect` reads it, from memory and from a file (which must
/// agree), with every tensor dequantized.
pub fn gguf(data: &[u8]) {
    let parsed = GgufFile::parse(data);
    if let Some(dir) = scratch("gguf") {
        let path = dir.join("model.gguf");
        if put(&path, data) {
            let read = GgufFile::read(&path);
            // Compared as printed: a NaN in the metadata is not equal to itself.
            assert_eq!(
                format!("{:?}", parsed.as_ref().ok()),
                format!("{:?}", read.as_ref().ok()),
                "reading the file and parsing its bytes disagree"
            );
        }
    }
    let Ok(f) = parsed else {
        return;
    };
    for (_, v) in &f.metadata {
        let _ = (v.type_name(), v.summary());
    }
    for t in &f.tensors {
        let _ = (t.n_bytes(), t.ty.name());
        let _ = f.tensor_f32(data, &t.name);
    }
}

/// A lock file read, written and read again: what `burnish run` writes must read back as the
/// same text.
pub fn lock(data: &[u8]) {
    let Some(dir) = scratch("lock") else {
        return;
    };
    let path = dir.join("pipeline.lock");
    if !put(&path, data) {
        return;
    }
    let Ok(Some(lock)) = LockFile::read(&path) else {
        return;
    };
    let text = lock.to_text();
    let again: LockFile = match serde_json::from_str(&text) {
        Ok(l) => l,
        Err(e) => panic!("a written lock file does not read back: {e}"),
    };
    assert_eq!(again.to_text(), text, "a lock file's text is not stable");
    let _ = (lock.diff(&again), again.diff(&LockFile::default()));
}

/// The fingerprint [`record`] files its entry under.
const RECORD_FP: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A cache entry's `record.json` (and the same bytes as its `inputs.json`) read as `plan` and a
/// cached rerun read them, and the bytes read as a run's `run.json`.
pub fn record(data: &[u8]) {
    let _ = serde_json::from_slice::<RunRecord>(data);
    let Some(dir) = scratch("record") else {
        return;
    };
    let Ok(cache) = Cache::open(&dir.join("cache")) else {
        return;
    };
    let entry = cache.entry_dir(RECORD_FP);
    if fs::create_dir_all(&entry).is_err()
        || !put(&entry.join("record.json"), data)
        || !put(&entry.join("inputs.json"), data)
    {
        return;
    }
    let _ = cache.record(RECORD_FP);
    let _ = cache.usable_record(RECORD_FP);
    if let Some(inputs) = cache.inputs(RECORD_FP) {
        let _ = inputs.fingerprint();
    }
}

/// `data` split at the first `n - 1` [`SEPARATOR`]s: at least one part, at most `n`.
fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < n
        && let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR)
    {
        parts.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

fn put(path: &Path, bytes: &[u8]) -> bool {
    fs::write(path, bytes).is_ok()
}

/// This thread's scratch directory, removed when the thread ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    static SCRATCH: Scratch = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Scratch(std::env::temp_dir().join(format!("burnish-fuzz-{}-{n}", std::process::id())))
    };
}

/// An empty directory for `target` in this thread's scratch directory.
fn scratch(target: &str) -> Option<PathBuf> {
    SCRATCH
        .try_with(|s| {
            let dir = s.0.join(target);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).ok().map(|()| dir)
        })
        .ok()
        .flatten()
}
