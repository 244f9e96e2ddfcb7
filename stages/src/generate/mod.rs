//! Generation: sampling completions from a model.
//!
//! - [`sampler`]: the next token from a row of logits (greedy, or temperature / top-k / top-p /
//!   min-p sampling after the repetition penalty, transformers' order), each sample on its own
//!   seeded random stream.
//! - [`decode`]: the batched loop over the model's KV-cached [`prefill`] and [`decode`] steps,
//!   stopping rows on end-of-sequence ids, stop strings or the token budget.
//! - [`stage`]: the `generate` stage (prompts dataset in, one record per sample out).
//! - [`quick`]: `burnish generate MODEL_DIR --prompt TEXT`.
//!
//! What both share lives here: the model directory's end-of-sequence ids ([`eos_ids`]), stop
//! strings ([`Stops`]) and the backend task that loads a model and decodes ([`DecodeTask`]).
//!
//! [`prefill`]: crate::model::CausalLm::prefill
//! [`decode`]: crate::model::CausalLm::decode

pub mod decode;
pub mod quick;
pub mod sampler;
pub mod stage;

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burnish_engine::stage::Registry;
use miette::Diagnostic;
use serde_json::Value;
use thiserror::Error;

pub use decode::{Completion, DecodeOptions, Finish, Request, generate};
pub use sampler::Sampling;
pub use stage::{GenerateParams, GenerateStage};

use crate::backend::BackendTask;
use crate::model::{self, ModelError};
use crate::text::{TextError, TextTokenizer};

pub fn register_generate(reg: &mut Registry) {
    reg.register::<GenerateStage>();
}

/// What goes wrong generating.
#[derive(Debug, Error, Diagnostic)]
pub enum GenerateError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Text(#[from] TextError),

    /// The backend is not in this build.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Backend(#[from] crate::train::TrainError),

    #[error("record {record}: the prompt is empty")]
    #[diagnostic(
        code(burnish::generate::empty_prompt),
        help("a prompt needs at least one token; drop empty records with data.filter")
    )]
    EmptyPrompt { record: usize },

    #[error(
        "record {record}: the prompt has {tokens} tokens, and with max_new_tokens {max_new} that passes the model's {positions} positions"
    )]
    #[diagnostic(
        code(burnish::generate::too_long),
        help("lower max_new_tokens, or drop long prompts with data.filter")
    )]
    TooLong {
        record: usize,
        tokens: usize,
        max_new: usize,
        positions: usize,
    },

    #[error("record {record} has no prompt: {message}")]
    #[diagnostic(code(burnish::generate::no_prompt))]
    NoPrompt { record: usize, message: String },

    #[error("{field}: {message}")]
    #[diagnostic(code(burnish::generate::sampling))]
    Sampling {
        field: &'static str,
        message: String,
    },

    #[error("cancelled after {done} of {total} completions; nothing was kept")]
    #[diagnostic(code(burnish::generate::cancelled))]
    Cancelled { done: usize, total: usize },
}

/// The ids that end a completion for the model in `dir`: `eos_token_id` of
/// `generation_config.json` (an id or a list), else of `config.json`, and the tokenizer's EOS.
pub fn eos_ids(dir: &Path, tok: &TextTokenizer) -> Vec<u32> {
    let mut out = Vec::new();
    for file in ["generation_config.json", "config.json"] {
        let value = std::fs::read(dir.join(file))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        match value.as_ref().and_then(|v| v.get("eos_token_id")) {
            Some(Value::Number(n)) => out.extend(n.as_u64().map(|n| n as u32)),
            Some(Value::Array(ids)) => {
                out.extend(ids.iter().filter_map(|v| v.as_u64()).map(|n| n as u32))
            }
            _ => continue,
        }
        break;
    }
    out.extend(tok.eos().map(|(_, id)| id));
    out.sort_unstable();
    out.dedup();
    out
}

/// Stop strings: a completion ends once its text contains one, and its returned text ends
/// before it (OpenAI's and vLLM's `stop`; the token ids keep everything generated).
pub struct Stops<'a> {
    pub strings: &'a [String],
    pub tok: &'a TextTokenizer,
}

impl Stops<'_> {
    /// Whether `tokens` decode to text containing a stop string.
    pub fn hit(&self, tokens: &[u32]) -> bool {
        !self.strings.is_empty()
            && self
                .tok
                .decode(tokens)
                .is_ok_and(|t| self.strings.iter().any(|s| t.contains(s.as_str())))
    }

    /// The text of a completion: its tokens without a final end-of-sequence id, cut before the
    /// first stop string.
    pub fn text(&self, c: &Completion, eos: &[u32]) -> Result<String, TextError> {
        let ids = match c.tokens.split_last() {
            Some((last, rest)) if eos.contains(last) => rest,
            _ => &c.tokens[..],
        };
        let mut text = self.tok.decode(ids)?;
        let cut = self
            .strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min();
        if let Some(at) = cut {
            text.truncate(at);
        }
        Ok(text)
    }
}

/// Load the Model or Adapter in `dir` on a backend and decode `requests` (see [`generate`]).
pub struct DecodeTask<'a> {
    pub dir: PathBuf,
    pub requests: &'a [Request],
    pub opts: &'a DecodeOptions,
    pub stop: &'a dyn Fn(&[u32]) -> bool,
    pub progress: decode::Progress<'a>,
}

impl BackendTask for DecodeTask<'_> {
    type Output = Result<Vec<Completion>, ModelError>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let loaded = model::load::<B>(&self.dir, &device)?;
        let net = loaded.model.valid();
        Ok(generate(
            &net,
            self.requests,
            self.opts,
            self.stop,
            self.progress,
        ))
    }
}
