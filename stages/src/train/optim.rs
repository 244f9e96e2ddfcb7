//! AdamW with global-norm clipping and learning-rate schedules, written over burn's module
//! visitor/mapper so that optimizer state is keyed by checkpoint names (and therefore saved and
//! restored exactly) and clipping uses the norm over *all* trainable gradients, as
//! `torch.nn.utils.clip_grad_norm_` does.

use std::collections::{BTreeMap, HashMap};

use burn::backend::Flex;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorPrimitive};
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

/// The learning rate at optimizer step `step` (0-based) of `total`, as transformers'
/// `get_{constant,linear,cosine}_schedule_with_warmup` give it: `base · step / warmup` during
/// the `warmup` steps (so the first step's rate is 0), then the schedule from `base` down to 0
/// at `total` (`base · (total − step) / (total − warmup)` for linear, half a cosine period for
/// cosine).
pub fn lr_at(base: f64, schedule: Schedule, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Whether AdamW's weight decay applies to the parameter `name` (a checkpoint name), as
/// transformers' `Trainer.get_decay_parameter_names` decides: biases and normalization weights
/// are not decayed. Its name patterns are `bias`, `layernorm`, `rmsnorm`, `(^|.)norm($|.)` and
/// `_norm($|.)`; embeddings, projections and LoRA matrices are decayed.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let part_is_norm = lower
        .split('.')
        .any(|p| p == "norm" || p.ends_with("_norm"));
    !(lower.contains("bias")
        || lower.contains("layernorm")
        || lower.contains("rmsnorm")
        || part_is_norm)
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
        let hp = if decays(&name) {
            self.hp
        } else {
            AdamW {
                weight_decay: 0.0,
                ..self.hp
            }
        };
        let (p, m, v) = adamw_update(p, g, m, v, hp, self.lr, self.t);
        self.state.moments.insert(name, (m, v));
        let p = Tensor::<B, D>::from_inner(p.reshape(shape)).require_grad();
        Param::from_mapped_value(id, p, mapper)
    }
}

/// One AdamW update of a flattened parameter `p` with gradient `g` and moments `m`, `v` at
/// optimizer step `t` (1-based); returns the new `(p, m, v)`.
///
/// On flex (f32) this is one pass over the four buffers, updating `p`, `m` and `v` in place; on
/// other backends, burn's element-wise ops. Both round each operation the same way, so the two
/// give the same bits: the scalar coefficients are the f32 values burn's scalar ops use.
fn adamw_update<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    hp: AdamW,
    lr: f64,
    t: i32,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    use crate::model::fused::{back, same};
    let k = Coeffs::new(hp, lr, t);
    match same::<_, [Tensor<Flex, 1>; 4]>([p, g, m, v]) {
        Ok(a) if a.iter().all(|t| t.dtype() == DType::F32) => {
            let [p, g, m, v] = a;
            back(adamw_flex(p, g, m, v, &k))
        }
        Ok([p, g, m, v]) => back(adamw_composed(p, g, m, v, &k)),
        Err([p, g, m, v]) => adamw_composed(p, g, m, v, &k),
    }
}

/// The scalars of one AdamW update.
struct Coeffs {
    beta1: f64,
    beta2: f64,
    /// `1 − lr·weight_decay`, when there is weight decay.
    decay: Option<f64>,
    /// Bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    bc1: f64,
    bc2: f64,
    eps: f64,
    lr: f64,
}

impl Coeffs {
    fn new(hp: AdamW, lr: f64, t: i32) -> Self {
        Coeffs {
            beta1: hp.beta1,
            beta2: hp.beta2,
            decay: (hp.weight_decay > 0.0).then_some(1.0 - lr * hp.weight_decay),
            bc1: 1.0 - hp.beta1.powi(t),
            bc2: 1.0 - hp.beta2.powi(t),
            eps: hp.eps,
            lr,
        }
    }
}

/// PyTorch's AdamW: decay first, then the Adam step with bias-corrected moments.
fn adamw_composed<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    k: &Coeffs,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let m = m * k.beta1 + g.clone() * (1.0 - k.beta1);
    let v = v * k.beta2 + g.powi_scalar(2) * (1.0 - k.beta2);
    let p = match k.decay {
        Some(d) => p * d,
        None => p,
    };
    let denom = (v.clone() / k.bc2).sqrt() + k.eps;
    let p = p - (m.clone() / k.bc1) / denom * k.lr;
    (p, m, v)
}

/// [`adamw_composed`] as one loop over flex's f32 buffers, in the same order of operations.
fn adamw_flex(
    p: Tensor<Flex, 1>,
    g: Tensor<Flex, 1>,
    m: Tensor<Flex, 1>,
    v: Tensor<Flex, 1>,
    k: &Coeffs,
) -> (Tensor<Flex, 1>, Tensor<Flex, 1>, Tensor<Flex, 1>) {
    // Contiguous buffers of exactly n elements; `storage_mut` copies a shared one first.
    let prim = |t: Tensor<Flex, 1>| t.into_primitive().tensor().to_contiguous();
    let (mut p, g, mut m, mut v) = (prim(p), prim(g), prim(m), prim(v));
    // burn's scalar ops round their f64 operand to f32 the same way.
    let f = |x: f64| x as f32;
    let (b1, c1) = (f(k.beta1), f(1.0 - k.beta1));
    let (b2, c2) = (f(k.beta2), f(1.0 - k.beta2));
    // `p · 1` is `p` to the bit, so no decay is a factor of 1.
    let decay = k.decay.map_or(1.0, f);
    let (bc1, bc2, eps, lr) = (f(k.bc1), f(k.bc2), f(k.eps), f(k.lr));
    crate::model::kernels::adamw(
        p.storage_mut::<f32>(),
        g.storage::<f32>(),
        m.storage_mut::<f32>(),
        v.storage_mut::<f32>(),
        [b1, c1, b2, c2, decay, bc1, bc2, eps, lr],
    );
    let t = |x| Tensor::from_primitive(TensorPrimitive::Float(x));
    (t(p), t(m), t(v))
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn seeded(n: usize, seed: u64, lo: f32, hi: f32) -> Tensor<Flex, 1> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect();
        Tensor::from_data(TensorData::new(v, [n]), &Default::default())
    }

    fn bits(t: &Tensor<Flex, 1>) -> Vec<u32> {
        let v: Vec<f32> = t.to_data().to_vec().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn adamw_on_flex_buffers_gives_the_bits_of_the_composed_ops() {
        // More than two of the loop's chunks, so the split over threads is in play.
        let n = 70_001;
        let p = seeded(n, 1, -1.0, 1.0);
        let g = seeded(n, 2, -0.1, 0.1);
        let m = seeded(n, 3, -0.01, 0.01);
        let v = seeded(n, 4, 0.0, 1e-4);
        let before = [bits(&p), bits(&g), bits(&m), bits(&v)];
        for (weight_decay, lr, t) in [(0.01, 3e-4, 1), (0.0, 1e-3, 7), (0.1, 2e-5, 500)] {
            let hp = AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
            };
            let k = Coeffs::new(hp, lr, t);
            let fused = adamw_flex(p.clone(), g.clone(), m.clone(), v.clone(), &k);
            let composed = adamw_composed(p.clone(), g.clone(), m.clone(), v.clone(), &k);
            for (what, a, b) in [
                ("p", &fused.0, &composed.0),
                ("m", &fused.1, &composed.1),
                ("v", &fused.2, &composed.2),
            ] {
                let (a, b) = (bits(a), bits(b));
                if let Some(i) = (0..n).find(|&i| a[i] != b[i]) {
                    let (x, y) = (f32::from_bits(a[i]), f32::from_bits(b[i]));
                    panic!("{what}[{i}] at t={t}: fused {x:e}, composed {y:e}");
                }
            }
            assert_ne!(bits(&fused.0), before[0], "the step moved nothing");
        }
        // Shared inputs are copied before they are written.
        assert_eq!([bits(&p), bits(&g), bits(&m), bits(&v)], before);
    }
}
