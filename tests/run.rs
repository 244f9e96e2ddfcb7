//! End-to-end tests of `burnish run` and the cache commands, with the test-only stage kinds
//! (`BURNISH_TEST_KINDS=1`): crash/resume under SIGKILL, two processes on one cache, failure
//! isolation, `--locked`, `verify`, `gc`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn burnish() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_burnish"));
    c.env("BURNISH_TEST_KINDS", "1")
        .env_remove("BURNISH_CACHE")
        .env("NO_COLOR", "1");
    c
}

fn run_ok(args: &[&str], cwd: &Path) -> Output {
    let out = burnish().args(args).current_dir(cwd).output().unwrap();
    assert!(
        out.status.success(),
        "burnish {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const CHAIN: &str = "\
pipeline: chain
seed: 3
stages:
  a: {kind: test.steps, steps: 40, step_ms: 8, salt: a}
  b: {kind: test.steps, steps: 40, step_ms: 8, salt: b, data: a}
  c: {kind: test.steps, steps: 40, step_ms: 8, salt: c, data: b}
  d: {kind: test.steps, steps: 10, step_ms: 8, salt: d}
";

/// A tiny deterministic generator for kill delays (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    // Reference: one uninterrupted run.
    let ref_dir = tmp.path().join("ref");
    write(&ref_dir, "chain.yaml", CHAIN);
    run_ok(&["run", "-q", "chain.yaml"], &ref_dir);
    let reference = std::fs::read_to_string(ref_dir.join("chain.lock")).unwrap();

    // Interrupted: kill at pseudo-random moments, several times, then finish.
    let dir = tmp.path().join("killed");
    write(&dir, "chain.yaml", CHAIN);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut kills = 0;
    for _ in 0..6 {
        let mut child = burnish()
            .args(["run", "-q", "chain.yaml"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(60 + rng.next() % 500));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL on Unix
            kills += 1;
        }
        let _ = child.wait();
    }
    assert!(
        kills >= 3,
        "only {kills} runs were killed mid-way; the test proves little"
    );
    run_ok(&["run", "-q", "chain.yaml"], &dir);
    let resumed = std::fs::read_to_string(dir.join("chain.lock")).unwrap();
    assert_eq!(
        resumed, reference,
        "outputs after kills differ from an uninterrupted run"
    );
    // Outputs on disk equal too, and nothing in the cache is corrupt.
    let out = run_ok(&["verify", "chain.yaml"], &dir);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 bad"));
    // Some stage resumed from its checkpoint rather than starting over.
    let logs: String = walk(&dir.join(".burnish/runs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        logs.contains("resumed at step"),
        "no stage resumed from a checkpoint"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn two_processes_on_one_cache_compute_a_stage_once() {
    let tmp = tempfile::tempdir().unwrap();
    let count = tmp.path().join("count.txt");
    let manifest = format!(
        "pipeline: conc\nstages:\n  slow: {{kind: test.steps, steps: 25, step_ms: 20, count_file: '{}'}}\n  after: {{kind: test.steps, steps: 2, data: slow, count_file: '{}'}}\n",
        count.display(),
        count.display()
    );
    let a = write(&tmp.path().join("a"), "p.yaml", &manifest);
    let b = write(&tmp.path().join("b"), "p.yaml", &manifest);
    let cache = tmp.path().join("cache");
    let spawn = |m: &Path| {
        burnish()
            .args(["run", "-q", "--cache-dir"])
            .arg(&cache)
            .arg(m)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let p1 = spawn(&a);
    let p2 = spawn(&b);
    let o1 = p1.wait_with_output().unwrap();
    let o2 = p2.wait_with_output().unwrap();
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stderr)
    );
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    let lines = std::fs::read_to_string(&count).unwrap();
    assert_eq!(
        lines.lines().filter(|l| *l == "slow").count(),
        1,
        "slow ran more than once:\n{lines}"
    );
    assert_eq!(
        lines.lines().filter(|l| *l == "after").count(),
        1,
        "after ran more than once:\n{lines}"
    );
    assert_eq!(
        std::fs::read_to_string(a.with_extension("lock")).unwrap(),
        std::fs::read_to_string(b.with_extension("lock")).unwrap()
    );
}

#[test]
fn a_failing_stage_stops_its_descendants_but_not_independent_branches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "f.yaml",
        "\
pipeline: fail
stages:
  ok1: {kind: test.steps, steps: 2}
  bad: {kind: test.steps, steps: 5, fail_at: 3, data: ok1}
  below: {kind: test.steps, steps: 1, data: bad}
  other: {kind: test.steps, steps: 3, salt: x}
  other2: {kind: test.steps, steps: 1, data: other}
",
    );
    let out = burnish()
        .args(["run", "-j", "2", "f.yaml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage `bad` failed"), "{err}");
    assert!(err.contains("asked to fail at step 3"), "{err}");
    assert!(
        err.contains("skipped  below (upstream `bad` did not finish)"),
        "{err}"
    );
    assert!(
        err.contains("3 ran, 0 cached, 1 failed, 1 skipped"),
        "{err}"
    );
    assert!(
        !dir.join("f.lock").exists(),
        "a failed run must not write the lock file"
    );
    // The branch that finished is cached; the failed stage left a checkpoint to resume from.
    let plan = run_ok(&["plan", "--json", "f.yaml"], dir);
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let state = |name: &str| {
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("other2"), "cached");
    assert_eq!(state("bad"), "new");
}

#[test]
fn locked_runs_verify_and_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let m = write(
        dir,
        "l.yaml",
        "pipeline: l\nstages:\n  a: {kind: test.steps, steps: 2, salt: one}\n  b: {kind: test.steps, steps: 2, data: a}\n",
    );
    run_ok(&["run", "-q", "l.yaml"], dir);
    let lock = std::fs::read_to_string(dir.join("l.lock")).unwrap();
    assert!(lock.contains("\"fingerprint\""));
    // Same manifest: --locked passes.
    run_ok(&["run", "-q", "--locked", "l.yaml"], dir);
    // Changed manifest: --locked fails with a per-stage diff and runs nothing.
    std::fs::write(&m, "pipeline: l\nstages:\n  a: {kind: test.steps, steps: 2, salt: two}\n  b: {kind: test.steps, steps: 2, data: a}\n").unwrap();
    let out = burnish()
        .args(["run", "--locked", "l.yaml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a: fingerprint"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("l.lock")).unwrap(),
        lock,
        "--locked must not rewrite the lock"
    );

    // verify: corrupt one output, verify reports it, --repair evicts it.
    let results: Vec<PathBuf> = walk(&dir.join(".burnish/entries"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "result.txt"))
        .collect();
    assert_eq!(results.len(), 2);
    // Same size, different bytes: only a re-hash can tell.
    let original = std::fs::read(&results[0]).unwrap();
    let mut tampered = original.clone();
    tampered[0] ^= 1;
    std::fs::write(&results[0], &tampered).unwrap();
    let out = burnish()
        .args(["verify", "l.yaml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("content differs from its record"));
    run_ok(&["verify", "--repair", "l.yaml"], dir);
    run_ok(&["verify", "l.yaml"], dir);

    // gc: with the lock given, its entries stay; everything else not in a recent run goes.
    run_ok(&["run", "-q", "l.yaml"], dir); // salt two: new entries, lock rewritten
    let entries = || {
        std::fs::read_dir(dir.join(".burnish/entries"))
            .unwrap()
            .count()
    };
    let before = entries();
    assert!(before >= 3);
    run_ok(
        &["gc", "--keep-days", "0", "--lock", "l.lock", "l.yaml"],
        dir,
    );
    assert_eq!(entries(), 2, "gc kept entries the lock does not name");
    run_ok(&["run", "-q", "--locked", "l.yaml"], dir);
}

#[test]
fn plan_json_until_and_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "p.yaml",
        "pipeline: p\nstages:\n  a: {kind: test.steps, steps: 1}\n  b: {kind: test.steps, steps: 1, data: a}\n  c: {kind: test.steps, steps: 1, salt: c}\n",
    );
    let out = run_ok(&["plan", "--json", "p.yaml"], dir);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    assert_eq!(stages[0]["stage"], "a");
    assert_eq!(stages[0]["kind"], "test.steps");
    assert_eq!(stages[0]["state"], "new");
    assert_eq!(stages[0]["fingerprint"].as_str().unwrap().len(), 64);
    assert!(stages[1]["fingerprint"].is_null(), "b waits on a");

    let out = run_ok(&["run", "--until", "b", "p.yaml"], dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 ran"), "{err}");
    assert!(!dir.join("p.lock").exists(), "a partial run writes no lock");
    let out = run_ok(&["run", "--force", "a", "p.yaml"], dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ran      a"), "{err}");
    assert!(err.contains("cached   b"), "{err}");
    assert!(err.contains("ran      c"), "{err}");
    let out = burnish()
        .args(["run", "--until", "nope", "p.yaml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stage or matrix cell named `nope`"));
}

#[test]
fn every_seed_pipeline_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = burnish()
                .args(["validate"])
                .arg(&path)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            seen += 1;
        }
    }
    assert!(seen >= 11, "{seen} pipelines");
}
