//! `train.grpo`: group relative policy optimization, TRL's `GRPOTrainer` (trl 1.x), full,
//! LoRA or QLoRA, from a Model or an Adapter, on any dataset with prompts.
//!
//! `batch_size` counts prompts per micro-batch: a step samples `num_generations` completions
//! for each of its `batch_size × grad_accum` prompts (TRL's `per_device_train_batch_size`
//! counts completions instead). The defaults are TRL's (`beta: 0`, `epsilon: 0.2`,
//! `loss_type: dapo`, `scale_rewards: group`, `temperature: 1`, `num_iterations: 1`,
//! `use_bias_correction_kl: true`) but for the learning rate, which is every trainer's.
//! See [`super::rollout`] for what a rollout and a step compute.

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, DatasetFamily, FieldProblem, FileInput, Input, RunContext,
    StageError, StageOutcome, StageRef,
};

use super::grpo::{LossType, ScaleRewards};
use super::rewards::{self, Reward, RewardKind, RewardSpec};
use super::rollout::{GrpoItem, GrpoObjective, PromptItem};
use crate::data::load_input;
use crate::generate::stage::{answer_text, check_length, prompts};
use crate::generate::{GenerateError, Sampling, eos_ids};
use crate::model::{KvCache, ModelConfig};
use crate::text::{ChatTemplate, TemplateSpec, TextTokenizer};
use crate::train::trainer::{Trainer, TrainerStage};
use crate::train::{Fit, TrainerParams, fit, tokenizer_dir, trainer_params};

fn d_generations() -> usize {
    8
}
fn d_completion() -> usize {
    256
}
fn d_epsilon() -> f64 {
    0.2
}
fn d_one() -> f64 {
    1.0
}
fn d_iterations() -> usize {
    1
}
fn d_generation_batch() -> usize {
    64
}
fn yes() -> bool {
    true
}

trainer_params! {
    /// Parameters of `train.grpo`: reinforcement learning from rule-based rewards with
    /// group-relative advantages. `batch_size` counts prompts per micro-batch.
    pub struct GrpoParams {
        /// The rewards each completion is scored by, combined by their `weight`s.
        pub rewards: Vec<RewardSpec>,
        /// Completions sampled per prompt (the group; at least 2).
        #[serde(default = "d_generations")]
        pub num_generations: usize,
        /// New tokens per completion at most.
        #[serde(default = "d_completion")]
        pub max_completion_length: usize,
        /// Sampling temperature; the training log-probs come from the logits divided by it too.
        #[serde(default = "d_one")]
        pub temperature: f64,
        /// Keep the `top_k` most likely tokens when sampling (0: all).
        #[serde(default)]
        pub top_k: usize,
        /// Nucleus sampling (1: all).
        #[serde(default = "d_one")]
        pub top_p: f64,
        /// Drop tokens less likely than `min_p` × the most likely one (0: none).
        #[serde(default)]
        pub min_p: f64,
        /// transformers' repetition penalty while sampling (1: off).
        #[serde(default = "d_one")]
        pub repetition_penalty: f64,
        /// Strings that end a completion (the rewards see the text before the first one).
        #[serde(default)]
        pub stop: Vec<String>,
        /// A system message put first in message prompts that have none (the answer format of
        /// Unsloth's recipe).
        #[serde(default)]
        pub system_prompt: Option<String>,
        /// Chat template for message prompts: `auto`, `checkpoint`, `chatml`, `llama3`,
        /// `alpaca` or `plain`.
        #[serde(default)]
        pub chat_template: TemplateSpec,
        /// KL coefficient β toward the reference model; 0 (TRL's default) loads no reference.
        #[serde(default)]
        pub beta: f64,
        /// Lower clipping range ε of the ratio.
        #[serde(default = "d_epsilon")]
        pub epsilon: f64,
        /// Upper clipping range (DAPO's ε_high); default `epsilon`.
        #[serde(default)]
        pub epsilon_high: Option<f64>,
        /// How the per-token losses are normalized: `grpo`, `bnpo`, `dr_grpo` or `dapo`
        /// (TRL's default).
        #[serde(default)]
        pub loss_type: LossType,
        /// Advantages divided by the reward std of the `group` (default), the `batch`, or
        /// `none` (Dr. GRPO).
        #[serde(default)]
        pub scale_rewards: ScaleRewards,
        /// Multiply the KL term by the unclipped ratio (TRL 1.16's `use_bias_correction_kl`,
        /// default true).
        #[serde(default = "yes")]
        pub use_bias_correction_kl: bool,
        /// Truncated completions (no end-of-sequence id within `max_completion_length`) add no
        /// loss.
        #[serde(default)]
        pub mask_truncated_completions: bool,
        /// Optimizer steps per rollout (PPO-style reuse with the clipped ratio).
        #[serde(default = "d_iterations")]
        pub num_iterations: usize,
        /// Rows decoded together (the completions do not depend on it).
        #[serde(default = "d_generation_batch")]
        pub generation_batch_size: usize,
        /// Log the first prompt's completions, rewards and advantages every this many steps.
        #[serde(default)]
        pub log_completions_every: Option<usize>,
        /// Another reference model than the policy's starting model (a Model or Adapter), for
        /// β ≠ 0.
        #[serde(default)]
        pub reference_model: Option<StageRef>,
        /// Turn adapter dropout off while training (TRL's `disable_dropout`, default true).
        #[serde(default = "yes")]
        pub disable_dropout: bool,
        /// A control for experiments: permute the advantages within each rollout (seeded), so
        /// their distribution stays and their link to the completions goes. A run that learns
        /// as much with it learns from something else than the rewards.
        #[serde(default)]
        pub shuffle_advantages: bool,
    }
}

impl GrpoParams {
    fn sampling(&self) -> Sampling {
        Sampling {
            do_sample: true,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

/// `train.grpo`.
pub struct Grpo;
pub type GrpoStage = TrainerStage<Grpo>;

impl Trainer for Grpo {
    const KIND: &'static str = "train.grpo";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "GRPO: sample groups of completions, score them with rewards, train on their relative advantages; full or LoRA";
    const DATA: &'static [DatasetFamily] = &[
        DatasetFamily::Reasoning,
        DatasetFamily::Chat,
        DatasetFamily::Text,
        DatasetFamily::Preference,
        DatasetFamily::Labeled,
    ];
    type Params = GrpoParams;

    fn more_inputs(p: &GrpoParams) -> Vec<Input> {
        p.reference_model
            .iter()
            .map(|m| Input {
                field: "reference_model".into(),
                reference: m.clone(),
                accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
            })
            .collect()
    }
    fn files(p: &GrpoParams) -> Vec<FileInput> {
        rewards::files("rewards", &p.rewards)
    }
    fn notes(p: &GrpoParams, _: &BTreeMap<String, ArtifactType>) -> Vec<String> {
        let c = p.common();
        vec![format!(
            "{} prompts × {} completions per step, {} optimizer step(s) per rollout; reference: {}",
            c.batch_size * c.grad_accum,
            p.num_generations,
            p.num_iterations,
            match (p.beta != 0.0, &p.reference_model) {
                (false, _) => "none (beta 0)".to_owned(),
                (true, Some(r)) => format!("`{r}`"),
                (true, None) => "the policy's starting model".to_owned(),
            }
        )]
    }
    fn check(p: &GrpoParams) -> Vec<FieldProblem> {
        let mut v = check(p);
        v.extend(rewards::check("rewards", &p.rewards));
        v.extend(
            p.sampling()
                .problems()
                .into_iter()
                .map(|(field, message)| FieldProblem::new(field, message)),
        );
        v
    }
    fn run(p: &GrpoParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let c = p.common();
        let dir = cx.input("model")?.dir.clone();
        let tok = TextTokenizer::from_dir(&tokenizer_dir(&dir))?;
        let template = ChatTemplate::resolve(&p.chat_template, &tok)?;
        cx.log(format!("chat template: {}", template.name()));
        let ds = load_input(cx, "data")?;
        let (cfg, _) = ModelConfig::read(&tokenizer_dir(&dir).join("config.json"))
            .map_err(GenerateError::from)?;
        let rendered = prompts(&ds, &template, &tok, p.system_prompt.as_deref())?;
        let needs_answer = p.rewards.iter().any(|r| r.kind == RewardKind::ExactAnswer);
        let mut items = Vec::with_capacity(rendered.len());
        let mut tokens = 0;
        for (i, (pr, rec)) in rendered.into_iter().zip(&ds.records).enumerate() {
            check_length(i, pr.ids.len(), p.max_completion_length, cfg.max_positions)?;
            let answer = answer_text(rec);
            if needs_answer && answer.is_none() {
                return Err(Box::new(rewards::RewardError::NoAnswer {
                    name: "exact_answer".into(),
                    sample: i + 1,
                }));
            }
            tokens += pr.ids.len();
            items.push(GrpoItem::prompt(PromptItem {
                record: i + 1,
                ids: pr.ids,
                text: pr.text,
                answer,
            }));
        }
        let scorers = p
            .rewards
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                Reward::new(spec.clone(), cx.file(&format!("rewards[{i}].program")).ok())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let eos = eos_ids(&tokenizer_dir(&dir), &tok);
        let pad = tok.pad_id().or(eos.first().copied()).unwrap_or(0);
        let longest = items.iter().map(|i| i.prompt.ids.len()).max().unwrap_or(0);
        cx.log(format!(
            "{} prompts; rollouts of {} × {} completions of up to {} tokens; KV cache {} bytes per token, {:.1} MB per batch of {}",
            items.len(),
            c.batch_size * c.grad_accum,
            p.num_generations,
            p.max_completion_length,
            KvCache::<burn::backend::Flex>::bytes_per_token(&cfg),
            (KvCache::<burn::backend::Flex>::bytes_per_token(&cfg)
                * (longest + p.max_completion_length)
                * p.generation_batch_size) as f64
                / 1e6,
            p.generation_batch_size
        ));
        let objective = GrpoObjective {
            tok,
            rewards: scorers,
            stop: p.stop.clone(),
            eos,
            pad,
            sampling: p.sampling(),
            num_generations: p.num_generations,
            max_completion_length: p.max_completion_length,
            generation_batch_size: p.generation_batch_size,
            scale_rewards: p.scale_rewards,
            beta: p.beta,
            epsilon: p.epsilon,
            epsilon_high: p.epsilon_high.unwrap_or(p.epsilon),
            loss_type: p.loss_type,
            bias_correction_kl: p.use_bias_correction_kl,
            mask_truncated_completions: p.mask_truncated_completions,
            num_iterations: p.num_iterations,
            grad_accum: c.grad_accum,
            seed: c.seed.unwrap_or(cx.seed()),
            log_completions_every: p.log_completions_every,
            shuffle_advantages: p.shuffle_advantages,
        };
        fit(Fit {
            common: c,
            objective,
            train: items,
            eval: None,
            tokens,
            truncated: 0,
            disable_dropout: p.disable_dropout,
            cx,
        })
    }
}

/// The range checks of GRPO's own fields.
fn check(p: &GrpoParams) -> Vec<FieldProblem> {
    let mut v = Vec::new();
    if p.rewards.is_empty() {
        v.push(
            FieldProblem::new("rewards", "rewards is empty: GRPO needs at least one")
                .help("e.g. `rewards: [{kind: exact_answer}]`"),
        );
    }
    if p.num_generations < 2 {
        v.push(
            FieldProblem::new(
                "num_generations",
                format!(
                    "num_generations must be at least 2, found {}",
                    p.num_generations
                ),
            )
            .help("advantages compare the completions of one prompt: a group of one has none"),
        );
    }
    for (field, value) in [
        ("max_completion_length", p.max_completion_length),
        ("num_iterations", p.num_iterations),
        ("generation_batch_size", p.generation_batch_size),
    ] {
        if value == 0 {
            v.push(FieldProblem::new(
                field,
                format!("{field} must be at least 1, found 0"),
            ));
        }
    }
    if !(p.beta.is_finite() && p.beta >= 0.0) {
        v.push(FieldProblem::new(
            "beta",
            format!("beta must be ≥ 0, found {}", p.beta),
        ));
    }
    if !(p.epsilon.is_finite() && p.epsilon > 0.0 && p.epsilon < 1.0) {
        v.push(FieldProblem::new(
            "epsilon",
            format!("epsilon must be in (0, 1), found {}", p.epsilon),
        ));
    }
    if let Some(h) = p.epsilon_high
        && !(h.is_finite() && h > 0.0)
    {
        v.push(FieldProblem::new(
            "epsilon_high",
            format!("epsilon_high must be > 0, found {h}"),
        ));
    }
    if p.eval_data.is_some() {
        v.push(
            FieldProblem::new(
                "eval_data",
                "train.grpo does not score held-out data while it trains",
            )
            .help("score held-out prompts after it with a `generate` stage with `rewards:`"),
        );
    }
    if p.reference_model.is_some() && p.beta == 0.0 {
        v.push(
            FieldProblem::new("reference_model", "reference_model is unused with beta 0")
                .help("set `beta` (e.g. 0.04) for a KL penalty toward it, or remove it"),
        );
    }
    if let Some(i) = p.stop.iter().position(String::is_empty) {
        v.push(FieldProblem::new(
            format!("stop[{i}]"),
            "a stop string is empty",
        ));
    }
    if p.log_completions_every == Some(0) {
        v.push(FieldProblem::new(
            "log_completions_every",
            "log_completions_every must be at least 1, found 0",
        ));
    }
    v
}
