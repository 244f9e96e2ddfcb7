//! The checkpoint's `config.json`, as Hugging Face writes it, and the resolved configuration the
//! model code uses.
//!
//! [`HfConfig`] mirrors the file field for field (serde defaults for optional keys) and keeps the
//! raw JSON, so a trained model is written back with every key its base had. [`ModelConfig`] is
//! what it resolves to: one architecture, every dimension known, unsupported features refused.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ModelError;

/// The decoder families this model code covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Llama, TinyLlama, SmolLM2, Mistral (no sliding window): no biases.
    Llama,
    /// Qwen2: biases on q/k/v projections.
    Qwen2,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// `config.json` as written by transformers for LLaMA-family and Qwen2 checkpoints.
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers ≤ 4 writes `rope_theta` at the top level …
    pub rope_theta: Option<f64>,
    /// … transformers 5 writes `rope_parameters: {rope_type, rope_theta}`.
    pub rope_parameters: Option<Value>,
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for biases on all four attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub hidden_act: Option<String>,
    pub use_sliding_window: Option<bool>,
    pub sliding_window: Option<Value>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
}

fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// Everything the model code needs, resolved and checked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
}

impl ModelConfig {
    /// Parse and resolve `config.json`; `raw` is returned too so it can be written back as is.
    pub fn read(path: &Path) -> Result<(ModelConfig, Value), ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        let hf: HfConfig = serde_json::from_value(raw.clone()).map_err(|e| ModelError::Config {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        let cfg = ModelConfig::resolve(&hf).map_err(|message| ModelError::Config {
            file: path.display().to_string(),
            message,
        })?;
        Ok((cfg, raw))
    }

    /// Resolve an [`HfConfig`]: pick the architecture, fill derived dimensions, refuse what the
    /// model code would compute wrongly.
    pub fn resolve(hf: &HfConfig) -> Result<ModelConfig, String> {
        let ty = hf
            .model_type
            .clone()
            .or_else(|| {
                hf.architectures.first().map(|a| {
                    a.trim_end_matches("ForCausalLM")
                        .trim_end_matches("Model")
                        .to_lowercase()
                })
            })
            .unwrap_or_default();
        let arch = match ty.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(format!(
                    "model_type `{other}` is not supported (supported: llama, mistral, qwen2)"
                ));
            }
        };
        if let Some(act) = &hf.hidden_act
            && act != "silu"
        {
            return Err(format!("hidden_act `{act}` is not supported (only silu)"));
        }
        if hf.mlp_bias {
            return Err("mlp_bias: true is not supported".into());
        }
        if let Some(scaling) = &hf.rope_scaling
            && !scaling.is_null()
        {
            return Err(format!("rope_scaling {scaling} is not supported"));
        }
        let mut rope_theta = hf.rope_theta;
        if let Some(params) = &hf.rope_parameters {
            if let Some(kind) = params.get("rope_type").and_then(Value::as_str)
                && kind != "default"
            {
                return Err(format!(
                    "rope_type `{kind}` is not supported (only default)"
                ));
            }
            if let Some(t) = params.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = Some(t);
            }
        }
        if arch == Arch::Llama
            && ty == "mistral"
            && hf.sliding_window.as_ref().is_some_and(|w| !w.is_null())
        {
            return Err("mistral sliding_window attention is not supported".into());
        }
        if hf.num_attention_heads == 0 || hf.hidden_size == 0 || hf.num_hidden_layers == 0 {
            return Err(
                "hidden_size, num_attention_heads and num_hidden_layers must be > 0".into(),
            );
        }
        let kv = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if kv == 0 || !hf.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                hf.num_attention_heads
            ));
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        Ok(ModelConfig {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: kv,
            head_dim,
            max_positions: hf.max_position_embeddings,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias: arch == Arch::Qwen2 || hf.attention_bias,
            o_bias: arch == Arch::Llama && hf.attention_bias,
        })
    }

    /// A `config.json` for a freshly initialised model (transformers-4 style keys, which every
    /// transformers version reads).
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>, pad: Option<u32>) -> Value {
        let (arch_name, ty) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let mut v = serde_json::json!({
            "architectures": [arch_name],
            "model_type": ty,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
        });
        if self.arch == Arch::Llama {
            v["attention_bias"] = Value::Bool(self.qkv_bias);
            v["mlp_bias"] = Value::Bool(false);
        } else {
            v["use_sliding_window"] = Value::Bool(false);
        }
        v
    }

    /// [`ModelConfig::num_params`] in checked arithmetic: `None` when absurd dimensions
    /// overflow it.
    pub fn checked_params(&self) -> Option<u128> {
        let n = |x: usize| x as u128;
        let h = n(self.hidden_size);
        let q = n(self.num_heads).checked_mul(n(self.head_dim))?;
        let kv = n(self.num_kv_heads).checked_mul(n(self.head_dim))?;
        let attn = h
            .checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?
            .checked_add(if self.qkv_bias { q + 2 * kv } else { 0 })?;
        let mlp = h.checked_mul(n(self.intermediate_size))?.checked_mul(3)?;
        let layer = attn.checked_add(mlp)?.checked_add(h.checked_mul(2)?)?;
        let embed = n(self.vocab_size).checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        n(self.num_layers)
            .checked_mul(layer)?
            .checked_add(embed)?
            .checked_add(h)?
            .checked_add(head)
    }

    /// Refuse, before allocating, a model whose f32 weights do not fit in the memory this
    /// machine has available (`MemAvailable`; unchecked where the system does not say).
    pub fn check_fits_in_memory(&self) -> Result<(), String> {
        let Some(bytes) = self.checked_params().and_then(|p| p.checked_mul(4)) else {
            return Err(format!(
                "hidden_size {}, intermediate_size {}, {} layers and a vocabulary of {} overflow \
                 any parameter count",
                self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
            ));
        };
        match available_memory() {
            Some(avail) if bytes > avail as u128 => Err(format!(
                "the model has {} parameters ({:.1} GB in f32: hidden_size {}, intermediate_size \
                 {}, {} layers, vocabulary {}); this machine has {:.1} GB of memory available",
                bytes / 4,
                bytes as f64 / 1e9,
                self.hidden_size,
                self.intermediate_size,
                self.num_layers,
                self.vocab_size,
                avail as f64 / 1e9
            )),
            _ => Ok(()),
        }
    }

    /// Parameters in the model (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_layers * layer + h + head
    }
}

/// Size presets for `init:` (shapes like SmolLM2 / Llama at each size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SizePreset {
    /// hidden 64, 2 layers, 4 heads (2 kv), ffn 176: for tests and fixtures.
    Tiny,
    /// SmolLM2-135M-like: hidden 576, 30 layers, 9 heads (3 kv), ffn 1536.
    #[serde(rename = "125m")]
    M125,
    /// SmolLM2-360M/Qwen2-0.5B-like: hidden 960, 32 layers, 15 heads (5 kv), ffn 2560.
    #[serde(rename = "500m")]
    M500,
    /// TinyLlama-1.1B-like: hidden 2048, 22 layers, 32 heads (4 kv), ffn 5632.
    #[serde(rename = "1b")]
    B1,
}

impl SizePreset {
    /// (hidden, layers, heads, kv_heads, ffn)
    pub fn dims(self) -> (usize, usize, usize, usize, usize) {
        match self {
            SizePreset::Tiny => (64, 2, 4, 2, 176),
            SizePreset::M125 => (576, 30, 9, 3, 1536),
            SizePreset::M500 => (960, 32, 15, 5, 2560),
            SizePreset::B1 => (2048, 22, 32, 4, 5632),
        }
    }
}

/// Bytes of memory available to a new allocation (Linux's `MemAvailable`), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(hidden_size: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Qwen2,
            vocab_size: 512,
            hidden_size,
            intermediate_size: 176,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: hidden_size / 4,
            max_positions: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            qkv_bias: true,
            o_bias: false,
        }
    }

    #[test]
    fn absurd_dimensions_are_refused_before_allocating() {
        let tiny = cfg(64);
        assert_eq!(tiny.checked_params(), Some(tiny.num_params() as u128));
        assert!(tiny.check_fits_in_memory().is_ok());
        let e = cfg(1_000_000).check_fits_in_memory().unwrap_err();
        assert!(
            e.contains("parameters (") && e.contains("GB of memory available"),
            "{e}"
        );
        let e = cfg(usize::MAX / 2).check_fits_in_memory().unwrap_err();
        assert!(e.contains("overflow any parameter count"), "{e}");
    }
}
