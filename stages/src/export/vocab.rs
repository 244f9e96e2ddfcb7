//! The tokenizer as llama.cpp reads it: `tokenizer.ggml.*` metadata from a Hugging Face
//! `tokenizer.json` (+ `tokenizer_config.json`, `config.json`), as llama.cpp's own converter
//! (`convert_hf_to_gguf.py`: `_set_vocab_gpt2`, `_set_vocab_llama_hf`, `gguf.SpecialVocab`)
//! writes it.
//!
//! # Byte-level BPE → `gpt2`
//! - `tokenizer.ggml.tokens`: one string per id, `0..n_vocab` where `n_vocab` is the model's
//!   embedding rows (the array's length *is* llama.cpp's vocab size). Ids the tokenizer lacks are
//!   `[PAD{id}]` with type unused, as the converter writes them.
//! - `tokenizer.ggml.token_type` (i32): 1 normal; 3 control for added tokens marked `special`
//!   (or that look special: `<|…|>`, as the converter's `does_token_look_special`); 4 user-defined
//!   for other added tokens; 5 unused for padding ids.
//! - `tokenizer.ggml.merges`: `"a b"` strings. tokenizer.json's newer pair form `["a", "b"]` is
//!   joined with a space, a space inside a part written as U+0120 (the converter does the same).
//! - `tokenizer.ggml.pre`: the pre-tokenizer's name in llama.cpp, which picks its split regex.
//!   Detected from tokenizer.json when recognisable (see [`detect_pre`]); otherwise the stage
//!   asks for `pre_tokenizer:`. An unknown name fails llama.cpp's load, so the name is checked
//!   against [`PRE_TOKENIZERS`] (llama.cpp's list, `llama-vocab.cpp`).
//!
//! # Byte-fallback BPE (SentencePiece-style, Llama 2 / TinyLlama) → `llama`
//! Written like the converter's `_set_vocab_llama_hf`: tokens as stored (`▁` kept), type 6 for
//! `<0xNN>` byte tokens, control for special tokens, and `tokenizer.ggml.scores` (f32). The
//! converter writes -1000 for every score; llama.cpp's SentencePiece tokenizer merges the
//! highest-scoring pair first, so that leaves the merge order to chance. Here a token's score is
//! minus the rank of the merge that makes it (base tokens 0), which reproduces BPE's order.
//!
//! # Special tokens (always written, u32)
//! `bos`/`eos`/`unknown`/`padding` come from tokenizer_config.json (as [`TextTokenizer`] resolves
//! them), else from config.json's `*_token_id` (what `gguf.SpecialVocab` falls back to), else:
//! bos → eos, padding → eos, unknown → eos (byte-level BPE never emits it). `add_bos_token` /
//! `add_eos_token` are what the tokenizer does on a plain encode.

use std::collections::HashMap;

use serde_json::Value;

use super::ExportError;
use super::gguf::{GgufWriter, MetaArray, MetaValue};
use crate::text::TextTokenizer;

/// llama.cpp token types.
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Every `tokenizer.ggml.pre` name llama.cpp accepts (from `llama-vocab.cpp`); any other name
/// fails the load with "unknown pre-tokenizer type".
pub const PRE_TOKENIZERS: &[&str] = &[
    "default",
    "minicpm5",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "spark2_5",
    "youtu",
    "falcon",
    "mpt",
    "starcoder",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "jais-2",
    "gemma4",
    "granite-embed-multi-311m",
    "sarvam-moe",
    "jina-v1-en",
    "jina-v2-code",
    "roberta-bpe",
    "whitespace",
    "refact",
    "command-r",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "qwen35",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "viking",
    "jais",
    "tekken",
    "smollm",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "exaone4",
    "exaone-moe",
    "chameleon",
    "minerva-7b",
    "megrez",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "granite-embed-multi-97m",
    "tiny_aya",
    "cohere2moe",
    "superbpe",
    "trillion",
    "granite-docling",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "seed-coder",
    "hunyuan",
    "hunyuan-dense",
    "hy_v4",
    "joyai-llm",
    "kimi-k2",
    "ufakzeka",
    "grok-2",
    "afmoe",
    "laguna",
    "minimax-m2",
    "solar-open",
    "mellum2",
];

/// Which tokenizer family llama.cpp runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Gpt2,
    /// SentencePiece-style BPE with byte fallback (`"llama"`).
    Llama,
}

impl VocabKind {
    pub fn model_name(self) -> &'static str {
        match self {
            VocabKind::Gpt2 => "gpt2",
            VocabKind::Llama => "llama",
        }
    }
}

/// The tokenizer metadata of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufVocab {
    pub kind: VocabKind,
    /// `tokenizer.ggml.pre` (gpt2 only).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores` (llama only).
    pub scores: Option<Vec<f32>>,
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    pub unk: u32,
    pub pad: u32,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
    /// How the special ids were found, for the stage log.
    pub notes: Vec<String>,
}

/// The llama.cpp pre-tokenizer name for a byte-level tokenizer.json, when its pre-tokenizer is
/// one whose split regex burnish recognises: GPT-2's `ByteLevel` with its own regex → `gpt-2`;
/// `Digits` + `ByteLevel` (SmolLM) → `smollm`; a `Split` on Llama 3's regex → `llama-bpe`, on
/// Qwen2's → `qwen2`.
pub fn detect_pre(tokenizer_json: &Value) -> Option<&'static str> {
    let pre = tokenizer_json.get("pre_tokenizer")?;
    let ty = pre.get("type").and_then(Value::as_str)?;
    let byte_level_regex = |p: &Value| p.get("use_regex").and_then(Value::as_bool).unwrap_or(true);
    match ty {
        "ByteLevel" if byte_level_regex(pre) => Some("gpt-2"),
        "Sequence" => {
            let items = pre.get("pretokenizers").and_then(Value::as_array)?;
            let types: Vec<&str> = items
                .iter()
                .filter_map(|p| p.get("type").and_then(Value::as_str))
                .collect();
            match types.as_slice() {
                ["Digits", "ByteLevel"]
                    if items[0].get("individual_digits").and_then(Value::as_bool) == Some(true)
                        && byte_level_regex(&items[1]) =>
                {
                    Some("smollm")
                }
                ["ByteLevel"] if byte_level_regex(&items[0]) => Some("gpt-2"),
                ["Split", "ByteLevel"] if !byte_level_regex(&items[1]) => {
                    let regex = items[0]
                        .get("pattern")
                        .and_then(|p| p.get("Regex"))
                        .and_then(Value::as_str)?;
                    if regex == LLAMA3_REGEX {
                        Some("llama-bpe")
                    } else if regex == QWEN2_REGEX {
                        Some("qwen2")
                    } else {
                        None
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Llama 3's split regex as its tokenizer.json spells it.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex as its tokenizer.json spells it (and `tokenizer.train` writes it).
const QWEN2_REGEX: &str = crate::text::train_tokenizer::QWEN2_SPLIT_REGEX;

/// The converter's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// A config.json `*_token_id` (a number, or a list whose first entry is taken).
fn config_id(config: &Value, key: &str) -> Option<u32> {
    match config.get(key)? {
        Value::Number(n) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
        Value::Array(items) => items
            .first()
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok()),
        _ => None,
    }
}

/// Build the GGUF vocabulary for a model with `n_vocab` embedding rows.
///
/// `tokenizer_json` is the parsed `tokenizer.json` of `tok`'s directory, `config` the model's
/// `config.json`; `pre` overrides the detected pre-tokenizer name; `chat_template` is written as
/// `tokenizer.chat_template`.
pub fn build(
    tok: &TextTokenizer,
    tokenizer_json: &Value,
    config: &Value,
    n_vocab: usize,
    pre: Option<&str>,
    chat_template: Option<String>,
) -> Result<GgufVocab, ExportError> {
    let path = tok.dir().join(crate::text::tokenizer::TOKENIZER_FILE);
    let bad = |message: String, help: Option<String>| ExportError::Tokenizer {
        path: path.display().to_string(),
        message,
        help,
    };
    let model = tokenizer_json
        .get("model")
        .ok_or_else(|| bad("no `model` object".into(), None))?;
    let model_type = model.get("type").and_then(Value::as_str).unwrap_or("");
    if model_type != "BPE" {
        return Err(bad(
            format!("tokenizer model `{model_type}` cannot be exported to GGUF (only BPE)"),
            Some("byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) and byte-fallback BPE (Llama 2, TinyLlama) tokenizers are supported".into()),
        ));
    }
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let kind = if byte_fallback {
        VocabKind::Llama
    } else {
        VocabKind::Gpt2
    };

    let vocab = tok.inner().get_vocab(true);
    if let Some((t, &id)) = vocab.iter().find(|(_, id)| **id as usize >= n_vocab) {
        return Err(bad(
            format!("token `{t}` has id {id}, but the model's embedding has only {n_vocab} rows"),
            Some("the tokenizer and the checkpoint do not belong together".into()),
        ));
    }
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    for (t, &id) in &vocab {
        tokens[id as usize] = Some(t.clone());
    }

    // Added tokens: id → special?
    let mut added: HashMap<u32, bool> = HashMap::new();
    if let Some(items) = tokenizer_json.get("added_tokens").and_then(Value::as_array) {
        for item in items {
            if let Some(id) = item.get("id").and_then(Value::as_u64) {
                let special = item
                    .get("special")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                added.insert(id as u32, special);
            }
        }
    }

    let mut out_tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for (id, t) in tokens.into_iter().enumerate() {
        let Some(t) = t else {
            out_tokens.push(format!("[PAD{id}]"));
            types.push(token_type::UNUSED);
            continue;
        };
        let ty = match (kind, added.get(&(id as u32))) {
            (_, Some(true)) => token_type::CONTROL,
            (VocabKind::Gpt2, Some(false)) if looks_special(&t) => token_type::CONTROL,
            (VocabKind::Gpt2, Some(false)) => token_type::USER_DEFINED,
            (VocabKind::Llama, Some(false)) => token_type::USER_DEFINED,
            (VocabKind::Llama, None) if is_byte_token(&t) => token_type::BYTE,
            _ => token_type::NORMAL,
        };
        out_tokens.push(t);
        types.push(ty);
    }

    let merges = match model.get("merges").and_then(Value::as_array) {
        Some(items) => {
            let mut merges = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                match m {
                    Value::String(s) => merges.push(s.clone()),
                    Value::Array(pair) if pair.len() == 2 => {
                        let part = |v: &Value| {
                            v.as_str()
                                .map(|s| s.replace(' ', "\u{120}"))
                                .ok_or_else(|| {
                                    bad(format!("merge {i} is not a pair of strings"), None)
                                })
                        };
                        merges.push(format!("{} {}", part(&pair[0])?, part(&pair[1])?));
                    }
                    _ => {
                        return Err(bad(
                            format!("merge {i} is neither \"a b\" nor [\"a\", \"b\"]"),
                            None,
                        ));
                    }
                }
            }
            merges
        }
        None => Vec::new(),
    };
    if kind == VocabKind::Gpt2 && merges.is_empty() {
        return Err(bad(
            "a byte-level BPE tokenizer without merges".into(),
            Some("llama.cpp requires tokenizer.ggml.merges for gpt2 tokenizers".into()),
        ));
    }

    let scores = match kind {
        VocabKind::Gpt2 => None,
        VocabKind::Llama => {
            // Score = −(rank of the merge that makes the token); base tokens 0.
            let mut rank: HashMap<String, usize> = HashMap::new();
            for (i, m) in merges.iter().enumerate() {
                if let Some((a, b)) = m.split_once(' ') {
                    rank.entry(format!("{a}{b}")).or_insert(i + 1);
                }
            }
            Some(
                out_tokens
                    .iter()
                    .zip(&types)
                    .map(|(t, &ty)| match ty {
                        token_type::NORMAL => -(rank.get(t).copied().unwrap_or(0) as f32),
                        _ => 0.0,
                    })
                    .collect(),
            )
        }
    };

    let pre = match kind {
        VocabKind::Llama => None,
        VocabKind::Gpt2 => match pre {
            Some(p) => Some(p.to_owned()),
            None => match detect_pre(tokenizer_json) {
                Some(p) => Some(p.to_owned()),
                None => {
                    return Err(bad(
                        format!(
                            "cannot tell which llama.cpp pre-tokenizer matches this tokenizer's pre_tokenizer {}",
                            tokenizer_json
                                .get("pre_tokenizer")
                                .map(|v| v.to_string())
                                .unwrap_or_else(|| "null".into())
                        ),
                        Some("set `pre_tokenizer:` on the export stage (e.g. `gpt-2`, `llama-bpe`, `qwen2`, `smollm`; `default` accepts llama.cpp's degraded default)".into()),
                    ));
                }
            },
        },
    };

    // Special ids: the tokenizer's, else config.json's `*_token_id`, else a fallback (noted).
    let mut notes = Vec::new();
    let from_config = |key: &str| config_id(config, key).filter(|&id| (id as usize) < n_vocab);
    let mut pick = |name: &str, from_tok: Option<u32>, key: &str, fallback: (&str, u32)| {
        if let Some(id) = from_tok {
            id
        } else if let Some(id) = from_config(key) {
            notes.push(format!("{name} token id {id} from config.json `{key}`"));
            id
        } else {
            notes.push(format!(
                "{name} token id {}: none set, using {}",
                fallback.1, fallback.0
            ));
            fallback.1
        }
    };
    let bos_tok = tok.bos().map(|b| b.1);
    let eos = pick(
        "eos",
        tok.eos().map(|e| e.1),
        "eos_token_id",
        ("the bos token (else 0)", bos_tok.unwrap_or(0)),
    );
    let bos = pick("bos", bos_tok, "bos_token_id", ("eos", eos));
    let pad = pick("padding", tok.pad_id(), "pad_token_id", ("eos", eos));
    let unk = pick(
        "unknown",
        tok.unk().map(|u| u.1),
        "unk_token_id",
        ("eos", eos),
    );

    Ok(GgufVocab {
        kind,
        pre,
        tokens: out_tokens,
        token_types: types,
        scores,
        merges,
        bos,
        eos,
        unk,
        pad,
        add_bos: tok.add_bos(),
        add_eos: tok.add_eos(),
        chat_template,
        notes,
    })
}

impl GgufVocab {
    /// Put the `tokenizer.*` keys on `w`.
    pub fn write(&self, w: &mut GgufWriter) {
        w.set(
            "tokenizer.ggml.model",
            MetaValue::String(self.kind.model_name().into()),
        );
        if let Some(pre) = &self.pre {
            w.set("tokenizer.ggml.pre", MetaValue::String(pre.clone()));
        }
        w.set(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::String(self.tokens.clone())),
        );
        if let Some(scores) = &self.scores {
            w.set(
                "tokenizer.ggml.scores",
                MetaValue::Array(MetaArray::F32(scores.clone())),
            );
        }
        w.set(
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray::I32(self.token_types.clone())),
        );
        if !self.merges.is_empty() {
            w.set(
                "tokenizer.ggml.merges",
                MetaValue::Array(MetaArray::String(self.merges.clone())),
            );
        }
        w.set("tokenizer.ggml.bos_token_id", MetaValue::U32(self.bos));
        w.set("tokenizer.ggml.eos_token_id", MetaValue::U32(self.eos));
        w.set("tokenizer.ggml.unknown_token_id", MetaValue::U32(self.unk));
        w.set("tokenizer.ggml.padding_token_id", MetaValue::U32(self.pad));
        w.set(
            "tokenizer.ggml.add_bos_token",
            MetaValue::Bool(self.add_bos),
        );
        w.set(
            "tokenizer.ggml.add_eos_token",
            MetaValue::Bool(self.add_eos),
        );
        if let Some(t) = &self.chat_template {
            w.set("tokenizer.chat_template", MetaValue::String(t.clone()));
        }
    }

    /// The text of token `id`, if it has one.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
}
