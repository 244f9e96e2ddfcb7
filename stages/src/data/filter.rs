//! `data.filter`: keep the records within a length range and matching field values.

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
    /// Keep records whose fields equal these values: top-level fields (`label: true`) or source
    /// columns kept in `meta` (`meta.source: wiki`). All must match.
    #[serde(default, rename = "where")]
    pub where_: BTreeMap<String, Value>,
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
        for key in params.where_.keys() {
            if key.is_empty() || key.split('.').any(str::is_empty) {
                problems.push(FieldProblem::new(
                    format!("where.{key}"),
                    format!("`{key}` is not a field path (e.g. `label` or `meta.source`)"),
                ));
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
        .all(|(path, want)| r.field(path).is_some_and(|got| values_equal(&got, want)))
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
    for (k, v) in &params.where_ {
        parts.push(format!("{k} = {v}"));
    }
    parts.join(", ")
}
