//! LoRA adapters: injection into a loaded model, PEFT's on-disk layout, and merging.
//!
//! PEFT layout, which `peft.PeftModel.from_pretrained` reads:
//! - `adapter_config.json`: `peft_type: LORA`, `r`, `lora_alpha`, `lora_dropout`,
//!   `target_modules`, `task_type: CAUSAL_LM`, `bias: none`, …
//! - `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight` `[r, in]` and
//!   `….lora_B.weight` `[out, r]`.
//!
//! The update is `W' = W + (alpha / r) · B·A`; A starts as PEFT's Kaiming-uniform
//! (`U(-1/√in, 1/√in)`), B at zero, so a fresh adapter leaves the model unchanged.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::ModelError;
use super::llama::{CausalLm, Linear, Lora};
use super::weights::{self, TensorFiles};
use crate::data::rng::Rng;

/// The projections an adapter can sit on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    pub(crate) fn linear_mut<B: Backend>(
        self,
        block: &mut super::llama::Block<B>,
    ) -> &mut Linear<B> {
        match self {
            LoraTarget::QProj => &mut block.self_attn.q_proj,
            LoraTarget::KProj => &mut block.self_attn.k_proj,
            LoraTarget::VProj => &mut block.self_attn.v_proj,
            LoraTarget::OProj => &mut block.self_attn.o_proj,
            LoraTarget::GateProj => &mut block.mlp.gate_proj,
            LoraTarget::UpProj => &mut block.mlp.up_proj,
            LoraTarget::DownProj => &mut block.mlp.down_proj,
        }
    }

    /// The module of the layer this projection sits in (`self_attn` or `mlp`).
    pub fn module_path(self) -> &'static str {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                "self_attn"
            }
            _ => "mlp",
        }
    }
}

fn default_rank() -> usize {
    16
}
fn default_targets() -> Vec<LoraTarget> {
    vec![
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
    ]
}

/// `lora:` on a trainer: train low-rank adapters instead of the full weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraParams {
    /// Adapter rank r.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by alpha / r (default: 2 × rank).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub dropout: f64,
    /// Projections that get adapters.
    #[serde(default = "default_targets")]
    pub targets: Vec<LoraTarget>,
}

impl LoraParams {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }
    pub fn scale(&self) -> f64 {
        self.alpha() / self.rank as f64
    }
}

/// How the frozen base under an adapter was stored while the adapter trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BaseQuant {
    /// 4-bit NormalFloat, block 64, double-quantized scales (QLoRA).
    Nf4,
}

impl BaseQuant {
    pub fn name(self) -> &'static str {
        match self {
            BaseQuant::Nf4 => "nf4",
        }
    }
}

/// burnish's own record beside PEFT's `adapter_config.json` (PEFT has no field for it): the
/// quantization the base had while the adapter trained, so that every later stage puts the
/// adapter on the same base by default.
pub const ADAPTER_RECORD: &str = "burnish_adapter.json";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct AdapterRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_quantization: Option<BaseQuant>,
}

/// The base quantization recorded in an adapter directory (`None`: the base was used as stored).
pub fn read_base_quant(dir: &Path) -> Result<Option<BaseQuant>, ModelError> {
    let path = dir.join(ADAPTER_RECORD);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let r: AdapterRecord = serde_json::from_str(&text).map_err(|e| ModelError::Adapter {
        message: format!("{}: {e}", path.display()),
    })?;
    Ok(r.base_quantization)
}

/// Record `quant` in the adapter directory `dir` (nothing is written for an unquantized base).
pub fn write_base_quant(dir: &Path, quant: Option<BaseQuant>) -> Result<(), ModelError> {
    let Some(q) = quant else {
        return Ok(());
    };
    let r = AdapterRecord {
        base_quantization: Some(q),
    };
    let path = dir.join(ADAPTER_RECORD);
    let text = serde_json::to_string_pretty(&r).unwrap_or_default() + "\n";
    std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
}

/// Set the dropout of every adapter on `model` (`0.0` turns it off).
pub fn set_dropout<B: Backend>(model: CausalLm<B>, dropout: f64) -> CausalLm<B> {
    let mut model = model;
    for layer in model.model.layers.iter_mut() {
        for t in LoraTarget::ALL {
            if let Some(l) = t.linear_mut(layer).lora.as_mut() {
                l.dropout = dropout;
            }
        }
    }
    model
}

/// Freeze every base weight of `model` and put fresh adapters on the targets (seeded).
pub fn inject<B: Backend>(model: CausalLm<B>, params: &LoraParams, seed: u64) -> CausalLm<B> {
    let mut model = model.no_grad();
    let device = model.model.embed_tokens.weight.val().device();
    let mut rng = Rng::new(seed ^ 0x4c6f_5241);
    let mut targets = params.targets.clone();
    targets.sort();
    targets.dedup();
    for layer in model.model.layers.iter_mut() {
        for t in &targets {
            let lin = t.linear_mut(layer);
            let [out, inp] = lin.dims();
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..params.rank * inp)
                .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                .collect();
            let a = Tensor::<B, 2>::from_data(TensorData::new(a, [params.rank, inp]), &device);
            let b = Tensor::<B, 2>::zeros([out, params.rank], &device);
            lin.lora = Some(Lora {
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                scale: params.scale(),
                dropout: params.dropout,
            });
        }
    }
    model
}

/// Adapter parameters under PEFT's names, as `(name, shape, values)`.
pub fn peft_tensors<B: Backend>(model: &CausalLm<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    weights::params_f32(model)
        .into_iter()
        .filter_map(|(name, shape, values)| {
            let peft = if let Some(stem) = name.strip_suffix(".lora.a") {
                format!("base_model.model.{stem}.lora_A.weight")
            } else if let Some(stem) = name.strip_suffix(".lora.b") {
                format!("base_model.model.{stem}.lora_B.weight")
            } else {
                return None;
            };
            Some((peft, shape, values))
        })
        .collect()
}

/// Number of adapter parameters in `model`.
pub fn adapter_param_count<B: Backend>(model: &CausalLm<B>) -> usize {
    model.num_params_where(|n| n.contains(".lora."))
}

/// Write `model`'s adapters as a PEFT adapter directory.
pub fn write_adapter(
    model: &CausalLm<impl Backend>,
    params: &LoraParams,
    base_name: &str,
    dir: &Path,
) -> Result<(), ModelError> {
    let tensors = peft_tensors(model);
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    weights::write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
    let mut targets: Vec<&str> = params.targets.iter().map(|t| t.name()).collect();
    targets.sort();
    targets.dedup();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": params.rank,
        "lora_alpha": params.alpha(),
        "lora_dropout": params.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": false,
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))
}

/// Read a PEFT `adapter_config.json` back into [`LoraParams`].
pub fn read_adapter_config(dir: &Path) -> Result<LoraParams, ModelError> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Adapter {
        message: format!("{}: {e}", path.display()),
    })?;
    let bad = |what: &str| ModelError::Adapter {
        message: format!("{}: {what}", path.display()),
    };
    if v.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
        return Err(bad("`peft_type` is not LORA"));
    }
    if v.get("use_dora").and_then(|t| t.as_bool()) == Some(true) {
        return Err(bad("DoRA adapters are not supported"));
    }
    if v.get("use_rslora").and_then(|t| t.as_bool()) == Some(true) {
        return Err(bad("rsLoRA scaling is not supported"));
    }
    let rank = v
        .get("r")
        .and_then(|r| r.as_u64())
        .ok_or_else(|| bad("`r` is missing"))? as usize;
    let alpha = v.get("lora_alpha").and_then(|a| a.as_f64());
    let dropout = v
        .get("lora_dropout")
        .and_then(|a| a.as_f64())
        .unwrap_or(0.0);
    let mut targets = Vec::new();
    match v.get("target_modules") {
        Some(serde_json::Value::Array(items)) => {
            for t in items {
                let name = t.as_str().unwrap_or_default();
                targets.push(
                    LoraTarget::from_name(name)
                        .ok_or_else(|| bad(&format!("target module `{name}` is not supported")))?,
                );
            }
        }
        _ => return Err(bad("`target_modules` must be a list of projection names")),
    }
    Ok(LoraParams {
        rank,
        alpha,
        dropout,
        targets,
    })
}

/// Put the adapter stored in `dir` on `model` (frozen base), trainable.
pub fn load_adapter<B: Backend>(
    model: CausalLm<B>,
    dir: &Path,
) -> Result<(CausalLm<B>, LoraParams), ModelError> {
    let params = read_adapter_config(dir)?;
    let files = TensorFiles::open(&[dir.join("adapter_model.safetensors")])?;
    let mut model = model.no_grad();
    let device = model.model.embed_tokens.weight.val().device();
    for (i, layer) in model.model.layers.iter_mut().enumerate() {
        for t in &params.targets {
            let stem = format!(
                "base_model.model.model.layers.{i}.{}.{}",
                t.module_path(),
                t.name()
            );
            let lin = t.linear_mut(layer);
            let [out, inp] = lin.dims();
            let a = files.param(
                &format!("{stem}.lora_A.weight"),
                [params.rank, inp],
                &device,
            )?;
            let b = files.param(
                &format!("{stem}.lora_B.weight"),
                [out, params.rank],
                &device,
            )?;
            lin.lora = Some(Lora {
                a,
                b,
                scale: params.scale(),
                dropout: params.dropout,
            });
        }
    }
    if let Some((file, name)) = files.unused(|_| false).into_iter().next() {
        return Err(ModelError::Unexpected { file, name });
    }
    Ok((model, params))
}

/// Fold every adapter into its base weight (`W + scale · B·A`) and drop the adapters.
pub fn merge<B: Backend>(model: CausalLm<B>) -> CausalLm<B> {
    let mut model = model;
    for layer in model.model.layers.iter_mut() {
        for t in LoraTarget::ALL {
            let lin = t.linear_mut(layer);
            if lin.lora.is_some() || lin.nf4.is_some() {
                let merged = lin.merged_weight().detach();
                lin.weight = Param::from_tensor(merged);
                lin.lora = None;
                lin.nf4 = None;
            }
        }
    }
    model
}

/// Store every frozen projection weight of `model` (q/k/v/o, gate/up/down) as NF4 with
/// double-quantized scales (QLoRA's base). Embeddings, the output head and norms stay f32.
/// Returns the model and the base weights' storage in bits per parameter.
pub fn quantize_base_nf4<B: Backend>(model: CausalLm<B>) -> (CausalLm<B>, f64) {
    let mut model = model;
    let (mut bytes, mut values) = (0usize, 0usize);
    for layer in model.model.layers.iter_mut() {
        for t in LoraTarget::ALL {
            let lin = t.linear_mut(layer);
            if lin.nf4.is_some() {
                continue;
            }
            let w = lin.weight.val();
            let dims = w.dims();
            let device = w.device();
            let q = super::nf4::Nf4Tensor::quantize(&weights::tensor_f32(w), &dims);
            bytes += q.storage_bytes();
            values += q.len();
            lin.nf4 = Some(std::sync::Arc::new(q));
            lin.weight = Param::from_tensor(Tensor::zeros([1, 1], &device)).set_require_grad(false);
        }
    }
    (model, bytes as f64 * 8.0 / values.max(1) as f64)
}

/// The same model with every adapter removed (the base weights are shared, not copied): the
/// reference model of a LoRA policy.
pub fn without_adapters<B: Backend>(model: CausalLm<B>) -> CausalLm<B> {
    let mut model = model;
    for layer in model.model.layers.iter_mut() {
        for t in LoraTarget::ALL {
            t.linear_mut(layer).lora = None;
        }
    }
    model
}

/// Trainable parameters `rank` implies for `model`'s shapes: Σ over adapted linears of
/// `r · (in + out)`.
pub fn expected_adapter_params<B: Backend>(model: &CausalLm<B>, params: &LoraParams) -> usize {
    let mut targets = params.targets.clone();
    targets.sort();
    targets.dedup();
    let cfg = &model.config;
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let per_layer: usize = targets
        .iter()
        .map(|t| match t {
            LoraTarget::QProj => h + q,
            LoraTarget::KProj | LoraTarget::VProj => h + kv,
            LoraTarget::OProj => q + h,
            LoraTarget::GateProj | LoraTarget::UpProj => h + f,
            LoraTarget::DownProj => f + h,
        })
        .sum();
    params.rank * per_layer * cfg.num_layers
}
