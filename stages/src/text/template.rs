//! Chat templates: the checkpoint's Jinja template or a built-in one, rendered in a sandboxed
//! minijinja environment the way transformers' `apply_chat_template` renders them.
//!
//! The context is transformers': `messages` (each message as the dataset gave it: `content` a
//! string or a list of parts, `tool_calls`, `tool_call_id`, `name`, `reasoning_content`, any
//! other key), `tools` and `documents` (none when not given), `add_generation_prompt`, the
//! tokenizer's special tokens, and the manifest's `chat_template.kwargs` (`enable_thinking`,
//! `date_string`, anything a template reads).
//!
//! The sandbox: no loader (`include`, `import` and `extends` fail), no filesystem, no clock:
//! `strftime_now(fmt)` formats the manifest's `chat_template.date` (default [`DEFAULT_DATE`],
//! never the wall clock), so a rendering is a function of the stage's fingerprint.
//! `raise_exception(msg)` fails the rendering with the template's message; `tojson` is Python's
//! `json.dumps` as transformers calls it (`indent`, `sort_keys`, `separators`, `ensure_ascii`;
//! keys in insertion order); a few Python string, dict and list methods (`strip`, `startswith`,
//! `split`, `items`, `get`, …) are available.
//! Blocks are trimmed (`trim_blocks`, `lstrip_blocks`) like transformers' environment does.
//!
//! `{% generation %}…{% endgeneration %}` (transformers' `AssistantTracker`, what TRL's
//! `assistant_only_loss` reads) renders its body and records the body's span: when a template
//! has the tag, [`ChatTemplate::render_spans`] returns those spans and SFT trains on exactly them.
//! The tag is compiled as a pair of markers (two Unicode noncharacters, U+FDD0 and U+FDD1) that
//! the rendering strips; a conversation that itself holds one of them is refused.

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

/// The date `strftime_now` formats when the manifest gives none: the date Llama 3.1's template
/// falls back to when `strftime_now` is missing, so its guarded and unguarded forms agree.
pub const DEFAULT_DATE: &str = "2024-07-26";

/// A date (`2024-07-26`) or a date and time (`2024-07-26T09:30:00`), checked when the manifest is
/// read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct TemplateDate(
    #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2})?)?$"))] String,
);

impl TemplateDate {
    fn parse(s: &str) -> Option<chrono::NaiveDateTime> {
        chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
            .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M"))
            .ok()
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
            })
    }

    fn moment(&self) -> chrono::NaiveDateTime {
        TemplateDate::parse(&self.0)
            .or_else(|| TemplateDate::parse(DEFAULT_DATE))
            .unwrap_or_default()
    }
}

impl Default for TemplateDate {
    fn default() -> Self {
        TemplateDate(DEFAULT_DATE.to_owned())
    }
}

impl<'de> Deserialize<'de> for TemplateDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match TemplateDate::parse(&s) {
            Some(_) => Ok(TemplateDate(s)),
            None => Err(serde::de::Error::custom(format!(
                "{s:?} is not a date: write YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS"
            ))),
        }
    }
}

/// `chat_template:` in a manifest: a template's name (`auto`, `chatml`, …), or the name with the
/// context transformers' `apply_chat_template` takes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TemplateSpec {
    /// `chat_template: chatml`.
    Choice(TemplateChoice),
    /// `chat_template: {name: checkpoint, kwargs: {enable_thinking: false}, tools: […], date: …}`.
    Options(TemplateOptions),
}

impl Default for TemplateSpec {
    fn default() -> Self {
        TemplateSpec::Choice(TemplateChoice::Auto)
    }
}

impl From<TemplateChoice> for TemplateSpec {
    fn from(c: TemplateChoice) -> Self {
        TemplateSpec::Choice(c)
    }
}

impl From<&TemplateSpec> for TemplateSpec {
    fn from(s: &TemplateSpec) -> Self {
        s.clone()
    }
}

impl TemplateSpec {
    /// Which template.
    pub fn choice(&self) -> TemplateChoice {
        match self {
            TemplateSpec::Choice(c) => *c,
            TemplateSpec::Options(o) => o.name,
        }
    }

    /// The context it renders with.
    pub fn vars(&self) -> TemplateVars {
        match self {
            TemplateSpec::Choice(_) => TemplateVars::default(),
            TemplateSpec::Options(o) => TemplateVars {
                kwargs: o.kwargs.clone(),
                tools: o.tools.clone(),
                documents: o.documents.clone(),
                date: o.date.clone().unwrap_or_default(),
            },
        }
    }
}

/// The long form of `chat_template:`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateOptions {
    /// Which template (as the short form).
    #[serde(default)]
    pub name: TemplateChoice,
    /// Extra template variables, transformers' `chat_template_kwargs`: `enable_thinking`,
    /// `date_string`, `reasoning_effort`, or anything else the template reads.
    #[serde(default)]
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    /// The tools (JSON schemas) a template sees as `tools` when a record brings none of its own.
    #[serde(default)]
    pub tools: Vec<serde_json::Value>,
    /// The documents a template sees as `documents` (retrieval-augmented templates).
    #[serde(default)]
    pub documents: Vec<serde_json::Value>,
    /// What `strftime_now` formats (default 2024-07-26, never the wall clock).
    #[serde(default)]
    pub date: Option<TemplateDate>,
}

/// What a template sees besides the conversation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TemplateVars {
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    pub tools: Vec<serde_json::Value>,
    pub documents: Vec<serde_json::Value>,
    pub date: TemplateDate,
}

/// A rendering, with the spans of its `{% generation %}` blocks (empty when the template has
/// none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub generation: Vec<std::ops::Range<usize>>,
}

/// The markers `{% generation %}` and `{% endgeneration %}` compile to.
const GEN_OPEN: char = '\u{FDD0}';
const GEN_CLOSE: char = '\u{FDD1}';

/// Rewrite `{% generation %}` / `{% endgeneration %}` (with any whitespace control) into block
/// tags that print a marker, keeping the tag's trimming: `{%- if true %}{{ M }}{% endif -%}`.
fn compile_generation(source: &str) -> (String, bool) {
    static TAG: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\{%([-+]?)\s*(end)?generation\s*([-+]?)%\}").expect("valid regex")
    });
    let mut found = false;
    let out = TAG.replace_all(source, |c: &regex::Captures<'_>| {
        found = true;
        let marker = if c.get(2).is_some() {
            GEN_CLOSE
        } else {
            GEN_OPEN
        };
        format!(
            "{{%{} if true %}}{{{{ '{marker}' }}}}{{% endif {}%}}",
            &c[1], &c[3]
        )
    });
    (out.into_owned(), found)
}

/// Strip the generation markers from a rendering, returning the spans between them.
fn strip_generation(raw: &str, origin: &str) -> Result<Rendered, TextError> {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in raw.chars() {
        match c {
            GEN_OPEN => {
                if open.is_some() {
                    return Err(TextError::TemplateRender {
                        at: origin.to_owned(),
                        message: "{% generation %} opened inside another".into(),
                        help: None,
                    });
                }
                open = Some(text.len());
            }
            GEN_CLOSE => match open.take() {
                Some(start) => spans.push(start..text.len()),
                None => {
                    return Err(TextError::TemplateRender {
                        at: origin.to_owned(),
                        message: "{% endgeneration %} without {% generation %}".into(),
                        help: None,
                    });
                }
            },
            c => text.push(c),
        }
    }
    if open.is_some() {
        return Err(TextError::TemplateRender {
            at: origin.to_owned(),
            message: "{% generation %} not closed by {% endgeneration %}".into(),
            help: None,
        });
    }
    Ok(Rendered {
        text,
        generation: spans,
    })
}

const TEMPLATE: &str = "chat_template";
/// The instructions one rendering may run (a long tool-calling conversation through a large
/// template takes well under a million): a template that loops without end fails instead of
/// hanging (about a second of work at most).
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// The most bytes one rendering may write (the longest data line a reader accepts, so any
/// conversation it read fits): a template that repeats output fails instead of filling memory.
pub const TEMPLATE_OUTPUT: usize = crate::data::source::MAX_LINE_BYTES;

/// A rendering's output, refusing to grow past [`TEMPLATE_OUTPUT`].
#[derive(Default)]
struct BoundedOutput {
    bytes: Vec<u8>,
    over: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_OUTPUT {
            self.over = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How deep macros and includes may nest in one rendering.
const TEMPLATE_RECURSION: usize = 100;
/// Prefix of the error detail `raise_exception` produces.
const RAISED: &str = "raise_exception: ";

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    name: String,
    origin: String,
    source: String,
    env: Environment<'static>,
    vars: TemplateVars,
    has_generation: bool,
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
    /// The template `spec` names, with its context, for conversations tokenized by `tok`.
    pub fn resolve(spec: impl Into<TemplateSpec>, tok: &TextTokenizer) -> Result<Self, TextError> {
        let spec = spec.into();
        Ok(ChatTemplate::resolve_choice(spec.choice(), tok)?.with_vars(spec.vars()))
    }

    /// This template rendering with `vars`.
    pub fn with_vars(mut self, vars: TemplateVars) -> Self {
        let moment = vars.date.moment();
        self.env.add_function("strftime_now", move |fmt: String| {
            // chrono reports a bad specifier (`%Q`) as a formatting error, which `to_string`
            // would turn into a panic.
            let mut out = String::new();
            fmt::Write::write_fmt(&mut out, format_args!("{}", moment.format(&fmt))).map_err(
                |_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: `{fmt}` is not a strftime format"),
                    )
                },
            )?;
            Ok::<_, Error>(Value::from(out))
        });
        self.vars = vars;
        self
    }

    fn resolve_choice(choice: TemplateChoice, tok: &TextTokenizer) -> Result<Self, TextError> {
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
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        env.set_unknown_method_callback(python_method);
        env.set_formatter(python_formatter);
        env.add_test("iterable", python_iterable);
        env.add_filter("string", |v: &Value| python_str(v));
        env.add_filter("trim", python_trim);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        let (compiled, has_generation) = compile_generation(&source);
        let (opens, closes) = (
            compiled.matches(GEN_OPEN).count(),
            compiled.matches(GEN_CLOSE).count(),
        );
        if opens != closes {
            return Err(TextError::TemplateSyntax {
                at: origin.to_owned(),
                message: format!(
                    "syntax error: {opens} {{% generation %}} tags but {closes} {{% endgeneration %}}"
                ),
            });
        }
        env.add_template_owned(TEMPLATE, compiled)
            .map_err(|e| TextError::TemplateSyntax {
                at: at(origin, &e),
                message: describe(&e),
            })?;
        let template = ChatTemplate {
            name: name.to_owned(),
            origin: origin.to_owned(),
            source,
            env,
            vars: TemplateVars::default(),
            has_generation,
        };
        Ok(template.with_vars(TemplateVars::default()))
    }

    /// Compile the template in the file at `path`, read as Python reads a text file (universal
    /// newlines: `\r\n` and `\r` become `\n`), as transformers reads `chat_template.jinja`.
    pub fn from_file(name: &str, path: &std::path::Path) -> Result<Self, TextError> {
        let source = read_template_file(path)?;
        ChatTemplate::compile(name, &path.display().to_string(), source)
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

    /// Whether the template marks assistant output with `{% generation %}`.
    pub fn has_generation(&self) -> bool {
        self.has_generation
    }

    /// Render a conversation with the manifest's tools (see [`ChatTemplate::render_spans`]).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tok: &TextTokenizer,
    ) -> Result<String, TextError> {
        Ok(self
            .render_spans(messages, &[], add_generation_prompt, tok)?
            .text)
    }

    /// Render a conversation: the template sees `messages`, `tools` (the record's, else the
    /// manifest's, else none), `documents`, `add_generation_prompt`, `bos_token`, `eos_token`,
    /// `pad_token`, `unk_token` for those the tokenizer has, and the manifest's kwargs (which
    /// override any of these, as transformers' `**kwargs` do).
    pub fn render_spans(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
        tok: &TextTokenizer,
    ) -> Result<Rendered, TextError> {
        let tools = if tools.is_empty() {
            &self.vars.tools
        } else {
            tools
        };
        let listed = |items: &[serde_json::Value]| {
            if items.is_empty() {
                Value::from(())
            } else {
                Value::from_serialize(items)
            }
        };
        let mut ctx: Vec<(String, Value)> = vec![
            (
                "messages".into(),
                Value::from_serialize(template_messages(messages)),
            ),
            ("tools".into(), listed(tools)),
            ("documents".into(), listed(&self.vars.documents)),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
        ];
        for (key, token) in [
            ("bos_token", tok.bos()),
            ("eos_token", tok.eos()),
            ("pad_token", tok.pad()),
            ("unk_token", tok.unk()),
        ] {
            if let Some((s, _)) = token {
                ctx.push((key.into(), Value::from(s)));
            }
        }
        for (key, v) in &self.vars.kwargs {
            ctx.retain(|(k, _)| k != key);
            ctx.push((key.clone(), Value::from_serialize(v)));
        }
        let ctx: Value = ctx.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| self.render_error(e))?;
        let mut out = BoundedOutput::default();
        if let Err(e) = template.render_captured_to(ctx, &mut out) {
            if out.over {
                return Err(TextError::TemplateRender {
                    at: self.origin.clone(),
                    message: format!("exceeded the output limit of {TEMPLATE_OUTPUT} bytes"),
                    help: Some(
                        "one rendered conversation may be at most that long; this template \
                         repeats its output without end"
                            .into(),
                    ),
                });
            }
            return Err(self.render_error(e));
        }
        // minijinja writes whole strings, so the bytes are UTF-8.
        let raw = String::from_utf8(out.bytes).map_err(|e| TextError::TemplateRender {
            at: self.origin.clone(),
            message: format!("the output is not utf-8: {e}"),
            help: None,
        })?;
        if !self.has_generation {
            return Ok(Rendered {
                text: raw,
                generation: Vec::new(),
            });
        }
        let holds_marker = messages
            .iter()
            .any(|m| m.text().contains([GEN_OPEN, GEN_CLOSE]));
        if holds_marker {
            return Err(TextError::TemplateRender {
                at: self.origin.clone(),
                message:
                    "the conversation holds U+FDD0 or U+FDD1, which mark {% generation %} spans"
                        .into(),
                help: None,
            });
        }
        strip_generation(&raw, &self.origin)
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
            ErrorKind::OutOfFuel => Some(format!(
                "a rendering of one conversation may run {TEMPLATE_FUEL} instructions; this \
                 template loops without end, or far longer than any chat needs"
            )),
            ErrorKind::UnknownFunction => Some(
                "available functions: raise_exception, strftime_now, range, dict, namespace, and jinja's builtins"
                    .into(),
            ),
            _ => None,
        };
        let message = match e.kind() {
            ErrorKind::OutOfFuel => {
                format!("exceeded the fuel limit of {TEMPLATE_FUEL} instructions")
            }
            _ => describe(&e),
        };
        TextError::TemplateRender { at, message, help }
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

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python's `json.dumps` with those arguments, positional or by keyword. Keys keep their
/// insertion order unless `sort_keys`; floats print as Python's `repr` does.
fn tojson(value: &Value, args: &[Value]) -> Result<Value, Error> {
    if value.is_undefined() {
        // Python's json.dumps cannot write jinja's Undefined either.
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "object of type undefined is not json serializable",
        ));
    }
    let (positional, kwargs): (&[Value], Kwargs) = from_args(args)?;
    if positional.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let arg = |i: usize, name: &str| -> Result<Option<Value>, Error> {
        let by_name: Option<Value> = kwargs.get(name)?;
        Ok(by_name
            .or_else(|| positional.get(i).cloned())
            .filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) => match (v.as_str(), i64::try_from(v.clone())) {
            (Some(s), _) => Some(s.to_owned()),
            (None, Ok(n)) => Some(" ".repeat(n.max(0) as usize)),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson's indent is a number or a string",
                ));
            }
        },
    };
    let separators = match arg(2, "separators")? {
        None => None,
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson's separators are two strings",
                    )
                })?;
            match <[String; 2]>::try_from(parts) {
                Ok(pair) => Some(pair),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson's separators are two strings (item, key)",
                    ));
                }
            }
        }
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e)
    })?;
    let [item_sep, key_sep] = separators.unwrap_or_else(|| match indent {
        Some(_) => [",".into(), ": ".into()],
        None => [", ".into(), ": ".into()],
    });
    let dumper = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    dumper.value(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// The messages as the template sees them, as transformers' `apply_chat_template` passes them:
/// null keys dropped (an absent `content` is no key), and a reasoning (`reasoning_content`, or
/// an older `thinking` or `reasoning` key) given as both `thinking` (first, for gpt-oss's
/// template) and `reasoning_content` (transformers 5's `_alias_reasoning_fields`).
fn template_messages(messages: &[Message]) -> Vec<serde_json::Value> {
    use serde_json::Value as J;
    const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
    messages
        .iter()
        .map(|m| {
            let J::Object(mut map) = serde_json::to_value(m).unwrap_or(J::Null) else {
                return J::Null;
            };
            map.retain(|_, v| !v.is_null());
            let reasoning = REASONING.iter().find_map(|k| map.get(*k)).cloned();
            let Some(reasoning) = reasoning else {
                return J::Object(map);
            };
            let mut aliased = serde_json::Map::new();
            aliased.insert("thinking".into(), reasoning.clone());
            aliased.extend(map);
            aliased.insert("reasoning_content".into(), reasoning);
            J::Object(aliased)
        })
        .collect()
}

/// Read a template file as Python's text mode does (universal newlines).
pub(crate) fn read_template_file(path: &std::path::Path) -> Result<String, TextError> {
    let bytes = std::fs::read(path).map_err(|e| TextError::io("read", path, e))?;
    let source = String::from_utf8(bytes).map_err(|e| TextError::Config {
        path: path.display().to_string(),
        message: format!("not utf-8 text: {e}"),
        help: None,
    })?;
    Ok(universal_newlines(source))
}

/// `\r\n` and lone `\r` as `\n`, as Python's text mode reads a file.
pub(crate) fn universal_newlines(source: String) -> String {
    if source.contains('\r') {
        source.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        source
    }
}

/// `{{ value }}` as jinja2 prints it: Python's `str`, so a list or dict prints as its repr
/// (`[{'type': 'text'}]`), booleans as `True`/`False`, none as `None`, floats as `repr`.
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    let pythonic = match value.kind() {
        ValueKind::Seq | ValueKind::Map | ValueKind::Bool | ValueKind::None => true,
        ValueKind::Number => !value.is_integer(),
        _ => false,
    };
    if !pythonic {
        return minijinja::escape_formatter(out, state, value);
    }
    let mut s = String::new();
    python_repr(value, &mut s);
    out.write_str(&s).map_err(Error::from)
}

/// Python's `str` of a value (jinja2's `soft_str`): a string as itself, undefined as empty,
/// anything else as its repr.
fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        ValueKind::Undefined => String::new(),
        ValueKind::Number if value.is_integer() => value.to_string(),
        _ => {
            let mut s = String::new();
            python_repr(value, &mut s);
            s
        }
    }
}

/// jinja2's `trim(chars=None)`: the value as Python's `str`, then `strip(chars)`.
fn python_trim(value: &Value, chars: Option<String>) -> String {
    let s = python_str(value);
    match chars {
        Some(chars) => s.trim_matches(|c| chars.contains(c)).to_owned(),
        None => s.trim().to_owned(),
    }
}

/// Python's `repr` of a value.
fn python_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(f) if f.is_nan() => out.push_str("nan"),
            Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "inf" } else { "-inf" }),
            Ok(f) => out.push_str(&py_float(f)),
            Err(_) => out.push_str(&value.to_string()),
        },
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, out);
                out.push_str(": ");
                python_repr(&value.get_item(&key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out);
            }
            out.push(']');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's `repr` of a string: single quotes unless the text holds one and no double quote.
fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// jinja2's `iterable` test is Python's `iter()`: strings, lists, dicts and jinja's undefined
/// are iterable; none, numbers and booleans are not (minijinja iterates none as empty).
fn python_iterable(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::String
            | ValueKind::Seq
            | ValueKind::Map
            | ValueKind::Iterable
            | ValueKind::Undefined
    )
}

/// Python's `json.dumps`.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(pad) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(pad);
            }
        }
    }

    fn value(&self, v: &serde_json::Value, depth: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&py_float(f)),
                _ => out.push_str(&n.to_string()),
            },
            J::String(s) => self.string(s, out),
            J::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.value(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            J::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.value(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it: the shortest digits that round-trip, positional for
/// exponents from -4 to 15, else `d.ddde+XX`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}"); // e.g. "-1.2345e17", "1e-5"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else if exp + 1 >= n {
            format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let e_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{e_sign}{:02}", exp.abs())
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
