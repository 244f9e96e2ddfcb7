//! `data.split`: a seeded train/eval split.

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactType, FieldProblem, Input, OutputDecl, RunContext, Sensitivity, Stage,
    StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::records::Dataset;
use super::rng::Rng;
use super::{empty, load_input, same_type, write_output};

/// Parameters of `data.split`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    /// The dataset to split (any family).
    pub data: StageRef,
    /// Fraction of the records that go to the `eval` output, strictly between 0 and 1; the count
    /// is rounded to the nearest record.
    pub eval_fraction: f64,
    /// Shuffle seed; when absent, the pipeline seed.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// The `data.split` stage kind: outputs `train` and `eval`, each keeping the input's order.
pub struct SplitStage;

impl Stage for SplitStage {
    const KIND: &'static str = "data.split";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Split a dataset into `train` and `eval` outputs at random (seeded)";

    type Params = SplitParams;

    fn inputs(params: &SplitParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: params.data.clone(),
            accepts: Accepts::any_dataset(),
        }]
    }

    fn outputs(_params: &SplitParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        let ty = same_type(inputs, "data");
        vec![
            OutputDecl::named("train", ty),
            OutputDecl::named("eval", ty),
        ]
    }

    fn check(params: &SplitParams) -> Vec<FieldProblem> {
        let f = params.eval_fraction;
        if f.is_finite() && f > 0.0 && f < 1.0 {
            Vec::new()
        } else {
            vec![
                FieldProblem::new(
                    "eval_fraction",
                    format!("eval_fraction must be strictly between 0 and 1, found {f}"),
                )
                .help("e.g. 0.1 keeps a tenth of the records for evaluation"),
            ]
        }
    }

    /// Seed-sensitive only when no `seed` is given (the pipeline seed is used then).
    fn sensitivity(params: &SplitParams) -> Sensitivity {
        Sensitivity {
            seed: params.seed.is_none(),
            backend: false,
            names: false,
        }
    }

    fn run(params: &SplitParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let ds = load_input(cx, "data")?;
        let n = ds.len();
        let n_eval = (n as f64 * params.eval_fraction).round() as usize;
        if n_eval == 0 {
            return Err(empty(
                "the eval output of data.split",
                format!(
                    "eval_fraction {} of {n} records rounds to 0",
                    params.eval_fraction
                ),
            ));
        }
        if n_eval >= n {
            return Err(empty(
                "the train output of data.split",
                format!(
                    "eval_fraction {} of {n} records rounds to all {n}",
                    params.eval_fraction
                ),
            ));
        }
        let mut order: Vec<usize> = (0..n).collect();
        Rng::new(params.seed.unwrap_or(cx.seed())).shuffle(&mut order);
        let mut in_eval = vec![false; n];
        for &i in &order[..n_eval] {
            in_eval[i] = true;
        }
        let (mut train, mut eval) = (Vec::with_capacity(n - n_eval), Vec::with_capacity(n_eval));
        for (rec, is_eval) in ds.records.into_iter().zip(in_eval) {
            if is_eval {
                eval.push(rec);
            } else {
                train.push(rec);
            }
        }
        let train = Dataset::new(ds.family, train);
        let eval = Dataset::new(ds.family, eval);
        write_output(cx, Some("train"), &train)?;
        write_output(cx, Some("eval"), &eval)?;
        Ok(StageOutcome::default()
            .metric("train", train.len())
            .metric("eval", eval.len()))
    }
}
