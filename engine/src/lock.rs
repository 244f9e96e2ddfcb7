//! Lock files: `<manifest-stem>.lock` beside the manifest records, per stage cell, the
//! fingerprint, the output digests and the headline metrics of the last complete run.
//!
//! The file is pretty JSON with sorted keys and no timestamps, so it is deterministic and diffs
//! line by line. Commit it; `burnish run --locked` then proves a run reproduces it.

use std::collections::BTreeMap;
use std::path::Path;

use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::cache::canonical_json;

pub const LOCK_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LockFile {
    pub version: u32,
    pub pipeline: String,
    pub stages: BTreeMap<String, LockedStage>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockedStage {
    pub kind: String,
    pub fingerprint: String,
    /// Output name → content digest.
    pub outputs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, Value>,
}

#[derive(Debug, Error, Diagnostic)]
pub enum LockError {
    #[error("cannot read lock file {path}: {source}")]
    #[diagnostic(code(burnish::lock::io))]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lock file {path} is not valid: {reason}")]
    #[diagnostic(
        code(burnish::lock::parse),
        help("lock files are written by `burnish run`; delete it and run again to regenerate it")
    )]
    Parse { path: String, reason: String },
}

impl LockFile {
    /// Read a lock file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<LockFile>, LockError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LockError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| LockError::Parse {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    /// Deterministic text: sorted keys, two-space indent, trailing newline.
    pub fn to_text(&self) -> String {
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        let canonical: Value = serde_json::from_str(&canonical_json(&v)).unwrap_or(v);
        let mut s = serde_json::to_string_pretty(&canonical).unwrap_or_default();
        s.push('\n');
        s
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::cache::write_atomic(path, self.to_text().as_bytes())
    }

    /// Differences from `other` (the expected lock), one line each.
    pub fn diff(&self, expected: &LockFile) -> Vec<String> {
        let mut out = Vec::new();
        for (name, exp) in &expected.stages {
            match self.stages.get(name) {
                None => out.push(format!("{name}: in the lock file but not in this run")),
                Some(got) => diff_stage(name, exp, got, &mut out),
            }
        }
        for name in self.stages.keys() {
            if !expected.stages.contains_key(name) {
                out.push(format!("{name}: not in the lock file"));
            }
        }
        out
    }
}

/// Differences of one stage against its locked entry.
pub fn diff_stage(name: &str, exp: &LockedStage, got: &LockedStage, out: &mut Vec<String>) {
    if exp.fingerprint != got.fingerprint {
        out.push(format!(
            "{name}: fingerprint {} → {}",
            crate::plan::short(&exp.fingerprint),
            crate::plan::short(&got.fingerprint)
        ));
    }
    for (o, d) in &exp.outputs {
        match got.outputs.get(o) {
            Some(g) if g == d => {}
            Some(g) => out.push(format!(
                "{name}: output `{o}` digest {} → {}",
                crate::plan::short(d),
                crate::plan::short(g)
            )),
            None => out.push(format!("{name}: output `{o}` missing")),
        }
    }
    for (m, v) in &exp.metrics {
        match got.metrics.get(m) {
            Some(g) if g == v => {}
            Some(g) => out.push(format!("{name}: metric `{m}` {v} → {g}")),
            None => out.push(format!("{name}: metric `{m}` missing")),
        }
    }
}
