//! Training throughput on the CPU backend (flex), the number to compare with PyTorch on the same
//! shapes (`benches/torch_train_tokens.py`).
//!
//!     cargo bench --bench train_tokens                 # both presets
//!     cargo bench --bench train_tokens -- fixture      # one preset
//!     BURNISH_BENCH_STEPS=200 cargo bench --bench train_tokens -- fixture   # more timed steps
//!     python benches/torch_train_tokens.py --preset fixture --threads 2
//!     python benches/torch_train_tokens.py --preset 17m --threads 2 --steps 5
//!     python benches/compare_train_tokens.py --preset 17m --rounds 5   # both, round by round
//!
//! A step is what every burnish trainer does per optimizer step: forward, masked next-token
//! loss, backward, global gradient norm and clipping, AdamW update (lr 1e-4, weight decay
//! 0.01), f32 — `burnish_stages::probe::speed`, which `burnish bench-train` runs on any backend.
//! Token batches are random and built before timing. Prints one JSON line per preset with the
//! median step time and tokens/s = batch × seq / median step seconds.

#[path = "../src/alloc.rs"]
mod alloc; // the `burnish` binary's allocator and its settings

use burnish_stages::probe::speed::{self, Options};

/// (preset, batch, seq, timed steps)
const PRESETS: [(&str, usize, usize, usize); 2] = [("fixture", 8, 64, 20), ("17m", 8, 256, 5)];

fn main() {
    alloc::keep_freed_memory();
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let steps_override: Option<usize> = std::env::var("BURNISH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok());
    for (name, batch, seq, steps) in PRESETS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let opts = Options {
            backend: "cpu".into(),
            shape: speed::shape(name).expect("a known preset"),
            batch,
            seq,
            steps: steps_override.unwrap_or(steps),
            warmup: 2,
            bf16: false,
            lora: None,
            seed: 0,
        };
        let r = speed::run(&opts).expect("the cpu backend is always built");
        assert!(r.loss_last.is_finite());
        println!(
            "{}",
            serde_json::json!({
                "framework": "burnish (flex)",
                "preset": name,
                "params": r.params,
                "batch": batch,
                "seq": seq,
                "steps": opts.steps,
                "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                "step_ms_median": (r.step_ms_median * 10.0).round() / 10.0,
                "step_ms_min": (r.step_ms_min * 10.0).round() / 10.0,
                "tokens_per_s": r.tokens_per_s.round(),
            })
        );
    }
}
