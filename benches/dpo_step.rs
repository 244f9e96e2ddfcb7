//! DPO step time against SFT step time on the same model and sequences, with the reference
//! log-probs cached (as the `logprobs` stage provides them): a DPO step over B pairs runs the
//! policy over 2B sequences and should cost about 2× an SFT step over B examples, not 4× (a
//! DPO that ran the reference model in every step would pay for two more passes).
//!
//!     cargo bench --bench dpo_step
//!
//! Fixture-shaped Llama (hidden 64, 2 layers, vocab 512), LoRA r=8 on q/k/v/o, B = 8, 128
//! tokens per sequence, f32 on flex. The reference log-probs are computed first, as a trainer
//! without a `reference:` artifact does: from the policy as it starts (its weights, not a copy),
//! or with `BURNISH_BENCH_REFERENCE=base` from the base with the adapters switched off (the old
//! rule), to compare the peak resident memory of the two. Prints one JSON line, with the peak
//! RSS (`VmHWM`) of the process.

#[path = "../src/alloc.rs"]
mod alloc; // the `burnish` binary's allocator and its settings

use std::time::Instant;

use burn::backend::flex::FlexDevice;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burnish_stages::model::{self, Arch, LoraParams, ModelConfig, lora};
use burnish_stages::pref::data::PairItem;
use burnish_stages::pref::losses::DpoLoss;
use burnish_stages::pref::objectives::{DpoObjective, fill_reference};
use burnish_stages::text::Example;
use burnish_stages::train::optim::{self, AdamW, Grads, OptimState};
use burnish_stages::train::{LanguageModeling, Objective};

type B = Autodiff<Flex>;

fn main() {
    alloc::keep_freed_memory();
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 512,
        hidden_size: 64,
        intermediate_size: 176,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        max_positions: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
    };
    let (batch, seq, steps) = (8usize, 128usize, 20usize);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut example = || {
        let ids: Vec<u32> = (0..seq)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 512) as u32
            })
            .collect();
        // A 32-token prompt, the rest the completion.
        let targets = (0..seq).map(|i| i >= 32).collect();
        Example {
            ids,
            targets,
            doc_starts: Vec::new(),
        }
    };
    let sft: Vec<Example> = (0..batch).map(|_| example()).collect();
    let pairs: Vec<PairItem> = (0..batch)
        .map(|index| PairItem {
            index,
            chosen: example(),
            rejected: example(),
            reference: None,
        })
        .collect();
    let mut pairs = pairs;
    let start = policy(&cfg);
    let mode = std::env::var("BURNISH_BENCH_REFERENCE").unwrap_or_else(|_| "start".into());
    if mode == "base" {
        fill_reference(
            &lora::without_adapters(start.clone()).valid(),
            &mut pairs,
            batch,
            0,
        );
    } else {
        fill_reference(&start.valid(), &mut pairs, batch, 0);
    }
    let lm = LanguageModeling { pad_id: 0 };
    let dpo = DpoObjective {
        beta: 0.1,
        loss: DpoLoss::Sigmoid,
        label_smoothing: 0.0,
        pad: 0,
    };
    let sft_ms = time(&cfg, &lm, &sft, steps);
    let dpo_ms = time(&cfg, &dpo, &pairs, steps);
    println!(
        "{}",
        serde_json::json!({
            "batch": batch, "seq": seq, "steps": steps,
            "sft_step_ms_median": (sft_ms * 10.0).round() / 10.0,
            "dpo_step_ms_median": (dpo_ms * 10.0).round() / 10.0,
            "ratio": (dpo_ms / sft_ms * 100.0).round() / 100.0,
            "reference": mode,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
}

/// The process's peak resident set size in MiB (0 where Linux does not report it).
fn peak_rss_mib() -> f64 {
    let kib = burnish_stages::probe::peak_rss_kb().unwrap_or(0) as f64;
    (kib / 1024.0 * 10.0).round() / 10.0
}

/// Median milliseconds of a full optimizer step (forward, loss, backward, norm, AdamW).
fn time<O: Objective>(cfg: &ModelConfig, o: &O, items: &[O::Item], steps: usize) -> f64 {
    let mut net = policy(cfg);
    let hp = AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut state = OptimState::default();
    let refs: Vec<&O::Item> = items.iter().collect();
    let weight: f64 = items.iter().map(|i| o.weight(i)).sum();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        let (loss, _) = o.loss(&net, &refs);
        let g = (loss / weight).backward();
        let mut grads = Grads::default();
        grads.accumulate::<B, _>(&net, &g);
        let _ = grads.global_norm();
        net = optim::step(net, &mut grads, &mut state, hp, 1e-4, 1.0);
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The fixture-shaped model with LoRA r=8 on q/k/v/o.
fn policy(cfg: &ModelConfig) -> model::CausalLm<B> {
    let base = model::init::<B>(cfg, 0, &FlexDevice);
    lora::inject(
        base,
        &LoraParams {
            rank: 8,
            alpha: Some(16.0),
            dropout: 0.0,
            targets: vec![
                model::LoraTarget::QProj,
                model::LoraTarget::KProj,
                model::LoraTarget::VProj,
                model::LoraTarget::OProj,
            ],
        },
        0,
    )
}
