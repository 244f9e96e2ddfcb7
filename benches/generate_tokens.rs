//! Generation throughput on the CPU backend (flex): new tokens per second of greedy, KV-cached
//! decoding, the number to compare with transformers' `generate` on the same shapes
//! (`benches/torch_generate_tokens.py`).
//!
//!     cargo bench --bench generate_tokens               # fixture and 17m, batch 1 and 16
//!     cargo bench --bench generate_tokens -- 17m        # one preset
//!     python benches/torch_generate_tokens.py --preset 17m --batch 16 --threads 2
//!
//! A Llama of the preset's shape with seeded random weights; prompts of 32 random tokens (all
//! the same length, as the Python side), 128 new tokens each with no end-of-sequence id, so
//! every row decodes all of them. One untimed run, then `BURNISH_BENCH_ROUNDS` (default 3)
//! timed runs of [`generate`] — prefill and every decode step, logits to the host and the
//! token choice included. Prints one JSON line per preset and batch with the median seconds and
//! new tokens/s = batch × 128 / median seconds.

#[path = "../src/alloc.rs"]
mod alloc; // the `burnish` binary's allocator and its settings

use std::time::Instant;

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burnish_stages::generate::{DecodeOptions, Request, Sampling, generate};
use burnish_stages::model;
use burnish_stages::probe::speed;
use rand::{Rng, SeedableRng};

const PROMPT: usize = 32;
const NEW: usize = 128;

fn main() {
    alloc::keep_freed_memory();
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rounds: usize = std::env::var("BURNISH_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for name in ["fixture", "17m"] {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let shape = speed::shape(name).expect("a known preset");
        let cfg = shape.config(PROMPT + NEW);
        let net = model::init::<Flex>(&cfg, 1, &FlexDevice);
        for batch in [1, 16] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(batch as u64);
            let requests: Vec<Request> = (0..batch)
                .map(|i| Request {
                    prompt: (0..PROMPT)
                        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                        .collect(),
                    prompt_index: i,
                    sample_index: 0,
                })
                .collect();
            let opts = DecodeOptions {
                sampling: Sampling::default(),
                max_new_tokens: NEW,
                eos: Vec::new(),
                pad: 0,
                seed: 0,
                batch_size: batch,
            };
            let once = || {
                let t0 = Instant::now();
                let out = generate(&net, &requests, &opts, &|_| false, &mut |_, _| true);
                assert!(out.iter().all(|c| c.tokens.len() == NEW));
                t0.elapsed().as_secs_f64()
            };
            once();
            let mut secs: Vec<f64> = (0..rounds).map(|_| once()).collect();
            secs.sort_by(f64::total_cmp);
            let median = secs[secs.len() / 2];
            println!(
                "{}",
                serde_json::json!({
                    "bench": "generate_tokens",
                    "preset": name,
                    "batch": batch,
                    "prompt": PROMPT,
                    "new_tokens": NEW,
                    "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
                    "median_s": (median * 1e4).round() / 1e4,
                    "tokens_per_s": ((batch * NEW) as f64 / median).round(),
                })
            );
        }
    }
}
