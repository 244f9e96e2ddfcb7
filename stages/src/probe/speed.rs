//! Training throughput of a model made from a shape: random weights (seeded), random token
//! batches built before timing, and the step every burnish trainer takes — forward, masked
//! next-token loss averaged over the batch's targets, backward, the global gradient norm (for
//! clipping), one AdamW update (lr 1e-4, weight decay 0.01) — optionally with every matrix
//! product in bf16 (f32 parameters, as autocast) and with LoRA adapters on every projection.
//!
//! Each timed step ends with the backend synchronized, so a step's time holds all its kernels.
//! The first `warmup` steps (kernel compilation, memory pool growth) are timed apart. PyTorch's
//! counterpart is `benches/torch_train_tokens.py` with the same preset, batch, sequence and
//! precision.

use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::backend::{self, BackendTask};
use crate::model::{self, Arch, CausalLm, LoraParams, LoraTarget, ModelConfig, lora};
use crate::train::TrainError;
use crate::train::optim::{self, AdamW, Grads, OptimState};

/// A model shape, named as in `benches/torch_train_tokens.py`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Shape {
    pub name: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
    pub rope_theta: f64,
}

/// The shapes both benchmarks know.
pub const SHAPES: [Shape; 4] = [
    // fixtures/models/tiny-llama
    Shape {
        name: "fixture",
        vocab: 512,
        hidden: 64,
        ffn: 176,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        tied: false,
        rope_theta: 10_000.0,
    },
    Shape {
        name: "17m",
        vocab: 8192,
        hidden: 384,
        ffn: 1024,
        layers: 6,
        heads: 6,
        kv_heads: 6,
        tied: false,
        rope_theta: 10_000.0,
    },
    // HuggingFaceTB/SmolLM2-135M's config.json
    Shape {
        name: "smollm2-135m",
        vocab: 49152,
        hidden: 576,
        ffn: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        tied: true,
        rope_theta: 100_000.0,
    },
    // TinyLlama/TinyLlama-1.1B's config.json
    Shape {
        name: "llama-1b",
        vocab: 32000,
        hidden: 2048,
        ffn: 5632,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        tied: false,
        rope_theta: 10_000.0,
    },
];

pub fn shape(name: &str) -> Option<Shape> {
    SHAPES.iter().copied().find(|s| s.name == name)
}

impl Shape {
    /// The configuration of a Llama of this shape for sequences of up to `seq` tokens.
    pub fn config(&self, seq: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.ffn,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            max_positions: seq,
            rms_norm_eps: 1e-5,
            rope_theta: self.rope_theta,
            tie_word_embeddings: self.tied,
            qkv_bias: false,
            o_bias: false,
        }
    }
}

/// One benchmark run.
#[derive(Clone, Debug)]
pub struct Options {
    pub backend: String,
    pub shape: Shape,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub bf16: bool,
    /// Train rank-`r` adapters on every projection instead of the full weights.
    pub lora: Option<usize>,
    pub seed: u64,
}

/// What a run measured (one JSON line).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub framework: &'static str,
    pub backend: String,
    pub preset: &'static str,
    pub shape: Shape,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub dtype: &'static str,
    pub lora: Option<usize>,
    pub params: usize,
    pub trainable: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub tokens_per_s: f64,
    /// The warmup steps' total, kernel compilation included.
    pub warmup_s: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    /// The process's peak resident memory (`VmHWM`), host side only.
    pub peak_rss_mb: Option<f64>,
}

/// Run the benchmark on `opts.backend`.
pub fn run(opts: &Options) -> Result<Report, TrainError> {
    backend::dispatch(&opts.backend, Bench(opts))
}

struct Bench<'a>(&'a Options);

impl BackendTask for Bench<'_> {
    type Output = Report;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Report {
        let o = self.0;
        let cfg = o.shape.config(o.seq);
        let mut net: CausalLm<B> = model::init(&cfg, o.seed, &device).set_bf16(o.bf16);
        if let Some(rank) = o.lora {
            let params = LoraParams {
                rank,
                alpha: None,
                dropout: 0.0,
                targets: LoraTarget::ALL.to_vec(),
            };
            net = lora::inject(net, &params, o.seed);
        }
        let params = net.num_params();
        let trainable = match o.lora {
            Some(_) => lora::adapter_param_count(&net),
            None => params,
        };
        let hp = AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut state = OptimState::default();
        let batches = token_batches::<B>(o, &device);
        let targets = (o.batch * (o.seq - 1)) as f64;
        let (mut times, mut losses) = (Vec::new(), Vec::new());
        let began = Instant::now();
        let mut warmup_s = None;
        for (i, ids) in batches.into_iter().enumerate() {
            if i == o.warmup {
                warmup_s = Some(began.elapsed().as_secs_f64());
            }
            let t0 = Instant::now();
            let ones = Tensor::<B, 2>::ones([o.batch, o.seq], &device);
            let (nll, w) = net.token_nll(ids, ones);
            let loss = (nll * w).sum() / targets;
            let value = loss.clone().detach();
            let g = loss.backward();
            let mut grads = Grads::default();
            grads.accumulate::<B, _>(&net, &g);
            let norm = grads.global_norm();
            let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
            net = optim::step(net, &mut grads, &mut state, hp, 1e-4, clip);
            let _ = B::sync(&device);
            if i >= o.warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
            losses.push(burn::tensor::ElementConversion::elem::<f64>(
                value.into_scalar(),
            ));
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        Report {
            framework: "burnish",
            backend: o.backend.clone(),
            preset: o.shape.name,
            shape: o.shape,
            batch: o.batch,
            seq: o.seq,
            steps: o.steps,
            warmup: o.warmup,
            dtype: if o.bf16 { "bf16" } else { "f32" },
            lora: o.lora,
            params,
            trainable,
            step_ms_median: median * 1e3,
            step_ms_min: times.first().copied().unwrap_or(f64::NAN) * 1e3,
            tokens_per_s: (o.batch * o.seq) as f64 / median,
            // No timed step (steps 0): everything was warmup.
            warmup_s: warmup_s.unwrap_or_else(|| began.elapsed().as_secs_f64()),
            loss_first: losses.first().copied().unwrap_or(f64::NAN),
            loss_last: losses.last().copied().unwrap_or(f64::NAN),
            peak_rss_mb: super::peak_rss_kb().map(|kb| kb as f64 / 1024.0),
        }
    }
}

/// `warmup + steps` batches of seeded random tokens (xorshift, as `benches/train_tokens.rs`).
fn token_batches<B: Backend>(o: &Options, device: &B::Device) -> Vec<Tensor<B, 2, Int>> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ o.seed;
    (0..o.warmup + o.steps)
        .map(|_| {
            let ids: Vec<i64> = (0..o.batch * o.seq)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % o.shape.vocab as u64) as i64
                })
                .collect();
            Tensor::from_data(TensorData::new(ids, [o.batch, o.seq]), device)
        })
        .collect()
}
