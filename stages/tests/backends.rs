//! The wgpu backend computes what transformers and flex compute: every check of
//! `burnish selftest` (`burnish_stages::probe::checks`: the fixture forward pass against
//! transformers' logits, greedy generation against transformers' tokens, a packed batch, one
//! full, LoRA and DPO step and a QLoRA forward against flex; packed documents are masked with
//! an additive bias on wgpu, in the attention kernel on flex), on whatever adapter wgpu finds (Mesa's lavapipe on a CPU-only machine:
//! `apt-get install mesa-vulkan-drivers`). The tolerances are the checks' own.
//!
//! Without any wgpu adapter the tests say so and pass, unless `BURNISH_REQUIRE_WGPU=1` (set by CI),
//! where a missing adapter fails them.
#![cfg(feature = "wgpu")]

use std::path::Path;

use burnish_stages::backend::wgpu_adapters;
mod common;

use burnish_stages::probe::checks::{self, Options, Status};

/// Whether to run: an adapter exists (or CI demands one and the test must fail without it).
fn have_adapter() -> bool {
    let adapters = wgpu_adapters();
    eprintln!("wgpu adapters: {adapters:?}");
    if adapters.is_empty() {
        common::skip(
            "BURNISH_REQUIRE_WGPU",
            "wgpu finds no adapter (install mesa-vulkan-drivers)",
        );
        return false;
    }
    true
}

#[test]
fn wgpu_passes_every_selftest_check() {
    if !have_adapter() {
        return;
    }
    let opts = Options {
        backend: "wgpu".into(),
        models: Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models"),
        allow_cpu_adapter: true,
        from: 0,
        stop_after_panic: false,
    };
    let results = checks::run(&opts, |r| eprintln!("{}", r.line()));
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.status == Status::Fail)
        .map(|r| r.line())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    let passed = results.iter().filter(|r| r.status == Status::Pass).count();
    // 8 checks on each fixture model, but the bf16 forward: wgpu has no bf16.
    assert_eq!(passed, 14);
    let bf16 = results
        .iter()
        .find(|r| r.name == "forward_bf16/tiny-llama")
        .unwrap();
    assert_eq!(bf16.status, Status::Skip, "{}", bf16.line());
}
