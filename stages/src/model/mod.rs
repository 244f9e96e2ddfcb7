//! The LLaMA-family model: configuration, modules, checkpoint loading and saving, LoRA.
//!
//! A Model artifact is a Hugging Face directory (`config.json`, `model.safetensors`, tokenizer
//! files) that transformers loads back. An Adapter artifact is a PEFT directory
//! (`adapter_config.json`, `adapter_model.safetensors`) with its base model in `base/`.

pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod error;
pub mod fused;
pub(crate) mod kernels;
pub mod llama;
pub mod lora;
pub mod nf4;
pub mod shard;
pub mod weights;

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde_json::Value;

pub use checkpoint::Checkpoint;
pub use config::{Arch, ModelConfig, SizePreset};
pub use decode::KvCache;
pub use error::ModelError;
pub use llama::CausalLm;
pub use lora::{BaseQuant, LoraParams, LoraTarget};

use crate::data::rng::Rng;
use llama::{Attention, Block, Decoder, Embedding, Linear, Mlp, RmsNorm};
use weights::TensorFiles;

/// Tokenizer files copied along with a model.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    crate::text::tokenizer::TEMPLATE_ORIGIN_FILE,
];

/// The subdirectory of an Adapter artifact that holds its base model.
pub const ADAPTER_BASE_DIR: &str = "base";

/// A model read from disk, with what is needed to write it back.
pub struct Loaded<B: Backend> {
    pub model: CausalLm<B>,
    /// `config.json` exactly as read (written back unchanged).
    pub raw_config: Value,
    /// The directory holding `config.json` and the tokenizer files.
    pub model_dir: PathBuf,
    /// Set when the artifact was an adapter: its parameters (the adapters are on `model`).
    pub adapter: Option<LoraParams>,
    /// How `model`'s frozen base is stored: the quantization an adapter recorded (applied by
    /// [`load`]), or `None` for the weights as stored.
    pub base_quant: Option<BaseQuant>,
}

/// Which base an adapter goes on when it is loaded (also `merge`'s `base:`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BaseChoice {
    /// The base as the adapter trained on it: for a QLoRA adapter, the NF4 base dequantized
    /// (the model whose numbers the adapter was trained and evaluated with).
    #[default]
    AsTrained,
    /// The original (unquantized) base weights, whatever the adapter recorded, as PEFT's
    /// `merge_and_unload()` on a base loaded without quantization gives.
    Original,
}

/// Is `dir` a PEFT adapter artifact (rather than a full model)?
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file()
}

/// Load a Model or Adapter artifact directory; an adapter goes on its base as it trained on it
/// (a QLoRA adapter's base is stored as NF4 again, see [`lora::ADAPTER_RECORD`]).
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<Loaded<B>, ModelError> {
    load_with(dir, BaseChoice::AsTrained, device)
}

/// [`load`] with the choice of base for an adapter.
pub fn load_with<B: Backend>(
    dir: &Path,
    base: BaseChoice,
    device: &B::Device,
) -> Result<Loaded<B>, ModelError> {
    if is_adapter_dir(dir) {
        let loaded = load_model_dir::<B>(&dir.join(ADAPTER_BASE_DIR), device)?;
        let (model, params) = lora::load_adapter(loaded.model, dir)?;
        let recorded = lora::read_base_quant(dir)?;
        let base_quant = match base {
            BaseChoice::AsTrained => recorded,
            BaseChoice::Original => None,
        };
        let model = match base_quant {
            Some(BaseQuant::Nf4) => lora::quantize_base_nf4(model).0,
            None => model,
        };
        Ok(Loaded {
            model,
            adapter: Some(params),
            base_quant,
            ..loaded
        })
    } else {
        load_model_dir(dir, device)
    }
}

/// Load a Hugging Face model directory.
pub fn load_model_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<Loaded<B>, ModelError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ModelError::Layout {
            dir: dir.display().to_string(),
            message: "config.json is missing".into(),
        });
    }
    let (cfg, raw) = ModelConfig::read(&config_path)?;
    let files = TensorFiles::open_model_dir(dir)?;
    checkpoint::check_config_against(&cfg, &config_path, &files)?;
    let model = from_tensors::<B>(&cfg, &files, device)?;
    let unused = files.unused(|n| {
        n.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && n == "lm_head.weight")
    });
    if let Some((file, name)) = unused.into_iter().next() {
        return Err(ModelError::Unexpected { file, name });
    }
    Ok(Loaded {
        model,
        raw_config: raw,
        model_dir: dir.to_path_buf(),
        adapter: None,
        base_quant: None,
    })
}

/// Build the model from checkpoint tensors named as transformers names them.
pub fn from_tensors<B: Backend>(
    cfg: &ModelConfig,
    files: &TensorFiles,
    device: &B::Device,
) -> Result<CausalLm<B>, ModelError> {
    let mut source = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
        files.read_f32(name, shape)
    };
    build(cfg, device, &mut source)
}

/// A fresh model with transformers' initialisation (normal(0, 0.02) weights, unit norms, zero
/// biases), drawn from `seed` so that it is the same on every backend.
pub fn init<B: Backend>(cfg: &ModelConfig, seed: u64, device: &B::Device) -> CausalLm<B> {
    let mut rng = Rng::new(seed ^ 0x696e_6974);
    let mut source = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
        let n = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| rng.normal() * 0.02).collect()
        })
    };
    match build(cfg, device, &mut source) {
        Ok(m) => m,
        // The source above never fails.
        Err(e) => unreachable!("init cannot fail: {e}"),
    }
}

type Source<'a> = dyn FnMut(&str, &[usize]) -> Result<Vec<f32>, ModelError> + 'a;

/// Builds parameters from a [`Source`] of named values, checkpoint name by checkpoint name.
struct Builder<'s, 'a, B: Backend> {
    source: &'s mut Source<'a>,
    device: &'s B::Device,
}

impl<B: Backend> Builder<'_, '_, B> {
    fn p1(&mut self, name: &str, n: usize) -> Result<Param<Tensor<B, 1>>, ModelError> {
        let v = (self.source)(name, &[n])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [n]),
            self.device,
        )))
    }

    fn p2(&mut self, name: &str, r: usize, c: usize) -> Result<Param<Tensor<B, 2>>, ModelError> {
        let v = (self.source)(name, &[r, c])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [r, c]),
            self.device,
        )))
    }

    fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear<B>, ModelError> {
        Ok(Linear {
            weight: self.p2(&format!("{prefix}.weight"), out, inp)?,
            bias: if bias {
                Some(self.p1(&format!("{prefix}.bias"), out)?)
            } else {
                None
            },
            lora: None,
            nf4: None,
            bf16: false,
            weight_t: None,
        })
    }

    fn norm(&mut self, name: &str, n: usize, eps: f64) -> Result<RmsNorm<B>, ModelError> {
        Ok(RmsNorm {
            weight: self.p1(name, n)?,
            eps,
        })
    }
}

fn build<B: Backend>(
    cfg: &ModelConfig,
    device: &B::Device,
    source: &mut Source<'_>,
) -> Result<CausalLm<B>, ModelError> {
    let mut b = Builder::<B> { source, device };
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let eps = cfg.rms_norm_eps;
    let embed = Embedding {
        weight: b.p2("model.embed_tokens.weight", cfg.vocab_size, h)?,
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let attn = format!("model.layers.{i}.self_attn");
        let mlp = format!("model.layers.{i}.mlp");
        let pre = format!("model.layers.{i}");
        layers.push(Block {
            self_attn: Attention {
                q_proj: b.linear(&format!("{attn}.q_proj"), q, h, cfg.qkv_bias)?,
                k_proj: b.linear(&format!("{attn}.k_proj"), kv, h, cfg.qkv_bias)?,
                v_proj: b.linear(&format!("{attn}.v_proj"), kv, h, cfg.qkv_bias)?,
                o_proj: b.linear(&format!("{attn}.o_proj"), h, q, cfg.o_bias)?,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            mlp: Mlp {
                gate_proj: b.linear(&format!("{mlp}.gate_proj"), f, h, false)?,
                up_proj: b.linear(&format!("{mlp}.up_proj"), f, h, false)?,
                down_proj: b.linear(&format!("{mlp}.down_proj"), h, f, false)?,
            },
            input_layernorm: b.norm(&format!("{pre}.input_layernorm.weight"), h, eps)?,
            post_attention_layernorm: b.norm(
                &format!("{pre}.post_attention_layernorm.weight"),
                h,
                eps,
            )?,
        });
    }
    let norm = b.norm("model.norm.weight", h, eps)?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(Embedding {
            weight: b.p2("lm_head.weight", cfg.vocab_size, h)?,
        })
    };
    Ok(CausalLm {
        model: Decoder {
            embed_tokens: embed,
            layers,
            norm,
        },
        lm_head,
        config: cfg.clone(),
        bf16: false,
        head_t: None,
    })
}

/// The model's weights under their checkpoint names, adapters folded in (what a Model artifact
/// stores).
pub fn checkpoint_tensors<B: Backend>(model: &CausalLm<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let merged = lora::merge(model.clone());
    weights::params_f32(&merged)
}

/// Write `model` as a Hugging Face directory: `config.json` (`raw_config` as read, or a fresh one),
/// `model.safetensors` (f32, adapters merged), and the tokenizer files from `tokenizer_dir`.
pub fn save_model_dir<B: Backend>(
    model: &CausalLm<B>,
    raw_config: &Value,
    tokenizer_dir: &Path,
    out: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    weights::write_safetensors(
        &out.join("model.safetensors"),
        &checkpoint_tensors(model),
        Some(meta),
    )?;
    write_config_and_tokenizer(raw_config, tokenizer_dir, out)
}

/// [`save_model_dir`] for a [`Checkpoint`]: the same files, byte for byte, with the weights
/// read (and an adapter merged) one tensor at a time as they are written, so that memory holds
/// one tensor, not the model.
///
/// Past `max_shard_bytes` the weights are split into shards with an index, as transformers'
/// `save_pretrained(max_shard_size=)` splits them ([`shard`]).
pub fn save_checkpoint_dir(
    ck: &Checkpoint,
    out: &Path,
    max_shard_bytes: u64,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let tensors = ck.tensors();
    let sizes: Vec<u64> = tensors.iter().map(|t| t.len() as u64 * 4).collect();
    let shards = shard::split(&sizes, max_shard_bytes);
    let mut weight_map = serde_json::Map::new();
    for (k, members) in shards.iter().enumerate() {
        let file = shard::file_name(k, shards.len());
        let layout: Vec<(String, Vec<usize>)> = members
            .iter()
            .map(|&i| (tensors[i].name.clone(), tensors[i].shape.clone()))
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_owned(), "pt".to_owned());
        weights::write_safetensors_streamed(&out.join(&file), &layout, Some(meta), |j| {
            ck.read(&tensors[members[j]])
        })?;
        for &i in members {
            weight_map.insert(tensors[i].name.clone(), Value::String(file.clone()));
        }
    }
    if shards.len() > 1 {
        // serde_json's maps keep keys sorted, as transformers' `sort_keys=True`.
        let index = serde_json::json!({
            "metadata": {
                "total_parameters": ck.num_params(),
                "total_size": sizes.iter().sum::<u64>(),
            },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
        let path = out.join("model.safetensors.index.json");
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
    }
    write_config_and_tokenizer(&ck.raw_config, &ck.model_dir, out)
}

/// `config.json` (`raw_config` with the dtype f32, as the weights are written) and the tokenizer
/// files from `tokenizer_dir`.
fn write_config_and_tokenizer(
    raw_config: &Value,
    tokenizer_dir: &Path,
    out: &Path,
) -> Result<(), ModelError> {
    let mut config = raw_config.clone();
    if let Some(obj) = config.as_object_mut() {
        // Weights are written as f32 whatever the base stored.
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), Value::String("float32".into()));
        } else {
            obj.insert("torch_dtype".into(), Value::String("float32".into()));
        }
    }
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    let path = out.join("config.json");
    std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
    copy_tokenizer_files(tokenizer_dir, out)
}

/// Copy the tokenizer files present in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<(), ModelError> {
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            let dst = to.join(name);
            std::fs::copy(&src, &dst).map_err(|e| ModelError::io(&dst, e))?;
        }
    }
    Ok(())
}

/// Copy (hard-link where possible) a model directory's files into `to`: how an Adapter artifact
/// carries its base.
pub fn link_model_dir(from: &Path, to: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(to).map_err(|e| ModelError::io(to, e))?;
    let entries = std::fs::read_dir(from).map_err(|e| ModelError::io(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io(from, e))?;
        let src = entry.path();
        if !src.is_file() {
            continue;
        }
        let dst = to.join(entry.file_name());
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|e| ModelError::io(&dst, e))?;
        }
    }
    Ok(())
}
