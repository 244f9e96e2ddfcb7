//! [`TextTokenizer`]: a Hugging Face tokenizer directory (`tokenizer.json`,
//! `tokenizer_config.json`, `chat_template.jinja`) with its special tokens resolved.

use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use super::error::TextError;
use crate::data::records::json_message;

/// The tokenizer model and pipeline.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Special tokens, `add_bos_token`, the chat template (transformers' format).
pub const CONFIG_FILE: &str = "tokenizer_config.json";
/// The chat template as its own file (newer transformers); wins over the config's.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// Older transformers' special tokens (read as a fallback for the config's).
pub const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";
/// Where a copied model's chat template came from, `{"from": "<file as the manifest names
/// it>"}`: written beside the copy in the cache so that template errors name the user's file.
pub const TEMPLATE_ORIGIN_FILE: &str = "burnish_template.json";

/// The files [`TextTokenizer::save_to`] copies, when the source directory has them.
const COPIED: [&str; 4] = [
    TOKENIZER_FILE,
    CONFIG_FILE,
    TEMPLATE_FILE,
    SPECIAL_TOKENS_FILE,
];

/// Each token's `(start, end)` byte offsets in the encoded text.
pub type ByteSpans = Vec<(usize, usize)>;

/// Where the checkpoint's chat template came from.
#[derive(Clone, Debug)]
pub(crate) struct CheckpointTemplate {
    pub(crate) source: String,
    /// The file (and key) it was read from, for error messages.
    pub(crate) origin: String,
}

/// A tokenizer loaded from a model directory: the `tokenizers` pipeline (with truncation and
/// padding switched off), its special tokens, and the checkpoint's chat template.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    dir: PathBuf,
    /// The tokenizer files as read, written back unchanged by `save_to`.
    files: Vec<(&'static str, Vec<u8>)>,
    vocab_size: usize,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    pad: Option<(String, u32)>,
    unk: Option<(String, u32)>,
    add_bos: bool,
    add_eos: bool,
    template: Option<CheckpointTemplate>,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("chat_template", &self.template.as_ref().map(|t| &t.origin))
            .finish()
    }
}

/// Read a file that may be absent.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, TextError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TextError::io("read", path, e)),
    }
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<serde_json::Map<String, Value>, TextError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| TextError::Config {
        path: path.display().to_string(),
        message: format!("malformed json: {}", json_message(&e)),
        help: None,
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(TextError::Config {
            path: path.display().to_string(),
            message: format!("expected a json object, found {}", json_kind(&other)),
            help: None,
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A special token entry: a string, null, or an AddedToken object `{"content": ..}`.
fn special_token(
    path: &Path,
    map: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, TextError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TextError::Config {
                path: path.display().to_string(),
                message: format!("`{field}` is an object without a string `content`"),
                help: Some(r#"write it as "<|im_end|>" or {"content": "<|im_end|>"}"#.into()),
            }),
        },
        Some(other) => Err(TextError::Config {
            path: path.display().to_string(),
            message: format!(
                "`{field}` should be a string, null or an object with `content`, found {}",
                json_kind(other)
            ),
            help: None,
        }),
    }
}

fn flag(
    path: &Path,
    map: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<bool>, TextError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(TextError::Config {
            path: path.display().to_string(),
            message: format!("`{field}` should be a boolean, found {}", json_kind(other)),
            help: None,
        }),
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of `{name, template}` of which
/// the one named `default` is taken.
fn config_template(
    path: &Path,
    map: &serde_json::Map<String, Value>,
) -> Result<Option<String>, TextError> {
    let bad = |message: String| {
        TextError::Config {
        path: path.display().to_string(),
        message,
        help: Some(
            "`chat_template` is a string, or a list of {\"name\", \"template\"} with one named `default`"
                .into(),
        ),
    }
    };
    match map.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let mut names = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_owned())),
                    (Some(n), Some(_)) => names.push(format!("`{n}`")),
                    _ => {
                        return Err(bad(format!(
                            "`chat_template[{i}]` should be an object with string `name` and `template`"
                        )));
                    }
                }
            }
            Err(bad(format!(
                "`chat_template` lists {} but none named `default`",
                if names.is_empty() {
                    "no templates".to_owned()
                } else {
                    names.join(", ")
                }
            )))
        }
        Some(other) => Err(bad(format!(
            "`chat_template` should be a string or a list, found {}",
            json_kind(other)
        ))),
    }
}

/// Refuse what `tokenizers` panics on instead of failing: malformed JSON inside `decoder`, and
/// a `Precompiled` normalizer whose `precompiled_charsmap` does not parse.
fn check_tokenizer_json(bytes: &[u8]) -> Result<(), String> {
    let json: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut todo: Vec<&Value> = json.get("normalizer").into_iter().collect();
    while let Some(v) = todo.pop() {
        match v {
            Value::Object(map) => {
                if map.get("type").and_then(Value::as_str) == Some("Precompiled") {
                    serde_json::from_str::<tokenizers::normalizers::Precompiled>(&v.to_string())
                        .map_err(|e| format!("normalizer `Precompiled`: {e}"))?;
                }
                todo.extend(map.values());
            }
            Value::Array(items) => todo.extend(items),
            _ => {}
        }
    }
    Ok(())
}

impl TextTokenizer {
    /// Load `tokenizer.json`, `tokenizer_config.json` (optional: special tokens may be strings,
    /// null or AddedToken objects; `add_bos_token`/`add_eos_token`; `chat_template` as a string
    /// or a list with a `default`), `special_tokens_map.json` (optional, a fallback for the
    /// special tokens) and `chat_template.jinja` (optional; it wins over the config's template).
    ///
    /// When the config does not say `add_bos_token`, it is whether the tokenizer's
    /// post-processor puts the bos token first (Llama 3 does).
    pub fn from_dir(dir: &Path) -> Result<Self, TextError> {
        let tok_path = dir.join(TOKENIZER_FILE);
        let tok_bytes = fs::read(&tok_path).map_err(|e| TextError::io("read", &tok_path, e))?;
        check_tokenizer_json(&tok_bytes).map_err(|message| TextError::TokenizerJson {
            path: tok_path.display().to_string(),
            message,
        })?;
        let mut inner =
            Tokenizer::from_bytes(&tok_bytes).map_err(|e| TextError::TokenizerJson {
                path: tok_path.display().to_string(),
                message: e.to_string(),
            })?;
        inner
            .with_truncation(None)
            .map_err(|e| TextError::TokenizerJson {
                path: tok_path.display().to_string(),
                message: e.to_string(),
            })?;
        inner.with_padding(None);

        let mut files = vec![(TOKENIZER_FILE, tok_bytes)];

        let cfg_path = dir.join(CONFIG_FILE);
        let cfg = match read_optional(&cfg_path)? {
            Some(bytes) => {
                let map = parse_json(&cfg_path, &bytes)?;
                files.push((CONFIG_FILE, bytes));
                map
            }
            None => serde_json::Map::new(),
        };
        let map_path = dir.join(SPECIAL_TOKENS_FILE);
        let map = match read_optional(&map_path)? {
            Some(bytes) => {
                let map = parse_json(&map_path, &bytes)?;
                files.push((SPECIAL_TOKENS_FILE, bytes));
                map
            }
            None => serde_json::Map::new(),
        };

        let resolve = |field: &'static str| -> Result<Option<(String, u32)>, TextError> {
            let (path, token) = match special_token(&cfg_path, &cfg, field)? {
                Some(t) => (&cfg_path, Some(t)),
                None if !cfg.contains_key(field) => {
                    (&map_path, special_token(&map_path, &map, field)?)
                }
                None => (&cfg_path, None),
            };
            match token {
                None => Ok(None),
                Some(t) => match inner.token_to_id(&t) {
                    Some(id) => Ok(Some((t, id))),
                    None => Err(TextError::UnknownToken {
                        path: path.display().to_string(),
                        field,
                        token: t,
                    }),
                },
            }
        };
        let bos = resolve("bos_token")?;
        let eos = resolve("eos_token")?;
        let pad = resolve("pad_token")?;
        let unk = resolve("unk_token")?;

        // Whether the post-processor adds `id` first (last) to a plain encoding.
        let probe = inner.encode("a", true).ok();
        let adds = |first: bool, tok: &Option<(String, u32)>| -> bool {
            let (Some((_, id)), Some(enc)) = (tok, probe.as_ref()) else {
                return false;
            };
            let ids = enc.get_ids();
            let at = if first { ids.first() } else { ids.last() };
            ids.len() > 1 && at == Some(id)
        };
        let add_bos = flag(&cfg_path, &cfg, "add_bos_token")?.unwrap_or_else(|| adds(true, &bos));
        let add_eos = flag(&cfg_path, &cfg, "add_eos_token")?.unwrap_or_else(|| adds(false, &eos));

        let mut template = config_template(&cfg_path, &cfg)?.map(|source| CheckpointTemplate {
            source,
            origin: format!("{} (chat_template)", cfg_path.display()),
        });
        let tpl_path = dir.join(TEMPLATE_FILE);
        if let Some(bytes) = read_optional(&tpl_path)? {
            let source = String::from_utf8(bytes.clone()).map_err(|e| TextError::Config {
                path: tpl_path.display().to_string(),
                message: format!("not utf-8 text: {e}"),
                help: None,
            })?;
            // Read as transformers reads it: a Python text file, universal newlines.
            let source = super::template::universal_newlines(source);
            template = Some(CheckpointTemplate {
                source,
                origin: tpl_path.display().to_string(),
            });
            files.push((TEMPLATE_FILE, bytes));
        }

        if let Some(t) = &mut template
            && let Some(from) = recorded_template_origin(dir)
        {
            t.origin = from;
        }

        let vocab = inner.get_vocab(true);
        let vocab_size = vocab
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
            .max(vocab.len());

        Ok(TextTokenizer {
            inner,
            dir: dir.to_path_buf(),
            files,
            vocab_size,
            bos,
            eos,
            pad,
            unk,
            add_bos,
            add_eos,
            template,
        })
    }

    /// The ids of `text`; the post-processor adds no special tokens (special tokens written in
    /// the text, like `<|im_end|>`, are still recognized).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.tokenize_error("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids of `text` with each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, ByteSpans), TextError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.tokenize_error("encode", e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Encode many texts at once (in parallel); no special tokens added.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, TextError> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| self.tokenize_error("encode", e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| self.tokenize_error("decode", e))
    }

    fn tokenize_error(&self, action: &'static str, e: tokenizers::Error) -> TextError {
        TextError::Tokenize {
            action,
            dir: self.dir.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Number of token ids, added tokens included (one more than the largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos(&self) -> Option<(&str, u32)> {
        self.bos.as_ref().map(|(s, id)| (s.as_str(), *id))
    }

    pub fn eos(&self) -> Option<(&str, u32)> {
        self.eos.as_ref().map(|(s, id)| (s.as_str(), *id))
    }

    pub fn pad(&self) -> Option<(&str, u32)> {
        self.pad.as_ref().map(|(s, id)| (s.as_str(), *id))
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|(_, id)| *id)
    }

    pub fn unk(&self) -> Option<(&str, u32)> {
        self.unk.as_ref().map(|(s, id)| (s.as_str(), *id))
    }

    /// Whether a sequence starts with the bos token (`add_bos_token`, or what the
    /// post-processor does when the config does not say).
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether the tokenizer appends eos to a plain encoding (`add_eos_token`).
    pub fn add_eos(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }

    /// The checkpoint's chat template (chat_template.jinja, else tokenizer_config.json's).
    pub fn checkpoint_template(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.source.as_str())
    }

    pub(crate) fn checkpoint_template_origin(&self) -> Option<&CheckpointTemplate> {
        self.template.as_ref()
    }

    /// The file (and key) the checkpoint's chat template was read from, as error messages name
    /// it: for a model copied into the cache, the user's file it was copied from.
    pub fn template_origin(&self) -> Option<&str> {
        self.template.as_ref().map(|t| t.origin.as_str())
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Write the tokenizer files it was loaded from (tokenizer.json, and tokenizer_config.json,
    /// chat_template.jinja, special_tokens_map.json when present) into `dir`, which must exist.
    pub fn save_to(&self, dir: &Path) -> Result<(), TextError> {
        for name in COPIED {
            if let Some((_, bytes)) = self.files.iter().find(|(n, _)| *n == name) {
                let path = dir.join(name);
                fs::write(&path, bytes).map_err(|e| TextError::io("write", &path, e))?;
            }
        }
        Ok(())
    }
}

/// The `from` of a model directory's [`TEMPLATE_ORIGIN_FILE`], when it has a readable one.
fn recorded_template_origin(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join(TEMPLATE_ORIGIN_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("from")?.as_str().map(str::to_owned)
}

/// Record in `out` (a copy of a model directory) where its chat template came from: `tok`'s
/// origin with the directory `dir` it was loaded from shown as `shown` (the manifest's path).
/// A directory that already records an origin keeps it.
pub fn record_template_origin(
    tok: &TextTokenizer,
    dir: &Path,
    shown: &str,
    out: &Path,
) -> Result<(), TextError> {
    let Some(origin) = tok.template_origin() else {
        return Ok(());
    };
    // An origin `dir` recorded already is not under `dir`, and stays as it is.
    let from = match origin.strip_prefix(&dir.display().to_string()) {
        Some(rest) => format!("{}{rest}", shown.trim_end_matches('/')),
        None => origin.to_owned(),
    };
    let path = out.join(TEMPLATE_ORIGIN_FILE);
    // The copy may be a hard link to the source's file: replace it, never write through it.
    if path.exists() {
        fs::remove_file(&path).map_err(|e| TextError::io("replace", &path, e))?;
    }
    let text = serde_json::json!({ "from": from }).to_string() + "\n";
    fs::write(&path, text).map_err(|e| TextError::io("write", &path, e))
}
