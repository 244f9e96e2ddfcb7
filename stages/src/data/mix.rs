//! `data.mix`: a weighted, seeded mixture of datasets of one family.

use std::collections::BTreeMap;

use burnish_engine::stage::{
    Accepts, ArtifactKind, ArtifactType, FieldProblem, Input, OutputDecl, RunContext, Sensitivity,
    Stage, StageError, StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::DataError;
use super::records::{Dataset, Record};
use super::rng::Rng;
use super::{load_input, write_output};

/// One source of a mixture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// The dataset to draw from.
    pub data: StageRef,
    /// Its share of the mixture, relative to the other weights (positive).
    pub weight: f64,
}

/// Parameters of `data.mix`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MixParams {
    /// The datasets to mix, all of one record family.
    pub sources: Vec<MixSource>,
    /// How many records the mixture holds. Each source's count is `total × weight / Σweights`,
    /// rounded by largest remainder so the counts add up to `total` exactly.
    pub total: usize,
    /// Seed for drawing and interleaving; when absent, the pipeline seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Draw with replacement (a source may then give more records than it has).
    #[serde(default)]
    pub replace: bool,
}

/// The `data.mix` stage kind.
pub struct MixStage;

fn source_field(i: usize) -> String {
    format!("sources[{i}].data")
}

impl Stage for MixStage {
    const KIND: &'static str = "data.mix";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Mix datasets of one family by weight into a fixed number of records (seeded)";

    type Params = MixParams;

    fn inputs(params: &MixParams) -> Vec<Input> {
        params
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| Input {
                field: source_field(i),
                reference: s.data.clone(),
                accepts: Accepts::any_dataset(),
            })
            .collect()
    }

    /// The sources' family when they agree; a dataset of unknown family otherwise (the run then
    /// fails, naming the sources).
    fn outputs(params: &MixParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        let mut families =
            (0..params.sources.len()).map(|i| inputs.get(&source_field(i)).and_then(|t| t.family));
        let first = families.next().flatten();
        let ty = match first {
            Some(f) if families.all(|g| g == Some(f)) => ArtifactType::dataset(f),
            _ => ArtifactType::of(ArtifactKind::Dataset),
        };
        vec![OutputDecl::main(ty)]
    }

    fn check(params: &MixParams) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        if params.sources.is_empty() {
            problems.push(FieldProblem::new("sources", "no sources to mix"));
        }
        for (i, s) in params.sources.iter().enumerate() {
            if !(s.weight.is_finite() && s.weight > 0.0) {
                problems.push(FieldProblem::new(
                    format!("sources[{i}].weight"),
                    format!("a weight must be positive, found {}", s.weight),
                ));
            }
        }
        if params.total == 0 {
            problems.push(FieldProblem::new("total", "total must be at least 1"));
        }
        problems
    }

    /// Seed-sensitive only when no `seed` is given (the pipeline seed is used then).
    fn sensitivity(params: &MixParams) -> Sensitivity {
        Sensitivity {
            seed: params.seed.is_none(),
            backend: false,
            names: false,
        }
    }

    fn run(params: &MixParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let mut sources: Vec<Dataset> = Vec::with_capacity(params.sources.len());
        for i in 0..params.sources.len() {
            let ds = load_input(cx, &source_field(i))?;
            if let Some(first) = sources.first()
                && ds.family != first.family
            {
                return Err(DataError::WrongFamily {
                    what: format!("{} (`{}`)", source_field(i), params.sources[i].data),
                    found: ds.family,
                    expected: format!(
                        "{} like {} (`{}`): a mixture holds one family",
                        first.family,
                        source_field(0),
                        params.sources[0].data
                    ),
                }
                .into());
            }
            sources.push(ds);
        }
        let weights: Vec<f64> = params.sources.iter().map(|s| s.weight).collect();
        let counts = allocate(params.total, &weights);
        if !params.replace {
            for (i, (ds, &want)) in sources.iter().zip(&counts).enumerate() {
                if want > ds.len() {
                    return Err(DataError::TooSmall {
                        message: format!(
                            "{} (`{}`) has {} records, but its weight {} asks for {want} of {}",
                            source_field(i),
                            params.sources[i].data,
                            ds.len(),
                            params.sources[i].weight,
                            params.total
                        ),
                        help: Some(
                            "lower `total` or this weight, or set `replace: true` to draw with \
                             replacement"
                                .into(),
                        ),
                    }
                    .into());
                }
            }
        }
        for (i, (ds, &want)) in sources.iter().zip(&counts).enumerate() {
            if want > 0 && ds.is_empty() {
                return Err(DataError::TooSmall {
                    message: format!(
                        "{} (`{}`) has no records, but its weight asks for {want}",
                        source_field(i),
                        params.sources[i].data
                    ),
                    help: None,
                }
                .into());
            }
        }
        let family = sources[0].family;
        let mut rng = Rng::new(params.seed.unwrap_or(cx.seed()));
        let mut mixed: Vec<Record> = Vec::with_capacity(params.total);
        for (ds, &want) in sources.iter().zip(&counts) {
            let picks: Vec<usize> = if params.replace {
                (0..want).map(|_| rng.below(ds.len())).collect()
            } else {
                rng.sample_indices(ds.len(), want)
            };
            mixed.extend(picks.into_iter().map(|j| ds.records[j].clone()));
        }
        rng.shuffle(&mut mixed);
        let out = Dataset::new(family, mixed);
        write_output(cx, None, &out)?;
        let mut outcome = StageOutcome::default().metric("records", out.len());
        for (i, c) in counts.iter().enumerate() {
            outcome = outcome.metric(&format!("source_{i}"), *c);
        }
        Ok(outcome)
    }
}

/// Split `total` by weight with the largest-remainder method: each source gets the floor of its
/// exact share, and the records left over go one each to the largest fractional parts (ties: the
/// earlier source).
pub fn allocate(total: usize, weights: &[f64]) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    if weights.is_empty() || sum <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    // The epsilon keeps 6.9999999 (7 after float error) from flooring to 6.
    let mut counts: Vec<usize> = exact.iter().map(|q| (q + 1e-9).floor() as usize).collect();
    let assigned: usize = counts.iter().sum();
    let mut left = total.saturating_sub(assigned);
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = exact[a] - counts[a] as f64;
        let fb = exact[b] - counts[b] as f64;
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::allocate;

    #[test]
    fn largest_remainder() {
        assert_eq!(allocate(10, &[0.7, 0.3]), vec![7, 3]);
        assert_eq!(allocate(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(allocate(100, &[2.0, 1.0]), vec![67, 33]);
        assert_eq!(allocate(7, &[0.5, 0.25, 0.25]), vec![3, 2, 2]);
        assert_eq!(allocate(1, &[1.0, 3.0]), vec![0, 1]);
    }
}
