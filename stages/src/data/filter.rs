//! `data.filter`: keep the records within a length range and whose fields meet conditions: a
//! value to equal, or comparisons (`meta.reward: {ge: 1}`, `label: {ne: false}`,
//! `meta.source: {in: [wiki, books]}`).

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactType, FieldProblem, Input, OutputDecl, RunContext, Sensitivity, Stage,
    StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::records::{Dataset, Record};
use super::{DETERMINISTIC, empty, load_input, same_type, write_output};

/// Parameters of `data.filter`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    /// The dataset to filter (any family).
    pub data: StageRef,
    /// Keep records whose text (all messages, completions, responses… together) has at least this
    /// many characters.
    #[serde(default)]
    pub min_chars: Option<usize>,
    /// Keep records whose text has at most this many characters.
    #[serde(default)]
    pub max_chars: Option<usize>,
    /// Keep records whose fields meet these conditions, all of them: top-level fields
    /// (`label: true`) or fields kept in `meta` (`meta.source: wiki`, a generated sample's
    /// `meta.reward`). A condition is a value the field must equal (numbers by value: `1`
    /// equals `1.0`) or a map of comparisons, all of which must hold: `eq`, `ne` (any value),
    /// `gt`, `ge`, `lt`, `le` (numbers; a field that is not a number fails them), `in` (a list
    /// of values). A record without the field fails every condition but `ne`.
    #[serde(default, rename = "where")]
    pub where_: BTreeMap<String, Condition>,
}

/// What a field must be: comparisons (a map of `eq`, `ne`, `gt`, `ge`, `lt`, `le`, `in`), or
/// else a value to equal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Condition {
    Compare(Comparisons),
    Equals(Value),
}

/// Comparisons a field must pass, all of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Comparisons {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ne: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ge: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub le: Option<f64>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub in_: Option<Vec<Value>>,
}

impl Comparisons {
    fn is_empty(&self) -> bool {
        *self == Comparisons::default()
    }

    /// Whether `got` (absent: `None`) passes every comparison.
    fn holds(&self, got: Option<&Value>) -> bool {
        let num = got.and_then(Value::as_f64);
        let cmp = |bound: Option<f64>, ok: fn(f64, f64) -> bool| {
            bound.is_none_or(|b| num.is_some_and(|x| ok(x, b)))
        };
        self.eq
            .as_ref()
            .is_none_or(|w| got.is_some_and(|g| values_equal(g, w)))
            && self
                .ne
                .as_ref()
                .is_none_or(|w| !got.is_some_and(|g| values_equal(g, w)))
            && cmp(self.gt, |x, b| x > b)
            && cmp(self.ge, |x, b| x >= b)
            && cmp(self.lt, |x, b| x < b)
            && cmp(self.le, |x, b| x <= b)
            && self
                .in_
                .as_ref()
                .is_none_or(|ws| got.is_some_and(|g| ws.iter().any(|w| values_equal(g, w))))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut push = |op: &str, v: String| parts.push(format!("{op} {v}"));
        if let Some(v) = &self.eq {
            push("=", v.to_string());
        }
        if let Some(v) = &self.ne {
            push("≠", v.to_string());
        }
        for (op, b) in [
            (">", self.gt),
            ("≥", self.ge),
            ("<", self.lt),
            ("≤", self.le),
        ] {
            if let Some(b) = b {
                push(op, b.to_string());
            }
        }
        if let Some(v) = &self.in_ {
            push("in", Value::Array(v.clone()).to_string());
        }
        parts.join(" and ")
    }
}

impl Condition {
    /// Whether the field's value (absent: `None`) meets the condition.
    pub fn holds(&self, got: Option<&Value>) -> bool {
        match self {
            Condition::Equals(want) => got.is_some_and(|g| values_equal(g, want)),
            Condition::Compare(c) => c.holds(got),
        }
    }
}

/// The `data.filter` stage kind.
pub struct FilterStage;

impl Stage for FilterStage {
    const KIND: &'static str = "data.filter";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Keep the records within a length range and with given field values";

    type Params = FilterParams;

    fn inputs(params: &FilterParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: params.data.clone(),
            accepts: Accepts::any_dataset(),
        }]
    }

    fn outputs(_params: &FilterParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(same_type(inputs, "data"))]
    }

    fn check(params: &FilterParams) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        if let (Some(min), Some(max)) = (params.min_chars, params.max_chars)
            && min > max
        {
            problems.push(FieldProblem::new(
                "max_chars",
                format!("max_chars {max} is below min_chars {min}"),
            ));
        }
        if params.min_chars.is_none() && params.max_chars.is_none() && params.where_.is_empty() {
            problems.push(
                FieldProblem::new("data", "nothing to filter on")
                    .help("give min_chars, max_chars or where"),
            );
        }
        for (key, cond) in &params.where_ {
            if key.is_empty() || key.split('.').any(str::is_empty) {
                problems.push(FieldProblem::new(
                    format!("where.{key}"),
                    format!("`{key}` is not a field path (e.g. `label` or `meta.source`)"),
                ));
            }
            if let Condition::Compare(c) = cond {
                if c.is_empty() {
                    problems.push(
                        FieldProblem::new(format!("where.{key}"), "no comparison given")
                            .help("e.g. `{ge: 1}`; to match an empty map, use `{eq: {}}`"),
                    );
                }
                for (op, b) in [("gt", c.gt), ("ge", c.ge), ("lt", c.lt), ("le", c.le)] {
                    if let Some(b) = b
                        && !b.is_finite()
                    {
                        problems.push(FieldProblem::new(
                            format!("where.{key}.{op}"),
                            format!("{op} must be a finite number, found {b}"),
                        ));
                    }
                }
            }
        }
        problems
    }

    fn sensitivity(_params: &FilterParams) -> Sensitivity {
        DETERMINISTIC
    }

    fn run(params: &FilterParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let ds = load_input(cx, "data")?;
        let n = ds.len();
        let kept: Vec<Record> = ds.records.into_iter().filter(|r| keep(params, r)).collect();
        if kept.is_empty() {
            return Err(empty(
                "data.filter",
                format!("all {n} records were dropped by {}", describe(params)),
            ));
        }
        let out = Dataset::new(ds.family, kept);
        write_output(cx, None, &out)?;
        Ok(StageOutcome::default()
            .metric("kept", out.len())
            .metric("dropped", n - out.len()))
    }
}

fn keep(params: &FilterParams, r: &Record) -> bool {
    if params.min_chars.is_some() || params.max_chars.is_some() {
        let chars = r.text_chars();
        if params.min_chars.is_some_and(|min| chars < min)
            || params.max_chars.is_some_and(|max| chars > max)
        {
            return false;
        }
    }
    params
        .where_
        .iter()
        .all(|(path, cond)| cond.holds(r.field(path).as_ref()))
}

/// JSON equality where numbers compare by value (`1` equals `1.0`).
pub(crate) fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn describe(params: &FilterParams) -> String {
    let mut parts = Vec::new();
    if let Some(min) = params.min_chars {
        parts.push(format!("min_chars {min}"));
    }
    if let Some(max) = params.max_chars {
        parts.push(format!("max_chars {max}"));
    }
    for (k, c) in &params.where_ {
        match c {
            Condition::Equals(v) => parts.push(format!("{k} = {v}")),
            Condition::Compare(c) => parts.push(format!("{k} {}", c.describe())),
        }
    }
    parts.join(", ")
}
