//! The batched decoding loop: prompts in, completions out.
//!
//! Requests are decoded `batch_size` at a time, in order. A batch's prompts are left-padded to
//! its longest, prefilled once into a KV cache sized for the prompt plus `max_new_tokens`
//! ([`CausalLm::prefill`]), then every step feeds each unfinished row its chosen token
//! ([`CausalLm::decode`]). A row finishes on an end-of-sequence id (kept as its last token), on
//! a stop condition the caller tests on its tokens (a stop string), or at `max_new_tokens`;
//! finished rows are fed the pad id until the batch ends, and their logits are not read.
//!
//! Each row chooses from its own logits with its own random stream ([`super::sampler`]), and
//! its logits do not depend on the other rows (padding is masked out of attention, every
//! product is per row), so a completion is the same whatever batch it is decoded in.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::sampler::{self, Sampling};
use crate::model::CausalLm;

/// One completion to produce.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// The prompt's index in its dataset and the sample's index among the prompt's `n`: they
    /// pick the random stream.
    pub prompt_index: usize,
    pub sample_index: usize,
}

/// What decoding needs besides the model and the requests.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Ids that end a completion (the tokenizer's EOS, the template's end of turn).
    pub eos: Vec<u32>,
    /// Fed to left-pad prompts and to finished rows.
    pub pad: u32,
    pub seed: u64,
    /// Rows decoded together.
    pub batch_size: usize,
}

/// Why a completion ended (the `finish_reason` of OpenAI-style APIs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// A finished completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The new tokens, the end-of-sequence id included when one ended it.
    pub tokens: Vec<u32>,
    /// Σ log p(token) under the model (its logits before any penalty or warping).
    pub logprob: f64,
    pub finish: Finish,
}

/// Progress after each batch: requests done, new tokens so far; `false` stops decoding there
/// (a cancellation).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

/// Decode every request (see the module doc), or those before a cancellation. `stop(tokens)`
/// says whether a row's new tokens so far end with a stop condition.
///
/// # Panics
/// When a prompt is empty or a token is outside the vocabulary.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    requests: &[Request],
    opts: &DecodeOptions,
    stop: &dyn Fn(&[u32]) -> bool,
    progress: Progress,
) -> Vec<Completion> {
    // Batches of more than one row multiply a few rows by every weight at each step: keep the
    // weights transposed for that while decoding (a second copy of them, see
    // `CausalLm::for_batched_decoding`).
    let batched;
    let model = if opts.batch_size > 1 && requests.len() > 1 {
        batched = model.for_batched_decoding();
        &batched
    } else {
        model
    };
    let mut out = Vec::with_capacity(requests.len());
    let mut tokens = 0;
    for batch in requests.chunks(opts.batch_size.max(1)) {
        let done = decode_batch(model, batch, opts, stop);
        tokens += done.iter().map(|c| c.tokens.len()).sum::<usize>();
        out.extend(done);
        if !progress(out.len(), tokens) {
            break;
        }
    }
    out
}

/// One row being decoded.
struct Row {
    rng: rand_chacha::ChaCha8Rng,
    /// Tokens seen (prompt and completion), for the repetition penalty.
    seen: Vec<bool>,
    done: Completion,
    finished: bool,
}

fn decode_batch<B: Backend>(
    model: &CausalLm<B>,
    batch: &[Request],
    opts: &DecodeOptions,
    stop: &dyn Fn(&[u32]) -> bool,
) -> Vec<Completion> {
    let vocab = model.config.vocab_size;
    let device = model.model.embed_tokens.weight.device();
    let t = batch.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    assert!(
        batch.iter().all(|r| !r.prompt.is_empty()),
        "an empty prompt"
    );
    let penalize = opts.sampling.repetition_penalty != 1.0;
    let mut rows: Vec<Row> = batch
        .iter()
        .map(|r| {
            let mut seen = vec![false; if penalize { vocab } else { 0 }];
            for &id in r.prompt.iter().filter(|_| penalize) {
                seen[id as usize] = true;
            }
            Row {
                rng: sampler::row_rng(opts.seed, r.prompt_index, r.sample_index),
                seen,
                done: Completion {
                    tokens: Vec::new(),
                    logprob: 0.0,
                    finish: Finish::Length,
                },
                finished: false,
            }
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return rows.into_iter().map(|r| r.done).collect();
    }
    let pads: Vec<usize> = batch.iter().map(|r| t - r.prompt.len()).collect();
    let mut ids = Vec::with_capacity(batch.len() * t);
    for (r, &p) in batch.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(opts.pad as i64, p));
        ids.extend(r.prompt.iter().map(|&id| id as i64));
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.len(), t]), &device);
    let (mut logits, mut cache) = model.prefill(ids, &pads, opts.max_new_tokens);
    for step in 0..opts.max_new_tokens {
        let host: Vec<f32> = logits
            .into_data()
            .into_vec::<f32>()
            .unwrap_or_else(|e| unreachable!("logits are f32: {e:?}"));
        let mut next = Vec::with_capacity(rows.len());
        for (row, l) in rows.iter_mut().zip(host.chunks(vocab)) {
            if row.finished {
                next.push(opts.pad as i64);
                continue;
            }
            let token = choose(row, l, &opts.sampling);
            row.done.tokens.push(token);
            if opts.eos.contains(&token) || stop(&row.done.tokens) {
                row.done.finish = Finish::Stop;
                row.finished = true;
            }
            next.push(token as i64);
        }
        if step + 1 == opts.max_new_tokens || rows.iter().all(|r| r.finished) {
            break;
        }
        let next = Tensor::<B, 2, Int>::from_data(TensorData::new(next, [rows.len(), 1]), &device);
        logits = model.decode(next, &mut cache);
    }
    rows.into_iter().map(|r| r.done).collect()
}

/// The row's next token from its logits `l`; its log-probability under the model is added.
fn choose(row: &mut Row, l: &[f32], s: &Sampling) -> u32 {
    let mut work = l.to_vec();
    let token = sampler::choose(&mut work, &row.seen, s, &mut row.rng);
    row.done.logprob += sampler::log_prob(l, token);
    if let Some(seen) = row.seen.get_mut(token as usize) {
        *seen = true;
    }
    token
}
