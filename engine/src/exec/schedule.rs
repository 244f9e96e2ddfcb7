//! The scheduler: given the plan and the outcomes so far, decides each ready cell's fate.
//!
//! A cell is *ready* when every cell it reads from is decided. Its fate is one of:
//! - **skip**: an upstream failed (or was skipped); the cell is not run;
//! - **fail**: its fingerprint cannot be computed (a file it reads cannot be hashed), or the store
//!   cannot be asked;
//! - **lock mismatch** (`--locked`): its fingerprint differs from the lock file's;
//! - **restore**: its entry is computed (and it is not forced);
//! - **run**: a [`Job`] for a launcher, once the launcher has room.
//!
//! The scheduler does no I/O of its own: fingerprints and lookups go through a [`Probe`] (the
//! store and the file hasher in a run, a table in its tests). Launching, waiting and printing
//! are the caller's; it hands each finished job back with [`Scheduler::finished`].

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::cache::{CacheError, EntryRecord, FileHasher, FingerprintInputs, Lookup};
use crate::lock::{LockFile, LockedStage, diff_stage};
use crate::plan::Plan;
use crate::stage::ArtifactType;
use crate::store::Store;

use super::{CellReport, ExecError, Outcome, RunOptions};

/// The scheduler's only way to the world: fingerprints (which hash input files) and lookups.
pub trait Probe {
    /// The fingerprint inputs of `cell`, given each upstream output's digest.
    fn fingerprint(
        &mut self,
        plan: &Plan,
        cell: usize,
        upstream_digest: &dyn Fn(usize, &str) -> Option<String>,
    ) -> std::io::Result<FingerprintInputs>;
    /// Whether entry `fp` is computed.
    fn lookup(&mut self, fp: &str) -> Result<Lookup, CacheError>;
}

/// A run's probe: the store, and the file hasher with its shortcut table.
pub struct StoreProbe<'a> {
    pub store: &'a Store,
    pub hasher: FileHasher,
}

impl<'a> StoreProbe<'a> {
    pub fn new(store: &'a Store) -> Self {
        StoreProbe {
            store,
            hasher: store.file_hasher(),
        }
    }
}

impl Probe for StoreProbe<'_> {
    fn fingerprint(
        &mut self,
        plan: &Plan,
        cell: usize,
        upstream_digest: &dyn Fn(usize, &str) -> Option<String>,
    ) -> std::io::Result<FingerprintInputs> {
        plan.fingerprint_inputs(cell, upstream_digest, &mut self.hasher)
    }
    fn lookup(&mut self, fp: &str) -> Result<Lookup, CacheError> {
        self.store.lookup(fp)
    }
}

/// An upstream output a job reads: the entry that holds it, by fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputRef {
    pub ty: ArtifactType,
    /// The upstream entry's fingerprint.
    pub fingerprint: String,
    /// The output's directory name in that entry (`main`, `train`).
    pub output: String,
    pub digest: String,
}

/// A cell to run: everything a launcher needs besides the plan.
#[derive(Clone, Debug)]
pub struct Job {
    pub cell: usize,
    pub fingerprint: String,
    pub inputs: FingerprintInputs,
    /// Reference field → the upstream output it reads.
    pub artifacts: BTreeMap<String, InputRef>,
    /// Run even if computed meanwhile (`--force`).
    pub force: bool,
}

/// One decision about a cell (what the caller prints, or launches).
#[derive(Debug)]
pub enum Decision {
    /// Not run: `upstream` did not finish.
    Skip { cell: usize, upstream: String },
    /// Its fingerprint or lookup failed; the error is in its outcome.
    Fail { cell: usize },
    /// Its fingerprint differs from the lock file's (`--locked`).
    LockMismatch { cell: usize },
    /// Restored from the store.
    Restore { cell: usize },
    /// Its entry is broken (the reason); it is recomputed.
    Broken { cell: usize, why: String },
    /// To be run now.
    Run(Box<Job>),
}

/// The state of a run's cells.
pub struct Scheduler<'p> {
    plan: &'p Plan,
    lock: Option<LockFile>,
    forced: Vec<bool>,
    outcome: Vec<Option<Outcome>>,
    fingerprints: Vec<Option<String>>,
    records: Vec<Option<EntryRecord>>,
    durations: Vec<Duration>,
    /// Decided to run (queued or started).
    started: Vec<bool>,
    /// Jobs waiting for room in the launcher, in plan order.
    queue: VecDeque<Job>,
    lock_diff: Vec<String>,
}

impl<'p> Scheduler<'p> {
    /// A run of `plan` as `opts` asks (`until`, `force`); `lock` is the lock file for
    /// `--locked` (its stages that the plan lacks, and the plan's cells it lacks, are
    /// differences at once).
    pub fn new(plan: &'p Plan, opts: &RunOptions, lock: Option<LockFile>) -> Self {
        let n = plan.cells.len();
        let selected: Vec<bool> = match &opts.until {
            Some(t) => plan.ancestors_of(&plan.select(t)),
            None => vec![true; n],
        };
        let forced = plan
            .cells
            .iter()
            .map(|c| opts.force.iter().any(|f| c.name == *f || c.stage == *f))
            .collect();
        let outcome = selected
            .iter()
            .map(|&s| (!s).then_some(Outcome::NotSelected))
            .collect();
        let mut lock_diff = Vec::new();
        if let Some(l) = &lock {
            for name in l.stages.keys() {
                if !plan.cells.iter().any(|c| &c.name == name) {
                    lock_diff.push(format!("{name}: in the lock file but not in the manifest"));
                }
            }
            for c in &plan.cells {
                if !l.stages.contains_key(&c.name) {
                    lock_diff.push(format!("{}: not in the lock file", c.name));
                }
            }
        }
        Scheduler {
            plan,
            lock,
            forced,
            outcome,
            fingerprints: vec![None; n],
            records: vec![None; n],
            durations: vec![Duration::ZERO; n],
            started: vec![false; n],
            queue: VecDeque::new(),
            lock_diff,
        }
    }

    pub fn plan(&self) -> &'p Plan {
        self.plan
    }

    /// The fingerprint of `cell`, once its inputs are known.
    pub fn fingerprint(&self, cell: usize) -> Option<&str> {
        self.fingerprints[cell].as_deref()
    }

    /// A difference from the lock file was found: nothing more is decided.
    pub fn stopped(&self) -> bool {
        !self.lock_diff.is_empty()
    }

    /// Differences from the lock file so far.
    pub fn lock_diff(&self) -> &[String] {
        &self.lock_diff
    }

    /// What happened to `cell`, if decided.
    pub fn outcome(&self, cell: usize) -> Option<&Outcome> {
        self.outcome[cell].as_ref()
    }

    /// The record of a restored or finished cell.
    pub fn record(&self, cell: usize) -> Option<&EntryRecord> {
        self.records[cell].as_ref()
    }

    /// Decide every cell that can be decided now, in plan order; at most `room` jobs are
    /// returned to run (the rest wait in a queue, first in line next time). The first
    /// difference from the lock file stops all deciding.
    pub fn decide(&mut self, probe: &mut dyn Probe, room: usize) -> Vec<Decision> {
        let mut out = Vec::new();
        if self.stopped() {
            return out;
        }
        let mut progressed = true;
        while progressed && !self.stopped() {
            progressed = false;
            for i in 0..self.plan.cells.len() {
                if self.stopped() {
                    break;
                }
                if self.started[i] || self.outcome[i].is_some() {
                    continue;
                }
                if let Some(d) = self.decide_cell(i, probe) {
                    progressed = true;
                    out.push(d);
                }
            }
        }
        let mut room = if self.stopped() { 0 } else { room };
        while room > 0
            && let Some(job) = self.queue.pop_front()
        {
            room -= 1;
            out.push(Decision::Run(Box::new(job)));
        }
        out
    }

    /// The fate of one undecided cell, or `None` while an upstream is undecided.
    fn decide_cell(&mut self, i: usize, probe: &mut dyn Probe) -> Option<Decision> {
        let plan = self.plan;
        let cell = &plan.cells[i];
        let deps = cell.deps();
        if let Some(&bad) = deps
            .iter()
            .find(|&&d| self.outcome[d].as_ref().is_some_and(|o| !o.is_done()))
        {
            let upstream = match &self.outcome[bad] {
                Some(Outcome::Skipped { upstream }) => upstream.clone(),
                _ => plan.cells[bad].name.clone(),
            };
            self.outcome[i] = Some(Outcome::Skipped {
                upstream: upstream.clone(),
            });
            return Some(Decision::Skip { cell: i, upstream });
        }
        if !deps
            .iter()
            .all(|&d| self.outcome[d].as_ref().is_some_and(Outcome::is_done))
        {
            return None;
        }
        // All inputs known: the fingerprint is final.
        let records = &self.records;
        let digest = |up: usize, out: &str| {
            records[up]
                .as_ref()
                .and_then(|r| r.outputs.get(out).map(|o| o.digest.clone()))
        };
        let fi = match probe.fingerprint(plan, i, &digest) {
            Ok(f) => f,
            Err(source) => {
                self.outcome[i] = Some(Outcome::Failed(ExecError::Hash {
                    stage: cell.name.clone(),
                    source,
                }));
                return Some(Decision::Fail { cell: i });
            }
        };
        let fp = fi.fingerprint();
        self.fingerprints[i] = Some(fp.clone());
        if let Some(exp) = self.lock.as_ref().and_then(|l| l.stages.get(&cell.name))
            && exp.fingerprint != fp
        {
            let mut d = Vec::new();
            let now = LockedStage {
                kind: cell.kind.into(),
                fingerprint: fp.clone(),
                outputs: exp.outputs.clone(),
                metrics: exp.metrics.clone(),
            };
            diff_stage(&cell.name, exp, &now, &mut d);
            self.lock_diff.extend(d);
            self.outcome[i] = Some(Outcome::Failed(ExecError::Locked {
                stage: cell.name.clone(),
                diff: self.lock_diff.clone(),
            }));
            return Some(Decision::LockMismatch { cell: i });
        }
        let mut broken = None;
        if !self.forced[i] {
            match probe.lookup(&fp) {
                Ok(Lookup::Hit(r)) => {
                    self.records[i] = Some(r);
                    self.outcome[i] = Some(Outcome::Cached);
                    return Some(Decision::Restore { cell: i });
                }
                Ok(Lookup::Miss) => {}
                Ok(Lookup::Broken(why)) => broken = Some(why),
                Err(e) => {
                    self.outcome[i] = Some(Outcome::Failed(e.into()));
                    return Some(Decision::Fail { cell: i });
                }
            }
        }
        let artifacts = cell
            .inputs
            .iter()
            .filter_map(|inp| {
                let r = self.records[inp.upstream].as_ref()?;
                let o = r.outputs.get(&inp.output)?;
                let input = InputRef {
                    ty: o.ty,
                    fingerprint: r.fingerprint.clone(),
                    output: inp.output.clone(),
                    digest: o.digest.clone(),
                };
                Some((inp.field.clone(), input))
            })
            .collect();
        self.started[i] = true;
        self.queue.push_back(Job {
            cell: i,
            fingerprint: fp,
            inputs: fi,
            artifacts,
            force: self.forced[i],
        });
        // Queued: the caller sees it as `Run` when there is room; a broken entry is said now.
        broken.map(|why| Decision::Broken { cell: i, why })
    }

    /// Hand back a finished job: its record and whether this process computed it, or its
    /// error (`interrupted`: the run was cancelled, so an error means it was stopped).
    pub fn finished(
        &mut self,
        cell: usize,
        result: Result<(EntryRecord, bool), ExecError>,
        duration: Duration,
        interrupted: bool,
    ) {
        self.durations[cell] = duration;
        let c = &self.plan.cells[cell];
        let record = match result {
            Ok((record, _)) => record,
            Err(e) => {
                self.outcome[cell] = Some(if interrupted {
                    Outcome::Interrupted
                } else {
                    Outcome::Failed(e)
                });
                return;
            }
        };
        if let Some(exp) = self.lock.as_ref().and_then(|l| l.stages.get(&c.name)) {
            let mut d = Vec::new();
            let now = super::locked_stage(c.kind, &record.fingerprint, &record);
            diff_stage(&c.name, exp, &now, &mut d);
            if !d.is_empty() {
                self.lock_diff.extend(d.clone());
                self.outcome[cell] = Some(Outcome::Failed(ExecError::Locked {
                    stage: c.name.clone(),
                    diff: d,
                }));
                self.records[cell] = Some(record);
                return;
            }
        }
        self.records[cell] = Some(record);
        self.outcome[cell] = Some(Outcome::Ran);
    }

    /// Every cell's report; cells never decided were interrupted (Ctrl-C, a lock difference).
    pub fn into_cells(mut self, interrupted: bool) -> (Vec<CellReport>, Vec<String>) {
        let stopped = interrupted || self.stopped();
        let cells = self
            .plan
            .cells
            .iter()
            .enumerate()
            .map(|(i, c)| CellReport {
                name: c.name.clone(),
                kind: c.kind.to_owned(),
                outcome: self.outcome[i].take().unwrap_or(if stopped {
                    Outcome::Interrupted
                } else {
                    Outcome::Skipped {
                        upstream: "?".into(),
                    }
                }),
                fingerprint: self.fingerprints[i].clone(),
                record: self.records[i].take(),
                duration: self.durations[i],
            })
            .collect();
        (cells, self.lock_diff)
    }
}
