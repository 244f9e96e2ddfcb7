//! AdamW with global-norm clipping and learning-rate schedules, written over burn's module
//! visitor/mapper so that optimizer state is keyed by checkpoint names (and therefore saved and
//! restored exactly) and clipping uses the norm over *all* trainable gradients, as
//! `torch.nn.utils.clip_grad_norm_` does.

use std::collections::{BTreeMap, HashMap};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// The learning rate at optimizer step `step` (0-based) of `total`: linear warmup from 0 over
/// `warmup` steps, then the schedule decays to 0 at `total` (transformers' `get_*_schedule_with_warmup`).
pub fn lr_at(base: f64, schedule: Schedule, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / (warmup + 1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Per-parameter moments, keyed by checkpoint name.
pub struct OptimState<B: Backend> {
    /// Optimizer steps taken so far.
    pub step: usize,
    pub moments: BTreeMap<String, (Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> Default for OptimState<B> {
    fn default() -> Self {
        OptimState {
            step: 0,
            moments: BTreeMap::new(),
        }
    }
}

/// Gradients of the trainable parameters, flattened, summed over micro-batches.
pub struct Grads<B: Backend> {
    pub by_id: HashMap<ParamId, Tensor<B, 1>>,
}

impl<B: Backend> Default for Grads<B> {
    fn default() -> Self {
        Grads {
            by_id: HashMap::new(),
        }
    }
}

struct CollectGrads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    out: &'a mut Grads<B::InnerBackend>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            let n = g.dims().iter().product::<usize>();
            let g = g.reshape([n]);
            let sum = match self.out.by_id.remove(&param.id) {
                Some(prev) => prev + g,
                None => g,
            };
            self.out.by_id.insert(param.id, sum);
        }
    }
}

impl<B: Backend> Grads<B> {
    /// Add the gradients `grads` holds for `module`'s parameters.
    pub fn accumulate<AB, M>(&mut self, module: &M, grads: &AB::Gradients)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut v = CollectGrads::<AB> { grads, out: self };
        module.visit(&mut v);
    }

    /// The global L2 norm over every gradient.
    pub fn global_norm(&self) -> f64 {
        let mut total = 0.0f64;
        // Sum in a fixed order (by id is random across runs; sort the squares' sums).
        let mut parts: Vec<(ParamId, f64)> = self
            .by_id
            .iter()
            .map(|(id, g)| {
                let s: f32 = g.clone().powi_scalar(2).sum().into_scalar().elem();
                (*id, s as f64)
            })
            .collect();
        parts.sort_by(|a, b| a.1.total_cmp(&b.1));
        for (_, s) in parts {
            total += s;
        }
        total.sqrt()
    }
}

use burn::tensor::ElementConversion;

struct Update<'a, B: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a mut Grads<B::InnerBackend>,
    state: &'a mut OptimState<B::InnerBackend>,
    hp: AdamW,
    lr: f64,
    clip: f64,
    t: i32,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Update<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(g) = self.grads.by_id.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let name = self.path.join(".");
        let shape = tensor.dims();
        let n = shape.iter().product::<usize>();
        let p = tensor.inner().reshape([n]);
        let g = if self.clip < 1.0 { g * self.clip } else { g };
        let (m, v) = match self.state.moments.remove(&name) {
            Some(mv) => mv,
            None => (p.zeros_like(), p.zeros_like()),
        };
        let AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.hp;
        let m = m * beta1 + g.clone() * (1.0 - beta1);
        let v = v * beta2 + g.powi_scalar(2) * (1.0 - beta2);
        let bc1 = 1.0 - beta1.powi(self.t);
        let bc2 = 1.0 - beta2.powi(self.t);
        // PyTorch's AdamW: decay first, then the Adam step with bias-corrected moments.
        let p = if weight_decay > 0.0 {
            p * (1.0 - self.lr * weight_decay)
        } else {
            p
        };
        let denom = (v.clone() / bc2).sqrt() + eps;
        let p = p - (m.clone() / bc1) / denom * self.lr;
        self.state.moments.insert(name, (m, v));
        let p = Tensor::<B, D>::from_inner(p.reshape(shape)).require_grad();
        Param::from_mapped_value(id, p, mapper)
    }
}

/// One AdamW step on every parameter that has a gradient in `grads`, with the gradients scaled
/// by `clip` (≤ 1) first. Returns the updated module.
pub fn step<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: M,
    grads: &mut Grads<B::InnerBackend>,
    state: &mut OptimState<B::InnerBackend>,
    hp: AdamW,
    lr: f64,
    clip: f64,
) -> M {
    state.step += 1;
    let mut mapper = Update::<B> {
        path: Vec::new(),
        grads,
        state,
        hp,
        lr,
        clip,
        t: 0,
    };
    mapper.t = mapper.state.step as i32;
    module.map(&mut mapper)
}
