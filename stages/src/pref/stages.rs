//! Stage kinds: `logprobs` (the reference log-probs artifact), `train.dpo`, `train.kto`,
//! `train.orpo`.
//!
//! **The reference model** of DPO and KTO (π_ref) is the policy as it starts: the upstream model
//! exactly as the trainer loads it, an upstream adapter included (a LoRA SFT's output is the SFT
//! policy, not its base), its base stored as the policy's (NF4 under QLoRA) and in the policy's
//! compute dtype. So before the first update policy = reference: DPO's loss is log 2 and every
//! reward is 0. (TRL's default with a PEFT model and no `ref_model` switches the adapter off,
//! which makes the reference the model *before* SFT; burnish does not.) `reference_model:`
//! names another anchor; `reference:` gives the same log-probs from a cached `logprobs` stage,
//! which the trainer checks was computed from its reference model, data, template, `seq_len`
//! and precision.
//!
//! **Dropout** is off while these trainers train (`disable_dropout: true`, TRL's default), so the
//! policy's log-probs are not noisier than the reference's; the adapter written keeps its
//! configured `lora.dropout`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, DatasetFamily, FieldProblem, Input, OutputDecl,
    RunContext, Sensitivity, Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::data::{EncodedItems, LabeledItem, LogProb, PairItem, encode_labeled, encode_pairs};
use super::losses::{DpoLoss, kto_balance};
use super::objectives::{
    DpoObjective, KtoObjective, NeedsReference, OrpoNll, OrpoObjective, fill_reference,
};
use crate::backend::{BackendTask, dispatch};
use crate::data::records::{FamilyRecord, LabeledRecord, PreferenceRecord};
use crate::data::{input_records, load_input};
use crate::model::{self, lora};
use crate::text::{ChatTemplate, TemplateSpec, TextError, TextTokenizer};
use crate::train::trainer::{Trainer, TrainerStage};
use crate::train::{
    BaseQuant, ComputeDType, Fit, TrainError, TrainerParams, fit, pad_id, precision_of,
    tokenizer_dir, trainer_params,
};

const LOGPROBS_FILE: &str = "logprobs.jsonl";
const META_FILE: &str = "meta.json";

fn err(message: impl Into<String>) -> StageError {
    Box::new(TrainError::Input {
        message: message.into(),
    })
}

fn model_tokenizer(cx: &RunContext) -> Result<TextTokenizer, StageError> {
    Ok(TextTokenizer::from_dir(&tokenizer_dir(
        &cx.input("model")?.dir,
    ))?)
}

// ---------------------------------------------------------------------------------------------
// logprobs

/// What a LogProbs artifact was computed from; a trainer checks it against its own inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct LogProbsMeta {
    family: DatasetFamily,
    /// Content digests of the data and model artifacts (an Adapter's digest for an adapter).
    data: String,
    model: String,
    /// `model` or `adapter`: an adapter's log-probs are the merged model's.
    #[serde(default)]
    model_kind: String,
    /// How the model computed: base storage and compute dtype ([`precision`]).
    #[serde(default)]
    precision: String,
    chat_template: String,
    seq_len: usize,
    items: usize,
}

/// One line of `logprobs.jsonl`: the record index and the two completions' log-probs (chosen
/// and rejected, or the example and its mismatched companion).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LogProbsLine {
    index: usize,
    a: LogProb,
    b: LogProb,
}

fn default_seq() -> usize {
    256
}
fn default_batch() -> usize {
    8
}

/// Parameters of `logprobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogProbsParams {
    /// The reference model: a Model, or an Adapter (on its base as it trained: the merged
    /// model's log-probs). For a trainer's reference, the trainer's own `model`.
    pub model: StageRef,
    /// Preference pairs (DPO) or labeled examples (KTO).
    pub data: StageRef,
    /// Must match the trainer's.
    #[serde(default)]
    pub chat_template: TemplateSpec,
    /// Must match the trainer's.
    #[serde(default = "default_seq")]
    pub seq_len: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Must match the trainer's: `auto` (bf16 on cuda, f32 elsewhere), `f32` or `bf16`.
    #[serde(default)]
    pub dtype: ComputeDType,
    /// `nf4`: store the base as NF4, to match a trainer that puts fresh `qlora:` adapters on
    /// this model (an adapter trained with QLoRA is put on its NF4 base without it).
    #[serde(default)]
    pub quantize_base: Option<BaseQuant>,
}

/// `logprobs`: the frozen reference model's completion log-probs on a dataset, computed once and
/// cached, so a trainer's `beta` or `lr` can change without recomputing them.
pub struct LogProbsStage;

impl Stage for LogProbsStage {
    const KIND: &'static str = "logprobs";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "Reference completion log-probs for train.dpo / train.kto (`reference:`), cached";
    type Params = LogProbsParams;

    fn inputs(p: &LogProbsParams) -> Vec<Input> {
        vec![
            Input {
                field: "model".into(),
                reference: p.model.clone(),
                accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
            },
            Input {
                field: "data".into(),
                reference: p.data.clone(),
                accepts: Accepts::datasets(&[DatasetFamily::Preference, DatasetFamily::Labeled]),
            },
        ]
    }
    fn outputs(_: &LogProbsParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::LogProbs))]
    }
    fn check(p: &LogProbsParams) -> Vec<FieldProblem> {
        let mut v = Vec::new();
        if p.seq_len < 2 {
            v.push(FieldProblem::new(
                "seq_len",
                format!("seq_len must be at least 2, found {}", p.seq_len),
            ));
        }
        if p.batch_size == 0 {
            v.push(FieldProblem::new(
                "batch_size",
                "batch_size must be at least 1, found 0",
            ));
        }
        v
    }
    fn sensitivity(_: &LogProbsParams) -> Sensitivity {
        Sensitivity {
            seed: false,
            backend: true,
            names: false,
        }
    }
    fn run(p: &LogProbsParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let tok = model_tokenizer(cx)?;
        let template = ChatTemplate::resolve(&p.chat_template, &tok)?;
        let ds = load_input(cx, "data")?;
        let family = ds.family;
        let model_art = cx.input("model")?.clone();
        let data_digest = cx.input("data")?.digest.clone();
        let pad = pad_id(&tok);
        let lines: Vec<LogProbsLine> = match family {
            DatasetFamily::Preference => {
                let mut enc = encode_pairs(
                    &tok,
                    &template,
                    &input_records::<PreferenceRecord>(cx, "data")?,
                    p.seq_len,
                )?;
                let task = Reference {
                    dir: model_art.dir.clone(),
                    batch: p.batch_size,
                    pad,
                    quantize_base: p.quantize_base,
                    bf16: p.dtype.bf16_on(cx.backend())?,
                    items: Items::Pairs(std::mem::take(&mut enc.items)),
                };
                match run_reference(cx, task)? {
                    Items::Pairs(items) => items
                        .iter()
                        .map(|i| {
                            let (a, b) = i.reference.unwrap_or_default();
                            LogProbsLine {
                                index: i.index,
                                a,
                                b,
                            }
                        })
                        .collect(),
                    Items::Labeled(_) => Vec::new(),
                }
            }
            _ => {
                let mut enc = encode_labeled(
                    &tok,
                    &template,
                    &input_records::<LabeledRecord>(cx, "data")?,
                    p.seq_len,
                )?;
                log_same_prompt(cx, enc.same_prompt);
                let task = Reference {
                    dir: model_art.dir.clone(),
                    batch: p.batch_size,
                    pad,
                    quantize_base: p.quantize_base,
                    bf16: p.dtype.bf16_on(cx.backend())?,
                    items: Items::Labeled(std::mem::take(&mut enc.items)),
                };
                match run_reference(cx, task)? {
                    Items::Labeled(items) => items
                        .iter()
                        .map(|i| {
                            let (a, b) = i.reference.unwrap_or_default();
                            LogProbsLine {
                                index: i.index,
                                a,
                                b,
                            }
                        })
                        .collect(),
                    Items::Pairs(_) => Vec::new(),
                }
            }
        };
        let out = cx.output_dir(None)?.to_path_buf();
        let mut text = String::new();
        for l in &lines {
            text.push_str(&serde_json::to_string(l).unwrap_or_default());
            text.push('\n');
        }
        write(&out.join(LOGPROBS_FILE), &text)?;
        let adapter = model::is_adapter_dir(&model_art.dir);
        let precision = precision_of(
            &model_art.dir,
            p.quantize_base.is_some(),
            p.dtype.bf16_on(cx.backend())?,
        )
        .map_err(|e| Box::new(e) as StageError)?;
        let meta = LogProbsMeta {
            family,
            data: data_digest,
            model: model_art.digest.clone(),
            model_kind: if adapter { "adapter" } else { "model" }.to_owned(),
            precision,
            chat_template: template.name().to_owned(),
            seq_len: p.seq_len,
            items: lines.len(),
        };
        write(
            &out.join(META_FILE),
            &(serde_json::to_string_pretty(&meta).unwrap_or_default() + "\n"),
        )?;
        let mean_a = lines.iter().map(|l| l.a.sum).sum::<f64>() / lines.len().max(1) as f64;
        Ok(StageOutcome::default()
            .metric("items", lines.len())
            .metric("model_kind", meta.model_kind.as_str())
            .metric("precision", meta.precision.as_str())
            .metric("mean_logp", (mean_a * 1e6).round() / 1e6))
    }
}

fn write(path: &Path, text: &str) -> Result<(), StageError> {
    std::fs::write(path, text).map_err(|e| Box::new(TrainError::io(path, e)) as StageError)
}

enum Items {
    Pairs(Vec<PairItem>),
    Labeled(Vec<LabeledItem>),
}

struct Reference {
    dir: PathBuf,
    batch: usize,
    pad: u32,
    quantize_base: Option<BaseQuant>,
    bf16: bool,
    items: Items,
}

impl BackendTask for Reference {
    type Output = Result<Items, TrainError>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        // The model as a trainer starting from it computes: an adapter on (on its base as it
        // trained), the base quantized when asked, in the compute dtype.
        let loaded = model::load::<B>(&self.dir, &device)?;
        let net = match (loaded.base_quant, self.quantize_base) {
            (None, Some(BaseQuant::Nf4)) => lora::quantize_base_nf4(loaded.model).0,
            _ => loaded.model,
        };
        let net = net.set_bf16(self.bf16).valid();
        Ok(match self.items {
            Items::Pairs(mut v) => {
                fill_reference(&net, &mut v, self.batch, self.pad);
                Items::Pairs(v)
            }
            Items::Labeled(mut v) => {
                fill_reference(&net, &mut v, self.batch, self.pad);
                Items::Labeled(v)
            }
        })
    }
}

fn run_reference(cx: &RunContext, task: Reference) -> Result<Items, StageError> {
    match dispatch(cx.backend(), task) {
        Ok(Ok(items)) => Ok(items),
        Ok(Err(e)) | Err(e) => Err(Box::new(e)),
    }
}

/// Read a LogProbs artifact for a trainer, checking it was computed from the trainer's own
/// data, reference model (its `reference_model`, else its `model`), template, sequence length
/// and precision.
fn read_reference(
    cx: &RunContext,
    common: &crate::train::Common,
    template: &ChatTemplate,
    seq_len: usize,
) -> Result<BTreeMap<usize, (LogProb, LogProb)>, StageError> {
    let art = cx.input("reference")?;
    let meta_path = art.dir.join(META_FILE);
    let meta: LogProbsMeta = serde_json::from_str(
        &std::fs::read_to_string(&meta_path)
            .map_err(|e| Box::new(TrainError::io(&meta_path, e)) as StageError)?,
    )
    .map_err(|e| err(format!("{}: {e}", meta_path.display())))?;
    let data = &cx.input("data")?.digest;
    let (field, model_art) = match cx.input("reference_model") {
        Ok(a) => ("reference_model", a),
        Err(_) => ("model", cx.input("model")?),
    };
    // The policy's own base may be quantized by this stage (`qlora:`); another reference
    // model is taken as it trained.
    let quantize = field == "model" && common.quantize_base;
    let expected_precision = precision_of(
        &model_art.dir,
        quantize,
        common.dtype.bf16_on(cx.backend())?,
    )
    .map_err(|e| Box::new(e) as StageError)?;
    let mut problems = Vec::new();
    if &meta.data != data {
        problems.push("was computed on different data than this stage's `data`".to_owned());
    }
    if meta.model != model_art.digest {
        problems.push(format!(
            "was computed with a different model than this stage's `{field}`"
        ));
    }
    if meta.precision != expected_precision {
        problems.push(format!(
            "were computed at precision `{}`, this stage's reference computes at `{expected_precision}` (set the logprobs stage's dtype/quantize_base to match)",
            meta.precision
        ));
    }
    if meta.chat_template != template.name() {
        problems.push(format!(
            "used chat template `{}`, this stage uses `{}`",
            meta.chat_template,
            template.name()
        ));
    }
    if meta.seq_len != seq_len {
        problems.push(format!(
            "used seq_len {}, this stage uses {seq_len}",
            meta.seq_len
        ));
    }
    if !problems.is_empty() {
        return Err(err(format!(
            "the `reference` log-probs {}; point the logprobs stage at the same model and data with the same chat_template and seq_len",
            problems.join(", and ")
        )));
    }
    let path = art.dir.join(LOGPROBS_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Box::new(TrainError::io(&path, e)) as StageError)?;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let l: LogProbsLine = serde_json::from_str(line)
            .map_err(|e| err(format!("{}:{}: {e}", path.display(), n + 1)))?;
        out.insert(l.index, (l.a, l.b));
    }
    Ok(out)
}

/// Attach the `reference` input's log-probs to the items, when the stage has one.
fn attach_reference<T: NeedsReference>(
    cx: &RunContext,
    reference: &Option<StageRef>,
    common: &crate::train::Common,
    template: &ChatTemplate,
    items: &mut [T],
) -> Result<(), StageError> {
    if reference.is_some() {
        let refs = read_reference(cx, common, template, common.seq_len)?;
        for item in items.iter_mut() {
            *item.reference_mut() = refs.get(&item.index()).copied();
        }
    }
    Ok(())
}

/// `data` and, when given, `eval_data`, read as `R` records and encoded by `encode`.
type Pair<T> = (EncodedItems<T>, Option<EncodedItems<T>>);

fn encode_inputs<R: FamilyRecord, T>(
    cx: &RunContext,
    eval_data: &Option<StageRef>,
    encode: impl Fn(&[R]) -> Result<EncodedItems<T>, TextError>,
) -> Result<Pair<T>, StageError> {
    let train = encode(&input_records::<R>(cx, "data")?)?;
    let eval = match eval_data {
        Some(_) => Some(encode(&input_records::<R>(cx, "eval_data")?)?),
        None => None,
    };
    Ok((train, eval))
}

/// Say when KTO's KL companions could not avoid the example's own prompt.
fn log_same_prompt(cx: &mut RunContext, same_prompt: usize) {
    if same_prompt > 0 {
        cx.log(format!(
            "{same_prompt} examples' KL companions share their prompt: every record has the same prompt"
        ));
    }
}

/// The `reference` (cached log-probs) and `reference_model` inputs, when given.
fn reference_inputs(reference: &Option<StageRef>, model: &Option<StageRef>) -> Vec<Input> {
    let mut v = Vec::new();
    if let Some(r) = reference {
        v.push(Input {
            field: "reference".into(),
            reference: r.clone(),
            accepts: Accepts::kind(ArtifactKind::LogProbs),
        });
    }
    if let Some(m) = model {
        v.push(Input {
            field: "reference_model".into(),
            reference: m.clone(),
            accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
        });
    }
    v
}

fn yes() -> bool {
    true
}

/// `plan`'s note on a trainer's reference model.
fn reference_notes(
    c: &crate::train::Common,
    reference: &Option<StageRef>,
    reference_model: &Option<StageRef>,
    inputs: &BTreeMap<String, ArtifactType>,
) -> Vec<String> {
    let mut notes = Vec::new();
    let dtype = match c.dtype {
        ComputeDType::Bf16 => ", in bf16",
        ComputeDType::F32 => ", in f32",
        ComputeDType::Auto => "",
    };
    notes.push(match reference_model {
        Some(r) => format!("reference model: `{r}` (reference_model){dtype}"),
        None => {
            let upstream = match inputs.get("model").map(|t| t.kind) {
                Some(ArtifactKind::Adapter) => "with its adapter on",
                _ if c.lora.is_some() => "under fresh adapters (zero at the start)",
                _ => "as loaded",
            };
            let base = if c.quantize_base { ", base as NF4" } else { "" };
            format!(
                "reference model: the policy as it starts: `{}` {upstream}{base}{dtype}",
                c.model
            )
        }
    });
    if let Some(r) = reference {
        notes.push(format!("reference log-probs: cached by `{r}`"));
    }
    notes
}

fn beta_problem(beta: f64) -> Option<FieldProblem> {
    (!(beta.is_finite() && beta > 0.0))
        .then(|| FieldProblem::new("beta", format!("beta must be > 0, found {beta}")))
}

fn default_beta() -> f64 {
    0.1
}
fn one() -> f64 {
    1.0
}

// ---------------------------------------------------------------------------------------------
// train.dpo

trainer_params! {
    /// Parameters of `train.dpo`: direct preference optimization on chosen/rejected pairs.
    pub struct DpoParams {
        /// Cached reference log-probs (a `logprobs` stage on the same model and data); without
        /// it they are computed at the start of this stage.
        #[serde(default)]
        pub reference: Option<StageRef>,
        /// Another reference model than the policy's starting model (a Model or Adapter).
        #[serde(default)]
        pub reference_model: Option<StageRef>,
        /// Turn adapter dropout off while training (TRL's `disable_dropout`, default true).
        #[serde(default = "yes")]
        pub disable_dropout: bool,
        /// Strength of the implicit KL penalty.
        #[serde(default = "default_beta")]
        pub beta: f64,
        /// sigmoid (default), ipo, hinge or robust.
        #[serde(default)]
        pub loss: DpoLoss,
        /// ε for `loss: robust` (in [0, 0.5)).
        #[serde(default)]
        pub label_smoothing: f64,
        #[serde(default)]
        pub chat_template: TemplateSpec,
    }
}

/// `train.dpo`.
pub struct Dpo;
pub type DpoStage = TrainerStage<Dpo>;

impl Trainer for Dpo {
    const KIND: &'static str = "train.dpo";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "Direct preference optimization (sigmoid, ipo, hinge, robust), full or LoRA";
    const DATA: &'static [DatasetFamily] = &[DatasetFamily::Preference];
    type Params = DpoParams;

    fn more_inputs(p: &DpoParams) -> Vec<Input> {
        reference_inputs(&p.reference, &p.reference_model)
    }
    fn notes(p: &DpoParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<String> {
        reference_notes(&p.common(), &p.reference, &p.reference_model, inputs)
    }
    fn check(p: &DpoParams) -> Vec<FieldProblem> {
        let mut v: Vec<FieldProblem> = beta_problem(p.beta).into_iter().collect();
        if !(0.0..0.5).contains(&p.label_smoothing) {
            v.push(FieldProblem::new(
                "label_smoothing",
                format!(
                    "label_smoothing must be in [0, 0.5), found {}",
                    p.label_smoothing
                ),
            ));
        } else if p.label_smoothing > 0.0 && p.loss != DpoLoss::Robust {
            v.push(
                FieldProblem::new(
                    "label_smoothing",
                    "label_smoothing applies only to `loss: robust`",
                )
                .help("set `loss: robust`, or remove label_smoothing"),
            );
        }
        v
    }
    fn run(p: &DpoParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let c = p.common();
        let tok = model_tokenizer(cx)?;
        let template = ChatTemplate::resolve(&p.chat_template, &tok)?;
        let (mut train, eval) = encode_inputs(cx, &c.eval_data, |r: &[PreferenceRecord]| {
            encode_pairs(&tok, &template, r, c.seq_len)
        })?;
        attach_reference(cx, &p.reference, &c, &template, &mut train.items)?;
        let objective = DpoObjective {
            beta: p.beta,
            loss: p.loss,
            label_smoothing: p.label_smoothing,
            pad: pad_id(&tok),
        };
        fit(fit_of(c, objective, train, eval, p.disable_dropout, cx))
    }
}

fn fit_of<'a, O: crate::train::Objective>(
    common: crate::train::Common,
    objective: O,
    train: EncodedItems<O::Item>,
    eval: Option<EncodedItems<O::Item>>,
    disable_dropout: bool,
    cx: &'a mut RunContext,
) -> Fit<'a, O> {
    Fit {
        common,
        objective,
        tokens: train.tokens,
        truncated: train.dropped,
        train: train.items,
        eval: eval.map(|e| e.items),
        disable_dropout,
        cx,
    }
}

// ---------------------------------------------------------------------------------------------
// train.kto

/// `balance:` for KTO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Set desirable/undesirable weights from the label counts (the KTO paper's [1, 4/3] rule).
    Auto,
}

trainer_params! {
    /// Parameters of `train.kto`: Kahneman–Tversky optimization on unpaired labeled examples.
    pub struct KtoParams {
        /// Cached reference log-probs (a `logprobs` stage on the same model and data).
        #[serde(default)]
        pub reference: Option<StageRef>,
        /// Another reference model than the policy's starting model (a Model or Adapter).
        #[serde(default)]
        pub reference_model: Option<StageRef>,
        /// Turn adapter dropout off while training (TRL's `disable_dropout`, default true).
        #[serde(default = "yes")]
        pub disable_dropout: bool,
        #[serde(default = "default_beta")]
        pub beta: f64,
        /// λ_D
        #[serde(default = "one")]
        pub desirable_weight: f64,
        /// λ_U
        #[serde(default = "one")]
        pub undesirable_weight: f64,
        /// `auto`: weights from the label counts (replaces the two weights).
        #[serde(default)]
        pub balance: Option<Balance>,
        #[serde(default)]
        pub chat_template: TemplateSpec,
    }
}

/// `train.kto`.
pub struct Kto;
pub type KtoStage = TrainerStage<Kto>;

impl Trainer for Kto {
    const KIND: &'static str = "train.kto";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "KTO on desirable/undesirable examples (batch KL estimate), full or LoRA";
    const DATA: &'static [DatasetFamily] = &[DatasetFamily::Labeled];
    type Params = KtoParams;

    fn more_inputs(p: &KtoParams) -> Vec<Input> {
        reference_inputs(&p.reference, &p.reference_model)
    }
    fn notes(p: &KtoParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<String> {
        reference_notes(&p.common(), &p.reference, &p.reference_model, inputs)
    }
    fn check(p: &KtoParams) -> Vec<FieldProblem> {
        let mut v: Vec<FieldProblem> = beta_problem(p.beta).into_iter().collect();
        if p.batch_size == 1 {
            v.push(
                FieldProblem::new("batch_size", "train.kto needs batch_size of at least 2, found 1")
                    .help("KTO's KL estimate pairs each prompt with another example's completion in the same batch"),
            );
        }
        for (field, w) in [
            ("desirable_weight", p.desirable_weight),
            ("undesirable_weight", p.undesirable_weight),
        ] {
            if !(w.is_finite() && w > 0.0) {
                v.push(FieldProblem::new(
                    field,
                    format!("{field} must be > 0, found {w}"),
                ));
            }
        }
        if p.balance.is_some() && (p.desirable_weight != 1.0 || p.undesirable_weight != 1.0) {
            v.push(
                FieldProblem::new("balance", "`balance: auto` sets the weights itself")
                    .help("remove desirable_weight/undesirable_weight, or remove balance"),
            );
        }
        v
    }
    fn run(p: &KtoParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let c = p.common();
        let tok = model_tokenizer(cx)?;
        let template = ChatTemplate::resolve(&p.chat_template, &tok)?;
        let (mut train, eval) = encode_inputs(cx, &c.eval_data, |r: &[LabeledRecord]| {
            encode_labeled(&tok, &template, r, c.seq_len)
        })?;
        attach_reference(cx, &p.reference, &c, &template, &mut train.items)?;
        log_same_prompt(cx, train.same_prompt);
        let n_d = train.items.iter().filter(|i| i.desirable).count();
        let n_u = train.items.len() - n_d;
        let (wd, wu) = match p.balance {
            Some(Balance::Auto) => kto_balance(n_d, n_u),
            None => (p.desirable_weight, p.undesirable_weight),
        };
        cx.log(format!(
            "{n_d} desirable, {n_u} undesirable; weights λ_D {wd:.4}, λ_U {wu:.4} (λ_D·n_D / λ_U·n_U = {:.3})",
            wd * n_d as f64 / (wu * n_u.max(1) as f64)
        ));
        let objective = KtoObjective {
            beta: p.beta,
            desirable_weight: wd,
            undesirable_weight: wu,
            pad: pad_id(&tok),
        };
        let mut out = fit(fit_of(c, objective, train, eval, p.disable_dropout, cx))?;
        out.metrics.insert("desirable_weight".into(), wd.into());
        out.metrics.insert("undesirable_weight".into(), wu.into());
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// train.orpo

trainer_params! {
    /// Parameters of `train.orpo`: odds-ratio preference optimization (no reference model).
    pub struct OrpoParams {
        #[serde(default = "default_beta")]
        pub beta: f64,
        /// The NLL term's tokens: `all_tokens` of the chosen sequences, prompt included (TRL's
        /// definition, default), or the chosen `completion` only. Either way one token mean
        /// over the batch.
        #[serde(default)]
        pub nll: OrpoNll,
        /// Turn adapter dropout off while training (TRL's `disable_dropout`, default true).
        #[serde(default = "yes")]
        pub disable_dropout: bool,
        #[serde(default)]
        pub chat_template: TemplateSpec,
    }
}

/// `train.orpo`.
pub struct Orpo;
pub type OrpoStage = TrainerStage<Orpo>;

impl Trainer for Orpo {
    const KIND: &'static str = "train.orpo";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "ORPO: SFT on chosen plus an odds-ratio preference term, no reference model";
    const DATA: &'static [DatasetFamily] = &[DatasetFamily::Preference];
    type Params = OrpoParams;

    fn check(p: &OrpoParams) -> Vec<FieldProblem> {
        beta_problem(p.beta).into_iter().collect()
    }
    fn run(p: &OrpoParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let c = p.common();
        let tok = model_tokenizer(cx)?;
        let template = ChatTemplate::resolve(&p.chat_template, &tok)?;
        let (train, eval) = encode_inputs(cx, &c.eval_data, |r: &[PreferenceRecord]| {
            encode_pairs(&tok, &template, r, c.seq_len)
        })?;
        let objective = OrpoObjective {
            beta: p.beta,
            nll: p.nll,
            pad: pad_id(&tok),
        };
        fit(fit_of(c, objective, train, eval, p.disable_dropout, cx))
    }
}
