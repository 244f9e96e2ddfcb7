//! Softmax and next-token cross-entropy with hand-written backward passes.
//!
//! burn's autodiff backend builds `softmax` and `log_softmax` out of their elementary ops
//! (max, subtract, exp, sum, divide or log), records every one of them, and differentiates
//! each in turn, recomputing the exponentials. On the CPU backend those full-size passes cost
//! more than the matrix products of a small model. Here each is one tracked op:
//!
//! - [`softmax_last`]: forward by the backend's own softmax (a fused kernel on flex), backward
//!   `∂x = y ⊙ (∂y − Σ(∂y ⊙ y))` from the saved output.
//! - [`cross_entropy`]: `nll = logsumexp(x) − x[target]` per row, saving the softmax for the
//!   backward `∂x = softmax(x) · ∂nll − onehot(target) · ∂nll`.
//! - [`silu`]: `y = x·σ(x)`, saving `σ(x)` so the backward `∂x = ∂y · σ · (1 + x − y)` needs
//!   no second pass of exponentials.
//!
//! Both are the same mathematics as the composed versions (tests compare them); only the order
//! of float operations differs. The custom ops exist for the autodiff backends this crate runs
//! training on (`Autodiff<Flex>`, `Autodiff<Wgpu>`, `Autodiff<Cuda>`, picked by type at run
//! time); any other backend gets the composed version.

use std::any::Any;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};

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
    #[derive(Debug)]
    struct Softmax<const D: usize>;

    impl<I: Backend, const D: usize> Backward<I, 1> for Softmax<D> {
        /// The forward output `y`.
        type State = I::FloatTensorPrimitive;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let y = inner::<I, D>(ops.state);
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
                let g = inner::<I, D>(grad);
                let dot = (g.clone() * y.clone()).sum_dim(D - 1); // [..., 1]
                (y * (g - dot)).into_primitive().tensor()
            });
        }
    }

    let x = x.into_primitive().tensor();
    let y = |p| {
        activation::softmax(inner::<I, D>(p), D - 1)
            .into_primitive()
            .tensor()
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
            let (x, s, y) = (inner::<I, D>(x), inner::<I, D>(s), inner::<I, D>(y));
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
                // d/dx x·σ(x) = σ + x·σ·(1 − σ) = σ·(1 + x − y)
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
            let p = inner::<I, 2>(p);
            let t = Tensor::<I, 1, Int>::from_primitive(t);
            unary::<I, _>(ops.parents, ops.node, grads, |grad| {
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
        let x = inner::<I, 2>(x);
        let t = Tensor::<I, 1, Int>::from_primitive(t);
        let n = t.dims()[0];
        let m = x.clone().max_dim(1); // [n, 1]
        let e = (x.clone() - m.clone()).exp(); // [n, vocab]
        let s = e.clone().sum_dim(1); // [n, 1]
        let picked = x.gather(1, t.reshape([n, 1])); // [n, 1]
        let nll = (s.clone().log() + m - picked).reshape([n]);
        (nll, e, s)
    };
    let out = match CrossEntropy
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (nll, e, s) = forward(x.primitive, t.clone());
            let p = (e / s).into_primitive().tensor();
            prep.finish((p, t), nll.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(x.primitive, t).0.into_primitive().tensor())
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
