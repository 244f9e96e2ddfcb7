//! GRPO as an [`Objective`] of the shared loop: rollouts sampled from the policy, scored and
//! turned into advantages, then the clipped per-token loss of [`grpo::loss`] on them.
//!
//! **A rollout** (every `num_iterations` optimizer steps): each prompt the loop drew for the
//! step gets `num_generations` completions from the policy as it is, through the generate
//! room's KV-cached decoding. Sample `g` of the step's `k`-th prompt draws from the random
//! stream of (stage seed and step, `k`, `g`), so a rollout is a function of the weights and the
//! step number alone (not of `generation_batch_size`, the thread count or a resume). The
//! completions' texts (cut at a stop string, without the end-of-sequence id) are scored by the
//! rewards, combined by their weights, and turned into group-relative advantages
//! ([`grpo::advantages`]). When β ≠ 0 the reference model's per-token log-probs are computed
//! then; with `num_iterations` > 1 the policy's own, as π_old (with one iteration π_old is the
//! policy's log-probs detached, so ρ ≡ 1 and only the gradient is non-zero, as in TRL).
//!
//! **A step** runs the policy over prompt + completion of each sample (right-padded), takes
//! the log-probabilities of the completion tokens from the logits divided by the sampling
//! temperature, and computes [`grpo::loss`] with the mask of the completion's tokens — all of
//! them, the end-of-sequence id included (decoding stops there), none of a truncated one under
//! `mask_truncated_completions`.

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use super::grpo::{self, LossType, ScaleRewards};
use super::rewards::{self, Reward, RewardInput};
use crate::generate::{DecodeOptions, Finish, Request, Sampling, Stops, generate};
use crate::model::{CausalLm, fused};
use crate::text::TextTokenizer;
use crate::train::{Objective, Rollout, TrainError};

/// A prompt of the training data.
#[derive(Debug)]
pub struct PromptItem {
    /// The record's position in the dataset (1-based in messages).
    pub record: usize,
    pub ids: Vec<u32>,
    /// The rendered prompt, as the rewards see it.
    pub text: String,
    /// The record's answer (for `exact_answer`).
    pub answer: Option<String>,
}

/// A scored completion of a rollout.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The new tokens, the end-of-sequence id included when one ended it.
    pub completion: Vec<u32>,
    /// Whether its tokens count (not a truncated one under `mask_truncated_completions`).
    pub active: bool,
    pub advantage: f64,
    /// π_old per completion token (`num_iterations` > 1).
    pub old: Option<Vec<f32>>,
    /// The reference model's per completion token (β ≠ 0).
    pub reference: Option<Vec<f32>>,
    /// Active tokens of the whole rollout (`dapo`'s normalizer).
    pub rollout_tokens: f64,
}

/// What the loop draws (a prompt) and what a rollout yields (the prompt with a sample).
#[derive(Clone, Debug)]
pub struct GrpoItem {
    pub prompt: Arc<PromptItem>,
    pub sample: Option<Sample>,
}

impl GrpoItem {
    pub fn prompt(p: PromptItem) -> Self {
        GrpoItem {
            prompt: Arc::new(p),
            sample: None,
        }
    }
}

/// GRPO's settings and what its rollouts need.
pub struct GrpoObjective {
    pub tok: TextTokenizer,
    pub rewards: Vec<Reward>,
    pub stop: Vec<String>,
    pub eos: Vec<u32>,
    pub pad: u32,
    /// `do_sample` is on; the temperature also scales the training log-probs.
    pub sampling: Sampling,
    pub num_generations: usize,
    pub max_completion_length: usize,
    /// Rows decoded (and scored by the reference) together.
    pub generation_batch_size: usize,
    pub scale_rewards: ScaleRewards,
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub loss_type: LossType,
    pub bias_correction_kl: bool,
    pub mask_truncated_completions: bool,
    pub num_iterations: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// Log the first prompt's completions every this many steps.
    pub log_completions_every: Option<usize>,
    /// The control: advantages permuted within the rollout.
    pub shuffle_advantages: bool,
}

/// Prompt + completion of each sample, right-padded with `pad`: ids `[rows, t]` and, for the
/// `t − 1` next-token positions, the 0/1 mask of the active completion tokens; and where each
/// row's completion starts among those positions.
fn rows(items: &[&GrpoItem], pad: u32) -> (Vec<i64>, Vec<f32>, usize, Vec<usize>) {
    let len =
        |i: &GrpoItem| i.prompt.ids.len() + i.sample.as_ref().map_or(0, |s| s.completion.len());
    let t = items.iter().map(|i| len(i)).max().unwrap_or(2).max(2);
    let mut ids = Vec::with_capacity(items.len() * t);
    let mut mask = vec![0f32; items.len() * (t - 1)];
    let mut starts = Vec::with_capacity(items.len());
    for (r, item) in items.iter().enumerate() {
        let p = item.prompt.ids.len();
        let empty = Vec::new();
        let (c, active) = item
            .sample
            .as_ref()
            .map_or((&empty, false), |s| (&s.completion, s.active));
        ids.extend(item.prompt.ids.iter().chain(c).map(|&x| x as i64));
        ids.extend(std::iter::repeat_n(pad as i64, t - p - c.len()));
        // Completion token j (at index p + j) is predicted at position p + j − 1.
        let start = p - 1;
        starts.push(start);
        if active {
            for j in 0..c.len() {
                mask[r * (t - 1) + start + j] = 1.0;
            }
        }
    }
    (ids, mask, t, starts)
}

/// Per-position log-probability of the next token under `softmax(logits / temperature)`, and
/// those logits.
///
/// # Shapes
/// - ids: `[rows, t]`
/// - output: (`[rows, t-1]`, `[rows, t-1, vocab]`)
fn token_logps<B: Backend>(
    model: &CausalLm<B>,
    ids: Tensor<B, 2, Int>,
    temperature: f64,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let [b, t] = ids.dims();
    let hidden = model.hidden(ids.clone()).narrow(1, 0, t - 1); // [b, t-1, hidden]
    let mut logits = model.head(hidden); // [b, t-1, vocab]
    if temperature != 1.0 {
        logits = logits / temperature;
    }
    let n = b * (t - 1);
    let vocab = model.config.vocab_size;
    let next = ids.narrow(1, 1, t - 1).reshape([n]); // [n]
    let logp = fused::cross_entropy(logits.clone().reshape([n, vocab]), next)
        .neg()
        .reshape([b, t - 1]);
    (logp, logits)
}

/// Per completion token log-probs of `items` under `model` (no gradients), `chunk` rows at a
/// time.
fn completion_logps<B: Backend>(
    model: &CausalLm<B>,
    items: &[&GrpoItem],
    pad: u32,
    temperature: f64,
    chunk: usize,
) -> Vec<Vec<f32>> {
    let device = model.model.embed_tokens.weight.val().device();
    let mut out = Vec::with_capacity(items.len());
    for part in items.chunks(chunk.max(1)) {
        let (ids, _, t, starts) = rows(part, pad);
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [part.len(), t]), &device);
        let (logp, _) = token_logps(model, ids, temperature);
        let host: Vec<f32> = logp.into_data().into_vec().unwrap_or_default();
        for ((item, row), start) in part.iter().zip(host.chunks(t - 1)).zip(starts) {
            let n = item.sample.as_ref().map_or(0, |s| s.completion.len());
            out.push(row[start..start + n].to_vec());
        }
    }
    out
}

/// `[rows, t-1]` from per completion token values, the active positions only; elsewhere
/// `fill`'s value (so that ratios and the KL term are exactly neutral there).
fn spread<B: Backend>(
    items: &[&GrpoItem],
    values: impl Fn(&Sample) -> Option<&Vec<f32>>,
    starts: &[usize],
    mask: &Tensor<B, 2>,
    fill: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [b, w] = fill.dims();
    let mut host = vec![0f32; b * w];
    for (r, item) in items.iter().enumerate() {
        if let Some(v) = item.sample.as_ref().and_then(&values) {
            host[r * w + starts[r]..r * w + starts[r] + v.len()].copy_from_slice(v);
        }
    }
    let given = Tensor::<B, 2>::from_data(TensorData::new(host, [b, w]), &fill.device());
    given * mask.clone() + fill * (mask.clone().neg() + 1.0)
}

fn mean(v: &[f64]) -> f64 {
    let v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl GrpoObjective {
    /// The seed of step `step`'s rollout.
    fn rollout_seed(&self, step: usize) -> u64 {
        self.seed
            .wrapping_add(0x5851_f42d_4c95_7f2d)
            .wrapping_mul((step as u64).wrapping_mul(2).wrapping_add(1))
            ^ (step as u64).rotate_left(32)
    }

    /// TRL's rollout metrics of the step's completions and rewards.
    fn metrics(
        &self,
        samples: &[(Finish, usize)],
        per: &[Vec<f64>],
        total: &[f64],
    ) -> BTreeMap<String, f64> {
        let g = self.num_generations;
        let mut m = BTreeMap::new();
        m.insert("reward".into(), mean(total));
        m.insert("reward_std".into(), grpo::std(total));
        for (r, v) in self.rewards.iter().zip(per) {
            let name = r.spec.name();
            let kept: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
            m.insert(format!("rewards/{name}/mean"), mean(&kept));
            m.insert(format!("rewards/{name}/std"), grpo::std(&kept));
        }
        let groups = total.chunks(g).count().max(1);
        let flat = total.chunks(g).filter(|c| grpo::std(c) < 1e-8).count();
        m.insert("frac_reward_zero_std".into(), flat as f64 / groups as f64);
        let lengths: Vec<f64> = samples.iter().map(|s| s.1 as f64).collect();
        let terminated: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 == Finish::Stop)
            .map(|s| s.1 as f64)
            .collect();
        m.insert("completions/mean_length".into(), mean(&lengths));
        m.insert(
            "completions/min_length".into(),
            lengths.iter().copied().fold(f64::INFINITY, f64::min),
        );
        m.insert(
            "completions/max_length".into(),
            lengths.iter().copied().fold(0.0, f64::max),
        );
        m.insert(
            "completions/mean_terminated_length".into(),
            mean(&terminated),
        );
        m.insert(
            "completions/clipped_ratio".into(),
            1.0 - terminated.len() as f64 / samples.len().max(1) as f64,
        );
        m
    }
}

impl Objective for GrpoObjective {
    type Item = GrpoItem;

    fn weight(&self, _: &GrpoItem) -> f64 {
        1.0
    }
    fn tokens(&self, item: &GrpoItem) -> usize {
        item.prompt.ids.len() + item.sample.as_ref().map_or(0, |s| s.completion.len())
    }
    fn normalized(&self) -> bool {
        true
    }
    fn steps_per_rollout(&self) -> usize {
        self.num_iterations
    }
    fn needs_reference(&self) -> bool {
        self.beta != 0.0
    }

    fn rollout<B: Backend>(
        &self,
        policy: &CausalLm<B>,
        reference: Option<&CausalLm<B>>,
        step: usize,
        drawn: &[Vec<&GrpoItem>],
    ) -> Result<Rollout<GrpoItem>, TrainError> {
        let g = self.num_generations;
        let prompts: Vec<&Arc<PromptItem>> = drawn.iter().flatten().map(|i| &i.prompt).collect();
        let requests: Vec<Request> = prompts
            .iter()
            .enumerate()
            .flat_map(|(k, p)| {
                (0..g).map(move |s| Request {
                    prompt: p.ids.clone(),
                    prompt_index: k,
                    sample_index: s,
                })
            })
            .collect();
        let opts = DecodeOptions {
            sampling: self.sampling.clone(),
            max_new_tokens: self.max_completion_length,
            eos: self.eos.clone(),
            pad: self.pad,
            seed: self.rollout_seed(step),
            batch_size: self.generation_batch_size,
        };
        let stops = Stops {
            strings: &self.stop,
            tok: &self.tok,
        };
        let done = generate(policy, &requests, &opts, &|t| stops.hit(t), &mut |_, _| {
            true
        });
        let texts = done
            .iter()
            .map(|c| stops.text(c, &self.eos))
            .collect::<Result<Vec<_>, _>>()?;
        let inputs: Vec<RewardInput> = requests
            .iter()
            .zip(&texts)
            .zip(&done)
            .map(|((r, text), c)| {
                let p = prompts[r.prompt_index];
                RewardInput {
                    prompt: &p.text,
                    completion: text,
                    answer: p.answer.as_deref(),
                    tokens: c.tokens.len(),
                }
            })
            .collect();
        let (per, total) = rewards::score_all(&self.rewards, &inputs)?;
        let mut adv = grpo::advantages(&total, g, self.scale_rewards);
        if self.shuffle_advantages {
            crate::data::rng::Rng::new(self.rollout_seed(step) ^ 0xad).shuffle(&mut adv);
        }
        let active = |c: &crate::generate::Completion| {
            !(self.mask_truncated_completions && c.finish == Finish::Length)
        };
        let rollout_tokens: usize = done
            .iter()
            .filter(|c| active(c))
            .map(|c| c.tokens.len())
            .sum();
        let mut items: Vec<GrpoItem> = requests
            .iter()
            .zip(&done)
            .zip(&adv)
            .map(|((r, c), &a)| GrpoItem {
                prompt: Arc::clone(prompts[r.prompt_index]),
                sample: Some(Sample {
                    completion: c.tokens.clone(),
                    active: active(c),
                    advantage: a,
                    old: None,
                    reference: None,
                    rollout_tokens: rollout_tokens as f64,
                }),
            })
            .collect();
        let temperature = self.sampling.temperature;
        let chunk = self.generation_batch_size;
        if self.num_iterations > 1 {
            let refs: Vec<&GrpoItem> = items.iter().collect();
            let old = completion_logps(policy, &refs, self.pad, temperature, chunk);
            for (item, o) in items.iter_mut().zip(old) {
                if let Some(s) = item.sample.as_mut() {
                    s.old = Some(o);
                }
            }
        }
        if let (true, Some(reference)) = (self.beta != 0.0, reference) {
            let refs: Vec<&GrpoItem> = items.iter().collect();
            let lp = completion_logps(reference, &refs, self.pad, temperature, chunk);
            for (item, r) in items.iter_mut().zip(lp) {
                if let Some(s) = item.sample.as_mut() {
                    s.reference = Some(r);
                }
            }
        }
        let shape: Vec<(Finish, usize)> = done.iter().map(|c| (c.finish, c.tokens.len())).collect();
        let metrics = self.metrics(&shape, &per, &total);
        let mut log = Vec::new();
        if let Some(every) = self.log_completions_every
            && every > 0
            && step.is_multiple_of(every)
            && let Some(p) = prompts.first()
        {
            log.push(format!(
                "step {}: record {} «{}»",
                step + 1,
                p.record,
                p.text
            ));
            for s in 0..g.min(texts.len()) {
                log.push(format!(
                    "  sample {s}: «{}» reward {:.4} advantage {:.4}",
                    texts[s], total[s], adv[s]
                ));
            }
        }
        // Back into the loop's micro-batches: each drawn prompt's G samples where it was drawn.
        let mut micro = Vec::with_capacity(drawn.len());
        let mut rest = items.into_iter();
        for d in drawn {
            micro.push(rest.by_ref().take(d.len() * g).collect());
        }
        Ok(Rollout {
            micro,
            metrics,
            log,
        })
    }

    fn loss<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        items: &[&GrpoItem],
    ) -> (Tensor<B, 1>, BTreeMap<String, f64>) {
        let device = model.model.embed_tokens.weight.val().device();
        let (ids, mask, t, starts) = rows(items, self.pad);
        let b = items.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, t - 1]), &device);
        let (logp, logits) = token_logps(model, ids, self.sampling.temperature);
        let detached = logp.clone().detach();
        let old = if self.num_iterations > 1 {
            spread(items, |s| s.old.as_ref(), &starts, &mask, detached.clone())
        } else {
            detached.clone()
        };
        let reference = (self.beta != 0.0)
            .then(|| spread(items, |s| s.reference.as_ref(), &starts, &mask, detached));
        let adv: Vec<f32> = items
            .iter()
            .map(|i| i.sample.as_ref().map_or(0.0, |s| s.advantage as f32))
            .collect();
        let adv = Tensor::<B, 1>::from_data(TensorData::new(adv, [b]), &device);
        let rollout_tokens = items
            .iter()
            .find_map(|i| i.sample.as_ref().map(|s| s.rollout_tokens))
            .unwrap_or(1.0);
        let o = grpo::Objective {
            beta: self.beta,
            epsilon_low: self.epsilon,
            epsilon_high: self.epsilon_high,
            loss_type: self.loss_type,
            bias_correction_kl: self.bias_correction_kl,
            max_completion_length: self.max_completion_length,
            grad_accum: self.grad_accum,
            step_tokens: rollout_tokens,
        };
        let terms = grpo::loss(logp, old, reference, adv, mask.clone(), &o);
        // Metrics are averaged over the step's micro-batches.
        let ga = self.grad_accum.max(1) as f64;
        let scalar = |x: Tensor<B, 1>| -> f64 {
            let v: f32 = x.into_scalar().elem();
            v as f64 / ga
        };
        let tokens = mask.clone().sum().clamp_min(1.0);
        let lp = log_softmax(logits.detach(), 2); // [b, t-1, vocab]
        let entropy = (lp.clone().exp() * lp).sum_dim(2).neg().reshape([b, t - 1]);
        let mut m = BTreeMap::new();
        m.insert(
            "entropy".to_owned(),
            scalar((entropy * mask).sum() / tokens),
        );
        let low = scalar(terms.clip_low);
        let high = scalar(terms.clip_high);
        m.insert("clip_ratio/low_mean".to_owned(), low);
        m.insert("clip_ratio/high_mean".to_owned(), high);
        m.insert("clip_ratio/region_mean".to_owned(), low + high);
        if let Some(kl) = terms.kl {
            m.insert("kl".to_owned(), scalar(kl));
        }
        (terms.loss, m)
    }

    fn eval<B: Backend>(
        &self,
        _model: &CausalLm<B>,
        _items: &[GrpoItem],
        _batch: usize,
    ) -> (f64, BTreeMap<String, f64>) {
        // `train.grpo` refuses `eval_data` at validation: held-out prompts are scored by a
        // `generate` stage with `rewards:`.
        (f64::NAN, BTreeMap::new())
    }
}
