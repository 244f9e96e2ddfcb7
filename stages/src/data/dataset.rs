//! `dataset`: read a data file (or the files of a split) and normalize its rows into one record
//! family.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burnish_engine::stage::{
    ArtifactType, FieldProblem, FileInput, Input, ManifestPath, OutputDecl, RunContext,
    Sensitivity, Stage, StageError, StageOutcome,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::DataError;
use super::formats::{Format, normalize};
use super::hf::{
    DATA_FILES_HELP, hf_cache_dirs, is_glob, is_hf, parse_hf, resolve_hf_files,
    resolve_hf_files_in, valid_split_name, with_split,
};
use super::records::Dataset;
use super::source::{FileKind, read_rows_named, saved_dataset_files};
use super::{DETERMINISTIC, empty};

/// Parameters of `dataset`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    /// The data file, relative to the manifest: `.jsonl`/`.ndjson` (one object per line), `.json`
    /// (a top-level array of objects), `.csv` (with a header row; message lists may be JSON
    /// strings), `.tsv`, each of them maybe gzip'ed (`.jsonl.gz`), `.parquet` or `.arrow` (Arrow
    /// IPC); or a directory written by `datasets`' `save_to_disk`. Or
    /// `hf://datasets/org/name[@revision][/path]` (also `hf://org/name…`): a dataset already in
    /// the local Hugging Face cache (burnish never downloads), the path in the repository a
    /// file, a directory or a glob (`data/train-*.parquet`); name the file when the snapshot
    /// holds more than one and they are not the shards of one split.
    pub path: ManifestPath,
    /// The split to read, as `datasets.load_dataset(split=…)` finds it: all shards of
    /// `data/train-NNNNN-of-NNNNN.parquet`, files under `train/`, files named for the split
    /// (`train.csv`), in order; every shard must be present. Or a split of a saved
    /// `DatasetDict`. For an `hf://` repository (or a directory in it) or a `save_to_disk`
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// How the rows are laid out; decides the record family of the output.
    pub format: Format,
    /// Canonical field name → the file's field name, for files whose fields are named
    /// differently (e.g. `{messages: conversations}`, `{prompt: question}`).
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

/// The file inputs of a `dataset` stage, `hf://` paths resolved against `caches`: one per data
/// file, `path` then `path[1]`, `path[2]`, … in reading order, each hashed into the fingerprint.
/// A path that does not resolve stays as written (with its split as `?split=`), for the
/// engine's resolver to report why.
pub fn dataset_files_in(params: &DatasetParams, caches: &[PathBuf]) -> Vec<FileInput> {
    let written = &params.path.0;
    if !is_hf(written) {
        return vec![FileInput {
            field: "path".into(),
            path: params.path.clone(),
        }];
    }
    let split = params.split.as_deref();
    match resolve_hf_files_in(written, split, caches) {
        Ok(files) if files.iter().all(|f| f.to_str().is_some()) => files
            .iter()
            .enumerate()
            .map(|(i, f)| FileInput {
                field: file_field(i),
                path: ManifestPath(f.to_string_lossy().into_owned()),
            })
            .collect(),
        _ => vec![FileInput {
            field: "path".into(),
            path: ManifestPath(with_split(written, split)),
        }],
    }
}

fn file_field(i: usize) -> String {
    if i == 0 {
        "path".into()
    } else {
        format!("path[{i}]")
    }
}

/// The `dataset` stage kind.
pub struct DatasetStage;

impl Stage for DatasetStage {
    const KIND: &'static str = "dataset";
    const VERSION: u32 = 2;
    const ABOUT: &'static str = "Load a data file (JSONL, JSON, CSV, TSV, Parquet, Arrow, a \
                                 save_to_disk directory, or hf:// from the local cache, a split \
                                 of it) and normalize it into one record family";

    type Params = DatasetParams;

    fn inputs(_params: &DatasetParams) -> Vec<Input> {
        Vec::new()
    }

    fn files(params: &DatasetParams) -> Vec<FileInput> {
        dataset_files_in(params, &hf_cache_dirs())
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
        if let Some(split) = &params.split
            && !valid_split_name(split)
        {
            problems.push(
                FieldProblem::new(
                    "split",
                    format!("`{split}` is not a split name (letters, digits, `_`, `.`)"),
                )
                .help("slices such as `train[:100]` are not supported: take rows with data.select"),
            );
        }
        let split_on_file = || {
            FieldProblem::new(
                "split",
                "a split picks files of an hf:// repository or directory, or of a save_to_disk \
                 directory; `path` names one file",
            )
            .help("drop `split:`, or point `path` at the repository or directory")
        };
        if is_hf(path) {
            match parse_hf(path) {
                Err(e) => problems.push(FieldProblem::new("path", e.to_string())),
                Ok(hf) => {
                    if let (Some(a), Some(b)) = (&params.split, &hf.split)
                        && a != b
                    {
                        problems.push(FieldProblem::new(
                            "split",
                            format!("`split: {a}` contradicts `?split={b}` in the path"),
                        ));
                    }
                    let split = params.split.is_some() || hf.split.is_some();
                    if let Some(file) = &hf.file {
                        if is_glob(file) {
                            if let Err(e) = glob::Pattern::new(file) {
                                problems.push(FieldProblem::new(
                                    "path",
                                    format!("`{file}` is not a valid glob: {e}"),
                                ));
                            }
                            if split {
                                problems.push(
                                    FieldProblem::new(
                                        "split",
                                        "the glob in `path` already picks the files",
                                    )
                                    .help("drop `split:`, or drop the glob"),
                                );
                            }
                        } else if FileKind::of(file).is_some() {
                            if split {
                                problems.push(split_on_file());
                            }
                        } else if Path::new(file).extension().is_some() {
                            problems.push(unsupported(file));
                        }
                    }
                }
            }
        } else if FileKind::of(path).is_some() {
            if params.split.is_some() {
                problems.push(split_on_file());
            }
        } else if Path::new(path).extension().is_some() {
            // Without an extension, it may be a `save_to_disk` directory.
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
        let split = params.split.as_deref();
        // (the file, how messages name it)
        let sources: Vec<(PathBuf, String)> = if is_hf(written) {
            // The engine resolved them already (see `files`); standalone, resolve here.
            let paths = match cx.file("path") {
                Ok(first) => {
                    let mut paths = vec![first.to_path_buf()];
                    while let Ok(p) = cx.file(&file_field(paths.len())) {
                        paths.push(p.to_path_buf());
                    }
                    paths
                }
                Err(_) => resolve_hf_files(written, split)?,
            };
            paths
                .into_iter()
                .map(|p| {
                    let shown = p.display().to_string();
                    (p, shown)
                })
                .collect()
        } else {
            let path = cx.file("path")?.to_path_buf();
            if path.is_dir() {
                let Some(files) = saved_dataset_files(&path, split)? else {
                    return Err(DataError::SavedDataset {
                        path: written.clone(),
                        message: "a directory, and not one `save_to_disk` wrote (no state.json \
                                  or dataset_dict.json)"
                            .into(),
                        help: Some(format!("name a data file: {DATA_FILES_HELP}")),
                    }
                    .into());
                };
                files
                    .into_iter()
                    .map(|f| {
                        let rel = f.strip_prefix(&path).unwrap_or(&f).to_path_buf();
                        let shown = Path::new(written).join(rel).display().to_string();
                        (f, shown)
                    })
                    .collect()
            } else {
                vec![(path, written.clone())]
            }
        };
        let mut rows = Vec::new();
        for (path, shown) in &sources {
            cx.progress().set_message(&format!("reading {shown}"));
            rows.extend(read_rows_named(path, shown)?);
        }
        let shown = match sources.as_slice() {
            [(_, one)] => one.clone(),
            [(_, first), ..] => format!("{first} and {} more files", sources.len() - 1),
            [] => written.clone(),
        };
        if rows.is_empty() {
            let reason = if sources.len() > 1 {
                "the files hold no rows"
            } else {
                "the file holds no rows"
            };
            return Err(empty(&shown, reason));
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
    .help(DATA_FILES_HELP)
}
