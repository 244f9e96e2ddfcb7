//! Backend probes: whether a backend computes what it must, and how fast it trains.
//!
//! - [`checks`]: the fixture models' forward pass against the logits transformers computed, and
//!   one training step (full, LoRA, DPO) and a QLoRA forward against the CPU backend, each with
//!   its tolerance. `burnish selftest --backend B` runs them; the GPU lane
//!   (`benches/gpu/run.sh`) runs them on `cuda` and on a GPU `wgpu` adapter.
//! - [`speed`]: training tokens/s of a model made from a shape (random weights, random tokens),
//!   the step every trainer takes. `burnish bench-train` runs it, beside PyTorch's
//!   `benches/torch_train_tokens.py` on the same shape.
//!
//! Both run inside the release binary, because the machines they are for have no Rust toolchain.

pub mod checks;
pub mod speed;

/// The process's peak resident memory in kB (`VmHWM` in `/proc/self/status`), where Linux
/// reports it.
pub fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
