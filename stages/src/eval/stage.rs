//! The `eval` stage.
//!
//! Scoring metrics (`perplexity`, `token_accuracy`) read text or chat data with training's
//! masking. Generation metrics (`exact_match`, `pass_at_k`, `mean_reward`, see
//! [`super::generation`]) read any dataset with prompts, as `generate` does, and sample
//! through it: a greedy pass for `exact_match`, `generation.n` samples per prompt for
//! `pass_at_k` (and `mean_reward`, which takes the greedy pass when nothing is sampled). The
//! sampled completions are kept beside the metrics as `samples.jsonl`, one record per
//! completion in `generate`'s shape, for a look at what was scored.

use std::collections::BTreeMap;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, DatasetFamily, FieldProblem, FileInput, Input, OutputDecl,
    RunContext, Sensitivity, Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::generation::mean_pass_at_k;
use crate::backend::{BackendTask, dispatch};
use crate::data::records::{ChatRecord, Record, TextRecord};
use crate::data::{input_records, load_input};
use crate::generate::Sampling;
use crate::generate::stage::{SampleSpec, Sampled, sample, scorers};
use crate::model;
use crate::rl::rewards::{self, Reward, RewardKind, RewardSpec};
use crate::text::{self, ChatTemplate, TemplateSpec, TextTokenizer};
use crate::train::batch::score;
use crate::train::{TrainError, tokenizer_dir};

/// What `eval` can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvalMetric {
    /// exp(mean negative log-likelihood of the target tokens).
    Perplexity,
    /// Fraction of target tokens that are the model's argmax prediction.
    TokenAccuracy,
    /// Share of prompts whose greedy completion is correct (`exact_match`).
    ExactMatch,
    /// HumanEval's unbiased pass@k for each of `generation.k` from `generation.n` samples
    /// (`pass@1`, `pass@8`, …).
    PassAtK,
    /// Mean weighted reward of `generation.rewards` (`mean_reward`, `rewards/<name>/mean`).
    MeanReward,
}

impl EvalMetric {
    fn generates(self) -> bool {
        matches!(
            self,
            EvalMetric::ExactMatch | EvalMetric::PassAtK | EvalMetric::MeanReward
        )
    }
}

fn default_metrics() -> Vec<EvalMetric> {
    vec![EvalMetric::Perplexity, EvalMetric::TokenAccuracy]
}

/// Parameters of `eval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// A Model or an Adapter.
    pub model: StageRef,
    /// For `perplexity` and `token_accuracy`: text (every token scored but each document's
    /// first, each document on its own, one longer than `seq_len` in rolling windows as
    /// lm-evaluation-harness's `loglikelihood_rolling`) or chat/instruction data (assistant
    /// tokens scored, as in SFT, one example per row). For the generation metrics: any
    /// dataset with prompts, as `generate` reads them, with answers for the correctness
    /// reward.
    pub data: StageRef,
    #[serde(default = "default_metrics")]
    pub metrics: Vec<EvalMetric>,
    #[serde(default = "crate::train::d_seq")]
    pub seq_len: usize,
    #[serde(default = "crate::train::d_batch")]
    pub batch_size: usize,
    /// The chat template (as in train.sft and generate).
    #[serde(default)]
    pub chat_template: TemplateSpec,
    /// For chat data: score prompt tokens too.
    #[serde(default)]
    pub train_on_prompt: bool,
    /// How the generation metrics sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<EvalGeneration>,
}

/// How `eval` samples for its generation metrics (the fields of `generate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalGeneration {
    /// New tokens per completion at most.
    #[serde(default = "d_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Samples per prompt for `pass_at_k` and `mean_reward`.
    #[serde(default = "d_n")]
    pub n: usize,
    /// The k of `pass_at_k`, each at most `n`.
    #[serde(default = "d_k")]
    pub k: Vec<usize>,
    /// How the `n` samples are drawn (transformers' `generate` fields); `exact_match` is always
    /// greedy.
    #[serde(default = "d_sampling")]
    pub sampling: Sampling,
    /// A system message put first in message prompts that have none.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Strings that end a completion.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Rows decoded together.
    #[serde(default = "d_gen_batch")]
    pub batch_size: usize,
    /// The reward set of `mean_reward`; its first `exact_answer` also decides correctness for
    /// `exact_match` and `pass_at_k` (else `{kind: exact_answer}`).
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
}

impl Default for EvalGeneration {
    fn default() -> Self {
        EvalGeneration {
            max_new_tokens: d_max_new_tokens(),
            n: d_n(),
            k: d_k(),
            sampling: d_sampling(),
            system_prompt: None,
            stop: Vec::new(),
            batch_size: d_gen_batch(),
            rewards: Vec::new(),
        }
    }
}

fn d_max_new_tokens() -> usize {
    256
}
fn d_n() -> usize {
    1
}
fn d_k() -> Vec<usize> {
    vec![1]
}
fn d_gen_batch() -> usize {
    16
}
/// Sampled at temperature 1 with no filter: the distribution pass@k estimates on.
fn d_sampling() -> Sampling {
    Sampling {
        do_sample: true,
        ..Sampling::default()
    }
}

impl EvalParams {
    fn scores_tokens(&self) -> bool {
        self.metrics.iter().any(|m| !m.generates())
    }
    fn generation(&self) -> EvalGeneration {
        self.generation.clone().unwrap_or_default()
    }
    fn wants(&self, m: EvalMetric) -> bool {
        self.metrics.contains(&m)
    }
    /// Whether a sampled pass runs (`pass_at_k`, or `mean_reward` with sampling on).
    fn samples(&self) -> bool {
        self.wants(EvalMetric::PassAtK)
            || (self.wants(EvalMetric::MeanReward)
                && !self.wants(EvalMetric::ExactMatch)
                && self.generation().sampling.do_sample)
    }
}

/// `eval`: perplexity and token accuracy on a dataset with training's masking; exact match,
/// pass@k and mean reward of the model's completions.
pub struct EvalStage;

impl Stage for EvalStage {
    const KIND: &'static str = "eval";
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "Score a model on a dataset: perplexity, token accuracy, exact match, pass@k, mean reward";
    type Params = EvalParams;

    fn inputs(p: &EvalParams) -> Vec<Input> {
        let data = if p.scores_tokens() {
            Accepts::datasets(&[DatasetFamily::Text, DatasetFamily::Chat])
        } else {
            Accepts::any_dataset()
        };
        vec![
            Input {
                field: "model".into(),
                reference: p.model.clone(),
                accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
            },
            Input {
                field: "data".into(),
                reference: p.data.clone(),
                accepts: data,
            },
        ]
    }
    fn files(p: &EvalParams) -> Vec<FileInput> {
        match &p.generation {
            Some(g) => rewards::files("generation.rewards", &g.rewards),
            None => Vec::new(),
        }
    }
    fn outputs(_: &EvalParams, _: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::of(ArtifactKind::Metrics))]
    }
    fn check(p: &EvalParams) -> Vec<FieldProblem> {
        let mut v = Vec::new();
        if p.metrics.is_empty() {
            v.push(
                FieldProblem::new("metrics", "metrics is empty")
                    .help("e.g. [perplexity, token_accuracy]"),
            );
        }
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
        v.extend(check_generation(p));
        v
    }
    fn sensitivity(p: &EvalParams) -> Sensitivity {
        Sensitivity {
            seed: p.samples(),
            backend: true,
            names: false,
        }
    }
    fn run(p: &EvalParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let mut out = StageOutcome::default();
        if p.scores_tokens() {
            out = score_tokens(p, cx, out)?;
        }
        if p.metrics.iter().any(|m| m.generates()) {
            out = generation_metrics(p, cx, out)?;
        }
        let path = cx.output_dir(None)?.join("metrics.json");
        let text = serde_json::to_string_pretty(&out.metrics).unwrap_or_default() + "\n";
        std::fs::write(&path, text)
            .map_err(|e| Box::new(TrainError::io(&path, e)) as StageError)?;
        Ok(out)
    }
}

fn check_generation(p: &EvalParams) -> Vec<FieldProblem> {
    let mut v = Vec::new();
    let generates = p.metrics.iter().any(|m| m.generates());
    let Some(g) = &p.generation else {
        if p.wants(EvalMetric::MeanReward) {
            v.push(
                FieldProblem::new("metrics", "mean_reward needs `generation.rewards`")
                    .help("add `generation: {rewards: [{kind: exact_answer}]}`"),
            );
        }
        return v;
    };
    if !generates {
        v.push(
            FieldProblem::new("generation", "generation is set but no metric generates")
                .help("add exact_match, pass_at_k or mean_reward to metrics, or remove generation"),
        );
    }
    v.extend(
        g.sampling
            .problems()
            .into_iter()
            .map(|(f, m)| FieldProblem::new(format!("generation.sampling.{f}"), m)),
    );
    for (field, value) in [
        ("n", g.n),
        ("max_new_tokens", g.max_new_tokens),
        ("batch_size", g.batch_size),
    ] {
        if value == 0 {
            v.push(FieldProblem::new(
                format!("generation.{field}"),
                format!("{field} must be at least 1, found 0"),
            ));
        }
    }
    if p.wants(EvalMetric::PassAtK) {
        if g.k.is_empty() {
            v.push(FieldProblem::new("generation.k", "k is empty").help("e.g. k: [1, 8]"));
        }
        for (i, &k) in g.k.iter().enumerate() {
            if k == 0 || k > g.n {
                v.push(
                    FieldProblem::new(
                        format!("generation.k[{i}]"),
                        format!("pass@{k} needs 1 ≤ k ≤ n, and n is {}", g.n),
                    )
                    .help("raise generation.n to the largest k"),
                );
            }
        }
        if g.n > 1 && !g.sampling.do_sample {
            v.push(
                FieldProblem::new(
                    "generation.sampling",
                    format!(
                        "n is {} but decoding is greedy: every sample would be the same",
                        g.n
                    ),
                )
                .help("set `sampling: {do_sample: true}`"),
            );
        }
    }
    if p.wants(EvalMetric::MeanReward) && g.rewards.is_empty() {
        v.push(
            FieldProblem::new("generation.rewards", "mean_reward needs rewards to average")
                .help("e.g. rewards: [{kind: exact_answer}]"),
        );
    }
    v.extend(rewards::check("generation.rewards", &g.rewards));
    for (i, s) in g.stop.iter().enumerate() {
        if s.is_empty() {
            v.push(FieldProblem::new(
                format!("generation.stop[{i}]"),
                "a stop string is empty",
            ));
        }
    }
    v
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn score_tokens(
    p: &EvalParams,
    cx: &mut RunContext,
    mut out: StageOutcome,
) -> Result<StageOutcome, StageError> {
    let dir = cx.input("model")?.dir.clone();
    let tok = TextTokenizer::from_dir(&tokenizer_dir(&dir))?;
    let ds = load_input(cx, "data")?;
    let examples = match ds.family {
        DatasetFamily::Text => {
            let docs: Vec<TextRecord> = input_records(cx, "data")?;
            text::encode_documents(&tok, &docs, p.seq_len)?
        }
        _ => {
            let template = ChatTemplate::resolve(&p.chat_template, &tok)?;
            let chats: Vec<ChatRecord> = input_records(cx, "data")?;
            text::encode_sft(&tok, &template, &chats, p.seq_len, p.train_on_prompt, false)?
        }
    };
    let pad = tok.pad_id().or(tok.eos().map(|e| e.1)).unwrap_or(0);
    let task = Score {
        dir,
        examples: examples.examples,
        batch: p.batch_size,
        pad,
    };
    let s = match dispatch(cx.backend(), task) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) | Err(e) => return Err(Box::new(e)),
    };
    out = out
        .metric("tokens", s.targets)
        .metric("mean_nll", round6(s.mean_nll()));
    for m in &p.metrics {
        out = match m {
            EvalMetric::Perplexity => out.metric("perplexity", round6(s.perplexity())),
            EvalMetric::TokenAccuracy => out.metric("token_accuracy", round6(s.token_accuracy())),
            _ => out,
        };
    }
    Ok(out)
}

/// Where the correctness reward is in `set`, or `None` when the default one is added last.
fn correctness(set: &[Reward]) -> Option<usize> {
    set.iter()
        .position(|r| r.spec.kind == RewardKind::ExactAnswer)
}

/// `samples.jsonl`: every scored completion, one JSON record per line.
fn write_samples(cx: &RunContext, samples: &[Record]) -> Result<(), StageError> {
    let path = cx.output_dir(None)?.join("samples.jsonl");
    let mut text = String::new();
    for rec in samples {
        text.push_str(&serde_json::to_string(rec).unwrap_or_default());
        text.push('\n');
    }
    std::fs::write(&path, text).map_err(|e| Box::new(TrainError::io(&path, e)) as StageError)
}

fn generation_metrics(
    p: &EvalParams,
    cx: &mut RunContext,
    mut out: StageOutcome,
) -> Result<StageOutcome, StageError> {
    let g = p.generation();
    let ds = load_input(cx, "data")?;
    let set = scorers(cx, "generation.rewards", &g.rewards)?;
    // Scored with the reward set, and the default correctness reward last when the set has
    // no `exact_answer`.
    let at = correctness(&set);
    let mut with_check = set.clone();
    if at.is_none() {
        with_check.push(
            Reward::new(RewardSpec::of(RewardKind::ExactAnswer), None)
                .map_err(|e| Box::new(e) as StageError)?,
        );
    }
    let check = at.unwrap_or(set.len());
    let pass = |cx: &mut RunContext, n: usize, sampling: &Sampling| {
        let spec = SampleSpec {
            chat_template: p.chat_template.clone(),
            system_prompt: g.system_prompt.as_deref(),
            n,
            max_new_tokens: g.max_new_tokens,
            sampling,
            stop: &g.stop,
            batch_size: g.batch_size,
            rationalize: None,
        };
        sample(cx, &ds, &spec, &with_check)
    };
    let correct_of =
        |s: &Sampled| -> Vec<bool> { s.per[check].iter().map(|&c| c >= 1.0).collect() };
    let mut samples = Vec::new();
    let mut reward_pass: Option<Sampled> = None;
    if p.wants(EvalMetric::ExactMatch) || (p.wants(EvalMetric::MeanReward) && !p.samples()) {
        let greedy = pass(cx, 1, &Sampling::default())?;
        if p.wants(EvalMetric::ExactMatch) {
            let c = correct_of(&greedy);
            let hits = c.iter().filter(|&&x| x).count();
            out = out.metric("exact_match", round6(hits as f64 / c.len().max(1) as f64));
        }
        samples.extend(greedy.records.records.clone());
        reward_pass = Some(greedy);
    }
    if p.samples() {
        let sampled = pass(cx, g.n, &g.sampling)?;
        if p.wants(EvalMetric::PassAtK) {
            let mut correct = vec![0usize; sampled.prompts];
            for (req, &c) in sampled.requests.iter().zip(&correct_of(&sampled)) {
                correct[req.prompt_index] += usize::from(c);
            }
            for &k in &g.k {
                out = out.metric(
                    &format!("pass@{k}"),
                    round6(mean_pass_at_k(&correct, g.n, k)),
                );
            }
        }
        samples.extend(sampled.records.records.clone());
        reward_pass = Some(sampled);
    }
    if p.wants(EvalMetric::MeanReward)
        && let Some(s) = &reward_pass
    {
        // The set's weighted sum, without the added correctness reward.
        let total: Vec<f64> = (0..s.records.len())
            .map(|i| {
                set.iter()
                    .zip(&s.per)
                    .map(|(r, v)| r.spec.weight * v[i])
                    .filter(|v| !v.is_nan())
                    .sum()
            })
            .collect();
        out = out.metric(
            "mean_reward",
            round6(total.iter().sum::<f64>() / total.len().max(1) as f64),
        );
        for (r, v) in set.iter().zip(&s.per) {
            out = out.metric(
                &format!("rewards/{}/mean", r.spec.name()),
                round6(v.iter().sum::<f64>() / v.len().max(1) as f64),
            );
        }
    }
    write_samples(cx, &samples)?;
    Ok(out)
}

struct Score {
    dir: std::path::PathBuf,
    examples: Vec<crate::text::Example>,
    batch: usize,
    pad: u32,
}

impl BackendTask for Score {
    type Output = Result<crate::train::batch::Score, TrainError>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output {
        let loaded = model::load::<B>(&self.dir, &device)?;
        let net = loaded.model.valid();
        Ok(score(&net, &self.examples, self.batch, self.pad))
    }
}
