//! Preference objectives as TRL's trainers define them (`DPOTrainer`'s sigmoid, IPO, hinge and
//! robust losses, `KTOTrainer` with its batch KL estimate, `ORPOTrainer`'s odds ratio), on
//! per-example log-probabilities. Every function is generic over the backend and differentiable
//! in the policy log-probs; reference log-probs are constants.
//!
//! - DPO: δ = [logp_θ(y_w) − logp_ref(y_w)] − [logp_θ(y_l) − logp_ref(y_l)] on summed completion
//!   log-probs; IPO on per-token means.
//! - KTO: z = max(0, mean over mismatched pairs of logp_θ(y'|x) − logp_ref(y'|x)), detached;
//!   desirable 1 − σ(β(Δ − z)), undesirable 1 − σ(β(z − Δ)), each weighted.
//! - ORPO: log odds on per-token mean log-probs, `−β log σ(log_odds)`; the NLL term is added by
//!   the objective (`super::objectives::OrpoObjective`).
//!
//! Shapes: every input is `[n]` (one value per example); losses come back per example so the
//! caller decides how to average.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::backend::Backend;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// DPO's loss variants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// −log σ(βδ)
    #[default]
    Sigmoid,
    /// (δ̄ − 1/(2β))², δ̄ from per-token mean log-ratios.
    Ipo,
    /// max(0, 1 − βδ)
    Hinge,
    /// [−(1−ε) log σ(βδ) + ε log σ(−βδ)] / (1 − 2ε)
    Robust,
}

impl DpoLoss {
    /// IPO works on per-token mean log-probs; the others on sums.
    pub fn uses_mean_logps(self) -> bool {
        self == DpoLoss::Ipo
    }
}

/// Per-example DPO losses and implicit rewards.
pub struct DpoOut<B: Backend> {
    /// `[n]`
    pub losses: Tensor<B, 1>,
    /// β(logp_θ(y_w) − logp_ref(y_w)), detached, `[n]`
    pub chosen_rewards: Tensor<B, 1>,
    /// β(logp_θ(y_l) − logp_ref(y_l)), detached, `[n]`
    pub rejected_rewards: Tensor<B, 1>,
}

/// DPO on (summed or, for IPO, mean) completion log-probs.
pub fn dpo<B: Backend>(
    policy_chosen: Tensor<B, 1>,
    policy_rejected: Tensor<B, 1>,
    ref_chosen: Tensor<B, 1>,
    ref_rejected: Tensor<B, 1>,
    beta: f64,
    kind: DpoLoss,
    label_smoothing: f64,
) -> DpoOut<B> {
    let chosen_ratio = policy_chosen - ref_chosen;
    let rejected_ratio = policy_rejected - ref_rejected;
    let delta = chosen_ratio.clone() - rejected_ratio.clone();
    let losses = match kind {
        DpoLoss::Sigmoid => log_sigmoid(delta * beta).neg(),
        DpoLoss::Ipo => (delta - 1.0 / (2.0 * beta)).powi_scalar(2),
        DpoLoss::Hinge => (delta * (-beta) + 1.0).clamp_min(0.0),
        DpoLoss::Robust => {
            let eps = label_smoothing;
            let x = delta * beta;
            (log_sigmoid(x.clone()).neg() * (1.0 - eps) + log_sigmoid(x.neg()) * eps)
                / (1.0 - 2.0 * eps)
        }
    };
    DpoOut {
        losses,
        chosen_rewards: (chosen_ratio * beta).detach(),
        rejected_rewards: (rejected_ratio * beta).detach(),
    }
}

/// Per-example KTO losses and the batch KL estimate used.
pub struct KtoOut<B: Backend> {
    /// Weighted per-example losses, `[n]`
    pub losses: Tensor<B, 1>,
    /// z = max(0, mean(logp_θ(y'|x) − logp_ref(y'|x))) over mismatched pairs, detached.
    pub kl: Tensor<B, 1>,
    /// β(logp_θ − logp_ref), detached, `[n]`
    pub rewards: Tensor<B, 1>,
}

/// KTO: `desirable[i]` is 1.0 for desirable examples and 0.0 for undesirable ones.
#[allow(clippy::too_many_arguments)]
pub fn kto<B: Backend>(
    policy: Tensor<B, 1>,
    reference: Tensor<B, 1>,
    policy_mismatched: Tensor<B, 1>,
    reference_mismatched: Tensor<B, 1>,
    desirable: Tensor<B, 1>,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> KtoOut<B> {
    let kl = (policy_mismatched - reference_mismatched)
        .mean()
        .clamp_min(0.0)
        .detach(); // [1]
    let delta = policy - reference; // [n]
    let n = delta.dims()[0];
    let z = kl.clone().expand([n]);
    let good = (sigmoid((delta.clone() - z.clone()) * beta).neg() + 1.0) * desirable_weight;
    let bad = (sigmoid((z - delta.clone()) * beta).neg() + 1.0) * undesirable_weight;
    let undesirable = desirable.clone().neg() + 1.0;
    KtoOut {
        losses: good * desirable + bad * undesirable,
        kl,
        rewards: (delta * beta).detach(),
    }
}

/// Weights for `balance: auto`, from the KTO paper's guidance λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]:
/// counts already in range keep (1, 1); otherwise the smaller class is up-weighted until the
/// ratio reaches the nearest end of the range (4/3 when desirable examples dominate, 1 when
/// undesirable ones do). The larger class keeps weight 1. 746 : 254 gives (1, 2.2028).
pub fn kto_balance(n_desirable: usize, n_undesirable: usize) -> (f64, f64) {
    let (d, u) = (n_desirable.max(1) as f64, n_undesirable.max(1) as f64);
    let ratio = d / u;
    if (1.0..=4.0 / 3.0).contains(&ratio) {
        (1.0, 1.0)
    } else if ratio > 4.0 / 3.0 {
        // Too many desirable: up-weight undesirable until λ_D·n_D / (λ_U·n_U) = 4/3.
        (1.0, d / (u * 4.0 / 3.0))
    } else {
        // Too few desirable: up-weight desirable until the ratio is 1.
        (u / d, 1.0)
    }
}

/// Per-example ORPO losses: `nll_chosen − β log σ(log_odds)` on per-token MEAN log-probs.
pub struct OrpoOut<B: Backend> {
    /// `[n]`: −β log σ(log_odds) (the odds-ratio term only; add the chosen NLL)
    pub ratio_losses: Tensor<B, 1>,
    /// log_odds, detached, `[n]`
    pub log_odds: Tensor<B, 1>,
}

pub fn orpo<B: Backend>(
    mean_logp_chosen: Tensor<B, 1>,
    mean_logp_rejected: Tensor<B, 1>,
    beta: f64,
) -> OrpoOut<B> {
    // log(1 − e^{l}) for l < 0, as log1p(−e^{l}).
    let log1m = |l: Tensor<B, 1>| l.exp().neg().log1p();
    let log_odds = (mean_logp_chosen.clone() - mean_logp_rejected.clone())
        - (log1m(mean_logp_chosen) - log1m(mean_logp_rejected));
    OrpoOut {
        ratio_losses: log_sigmoid(log_odds.clone()).neg() * beta,
        log_odds: log_odds.detach(),
    }
}
