//! A Llama-family model → a GGUF file llama.cpp loads: architecture metadata, the tokenizer
//! ([`super::vocab`]), and the weights renamed, re-laid-out and quantized as llama.cpp's
//! converter (`convert_hf_to_gguf.py`) and `llama-quantize` (`llama-quant.cpp`) write them.
//!
//! # Architecture
//! Llama (and Mistral, TinyLlama, SmolLM2) is written as `llama`; Qwen2 (q/k/v biases) as
//! `qwen2`, llama.cpp's architecture for it. Every count is a u32 and every float an f32, as
//! llama.cpp's loader requires (a u64 where a u32 is expected fails the load):
//! `{arch}.context_length`, `.embedding_length`, `.block_count`, `.feed_forward_length`,
//! `.attention.head_count`, `.attention.head_count_kv`, `.attention.key_length`,
//! `.attention.value_length`, `.rope.dimension_count`, `.vocab_size`, `.rope.freq_base` (f32),
//! `.attention.layer_norm_rms_epsilon` (f32); `general.architecture`, `general.name`,
//! `general.file_type`, and `general.quantization_version` = 2 when the quant is quantized.
//!
//! # Tensors
//! | checkpoint | GGUF |
//! |---|---|
//! | `model.embed_tokens.weight` | `token_embd.weight` |
//! | `model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}` | `blk.N.attn_{q,k,v,output}.{weight,bias}` |
//! | `model.layers.N.mlp.{gate,up,down}_proj.weight` | `blk.N.ffn_{gate,up,down}.weight` |
//! | `model.layers.N.input_layernorm.weight` | `blk.N.attn_norm.weight` |
//! | `model.layers.N.post_attention_layernorm.weight` | `blk.N.ffn_norm.weight` |
//! | `model.norm.weight` | `output_norm.weight` |
//! | `lm_head.weight` (or the embedding, when tied) | `output.weight` |
//!
//! Weights stay `[out, in]` (a GGUF row is an output's input weights: `ne[0] = in`). `output.weight`
//! is written even when the embeddings are tied (some loaders require it; llama.cpp accepts it).
//!
//! **RoPE layout.** Hugging Face Llama checkpoints rotate the two halves of each head
//! (`rotate_half`); llama.cpp's `llama` rotates consecutive pairs `(2i, 2i+1)`. The converter
//! therefore permutes the rows of Q and K (and their biases) within each head so that row `2i`
//! holds the old row `i` and row `2i+1` the old row `i + d/2` ([`permute_rope_rows`]); the
//! attention scores are unchanged. `qwen2` in llama.cpp uses the NeoX (split-half) rotation
//! itself, so Qwen2 weights are written unpermuted — as the converter's `Qwen2Model` does.
//!
//! # Quantization mix ([`choose_type`])
//! 1-D tensors (norms, biases) are always F32. Matrices follow `llama-quantize`'s
//! `llama_tensor_get_type` for the file type, then its `tensor_type_fallback`:
//! - `f32`/`f16`/`bf16`: every matrix in that type.
//! - `q8_0`, `q4_0`, `q6_k`: every matrix in that type, except `output.weight` (and
//!   `token_embd.weight` when tied): Q8_0 when its rows do not divide into the type's blocks,
//!   else Q6_K unless the type is Q8_0.
//! - `q4_k_m` (llama.cpp's Q4_K_M): Q4_K, with the output rule above (→ Q6_K), and `attn_v` and
//!   `ffn_down` Q6_K on layers where `i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`.
//! - `q4_k`: every matrix Q4_K, output and embeddings included: `llama-quantize --pure` with
//!   Q4_K_S (file type 14).
//! - Fallback when a row does not divide into the chosen type's blocks: Q4_K → Q5_0,
//!   Q6_K → Q8_0, and F16 when that still does not divide (rows not a multiple of 32).

use burn::tensor::backend::Backend;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ExportError;
use super::gguf::{GgmlType, GgufWriter, MetaValue, quantize};
use super::vocab::GgufVocab;
use crate::model::weights::{for_each_param, tensor_f32};
use crate::model::{Arch, CausalLm, ModelConfig};

/// `quant:` of `export.gguf`: the file type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Quant {
    /// Every tensor f32 (lossless).
    #[serde(rename = "f32")]
    F32,
    /// Matrices f16, norms and biases f32.
    #[serde(rename = "f16")]
    F16,
    /// Matrices bf16, norms and biases f32.
    #[serde(rename = "bf16")]
    Bf16,
    /// 8-bit blocks of 32 (8.5 bits per weight).
    #[default]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 (4.5 bits per weight), output Q6_K.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// 4-bit k-quant super-blocks of 256 everywhere (llama-quantize --pure Q4_K_S).
    #[serde(rename = "q4_k")]
    Q4K,
    /// 6-bit k-quant super-blocks of 256 (6.56 bits per weight).
    #[serde(rename = "q6_k")]
    Q6K,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output and some attn_v/ffn_down layers.
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

impl Quant {
    pub const ALL: [Quant; 8] = [
        Quant::F32,
        Quant::F16,
        Quant::Bf16,
        Quant::Q8_0,
        Quant::Q4_0,
        Quant::Q4K,
        Quant::Q6K,
        Quant::Q4KM,
    ];

    /// The name in manifests and file names.
    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Bf16 => "bf16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4K => "q4_k",
            Quant::Q6K => "q6_k",
            Quant::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype`.
    pub fn file_type(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::Q4K => 14,
            Quant::Q4KM => 15,
            Quant::Q6K => 18,
            Quant::Bf16 => 32,
        }
    }

    /// Whether matrices are block-quantized (then `general.quantization_version` is written).
    pub fn is_quantized(self) -> bool {
        !matches!(self, Quant::F32 | Quant::F16 | Quant::Bf16)
    }

    /// The type a matrix gets before the per-tensor rules.
    pub fn base_type(self) -> GgmlType {
        match self {
            Quant::F32 => GgmlType::F32,
            Quant::F16 => GgmlType::F16,
            Quant::Bf16 => GgmlType::BF16,
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q4_0 => GgmlType::Q4_0,
            Quant::Q4K | Quant::Q4KM => GgmlType::Q4_K,
            Quant::Q6K => GgmlType::Q6_K,
        }
    }
}

impl std::fmt::Display for Quant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a tensor is in the model, which decides its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    TokenEmbd,
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    /// Norm weights and biases: 1-D, always F32.
    Vector,
}

/// llama.cpp's `use_more_bits`: the layers Q4_K_M gives more bits.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let (i, n) = (layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: a type whose blocks fit a row of `row_len`.
pub fn fallback(ty: GgmlType, row_len: usize) -> GgmlType {
    if row_len.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let next = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if row_len.is_multiple_of(next.block_size()) {
        next
    } else {
        GgmlType::F16
    }
}

/// The GGML type of one tensor: `role` in layer `layer` of `n_layers`, rows of `row_len` values
/// (`ne[0]`), `tied` embeddings. See the module doc for the rules.
pub fn choose_type(
    quant: Quant,
    role: Role,
    layer: usize,
    n_layers: usize,
    row_len: usize,
    tied: bool,
) -> GgmlType {
    if role == Role::Vector {
        return GgmlType::F32;
    }
    let base = quant.base_type();
    if !quant.is_quantized() {
        return base;
    }
    let mut ty = base;
    if quant != Quant::Q4K {
        let output_like = role == Role::Output || (tied && role == Role::TokenEmbd);
        if output_like {
            if !row_len.is_multiple_of(base.block_size()) {
                ty = GgmlType::Q8_0;
            } else if base != GgmlType::Q8_0 {
                ty = GgmlType::Q6_K;
            }
        } else if quant == Quant::Q4KM
            && matches!(role, Role::AttnV | Role::FfnDown)
            && use_more_bits(layer, n_layers)
        {
            ty = GgmlType::Q6_K;
        }
    }
    fallback(ty, row_len)
}

/// The GGUF name, role and layer of a checkpoint tensor, or `None` for a name that has no place
/// in the file.
pub fn gguf_name(hf: &str) -> Option<(String, Role, usize)> {
    match hf {
        "model.embed_tokens.weight" => {
            return Some(("token_embd.weight".into(), Role::TokenEmbd, 0));
        }
        "model.norm.weight" => return Some(("output_norm.weight".into(), Role::Vector, 0)),
        "lm_head.weight" => return Some(("output.weight".into(), Role::Output, 0)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let i: usize = layer.parse().ok()?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (name, role) = match stem {
        "self_attn.q_proj" => ("attn_q", Role::AttnQ),
        "self_attn.k_proj" => ("attn_k", Role::AttnK),
        "self_attn.v_proj" => ("attn_v", Role::AttnV),
        "self_attn.o_proj" => ("attn_output", Role::AttnOutput),
        "mlp.gate_proj" => ("ffn_gate", Role::FfnGate),
        "mlp.up_proj" => ("ffn_up", Role::FfnUp),
        "mlp.down_proj" => ("ffn_down", Role::FfnDown),
        "input_layernorm" if suffix == "weight" => ("attn_norm", Role::Vector),
        "post_attention_layernorm" if suffix == "weight" => ("ffn_norm", Role::Vector),
        _ => return None,
    };
    // A bias keeps its projection's role (for the RoPE permutation); being 1-D, it is F32.
    Some((format!("blk.{i}.{name}.{suffix}"), role, i))
}

/// Permute the rows of a Q or K projection (`rows × cols`, row-major; `cols = 1` for a bias) from
/// Hugging Face's split-half RoPE layout to llama.cpp's interleaved pairs: within each of
/// `n_head` heads of `d` rows, new row `2j + s` is old row `s·d/2 + j`. This is the converter's
/// `W.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
pub fn permute_rope_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..half {
            for s in 0..2 {
                let new = h * d + 2 * j + s;
                let old = h * d + s * half + j;
                out[new * cols..(new + 1) * cols].copy_from_slice(&w[old * cols..(old + 1) * cols]);
            }
        }
    }
    out
}

/// One tensor as written.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorChoice {
    pub name: String,
    /// PyTorch order (`[out, in]`).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub bytes: usize,
}

/// Options of [`to_gguf`].
#[derive(Clone, Debug)]
pub struct GgufOptions {
    pub quant: Quant,
    /// `general.name`.
    pub name: String,
}

/// A model converted to GGUF, ready to write.
pub struct GgufExport {
    pub writer: GgufWriter,
    pub tensors: Vec<TensorChoice>,
    /// Values in all tensors (the output counted again when tied).
    pub weights: usize,
    /// Bytes of tensor data (without alignment padding).
    pub data_bytes: usize,
    pub arch: &'static str,
}

impl GgufExport {
    /// Bits per stored weight over all tensors.
    pub fn bits_per_weight(&self) -> f64 {
        bits_per_weight(self.data_bytes, self.weights)
    }
}

/// `8 · bytes / weights` (0 for no weights).
pub fn bits_per_weight(data_bytes: usize, weights: usize) -> f64 {
    if weights == 0 {
        0.0
    } else {
        8.0 * data_bytes as f64 / weights as f64
    }
}

/// llama.cpp's architecture name for `cfg`.
pub fn arch_name(cfg: &ModelConfig) -> &'static str {
    match cfg.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
    }
}

fn arch_metadata(w: &mut GgufWriter, cfg: &ModelConfig, arch: &str) -> Result<(), ExportError> {
    let u = |what: &str, v: usize| {
        u32::try_from(v)
            .map(MetaValue::U32)
            .map_err(|_| ExportError::Convert {
                message: format!("{what} {v} does not fit the u32 GGUF requires"),
            })
    };
    w.set(
        &format!("{arch}.context_length"),
        u("context length", cfg.max_positions)?,
    );
    w.set(
        &format!("{arch}.embedding_length"),
        u("hidden size", cfg.hidden_size)?,
    );
    w.set(
        &format!("{arch}.block_count"),
        u("layer count", cfg.num_layers)?,
    );
    w.set(
        &format!("{arch}.feed_forward_length"),
        u("intermediate size", cfg.intermediate_size)?,
    );
    w.set(
        &format!("{arch}.attention.head_count"),
        u("head count", cfg.num_heads)?,
    );
    w.set(
        &format!("{arch}.attention.head_count_kv"),
        u("kv head count", cfg.num_kv_heads)?,
    );
    w.set(
        &format!("{arch}.attention.key_length"),
        u("head dim", cfg.head_dim)?,
    );
    w.set(
        &format!("{arch}.attention.value_length"),
        u("head dim", cfg.head_dim)?,
    );
    w.set(
        &format!("{arch}.rope.dimension_count"),
        u("head dim", cfg.head_dim)?,
    );
    w.set(
        &format!("{arch}.vocab_size"),
        u("vocab size", cfg.vocab_size)?,
    );
    w.set(
        &format!("{arch}.rope.freq_base"),
        MetaValue::F32(cfg.rope_theta as f32),
    );
    w.set(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(cfg.rms_norm_eps as f32),
    );
    Ok(())
}

/// A writer holding every metadata key of the file for `cfg` and `vocab` (no tensors yet),
/// after checking that the vocabulary and the embedding agree.
pub fn gguf_header(
    cfg: &ModelConfig,
    vocab: &GgufVocab,
    opts: &GgufOptions,
) -> Result<GgufWriter, ExportError> {
    let arch = arch_name(cfg);
    if vocab.tokens.len() != cfg.vocab_size {
        return Err(ExportError::Convert {
            message: format!(
                "the vocabulary has {} tokens but the embedding {} rows",
                vocab.tokens.len(),
                cfg.vocab_size
            ),
        });
    }
    let mut w = GgufWriter::new();
    w.set("general.architecture", MetaValue::String(arch.into()));
    w.set("general.name", MetaValue::String(opts.name.clone()));
    w.set("general.file_type", MetaValue::U32(opts.quant.file_type()));
    if opts.quant.is_quantized() {
        w.set("general.quantization_version", MetaValue::U32(2));
    }
    arch_metadata(&mut w, cfg, arch)?;
    vocab.write(&mut w);
    Ok(w)
}

/// The role and GGML type of a tensor of `shape` (PyTorch order) that plays `role` in `layer`:
/// 1-D tensors are vectors, rows are the last dimension (see [`choose_type`]).
pub fn tensor_type(
    cfg: &ModelConfig,
    quant: Quant,
    role: Role,
    layer: usize,
    shape: &[usize],
) -> (Role, GgmlType) {
    let row_len = *shape.last().unwrap_or(&1);
    let role = if shape.len() < 2 { Role::Vector } else { role };
    let ty = choose_type(
        quant,
        role,
        layer,
        cfg.num_layers,
        row_len,
        cfg.tie_word_embeddings,
    );
    (role, ty)
}

/// The heads whose rows [`permute_rope_rows`] reorders in a tensor of `role`, or `None` when it
/// is written as stored (not Q or K, or an architecture that rotates split halves itself).
pub fn rope_heads(cfg: &ModelConfig, role: Role) -> Option<usize> {
    match (cfg.arch, role) {
        (Arch::Llama, Role::AttnQ) => Some(cfg.num_heads),
        (Arch::Llama, Role::AttnK) => Some(cfg.num_kv_heads),
        _ => None,
    }
}

/// Convert `model` (adapters already merged) with its tokenizer metadata `vocab` into a GGUF
/// file in memory. [`super::stream::write_gguf`] writes the same bytes from a checkpoint on disk
/// without holding the model.
pub fn to_gguf<B: Backend>(
    model: &CausalLm<B>,
    vocab: &GgufVocab,
    opts: &GgufOptions,
) -> Result<GgufExport, ExportError> {
    let cfg = &model.config;
    let arch = arch_name(cfg);
    let w = gguf_header(cfg, vocab, opts)?;
    let tied = cfg.tie_word_embeddings;
    let mut out = GgufExport {
        writer: w,
        tensors: Vec::new(),
        weights: 0,
        data_bytes: 0,
        arch,
    };
    let mut tied_embedding: Option<(Vec<usize>, Vec<f32>)> = None;
    let mut failure: Option<ExportError> = None;
    // One parameter at a time: only one tensor's f32 values are held besides the output bytes.
    for_each_param(model, |hf, shape, entry| {
        if failure.is_some() {
            return;
        }
        let Some((name, role, layer)) = gguf_name(hf) else {
            failure = Some(ExportError::Convert {
                message: format!(
                    "parameter `{hf}` has no GGUF tensor (adapters must be merged first)"
                ),
            });
            return;
        };
        let mut values = tensor_f32(entry.value);
        if let Some(heads) = rope_heads(cfg, role) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            values = permute_rope_rows(&values, shape[0], cols, heads);
        }
        if tied && role == Role::TokenEmbd {
            tied_embedding = Some((shape.to_vec(), values.clone()));
        }
        if let Err(e) = add(
            &mut out, cfg, opts.quant, &name, role, layer, shape, &values,
        ) {
            failure = Some(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some((shape, values)) = tied_embedding {
        add(
            &mut out,
            cfg,
            opts.quant,
            "output.weight",
            Role::Output,
            0,
            &shape,
            &values,
        )?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn add(
    out: &mut GgufExport,
    cfg: &ModelConfig,
    quant: Quant,
    name: &str,
    role: Role,
    layer: usize,
    shape: &[usize],
    values: &[f32],
) -> Result<(), ExportError> {
    let row_len = *shape.last().unwrap_or(&1);
    let (_, ty) = tensor_type(cfg, quant, role, layer, shape);
    let bytes = quantize(ty, values, row_len)?;
    out.weights += values.len();
    out.data_bytes += bytes.len();
    out.tensors.push(TensorChoice {
        name: name.to_owned(),
        shape: shape.to_vec(),
        ty,
        bytes: bytes.len(),
    });
    out.writer.add_tensor(name, shape, ty, bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_the_halves_of_each_head() {
        // 2 heads of 4 rows, 1 column: rows [0 1 2 3 | 4 5 6 7] → [0 2 1 3 | 4 6 5 7].
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(
            permute_rope_rows(&w, 8, 1, 2),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }

    #[test]
    fn q4_k_m_gives_more_bits_to_the_layers_llama_cpp_does() {
        // 32 layers (Llama 7B): n/8 = 4, 7n/8 = 28.
        let more: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert_eq!(
            (0..2).filter(|&i| use_more_bits(i, 2)).collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn type_choice_follows_llama_quantize() {
        use GgmlType::*;
        let t = |q, role, layer, row, tied| choose_type(q, role, layer, 32, row, tied);
        // Rows of 4096: no fallbacks.
        assert_eq!(t(Quant::Q4KM, Role::AttnQ, 5, 4096, false), Q4_K);
        assert_eq!(t(Quant::Q4KM, Role::AttnV, 0, 4096, false), Q6_K);
        assert_eq!(t(Quant::Q4KM, Role::AttnV, 4, 4096, false), Q4_K);
        assert_eq!(t(Quant::Q4KM, Role::FfnDown, 6, 11008, false), Q6_K);
        assert_eq!(t(Quant::Q4KM, Role::Output, 0, 4096, false), Q6_K);
        assert_eq!(t(Quant::Q4KM, Role::TokenEmbd, 0, 4096, false), Q4_K);
        assert_eq!(t(Quant::Q4KM, Role::TokenEmbd, 0, 4096, true), Q6_K);
        assert_eq!(t(Quant::Q8_0, Role::Output, 0, 4096, false), Q8_0);
        assert_eq!(t(Quant::Q4_0, Role::Output, 0, 4096, false), Q6_K);
        assert_eq!(t(Quant::Q4_0, Role::TokenEmbd, 0, 4096, false), Q4_0);
        assert_eq!(t(Quant::Q4K, Role::Output, 0, 4096, false), Q4_K);
        assert_eq!(t(Quant::F16, Role::Output, 0, 4096, false), F16);
        assert_eq!(t(Quant::Q8_0, Role::Vector, 0, 4096, false), F32);
        // Rows of 64 and 176 (the fixtures): the fallbacks.
        assert_eq!(t(Quant::Q4KM, Role::AttnQ, 0, 64, false), Q5_0);
        assert_eq!(t(Quant::Q4KM, Role::Output, 0, 64, false), Q8_0);
        assert_eq!(t(Quant::Q4KM, Role::FfnDown, 0, 176, false), F16);
        assert_eq!(t(Quant::Q6K, Role::AttnQ, 0, 64, false), Q8_0);
        assert_eq!(t(Quant::Q8_0, Role::FfnDown, 0, 176, false), F16);
    }
}
