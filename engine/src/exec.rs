//! The executor: runs a [`Plan`] against a [`Cache`].
//!
//! Cells run in dependency order, up to `jobs` at a time. A cell whose entry is in the cache is
//! restored (its record read, nothing re-hashed); the rest take the entry lock, run into a staging
//! directory and publish. A failing cell stops its descendants; independent branches finish; the
//! report lists every failure. Ctrl-C sets a flag: no new cell starts, running ones are asked to
//! stop, and nothing unfinished is published.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cache::{self, Cache, CacheError, EntryRecord, FingerprintInputs, Lookup};
use crate::lock::{LockFile, LockedStage, diff_stage};
use crate::plan::{Plan, short};
use crate::stage::{Artifact, ProgressSink, RunContext, StageError};

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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            force: Vec::new(),
            until: None,
            jobs: 1,
            locked: false,
            quiet: false,
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

fn locked_stage(kind: &str, fp: &str, r: &EntryRecord) -> LockedStage {
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
    #[error("cannot write {path}: {source}")]
    #[diagnostic(code(burnish::run::io))]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A unique, sortable run id: `20261122-101500-3f2a`.
pub fn new_run_id() -> String {
    let secs = cache::now_unix();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tag = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{tag:04x}",
        t / 3600,
        (t / 60) % 60,
        t % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The run record kept under `<cache>/runs/<run-id>/run.json` (what `gc --keep-days` reads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub manifest: String,
    pub pipeline: String,
    pub started: u64,
    pub finished: u64,
    pub cells: Vec<RunRecordCell>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecordCell {
    pub name: String,
    pub kind: String,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub duration_ms: u64,
}

/// Progress and event lines.
struct Reporter {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Reporter {
    fn new(quiet: bool) -> Self {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Reporter { multi, quiet }
    }
    fn line(&self, s: String) {
        if self.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => eprintln!("{s}"),
        }
    }
    fn bar(&self, cell: &str) -> Arc<dyn ProgressSink> {
        match &self.multi {
            Some(m) => {
                let pb = m.add(ProgressBar::new_spinner());
                pb.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {prefix:.bold} {elapsed_precise} {wide_bar} {pos}/{len} {msg} (eta {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                pb.set_prefix(cell.to_owned());
                pb.set_length(0);
                pb.enable_steady_tick(Duration::from_millis(200));
                Arc::new(Bar(pb))
            }
            None => Arc::new(crate::stage::NoProgress),
        }
    }
}

struct Bar(ProgressBar);
impl ProgressSink for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn set_position(&self, pos: u64) {
        self.0.set_position(pos);
    }
    fn set_message(&self, msg: &str) {
        self.0.set_message(msg.to_owned());
    }
}
impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

struct Job {
    cell: usize,
    fingerprint: String,
    inputs: FingerprintInputs,
    artifacts: BTreeMap<String, Artifact>,
    force: bool,
}

struct Done {
    cell: usize,
    result: Result<(EntryRecord, bool), ExecError>,
    duration: Duration,
}

/// Run a plan.
pub fn run(
    plan: &Plan,
    cache: &Cache,
    opts: &RunOptions,
    cancel: Arc<AtomicBool>,
) -> Result<RunReport, ExecError> {
    let run_id = new_run_id();
    let run_dir = cache.runs_dir().join(&run_id);
    std::fs::create_dir_all(&run_dir).map_err(|source| ExecError::Io {
        path: run_dir.display().to_string(),
        source,
    })?;
    let started = cache::now_unix();
    let reporter = Reporter::new(opts.quiet);
    let n = plan.cells.len();

    let lock = if opts.locked {
        let path = plan.manifest.lock_path();
        match LockFile::read(&path) {
            Ok(Some(l)) => Some(l),
            Ok(None) | Err(_) => {
                return Err(ExecError::NoLock {
                    path: path.display().to_string(),
                });
            }
        }
    } else {
        None
    };

    let selected: Vec<bool> = match &opts.until {
        Some(t) => plan.ancestors_of(&plan.select(t)),
        None => vec![true; n],
    };
    let forced: Vec<bool> = (0..n)
        .map(|i| {
            opts.force
                .iter()
                .any(|f| plan.cells[i].name == *f || plan.cells[i].stage == *f)
        })
        .collect();

    let mut outcome: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let mut fingerprints: Vec<Option<String>> = vec![None; n];
    let mut records: Vec<Option<EntryRecord>> = vec![None; n];
    let mut durations = vec![Duration::ZERO; n];
    let mut lock_diff = Vec::new();
    for i in 0..n {
        if !selected[i] {
            outcome[i] = Some(Outcome::NotSelected);
        }
    }
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

    let mut hasher = cache.file_hasher();
    let jobs = opts.jobs.max(1);
    let (tx, rx) = mpsc::channel::<Done>();
    let running = Arc::new(Mutex::new(0usize));
    let mut in_flight = 0usize;
    let mut started_cells = vec![false; n];
    let mut warned_broken = vec![false; n];

    std::thread::scope(|scope| -> Result<(), ExecError> {
        loop {
            let stop = cancel.load(Ordering::Relaxed) || !lock_diff.is_empty();
            // Launch what is ready.
            let mut progressed = true;
            while progressed && !stop {
                progressed = false;
                for i in 0..n {
                    if started_cells[i] || outcome[i].is_some() {
                        continue;
                    }
                    let cell = &plan.cells[i];
                    let deps = cell.deps();
                    if let Some(&bad) = deps
                        .iter()
                        .find(|&&d| outcome[d].as_ref().is_some_and(|o| !o.is_done()))
                    {
                        let upstream = match &outcome[bad] {
                            Some(Outcome::Skipped { upstream }) => upstream.clone(),
                            _ => plan.cells[bad].name.clone(),
                        };
                        reporter.line(format!(
                            "  skipped  {} (upstream `{upstream}` did not finish)",
                            cell.name
                        ));
                        outcome[i] = Some(Outcome::Skipped { upstream });
                        progressed = true;
                        continue;
                    }
                    if !deps
                        .iter()
                        .all(|&d| outcome[d].as_ref().is_some_and(Outcome::is_done))
                    {
                        continue;
                    }
                    // All inputs known: the fingerprint is final.
                    let digest = |up: usize, out: &str| {
                        records[up]
                            .as_ref()
                            .and_then(|r| r.outputs.get(out).map(|o| o.digest.clone()))
                    };
                    let fi = match plan.fingerprint_inputs(i, &digest, &mut hasher) {
                        Ok(f) => f,
                        Err(source) => {
                            let e = ExecError::Hash {
                                stage: cell.name.clone(),
                                source,
                            };
                            reporter.line(format!("  failed   {}: {e}", cell.name));
                            outcome[i] = Some(Outcome::Failed(e));
                            progressed = true;
                            continue;
                        }
                    };
                    let fp = fi.fingerprint();
                    fingerprints[i] = Some(fp.clone());
                    if let Some(l) = &lock
                        && let Some(exp) = l.stages.get(&cell.name)
                        && exp.fingerprint != fp
                    {
                        let mut d = Vec::new();
                        diff_stage(
                            &cell.name,
                            exp,
                            &LockedStage {
                                kind: cell.kind.into(),
                                fingerprint: fp.clone(),
                                outputs: exp.outputs.clone(),
                                metrics: exp.metrics.clone(),
                            },
                            &mut d,
                        );
                        lock_diff.extend(d);
                        outcome[i] = Some(Outcome::Failed(ExecError::Locked {
                            stage: cell.name.clone(),
                            diff: lock_diff.clone(),
                        }));
                        progressed = true;
                        continue;
                    }
                    if !forced[i] {
                        match cache.lookup(&fp) {
                            Ok(Lookup::Hit(r)) => {
                                reporter.line(format!("  cached   {} ({})", cell.name, short(&fp)));
                                records[i] = Some(r);
                                outcome[i] = Some(Outcome::Cached);
                                progressed = true;
                                continue;
                            }
                            Ok(Lookup::Miss) => {}
                            Ok(Lookup::Broken(why)) => {
                                if !warned_broken[i] {
                                    warned_broken[i] = true;
                                    reporter.line(format!(
                                        "  warning  {}: cache entry {} is broken ({why}); recomputing it",
                                        cell.name,
                                        short(&fp)
                                    ));
                                }
                            }
                            Err(e) => {
                                reporter.line(format!("  failed   {}: {e}", cell.name));
                                outcome[i] = Some(Outcome::Failed(e.into()));
                                progressed = true;
                                continue;
                            }
                        }
                    }
                    if in_flight >= jobs {
                        continue;
                    }
                    let artifacts: BTreeMap<String, Artifact> = cell
                        .inputs
                        .iter()
                        .filter_map(|inp| {
                            let r = records[inp.upstream].as_ref()?;
                            let o = r.outputs.get(&inp.output)?;
                            Some((
                                inp.field.clone(),
                                Artifact {
                                    ty: o.ty,
                                    dir: cache
                                        .entry_dir(&r.fingerprint)
                                        .join("out")
                                        .join(&inp.output),
                                    digest: o.digest.clone(),
                                },
                            ))
                        })
                        .collect();
                    let job = Job {
                        cell: i,
                        fingerprint: fp,
                        inputs: fi,
                        artifacts,
                        force: forced[i],
                    };
                    started_cells[i] = true;
                    in_flight += 1;
                    *running.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    let tx = tx.clone();
                    let reporter = &reporter;
                    let cancel = cancel.clone();
                    let run_dir = run_dir.clone();
                    scope.spawn(move || {
                        let t0 = Instant::now();
                        let result = run_cell(plan, cache, job, reporter, cancel, &run_dir);
                        let _ = tx.send(Done {
                            cell: i,
                            result,
                            duration: t0.elapsed(),
                        });
                    });
                    progressed = true;
                }
            }
            hasher.save();
            if in_flight == 0 {
                break;
            }
            // Wait for a cell to finish (polling the cancel flag).
            let done = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(d) => d,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            in_flight -= 1;
            let i = done.cell;
            durations[i] = done.duration;
            let cell = &plan.cells[i];
            match done.result {
                Ok((record, computed)) => {
                    if computed {
                        reporter.line(format!(
                            "  ran      {} ({}) in {}",
                            cell.name,
                            short(&record.fingerprint),
                            fmt_duration(done.duration)
                        ));
                    } else {
                        reporter.line(format!(
                            "  cached   {} ({}, computed by another process)",
                            cell.name,
                            short(&record.fingerprint)
                        ));
                    }
                    if let Some(exp) = lock.as_ref().and_then(|l| l.stages.get(&cell.name)) {
                        let mut d = Vec::new();
                        diff_stage(
                            &cell.name,
                            exp,
                            &locked_stage(cell.kind, &record.fingerprint, &record),
                            &mut d,
                        );
                        if !d.is_empty() {
                            lock_diff.extend(d.clone());
                            outcome[i] = Some(Outcome::Failed(ExecError::Locked {
                                stage: cell.name.clone(),
                                diff: d,
                            }));
                            records[i] = Some(record);
                            continue;
                        }
                    }
                    records[i] = Some(record);
                    outcome[i] = Some(Outcome::Ran);
                }
                Err(e) => {
                    if cancel.load(Ordering::Relaxed) {
                        reporter.line(format!("  stopped  {}", cell.name));
                        outcome[i] = Some(Outcome::Interrupted);
                    } else {
                        reporter.line(format!(
                            "  failed   {} after {}",
                            cell.name,
                            fmt_duration(done.duration)
                        ));
                        outcome[i] = Some(Outcome::Failed(e));
                    }
                }
            }
        }
        Ok(())
    })?;

    let interrupted = cancel.load(Ordering::Relaxed);
    let cells: Vec<CellReport> = plan
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| CellReport {
            name: c.name.clone(),
            kind: c.kind.to_owned(),
            outcome: outcome[i]
                .take()
                .unwrap_or(if interrupted || !lock_diff.is_empty() {
                    Outcome::Interrupted
                } else {
                    Outcome::Skipped {
                        upstream: "?".into(),
                    }
                }),
            fingerprint: fingerprints[i].clone(),
            record: records[i].take(),
            duration: durations[i],
        })
        .collect();

    let record = RunRecord {
        run_id: run_id.clone(),
        manifest: plan.manifest.path.display().to_string(),
        pipeline: plan.manifest.header.pipeline.clone(),
        started,
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
    // A run record that cannot be written (a full disk) does not hide what happened to the
    // cells: the report still carries every outcome, and the error beside them.
    let rp = run_dir.join("run.json");
    let record_error =
        cache::write_atomic(&rp, &serde_json::to_vec_pretty(&record).unwrap_or_default())
            .err()
            .map(|source| ExecError::Io {
                path: rp.display().to_string(),
                source,
            });
    Ok(RunReport {
        run_id,
        cells,
        interrupted,
        lock_diff,
        record_error,
    })
}

/// `<cell>.log`, with every character that could leave the run directory (`/`, `\\`, a name
/// of dots: matrix values are free text) replaced by `_`.
fn log_file_name(cell: &str) -> String {
    let safe: String = cell
        .chars()
        .map(|c| match c {
            '/' | '\\' | '\0' => '_',
            c => c,
        })
        .collect();
    if safe.trim_matches('.').is_empty() {
        format!("_{safe}.log")
    } else {
        format!("{safe}.log")
    }
}

/// Run one cell in a worker thread: lock, re-check, stage, run, publish.
fn run_cell(
    plan: &Plan,
    cache: &Cache,
    job: Job,
    reporter: &Reporter,
    cancel: Arc<AtomicBool>,
    run_dir: &std::path::Path,
) -> Result<(EntryRecord, bool), ExecError> {
    let cell = &plan.cells[job.cell];
    let fp = &job.fingerprint;
    let lock = cache.lock(fp, &mut || {
        reporter.line(format!(
            "  waiting  {} (another process is computing it)",
            cell.name
        ));
    })?;
    if !job.force
        && let Lookup::Hit(r) = cache.lookup(fp)?
    {
        return Ok((r, false));
    }
    let out_names: Vec<&str> = cell.outputs.iter().map(|o| o.dir_name()).collect();
    let staging = cache.begin(fp, &out_names, &lock)?;
    let scratch = cache.scratch_dir(fp);
    std::fs::create_dir_all(&scratch).map_err(|source| ExecError::Io {
        path: scratch.display().to_string(),
        source,
    })?;
    let log_path = run_dir.join(log_file_name(&cell.name));
    let log = std::fs::File::create(&log_path).ok();
    reporter.line(format!("  running  {} ({})", cell.name, cell.kind));
    let progress = reporter.bar(&cell.name);
    let mut cx = RunContext {
        pipeline: plan.manifest.header.pipeline.clone(),
        stage: cell.name.clone(),
        manifest_dir: plan.manifest.dir.clone(),
        inputs: job.artifacts,
        files: cell
            .files
            .iter()
            .cloned()
            .collect::<BTreeMap<String, PathBuf>>(),
        outputs: out_names
            .iter()
            .map(|o| ((*o).to_owned(), staging.output_dir(o)))
            .collect(),
        scratch,
        seed: plan.manifest.header.seed,
        backend: plan.backend.clone(),
        log,
        progress,
        cancel,
    };
    cx.log(format!(
        "stage {} ({}) fingerprint {fp}",
        cell.name, cell.kind
    ));
    let t0 = Instant::now();
    let params = cell.params.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| params.run(&mut cx)));
    let outcome = match result {
        Ok(Ok(o)) => o,
        Ok(Err(source)) => {
            cx.log(format!("failed: {source}"));
            let _ = std::fs::remove_dir_all(&staging.dir);
            return Err(ExecError::Stage {
                stage: cell.name.clone(),
                source,
            });
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            let _ = std::fs::remove_dir_all(&staging.dir);
            return Err(ExecError::Panic {
                stage: cell.name.clone(),
                message,
            });
        }
    };
    drop(cx);
    let types = cell
        .outputs
        .iter()
        .map(|o| (o.dir_name().to_owned(), o.ty))
        .collect();
    let record = cache.publish(
        staging,
        &job.inputs,
        &cell.name,
        &types,
        outcome.metrics,
        t0.elapsed().as_millis() as u64,
        &lock,
    )?;
    Ok((record, true))
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_files_stay_in_the_run_directory() {
        assert_eq!(super::log_file_name("sft[lr=1e-4]"), "sft[lr=1e-4].log");
        assert_eq!(super::log_file_name("a[d=../../x]"), "a[d=.._.._x].log");
        assert_eq!(super::log_file_name(".."), "_...log");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
