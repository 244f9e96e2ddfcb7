//! The Slurm executor on a real (single-node) Slurm cluster, with the test-only stage kinds:
//! one job per cell in DAG order and the same lock as a local run; a job cancelled mid-run is
//! resubmitted by the next run and resumes from its checkpoint; Ctrl-C cancels the jobs.
//!
//! `.ci/slurm up DIR` starts such a cluster (CI does, and sets `BURNISH_REQUIRE_SLURM=1`);
//! without one these tests skip and say so.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{burnish, skip};

/// Whether a Slurm controller answers here.
fn slurm_up() -> bool {
    let ok = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !ok {
        skip(
            "BURNISH_REQUIRE_SLURM",
            "no Slurm controller answers (`sinfo`); start one with `.ci/slurm up DIR` and export its SLURM_CONF",
        );
    }
    ok
}

fn burnish_t() -> Command {
    let mut c = burnish();
    c.env("BURNISH_TEST_KINDS", "1");
    c
}

fn run_ok(args: &[&str], dir: &Path) -> String {
    let out = burnish_t().args(args).current_dir(dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "burnish {args:?} failed:\n{err}");
    err
}

const CHAIN: &str = "\
pipeline: chain
seed: 3
stages:
  a: {kind: test.steps, steps: 20, step_ms: 5, salt: a}
  b: {kind: test.steps, steps: 20, step_ms: 5, salt: b, data: a, resources: {cpus: 1, mem: 256M, time: '5'}}
  c: {kind: test.steps, steps: 20, step_ms: 5, salt: c, data: b}
  d: {kind: test.steps, steps: 5, step_ms: 5, salt: d, executor: local}
";

/// `submitted <cell> (slurm job <id>)` lines: (cell, id).
fn submitted(err: &str) -> Vec<(String, String)> {
    err.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("submitted ")?;
            let (cell, id) = rest.split_once(" (slurm job ")?;
            let id: String = id.chars().take_while(char::is_ascii_digit).collect();
            Some((cell.to_owned(), id))
        })
        .collect()
}

/// A job's state as `scontrol` reports it.
fn job_state(id: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", id, "-o"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn one_job_per_cell_in_dag_order_and_the_same_lock_as_a_local_run() {
    if !slurm_up() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sl, local) = (tmp.path().join("slurm"), tmp.path().join("local"));
    for d in [&sl, &local] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("chain.yaml"), CHAIN).unwrap();
    }
    let err = run_ok(&["run", "--executor", "slurm", "chain.yaml"], &sl);
    let jobs = submitted(&err);
    let cells: Vec<&str> = jobs.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(cells, ["a", "b", "c"], "d stays local:\n{err}");
    // Each job is submitted only after its upstream's job finished.
    for (up, down) in [("a", "b"), ("b", "c")] {
        let ran = err.find(&format!("ran      {up} ")).unwrap();
        let sub = err.find(&format!("submitted {down} ")).unwrap();
        assert!(ran < sub, "{down} submitted before {up} finished:\n{err}");
    }
    for (_, id) in &jobs {
        assert_eq!(job_state(id), "COMPLETED");
    }
    assert!(err.contains("running  d"), "{err}");
    // `resources:` reached sbatch.
    let script_dir = std::fs::read_dir(sl.join(".burnish/runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("b.sbatch").exists())
        .unwrap();
    let b = Command::new("scontrol")
        .args(["show", "job", &jobs[1].1, "-o"])
        .output()
        .unwrap();
    let b = String::from_utf8_lossy(&b.stdout);
    assert!(b.contains("MinMemoryNode=256M"), "{b}");
    assert!(b.contains("TimeLimit=00:05:00"), "{b}");
    assert!(
        std::fs::read_to_string(script_dir.join("b.sbatch"))
            .unwrap()
            .contains("'run-cell'")
    );

    run_ok(&["run", "chain.yaml"], &local);
    assert_eq!(
        std::fs::read_to_string(sl.join("chain.lock")).unwrap(),
        std::fs::read_to_string(local.join("chain.lock")).unwrap()
    );
    // A rerun submits nothing.
    let err = run_ok(&["run", "--executor", "slurm", "chain.yaml"], &sl);
    assert!(submitted(&err).is_empty(), "{err}");
    assert!(err.contains("0 ran, 4 cached"), "{err}");
}

/// `burnish run --executor slurm` in the background, its stderr lines sent to a channel.
fn spawn_run(
    dir: &Path,
    manifest: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = burnish_t()
        .args(["run", "--executor", "slurm", manifest])
        .current_dir(dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Wait for a line containing `needle`; every line seen is kept in `seen`.
fn wait_for(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
) -> String {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }
    panic!("no line with {needle:?} in 60 s:\n{}", seen.join("\n"));
}

/// Wait until `path` exists.
fn wait_file(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const LONG: &str = "\
pipeline: long
stages:
  train: {kind: test.steps, steps: 200, step_ms: 40, salt: t}
";

#[test]
fn a_cancelled_job_is_resubmitted_and_resumes_and_ctrl_c_cancels_the_jobs() {
    if !slurm_up() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("long.yaml"), LONG).unwrap();
    let scratch = dir.join(".burnish/scratch");

    // scancel mid-training: the run fails naming the job, and caches nothing.
    let (mut child, rx) = spawn_run(dir, "long.yaml");
    let mut seen = Vec::new();
    let line = wait_for(&rx, "submitted train", &mut seen);
    let id = submitted(&line)[0].1.clone();
    let t0 = Instant::now();
    let ckpt = loop {
        let found = std::fs::read_dir(&scratch)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("checkpoint.json"))
            .find(|p| p.exists());
        if let Some(p) = found {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(Command::new("scancel").arg(&id).status().unwrap().success());
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    let err = [seen, rest].concat().join("\n");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("slurm job {id} of `train` ended CANCELLED")),
        "{err}"
    );
    assert!(!dir.join("long.lock").exists());
    wait_file(&ckpt);

    // The next run resubmits it, and it resumes from its checkpoint.
    let err = run_ok(&["run", "--executor", "slurm", "long.yaml"], dir);
    assert_eq!(submitted(&err).len(), 1, "{err}");
    let logs: Vec<String> = std::fs::read_dir(dir.join(".burnish/runs"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("train.log")).ok())
        .collect();
    assert!(
        logs.iter().any(|l| l.contains("resumed at step")),
        "no resume in the cell logs:\n{}",
        logs.join("\n---\n")
    );

    // Ctrl-C while a job runs (a new computation: another salt): the job is cancelled and
    // the run exits 130.
    let mut seen = Vec::new();
    std::fs::write(dir.join("long.yaml"), LONG.replace("salt: t", "salt: u")).unwrap();
    let (mut child, rx) = spawn_run(dir, "long.yaml");
    let line = wait_for(&rx, "submitted train", &mut seen);
    let id = submitted(&line)[0].1.clone();
    let t0 = Instant::now();
    while job_state(&id) != "RUNNING" {
        assert!(t0.elapsed() < Duration::from_secs(60), "job {id} never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    let err = [seen, rest].concat().join("\n");
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains(&format!("cancelling slurm jobs {id}")),
        "{err}"
    );
    let t0 = Instant::now();
    while job_state(&id) != "CANCELLED" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "job {id}: {}",
            job_state(&id)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const DAG: &str = "\
pipeline: dag
seed: 3
stages:
  a: {kind: test.steps, steps: 20, step_ms: 20, salt: a}
  b: {kind: test.steps, steps: 5, step_ms: 5, salt: b, data: a}
  c: {kind: test.steps, steps: 5, step_ms: 5, salt: c, data: b}
";

#[test]
fn detached_jobs_wait_for_their_upstream_jobs_and_a_later_run_restores_them() {
    if !slurm_up() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (sl, local) = (tmp.path().join("slurm"), tmp.path().join("local"));
    for d in [&sl, &local] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("dag.yaml"), DAG).unwrap();
    }
    let err = run_ok(&["run", "--executor", "slurm", "--detach", "dag.yaml"], &sl);
    let jobs = submitted(&err);
    let cells: Vec<&str> = jobs.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(cells, ["a", "b", "c"], "{err}");
    for (down, up) in [(1, 0), (2, 1)] {
        let line = format!(
            "submitted {} (slurm job {}, after {})",
            jobs[down].0, jobs[down].1, jobs[up].1
        );
        assert!(err.contains(&line), "no `{line}` in:\n{err}");
    }
    assert!(err.contains("submitted 3 jobs"), "{err}");
    assert!(
        !sl.join("dag.lock").exists(),
        "a detached run writes no lock"
    );
    // b and c could not be pinned to a fingerprint: their inputs did not exist yet.
    let runs = sl.join(".burnish/runs");
    let script = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .find_map(|e| std::fs::read_to_string(e.path().join("b.sbatch")).ok())
        .unwrap();
    assert!(!script.contains("--fingerprint"), "{script}");
    // Slurm runs them in order; each finds its input computed.
    for (cell, id) in &jobs {
        let t0 = Instant::now();
        loop {
            let state = job_state(id);
            if state == "COMPLETED" {
                break;
            }
            assert!(
                !["FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"].contains(&state.as_str()),
                "job {id} of {cell} ended {state}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "job {id} of {cell}: {state}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let err = run_ok(&["run", "dag.yaml"], &sl);
    assert!(err.contains("0 ran, 3 cached"), "{err}");
    run_ok(&["run", "dag.yaml"], &local);
    assert_eq!(
        std::fs::read_to_string(sl.join("dag.lock")).unwrap(),
        std::fs::read_to_string(local.join("dag.lock")).unwrap()
    );
    let err = run_ok(&["run", "--executor", "slurm", "--detach", "dag.yaml"], &sl);
    assert!(err.contains("submitted 0 jobs (nothing to run)"), "{err}");
}
