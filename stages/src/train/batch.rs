//! Turning tokenized examples into padded batches, and scoring a model on them.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::CausalLm;
use crate::model::llama::Documents;
use crate::text::Example;

/// A padded batch: ids `[batch, seq]` and 0/1 target weights `[batch, seq]`.
pub struct Batch<B: Backend> {
    pub ids: Tensor<B, 2, Int>,
    pub targets: Tensor<B, 2>,
    /// Where the documents of packed examples start (`None` when every row is one document):
    /// pass it to [`CausalLm::token_nll_with`] / [`CausalLm::forward_with`].
    pub docs: Option<Documents>,
    /// Tokens in the batch (without padding).
    pub tokens: usize,
    /// Target tokens in the batch.
    pub target_tokens: usize,
}

/// Right-pad `examples` to the longest one with `pad` (padding is never a target; causal
/// attention keeps real tokens from seeing it). Packed examples' document starts
/// ([`Example::doc_starts`]) go into [`Batch::docs`], the padding joining each row's last
/// document.
pub fn make_batch<B: Backend>(examples: &[&Example], pad: u32, device: &B::Device) -> Batch<B> {
    let t = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let b = examples.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    let mut tokens = 0;
    let mut target_tokens = 0;
    for e in examples {
        tokens += e.ids.len();
        for i in 0..t {
            ids.push(e.ids.get(i).copied().unwrap_or(pad) as i64);
            let is_target = i > 0 && e.targets.get(i).copied().unwrap_or(false);
            target_tokens += is_target as usize;
            targets.push(if is_target { 1.0f32 } else { 0.0 });
        }
    }
    let docs = examples.iter().any(|e| !e.doc_starts.is_empty()).then(|| {
        let rows: Vec<&[usize]> = examples.iter().map(|e| e.doc_starts.as_slice()).collect();
        Documents::new(&rows, t)
    });
    Batch {
        docs,
        ids: Tensor::from_data(TensorData::new(ids, [b, t]), device),
        targets: Tensor::from_data(TensorData::new(targets, [b, t]), device),
        tokens,
        target_tokens,
    }
}

/// Sums over a set of examples: negative log-likelihood and argmax hits on target tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Score {
    pub nll_sum: f64,
    pub correct: usize,
    pub targets: usize,
}

impl Score {
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.targets.max(1) as f64
    }
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
    pub fn token_accuracy(&self) -> f64 {
        self.correct as f64 / self.targets.max(1) as f64
    }
}

/// Score `model` on `examples` (no gradients), `batch_size` at a time; packed examples with
/// each document on its own.
pub fn score<B: Backend>(
    model: &CausalLm<B>,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
) -> Score {
    let device = model.model.embed_tokens.weight.val().device();
    let mut total = Score::default();
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = make_batch::<B>(&refs, pad, &device);
        let [b, t] = batch.ids.dims();
        let logits = model
            .forward_with(batch.ids.clone(), batch.docs.as_ref())
            .narrow(1, 0, t - 1); // [b, t-1, v]
        let logp = log_softmax(logits, 2);
        let next = batch.ids.narrow(1, 1, t - 1); // [b, t-1]
        let picked = logp
            .clone()
            .gather(2, next.clone().unsqueeze_dim::<3>(2))
            .reshape([b, t - 1]);
        let w = batch.targets.narrow(1, 1, t - 1); // [b, t-1]
        let nll: f32 = (picked.neg() * w.clone()).sum().into_scalar().elem();
        let argmax = logp.argmax(2).reshape([b, t - 1]);
        let hits = argmax.equal(next).float() * w;
        let correct: f32 = hits.sum().into_scalar().elem();
        total.nll_sum += nll as f64;
        total.correct += correct.round() as usize;
        total.targets += batch.target_tokens;
    }
    total
}

use burn::tensor::ElementConversion;
