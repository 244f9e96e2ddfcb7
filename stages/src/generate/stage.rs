//! The `generate` stage: `n` completions for every prompt of a dataset, as a dataset.
//!
//! Prompts come from any family: a chat record's messages up to its last user turn (trailing
//! assistant turns are the reference answer and are left out), the `prompt` of reasoning,
//! preference, labeled and ranking records — each rendered with the chat template and its
//! generation prompt — or a text record's text as is (raw continuation, no template).
//!
//! One record per sample, in prompt order then sample order. For message prompts a chat record:
//! the prompt's messages and the completion as the assistant's turn, so `train.sft` trains on it
//! and `data.filter` selects on its meta. For text prompts a text record holding prompt and
//! completion, with the completion alone in `meta.completion`. `meta` carries the source
//! record's meta, then `prompt_index`, `sample`, `tokens` (new tokens, an end-of-sequence id
//! included), `logprob` (their summed log-probability under the model), `finish_reason`
//! (`stop` or `length`) and, when the source has one, `answer` (a reasoning record's answer or
//! the source's `meta.answer`). With `rewards`, `rewards.<name>` and their weighted sum
//! `reward`; with `rationalize`, the hinted second pass follows the first, its records marked
//! `rationalized: true` and holding the prompt without the hint.

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, DatasetFamily, FieldProblem, Input, OutputDecl,
    RunContext, Sensitivity, Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Completion, DecodeOptions, DecodeTask, GenerateError, Request, Sampling, Stops, eos_ids,
};
use crate::backend::dispatch;
use crate::data::load_input;
use crate::data::records::{ChatRecord, Dataset, Message, Meta, Record, Role, TextRecord};
use crate::model::ModelConfig;
use crate::rl::rewards::{self, Reward, RewardInput, RewardSpec};
use crate::text::{ChatTemplate, TemplateSpec, TextError, TextTokenizer};
use crate::train::tokenizer_dir;

/// Parameters of `generate`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// The Model or Adapter to sample from.
    pub model: StageRef,
    /// The prompts: any dataset (see the kind's description for what a record's prompt is).
    pub data: StageRef,
    /// Chat template for message prompts: `auto` (the checkpoint's, else chatml),
    /// `checkpoint`, `chatml`, `llama3` or `alpaca`.
    #[serde(default)]
    pub chat_template: TemplateSpec,
    /// A system message put first in message prompts that have none (Unsloth's GRPO recipe
    /// gives its answer format this way).
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Completions per prompt.
    #[serde(default = "one")]
    pub n: usize,
    /// New tokens per completion at most.
    #[serde(default = "d_max_new_tokens")]
    pub max_new_tokens: usize,
    /// How tokens are chosen: greedy by default; `{do_sample: true, temperature, top_k, top_p,
    /// min_p, repetition_penalty}` as transformers' `generate`.
    #[serde(default)]
    pub sampling: Sampling,
    /// Strings that end a completion; the record's text ends before the first one.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Rows decoded together (their completions do not depend on it).
    #[serde(default = "d_batch_size")]
    pub batch_size: usize,
    /// Rewards to score every completion with: each record gets `meta.rewards.<name>` and their
    /// weighted sum `meta.reward` (see `rl::rewards`), so `data.filter` can keep the correct
    /// ones (STaR).
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
    /// STaR's rationalization: sample the prompts none of whose samples was correct again,
    /// with a hint holding the gold answer that the records leave out (`{hint: " (answer:
    /// {answer})"}`). Needs `rewards`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rationalize: Option<Rationalize>,
}

fn one() -> usize {
    1
}
fn d_max_new_tokens() -> usize {
    256
}
fn d_batch_size() -> usize {
    16
}

/// `generate`: sample completions for a dataset's prompts.
pub struct GenerateStage;

impl Stage for GenerateStage {
    const KIND: &'static str = "generate";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Sample n completions per prompt (greedy or top-k/top-p/min-p), one record per sample";
    type Params = GenerateParams;

    fn inputs(p: &GenerateParams) -> Vec<Input> {
        vec![
            Input {
                field: "model".into(),
                reference: p.model.clone(),
                accepts: Accepts::kinds(&[ArtifactKind::Model, ArtifactKind::Adapter]),
            },
            Input {
                field: "data".into(),
                reference: p.data.clone(),
                accepts: Accepts::any_dataset(),
            },
        ]
    }

    fn files(p: &GenerateParams) -> Vec<burnish_engine::stage::FileInput> {
        rewards::files("rewards", &p.rewards)
    }

    fn outputs(_: &GenerateParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        let family = match inputs.get("data").and_then(|t| t.family) {
            Some(DatasetFamily::Text) => DatasetFamily::Text,
            _ => DatasetFamily::Chat,
        };
        vec![OutputDecl::main(ArtifactType::dataset(family))]
    }

    fn check(p: &GenerateParams) -> Vec<FieldProblem> {
        let mut v: Vec<FieldProblem> = p
            .sampling
            .problems()
            .into_iter()
            .map(|(field, message)| FieldProblem::new(format!("sampling.{field}"), message))
            .collect();
        for (field, value) in [
            ("n", p.n),
            ("max_new_tokens", p.max_new_tokens),
            ("batch_size", p.batch_size),
        ] {
            if value == 0 {
                v.push(FieldProblem::new(
                    field,
                    format!("{field} must be at least 1, found 0"),
                ));
            }
        }
        if p.n > 1 && !p.sampling.do_sample {
            v.push(
                FieldProblem::new(
                    "n",
                    format!(
                        "n is {} but decoding is greedy: every sample would be the same",
                        p.n
                    ),
                )
                .help("set `sampling: {do_sample: true}`, or n: 1"),
            );
        }
        v.extend(rewards::check("rewards", &p.rewards));
        if let Some(r) = &p.rationalize {
            if p.rewards.is_empty() {
                v.push(
                    FieldProblem::new(
                        "rationalize",
                        "rationalize needs rewards to tell a correct sample from a wrong one",
                    )
                    .help("add `rewards: [{kind: exact_answer}]`"),
                );
            }
            if !r.hint.contains("{answer}") {
                v.push(
                    FieldProblem::new(
                        "rationalize.hint",
                        format!(
                            "the hint {:?} has no `{{answer}}` to put the gold answer in",
                            r.hint
                        ),
                    )
                    .help("e.g. hint: \" (the answer is {answer})\""),
                );
            }
        }
        if let Some(i) = p.stop.iter().position(String::is_empty) {
            v.push(FieldProblem::new(
                format!("stop[{i}]"),
                "a stop string is empty",
            ));
        }
        v
    }

    fn sensitivity(p: &GenerateParams) -> Sensitivity {
        Sensitivity {
            seed: p.sampling.do_sample,
            backend: true,
            names: false,
        }
    }

    fn run(p: &GenerateParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let ds = load_input(cx, "data")?;
        let scorers = scorers(cx, "rewards", &p.rewards)?;
        let spec = SampleSpec {
            chat_template: p.chat_template.clone(),
            system_prompt: p.system_prompt.as_deref(),
            n: p.n,
            max_new_tokens: p.max_new_tokens,
            sampling: &p.sampling,
            stop: &p.stop,
            batch_size: p.batch_size,
            rationalize: p.rationalize.as_ref(),
        };
        let s = sample(cx, &ds, &spec, &scorers)?;
        crate::data::write_output(cx, None, &s.records)?;
        let mut outcome = StageOutcome::default();
        for (name, mean) in s.reward_means(&scorers) {
            outcome = outcome.metric(&name, mean);
        }
        let first = &s.completions[..s.first];
        let tokens: usize = first.iter().map(|c| c.tokens.len()).sum();
        let stopped = first
            .iter()
            .filter(|c| c.finish == super::Finish::Stop)
            .count();
        outcome = outcome
            .metric("prompts", s.prompts)
            .metric("completions", s.first)
            .metric("new_tokens", tokens)
            .metric("mean_length", round(tokens as f64 / s.first.max(1) as f64))
            .metric(
                "stopped_ratio",
                round(stopped as f64 / s.first.max(1) as f64),
            );
        if let Some(r) = &p.rationalize {
            let (hinted, solved) = s.rationalized(r.min_reward);
            outcome = outcome
                .metric("rationalized_prompts", hinted)
                .metric("rationalized_solved", solved);
        }
        Ok(outcome)
    }
}

fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// The rewards of a `rewards:` list at `field`, each `command` with its program file.
pub(crate) fn scorers(
    cx: &RunContext,
    field: &str,
    specs: &[RewardSpec],
) -> Result<Vec<Reward>, StageError> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let program = cx.file(&format!("{field}[{i}].program")).ok();
            Reward::new(spec.clone(), program)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Box::new(e) as StageError)
}

/// One sampling pass over a dataset's prompts: what `generate` and `eval`'s generation metrics
/// share.
pub(crate) struct SampleSpec<'a> {
    pub chat_template: TemplateSpec,
    pub system_prompt: Option<&'a str>,
    pub n: usize,
    pub max_new_tokens: usize,
    pub sampling: &'a Sampling,
    pub stop: &'a [String],
    pub batch_size: usize,
    pub rationalize: Option<&'a Rationalize>,
}

/// The records a pass wrote, with what each came from and scored.
pub(crate) struct Sampled {
    /// One per sample: the first pass in prompt order then sample order, then the
    /// rationalized samples in the same order.
    pub records: Dataset,
    pub requests: Vec<Request>,
    pub completions: Vec<Completion>,
    /// `per[k][i]`: reward `k` of record `i`; `total[i]` their weighted sum (empty without
    /// rewards).
    pub per: Vec<Vec<f64>>,
    pub total: Vec<f64>,
    /// Records of the first pass (the rest are rationalized).
    pub first: usize,
    pub prompts: usize,
}

impl Sampled {
    /// `reward` and `rewards/<name>/mean` over the first pass (the model's own samples).
    pub(crate) fn reward_means(&self, scorers: &[Reward]) -> Vec<(String, f64)> {
        if scorers.is_empty() {
            return Vec::new();
        }
        let mean =
            |v: &[f64]| round(v[..self.first].iter().sum::<f64>() / self.first.max(1) as f64);
        let mut means = vec![("reward".to_owned(), mean(&self.total))];
        for (s, v) in scorers.iter().zip(&self.per) {
            means.push((format!("rewards/{}/mean", s.spec.name()), mean(v)));
        }
        means
    }

    /// Prompts given a hint, and of those, the ones a hinted sample solved.
    fn rationalized(&self, min_reward: f64) -> (usize, usize) {
        let mut hinted = std::collections::BTreeSet::new();
        let mut solved = std::collections::BTreeSet::new();
        for i in self.first..self.requests.len() {
            let p = self.requests[i].prompt_index;
            hinted.insert(p);
            if self.total[i] >= min_reward {
                solved.insert(p);
            }
        }
        (hinted.len(), solved.len())
    }
}

/// Sample `spec.n` completions for every prompt of `ds`, score them with `scorers` and, with
/// `spec.rationalize`, sample again with the hint for the prompts none of whose samples
/// reached its `min_reward`.
pub(crate) fn sample(
    cx: &mut RunContext,
    ds: &Dataset,
    spec: &SampleSpec,
    scorers: &[Reward],
) -> Result<Sampled, StageError> {
    let dir = cx.input("model")?.dir.clone();
    let tok = TextTokenizer::from_dir(&tokenizer_dir(&dir)).map_err(GenerateError::from)?;
    let template = ChatTemplate::resolve(&spec.chat_template, &tok).map_err(GenerateError::from)?;
    let (cfg, _) =
        ModelConfig::read(&tokenizer_dir(&dir).join("config.json")).map_err(GenerateError::from)?;
    let prompts = prompts(ds, &template, &tok, spec.system_prompt)?;
    let mut requests = Vec::with_capacity(prompts.len() * spec.n);
    for (i, pr) in prompts.iter().enumerate() {
        check_length(i, pr.ids.len(), spec.max_new_tokens, cfg.max_positions)?;
        requests.extend((0..spec.n).map(|s| Request {
            prompt: pr.ids.clone(),
            prompt_index: i,
            sample_index: s,
        }));
    }
    let eos = eos_ids(&tokenizer_dir(&dir), &tok);
    let opts = DecodeOptions {
        sampling: spec.sampling.clone(),
        max_new_tokens: spec.max_new_tokens,
        eos: eos.clone(),
        pad: tok.pad_id().or(eos.first().copied()).unwrap_or(0),
        seed: cx.seed(),
        batch_size: spec.batch_size,
    };
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let per_token = crate::model::KvCache::<burn::backend::Flex>::bytes_per_token(&cfg);
    cx.log(format!(
        "{} prompts × {} samples, up to {} new tokens; KV cache {per_token} bytes per token, {:.1} MB per batch of {}",
        prompts.len(),
        spec.n,
        spec.max_new_tokens,
        (per_token * (longest + spec.max_new_tokens) * spec.batch_size.min(requests.len())) as f64
            / 1e6,
        spec.batch_size
    ));
    let stops = Stops {
        strings: spec.stop,
        tok: &tok,
    };
    let mut completions = decode_all(cx, &dir, &requests, &opts, &stops)?;
    let mut out = records(ds, &prompts, &requests, &completions, &stops, &eos)?;
    let (mut per, mut total) = score(scorers, &mut out, &prompts, &requests, &completions)
        .map_err(|e| Box::new(e) as StageError)?;
    let first = out.len();
    if let Some(r) = spec.rationalize {
        let hinted = hinted_requests(ds, &prompts, &requests, &total, r, spec, &template, &tok)?;
        if !hinted.is_empty() {
            cx.log(format!(
                "rationalization: {} prompts had no sample with reward ≥ {}; sampling them again with the hint",
                hinted.len() / spec.n,
                r.min_reward
            ));
            for pr in hinted.iter().step_by(spec.n) {
                check_length(
                    pr.prompt_index,
                    pr.prompt.len(),
                    spec.max_new_tokens,
                    cfg.max_positions,
                )?;
            }
            let more = decode_all(cx, &dir, &hinted, &opts, &stops)?;
            let mut extra = records(ds, &prompts, &hinted, &more, &stops, &eos)?;
            for rec in &mut extra.records {
                meta_mut(rec).insert("rationalized".into(), Value::Bool(true));
            }
            let (p2, t2) = score(scorers, &mut extra, &prompts, &hinted, &more)
                .map_err(|e| Box::new(e) as StageError)?;
            for (a, b) in per.iter_mut().zip(p2) {
                a.extend(b);
            }
            total.extend(t2);
            out.records.extend(extra.records);
            requests.extend(hinted);
            completions.extend(more);
        }
    }
    Ok(Sampled {
        records: out,
        requests,
        completions,
        per,
        total,
        first,
        prompts: prompts.len(),
    })
}

/// STaR's rationalization (Zelikman et al. 2022, §3.3): a prompt none of whose samples was
/// correct is sampled again with a hint holding the gold answer; the records keep the prompt
/// without the hint, so training on them teaches the rationale, not the reading of a hint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rationalize {
    /// Appended to the content of the prompt's last user message (to a text prompt's text);
    /// `{answer}` becomes the record's answer.
    pub hint: String,
    /// A sample is correct when its reward is at least this (`data.filter where:
    /// {meta.reward: {ge: 1}}` keeps the same ones).
    #[serde(default = "one_f64")]
    pub min_reward: f64,
}

fn one_f64() -> f64 {
    1.0
}

/// The requests of the second pass: `n` samples (sample indices `n..2n`, their own random
/// streams) of each prompt none of whose samples reached `min_reward`, the hint in the prompt.
#[allow(clippy::too_many_arguments)]
fn hinted_requests(
    ds: &Dataset,
    prompts: &[Prompt],
    requests: &[Request],
    total: &[f64],
    r: &Rationalize,
    spec: &SampleSpec,
    template: &ChatTemplate,
    tok: &TextTokenizer,
) -> Result<Vec<Request>, GenerateError> {
    let mut solved = vec![false; prompts.len()];
    for (req, &t) in requests.iter().zip(total) {
        solved[req.prompt_index] |= t >= r.min_reward;
    }
    let mut out = Vec::new();
    for (i, pr) in prompts.iter().enumerate() {
        if solved[i] {
            continue;
        }
        let answer = answer_text(&ds.records[i]).ok_or_else(|| GenerateError::NoPrompt {
            record: i + 1,
            message: "rationalization needs the record's answer for its hint".into(),
        })?;
        let hint = r.hint.replace("{answer}", &answer);
        let ids = match &pr.messages {
            Some(messages) => {
                let mut messages = messages.clone();
                if let Some(m) = messages.iter_mut().rev().find(|m| m.role == Role::User) {
                    m.content.push_str(&hint);
                }
                tok.encode(&template.render_spans(&messages, &pr.tools, true, tok)?.text)?
            }
            None => text_ids(tok, &format!("{}{hint}", pr.text))?,
        };
        out.extend((0..spec.n).map(|s| Request {
            prompt: ids.clone(),
            prompt_index: i,
            sample_index: spec.n + s,
        }));
    }
    Ok(out)
}

fn meta_mut(rec: &mut Record) -> &mut Meta {
    match rec {
        Record::Chat(r) => &mut r.meta,
        Record::Text(r) => &mut r.meta,
        _ => unreachable!("generate writes chat and text records"),
    }
}

pub(crate) fn check_length(
    record: usize,
    tokens: usize,
    max_new: usize,
    positions: usize,
) -> Result<(), GenerateError> {
    if tokens == 0 {
        return Err(GenerateError::EmptyPrompt { record: record + 1 });
    }
    if tokens + max_new > positions {
        return Err(GenerateError::TooLong {
            record: record + 1,
            tokens,
            max_new,
            positions,
        });
    }
    Ok(())
}

/// Decode on the stage's backend with progress (prompts done, tokens/s) and cancellation.
fn decode_all(
    cx: &mut RunContext,
    dir: &std::path::Path,
    requests: &[Request],
    opts: &DecodeOptions,
    stops: &Stops,
) -> Result<Vec<Completion>, StageError> {
    let started = std::time::Instant::now();
    let total = requests.len();
    let bar = cx.progress();
    bar.set_total(total as u64);
    let mut progress = |done: usize, tokens: usize| {
        bar.set_position(done as u64);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(&format!(
            "{done}/{total} completions, {:.0} tokens/s",
            tokens as f64 / secs
        ));
        !cx.cancelled()
    };
    let task = DecodeTask {
        dir: dir.to_path_buf(),
        requests,
        opts,
        stop: &|t| stops.hit(t),
        progress: &mut progress,
    };
    let done = match dispatch(cx.backend(), task) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(Box::new(GenerateError::from(e))),
        Err(e) => return Err(Box::new(e)),
    };
    if done.len() < total {
        return Err(Box::new(GenerateError::Cancelled {
            done: done.len(),
            total,
        }));
    }
    let tokens: usize = done.iter().map(|c| c.tokens.len()).sum();
    cx.log(format!(
        "{total} completions, {tokens} new tokens in {:.2} s ({:.0} tokens/s)",
        started.elapsed().as_secs_f64(),
        tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
    ));
    Ok(done)
}

/// A record's prompt: its messages (none for raw text), its text and token ids.
pub(crate) struct Prompt {
    pub(crate) messages: Option<Vec<Message>>,
    /// The record's tools (a chat record's `tools`), rendered with the messages.
    pub(crate) tools: Vec<serde_json::Value>,
    pub(crate) text: String,
    pub(crate) ids: Vec<u32>,
}

/// Every record's prompt (see the module doc); `system` becomes the first message of message
/// prompts that have no system message.
pub(crate) fn prompts(
    ds: &Dataset,
    template: &ChatTemplate,
    tok: &TextTokenizer,
    system: Option<&str>,
) -> Result<Vec<Prompt>, GenerateError> {
    let mut out = Vec::with_capacity(ds.len());
    for (i, rec) in ds.records.iter().enumerate() {
        let tools = match rec {
            Record::Chat(r) => r.tools.clone(),
            _ => Vec::new(),
        };
        let messages = match rec {
            Record::Text(r) => {
                out.push(Prompt {
                    messages: None,
                    tools: Vec::new(),
                    ids: text_ids(tok, &r.text)?,
                    text: r.text.clone(),
                });
                continue;
            }
            Record::Chat(r) => {
                let end = r
                    .messages
                    .iter()
                    .rposition(|m| m.role != Role::Assistant)
                    .map_or(0, |p| p + 1);
                r.messages[..end].to_vec()
            }
            Record::Preference(r) => r.prompt.clone(),
            Record::Labeled(r) => r.prompt.clone(),
            Record::Ranking(r) => r.prompt.clone(),
            Record::Reasoning(r) => r.prompt.clone(),
        };
        if messages.is_empty() {
            return Err(GenerateError::NoPrompt {
                record: i + 1,
                message: "no message before the assistant's".into(),
            });
        }
        let mut messages = messages;
        if let Some(s) = system
            && messages.first().is_none_or(|m| m.role != Role::System)
        {
            messages.insert(0, Message::system(s));
        }
        let text = template.render_spans(&messages, &tools, true, tok)?.text;
        out.push(Prompt {
            ids: tok.encode(&text)?,
            messages: Some(messages),
            tools,
            text,
        });
    }
    Ok(out)
}

/// Raw text encoded as transformers' tokenizer call does: BOS first when the tokenizer adds
/// one.
fn text_ids(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>, TextError> {
    let mut ids = Vec::with_capacity(text.len() / 3 + 1);
    if tok.add_bos()
        && let Some((_, bos)) = tok.bos()
    {
        ids.push(bos);
    }
    ids.extend(tok.encode(text)?);
    Ok(ids)
}

/// The source record's answer, when it has one.
fn answer(rec: &Record) -> Option<Value> {
    match rec {
        Record::Reasoning(r) => Some(Value::String(r.answer.clone())),
        other => other.meta().get("answer").cloned(),
    }
}

/// The record's answer as the rewards compare it: a string as is, a number or other value as
/// JSON.
pub(crate) fn answer_text(rec: &Record) -> Option<String> {
    match answer(rec) {
        Some(Value::String(s)) => Some(s),
        Some(Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    }
}

fn records(
    ds: &Dataset,
    prompts: &[Prompt],
    requests: &[Request],
    completions: &[Completion],
    stops: &Stops,
    eos: &[u32],
) -> Result<Dataset, GenerateError> {
    let mut out = Vec::with_capacity(completions.len());
    for (req, c) in requests.iter().zip(completions) {
        let src = &ds.records[req.prompt_index];
        let prompt = &prompts[req.prompt_index];
        let text = stops.text(c, eos)?;
        let mut meta: Meta = src.meta().clone();
        meta.insert("prompt_index".into(), req.prompt_index.into());
        meta.insert("sample".into(), req.sample_index.into());
        meta.insert("tokens".into(), c.tokens.len().into());
        meta.insert("logprob".into(), ((c.logprob * 1e6).round() / 1e6).into());
        meta.insert(
            "finish_reason".into(),
            serde_json::to_value(c.finish).unwrap_or(Value::Null),
        );
        if let Some(a) = answer(src) {
            meta.insert("answer".into(), a);
        }
        out.push(match &prompt.messages {
            Some(messages) => {
                let mut messages = messages.clone();
                messages.push(Message::assistant(text));
                Record::Chat(ChatRecord {
                    messages,
                    tools: Vec::new(),
                    label: None,
                    meta,
                })
            }
            None => {
                meta.insert("completion".into(), Value::String(text.clone()));
                Record::Text(TextRecord {
                    text: format!("{}{text}", prompt.text),
                    meta,
                })
            }
        });
    }
    let family = match ds.family {
        DatasetFamily::Text => DatasetFamily::Text,
        _ => DatasetFamily::Chat,
    };
    Ok(Dataset::new(family, out))
}

/// Score every record's completion with `scorers`: `meta.rewards.<name>` and `meta.reward` on
/// each record. Returns `(per[k][i], total[i])`, both empty without scorers.
fn score(
    scorers: &[Reward],
    out: &mut Dataset,
    prompts: &[Prompt],
    requests: &[Request],
    completions: &[Completion],
) -> Result<(Vec<Vec<f64>>, Vec<f64>), rewards::RewardError> {
    if scorers.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let texts: Vec<String> = out.records.iter().map(completion_text).collect();
    let answers: Vec<Option<String>> = out.records.iter().map(answer_text).collect();
    let inputs: Vec<RewardInput> = requests
        .iter()
        .enumerate()
        .map(|(i, req)| RewardInput {
            prompt: &prompts[req.prompt_index].text,
            completion: &texts[i],
            answer: answers[i].as_deref(),
            tokens: completions[i].tokens.len(),
        })
        .collect();
    let (per, total) = rewards::score_all(scorers, &inputs)?;
    for (i, rec) in out.records.iter_mut().enumerate() {
        let named: serde_json::Map<String, Value> = scorers
            .iter()
            .zip(&per)
            .map(|(s, v)| (s.spec.name().to_owned(), Value::from(round(v[i]))))
            .collect();
        let meta = meta_mut(rec);
        meta.insert("rewards".into(), Value::Object(named));
        meta.insert("reward".into(), round(total[i]).into());
    }
    Ok((per, total))
}

/// The completion of a generated record: the assistant's last turn, or `meta.completion`.
pub(crate) fn completion_text(r: &Record) -> String {
    match r {
        Record::Chat(c) => c
            .messages
            .last()
            .map(|m| m.text().into_owned())
            .unwrap_or_default(),
        other => other
            .meta()
            .get("completion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    }
}
