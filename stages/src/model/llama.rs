//! A LLaMA-family decoder (Llama, TinyLlama, SmolLM2, Mistral without sliding window, Qwen2).
//!
//! Field names mirror the checkpoint's tensor names (`model.layers.0.self_attn.q_proj.weight`),
//! so the module path of every parameter *is* its Hugging Face name. The file reads bottom-up:
//! linear (with optional LoRA), norm, rotary embedding, attention, MLP, block, model.
//!
//! Conventions held to transformers' `modeling_llama.py`:
//! - linear weights are `[out, in]` and applied as `x · Wᵀ`;
//! - RMSNorm normalises in f32 and then scales by its weight;
//! - RoPE rotates the two halves of each head (`rotate_half`), not interleaved pairs, with
//!   `inv_freq = θ^(-2i/d)` from the checkpoint's `rope_theta`;
//! - grouped-query attention: query head `h` reads key/value head `h / (heads / kv_heads)`.

use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::Arc;

use super::fused;
use burn::backend::flex::FlexTensor;
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::config::ModelConfig;

/// LoRA adapter on a linear layer: `y += (dropout(x) · Aᵀ · Bᵀ) · alpha / r`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[r, in]` (PEFT `lora_A.weight`)
    pub a: Param<Tensor<B, 2>>,
    /// `[out, r]` (PEFT `lora_B.weight`)
    pub b: Param<Tensor<B, 2>>,
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub dropout: f64,
}

/// A linear layer in Hugging Face layout, optionally with a bias and a LoRA adapter.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out, in]` (a `[1, 1]` placeholder while the weight is held in `nf4`)
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
    /// A frozen weight stored as NF4 (QLoRA), dequantized in every forward pass.
    #[module(skip)]
    pub nf4: Option<std::sync::Arc<super::nf4::Nf4Tensor>>,
    /// Multiply in bf16 (inputs and weight cast down, the product cast back to f32); the
    /// parameters, and so the optimizer's updates, stay f32.
    #[module(skip)]
    pub bf16: bool,
    /// `[in, out]`: the weight transposed and laid out contiguously, held by a model prepared
    /// for batched decoding on flex ([`CausalLm::for_batched_decoding`]).
    #[module(skip)]
    pub weight_t: Option<FlexTensor>,
}

/// `a · bᵀ`, in bf16 when asked (the result back in f32).
fn matmul_t<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>, bf16: bool) -> Tensor<B, 2> {
    use burn::tensor::FloatDType;
    if bf16 {
        a.cast(FloatDType::BF16)
            .matmul(b.cast(FloatDType::BF16).transpose())
            .cast(FloatDType::F32)
    } else {
        fused::matmul(a, false, b, true)
    }
}

/// `x · wᵀ` from the transposed copy `w_t` (`[in, out]`) when there is one and `x` has more
/// than one row, else from `weight()` (`[out, in]`, and whether to multiply in bf16).
///
/// A product of a few rows by a row-major `[out, in]` weight makes gemm repack the whole weight
/// into column panels on every call (a decode step: one row per sequence); `[in, out]` is
/// already the layout it reads. One row goes to gemm's matrix-vector loop, which reads
/// `[out, in]` rows as they are.
fn product<B: Backend>(
    x: Tensor<B, 2>,
    w_t: Option<&FlexTensor>,
    weight: impl FnOnce() -> (Tensor<B, 2>, bool),
) -> Tensor<B, 2> {
    let x = match w_t {
        Some(w_t) if x.dims()[0] > 1 => match fused::matmul_flex(x, w_t) {
            Ok(y) => return y,
            Err(x) => x,
        },
        _ => x,
    };
    let (w, bf16) = weight();
    matmul_t(x, w, bf16)
}

impl<B: Backend> Linear<B> {
    /// `[out, in]` of the weight, however it is stored.
    pub fn dims(&self) -> [usize; 2] {
        match &self.nf4 {
            Some(q) => [q.shape[0], q.shape[1]],
            None => self.weight.val().dims(),
        }
    }

    /// The weight as a tensor (dequantized from NF4 when it is stored so).
    pub fn weight_tensor(&self) -> Tensor<B, 2> {
        match &self.nf4 {
            Some(q) => {
                let device = self.weight.val().device();
                Tensor::from_data(
                    TensorData::new(q.dequantize(), [q.shape[0], q.shape[1]]),
                    &device,
                )
            }
            None => self.weight.val(),
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d_in] = x.dims();
        let x2 = x.reshape([b * t, d_in]); // [b*t, in]
        let mut y = product(x2.clone(), self.weight_t.as_ref(), || {
            (self.weight_tensor(), self.bf16)
        }); // [b*t, out]
        if let Some(bias) = &self.bias {
            // A one-row product plus the bias as a broadcast view (`[1, out] + [1, out]`) lets
            // burn 0.21's wgpu fusion write wrong keys into the KV cache at batch 1 (the
            // selftest's generate probe on tiny-qwen2); the bias repeated into a row of its own
            // is right, and costs one row.
            let bias = bias.val().unsqueeze_dim::<2>(0); // [1, out]
            y = y + if b * t == 1 {
                bias.repeat_dim(0, 1)
            } else {
                bias
            };
        }
        if let Some(lora) = &self.lora {
            let xa = if lora.dropout > 0.0 && B::ad_enabled(&x2.device()) {
                let keep = 1.0 - lora.dropout;
                let mask = x2.random_like(burn::tensor::Distribution::Bernoulli(keep));
                x2 * mask / keep
            } else {
                x2
            };
            let xa = matmul_t(xa, lora.a.val(), self.bf16); // [b*t, r]
            let delta = matmul_t(xa, lora.b.val(), self.bf16); // [b*t, out]
            y = y + delta * lora.scale;
        }
        let out = y.dims()[1];
        y.reshape([b, t, out])
    }

    /// The effective weight `W + scale · B·A` (what a merge writes).
    pub fn merged_weight(&self) -> Tensor<B, 2> {
        let w = self.weight_tensor();
        match &self.lora {
            Some(l) => w + l.b.val().matmul(l.a.val()) * l.scale,
            None => w,
        }
    }
}

/// Root-mean-square layer norm.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        fused::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// The rotary angles of positions `0..len`: per position, `[head_dim]` cos and signed sin (the
/// first half negated, for `rotate_half`). Built once — for a training batch from its longest
/// position, for generation up to the prompt plus the new tokens — and read per forward.
pub struct RopeTable {
    /// `[len, 2, head_dim]`: cos then signed sin of each position.
    trig: Vec<f32>,
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
}

impl RopeTable {
    pub fn new(cfg: &ModelConfig, len: usize) -> Self {
        let hd = cfg.head_dim;
        let half = hd / 2;
        // transformers computes inv_freq in f32; so do we, then the angles in f64.
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
            .collect();
        let mut trig = Vec::with_capacity(len * 2 * hd);
        for p in 0..len {
            for part in 0..2 {
                for sign in [-1.0f32, 1.0] {
                    for f in &inv {
                        let angle = (p as f32 * f) as f64;
                        trig.push(match part {
                            0 => angle.cos() as f32,
                            _ => sign * angle.sin() as f32,
                        });
                    }
                }
            }
        }
        RopeTable {
            trig,
            head_dim: hd,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
        }
    }

    /// Positions covered.
    pub fn len(&self) -> usize {
        self.trig.len() / (2 * self.head_dim).max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Position `p`'s cos and signed sin rows.
    ///
    /// # Panics
    /// When `p` is past the table.
    fn row(&self, p: usize) -> (&[f32], &[f32]) {
        let hd = self.head_dim;
        let at = p * 2 * hd;
        (&self.trig[at..at + hd], &self.trig[at + hd..at + 2 * hd])
    }
}

/// Rotary position tables, laid out for the projections' own `[batch, seq, heads·head_dim]`
/// layout.
///
/// HF's rotation is `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [-x₂, x₁]`. The tables
/// are repeated over heads and flattened to one row `[1, seq·heads·head_dim]` for positions
/// `0..seq` ([`Rope::new`]), and the sign of `rotate_half` is folded into `sin`
/// (`sin_signed = [-sin₁, sin₂]`), so each product is a contiguous tensor times one shared row,
/// the broadcast the CPU backend vectorizes. Packed batches, whose positions restart at each
/// document, get one such row per batch row ([`Rope::with_positions`]). The query tables also
/// carry attention's `1/√head_dim`, which saves a pass over the `[t, t]` scores.
pub struct Rope<B: Backend> {
    /// `[1 or batch, seq·heads·head_dim]`, pre-scaled by `1/√head_dim`
    q_cos: Tensor<B, 2>,
    q_sin: Tensor<B, 2>,
    /// `[1 or batch, seq·kv_heads·head_dim]`
    k_cos: Tensor<B, 2>,
    k_sin: Tensor<B, 2>,
    head_dim: usize,
}

impl<B: Backend> Rope<B> {
    /// Tables for positions `0..seq`, shared by every batch row.
    pub fn new(cfg: &ModelConfig, seq: usize, device: &B::Device) -> Self {
        let positions: Vec<usize> = (0..seq).collect();
        Self::build(cfg, 1, &positions, device)
    }

    /// Tables for each token's own position (`positions[b·seq + i]` for token `i` of row `b`),
    /// one row per batch row.
    pub fn with_positions(
        cfg: &ModelConfig,
        batch: usize,
        positions: &[usize],
        device: &B::Device,
    ) -> Self {
        Self::build(cfg, batch, positions, device)
    }

    /// `rows` table rows, each of `positions.len() / rows` positions.
    fn build(cfg: &ModelConfig, rows: usize, positions: &[usize], device: &B::Device) -> Self {
        let distinct = positions.iter().max().map_or(0, |&p| p + 1);
        Self::from_table(&RopeTable::new(cfg, distinct), rows, positions, device)
    }

    /// Tables for `positions` (`rows` table rows of `positions.len() / rows` positions each) from
    /// the precomputed angles of `table`, which must reach every position.
    pub fn from_table(
        table: &RopeTable,
        rows: usize,
        positions: &[usize],
        device: &B::Device,
    ) -> Self {
        let hd = table.head_dim;
        let rows = rows.max(1);
        let tensors = |heads: usize, scale: f32| {
            let n = positions.len() * heads * hd;
            let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for &p in positions {
                let (c, s) = table.row(p);
                for _ in 0..heads {
                    cos.extend(c.iter().map(|v| v * scale));
                    sin.extend(s.iter().map(|v| v * scale));
                }
            }
            (
                Tensor::from_data(TensorData::new(cos, [rows, n / rows]), device),
                Tensor::from_data(TensorData::new(sin, [rows, n / rows]), device),
            )
        };
        let (q_cos, q_sin) = tensors(table.heads, 1.0 / (hd as f32).sqrt());
        let (k_cos, k_sin) = tensors(table.kv_heads, 1.0);
        Rope {
            q_cos,
            q_sin,
            k_cos,
            k_sin,
            head_dim: hd,
        }
    }

    /// Queries, rotated and scaled by `1/√head_dim`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, heads·head_dim]` → same
    pub fn queries(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.rotate(x, &self.q_cos, &self.q_sin)
    }

    /// Keys, rotated.
    ///
    /// # Shapes
    /// - x: `[batch, seq, kv_heads·head_dim]` → same
    pub fn keys(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.rotate(x, &self.k_cos, &self.k_sin)
    }

    fn rotate(&self, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        fused::rope(x, cos, sin, self.head_dim)
    }
}

/// Additive causal mask `[1, groups·seq·seq]`: 0 on and below the diagonal, −∞ above it,
/// repeated for the `groups` query heads that share a key/value head. Added to the scores
/// flattened to `[batch·kv_heads, groups·seq·seq]` (one shared row, like the rotary tables), it
/// gives exactly what a masked fill gives: `s + 0 = s` and `s + (−∞) = −∞`.
pub fn causal_bias<B: Backend>(seq: usize, groups: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut bias = vec![0.0f32; seq * seq];
    for i in 0..seq {
        for v in &mut bias[i * seq + i + 1..(i + 1) * seq] {
            *v = f32::NEG_INFINITY;
        }
    }
    let bias = bias.repeat(groups);
    let n = bias.len();
    Tensor::from_data(TensorData::new(bias, [1, n]), device)
}

/// Where the documents of a packed batch start. A token attends only to the tokens of its own
/// document up to itself (a block-diagonal causal mask), and positions restart at 0 at each
/// document's start, as transformers does for padding-free packing with `position_ids`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Documents {
    /// `[batch·seq]`: for each token, the position in its row where its document starts.
    starts: Arc<[usize]>,
    batch: usize,
    seq: usize,
}

impl Documents {
    /// From each row's document starts after the first (increasing, each in `1..seq`; starts
    /// outside are ignored). The tokens after a row's last start, right padding included,
    /// belong to its last document.
    pub fn new(rows: &[&[usize]], seq: usize) -> Self {
        let mut starts = Vec::with_capacity(rows.len() * seq);
        for row in rows {
            let mut cur = 0;
            let mut next = row.iter().copied().filter(|&s| s > 0 && s < seq).peekable();
            for i in 0..seq {
                while let Some(s) = next.next_if(|&s| s <= i) {
                    cur = cur.max(s);
                }
                starts.push(cur);
            }
        }
        Documents {
            starts: starts.into(),
            batch: rows.len(),
            seq,
        }
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    /// For each token (`[batch·seq]`, row-major), the position where its document starts.
    pub fn starts(&self) -> &Arc<[usize]> {
        &self.starts
    }

    /// Each token's position within its document (`[batch·seq]`, row-major).
    pub fn positions(&self) -> Vec<usize> {
        self.starts
            .iter()
            .enumerate()
            .map(|(i, &s)| i % self.seq - s)
            .collect()
    }

    /// Whether, in row `b`, the token at `query` attends to the one at `key`.
    pub fn sees(&self, b: usize, query: usize, key: usize) -> bool {
        key <= query && key >= self.starts[b * self.seq + query]
    }
}

/// Additive block-diagonal causal mask `[batch, groups·seq·seq]`: 0 where a query sees a key
/// ([`Documents::sees`]), −∞ elsewhere, repeated for the `groups` query heads that share a
/// key/value head. Added to the scores flattened to `[batch, kv_heads, groups·seq·seq]` with the
/// mask broadcast over the key/value heads.
pub fn document_bias<B: Backend>(
    docs: &Documents,
    groups: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let t = docs.seq;
    let mut bias = Vec::with_capacity(docs.batch * groups * t * t);
    for b in 0..docs.batch {
        let mut one = vec![f32::NEG_INFINITY; t * t];
        for i in 0..t {
            let start = docs.starts[b * t + i];
            one[i * t + start..=i * t + i].fill(0.0);
        }
        for _ in 0..groups {
            bias.extend_from_slice(&one);
        }
    }
    Tensor::from_data(TensorData::new(bias, [docs.batch, groups * t * t]), device)
}

/// Which keys each query of attention sees: causal over the whole row, or causal within each
/// document of a packed batch. The flex kernel reads the document starts; the composed path
/// adds [`causal_bias`] or [`document_bias`], built on first use (so flex never builds the
/// dense bias).
#[derive(Clone)]
pub struct AttentionMask<B: Backend> {
    docs: Option<Documents>,
    seq: usize,
    groups: usize,
    device: B::Device,
    bias: Rc<OnceCell<Tensor<B, 2>>>,
}

impl<B: Backend> AttentionMask<B> {
    /// Causal attention over rows of `seq` tokens, `groups` query heads per key/value head.
    pub fn causal(seq: usize, groups: usize, device: &B::Device) -> Self {
        AttentionMask {
            docs: None,
            seq,
            groups,
            device: device.clone(),
            bias: Rc::default(),
        }
    }

    /// Causal attention within each document of `docs`.
    pub fn documents(docs: Documents, groups: usize, device: &B::Device) -> Self {
        AttentionMask {
            seq: docs.seq,
            docs: Some(docs),
            groups,
            device: device.clone(),
            bias: Rc::default(),
        }
    }

    /// The documents, when the batch is packed.
    pub fn docs(&self) -> Option<&Documents> {
        self.docs.as_ref()
    }

    /// The additive bias: `[1, groups·seq·seq]` when causal, `[batch, groups·seq·seq]` with
    /// documents.
    pub fn bias(&self) -> Tensor<B, 2> {
        self.bias
            .get_or_init(|| match &self.docs {
                None => causal_bias(self.seq, self.groups, &self.device),
                Some(d) => document_bias(d, self.groups, &self.device),
            })
            .clone()
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (q, k, v) = self.project(x, rope);
        self.output(fused::causal_attention(q, k, v, mask), b, t)
    }

    /// Queries (rotated, scaled by `1/√head_dim`, grouped per key/value head), rotated keys
    /// and values.
    ///
    /// # Shapes
    /// - x: `[b, t, hidden]`
    /// - output: q `[b, kv_heads, groups·t, head_dim]`, k and v `[b, kv_heads, t, head_dim]`
    pub(crate) fn project(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = nh / nkv; // query heads per key/value head
        // Rotary embedding on the projections' contiguous layout, before the heads move.
        let q = rope.queries(self.q_proj.forward(x.clone())); // [b, t, nh*hd], scaled by 1/√hd
        // Query head `g·rep + r` reads key/value head `g`: group the queries as
        // `[b, nkv, rep·t, hd]` rather than copying keys and values `rep` times.
        let q = fused::permute(q.reshape([b, t, nh, hd]), [0, 2, 1, 3]) // [b, nh, t, hd]
            .reshape([b, nkv, rep * t, hd]);
        let k = fused::permute(
            rope.keys(self.k_proj.forward(x.clone()))
                .reshape([b, t, nkv, hd]),
            [0, 2, 1, 3],
        ); // [b, nkv, t, hd]
        let v = fused::permute(
            self.v_proj.forward(x).reshape([b, t, nkv, hd]),
            [0, 2, 1, 3],
        ); // [b, nkv, t, hd]
        (q, k, v)
    }

    /// The output projection of attention's result.
    ///
    /// # Shapes
    /// - out: `[b, kv_heads, groups·t, head_dim]` → `[b, t, hidden]`
    pub(crate) fn output(&self, out: Tensor<B, 4>, b: usize, t: usize) -> Tensor<B, 3> {
        let (nh, hd) = (self.num_heads, self.head_dim);
        let out = out.reshape([b, nh, t, hd]);
        let out = fused::permute(out, [0, 2, 1, 3]) // [b, t, nh, hd]
            .reshape([b, t, nh * hd]);
        self.o_proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward(fused::swiglu(gate, self.up_proj.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> Block<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: &AttentionMask<B>,
    ) -> Tensor<B, 3> {
        self.around(x, |h| self.self_attn.forward(h, rope, mask))
    }

    /// The block around its attention: `h = x + attend(norm(x))`, then `h + mlp(norm(h))`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` → same; `attend` maps `[batch, seq, hidden]` to the same
    pub(crate) fn around(
        &self,
        x: Tensor<B, 3>,
        attend: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + attend(self.input_layernorm.forward(x));
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]`
    pub weight: Param<Tensor<B, 2>>,
}

/// The decoder stack (`model.*` in checkpoints).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
}

/// Decoder plus language-model head: `LlamaForCausalLM` / `Qwen2ForCausalLM`.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: Decoder<B>,
    /// `[vocab, hidden]`; `None` when tied to the embeddings.
    pub lm_head: Option<Embedding<B>>,
    #[module(skip)]
    pub config: ModelConfig,
    /// Compute the projections and the output head in bf16 ([`CausalLm::set_bf16`]).
    #[module(skip)]
    pub bf16: bool,
    /// `[hidden, vocab]`: the head's weight transposed ([`CausalLm::for_batched_decoding`]).
    #[module(skip)]
    pub head_t: Option<FlexTensor>,
}

impl<B: Backend> CausalLm<B> {
    /// A copy that multiplies batches of a few rows faster on flex: every projection and the
    /// head also hold their weight transposed (`[in, out]`, contiguous), gemm's own layout for
    /// such products, at the cost of a second copy of those weights while the copy lives. On
    /// other backends, with bf16 products or NF4 weights, a plain clone. The logits are the same
    /// gemm sums, in another order of the inner loop's operands only.
    pub fn for_batched_decoding(&self) -> Self {
        let mut m = self.clone();
        if m.bf16 {
            return m;
        }
        for l in m.linears_mut().filter(|l| l.nf4.is_none()) {
            l.weight_t = fused::flex_transposed(l.weight.val());
        }
        let head = match &m.lm_head {
            Some(head) => head.weight.val(),
            None => m.model.embed_tokens.weight.val(),
        };
        m.head_t = fused::flex_transposed(head);
        m
    }

    /// Next-token logits.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_with(ids, None)
    }

    /// Next-token logits, each document of a packed batch on its own ([`Documents`]).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`, docs: `batch` rows of `seq`
    /// - output: `[batch, seq, vocab]`
    pub fn forward_with(&self, ids: Tensor<B, 2, Int>, docs: Option<&Documents>) -> Tensor<B, 3> {
        self.head(self.hidden_with(ids, docs))
    }

    /// The language-model head on final hidden states.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`
    /// - output: `[batch, seq, vocab]`
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = hidden.dims();
        let head = match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.weight.val(),
        };
        let logits = product(hidden.reshape([b * t, h]), self.head_t.as_ref(), || {
            (head, self.bf16)
        }); // [b*t, vocab]
        logits.reshape([b, t, self.config.vocab_size])
    }

    /// Final hidden states after the last norm.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.hidden_with(ids, None)
    }

    /// Final hidden states after the last norm; with `docs`, positions restart at each
    /// document and attention stays inside it. Without, one causal sequence per row sharing
    /// one rotary table.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`, docs: `batch` rows of `seq`
    /// - output: `[batch, seq, hidden]`
    ///
    /// # Panics
    /// When `docs` is not `batch` rows of `seq`.
    pub fn hidden_with(&self, ids: Tensor<B, 2, Int>, docs: Option<&Documents>) -> Tensor<B, 3> {
        let device = ids.device();
        let [b, t] = ids.dims();
        let groups = self.config.num_heads / self.config.num_kv_heads;
        let (rope, mask) = match docs {
            None => (
                Rope::new(&self.config, t, &device),
                AttentionMask::causal(t, groups, &device),
            ),
            Some(d) => {
                assert!(
                    d.batch() == b && d.seq() == t,
                    "documents of {} rows of {} for a batch of {b} rows of {t}",
                    d.batch(),
                    d.seq()
                );
                (
                    Rope::with_positions(&self.config, b, &d.positions(), &device),
                    AttentionMask::documents(d.clone(), groups, &device),
                )
            }
        };
        let mut x = burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), ids); // [b, t, hidden]
        for layer in &self.model.layers {
            x = layer.forward(x, &rope, &mask);
        }
        self.model.norm.forward(x)
    }

    /// Per-position negative log-likelihood of the next token, and the target weights.
    ///
    /// Position `i` of the result is the loss of predicting `ids[i+1]`; `targets[b][i+1]` says
    /// whether it counts.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`, targets: `[batch, seq]` (0/1)
    /// - output: (`nll [batch, seq-1]`, `weights [batch, seq-1]`)
    pub fn token_nll(
        &self,
        ids: Tensor<B, 2, Int>,
        targets: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.token_nll_with(ids, targets, None)
    }

    /// [`CausalLm::token_nll`], each document of a packed batch on its own ([`Documents`]).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`, targets: `[batch, seq]` (0/1), docs: `batch` rows of `seq`
    /// - output: (`nll [batch, seq-1]`, `weights [batch, seq-1]`)
    pub fn token_nll_with(
        &self,
        ids: Tensor<B, 2, Int>,
        targets: Tensor<B, 2>,
        docs: Option<&Documents>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [b, t] = ids.dims();
        // The last position predicts nothing: drop it before the head, not after (the hidden
        // states are `vocab / hidden` times smaller than the logits).
        let hidden = self.hidden_with(ids.clone(), docs).narrow(1, 0, t - 1); // [b, t-1, hidden]
        let logits = self.head(hidden); // [b, t-1, vocab]
        let n = b * (t - 1);
        let logits = logits.reshape([n, self.config.vocab_size]); // [b*(t-1), vocab]
        let next = ids.narrow(1, 1, t - 1).reshape([n]); // [b*(t-1)]
        let nll = fused::cross_entropy(logits, next).reshape([b, t - 1]); // [b, t-1]
        (nll, targets.narrow(1, 1, t - 1))
    }

    /// Mixed precision: every matrix product in bf16, parameters, norms, softmax and the loss
    /// in f32.
    pub fn set_bf16(mut self, on: bool) -> Self {
        self.bf16 = on;
        for lin in self.linears_mut() {
            lin.bf16 = on;
        }
        self
    }

    /// Every projection of every layer.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear<B>> {
        self.model.layers.iter_mut().flat_map(|layer| {
            let (a, p) = (&mut layer.self_attn, &mut layer.mlp);
            [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut p.gate_proj,
                &mut p.up_proj,
                &mut p.down_proj,
            ]
        })
    }

    /// Parameters in the model (tied embeddings counted once, adapters included).
    pub fn num_params(&self) -> usize {
        self.num_params_where(|_| true)
    }

    /// Parameters whose module path satisfies `keep`.
    pub fn num_params_where(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut total = 0;
        super::weights::for_each_param(self, |name, shape, _| {
            if keep(name) {
                total += shape.iter().product::<usize>();
            }
        });
        total
    }
}
