//! The executor: runs a [`Plan`] against a [`Store`].
//!
//! Cells run in dependency order, up to `jobs` at a time. A cell whose entry is in the store is
//! restored (its record read, nothing re-hashed); the rest take the entry lock, run into a staging
//! directory and publish. A failing cell stops its descendants; independent branches finish; the
//! report lists every failure. Ctrl-C sets a flag: no new cell starts, running ones are asked to
//! stop, and nothing unfinished is published.
//!
//! Three parts, each replaceable on its own:
//! - [`schedule`]: the scheduler decides each ready cell's fate (skip, fail, lock mismatch,
//!   restore, run), with no I/O but a [`schedule::Probe`];
//! - [`launch`]: a [`launch::Launcher`] starts the jobs and reports finished ones (`Local`: a
//!   thread pool in this process);
//! - `cell`: running one cell here (lock → re-check → run → publish), what every launcher
//!   ends in; [`run_one`] is that for `burnish run-cell`.
//!
//! [`run`] ties them in one loop (`drive`) that also prints every event.

mod cell;
pub mod launch;
mod progress;
mod record;
pub mod schedule;
pub mod slurm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use miette::Diagnostic;
use thiserror::Error;

use crate::cache::{self, CacheError, EntryRecord};
use crate::lock::{LockFile, LockedStage};
use crate::manifest::Executor;
use crate::plan::{Plan, short};
use crate::stage::StageError;
use crate::store::Store;

use cell::CellRunner;
use launch::{Done, Launcher, Local, Routed};
use progress::{Reporter, fmt_duration};
pub use record::{RunRecord, RunRecordCell, new_run_id};
use schedule::{Decision, Scheduler, StoreProbe};
use slurm::{Slurm, SlurmConfig};

/// How `burnish run` was asked to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Stage or cell names to run even when cached.
    pub force: Vec<String>,
    /// Run only this stage (or cell) and what it depends on.
    pub until: Option<String>,
    /// Cells running at once.
    pub jobs: usize,
    /// Fail if anything differs from the lock file.
    pub locked: bool,
    /// Show progress bars (when stderr is a terminal) or plain lines.
    pub quiet: bool,
    /// What runs the stages that do not name an executor (`--executor`; default: the
    /// manifest's `executor:`).
    pub executor: Option<Executor>,
    /// How Slurm jobs are submitted.
    pub slurm: SlurmConfig,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            force: Vec::new(),
            until: None,
            jobs: 1,
            locked: false,
            quiet: false,
            executor: None,
            slurm: SlurmConfig::default(),
        }
    }
}

/// What happened to one cell.
#[derive(Debug)]
pub enum Outcome {
    /// Restored from the cache.
    Cached,
    /// Computed (or, after waiting for another process, found computed by it).
    Ran,
    Failed(ExecError),
    /// Not run because an upstream cell failed.
    Skipped {
        upstream: String,
    },
    /// Not run: outside `--until`.
    NotSelected,
    /// Not run, or stopped, because of Ctrl-C.
    Interrupted,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Ran => "ran",
            Outcome::Failed(_) => "failed",
            Outcome::Skipped { .. } => "skipped",
            Outcome::NotSelected => "not selected",
            Outcome::Interrupted => "interrupted",
        }
    }
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Cached | Outcome::Ran)
    }
}

#[derive(Debug)]
pub struct CellReport {
    pub name: String,
    pub kind: String,
    pub outcome: Outcome,
    pub fingerprint: Option<String>,
    pub record: Option<EntryRecord>,
    pub duration: Duration,
}

/// The result of a run.
#[derive(Debug)]
pub struct RunReport {
    pub run_id: String,
    pub cells: Vec<CellReport>,
    pub interrupted: bool,
    /// Differences from the lock file found with `--locked`.
    pub lock_diff: Vec<String>,
    /// Why `runs/<id>/run.json` could not be written, if it could not.
    pub record_error: Option<ExecError>,
}

impl RunReport {
    pub fn failures(&self) -> impl Iterator<Item = (&str, &ExecError)> {
        self.cells.iter().filter_map(|c| match &c.outcome {
            Outcome::Failed(e) => Some((c.name.as_str(), e)),
            _ => None,
        })
    }
    pub fn succeeded(&self) -> bool {
        !self.interrupted
            && self.lock_diff.is_empty()
            && self
                .cells
                .iter()
                .all(|c| c.outcome.is_done() || matches!(c.outcome, Outcome::NotSelected))
    }
    /// The lock file for this run (complete runs only).
    pub fn lock_file(&self, pipeline: &str) -> Option<LockFile> {
        if !self.succeeded()
            || self
                .cells
                .iter()
                .any(|c| matches!(c.outcome, Outcome::NotSelected))
        {
            return None;
        }
        let mut stages = BTreeMap::new();
        for c in &self.cells {
            let (Some(fp), Some(r)) = (&c.fingerprint, &c.record) else {
                return None;
            };
            stages.insert(c.name.clone(), locked_stage(&c.kind, fp, r));
        }
        Some(LockFile {
            version: crate::lock::LOCK_VERSION,
            pipeline: pipeline.to_owned(),
            stages,
        })
    }
}

pub(crate) fn locked_stage(kind: &str, fp: &str, r: &EntryRecord) -> LockedStage {
    LockedStage {
        kind: kind.to_owned(),
        fingerprint: fp.to_owned(),
        outputs: r
            .outputs
            .iter()
            .map(|(k, o)| (k.clone(), o.digest.clone()))
            .collect(),
        metrics: r.metrics.clone(),
    }
}

/// A Slurm job that ended without its cell's entry.
#[derive(Debug)]
pub struct JobFailure {
    pub stage: String,
    pub job: String,
    /// Slurm's state (`FAILED`, `CANCELLED`, `TIMEOUT`, …).
    pub state: String,
    /// `code:signal`.
    pub exit: String,
    pub log: String,
    /// The log's last lines.
    pub tail: String,
}

#[derive(Debug, Error, Diagnostic)]
pub enum ExecError {
    #[error("stage `{stage}` failed")]
    #[diagnostic(code(burnish::run::stage_failed))]
    Stage {
        stage: String,
        #[diagnostic_source]
        source: StageError,
    },
    #[error("stage `{stage}` panicked: {message}")]
    #[diagnostic(
        code(burnish::run::panic),
        help("this is a bug in the stage kind; nothing was cached for it")
    )]
    Panic { stage: String, message: String },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot hash the files of stage `{stage}`: {source}")]
    #[diagnostic(code(burnish::run::hash))]
    Hash {
        stage: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stage `{stage}` differs from the lock file:\n{}", diff.join("\n"))]
    #[diagnostic(
        code(burnish::run::locked),
        help("run without --locked to accept the change and rewrite the lock file")
    )]
    Locked { stage: String, diff: Vec<String> },
    #[error("no lock file at {path}")]
    #[diagnostic(
        code(burnish::run::no_lock),
        help("run once without --locked to create it")
    )]
    NoLock { path: String },
    #[error("no cell named `{cell}` in this plan")]
    #[diagnostic(code(burnish::run::unknown_cell), help("cells: {}", cells.join(", ")))]
    NoCell { cell: String, cells: Vec<String> },
    #[error("cell `{cell}` needs `{upstream}`, which is not in the cache")]
    #[diagnostic(
        code(burnish::run_cell::upstream),
        help("run-cell runs one cell on inputs already computed; run its upstream cells first")
    )]
    UpstreamMissing { cell: String, upstream: String },
    #[error("cell `{cell}` has fingerprint {computed} here, not {expected}")]
    #[diagnostic(
        code(burnish::run_cell::fingerprint),
        help(
            "the manifest, an input file or the upstream results differ from where the job was \
             submitted; nothing was run"
        )
    )]
    FingerprintMismatch {
        cell: String,
        expected: String,
        computed: String,
    },
    #[error("cannot submit `{stage}` to slurm: {message}")]
    #[diagnostic(
        code(burnish::slurm::submit),
        help(
            "the Slurm executor needs `sbatch` on PATH (and SLURM_CONF where the cluster keeps it elsewhere)"
        )
    )]
    Submit { stage: String, message: String },
    #[error(
        "slurm job {} of `{}` ended {} (exit {}); its log, {}, ends:\n{}",
        .0.job, .0.stage, .0.state, .0.exit, .0.log, .0.tail
    )]
    #[diagnostic(
        code(burnish::slurm::job),
        help(
            "nothing was cached for it; `burnish run` again resubmits it (a trainer resumes from its checkpoint)"
        )
    )]
    Job(Box<JobFailure>),
    #[error("cannot write {path}: {source}")]
    #[diagnostic(code(burnish::run::io))]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Run a plan: restore what the store holds, run the rest through the local launcher (`jobs`
/// threads), write the run record.
pub fn run(
    plan: &Plan,
    store: &Store,
    opts: &RunOptions,
    cancel: Arc<AtomicBool>,
) -> Result<RunReport, ExecError> {
    let lock = read_lock(plan, opts)?;
    let run = RunDir::create(store)?;
    let reporter = Reporter::new(opts.quiet);
    let mut scheduler = Scheduler::new(plan, opts, lock);
    let runner = run.runner(plan, store, &reporter, &cancel);
    let mut probe = StoreProbe::new(store);
    let default = opts.executor.unwrap_or(plan.manifest.header.executor);
    let route: Vec<Executor> = plan
        .cells
        .iter()
        .map(|c| c.executor.unwrap_or(default))
        .collect();
    let mut slurm = route
        .contains(&Executor::Slurm)
        .then(|| Slurm::new(plan, store, &reporter, opts.slurm.clone(), run.dir.clone()));
    std::thread::scope(|scope| {
        let mut local = Local::new(scope, &runner, opts.jobs);
        let mut launcher = Routed {
            local: &mut local,
            slurm: slurm.as_mut().map(|s| s as &mut dyn Launcher),
            route,
            waiting: Default::default(),
        };
        drive(
            &mut scheduler,
            &mut probe,
            &mut launcher,
            &reporter,
            &cancel,
        );
    });
    Ok(run.finish(plan, scheduler, cancel.load(Ordering::Relaxed)))
}

/// `run --detach` on Slurm: submit every cell that must run as a job depending on its upstream
/// jobs, and return their (cell, job id) without waiting. The results reach the store as the
/// jobs finish; a later `run` restores them and writes the lock file.
pub fn detach(
    plan: &Plan,
    store: &Store,
    opts: &RunOptions,
) -> Result<Vec<(String, String)>, ExecError> {
    let run = RunDir::create(store)?;
    let reporter = Reporter::new(opts.quiet);
    let mut hasher = store.file_hasher();
    let status = plan.status(store, None, &mut hasher).map_err(|e| match e {
        crate::plan::PlanError::Hash { stage, source } => ExecError::Hash { stage, source },
        crate::plan::PlanError::Cache(c) => ExecError::Cache(c),
        crate::plan::PlanError::Internal(i) => ExecError::Submit {
            stage: String::new(),
            message: i.to_string(),
        },
    })?;
    hasher.save();
    let n = plan.cells.len();
    let wanted = match &opts.until {
        Some(t) => plan.ancestors_of(&plan.select(t)),
        None => vec![true; n],
    };
    let forced: Vec<bool> = plan
        .cells
        .iter()
        .map(|c| opts.force.iter().any(|f| c.name == *f || c.stage == *f))
        .collect();
    let default = opts.executor.unwrap_or(plan.manifest.header.executor);
    let on_slurm: Vec<bool> = plan
        .cells
        .iter()
        .map(|c| c.executor.unwrap_or(default) == Executor::Slurm)
        .collect();
    let slurm = Slurm::new(plan, store, &reporter, opts.slurm.clone(), run.dir.clone());
    let jobs = slurm.submit_all(&status, &wanted, &forced, &on_slurm)?;
    Ok(jobs
        .into_iter()
        .map(|(i, id)| (plan.cells[i].name.clone(), id))
        .collect())
}

/// The `--locked` lock file (an error when there is none).
fn read_lock(plan: &Plan, opts: &RunOptions) -> Result<Option<LockFile>, ExecError> {
    if !opts.locked {
        return Ok(None);
    }
    let path = plan.manifest.lock_path();
    match LockFile::read(&path) {
        Ok(Some(l)) => Ok(Some(l)),
        Ok(None) | Err(_) => Err(ExecError::NoLock {
            path: path.display().to_string(),
        }),
    }
}

/// The run loop: decide what is ready, print it, start jobs while the launcher has room, hand
/// finished jobs back; until nothing runs and nothing more can be decided (or Ctrl-C).
fn drive(
    scheduler: &mut Scheduler,
    probe: &mut StoreProbe,
    launcher: &mut dyn Launcher,
    reporter: &Reporter,
    cancel: &AtomicBool,
) {
    let plan = scheduler.plan();
    let mut cancelled = false;
    loop {
        if cancel.load(Ordering::Relaxed) && !cancelled {
            cancelled = true;
            launcher.cancel();
        }
        if !cancelled {
            let room = launcher.capacity().saturating_sub(launcher.in_flight());
            for decision in scheduler.decide(probe, room) {
                if let Decision::Run(job) = decision {
                    launcher.start(*job);
                } else {
                    reporter.line(describe(plan, scheduler, &decision));
                }
            }
        }
        probe.hasher.save();
        if launcher.in_flight() == 0 {
            break;
        }
        // Wait for a cell to finish (polling the cancel flag).
        let Some(done) = launcher.poll(Duration::from_millis(100)) else {
            continue;
        };
        let interrupted = cancel.load(Ordering::Relaxed);
        reporter.line(describe_done(plan, &done, interrupted));
        scheduler.finished(done.cell, done.result, done.duration, interrupted);
    }
}

/// The line printed for a decision (not `Run`: a running cell prints itself).
fn describe(plan: &Plan, scheduler: &Scheduler, decision: &Decision) -> String {
    let name = |i: usize| plan.cells[i].name.as_str();
    match decision {
        Decision::Skip { cell, upstream } => format!(
            "  skipped  {} (upstream `{upstream}` did not finish)",
            name(*cell)
        ),
        Decision::Fail { cell } | Decision::LockMismatch { cell } => match scheduler.outcome(*cell)
        {
            Some(Outcome::Failed(e)) => format!("  failed   {}: {e}", name(*cell)),
            _ => format!("  failed   {}", name(*cell)),
        },
        Decision::Restore { cell } => {
            let fp = scheduler
                .record(*cell)
                .map_or("", |r| r.fingerprint.as_str());
            format!("  cached   {} ({})", name(*cell), short(fp))
        }
        Decision::Broken { cell, why } => {
            let fp = scheduler.fingerprint(*cell).unwrap_or("");
            format!(
                "  warning  {}: cache entry {} is broken ({why}); recomputing it",
                name(*cell),
                short(fp)
            )
        }
        Decision::Run(job) => format!("  queued   {}", name(job.cell)),
    }
}

/// The line printed for a finished job.
fn describe_done(plan: &Plan, done: &Done, interrupted: bool) -> String {
    let name = &plan.cells[done.cell].name;
    match &done.result {
        Ok((record, true)) => format!(
            "  ran      {name} ({}) in {}",
            short(&record.fingerprint),
            fmt_duration(done.duration)
        ),
        Ok((record, false)) => format!(
            "  cached   {name} ({}, computed by another process)",
            short(&record.fingerprint)
        ),
        Err(_) if interrupted => format!("  stopped  {name}"),
        Err(_) => format!("  failed   {name} after {}", fmt_duration(done.duration)),
    }
}

/// A run's directory under `<cache>/runs/` and its clock.
struct RunDir {
    id: String,
    dir: PathBuf,
    started: u64,
}

impl RunDir {
    fn create(store: &Store) -> Result<RunDir, ExecError> {
        let id = new_run_id();
        let dir = store.runs_dir().join(&id);
        std::fs::create_dir_all(&dir).map_err(|source| ExecError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(RunDir {
            id,
            dir,
            started: cache::now_unix(),
        })
    }

    /// What runs a cell in this process, logging into this run's directory.
    fn runner<'a>(
        &self,
        plan: &'a Plan,
        store: &'a Store,
        reporter: &'a Reporter,
        cancel: &Arc<AtomicBool>,
    ) -> CellRunner<'a> {
        CellRunner {
            plan,
            store,
            reporter,
            cancel: cancel.clone(),
            run_dir: self.dir.clone(),
        }
    }

    /// The report, with `run.json` written beside the logs. A run record that cannot be
    /// written (a full disk) does not hide what happened to the cells: the report still
    /// carries every outcome, and the error beside them.
    fn finish(self, plan: &Plan, scheduler: Scheduler, interrupted: bool) -> RunReport {
        let (cells, lock_diff) = scheduler.into_cells(interrupted);
        let record = RunRecord {
            run_id: self.id.clone(),
            manifest: plan.manifest.path.display().to_string(),
            pipeline: plan.manifest.header.pipeline.clone(),
            started: self.started,
            finished: cache::now_unix(),
            cells: cells
                .iter()
                .map(|c| RunRecordCell {
                    name: c.name.clone(),
                    kind: c.kind.clone(),
                    outcome: c.outcome.label().to_owned(),
                    fingerprint: c.fingerprint.clone(),
                    duration_ms: c.duration.as_millis() as u64,
                })
                .collect(),
        };
        let rp = self.dir.join("run.json");
        let record_error =
            cache::write_atomic(&rp, &serde_json::to_vec_pretty(&record).unwrap_or_default())
                .err()
                .map(|source| ExecError::Io {
                    path: rp.display().to_string(),
                    source,
                });
        RunReport {
            run_id: self.id,
            cells,
            interrupted,
            lock_diff,
            record_error,
        }
    }
}

/// Run exactly one cell, `name`, in this process (what `burnish run-cell` does for a launcher
/// that runs cells elsewhere): its upstream cells must be in the store (they are restored, never
/// run), and its fingerprint must be `expected` — the one the launching side computed — or
/// nothing runs (`None`: a job submitted before its inputs existed takes what they give). Then the usual lock → re-check → run → publish.
pub fn run_one(
    plan: &Plan,
    store: &Store,
    name: &str,
    expected: Option<&str>,
    opts: &RunOptions,
    cancel: Arc<AtomicBool>,
) -> Result<RunReport, ExecError> {
    let Some(target) = plan.cells.iter().position(|c| c.name == name) else {
        return Err(ExecError::NoCell {
            cell: name.to_owned(),
            cells: plan.cells.iter().map(|c| c.name.clone()).collect(),
        });
    };
    let opts = RunOptions {
        until: Some(name.to_owned()),
        jobs: 1,
        ..opts.clone()
    };
    let lock = read_lock(plan, &opts)?;
    let reporter = Reporter::new(opts.quiet);
    let mut scheduler = Scheduler::new(plan, &opts, lock);
    let mut probe = StoreProbe::new(store);
    let mut job = None;
    for decision in scheduler.decide(&mut probe, usize::MAX) {
        match decision {
            Decision::Run(j) if j.cell == target => job = Some(j),
            Decision::Run(j) => {
                return Err(ExecError::UpstreamMissing {
                    cell: name.to_owned(),
                    upstream: plan.cells[j.cell].name.clone(),
                });
            }
            d => reporter.line(describe(plan, &scheduler, &d)),
        }
    }
    probe.hasher.save();
    // Restored or about to run, the cell's fingerprint is known here.
    if let (Some(fp), Some(expected)) = (scheduler.fingerprint(target), expected)
        && fp != expected
    {
        return Err(ExecError::FingerprintMismatch {
            cell: name.to_owned(),
            expected: expected.to_owned(),
            computed: fp.to_owned(),
        });
    }
    let run = RunDir::create(store)?;
    if let Some(job) = job {
        let runner = run.runner(plan, store, &reporter, &cancel);
        let t0 = Instant::now();
        let done = Done {
            cell: target,
            result: runner.run(*job),
            duration: t0.elapsed(),
        };
        let interrupted = cancel.load(Ordering::Relaxed);
        reporter.line(describe_done(plan, &done, interrupted));
        scheduler.finished(target, done.result, done.duration, interrupted);
    }
    Ok(run.finish(plan, scheduler, cancel.load(Ordering::Relaxed)))
}
