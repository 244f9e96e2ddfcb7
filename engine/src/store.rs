//! The store: the one door to computed results.
//!
//! Everything that asks "is this cell computed, and where are its outputs" — the executor, `plan`,
//! `compare`, `metrics`, `gc` — asks a [`Store`], never the [`Cache`] directory behind it. Today
//! a store is the local cache, and optionally a shared [`Remote`] behind the same methods:
//!
//! - [`Store::lookup`] that misses locally consults the remote and pulls the entry into the local
//!   cache (verified before it becomes visible); one that hits locally makes sure a read-write
//!   remote has the entry too, so an entry whose push failed (or was computed before the remote
//!   was set up) reaches the remote on the next run;
//! - [`Store::publish`] pushes after the local entry is complete;
//! - [`Store::peek`], [`Store::usable_record`] and [`Store::inputs`] read remote records without
//!   pulling (`plan`, `compare`, `metrics` show what the remote has).
//!
//! Callers do not change when a remote is configured.
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
use crate::remote::{Remote, RemoteGcReport, RemoteMode};
use crate::stage::ArtifactType;

/// Computed results, local (and, when configured, remote).
pub struct Store {
    local: Cache,
    remote: Option<Remote>,
}

impl Store {
    /// A store over the local cache at `root` (created if missing).
    pub fn open(root: &Path) -> Result<Store, CacheError> {
        Ok(Store {
            local: Cache::open(root)?,
            remote: None,
        })
    }

    /// This store with `remote` behind its local cache.
    pub fn with_remote(self, remote: Remote) -> Store {
        Store {
            remote: Some(remote),
            ..self
        }
    }

    /// The remote, when one is configured.
    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// The local cache directory, for maintenance that concerns it alone.
    pub fn local(&self) -> &Cache {
        &self.local
    }

    /// Whether the entry `fp` is computed and usable, and its record; an entry only the remote
    /// has is pulled first (taking the entry lock while it does).
    pub fn lookup(&self, fp: &str) -> Result<Lookup, CacheError> {
        self.lookup_with(fp, None)
    }

    /// [`Store::lookup`] for a caller that holds the entry lock.
    pub fn lookup_locked(&self, fp: &str, lock: &EntryLock) -> Result<Lookup, CacheError> {
        self.lookup_with(fp, Some(lock))
    }

    fn lookup_with(&self, fp: &str, lock: Option<&EntryLock>) -> Result<Lookup, CacheError> {
        let local = self.local.lookup(fp)?;
        let Some(remote) = &self.remote else {
            return Ok(local);
        };
        if let Lookup::Hit(_) = local {
            self.sync(remote, fp)?;
            return Ok(local);
        }
        match (remote.entry(fp)?, lock) {
            (None, _) => Ok(local),
            (Some(entry), Some(lock)) => Ok(Lookup::Hit(remote.pull(&self.local, &entry, lock)?)),
            (Some(_), None) => {
                let lock = self.local.lock(fp, &mut || {})?;
                self.lookup_with(fp, Some(&lock))
            }
        }
    }

    /// Push a local entry a read-write remote lacks.
    fn sync(&self, remote: &Remote, fp: &str) -> Result<(), CacheError> {
        if remote.mode() == RemoteMode::ReadWrite {
            remote.push(&self.local, fp)?;
        }
        Ok(())
    }

    /// [`Store::lookup`] without pulling or pushing: a remote-only entry is a hit, and `true`
    /// says it is remote.
    pub fn peek(&self, fp: &str) -> Result<(Lookup, bool), CacheError> {
        let local = self.local.lookup(fp)?;
        if let (Lookup::Miss | Lookup::Broken(_), Some(remote)) = (&local, &self.remote)
            && let Some(entry) = remote.entry(fp)?
        {
            return Ok((Lookup::Hit(entry.record.clone()), true));
        }
        Ok((local, false))
    }

    /// The record of a usable entry, local or remote (`None` when missing or broken).
    pub fn usable_record(&self, fp: &str) -> Result<Option<EntryRecord>, CacheError> {
        Ok(match self.peek(fp)?.0 {
            Lookup::Hit(r) => Some(r),
            Lookup::Miss | Lookup::Broken(_) => None,
        })
    }

    /// The fingerprint inputs an entry was computed from (for explaining a miss).
    pub fn inputs(&self, fp: &str) -> Option<FingerprintInputs> {
        self.local.inputs(fp).or_else(|| {
            let remote = self.remote.as_ref()?;
            Some(remote.entry(fp).ok()??.inputs.clone())
        })
    }

    /// Push the local entry `fp` to the remote; whether it was sent (`false`: the remote had it,
    /// or there is no remote).
    pub fn push(&self, fp: &str) -> Result<bool, CacheError> {
        match &self.remote {
            Some(remote) => Ok(remote.push(&self.local, fp)?),
            None => Ok(false),
        }
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
        let record =
            self.local
                .publish(staging, inputs, stage, types, metrics, duration_ms, lock)?;
        if let Some(remote) = &self.remote {
            self.sync(remote, &record.fingerprint)?;
        }
        Ok(record)
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
        let (keep, old_runs, horizon) = self.roots(opts);
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

impl Store {
    /// The roots of `gc`: fingerprints to keep, run records past the horizon, and the horizon.
    fn roots(&self, opts: &GcOptions) -> (HashSet<String>, Vec<PathBuf>, u64) {
        let mut keep: HashSet<String> = HashSet::new();
        for lock in &opts.locks {
            keep.extend(lock.stages.values().map(|s| s.fingerprint.clone()));
        }
        let horizon = cache::now_unix().saturating_sub((opts.keep_days * 86_400.0) as u64);
        let mut old_runs = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.local.runs_dir()) {
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
        (keep, old_runs, horizon)
    }

    /// `gc` on the remote, with the same roots as the local one (lock files, recent runs) and
    /// the same horizon, applied to when each entry was pushed.
    pub fn gc_remote(&self, opts: &GcOptions) -> Result<Option<RemoteGcReport>, CacheError> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let (keep, _, horizon) = self.roots(opts);
        Ok(Some(remote.gc(&keep, horizon, opts.dry_run)?))
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
