//! Chat templates: the checkpoint's Jinja template or a built-in one, rendered in a sandboxed
//! minijinja environment the way transformers' `apply_chat_template` renders them.
//!
//! The sandbox: no loader (`include`, `import` and `extends` fail), no filesystem, no clock
//! (`strftime_now` is not defined, so renderings are reproducible); `raise_exception(msg)` fails
//! the rendering with the template's message; `tojson` (Python's `json.dumps` output, as in
//! transformers) and a few Python string, dict and list methods (`strip`, `startswith`, `split`,
//! `items`, `get`, …) are available.
//! Blocks are trimmed (`trim_blocks`, `lstrip_blocks`) like transformers' environment does.

use std::fmt;

use minijinja::value::{Kwargs, Value, ValueKind, from_args};
use minijinja::{Environment, Error, ErrorKind, State};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::TextError;
use super::tokenizer::TextTokenizer;
use crate::data::records::Message;

/// The `chatml` template: `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The `llama3` template: `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>` per
/// message, after the bos token when the tokenizer has one.
pub const LLAMA3: &str = "{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}";

/// The `alpaca` template: an optional system preamble, then `### Instruction:\n{user}` and
/// `### Response:\n{assistant}{eos}` blocks separated by blank lines (tool messages become
/// `### Input:` blocks).
pub const ALPACA: &str = "{%- for message in messages %}
{%- if not loop.first %}{{ '\\n\\n' }}{% endif %}
{%- if message['role'] == 'system' %}{{ message['content'] }}
{%- elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] }}
{%- elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}
{%- else %}{{ '### Input:\\n' + message['content'] }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{%- if messages %}{{ '\\n\\n' }}{% endif %}{{ '### Response:\\n' }}
{%- endif %}";

/// The `plain` template: the messages' contents back to back, each assistant turn ended by eos,
/// nothing for the generation prompt: a prompt and its completion as TRL trains a
/// non-conversational `{prompt, completion}` record (`prompt + completion + eos`).
pub const PLAIN: &str = "{%- for message in messages %}
{{- message['content'] }}
{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{%- endfor %}";

/// Which chat template turns conversations into text (manifest parameter `chat_template`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChoice {
    /// The checkpoint's template when it has one (chat_template.jinja or tokenizer_config.json),
    /// else chatml.
    #[default]
    Auto,
    /// The checkpoint's template; an error when it has none.
    Checkpoint,
    /// `<|im_start|>role\ncontent<|im_end|>` (Qwen, SmolLM, many fine-tunes).
    Chatml,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
    /// `### Instruction:` / `### Response:` blocks, each response ended by eos.
    Alpaca,
    /// The contents back to back, each assistant turn ended by eos (TRL's non-conversational
    /// prompt + completion): for small models on terse tasks such as `07+12=` → `19`.
    Plain,
}

impl fmt::Display for TemplateChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TemplateChoice::Auto => "auto",
            TemplateChoice::Checkpoint => "checkpoint",
            TemplateChoice::Chatml => "chatml",
            TemplateChoice::Llama3 => "llama3",
            TemplateChoice::Alpaca => "alpaca",
            TemplateChoice::Plain => "plain",
        })
    }
}

const TEMPLATE: &str = "chat_template";
/// Prefix of the error detail `raise_exception` produces.
const RAISED: &str = "raise_exception: ";

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    name: String,
    origin: String,
    source: String,
    env: Environment<'static>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .finish()
    }
}

impl ChatTemplate {
    /// The template `choice` names, for conversations tokenized by `tok`.
    pub fn resolve(choice: TemplateChoice, tok: &TextTokenizer) -> Result<Self, TextError> {
        let checkpoint = tok.checkpoint_template_origin();
        match (choice, checkpoint) {
            (TemplateChoice::Auto | TemplateChoice::Checkpoint, Some(t)) => {
                ChatTemplate::compile("checkpoint", &t.origin, t.source.clone())
            }
            (TemplateChoice::Checkpoint, None) => Err(TextError::NoTemplate {
                dir: tok.dir().display().to_string(),
            }),
            (TemplateChoice::Auto | TemplateChoice::Chatml, _) => {
                ChatTemplate::builtin(TemplateChoice::Chatml)
            }
            (TemplateChoice::Llama3 | TemplateChoice::Alpaca | TemplateChoice::Plain, _) => {
                ChatTemplate::builtin(choice)
            }
        }
    }

    /// A built-in template (`chatml`, `llama3`, `alpaca`, `plain`; `auto` and `checkpoint`
    /// give chatml).
    pub fn builtin(choice: TemplateChoice) -> Result<Self, TextError> {
        let (name, source) = match choice {
            TemplateChoice::Llama3 => ("llama3", LLAMA3),
            TemplateChoice::Alpaca => ("alpaca", ALPACA),
            TemplateChoice::Plain => ("plain", PLAIN),
            _ => ("chatml", CHATML),
        };
        ChatTemplate::compile(name, &format!("built-in {name}"), source.to_owned())
    }

    /// Compile a template from its Jinja source. `name` is what [`ChatTemplate::name`] reports;
    /// `origin` (a file path, or `built-in chatml`) is what error messages name.
    pub fn compile(name: &str, origin: &str, source: String) -> Result<Self, TextError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE, source.clone())
            .map_err(|e| TextError::TemplateSyntax {
                at: at(origin, &e),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            name: name.to_owned(),
            origin: origin.to_owned(),
            source,
            env,
        })
    }

    /// `checkpoint`, `chatml`, `llama3` or `alpaca` (or the name given to `compile`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the template was read from, or `built-in <name>`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation: the template sees `messages` (`[{role, content}]`),
    /// `add_generation_prompt`, and `bos_token`, `eos_token`, `pad_token`, `unk_token` for those
    /// the tokenizer has.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tok: &TextTokenizer,
    ) -> Result<String, TextError> {
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        for (key, token) in [
            ("bos_token", tok.bos()),
            ("eos_token", tok.eos()),
            ("pad_token", tok.pad()),
            ("unk_token", tok.unk()),
        ] {
            if let Some((s, _)) = token {
                ctx.push((key, Value::from(s)));
            }
        }
        let ctx: Value = ctx.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| self.render_error(e))?;
        template.render(ctx).map_err(|e| self.render_error(e))
    }

    fn render_error(&self, e: Error) -> TextError {
        let at = at(&self.origin, &e);
        if let Some(message) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
            return TextError::TemplateRaised {
                at,
                message: message.to_owned(),
            };
        }
        let help = match e.kind() {
            ErrorKind::TemplateNotFound => {
                Some("chat templates are sandboxed: include, import and extends are not available".into())
            }
            ErrorKind::UnknownFunction => Some(
                "available functions: raise_exception, range, dict, namespace, and jinja's builtins (strftime_now is not provided)"
                    .into(),
            ),
            _ => None,
        };
        TextError::TemplateRender {
            at,
            message: describe(&e),
            help,
        }
    }
}

/// `origin, line N` (when minijinja knows the line).
fn at(origin: &str, e: &Error) -> String {
    match e.line() {
        Some(line) => format!("{origin}, line {line}"),
        None => origin.to_owned(),
    }
}

/// minijinja's kind and detail, without its `(in template:line)` suffix.
fn describe(e: &Error) -> String {
    match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// transformers' `tojson`: Python's `json.dumps` (`", "` and `": "` separators, no HTML
/// escaping, non-ASCII kept), with an optional `indent`.
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
            serde::Serialize::serialize(
                value,
                &mut serde_json::Serializer::with_formatter(&mut out, fmt),
            )
        }
        None => serde::Serialize::serialize(
            value,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter),
        ),
    };
    result.map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e)
    })?;
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// Compact JSON with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

/// The Python methods chat templates commonly call on strings, dicts and lists.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            string_method(s, method, args)
        }
        ValueKind::Map => match method {
            "items" => {
                let _: () = from_args(args)?;
                state.apply_filter("items", std::slice::from_ref(value))
            }
            "keys" => {
                let _: () = from_args(args)?;
                Ok(Value::from_iter(value.try_iter()?))
            }
            "values" => {
                let _: () = from_args(args)?;
                let mut out = Vec::new();
                for key in value.try_iter()? {
                    out.push(value.get_item(&key)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let found = value.get_item(&key)?;
                Ok(if found.is_undefined() {
                    default.unwrap_or(Value::from(()))
                } else {
                    found
                })
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        },
        ValueKind::Seq => match method {
            "count" => {
                let (needle,): (Value,) = from_args(args)?;
                Ok(Value::from(
                    value.try_iter()?.filter(|v| *v == needle).count(),
                ))
            }
            "index" => {
                let (needle,): (Value,) = from_args(args)?;
                match value.try_iter()?.position(|v| v == needle) {
                    Some(i) => Ok(Value::from(i)),
                    None => Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("{needle} is not in list"),
                    )),
                }
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        },
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

/// `prefix` arguments of startswith/endswith: a string or a tuple (list) of strings.
fn affixes(v: &Value) -> Result<Vec<String>, Error> {
    if let Some(s) = v.as_str() {
        return Ok(vec![s.to_owned()]);
    }
    let mut out = Vec::new();
    for item in v.try_iter()? {
        match item.as_str() {
            Some(s) => out.push(s.to_owned()),
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "startswith/endswith take a string or a tuple of strings",
                ));
            }
        }
    }
    Ok(out)
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let strip_set = |chars: Option<&str>| {
        let chars: Option<Vec<char>> = chars.map(|c| c.chars().collect());
        move |c: char| match &chars {
            Some(set) => set.contains(&c),
            None => c.is_whitespace(),
        }
    };
    Ok(match method {
        "strip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_matches(strip_set(chars)))
        }
        "lstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_start_matches(strip_set(chars)))
        }
        "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            Value::from(s.trim_end_matches(strip_set(chars)))
        }
        "startswith" => {
            let (prefix,): (Value,) = from_args(args)?;
            Value::from(affixes(&prefix)?.iter().any(|p| s.starts_with(p.as_str())))
        }
        "endswith" => {
            let (suffix,): (Value,) = from_args(args)?;
            Value::from(affixes(&suffix)?.iter().any(|p| s.ends_with(p.as_str())))
        }
        "upper" => {
            let _: () = from_args(args)?;
            Value::from(s.to_uppercase())
        }
        "lower" => {
            let _: () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "capitalize" => {
            let _: () = from_args(args)?;
            let mut chars = s.chars();
            match chars.next() {
                Some(first) => Value::from(
                    first.to_uppercase().collect::<String>() + &chars.as_str().to_lowercase(),
                ),
                None => Value::from(""),
            }
        }
        "title" => {
            let _: () = from_args(args)?;
            let mut out = String::with_capacity(s.len());
            let mut prev_alpha = false;
            for c in s.chars() {
                if prev_alpha {
                    out.extend(c.to_lowercase());
                } else {
                    out.extend(c.to_uppercase());
                }
                prev_alpha = c.is_alphabetic();
            }
            Value::from(out)
        }
        "replace" => {
            let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
            match count {
                Some(n) if n >= 0 => Value::from(s.replacen(old, new, n as usize)),
                _ => Value::from(s.replace(old, new)),
            }
        }
        "split" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let max = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
            let parts: Vec<Value> = match (sep, max) {
                (None, None) => s.split_whitespace().map(Value::from).collect(),
                (None, Some(m)) => {
                    let mut parts = Vec::new();
                    let mut rest = s.trim_start();
                    while !rest.is_empty() {
                        if parts.len() == m {
                            parts.push(Value::from(rest));
                            break;
                        }
                        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                        parts.push(Value::from(&rest[..end]));
                        rest = rest[end..].trim_start();
                    }
                    parts
                }
                (Some(""), _) => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"));
                }
                (Some(sep), None) => s.split(sep).map(Value::from).collect(),
                (Some(sep), Some(m)) => s.splitn(m + 1, sep).map(Value::from).collect(),
            };
            Value::from(parts)
        }
        "find" => {
            let (needle,): (&str,) = from_args(args)?;
            match s.find(needle) {
                Some(byte) => Value::from(s[..byte].chars().count() as i64),
                None => Value::from(-1),
            }
        }
        "count" => {
            let (needle,): (&str,) = from_args(args)?;
            if needle.is_empty() {
                Value::from(s.chars().count() + 1)
            } else {
                Value::from(s.matches(needle).count())
            }
        }
        "join" => {
            let (items,): (Value,) = from_args(args)?;
            let mut parts = Vec::new();
            for item in items.try_iter()? {
                parts.push(item.to_string());
            }
            Value::from(parts.join(s))
        }
        "isdigit" | "isnumeric" => {
            let _: () = from_args(args)?;
            Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric()))
        }
        "isalpha" => {
            let _: () = from_args(args)?;
            Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic))
        }
        "isspace" => {
            let _: () = from_args(args)?;
            Value::from(!s.is_empty() && s.chars().all(char::is_whitespace))
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}
