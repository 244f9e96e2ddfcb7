//! Softmax, SiLU, next-token cross-entropy, RMSNorm, rotary embedding and permutations as single
//! autodiff ops with hand-written backward passes.
//!
//! burn's autodiff backend builds `softmax` and `log_softmax` out of their elementary ops
//! (max, subtract, exp, sum, divide or log), records every one of them, and differentiates
//! each in turn, recomputing the exponentials. On the CPU backend those full-size passes cost
//! more than the matrix products of a small model. Here each is one tracked op:
//!
//! - [`softmax_last`]: backward `∂x = y ⊙ (∂y − Σ(∂y ⊙ y))` from the saved output;
//!   [`causal_softmax`] is the same op with attention's causal mask applied in the loop.
//! - [`cross_entropy`]: `nll = logsumexp(x) − x[target]` per row, saving the softmax for the
//!   backward `∂x = softmax(x) · ∂nll − onehot(target) · ∂nll`.
//! - [`silu`]: `y = x·σ(x)`, saving `σ(x)` so the backward `∂x = ∂y · σ · (1 + x − y)` needs
//!   no second pass of exponentials.
//! - [`permute`]: a permutation laid out contiguously, whose backward is the inverse
//!   permutation, also contiguous. burn's own `permute` is a strided view; the reshape after it
//!   (and the reshape of its gradient) then copies through flex's element-at-a-time walk.
//! - [`swiglu`]: `silu(a) ⊙ b` in one pass, the backward for both inputs from the saved
//!   `σ(a)` and `silu(a)`.
//! - [`rms_norm`]: saves the per-row `1/√(mean(x²) + eps)`; gradients for the input and the
//!   weight.
//! - [`rope`]: the rotation is linear, so its backward is the transposed rotation of the
//!   gradient, one pass instead of the narrow/cat/slice ops of the composed form.
//! - [`matmul`]: `op(a) · op(b)` with transpose flags; forward and backward products read their
//!   operands through strides and write fresh buffers, where flex's matmul zero-fills and then
//!   copies every output, and the weight gradient of `x · Wᵀ` arrives as a transposed view that
//!   is copied again before the optimizer.
//! - [`causal_attention`]: `softmax(q·kᵀ + mask) · v` by blocks of query rows that skip the
//!   keys the mask hides (causal, or causal within each document of a packed batch), saving
//!   only the probabilities for the backward.
//!
//! On flex with f32 the forward and backward passes are the multi-threaded loops of
//! [`kernels`], and on wgpu and CUDA burn's ops. Softmax, SiLU, cross-entropy and permute are
//! single ops on every autodiff backend; RMSNorm, rope, SwiGLU, the causal softmax, matmul and
//! causal attention only on flex, composed from burn's ops elsewhere. SiLU alone keeps burn's
//! ops on flex too: the model reaches it only through SwiGLU's composed form on the other
//! backends.
//!
//! All are the same mathematics as the composed versions (tests compare them); only the order
//! of float operations differs. The custom ops exist for the autodiff backends this crate runs
//! training on (`Autodiff<Flex>`, `Autodiff<Wgpu>`, `Autodiff<Cuda>`, picked by type at run
//! time); any other backend gets the composed version.

use std::any::Any;
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary, unary};
use burn::backend::flex::FlexTensor;
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::kernels;
use super::llama::AttentionMask;

/// `t` as a `U` when `T` and `U` are the same type.
pub(crate) fn same<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("slot was just filled")),
        None => Err(slot.expect("slot was just filled")),
    }
}

/// Runs `$f::<Inner $(, extra generics)>` when the arguments belong to one of the autodiff
/// backends this crate trains on, else `$fallback`.
macro_rules! on_autodiff {
    ($args:expr, $f:ident [$($g:tt)*], $fallback:expr) => {{
        let args = $args;
        let args = match same(args) {
            Ok(a) => return back($f::<burn::backend::Flex $($g)*>(a)),
            Err(a) => a,
        };
        #[cfg(feature = "wgpu")]
        let args = match same(args) {
            Ok(a) => return back($f::<burn::backend::Wgpu $($g)*>(a)),
            Err(a) => a,
        };
        #[cfg(feature = "cuda")]
        let args = match same(args) {
            Ok(a) => return back($f::<burn::backend::Cuda $($g)*>(a)),
            Err(a) => a,
        };
        $fallback(args)
    }};
}

/// The result of a backend-specific function, as the caller's type (the same type).
pub(crate) fn back<T: 'static, U: 'static>(t: T) -> U {
    match same::<T, U>(t) {
        Ok(u) => u,
        Err(_) => unreachable!("the dispatch matched the backend type"),
    }
}

fn inner<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `p` as flex's tensor when the inner backend is flex and `p` holds f32: the case the loops in
/// [`kernels`] take.
fn flex<I: Backend>(p: &I::FloatTensorPrimitive) -> Option<&FlexTensor> {
    (p as &dyn Any)
        .downcast_ref::<FlexTensor>()
        .filter(|t| kernels::is_f32(t))
}

/// `p` by value as flex's f32 tensor, or back unchanged.
fn flex_owned<I: Backend>(
    p: I::FloatTensorPrimitive,
) -> Result<FlexTensor, I::FloatTensorPrimitive> {
    match same::<_, FlexTensor>(p) {
        Ok(t) if kernels::is_f32(&t) => Ok(t),
        Ok(t) => Err(back(t)),
        Err(p) => Err(p),
    }
}

/// Token ids as `i64`s, for the flex loops.
fn ids<I: Backend>(t: &I::IntTensorPrimitive) -> Vec<i64> {
    Tensor::<I, 1, Int>::from_primitive(t.clone())
        .into_data()
        .iter::<i64>()
        .collect()
}

/// Whether `B` gets the hand-written ops (an autodiff backend this crate trains on).
pub fn has_fused_ops<B: Backend>() -> bool {
    fn yes<I: Backend>(_: Tensor<Autodiff<I>, 1>) -> bool {
        true
    }
    let probe = Tensor::<B, 1>::empty([0], &Default::default());
    on_autodiff!(probe, yes[], |_| false)
}

/// Softmax over the last dimension.
///
/// # Shapes
/// - x: `[..., n]` → same
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    fn composed<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
        activation::softmax(x, D - 1)
    }
    on_autodiff!(x, ad_softmax[, D], composed::<B, D>)
}

/// Attention's softmax under its mask: `softmax_last(scores + mask.bias())` with the bias of
/// [`AttentionMask::bias`]. On flex, for a causal mask, the masked entries are skipped instead of
/// added and exponentiated; the result is the same. A mask with documents adds its bias.
///
/// # Shapes
/// - scores: `[batch, kv_heads, groups·t, t]` → same
pub fn causal_softmax<B: Backend>(scores: Tensor<B, 4>, mask: &AttentionMask<B>) -> Tensor<B, 4> {
    fn composed<B: Backend>((scores, mask): (Tensor<B, 4>, AttentionMask<B>)) -> Tensor<B, 4> {
        let [b, g, r, t] = scores.dims();
        let bias = mask.bias(); // [1 or b, groups·t·t]
        let scores = match mask.docs() {
            None => (scores.reshape([b * g, r * t]) + bias).reshape([b, g, r, t]),
            // One bias row per batch row, shared by its key/value heads.
            Some(_) => {
                (scores.reshape([b, g, r * t]) + bias.unsqueeze_dim::<3>(1)).reshape([b, g, r, t])
            }
        };
        softmax_last(scores)
    }
    fn ad<I: Backend>(
        (scores, mask): (Tensor<Autodiff<I>, 4>, AttentionMask<Autodiff<I>>),
    ) -> Tensor<Autodiff<I>, 4> {
        let on_flex = flex::<I>(&scores.clone().into_primitive().tensor().primitive).is_some();
        match on_flex && mask.docs().is_none() {
            true => ad_softmax_with(scores, true),
            false => composed((scores, mask)),
        }
    }
    on_autodiff!((scores, mask.clone()), ad[], composed::<B>)
}

/// Masked attention `softmax(q·kᵀ + mask) · v` ([`AttentionMask`]: causal, or causal within
/// each document of a packed batch); each group of `t` query rows shares one key/value head. On
/// flex one op ([`kernels::causal_attention`], given the documents' starts, never a dense bias):
/// the products skip the key blocks that the mask hides from each block of query rows, and the
/// backward saves only the probabilities. Elsewhere, [`matmul`], [`causal_softmax`] and
/// [`matmul`] ([`causal_attention_composed`]).
///
/// # Shapes
/// - q: `[b, kv_heads, groups·t, head_dim]`, k, v: `[b, kv_heads, t, head_dim]`
///   → `[b, kv_heads, groups·t, head_dim]`
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    on_autodiff!((q, k, v, mask.clone()), ad_causal_attention[], attention_composed::<B>)
}

/// Attention of each batch row's newest position against a key/value cache (generation's
/// decode step): the query heads grouped per key/value head see the cached keys
/// `firsts[row]..len`, the row's tokens without its left padding. Inference only (no autodiff
/// op): on flex one loop ([`kernels::decode_attention`]) reading the cache in place; elsewhere
/// burn's matmul and softmax over the filled part of the cache with the padding masked.
///
/// # Shapes
/// - q: `[b, kv_heads, groups, head_dim]`, k, v: `[b, kv_heads, cap, head_dim]` (positions
///   `0..len` filled), firsts: `[b]` → `[b, kv_heads, groups, head_dim]`
pub fn decode_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    len: usize,
    firsts: &[usize],
) -> Tensor<B, 4> {
    type Flex = burn::backend::Flex;
    type Args<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);
    if let Ok((qf, kf, vf)) = same::<_, Args<Flex>>((q.clone(), k.clone(), v.clone()))
        && let (Ok(qf), Ok(kf), Ok(vf)) = (
            flex_owned::<Flex>(qf.into_primitive().tensor()),
            flex_owned::<Flex>(kf.into_primitive().tensor()),
            flex_owned::<Flex>(vf.into_primitive().tensor()),
        )
        && kernels::decode_fits(&qf, &kf, &vf, len, firsts)
    {
        let out = kernels::decode_attention(&qf, &kf, &vf, len, firsts);
        return back(inner::<Flex, 4>(out));
    }
    decode_attention_composed(q, k, v, len, firsts)
}

/// [`decode_attention`] of burn's ops (what wgpu and CUDA run; public so that tests can hold the
/// flex loop to it).
///
/// # Shapes
/// - as [`decode_attention`]
pub fn decode_attention_composed<B: Backend>(
    q: Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    len: usize,
    firsts: &[usize],
) -> Tensor<B, 4> {
    let [b, _, _, _] = q.dims();
    let device = q.device();
    let k = k.clone().narrow(2, 0, len); // [b, h, len, d]
    let v = v.clone().narrow(2, 0, len);
    let scores = q.matmul(k.swap_dims(2, 3)); // [b, h, g, len]
    let mut bias = vec![0.0f32; b * len];
    for (row, &first) in bias.chunks_mut(len).zip(firsts) {
        row[..first].fill(f32::NEG_INFINITY);
    }
    let bias =
        Tensor::<B, 4>::from_data(burn::tensor::TensorData::new(bias, [b, 1, 1, len]), &device);
    activation::softmax(scores + bias, 3).matmul(v)
}

/// [`causal_attention`] composed of [`matmul`], [`causal_softmax`] and [`matmul`]: what wgpu and
/// CUDA run, and flex when its kernel does not take the shapes (public so that tests can hold
/// the kernel to it). On plain flex (no autodiff) it still takes the kernel.
///
/// # Shapes
/// - as [`causal_attention`]
pub fn causal_attention_composed<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    attention_composed((q, k, v, mask.clone()))
}

/// The operands of [`causal_attention`].
type AttentionArgs<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, AttentionMask<B>);

/// The documents' starts that [`kernels::causal_attention`] takes.
fn starts<B: Backend>(mask: &AttentionMask<B>) -> Option<Arc<[usize]>> {
    mask.docs().map(|d| d.starts().clone())
}

fn attention_composed<B: Backend>((q, k, v, mask): AttentionArgs<B>) -> Tensor<B, 4> {
    // Plain flex (inference) takes the same kernel.
    type Flex = burn::backend::Flex;
    if let Ok((qf, kf, vf, _)) =
        same::<_, AttentionArgs<Flex>>((q.clone(), k.clone(), v.clone(), mask.clone()))
        && let (Ok(qf), Ok(kf), Ok(vf)) = (
            flex_owned::<Flex>(qf.into_primitive().tensor()),
            flex_owned::<Flex>(kf.into_primitive().tensor()),
            flex_owned::<Flex>(vf.into_primitive().tensor()),
        )
        && kernels::attention_fits(&qf, &kf, &vf, starts(&mask).as_deref())
    {
        let (out, _) = kernels::causal_attention(&qf, &kf, &vf, starts(&mask).as_deref());
        return back(inner::<Flex, 4>(out));
    }
    let scores = matmul(q, false, k, true); // [b, kv_heads, groups·t, t]
    matmul(causal_softmax(scores, &mask), false, v, false)
}

fn ad_causal_attention<I: Backend>(
    (q, k, v, mask): AttentionArgs<Autodiff<I>>,
) -> Tensor<Autodiff<I>, 4> {
    #[derive(Debug)]
    struct CausalAttention;

    impl<I: Backend> Backward<I, 3> for CausalAttention {
        /// `q`, `k`, `v`, the probabilities and the documents' starts.
        type State = ([I::FloatTensorPrimitive; 4], Option<Arc<[usize]>>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let get = |p: &I::FloatTensorPrimitive| match flex::<I>(p) {
                Some(t) => t.clone(),
                None => unreachable!("the attention op is recorded only for flex f32 tensors"),
            };
            let (state, starts) = ops.state;
            let [q, k, v, p] = state.each_ref().map(get);
            let grad = get(&grads.consume::<I>(&ops.node));
            let (dq, dk, dv) =
                kernels::causal_attention_backward(&q, &k, &v, &p, &grad, starts.as_deref());
            for (parent, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
                if let Some(node) = parent {
                    grads.register::<I>(node.id, back(g));
                }
            }
        }
    }

    let [qp, kp, vp] = [&q, &k, &v].map(|t| t.clone().into_primitive().tensor());
    let (Some(qf), Some(kf), Some(vf)) = (
        flex::<I>(&qp.primitive),
        flex::<I>(&kp.primitive),
        flex::<I>(&vp.primitive),
    ) else {
        return attention_composed((q, k, v, mask));
    };
    let starts = starts(&mask);
    if !kernels::attention_fits(qf, kf, vf, starts.as_deref()) {
        return attention_composed((q, k, v, mask));
    }
    let (out, p) = kernels::causal_attention(qf, kf, vf, starts.as_deref());
    let out: I::FloatTensorPrimitive = back(out);
    let out = match CausalAttention
        .prepare::<NoCheckpointing>([qp.node.clone(), kp.node.clone(), vp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            ([qp.primitive, kp.primitive, vp.primitive, back(p)], starts),
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// SiLU (swish), `x·σ(x)`.
///
/// # Shapes
/// - x: any → same
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    fn composed<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
        activation::silu(x)
    }
    on_autodiff!(x, ad_silu[, D], composed::<B, D>)
}

/// SwiGLU's product `silu(a) ⊙ b` as one op (the gate and up projections of the MLP).
///
/// # Shapes
/// - a, b: `[..]` same shape → same
pub fn swiglu<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    on_autodiff!((a, b), ad_swiglu[, D], swiglu_composed::<B, D>)
}

fn swiglu_composed<B: Backend, const D: usize>(
    (a, b): (Tensor<B, D>, Tensor<B, D>),
) -> Tensor<B, D> {
    silu(a) * b
}

fn ad_swiglu<I: Backend, const D: usize>(
    (a, b): (Tensor<Autodiff<I>, D>, Tensor<Autodiff<I>, D>),
) -> Tensor<Autodiff<I>, D> {
    #[derive(Debug)]
    struct SwiGlu<const D: usize>;

    impl<I: Backend, const D: usize> Backward<I, 2> for SwiGlu<D> {
        /// `a`, `b`, `σ(a)` and `silu(a)`.
        type State = [I::FloatTensorPrimitive; 4];

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let state = ops.state;
            let get = |p: &I::FloatTensorPrimitive| match flex::<I>(p) {
                Some(t) => t.clone(),
                None => unreachable!("the swiglu op is recorded only for flex f32 tensors"),
            };
            let [a, b, s, h] = [0, 1, 2, 3].map(|i| get(&state[i]));
            binary::<I, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| back(kernels::swiglu_backward_gate(&get(&grad), &a, &b, &s, &h)),
                |grad| back(kernels::mul(&get(&grad), &h)),
            );
        }
    }

    let ap = a.clone().into_primitive().tensor();
    let bp = b.clone().into_primitive().tensor();
    let (Some(af), Some(bf)) = (flex::<I>(&ap.primitive), flex::<I>(&bp.primitive)) else {
        return swiglu_composed((a, b));
    };
    if af.layout().shape() != bf.layout().shape() {
        return swiglu_composed((a, b));
    }
    let (y, s, h) = kernels::swiglu(af, bf);
    let y: I::FloatTensorPrimitive = back(y);
    let out = match SwiGlu::<D>
        .prepare::<NoCheckpointing>([ap.node.clone(), bp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish([ap.primitive, bp.primitive, back(s), back(h)], y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `op(a) · op(b)`, where `op` transposes the last two dimensions when its flag is set: the
/// layer products `x · Wᵀ` and attention's batched products. On flex (f32, the same batch
/// dimensions) forward and backward products read their operands through strides and write
/// fresh buffers ([`kernels::matmul`]); the backward is `∂op(a) = ∂y · op(b)ᵀ` and
/// `∂op(b) = op(a)ᵀ · ∂y`, each computed directly in the operand's own layout. Elsewhere,
/// burn's `matmul` and `transpose`.
///
/// # Shapes
/// - a: `[..., m, k]` (`[..., k, m]` with `ta`), b: `[..., k, n]` (`[..., n, k]` with `tb`)
///   → `[..., m, n]`
pub fn matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    ta: bool,
    b: Tensor<B, D>,
    tb: bool,
) -> Tensor<B, D> {
    on_autodiff!((a, ta, b, tb), ad_matmul[, D], matmul_composed::<B, D>)
}

/// The operands of [`matmul`] and their transpose flags.
type MatmulArgs<B, const D: usize> = (Tensor<B, D>, bool, Tensor<B, D>, bool);

fn matmul_composed<B: Backend, const D: usize>((a, ta, b, tb): MatmulArgs<B, D>) -> Tensor<B, D> {
    // Plain flex (inference) takes the same kernel.
    type Flex = burn::backend::Flex;
    if let Ok(args) = same::<_, MatmulArgs<Flex, D>>((a.clone(), ta, b.clone(), tb))
        && let (Ok(af), Ok(bf)) = (
            flex_owned::<Flex>(args.0.into_primitive().tensor()),
            flex_owned::<Flex>(args.2.into_primitive().tensor()),
        )
        && kernels::matmul_fits(&af, ta, &bf, tb)
    {
        return back(inner::<Flex, D>(kernels::matmul(&af, ta, &bf, tb)));
    }
    let a = if ta { a.transpose() } else { a };
    let b = if tb { b.transpose() } else { b };
    a.matmul(b)
}

/// `value` (`[b, h, n, d]`) written into `cache` (`[b, h, capacity, d]`) at positions
/// `at..at + n`: in place on plain flex ([`kernels::write_positions`]), else burn's
/// `slice_assign`.
pub(crate) fn write_positions<B: Backend>(
    cache: Tensor<B, 4>,
    at: usize,
    value: Tensor<B, 4>,
) -> Tensor<B, 4> {
    type Flex = burn::backend::Flex;
    let [b, h, n, d] = value.dims();
    let range = [0..b, 0..h, at..at + n, 0..d];
    let (cache, value) = match same::<_, (Tensor<Flex, 4>, Tensor<Flex, 4>)>((cache, value)) {
        Ok((c, v)) => match flex_owned::<Flex>(c.into_primitive().tensor()) {
            Ok(c) => {
                let v = v.into_primitive().tensor();
                match kernels::write_positions(c, at, &v) {
                    Ok(c) => return back(inner::<Flex, 4>(c)),
                    Err(c) => back((inner::<Flex, 4>(c), inner::<Flex, 4>(v))),
                }
            }
            Err(c) => back((inner::<Flex, 4>(c), v)),
        },
        Err(args) => args,
    };
    cache.slice_assign(range, value)
}

/// `x · w` for `x` on plain flex in f32 (inference) and `w` an `[in, out]` flex weight; `x`
/// back unchanged anywhere else.
///
/// # Shapes
/// - x: `[rows, in]`, w: `[in, out]` → `[rows, out]`
pub(crate) fn matmul_flex<B: Backend>(
    x: Tensor<B, 2>,
    w: &FlexTensor,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    type Flex = burn::backend::Flex;
    let x = same::<_, Tensor<Flex, 2>>(x)?;
    match flex_owned::<Flex>(x.clone().into_primitive().tensor()) {
        Ok(a) if kernels::matmul_fits(&a, false, w, false) => {
            Ok(back(inner::<Flex, 2>(kernels::matmul(&a, false, w, false))))
        }
        _ => Err(back(x)),
    }
}

/// `wᵀ` laid out contiguously when `w` is a plain flex f32 tensor.
///
/// # Shapes
/// - w: `[out, in]` → `[in, out]`
pub(crate) fn flex_transposed<B: Backend>(w: Tensor<B, 2>) -> Option<FlexTensor> {
    let w = same::<_, Tensor<burn::backend::Flex, 2>>(w).ok()?;
    let w = flex_owned::<burn::backend::Flex>(w.into_primitive().tensor()).ok()?;
    Some(kernels::permute(&w, &[1, 0]))
}

fn ad_matmul<I: Backend, const D: usize>(
    (a, ta, b, tb): MatmulArgs<Autodiff<I>, D>,
) -> Tensor<Autodiff<I>, D> {
    #[derive(Debug)]
    struct Matmul<const D: usize>;

    impl<I: Backend, const D: usize> Backward<I, 2> for Matmul<D> {
        /// Both operands and their transpose flags.
        type State = (I::FloatTensorPrimitive, bool, I::FloatTensorPrimitive, bool);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (a, ta, b, tb) = ops.state;
            let get = |p: &I::FloatTensorPrimitive| match flex::<I>(p) {
                Some(t) => t.clone(),
                None => unreachable!("the matmul op is recorded only for flex f32 tensors"),
            };
            let (a, b) = (get(&a), get(&b));
            binary::<I, _, _>(
                ops.parents,
                ops.node,
                grads,
                // ∂a = ∂y · op(b)ᵀ, or its transpose op(b) · ∂yᵀ when `a` enters transposed.
                |grad| {
                    let g = get(&grad);
                    back(match ta {
                        false => kernels::matmul(&g, false, &b, !tb),
                        true => kernels::matmul(&b, tb, &g, true),
                    })
                },
                // ∂b = op(a)ᵀ · ∂y, or its transpose ∂yᵀ · op(a) when `b` enters transposed.
                |grad| {
                    let g = get(&grad);
                    back(match tb {
                        false => kernels::matmul(&a, !ta, &g, false),
                        true => kernels::matmul(&g, true, &a, ta),
                    })
                },
            );
        }
    }

    let ap = a.clone().into_primitive().tensor();
    let bp = b.clone().into_primitive().tensor();
    let (Some(af), Some(bf)) = (flex::<I>(&ap.primitive), flex::<I>(&bp.primitive)) else {
        return matmul_composed((a, ta, b, tb));
    };
    if !kernels::matmul_fits(af, ta, bf, tb) {
        return matmul_composed((a, ta, b, tb));
    }
    let y: I::FloatTensorPrimitive = back(kernels::matmul(af, ta, bf, tb));
    let out = match Matmul::<D>
        .prepare::<NoCheckpointing>([ap.node.clone(), bp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((ap.primitive, ta, bp.primitive, tb), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `x` with its dimensions permuted by `axes` (`out.dims()[i] = x.dims()[axes[i]]`), laid out
/// contiguously on flex so that later reshapes and the gradient's reshapes need no strided copy.
/// Elsewhere, burn's `permute`.
///
/// # Shapes
/// - x: `[d₀, …]` → `[d_axes[0], …]`
pub fn permute<B: Backend, const D: usize>(x: Tensor<B, D>, axes: [usize; D]) -> Tensor<B, D> {
    fn composed<B: Backend, const D: usize>((x, axes): (Tensor<B, D>, [usize; D])) -> Tensor<B, D> {
        match same::<_, Tensor<burn::backend::Flex, D>>(x) {
            Ok(x) => match flex_owned::<burn::backend::Flex>(x.into_primitive().tensor()) {
                Ok(t) => back(inner::<burn::backend::Flex, D>(kernels::permute(&t, &axes))),
                Err(p) => back(inner::<burn::backend::Flex, D>(p).permute(axes)),
            },
            Err(x) => x.permute(axes),
        }
    }
    on_autodiff!((x, axes), ad_permute[, D], composed::<B, D>)
}

/// Rotary position embedding with HF's split-half rotation: per head of `head_dim` values,
/// `x ⊙ cos + [x₂, x₁] ⊙ sin`, the tables flattened per position and head (`rotate_half`'s sign
/// is in `sin`).
///
/// # Shapes
/// - x: `[batch, seq, w]` (w = heads·head_dim); cos, sin: `[1, ≥ seq·w]` (shared by the rows)
///   or `[batch, seq·w]` (one table per row) → `[batch, seq, w]`
pub fn rope<B: Backend>(
    x: Tensor<B, 3>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    head_dim: usize,
) -> Tensor<B, 3> {
    on_autodiff!((x, cos.clone(), sin.clone(), head_dim), ad_rope[], rope_composed::<B>)
}

/// The input, the cos and sin tables and the head size.
type RopeArgs<B> = (Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 2>, usize);

fn rope_composed<B: Backend>((x, cos, sin, hd): RopeArgs<B>) -> Tensor<B, 3> {
    let [b, t, w] = x.dims();
    let half = hd / 2;
    let n = t * w;
    let heads = x.clone().reshape([b * t * (w / hd), hd]); // [b·t·h, hd]
    let swapped = Tensor::cat(
        vec![
            heads.clone().narrow(1, half, half),
            heads.narrow(1, 0, half),
        ],
        1,
    ) // [x₂, x₁]
    .reshape([b, n]);
    let cos = cos.narrow(1, 0, n);
    let sin = sin.narrow(1, 0, n);
    (x.reshape([b, n]) * cos + swapped * sin).reshape([b, t, w])
}

fn ad_rope<I: Backend>((x, cos, sin, hd): RopeArgs<Autodiff<I>>) -> Tensor<Autodiff<I>, 3> {
    #[derive(Debug)]
    struct Rope;

    impl<I: Backend> Backward<I, 1> for Rope {
        /// The cos and sin tables and the head size.
        type State = (I::FloatTensorPrimitive, I::FloatTensorPrimitive, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (cos, sin, hd) = ops.state;
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
                match (flex::<I>(&grad), flex::<I>(&cos), flex::<I>(&sin)) {
                    (Some(g), Some(c), Some(s)) => back(kernels::rope(g, c, s, hd, true)),
                    _ => unreachable!("the rope op is recorded only for flex f32 tensors"),
                }
            });
        }
    }

    let tables = (
        cos.clone().into_primitive().tensor().primitive,
        sin.clone().into_primitive().tensor().primitive,
    );
    let xp = x.clone().into_primitive().tensor();
    let (Some(xf), Some(c), Some(s)) = (
        flex::<I>(&xp.primitive),
        flex::<I>(&tables.0),
        flex::<I>(&tables.1),
    ) else {
        return rope_composed((x, cos, sin, hd));
    };
    let y: I::FloatTensorPrimitive = back(kernels::rope(xf, c, s, hd, false));
    let out = match Rope
        .prepare::<NoCheckpointing>([xp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((tables.0, tables.1, hd), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// RMSNorm over the last dimension: `x / √(mean(x²) + eps) ⊙ weight`.
///
/// # Shapes
/// - x: `[batch, seq, d]`, weight: `[d]` → `[batch, seq, d]`
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    on_autodiff!((x, weight, eps), ad_rms_norm[], rms_norm_composed::<B>)
}

fn rms_norm_composed<B: Backend>(
    (x, weight, eps): (Tensor<B, 3>, Tensor<B, 1>, f64),
) -> Tensor<B, 3> {
    let var = x.clone().powi_scalar(2).mean_dim(2); // [b, t, 1]
    let x = x * (var + eps).sqrt().recip();
    x * weight.unsqueeze::<3>()
}

fn ad_rms_norm<I: Backend>(
    (x, weight, eps): (Tensor<Autodiff<I>, 3>, Tensor<Autodiff<I>, 1>, f64),
) -> Tensor<Autodiff<I>, 3> {
    #[derive(Debug)]
    struct RmsNorm;

    impl<I: Backend> Backward<I, 2> for RmsNorm {
        /// The input, the weight and the per-row `1/√(mean(x²) + eps)`.
        type State = (
            I::FloatTensorPrimitive,
            I::FloatTensorPrimitive,
            I::FloatTensorPrimitive,
        );

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, w, r) = ops.state;
            let flex_all = |g: &I::FloatTensorPrimitive| match (
                flex::<I>(g),
                flex::<I>(&x),
                flex::<I>(&w),
                flex::<I>(&r),
            ) {
                (Some(g), Some(x), Some(w), Some(r)) => {
                    (g.clone(), x.clone(), w.clone(), r.clone())
                }
                _ => unreachable!("the rms_norm op is recorded only for flex f32 tensors"),
            };
            binary::<I, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| {
                    let (g, x, w, r) = flex_all(&grad);
                    back(kernels::rms_norm_backward_x(&g, &x, &w, &r))
                },
                |grad| {
                    let (g, x, _, r) = flex_all(&grad);
                    back(kernels::rms_norm_backward_w(&g, &x, &r))
                },
            );
        }
    }

    let xp = x.clone().into_primitive().tensor();
    let wp = weight.clone().into_primitive().tensor();
    let (Some(xf), Some(wf)) = (flex::<I>(&xp.primitive), flex::<I>(&wp.primitive)) else {
        return rms_norm_composed((x, weight, eps));
    };
    let (y, r) = kernels::rms_norm(xf, wf, eps as f32);
    let y: I::FloatTensorPrimitive = back(y);
    let out = match RmsNorm
        .prepare::<NoCheckpointing>([xp.node.clone(), wp.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xp.primitive, wp.primitive, back(r)), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Per-row negative log-likelihood of `targets` under `softmax(logits)`.
///
/// # Shapes
/// - logits: `[n, vocab]`, targets: `[n]`
/// - output: `[n]`
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    fn composed<B: Backend>((logits, targets): (Tensor<B, 2>, Tensor<B, 1, Int>)) -> Tensor<B, 1> {
        let n = targets.dims()[0];
        activation::log_softmax(logits, 1)
            .gather(1, targets.reshape([n, 1]))
            .reshape([n])
            .neg()
    }
    on_autodiff!((logits, targets), ad_cross_entropy[], composed::<B>)
}

fn ad_softmax<I: Backend, const D: usize>(x: Tensor<Autodiff<I>, D>) -> Tensor<Autodiff<I>, D> {
    ad_softmax_with(x, false)
}

/// Softmax as one op; with `causal` (flex only) row `r` keeps its first `r mod n + 1` entries
/// and the rest are 0, as after adding the causal bias.
fn ad_softmax_with<I: Backend, const D: usize>(
    x: Tensor<Autodiff<I>, D>,
    causal: bool,
) -> Tensor<Autodiff<I>, D> {
    #[derive(Debug)]
    struct Softmax<const D: usize>;

    impl<I: Backend, const D: usize> Backward<I, 1> for Softmax<D> {
        /// The forward output `y`.
        type State = I::FloatTensorPrimitive;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let y = ops.state;
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
                let grad = match (flex::<I>(&y), flex_owned::<I>(grad)) {
                    (Some(y), Ok(g)) => return back(kernels::softmax_backward(y, g)),
                    (_, Ok(g)) => back(g),
                    (_, Err(g)) => g,
                };
                let (g, y) = (inner::<I, D>(grad), inner::<I, D>(y));
                let dot = (g.clone() * y.clone()).sum_dim(D - 1); // [..., 1]
                (y * (g - dot)).into_primitive().tensor()
            });
        }
    }

    let x = x.into_primitive().tensor();
    let y = |p: I::FloatTensorPrimitive| match flex::<I>(&p) {
        Some(x) => back(kernels::softmax(x, causal)),
        None => activation::softmax(inner::<I, D>(p), D - 1)
            .into_primitive()
            .tensor(),
    };
    let out = match Softmax::<D>
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = y(x.primitive);
            prep.finish(out.clone(), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(y(x.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn ad_silu<I: Backend, const D: usize>(x: Tensor<Autodiff<I>, D>) -> Tensor<Autodiff<I>, D> {
    #[derive(Debug)]
    struct Silu<const D: usize>;

    impl<I: Backend, const D: usize> Backward<I, 1> for Silu<D> {
        /// The input `x`, `σ(x)` and the output `y`.
        type State = (
            I::FloatTensorPrimitive,
            I::FloatTensorPrimitive,
            I::FloatTensorPrimitive,
        );

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, s, y) = ops.state;
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
                // d/dx x·σ(x) = σ + x·σ·(1 − σ) = σ·(1 + x − y)
                let (x, s, y) = (inner::<I, D>(x), inner::<I, D>(s), inner::<I, D>(y));
                let g = inner::<I, D>(grad);
                (g * s * ((x - y) + 1.0)).into_primitive().tensor()
            });
        }
    }

    let x = x.into_primitive().tensor();
    let out = match Silu::<D>
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let xi = inner::<I, D>(x.primitive);
            let s = activation::sigmoid(xi.clone());
            let y = xi.clone() * s.clone();
            let y = y.into_primitive().tensor();
            let state = (
                xi.into_primitive().tensor(),
                s.into_primitive().tensor(),
                y.clone(),
            );
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(
            activation::silu(inner::<I, D>(x.primitive))
                .into_primitive()
                .tensor(),
        ),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn ad_permute<I: Backend, const D: usize>(
    (x, axes): (Tensor<Autodiff<I>, D>, [usize; D]),
) -> Tensor<Autodiff<I>, D> {
    #[derive(Debug)]
    struct Permute<const D: usize>;

    fn run<I: Backend, const D: usize>(
        p: I::FloatTensorPrimitive,
        axes: [usize; D],
    ) -> I::FloatTensorPrimitive {
        match flex::<I>(&p) {
            Some(t) => back(kernels::permute(t, &axes)),
            None => inner::<I, D>(p).permute(axes).into_primitive().tensor(),
        }
    }

    impl<I: Backend, const D: usize> Backward<I, 1> for Permute<D> {
        /// The inverse permutation.
        type State = [usize; D];

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let inverse = ops.state;
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
                run::<I, D>(grad, inverse)
            });
        }
    }

    let mut inverse = [0; D];
    for (i, &a) in axes.iter().enumerate() {
        inverse[a] = i;
    }
    let x = x.into_primitive().tensor();
    let out = match Permute::<D>
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(inverse, run::<I, D>(x.primitive, axes)),
        OpsKind::UnTracked(prep) => prep.finish(run::<I, D>(x.primitive, axes)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn ad_cross_entropy<I: Backend>(
    (logits, targets): (Tensor<Autodiff<I>, 2>, Tensor<Autodiff<I>, 1, Int>),
) -> Tensor<Autodiff<I>, 1> {
    #[derive(Debug)]
    struct CrossEntropy;

    impl<I: Backend> Backward<I, 1> for CrossEntropy {
        /// `softmax(logits)` `[n, vocab]` and the targets `[n]`.
        type State = (I::FloatTensorPrimitive, I::IntTensorPrimitive);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (p, t) = ops.state;
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
                let p = match (flex_owned::<I>(p), flex::<I>(&grad)) {
                    (Ok(pf), Some(g)) => {
                        return back(kernels::cross_entropy_backward(pf, &ids::<I>(&t), g));
                    }
                    (Ok(pf), None) => back(pf),
                    (Err(p), _) => p,
                };
                let p = inner::<I, 2>(p);
                let t = Tensor::<I, 1, Int>::from_primitive(t);
                let g = inner::<I, 1>(grad); // [n]
                let n = g.dims()[0];
                let g = g.reshape([n, 1]);
                p.mul(g.clone())
                    .scatter(
                        1,
                        t.reshape([n, 1]),
                        g.neg(),
                        burn::tensor::IndexingUpdateOp::Add,
                    )
                    .into_primitive()
                    .tensor()
            });
        }
    }

    let x = logits.into_primitive().tensor();
    let t = targets.into_primitive();
    // nll = log Σ exp(x − m) + m − x[target], and softmax = exp(x − m) / Σ exp(x − m).
    let forward = |x: I::FloatTensorPrimitive, t: I::IntTensorPrimitive| {
        if let Some(xf) = flex::<I>(&x) {
            let (nll, p) = kernels::cross_entropy(xf, &ids::<I>(&t));
            return (back(nll), back(p));
        }
        let x = inner::<I, 2>(x);
        let t = Tensor::<I, 1, Int>::from_primitive(t);
        let n = t.dims()[0];
        let m = x.clone().max_dim(1); // [n, 1]
        let e = (x.clone() - m.clone()).exp(); // [n, vocab]
        let s = e.clone().sum_dim(1); // [n, 1]
        let picked = x.gather(1, t.reshape([n, 1])); // [n, 1]
        let nll = (s.clone().log() + m - picked).reshape([n]);
        (
            nll.into_primitive().tensor(),
            (e / s).into_primitive().tensor(),
        )
    };
    let out = match CrossEntropy
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (nll, p) = forward(x.primitive, t.clone());
            prep.finish((p, t), nll)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, t).0),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
