//! The stage kinds: `model`, `train.cpt`, `train.sft`, `merge`.

use std::collections::BTreeMap;

use burn::backend::flex::{Flex, FlexDevice};
use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, DatasetFamily, FieldProblem, FileInput, Input,
    ManifestPath, OutputDecl, RunContext, Sensitivity, Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::trainer::{Trainer, TrainerStage};
use super::{Fit, Prepared, TrainError, TrainerParams, fit, tokenizer_dir, trainer_params};
use crate::data::input_records;
use crate::data::records::{ChatRecord, TextRecord};
use crate::model::{self, Arch, ModelConfig, SizePreset};
use crate::text::train_tokenizer::survives_qwen2_rebuild;
use crate::text::{self, ChatTemplate, CptPacking, Encoded, TemplateSpec, TextTokenizer};

fn texts(cx: &RunContext, field: &str) -> Result<Vec<TextRecord>, StageError> {
    input_records(cx, field)
}

fn chats(cx: &RunContext, field: &str) -> Result<Vec<ChatRecord>, StageError> {
    input_records(cx, field)
}

fn model_tokenizer(cx: &RunContext) -> Result<TextTokenizer, StageError> {
    let dir = tokenizer_dir(&cx.input("model")?.dir);
    Ok(TextTokenizer::from_dir(&dir)?)
}

// ---------------------------------------------------------------------------------------------
// train.cpt

trainer_params! {
    /// Parameters of `train.cpt`: continued pretraining on raw text, packed into `seq_len` blocks.
    pub struct CptParams {
        /// How documents share a block: `documents` (default: the stream is cut into `seq_len`
        /// blocks, and within a block each document is its own segment, attending only to
        /// itself with positions restarting at 0; a document continued from the previous block
        /// starts again at position 0) or `wrapped` (each block one sequence attending across
        /// documents, positions 0…seq_len−1: standard for some pretraining setups).
        /// `eval_data` is scored one document at a time either way.
        #[serde(default)]
        pub packing: CptPacking,
    }
}

/// `train.cpt`: next-token loss on every token of packed raw text (but each document's first
/// with `packing: documents`).
pub struct Cpt;
pub type CptStage = TrainerStage<Cpt>;

impl Trainer for Cpt {
    const KIND: &'static str = "train.cpt";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "Continued pretraining on raw text (packed blocks), full or LoRA";
    const DATA: &'static [DatasetFamily] = &[DatasetFamily::Text];
    type Params = CptParams;

    fn run(p: &CptParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let c = p.common();
        let tok = model_tokenizer(cx)?;
        let train = text::encode_cpt(&tok, &texts(cx, "data")?, c.seq_len, p.packing)?;
        // Held-out text: each document scored on its own, in rolling windows when long.
        let eval = match c.eval_data {
            Some(_) => Some(text::encode_documents(
                &tok,
                &texts(cx, "eval_data")?,
                c.seq_len,
            )?),
            None => None,
        };
        fit(Fit::lm(c, prepared(train, eval), &tok, cx))
    }
}

fn prepared(train: Encoded, eval: Option<Encoded>) -> Prepared {
    Prepared {
        truncated: train.truncated,
        tokens: train.tokens,
        train: train.examples,
        eval: eval.map(|e| e.examples),
    }
}

// ---------------------------------------------------------------------------------------------
// train.sft

trainer_params! {
    /// Parameters of `train.sft`: supervised fine-tuning on instructions or conversations.
    pub struct SftParams {
        /// Chat template: `auto` (the checkpoint's, else chatml), `checkpoint`, `chatml`,
        /// `llama3` or `alpaca`.
        #[serde(default)]
        pub chat_template: TemplateSpec,
        /// Also train on system/user tokens. By default only assistant replies and their
        /// end-of-turn token are targets: TRL's `assistant_only_loss` also trains the
        /// template's newlines around them, and TRL's default trains every token (this
        /// option, but for the first token, which nothing predicts).
        #[serde(default)]
        pub train_on_prompt: bool,
        /// Pack examples into rows of up to `seq_len` tokens by best-fit decreasing (TRL's
        /// `bfd`): an example is never split across rows (one longer than `seq_len` is
        /// truncated, and counted), and each is its own document in its row, attending only to
        /// itself with positions restarting at 0, so it trains as it would alone.
        #[serde(default)]
        pub packing: bool,
        /// With `packing`, pack `eval_data` the same way (by default it is scored one example
        /// per row; the loss is the same up to float rounding, packing only saves padding).
        #[serde(default)]
        pub eval_packing: bool,
    }
}

/// `train.sft`: loss on assistant tokens of rendered conversations.
pub struct Sft;
pub type SftStage = TrainerStage<Sft>;

impl Trainer for Sft {
    const KIND: &'static str = "train.sft";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "Supervised fine-tuning on instructions or chats (alpaca, prompt_completion, chat, sharegpt), full or LoRA";
    const DATA: &'static [DatasetFamily] = &[DatasetFamily::Chat];
    type Params = SftParams;

    fn run(p: &SftParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let c = p.common();
        let tok = model_tokenizer(cx)?;
        let template = ChatTemplate::resolve(&p.chat_template, &tok)?;
        cx.log(format!(
            "chat template: {}; targets: {}",
            template.name(),
            text::MaskRule::of(&template, p.train_on_prompt).describe()
        ));
        let enc = |records: &[ChatRecord], pack: bool| {
            text::encode_sft(&tok, &template, records, c.seq_len, p.train_on_prompt, pack)
        };
        let train = enc(&chats(cx, "data")?, p.packing)?;
        let eval = match c.eval_data {
            Some(_) => Some(enc(&chats(cx, "eval_data")?, p.packing && p.eval_packing)?),
            None => None,
        };
        if let Some(e) = &eval {
            let docs: usize = e.examples.iter().map(|x| x.doc_starts.len() + 1).sum();
            cx.log(format!(
                "eval_data: {docs} examples in {} rows",
                e.examples.len()
            ));
        }
        fit(Fit::lm(c, prepared(train, eval), &tok, cx))
    }
}

// ---------------------------------------------------------------------------------------------
// model

/// Explicit dimensions for `init:`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InitDims {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    pub intermediate_size: usize,
    #[serde(default)]
    pub max_positions: Option<usize>,
}

/// `init:` — a size preset or explicit dimensions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum InitSpec {
    Preset(SizePreset),
    Dims(InitDims),
}

/// Parameters of `model`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// A Hugging Face model directory (config.json, model.safetensors or a sharded index,
    /// tokenizer.json), relative to the manifest.
    #[serde(default)]
    pub from: Option<ManifestPath>,
    /// Build a fresh model instead: a size preset (`tiny`, `125m`, `500m`, `1b`) or explicit dims.
    #[serde(default)]
    pub init: Option<InitSpec>,
    /// With `init`: the tokenizer (a `tokenizer.train` stage); its vocabulary sizes the model.
    #[serde(default)]
    pub tokenizer: Option<StageRef>,
    /// With `init`: `llama` (default) or `qwen2`. transformers 5 reads a qwen2 checkpoint's
    /// tokenizer with Qwen2's own pre-tokenizer: the ids are burnish's when the tokenizer was
    /// trained with `pre_tokenizer: qwen2` (the default; a warning is logged otherwise).
    #[serde(default)]
    pub arch: Option<Arch>,
    /// With `init`: tie the output head to the embeddings.
    #[serde(default)]
    pub tie_embeddings: bool,
}

/// `model`: load a checkpoint (checked, then linked into the cache) or initialise one.
pub struct ModelStage;

impl Stage for ModelStage {
    const KIND: &'static str = "model";
    // 2: the output records where its chat template came from (burnish_template.json).
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "A model: a Hugging Face checkpoint directory (`from:`) or a fresh one (`init:` + `tokenizer:`)";
    type Params = ModelParams;

    fn inputs(p: &ModelParams) -> Vec<Input> {
        p.tokenizer
            .iter()
            .map(|t| Input {
                field: "tokenizer".into(),
                reference: t.clone(),
                accepts: Accepts::kind(ArtifactKind::Tokenizer),
            })
            .collect()
    }
    fn files(p: &ModelParams) -> Vec<FileInput> {
        p.from
            .iter()
            .map(|f| FileInput {
                field: "from".into(),
                path: f.clone(),
            })
            .collect()
    }
    fn outputs(_: &ModelParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::Model))]
    }
    fn check(p: &ModelParams) -> Vec<FieldProblem> {
        let mut v = Vec::new();
        match (&p.from, &p.init) {
            (Some(_), Some(_)) => v.push(FieldProblem::new("init", "set either `from` or `init`, not both")),
            (None, None) => v.push(
                FieldProblem::new("from", "a model needs `from` (a checkpoint directory) or `init` (a size preset)")
                    .help("e.g. `from: ../fixtures/models/tiny-llama` or `init: tiny` with `tokenizer: tok`"),
            ),
            (None, Some(_)) if p.tokenizer.is_none() => v.push(
                FieldProblem::new("tokenizer", "`init` needs `tokenizer`: a tokenizer.train stage")
            ),
            (Some(_), None) if p.tokenizer.is_some() || p.arch.is_some() || p.tie_embeddings => v.push(
                FieldProblem::new("from", "`tokenizer`, `arch` and `tie_embeddings` apply only with `init`"),
            ),
            _ => {}
        }
        if let Some(InitSpec::Dims(d)) = &p.init {
            let kv = d.num_kv_heads.unwrap_or(d.num_heads);
            if d.num_heads == 0
                || kv == 0
                || d.num_heads % kv != 0
                || d.hidden_size % d.num_heads != 0
            {
                v.push(FieldProblem::new(
                    "init.num_heads",
                    format!(
                        "hidden_size {} must divide into num_heads {} and num_heads into num_kv_heads {kv}",
                        d.hidden_size, d.num_heads
                    ),
                ));
            }
        }
        v
    }
    fn sensitivity(p: &ModelParams) -> Sensitivity {
        Sensitivity {
            seed: p.init.is_some(),
            backend: false,
            names: false,
        }
    }
    fn run(p: &ModelParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let out = cx.output_dir(None)?.to_path_buf();
        if p.from.is_some() {
            let dir = cx.file("from")?.to_path_buf();
            if model::is_adapter_dir(&dir) {
                return Err(Box::new(TrainError::Input {
                    message: format!(
                        "{}: `from` is an adapter directory; a model stage takes a model",
                        dir.display()
                    ),
                }));
            }
            // Checked as the loader checks it (config, every tensor's name, shape and dtype,
            // the files' lengths) without reading the weights: memory for the headers only.
            let ck = model::Checkpoint::open(&dir)?;
            let tok = TextTokenizer::from_dir(&dir)?;
            model::link_model_dir(&dir, &out)?;
            let from = p.from.as_ref().map_or("", |f| f.0.as_str());
            crate::text::tokenizer::record_template_origin(&tok, &dir, from, &out)?;
            let cfg = &ck.config;
            return Ok(StageOutcome::default()
                .metric("arch", cfg.arch.model_type())
                .metric("params", ck.num_params())
                .metric("vocab_size", tok.vocab_size())
                .metric("layers", cfg.num_layers)
                .metric("hidden_size", cfg.hidden_size));
        }
        let Some(init) = &p.init else {
            return Err(Box::new(TrainError::Input {
                message: "a model needs `from` or `init`".into(),
            }));
        };
        let tok_dir = cx.input("tokenizer")?.dir.clone();
        let tok = TextTokenizer::from_dir(&tok_dir)?;
        let (h, l, nh, nkv, f, maxp) = match init {
            InitSpec::Preset(pr) => {
                let (h, l, nh, nkv, f) = pr.dims();
                (h, l, nh, nkv, f, 2048)
            }
            InitSpec::Dims(d) => (
                d.hidden_size,
                d.num_layers,
                d.num_heads,
                d.num_kv_heads.unwrap_or(d.num_heads),
                d.intermediate_size,
                d.max_positions.unwrap_or(2048),
            ),
        };
        let arch = p.arch.unwrap_or(Arch::Llama);
        if arch == Arch::Qwen2 && !survives_qwen2_rebuild(tok.inner()) {
            cx.log(format!(
                "warning: transformers 5 loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which replaces the pre-tokenizer of {} with Qwen2's, so its ids will differ from burnish's; train the tokenizer with `pre_tokenizer: qwen2` (the default) or use `arch: llama`",
                tok_dir.display()
            ));
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: tok.vocab_size(),
            hidden_size: h,
            intermediate_size: f,
            num_layers: l,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: h / nh,
            max_positions: maxp,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: p.tie_embeddings,
            qkv_bias: arch == Arch::Qwen2,
            o_bias: false,
        };
        cfg.check_fits_in_memory()
            .map_err(|message| TrainError::Input {
                message: format!("`init`: {message}"),
            })?;
        let net = model::init::<Flex>(&cfg, cx.seed(), &FlexDevice);
        let raw = cfg.to_hf_json(tok.bos().map(|b| b.1), tok.eos().map(|e| e.1), tok.pad_id());
        model::save_model_dir(&net, &raw, &tok_dir, &out)?;
        Ok(StageOutcome::default()
            .metric("arch", arch.model_type())
            .metric("params", net.num_params())
            .metric("vocab_size", cfg.vocab_size)
            .metric("layers", l)
            .metric("hidden_size", h))
    }
}

// ---------------------------------------------------------------------------------------------
// merge

/// Parameters of `merge`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeParams {
    /// The Adapter to fold into its base.
    pub model: StageRef,
    /// `as_trained` (default) or `original`: differs only for a QLoRA adapter.
    #[serde(default)]
    pub base: model::BaseChoice,
    /// Split the weights into files of at most this size, with `model.safetensors.index.json`,
    /// as transformers' `save_pretrained(max_shard_size=)` (default "50GB", transformers' own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<model::shard::ShardSize>,
}

/// `merge`: fold a LoRA adapter into its base model (`W + alpha/r · B·A`), giving a Model.
pub struct MergeStage;

impl Stage for MergeStage {
    const KIND: &'static str = "merge";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "Fold a LoRA adapter into its base model";
    type Params = MergeParams;

    fn inputs(p: &MergeParams) -> Vec<Input> {
        vec![Input {
            field: "model".into(),
            reference: p.model.clone(),
            accepts: Accepts::kind(ArtifactKind::Adapter),
        }]
    }
    fn outputs(_: &MergeParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::Model))]
    }
    fn sensitivity(_: &MergeParams) -> Sensitivity {
        Sensitivity {
            seed: false,
            backend: false,
            names: false,
        }
    }
    fn run(p: &MergeParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let dir = cx.input("model")?.dir.clone();
        // Read, merged and written one tensor at a time: memory for a tensor, not the model.
        let ck = model::Checkpoint::open_with(&dir, p.base)?;
        let base = match ck.base_quant {
            Some(q) => {
                cx.log(format!(
                    "merging into the {} base the adapter trained on (`base: original` merges into the unquantized weights)",
                    q.name()
                ));
                q.name()
            }
            None => "f32",
        };
        let out = cx.output_dir(None)?.to_path_buf();
        let max_shard = p
            .max_shard_size
            .as_ref()
            .map_or(model::shard::DEFAULT_SHARD_BYTES, |s| s.bytes());
        model::save_checkpoint_dir(&ck, &out, max_shard)?;
        Ok(StageOutcome::default()
            .metric("merged_adapter_params", ck.adapter_params())
            .metric("base", base)
            .metric("params", ck.num_params()))
    }
}
