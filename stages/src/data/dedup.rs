//! `data.dedup`: drop records whose text repeats an earlier record's.
//!
//! A record's key is its text pieces in order, each tagged with its part and role
//! ([`dedup_key`]); the first record with a key is kept. `mode: exact` compares the pieces as
//! they are; `mode: normalized` compares each piece's [`normalize_text`]:
//!
//! 1. the compatibility caseless form of Unicode §3.13 (D146):
//!    `NFKD(casefold(NFKD(casefold(NFD(text)))))`, where `casefold` is full case folding
//!    (CaseFolding.txt statuses C and F, Python's `str.casefold`), then composed (NFC) — in
//!    effect NFKC with full case folding: `ﬁ` → `fi`, full-width `Ａ` → `a`, `ß` → `ss`,
//!    `Σ`/`ς` → `σ`, NFD `e` + U+0301 → `é`, no-break space → space;
//! 2. every character that is neither alphanumeric (Unicode Alphabetic or Numeric) nor
//!    whitespace dropped: punctuation, symbols, format characters, and combining marks left over
//!    where no precomposed letter exists (`q` + U+0303 → `q`);
//! 3. whitespace runs collapsed to one space, the ends trimmed.
//!
//! So NFC and NFD `Café` are one key, `cafe` another; `ﬁsh` = `fish`, `Straße` = `STRASSE`,
//! `ＡＢＣ` = `abc`, `Hello,   World!` = `hello world`.

use std::collections::{BTreeMap, HashSet};

use burnish_engine::stage::{
    Accepts, ArtifactType, Input, OutputDecl, RunContext, Sensitivity, Stage, StageError,
    StageOutcome, StageRef,
};
use caseless::Caseless;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use super::records::{Dataset, Record};
use super::{DETERMINISTIC, load_input, same_type, write_output};

/// When two records count as the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DedupMode {
    /// Identical text, character for character.
    #[default]
    Exact,
    /// Identical after Unicode compatibility normalization with full case folding (NFKC +
    /// casefold, Unicode's compatibility caseless form composed: `ﬁ` = `fi`, `ß` = `ss`,
    /// full-width `Ａ` = `a`, NFC `é` = NFD `é` ≠ `e`), then dropping every character that is
    /// neither alphanumeric nor whitespace, collapsing whitespace runs to one space and
    /// trimming.
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
    // 2: `normalized` keys are NFKC + casefold.
    const VERSION: u32 = 2;
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

/// The `normalized` form of a text (see the module doc): Unicode's compatibility caseless form
/// (`NFKD(casefold(NFKD(casefold(NFD(s)))))`, full case folding) composed to NFC, then only
/// alphanumeric and whitespace characters kept, whitespace runs collapsed to one space, trimmed.
pub fn normalize_text(s: &str) -> String {
    let folded: String = s
        .chars()
        .nfd()
        .default_case_fold()
        .nfkd()
        .default_case_fold()
        .nfkd()
        .nfc()
        .collect();
    let kept: String = folded
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
        // Python: unicodedata.normalize("NFKC", s).casefold() for each of these.
        assert_eq!(normalize_text("Caf\u{e9}"), "caf\u{e9}");
        assert_eq!(normalize_text("Cafe\u{301}"), "caf\u{e9}");
        assert_eq!(normalize_text("cafe"), "cafe");
        assert_eq!(normalize_text("\u{fb01}sh"), "fish");
        assert_eq!(normalize_text("Stra\u{df}e"), "strasse");
        assert_eq!(normalize_text("STRASSE"), "strasse");
        assert_eq!(normalize_text("\u{ff21}\u{ff22}\u{ff23}"), "abc");
        assert_eq!(
            normalize_text("\u{3a3}\u{391}\u{3a3}"),
            "\u{3c3}\u{3b1}\u{3c3}"
        );
        assert_eq!(normalize_text("a\u{a0}b\u{3000}c\u{200b}d"), "a b cd");
        assert_eq!(normalize_text("q\u{303}"), "q");
    }
}
