//! GGUF export throughput: a SmolLM2-135M-shaped Llama (vocab 49152, hidden 576, 30 layers,
//! 9 heads / 3 kv heads, MLP 1536, tied embeddings; random weights) converted and quantized in
//! memory at each quant, then written to a temporary file.
//!
//!     cargo bench --bench export_gguf              # every quant
//!     cargo bench --bench export_gguf -- q4_k_m    # the quants whose name contains the filter
//!
//! Prints one JSON line per quant: seconds for the conversion (RoPE permutation, type choice,
//! quantization into the in-memory writer) and for writing the file, weights/s over the
//! conversion, file bytes and bits per weight. The model and its vocabulary are built before
//! timing. `llama-quantize` on the f32 file is the reference to compare with (same machine, as
//! many threads as burnish used): `BURNISH_BENCH_KEEP=DIR` keeps each file as
//! `DIR/bench-<quant>.gguf`, then `time llama-quantize DIR/bench-f32.gguf out.gguf Q4_K_M 2`.
//!
//! ## At real size, against `llama-quantize`
//!
//!     BURNISH_LLAMA_CPP=llama-tools/bin cargo bench --bench export_gguf -- --tinyllama
//!
//! [`tinyllama`]: a TinyLlama-1.1B-shaped checkpoint (vocab 32000, hidden 2048, 22 layers, 32
//! heads / 4 kv heads, MLP 5632) with seeded random weights, stored in bf16 as the real one is
//! (2.2 GB, made once under `$BURNISH_BENCH_DIR`, default the temp directory), exported by the
//! streaming path `export.gguf` runs, in a fresh process per export, to q4_k_m and q8_0; then
//! `llama-quantize` (from `benches/llama_tools.sh`) makes the same quants from the bf16 GGUF of
//! the same weights, with as many threads. Rounds alternate the two tools back to back
//! (`--rounds N`, default 3). Printed: wall time (median) and peak resident memory (largest) per
//! tool and quant, the speed ratio, and the memory bound the streaming export promises — twice
//! the largest tensor (as f32) plus 100 MB.

#[path = "../src/alloc.rs"]
mod alloc; // the `burnish` binary's allocator and its settings

use std::time::Instant;

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burnish_stages::export::Quant;
use burnish_stages::export::llama::{GgufOptions, to_gguf};
use burnish_stages::export::vocab::{GgufVocab, VocabKind};
use burnish_stages::model::{self, Arch, ModelConfig};

#[path = "export_gguf/tinyllama.rs"]
mod tinyllama;

fn main() {
    alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == tinyllama::CHILD) {
        return tinyllama::child(&args[i + 1..]);
    }
    if args.iter().any(|a| a == "--tinyllama") {
        return tinyllama::run(&args);
    }
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        max_positions: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
    };
    let net = model::init::<Flex>(&cfg, 1, &FlexDevice);
    let vocab = GgufVocab {
        kind: VocabKind::Gpt2,
        pre: Some("gpt-2".into()),
        tokens: (0..cfg.vocab_size).map(|i| format!("t{i}")).collect(),
        token_types: vec![1; cfg.vocab_size],
        scores: None,
        merges: (0..48000)
            .map(|i| format!("t{} t{}", i % 256, i / 256))
            .collect(),
        bos: 0,
        eos: 0,
        unk: 0,
        pad: 0,
        add_bos: false,
        add_eos: false,
        chat_template: None,
        notes: Vec::new(),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let keep = std::env::var_os("BURNISH_BENCH_KEEP").map(std::path::PathBuf::from);
    let scratch = std::env::temp_dir().join(format!("burnish-bench-{}.gguf", std::process::id()));
    for quant in Quant::ALL {
        if !quant.name().contains(filter.as_str()) {
            continue;
        }
        let t0 = Instant::now();
        let export = match to_gguf(
            &net,
            &vocab,
            &GgufOptions {
                quant,
                name: "bench".into(),
            },
        ) {
            Ok(e) => e,
            Err(e) => panic!("{quant}: {e}"),
        };
        let convert = t0.elapsed().as_secs_f64();
        let tmp = match &keep {
            Some(dir) => dir.join(format!("bench-{}.gguf", quant.name())),
            None => scratch.clone(),
        };
        let t1 = Instant::now();
        if let Err(e) = export.writer.write(&tmp) {
            panic!("{quant}: {e}");
        }
        let write = t1.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&tmp).map_or(0, |m| m.len());
        println!(
            "{}",
            serde_json::json!({
                "bench": "export_gguf",
                "model": "smollm2-135m-shape",
                "quant": quant.name(),
                "params": net.num_params(),
                "threads": threads,
                "convert_s": (convert * 1000.0).round() / 1000.0,
                "write_s": (write * 1000.0).round() / 1000.0,
                "weights_per_s": (export.weights as f64 / convert).round(),
                "file_bytes": bytes,
                "bits_per_weight": (export.bits_per_weight() * 1000.0).round() / 1000.0,
            })
        );
    }
    let _ = std::fs::remove_file(&scratch);
}
