//! The quantizers, ported block for block from ggml's reference C (`ggml/src/ggml-quants.c`:
//! `quantize_row_*_ref`, `dequantize_row_*`), so that burnish's bytes are llama-quantize's bytes.
//!
//! Every operation is f32 in the C order (`w*l*l` is `(w*l)*l`), `nearest_int` is ggml's
//! round-half-even through the `12582912.f` trick, float-to-integer conversions truncate or wrap
//! as C's do for the values that occur, and f16 is round-to-nearest-even. Rust never contracts
//! `a*b + c` into a fused multiply-add; neither does ggml's reference code as built (it lives in
//! `ggml-base`, which gets no `-march` flags), so the results agree to the bit. The tests hold
//! each type against bytes made by ggml's own C (`fixtures/gguf/make_golden.py`).
//!
//! Blocks are independent, so large tensors are split over rayon's pool; the bytes do not depend
//! on the split.

use half::f16;
use rayon::prelude::*;

use super::types::QK_K;
use super::{GgmlType, GgufError};

/// Quantize `values` (a whole tensor, row-major, each row `row_len` values long) to `ty`.
///
/// `row_len` must be a multiple of `ty`'s block size and `values.len()` a multiple of `row_len`.
/// F32 is stored as is, F16 and BF16 round to nearest even (BF16 quiets NaNs as ggml does).
pub fn quantize(ty: GgmlType, values: &[f32], row_len: usize) -> Result<Vec<u8>, GgufError> {
    check_rows(ty, values.len(), row_len)?;
    let kernel: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => |x, y| y.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => |x, y| y.copy_from_slice(&fp32_to_fp16(x[0]).to_le_bytes()),
        GgmlType::BF16 => |x, y| y.copy_from_slice(&fp32_to_bf16(x[0]).to_le_bytes()),
        GgmlType::Q8_0 => q8_0_block,
        GgmlType::Q4_0 => q4_0_block,
        GgmlType::Q5_0 => q5_0_block,
        GgmlType::Q4_K => q4_k_block,
        GgmlType::Q6_K => q6_k_block,
    };
    Ok(run_blocks(ty, values, kernel))
}

/// Dequantize `n` values of type `ty` from `bytes` (exactly `ty.row_bytes(n)` of them).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, GgufError> {
    let block_size = ty.block_size();
    if !n.is_multiple_of(block_size) {
        return Err(GgufError::RowLength {
            ty,
            row_len: n,
            block_size,
        });
    }
    let expected = ty.row_bytes(n);
    if bytes.len() != expected {
        return Err(GgufError::ByteLength {
            ty,
            n,
            expected,
            found: bytes.len(),
        });
    }
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |x, y| y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
        GgmlType::F16 => |x, y| y[0] = f16::from_le_bytes([x[0], x[1]]).to_f32(),
        GgmlType::BF16 => |x, y| y[0] = bf16_to_fp32(u16::from_le_bytes([x[0], x[1]])),
        GgmlType::Q8_0 => dq8_0_block,
        GgmlType::Q4_0 => dq4_0_block,
        GgmlType::Q5_0 => dq5_0_block,
        GgmlType::Q4_K => dq4_k_block,
        GgmlType::Q6_K => dq6_k_block,
    };
    let mut out = vec![0f32; n];
    for (x, y) in bytes
        .chunks_exact(ty.type_size())
        .zip(out.chunks_exact_mut(block_size))
    {
        kernel(x, y);
    }
    Ok(out)
}

fn check_rows(ty: GgmlType, n: usize, row_len: usize) -> Result<(), GgufError> {
    let block_size = ty.block_size();
    if row_len == 0 && n == 0 {
        return Ok(());
    }
    if row_len == 0 || !row_len.is_multiple_of(block_size) {
        return Err(GgufError::RowLength {
            ty,
            row_len,
            block_size,
        });
    }
    if !n.is_multiple_of(row_len) {
        return Err(GgufError::ValueCount { n, row_len });
    }
    Ok(())
}

/// Below this many values a tensor is quantized on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Values per piece of work on rayon's pool (64 KiB of f32): small enough to balance the
/// threads, large enough that scheduling costs nothing next to the blocks.
const PIECE_VALUES: usize = 1 << 14;

/// Run `kernel` on every block of `values`, over rayon's pool for large tensors. Each block is
/// quantized on its own, so the bytes do not depend on the split.
fn run_blocks(ty: GgmlType, values: &[f32], kernel: fn(&[f32], &mut [u8])) -> Vec<u8> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let n_blocks = values.len() / bs;
    let mut out = vec![0u8; n_blocks * ts];
    let run = |x: &[f32], y: &mut [u8]| {
        for (xb, yb) in x.chunks_exact(bs).zip(y.chunks_exact_mut(ts)) {
            kernel(xb, yb);
        }
    };
    if values.len() < PARALLEL_MIN_VALUES {
        run(values, &mut out);
    } else {
        let per = (PIECE_VALUES / bs).max(1);
        values
            .par_chunks(per * bs)
            .zip(out.par_chunks_mut(per * ts))
            .for_each(|(x, y)| run(x, y));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Scalars

/// `ggml_compute_fp32_to_fp16` (ggml-base's portable conversion, which `llama-quantize` uses):
/// round to nearest even; every NaN becomes the quiet NaN 0x7e00 with its sign (numpy and F16C
/// instructions keep the payload's top bits instead, which only matters for non-canonical NaNs).
pub(crate) fn fp32_to_fp16(x: f32) -> u16 {
    if x.is_nan() {
        return ((x.to_bits() >> 16) & 0x8000) as u16 | 0x7e00;
    }
    f16::from_f32(x).to_bits()
}

/// `ggml_compute_fp32_to_bf16`: round to nearest even; NaNs keep their sign and top mantissa bits
/// and are made quiet.
pub(crate) fn fp32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

pub(crate) fn bf16_to_fp32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// ggml's `nearest_int`: round half to even by adding 1.5 · 2^23 and reading the mantissa
/// (valid for |x| ≤ 4194303; outside it gives ggml's garbage, which callers clamp).
#[inline]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0f32;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

#[inline]
fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&fp32_to_fp16(v).to_le_bytes());
}

#[inline]
fn get_f16(x: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([x[at], x[at + 1]]).to_f32()
}

/// The value of largest magnitude, with its sign (the first one on ties), as `amax < fabsf(v)`.
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

// ---------------------------------------------------------------------------------------------
// Q8_0: f16 d, 32 × i8

/// `quantize_row_q8_0_ref`, compiled for AVX2 when the CPU has it (the same operations).
fn q8_0_block(x: &[f32], y: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU runs AVX2.
        return unsafe { q8_0_block_avx2(x, y) };
    }
    q8_0_body(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q8_0_block_avx2(x: &[f32], y: &mut [u8]) {
    q8_0_body(x, y)
}

/// `roundf` (to the nearest integer, halves away from zero) from `trunc`, which is one vector
/// instruction where `f32::round` is a call into libm; exact, as `v − trunc(v)` is.
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    let t = v.trunc();
    if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    }
}

#[inline(always)]
fn q8_0_body(x: &[f32], y: &mut [u8]) {
    let mut amax = 0f32;
    for &v in x {
        let a = v.abs();
        amax = if amax > a { amax } else { a }; // MAX(amax, fabsf(v))
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for (j, &v) in x.iter().enumerate() {
        y[2 + j] = round_half_away(v * id) as i8 as u8; // roundf
    }
}

fn dq8_0_block(x: &[u8], y: &mut [f32]) {
    let d = get_f16(x, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = x[2 + j] as i8 as f32 * d;
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_0: f16 d, 16 bytes of nibbles (value j in the low nibble of byte j, value j+16 in the high)

/// `quantize_row_q4_0_ref`.
fn q4_0_block(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let xi0 = ((x0 + 8.5) as i8 as i32).min(15) as u8; // MIN(15, (int8_t)(x0 + 8.5f))
        let xi1 = ((x1 + 8.5) as i8 as i32).min(15) as u8;
        y[2 + j] = xi0 | (xi1 << 4);
    }
}

fn dq4_0_block(x: &[u8], y: &mut [f32]) {
    let d = get_f16(x, 0);
    for j in 0..16 {
        let q = x[2 + j];
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[16 + j] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

// ---------------------------------------------------------------------------------------------
// Q5_0: f16 d, u32 qh (the fifth bits), 16 bytes of nibbles

/// `quantize_row_q5_0_ref`.
fn q5_0_block(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let xi0 = ((x0 + 16.5) as i8 as i32).min(31) as u8;
        let xi1 = ((x1 + 16.5) as i8 as i32).min(31) as u8;
        y[6 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= (((xi0 & 0x10) as u32) >> 4) << j;
        qh |= (((xi1 & 0x10) as u32) >> 4) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn dq5_0_block(x: &[u8], y: &mut [f32]) {
    let d = get_f16(x, 0);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let q = x[6 + j];
        y[j] = (((q & 0x0f) | xh0) as i32 - 16) as f32 * d;
        y[16 + j] = (((q >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min.
// Layout: f16 d, f16 dmin, scales[12], qs[128].

/// `make_qkx2_quants`: fit `x ≈ scale·L + min` (L in 0..=nmax, min ≤ 0) minimizing the weighted
/// squared (or absolute) error over `nstep + 1` trial scales. Returns (scale, -min). ggml's
/// scalar form, which [`make_qkx2_quants_q4k`] is held to.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let err = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min));
        l[i] = li.clamp(0, nmax) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the 12 packed bytes.
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sub-blocks of 32 in a Q4_K block.
const SUB: usize = QK_K / 32;

/// [`make_qkx2_quants`] as `quantize_row_q4_K_ref` calls it (`nmax` 15, `rmin` −1, `rdelta`
/// 0.1, `nstep` 20, squared error) for the block's 8 sub-blocks at once: `x` is the block,
/// `weights[j]` sub-block `j`'s weights, `l` receives every level. Returns each sub-block's
/// (scale, −min).
///
/// Each sub-block goes through the scalar version's float operations in its order, so the
/// results are its bits (a unit test holds them to it); the 8 sub-blocks are the lanes of one
/// vector, which the scalar loop (88% of a q4_k_m export) has no way to use, as its sums must
/// stay sequential. Compiled for AVX2 when the CPU has it: wider vectors, the same operations
/// (no fused multiply-add, which Rust never forms on its own).
fn make_qkx2_quants_q4k(
    x: &[f32],
    weights: &[[f32; 32]; SUB],
    l: &mut [u8; QK_K],
) -> ([f32; SUB], [f32; SUB]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU runs AVX2.
        return unsafe { qkx2_lanes_avx2(x, weights, l) };
    }
    qkx2_lanes(x, weights, l)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn qkx2_lanes_avx2(
    x: &[f32],
    weights: &[[f32; 32]; SUB],
    l: &mut [u8; QK_K],
) -> ([f32; SUB], [f32; SUB]) {
    qkx2_lanes(x, weights, l)
}

/// The body of [`make_qkx2_quants_q4k`]: element `i` of every sub-block side by side
/// (`xt[i][j]`), every loop over the lanes free of branches. A flat sub-block (max = min)
/// computes garbage alongside the others and keeps none of it, as the scalar version returns
/// before its search.
#[inline(always)]
fn qkx2_lanes(
    x: &[f32],
    weights: &[[f32; 32]; SUB],
    l: &mut [u8; QK_K],
) -> ([f32; SUB], [f32; SUB]) {
    const NMAX: i32 = 15;
    let (mut xt, mut wt) = ([[0f32; SUB]; 32], [[0f32; SUB]; 32]);
    for j in 0..SUB {
        for i in 0..32 {
            xt[i][j] = x[32 * j + i];
            wt[i][j] = weights[j][i];
        }
    }
    let (mut min, mut max) = (xt[0], xt[0]);
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; SUB];
    for j in 0..SUB {
        sum_x[j] = sum_w[j] * xt[0][j];
    }
    for i in 1..32 {
        for j in 0..SUB {
            let v = xt[i][j];
            min[j] = if v < min[j] { v } else { min[j] };
            max[j] = if v > max[j] { v } else { max[j] };
            sum_w[j] += wt[i][j];
            sum_x[j] += wt[i][j] * v;
        }
    }
    let mut flat = [false; SUB];
    let (mut scale, mut iscale) = ([0f32; SUB], [0f32; SUB]);
    for j in 0..SUB {
        if min[j] > 0.0 {
            min[j] = 0.0;
        }
        flat[j] = max[j] == min[j];
        iscale[j] = NMAX as f32 / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    // The best levels so far, as floats, side by side like `xt`.
    let mut best_l = [[0f32; SUB]; 32];
    let mut best = [0f32; SUB];
    for i in 0..32 {
        for j in 0..SUB {
            let lf = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, NMAX) as f32;
            best_l[i][j] = lf;
            let diff = scale[j] * lf + min[j] - xt[i][j];
            best[j] += wt[i][j] * (diff * diff);
        }
    }
    let mut laux = [[0f32; SUB]; 32];
    for is in 0..=20 {
        for j in 0..SUB {
            iscale[j] = (-1.0f32 + 0.1f32 * is as f32 + NMAX as f32) / (max[j] - min[j]);
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; SUB], [0f32; SUB], [0f32; SUB]);
        for i in 0..32 {
            for j in 0..SUB {
                let lf = nearest_int(iscale[j] * (xt[i][j] - min[j])).clamp(0, NMAX) as f32;
                laux[i][j] = lf;
                let w = wt[i][j];
                sum_l[j] += w * lf;
                sum_l2[j] += w * lf * lf;
                sum_xl[j] += w * lf * xt[i][j];
            }
        }
        // Each sub-block's fitted scale and min for these levels, where the fit exists.
        let mut fits = [false; SUB];
        let (mut this_scale, mut this_min) = ([0f32; SUB], [0f32; SUB]);
        for j in 0..SUB {
            let d = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            if !flat[j] && d > 0.0 {
                fits[j] = true;
                this_scale[j] = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / d;
                this_min[j] = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / d;
                if this_min[j] > 0.0 {
                    this_min[j] = 0.0;
                    this_scale[j] = sum_xl[j] / sum_l2[j];
                }
            }
        }
        let mut cur = [0f32; SUB];
        for i in 0..32 {
            for j in 0..SUB {
                let diff = this_scale[j] * laux[i][j] + this_min[j] - xt[i][j];
                cur[j] += wt[i][j] * (diff * diff);
            }
        }
        let mut take = [false; SUB];
        for j in 0..SUB {
            if fits[j] && cur[j] < best[j] {
                take[j] = true;
                best[j] = cur[j];
                scale[j] = this_scale[j];
                min[j] = this_min[j];
            }
        }
        for i in 0..32 {
            for j in 0..SUB {
                best_l[i][j] = if take[j] { laux[i][j] } else { best_l[i][j] };
            }
        }
    }
    for j in 0..SUB {
        if flat[j] {
            scale[j] = 0.0;
        }
        for i in 0..32 {
            l[32 * j + i] = if flat[j] { 0 } else { best_l[i][j] as u8 };
        }
    }
    (scale, min.map(|m| -m))
}

/// `quantize_row_q4_K_ref`.
fn q4_k_block(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut weights = [[0f32; 32]; SUB];
    for (j, w) in weights.iter_mut().enumerate() {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in w.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
    }
    let (scales, mins) = make_qkx2_quants_q4k(x, &weights, &mut l);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..SUB {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut [0u8; 12];
    for j in 0..QK_K / 32 {
        // `uint8_t ls = nearest_int(...)` wraps, then MIN(63, ls).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(y, 0, max_scale / 63.0);
    put_f16(y, 2, max_min / 63.0);
    y[4..16].copy_from_slice(sc);
    let d_all = get_f16(y, 0);
    let dmin_all = get_f16(y, 2);

    for j in 0..QK_K / 32 {
        let (s, m) = get_scale_min_k4(j, sc);
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            let li = nearest_int((x[32 * j + ii] + dm) / d);
            l[32 * j + ii] = li.clamp(0, 15) as u8;
        }
    }

    let qs = &mut y[16..144];
    for (chunk, q) in qs.chunks_exact_mut(32).enumerate() {
        let j = chunk * 64;
        for i in 0..32 {
            q[i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// `dequantize_row_q4_K`.
fn dq4_k_block(x: &[u8], y: &mut [f32]) {
    let d = get_f16(x, 0);
    let min = get_f16(x, 2);
    let sc = &x[4..16];
    let qs = &x[16..144];
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        let is = chunk * 2;
        let (s1, m1) = get_scale_min_k4(is, sc);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (s2, m2) = get_scale_min_k4(is + 1, sc);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for i in 0..32 {
            out[i] = d1 * (q[i] & 0x0f) as f32 - m1;
            out[32 + i] = d2 * (q[i] >> 4) as f32 - m2;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q6_K: 256 values in 16 sub-blocks of 16, each with an i8 scale.
// Layout: ql[128] (low nibbles), qh[64] (high 2 bits), scales i8[16], f16 d last.

const GROUP_MAX_EPS: f32 = 1e-15;

/// `make_qx_quants` with `rmse_type = 1` and no importance weights (w = x²): symmetric levels
/// `L - nmax` in -nmax..nmax, trying 19 scales around `nmax / max`. Returns the scale.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l: &mut [u8]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let mut sumlx = 0f32;
    let mut suml2 = 0f32;
    for i in 0..n {
        let li = level(iscale, x[i]);
        l[i] = (li + nmax) as u8;
        let w = x[i] * x[i];
        let lf = li as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let lf = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                l[i] = (nmax + level(iscale, x[i])) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref`.
fn q6_k_block(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    for ib in 0..QK_K / 16 {
        let scale = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..]);
        scales[ib] = scale;
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0); // and d = f16(0), which is 0x0000
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    let d_all = get_f16(y, 208);
    let mut sc = [0i8; QK_K / 16];
    for ib in 0..QK_K / 16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let d = d_all * sc[j] as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let li = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (li + 32) as u8;
        }
    }
    let (ql, rest) = y.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for (half, (ql, qh)) in ql
        .chunks_exact_mut(64)
        .zip(qh.chunks_exact_mut(32))
        .enumerate()
    {
        let j = half * 128;
        for i in 0..32 {
            let (a, b, c, d) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            ql[i] = (a & 0x0f) | ((c & 0x0f) << 4);
            ql[i + 32] = (b & 0x0f) | ((d & 0x0f) << 4);
            qh[i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6);
        }
    }
    for (dst, s) in rest[..16].iter_mut().zip(sc) {
        *dst = s as u8;
    }
}

/// `dequantize_row_q6_K`.
fn dq6_k_block(x: &[u8], y: &mut [f32]) {
    let d = get_f16(x, 208);
    let sc = &x[192..208];
    for half in 0..2 {
        let ql = &x[half * 64..half * 64 + 64];
        let qh = &x[128 + half * 32..128 + half * 32 + 32];
        let sc = &sc[half * 8..half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for i in 0..32 {
            let is = i / 16;
            let q1 = ((ql[i] & 0x0f) | ((qh[i] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[i + 32] & 0x0f) | (((qh[i] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) as i32 - 32;
            out[i] = d * sc[is] as i8 as f32 * q1 as f32;
            out[i + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            out[i + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            out[i + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_away_is_roundf() {
        let mut xs = vec![
            0.5f32,
            1.5,
            2.5,
            0.49999997,
            0.50000006,
            126.5,
            127.49999,
            8388607.5,
            8388608.0,
            16777217.0,
            1e30,
            f32::MIN_POSITIVE,
            0.0,
            f32::INFINITY,
        ];
        let mut rng = crate::data::rng::Rng::new(3);
        xs.extend((0..100_000).map(|_| rng.normal() * 60.0));
        for x in xs.iter().flat_map(|&x| [x, -x]) {
            assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    fn q4k_sub_blocks_in_lockstep_give_the_scalar_bits() {
        // Random blocks at several scales, plus the edge cases: a flat sub-block, one of
        // positives only (min clamped to 0), one of negatives only, zeros, a lone spike.
        let mut rng = crate::data::rng::Rng::new(7);
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|b| {
                let amp = [1e-3, 0.02, 1.0, 50.0][b % 4];
                (0..QK_K).map(|_| rng.normal() * amp).collect()
            })
            .collect();
        let mut edge: Vec<f32> = (0..QK_K).map(|i| (i as f32 * 0.37).sin()).collect();
        edge[..32].fill(0.25);
        for v in &mut edge[32..64] {
            *v = v.abs() + 0.1;
        }
        for v in &mut edge[64..96] {
            *v = -v.abs() - 0.1;
        }
        edge[96..128].fill(0.0);
        edge[128..160].fill(0.0);
        edge[140] = 3.0;
        blocks.push(edge);
        for x in &blocks {
            let mut weights = [[0f32; 32]; SUB];
            for (j, w) in weights.iter_mut().enumerate() {
                let xs = &x[32 * j..32 * j + 32];
                let av = (xs.iter().fold(0f32, |a, &v| a + v * v) / 32.0).sqrt();
                for (w, &v) in w.iter_mut().zip(xs) {
                    *w = av + v.abs();
                }
            }
            let mut l = [0u8; QK_K];
            let (scales, mins) = make_qkx2_quants_q4k(x, &weights, &mut l);
            for j in 0..SUB {
                let (mut lj, mut laux) = ([0u8; 32], [0u8; 32]);
                let xs = &x[32 * j..32 * j + 32];
                let (s, m) = make_qkx2_quants(
                    15,
                    xs,
                    &weights[j],
                    &mut lj,
                    &mut laux,
                    -1.0,
                    0.1,
                    20,
                    false,
                );
                assert_eq!(
                    (s.to_bits(), m.to_bits()),
                    (scales[j].to_bits(), mins[j].to_bits())
                );
                assert_eq!(lj, l[32 * j..32 * j + 32]);
            }
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-2.4), -2);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(nearest_int(-4_194_303.0), -4_194_303);
    }

    #[test]
    fn bf16_matches_ggml_on_edges() {
        assert_eq!(fp32_to_bf16(1.0), 0x3f80);
        // exactly halfway between two bf16 values: ties to even
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(fp32_to_bf16(f32::INFINITY), 0x7f80);
        // a signalling NaN becomes quiet, keeping its sign
        assert_eq!(fp32_to_bf16(f32::from_bits(0xff80_0001)), 0xffc0);
        assert_eq!(fp32_to_bf16(f32::MAX), 0x7f80); // rounds up to infinity, as ggml's does
    }
}
