//! Hugging Face directories out: a Model as `config.json` + `model.safetensors` + tokenizer files
//! (what `transformers.AutoModelForCausalLM.from_pretrained` reads), an Adapter as a PEFT
//! directory (`adapter_config.json` + `adapter_model.safetensors`, PEFT's key names, the base
//! model in `base/` as the trainers write it), or an Adapter merged into a Model.
//!
//! Everything is checked as the model loader checks it first, so a directory that would not
//! load in burnish is refused rather than copied. A Model, or an Adapter merged, is written one
//! tensor at a time ([`model::save_checkpoint_dir`]): memory for a tensor, not the model.

use std::path::Path;

use burn::backend::flex::{Flex, FlexDevice};

use super::ExportError;
use crate::model::{self, lora};

/// What [`export_hf`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfKind {
    /// A full model directory (from a Model, or an Adapter merged into its base).
    Model,
    /// A PEFT adapter directory with its base in `base/`.
    Adapter,
}

/// What [`export_hf`] wrote, with its counts.
#[derive(Clone, Copy, Debug)]
pub struct HfSummary {
    pub kind: HfKind,
    /// Parameters of the (merged or base) model.
    pub params: usize,
    /// Adapter parameters (0 for a model).
    pub adapter_params: usize,
}

/// Export the Model or Adapter artifact in `dir` into `out`: an adapter stays an adapter unless
/// `merge`; a model's weights are split into shards of at most `max_shard_bytes`.
pub fn export_hf(
    dir: &Path,
    merge: bool,
    max_shard_bytes: u64,
    out: &Path,
) -> Result<HfSummary, ExportError> {
    // An adapter exported as an adapter keeps its f32 base and its record of the base's
    // quantization; a merged export folds it into the base as it trained (NF4 for QLoRA).
    if merge || !model::is_adapter_dir(dir) {
        let ck = model::Checkpoint::open_with(dir, model::BaseChoice::AsTrained)?;
        model::save_checkpoint_dir(&ck, out, max_shard_bytes)?;
        return Ok(HfSummary {
            kind: HfKind::Model,
            params: ck.num_params(),
            adapter_params: ck.adapter_params(),
        });
    }
    let loaded = model::load_with::<Flex>(dir, model::BaseChoice::Original, &FlexDevice)?;
    let adapter_params = lora::adapter_param_count(&loaded.model);
    match &loaded.adapter {
        Some(params) => {
            std::fs::create_dir_all(out).map_err(|e| ExportError::io(out, e))?;
            lora::write_adapter(&loaded.model, params, model::ADAPTER_BASE_DIR, out)?;
            lora::write_base_quant(out, lora::read_base_quant(dir)?)?;
            model::link_model_dir(&loaded.model_dir, &out.join(model::ADAPTER_BASE_DIR))?;
            Ok(HfSummary {
                kind: HfKind::Adapter,
                params: loaded.model.num_params() - adapter_params,
                adapter_params,
            })
        }
        None => Err(ExportError::Convert {
            message: format!("{}: not an adapter directory", dir.display()),
        }),
    }
}
