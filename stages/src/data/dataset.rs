//! `dataset`: read a data file and normalize its rows into one record family.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burnish_engine::stage::{
    ArtifactType, FieldProblem, FileInput, Input, ManifestPath, OutputDecl, RunContext,
    Sensitivity, Stage, StageError, StageOutcome,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::formats::{Format, normalize};
use super::hf::{DATA_EXTENSIONS, is_hf, parse_hf, resolve_hf};
use super::records::Dataset;
use super::source::{FileKind, read_rows_named};
use super::{DETERMINISTIC, empty};

/// Parameters of `dataset`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    /// The data file, relative to the manifest: `.jsonl`/`.ndjson` (one object per line), `.json`
    /// (a top-level array of objects), `.csv` (with a header row; message lists may be JSON
    /// strings) or `.parquet`. Or `hf://org/name[/file]`: a dataset already in the local
    /// Hugging Face cache (burnish never downloads); name the file when the snapshot holds more
    /// than one.
    pub path: ManifestPath,
    /// How the rows are laid out; decides the record family of the output.
    pub format: Format,
    /// Canonical field name → the file's field name, for files whose fields are named
    /// differently (e.g. `{messages: conversations}`, `{prompt: question}`).
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

/// The `dataset` stage kind.
pub struct DatasetStage;

impl Stage for DatasetStage {
    const KIND: &'static str = "dataset";
    const VERSION: u32 = 1;
    const ABOUT: &'static str = "Load a data file (JSONL, JSON, CSV, Parquet, or hf:// from the \
                                 local cache) and normalize it into one record family";

    type Params = DatasetParams;

    fn inputs(_params: &DatasetParams) -> Vec<Input> {
        Vec::new()
    }

    fn files(params: &DatasetParams) -> Vec<FileInput> {
        vec![FileInput {
            field: "path".into(),
            path: params.path.clone(),
        }]
    }

    fn outputs(
        params: &DatasetParams,
        _inputs: &BTreeMap<String, ArtifactType>,
    ) -> Vec<OutputDecl> {
        vec![OutputDecl::main(ArtifactType::dataset(
            params.format.family(),
        ))]
    }

    fn check(params: &DatasetParams) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        let path = &params.path.0;
        if is_hf(path) {
            match parse_hf(path) {
                Err(e) => problems.push(FieldProblem::new("path", e.to_string())),
                Ok(hf) => {
                    if let Some(file) = hf.file
                        && FileKind::of(&file).is_none()
                    {
                        problems.push(unsupported(&file));
                    }
                }
            }
        } else if FileKind::of(path).is_none() {
            problems.push(unsupported(path));
        }
        let allowed = params.format.canonical_names();
        for (canon, field) in &params.columns {
            if !allowed.contains(&canon.as_str()) {
                problems.push(
                    FieldProblem::new(
                        format!("columns.{canon}"),
                        format!("format `{}` has no field `{canon}`", params.format.name()),
                    )
                    .help(format!("its fields are: {}", allowed.join(", "))),
                );
            }
            if field.is_empty() {
                problems.push(FieldProblem::new(
                    format!("columns.{canon}"),
                    "the file field name is empty",
                ));
            }
        }
        problems
    }

    fn sensitivity(_params: &DatasetParams) -> Sensitivity {
        DETERMINISTIC
    }

    fn run(params: &DatasetParams, cx: &mut RunContext) -> Result<StageOutcome, StageError> {
        let written = &params.path.0;
        let (path, shown): (PathBuf, String) = if is_hf(written) {
            // The engine may have resolved it already; otherwise resolve from the local cache.
            let path = match cx.file("path") {
                Ok(p) => p.to_path_buf(),
                Err(_) => resolve_hf(written)?,
            };
            let shown = path.display().to_string();
            (path, shown)
        } else {
            (cx.file("path")?.to_path_buf(), written.clone())
        };
        cx.progress().set_message(&format!("reading {shown}"));
        let rows = read_rows_named(&path, &shown)?;
        if rows.is_empty() {
            return Err(empty(&shown, "the file holds no rows"));
        }
        let records = normalize(params.format, &params.columns, &rows)?;
        let ds = Dataset::new(params.format.family(), records);
        cx.log(format!(
            "{shown}: {} rows → {} {} records",
            rows.len(),
            ds.len(),
            ds.family
        ));
        super::write_output(cx, None, &ds)?;
        Ok(StageOutcome::default().metric("records", ds.len()))
    }
}

fn unsupported(path: &str) -> FieldProblem {
    FieldProblem::new(
        "path",
        format!("`{path}` is not a data file this stage reads"),
    )
    .help(format!(
        "data files end in .{}",
        DATA_EXTENSIONS.join(", .")
    ))
}
