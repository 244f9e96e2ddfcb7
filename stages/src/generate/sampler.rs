//! Choosing the next token from a row of logits, with transformers' `generate` semantics and
//! order: the repetition penalty, then (when sampling) temperature → top-k → top-p → min-p, then
//! one draw from the softmax of what is left.
//!
//! Every choice is a function of the logits, the tokens the row has seen and one uniform number
//! from the row's own random stream ([`row_rng`]: seeded by the stage seed, the prompt's index and
//! the sample's index), so a completion does not depend on the batch it was decoded in, on the
//! thread count or on a resume.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How tokens are chosen (transformers' `GenerationConfig` fields of the same names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Draw tokens from the (processed) distribution; `false` (default) takes the most likely
    /// token, ties to the lowest id (greedy).
    #[serde(default)]
    pub do_sample: bool,
    /// Divide the logits by this before top-k/top-p/min-p (sampling only); > 0.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (ties with the k-th kept); 0 keeps all.
    #[serde(default)]
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (nucleus sampling); 1 keeps all.
    #[serde(default = "one")]
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    #[serde(default)]
    pub min_p: f64,
    /// Penalize every token already in the prompt or the completion: a logit `s` becomes `s/p`
    /// when positive, `s·p` when negative (CTRL's penalty, as transformers applies it, greedy
    /// included); 1 is off.
    #[serde(default = "one")]
    pub repetition_penalty: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl Sampling {
    /// What is wrong with these settings, one message per field (`field`, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            out.push((
                "temperature",
                format!(
                    "temperature must be above 0, got {} (greedy decoding is `do_sample: false`)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            out.push((
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            out.push((
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            out.push((
                "repetition_penalty",
                format!(
                    "repetition_penalty must be above 0, got {}",
                    self.repetition_penalty
                ),
            ));
        }
        out
    }
}

/// The random stream of one sample: a function of the seed, the prompt's index and the
/// sample's index alone.
pub fn row_rng(seed: u64, prompt: usize, sample: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(prompt as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(sample as u64).to_le_bytes());
    key[24..].copy_from_slice(b"generate");
    ChaCha8Rng::from_seed(*blake3::hash(&key).as_bytes())
}

/// Apply the repetition penalty to `logits` for every token marked in `seen`.
pub fn penalize(logits: &mut [f32], seen: &[bool], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    for (s, _) in logits.iter_mut().zip(seen).filter(|(_, seen)| **seen) {
        *s = if *s < 0.0 { *s * p } else { *s / p };
    }
}

/// The index of the largest logit, the lowest on ties (torch's `argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in logits.iter().enumerate() {
        if s > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Temperature, top-k, top-p and min-p on penalized `logits` (in place): what is filtered out
/// becomes −∞.
pub fn warp(logits: &mut [f32], s: &Sampling) {
    if s.temperature != 1.0 {
        let t = s.temperature as f32;
        logits.iter_mut().for_each(|x| *x /= t);
    }
    if s.top_k > 0 && s.top_k < logits.len() {
        let mut sorted: Vec<f32> = logits.to_vec();
        let k = s.top_k;
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        logits
            .iter_mut()
            .filter(|x| **x < kth)
            .for_each(|x| *x = f32::NEG_INFINITY);
    }
    if s.top_p < 1.0 {
        let probs = softmax(logits);
        // Ascending by probability (ties by id, stable); drop the prefix whose cumulative
        // probability stays at or below 1 − top_p, always keeping the most likely token.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
        let mut cum = 0.0f64;
        let last = order.len() - 1;
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if rank < last && cum <= 1.0 - s.top_p {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }
    if s.min_p > 0.0 {
        let probs = softmax(logits);
        let top = probs.iter().copied().fold(0.0f64, f64::max);
        let best = argmax(logits) as usize;
        for (i, p) in probs.iter().enumerate() {
            if i != best && *p < s.min_p * top {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }
}

/// `softmax(logits)` in f64 (−∞ gives 0).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// `log_softmax(logits)[token]` in f64.
pub fn log_prob(logits: &[f32], token: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    logits[token as usize] as f64 - m - z.ln()
}

/// One draw from `softmax(logits)` with the uniform `u ∈ [0, 1)`: the first token whose
/// cumulative probability passes `u` (the last possible one if rounding leaves `u` above the
/// total).
pub fn draw(logits: &[f32], u: f64) -> u32 {
    let probs = softmax(logits);
    let mut cum = 0.0;
    let mut last = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            cum += p;
            last = i;
            if u < cum {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Choose the next token from `logits` (modified in place) for a row that has seen the tokens
/// marked in `seen`, drawing from `rng` when sampling.
pub fn choose(logits: &mut [f32], seen: &[bool], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    penalize(logits, seen, s.repetition_penalty);
    if !s.do_sample {
        return argmax(logits);
    }
    warp(logits, s);
    draw(logits, rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut l = [2.0, -2.0, 1.0];
        penalize(&mut l, &[true, true, false], 2.0);
        assert_eq!(l, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_with_the_kth() {
        let mut l = [1.0, 3.0, 2.0, 2.0, 0.0];
        warp(
            &mut l,
            &Sampling {
                top_k: 2,
                ..Sampling::default()
            },
        );
        assert_eq!(l, [f32::NEG_INFINITY, 3.0, 2.0, 2.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.2: top_p 0.7 drops 0.2 (0.2 ≤ 0.3), 0.45 drops 0.2 and 0.3
        // (0.5 ≤ 0.55), 0.81 keeps all (0.2 > 0.19).
        let base = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let kept = |p: f64| {
            let mut l = base;
            warp(
                &mut l,
                &Sampling {
                    top_p: p,
                    ..Sampling::default()
                },
            );
            l.iter().filter(|x| x.is_finite()).count()
        };
        assert_eq!(kept(0.7), 2);
        assert_eq!(kept(0.45), 1);
        assert_eq!(kept(0.81), 3);
    }

    #[test]
    fn min_p_is_relative_to_the_most_likely_token() {
        let mut l = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        warp(
            &mut l,
            &Sampling {
                min_p: 0.5,
                ..Sampling::default()
            },
        );
        // 0.2 < 0.5 · 0.5 is dropped, 0.3 kept.
        assert!(l[0].is_finite() && l[1].is_finite() && l[2] == f32::NEG_INFINITY);
    }

    #[test]
    fn streams_depend_on_seed_prompt_and_sample_only() {
        let a: u64 = row_rng(1, 2, 3).random();
        assert_eq!(a, row_rng(1, 2, 3).random::<u64>());
        assert_ne!(a, row_rng(1, 3, 2).random::<u64>());
        assert_ne!(a, row_rng(2, 2, 3).random::<u64>());
    }
}
