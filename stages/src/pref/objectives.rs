//! DPO, KTO and ORPO as [`Objective`]s of the shared training loop. Each micro-batch runs the
//! policy once over all its sequences (chosen and rejected, or example and mismatched companion)
//! in one padded batch.

use std::collections::BTreeMap;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::data::{LabeledItem, LogProb, PairItem, floats, logprobs, sequence_logps};
use super::losses::{DpoLoss, dpo, kto, orpo};
use crate::model::CausalLm;
use crate::text::Example;
use crate::train::Objective;
use crate::train::batch::make_batch;

fn consts<B: Backend>(v: &[f64], device: &B::Device) -> Tensor<B, 1> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn device<B: Backend>(m: &CausalLm<B>) -> B::Device {
    m.model.embed_tokens.weight.val().device()
}

/// A pair's reference log-probs; computed by `prepare` when no artifact supplied them.
fn pair_ref(p: &PairItem) -> (LogProb, LogProb) {
    p.reference.unwrap_or_default()
}

pub struct DpoObjective {
    pub beta: f64,
    pub loss: DpoLoss,
    pub label_smoothing: f64,
    pub pad: u32,
}

impl DpoObjective {
    /// Per-pair losses and rewards for `items` under `model`.
    fn forward<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[&PairItem],
    ) -> super::losses::DpoOut<B> {
        let dev = device(model);
        let seqs: Vec<&Example> = items
            .iter()
            .map(|p| &p.chosen)
            .chain(items.iter().map(|p| &p.rejected))
            .collect();
        let n = items.len();
        let (sum, count) = sequence_logps(model, &seqs, self.pad);
        let (policy, refs) = if self.loss.uses_mean_logps() {
            let refs: Vec<f64> = items
                .iter()
                .map(|p| pair_ref(p).0.mean())
                .chain(items.iter().map(|p| pair_ref(p).1.mean()))
                .collect();
            (sum / count, refs)
        } else {
            let refs: Vec<f64> = items
                .iter()
                .map(|p| pair_ref(p).0.sum)
                .chain(items.iter().map(|p| pair_ref(p).1.sum))
                .collect();
            (sum, refs)
        };
        let refs = consts::<B>(&refs, &dev);
        dpo(
            policy.clone().narrow(0, 0, n),
            policy.narrow(0, n, n),
            refs.clone().narrow(0, 0, n),
            refs.narrow(0, n, n),
            self.beta,
            self.loss,
            self.label_smoothing,
        )
    }
}

/// Summed DPO metrics: rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin.
fn dpo_metrics(chosen: &[f64], rejected: &[f64]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert("rewards/chosen".into(), chosen.iter().sum());
    m.insert("rewards/rejected".into(), rejected.iter().sum());
    m.insert(
        "rewards/accuracy".into(),
        chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64,
    );
    m.insert(
        "rewards/margin".into(),
        chosen.iter().zip(rejected).map(|(c, r)| c - r).sum(),
    );
    m
}

fn averaged(mut m: BTreeMap<String, f64>, n: usize) -> BTreeMap<String, f64> {
    for v in m.values_mut() {
        *v /= n.max(1) as f64;
    }
    m
}

impl Objective for DpoObjective {
    type Item = PairItem;
    fn weight(&self, _: &PairItem) -> f64 {
        1.0
    }
    fn tokens(&self, p: &PairItem) -> usize {
        p.chosen.ids.len() + p.rejected.ids.len()
    }
    fn loss<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        items: &[&PairItem],
    ) -> (Tensor<B, 1>, BTreeMap<String, f64>) {
        let out = self.forward(model, items);
        let m = dpo_metrics(&floats(out.chosen_rewards), &floats(out.rejected_rewards));
        (out.losses.sum(), m)
    }
    fn eval<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[PairItem],
        batch: usize,
    ) -> (f64, BTreeMap<String, f64>) {
        let (mut loss, mut c, mut r) = (0.0, Vec::new(), Vec::new());
        for chunk in items.chunks(batch.max(1)) {
            let refs: Vec<&PairItem> = chunk.iter().collect();
            let out = self.forward(model, &refs);
            loss += floats(out.losses).iter().sum::<f64>();
            c.extend(floats(out.chosen_rewards));
            r.extend(floats(out.rejected_rewards));
        }
        let n = items.len();
        (loss / n.max(1) as f64, averaged(dpo_metrics(&c, &r), n))
    }
    fn needs_reference(&self) -> bool {
        true
    }
    fn prepare<B: Backend>(&self, reference: &CausalLm<B>, items: &mut [PairItem], batch: usize) {
        fill_reference(reference, items, batch, self.pad);
    }
}

/// An item whose two sequences (chosen and rejected, or example and mismatched companion) get
/// reference log-probs.
pub trait NeedsReference {
    /// The record this item came from (what a `logprobs` artifact is keyed by).
    fn index(&self) -> usize;
    fn sequences(&self) -> [&Example; 2];
    fn reference_mut(&mut self) -> &mut Option<(LogProb, LogProb)>;
}

impl NeedsReference for PairItem {
    fn index(&self) -> usize {
        self.index
    }
    fn sequences(&self) -> [&Example; 2] {
        [&self.chosen, &self.rejected]
    }
    fn reference_mut(&mut self) -> &mut Option<(LogProb, LogProb)> {
        &mut self.reference
    }
}

impl NeedsReference for LabeledItem {
    fn index(&self) -> usize {
        self.index
    }
    fn sequences(&self) -> [&Example; 2] {
        [&self.example, &self.mismatched]
    }
    fn reference_mut(&mut self) -> &mut Option<(LogProb, LogProb)> {
        &mut self.reference
    }
}

/// Reference log-probs under `reference` for the items that lack them.
pub fn fill_reference<B: Backend, T: NeedsReference>(
    reference: &CausalLm<B>,
    items: &mut [T],
    batch: usize,
    pad: u32,
) {
    let missing: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].reference_mut().is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let seqs: Vec<&Example> = missing.iter().flat_map(|&i| items[i].sequences()).collect();
    let lp = logprobs(reference, &seqs, batch, pad);
    for (k, &i) in missing.iter().enumerate() {
        *items[i].reference_mut() = Some((lp[2 * k], lp[2 * k + 1]));
    }
}

pub struct KtoObjective {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    pub pad: u32,
}

impl KtoObjective {
    fn forward<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[&LabeledItem],
    ) -> super::losses::KtoOut<B> {
        let dev = device(model);
        let n = items.len();
        let seqs: Vec<&Example> = items
            .iter()
            .map(|i| &i.example)
            .chain(items.iter().map(|i| &i.mismatched))
            .collect();
        let (sum, _) = sequence_logps(model, &seqs, self.pad);
        let r = |f: &dyn Fn(&LabeledItem) -> f64| -> Tensor<B, 1> {
            consts::<B>(&items.iter().map(|i| f(i)).collect::<Vec<_>>(), &dev)
        };
        let ref_ex = r(&|i| i.reference.unwrap_or_default().0.sum);
        let ref_mm = r(&|i| i.reference.unwrap_or_default().1.sum);
        let desirable = r(&|i| if i.desirable { 1.0 } else { 0.0 });
        kto(
            sum.clone().narrow(0, 0, n),
            ref_ex,
            sum.narrow(0, n, n),
            ref_mm,
            desirable,
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
        )
    }
}

/// Summed KTO metrics over a set of examples.
fn kto_metrics(rewards: &[f64], desirable: &[bool], kl: f64) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let (mut d, mut nd, mut u, mut nu) = (0.0, 0usize, 0.0, 0usize);
    for (r, &good) in rewards.iter().zip(desirable) {
        if good {
            d += r;
            nd += 1;
        } else {
            u += r;
            nu += 1;
        }
    }
    let n = rewards.len() as f64;
    m.insert("kl".into(), kl * n);
    // Class means, scaled by n so that the loop's division by n leaves the means.
    if nd > 0 {
        m.insert("rewards/desirable".into(), d / nd as f64 * n);
    }
    if nu > 0 {
        m.insert("rewards/undesirable".into(), u / nu as f64 * n);
    }
    if nd > 0 && nu > 0 {
        m.insert("rewards/margin".into(), (d / nd as f64 - u / nu as f64) * n);
    }
    m
}

impl Objective for KtoObjective {
    type Item = LabeledItem;
    fn weight(&self, _: &LabeledItem) -> f64 {
        1.0
    }
    fn tokens(&self, i: &LabeledItem) -> usize {
        i.example.ids.len() + i.mismatched.ids.len()
    }
    fn loss<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        items: &[&LabeledItem],
    ) -> (Tensor<B, 1>, BTreeMap<String, f64>) {
        let out = self.forward(model, items);
        let labels: Vec<bool> = items.iter().map(|i| i.desirable).collect();
        let kl = floats(out.kl)[0];
        let m = kto_metrics(&floats(out.rewards), &labels, kl);
        (out.losses.sum(), m)
    }
    fn eval<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[LabeledItem],
        batch: usize,
    ) -> (f64, BTreeMap<String, f64>) {
        let (mut loss, mut rewards, mut kls) = (0.0, Vec::new(), Vec::new());
        // Batches of at least two, so the KL estimate has a mismatched pair to average.
        for chunk in items.chunks(batch.max(2)) {
            let refs: Vec<&LabeledItem> = chunk.iter().collect();
            let out = self.forward(model, &refs);
            loss += floats(out.losses).iter().sum::<f64>();
            kls.push(floats(out.kl)[0]);
            rewards.extend(floats(out.rewards));
        }
        let labels: Vec<bool> = items.iter().map(|i| i.desirable).collect();
        let kl = kls.iter().sum::<f64>() / kls.len().max(1) as f64;
        let n = items.len();
        (
            loss / n.max(1) as f64,
            averaged(kto_metrics(&rewards, &labels, kl), n),
        )
    }
    fn needs_reference(&self) -> bool {
        true
    }
    fn prepare<B: Backend>(
        &self,
        reference: &CausalLm<B>,
        items: &mut [LabeledItem],
        batch: usize,
    ) {
        fill_reference(reference, items, batch, self.pad);
    }
}

/// Which tokens ORPO's NLL term averages over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrpoNll {
    /// Every token of the chosen sequences, prompt included (TRL's `ORPOTrainer`: "orpo chosen
    /// nll loss is computed over the full prompt and response").
    #[default]
    AllTokens,
    /// The chosen completions' target tokens only (SFT's mask).
    Completion,
}

/// ORPO as TRL computes it per batch: the chosen sequences' NLL as one token mean over the
/// batch (`CrossEntropyLoss` over the chosen tokens, see [`OrpoNll`]) plus the mean odds-ratio
/// term on per-token mean completion log-probs.
pub struct OrpoObjective {
    pub beta: f64,
    pub nll: OrpoNll,
    pub pad: u32,
}

impl OrpoObjective {
    /// (the batch's loss times its pair count, per-pair log odds, the batch's chosen NLL per
    /// token). Times the pair count, because the loop divides a step's summed loss by its pairs:
    /// one micro-batch then gives TRL's `nll − mean(β log σ(log_odds))` exactly.
    fn forward<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[&PairItem],
    ) -> (Tensor<B, 1>, Tensor<B, 1>, f64) {
        let n = items.len();
        let seqs: Vec<&Example> = items
            .iter()
            .map(|p| &p.chosen)
            .chain(items.iter().map(|p| &p.rejected))
            .collect();
        let dev = device(model);
        let batch = make_batch::<B>(&seqs, self.pad, &dev);
        let t = batch.ids.dims()[1];
        let (nll, w) = model.token_nll(batch.ids, batch.targets); // [2n, t-1]
        let sum = (nll.clone() * w.clone()).sum_dim(1).reshape([2 * n]).neg();
        let count = w.clone().sum_dim(1).reshape([2 * n]);
        let mean = sum / count; // per-token mean completion log-probs, [2n]
        let out = orpo(
            mean.clone().narrow(0, 0, n),
            mean.narrow(0, n, n),
            self.beta,
        );
        let chosen_w = match self.nll {
            OrpoNll::Completion => w.narrow(0, 0, n),
            OrpoNll::AllTokens => {
                // Every real (non-padding) position after the first.
                let mask: Vec<f32> = items
                    .iter()
                    .flat_map(|p| (1..t).map(move |i| f32::from(u8::from(i < p.chosen.ids.len()))))
                    .collect();
                Tensor::from_data(TensorData::new(mask, [n, t - 1]), &dev)
            }
        };
        // The tokens the NLL averages over, counted on the host (no device round trip).
        let tokens: usize = items
            .iter()
            .map(|p| match self.nll {
                OrpoNll::AllTokens => p.chosen.ids.len().saturating_sub(1),
                OrpoNll::Completion => p.chosen.target_count(),
            })
            .sum();
        let nll = (nll.narrow(0, 0, n) * chosen_w).sum() / tokens.max(1) as f64; // [1]
        let nll_value = floats(nll.clone().detach())[0];
        (
            nll * n as f64 + out.ratio_losses.sum(),
            out.log_odds,
            nll_value,
        )
    }
}

fn orpo_metrics(log_odds: &[f64], nll: f64) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert("log_odds".into(), log_odds.iter().sum());
    // Per pair, so that the loop's division by the pair count leaves the batch's token mean.
    m.insert("nll_chosen".into(), nll * log_odds.len() as f64);
    m.insert(
        "rewards/accuracy".into(),
        log_odds.iter().filter(|&&x| x > 0.0).count() as f64,
    );
    m
}

impl Objective for OrpoObjective {
    type Item = PairItem;
    fn weight(&self, _: &PairItem) -> f64 {
        1.0
    }
    fn tokens(&self, p: &PairItem) -> usize {
        p.chosen.ids.len() + p.rejected.ids.len()
    }
    fn loss<B: AutodiffBackend>(
        &self,
        model: &CausalLm<B>,
        items: &[&PairItem],
    ) -> (Tensor<B, 1>, BTreeMap<String, f64>) {
        let (loss, log_odds, nll) = self.forward(model, items);
        (loss, orpo_metrics(&floats(log_odds), nll))
    }
    /// Held out: TRL's per-batch loss averaged over batches, weighted by their pair counts.
    fn eval<B: Backend>(
        &self,
        model: &CausalLm<B>,
        items: &[PairItem],
        batch: usize,
    ) -> (f64, BTreeMap<String, f64>) {
        let (mut loss, mut lo, mut nll) = (0.0, Vec::new(), 0.0);
        for chunk in items.chunks(batch.max(1)) {
            let refs: Vec<&PairItem> = chunk.iter().collect();
            let (l, o, batch_nll) = self.forward(model, &refs);
            loss += floats(l)[0];
            nll += batch_nll * chunk.len() as f64;
            lo.extend(floats(o));
        }
        let n = items.len();
        let mut m = orpo_metrics(&lo, 0.0);
        m.insert("nll_chosen".into(), nll);
        (loss / n.max(1) as f64, averaged(m, n))
    }
}
