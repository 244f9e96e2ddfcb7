//! Launchers: where a job runs. A launcher starts a job for a cell and reports finished ones;
//! the run loop decides (through the scheduler) and prints, whatever the launcher.
//!
//! [`Local`] is a pool of threads in this process. A launcher that runs a cell elsewhere (another
//! process, a cluster job) runs `burnish run-cell MANIFEST CELL --fingerprint FP` there, which
//! re-plans and runs exactly that cell the same way ([`super::run_one`]).

use std::sync::mpsc;
use std::thread::Scope;
use std::time::{Duration, Instant};

use crate::cache::EntryRecord;

use crate::manifest::Executor;

use super::ExecError;
use super::cell::CellRunner;
use super::schedule::Job;

/// A finished job.
pub struct Done {
    pub cell: usize,
    /// The entry's record and whether this job computed it (`false`: another process had).
    pub result: Result<(EntryRecord, bool), ExecError>,
    pub duration: Duration,
}

/// Starts jobs and reports the finished ones.
pub trait Launcher {
    /// Jobs that may run at once.
    fn capacity(&self) -> usize;
    /// Jobs started and not yet reported.
    fn in_flight(&self) -> usize;
    /// Start `job`.
    fn start(&mut self, job: Job);
    /// A finished job, waiting at most `timeout` for one.
    fn poll(&mut self, timeout: Duration) -> Option<Done>;
    /// Ctrl-C: stop what was started (jobs in this process watch the cancel flag instead).
    fn cancel(&mut self) {}
}

/// Up to `jobs` cells at once, each in a thread of this process.
pub(crate) struct Local<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    runner: &'env CellRunner<'env>,
    jobs: usize,
    in_flight: usize,
    tx: mpsc::Sender<Done>,
    rx: mpsc::Receiver<Done>,
}

impl<'scope, 'env> Local<'scope, 'env> {
    pub fn new(
        scope: &'scope Scope<'scope, 'env>,
        runner: &'env CellRunner<'env>,
        jobs: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        Local {
            scope,
            runner,
            jobs: jobs.max(1),
            in_flight: 0,
            tx,
            rx,
        }
    }
}

impl Launcher for Local<'_, '_> {
    fn capacity(&self) -> usize {
        self.jobs
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn start(&mut self, job: Job) {
        self.in_flight += 1;
        let tx = self.tx.clone();
        let runner = self.runner;
        self.scope.spawn(move || {
            let t0 = Instant::now();
            let cell = job.cell;
            let result = runner.run(job);
            let _ = tx.send(Done {
                cell,
                result,
                duration: t0.elapsed(),
            });
        });
    }
    fn poll(&mut self, timeout: Duration) -> Option<Done> {
        let done = self.rx.recv_timeout(timeout).ok()?;
        self.in_flight -= 1;
        Some(done)
    }
}

/// Each cell to the launcher its executor names: local cells to the thread pool (queued while
/// it is full), Slurm cells to the cluster.
pub(crate) struct Routed<'l> {
    pub local: &'l mut dyn Launcher,
    pub slurm: Option<&'l mut dyn Launcher>,
    /// Per cell.
    pub route: Vec<Executor>,
    pub waiting: std::collections::VecDeque<Job>,
}

impl Launcher for Routed<'_> {
    fn capacity(&self) -> usize {
        self.local.capacity() + self.slurm.as_ref().map_or(0, |s| s.capacity())
    }
    fn in_flight(&self) -> usize {
        self.local.in_flight()
            + self.waiting.len()
            + self.slurm.as_ref().map_or(0, |s| s.in_flight())
    }
    fn start(&mut self, job: Job) {
        match (self.route[job.cell], self.slurm.as_mut()) {
            (Executor::Slurm, Some(slurm)) => slurm.start(job),
            _ if self.local.in_flight() < self.local.capacity() => self.local.start(job),
            _ => self.waiting.push_back(job),
        }
    }
    fn poll(&mut self, timeout: Duration) -> Option<Done> {
        if let Some(slurm) = self.slurm.as_mut()
            && slurm.in_flight() > 0
        {
            let wait = if self.local.in_flight() > 0 {
                Duration::ZERO
            } else {
                timeout
            };
            if let Some(d) = slurm.poll(wait) {
                return Some(d);
            }
        }
        if self.local.in_flight() == 0 {
            return None;
        }
        let done = self.local.poll(timeout)?;
        if let Some(job) = self.waiting.pop_front() {
            self.local.start(job);
        }
        Some(done)
    }
    fn cancel(&mut self) {
        self.waiting.clear();
        if let Some(s) = self.slurm.as_mut() {
            s.cancel();
        }
    }
}
