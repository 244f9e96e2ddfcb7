//! The remote cache from the command line, on a `file://` remote and (when `.ci/run` started
//! one) the local S3 server: a run on one machine pushes, a run on another (an empty cache)
//! restores everything from the remote with the same lock; `plan` shows remote entries;
//! `push`/`pull --until`; the manifest's `cache:`; `--no-remote`; `gc --remote`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{burnish, skip};

const CHAIN: &str = "\
pipeline: chain
seed: 5
stages:
  a: {kind: test.steps, steps: 3, step_ms: 1, salt: a}
  b: {kind: test.steps, steps: 3, step_ms: 1, salt: b, data: a}
  c: {kind: test.steps, steps: 3, step_ms: 1, salt: c, data: b}
";

fn cmd(args: &[&str], dir: &Path) -> Output {
    let mut c: Command = burnish();
    c.env("BURNISH_TEST_KINDS", "1")
        .env_remove("BURNISH_REMOTE")
        .env_remove("BURNISH_REMOTE_MODE")
        .env_remove("BURNISH_NO_REMOTE")
        .env_remove("BURNISH_CACHE")
        .args(args)
        .current_dir(dir);
    c.output().unwrap()
}

/// stdout and stderr of a command that must succeed.
fn ok(args: &[&str], dir: &Path) -> String {
    let out = cmd(args, dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "burnish {args:?} failed:\n{text}");
    text
}

fn two_machines(remote: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("chain.yaml"), CHAIN).unwrap();
    let a = d.join("machine-a").display().to_string();
    let b = d.join("machine-b").display().to_string();
    let c = d.join("machine-c").display().to_string();

    let out = ok(
        &["run", "chain.yaml", "--cache-dir", &a, "--remote", remote],
        d,
    );
    assert!(out.contains("3 ran, 0 cached"), "{out}");
    assert!(out.contains("pushed 3 entries"), "{out}");
    let lock_a = std::fs::read(d.join("chain.lock")).unwrap();

    // Another machine sees the entries before pulling them.
    let out = ok(
        &["plan", "chain.yaml", "--cache-dir", &b, "--remote", remote],
        d,
    );
    assert!(out.contains("3 cached, 0 stale, 0 new"), "{out}");
    assert_eq!(out.matches("on the remote").count(), 3, "{out}");
    // And restores all of them.
    std::fs::remove_file(d.join("chain.lock")).unwrap();
    let out = ok(
        &["run", "chain.yaml", "--cache-dir", &b, "--remote", remote],
        d,
    );
    assert!(out.contains("0 ran, 3 cached"), "{out}");
    assert!(out.contains("pulled 3 entries"), "{out}");
    assert_eq!(std::fs::read(d.join("chain.lock")).unwrap(), lock_a);
    let out = ok(&["verify", "chain.yaml", "--cache-dir", &b], d);
    assert!(out.contains("0 bad"), "{out}");

    // `--no-remote`: a third machine on its own computes everything.
    let out = ok(&["plan", "chain.yaml", "--cache-dir", &c, "--no-remote"], d);
    assert!(
        out.starts_with("stale") && out.contains("0 cached,"),
        "{out}"
    );
    // `pull --until b` fetches a and b, not c.
    let out = ok(
        &[
            "pull",
            "chain.yaml",
            "--until",
            "b",
            "--cache-dir",
            &c,
            "--remote",
            remote,
        ],
        d,
    );
    assert!(out.contains("pulled 2 entries"), "{out}");
    let out = ok(&["plan", "chain.yaml", "--cache-dir", &c, "--no-remote"], d);
    assert!(out.contains("2 cached, 1 stale"), "{out}");
    // `push` finds everything present.
    let out = ok(
        &["push", "chain.yaml", "--cache-dir", &a, "--remote", remote],
        d,
    );
    assert!(
        out.contains("pushed 0 entries (0 B), 3 already on the remote"),
        "{out}"
    );
}

#[test]
fn file_remote_between_two_machines() {
    let r = tempfile::tempdir().unwrap();
    let url = url_of(r.path());
    two_machines(&url);
}

#[test]
fn s3_remote_between_two_machines() {
    let Ok(bucket) = std::env::var("BURNISH_S3_BUCKET") else {
        skip(
            "BURNISH_REQUIRE_S3",
            "no S3 server is configured (BURNISH_S3_BUCKET); `.ci/run` starts moto_server",
        );
        return;
    };
    two_machines(&format!("s3://{bucket}/cli-{}", std::process::id()));
}

fn url_of(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[test]
fn the_manifest_names_the_remote_and_gc_collects_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = d.join("remote");
    let manifest = format!(
        "pipeline: chain\ncache: {{remote: \"{}\"}}\n{}",
        url_of(&r),
        CHAIN.split_once('\n').unwrap().1
    );
    std::fs::write(d.join("chain.yaml"), &manifest).unwrap();
    let a = d.join("a").display().to_string();
    let out = ok(&["run", "chain.yaml", "--cache-dir", &a], d);
    assert!(out.contains("pushed 3 entries"), "{out}");
    assert_eq!(std::fs::read_dir(r.join("v1/entries")).unwrap().count(), 3);

    // A read-only run elsewhere pulls and pushes nothing back.
    let b = d.join("b").display().to_string();
    let out = ok(
        &[
            "run",
            "chain.yaml",
            "--cache-dir",
            &b,
            "--remote-mode",
            "read-only",
        ],
        d,
    );
    assert!(
        out.contains("0 ran, 3 cached") && !out.contains("pushed"),
        "{out}"
    );

    // The lock keeps everything; without it, everything is collected.
    let out = ok(
        &[
            "gc",
            "chain.yaml",
            "--cache-dir",
            &a,
            "--remote",
            "--lock",
            "chain.lock",
            "--keep-days",
            "0",
        ],
        d,
    );
    assert!(out.contains("removed 0 entries and 0 blobs"), "{out}");
    let out = ok(
        &[
            "gc",
            "chain.yaml",
            "--cache-dir",
            &a,
            "--remote",
            "--keep-days",
            "0",
        ],
        d,
    );
    assert!(out.contains("removed 3 entries and 3 blobs"), "{out}");
    assert_eq!(std::fs::read_dir(r.join("v1/entries")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(r.join("v1/blobs")).unwrap().count(), 0);
}

#[test]
fn bad_remote_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("chain.yaml"), CHAIN).unwrap();
    let out = cmd(
        &["plan", "chain.yaml", "--remote", "s3://key:secret@bucket/x"],
        d,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("carries credentials"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
    let out = cmd(&["push", "chain.yaml"], d);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no remote cache is configured"),
        "{err}"
    );
    let mut c = burnish();
    c.env("BURNISH_TEST_KINDS", "1")
        .env("BURNISH_REMOTE_MODE", "sometimes")
        .env("BURNISH_REMOTE", "file:///nonexistent-burnish-remote")
        .args(["plan", "chain.yaml"])
        .current_dir(d);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("BURNISH_REMOTE_MODE is `sometimes`"),
        "{err}"
    );
}
