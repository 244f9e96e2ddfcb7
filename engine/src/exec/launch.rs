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
