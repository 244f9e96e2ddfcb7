//! Generation metrics: how often a model's own completions are right.
//!
//! - `exact_match`: the share of prompts whose greedy completion the correctness reward scores
//!   1 (the first `exact_answer` of `rewards`, else `{kind: exact_answer}`: the last number
//!   against the record's answer) — lm-evaluation-harness's `exact_match` on a generate-until
//!   task, with the answer extracted as the RL rewards extract it.
//! - `pass@k`: from `n` samples per prompt of which `c` are correct, the unbiased estimator of
//!   Chen et al. 2021 (HumanEval), `1 − C(n−c, k) / C(n, k)`, averaged over prompts; computed
//!   as their stable product `1 − Π_{i=n−c+1}^{n} (1 − k/i)`.
//! - `mean_reward`: the mean weighted reward of the `rewards` set over the sampled
//!   completions (the greedy ones when nothing is sampled).

/// HumanEval's unbiased pass@k for one prompt: `n` samples, `c` correct.
///
/// `1.0` when fewer than `k` samples are wrong (every draw of `k` holds a correct one).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    let mut keep = 1.0;
    for i in (n - c + 1)..=n {
        keep *= 1.0 - k as f64 / i as f64;
    }
    1.0 - keep
}

/// The mean over prompts of [`pass_at_k`], from each prompt's correct count out of `n`.
pub fn mean_pass_at_k(correct: &[usize], n: usize, k: usize) -> f64 {
    if correct.is_empty() {
        return 0.0;
    }
    correct.iter().map(|&c| pass_at_k(n, c, k)).sum::<f64>() / correct.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `1 − C(n−c, k)/C(n, k)` by exact binomials.
    fn by_binomials(n: u64, c: u64, k: u64) -> f64 {
        fn choose(n: u64, k: u64) -> f64 {
            if k > n {
                return 0.0;
            }
            (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
        }
        1.0 - choose(n - c, k) / choose(n, k)
    }

    #[test]
    fn pass_at_k_is_humaneval_s_estimator() {
        for n in 1..=12usize {
            for c in 0..=n {
                for k in 1..=n {
                    let want = by_binomials(n as u64, c as u64, k as u64);
                    let got = pass_at_k(n, c, k);
                    assert!(
                        (got - want).abs() < 1e-12,
                        "n {n} c {c} k {k}: {got} vs {want}"
                    );
                }
            }
        }
        // Hand-worked: 10 samples, 3 correct: pass@1 = 0.3, pass@5 = 1 − C(7,5)/C(10,5)
        // = 1 − 21/252 = 11/12.
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
        assert!((pass_at_k(10, 3, 5) - 11.0 / 12.0).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 0, 5), 0.0);
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
        assert!((mean_pass_at_k(&[0, 3, 10], 10, 1) - (0.0 + 0.3 + 1.0) / 3.0).abs() < 1e-12);
    }
}
