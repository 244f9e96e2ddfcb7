//! Running one cell in this process: lock → re-check → stage → run → publish.
//!
//! What every launcher ends in, on whatever machine: the local thread pool calls it in a worker
//! thread, `burnish run-cell` in a process of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::cache::{EntryRecord, Lookup};
use crate::plan::Plan;
use crate::stage::{Artifact, RunContext};
use crate::store::Store;

use super::ExecError;
use super::progress::Reporter;
use super::schedule::Job;

/// What running a cell needs besides its job.
pub(crate) struct CellRunner<'a> {
    pub plan: &'a Plan,
    pub store: &'a Store,
    pub reporter: &'a Reporter,
    pub cancel: Arc<AtomicBool>,
    /// Where the cell's log goes.
    pub run_dir: PathBuf,
}

impl CellRunner<'_> {
    /// Run `job` (unless another process computed it meanwhile): its record, and whether this
    /// process computed it.
    pub fn run(&self, job: Job) -> Result<(EntryRecord, bool), ExecError> {
        let (plan, store) = (self.plan, self.store);
        let cell = &plan.cells[job.cell];
        let fp = &job.fingerprint;
        let lock = store.lock(fp, &mut || {
            self.reporter.line(format!(
                "  waiting  {} (another process is computing it)",
                cell.name
            ));
        })?;
        if !job.force
            && let Lookup::Hit(r) = store.lookup_locked(fp, &lock)?
        {
            return Ok((r, false));
        }
        let out_names: Vec<&str> = cell.outputs.iter().map(|o| o.dir_name()).collect();
        let staging = store.begin(fp, &out_names, &lock)?;
        let scratch = store.scratch_dir(fp);
        std::fs::create_dir_all(&scratch).map_err(|source| ExecError::Io {
            path: scratch.display().to_string(),
            source,
        })?;
        let log_path = self.run_dir.join(log_file_name(&cell.name));
        let log = std::fs::File::create(&log_path).ok();
        self.reporter
            .line(format!("  running  {} ({})", cell.name, cell.kind));
        let inputs = job
            .artifacts
            .iter()
            .map(|(field, a)| {
                let artifact = Artifact {
                    ty: a.ty,
                    dir: store.artifact_dir(&a.fingerprint, &a.output),
                    digest: a.digest.clone(),
                };
                (field.clone(), artifact)
            })
            .collect();
        let mut cx = RunContext {
            pipeline: plan.manifest.header.pipeline.clone(),
            stage: cell.name.clone(),
            manifest_dir: plan.manifest.dir.clone(),
            inputs,
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
            progress: self.reporter.bar(&cell.name),
            cancel: self.cancel.clone(),
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
        let record = store.publish(
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
}

/// A cell's name as a file name in the run directory: every character that could leave it
/// (`/`, `\\`, a name of dots: matrix values are free text) replaced by `_`.
pub(crate) fn file_stem(cell: &str) -> String {
    let safe: String = cell
        .chars()
        .map(|c| match c {
            '/' | '\\' | '\0' => '_',
            c => c,
        })
        .collect();
    if safe.trim_matches('.').is_empty() {
        format!("_{safe}")
    } else {
        safe
    }
}

/// `<cell>.log`.
fn log_file_name(cell: &str) -> String {
    format!("{}.log", file_stem(cell))
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_files_stay_in_the_run_directory() {
        assert_eq!(super::log_file_name("sft[lr=1e-4]"), "sft[lr=1e-4].log");
        assert_eq!(super::log_file_name("a[d=../../x]"), "a[d=.._.._x].log");
        assert_eq!(super::log_file_name(".."), "_...log");
    }
}
