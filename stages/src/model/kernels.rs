//! f32 loops over flex's buffers for the fused ops in [`super::fused`].
//!
//! flex runs each element-wise op as its own pass on the calling thread, with the scalar libm
//! `expf`, and copies permuted layouts of rank > 2 one index at a time. On the ~17M benchmark
//! those passes cost more than the matrix products. The loops here:
//!
//! - split rows (or chunks) over rayon's pool, the one flex's matrix products already use;
//! - compute `exp` with [`exp`], a polynomial that the compiler vectorizes, built once for
//!   AVX-512, once for AVX2 and once for the x86-64 baseline, picked at run time;
//! - copy permuted layouts one contiguous run at a time;
//! - call gemm for matrix products through the operands' strides, straight into new buffers,
//!   one single-threaded call per thread on its band of columns (or rows);
//! - compute causal attention by blocks of query rows, each multiplying only the keys it sees
//!   (up to its last row, and from its first row's document on in packed batches);
//! - write outputs into fresh buffers without zeroing them first.
//!
//! Determinism: each output element of the loops is computed by the same sequence of f32
//! operations whatever the thread split or vector width (no fused multiply-add; sums are
//! accumulated in a fixed order of 16 lanes). Matrix products are gemm's, as flex's own are;
//! threads split rows and columns, never the inner sum. So flex training is bit-reproducible
//! for a given seed on a given CPU.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape, TensorData};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Elements per rayon task for element-wise loops.
const CHUNK: usize = 1 << 14;

/// The widest vector build this CPU runs: 2 for AVX-512F, 1 for AVX2, 0 for the baseline.
fn level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return 2;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return 1;
        }
    }
    0
}

/// Runs `body` with the named arguments, compiled once for AVX-512, once for AVX2 and once for
/// the baseline, the widest this CPU runs picked by [`level`]. The body is a function of its
/// arguments (it captures nothing), inlined into each build with everything it calls that is
/// `#[inline(always)]`, so its loops vectorize at that width.
macro_rules! simd {
    (($($arg:ident: $ty:ty = $val:expr),* $(,)?) $(-> $ret:ty)? $body:block) => {{
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn base($($arg: $ty),*) $(-> $ret)? $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        fn v4($($arg: $ty),*) $(-> $ret)? { base($($arg),*) }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        fn v3($($arg: $ty),*) $(-> $ret)? { base($($arg),*) }
        #[cfg(not(target_arch = "x86_64"))]
        #[allow(clippy::too_many_arguments)]
        fn v4($($arg: $ty),*) $(-> $ret)? { base($($arg),*) }
        #[cfg(not(target_arch = "x86_64"))]
        #[allow(clippy::too_many_arguments)]
        fn v3($($arg: $ty),*) $(-> $ret)? { base($($arg),*) }
        match ($($val,)*) {
            ($($arg,)*) => {
                #[allow(unused_unsafe)]
                match level() {
                    // SAFETY: `level` saw AVX-512F on this CPU.
                    2 => unsafe { v4($($arg),*) },
                    // SAFETY: `level` saw AVX2 on this CPU.
                    1 => unsafe { v3($($arg),*) },
                    _ => base($($arg),*),
                }
            }
        }
    }};
}

/// `eˣ` in f32 to within 2 ulp (Cephes' `expf` polynomial), without branches so that loops
/// over it vectorize. Below −87.336 (where eˣ leaves f32's normal range) it gives 0, above
/// 88.37 +∞ (libm overflows only at 88.72); `exp(−∞) = 0`, `exp(+∞) = +∞`, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    const LO: f32 = -87.336;
    const HI: f32 = 88.37;
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + ROUND) - ROUND; // round(x / ln 2), in [−126, 127]
    let r = (xc - n * LN2_HI) - n * LN2_LO; // |r| ≤ ln2 / 2
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = (p * (r * r) + r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23); // 2ⁿ
    let y = e * scale;
    let y = if x < LO { 0.0 } else { y };
    let y = if x > HI { f32::INFINITY } else { y };
    if x.is_nan() { x } else { y }
}

/// Sum in a fixed order: 16 running lanes, then the lanes in order.
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x;
    }
    acc.iter().fold(0.0, |s, &a| s + a)
}

/// `Σ aᵢ·bᵢ` in the same fixed order as [`sum`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (mut ac, mut bc) = (a.chunks_exact(16), b.chunks_exact(16));
    for (a, b) in (&mut ac).zip(&mut bc) {
        for ((s, &a), &b) in acc.iter_mut().zip(a).zip(b) {
            *s += a * b;
        }
    }
    for ((s, &a), &b) in acc.iter_mut().zip(ac.remainder()).zip(bc.remainder()) {
        *s += a * b;
    }
    acc.iter().fold(0.0, |s, &a| s + a)
}

/// Maximum with the same fixed order as [`sum`] (NaN-propagating).
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    let pick = |a: f32, x: f32| if x > a || x.is_nan() { x } else { a };
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = pick(*a, x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = pick(*a, x);
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &a| pick(m, a))
}

/// `dst = softmax(src)` over one row, written into `dst` (`dst.len() == src.len()`); returns the
/// row's maximum and the sum of `exp(x − max)`.
#[inline(always)]
fn softmax_row(src: &[f32], dst: &mut [MaybeUninit<f32>]) -> (f32, f32) {
    assert_eq!(dst.len(), src.len(), "softmax row lengths");
    let m = max(src);
    for (d, &x) in dst.iter_mut().zip(src) {
        d.write(exp(x - m));
    }
    // SAFETY: the loop above wrote every element, as `dst` and `src` have the same length.
    let dst = unsafe { assume_init(dst) };
    let s = sum(dst);
    for d in dst.iter_mut() {
        *d /= s;
    }
    (m, s)
}

/// A contiguous f32 copy of `t` (a clone when it already is one). Permuted layouts are copied one
/// run of the last dimension at a time, in parallel over rows.
///
/// # Shapes
/// - t: any → same, contiguous
pub(crate) fn contiguous(t: &FlexTensor) -> FlexTensor {
    if is_whole(t) {
        return t.clone();
    }
    from_vec(contiguous_vec(t), t.layout().shape().clone())
}

/// Whether `t` is contiguous from offset 0 and its buffer holds exactly its elements.
fn is_whole(t: &FlexTensor) -> bool {
    let n = t.layout().num_elements();
    t.layout().contiguous_offsets() == Some((0, n)) && t.bytes().len() == n * 4
}

/// The elements of `t` in row-major order, copied one run of the last dimension at a time.
fn contiguous_vec(t: &FlexTensor) -> Vec<f32> {
    let layout = t.layout();
    let n = layout.num_elements();
    let shape = layout.shape().clone();
    let dims: Vec<usize> = shape.iter().copied().collect();
    let strides = layout.strides().to_vec();
    let start = layout.start_offset() as isize;
    let src = t.storage::<f32>();
    let rank = dims.len();
    let last = if rank == 0 { 1 } else { dims[rank - 1] };
    let last_stride = if rank == 0 { 1 } else { strides[rank - 1] };
    if n == 0 {
        return Vec::new();
    }
    // Source offset of row `r` (the index over every dimension but the last).
    let row_start = |mut r: usize| -> isize {
        let mut off = start;
        for d in (0..rank.saturating_sub(1)).rev() {
            off += (r % dims[d]) as isize * strides[d];
            r /= dims[d];
        }
        off
    };
    let rows_per_task = (CHUNK / last).max(1);
    let copy = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(rows_per_task * last)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, row) in chunk.chunks_mut(last).enumerate() {
                    let off = row_start(task * rows_per_task + i);
                    if last_stride == 1 {
                        let off = off as usize;
                        row.copy_from_slice(as_uninit(&src[off..off + last]));
                    } else {
                        for (j, x) in row.iter_mut().enumerate() {
                            x.write(src[(off + j as isize * last_stride) as usize]);
                        }
                    }
                }
            })
    };
    // SAFETY: `copy` writes every element of every row.
    unsafe { filled(n, copy) }
}

/// A new buffer of `n` elements that `write` fills, with no pass that zeroes it first (the loops
/// here overwrite every element of their outputs, and zeroing tens of megabytes per op first
/// costs a memory pass each).
///
/// # Safety
/// `write` must write every element of the slice it is given.
unsafe fn filled(n: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    write(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller's `write` initialised the first `n` elements.
    unsafe { v.set_len(n) };
    v
}

/// `xs` as possibly-uninitialised values, to copy from with `copy_from_slice` (a memcpy).
fn as_uninit(xs: &[f32]) -> &[MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32` and admits every value of it.
    unsafe { &*(xs as *const [f32] as *const [MaybeUninit<f32>]) }
}

/// `xs` as initialised values.
///
/// # Safety
/// Every element of `xs` must have been written.
#[inline(always)]
unsafe fn assume_init(xs: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller wrote every element.
    unsafe { &mut *(xs as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A contiguous f32 flex tensor of `shape` holding `data`.
pub(crate) fn from_vec(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// The contiguous f32 elements of `t`.
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) if s.len() == t.layout().num_elements() => std::borrow::Cow::Borrowed(s),
        _ => std::borrow::Cow::Owned(contiguous_vec(t)),
    }
}

/// `t` as a contiguous tensor that this call owns, for in-place updates.
fn owned(t: FlexTensor) -> FlexTensor {
    if t.is_unique() && is_whole(&t) {
        t
    } else {
        contiguous(&t)
    }
}

/// `value` (`[b, h, n, d]`) written into `cache` (`[b, h, capacity, d]`) at positions
/// `at..at + n`, in the cache's own buffer when nothing else holds it; the cache back unchanged
/// (`Err`) when it is shared, not laid out contiguously or the shapes do not fit.
///
/// flex's `slice_assign` never writes in place: it makes the destination contiguous by cloning
/// its handle and then writes through that clone, so the buffer is always shared and copied
/// whole. For a KV cache that is a copy of every layer's keys and values at every new token.
pub(crate) fn write_positions(
    mut cache: FlexTensor,
    at: usize,
    value: &FlexTensor,
) -> Result<FlexTensor, FlexTensor> {
    let (cd, vd) = (
        cache.layout().shape().clone(),
        value.layout().shape().clone(),
    );
    let fits = cd.num_dims() == 4
        && vd.num_dims() == 4
        && is_f32(&cache)
        && is_f32(value)
        && (cd[0], cd[1], cd[3]) == (vd[0], vd[1], vd[3])
        && at + vd[2] <= cd[2]
        && is_whole(&cache);
    if !fits {
        return Err(cache);
    }
    let (cap, n, d) = (cd[2], vd[2], vd[3]);
    let src = values(value);
    let Some(dst) = cache.try_storage_mut::<f32>() else {
        return Err(cache);
    };
    // One run of `n·d` elements per (row, head), at position `at` of that head's `cap`.
    for (i, run) in src.chunks(n * d).enumerate() {
        let off = (i * cap + at) * d;
        dst[off..off + n * d].copy_from_slice(run);
    }
    Ok(cache)
}

/// Row-wise softmax over the last dimension. With `causal`, row `r` of each `[n, n]` block
/// (query position `r mod n`) keeps only its first `r mod n + 1` entries and the rest are 0:
/// the bits of adding the causal bias (`x + 0`, `x + −∞`) and taking the full softmax, as the
/// skipped entries would only add `exp(−∞) = 0` to the same lanes.
///
/// # Shapes
/// - x: `[..., n]` → same
pub(crate) fn softmax(x: &FlexTensor, causal: bool) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let n = shape[shape.num_dims() - 1].max(1);
    let xs = values(x);
    let per = (CHUNK / n).max(1);
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(per * n)
            .zip(xs.par_chunks(per * n))
            .enumerate()
            .for_each(|(k, (dst, src))| {
                simd!((dst: &mut [MaybeUninit<f32>] = dst, src: &[f32] = src, n: usize = n, causal: bool = causal, k: usize = k, per: usize = per) {
                    for (i, (d, s)) in dst.chunks_mut(n).zip(src.chunks(n)).enumerate() {
                        let keep = if causal { (k * per + i) % n + 1 } else { n };
                        let (d, masked) = d.split_at_mut(keep.min(d.len()));
                        softmax_row(&s[..d.len()], d);
                        masked.fill(MaybeUninit::new(0.0));
                    }
                })
            })
    };
    // SAFETY: `write` writes every element of every row: the softmax or a masked 0.
    from_vec(unsafe { filled(xs.len(), write) }, shape)
}

/// Softmax backward from the saved output: `∂x = y ⊙ (∂y − Σ(∂y ⊙ y))` per row, written over
/// the gradient's buffer when it is not shared.
///
/// # Shapes
/// - y, grad: `[..., n]` → same
pub(crate) fn softmax_backward(y: &FlexTensor, grad: FlexTensor) -> FlexTensor {
    let shape = y.layout().shape().clone();
    let n = shape[shape.num_dims() - 1].max(1);
    let ys = values(y);
    let mut g = owned(grad);
    let rows = (CHUNK / n).max(1) * n;
    g.storage_mut::<f32>()
        .par_chunks_mut(rows)
        .zip(ys.par_chunks(rows))
        .for_each(|(gs, ys)| {
            simd!((gs: &mut [f32] = gs, ys: &[f32] = ys, n: usize = n) {
                for (g, y) in gs.chunks_mut(n).zip(ys.chunks(n)) {
                    let dot = dot(g, y);
                    for (g, &y) in g.iter_mut().zip(y) {
                        *g = y * (*g - dot);
                    }
                }
            })
        });
    g
}

/// SwiGLU forward `y = silu(a) ⊙ b`; returns `(y, σ(a), silu(a))`, the last two for the
/// backward.
///
/// # Shapes
/// - a, b: same shape → three of that shape
pub(crate) fn swiglu(a: &FlexTensor, b: &FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = a.layout().shape().clone();
    let (az, bz) = (values(a), values(b));
    let n = az.len();
    assert_eq!(n, bz.len(), "swiglu of different sizes");
    let (mut y, mut s, mut h) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (ys, ss, hs) = (
        &mut y.spare_capacity_mut()[..n],
        &mut s.spare_capacity_mut()[..n],
        &mut h.spare_capacity_mut()[..n],
    );
    ys.par_chunks_mut(CHUNK)
        .zip(ss.par_chunks_mut(CHUNK).zip(hs.par_chunks_mut(CHUNK)))
        .zip(az.par_chunks(CHUNK).zip(bz.par_chunks(CHUNK)))
        .for_each(|((y, (s, h)), (a, b))| {
            simd!((y: &mut [MaybeUninit<f32>] = y, s: &mut [MaybeUninit<f32>] = s, h: &mut [MaybeUninit<f32>] = h, a: &[f32] = a, b: &[f32] = b) {
                for ((((y, s), h), &a), &b) in y.iter_mut().zip(s).zip(h).zip(a).zip(b) {
                    let sig = 1.0 / (1.0 + exp(-a));
                    let silu = a * sig;
                    s.write(sig);
                    h.write(silu);
                    y.write(silu * b);
                }
            })
        });
    // SAFETY: the loop above wrote all `n` elements of each (`a` and `b` hold `n` each).
    unsafe {
        y.set_len(n);
        s.set_len(n);
        h.set_len(n);
    }
    (
        from_vec(y, shape.clone()),
        from_vec(s, shape.clone()),
        from_vec(h, shape),
    )
}

/// SwiGLU backward for the gate: `∂a = ∂y ⊙ b ⊙ σ ⊙ (1 + a − silu(a))`.
///
/// # Shapes
/// - grad, a, b, s, h: same shape → same
pub(crate) fn swiglu_backward_gate(
    grad: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
    s: &FlexTensor,
    h: &FlexTensor,
) -> FlexTensor {
    let shape = a.layout().shape().clone();
    let (gz, az, bz, sz, hz) = (values(grad), values(a), values(b), values(s), values(h));
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK)
            .zip(gz.par_chunks(CHUNK).zip(az.par_chunks(CHUNK)))
            .zip(
                bz.par_chunks(CHUNK)
                    .zip(sz.par_chunks(CHUNK).zip(hz.par_chunks(CHUNK))),
            )
            .for_each(|((o, (g, a)), (b, (s, h)))| {
                simd!((o: &mut [MaybeUninit<f32>] = o, g: &[f32] = g, a: &[f32] = a, b: &[f32] = b, s: &[f32] = s, h: &[f32] = h) {
                    let ins = g.iter().zip(a).zip(b).zip(s).zip(h);
                    for (o, ((((&g, &a), &b), &s), &h)) in o.iter_mut().zip(ins) {
                        o.write((g * b) * s * ((a - h) + 1.0));
                    }
                })
            })
    };
    let n = az.len();
    assert!(
        [gz.len(), bz.len(), sz.len(), hz.len()] == [n; 4],
        "swiglu backward of different sizes"
    );
    // SAFETY: every input holds `n` elements, so `write` writes all `n`.
    from_vec(unsafe { filled(n, write) }, shape)
}

/// Element-wise product of two same-shaped tensors.
pub(crate) fn mul(x: &FlexTensor, y: &FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let (xz, yz) = (values(x), values(y));
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK)
            .zip(xz.par_chunks(CHUNK).zip(yz.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| {
                simd!((o: &mut [MaybeUninit<f32>] = o, x: &[f32] = x, y: &[f32] = y) {
                    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        o.write(x * y);
                    }
                })
            })
    };
    assert_eq!(xz.len(), yz.len(), "product of different sizes");
    // SAFETY: both inputs hold the `n` elements that `write` writes.
    from_vec(unsafe { filled(xz.len(), write) }, shape)
}

/// Next-token cross-entropy forward: per row `nll = ln Σ exp(x − m) + m − x[target]`, and the
/// softmax that the backward needs.
///
/// # Shapes
/// - logits: `[n, vocab]`, targets: `n` ids
/// - output: nll `[n]`, softmax `[n, vocab]`
pub(crate) fn cross_entropy(logits: &FlexTensor, targets: &[i64]) -> (FlexTensor, FlexTensor) {
    let shape = logits.layout().shape().clone();
    let (n, v) = (shape[0], shape[1].max(1));
    let xs = values(logits);
    assert_eq!(targets.len(), n, "cross-entropy targets per row");
    let mut p = Vec::with_capacity(xs.len());
    let mut nll = vec![0.0f32; n];
    let rows = (CHUNK / v).max(1);
    p.spare_capacity_mut()[..xs.len()]
        .par_chunks_mut(rows * v)
        .zip(xs.par_chunks(rows * v))
        .zip(nll.par_chunks_mut(rows).zip(targets.par_chunks(rows)))
        .for_each(|((p, x), (nll, t))| {
            simd!((p: &mut [MaybeUninit<f32>] = p, x: &[f32] = x, nll: &mut [f32] = nll, t: &[i64] = t, v: usize = v) {
                for (((p, x), nll), &t) in p.chunks_mut(v).zip(x.chunks(v)).zip(nll).zip(t) {
                    let (m, s) = softmax_row(x, p);
                    let picked = x.get(t as usize).copied().unwrap_or(f32::NAN);
                    *nll = (s.ln() + m) - picked;
                }
            })
        });
    // SAFETY: `softmax_row` wrote each row of `v` elements, all `xs.len()` of them.
    unsafe { p.set_len(xs.len()) };
    (from_vec(nll, [n].into()), from_vec(p, shape))
}

/// Cross-entropy backward: `∂x = softmax · ∂nll − onehot(target) · ∂nll`, written over the
/// saved softmax.
///
/// # Shapes
/// - p: `[n, vocab]`, targets: `n` ids, grad: `[n]` → `[n, vocab]`
pub(crate) fn cross_entropy_backward(
    p: FlexTensor,
    targets: &[i64],
    grad: &FlexTensor,
) -> FlexTensor {
    let v = p.layout().shape()[1].max(1);
    let gs = values(grad);
    let mut p = owned(p);
    let rows = (CHUNK / v).max(1);
    p.storage_mut::<f32>()
        .par_chunks_mut(rows * v)
        .zip(gs.par_chunks(rows).zip(targets.par_chunks(rows)))
        .for_each(|(p, (g, t))| {
            simd!((p: &mut [f32] = p, g: &[f32] = g, t: &[i64] = t, v: usize = v) {
                for ((p, &g), &t) in p.chunks_mut(v).zip(g).zip(t) {
                    for x in p.iter_mut() {
                        *x *= g;
                    }
                    if let Some(x) = p.get_mut(t as usize) {
                        *x += -g;
                    }
                }
            })
        });
    p
}

/// Whether `t` is a flex f32 tensor these loops take.
pub(crate) fn is_f32(t: &FlexTensor) -> bool {
    t.dtype() == DType::F32
}

/// `t` with its dimensions permuted by `axes` and laid out contiguously.
pub(crate) fn permute(t: &FlexTensor, axes: &[usize]) -> FlexTensor {
    contiguous(&t.permute(axes))
}

/// Rotary embedding of `x` with HF's split-half convention, `y = x ⊙ cos + [x₂, x₁] ⊙ sin` per
/// head, or with `backward` its transpose `∂x = ∂y ⊙ cos + [(∂y ⊙ sin)₂, (∂y ⊙ sin)₁]`. The tables
/// hold one row per position and head (the sign of `rotate_half` in `sin`), shared by the batch
/// rows (`[1, ≥ t·w]`) or one per batch row (`[b, t·w]`, packed rows' own positions).
///
/// # Shapes
/// - x: `[b, t, w]` with `w` a multiple of `head_dim`; cos, sin: `[1, ≥ t·w]` or `[b, t·w]`
///   → `[b, t, w]`
pub(crate) fn rope(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    head_dim: usize,
    backward: bool,
) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let (xs, cs, ss) = (values(x), values(cos), values(sin));
    // Elements of one table: one row shared by the batch rows, or a row per batch row.
    let n = match cos.layout().shape()[0] {
        1 => shape[1] * shape[2],
        _ => xs.len(),
    };
    assert!(
        cs.len() >= n && ss.len() >= n,
        "rotary tables of {} for {n} elements",
        cs.len().min(ss.len())
    );
    let (cs, ss) = (&cs[..n], &ss[..n]);
    let (hd, half) = (head_dim, head_dim / 2);
    assert!(
        hd % 2 == 0 && xs.len() % hd == 0,
        "rotary embedding of width {} with head_dim {hd}",
        xs.len()
    );
    let per = (CHUNK / hd).max(1) * hd;
    let mut out = Vec::with_capacity(xs.len());
    out.spare_capacity_mut()[..xs.len()]
        .par_chunks_mut(per)
        .zip(xs.par_chunks(per))
        .enumerate()
        .for_each(|(k, (o, x))| {
            simd!((o: &mut [MaybeUninit<f32>] = o, x: &[f32] = x, cs: &[f32] = cs, ss: &[f32] = ss, k: usize = k, per: usize = per, n: usize = n, hd: usize = hd, half: usize = half, backward: bool = backward) {
                for (h, (o, x)) in o.chunks_mut(hd).zip(x.chunks(hd)).enumerate() {
                    let at = (k * per + h * hd) % n;
                    let (c1, c2) = cs[at..at + hd].split_at(half);
                    let (s1, s2) = ss[at..at + hd].split_at(half);
                    let (x1, x2) = x.split_at(half);
                    let (o1, o2) = o.split_at_mut(half);
                    let (sa, sb) = if backward { (s2, s1) } else { (s1, s2) };
                    for j in 0..half {
                        o1[j].write(x1[j] * c1[j] + x2[j] * sa[j]);
                        o2[j].write(x2[j] * c2[j] + x1[j] * sb[j]);
                    }
                }
            })
        });
    // SAFETY: each head of `hd` (even) elements had both halves written, all `xs.len()`.
    unsafe { out.set_len(xs.len()) };
    from_vec(out, shape)
}

/// RMSNorm forward: per row `r = 1/√(mean(x²) + eps)` and `y = (x · r) ⊙ w`.
///
/// # Shapes
/// - x: `[..., d]`, w: `[d]` → y: `[..., d]`, r: `[rows]`
pub(crate) fn rms_norm(x: &FlexTensor, w: &FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1].max(1);
    let (xs, ws) = (values(x), values(w));
    let rows = xs.len() / d;
    assert!(
        ws.len() == d && xs.len() == rows * d,
        "rms norm weight of {}, rows of {d}",
        ws.len()
    );
    let mut y = Vec::with_capacity(xs.len());
    let mut r = vec![0.0f32; rows];
    let per = (CHUNK / d).max(1);
    y.spare_capacity_mut()[..xs.len()]
        .par_chunks_mut(per * d)
        .zip(xs.par_chunks(per * d))
        .zip(r.par_chunks_mut(per))
        .for_each(|((y, x), r)| {
            simd!((y: &mut [MaybeUninit<f32>] = y, x: &[f32] = x, r: &mut [f32] = r, ws: &[f32] = &ws, d: usize = d, eps: f32 = eps) {
                for ((y, x), r) in y.chunks_mut(d).zip(x.chunks(d)).zip(r) {
                    let ss = dot(x, x);
                    *r = 1.0 / (ss / d as f32 + eps).sqrt();
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(ws.iter()) {
                        y.write((x * *r) * w);
                    }
                }
            })
        });
    // SAFETY: every row of `d` elements was written (`ws` holds `d`), all `xs.len()`.
    unsafe { y.set_len(xs.len()) };
    (from_vec(y, shape), from_vec(r, [rows].into()))
}

/// RMSNorm backward for the input: with `u = ∂y ⊙ w`,
/// `∂x = r · u − x · r³ · Σ(u ⊙ x) / d` per row.
///
/// # Shapes
/// - grad, x: `[..., d]`, w: `[d]`, r: `[rows]` → `[..., d]`
pub(crate) fn rms_norm_backward_x(
    grad: &FlexTensor,
    x: &FlexTensor,
    w: &FlexTensor,
    r: &FlexTensor,
) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1].max(1);
    let (gs, xs, ws, rs) = (values(grad), values(x), values(w), values(r));
    assert!(
        ws.len() == d && gs.len() == xs.len() && rs.len() * d == xs.len(),
        "rms norm backward of {} rows of {d}",
        rs.len()
    );
    let mut dx = Vec::with_capacity(xs.len());
    let per = (CHUNK / d).max(1);
    dx.spare_capacity_mut()[..xs.len()]
        .par_chunks_mut(per * d)
        .zip(xs.par_chunks(per * d).zip(gs.par_chunks(per * d)))
        .zip(rs.par_chunks(per))
        .for_each(|((dx, (x, g)), r)| {
            simd!((dx: &mut [MaybeUninit<f32>] = dx, x: &[f32] = x, g: &[f32] = g, r: &[f32] = r, ws: &[f32] = &ws, d: usize = d) {
                for (((dx, x), g), &r) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)).zip(r)
                {
                    let mut acc = [0.0f32; 16];
                    let (mut xc, mut gc, mut wc) =
                        (x.chunks_exact(16), g.chunks_exact(16), ws.chunks_exact(16));
                    for ((xa, ga), wa) in (&mut xc).zip(&mut gc).zip(&mut wc) {
                        for (((a, &x), &g), &w) in acc.iter_mut().zip(xa).zip(ga).zip(wa) {
                            *a += (g * w) * x;
                        }
                    }
                    let rem = xc
                        .remainder()
                        .iter()
                        .zip(gc.remainder())
                        .zip(wc.remainder());
                    for (a, ((&x, &g), &w)) in acc.iter_mut().zip(rem) {
                        *a += (g * w) * x;
                    }
                    let dot = acc.iter().fold(0.0, |s, &a| s + a);
                    let k = r * r * r * dot / d as f32;
                    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(ws.iter()) {
                        dx.write(r * (g * w) - x * k);
                    }
                }
            })
        });
    // SAFETY: every row of `d` elements was written (`ws` holds `d`), all `xs.len()`.
    unsafe { dx.set_len(xs.len()) };
    from_vec(dx, shape)
}

/// RMSNorm backward for the weight: `∂w = Σ_rows ∂y ⊙ x · r`. Rows are summed in fixed blocks
/// and the blocks in order, so the result does not depend on the thread split.
///
/// # Shapes
/// - grad, x: `[..., d]`, r: `[rows]` → `[d]`
pub(crate) fn rms_norm_backward_w(grad: &FlexTensor, x: &FlexTensor, r: &FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1].max(1);
    let (gs, xs, rs) = (values(grad), values(x), values(r));
    let per = (CHUNK / d).max(1);
    let partials: Vec<Vec<f32>> = xs
        .par_chunks(per * d)
        .zip(gs.par_chunks(per * d))
        .zip(rs.par_chunks(per))
        .map(|((x, g), r)| {
            simd!((x: &[f32] = x, g: &[f32] = g, r: &[f32] = r, d: usize = d) -> Vec<f32> {
                let mut acc = vec![0.0f32; d];
                for ((x, g), &r) in x.chunks(d).zip(g.chunks(d)).zip(r) {
                    for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                        *a += g * (x * r);
                    }
                }
                acc
            })
        })
        .collect();
    let mut dw = vec![0.0f32; d];
    for p in &partials {
        for (a, &v) in dw.iter_mut().zip(p) {
            *a += v;
        }
    }
    from_vec(dw, [d].into())
}

/// One AdamW update in place, element by element: with `k = [β₁, 1 − β₁, β₂, 1 − β₂, decay,
/// 1 − β₁ᵗ, 1 − β₂ᵗ, eps, lr]`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²` and
/// `p ← p·decay − (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + eps) · lr`, in the order of operations of
/// the composed version, so both give the same bits. Element-wise, so the thread split and
/// vector width cannot change a bit either.
pub(crate) fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 9]) {
    const CHUNK: usize = 1 << 15;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            simd!((p: &mut [f32] = p, g: &[f32] = g, m: &mut [f32] = m, v: &mut [f32] = v, k: [f32; 9] = k) {
                let [b1, c1, b2, c2, decay, bc1, bc2, eps, lr] = k;
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let mi = *m * b1 + g * c1;
                    let vi = *v * b2 + (g * g) * c2;
                    let denom = (vi / bc2).sqrt() + eps;
                    *p = *p * decay - (mi / bc1) / denom * lr;
                    *m = mi;
                    *v = vi;
                }
            })
        });
}

/// Matrix products below this many multiply-adds run on one thread (flex's threshold).
const GEMM_PARALLEL: usize = 192 * 192 * 192;

/// The `[rows, cols]` strides of the last two dimensions of `t`, swapped when `trans`.
fn mat_strides(t: &FlexTensor, trans: bool) -> (isize, isize) {
    let s = t.layout().strides();
    let (rs, cs) = (s[s.len() - 2], s[s.len() - 1]);
    if trans { (cs, rs) } else { (rs, cs) }
}

/// Element offset of batch matrix `i` of `t` (row-major over the dimensions before the last two).
fn batch_offset(t: &FlexTensor, mut i: usize) -> isize {
    let (dims, strides) = (t.layout().shape(), t.layout().strides());
    let mut off = t.layout().start_offset() as isize;
    for d in (0..dims.num_dims() - 2).rev() {
        off += (i % dims[d]) as isize * strides[d];
        i /= dims[d];
    }
    off
}

/// Whether [`matmul`] takes `op(a) · op(b)`: f32, rank ≥ 2, the same batch dimensions and
/// matching inner dimensions.
pub(crate) fn matmul_fits(a: &FlexTensor, ta: bool, b: &FlexTensor, tb: bool) -> bool {
    let (ad, bd) = (a.layout().shape(), b.layout().shape());
    let rank = ad.num_dims();
    if rank < 2 || bd.num_dims() != rank || !is_f32(a) || !is_f32(b) {
        return false;
    }
    let inner = if ta { ad[rank - 2] } else { ad[rank - 1] };
    let outer = if tb { bd[rank - 1] } else { bd[rank - 2] };
    (0..rank - 2).all(|d| ad[d] == bd[d]) && inner == outer
}

/// `op(a) · op(b)` for each matrix of matching batch dimensions, where `op` transposes the last
/// two dimensions when its flag is set. Both inputs are read through their strides (a transpose
/// or a permuted view costs no copy) and the product is written straight into a new buffer.
///
/// flex's own matmul zero-fills its output on the calling thread and then copies it once more to
/// realign it, two passes over every product that the matrix kernel overwrites anyway.
///
/// Each output element is the same gemm sum whatever the thread count (threads split rows or
/// columns, never the inner dimension), so results stay reproducible.
///
/// # Shapes
/// - a: `[..., m, k]` (`[..., k, m]` with `ta`), b: `[..., k, n]` (`[..., n, k]` with `tb`),
///   the same batch dimensions → `[..., m, n]`
pub(crate) fn matmul(a: &FlexTensor, ta: bool, b: &FlexTensor, tb: bool) -> FlexTensor {
    // The products below read through raw pointers: shapes that do not fit would read outside
    // the buffers.
    assert!(
        matmul_fits(a, ta, b, tb),
        "matmul of {:?} (transposed: {ta}) and {:?} (transposed: {tb})",
        a.layout().shape(),
        b.layout().shape()
    );
    let (ad, bd) = (a.layout().shape(), b.layout().shape());
    let rank = ad.num_dims();
    let (m, k) = match ta {
        false => (ad[rank - 2], ad[rank - 1]),
        true => (ad[rank - 1], ad[rank - 2]),
    };
    let n = if tb { bd[rank - 2] } else { bd[rank - 1] };
    let batch: usize = (0..rank - 2).map(|d| ad[d]).product();
    let mut dims: Vec<usize> = (0..rank - 2).map(|d| ad[d]).collect();
    dims.extend([m, n]);
    let (a_rs, a_cs) = mat_strides(a, ta);
    let (b_rs, b_cs) = mat_strides(b, tb);
    let total = batch * m * n;
    if k == 0 {
        return from_vec(vec![0.0; total], Shape::from(dims));
    }
    // Addresses as integers, so that the closure below can run on rayon's threads.
    let (ap, bp) = (
        a.storage::<f32>().as_ptr() as usize,
        b.storage::<f32>().as_ptr() as usize,
    );
    let (a_off, b_off): (Vec<isize>, Vec<isize>) = (0..batch)
        .map(|i| (batch_offset(a, i), batch_offset(b, i)))
        .unzip();
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let base = out.as_mut_ptr() as usize;
    // One block: rows `r` and columns `c` of `out[i] = op(a)[i] · op(b)[i]`, every element of
    // the block written, none read.
    let block = |i: usize, r: Range<usize>, c: Range<usize>| {
        // SAFETY: the offsets and strides come from the layouts of `a` and `b`, whose buffers
        // outlive this call, and `r`, `c` lie inside `m`, `n`; the block is inside `out[i]`,
        // the `i`-th run of `m·n` elements of `out`'s capacity, and the blocks that run at the
        // same time are disjoint; with `read_dst = false` gemm writes each of the block's
        // elements and reads none.
        unsafe {
            gemm::gemm(
                r.len(),
                c.len(),
                k,
                (base as *mut f32).add(i * m * n + r.start * n + c.start),
                1,
                n as isize,
                false,
                (ap as *const f32).offset(a_off[i] + r.start as isize * a_rs),
                a_cs,
                a_rs,
                (bp as *const f32).offset(b_off[i] + c.start as isize * b_cs),
                b_cs,
                b_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let ops = m.saturating_mul(n).saturating_mul(k);
    let threads = rayon::current_num_threads();
    if ops >= GEMM_PARALLEL && threads > 1 {
        // One single-threaded product per thread over a band of columns (of rows when the
        // product is narrow): on the step's shapes this beats gemm's own threading by about a
        // tenth, as the threads never wait on each other inside a product.
        // Band `t` of `len` rows or columns; bands start on multiples of 16.
        let band = |len: usize, t: usize| {
            let at = |t: usize| {
                if t == threads {
                    len
                } else {
                    len * t / threads / 16 * 16
                }
            };
            at(t)..at(t + 1)
        };
        for i in 0..batch {
            (0..threads).into_par_iter().for_each(|t| {
                if n >= 64 * threads {
                    block(i, 0..m, band(n, t));
                } else {
                    block(i, band(m, t), 0..n);
                }
            });
        }
    } else if batch > 1 && batch.saturating_mul(ops) >= GEMM_PARALLEL {
        (0..batch)
            .into_par_iter()
            .for_each(|i| block(i, 0..m, 0..n));
    } else {
        (0..batch).for_each(|i| block(i, 0..m, 0..n));
    }
    // SAFETY: the products above wrote all `batch·m·n` elements.
    unsafe { out.set_len(total) };
    from_vec(out, Shape::from(dims))
}

/// Query rows per block of [`causal_attention`]: the rows `[r0, r1)` of a block attend to the
/// keys `[0, r1)` only, so the products skip the blocks above the diagonal.
const ATTN_BLOCK: usize = 64;

/// A row-major matrix behind a raw pointer: element `(r, c)` at `p + r·rs + c·cs`.
#[derive(Clone, Copy)]
struct Mat {
    p: *const f32,
    rs: isize,
    cs: isize,
}

impl Mat {
    /// The rows-by-columns matrix at element `off` of `p`, laid out row-major with `ld` elements
    /// per row, or transposed (element `(r, c)` at `c·ld + r`) with `t`.
    fn at(p: *const f32, off: usize, ld: usize, t: bool) -> Self {
        let (rs, cs) = if t {
            (1, ld as isize)
        } else {
            (ld as isize, 1)
        };
        // A pointer in or one past the buffer, never read outside the products' extents.
        Self {
            p: p.wrapping_add(off),
            rs,
            cs,
        }
    }
}

/// `dst[m, n] = a[m, k] · b[k, n]` on this thread, or `dst += a · b` with `acc`, `dst` row-major
/// with `ld` elements per row.
///
/// # Safety
/// `a`, `b` must be readable over their `[m, k]` and `[k, n]` extents, `dst` writable over
/// `[m, n]` (and readable, with `acc`), and `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on_thread(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    a: Mat,
    b: Mat,
    acc: bool,
) {
    // SAFETY: the caller's extents; with `read_dst = false` gemm writes every element of `dst`
    // and reads none.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld as isize,
            acc,
            a.p,
            a.cs,
            a.rs,
            b.p,
            b.cs,
            b.rs,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Whether [`causal_attention`] takes `q`, `k`, `v` and `starts`: f32, `q` of `[b, h, g·t, d]`
/// and `k`, `v` of `[b, h, t, d]`; `starts`, when given, `b·t` document starts, each row's
/// non-decreasing and each at or before its own position.
pub(crate) fn attention_fits(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    starts: Option<&[usize]>,
) -> bool {
    let (qd, kd, vd) = (q.layout().shape(), k.layout().shape(), v.layout().shape());
    let shapes = [q, k, v].iter().all(|t| is_f32(t))
        && qd.num_dims() == 4
        && kd == vd
        && kd.num_dims() == 4
        && (qd[0], qd[1], qd[3]) == (kd[0], kd[1], kd[3])
        && kd[2] > 0
        && qd[2] % kd[2] == 0;
    shapes
        && starts.is_none_or(|s| {
            let t = kd[2];
            s.len() == kd[0] * t
                && s.chunks(t).all(|row| {
                    row.iter().enumerate().all(|(i, &st)| st <= i)
                        && row.windows(2).all(|w| w[0] <= w[1])
                })
        })
}

/// The first key that query position `r` of head `i` sees: the start of its document in batch
/// row `i / heads` (0 without documents).
#[inline]
fn first_key(starts: Option<&[usize]>, i: usize, heads: usize, t: usize, r: usize) -> usize {
    starts.map_or(0, |s| s[i / heads * t + r])
}

/// Causal attention, `p = softmax(q·kᵀ)` with query row `r` of each group of `t` rows seeing
/// the keys `start(r)..=r` (with `r` its position `r mod t`), and `out = p·v`; `start(r)` is 0,
/// or with `starts` (`[b·t]`, packed batches) where the document of position `r` of the batch
/// row begins, which makes the mask block-diagonal. Queries come in `g` groups of `t` rows that
/// share one key/value head (grouped-query attention). Each block of [`ATTN_BLOCK`] query rows
/// multiplies only the keys from its first row's start to its last row: the blocks above the
/// diagonal, and those before the block's documents, which the mask zeroes, are never computed
/// (about 3/8 of attention's products at 4 blocks without documents). Every element is the same
/// dot product as in the full product followed by the masked softmax, and the masked entries of
/// `p` are 0.
///
/// # Shapes
/// - q: `[b, h, g·t, d]`, k, v: `[b, h, t, d]`, starts: `[b·t]`
/// - output: out `[b, h, g·t, d]`, p `[b, h, g·t, t]`
pub(crate) fn causal_attention(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    starts: Option<&[usize]>,
) -> (FlexTensor, FlexTensor) {
    assert!(
        attention_fits(q, k, v, starts),
        "attention of {:?}, {:?}, {:?} with {:?} document starts",
        q.layout().shape(),
        k.layout().shape(),
        v.layout().shape(),
        starts.map(<[usize]>::len)
    );
    let (qd, kd) = (q.layout().shape().clone(), k.layout().shape());
    let (heads, rows, t, d) = (qd[0] * qd[1], qd[2], kd[2], kd[3]);
    let kv_heads = qd[1];
    let (qs, ks, vs) = (values(q), values(k), values(v));
    let blocks = t.div_ceil(ATTN_BLOCK);
    let (mut p, mut out) = (
        Vec::with_capacity(heads * rows * t),
        Vec::with_capacity(heads * rows * d),
    );
    let (pp, op) = (p.as_mut_ptr() as usize, out.as_mut_ptr() as usize);
    let (qp, kp, vp) = (
        qs.as_ptr() as usize,
        ks.as_ptr() as usize,
        vs.as_ptr() as usize,
    );
    // One task per block of query rows: `(head, group, block)`.
    (0..heads * (rows / t) * blocks).into_par_iter().for_each(|task| {
        let (i, rest) = (task / (rows / t * blocks), task % (rows / t * blocks));
        let (g, blk) = (rest / blocks, rest % blocks);
        let (r0, r1) = (blk * ATTN_BLOCK, ((blk + 1) * ATTN_BLOCK).min(t));
        let row = i * rows + g * t + r0; // first query row of the block, over all heads
        // The block sees keys `lo..r1`: from its first row's document start (starts never
        // decrease along a row) to its last row.
        let lo = first_key(starts, i, kv_heads, t, r0);
        let firsts: Vec<usize> = match starts {
            Some(_) => (r0..r1).map(|r| first_key(starts, i, kv_heads, t, r)).collect(),
            None => Vec::new(),
        };
        let w = r1 - lo;
        let mut s = vec![0.0f32; (r1 - r0) * w];
        // SAFETY: q's rows `row..row + r1 − r0` and k's rows `lo..r1` lie inside their
        // buffers; `s` holds `(r1 − r0)·(r1 − lo)` elements.
        unsafe {
            let q = Mat::at(qp as *const f32, row * d, d, false);
            let kt = Mat::at(kp as *const f32, i * t * d + lo * d, d, true);
            gemm_on_thread(r1 - r0, w, d, s.as_mut_ptr(), w, q, kt, false);
        }
        // SAFETY: the block's rows of `p`, `(r1 − r0)·t` elements from `row·t`, belong to this
        // task alone and lie inside `p`'s capacity.
        let prows = unsafe {
            std::slice::from_raw_parts_mut((pp as *mut MaybeUninit<f32>).add(row * t), (r1 - r0) * t)
        };
        simd!((prows: &mut [MaybeUninit<f32>] = prows, s: &[f32] = &s, firsts: &[usize] = &firsts, t: usize = t, r0: usize = r0, lo: usize = lo, w: usize = w) {
            for (j, (dst, src)) in prows.chunks_mut(t).zip(s.chunks(w)).enumerate() {
                let first = firsts.get(j).copied().unwrap_or(0);
                let keep = r0 + j + 1;
                let (dst, masked) = dst.split_at_mut(keep);
                let (before, dst) = dst.split_at_mut(first);
                softmax_row(&src[first - lo..keep - lo], dst);
                before.fill(MaybeUninit::new(0.0));
                masked.fill(MaybeUninit::new(0.0));
            }
        });
        // SAFETY: the block's rows of `p` were all written just above; v's rows `lo..r1` and
        // the block's rows of `out` (this task's alone) lie inside their buffers.
        unsafe {
            let pb = Mat::at(pp as *const f32, row * t + lo, t, false);
            let v = Mat::at(vp as *const f32, i * t * d + lo * d, d, false);
            gemm_on_thread(r1 - r0, d, w, (op as *mut f32).add(row * d), d, pb, v, false);
        }
    });
    // SAFETY: the tasks cover every block of rows of every group and head, and each wrote all
    // of its rows of `p` and `out`.
    unsafe {
        p.set_len(heads * rows * t);
        out.set_len(heads * rows * d);
    }
    let pshape = Shape::from(vec![qd[0], qd[1], rows, t]);
    (from_vec(out, qd), from_vec(p, pshape))
}

/// Whether [`decode_attention`] takes `q`, `k`, `v`: f32, `q` of `[b, h, g, d]`, `k` and `v` of
/// `[b, h, cap, d]` with `len ≤ cap` positions filled, and `firsts` one first key per batch row,
/// each before `len`.
pub(crate) fn decode_fits(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    len: usize,
    firsts: &[usize],
) -> bool {
    let (qd, kd, vd) = (q.layout().shape(), k.layout().shape(), v.layout().shape());
    [q, k, v].iter().all(|t| is_f32(t))
        && qd.num_dims() == 4
        && kd == vd
        && kd.num_dims() == 4
        && (qd[0], qd[1], qd[3]) == (kd[0], kd[1], kd[3])
        && len <= kd[2]
        && firsts.len() == qd[0]
        && firsts.iter().all(|&f| f < len)
}

/// Attention of one new position per batch row against its cached keys and values: for each
/// key/value head, its `g` query rows (the query heads that share it) see the keys
/// `firsts[row]..len` — the row's own tokens, not its left padding — so `out = softmax(q·kᵀ)·v`
/// over those keys. The cache holds `cap ≥ len` positions; the rest are never read. The shape
/// generation's decode steps have (one query row per head, many keys), where the prefill's
/// [`causal_attention`] has as many queries as keys.
///
/// # Shapes
/// - q: `[b, h, g, d]`, k, v: `[b, h, cap, d]`, firsts: `[b]`
/// - output: `[b, h, g, d]`
pub(crate) fn decode_attention(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    len: usize,
    firsts: &[usize],
) -> FlexTensor {
    assert!(
        decode_fits(q, k, v, len, firsts),
        "decode attention of {:?} against {:?}, {:?} at length {len} with first keys {firsts:?}",
        q.layout().shape(),
        k.layout().shape(),
        v.layout().shape(),
    );
    let qd = q.layout().shape().clone();
    let (heads, g, d, cap) = (qd[1], qd[2], qd[3], k.layout().shape()[2]);
    let (qs, ks, vs) = (values(q), values(k), values(v));
    let (qp, kp, vp) = (
        qs.as_ptr() as usize,
        ks.as_ptr() as usize,
        vs.as_ptr() as usize,
    );
    let mut out = vec![0.0f32; qd[0] * heads * g * d];
    // One task per (batch row, key/value head).
    out.par_chunks_mut(g * d).enumerate().for_each(|(i, o)| {
        let first = firsts[i / heads];
        let w = len - first;
        let mut s = vec![0.0f32; g * w];
        // SAFETY: q's rows `i·g..(i + 1)·g` and this head's cached rows `first..len` lie inside
        // their buffers; `s` holds `g·w` elements.
        unsafe {
            let q = Mat::at(qp as *const f32, i * g * d, d, false);
            let kt = Mat::at(kp as *const f32, (i * cap + first) * d, d, true);
            gemm_on_thread(g, w, d, s.as_mut_ptr(), w, q, kt, false);
        }
        let mut p: Vec<MaybeUninit<f32>> = Vec::with_capacity(g * w);
        // SAFETY: `softmax_row` writes every element of each row before `p` is read.
        unsafe { p.set_len(g * w) };
        for (dst, src) in p.chunks_mut(w).zip(s.chunks(w)) {
            softmax_row(src, dst);
        }
        // SAFETY: `p` is `g × w`, fully written; v's cached rows `first..len` of this head lie
        // inside its buffer; `o` is this task's `g × d` block.
        unsafe {
            let pm = Mat::at(p.as_ptr() as *const f32, 0, w, false);
            let vm = Mat::at(vp as *const f32, (i * cap + first) * d, d, false);
            gemm_on_thread(g, d, w, o.as_mut_ptr(), d, pm, vm, false);
        }
    });
    from_vec(out, qd)
}

/// Backward of [`causal_attention`] from its saved `p` (and the same `starts`): per head and
/// group, with `∂p = ∂out·vᵀ` and `∂s = p ⊙ (∂p − Σ(∂p ⊙ p))` over each query row's visible
/// keys, `∂q = ∂s·k`, `∂k = ∂sᵀ·q` and `∂v = pᵀ·∂out`, the groups' contributions to `∂k`, `∂v`
/// added in group order. Blocks the mask hides (where `p` and `∂s` are 0) are skipped as in the
/// forward: above the diagonal, before a block's documents, and for a key block the query rows
/// of later documents.
///
/// # Shapes
/// - q, grad: `[b, h, g·t, d]`, k, v: `[b, h, t, d]`, p: `[b, h, g·t, t]`, starts: `[b·t]`
/// - output: `∂q` like q, `∂k`, `∂v` like k
pub(crate) fn causal_attention_backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    p: &FlexTensor,
    grad: &FlexTensor,
    starts: Option<&[usize]>,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    assert!(
        attention_fits(q, k, v, starts) && grad.layout().shape() == q.layout().shape(),
        "attention backward of {:?}, {:?}",
        q.layout().shape(),
        grad.layout().shape()
    );
    let (qd, kd) = (q.layout().shape().clone(), k.layout().shape().clone());
    let (heads, rows, t, d) = (qd[0] * qd[1], qd[2], kd[2], kd[3]);
    let kv_heads = qd[1];
    assert_eq!(
        p.layout().num_elements(),
        heads * rows * t,
        "attention probabilities"
    );
    let (qs, ks, vs, ps, gs) = (values(q), values(k), values(v), values(p), values(grad));
    let blocks = t.div_ceil(ATTN_BLOCK);
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(heads * rows * d),
        Vec::with_capacity(heads * t * d),
        Vec::with_capacity(heads * t * d),
    );
    let (dqp, dkp, dvp) = (
        dq.as_mut_ptr() as usize,
        dk.as_mut_ptr() as usize,
        dv.as_mut_ptr() as usize,
    );
    let (qp, kp, vp, pp, gp) = (
        qs.as_ptr() as usize,
        ks.as_ptr() as usize,
        vs.as_ptr() as usize,
        ps.as_ptr() as usize,
        gs.as_ptr() as usize,
    );
    // One task per head: its `∂k`, `∂v` rows sum over all of its groups' query rows.
    (0..heads).into_par_iter().for_each(|i| {
        let (qp, kp, vp, pp, gp) = (
            qp as *const f32,
            kp as *const f32,
            vp as *const f32,
            pp as *const f32,
            gp as *const f32,
        );
        // The document starts of this head's batch row, `[t]`.
        let row_starts = starts.map(|s| &s[i / kv_heads * t..(i / kv_heads + 1) * t]);
        // `∂s` of one group, `[t, t]`; only the blocks the mask leaves are used. A block of
        // rows writes the columns from its first key on, the same for every group: the columns
        // before it stay 0 from here, as `p` is there (`∂k`, `∂v` read them).
        let mut ds = vec![0.0f32; t * t];
        for g in 0..rows / t {
            let row = i * rows + g * t; // the group's first query row, over all heads
            for blk in 0..blocks {
                let (r0, r1) = (blk * ATTN_BLOCK, ((blk + 1) * ATTN_BLOCK).min(t));
                let lo = first_key(starts, i, kv_heads, t, r0);
                let dsb = &mut ds[r0 * t..r1 * t];
                // SAFETY: grad's rows `row + r0..row + r1` and v's rows `lo..r1` lie inside
                // their buffers; `dsb` holds `r1 − r0` rows of `t ≥ r1` elements, written from
                // column `lo`.
                unsafe {
                    let go = Mat::at(gp, (row + r0) * d, d, false);
                    let vt = Mat::at(vp, i * t * d + lo * d, d, true);
                    gemm_on_thread(r1 - r0, r1 - lo, d, dsb.as_mut_ptr().add(lo), t, go, vt, false);
                }
                let pb = &ps[(row + r0) * t..(row + r1) * t];
                simd!((dsb: &mut [f32] = dsb, pb: &[f32] = pb, t: usize = t, lo: usize = lo, r1: usize = r1) {
                    for (dp, y) in dsb.chunks_mut(t).zip(pb.chunks(t)) {
                        let (dp, y) = (&mut dp[lo..r1], &y[lo..r1]);
                        let dot = dot(dp, y);
                        for (g, &y) in dp.iter_mut().zip(y) {
                            *g = y * (*g - dot);
                        }
                    }
                });
                // SAFETY: `ds`'s block rows (written above, columns `lo..r1`), k's rows
                // `lo..r1`, and `∂q`'s rows of this block (this task's alone) lie inside their
                // buffers.
                unsafe {
                    let dsm = Mat::at(ds.as_ptr(), r0 * t + lo, t, false);
                    let km = Mat::at(kp, i * t * d + lo * d, d, false);
                    gemm_on_thread(
                        r1 - r0,
                        d,
                        r1 - lo,
                        (dqp as *mut f32).add((row + r0) * d),
                        d,
                        dsm,
                        km,
                        false,
                    );
                }
            }
            // Key block `[c0, c1)` is seen by the query rows `c0..hi` of the group: those whose
            // document starts before `c1` (all of `c0..t` without documents).
            for blk in 0..blocks {
                let (c0, c1) = (blk * ATTN_BLOCK, ((blk + 1) * ATTN_BLOCK).min(t));
                let hi = row_starts.map_or(t, |s| c0 + s[c0..].partition_point(|&st| st < c1));
                // SAFETY: `ds` rows `c0..hi` hold columns `< c1` (rows of block `b ≥ blk` have
                // `r1 ≥ c1`, and 0 before their block's first key), as do `p`'s;
                // q's and grad's group rows `c0..hi` and the head's `∂k`, `∂v` rows `c0..c1`
                // (this task's alone, written by the first group before the others add to
                // them) lie inside their buffers.
                unsafe {
                    let at = i * t * d + c0 * d;
                    let ds_t = Mat::at(ds.as_ptr(), c0 * t + c0, t, true);
                    let p_t = Mat::at(pp, (row + c0) * t + c0, t, true);
                    let (qm, gm) = (
                        Mat::at(qp, (row + c0) * d, d, false),
                        Mat::at(gp, (row + c0) * d, d, false),
                    );
                    // ∂k += ∂sᵀ·q, ∂v += pᵀ·∂out over the rows that see the block.
                    for (dst, a, b) in [(dkp, ds_t, qm), (dvp, p_t, gm)] {
                        let dst = (dst as *mut f32).add(at);
                        gemm_on_thread(c1 - c0, d, hi - c0, dst, d, a, b, g > 0);
                    }
                }
            }
        }
    });
    // SAFETY: every head's task wrote all of its rows of `∂q`, and its `∂k`, `∂v` rows with the
    // first group (`rows / t ≥ 1`).
    unsafe {
        dq.set_len(heads * rows * d);
        dk.set_len(heads * t * d);
        dv.set_len(heads * t * d);
    }
    (from_vec(dq, qd), from_vec(dk, kd.clone()), from_vec(dv, kd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_positions_writes_in_place_and_leaves_a_shared_cache_alone() {
        // [1, 2, 4, 2] zeros; write [1, 2, 1, 2] at position 2.
        let cache = from_vec(vec![0.0; 16], Shape::from(vec![1, 2, 4, 2]));
        let value = from_vec(vec![1.0, 2.0, 3.0, 4.0], Shape::from(vec![1, 2, 1, 2]));
        let before = cache.storage::<f32>().as_ptr();
        let cache = write_positions(cache, 2, &value).expect("a cache of its own");
        assert_eq!(cache.storage::<f32>().as_ptr(), before, "written in place");
        let want = [
            0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0,
        ];
        assert_eq!(cache.storage::<f32>(), want);
        // Another handle on the buffer: nothing written, the cache back.
        let other = cache.clone();
        let back = write_positions(cache, 0, &value).expect_err("a shared cache");
        assert_eq!(back.storage::<f32>(), want);
        assert_eq!(other.storage::<f32>(), want);
        // Past the capacity: refused.
        drop(other);
        assert!(write_positions(back, 4, &value).is_err());
    }

    /// Every 997th positive f32 below 104, with its negative, plus the edges.
    fn samples() -> Vec<f32> {
        let top = 104.0f32.to_bits();
        let mut xs: Vec<f32> = (0..top / 997)
            .map(|i| f32::from_bits(i * 997))
            .flat_map(|x| [x, -x])
            .collect();
        xs.extend([0.0, -0.0, 88.0, 88.5, -87.33, -87.4, 1e-30, -1e-30]);
        xs
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_f64_exp_and_keeps_the_special_values() {
        let mut worst = 0.0f64;
        let mut at = 0.0;
        for x in samples() {
            let got = exp(x);
            if x < -87.336 {
                assert_eq!(got, 0.0, "exp({x})");
            } else if x > 88.37 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else {
                let want = (x as f64).exp() as f32;
                let ulp = want.to_bits().abs_diff(got.to_bits()) as f64;
                if ulp > worst {
                    (worst, at) = (ulp, x);
                }
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp at {at}");
        assert!(worst >= 1.0, "the polynomial is not libm's exp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
    }

    #[test]
    fn contiguous_copies_any_permutation_and_offset() {
        // A [2, 3, 4, 5] tensor, permuted, then narrowed: every element lands where the strides say.
        let data: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let t = from_vec(data, [2, 3, 4, 5].into());
        for axes in [[0, 2, 1, 3], [0, 2, 3, 1], [3, 1, 0, 2]] {
            let p = t.permute(&axes).narrow(1, 1, 2);
            let c = contiguous(&p);
            let dims: Vec<usize> = p.layout().shape().iter().copied().collect();
            let got = c.storage::<f32>();
            let mut k = 0;
            for i in 0..dims[0] {
                for j in 0..dims[1] {
                    for l in 0..dims[2] {
                        for m in 0..dims[3] {
                            let want = p.layout().index(&[i, j, l, m]);
                            assert_eq!(got[k], want as f32, "{axes:?} at {i},{j},{l},{m}");
                            k += 1;
                        }
                    }
                }
            }
            assert_eq!(k, got.len());
        }
    }
}
