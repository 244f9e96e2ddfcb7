//! Benchmark: a fully cached rerun of a 10-stage pipeline holding ~100 MB of artifacts.
//!
//!     cargo bench --bench cached_rerun
//!
//! Target: under 100 ms for the whole `burnish run` process. A cached rerun reads each entry's
//! record and never re-hashes artifacts (`burnish verify` does); the `verify` timing is printed
//! beside it to show what re-hashing would cost.

#[path = "../src/alloc.rs"]
mod alloc; // the `burnish` binary's allocator and its settings

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn burnish(dir: &Path, args: &[&str]) -> Duration {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_burnish"))
        .args(args)
        .current_dir(dir)
        .env("BURNISH_TEST_KINDS", "1")
        .env_remove("BURNISH_CACHE")
        .output()
        .expect("burnish runs");
    let dt = t0.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dt
}

fn main() {
    alloc::keep_freed_memory();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut manifest = String::from("pipeline: bench\nstages:\n  s0: {kind: test.blob, mb: 10}\n");
    for i in 1..10 {
        manifest.push_str(&format!(
            "  s{i}: {{kind: test.blob, mb: 10, data: s{}}}\n",
            i - 1
        ));
    }
    std::fs::write(dir.join("bench.yaml"), manifest).expect("write manifest");

    let cold = burnish(dir, &["run", "-q", "bench.yaml"]);
    let size: u64 = walk_size(&dir.join(".burnish/entries"));
    let mut times: Vec<Duration> = (0..20)
        .map(|_| burnish(dir, &["run", "-q", "bench.yaml"]))
        .collect();
    times.sort();
    let verify = burnish(dir, &["verify", "bench.yaml"]);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "cached_rerun: 10 stages, {:.0} MB of artifacts",
        size as f64 / 1e6
    );
    println!("  first run (computes everything): {:.1} ms", ms(cold));
    println!(
        "  cached rerun, whole process, 20 runs: min {:.1} ms, median {:.1} ms, max {:.1} ms (target < 100 ms)",
        ms(times[0]),
        ms(times[10]),
        ms(times[19])
    );
    println!("  verify (re-hashes every artifact): {:.1} ms", ms(verify));
}

fn walk_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}
