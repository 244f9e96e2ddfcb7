//! Preference and labeled records → tokenized items, and completion log-probs.
//!
//! A completion's log-prob is the SUM of its target tokens' log-probabilities, with the token
//! count kept beside it so per-token means (IPO, ORPO) can be formed. The targets are the
//! completion's own assistant turns only: assistant turns inside the prompt (a multi-turn
//! conversation) are context, as in TRL, which tokenizes the prompt and the completion apart
//! and scores the completion alone.
//!
//! Conventions that differ from TRL's tokenization, kept on purpose:
//! - a completion's targets are its content and its end-of-turn token (SFT's mask), and stop
//!   there: TRL also scores the template's newline after the end-of-turn token;
//! - a bos token is put first when the tokenizer asks for one and the template does not emit it
//!   (transformers' `apply_chat_template` never adds it); the fixture tokenizers have none.
//!
//! KTO's mismatched companions ([`encode_labeled`]) pair each prompt with the completion of the
//! next record, in dataset order, whose prompt differs: TRL rotates the completions by one
//! within each batch, which pairs a prompt with its own other answer whenever the data holds
//! both answers of a pair next to each other (as `data.convert to: kto` writes them) and biases
//! the KL estimate low. The pairing depends on the data alone, so reference log-probs for it can
//! be cached.

use burn::tensor::ElementConversion;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::data::records::{LabeledRecord, Message, PreferenceRecord};
use crate::model::CausalLm;
use crate::text::{ChatTemplate, Example, TextError, TextTokenizer, encode_chat_from};
use crate::train::batch::make_batch;

/// A completion's log-prob: sum over its target tokens, and how many there are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogProb {
    pub sum: f64,
    pub tokens: usize,
}

impl LogProb {
    pub fn mean(&self) -> f64 {
        self.sum / self.tokens.max(1) as f64
    }
}

/// A preference pair, tokenized; `reference` filled from the cached artifact or computed.
#[derive(Clone, Debug)]
pub struct PairItem {
    /// Index of the record in the dataset.
    pub index: usize,
    pub chosen: Example,
    pub rejected: Example,
    pub reference: Option<(LogProb, LogProb)>,
}

/// A labeled (KTO) example with its mismatched companion: its prompt followed by the completion
/// of the next record (dataset order, wrapping) whose prompt differs.
#[derive(Clone, Debug)]
pub struct LabeledItem {
    pub index: usize,
    pub example: Example,
    pub mismatched: Example,
    pub desirable: bool,
    pub reference: Option<(LogProb, LogProb)>,
}

/// `prompt ++ completion` rendered with the template; targets on the completion's assistant
/// turns only (not on assistant turns inside the prompt); cut to `seq_len`. `None` when no
/// target survives the cut.
pub fn encode_completion(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    prompt: &[Message],
    completion: &[Message],
    seq_len: usize,
) -> Result<Option<Example>, TextError> {
    let mut messages = prompt.to_vec();
    messages.extend_from_slice(completion);
    let mut ex = encode_chat_from(tok, template, &messages, false, prompt.len())?;
    if ex.ids.len() > seq_len {
        ex.ids.truncate(seq_len);
        ex.targets.truncate(seq_len);
    }
    Ok((ex.target_count() > 0).then_some(ex))
}

/// Encoded items and how many records were dropped because truncation left no target.
pub struct EncodedItems<T> {
    pub items: Vec<T>,
    pub dropped: usize,
    pub tokens: usize,
    /// KTO: examples whose companion shares their prompt because every record has that prompt.
    pub same_prompt: usize,
}

pub fn encode_pairs(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    records: &[PreferenceRecord],
    seq_len: usize,
) -> Result<EncodedItems<PairItem>, TextError> {
    let mut items = Vec::with_capacity(records.len());
    let mut dropped = 0;
    let mut tokens = 0;
    for (index, r) in records.iter().enumerate() {
        let c = encode_completion(tok, template, &r.prompt, &r.chosen, seq_len)
            .map_err(|e| e.in_record(index + 1))?;
        let j = encode_completion(tok, template, &r.prompt, &r.rejected, seq_len)
            .map_err(|e| e.in_record(index + 1))?;
        match (c, j) {
            (Some(chosen), Some(rejected)) => {
                tokens += chosen.ids.len() + rejected.ids.len();
                items.push(PairItem {
                    index,
                    chosen,
                    rejected,
                    reference: None,
                });
            }
            _ => dropped += 1,
        }
    }
    Ok(EncodedItems {
        items,
        dropped,
        tokens,
        same_prompt: 0,
    })
}

pub fn encode_labeled(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    records: &[LabeledRecord],
    seq_len: usize,
) -> Result<EncodedItems<LabeledItem>, TextError> {
    let n = records.len();
    let mut items = Vec::with_capacity(n);
    let mut dropped = 0;
    let mut tokens = 0;
    let mut same_prompt = 0;
    let companions = mismatched_indices(records);
    for (index, r) in records.iter().enumerate() {
        let j = companions[index];
        same_prompt += usize::from(records[j].prompt == r.prompt);
        let next = &records[j];
        let e = encode_completion(tok, template, &r.prompt, &r.completion, seq_len)
            .map_err(|e| e.in_record(index + 1))?;
        let m = encode_completion(tok, template, &r.prompt, &next.completion, seq_len)
            .map_err(|e| e.in_record(index + 1))?;
        match (e, m) {
            (Some(example), Some(mismatched)) => {
                tokens += example.ids.len() + mismatched.ids.len();
                items.push(LabeledItem {
                    index,
                    example,
                    mismatched,
                    desirable: r.label,
                    reference: None,
                });
            }
            _ => dropped += 1,
        }
    }
    Ok(EncodedItems {
        items,
        dropped,
        tokens,
        same_prompt,
    })
}

/// For each record, the record whose completion is its mismatched companion: the next one in
/// dataset order (wrapping) with a different prompt; the next one when every record has the
/// same prompt.
///
/// One backward pass over the records taken twice around, so a long run of one prompt costs
/// no more than a short one: the first record after `k` whose prompt differs from `k`'s is
/// `k + 1` when their prompts differ, else the one found for `k + 1`.
pub fn mismatched_indices(records: &[LabeledRecord]) -> Vec<usize> {
    let n = records.len();
    let prompt = |k: usize| &records[k % n].prompt;
    // next[k], k < 2n: the first k' in (k, 2n) whose prompt differs from k's.
    let mut next: Vec<Option<usize>> = vec![None; 2 * n];
    for k in (0..(2 * n).saturating_sub(1)).rev() {
        next[k] = if prompt(k + 1) != prompt(k) {
            Some(k + 1)
        } else {
            next[k + 1]
        };
    }
    (0..n)
        .map(|i| match next[i] {
            Some(j) if j < i + n => j % n,
            _ => (i + 1) % n,
        })
        .collect()
}

/// Per-sequence completion log-probs as tensors (differentiable when `model` is).
///
/// # Shapes
/// - output: (`sum [n]`, `tokens [n]`)
pub fn sequence_logps<B: Backend>(
    model: &CausalLm<B>,
    examples: &[&Example],
    pad: u32,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let device = model.model.embed_tokens.weight.val().device();
    let batch = make_batch::<B>(examples, pad, &device);
    let n = examples.len();
    let (nll, w) = model.token_nll(batch.ids, batch.targets); // [n, t-1]
    let sum = (nll * w.clone()).sum_dim(1).reshape([n]).neg();
    let count = w.sum_dim(1).reshape([n]);
    (sum, count)
}

/// Completion log-probs of `examples` under `model`, `batch` at a time, as plain numbers.
pub fn logprobs<B: Backend>(
    model: &CausalLm<B>,
    examples: &[&Example],
    batch: usize,
    pad: u32,
) -> Vec<LogProb> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch.max(1)) {
        let (sum, count) = sequence_logps(model, chunk, pad);
        let sums = floats(sum);
        let counts = floats(count);
        for (s, c) in sums.into_iter().zip(counts) {
            out.push(LogProb {
                sum: s,
                tokens: c.round() as usize,
            });
        }
    }
    out
}

/// A 1-D tensor's values as f64.
pub fn floats<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    let data = t.into_data();
    match data.to_vec::<f32>() {
        Ok(v) => v.into_iter().map(f64::from).collect(),
        Err(_) => data
            .iter::<f32>()
            .map(|x| f64::from(x.elem::<f32>()))
            .collect(),
    }
}
