//! Exporters: models out of burnish, for the tools that run them.
//!
//! - [`gguf`]: the GGUF container (reader, writer) and the GGML quantizers.
//! - [`llama`]: a Llama/Qwen2 model → GGUF, named, laid out and quantized as llama.cpp's
//!   converter and `llama-quantize` do (its module doc is the conversion's design).
//! - [`stream`]: a checkpoint on disk → a GGUF file tensor by tensor (what `export.gguf` runs;
//!   memory for a band of rows, not for the model).
//! - [`vocab`]: the tokenizer as `tokenizer.ggml.*` metadata.
//! - [`ollama`]: the `Modelfile` beside a GGUF file.
//! - [`hf`]: Hugging Face model and PEFT adapter directories.
//! - [`stages`]: the `export.gguf` and `export.hf` stage kinds.

pub mod gguf;
pub mod hf;
pub mod llama;
pub mod ollama;
pub mod stages;
pub mod stream;
pub mod vocab;

use std::path::Path;

use burnish_engine::stage::Registry;
use miette::Diagnostic;
use thiserror::Error;

use crate::model::ModelError;
use crate::text::TextError;

pub use llama::Quant;
pub use stages::{GgufParams, GgufStage, HfParams, HfStage};

/// Register the export stage kinds (`export.gguf`, `export.hf`).
pub fn register_export(reg: &mut Registry) {
    reg.register::<GgufStage>();
    reg.register::<HfStage>();
}

/// What goes wrong exporting a model.
#[derive(Debug, Error, Diagnostic)]
pub enum ExportError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Text(#[from] TextError),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Gguf(#[from] gguf::GgufError),

    #[error("{path}: {message}")]
    #[diagnostic(code(burnish::export::tokenizer))]
    Tokenizer {
        path: String,
        message: String,
        #[help]
        help: Option<String>,
    },

    #[error("{message}")]
    #[diagnostic(code(burnish::export::convert))]
    Convert { message: String },

    #[error("cancelled after {done} of {total} tensors; the unfinished file was removed")]
    #[diagnostic(code(burnish::export::cancelled))]
    Cancelled { done: usize, total: usize },

    #[error("cannot write {path}: {message}")]
    #[diagnostic(code(burnish::export::io))]
    Io { path: String, message: String },
}

impl ExportError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        ExportError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
