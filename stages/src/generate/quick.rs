//! `burnish generate MODEL_DIR --prompt TEXT`: a quick look at what any model directory (a
//! checkpoint, a stage's Model or Adapter output) writes for a prompt, outside any pipeline.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{
    Completion, DecodeOptions, DecodeTask, Finish, GenerateError, Request, Sampling, Stops, eos_ids,
};
use crate::backend::dispatch;
use crate::data::records::Message;
use crate::model::ModelConfig;
use crate::text::{ChatTemplate, TemplateChoice, TextTokenizer};
use crate::train::tokenizer_dir;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Quick {
    pub prompt: String,
    /// Render the prompt as one user turn with this template (and its generation prompt);
    /// `None` continues the raw text.
    pub chat_template: Option<TemplateChoice>,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Completions to draw.
    pub n: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    pub backend: String,
}

/// One completion, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct QuickCompletion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: Finish,
}

/// Generate `q.n` completions of `q.prompt` from the model in `dir`.
pub fn run(dir: &Path, q: &Quick) -> Result<Vec<QuickCompletion>, GenerateError> {
    if let Some((field, message)) = q.sampling.problems().into_iter().next() {
        return Err(GenerateError::Sampling { field, message });
    }
    let tok_dir: PathBuf = tokenizer_dir(dir);
    let tok = TextTokenizer::from_dir(&tok_dir)?;
    let (cfg, _) = ModelConfig::read(&tok_dir.join("config.json"))?;
    let text = match q.chat_template {
        Some(choice) => {
            let template = ChatTemplate::resolve(choice, &tok)?;
            template.render(&[Message::user(q.prompt.clone())], true, &tok)?
        }
        None => q.prompt.clone(),
    };
    let mut ids = Vec::new();
    if q.chat_template.is_none()
        && tok.add_bos()
        && let Some((_, bos)) = tok.bos()
    {
        ids.push(bos);
    }
    ids.extend(tok.encode(&text)?);
    if ids.is_empty() {
        return Err(GenerateError::EmptyPrompt { record: 1 });
    }
    if ids.len() + q.max_new_tokens > cfg.max_positions {
        return Err(GenerateError::TooLong {
            record: 1,
            tokens: ids.len(),
            max_new: q.max_new_tokens,
            positions: cfg.max_positions,
        });
    }
    let requests: Vec<Request> = (0..q.n.max(1))
        .map(|s| Request {
            prompt: ids.clone(),
            prompt_index: 0,
            sample_index: s,
        })
        .collect();
    let eos = eos_ids(&tok_dir, &tok);
    let opts = DecodeOptions {
        sampling: q.sampling.clone(),
        max_new_tokens: q.max_new_tokens,
        pad: tok.pad_id().or(eos.first().copied()).unwrap_or(0),
        eos: eos.clone(),
        seed: q.seed,
        batch_size: requests.len(),
    };
    let stops = Stops {
        strings: &q.stop,
        tok: &tok,
    };
    let task = DecodeTask {
        dir: dir.to_path_buf(),
        requests: &requests,
        opts: &opts,
        stop: &|t| stops.hit(t),
        progress: &mut |_, _| true,
    };
    let done: Vec<Completion> = dispatch(&q.backend, task)??;
    done.into_iter()
        .map(|c| {
            Ok(QuickCompletion {
                text: stops.text(&c, &eos)?,
                finish_reason: c.finish,
                token_ids: c.tokens,
            })
        })
        .collect()
}
