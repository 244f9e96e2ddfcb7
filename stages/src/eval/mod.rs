//! Evaluation: what a model is worth on a dataset.
//!
//! - [`stage`]: the `eval` stage — perplexity and token accuracy with training's masking, and
//!   generation metrics on a prompts dataset.
//! - [`generation`]: those metrics (`exact_match`, `pass@k`, `mean_reward`), computed from
//!   completions sampled through [`crate::generate`] and scored by [`crate::rl::rewards`].

pub mod generation;
pub mod stage;

pub use stage::{EvalMetric, EvalParams, EvalStage};

/// Register `eval`.
pub fn register_eval(reg: &mut burnish_engine::stage::Registry) {
    reg.register::<EvalStage>();
}
