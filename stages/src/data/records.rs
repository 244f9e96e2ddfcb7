//! The normalized records of each dataset family, and how a Dataset artifact stores them.
//!
//! A Dataset artifact is a directory holding:
//! - `records.jsonl`: one record per line, serialized from the structs below (fixed key order,
//!   no timestamps, no source paths), so equal content gives equal bytes and equal digests;
//! - `dataset.json`: `{"family": "chat", "records": 40}`.
//!
//! Every record may carry `meta`: the source columns that its format did not consume (an `id`, a
//! numeric `score`), with keys sorted. `data.filter` and `data.select` read them as `meta.<name>`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use burnish_engine::stage::DatasetFamily;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{DataError, Location};

/// File holding the records of a Dataset artifact, one JSON object per line.
pub const RECORDS_FILE: &str = "records.jsonl";
/// File holding a Dataset artifact's [`DatasetInfo`].
pub const INFO_FILE: &str = "dataset.json";

/// Source columns a format did not consume, keys sorted.
pub type Meta = BTreeMap<String, Value>;

/// Who speaks a message.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for instructions from the application, kept as written (templates
    /// that know it render it; most treat an unknown role as they treat `user`).
    Developer,
    #[default]
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A message's content: a string, or OpenAI's list of parts (`[{"type": "text", "text": …}]`),
/// kept as a list so a template sees what transformers gives it; or absent (`null`), as OpenAI
/// writes it beside tool calls, which a template sees as no `content` key at all (transformers
/// drops null keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
    Absent,
}

/// One text part of a list content. Parts other than text (images, audio) are refused when a
/// dataset is read: nothing here can train on them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

impl Content {
    /// The text: the string, or the parts' texts joined by newlines.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(s) => std::borrow::Cow::Borrowed(s),
            Content::Parts(parts) if parts.len() == 1 => std::borrow::Cow::Borrowed(&parts[0].text),
            Content::Parts(parts) => std::borrow::Cow::Owned(
                parts
                    .iter()
                    .map(|p| p.text.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            Content::Absent => std::borrow::Cow::Borrowed(""),
        }
    }

    /// Each piece of text, in order.
    pub fn pieces(&self) -> Vec<&str> {
        match self {
            Content::Text(s) => vec![s.as_str()],
            Content::Parts(parts) => parts.iter().map(|p| p.text.as_str()).collect(),
            Content::Absent => Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pieces().iter().all(|p| p.is_empty())
    }

    /// Append text (to the last part of a list content).
    pub fn push_str(&mut self, more: &str) {
        match self {
            Content::Text(s) => s.push_str(more),
            Content::Absent => *self = Content::Text(more.to_owned()),
            Content::Parts(parts) => match parts.last_mut() {
                Some(p) => p.text.push_str(more),
                None => parts.push(ContentPart {
                    kind: "text".into(),
                    text: more.to_owned(),
                }),
            },
        }
    }
}

impl Default for Content {
    fn default() -> Self {
        Content::Text(String::new())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_owned())
    }
}

impl PartialEq<str> for Content {
    fn eq(&self, other: &str) -> bool {
        self.text() == other
    }
}

impl PartialEq<&str> for Content {
    fn eq(&self, other: &&str) -> bool {
        self.text() == *other
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// A function call an assistant turn makes, as OpenAI writes it:
/// `{"id", "type": "function", "function": {"name", "arguments"}}`. `arguments` stays as the
/// source gave it (a JSON string in OpenAI's API, an object in most datasets and in
/// transformers' examples), keys in their source order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function of a [`ToolCall`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: Value,
}

/// One turn of a conversation: what the source's message carried, nothing dropped. Keys this
/// struct does not name (a `thinking`, a `metadata`) are kept in `extra` and reach the template
/// as the source wrote them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Content,
    /// A reasoning model's thinking before its answer (DeepSeek-R1, Qwen3 and gpt-oss
    /// templates read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The calls an assistant turn makes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool turn answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The tool's (or the speaker's) name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Axolotl's per-turn training weight: 0 makes an assistant turn context, not a target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Other keys of the source's message, sorted.
    #[serde(flatten, default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: Content::Text(content.into()),
            ..Message::default()
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Message::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Message::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new(Role::Assistant, content)
    }

    /// The content's text (list parts joined by newlines).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        self.content.text()
    }

    /// Whether this turn is a training target: an assistant turn whose weight is not 0.
    pub fn is_target(&self) -> bool {
        self.role == Role::Assistant && self.weight != Some(0)
    }
}

fn no_meta(m: &Meta) -> bool {
    m.is_empty()
}

/// `{"text"}`: raw text for continued pretraining.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextRecord {
    pub text: String,
    #[serde(default, skip_serializing_if = "no_meta")]
    pub meta: Meta,
}

/// `{"messages", "label"?}`: an instruction or a conversation. `label` is kept when the source
/// has one (desirable / undesirable transcripts); SFT ignores it, `data.filter` can select on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRecord {
    pub messages: Vec<Message>,
    /// The functions the conversation may call (OpenAI's `tools` column: JSON schemas), passed
    /// to the template as `tools`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<bool>,
    #[serde(default, skip_serializing_if = "no_meta")]
    pub meta: Meta,
}

/// `{"prompt", "chosen", "rejected"}`: a paired preference. `chosen` and `rejected` are the
/// completions only (usually one assistant message each).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceRecord {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    #[serde(default, skip_serializing_if = "no_meta")]
    pub meta: Meta,
}

/// `{"prompt", "completion", "label"}`: unpaired feedback for KTO (`label: true` = desirable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabeledRecord {
    pub prompt: Vec<Message>,
    pub completion: Vec<Message>,
    pub label: bool,
    #[serde(default, skip_serializing_if = "no_meta")]
    pub meta: Meta,
}

/// One response of a [`RankingRecord`]: lower rank = better (0 or 1 is the best).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankedResponse {
    pub text: String,
    pub rank: i64,
}

/// `{"prompt", "responses": [{"text", "rank"}]}`: responses sorted by rank (best first; ties keep
/// their source order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingRecord {
    pub prompt: Vec<Message>,
    pub responses: Vec<RankedResponse>,
    #[serde(default, skip_serializing_if = "no_meta")]
    pub meta: Meta,
}

/// `{"prompt", "reasoning", "answer"}`: a problem with its worked solution and final answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasoningRecord {
    pub prompt: Vec<Message>,
    pub reasoning: String,
    pub answer: String,
    #[serde(default, skip_serializing_if = "no_meta")]
    pub meta: Meta,
}

/// A record of any family.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Record {
    Text(TextRecord),
    Chat(ChatRecord),
    Preference(PreferenceRecord),
    Labeled(LabeledRecord),
    Ranking(RankingRecord),
    Reasoning(ReasoningRecord),
}

/// A record type of one family: lets a consumer read a Dataset artifact as typed records.
pub trait FamilyRecord: Serialize + DeserializeOwned + Into<Record> {
    const FAMILY: DatasetFamily;
}

macro_rules! family_record {
    ($ty:ident, $variant:ident) => {
        impl FamilyRecord for $ty {
            const FAMILY: DatasetFamily = DatasetFamily::$variant;
        }
        impl From<$ty> for Record {
            fn from(r: $ty) -> Record {
                Record::$variant(r)
            }
        }
    };
}

family_record!(TextRecord, Text);
family_record!(ChatRecord, Chat);
family_record!(PreferenceRecord, Preference);
family_record!(LabeledRecord, Labeled);
family_record!(RankingRecord, Ranking);
family_record!(ReasoningRecord, Reasoning);

impl Record {
    pub fn family(&self) -> DatasetFamily {
        match self {
            Record::Text(_) => DatasetFamily::Text,
            Record::Chat(_) => DatasetFamily::Chat,
            Record::Preference(_) => DatasetFamily::Preference,
            Record::Labeled(_) => DatasetFamily::Labeled,
            Record::Ranking(_) => DatasetFamily::Ranking,
            Record::Reasoning(_) => DatasetFamily::Reasoning,
        }
    }

    /// Parse one line of `records.jsonl` as a record of `family`.
    pub fn parse(family: DatasetFamily, line: &str) -> Result<Record, serde_json::Error> {
        Ok(match family {
            DatasetFamily::Text => Record::Text(serde_json::from_str(line)?),
            DatasetFamily::Chat => Record::Chat(serde_json::from_str(line)?),
            DatasetFamily::Preference => Record::Preference(serde_json::from_str(line)?),
            DatasetFamily::Labeled => Record::Labeled(serde_json::from_str(line)?),
            DatasetFamily::Ranking => Record::Ranking(serde_json::from_str(line)?),
            DatasetFamily::Reasoning => Record::Reasoning(serde_json::from_str(line)?),
        })
    }

    pub fn meta(&self) -> &Meta {
        match self {
            Record::Text(r) => &r.meta,
            Record::Chat(r) => &r.meta,
            Record::Preference(r) => &r.meta,
            Record::Labeled(r) => &r.meta,
            Record::Ranking(r) => &r.meta,
            Record::Reasoning(r) => &r.meta,
        }
    }

    /// Every piece of text in the record, in order, with the part it belongs to (`text`,
    /// `messages`, `prompt`, `chosen`, `rejected`, `completion`, `responses`, `reasoning`,
    /// `answer`) and, for messages, the speaker. Labels, ranks and meta are not text.
    pub fn visit_text<'a>(&'a self, f: &mut dyn FnMut(&'static str, Option<Role>, &'a str)) {
        fn msgs<'a>(
            part: &'static str,
            ms: &'a [Message],
            f: &mut dyn FnMut(&'static str, Option<Role>, &'a str),
        ) {
            for m in ms {
                if let Some(r) = &m.reasoning_content {
                    f(part, Some(m.role), r);
                }
                for piece in m.content.pieces() {
                    f(part, Some(m.role), piece);
                }
            }
        }
        match self {
            Record::Text(r) => f("text", None, &r.text),
            Record::Chat(r) => msgs("messages", &r.messages, f),
            Record::Preference(r) => {
                msgs("prompt", &r.prompt, f);
                msgs("chosen", &r.chosen, f);
                msgs("rejected", &r.rejected, f);
            }
            Record::Labeled(r) => {
                msgs("prompt", &r.prompt, f);
                msgs("completion", &r.completion, f);
            }
            Record::Ranking(r) => {
                msgs("prompt", &r.prompt, f);
                for resp in &r.responses {
                    f("responses", None, &resp.text);
                }
            }
            Record::Reasoning(r) => {
                msgs("prompt", &r.prompt, f);
                f("reasoning", None, &r.reasoning);
                f("answer", None, &r.answer);
            }
        }
    }

    /// Total length of the record's text, in characters (Unicode scalar values).
    pub fn text_chars(&self) -> usize {
        let mut n = 0;
        self.visit_text(&mut |_, _, s| n += s.chars().count());
        n
    }

    /// The record as a JSON object (what `records.jsonl` holds on its line).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The value at a dotted field path: `label`, `meta.score`, `meta.source.name`.
    pub fn field(&self, path: &str) -> Option<Value> {
        let json = self.to_json();
        let mut cur = &json;
        for seg in path.split('.') {
            cur = cur.as_object()?.get(seg)?;
        }
        Some(cur.clone())
    }
}

/// What `dataset.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    pub family: DatasetFamily,
    pub records: usize,
}

/// The records of a Dataset artifact, all of one family.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub family: DatasetFamily,
    pub records: Vec<Record>,
}

impl Dataset {
    pub fn new(family: DatasetFamily, records: Vec<Record>) -> Self {
        Dataset { family, records }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Read a Dataset artifact directory.
    pub fn read(dir: &Path) -> Result<Dataset, DataError> {
        let info = read_info(dir)?;
        let path = dir.join(RECORDS_FILE);
        let text = fs::read_to_string(&path).map_err(|e| DataError::io("read", &path, e))?;
        let mut records = Vec::with_capacity(info.records.min(text.len() / 2));
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec = Record::parse(info.family, line).map_err(|e| DataError::WrongRecord {
                at: Location::line(&path, i as u64 + 1),
                family: info.family,
                message: json_message(&e),
            })?;
            records.push(rec);
        }
        if records.len() != info.records {
            return Err(DataError::Inconsistent {
                path: dir.display().to_string(),
                message: format!(
                    "{INFO_FILE} says {} records, {RECORDS_FILE} holds {}",
                    info.records,
                    records.len()
                ),
            });
        }
        Ok(Dataset {
            family: info.family,
            records,
        })
    }

    /// Write the artifact's files into `dir` (which must exist).
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join(RECORDS_FILE);
        let file = fs::File::create(&path).map_err(|e| DataError::io("create", &path, e))?;
        let mut w = BufWriter::new(file);
        for (i, rec) in self.records.iter().enumerate() {
            if rec.family() != self.family {
                return Err(DataError::Inconsistent {
                    path: dir.display().to_string(),
                    message: format!(
                        "record {i} is a {} record in a {} dataset",
                        rec.family(),
                        self.family
                    ),
                });
            }
            serde_json::to_writer(&mut w, rec)
                .map_err(|e| DataError::io("write", &path, e.into()))?;
            w.write_all(b"\n")
                .map_err(|e| DataError::io("write", &path, e))?;
        }
        w.flush().map_err(|e| DataError::io("write", &path, e))?;
        let info = DatasetInfo {
            family: self.family,
            records: self.records.len(),
        };
        let info_path = dir.join(INFO_FILE);
        let mut bytes = serde_json::to_vec_pretty(&info).expect("dataset info serializes");
        bytes.push(b'\n');
        fs::write(&info_path, bytes).map_err(|e| DataError::io("write", &info_path, e))?;
        Ok(())
    }
}

/// Read a Dataset artifact's `dataset.json`.
pub fn read_info(dir: &Path) -> Result<DatasetInfo, DataError> {
    let path = dir.join(INFO_FILE);
    let text = fs::read_to_string(&path).map_err(|e| DataError::io("read", &path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::Inconsistent {
        path: path.display().to_string(),
        message: json_message(&e),
    })
}

/// Read a Dataset artifact as typed records of one family, e.g.
/// `read_records::<PreferenceRecord>(dir)` in a DPO trainer.
pub fn read_records<T: FamilyRecord>(dir: &Path) -> Result<Vec<T>, DataError> {
    let info = read_info(dir)?;
    if info.family != T::FAMILY {
        return Err(DataError::WrongFamily {
            what: format!("dataset at {}", dir.display()),
            found: info.family,
            expected: T::FAMILY.to_string(),
        });
    }
    let path = dir.join(RECORDS_FILE);
    let text = fs::read_to_string(&path).map_err(|e| DataError::io("read", &path, e))?;
    let mut out = Vec::with_capacity(info.records.min(text.len() / 2));
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line).map_err(|e| DataError::WrongRecord {
                at: Location::line(&path, i as u64 + 1),
                family: info.family,
                message: json_message(&e),
            })?,
        );
    }
    Ok(out)
}

/// serde_json's message without its "at line 1 column N" suffix when the input was one line.
pub(crate) fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) if e.line() == 1 => format!("{} at column {}", &s[..i], e.column()),
        _ => s,
    }
}

/// Sort the keys of every object inside a value (meta values are written in a canonical form).
pub(crate) fn canonical(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}
