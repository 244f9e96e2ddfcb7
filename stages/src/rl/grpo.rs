//! GRPO's objective, TRL's `GRPOTrainer` (trl 1.x): group-relative advantages and the clipped,
//! KL-regularized per-token loss with its four normalizations. Pure functions of a rollout's
//! log-probabilities, so that the numbers can be held to TRL's on a fixed batch.
//!
//! For completions `i` of a step (prompts × G), tokens `t` and mask `m` (1 up to and including
//! the first end-of-sequence id):
//!
//! - advantages ([`advantages`]): `A_i = r_i − mean(group of i)`, divided by `std + 1e-4`
//!   (Bessel-corrected) over the group (`scale_rewards: group`), over the whole batch (`batch`),
//!   or not at all (`none`); verl uses 1e-6;
//! - ratio `ρ = exp(logπθ − logπold)`; per-token loss `l = −min(ρA, clip(ρ, 1−ε, 1+ε_high)·A)
//!   + β·k3`, `k3 = exp(ref − logπθ) − (ref − logπθ) − 1`, multiplied by `ρ` when
//!   `bias_correction_kl` (TRL 1.16's default `use_bias_correction_kl`);
//! - the loss over the micro-batch ([`LossType`]): `grpo` averages each row's mean, `bnpo`
//!   divides the masked sum by the micro-batch's tokens, `dr_grpo` by rows × the maximum
//!   completion length (each of those ÷ gradient-accumulation passes), `dapo` by the active
//!   tokens of the whole step's rollout.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How rewards are scaled into advantages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// By the standard deviation of the prompt's group (TRL's default).
    #[default]
    Group,
    /// By the standard deviation over the whole batch.
    Batch,
    /// Not scaled (Dr. GRPO).
    None,
}

/// How the per-token losses are aggregated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over completions of each completion's mean token loss.
    Grpo,
    /// Masked sum over the micro-batch's active tokens.
    Bnpo,
    /// Masked sum over rows × `max_completion_length` (Dr. GRPO).
    DrGrpo,
    /// Masked sum over the active tokens of the whole step's rollout (TRL's default).
    #[default]
    Dapo,
}

/// The epsilon added to a standard deviation before dividing (TRL).
pub const STD_EPS: f64 = 1e-4;

/// Advantages of `rewards` laid out as consecutive groups of `group` completions per prompt.
///
/// # Panics
/// When `group` is 0 or does not divide the rewards.
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Vec<f64> {
    assert!(
        group > 0 && rewards.len().is_multiple_of(group),
        "{} rewards in groups of {group}",
        rewards.len()
    );
    let batch_std = std(rewards);
    rewards
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            let div = match scale {
                ScaleRewards::Group => std(g) + STD_EPS,
                ScaleRewards::Batch => batch_std + STD_EPS,
                ScaleRewards::None => 1.0,
            };
            g.iter().map(move |r| (r - mean) / div)
        })
        .collect()
}

/// Bessel-corrected standard deviation (0 for fewer than two values).
pub fn std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// The objective's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objective {
    pub beta: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub loss_type: LossType,
    pub bias_correction_kl: bool,
    pub max_completion_length: usize,
    /// Gradient-accumulation passes per optimizer step.
    pub grad_accum: usize,
    /// Active tokens in the whole step's rollout (`dapo`'s normalizer).
    pub step_tokens: f64,
}

/// The loss of a micro-batch and what TRL logs of it.
pub struct Terms<B: Backend> {
    /// `[1]`
    pub loss: Tensor<B, 1>,
    /// Mean masked k3 (after the bias correction when on); `None` when β = 0.
    pub kl: Option<Tensor<B, 1>>,
    /// Share of active tokens with `ρ < 1 − ε` and `A < 0`.
    pub clip_low: Tensor<B, 1>,
    /// Share of active tokens with `ρ > 1 + ε_high` and `A > 0`.
    pub clip_high: Tensor<B, 1>,
}

/// The GRPO loss of a micro-batch (see the module doc).
///
/// # Shapes
/// - logp, old, reference, mask: `[rows, t]`; adv: `[rows]`
/// - output: `[1]` each
pub fn loss<B: Backend>(
    logp: Tensor<B, 2>,
    old: Tensor<B, 2>,
    reference: Option<Tensor<B, 2>>,
    adv: Tensor<B, 1>,
    mask: Tensor<B, 2>,
    o: &Objective,
) -> Terms<B> {
    let [rows, _] = logp.dims();
    let adv = adv.unsqueeze_dim::<2>(1); // [rows, 1]
    let ratio = (logp.clone() - old).exp(); // [rows, t]
    let clipped = ratio
        .clone()
        .clamp(1.0 - o.epsilon_low, 1.0 + o.epsilon_high);
    let unclipped_loss = ratio.clone() * adv.clone();
    let clipped_loss = clipped * adv.clone();
    let mut per_token = unclipped_loss.min_pair(clipped_loss).neg(); // [rows, t]
    let tokens = mask.clone().sum().clamp_min(1.0); // [1]
    let mut kl = None;
    if o.beta != 0.0
        && let Some(reference) = reference
    {
        let d = reference - logp; // ref − logπθ
        let mut k3 = d.clone().exp() - d - 1.0;
        if o.bias_correction_kl {
            k3 = k3 * ratio.clone();
        }
        kl = Some((k3.clone() * mask.clone()).sum().detach() / tokens.clone().detach());
        per_token = per_token + k3 * o.beta;
    }
    let masked = per_token * mask.clone();
    let ga = o.grad_accum.max(1) as f64;
    let loss = match o.loss_type {
        LossType::Grpo => {
            let per_row = masked.sum_dim(1) / mask.clone().sum_dim(1).clamp_min(1.0); // [rows, 1]
            per_row.mean() / ga
        }
        LossType::Bnpo => masked.sum() / tokens.clone() / ga,
        LossType::DrGrpo => masked.sum() / ((rows * o.max_completion_length) as f64 * ga),
        LossType::Dapo => masked.sum() / o.step_tokens.max(1.0),
    };
    let (ratio, adv) = (ratio.detach(), adv.detach());
    let share = |hit: Tensor<B, 2>| (hit * mask.clone()).sum() / tokens.clone().detach();
    let low =
        ratio.clone().lower_elem(1.0 - o.epsilon_low).float() * adv.clone().lower_elem(0.0).float();
    let high = ratio.greater_elem(1.0 + o.epsilon_high).float() * adv.greater_elem(0.0).float();
    Terms {
        loss,
        kl,
        clip_low: share(low),
        clip_high: share(high),
    }
}

#[cfg(test)]
mod tests {
    //! A fixed batch: B = 6 rows of T = 4, two prompts × G = 3, reward weights [1, 0.5],
    //! β = 0.04, ε = 0.2, ε_high = 0.28, GA = 1; the expected values come from TRL's own
    //! `_compute_loss` on the batch.
    use super::*;
    use burn::backend::Autodiff;
    use burn::backend::Flex;
    use burn::backend::flex::FlexDevice;
    use burn::tensor::TensorData;

    type AD = Autodiff<Flex>;

    const MASK: [[f32; 4]; 6] = [
        [1., 1., 1., 1.],
        [1., 1., 1., 0.],
        [1., 1., 0., 0.],
        [1., 1., 1., 1.],
        [1., 0., 0., 0.],
        [1., 1., 1., 0.],
    ];
    const LOGP: [[f32; 4]; 6] = [
        [-0.5, -1.0, -0.2, -2.0],
        [-0.3, -0.8, -1.5, 0.0],
        [-1.2, -0.1, 0.0, 0.0],
        [-0.7, -0.4, -0.9, -0.05],
        [-2.5, 0.0, 0.0, 0.0],
        [-0.6, -0.6, -1.1, 0.0],
    ];
    const OLD: [[f32; 4]; 6] = [
        [-0.9, -0.9, -0.2, -1.5],
        [-0.3, -1.2, -1.4, 0.0],
        [-0.9, -0.1, 0.0, 0.0],
        [-0.7, -0.6, -0.9, -0.35],
        [-2.0, 0.0, 0.0, 0.0],
        [-0.6, -0.5, -1.3, 0.0],
    ];
    const REF: [[f32; 4]; 6] = [
        [-0.55, -1.1, -0.25, -1.8],
        [-0.4, -0.9, -1.5, 0.0],
        [-1.1, -0.2, 0.0, 0.0],
        [-0.8, -0.5, -1.0, -0.1],
        [-2.2, 0.0, 0.0, 0.0],
        [-0.7, -0.6, -1.2, 0.0],
    ];

    fn rewards() -> Vec<f64> {
        let per = [[1., 1.], [0., 1.], [0., 0.], [1., 0.], [1., 1.], [1., 1.]];
        per.iter().map(|r| r[0] + 0.5 * r[1]).collect()
    }

    fn t2(v: [[f32; 4]; 6]) -> Tensor<AD, 2> {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [6, 4]), &FlexDevice)
    }

    fn objective(loss_type: LossType, bias_correction_kl: bool) -> Objective {
        Objective {
            beta: 0.04,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            loss_type,
            bias_correction_kl,
            max_completion_length: 4,
            grad_accum: 1,
            step_tokens: 17.0,
        }
    }

    fn scalar(t: Tensor<AD, 1>) -> f64 {
        t.into_data().into_vec::<f32>().unwrap()[0] as f64
    }

    fn run(o: &Objective, old: [[f32; 4]; 6]) -> (Terms<AD>, Tensor<AD, 2>) {
        let adv: Vec<f32> = advantages(&rewards(), 3, ScaleRewards::Group)
            .iter()
            .map(|&a| a as f32)
            .collect();
        let adv = Tensor::from_data(TensorData::new(adv, [6]), &FlexDevice);
        let logp = t2(LOGP).require_grad();
        let terms = loss(logp.clone(), t2(old), Some(t2(REF)), adv, t2(MASK), o);
        (terms, logp)
    }

    #[test]
    fn advantages_match_the_three_scalings() {
        let close = |got: Vec<f64>, want: [f64; 6]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
            }
        };
        let r = rewards();
        assert_eq!(r, [1.5, 0.5, 0.0, 1.0, 1.5, 1.5]);
        close(
            advantages(&r, 3, ScaleRewards::Group),
            [
                1.090947, -0.218189, -0.872757, -1.154301, 0.577150, 0.577150,
            ],
        );
        close(
            advantages(&r, 3, ScaleRewards::Batch),
            [
                1.317407, -0.263481, -1.053926, -0.526963, 0.263481, 0.263481,
            ],
        );
        close(
            advantages(&r, 3, ScaleRewards::None),
            [
                0.833333, -0.166667, -0.666667, -0.333333, 0.166667, 0.166667,
            ],
        );
        assert!((std(&r) - 0.632456).abs() < 1e-6);
    }

    #[test]
    fn losses_kl_and_clip_ratios_match_trl_on_the_fixed_batch() {
        let cases = [
            (false, [0.061505, 0.076652, 0.054295, 0.076652], 0.007274),
            (true, [0.061366, 0.076595, 0.054255, 0.076595], 0.005846),
        ];
        let types = [
            LossType::Grpo,
            LossType::Bnpo,
            LossType::DrGrpo,
            LossType::Dapo,
        ];
        for (bias, want, want_kl) in cases {
            for (ty, w) in types.iter().zip(want) {
                let (terms, _) = run(&objective(*ty, bias), OLD);
                let got = scalar(terms.loss);
                assert!((got - w).abs() < 1e-5, "{ty:?} bias {bias}: {got} vs {w}");
                let kl = scalar(terms.kl.unwrap());
                assert!((kl - want_kl).abs() < 1e-5, "kl {kl} vs {want_kl}");
                assert!((scalar(terms.clip_low) - 0.058824).abs() < 1e-5);
                assert!((scalar(terms.clip_high) - 0.058824).abs() < 1e-5);
            }
        }
        // One pass per rollout: old = logπθ, ρ ≡ 1.
        for bias in [false, true] {
            let (terms, _) = run(&objective(LossType::Dapo, bias), LOGP);
            assert!((scalar(terms.loss) - 0.020579).abs() < 1e-5);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (terms, logp) = run(&objective(LossType::Dapo, false), OLD);
        let grads = terms.loss.backward();
        let g = logp
            .grad(&grads)
            .unwrap()
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        let want = [0.000115, -0.057843, -0.064059, -0.039444];
        for (got, w) in g[..4].iter().zip(want) {
            assert!((*got as f64 - w).abs() < 1e-5, "{:?} vs {want:?}", &g[..4]);
        }
    }
}
