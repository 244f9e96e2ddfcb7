//! The one training loop every trainer shares.
//!
//! Per optimizer step: `grad_accum` micro-batches of `batch_size` examples (from a seeded
//! shuffle of the data, epoch after epoch), the loss averaged over every target token of the
//! step, gradients clipped to `max_grad_norm` by their global norm, one AdamW update at the
//! scheduled learning rate.
//!
//! **Resume.** Every `checkpoint_every` steps (and when cancelled) the loop writes the trainable
//! weights, both Adam moments, the step and the log so far into the stage's scratch directory.
//! Everything else a step depends on is a function of the step number — the data position (the
//! micro-batch counter is `step × grad_accum`), the shuffle of each epoch (seeded by
//! `seed + epoch`), the dropout RNG (reseeded from `seed` and the step) — so a resumed run
//! performs exactly the arithmetic an uninterrupted one would, and on a deterministic backend
//! ends with the same bits.
//!
//! **Rollouts.** An RL objective ([`Objective::steps_per_rollout`] > 0) does not train on the
//! drawn items themselves: every `steps_per_rollout` steps it samples new ones from the policy
//! as it is (completions of the drawn prompts, scored), and the steps until the next rollout
//! train on those. A rollout is a function of the weights and the step number, and checkpoints
//! are written only where a rollout starts, so a resumed run samples what an uninterrupted one
//! would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use burnish_engine::stage::RunContext;
use serde::{Deserialize, Serialize};

use super::batch::{make_batch, score};
use super::error::TrainError;
use super::optim::{self, AdamW, Grads, OptimState, Schedule, lr_at};
use crate::data::rng::Rng;
use crate::model::CausalLm;
use crate::model::weights::{self, TensorFiles};
use crate::text::Example;

/// Everything the loop needs to know, as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopSpec {
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub adamw: AdamW,
    pub max_grad_norm: Option<f64>,
    pub checkpoint_every: usize,
    pub eval_every: Option<usize>,
    pub seed: u64,
    pub pad_id: u32,
}

/// One line of the training log (`train_log.jsonl` in the stage output).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Objective-specific per-step metrics (`rewards/chosen`, …), averaged over the step.
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

/// What a trainer optimizes: how a micro-batch of its items becomes a loss.
///
/// The loop averages over *units*: a step's loss is Σ `loss` over its micro-batches divided by
/// Σ `weight` over its items (target tokens for language modelling, examples or pairs for
/// preference objectives), so gradient accumulation equals one big batch.
pub trait Objective {
    type Item;
    /// How many units `item` holds.
    fn weight(&self, item: &Self::Item) -> f64;
    /// Tokens `item` feeds the model (throughput only).
    fn tokens(&self, item: &Self::Item) -> usize;
    /// The loss summed over `items`' units, and named metrics summed over them.
    fn loss<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        items: &[&Self::Item],
    ) -> (Tensor<B, 1>, BTreeMap<String, f64>);
    /// Mean loss per unit on held-out items (no gradients), and held-out metrics.
    fn eval<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[Self::Item],
        batch: usize,
    ) -> (f64, BTreeMap<String, f64>);
    /// Whether the held-out loss is a per-token NLL (so its exp is a perplexity).
    fn reports_perplexity(&self) -> bool {
        false
    }
    /// Whether [`Objective::prepare`] needs the reference model.
    fn needs_reference(&self) -> bool {
        false
    }
    /// Fill in what the items need from the frozen reference model (reference log-probs that no
    /// cached artifact provided). Called once, before training.
    fn prepare<B: Backend>(
        &self,
        _reference: &CausalLm<B>,
        _items: &mut [Self::Item],
        _batch: usize,
    ) {
    }
    /// Whether [`Objective::loss`] returns each micro-batch's share of the step's loss already
    /// normalized (GRPO's loss types), so the loop adds the shares as they are instead of
    /// dividing by the step's [`Objective::weight`]s. Its metrics are added as they are too.
    fn normalized(&self) -> bool {
        false
    }
    /// RL objectives: optimizer steps trained on one rollout (`num_iterations`). 0, the
    /// default: the loop trains on the drawn items themselves.
    fn steps_per_rollout(&self) -> usize {
        0
    }
    /// RL objectives: the items of the steps from `step` on, sampled from `policy` (the
    /// current weights, without gradients) for the items drawn at `step`, one list per
    /// micro-batch; `reference` is the frozen reference model when
    /// [`Objective::needs_reference`].
    fn rollout<B: Backend>(
        &self,
        _policy: &CausalLm<B>,
        _reference: Option<&CausalLm<B>>,
        _step: usize,
        _drawn: &[Vec<&Self::Item>],
    ) -> Result<Rollout<Self::Item>, TrainError> {
        Err(TrainError::Input {
            message: "this objective does not sample rollouts".into(),
        })
    }
}

/// What an RL objective sampled for the coming steps.
pub struct Rollout<I> {
    /// The items, one list per micro-batch.
    pub micro: Vec<Vec<I>>,
    /// Metrics of the rollout (rewards, completion lengths), logged with each step trained on it.
    pub metrics: BTreeMap<String, f64>,
    /// Lines for the stage log (sampled completions).
    pub log: Vec<String>,
}

/// Next-token cross-entropy over target tokens: CPT and SFT.
pub struct LanguageModeling {
    pub pad_id: u32,
}

impl Objective for LanguageModeling {
    type Item = Example;
    fn weight(&self, item: &Example) -> f64 {
        item.targets.iter().skip(1).filter(|&&t| t).count() as f64
    }
    fn tokens(&self, item: &Example) -> usize {
        item.ids.len()
    }
    fn reports_perplexity(&self) -> bool {
        true
    }
    fn loss<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        items: &[&Example],
    ) -> (Tensor<B, 1>, BTreeMap<String, f64>) {
        let device = model.model.embed_tokens.weight.val().device();
        let batch = make_batch::<B>(items, self.pad_id, &device);
        let (nll, w) = model.token_nll_with(batch.ids, batch.targets, batch.docs.as_ref());
        ((nll * w).sum(), BTreeMap::new())
    }
    fn eval<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[Example],
        batch: usize,
    ) -> (f64, BTreeMap<String, f64>) {
        let s = score(model, items, batch, self.pad_id);
        (s.mean_nll(), BTreeMap::new())
    }
}

/// What a finished loop reports.
pub struct LoopResult<B: AutodiffBackend> {
    pub model: CausalLm<B>,
    pub log: Vec<LogLine>,
    pub resumed_from: Option<usize>,
    /// Mean held-out loss per unit at the end, and held-out metrics.
    pub final_eval: Option<(f64, BTreeMap<String, f64>)>,
    pub tokens_per_s: f64,
}

/// Steps in `epochs` passes over `n` examples.
pub fn steps_for_epochs(n: usize, batch_size: usize, grad_accum: usize, epochs: f64) -> usize {
    let per_step = (batch_size * grad_accum).max(1);
    let per_epoch = n.div_ceil(per_step).max(1);
    ((per_epoch as f64) * epochs).ceil().max(1.0) as usize
}

/// Example indices of micro-batch `k`: the stream of epoch permutations, cut into pieces of
/// `batch` (an epoch's tail continues into the next epoch's head).
fn micro_batch(
    n: usize,
    batch: usize,
    k: usize,
    seed: u64,
    cache: &mut Option<(usize, Vec<usize>)>,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut pos = k * batch;
    while out.len() < batch {
        let epoch = pos / n;
        let within = pos % n;
        if cache.as_ref().map(|c| c.0) != Some(epoch) {
            let mut order: Vec<usize> = (0..n).collect();
            Rng::new(seed.wrapping_add(epoch as u64)).shuffle(&mut order);
            *cache = Some((epoch, order));
        }
        let order = &cache.as_ref().map(|c| &c.1).cloned().unwrap_or_default();
        let take = (batch - out.len()).min(n - within);
        out.extend_from_slice(&order[within..within + take]);
        pos += take;
    }
    out
}

/// Train `model` on next-token prediction (its trainable parameters are those with
/// `require_grad`).
pub fn train<B: AutodiffBackend>(
    model: CausalLm<B>,
    data: &[Example],
    eval: Option<&[Example]>,
    spec: &LoopSpec,
    cx: &mut RunContext,
) -> Result<LoopResult<B>, TrainError> {
    let objective = LanguageModeling {
        pad_id: spec.pad_id,
    };
    train_with(model, &objective, data, eval, None, spec, cx)
}

/// Train `model` on any [`Objective`]; `reference` is the frozen reference model an RL
/// objective's rollouts score against.
pub fn train_with<B: AutodiffBackend, O: Objective>(
    mut model: CausalLm<B>,
    objective: &O,
    data: &[O::Item],
    eval: Option<&[O::Item]>,
    reference: Option<&CausalLm<B::InnerBackend>>,
    spec: &LoopSpec,
    cx: &mut RunContext,
) -> Result<LoopResult<B>, TrainError> {
    if data.is_empty() {
        return Err(TrainError::NoData);
    }
    let device = model.model.embed_tokens.weight.val().device();
    let ckpt = Checkpoints::new(cx.scratch_dir());
    let mut state = OptimState::<B::InnerBackend>::default();
    let mut log: Vec<LogLine> = Vec::new();
    let mut start = 0;
    let mut resumed_from = None;
    if let Some(found) = ckpt.latest()? {
        let restored = ckpt.restore::<B>(&found, model, &mut state)?;
        model = restored.0;
        log = restored.1;
        start = state.step;
        resumed_from = Some(start);
        cx.log(format!("resuming from checkpoint at step {start}"));
    }
    cx.progress().set_total(spec.steps as u64);
    cx.progress().set_position(start as u64);
    let mut order_cache = None;
    let began = Instant::now();
    let mut tokens_seen = 0usize;
    let every = objective.steps_per_rollout();
    // Checkpoints fall where rollouts start (every step when there are none).
    let boundary = |s: usize| s.is_multiple_of(every.max(1));
    let mut rollout: Option<Rollout<O::Item>> = None;
    for step in start..spec.steps {
        if cx.cancelled() {
            if boundary(step) {
                ckpt.save(&model, &state, &log)?;
            }
            return Err(TrainError::Cancelled { step });
        }
        B::seed(
            &device,
            spec.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        // Gather the step's micro-batches first: the loss is a mean over all their units.
        let t0 = Instant::now();
        let mut micro = Vec::with_capacity(spec.grad_accum);
        for a in 0..spec.grad_accum {
            let k = step * spec.grad_accum + a;
            let idx = micro_batch(data.len(), spec.batch_size, k, spec.seed, &mut order_cache);
            micro.push(idx.iter().map(|&i| &data[i]).collect::<Vec<&O::Item>>());
        }
        let mut extra: BTreeMap<String, f64> = BTreeMap::new();
        let mut rollout_secs = 0.0;
        if every > 0 {
            if boundary(step) || rollout.is_none() {
                let r = objective.rollout(&model.valid(), reference, step, &micro)?;
                for line in &r.log {
                    cx.log(line.clone());
                }
                rollout = Some(r);
                rollout_secs = t0.elapsed().as_secs_f64();
            }
            if let Some(r) = &rollout {
                micro = r.micro.iter().map(|m| m.iter().collect()).collect();
                extra.extend(r.metrics.clone());
            }
        }
        let step_weight: f64 = if objective.normalized() {
            1.0
        } else {
            let w = micro
                .iter()
                .flatten()
                .map(|r| objective.weight(r))
                .sum::<f64>();
            if w > 0.0 { w } else { 1.0 }
        };
        let mut grads = Grads::<B::InnerBackend>::default();
        let mut loss_sum = 0.0f64;
        let mut step_tokens = 0;
        for refs in micro {
            step_tokens += refs.iter().map(|r| objective.tokens(r)).sum::<usize>();
            let (summed, metrics) = objective.loss(&model, &refs);
            for (k, v) in metrics {
                *extra.entry(k).or_insert(0.0) += v / step_weight;
            }
            let loss = summed / step_weight;
            let value: f32 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    value: value as f64,
                    last: log.last().map(|l| (l.step, l.loss)),
                });
            }
            loss_sum += value as f64;
            let g = loss.backward();
            grads.accumulate::<B, _>(&model, &g);
        }
        let norm = grads.global_norm();
        if !norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                value: norm,
                last: log.last().map(|l| (l.step, l.loss)),
            });
        }
        let clip = match spec.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        let lr = lr_at(spec.lr, spec.schedule, spec.warmup_steps, spec.steps, step);
        model = optim::step(model, &mut grads, &mut state, spec.adamw, lr, clip);
        let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
        tokens_seen += step_tokens;
        let mut line = LogLine {
            step: step + 1,
            loss: loss_sum,
            lr,
            grad_norm: norm,
            tokens: step_tokens,
            eval_loss: None,
            extra,
        };
        if let (Some(every), Some(eval)) = (spec.eval_every, eval)
            && every > 0
            && (step + 1) % every == 0
        {
            line.eval_loss = Some(objective.eval(&model.valid(), eval, spec.batch_size).0);
        }
        cx.log(format!(
            "{{\"step\":{},\"loss\":{:.6},\"lr\":{:.3e},\"grad_norm\":{:.4},\"tokens_per_s\":{:.1}{}}}",
            line.step,
            line.loss,
            line.lr,
            line.grad_norm,
            step_tokens as f64 / elapsed,
            rollout_fields(&line, rollout_secs, elapsed)
                + &line
                    .eval_loss
                    .map(|e| format!(",\"eval_loss\":{e:.6}"))
                    .unwrap_or_default()
        ));
        cx.progress().set_position((step + 1) as u64);
        cx.progress().set_message(&match line.extra.get("reward") {
            Some(r) if every > 0 => format!("reward {r:.3} · loss {:.4}", line.loss),
            _ => format!(
                "loss {:.4} · {:.0} tok/s",
                line.loss,
                step_tokens as f64 / elapsed
            ),
        });
        log.push(line);
        if spec.checkpoint_every > 0
            && (step + 1) % spec.checkpoint_every == 0
            && boundary(step + 1)
            && step + 1 < spec.steps
        {
            ckpt.save(&model, &state, &log)?;
        }
    }
    let final_eval = eval.map(|e| objective.eval(&model.valid(), e, spec.batch_size));
    let secs = began.elapsed().as_secs_f64().max(1e-9);
    Ok(LoopResult {
        model,
        log,
        resumed_from,
        final_eval,
        tokens_per_s: tokens_seen as f64 / secs,
    })
}

/// The log line's extra fields of a step that sampled a rollout: the reward and where the
/// step's time went.
fn rollout_fields(line: &LogLine, rollout_secs: f64, step_secs: f64) -> String {
    match line.extra.get("reward") {
        Some(r) if rollout_secs > 0.0 => format!(
            ",\"reward\":{r:.6},\"rollout_s\":{rollout_secs:.3},\"train_s\":{:.3}",
            (step_secs - rollout_secs).max(0.0)
        ),
        _ => String::new(),
    }
}

/// Checkpoints in a scratch directory: `ckpt/step-NNNNNNNN/` directories and a `ckpt/latest`
/// pointer file that is replaced atomically once a directory is complete.
pub struct Checkpoints {
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct CkptMeta {
    step: usize,
    dir: String,
}

impl Checkpoints {
    pub fn new(scratch: &Path) -> Self {
        Checkpoints {
            root: scratch.join("ckpt"),
        }
    }

    fn latest(&self) -> Result<Option<PathBuf>, TrainError> {
        let pointer = self.root.join("latest");
        if !pointer.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&pointer).map_err(|e| TrainError::io(&pointer, e))?;
        let meta: CkptMeta = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: pointer.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Some(self.root.join(meta.dir)))
    }

    /// Write the trainable weights, the moments and the log, then move `latest` to them.
    pub fn save<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        state: &OptimState<B::InnerBackend>,
        log: &[LogLine],
    ) -> Result<(), TrainError> {
        let name = format!("step-{:08}", state.step);
        let dir = self.root.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let mut tensors = Vec::new();
        weights::for_each_param(model, |pname, shape, entry| {
            if entry.trainable {
                tensors.push((
                    format!("param/{pname}"),
                    shape.to_vec(),
                    weights::tensor_f32(entry.value),
                ));
            }
        });
        for (pname, (m, v)) in &state.moments {
            let n = m.dims()[0];
            tensors.push((
                format!("m/{pname}"),
                vec![n],
                weights::tensor_f32(m.clone()),
            ));
            tensors.push((
                format!("v/{pname}"),
                vec![n],
                weights::tensor_f32(v.clone()),
            ));
        }
        weights::write_safetensors(&dir.join("state.safetensors"), &tensors, None)?;
        let mut lines = String::new();
        for l in log {
            lines.push_str(&serde_json::to_string(l).unwrap_or_default());
            lines.push('\n');
        }
        burnish_engine::cache::write_atomic(&dir.join("log.jsonl"), lines.as_bytes())
            .map_err(|e| TrainError::io(&dir, e))?;
        let meta = CkptMeta {
            step: state.step,
            dir: name.clone(),
        };
        let pointer = self.root.join("latest");
        burnish_engine::cache::write_atomic(
            &pointer,
            serde_json::to_string(&meta).unwrap_or_default().as_bytes(),
        )
        .map_err(|e| TrainError::io(&pointer, e))?;
        // Older checkpoints are no longer needed.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with("step-") && n != name {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    fn restore<B: AutodiffBackend>(
        &self,
        dir: &Path,
        model: CausalLm<B>,
        state: &mut OptimState<B::InnerBackend>,
    ) -> Result<(CausalLm<B>, Vec<LogLine>), TrainError> {
        let files = TensorFiles::open(&[dir.join("state.safetensors")])?;
        let log_path = dir.join("log.jsonl");
        let text = std::fs::read_to_string(&log_path).map_err(|e| TrainError::io(&log_path, e))?;
        let mut log = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            log.push(
                serde_json::from_str(line).map_err(|e| TrainError::Checkpoint {
                    path: log_path.display().to_string(),
                    message: e.to_string(),
                })?,
            );
        }
        let device = model.model.embed_tokens.weight.val().device();
        let mut loader = LoadTrainable::<B> {
            path: Vec::new(),
            files: &files,
            device: device.clone(),
            error: None,
        };
        let model = model.map(&mut loader);
        if let Some(e) = loader.error {
            return Err(e);
        }
        let names: Vec<String> = files
            .names()
            .filter_map(|n| n.strip_prefix("m/").map(str::to_owned))
            .collect();
        for name in names {
            let m = read_flat::<B::InnerBackend>(&files, &format!("m/{name}"), &device)?;
            let v = read_flat::<B::InnerBackend>(&files, &format!("v/{name}"), &device)?;
            state.moments.insert(name, (m, v));
        }
        state.step = log.len();
        Ok((model, log))
    }
}

fn read_flat<B: Backend>(
    files: &TensorFiles,
    name: &str,
    device: &B::Device,
) -> Result<Tensor<B, 1>, TrainError> {
    let n = files.shape(name).map(|s| s.iter().product()).unwrap_or(0);
    let values = files.read_f32(name, &[n])?;
    Ok(Tensor::from_data(TensorData::new(values, [n]), device))
}

struct LoadTrainable<'a, B: Backend> {
    path: Vec<String>,
    files: &'a TensorFiles,
    device: B::Device,
    error: Option<TrainError>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for LoadTrainable<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if !tensor.is_require_grad() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let name = format!("param/{}", self.path.join("."));
        let shape = tensor.dims();
        match self.files.read_f32(&name, &shape) {
            Ok(values) => {
                let t = Tensor::<B, D>::from_data(TensorData::new(values, shape), &self.device)
                    .require_grad();
                Param::from_mapped_value(id, t, mapper)
            }
            Err(e) => {
                self.error.get_or_insert(e.into());
                Param::from_mapped_value(id, tensor, mapper)
            }
        }
    }
}
