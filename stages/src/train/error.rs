//! What goes wrong in trainers and the stages around them.

use std::path::Path;

use miette::Diagnostic;
use thiserror::Error;

use crate::model::ModelError;
use crate::text::TextError;

#[derive(Debug, Error, Diagnostic)]
pub enum TrainError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Text(#[from] TextError),

    /// A reward of an RL objective's rollout failed (a `command` reward's program).
    #[error(transparent)]
    #[diagnostic(transparent)]
    Reward(#[from] crate::rl::RewardError),

    #[error("cannot write {path}: {message}")]
    #[diagnostic(code(burnish::train::io))]
    Io { path: String, message: String },

    #[error("checkpoint {path} is unreadable: {message}")]
    #[diagnostic(
        code(burnish::train::checkpoint),
        help("delete the stage's scratch directory to start the stage over")
    )]
    Checkpoint { path: String, message: String },

    #[error("loss is {value} at step {step}{}", last_finite(*.last))]
    #[diagnostic(
        code(burnish::train::non_finite),
        help("lower `lr`, set `max_grad_norm`, or check the data for empty or huge examples")
    )]
    NonFinite {
        step: usize,
        value: f64,
        /// The last logged step and its (finite) loss.
        last: Option<(usize, f64)>,
    },

    #[error("no training examples left after tokenization")]
    #[diagnostic(
        code(burnish::train::no_data),
        help("every record was empty or lost all its targets to `seq_len` truncation")
    )]
    NoData,

    #[error("cancelled at step {step}; a checkpoint was written and a rerun resumes there")]
    #[diagnostic(code(burnish::train::cancelled))]
    Cancelled { step: usize },

    #[error("{message}")]
    #[diagnostic(code(burnish::train::input))]
    Input { message: String },

    #[error("backend `{backend}` is not available: {message}")]
    #[diagnostic(
        code(burnish::train::backend),
        help("use `--backend cpu`, or build burnish with the `{backend}` feature")
    )]
    Backend { backend: String, message: String },

    #[error("`dtype: bf16` cannot run on the `{backend}` backend: its shader compiler has no bf16")]
    #[diagnostic(
        code(burnish::train::bf16_unsupported),
        help(
            "use `dtype: auto` (bf16 on cuda, f32 elsewhere) or `dtype: f32`, or `--backend cuda` or `cpu`"
        )
    )]
    Bf16Unsupported { backend: String },
}

impl TrainError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

fn last_finite(last: Option<(usize, f64)>) -> String {
    match last {
        Some((step, loss)) => format!(" (the last finite loss was {loss:.6} at step {step})"),
        None => " (the first step)".into(),
    }
}
