//! End-to-end tests of `burnish run` and the cache commands, with the test-only stage kinds
//! (`BURNISH_TEST_KINDS=1`): crash/resume under SIGKILL, two processes on one cache, failure
//! isolation, `--locked`, `verify`, `gc`.

mod common;

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

/// `n` concurrent `run`s of overlapping manifests on one cache (all share `slow` → `after`; each
/// adds a stage of its own): all succeed, each shared stage body runs once, `verify` finds
/// nothing corrupt. `lock` is `$BURNISH_LOCK` (`flock`, or `lease` as on a shared file system).
fn concurrent_runs_compute_each_stage_once(n: usize, round: usize, lock: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let count = tmp.path().join("count.txt");
    let c = count.display();
    let cache = tmp.path().join("cache");
    let manifests: Vec<PathBuf> = (0..n)
        .map(|i| {
            let text = format!(
                "pipeline: conc{i}\nstages:\n  slow: {{kind: test.steps, steps: 25, step_ms: 20, count_file: '{c}'}}\n  after: {{kind: test.steps, steps: 2, data: slow, count_file: '{c}'}}\n  own{i}: {{kind: test.steps, steps: 3, step_ms: 5, salt: '{i}', data: after, count_file: '{c}'}}\n"
            );
            write(&tmp.path().join(format!("m{i}")), "p.yaml", &text)
        })
        .collect();
    let children: Vec<_> = manifests
        .iter()
        .map(|m| {
            burnish()
                .env("BURNISH_LOCK", lock)
                // A lease shorter than the slow stage: held only through its renewals.
                .env("BURNISH_LOCK_LEASE_S", "1")
                .args(["run", "-q", "--cache-dir"])
                .arg(&cache)
                .arg(m)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "run {i} of {n} (round {round}): {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let lines = std::fs::read_to_string(&count).unwrap();
    for stage in ["slow".to_owned(), "after".to_owned()]
        .into_iter()
        .chain((0..n).map(|i| format!("own{i}")))
    {
        let ran = lines.lines().filter(|l| *l == stage).count();
        assert_eq!(
            ran, 1,
            "{stage} ran {ran} times with {n} runs (round {round}):\n{lines}"
        );
    }
    let after_of = |m: &PathBuf| {
        let l: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(m.with_extension("lock")).unwrap())
                .unwrap();
        l["stages"]["after"].clone()
    };
    assert!(
        manifests
            .iter()
            .all(|m| after_of(m) == after_of(&manifests[0]))
    );
    let out = burnish()
        .args(["verify", "--cache-dir"])
        .arg(&cache)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && report.contains("0 bad"), "{report}");
    let leases: Vec<PathBuf> = walk(&cache.join("locks"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e != "lock"))
        .collect();
    assert!(leases.is_empty(), "left behind: {leases:?}");
}

#[test]
fn two_and_four_concurrent_runs_on_one_cache_compute_each_stage_once() {
    for round in 0..3 {
        concurrent_runs_compute_each_stage_once(2, round, "flock");
        concurrent_runs_compute_each_stage_once(4, round, "flock");
    }
}

#[test]
fn concurrent_runs_with_lease_locks_compute_each_stage_once() {
    for round in 0..2 {
        concurrent_runs_compute_each_stage_once(2, round, "lease");
        concurrent_runs_compute_each_stage_once(4, round, "lease");
    }
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

/// Runs `script` in a private mount namespace (`unshare -rm`), where it may mount a tmpfs.
/// `None` (with the reason printed) where the machine does not allow it; under
/// `BURNISH_REQUIRE_TMPFS` that is a failure.
fn in_mount_namespace(script: &str, cwd: &Path) -> Option<Output> {
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs \"$1\""])
        .arg("sh")
        .arg(cwd)
        .output();
    let why = match &probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Some(format!("unshare: {e}")),
    };
    if let Some(why) = why {
        common::skip(
            "BURNISH_REQUIRE_TMPFS",
            &format!("a tmpfs cannot be mounted in a private namespace here ({why})"),
        );
        return None;
    }
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .env("BURNISH", env!("CARGO_BIN_EXE_burnish"))
        .env("BURNISH_TEST_KINDS", "1")
        .env("NO_COLOR", "1")
        .env_remove("BURNISH_CACHE")
        .current_dir(cwd)
        .output()
        .unwrap();
    Some(out)
}

/// The cache on a 2 MiB tmpfs: three independent stages that each write 3 MiB fail with "no
/// space left" and their paths, all three named in the summary; nothing is left in `entries/`,
/// `tmp/` or the lock file; with space (the tmpfs grown), the same run succeeds and verifies.
#[test]
fn a_full_disk_fails_each_stage_with_its_cause_and_the_next_run_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "full.yaml",
        "pipeline: full\nstages:\n  a: {kind: test.blob, mb: 3}\n  b: {kind: test.steps, steps: 2}\n  c: {kind: test.blob, mb: 3, data: b}\n  d: {kind: test.blob, mb: 4}\n",
    );
    std::fs::create_dir(dir.join("cache")).unwrap();
    let script = r#"
        set -u
        mount -t tmpfs -o size=2m tmpfs cache || exit 90
        "$BURNISH" run -q --jobs 1 --cache-dir cache full.yaml 2>first.err; echo $? >first.rc
        ls -A cache/entries >entries.txt; ls -A cache/tmp >tmp.txt
        test -e full.lock && echo yes >lock.txt
        mount -o remount,size=64m cache || exit 91
        "$BURNISH" run -q --jobs 2 --cache-dir cache full.yaml 2>second.err; echo $? >second.rc
        "$BURNISH" verify --cache-dir cache full.yaml >verify.out 2>&1; echo $? >verify.rc
    "#;
    let Some(out) = in_mount_namespace(script, dir) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let first = read("first.err");
    assert_eq!(read("first.rc").trim(), "1", "{first}");
    for stage in ["a", "c", "d"] {
        let named = first
            .lines()
            .any(|l| l.contains(&format!("stage `{stage}` failed")));
        assert!(named, "stage `{stage}`'s failure is not reported:\n{first}");
    }
    let causes = first.matches("No space left on device").count();
    assert!(causes >= 3, "{causes} causes for 3 failures:\n{first}");
    assert!(first.contains("blob.bin"), "no path in:\n{first}");
    // `b` fits, so its entry is the only one; nothing half-written remains.
    assert_eq!(
        read("entries.txt").lines().count(),
        1,
        "{}",
        read("entries.txt")
    );
    assert_eq!(read("tmp.txt"), "", "staging left behind");
    assert_eq!(
        read("lock.txt"),
        "",
        "a lock file was written for a failed run"
    );
    assert_eq!(read("second.rc").trim(), "0", "{}", read("second.err"));
    assert_eq!(read("verify.rc").trim(), "0", "{}", read("verify.out"));
    assert!(
        read("verify.out").contains("0 bad"),
        "{}",
        read("verify.out")
    );
}

/// A truncated `record.json`, a record of another entry, and an output whose size differs from
/// its record: `plan` calls each entry broken, `run` warns naming it and recomputes, and the
/// result equals the first run's.
#[test]
fn a_broken_entry_is_recomputed_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "b.yaml",
        "pipeline: b\nstages:\n  a: {kind: test.steps, steps: 2, salt: a}\n  b: {kind: test.steps, steps: 2, salt: b}\n  c: {kind: test.steps, steps: 2, salt: c}\n",
    );
    run_ok(&["run", "-q", "b.yaml"], dir);
    let lock = std::fs::read_to_string(dir.join("b.lock")).unwrap();
    let entry_of = |stage: &str| {
        let plan = run_ok(&["plan", "--json", "b.yaml"], dir);
        let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
        let fp = v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == stage)
            .unwrap()["fingerprint"]
            .as_str()
            .unwrap()
            .to_owned();
        (fp.clone(), dir.join(".burnish/entries").join(fp))
    };
    let (fa, ea) = entry_of("a");
    let (fb, eb) = entry_of("b");
    let (fc, ec) = entry_of("c");
    let record = ea.join("record.json");
    let text = std::fs::read(&record).unwrap();
    std::fs::write(&record, &text[..text.len() / 2]).unwrap();
    let rb = std::fs::read_to_string(ec.join("record.json")).unwrap();
    std::fs::write(eb.join("record.json"), rb).unwrap();
    std::fs::write(ec.join("out/main/result.txt"), "short\n").unwrap();

    let plan = String::from_utf8_lossy(&run_ok(&["plan", "b.yaml"], dir).stdout).into_owned();
    assert!(plan.contains("record.json is unreadable"), "{plan}");
    assert!(
        plan.contains(&format!("record.json belongs to entry {fc}")),
        "{plan}"
    );
    assert!(
        plan.contains("main/result.txt has 6 bytes, the record says 65"),
        "{plan}"
    );
    let out = run_ok(&["run", "b.yaml"], dir);
    let err = String::from_utf8_lossy(&out.stderr);
    for (stage, fp) in [("a", &fa), ("b", &fb), ("c", &fc)] {
        let warned = err.lines().any(|l| {
            l.contains(&format!("warning  {stage}: cache entry {}", &fp[..12]))
                && l.contains("recomputing")
        });
        assert!(warned, "no warning for `{stage}`:\n{err}");
    }
    assert!(err.contains("3 ran, 0 cached"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("b.lock")).unwrap(), lock);
    let out = run_ok(&["verify", "b.yaml"], dir);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 bad"));
}

/// An edit that keeps the file's size, with its old mtime put back (what a coarse-time file
/// system does to an edit in the same second), is seen by `plan`.
#[test]
fn a_same_size_edit_with_the_old_mtime_is_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = write(dir, "d.jsonl", "{\"text\": \"aaaa\"}\n");
    write(
        dir,
        "r.yaml",
        "pipeline: r\nstages:\n  d: {kind: dataset, path: d.jsonl, format: text}\n",
    );
    run_ok(&["run", "-q", "r.yaml"], dir);
    let plan =
        |dir: &Path| String::from_utf8_lossy(&run_ok(&["plan", "r.yaml"], dir).stdout).into_owned();
    assert!(plan(dir).contains("cached"), "{}", plan(dir));
    let mtime = std::fs::metadata(&data).unwrap().modified().unwrap();
    std::fs::write(&data, "{\"text\": \"bbbb\"}\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let p = plan(dir);
    assert!(
        p.contains("file in `path` changed") && p.contains("0 cached, 1 stale"),
        "a same-size edit went unseen:\n{p}"
    );
}

/// The fingerprint `plan --json` shows for `stage` (null while its inputs are not computed).
fn planned_fingerprint(dir: &Path, manifest: &str, stage: &str) -> Option<String> {
    let out = run_ok(&["plan", "--json", manifest], dir);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .and_then(|s| s["fingerprint"].as_str().map(str::to_owned))
}

#[test]
fn run_cell_runs_one_cell_on_cached_inputs_and_refuses_another_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "p.yaml", CHAIN);
    let fail = |args: &[&str]| {
        let out = burnish().args(args).current_dir(dir).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // `b` reads `a`, which is not computed: nothing runs.
    let a = planned_fingerprint(dir, "p.yaml", "a").unwrap();
    let err = fail(&["run-cell", "p.yaml", "b", "--fingerprint", &a]);
    assert!(
        err.contains("cell `b` needs `a`, which is not in the cache"),
        "{err}"
    );
    // A fingerprint the launching side computed from other inputs: refused, nothing runs.
    let err = fail(&["run-cell", "p.yaml", "a", "--fingerprint", &"0".repeat(64)]);
    assert!(err.contains("cell `a` has fingerprint"), "{err}");
    assert!(err.contains(&a) && err.contains("here, not"), "{err}");
    let err = fail(&["run-cell", "p.yaml", "nope", "--fingerprint", &a]);
    assert!(err.contains("no cell named `nope`"), "{err}");
    assert_eq!(planned_fingerprint(dir, "p.yaml", "b"), None, "a still new");

    // One cell at a time, as a launcher would submit them, each on what the last computed.
    for cell in ["a", "b", "c", "d"] {
        let fp = planned_fingerprint(dir, "p.yaml", cell).unwrap();
        let out = run_ok(&["run-cell", "p.yaml", cell, "--fingerprint", &fp], dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("ran      {cell}")), "{err}");
        assert!(err.contains("1 ran"), "{err}");
    }
    assert!(!dir.join("p.lock").exists(), "run-cell writes no lock file");
    // A cell already computed: restored, not rerun.
    let fp = planned_fingerprint(dir, "p.yaml", "c").unwrap();
    let out = run_ok(&["run-cell", "p.yaml", "c", "--fingerprint", &fp], dir);
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 ran, 3 cached"));

    // The pipeline is then fully cached, and its lock equals a plain run's.
    let out = run_ok(&["run", "p.yaml"], dir);
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 ran, 4 cached"));
    let other = tmp.path().join("plain");
    write(&other, "p.yaml", CHAIN);
    run_ok(&["run", "-q", "p.yaml"], &other);
    assert_eq!(
        std::fs::read_to_string(dir.join("p.lock")).unwrap(),
        std::fs::read_to_string(other.join("p.lock")).unwrap()
    );
}
