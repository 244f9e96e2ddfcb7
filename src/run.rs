//! `burnish run` and the hidden `burnish run-cell`: options in, the executor, a summary out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use burnish_engine::exec::{self, Outcome, RunOptions, RunReport};
use burnish_engine::lock::LockFile;
use burnish_engine::manifest::Executor;
use burnish_engine::plan::Plan;
use burnish_engine::stage::Registry;
use miette::{IntoDiagnostic, Result, miette};

use crate::{BackendArg, CacheArgs, INVALID, load, plan_and_cache, render_diagnostic};

#[derive(clap::Args)]
pub struct RunArgs {
    file: PathBuf,
    /// Run this stage (or matrix cell) even if cached; repeatable
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Run only this stage and what it depends on
    #[arg(long, value_name = "STAGE")]
    until: Option<String>,
    /// Independent stages to run at once
    #[arg(long, short = 'j', default_value_t = 1)]
    jobs: usize,
    /// Override the manifest's backend
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Fail if anything would differ from the lock file
    #[arg(long)]
    locked: bool,
    /// What runs the stages that name no executor (default: the manifest's `executor:`)
    #[arg(long, value_enum)]
    executor: Option<ExecutorArg>,
    /// With `--executor slurm`: submit every stage that must run (each after its upstream
    /// jobs) and return; a later `run` restores the results and writes the lock file
    #[arg(long)]
    detach: bool,
    /// No progress output
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExecutorArg {
    /// Threads of this process
    Local,
    /// One sbatch job per cell (the cache directory must be shared with the nodes)
    Slurm,
}

/// `run-cell MANIFEST CELL --fingerprint FP`: what a launcher runs where the cell is to run.
#[derive(clap::Args)]
pub struct RunCellArgs {
    file: PathBuf,
    /// The cell (`sft`, `sft[lr=1e-4]`)
    cell: String,
    /// The fingerprint the launching side computed; nothing runs when this side's differs
    /// (left out by jobs submitted before their inputs were computed)
    #[arg(long)]
    fingerprint: Option<String>,
    /// Run it even if it is cached
    #[arg(long)]
    force: bool,
    /// Override the manifest's backend
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// No progress output
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    cache: CacheArgs,
}

pub fn run(args: &RunArgs, reg: &Registry) -> Result<ExitCode> {
    let Some(m) = load(&args.file, reg) else {
        return Ok(ExitCode::from(INVALID));
    };
    let (plan, store, note) = plan_and_cache(m, reg, args.backend, &args.cache)?;
    if let Some(note) = note
        && !args.quiet
        && plan.cells.iter().any(|c| c.sensitivity.backend)
    {
        eprintln!("{note}");
    }
    for name in args.force.iter().chain(args.until.iter()) {
        crate::named_cells(&plan, name, &args.file)?;
    }
    let opts = RunOptions {
        force: args.force.clone(),
        until: args.until.clone(),
        jobs: args.jobs,
        locked: args.locked,
        quiet: args.quiet,
        executor: args.executor.map(|e| match e {
            ExecutorArg::Local => Executor::Local,
            ExecutorArg::Slurm => Executor::Slurm,
        }),
        ..RunOptions::default()
    };
    if args.detach {
        return detach(args, &plan, &store, &opts);
    }
    let t0 = std::time::Instant::now();
    let report = exec::run(&plan, &store, &opts, cancel_on_ctrl_c())?;
    summarize(&plan, &report, t0.elapsed(), args.quiet);
    if let Some(line) = crate::remote::transfer_line(&store)
        && !args.quiet
    {
        eprintln!("{line}");
    }
    if let Some(code) = failure_code(&report) {
        return Ok(code);
    }
    if !args.locked
        && let Some(lock) = report.lock_file(&plan.manifest.header.pipeline)
    {
        let path = plan.manifest.lock_path();
        let old = LockFile::read(&path).ok().flatten();
        if old.as_ref() != Some(&lock) {
            lock.write(&path).into_diagnostic()?;
            if !args.quiet {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_cell(args: &RunCellArgs, reg: &Registry) -> Result<ExitCode> {
    let Some(m) = load(&args.file, reg) else {
        return Ok(ExitCode::from(INVALID));
    };
    let (plan, store, _) = plan_and_cache(m, reg, args.backend, &args.cache)?;
    let opts = RunOptions {
        quiet: args.quiet,
        force: if args.force {
            vec![args.cell.clone()]
        } else {
            Vec::new()
        },
        ..RunOptions::default()
    };
    let t0 = std::time::Instant::now();
    let report = exec::run_one(
        &plan,
        &store,
        &args.cell,
        args.fingerprint.as_deref(),
        &opts,
        cancel_on_ctrl_c(),
    )?;
    summarize(&plan, &report, t0.elapsed(), args.quiet);
    Ok(failure_code(&report).unwrap_or(ExitCode::SUCCESS))
}

/// `run --detach`: submit and report the job ids.
fn detach(
    args: &RunArgs,
    plan: &Plan,
    store: &burnish_engine::store::Store,
    opts: &RunOptions,
) -> Result<ExitCode> {
    let default = opts.executor.unwrap_or(plan.manifest.header.executor);
    if default != Executor::Slurm {
        return Err(miette!(
            code = "burnish::run::detach",
            help = "add `--executor slurm` (or `executor: slurm` in the manifest)",
            "`--detach` submits Slurm jobs, and {} runs on the local executor",
            args.file.display()
        ));
    }
    let jobs = exec::detach(plan, store, opts)?;
    if !args.quiet {
        let ids: Vec<&str> = jobs.iter().map(|(_, id)| id.as_str()).collect();
        eprintln!(
            "{}: submitted {} jobs ({}); when they are done, `burnish run {}` restores their results and writes the lock file",
            plan.manifest.header.pipeline,
            jobs.len(),
            if ids.is_empty() {
                "nothing to run".to_owned()
            } else {
                format!("slurm jobs {}", ids.join(", "))
            },
            args.file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A flag that Ctrl-C sets; a second Ctrl-C exits at once.
fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting now; nothing unfinished was cached");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupting: stages stop at their next step (Ctrl-C again to exit now); the next run resumes"
        );
    });
    cancel
}

/// Every failure's diagnostic, the run record's error, lock differences, and the count line.
fn summarize(plan: &Plan, report: &RunReport, elapsed: Duration, quiet: bool) {
    let count = |f: fn(&Outcome) -> bool| report.cells.iter().filter(|c| f(&c.outcome)).count();
    let ran = count(|o| matches!(o, Outcome::Ran));
    let cached = count(|o| matches!(o, Outcome::Cached));
    let failed: Vec<_> = report.failures().collect();
    let skipped = count(|o| matches!(o, Outcome::Skipped { .. }));
    for (_, e) in &failed {
        eprint!("{}", render_diagnostic(*e));
    }
    if let Some(e) = &report.record_error {
        eprint!("{}", render_diagnostic(e));
    }
    if !report.lock_diff.is_empty() {
        eprintln!(
            "error: the run differs from {}:",
            plan.manifest.lock_path().display()
        );
        for d in &report.lock_diff {
            eprintln!("  {d}");
        }
    }
    if !quiet {
        eprintln!(
            "{}: {ran} ran, {cached} cached, {} failed, {skipped} skipped in {:.2}s (run {})",
            plan.manifest.header.pipeline,
            failed.len(),
            elapsed.as_secs_f64(),
            report.run_id
        );
    }
}

/// 130 for an interrupted run, 1 for one that did not succeed.
fn failure_code(report: &RunReport) -> Option<ExitCode> {
    if report.interrupted {
        Some(ExitCode::from(130))
    } else if !report.succeeded() {
        Some(ExitCode::from(1))
    } else {
        None
    }
}
