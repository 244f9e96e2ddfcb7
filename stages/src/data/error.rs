//! What goes wrong with data, said with the file, the line and the field.

use std::fmt;
use std::path::Path;

use burnish_engine::stage::DatasetFamily;
use miette::Diagnostic;
use thiserror::Error;

/// Where a source row sits in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub at: Position,
}

/// A row's position: JSONL and CSV rows by line (1-based, as editors count), JSON array items and
/// Parquet rows by index (0-based, as `data[i]` and `df.iloc[i]` count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Line(u64),
    Index(usize),
    Row(usize),
    Whole,
}

impl Location {
    pub fn line(path: &Path, line: u64) -> Self {
        Location {
            file: path.display().to_string(),
            at: Position::Line(line),
        }
    }
    pub fn index(path: &Path, index: usize) -> Self {
        Location {
            file: path.display().to_string(),
            at: Position::Index(index),
        }
    }
    pub fn row(path: &Path, row: usize) -> Self {
        Location {
            file: path.display().to_string(),
            at: Position::Row(row),
        }
    }
    pub fn whole(path: &Path) -> Self {
        Location {
            file: path.display().to_string(),
            at: Position::Whole,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Position::Line(n) => write!(f, "{}:{n}", self.file),
            Position::Index(i) => write!(f, "{}[{i}]", self.file),
            Position::Row(i) => write!(f, "{} row {i}", self.file),
            Position::Whole => write!(f, "{}", self.file),
        }
    }
}

/// A data stage failure.
#[derive(Debug, Error, Diagnostic)]
pub enum DataError {
    #[error("cannot {action} {path}: {source}")]
    #[diagnostic(code(burnish::data::io))]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{at}: malformed {what}: {message}")]
    #[diagnostic(code(burnish::data::malformed))]
    Malformed {
        at: Location,
        what: &'static str,
        message: String,
    },

    #[error("{at}: missing field `{field}`")]
    #[diagnostic(code(burnish::data::missing_field))]
    MissingField {
        at: Location,
        field: String,
        #[help]
        help: Option<String>,
    },

    #[error("{at}: field `{field}` should be {expected}, found {found}")]
    #[diagnostic(code(burnish::data::wrong_type))]
    WrongType {
        at: Location,
        field: String,
        expected: &'static str,
        found: String,
    },

    #[error("{at}: field `{field}`: {message}")]
    #[diagnostic(code(burnish::data::bad_value))]
    BadValue {
        at: Location,
        field: String,
        message: String,
    },

    #[error("{at}: not a {family} record: {message}")]
    #[diagnostic(code(burnish::data::wrong_record))]
    WrongRecord {
        at: Location,
        family: DatasetFamily,
        message: String,
    },

    #[error("{what} is a {found} dataset, expected {expected}")]
    #[diagnostic(code(burnish::data::wrong_family))]
    WrongFamily {
        what: String,
        found: DatasetFamily,
        expected: String,
    },

    #[error("{path}: inconsistent dataset artifact: {message}")]
    #[diagnostic(
        code(burnish::data::inconsistent),
        help(
            "the artifact was not written by this version of burnish, or was edited; `burnish verify` re-hashes the cache"
        )
    )]
    Inconsistent { path: String, message: String },

    #[error("{what} left no records: {reason}")]
    #[diagnostic(code(burnish::data::empty))]
    Empty { what: String, reason: String },

    #[error("{message}")]
    #[diagnostic(code(burnish::data::too_small))]
    TooSmall {
        message: String,
        #[help]
        help: Option<String>,
    },

    #[error("record {index}: field `{field}` {problem}")]
    #[diagnostic(code(burnish::data::not_numeric))]
    NotNumeric {
        index: usize,
        field: String,
        problem: String,
    },

    #[error("{path}: unsupported file type `{ext}`")]
    #[diagnostic(
        code(burnish::data::file_type),
        help(
            "dataset files are .jsonl, .ndjson, .json (a top-level array), .csv (with a header row), .tsv, .parquet or .arrow; the text ones may be gzip'ed (.jsonl.gz)"
        )
    )]
    FileType { path: String, ext: String },

    #[error("`{spec}` is not a valid hf:// path: {reason}")]
    #[diagnostic(
        code(burnish::data::hf_path),
        help(
            "write hf://datasets/org/name[@revision][/path/in/repo] (the path may be a file, a directory or a glob such as data/train-*.parquet)"
        )
    )]
    HfPath { spec: String, reason: String },

    #[error("`{spec}`: {message}")]
    #[diagnostic(code(burnish::data::hf_revision))]
    HfRevision {
        spec: String,
        message: String,
        #[help]
        help: Option<String>,
    },

    #[error("`{spec}`: shard `{file}` is missing ({present} of the {total} shards are in {dir})")]
    #[diagnostic(code(burnish::data::missing_shard))]
    MissingShard {
        spec: String,
        /// The missing shard, relative to `dir`.
        file: String,
        present: usize,
        total: usize,
        dir: String,
        #[help]
        help: Option<String>,
    },

    #[error("{path}: {message}")]
    #[diagnostic(code(burnish::data::saved_dataset))]
    SavedDataset {
        path: String,
        message: String,
        #[help]
        help: Option<String>,
    },

    #[error("`{spec}` is not in the local hugging face cache (searched {searched})")]
    #[diagnostic(
        code(burnish::data::hf_not_found),
        help(
            "burnish never downloads: fetch it once, e.g. `hf download {repo} --repo-type dataset`, or set HF_HUB_CACHE / HF_HOME"
        )
    )]
    HfNotFound {
        spec: String,
        repo: String,
        searched: String,
    },

    #[error("`{spec}`: {message}")]
    #[diagnostic(code(burnish::data::hf_files))]
    HfFiles {
        spec: String,
        message: String,
        #[help]
        help: Option<String>,
    },
}

impl DataError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            action,
            path: path.display().to_string(),
            source,
        }
    }
}
