//! `data.dedup`: drop records whose text repeats an earlier record's.

use std::collections::{BTreeMap, HashSet};

use burnish_engine::stage::{
    Accepts, ArtifactType, Input, OutputDecl, RunContext, Sensitivity, Stage, StageError,
    StageOutcome, StageRef,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::records::{Dataset, Record};
use super::{DETERMINISTIC, load_input, same_type, write_output};

/// When two records count as the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DedupMode {
    /// Identical text, character for character.
    #[default]
    Exact,
    /// Identical after lowercasing, removing punctuation and collapsing whitespace.
    Normalized,
}

/// Parameters of `data.dedup`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupParams {
    /// The dataset to deduplicate (any family). The key is the record's text (every message with
    /// its role, completions, responses…; not labels or meta); the first occurrence is kept.
    pub data: StageRef,
    /// How texts are compared.
    #[serde(default)]
    pub mode: DedupMode,
}

/// The `data.dedup` stage kind.
pub struct DedupStage;

impl Stage for DedupStage {
    const KIND: &'static str = "data.dedup";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "Drop records whose text repeats an earlier one (exact or normalized)";

    type Params = DedupParams;

    fn inputs(params: &DedupParams) -> Vec<Input> {
        vec![Input {
            field: "data".into(),
            reference: params.data.clone(),
            accepts: Accepts::any_dataset(),
        }]
    }

    fn outputs(_params: &DedupParams, inputs: &BTreeMap<String, ArtifactType>) -> Vec<OutputDecl> {
        vec![OutputDecl::main(same_type(inputs, "data"))]
    }

    fn sensitivity(_params: &DedupParams) -> Sensitivity {
        DETERMINISTIC
    }

    fn run(params: &DedupParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let ds = load_input(cx, "data")?;
        let n = ds.len();
        let mut seen = HashSet::with_capacity(n);
        let kept: Vec<Record> = ds
            .records
            .into_iter()
            .filter(|r| seen.insert(dedup_key(r, params.mode)))
            .collect();
        let out = Dataset::new(ds.family, kept);
        write_output(cx, None, &out)?;
        Ok(StageOutcome::default()
            .metric("kept", out.len())
            .metric("removed", n - out.len()))
    }
}

/// The text of a record as one string: each piece tagged with its part and role, so that the same
/// words in different places do not collide.
pub fn dedup_key(r: &Record, mode: DedupMode) -> String {
    let mut key = String::new();
    r.visit_text(&mut |part, role, text| {
        key.push_str(part);
        if let Some(role) = role {
            key.push('.');
            key.push_str(role.as_str());
        }
        key.push('\u{1f}');
        match mode {
            DedupMode::Exact => key.push_str(text),
            DedupMode::Normalized => key.push_str(&normalize_text(text)),
        }
        key.push('\u{1e}');
    });
    key
}

/// Lowercase, drop punctuation and symbols (anything not alphanumeric or whitespace), collapse
/// whitespace runs to one space, trim.
pub fn normalize_text(s: &str) -> String {
    let lowered = s.to_lowercase();
    let kept: String = lowered
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        assert_eq!(normalize_text("  Hello,   World!\n"), "hello world");
        assert_eq!(normalize_text("Don't STOP."), "dont stop");
    }
}
