//! Seeded randomness for data stages, written out here (rather than through `rand`'s helpers)
//! so that a given seed selects the same records whatever `rand` version is linked.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        let n = n as u64;
        // Reject the lowest 2^64 mod n values so that every residue is equally likely.
        let threshold = n.wrapping_neg() % n;
        loop {
            let v = self.0.next_u64();
            if v >= threshold {
                return (v % n) as usize;
            }
        }
    }

    /// A uniform float in `[0, 1)` with 24 random bits.
    pub fn uniform(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }

    /// A standard normal float (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let u2 = (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * (1.0 - u1).ln()).sqrt();
        (r * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// `k` distinct indices of `0..n` (`k <= n`), in the order drawn (partial Fisher–Yates).
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<usize> = (0..20).map(|_| a.below(10)).collect();
        let ys: Vec<usize> = (0..20).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 10));
        let mut c = Rng::new(8);
        let zs: Vec<usize> = (0..20).map(|_| c.below(10)).collect();
        assert_ne!(xs, zs);
    }

    #[test]
    fn sample_is_distinct() {
        let mut r = Rng::new(1);
        let mut s = r.sample_indices(50, 20);
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 20);
    }
}
