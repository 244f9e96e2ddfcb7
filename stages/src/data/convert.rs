//! `data.convert`: reshape records into another family (rankings → preference pairs, preference
//! pairs → KTO examples, worked problems → conversations to fine-tune on).

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactType, DatasetFamily, FieldProblem, Input, OutputDecl, RunContext, Sensitivity,
    Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::records::{Dataset, LabeledRecord, Message, PreferenceRecord, RankingRecord, Record};
use super::{DETERMINISTIC, empty, load_input, require_family, write_output};

/// The family to convert into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConvertTo {
    /// From a ranking dataset: pairs of responses, the better-ranked one chosen.
    Preference,
    /// From a preference dataset: each pair becomes a desirable example (the chosen completion,
    /// `label: true`) and an undesirable one (the rejected completion, `label: false`). From a
    /// chat dataset whose records carry `label`: the messages before the first assistant turn
    /// are the prompt, the rest (assistant turns and tool results) the completion.
    Kto,
    /// From a reasoning dataset: the prompt's turns, then an assistant turn rendered from the
    /// worked solution and the answer by `completion` (default GSM8K's `{reasoning}\n####
    /// {answer}`, or the bare `{answer}` where the reasoning is empty); `meta.answer` keeps the
    /// answer for `generate` and its rewards.
    Chat,
}

/// Which pairs a ranking yields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PairMode {
    /// Every pair of responses with different ranks (n responses → up to n(n−1)/2 pairs).
    #[default]
    All,
    /// One pair per ranking: the best response against the worst.
    BestWorst,
}

/// Parameters of `data.convert`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConvertParams {
    /// The dataset to convert: ranking for `to: preference`, preference for `to: kto`.
    pub data: StageRef,
    /// The family to produce.
    pub to: ConvertTo,
    /// For `to: preference`: which pairs each ranking yields (default: all).
    #[serde(default)]
    pub pairs: Option<PairMode>,
    /// For `to: chat`: the assistant turn, with `{reasoning}` and `{answer}` replaced, e.g.
    /// `"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"`.
    #[serde(default)]
    pub completion: Option<String>,
}

/// The placeholders a `completion` template may hold.
const PLACEHOLDERS: [&str; 2] = ["{reasoning}", "{answer}"];

impl ConvertTo {
    fn sources(self) -> &'static [DatasetFamily] {
        match self {
            ConvertTo::Preference => &[DatasetFamily::Ranking],
            ConvertTo::Kto => &[DatasetFamily::Preference, DatasetFamily::Chat],
            ConvertTo::Chat => &[DatasetFamily::Reasoning],
        }
    }
    fn target(self) -> DatasetFamily {
        match self {
            ConvertTo::Preference => DatasetFamily::Preference,
            ConvertTo::Kto => DatasetFamily::Labeled,
            ConvertTo::Chat => DatasetFamily::Chat,
        }
    }
}

/// The `data.convert` stage kind.
pub struct ConvertStage;

impl Stage for ConvertStage {
    const KIND: &'static str = "data.convert";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Convert records between families: ranking → preference pairs, preference → KTO, reasoning → chat";

    type Params = ConvertParams;

    fn inputs(params: &ConvertParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: params.data.clone(),
            accepts: Accepts::datasets(params.to.sources()),
        }]
    }

    fn outputs(
        params: &ConvertParams,
        _inputs: &BTreeMap<String, ArtifactType>,
    ) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::dataset(params.to.target()))]
    }

    fn check(params: &ConvertParams) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        if params.to != ConvertTo::Preference && params.pairs.is_some() {
            problems.push(FieldProblem::new(
                "pairs",
                "`pairs` only applies to `to: preference`",
            ));
        }
        match (&params.completion, params.to) {
            (Some(_), to) if to != ConvertTo::Chat => problems.push(FieldProblem::new(
                "completion",
                "`completion` only applies to `to: chat`",
            )),
            (Some(t), _) => {
                if let Some(bad) = unknown_placeholder(t) {
                    problems.push(
                        FieldProblem::new("completion", format!("`{bad}` is not a placeholder"))
                            .help("the placeholders are {reasoning} and {answer}"),
                    );
                }
            }
            (None, _) => {}
        }
        problems
    }

    fn sensitivity(_params: &ConvertParams) -> Sensitivity {
        DETERMINISTIC
    }

    fn run(params: &ConvertParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let ds = load_input(cx, "data")?;
        require_family("data", &ds, params.to.sources())?;
        let n = ds.len();
        let mut out = Vec::new();
        for (index, rec) in ds.records.into_iter().enumerate() {
            match (params.to, rec) {
                (ConvertTo::Preference, Record::Ranking(r)) => out.extend(
                    ranking_pairs(r, params.pairs.unwrap_or_default()).map(Record::Preference),
                ),
                (ConvertTo::Kto, Record::Preference(p)) => {
                    out.extend(preference_to_kto(p).map(Record::Labeled))
                }
                (ConvertTo::Kto, Record::Chat(c)) => {
                    out.push(Record::Labeled(chat_to_kto(c, index)?))
                }
                (ConvertTo::Chat, Record::Reasoning(r)) => out.push(Record::Chat(
                    reasoning_to_chat(r, params.completion.as_deref()),
                )),
                _ => unreachable!("require_family checked the family"),
            }
        }
        if out.is_empty() {
            return Err(empty(
                "data.convert",
                format!("none of the {n} rankings has two responses of different rank"),
            ));
        }
        let out = Dataset::new(params.to.target(), out);
        write_output(cx, None, &out)?;
        Ok(StageOutcome::default()
            .metric("input", n)
            .metric("records", out.len()))
    }
}

/// The first `{name}` in `template` that is not a placeholder.
fn unknown_placeholder(template: &str) -> Option<String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let tail = &rest[open..];
        let close = tail.find('}')?;
        let name = &tail[..=close];
        if !PLACEHOLDERS.contains(&name) {
            return Some(name.to_owned());
        }
        rest = &tail[close + 1..];
    }
    None
}

/// A worked problem as a conversation: its prompt, then the solution as the assistant's turn.
pub fn reasoning_to_chat(
    r: super::records::ReasoningRecord,
    template: Option<&str>,
) -> super::records::ChatRecord {
    let reply = match template {
        Some(t) => t
            .replace("{reasoning}", &r.reasoning)
            .replace("{answer}", &r.answer),
        None if r.reasoning.trim().is_empty() => r.answer.clone(),
        None => format!("{}\n#### {}", r.reasoning, r.answer),
    };
    let mut meta = r.meta;
    meta.insert("answer".into(), serde_json::Value::String(r.answer));
    let mut messages = r.prompt;
    messages.push(Message::assistant(reply));
    super::records::ChatRecord {
        messages,
        tools: Vec::new(),
        label: None,
        meta,
    }
}

fn answer(text: &str) -> Vec<Message> {
    vec![Message::assistant(text)]
}

/// The preference pairs of one ranking (responses are sorted by rank, best first): pairs (i, j)
/// with i before j and a strictly better rank, in that order.
pub fn ranking_pairs(r: RankingRecord, mode: PairMode) -> impl Iterator<Item = PreferenceRecord> {
    let mut resp = r.responses;
    resp.sort_by_key(|x| x.rank);
    let mut pairs = Vec::new();
    match mode {
        PairMode::All => {
            for i in 0..resp.len() {
                for j in i + 1..resp.len() {
                    if resp[i].rank < resp[j].rank {
                        pairs.push((i, j));
                    }
                }
            }
        }
        PairMode::BestWorst => {
            if let (Some(first), Some(last)) = (resp.first(), resp.last())
                && first.rank < last.rank
            {
                pairs.push((0, resp.len() - 1));
            }
        }
    }
    pairs.into_iter().map(move |(i, j)| PreferenceRecord {
        prompt: r.prompt.clone(),
        chosen: answer(&resp[i].text),
        rejected: answer(&resp[j].text),
        meta: r.meta.clone(),
    })
}

/// A preference pair as a desirable and an undesirable KTO example, in that order.
/// A labeled conversation → a KTO example: the messages before the first assistant turn are
/// the prompt, the rest the completion.
pub fn chat_to_kto(
    c: super::records::ChatRecord,
    index: usize,
) -> Result<LabeledRecord, StageError> {
    use super::records::Role;
    let problem = |why: &str| -> StageError {
        empty(
            "data.convert",
            format!("chat record {index} {why}; `to: kto` needs a `label` and an assistant turn"),
        )
    };
    let label = c.label.ok_or_else(|| problem("has no `label`"))?;
    let first = c
        .messages
        .iter()
        .position(|m| m.role == Role::Assistant)
        .ok_or_else(|| problem("has no assistant turn"))?;
    let mut prompt = c.messages;
    let completion = prompt.split_off(first);
    Ok(LabeledRecord {
        prompt,
        completion,
        label,
        meta: c.meta,
    })
}

pub fn preference_to_kto(p: PreferenceRecord) -> impl Iterator<Item = LabeledRecord> {
    [
        LabeledRecord {
            prompt: p.prompt.clone(),
            completion: p.chosen,
            label: true,
            meta: p.meta.clone(),
        },
        LabeledRecord {
            prompt: p.prompt,
            completion: p.rejected,
            label: false,
            meta: p.meta,
        },
    ]
    .into_iter()
}
