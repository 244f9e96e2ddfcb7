//! Source formats and their normalization into records.

use std::collections::{BTreeMap, BTreeSet};

use burnish_engine::stage::DatasetFamily;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{DataError, Location};
use super::records::{
    ChatRecord, Content, ContentPart, FunctionCall, LabeledRecord, Message, Meta, PreferenceRecord,
    RankedResponse, RankingRecord, ReasoningRecord, Record, Role, TextRecord, ToolCall, canonical,
};
use super::source::{SourceRow, describe};

/// How the rows of a data file are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `text`: raw text (code, prose) → text records.
    Text,
    /// `instruction`, optional `input`, `output` (and optional `system`) → chat records:
    /// the user turn is the instruction, followed by a blank line and the input when there is one.
    Alpaca,
    /// `prompt`, `completion` (text or message lists, optional `system`) → chat records.
    PromptCompletion,
    /// OpenAI-style `messages`: [{role, content, tool_calls?, tool_call_id?, name?,
    /// reasoning_content?, weight?}] (optional `label`, optional `tools`) → chat records.
    Chat,
    /// ShareGPT `conversations`: [{from: human|gpt|system|tool|function_call…, value}] (optional
    /// `label`, optional `tools`) → chat records.
    Sharegpt,
    /// `prompt`, `chosen`, `rejected` (text or message lists, optional `system`); without a prompt,
    /// chosen/rejected are whole transcripts (Anthropic HH "\n\nHuman: … \n\nAssistant: …" or
    /// message lists) and their shared beginning is the prompt → preference records.
    Preference,
    /// `prompt`, `completion`, `label` (boolean); or a conversation (`messages` or
    /// `conversations`) with a `label`, whose final assistant turn is the completion → labeled
    /// records.
    Kto,
    /// `prompt`, `responses`: [{text, rank}] (lower rank = better) → ranking records.
    Ranking,
    /// `problem` or `question`, `reasoning` or `rationale`, `answer`; without a reasoning field
    /// the answer is split at `####` (GSM8K) → reasoning records.
    Reasoning,
}

impl Format {
    pub fn family(self) -> DatasetFamily {
        match self {
            Format::Text => DatasetFamily::Text,
            Format::Alpaca | Format::PromptCompletion | Format::Chat | Format::Sharegpt => {
                DatasetFamily::Chat
            }
            Format::Preference => DatasetFamily::Preference,
            Format::Kto => DatasetFamily::Labeled,
            Format::Ranking => DatasetFamily::Ranking,
            Format::Reasoning => DatasetFamily::Reasoning,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Alpaca => "alpaca",
            Format::PromptCompletion => "prompt_completion",
            Format::Chat => "chat",
            Format::Sharegpt => "sharegpt",
            Format::Preference => "preference",
            Format::Kto => "kto",
            Format::Ranking => "ranking",
            Format::Reasoning => "reasoning",
        }
    }

    /// The canonical fields of this format, each with the file field names tried when `columns`
    /// does not map it.
    pub fn fields(self) -> &'static [(&'static str, &'static [&'static str])] {
        match self {
            Format::Text => &[("text", &["text"])],
            Format::Alpaca => &[
                ("instruction", &["instruction"]),
                ("input", &["input"]),
                ("output", &["output"]),
                ("system", &["system"]),
            ],
            Format::PromptCompletion => &[
                ("prompt", &["prompt"]),
                ("completion", &["completion"]),
                ("system", &["system"]),
            ],
            Format::Chat => &[
                ("messages", &["messages"]),
                ("label", &["label"]),
                ("tools", &["tools"]),
            ],
            Format::Sharegpt => &[
                ("conversations", &["conversations"]),
                ("label", &["label"]),
                ("tools", &["tools"]),
            ],
            Format::Preference => &[
                ("prompt", &["prompt"]),
                ("chosen", &["chosen"]),
                ("rejected", &["rejected"]),
                ("system", &["system"]),
            ],
            Format::Kto => &[
                ("prompt", &["prompt"]),
                ("completion", &["completion"]),
                ("label", &["label"]),
                ("messages", &["messages", "conversations"]),
                ("system", &["system"]),
            ],
            Format::Ranking => &[
                ("prompt", &["prompt"]),
                ("responses", &["responses"]),
                ("system", &["system"]),
            ],
            Format::Reasoning => &[
                ("problem", &["problem", "question"]),
                ("reasoning", &["reasoning", "rationale"]),
                ("answer", &["answer"]),
                ("system", &["system"]),
            ],
        }
    }

    pub fn canonical_names(self) -> Vec<&'static str> {
        self.fields().iter().map(|(n, _)| *n).collect()
    }
}

/// Normalize the rows of a file into records of `format.family()`.
pub fn normalize(
    format: Format,
    columns: &BTreeMap<String, String>,
    rows: &[SourceRow],
) -> Result<Vec<Record>, DataError> {
    rows.iter()
        .map(|row| {
            let mut r = RowReader {
                format,
                at: &row.at,
                row: &row.fields,
                columns,
                used: BTreeSet::new(),
            };
            let rec = r.record()?;
            Ok(rec)
        })
        .collect()
}

/// One row being read: knows the column mapping, and which file fields it consumed.
struct RowReader<'a> {
    format: Format,
    at: &'a Location,
    row: &'a Map<String, Value>,
    columns: &'a BTreeMap<String, String>,
    used: BTreeSet<String>,
}

/// A field found in a row: its name in the file and its (non-null) value.
struct Found<'a> {
    name: String,
    value: &'a Value,
}

impl<'a> RowReader<'a> {
    /// The file field names tried for a canonical field.
    fn candidates(&self, canon: &str) -> Vec<String> {
        if let Some(mapped) = self.columns.get(canon) {
            return vec![mapped.clone()];
        }
        self.format
            .fields()
            .iter()
            .find(|(n, _)| *n == canon)
            .map(|(_, defaults)| defaults.iter().map(|s| (*s).to_owned()).collect())
            .unwrap_or_else(|| vec![canon.to_owned()])
    }

    /// Look a canonical field up; null counts as absent (but is consumed).
    fn get(&mut self, canon: &str) -> Option<Found<'a>> {
        for name in self.candidates(canon) {
            if let Some(value) = self.row.get(&name) {
                self.used.insert(name.clone());
                if value.is_null() {
                    return None;
                }
                return Some(Found { name, value });
            }
        }
        None
    }

    fn missing(&self, canon: &str) -> DataError {
        let cands = self.candidates(canon);
        let mut present: Vec<&str> = self.row.keys().map(|k| k.as_str()).collect();
        present.sort_unstable();
        let field = cands.join("` or `");
        let help = if self.columns.contains_key(canon) {
            format!(
                "`columns` maps `{canon}` to `{}`; the row has: {}",
                cands[0],
                present.join(", ")
            )
        } else {
            format!(
                "the row has: {}; map another field with `columns: {{{canon}: <field>}}`",
                present.join(", ")
            )
        };
        DataError::MissingField {
            at: self.at.clone(),
            field,
            help: Some(help),
        }
    }

    /// A missing field inside a value (`messages[2].role`), with what it should look like.
    fn absent(&self, field: impl Into<String>, help: Option<&str>) -> DataError {
        DataError::MissingField {
            at: self.at.clone(),
            field: field.into(),
            help: help.map(str::to_owned),
        }
    }

    fn require(&mut self, canon: &str) -> Result<Found<'a>, DataError> {
        // A required field present as null is a type error, not a missing one.
        for name in self.candidates(canon) {
            if let Some(Value::Null) = self.row.get(&name) {
                self.used.insert(name.clone());
                return Err(self.wrong_type(&name, "a value", &Value::Null));
            }
        }
        self.get(canon).ok_or_else(|| self.missing(canon))
    }

    fn wrong_type(&self, field: &str, expected: &'static str, found: &Value) -> DataError {
        DataError::WrongType {
            at: self.at.clone(),
            field: field.to_owned(),
            expected,
            found: describe(found),
        }
    }

    fn bad_value(&self, field: &str, message: impl Into<String>) -> DataError {
        DataError::BadValue {
            at: self.at.clone(),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn string(&self, f: &Found<'_>) -> Result<String, DataError> {
        match f.value {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.wrong_type(&f.name, "a string", other)),
        }
    }

    fn req_string(&mut self, canon: &str) -> Result<String, DataError> {
        let f = self.require(canon)?;
        self.string(&f)
    }

    fn opt_string(&mut self, canon: &str) -> Result<Option<String>, DataError> {
        match self.get(canon) {
            Some(f) => self.string(&f).map(Some),
            None => Ok(None),
        }
    }

    fn boolean(&self, f: &Found<'_>) -> Result<bool, DataError> {
        match f.value {
            Value::Bool(b) => Ok(*b),
            // CSV cells are strings.
            Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
            other => Err(self.wrong_type(&f.name, "a boolean", other)),
        }
    }

    fn opt_bool(&mut self, canon: &str) -> Result<Option<bool>, DataError> {
        match self.get(canon) {
            Some(f) => self.boolean(&f).map(Some),
            None => Ok(None),
        }
    }

    fn req_bool(&mut self, canon: &str) -> Result<bool, DataError> {
        let f = self.require(canon)?;
        self.boolean(&f)
    }

    /// A list, or a JSON string holding one (as CSV cells hold lists).
    fn list(&self, f: &Found<'_>, what: &'static str) -> Result<Vec<Value>, DataError> {
        match f.value {
            Value::Array(items) => Ok(items.clone()),
            Value::String(s) => match parse_json_list(s) {
                Some(Value::Array(items)) => Ok(items),
                _ => Err(self.wrong_type(&f.name, what, f.value)),
            },
            v => Err(self.wrong_type(&f.name, what, v)),
        }
    }

    /// A list of messages (a JSON string holding one is accepted, as CSV cells hold them).
    fn messages(&self, f: &Found<'_>) -> Result<Vec<Message>, DataError> {
        let items = self.list(f, "a list of messages")?;
        if items.is_empty() {
            return Err(self.bad_value(&f.name, "the list of messages is empty"));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.message(&format!("{}[{i}]", f.name), item))
            .collect()
    }

    /// One message: `{role, content}` or ShareGPT's `{from, value}`, with everything else it
    /// carries: `tool_calls`, `tool_call_id`, `name`, `reasoning_content`, Axolotl's `weight`,
    /// and any other key (kept in [`Message::extra`]). ShareGPT's `function_call` turns (a JSON
    /// `{name, arguments}` as the value) become an assistant turn with that tool call.
    fn message(&self, field: &str, item: &Value) -> Result<Message, DataError> {
        let Value::Object(obj) = item else {
            return Err(self.wrong_type(field, "a message object", item));
        };
        let (role_key, role) = match (obj.get("role"), obj.get("from")) {
            (Some(r), _) => ("role", r),
            (None, Some(r)) => ("from", r),
            (None, None) => {
                return Err(self.absent(
                    format!("{field}.role"),
                    Some("a message is {role, content} or {from, value}"),
                ));
            }
        };
        let role_field = format!("{field}.{role_key}");
        let Value::String(role_name) = role else {
            return Err(self.wrong_type(&role_field, "a string", role));
        };
        let role = parse_role(role_name).ok_or_else(|| {
            self.bad_value(
                &role_field,
                format!(
                    "unknown role {role_name:?} (expected system, developer, user, assistant or \
                     tool, or sharegpt's human, gpt, …)"
                ),
            )
        })?;
        let mut msg = Message {
            role,
            ..Message::default()
        };
        let content_key = if obj.contains_key("content") || !obj.contains_key("value") {
            "content"
        } else {
            "value"
        };
        let content_field = format!("{field}.{content_key}");
        let mut consumed = vec![role_key, content_key];
        for key in [
            "tool_calls",
            "tool_call_id",
            "name",
            "reasoning_content",
            "weight",
        ] {
            let Some(v) = obj.get(key) else { continue };
            consumed.push(key);
            let at = format!("{field}.{key}");
            match key {
                "tool_calls" => msg.tool_calls = self.tool_calls(&at, v)?,
                "weight" => msg.weight = self.weight(&at, v)?,
                _ => {
                    let text = match v {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        other => return Err(self.wrong_type(&at, "a string", other)),
                    };
                    match key {
                        "tool_call_id" => msg.tool_call_id = text,
                        "name" => msg.name = text,
                        _ => msg.reasoning_content = text,
                    }
                }
            }
        }
        msg.content = match obj.get(content_key) {
            Some(Value::String(s)) => Content::Text(s.clone()),
            Some(Value::Array(parts)) => Content::Parts(self.parts(&content_field, parts)?),
            // OpenAI writes `content: null` beside tool calls.
            Some(Value::Null) | None if !msg.tool_calls.is_empty() => Content::Absent,
            Some(other) => return Err(self.wrong_type(&content_field, "a string", other)),
            None => {
                return Err(self.absent(
                    content_field,
                    Some("a message is {role, content} or {from, value}"),
                ));
            }
        };
        // ShareGPT (glaive, hermes) writes a call as a `function_call` turn holding JSON.
        if role_name.eq_ignore_ascii_case("function_call")
            && msg.tool_calls.is_empty()
            && let Some(call) = sharegpt_call(&msg.content.text())
        {
            msg.tool_calls.push(call);
            msg.content = Content::Absent;
        }
        msg.extra = obj
            .iter()
            .filter(|(k, _)| !consumed.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        msg.extra.sort_keys();
        Ok(msg)
    }

    /// OpenAI content parts: `[{type: text, text}]`, kept as a list.
    fn parts(&self, field: &str, parts: &[Value]) -> Result<Vec<ContentPart>, DataError> {
        let mut out = Vec::with_capacity(parts.len());
        for (j, part) in parts.iter().enumerate() {
            let part_field = format!("{field}[{j}]");
            match part {
                Value::Object(p) => match (p.get("type"), p.get("text")) {
                    (Some(Value::String(t)), Some(Value::String(text))) if t == "text" => {
                        out.push(ContentPart {
                            kind: t.clone(),
                            text: text.clone(),
                        })
                    }
                    (Some(Value::String(t)), _) if t != "text" => {
                        return Err(self.bad_value(
                            &part_field,
                            format!("content part of type {t:?} is not text"),
                        ));
                    }
                    _ => {
                        return Err(self.wrong_type(
                            &part_field,
                            "a text part {type: text, text}",
                            part,
                        ));
                    }
                },
                other => {
                    return Err(self.wrong_type(
                        &part_field,
                        "a text part {type: text, text}",
                        other,
                    ));
                }
            }
        }
        Ok(out)
    }

    /// OpenAI's `tool_calls`: `[{id, type: function, function: {name, arguments}}]`; the bare
    /// `{name, arguments}` form some datasets write is accepted and given the wrapper.
    fn tool_calls(&self, field: &str, v: &Value) -> Result<Vec<ToolCall>, DataError> {
        let items = match v {
            Value::Null => return Ok(Vec::new()),
            Value::Array(items) => items,
            other => return Err(self.wrong_type(field, "a list of tool calls", other)),
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let Value::Object(call) = item else {
                return Err(self.wrong_type(&at, "a tool call {type, function}", item));
            };
            let id = match call.get("id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => return Err(self.wrong_type(&format!("{at}.id"), "a string", other)),
            };
            let kind = match call.get("type") {
                None | Some(Value::Null) => "function".to_owned(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(self.wrong_type(&format!("{at}.type"), "a string", other));
                }
            };
            let (fn_at, function) = match call.get("function") {
                Some(Value::Object(f)) => (format!("{at}.function"), f),
                Some(other) => {
                    return Err(self.wrong_type(
                        &format!("{at}.function"),
                        "an object {name, arguments}",
                        other,
                    ));
                }
                None => (at.clone(), call),
            };
            let name = match function.get("name") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(self.wrong_type(&format!("{fn_at}.name"), "a string", other));
                }
                None => {
                    return Err(self.absent(
                        format!("{fn_at}.name"),
                        Some("a tool call is {type: function, function: {name, arguments}}"),
                    ));
                }
            };
            let arguments = function
                .get("arguments")
                .cloned()
                .unwrap_or(Value::Object(Map::new()));
            out.push(ToolCall {
                id,
                kind,
                function: FunctionCall { name, arguments },
            });
        }
        Ok(out)
    }

    /// Axolotl's per-turn `weight`: 0 or 1 (a boolean is read as one).
    fn weight(&self, field: &str, v: &Value) -> Result<Option<u8>, DataError> {
        match v {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(u8::from(*b))),
            Value::Number(n) if n.as_f64() == Some(0.0) => Ok(Some(0)),
            Value::Number(n) if n.as_f64() == Some(1.0) => Ok(Some(1)),
            Value::Number(n) => Err(self.bad_value(
                field,
                format!("a turn's weight is 0 (context) or 1 (trained), found {n}"),
            )),
            other => Err(self.wrong_type(field, "0 or 1", other)),
        }
    }

    /// Text (one message of `role`) or a list of messages.
    fn text_or_messages(&self, f: &Found<'_>, role: Role) -> Result<Vec<Message>, DataError> {
        match f.value {
            Value::String(s) => match parse_json_list(s) {
                Some(list) if looks_like_messages(&list) => self.messages(f),
                _ => Ok(vec![Message::new(role, s.clone())]),
            },
            Value::Array(_) => self.messages(f),
            other => Err(self.wrong_type(&f.name, "a string or a list of messages", other)),
        }
    }

    fn req_text_or_messages(&mut self, canon: &str, role: Role) -> Result<Vec<Message>, DataError> {
        let f = self.require(canon)?;
        self.text_or_messages(&f, role)
    }

    /// `system` (when present and not blank) as the first message of a prompt.
    fn with_system(&mut self, mut prompt: Vec<Message>) -> Result<Vec<Message>, DataError> {
        if let Some(system) = self.opt_string("system")?
            && !system.trim().is_empty()
            && prompt.first().map(|m| m.role) != Some(Role::System)
        {
            prompt.insert(0, Message::system(system));
        }
        Ok(prompt)
    }

    /// The row's fields that no canonical field consumed.
    fn meta(&self) -> Meta {
        self.row
            .iter()
            .filter(|(k, _)| !self.used.contains(*k))
            .map(|(k, v)| (k.clone(), canonical(v.clone())))
            .collect()
    }

    fn record(&mut self) -> Result<Record, DataError> {
        match self.format {
            Format::Text => {
                let text = self.req_string("text")?;
                Ok(Record::Text(TextRecord {
                    text,
                    meta: self.meta(),
                }))
            }
            Format::Alpaca => {
                let instruction = self.req_string("instruction")?;
                let input = self.opt_string("input")?.unwrap_or_default();
                let output = self.req_string("output")?;
                let user = if input.trim().is_empty() {
                    instruction
                } else {
                    format!("{instruction}\n\n{input}")
                };
                let mut messages = self.with_system(vec![Message::user(user)])?;
                messages.push(Message::assistant(output));
                Ok(Record::Chat(ChatRecord {
                    messages,
                    tools: Vec::new(),
                    label: None,
                    meta: self.meta(),
                }))
            }
            Format::PromptCompletion => {
                let prompt = self.req_text_or_messages("prompt", Role::User)?;
                let completion = self.req_text_or_messages("completion", Role::Assistant)?;
                let mut messages = self.with_system(prompt)?;
                messages.extend(completion);
                Ok(Record::Chat(ChatRecord {
                    messages,
                    tools: Vec::new(),
                    label: None,
                    meta: self.meta(),
                }))
            }
            Format::Chat | Format::Sharegpt => {
                let canon = if self.format == Format::Chat {
                    "messages"
                } else {
                    "conversations"
                };
                let f = self.require(canon)?;
                let messages = self.messages(&f)?;
                let label = self.opt_bool("label")?;
                let tools = match self.get("tools") {
                    Some(t) => self.list(&t, "a list of tool schemas")?,
                    None => Vec::new(),
                };
                Ok(Record::Chat(ChatRecord {
                    messages,
                    tools,
                    label,
                    meta: self.meta(),
                }))
            }
            Format::Preference => self.preference(),
            Format::Kto => self.kto(),
            Format::Ranking => self.ranking(),
            Format::Reasoning => self.reasoning(),
        }
    }

    fn preference(&mut self) -> Result<Record, DataError> {
        let prompt = match self.get("prompt") {
            Some(f) => Some(self.text_or_messages(&f, Role::User)?),
            None => None,
        };
        let chosen_f = self.require("chosen")?;
        let rejected_f = self.require("rejected")?;
        let (prompt, chosen, rejected) = match prompt {
            Some(prompt) => (
                prompt,
                self.text_or_messages(&chosen_f, Role::Assistant)?,
                self.text_or_messages(&rejected_f, Role::Assistant)?,
            ),
            None => {
                // Whole transcripts: HH-style text, or message lists.
                let chosen = self.transcript(&chosen_f)?;
                let rejected = self.transcript(&rejected_f)?;
                let (prompt, chosen, rejected) = split_shared_prompt(chosen, rejected);
                if prompt.is_empty() {
                    return Err(self.bad_value(
                        &chosen_f.name,
                        format!(
                            "there is no `prompt` field, and `{}` and `{}` share no beginning \
                             to take as the prompt",
                            chosen_f.name, rejected_f.name
                        ),
                    ));
                }
                (prompt, chosen, rejected)
            }
        };
        let prompt = self.with_system(prompt)?;
        Ok(Record::Preference(PreferenceRecord {
            prompt,
            chosen,
            rejected,
            meta: self.meta(),
        }))
    }

    /// A whole conversation: an HH "\n\nHuman: … \n\nAssistant: …" transcript or a message list.
    fn transcript(&self, f: &Found<'_>) -> Result<Vec<Message>, DataError> {
        match f.value {
            Value::String(s) => {
                if let Some(list) = parse_json_list(s)
                    && looks_like_messages(&list)
                {
                    return self.messages(f);
                }
                parse_hh(s).ok_or_else(|| {
                    self.bad_value(
                        &f.name,
                        "there is no `prompt` field, and the text is not a \"\\n\\nHuman: … \
                         \\n\\nAssistant: …\" transcript",
                    )
                })
            }
            Value::Array(_) => self.messages(f),
            other => Err(self.wrong_type(&f.name, "a string or a list of messages", other)),
        }
    }

    fn kto(&mut self) -> Result<Record, DataError> {
        let (prompt, completion) = if let Some(pf) = self.get("prompt") {
            let prompt = self.text_or_messages(&pf, Role::User)?;
            let completion = self.req_text_or_messages("completion", Role::Assistant)?;
            (prompt, completion)
        } else if let Some(mf) = self.get("messages") {
            let mut messages = self.messages(&mf)?;
            let last = messages.pop().expect("messages are not empty");
            if last.role != Role::Assistant {
                return Err(self.bad_value(
                    &mf.name,
                    format!(
                        "the last message is from the {}, not the assistant, so there is no \
                         completion to label",
                        last.role.as_str()
                    ),
                ));
            }
            if messages.is_empty() {
                return Err(self.bad_value(
                    &mf.name,
                    "the conversation has only an assistant message: there is no prompt",
                ));
            }
            (messages, vec![last])
        } else {
            let mut cands = self.candidates("prompt");
            cands.extend(self.candidates("messages"));
            return Err(DataError::MissingField {
                at: self.at.clone(),
                field: cands.join("` or `"),
                help: Some(
                    "a kto row is {prompt, completion, label} or a conversation with a label"
                        .into(),
                ),
            });
        };
        let label = self.req_bool("label")?;
        let prompt = self.with_system(prompt)?;
        Ok(Record::Labeled(LabeledRecord {
            prompt,
            completion,
            label,
            meta: self.meta(),
        }))
    }

    fn ranking(&mut self) -> Result<Record, DataError> {
        let prompt = self.req_text_or_messages("prompt", Role::User)?;
        let f = self.require("responses")?;
        let items = self.list(&f, "a list of {text, rank}")?;
        if items.len() < 2 {
            return Err(self.bad_value(
                &f.name,
                format!(
                    "a ranking needs at least 2 responses, found {}",
                    items.len()
                ),
            ));
        }
        let mut responses = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let field = format!("{}[{i}]", f.name);
            let Value::Object(obj) = item else {
                return Err(self.wrong_type(&field, "an object {text, rank}", item));
            };
            let text = match obj.get("text") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(self.wrong_type(&format!("{field}.text"), "a string", other));
                }
                None => {
                    return Err(self.absent(format!("{field}.text"), None));
                }
            };
            let rank = match obj.get("rank") {
                Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().expect("checked"),
                Some(other) => {
                    return Err(self.wrong_type(&format!("{field}.rank"), "an integer", other));
                }
                None => {
                    return Err(self.absent(format!("{field}.rank"), None));
                }
            };
            responses.push(RankedResponse { text, rank });
        }
        responses.sort_by_key(|r| r.rank);
        let prompt = self.with_system(prompt)?;
        Ok(Record::Ranking(RankingRecord {
            prompt,
            responses,
            meta: self.meta(),
        }))
    }

    fn reasoning(&mut self) -> Result<Record, DataError> {
        let problem = self.req_string("problem")?;
        let reasoning = self.opt_string("reasoning")?;
        let answer_f = self.require("answer")?;
        let answer = self.string(&answer_f)?;
        let (reasoning, answer) = match reasoning {
            Some(r) => (r, answer),
            None => {
                let Some((before, after)) = answer.rsplit_once("####") else {
                    return Err(self.bad_value(
                        &answer_f.name,
                        format!(
                            "there is no `{}` field, and the answer has no `####` before its \
                             final answer",
                            self.candidates("reasoning").join("` or `")
                        ),
                    ));
                };
                let (before, after) = (before.trim(), after.trim());
                if after.is_empty() {
                    return Err(self.bad_value(&answer_f.name, "nothing follows `####`"));
                }
                (before.to_owned(), after.to_owned())
            }
        };
        let prompt = self.with_system(vec![Message::user(problem)])?;
        Ok(Record::Reasoning(ReasoningRecord {
            prompt,
            reasoning,
            answer,
            meta: self.meta(),
        }))
    }
}

fn parse_role(name: &str) -> Option<Role> {
    Some(match name.to_ascii_lowercase().as_str() {
        "system" => Role::System,
        "developer" => Role::Developer,
        "user" | "human" => Role::User,
        "assistant" | "gpt" | "model" | "chatgpt" | "function_call" => Role::Assistant,
        "tool" | "function" | "observation" | "ipython" | "function_response" => Role::Tool,
        _ => return None,
    })
}

/// A ShareGPT `function_call` value: JSON `{"name", "arguments"}`.
fn sharegpt_call(value: &str) -> Option<ToolCall> {
    let Ok(Value::Object(call)) = serde_json::from_str::<Value>(value.trim()) else {
        return None;
    };
    let name = call.get("name")?.as_str()?.to_owned();
    let arguments = call
        .get("arguments")
        .or_else(|| call.get("parameters"))
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    Some(ToolCall {
        id: None,
        kind: "function".to_owned(),
        function: FunctionCall { name, arguments },
    })
}

/// A JSON list written inside a string (how CSV cells hold message lists).
fn parse_json_list(s: &str) -> Option<Value> {
    if !s.trim_start().starts_with('[') {
        return None;
    }
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Array(_)) => Some(v),
        _ => None,
    }
}

/// A non-empty list of objects that each have a role (`role` or `from`).
fn looks_like_messages(v: &Value) -> bool {
    match v {
        Value::Array(items) => {
            !items.is_empty()
                && items.iter().all(|i| {
                    i.as_object()
                        .is_some_and(|o| o.contains_key("role") || o.contains_key("from"))
                })
        }
        _ => false,
    }
}

/// Split an Anthropic HH transcript ("\n\nHuman: … \n\nAssistant: …") into messages; `None` when
/// the text has no turn markers or text before the first one.
pub fn parse_hh(text: &str) -> Option<Vec<Message>> {
    const MARKERS: [(&str, Role); 2] = [("Human:", Role::User), ("Assistant:", Role::Assistant)];
    // Positions of markers at the start of the text or after a blank line.
    let mut marks: Vec<(usize, usize, Role)> = Vec::new(); // (start, content start, role)
    for (marker, role) in MARKERS {
        let mut from = 0;
        while let Some(pos) = text[from..].find(marker) {
            let at = from + pos;
            let before = &text[..at];
            if before.trim().is_empty() || before.ends_with("\n\n") {
                marks.push((at, at + marker.len(), role));
            }
            from = at + marker.len();
        }
    }
    marks.sort_by_key(|m| m.0);
    let first = marks.first()?;
    if !text[..first.0].trim().is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(marks.len());
    for (i, &(_, content_start, role)) in marks.iter().enumerate() {
        let end = marks.get(i + 1).map_or(text.len(), |m| m.0);
        out.push(Message::new(role, text[content_start..end].trim()));
    }
    Some(out)
}

/// The shared beginning of two transcripts is the prompt (like TRL's `extract_prompt`); each keeps
/// at least its last message as its completion.
pub fn split_shared_prompt(
    chosen: Vec<Message>,
    rejected: Vec<Message>,
) -> (Vec<Message>, Vec<Message>, Vec<Message>) {
    let max = chosen.len().min(rejected.len()).saturating_sub(1);
    let shared = chosen
        .iter()
        .zip(&rejected)
        .take(max)
        .take_while(|(a, b)| a == b)
        .count();
    let mut chosen = chosen;
    let rejected = rejected[shared..].to_vec();
    let rest = chosen.split_off(shared);
    (chosen, rest, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_transcripts_split_into_turns() {
        let t = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.";
        let m = parse_hh(t).unwrap();
        assert_eq!(
            m,
            vec![
                Message::user("What is 2+2?"),
                Message::assistant("4."),
                Message::user("And 3+3?"),
                Message::assistant("6."),
            ]
        );
        assert!(parse_hh("no markers here").is_none());
        assert!(parse_hh("preamble\n\nHuman: hi\n\nAssistant: yo").is_none());
        // A marker inside a turn (not after a blank line) is text.
        let m = parse_hh("Human: say Assistant: please\n\nAssistant: ok").unwrap();
        assert_eq!(m[0].content, "say Assistant: please");
    }

    #[test]
    fn shared_prefix_becomes_the_prompt() {
        let u = Message::user("q");
        let (p, c, r) = split_shared_prompt(
            vec![u.clone(), Message::assistant("good")],
            vec![u.clone(), Message::assistant("bad")],
        );
        assert_eq!(p, vec![u.clone()]);
        assert_eq!(c, vec![Message::assistant("good")]);
        assert_eq!(r, vec![Message::assistant("bad")]);
        // Identical transcripts still leave each side its last message.
        let (p, c, r) = split_shared_prompt(
            vec![u.clone(), Message::assistant("same")],
            vec![u.clone(), Message::assistant("same")],
        );
        assert_eq!((p.len(), c.len(), r.len()), (1, 1, 1));
    }
}
