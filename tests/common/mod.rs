//! What the end-to-end tests of models, preference tuning and export share: running the
//! binary, writing a manifest, reading its lock file, finding files in a cache.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary, without a cache from the environment and without colour.
pub fn burnish() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_burnish"));
    c.env_remove("BURNISH_CACHE").env("NO_COLOR", "1");
    c
}

pub fn run(args: &[&str], cwd: &Path) -> Output {
    burnish().args(args).current_dir(cwd).output().unwrap()
}

pub fn run_ok(args: &[&str], cwd: &Path) -> Output {
    let out = run(args, cwd);
    assert!(
        out.status.success(),
        "burnish {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `dir/pipeline.yaml` holding `text`.
pub fn write_manifest(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The lock file a run of `dir/pipeline.yaml` wrote.
pub fn lock(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.lock")).unwrap()).unwrap()
}

pub fn metric(lock: &serde_json::Value, stage: &str, name: &str) -> f64 {
    lock["stages"][stage]["metrics"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no metric {stage}.{name} in {lock:#}"))
}

/// Every file called `name` under `dir`, sorted.
pub fn find(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == name) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[path = "../../stages/tests/common/skip.rs"]
mod skip;
#[allow(unused_imports)] // each test crate uses its own subset
pub use skip::skip;
