//! What goes wrong loading, training and saving models, with the file, tensor and numbers.

use std::path::Path;

use miette::Diagnostic;
use thiserror::Error;

#[derive(Debug, Error, Diagnostic)]
pub enum ModelError {
    #[error("cannot read {file}: {message}")]
    #[diagnostic(code(burnish::model::io))]
    Io { file: String, message: String },

    #[error("{file}: {message}")]
    #[diagnostic(
        code(burnish::model::config),
        help("config.json must describe a llama, mistral or qwen2 decoder")
    )]
    Config { file: String, message: String },

    #[error("{dir} is not a model directory: {message}")]
    #[diagnostic(
        code(burnish::model::layout),
        help(
            "a model directory holds config.json, model.safetensors (or model.safetensors.index.json with its shards) and tokenizer.json"
        )
    )]
    Layout { dir: String, message: String },

    #[error("{file}: {message}")]
    #[diagnostic(code(burnish::model::safetensors))]
    Safetensors { file: String, message: String },

    #[error("{file}: tensor `{name}` is missing")]
    #[diagnostic(
        code(burnish::model::missing_tensor),
        help("the checkpoint's config.json and its weights disagree")
    )]
    MissingTensor { file: String, name: String },

    #[error("{file}: tensor `{name}` has shape {found:?}, config.json implies {expected:?}")]
    #[diagnostic(code(burnish::model::shape))]
    Shape {
        file: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{file}: tensor `{name}` has dtype {dtype}, which is not supported")]
    #[diagnostic(
        code(burnish::model::dtype),
        help("supported weight dtypes: F32, F16, BF16")
    )]
    Dtype {
        file: String,
        name: String,
        dtype: String,
    },

    #[error("{file}: unexpected tensor `{name}`")]
    #[diagnostic(
        code(burnish::model::unexpected_tensor),
        help("the weights hold a tensor this architecture has no place for")
    )]
    Unexpected { file: String, name: String },

    #[error("{message}")]
    #[diagnostic(code(burnish::model::adapter))]
    Adapter { message: String },

    #[error("{message}")]
    #[diagnostic(code(burnish::model::backend))]
    Backend { message: String },
}

impl ModelError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        ModelError::Io {
            file: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
