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
//! the source's `meta.answer`).

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
use crate::text::{ChatTemplate, TemplateChoice, TextTokenizer};
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
    pub chat_template: TemplateChoice,
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
        let dir = cx.input("model")?.dir.clone();
        let tok = TextTokenizer::from_dir(&tokenizer_dir(&dir)).map_err(GenerateError::from)?;
        let template = ChatTemplate::resolve(p.chat_template, &tok).map_err(GenerateError::from)?;
        let ds = load_input(cx, "data")?;
        let (cfg, _) = ModelConfig::read(&tokenizer_dir(&dir).join("config.json"))
            .map_err(GenerateError::from)?;
        let prompts = prompts(&ds, &template, &tok, p.system_prompt.as_deref())?;
        let mut requests = Vec::with_capacity(prompts.len() * p.n);
        for (i, pr) in prompts.iter().enumerate() {
            check_length(i, pr.ids.len(), p.max_new_tokens, cfg.max_positions)?;
            requests.extend((0..p.n).map(|s| Request {
                prompt: pr.ids.clone(),
                prompt_index: i,
                sample_index: s,
            }));
        }
        let eos = eos_ids(&tokenizer_dir(&dir), &tok);
        let opts = DecodeOptions {
            sampling: p.sampling.clone(),
            max_new_tokens: p.max_new_tokens,
            eos: eos.clone(),
            pad: tok.pad_id().or(eos.first().copied()).unwrap_or(0),
            seed: cx.seed(),
            batch_size: p.batch_size,
        };
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        cx.log(format!(
            "{} prompts × {} samples, up to {} new tokens; KV cache {} bytes per token, {:.1} MB per batch of {}",
            prompts.len(),
            p.n,
            p.max_new_tokens,
            crate::model::KvCache::<burn::backend::Flex>::bytes_per_token(&cfg),
            (crate::model::KvCache::<burn::backend::Flex>::bytes_per_token(&cfg)
                * (longest + p.max_new_tokens)
                * p.batch_size.min(requests.len())) as f64
                / 1e6,
            p.batch_size
        ));
        let stops = Stops {
            strings: &p.stop,
            tok: &tok,
        };
        let scorers = p
            .rewards
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let program = cx.file(&format!("rewards[{i}].program")).ok();
                Reward::new(spec.clone(), program)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Box::new(e) as StageError)?;
        let completions = decode_all(cx, &dir, &requests, &opts, &stops)?;
        let mut out = records(&ds, &prompts, &requests, &completions, &stops, &eos)?;
        let reward_means = score(&scorers, &mut out, &prompts, &requests, &completions)
            .map_err(|e| Box::new(e) as StageError)?;
        let tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
        let stopped = completions
            .iter()
            .filter(|c| c.finish == super::Finish::Stop)
            .count();
        crate::data::write_output(cx, None, &out)?;
        let mut outcome = StageOutcome::default();
        for (name, mean) in reward_means {
            outcome = outcome.metric(&name, mean);
        }
        Ok(outcome
            .metric("prompts", prompts.len())
            .metric("completions", completions.len())
            .metric("new_tokens", tokens)
            .metric(
                "mean_length",
                (tokens as f64 / completions.len().max(1) as f64 * 1e4).round() / 1e4,
            )
            .metric(
                "stopped_ratio",
                (stopped as f64 / completions.len().max(1) as f64 * 1e6).round() / 1e6,
            ))
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
        let messages = match rec {
            Record::Text(r) => {
                // Raw text is encoded as transformers' tokenizer call does: BOS first when the
                // tokenizer adds one.
                let mut ids = Vec::with_capacity(r.text.len() / 3 + 1);
                if tok.add_bos()
                    && let Some((_, bos)) = tok.bos()
                {
                    ids.push(bos);
                }
                ids.extend(tok.encode(&r.text)?);
                out.push(Prompt {
                    messages: None,
                    ids,
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
        let text = template.render(&messages, true, tok)?;
        out.push(Prompt {
            ids: tok.encode(&text)?,
            messages: Some(messages),
            text,
        });
    }
    Ok(out)
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
/// each record; the means as metrics (`reward`, `rewards/<name>/mean`).
fn score(
    scorers: &[Reward],
    out: &mut Dataset,
    prompts: &[Prompt],
    requests: &[Request],
    completions: &[Completion],
) -> Result<Vec<(String, f64)>, rewards::RewardError> {
    if scorers.is_empty() {
        return Ok(Vec::new());
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
    let round = |v: f64| (v * 1e6).round() / 1e6;
    for (i, rec) in out.records.iter_mut().enumerate() {
        let named: serde_json::Map<String, Value> = scorers
            .iter()
            .zip(&per)
            .map(|(s, v)| (s.spec.name().to_owned(), Value::from(round(v[i]))))
            .collect();
        let meta = match rec {
            Record::Chat(r) => &mut r.meta,
            Record::Text(r) => &mut r.meta,
            _ => unreachable!("generate writes chat and text records"),
        };
        meta.insert("rewards".into(), Value::Object(named));
        meta.insert("reward".into(), round(total[i]).into());
    }
    let mean = |v: &[f64]| round(v.iter().sum::<f64>() / v.len().max(1) as f64);
    let mut means = vec![("reward".to_owned(), mean(&total))];
    for (s, v) in scorers.iter().zip(&per) {
        means.push((format!("rewards/{}/mean", s.spec.name()), mean(v)));
    }
    Ok(means)
}

/// The completion of a generated record: the assistant's last turn, or `meta.completion`.
fn completion_text(r: &Record) -> String {
    match r {
        Record::Chat(c) => c
            .messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        other => other
            .meta()
            .get("completion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    }
}
