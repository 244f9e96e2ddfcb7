//! The data stage kinds: `dataset` (load and normalize a file), `data.split`, `data.filter`,
//! `data.dedup`, `data.select`, `data.mix`, `data.convert`, and `data.generate` (seeded synthetic
//! problems with known answers, see [`problems`]).
//!
//! Every one of them yields a Dataset artifact: `records.jsonl` of one record family (see
//! [`records`]) and `dataset.json`.

pub mod convert;
pub mod dataset;
pub mod dedup;
pub mod error;
pub mod filter;
pub mod formats;
pub mod hf;
pub mod mix;
pub mod problems;
pub mod records;
pub(crate) mod rng;
pub mod select;
pub mod source;
pub mod split;

use std::collections::BTreeMap;

use burnish_engine::stage::{
    ArtifactKind, ArtifactType, DatasetFamily, Registry, RunContext, Sensitivity, StageError,
};

pub use convert::{ConvertParams, ConvertStage};
pub use dataset::{DatasetParams, DatasetStage};
pub use dedup::{DedupParams, DedupStage};
pub use error::{DataError, Location, Position};
pub use filter::{FilterParams, FilterStage};
pub use formats::Format;
pub use hf::{hf_cache_dirs, resolve_hf, resolve_hf_in};
pub use mix::{MixParams, MixStage};
pub use records::{
    ChatRecord, Dataset, DatasetInfo, FamilyRecord, LabeledRecord, Message, Meta, PreferenceRecord,
    RankedResponse, RankingRecord, ReasoningRecord, Record, Role, TextRecord, read_records,
};
pub use select::{SelectParams, SelectStage};
pub use split::{SplitParams, SplitStage};

/// Register every data stage kind.
pub fn register_data(reg: &mut Registry) {
    reg.register::<DatasetStage>()
        .register::<SplitStage>()
        .register::<FilterStage>()
        .register::<DedupStage>()
        .register::<SelectStage>()
        .register::<MixStage>()
        .register::<ConvertStage>()
        .register::<problems::ProblemsStage>();
}

/// Neither seed- nor backend-sensitive.
pub(crate) const DETERMINISTIC: Sensitivity = Sensitivity {
    seed: false,
    backend: false,
    names: false,
};

/// The type of the input bound to `field`, for stages whose output has the input's family.
pub(crate) fn same_type(inputs: &BTreeMap<String, ArtifactType>, field: &str) -> ArtifactType {
    inputs
        .get(field)
        .copied()
        .unwrap_or(ArtifactType::of(ArtifactKind::Dataset))
}

/// Read the Dataset artifact bound to an input field.
pub(crate) fn load_input(cx: &RunContext, field: &str) -> Result<Dataset, StageError> {
    let art = cx.input(field)?;
    let ds = Dataset::read(&art.dir)?;
    if let Some(declared) = art.ty.family
        && declared != ds.family
    {
        return Err(DataError::WrongFamily {
            what: format!("input `{field}`"),
            found: ds.family,
            expected: format!("{declared} (its declared type)"),
        }
        .into());
    }
    Ok(ds)
}

/// Read the Dataset artifact bound to an input field as typed records of one family; a dataset
/// of another family is an error naming the field.
pub(crate) fn input_records<T: records::FamilyRecord>(
    cx: &RunContext,
    field: &str,
) -> Result<Vec<T>, StageError> {
    let art = cx.input(field)?;
    let info = records::read_info(&art.dir)?;
    if info.family != T::FAMILY {
        return Err(DataError::WrongFamily {
            what: format!("input `{field}`"),
            found: info.family,
            expected: T::FAMILY.to_string(),
        }
        .into());
    }
    Ok(records::read_records::<T>(&art.dir)?)
}

/// Fail unless a loaded input has one of the families a stage accepts.
pub(crate) fn require_family(
    field: &str,
    ds: &Dataset,
    families: &[DatasetFamily],
) -> Result<(), DataError> {
    if families.contains(&ds.family) {
        return Ok(());
    }
    let names: Vec<String> = families.iter().map(|f| f.to_string()).collect();
    Err(DataError::WrongFamily {
        what: format!("input `{field}`"),
        found: ds.family,
        expected: names.join(" or "),
    })
}

/// Write a dataset to an output (`None` = the main output).
pub(crate) fn write_output(
    cx: &RunContext,
    name: Option<&str>,
    ds: &Dataset,
) -> Result<(), StageError> {
    let dir = cx.output_dir(name)?;
    ds.write(dir)?;
    Ok(())
}

/// `what left no records: reason`.
pub(crate) fn empty(what: &str, reason: impl Into<String>) -> StageError {
    DataError::Empty {
        what: what.to_owned(),
        reason: reason.into(),
    }
    .into()
}
