//! 4-bit NormalFloat (NF4) storage for frozen base weights (QLoRA, Dettmers et al. 2023).
//!
//! - Values are grouped in blocks of [`BLOCK`] (64); each block stores its absmax and, per
//!   value, the index (4 bits, two per byte) of the nearest of the 16 [`NF4_CODES`] to
//!   `x / absmax`.
//! - Double quantization: the per-block absmax values (f32) are themselves stored in 8 bits:
//!   their mean is subtracted and the rest quantized symmetrically to int8 in groups of
//!   [`SCALE_BLOCK`] (256) scales, each group with one f32 scale. (bitsandbytes uses its
//!   dynamic 8-bit map for this second level; a linear int8 map is used here, and the round-trip
//!   tests bound its error.)
//!
//! Storage per value: 4 bits + 8/64 bits (absmax) + 32/(64·256) bits (second-level scale) ≈
//! 4.127 bits, plus one f32 mean per tensor. The forward pass dequantizes on the fly.

/// Values per absmax block.
pub const BLOCK: usize = 64;
/// Absmax values per second-level scale.
pub const SCALE_BLOCK: usize = 256;

/// The 16 NF4 levels, ascending (from the QLoRA paper / bitsandbytes).
pub const NF4_CODES: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A tensor stored as NF4 with double-quantized block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    /// Two 4-bit codes per byte, low nibble first.
    pub codes: Vec<u8>,
    /// Per-block absmax, minus `absmax_mean`, quantized to int8.
    pub absmax_q: Vec<i8>,
    /// One scale per [`SCALE_BLOCK`] absmax values.
    pub absmax_scale: Vec<f32>,
    pub absmax_mean: f32,
}

fn nearest_code(x: f32) -> u8 {
    // The levels are ascending: the nearest is decided by the midpoints.
    let mut best = 0u8;
    let mut best_d = f32::INFINITY;
    for (i, &c) in NF4_CODES.iter().enumerate() {
        let d = (x - c).abs();
        if d < best_d {
            best_d = d;
            best = i as u8;
        }
    }
    best
}

impl Nf4Tensor {
    /// Quantize `values` (row-major, `shape`).
    pub fn quantize(values: &[f32], shape: &[usize]) -> Nf4Tensor {
        let n = values.len();
        let blocks = n.div_ceil(BLOCK);
        let mut absmax = Vec::with_capacity(blocks);
        let mut codes = vec![0u8; n.div_ceil(2)];
        for b in 0..blocks {
            let chunk = &values[b * BLOCK..((b + 1) * BLOCK).min(n)];
            let m = chunk.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            absmax.push(m);
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            for (j, &x) in chunk.iter().enumerate() {
                let i = b * BLOCK + j;
                let q = nearest_code(x * inv);
                codes[i / 2] |= if i.is_multiple_of(2) { q } else { q << 4 };
            }
        }
        // Second level: absmax − mean, int8 per group of SCALE_BLOCK.
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / blocks.max(1) as f64;
        let mean = mean as f32;
        let mut absmax_q = Vec::with_capacity(blocks);
        let mut absmax_scale = Vec::with_capacity(blocks.div_ceil(SCALE_BLOCK));
        for group in absmax.chunks(SCALE_BLOCK) {
            let m = group.iter().fold(0.0f32, |a, &x| a.max((x - mean).abs()));
            let scale = m / 127.0;
            absmax_scale.push(scale);
            for &a in group {
                let q = if scale > 0.0 {
                    ((a - mean) / scale).round().clamp(-127.0, 127.0) as i8
                } else {
                    0
                };
                absmax_q.push(q);
            }
        }
        Nf4Tensor {
            shape: shape.to_vec(),
            codes,
            absmax_q,
            absmax_scale,
            absmax_mean: mean,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block scale of block `b`, as dequantization uses it.
    pub fn absmax(&self, b: usize) -> f32 {
        self.absmax_mean + self.absmax_q[b] as f32 * self.absmax_scale[b / SCALE_BLOCK]
    }

    /// The values, dequantized.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.len();
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let byte = self.codes[i / 2];
            let q = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            out.push(NF4_CODES[q as usize] * self.absmax(i / BLOCK));
        }
        out
    }

    /// Bytes of storage (codes, int8 absmax, f32 second-level scales, the mean).
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + self.absmax_q.len() + 4 * self.absmax_scale.len() + 4
    }

    /// Storage bits per value.
    pub fn bits_per_value(&self) -> f64 {
        self.storage_bytes() as f64 * 8.0 / self.len().max(1) as f64
    }
}
