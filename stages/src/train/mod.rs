//! Trainers (`train.cpt`, `train.sft`) and the stages around them (`model`, `merge`).
//!
//! Every trainer shares [`looper::train`] and the parameters [`trainer_params!`] declares; a
//! trainer only decides how its records become [`Example`]s.

pub mod batch;
pub mod error;
pub mod looper;
pub mod optim;
pub mod stages;
pub mod trainer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, FieldProblem, Input, OutputDecl, RunContext, StageOutcome,
    StageRef,
};

pub use error::TrainError;
pub use looper::{LanguageModeling, LogLine, LoopSpec, Objective, Rollout};
pub use optim::{AdamW, Schedule};

use crate::backend::{BackendTask, dispatch};
use crate::model::{self, LoraParams, lora};
use crate::text::{Example, TextTokenizer};

/// Register `model`, `train.cpt`, `train.sft` and `merge`.
pub fn register_train(reg: &mut burnish_engine::stage::Registry) {
    reg.register::<stages::ModelStage>()
        .register::<stages::CptStage>()
        .register::<stages::SftStage>()
        .register::<stages::MergeStage>();
}

pub(crate) fn d_batch() -> usize {
    4
}
pub(crate) fn d_one() -> usize {
    1
}
pub(crate) fn d_lr() -> f64 {
    2e-4
}
pub(crate) fn d_beta1() -> f64 {
    0.9
}
pub(crate) fn d_beta2() -> f64 {
    0.999
}
pub(crate) fn d_eps() -> f64 {
    1e-8
}
pub(crate) fn d_clip() -> Option<f64> {
    Some(1.0)
}
pub(crate) fn d_seq() -> usize {
    256
}
pub(crate) fn d_ckpt() -> usize {
    50
}

/// The parameters every trainer has, then the trainer's own.
macro_rules! trainer_params {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// The model to train: a Model, or an Adapter (whose adapter keeps training).
            pub model: burnish_engine::stage::StageRef,
            /// Training data.
            pub data: burnish_engine::stage::StageRef,
            /// Held-out data, scored every `eval_every` steps and at the end.
            #[serde(default)]
            pub eval_data: Option<burnish_engine::stage::StageRef>,
            /// Train LoRA adapters (base frozen) instead of every weight.
            #[serde(default)]
            pub lora: Option<$crate::model::LoraParams>,
            /// QLoRA: LoRA adapters over a frozen base stored as NF4 (block 64, double-quantized
            /// scales) and dequantized on the fly; the same as `lora:` with `quantize_base: nf4`.
            #[serde(default)]
            pub qlora: Option<$crate::model::LoraParams>,
            /// `nf4`: store the frozen base as NF4 while training `lora:` adapters.
            #[serde(default)]
            pub quantize_base: Option<$crate::train::BaseQuant>,
            /// Compute precision: `auto` (bf16 on cuda, f32 elsewhere), `f32`, or `bf16` (matrix
            /// products in bf16; weights, optimizer state, norms and the loss stay f32).
            #[serde(default)]
            pub dtype: $crate::train::ComputeDType,
            /// Optimizer steps (exclusive with `epochs`).
            #[serde(default)]
            pub steps: Option<usize>,
            /// Passes over the data (default 1 when `steps` is absent).
            #[serde(default)]
            pub epochs: Option<f64>,
            /// Examples per micro-batch.
            #[serde(default = "crate::train::d_batch")]
            pub batch_size: usize,
            /// Micro-batches per optimizer step.
            #[serde(default = "crate::train::d_one")]
            pub grad_accum: usize,
            /// Peak learning rate.
            #[serde(default = "crate::train::d_lr")]
            pub lr: f64,
            /// Decay after warmup: constant, linear (default) or cosine, to 0 at the last step.
            #[serde(default)]
            pub schedule: $crate::train::Schedule,
            /// Linear warmup steps from 0 to `lr`.
            #[serde(default)]
            pub warmup_steps: usize,
            /// AdamW decoupled weight decay.
            #[serde(default)]
            pub weight_decay: f64,
            /// AdamW β1.
            #[serde(default = "crate::train::d_beta1")]
            pub beta1: f64,
            /// AdamW β2.
            #[serde(default = "crate::train::d_beta2")]
            pub beta2: f64,
            /// AdamW ε.
            #[serde(default = "crate::train::d_eps")]
            pub adam_eps: f64,
            /// Clip gradients to this global L2 norm (`null`: no clipping).
            #[serde(default = "crate::train::d_clip")]
            pub max_grad_norm: Option<f64>,
            /// Tokens per sequence; longer examples are truncated (and counted).
            #[serde(default = "crate::train::d_seq")]
            pub seq_len: usize,
            /// Write a resumable checkpoint every this many steps (0: never).
            #[serde(default = "crate::train::d_ckpt")]
            pub checkpoint_every: usize,
            /// Score `eval_data` every this many steps.
            #[serde(default)]
            pub eval_every: Option<usize>,
            /// Shuffle/dropout/adapter-init seed; when absent, the pipeline seed.
            #[serde(default)]
            pub seed: Option<u64>,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $crate::train::TrainerParams for $name {
            fn common(&self) -> $crate::train::Common {
                $crate::train::Common {
                    model: self.model.clone(),
                    data: self.data.clone(),
                    eval_data: self.eval_data.clone(),
                    lora: self.lora.clone().or_else(|| self.qlora.clone()),
                    qlora_field: self.qlora.is_some(),
                    lora_field: self.lora.is_some(),
                    quantize_base: self.qlora.is_some() || self.quantize_base.is_some(),
                    dtype: self.dtype,
                    steps: self.steps,
                    epochs: self.epochs,
                    batch_size: self.batch_size,
                    grad_accum: self.grad_accum,
                    lr: self.lr,
                    schedule: self.schedule,
                    warmup_steps: self.warmup_steps,
                    adamw: $crate::train::AdamW {
                        beta1: self.beta1,
                        beta2: self.beta2,
                        eps: self.adam_eps,
                        weight_decay: self.weight_decay,
                    },
                    max_grad_norm: self.max_grad_norm,
                    seq_len: self.seq_len,
                    checkpoint_every: self.checkpoint_every,
                    eval_every: self.eval_every,
                    seed: self.seed,
                }
            }
        }
    };
}
pub(crate) use trainer_params;

/// How a frozen base is stored while adapters train.
pub use crate::model::BaseQuant;

/// Compute precision of a trainer.
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
pub enum ComputeDType {
    /// bf16 on backends with fast bf16 matrix units (cuda), f32 elsewhere.
    #[default]
    Auto,
    F32,
    Bf16,
}

impl ComputeDType {
    /// Whether to compute in bf16 on `backend` (the resolved backend name); an error where
    /// bf16 was asked for and the backend cannot compute in it ([`crate::backend::has_bf16`]).
    pub fn bf16_on(self, backend: &str) -> Result<bool, TrainError> {
        match self {
            ComputeDType::Auto => Ok(backend == "cuda"),
            ComputeDType::F32 => Ok(false),
            ComputeDType::Bf16 if !crate::backend::has_bf16(backend) => {
                Err(TrainError::Bf16Unsupported {
                    backend: backend.to_owned(),
                })
            }
            ComputeDType::Bf16 => Ok(true),
        }
    }
}

/// The shared trainer parameters as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct Common {
    pub model: StageRef,
    pub data: StageRef,
    pub eval_data: Option<StageRef>,
    /// The adapter settings, from `lora:` or `qlora:`.
    pub lora: Option<LoraParams>,
    pub lora_field: bool,
    pub qlora_field: bool,
    /// Store the frozen base as NF4.
    pub quantize_base: bool,
    pub dtype: ComputeDType,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub adamw: AdamW,
    pub max_grad_norm: Option<f64>,
    pub seq_len: usize,
    pub checkpoint_every: usize,
    pub eval_every: Option<usize>,
    pub seed: Option<u64>,
}

pub trait TrainerParams {
    fn common(&self) -> Common;
}

/// The inputs every trainer declares.
pub(crate) fn trainer_inputs(c: &Common, data: Accepts) -> Vec<Input> {
    let mut v = vec![
        Input {
            field: "model".into(),
            reference: c.model.clone(),
            accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
        },
        Input {
            field: "data".into(),
            reference: c.data.clone(),
            accepts: data.clone(),
        },
    ];
    if let Some(e) = &c.eval_data {
        v.push(Input {
            field: "eval_data".into(),
            reference: e.clone(),
            accepts: data,
        });
    }
    v
}

/// A trainer yields an Adapter when it trains adapters (its own `lora:`, or an Adapter
/// upstream without `lora:`), else a Model.
pub(crate) fn trainer_outputs(
    c: &Common,
    inputs: &BTreeMap<String, ArtifactType>,
) -> Vec<OutputDecl> {
    let upstream_adapter = inputs
        .get("model")
        .is_some_and(|t| t.kind == ArtifactKind::Adapter);
    let kind = if c.lora.is_some() || upstream_adapter {
        ArtifactKind::Adapter
    } else {
        ArtifactKind::Model
    };
    vec![OutputDecl::main(ArtifactType::of(kind))]
}

/// Range checks shared by every trainer.
pub(crate) fn trainer_check(c: &Common) -> Vec<FieldProblem> {
    let mut p = Vec::new();
    if c.lora_field && c.qlora_field {
        p.push(
            FieldProblem::new("qlora", "set either `lora` or `qlora`, not both")
                .help("`qlora:` is `lora:` with the base stored as NF4"),
        );
    }
    if c.quantize_base && !c.lora_field && !c.qlora_field {
        p.push(
            FieldProblem::new(
                "quantize_base",
                "`quantize_base` needs `lora:` adapters to train",
            )
            .help("a quantized base is frozen; add `lora: {rank: 16}` or use `qlora:`"),
        );
    }
    if c.steps.is_some() && c.epochs.is_some() {
        p.push(
            FieldProblem::new("epochs", "set either `steps` or `epochs`, not both")
                .help("`steps` counts optimizer steps; `epochs` counts passes over the data"),
        );
    }
    if c.steps == Some(0) {
        p.push(FieldProblem::new(
            "steps",
            "steps must be at least 1, found 0",
        ));
    }
    if let Some(e) = c.epochs
        && !(e.is_finite() && e > 0.0)
    {
        p.push(FieldProblem::new(
            "epochs",
            format!("epochs must be > 0, found {e}"),
        ));
    }
    if c.batch_size == 0 {
        p.push(FieldProblem::new(
            "batch_size",
            "batch_size must be at least 1, found 0",
        ));
    }
    if c.grad_accum == 0 {
        p.push(FieldProblem::new(
            "grad_accum",
            "grad_accum must be at least 1, found 0",
        ));
    }
    if !(c.lr.is_finite() && c.lr > 0.0) {
        p.push(FieldProblem::new(
            "lr",
            format!("lr must be > 0, found {}", c.lr),
        ));
    }
    for (field, v) in [("beta1", c.adamw.beta1), ("beta2", c.adamw.beta2)] {
        if !(0.0..1.0).contains(&v) {
            p.push(FieldProblem::new(
                field,
                format!("{field} must be in [0, 1), found {v}"),
            ));
        }
    }
    if !(c.adamw.eps.is_finite() && c.adamw.eps > 0.0) {
        p.push(FieldProblem::new(
            "adam_eps",
            format!("adam_eps must be > 0, found {}", c.adamw.eps),
        ));
    }
    if !(c.adamw.weight_decay.is_finite() && c.adamw.weight_decay >= 0.0) {
        p.push(FieldProblem::new(
            "weight_decay",
            format!("weight_decay must be ≥ 0, found {}", c.adamw.weight_decay),
        ));
    }
    if let Some(g) = c.max_grad_norm
        && !(g.is_finite() && g > 0.0)
    {
        p.push(FieldProblem::new(
            "max_grad_norm",
            format!("max_grad_norm must be > 0, found {g}"),
        ));
    }
    if c.seq_len < 2 {
        p.push(FieldProblem::new(
            "seq_len",
            format!("seq_len must be at least 2, found {}", c.seq_len),
        ));
    }
    if let (Some(steps), w) = (c.steps, c.warmup_steps)
        && w >= steps
    {
        p.push(FieldProblem::new(
            "warmup_steps",
            format!("warmup_steps {w} must be less than steps {steps}"),
        ));
    }
    if c.eval_every.is_some() && c.eval_data.is_none() {
        p.push(FieldProblem::new(
            "eval_every",
            "eval_every needs `eval_data`",
        ));
    }
    let lf = if c.qlora_field && !c.lora_field {
        "qlora"
    } else {
        "lora"
    };
    if let Some(l) = &c.lora {
        if l.rank == 0 {
            p.push(FieldProblem::new(
                format!("{lf}.rank"),
                format!("{lf}.rank must be at least 1, found 0"),
            ));
        }
        if l.targets.is_empty() {
            p.push(
                FieldProblem::new(format!("{lf}.targets"), format!("{lf}.targets is empty"))
                    .help("e.g. [q_proj, k_proj, v_proj, o_proj]"),
            );
        }
        if !(0.0..1.0).contains(&l.dropout) {
            p.push(FieldProblem::new(
                format!("{lf}.dropout"),
                format!("{lf}.dropout must be in [0, 1), found {}", l.dropout),
            ));
        }
        if let Some(a) = l.alpha
            && !(a.is_finite() && a > 0.0)
        {
            p.push(FieldProblem::new(
                format!("{lf}.alpha"),
                format!("{lf}.alpha must be > 0, found {a}"),
            ));
        }
    }
    p
}

/// Where a Model or Adapter artifact keeps its tokenizer files.
pub fn tokenizer_dir(artifact: &Path) -> PathBuf {
    if model::is_adapter_dir(artifact) {
        artifact.join(model::ADAPTER_BASE_DIR)
    } else {
        artifact.to_path_buf()
    }
}

/// Tokenized training (and eval) data, ready for the loop.
pub struct Prepared {
    pub train: Vec<Example>,
    pub eval: Option<Vec<Example>>,
    pub truncated: usize,
    pub tokens: usize,
}

/// Load the model, set up adapters, run the loop, write the output. Generic over the backend.
pub(crate) struct Fit<'a, O: Objective> {
    pub common: Common,
    pub objective: O,
    pub train: Vec<O::Item>,
    pub eval: Option<Vec<O::Item>>,
    /// Tokens in the training data and records truncated (for the log and metrics).
    pub tokens: usize,
    pub truncated: usize,
    /// Turn adapter dropout off while training (preference and RL trainers, as TRL's
    /// `disable_dropout`), so the policy's log-probs are as deterministic as the reference's.
    pub disable_dropout: bool,
    pub cx: &'a mut RunContext,
}

impl<'a> Fit<'a, LanguageModeling> {
    /// Next-token training on tokenized examples (CPT, SFT).
    pub fn lm(
        common: Common,
        data: Prepared,
        tokenizer: &TextTokenizer,
        cx: &'a mut RunContext,
    ) -> Self {
        Fit {
            common,
            objective: LanguageModeling {
                pad_id: pad_id(tokenizer),
            },
            train: data.train,
            eval: data.eval,
            tokens: data.tokens,
            truncated: data.truncated,
            disable_dropout: false,
            cx,
        }
    }
}

/// The id batches are padded with: the tokenizer's pad, else its eos, else 0.
pub fn pad_id(tok: &TextTokenizer) -> u32 {
    tok.pad_id().or(tok.eos().map(|e| e.1)).unwrap_or(0)
}

impl<O: Objective> BackendTask for Fit<'_, O> {
    type Output = Result<StageOutcome, TrainError>;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let Fit {
            common: c,
            objective,
            mut train,
            mut eval,
            tokens,
            truncated,
            disable_dropout,
            cx,
        } = self;
        let seed = c.seed.unwrap_or(cx.seed());
        let upstream = input_dir(cx, "model")?;
        let loaded = model::load::<B>(&upstream, &device)?;
        let base_dir = loaded.model_dir.clone();
        let raw_config = loaded.raw_config.clone();
        let (net, start) = start_policy(&c, loaded, seed, disable_dropout, cx)?;
        let mut reference = None;
        if objective.needs_reference() {
            let r = reference_model(&net, &start, cx, &device)?;
            objective.prepare(&r, &mut train, c.batch_size);
            if let Some(e) = eval.as_mut() {
                objective.prepare(&r, e, c.batch_size);
            }
            // Only rollouts score against the reference while training; otherwise it goes now,
            // so it does not keep the starting weights alive.
            if objective.steps_per_rollout() > 0 {
                reference = Some(r);
            }
        }
        let steps = match (c.steps, c.epochs) {
            (Some(s), _) => s,
            (None, e) => {
                looper::steps_for_epochs(train.len(), c.batch_size, c.grad_accum, e.unwrap_or(1.0))
            }
        };
        let trainable = net.num_params_where(|_| true) - frozen_count(&net);
        let total_params = net.config.num_params() + lora::adapter_param_count(&net);
        cx.log(format!(
            "training {trainable} of {total_params} parameters for {steps} steps on {} examples ({} tokens, {} truncated)",
            train.len(), tokens, truncated
        ));
        let spec = LoopSpec {
            steps,
            batch_size: c.batch_size,
            grad_accum: c.grad_accum,
            lr: c.lr,
            schedule: c.schedule,
            warmup_steps: c.warmup_steps,
            adamw: c.adamw,
            max_grad_norm: c.max_grad_norm,
            checkpoint_every: c.checkpoint_every,
            eval_every: c.eval_every,
            seed,
            // `train_with` pads through the objective; only `looper::train` reads this.
            pad_id: 0,
        };
        // The loop takes the net by value: nothing else keeps the starting weights alive while
        // it trains (a full fine-tune would otherwise hold a second copy of every weight).
        let result = looper::train_with(
            net,
            &objective,
            &train,
            eval.as_deref(),
            reference.as_ref(),
            &spec,
            cx,
        )?;
        let out = cx
            .output_dir(None)
            .map_err(|e| TrainError::Input {
                message: e.to_string(),
            })?
            .to_path_buf();
        write_trained(&result, &start, &raw_config, &base_dir, &out)?;
        let mut outcome = StageOutcome::default()
            .metric("steps", steps)
            .metric("examples", train.len())
            .metric("tokens", tokens)
            .metric("truncated", truncated)
            .metric("trainable_params", trainable)
            .metric("total_params", total_params);
        if objective.needs_reference() {
            outcome = outcome
                .metric("reference", reference_origin(cx))
                .metric("reference_precision", start.precision());
        }
        Ok(report(
            outcome,
            &result,
            &start,
            objective.reports_perplexity(),
            cx,
        ))
    }
}

/// The directory of the input artifact `field`.
fn input_dir(cx: &RunContext, field: &str) -> Result<PathBuf, TrainError> {
    cx.input(field)
        .map(|a| a.dir.clone())
        .map_err(|e| TrainError::Input {
            message: e.to_string(),
        })
}

/// How the policy starts training, beside its weights: what trains, how the frozen base is
/// stored, and the compute dtype.
pub(crate) struct Start {
    /// The adapter being trained (written to the output), when adapters train.
    pub lora: Option<LoraParams>,
    /// How the frozen base is stored (recorded in an output adapter).
    pub base_quant: Option<model::BaseQuant>,
    /// Bits per parameter of a base quantized in this stage.
    pub base_bits: Option<f64>,
    pub bf16: bool,
}

impl Start {
    fn precision(&self) -> String {
        precision(self.base_quant, self.bf16)
    }
}

/// How a model computes: its base's storage and its compute dtype, e.g. `f32`, `bf16`,
/// `nf4/f32`. A reference log-probs artifact must have been computed at the policy's precision.
pub fn precision(base_quant: Option<model::BaseQuant>, bf16: bool) -> String {
    let dtype = if bf16 { "bf16" } else { "f32" };
    match base_quant {
        Some(q) => format!("{}/{dtype}", q.name()),
        None => dtype.to_owned(),
    }
}

/// The precision the Model or Adapter artifact in `dir` computes at, known before loading it:
/// the base quantization an adapter recorded, else NF4 when `quantize_base` asks for it, and
/// the compute dtype.
pub fn precision_of(dir: &Path, quantize_base: bool, bf16: bool) -> Result<String, TrainError> {
    let recorded = lora::read_base_quant(dir)?;
    let quant = recorded.or(quantize_base.then_some(model::BaseQuant::Nf4));
    Ok(precision(quant, bf16))
}

/// Decide what trains. An upstream adapter keeps training when `lora:` is absent or has its rank,
/// alpha and targets (a `dropout` given there applies; a different shape is an error: merge the
/// adapter first); a Model upstream gets fresh adapters with `lora:`, or trains every weight
/// without it. Then the base is quantized (`qlora:`), the compute dtype set, and, with
/// `disable_dropout`, the adapters' dropout turned off for training. Returns the starting net.
fn start_policy<B: AutodiffBackend>(
    c: &Common,
    loaded: model::Loaded<B>,
    seed: u64,
    disable_dropout: bool,
    cx: &mut RunContext,
) -> Result<(model::CausalLm<B>, Start), TrainError> {
    let (net, lora_params) = match (&loaded.adapter, &c.lora) {
        (Some(up), None) => (loaded.model, Some(up.clone())),
        (Some(up), Some(mine)) if same_adapter(up, mine) => {
            if up.dropout != mine.dropout {
                cx.log(format!(
                    "continuing the upstream adapter with lora.dropout {} (it trained with {})",
                    mine.dropout, up.dropout
                ));
            }
            (
                lora::set_dropout(loaded.model, mine.dropout),
                Some(mine.clone()),
            )
        }
        (Some(up), Some(mine)) => {
            return Err(TrainError::Input {
                message: format!(
                    "the upstream adapter has rank {}, alpha {} and targets {:?}, this stage's lora has rank {}, alpha {} and targets {:?}; continue it with the same settings (or leave `lora:` out), or merge it first",
                    up.rank,
                    up.alpha(),
                    names(&up.targets),
                    mine.rank,
                    mine.alpha(),
                    names(&mine.targets)
                ),
            });
        }
        (None, Some(mine)) => (lora::inject(loaded.model, mine, seed), Some(mine.clone())),
        (None, None) => (loaded.model, None),
    };
    if let Some(q) = loaded.base_quant {
        cx.log(format!(
            "the upstream adapter trained on a {} base: continuing on it",
            q.name()
        ));
    }
    let (net, base_quant, base_bits) = match (loaded.base_quant, c.quantize_base) {
        (Some(q), _) => (net, Some(q), None),
        (None, true) => {
            let (net, bits) = lora::quantize_base_nf4(net);
            cx.log(format!(
                "frozen base stored as NF4: {bits:.3} bits per parameter"
            ));
            (net, Some(model::BaseQuant::Nf4), Some(bits))
        }
        (None, false) => (net, None, None),
    };
    let bf16 = c.dtype.bf16_on(cx.backend())?;
    let net = net.set_bf16(bf16);
    cx.log(format!(
        "compute dtype: {}",
        if bf16 { "bf16" } else { "f32" }
    ));
    let net = if disable_dropout {
        lora::set_dropout(net, 0.0)
    } else {
        net
    };
    let start = Start {
        lora: lora_params,
        base_quant,
        base_bits,
        bf16,
    };
    Ok((net, start))
}

/// The frozen reference of a preference or RL objective, without gradients: by default the
/// policy as it starts, `net` (upstream adapter included, same base storage and compute dtype:
/// the same weights, not a copy); with `reference_model:`, that model, loaded as it trained and
/// put in the policy's compute dtype.
fn reference_model<B: AutodiffBackend>(
    net: &model::CausalLm<B>,
    start: &Start,
    cx: &mut RunContext,
    device: &B::Device,
) -> Result<model::CausalLm<B::InnerBackend>, TrainError> {
    if cx.input("reference_model").is_ok() {
        let dir = input_dir(cx, "reference_model")?;
        let loaded = model::load::<B>(&dir, device)?;
        cx.log(format!(
            "reference: the `reference_model` input ({}), in the policy's compute dtype",
            precision(loaded.base_quant, start.bf16)
        ));
        return Ok(loaded.model.set_bf16(start.bf16).valid());
    }
    cx.log(format!(
        "reference: the policy's starting model ({}{}); reference log-probs computed in this stage unless `reference:` gives them",
        if start.lora.is_some() { "base + adapter, " } else { "" },
        start.precision()
    ));
    Ok(net.valid())
}

/// What the `reference` metric says: which model the reference log-probs come from, and
/// whether a `logprobs` artifact gave them.
fn reference_origin(cx: &RunContext) -> String {
    let model = if cx.input("reference_model").is_ok() {
        "reference_model"
    } else {
        "the policy's starting model"
    };
    match cx.input("reference") {
        Ok(_) => format!("{model} (cached log-probs)"),
        Err(_) => model.to_owned(),
    }
}

/// Write the trained model: an Adapter (PEFT layout, the base linked in `base/`, the base's
/// quantization recorded) or a full Model, and the training log.
fn write_trained<B: AutodiffBackend>(
    result: &looper::LoopResult<B>,
    start: &Start,
    raw_config: &serde_json::Value,
    base_dir: &Path,
    out: &Path,
) -> Result<(), TrainError> {
    let valid = result.model.valid();
    match &start.lora {
        Some(lp) => {
            lora::write_adapter(&valid, lp, model::ADAPTER_BASE_DIR, out)?;
            lora::write_base_quant(out, start.base_quant)?;
            model::link_model_dir(base_dir, &out.join(model::ADAPTER_BASE_DIR))?;
        }
        None => model::save_model_dir(&valid, raw_config, base_dir, out)?,
    }
    let mut log = String::new();
    for l in &result.log {
        log.push_str(&serde_json::to_string(l).unwrap_or_default());
        log.push('\n');
    }
    let log_path = out.join("train_log.jsonl");
    std::fs::write(&log_path, log).map_err(|e| TrainError::io(&log_path, e))
}

/// The loop's numbers as stage metrics (first/last loss, held-out scores, the last step's
/// objective metrics), and the closing log line.
fn report<B: AutodiffBackend>(
    mut outcome: StageOutcome,
    result: &looper::LoopResult<B>,
    start: &Start,
    perplexity: bool,
    cx: &mut RunContext,
) -> StageOutcome {
    let first = result.log.first().map(|l| l.loss).unwrap_or(f64::NAN);
    let last = result.log.last().map(|l| l.loss).unwrap_or(f64::NAN);
    outcome = outcome
        .metric("loss_first", round6(first))
        .metric("loss_last", round6(last))
        .metric("dtype", if start.bf16 { "bf16" } else { "f32" });
    if let Some(q) = start.base_quant {
        outcome = outcome.metric("base_quantization", q.name());
    }
    if let Some(bits) = start.base_bits {
        outcome = outcome.metric("base_bits_per_param", round6(bits));
    }
    if let Some((e, metrics)) = &result.final_eval {
        outcome = outcome.metric("eval_loss", round6(*e));
        if perplexity {
            outcome = outcome.metric("eval_perplexity", round6(e.exp()));
        }
        for (k, v) in metrics {
            outcome = outcome.metric(&format!("eval_{k}"), round6(*v));
        }
    }
    if let Some(first) = result.log.first() {
        for (k, v) in &first.extra {
            outcome = outcome.metric(&format!("first_{k}"), round6(*v));
        }
    }
    if let Some(last) = result.log.last() {
        for (k, v) in &last.extra {
            outcome = outcome.metric(k, round6(*v));
        }
    }
    cx.log(format!(
        "done: loss {first:.4} → {last:.4}, {:.0} tokens/s{}",
        result.tokens_per_s,
        result
            .resumed_from
            .map(|s| format!(", resumed at step {s}"))
            .unwrap_or_default()
    ));
    outcome
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn names(t: &[model::LoraTarget]) -> Vec<&'static str> {
    t.iter().map(|t| t.name()).collect()
}

fn same_adapter(a: &LoraParams, b: &LoraParams) -> bool {
    let mut ta = a.targets.clone();
    let mut tb = b.targets.clone();
    ta.sort();
    ta.dedup();
    tb.sort();
    tb.dedup();
    a.rank == b.rank && ta == tb && (a.alpha() - b.alpha()).abs() < 1e-12
}

fn frozen_count<B: burn::tensor::backend::Backend>(m: &model::CausalLm<B>) -> usize {
    let mut n = 0;
    model::weights::for_each_param(m, |_, shape, e| {
        if !e.trainable {
            n += shape.iter().product::<usize>();
        }
    });
    n
}

/// Run a [`Fit`] on the context's backend.
pub(crate) fn fit<O: Objective>(
    fit: Fit<'_, O>,
) -> Result<StageOutcome, burnish_engine::stage::StageError> {
    let backend = fit.cx.backend().to_owned();
    match dispatch(&backend, fit) {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) | Err(e) => Err(Box::new(e)),
    }
}
