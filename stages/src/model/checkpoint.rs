//! A Model or Adapter artifact read one tensor at a time, for exporters that must not hold the
//! model: a checkpoint many times larger than memory is walked tensor by tensor, each one read
//! from the safetensors files ([`TensorFiles`] reads headers at open and bytes on demand) and
//! converted on its own.
//!
//! [`Checkpoint::open`] checks everything [`super::load`] checks before a single tensor is read:
//! the configuration, every tensor's presence, shape and dtype, tensors with no place in the
//! model, and for an adapter its configuration and every `lora_A`/`lora_B` shape. A bad input then
//! fails before an exporter has written anything.
//!
//! For an adapter, [`Checkpoint::read`] gives a target projection's weight merged with its
//! adapter, `W + scale · B·A`, for that tensor only. The numbers are those of loading the
//! adapter with [`super::load`] and merging it with [`lora::merge`], to the bit: the merge goes
//! through the same `Linear::merged_weight` on the same CPU backend, and when the adapter
//! recorded an NF4 base (QLoRA) every projection weight goes through NF4 and back first, as
//! [`lora::quantize_base_nf4`] does to a loaded model. Everything else — embeddings, norms,
//! biases, the output head, projections without an adapter on an unquantized base — is the
//! stored tensor converted to f32, and can be read in bands of rows
//! ([`Checkpoint::read_rows`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::flex::{Flex, FlexDevice};
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use serde_json::Value;

use super::config::ModelConfig;
use super::error::ModelError;
use super::llama::{Linear, Lora};
use super::lora::{self, BaseQuant, LoraParams, LoraTarget};
use super::nf4::Nf4Tensor;
use super::weights::{TensorFiles, tensor_f32};
use super::{ADAPTER_BASE_DIR, BaseChoice, is_adapter_dir};

/// A checkpoint tensor: its name as transformers names it, and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl CheckpointTensor {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        CheckpointTensor {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tensors of a model with configuration `cfg`, in the order of its parameters (the order
/// [`super::weights::for_each_param`] walks a loaded model in, adapters merged).
pub fn model_tensors(cfg: &ModelConfig) -> Vec<CheckpointTensor> {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let mut out = vec![CheckpointTensor::new(
        "model.embed_tokens.weight",
        &[cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_layers {
        let attn = format!("model.layers.{i}.self_attn");
        let mut linear = |prefix: String, o: usize, inp: usize, bias: bool| {
            out.push(CheckpointTensor::new(format!("{prefix}.weight"), &[o, inp]));
            if bias {
                out.push(CheckpointTensor::new(format!("{prefix}.bias"), &[o]));
            }
        };
        linear(format!("{attn}.q_proj"), q, h, cfg.qkv_bias);
        linear(format!("{attn}.k_proj"), kv, h, cfg.qkv_bias);
        linear(format!("{attn}.v_proj"), kv, h, cfg.qkv_bias);
        linear(format!("{attn}.o_proj"), h, q, cfg.o_bias);
        let mlp = format!("model.layers.{i}.mlp");
        linear(format!("{mlp}.gate_proj"), f, h, false);
        linear(format!("{mlp}.up_proj"), f, h, false);
        linear(format!("{mlp}.down_proj"), h, f, false);
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push(CheckpointTensor::new(
                format!("model.layers.{i}.{norm}.weight"),
                &[h],
            ));
        }
    }
    out.push(CheckpointTensor::new("model.norm.weight", &[h]));
    if !cfg.tie_word_embeddings {
        out.push(CheckpointTensor::new(
            "lm_head.weight",
            &[cfg.vocab_size, h],
        ));
    }
    out
}

/// Refuse a `config.json` whose dimensions overflow, or that declares more layers than the files
/// hold tensors (a layer has several of its own), before anything is listed or built per layer.
pub(crate) fn check_config_against(
    cfg: &ModelConfig,
    config_path: &Path,
    files: &TensorFiles,
) -> Result<(), ModelError> {
    if cfg.checked_params().is_none_or(|p| p > usize::MAX as u128) {
        return Err(ModelError::Config {
            file: config_path.display().to_string(),
            message: format!(
                "hidden_size {}, intermediate_size {}, {} layers and a vocabulary of {} overflow \
                 any parameter count",
                cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
            ),
        });
    }
    if cfg.num_layers > files.names().count() {
        // Some layer is missing: name the first layer norm that is not there.
        let name = (0..cfg.num_layers)
            .map(|i| format!("model.layers.{i}.input_layernorm.weight"))
            .find(|n| !files.contains(n))
            .unwrap_or_default();
        files.expect(&name, &[cfg.hidden_size])?;
    }
    Ok(())
}

/// The layer and projection of a projection weight's name
/// (`model.layers.3.mlp.down_proj.weight` → `(3, DownProj)`).
fn projection_of(name: &str) -> Option<(usize, LoraTarget)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let stem = rest.strip_suffix(".weight")?;
    let (_, proj) = stem.rsplit_once('.')?;
    let target = LoraTarget::from_name(proj)?;
    (stem == format!("{}.{}", target.module_path(), proj)).then_some(())?;
    Some((layer.parse().ok()?, target))
}

/// An adapter's settings and its `adapter_model.safetensors`.
struct AdapterFiles {
    params: LoraParams,
    files: TensorFiles,
}

impl AdapterFiles {
    /// PEFT's name of the `part` (`lora_A` or `lora_B`) of `target` in `layer`.
    fn name(layer: usize, target: LoraTarget, part: &str) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.{part}.weight",
            target.module_path(),
            target.name()
        )
    }

    /// The shapes of A `[r, in]` and B `[out, r]` for a weight of `[out, in]`.
    fn shapes(&self, weight: &[usize]) -> ([usize; 2], [usize; 2]) {
        let r = self.params.rank;
        ([r, weight[1]], [weight[0], r])
    }

    fn has(&self, target: LoraTarget) -> bool {
        self.params.targets.contains(&target)
    }
}

/// A Model or Adapter artifact, open for reading tensor by tensor. See the module doc.
pub struct Checkpoint {
    pub config: ModelConfig,
    /// `config.json` exactly as read.
    pub raw_config: Value,
    /// The directory holding `config.json`, the weights and the tokenizer files (an adapter's
    /// `base/`).
    pub model_dir: PathBuf,
    /// How the base is taken under an adapter: the quantization it recorded (or `None`).
    pub base_quant: Option<BaseQuant>,
    files: TensorFiles,
    adapter: Option<AdapterFiles>,
    tensors: Vec<CheckpointTensor>,
}

impl Checkpoint {
    /// Open the Model or Adapter artifact in `dir`; an adapter goes on its base as it trained
    /// (NF4 when it recorded so), as [`super::load`] puts it.
    pub fn open(dir: &Path) -> Result<Checkpoint, ModelError> {
        Self::open_with(dir, BaseChoice::AsTrained)
    }

    /// [`Checkpoint::open`] with the choice of base for an adapter.
    pub fn open_with(dir: &Path, base: BaseChoice) -> Result<Checkpoint, ModelError> {
        let adapter_dir = is_adapter_dir(dir).then(|| dir.to_path_buf());
        let model_dir = match &adapter_dir {
            Some(d) => d.join(ADAPTER_BASE_DIR),
            None => dir.to_path_buf(),
        };
        let config_path = model_dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::Layout {
                dir: model_dir.display().to_string(),
                message: "config.json is missing".into(),
            });
        }
        let (config, raw_config) = ModelConfig::read(&config_path)?;
        let files = TensorFiles::open_model_dir(&model_dir)?;
        check_config_against(&config, &config_path, &files)?;
        let tensors = model_tensors(&config);
        for t in &tensors {
            files.expect(&t.name, &t.shape)?;
        }
        let tied = config.tie_word_embeddings;
        let unused =
            files.unused(|n| n.ends_with("rotary_emb.inv_freq") || (tied && n == "lm_head.weight"));
        if let Some((file, name)) = unused.into_iter().next() {
            return Err(ModelError::Unexpected { file, name });
        }
        let (adapter, base_quant) = match &adapter_dir {
            Some(d) => {
                let adapter = open_adapter(d, &tensors)?;
                let recorded = lora::read_base_quant(d)?;
                let quant = match base {
                    BaseChoice::AsTrained => recorded,
                    BaseChoice::Original => None,
                };
                (Some(adapter), quant)
            }
            None => (None, None),
        };
        Ok(Checkpoint {
            config,
            raw_config,
            model_dir,
            base_quant,
            files,
            adapter,
            tensors,
        })
    }

    /// The model's tensors in parameter order (adapters merged: no `lora_A`/`lora_B`).
    pub fn tensors(&self) -> &[CheckpointTensor] {
        &self.tensors
    }

    /// The adapter's settings, for an Adapter artifact.
    pub fn adapter(&self) -> Option<&LoraParams> {
        self.adapter.as_ref().map(|a| &a.params)
    }

    /// Parameters of the adapter (`rank × (in + out)` per targeted projection; 0 for a model).
    pub fn adapter_params(&self) -> usize {
        let Some(a) = &self.adapter else { return 0 };
        self.tensors
            .iter()
            .filter(|t| projection_of(&t.name).is_some_and(|(_, target)| a.has(target)))
            .map(|t| a.params.rank * t.shape.iter().sum::<usize>())
            .sum()
    }

    /// Parameters of the merged model.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(CheckpointTensor::len).sum()
    }

    /// Bytes tensor `t` takes in its file (its stored dtype).
    pub fn stored_bytes(&self, t: &CheckpointTensor) -> usize {
        self.files.stored_bytes(&t.name).unwrap_or(0)
    }

    /// Whether `t` is the stored tensor as it is (no adapter merged into it, no NF4 round trip),
    /// so that it can be read in bands of rows.
    pub fn is_stored_as_is(&self, t: &CheckpointTensor) -> bool {
        match projection_of(&t.name) {
            None => true,
            Some((_, target)) => {
                self.base_quant.is_none() && !self.adapter.as_ref().is_some_and(|a| a.has(target))
            }
        }
    }

    /// Rows `start..start + count` of `t` (a 2-D tensor [stored as is](Self::is_stored_as_is)),
    /// as f32, appended to `out`.
    pub fn read_rows(
        &self,
        t: &CheckpointTensor,
        start: usize,
        count: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let cols = t.shape.get(1).copied().unwrap_or(1);
        self.files
            .read_f32_range(&t.name, &t.shape, start * cols, count * cols, out)
    }

    /// The values of `t` as the merged model holds them (see the module doc).
    pub fn read(&self, t: &CheckpointTensor) -> Result<Vec<f32>, ModelError> {
        let values = self.files.read_f32(&t.name, &t.shape)?;
        let Some((layer, target)) = projection_of(&t.name) else {
            return Ok(values);
        };
        let nf4 = self.base_quant == Some(BaseQuant::Nf4);
        let adapter = match &self.adapter {
            Some(a) if a.has(target) => {
                let (a_shape, b_shape) = a.shapes(&t.shape);
                let a_values = a
                    .files
                    .read_f32(&AdapterFiles::name(layer, target, "lora_A"), &a_shape)?;
                let b_values = a
                    .files
                    .read_f32(&AdapterFiles::name(layer, target, "lora_B"), &b_shape)?;
                Some((a_values, b_values, a.params.scale()))
            }
            _ => None,
        };
        if !nf4 && adapter.is_none() {
            return Ok(values);
        }
        Ok(merged_weight(
            values,
            [t.shape[0], t.shape[1]],
            nf4,
            adapter,
        ))
    }
}

/// Read an adapter's configuration and check every tensor it must hold against the base's
/// shapes, and that it holds nothing else (what [`lora::load_adapter`] checks).
fn open_adapter(dir: &Path, tensors: &[CheckpointTensor]) -> Result<AdapterFiles, ModelError> {
    let params = lora::read_adapter_config(dir)?;
    let files = TensorFiles::open(&[dir.join("adapter_model.safetensors")])?;
    let adapter = AdapterFiles { params, files };
    for t in tensors {
        let Some((layer, target)) = projection_of(&t.name) else {
            continue;
        };
        if !adapter.has(target) {
            continue;
        }
        let (a, b) = adapter.shapes(&t.shape);
        let files = &adapter.files;
        files.expect(&AdapterFiles::name(layer, target, "lora_A"), &a)?;
        files.expect(&AdapterFiles::name(layer, target, "lora_B"), &b)?;
    }
    if let Some((file, name)) = adapter.files.unused(|_| false).into_iter().next() {
        return Err(ModelError::Unexpected { file, name });
    }
    Ok(adapter)
}

/// `W + scale · B·A` for one projection, with `W` through NF4 and back first when `nf4`: a
/// [`Linear`] built as [`super::load`] builds it, merged by the same `merged_weight` that
/// [`lora::merge`] calls, so the bits are the same.
fn merged_weight(
    weight: Vec<f32>,
    shape: [usize; 2],
    nf4: bool,
    adapter: Option<(Vec<f32>, Vec<f32>, f64)>,
) -> Vec<f32> {
    let device = FlexDevice;
    let tensor = |values: Vec<f32>, shape: [usize; 2]| -> Tensor<Flex, 2> {
        Tensor::from_data(TensorData::new(values, shape), &device)
    };
    let (weight, nf4) = if nf4 {
        let q = Nf4Tensor::quantize(&weight, &shape);
        let placeholder = Tensor::zeros([1, 1], &device);
        (placeholder, Some(Arc::new(q)))
    } else {
        (tensor(weight, shape), None)
    };
    let lora = adapter.map(|(a, b, scale)| {
        let rank = a.len() / shape[1].max(1);
        Lora {
            a: Param::from_tensor(tensor(a, [rank, shape[1]])),
            b: Param::from_tensor(tensor(b, [shape[0], rank])),
            scale,
            dropout: 0.0,
        }
    });
    let linear = Linear {
        weight: Param::from_tensor(weight),
        bias: None,
        lora,
        nf4,
        bf16: false,
        weight_t: None,
    };
    tensor_f32(linear.merged_weight())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_names_parse_and_others_do_not() {
        assert_eq!(
            projection_of("model.layers.3.mlp.down_proj.weight"),
            Some((3, LoraTarget::DownProj))
        );
        assert_eq!(
            projection_of("model.layers.0.self_attn.q_proj.weight"),
            Some((0, LoraTarget::QProj))
        );
        assert_eq!(projection_of("model.layers.0.self_attn.q_proj.bias"), None);
        assert_eq!(projection_of("model.layers.0.mlp.q_proj.weight"), None);
        assert_eq!(projection_of("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(projection_of("model.embed_tokens.weight"), None);
    }

    #[test]
    fn model_tensors_are_the_parameters_of_a_model_in_order() {
        use super::super::weights::for_each_param;
        use super::super::{Arch, init};
        for (arch, tied, qkv_bias, o_bias) in [
            (Arch::Llama, false, false, false),
            (Arch::Llama, true, true, true),
            (Arch::Qwen2, true, true, false),
        ] {
            let cfg = ModelConfig {
                arch,
                vocab_size: 40,
                hidden_size: 16,
                intermediate_size: 24,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 4,
                max_positions: 32,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                tie_word_embeddings: tied,
                qkv_bias,
                o_bias,
            };
            let model = init::<Flex>(&cfg, 1, &FlexDevice);
            let mut params = Vec::new();
            for_each_param(&model, |name, shape, _| {
                params.push(CheckpointTensor::new(name, shape))
            });
            assert_eq!(model_tensors(&cfg), params, "{cfg:?}");
        }
    }
}
