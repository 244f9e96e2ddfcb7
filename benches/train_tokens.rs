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
//! loss, backward, global gradient norm, AdamW update (lr 1e-4, weight decay 0.01), f32.
//! Token batches are random and built before timing. Prints one JSON line per preset with the
//! median step time and tokens/s = batch × seq / median step seconds.

#[path = "../src/alloc.rs"]
mod alloc; // the `burnish` binary's allocator and its settings

use std::time::Instant;

use burn::backend::flex::FlexDevice;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Int, Tensor, TensorData};
use burnish_stages::model::{self, Arch, ModelConfig};
use burnish_stages::train::optim::{self, AdamW, Grads, OptimState};

type B = Autodiff<Flex>;

struct Preset {
    name: &'static str,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    batch: usize,
    seq: usize,
    steps: usize,
}

const PRESETS: [Preset; 2] = [
    Preset {
        name: "fixture",
        vocab: 512,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 176,
        batch: 8,
        seq: 64,
        steps: 20,
    },
    Preset {
        name: "17m",
        vocab: 8192,
        hidden: 384,
        layers: 6,
        heads: 6,
        kv_heads: 6,
        ffn: 1024,
        batch: 8,
        seq: 256,
        steps: 5,
    },
];

fn main() {
    alloc::keep_freed_memory();
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for p in PRESETS
        .iter()
        .filter(|p| only.is_empty() || only.iter().any(|o| o == p.name))
    {
        run(p);
    }
}

fn run(p: &Preset) {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: p.vocab,
        hidden_size: p.hidden,
        intermediate_size: p.ffn,
        num_layers: p.layers,
        num_heads: p.heads,
        num_kv_heads: p.kv_heads,
        head_dim: p.hidden / p.heads,
        max_positions: p.seq,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
    };
    let device = FlexDevice;
    let mut net = model::init::<B>(&cfg, 0, &device);
    let params = net.num_params();
    let hp = AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut state = OptimState::default();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut batch = || {
        let ids: Vec<i64> = (0..p.batch * p.seq)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % p.vocab as u64) as i64
            })
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [p.batch, p.seq]), &device);
        let targets = Tensor::<B, 2>::ones([p.batch, p.seq], &device);
        (ids, targets)
    };
    let warmup = 2;
    let steps = std::env::var("BURNISH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(p.steps);
    let batches: Vec<_> = (0..warmup + steps).map(|_| batch()).collect();
    let mut times = Vec::new();
    for (i, (ids, targets)) in batches.into_iter().enumerate() {
        let t0 = Instant::now();
        let (nll, w) = net.token_nll(ids, targets);
        let n = (p.batch * (p.seq - 1)) as f64;
        let loss = (nll * w).sum() / n;
        let g = loss.backward();
        let mut grads = Grads::default();
        grads.accumulate::<B, _>(&net, &g);
        let norm = grads.global_norm();
        net = optim::step(net, &mut grads, &mut state, hp, 1e-4, 1.0);
        assert!(norm.is_finite());
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "framework": "burnish (flex)",
            "preset": p.name,
            "params": params,
            "batch": p.batch,
            "seq": p.seq,
            "steps": steps,
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "step_ms_median": (median * 1e4).round() / 10.0,
            "step_ms_min": (times[0] * 1e4).round() / 10.0,
            "tokens_per_s": ((p.batch * p.seq) as f64 / median).round(),
        })
    );
}
