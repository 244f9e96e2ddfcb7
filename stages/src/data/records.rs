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
use serde_json::Value;

use super::error::{DataError, Location};

/// File holding the records of a Dataset artifact, one JSON object per line.
pub const RECORDS_FILE: &str = "records.jsonl";
/// File holding a Dataset artifact's [`DatasetInfo`].
pub const INFO_FILE: &str = "dataset.json";

/// Source columns a format did not consume, keys sorted.
pub type Meta = BTreeMap<String, Value>;

/// Who speaks a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
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
                f(part, Some(m.role), &m.content);
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
        let mut records = Vec::with_capacity(info.records);
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
    let mut out = Vec::with_capacity(info.records);
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
