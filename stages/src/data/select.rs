//! `data.select`: the best records by a numeric field (top-k or threshold), or a seeded sample.

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactType, FieldProblem, Input, OutputDecl, RunContext, Sensitivity, Stage,
    StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::DataError;
use super::records::{Dataset, Record};
use super::rng::Rng;
use super::source::describe;
use super::{empty, load_input, same_type, write_output};

/// Parameters of `data.select`. Exactly one mode: `by` with `top_k`, `by` with `threshold`, or
/// `sample` (with an optional `seed`). Selected records keep their input order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectParams {
    /// The dataset to select from (any family).
    pub data: StageRef,
    /// The numeric field to rank by: a top-level field or a source column kept in meta
    /// (`meta.score`). Numbers written as strings (CSV cells) are read as numbers.
    #[serde(default)]
    pub by: Option<String>,
    /// Keep the `top_k` records with the highest `by` (ties: the earlier record wins).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Keep the records whose `by` is at least `threshold`.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Keep `sample` records drawn at random without replacement.
    #[serde(default)]
    pub sample: Option<usize>,
    /// Seed for `sample`; when absent, the pipeline seed.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// The `data.select` stage kind.
pub struct SelectStage;

impl Stage for SelectStage {
    const KIND: &'static str = "data.select";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Keep the top-k records by a numeric field, those above a threshold, or a seeded sample";

    type Params = SelectParams;

    fn inputs(params: &SelectParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: params.data.clone(),
            accepts: Accepts::any_dataset(),
        }]
    }

    fn outputs(_params: &SelectParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(same_type(inputs, "data"))]
    }

    fn check(p: &SelectParams) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        let modes = [
            ("top_k", p.top_k.is_some()),
            ("threshold", p.threshold.is_some()),
            ("sample", p.sample.is_some()),
        ];
        let given: Vec<&str> = modes.iter().filter(|m| m.1).map(|m| m.0).collect();
        match given.as_slice() {
            [] => problems.push(
                FieldProblem::new("data", "no selection mode")
                    .help("give `by` with `top_k` or `threshold`, or `sample`"),
            ),
            [_] => {}
            [_, second, ..] => problems.push(
                FieldProblem::new(
                    *second,
                    format!("`{}` and `{second}` are alternatives; give one", given[0]),
                )
                .help("select by `top_k`, by `threshold`, or by `sample`"),
            ),
        }
        if (p.top_k.is_some() || p.threshold.is_some()) && p.by.is_none() {
            let field = if p.top_k.is_some() {
                "top_k"
            } else {
                "threshold"
            };
            problems.push(
                FieldProblem::new(field, format!("`{field}` needs `by`, the field to rank on"))
                    .help("e.g. by: meta.score"),
            );
        }
        if let Some(by) = &p.by {
            if p.top_k.is_none() && p.threshold.is_none() {
                problems.push(
                    FieldProblem::new("by", "`by` needs `top_k` or `threshold`")
                        .help("e.g. top_k: 100"),
                );
            }
            if by.is_empty() || by.split('.').any(str::is_empty) {
                problems.push(FieldProblem::new(
                    "by",
                    format!("`{by}` is not a field path (e.g. `meta.score`)"),
                ));
            }
        }
        if p.seed.is_some() && p.sample.is_none() {
            problems.push(FieldProblem::new("seed", "`seed` only applies to `sample`"));
        }
        if p.top_k == Some(0) {
            problems.push(FieldProblem::new("top_k", "top_k must be at least 1"));
        }
        if p.sample == Some(0) {
            problems.push(FieldProblem::new("sample", "sample must be at least 1"));
        }
        if let Some(t) = p.threshold
            && !t.is_finite()
        {
            problems.push(FieldProblem::new(
                "threshold",
                format!("threshold must be finite, found {t}"),
            ));
        }
        problems
    }

    /// Seed-sensitive only for `sample` without its own `seed`.
    fn sensitivity(p: &SelectParams) -> Sensitivity {
        Sensitivity {
            seed: p.sample.is_some() && p.seed.is_none(),
            backend: false,
            names: false,
        }
    }

    fn run(p: &SelectParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let ds = load_input(cx, "data")?;
        let n = ds.len();
        let picked: Vec<usize> = match (p.sample, &p.by, p.top_k, p.threshold) {
            (Some(k), _, _, _) => {
                if k > n {
                    return Err(DataError::TooSmall {
                        message: format!("data.select cannot sample {k} of {n} records"),
                        help: Some(format!("sample at most {n}")),
                    }
                    .into());
                }
                let mut idx = Rng::new(p.seed.unwrap_or(cx.seed())).sample_indices(n, k);
                idx.sort_unstable();
                idx
            }
            (None, Some(by), Some(k), None) => {
                let values = numbers(&ds.records, by)?;
                if k > n {
                    return Err(DataError::TooSmall {
                        message: format!("data.select cannot keep the top {k} of {n} records"),
                        help: Some(format!("top_k at most {n}")),
                    }
                    .into());
                }
                let mut order: Vec<usize> = (0..n).collect();
                // Highest first; a stable sort keeps the earlier record first among equals.
                order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
                let mut idx = order[..k].to_vec();
                idx.sort_unstable();
                idx
            }
            (None, Some(by), None, Some(t)) => {
                let values = numbers(&ds.records, by)?;
                let idx: Vec<usize> = (0..n).filter(|&i| values[i] >= t).collect();
                if idx.is_empty() {
                    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    return Err(empty(
                        "data.select",
                        format!("no record of {n} has {by} >= {t} (the highest is {max})"),
                    ));
                }
                idx
            }
            _ => {
                return Err(Box::new(burnish_engine::error::InternalError(
                    "data.select ran with parameters check() rejects".into(),
                )));
            }
        };
        let mut keep = vec![false; n];
        for &i in &picked {
            keep[i] = true;
        }
        let records: Vec<Record> = ds
            .records
            .into_iter()
            .zip(keep)
            .filter_map(|(r, k)| k.then_some(r))
            .collect();
        let out = Dataset::new(ds.family, records);
        write_output(cx, None, &out)?;
        Ok(StageOutcome::default()
            .metric("kept", out.len())
            .metric("dropped", n - out.len()))
    }
}

/// The numeric value of `field` on every record.
fn numbers(records: &[Record], field: &str) -> Result<Vec<f64>, DataError> {
    records
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let bad = |problem: String| DataError::NotNumeric {
                index,
                field: field.to_owned(),
                problem,
            };
            match r.field(field) {
                None => Err(bad("is missing".into())),
                Some(Value::Number(n)) => n
                    .as_f64()
                    .ok_or_else(|| bad(format!("is {n}, not a number burnish can compare"))),
                Some(Value::String(s)) => match s.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() => Ok(x),
                    _ => Err(bad(format!(
                        "is {}, not a number",
                        describe(&Value::String(s))
                    ))),
                },
                Some(other) => Err(bad(format!("is {}, not a number", describe(&other)))),
            }
        })
        .collect()
}
