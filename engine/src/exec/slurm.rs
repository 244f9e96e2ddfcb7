//! The Slurm launcher: each cell that must run becomes an `sbatch` job running
//! `burnish run-cell MANIFEST CELL --fingerprint FP` against the same cache directory (which must
//! be on a file system the nodes share), and its state is read back from Slurm.
//!
//! - Resources come from the stage's `resources:` (`--gpus`, `--cpus-per-task`, `--mem`,
//!   `--time`, `--partition`); a backend-sensitive kind (a trainer) on `cuda` asks for one GPU
//!   unless it says otherwise.
//! - A job is submitted once its upstream cells are computed, so its fingerprint is known and
//!   `run-cell` can refuse a manifest or input that changed in between. The DAG's order is kept
//!   by the scheduler. With `--detach` ([`Slurm::submit_all`]) everything is submitted at once
//!   and the order is Slurm's: `--dependency=afterok` on the upstream jobs; a job downstream
//!   of another then takes the fingerprint its inputs give when it starts.
//! - State: `scontrol show job ID -o` (`JobState=`, `ExitCode=`), and `sacct -P -n -X` once
//!   the controller has forgotten the job (after `MinJobAge`); both are plain text, stable across
//!   Slurm 22 to 24. A job that completed is done only if its entry is in the store: the entry,
//!   not the job's state, is the result.
//! - Ctrl-C cancels every submitted job (`scancel`); a job that dies leaves no entry (the usual
//!   rules), so a rerun resubmits only what is missing, and a trainer resumes from its scratch
//!   checkpoint.
//! - Logs: the job's output goes to `<run dir>/<cell>.slurm.log`, beside its batch script.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cache::Lookup;
use crate::plan::{CellStatus, Plan, State};
use crate::store::Store;

use super::cell::file_stem;
use super::launch::{Done, Launcher};
use super::progress::Reporter;
use super::schedule::Job;
use super::{ExecError, JobFailure};

/// How jobs are submitted.
#[derive(Clone, Debug)]
pub struct SlurmConfig {
    /// The `burnish` binary the jobs run; the nodes must see it at this path.
    pub program: PathBuf,
    /// Time between state queries.
    pub poll: Duration,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("burnish")),
            poll: Duration::from_secs(1),
        }
    }
}

/// What one `sbatch` call submits.
struct JobSpec<'a> {
    cell: usize,
    /// The fingerprint `run-cell` must find; `None` for a cell downstream of a job not yet run.
    fingerprint: Option<&'a str>,
    force: bool,
    /// Job ids that must complete first (`--dependency=afterok`).
    after: Vec<String>,
}

struct Submitted {
    id: String,
    cell: usize,
    fingerprint: String,
    started: Instant,
    log: PathBuf,
}

/// Submits cells as Slurm jobs.
pub(crate) struct Slurm<'a> {
    plan: &'a Plan,
    store: &'a Store,
    reporter: &'a Reporter,
    config: SlurmConfig,
    run_dir: PathBuf,
    submitted: Vec<Submitted>,
    done: VecDeque<Done>,
    last_query: Option<Instant>,
}

impl<'a> Slurm<'a> {
    pub fn new(
        plan: &'a Plan,
        store: &'a Store,
        reporter: &'a Reporter,
        config: SlurmConfig,
        run_dir: PathBuf,
    ) -> Self {
        Slurm {
            plan,
            store,
            reporter,
            config,
            run_dir,
            submitted: Vec::new(),
            done: VecDeque::new(),
            last_query: None,
        }
    }

    /// The batch script and `sbatch` arguments for a job.
    fn script(&self, job: &JobSpec, log: &Path) -> (String, Vec<String>) {
        let plan = self.plan;
        let cell = &plan.cells[job.cell];
        let manifest =
            std::path::absolute(&plan.manifest.path).unwrap_or_else(|_| plan.manifest.path.clone());
        let cache = std::path::absolute(self.store.local().root())
            .unwrap_or_else(|_| self.store.local().root().to_path_buf());
        let mut words = vec![
            self.config.program.display().to_string(),
            "run-cell".into(),
            manifest.display().to_string(),
            cell.name.clone(),
        ];
        if let Some(fp) = job.fingerprint {
            words.extend(["--fingerprint".into(), fp.to_owned()]);
        }
        if job.force {
            words.push("--force".into());
        }
        words.extend([
            "--cache-dir".into(),
            cache.display().to_string(),
            "--backend".into(),
            plan.backend.clone(),
            "--quiet".into(),
        ]);
        let command: Vec<String> = words.iter().map(|w| sh_quote(w)).collect();
        let script = format!(
            "#!/bin/sh\n# burnish: cell `{}` of {}, fingerprint {}\nexec {}\n",
            cell.name,
            manifest.display(),
            job.fingerprint
                .unwrap_or("(from its inputs, once its upstream jobs are done)"),
            command.join(" ")
        );
        let r = &cell.resources;
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name=burnish:{}", cell.name),
            format!("--output={}", log.display()),
            format!("--chdir={}", plan.manifest.dir.display()),
        ];
        if !job.after.is_empty() {
            // A failed upstream job cancels this one instead of leaving it pending forever.
            args.push(format!("--dependency=afterok:{}", job.after.join(":")));
            args.push("--kill-on-invalid-dep=yes".into());
        }
        let gpus = r
            .gpus
            .or((cell.sensitivity.backend && plan.backend == "cuda").then_some(1));
        if let Some(g) = gpus.filter(|&g| g > 0) {
            args.push(format!("--gpus={g}"));
        }
        if let Some(c) = r.cpus {
            args.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &r.mem {
            args.push(format!("--mem={m}"));
        }
        if let Some(t) = &r.time {
            args.push(format!("--time={t}"));
        }
        if let Some(p) = &r.partition {
            args.push(format!("--partition={p}"));
        }
        (script, args)
    }

    fn submit(&mut self, job: &Job) -> Result<Submitted, String> {
        let spec = JobSpec {
            cell: job.cell,
            fingerprint: Some(&job.fingerprint),
            force: job.force,
            after: Vec::new(),
        };
        Ok(Submitted {
            id: self.sbatch(&spec)?,
            cell: job.cell,
            fingerprint: job.fingerprint.clone(),
            started: Instant::now(),
            log: self.log_path(job.cell),
        })
    }

    fn log_path(&self, cell: usize) -> PathBuf {
        let stem = file_stem(&self.plan.cells[cell].name);
        self.run_dir.join(format!("{stem}.slurm.log"))
    }

    /// Submit one job; its id.
    fn sbatch(&self, job: &JobSpec) -> Result<String, String> {
        let stem = file_stem(&self.plan.cells[job.cell].name);
        let log = self.run_dir.join(format!("{stem}.slurm.log"));
        let path = self.run_dir.join(format!("{stem}.sbatch"));
        let (script, mut args) = self.script(job, &log);
        std::fs::write(&path, script)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        args.push(path.display().to_string());
        let mut sbatch = Command::new("sbatch");
        // The job sees the submitting environment (sbatch's default `--export=ALL`); the remote
        // goes there, never into the batch script in the run directory.
        match self.store.remote() {
            Some(r) => sbatch
                .env("BURNISH_REMOTE", r.url())
                .env("BURNISH_REMOTE_MODE", r.mode().as_str())
                .env_remove("BURNISH_NO_REMOTE"),
            None => sbatch.env("BURNISH_NO_REMOTE", "1"),
        };
        let out = sbatch
            .args(&args)
            .output()
            .map_err(|e| format!("cannot start sbatch: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "sbatch exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // `--parsable`: `ID` or `ID;cluster`.
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or("").to_owned();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
            return Err(format!("sbatch printed no job id: {text:?}"));
        }
        Ok(id)
    }

    /// Ask Slurm about every submitted job; move the finished ones to `done`.
    fn query(&mut self) {
        self.last_query = Some(Instant::now());
        let mut still = Vec::new();
        for s in std::mem::take(&mut self.submitted) {
            match job_state(&s.id) {
                Some((state, exit)) if is_terminal(&state) => {
                    let done = self.finished(&s, &state, &exit);
                    self.done.push_back(done);
                }
                _ => still.push(s),
            }
        }
        self.submitted = still;
    }

    fn finished(&self, s: &Submitted, state: &str, exit: &str) -> Done {
        let result = if state == "COMPLETED" {
            match self.store.lookup(&s.fingerprint) {
                Ok(Lookup::Hit(r)) => Ok((r, true)),
                Ok(_) => Err(self.job_error(s, "COMPLETED without publishing its entry", exit)),
                Err(e) => Err(e.into()),
            }
        } else {
            Err(self.job_error(s, state, exit))
        };
        Done {
            cell: s.cell,
            result,
            duration: s.started.elapsed(),
        }
    }

    fn job_error(&self, s: &Submitted, state: &str, exit: &str) -> ExecError {
        ExecError::Job(Box::new(JobFailure {
            stage: self.plan.cells[s.cell].name.clone(),
            job: s.id.clone(),
            state: state.to_owned(),
            exit: exit.to_owned(),
            log: s.log.display().to_string(),
            tail: log_tail(&s.log, 20),
        }))
    }
}

impl Launcher for Slurm<'_> {
    fn capacity(&self) -> usize {
        // The cluster queues; what runs at once is its business.
        1024
    }
    fn in_flight(&self) -> usize {
        self.submitted.len() + self.done.len()
    }
    fn start(&mut self, job: Job) {
        let name = self.plan.cells[job.cell].name.clone();
        match self.submit(&job) {
            Ok(s) => {
                self.reporter
                    .line(format!("  submitted {name} (slurm job {})", s.id));
                self.submitted.push(s);
            }
            Err(message) => self.done.push_back(Done {
                cell: job.cell,
                result: Err(ExecError::Submit {
                    stage: name,
                    message,
                }),
                duration: Duration::ZERO,
            }),
        }
    }
    fn poll(&mut self, timeout: Duration) -> Option<Done> {
        if let Some(d) = self.done.pop_front() {
            return Some(d);
        }
        if self.submitted.is_empty() {
            return None;
        }
        let due = self.last_query.map_or(Duration::ZERO, |t| {
            self.config.poll.saturating_sub(t.elapsed())
        });
        if due > timeout {
            std::thread::sleep(timeout);
            return None;
        }
        std::thread::sleep(due);
        self.query();
        self.done.pop_front()
    }
    fn cancel(&mut self) {
        if self.submitted.is_empty() {
            return;
        }
        let ids: Vec<&str> = self.submitted.iter().map(|s| s.id.as_str()).collect();
        self.reporter
            .line(format!("  cancelling slurm jobs {}", ids.join(", ")));
        let _ = Command::new("scancel").args(&ids).status();
    }
}

impl Slurm<'_> {
    /// `--detach`: submit every selected cell that is not computed at once, in DAG order, each
    /// job after its upstream jobs (`--dependency=afterok`; `--kill-on-invalid-dep=yes` cancels
    /// the dependents of a failed job). A cell whose inputs are computed is pinned to its
    /// fingerprint; one downstream of a submitted job cannot be (its inputs enter by content),
    /// and its `run-cell` takes the fingerprint its inputs give when it starts. A submission
    /// that fails cancels the jobs submitted before it. The cells and job ids, in order.
    pub fn submit_all(
        &self,
        status: &[CellStatus],
        wanted: &[bool],
        forced: &[bool],
        on_slurm: &[bool],
    ) -> Result<Vec<(usize, String)>, ExecError> {
        let plan = self.plan;
        let mut ids: Vec<Option<String>> = vec![None; plan.cells.len()];
        let mut out: Vec<(usize, String)> = Vec::new();
        let fail = |out: &[(usize, String)], stage: &str, message: String| {
            let ids: Vec<&str> = out.iter().map(|(_, id)| id.as_str()).collect();
            if !ids.is_empty() {
                let _ = Command::new("scancel").args(&ids).status();
            }
            ExecError::Submit {
                stage: stage.to_owned(),
                message,
            }
        };
        for (i, cell) in plan.cells.iter().enumerate() {
            if !wanted[i] || (status[i].state == State::Cached && !forced[i]) {
                continue;
            }
            if !on_slurm[i] {
                let message = "`--detach` submits every stage that must run as a Slurm job, and this one says `executor: local`".to_owned();
                return Err(fail(&out, &cell.name, message));
            }
            let after: Vec<String> = cell.deps().iter().filter_map(|u| ids[*u].clone()).collect();
            let spec = JobSpec {
                cell: i,
                fingerprint: status[i].fingerprint.as_deref(),
                force: forced[i],
                after: after.clone(),
            };
            let id = self
                .sbatch(&spec)
                .map_err(|message| fail(&out, &cell.name, message))?;
            let deps = if after.is_empty() {
                String::new()
            } else {
                format!(", after {}", after.join(", "))
            };
            self.reporter
                .line(format!("  submitted {} (slurm job {id}{deps})", cell.name));
            ids[i] = Some(id.clone());
            out.push((i, id));
        }
        Ok(out)
    }
}

/// `'…'` for `sh`, with `'` written as `'\''`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A job's (state, exit code) from `scontrol`, or from `sacct` once the controller has
/// forgotten it; `None` when neither knows (yet).
fn job_state(id: &str) -> Option<(String, String)> {
    let out = Command::new("scontrol")
        .args(["show", "job", id, "-o"])
        .output()
        .ok()?;
    if out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        if let Some(state) = field("JobState=") {
            return Some((state, field("ExitCode=").unwrap_or_default()));
        }
    }
    let out = Command::new("sacct")
        .args(["-P", "-n", "-X", "-j", id, "-o", "state,exitcode"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?;
    let (state, exit) = line.split_once('|')?;
    // `CANCELLED by 0`, `CANCELLED+`: the first word, without the mark.
    let state = state.split_whitespace().next()?.trim_end_matches('+');
    Some((state.to_owned(), exit.to_owned()))
}

/// Slurm's job states from which a job does not come back.
fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "CANCELLED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "OUT_OF_MEMORY"
            | "PREEMPTED"
            | "BOOT_FAIL"
            | "DEADLINE"
    )
}

/// The last `n` lines of a job's log (what `run-cell` printed when it failed).
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn shell_quoting_survives_quotes_and_brackets() {
        assert_eq!(super::sh_quote("sft[lr=1e-4]"), "'sft[lr=1e-4]'");
        assert_eq!(super::sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn terminal_states() {
        assert!(super::is_terminal("COMPLETED"));
        assert!(super::is_terminal("OUT_OF_MEMORY"));
        assert!(!super::is_terminal("PENDING"));
        assert!(!super::is_terminal("RUNNING"));
        assert!(!super::is_terminal("COMPLETING"));
    }
}
