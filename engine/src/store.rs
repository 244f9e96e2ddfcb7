//! The store: the one door to computed results.
//!
//! Everything that asks "is this cell computed, and where are its outputs" — the executor, `plan`,
//! `compare`, `metrics`, `gc` — asks a [`Store`], never the [`Cache`] directory behind it. Today
//! a store is the local cache alone; a shared remote plugs in behind the same methods: a lookup
//! that misses locally consults the remote and pulls the entry into the local cache (verified
//! before it becomes visible), and a publish pushes after the local entry is complete. Callers do
//! not change when a remote is configured.
//!
//! What stays local whatever the remote: entry locks (one process computes an entry on this
//! machine), scratch directories (checkpoints of unfinished work), run records, and the file
//! hasher's shortcut table. Maintenance of the local directory itself (`verify`, `evict`) goes
//! through [`Store::local`].
//!
//! # Garbage collection
//!
//! [`Store::gc`] removes every entry that no root reaches. The roots: the fingerprints of the
//! lock files given, those of every run finished within the last `keep_days` days (from
//! `runs/<id>/run.json`), and any entry whose lock some process holds (running work). Run records
//! older than the horizon are removed with them; leftovers of interrupted writers (staging
//! directories, scratch) are removed once older than the horizon and not reached.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::cache::{
    self, Cache, CacheError, EntryLock, EntryRecord, FileHasher, FingerprintInputs, Lookup, Staging,
};
use crate::exec::RunRecord;
use crate::lock::LockFile;
use crate::stage::ArtifactType;

/// Computed results, local (and, when configured, remote).
pub struct Store {
    local: Cache,
}

impl Store {
    /// A store over the local cache at `root` (created if missing).
    pub fn open(root: &Path) -> Result<Store, CacheError> {
        Ok(Store {
            local: Cache::open(root)?,
        })
    }

    /// The local cache directory, for maintenance that concerns it alone.
    pub fn local(&self) -> &Cache {
        &self.local
    }

    /// Whether the entry `fp` is computed and usable, and its record.
    pub fn lookup(&self, fp: &str) -> Result<Lookup, CacheError> {
        self.local.lookup(fp)
    }

    /// The record of a usable entry (`None` when missing or broken).
    pub fn usable_record(&self, fp: &str) -> Result<Option<EntryRecord>, CacheError> {
        self.local.usable_record(fp)
    }

    /// The fingerprint inputs an entry was computed from (for explaining a miss).
    pub fn inputs(&self, fp: &str) -> Option<FingerprintInputs> {
        self.local.inputs(fp)
    }

    /// Where output `output` of the computed entry `fp` lies.
    pub fn artifact_dir(&self, fp: &str, output: &str) -> PathBuf {
        self.local.entry_dir(fp).join("out").join(output)
    }

    /// Take the entry lock: one process computes `fp`; `on_wait` is called once if another
    /// holds it.
    pub fn lock(&self, fp: &str, on_wait: &mut dyn FnMut()) -> Result<EntryLock, CacheError> {
        self.local.lock(fp, on_wait)
    }

    /// A fresh staging directory for `fp`'s outputs (under its lock).
    pub fn begin(
        &self,
        fp: &str,
        outputs: &[&str],
        lock: &EntryLock,
    ) -> Result<Staging, CacheError> {
        self.local.begin(fp, outputs, lock)
    }

    /// Make a staged entry visible: hashed, moved into place, its record written last.
    #[allow(clippy::too_many_arguments)] // each argument is a distinct part of the record
    pub fn publish(
        &self,
        staging: Staging,
        inputs: &FingerprintInputs,
        stage: &str,
        types: &BTreeMap<String, ArtifactType>,
        metrics: BTreeMap<String, Value>,
        duration_ms: u64,
        lock: &EntryLock,
    ) -> Result<EntryRecord, CacheError> {
        self.local
            .publish(staging, inputs, stage, types, metrics, duration_ms, lock)
    }

    /// Checkpoints of `fp`'s unfinished computation; they survive a crash.
    pub fn scratch_dir(&self, fp: &str) -> PathBuf {
        self.local.scratch_dir(fp)
    }

    /// Where run records and per-cell logs go.
    pub fn runs_dir(&self) -> PathBuf {
        self.local.runs_dir()
    }

    /// The file hasher, with its shortcut table.
    pub fn file_hasher(&self) -> FileHasher {
        self.local.file_hasher()
    }

    /// Remove what no root reaches (see the module doc); `dry_run` only lists it.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport, CacheError> {
        let cache = &self.local;
        let mut keep: HashSet<String> = HashSet::new();
        for lock in &opts.locks {
            keep.extend(lock.stages.values().map(|s| s.fingerprint.clone()));
        }
        let horizon = cache::now_unix().saturating_sub((opts.keep_days * 86_400.0) as u64);
        let mut old_runs = Vec::new();
        if let Ok(rd) = std::fs::read_dir(cache.runs_dir()) {
            for e in rd.flatten() {
                let Ok(bytes) = std::fs::read(e.path().join("run.json")) else {
                    continue;
                };
                let Ok(rec) = serde_json::from_slice::<RunRecord>(&bytes) else {
                    continue;
                };
                if rec.finished > horizon {
                    keep.extend(rec.cells.into_iter().filter_map(|c| c.fingerprint));
                } else {
                    old_runs.push(e.path());
                }
            }
        }
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        for fp in cache.entries()? {
            if keep.contains(&fp) || cache.is_locked(&fp) {
                report.kept += 1;
            } else {
                report.entries.push(fp);
            }
        }
        for (fp, path) in cache.leftovers() {
            if !keep.contains(&fp) && modified_before(&path, horizon) {
                report.leftovers.push(path);
            }
        }
        if !opts.dry_run {
            for fp in &report.entries {
                cache.evict(fp)?;
            }
            for path in report.leftovers.iter().chain(&old_runs) {
                let _ = std::fs::remove_dir_all(path);
            }
        }
        Ok(report)
    }
}

fn modified_before(path: &Path, horizon: u64) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .is_some_and(|d| d.as_secs() < horizon)
}

/// What `gc` keeps.
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Lock files whose entries are roots.
    pub locks: Vec<LockFile>,
    /// Runs finished within this many days are roots.
    pub keep_days: f64,
    /// List, remove nothing.
    pub dry_run: bool,
}

/// What `gc` removed (or, in a dry run, would remove).
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub dry_run: bool,
    /// Entries no root reaches.
    pub entries: Vec<String>,
    /// Staging and scratch directories of unreached entries, older than the horizon.
    pub leftovers: Vec<PathBuf>,
    /// Entries kept.
    pub kept: usize,
}
