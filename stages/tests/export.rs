//! `export.gguf` and `export.hf` on the fixture checkpoints (`fixtures/models/tiny-llama`,
//! `tiny-qwen2`: vocab 512, hidden 64, 2 layers, 4 heads / 2 kv heads, MLP 176).
//!
//! References the files are held against:
//! - burnish's own GGUF reader for every key's exact type (the types llama.cpp's loader reads:
//!   integer hyper-parameters as u32, floats as f32), the tokenizer arrays and the tensor
//!   table;
//! - llama.cpp's rules, restated by hand per tensor (`llama-quant.cpp`: the Q4_K_M mix, the
//!   fallbacks for rows of 64 and 176) and for RoPE (ggml's pairwise rotation, written out here);
//! - candle's `quantized_llama` / `quantized_qwen2` (an independent GGUF reader and runtime):
//!   its logits against burnish's forward pass on the reference text;
//! - PyPI `gguf`'s `GGUFReader` when it is importable (`BURNISH_PYTHON`, default `python3`;
//!   `BURNISH_REQUIRE_PY=1` turns a missing package into a failure).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burn::module::Param;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_engine::stage::{Artifact, ArtifactKind, ArtifactType, RunContext, Stage};
use burnish_stages::export::gguf::{GgmlType, GgufFile, MetaArray, MetaValue};
use burnish_stages::export::llama::{GgufOptions, to_gguf};
use burnish_stages::export::stages::gguf_vocab;
use burnish_stages::export::stream::write_gguf_in_bands;
use burnish_stages::export::{GgufParams, GgufStage, HfParams, HfStage, Quant};
use burnish_stages::model::checkpoint::Checkpoint;
use burnish_stages::model::weights::{TensorFiles, tensor_f32};
use burnish_stages::model::{self, BaseQuant, LoraParams, LoraTarget, lora};
use burnish_stages::text::TemplateChoice;
use tempfile::TempDir;

type B = Flex;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/models")
        .join(name)
}

fn reference_ids(dir: &Path) -> Vec<u32> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn ids_tensor(ids: &[u32]) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), &FlexDevice)
}

fn artifact(dir: &Path, kind: ArtifactKind) -> Artifact {
    Artifact {
        ty: ArtifactType::of(kind),
        dir: dir.to_path_buf(),
        digest: String::new(),
    }
}

/// A stage run standalone in a temporary directory: pipeline `pipe`, stage `exp`.
struct Ran {
    _tmp: TempDir,
    out: PathBuf,
    metrics: BTreeMap<String, serde_json::Value>,
}

fn run_stage<S: Stage>(params: serde_json::Value, input: Artifact) -> Ran {
    let p: S::Params = serde_json::from_value(params).unwrap();
    assert!(S::check(&p).is_empty());
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut cx = RunContext::standalone("exp", tmp.path(), 0)
        .with_pipeline("pipe")
        .with_input("model", input)
        .with_output("main", out.clone());
    let outcome = match S::run(&p, &mut cx) {
        Ok(o) => o,
        Err(e) => panic!("{}: {e:?}", S::KIND),
    };
    Ran {
        _tmp: tmp,
        out,
        metrics: outcome.metrics,
    }
}

/// Export `dir` (a Model or Adapter artifact) at `quant`; the file's path and bytes.
fn export(dir: &Path, kind: ArtifactKind, quant: Quant) -> (Ran, PathBuf, Vec<u8>) {
    let ran = run_stage::<GgufStage>(
        serde_json::json!({"model": "m", "quant": quant.name()}),
        artifact(dir, kind),
    );
    let path = ran.out.join(format!("pipe-exp-{}.gguf", quant.name()));
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{} was not written: {e}", path.display()));
    (ran, path, bytes)
}

fn meta<'a>(f: &'a GgufFile, key: &str) -> &'a MetaValue {
    f.get(key)
        .unwrap_or_else(|| panic!("key `{key}` is missing"))
}

fn u32_key(f: &GgufFile, key: &str) -> u32 {
    match meta(f, key) {
        MetaValue::U32(v) => *v,
        other => panic!("`{key}` must be a u32, found {other:?}"),
    }
}

fn f32_key(f: &GgufFile, key: &str) -> f32 {
    match meta(f, key) {
        MetaValue::F32(v) => *v,
        other => panic!("`{key}` must be an f32, found {other:?}"),
    }
}

fn str_key<'a>(f: &'a GgufFile, key: &str) -> &'a str {
    match meta(f, key) {
        MetaValue::String(s) => s,
        other => panic!("`{key}` must be a string, found {other:?}"),
    }
}

fn bool_key(f: &GgufFile, key: &str) -> bool {
    match meta(f, key) {
        MetaValue::Bool(b) => *b,
        other => panic!("`{key}` must be a bool, found {other:?}"),
    }
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// ---------------------------------------------------------------------------------------------
// The Python reader (PyPI `gguf`), when it is installed.

/// Read `path` with `gguf.GGUFReader` and check its tensor names and types and a few keys against
/// burnish's reader. Skips (with a message) when `gguf` cannot be imported, unless
/// `BURNISH_REQUIRE_PY=1`.
fn python_reads(path: &Path, ours: &GgufFile) {
    let script = r#"
import sys
try:
    import gguf
except ImportError:
    print("NO_GGUF")
    sys.exit(0)
r = gguf.GGUFReader(sys.argv[1])
for t in r.tensors:
    print("T", t.name, t.tensor_type.name, ",".join(str(int(d)) for d in t.shape))
arch = r.fields["general.architecture"]
print("A", bytes(arch.parts[arch.data[0]]).decode())
tok = r.fields["tokenizer.ggml.tokens"]
print("N", len(tok.data))
print("K", len(r.fields))
"#;
    let Some(stdout) = common::run_python(script, &path.display().to_string(), "GGUFReader") else {
        return;
    };
    if stdout.trim() == "NO_GGUF" {
        common::skip(
            "BURNISH_REQUIRE_PY",
            "`import gguf` fails (pip install gguf)",
        );
        return;
    }
    let mut tensors = Vec::new();
    for line in stdout.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[0] {
            "T" => tensors.push((
                parts[1].to_owned(),
                parts[2].to_owned(),
                parts[3].to_owned(),
            )),
            "A" => assert_eq!(parts[1], str_key(ours, "general.architecture")),
            "N" => assert_eq!(
                parts[1].parse::<usize>().unwrap(),
                meta(ours, "tokenizer.ggml.tokens")
                    .as_array()
                    .unwrap()
                    .len()
            ),
            // GGUFReader counts the three header fields as fields too.
            "K" => assert_eq!(parts[1].parse::<usize>().unwrap(), ours.metadata.len() + 3),
            _ => panic!("unexpected line {line}"),
        }
    }
    assert_eq!(tensors.len(), ours.tensors.len());
    for ((name, ty, ne), t) in tensors.iter().zip(&ours.tensors) {
        assert_eq!(name, &t.name);
        assert_eq!(ty, t.ty.name(), "{name}");
        let ne_ours: Vec<String> = t.ne.iter().map(|d| d.to_string()).collect();
        assert_eq!(ne, &ne_ours.join(","), "{name}: ne");
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata, tokenizer, tensor table.

/// The tensors of a 2-layer fixture in the order they are written, with PyTorch shapes.
fn expected_tensors(qwen2: bool) -> Vec<(String, Vec<usize>)> {
    let mut v = vec![("token_embd.weight".to_owned(), vec![512, 64])];
    for i in 0..2 {
        let mut push = |n: &str, s: Vec<usize>| v.push((format!("blk.{i}.{n}"), s));
        push("attn_q.weight", vec![64, 64]);
        if qwen2 {
            push("attn_q.bias", vec![64]);
        }
        push("attn_k.weight", vec![32, 64]);
        if qwen2 {
            push("attn_k.bias", vec![32]);
        }
        push("attn_v.weight", vec![32, 64]);
        if qwen2 {
            push("attn_v.bias", vec![32]);
        }
        push("attn_output.weight", vec![64, 64]);
        push("ffn_gate.weight", vec![176, 64]);
        push("ffn_up.weight", vec![176, 64]);
        push("ffn_down.weight", vec![64, 176]);
        push("attn_norm.weight", vec![64]);
        push("ffn_norm.weight", vec![64]);
    }
    v.push(("output_norm.weight".into(), vec![64]));
    v.push(("output.weight".into(), vec![512, 64]));
    v
}

/// What llama-quantize gives each tensor of the fixtures (rows of 64 values, ffn_down rows of
/// 176), worked out by hand from `llama-quant.cpp`:
/// - 1-D tensors: F32.
/// - q8_0: Q8_0, except ffn_down: 176 % 32 ≠ 0 → F16.
/// - q4_0: Q4_0; output (and tied token_embd): Q6_K → 64 % 256 ≠ 0 → Q8_0; ffn_down → F16.
/// - q6_k: Q6_K → Q8_0 (rows of 64); ffn_down → F16; output Q8_0 (64 % 256 ≠ 0).
/// - q4_k (pure): Q4_K → Q5_0; ffn_down → F16.
/// - q4_k_m: Q4_K → Q5_0; output (and tied token_embd) → Q8_0; attn_v layer 1 (use_more_bits(1, 2))
///   Q6_K → Q8_0, layer 0 → Q5_0; ffn_down both layers → F16.
fn expected_type(quant: Quant, name: &str, shape: &[usize], tied: bool) -> GgmlType {
    use GgmlType::*;
    if shape.len() == 1 {
        return F32;
    }
    let output_like = name == "output.weight" || (tied && name == "token_embd.weight");
    let ffn_down = name.ends_with("ffn_down.weight");
    match quant {
        Quant::F32 => F32,
        Quant::F16 => F16,
        Quant::Bf16 => BF16,
        _ if ffn_down => F16,
        Quant::Q8_0 => Q8_0,
        Quant::Q4_0 if output_like => Q8_0,
        Quant::Q4_0 => Q4_0,
        Quant::Q6K => Q8_0,
        Quant::Q4K => Q5_0,
        Quant::Q4KM if output_like => Q8_0,
        Quant::Q4KM if name == "blk.1.attn_v.weight" => Q8_0,
        Quant::Q4KM => Q5_0,
    }
}

fn check_file(name: &str, quant: Quant) {
    let dir = fixture(name);
    let qwen2 = name == "tiny-qwen2";
    let (ran, path, bytes) = export(&dir, ArtifactKind::Model, quant);
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);

    let arch = if qwen2 { "qwen2" } else { "llama" };
    assert_eq!(str_key(&f, "general.architecture"), arch);
    assert_eq!(str_key(&f, "general.name"), "pipe-exp");
    assert_eq!(u32_key(&f, "general.file_type"), quant.file_type());
    let quantized = !matches!(quant, Quant::F32 | Quant::F16 | Quant::Bf16);
    assert_eq!(
        f.get("general.quantization_version")
            .map(|_| u32_key(&f, "general.quantization_version")),
        quantized.then_some(2)
    );
    for (key, v) in [
        ("context_length", 256),
        ("embedding_length", 64),
        ("block_count", 2),
        ("feed_forward_length", 176),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
        ("attention.key_length", 16),
        ("attention.value_length", 16),
        ("rope.dimension_count", 16),
        ("vocab_size", 512),
    ] {
        assert_eq!(u32_key(&f, &format!("{arch}.{key}")), v, "{arch}.{key}");
    }
    let (eps, theta) = if qwen2 { (1e-6, 1e6) } else { (1e-5, 1e4) };
    assert_eq!(
        f32_key(&f, &format!("{arch}.attention.layer_norm_rms_epsilon")),
        eps as f32
    );
    assert_eq!(f32_key(&f, &format!("{arch}.rope.freq_base")), theta as f32);

    // Tokenizer: byte-level BPE → gpt2 with GPT-2's pre-tokenizer; 512 tokens, 253 merges.
    assert_eq!(str_key(&f, "tokenizer.ggml.model"), "gpt2");
    assert_eq!(str_key(&f, "tokenizer.ggml.pre"), "gpt-2");
    let Some(MetaArray::String(tokens)) = meta(&f, "tokenizer.ggml.tokens").as_array() else {
        panic!("tokens must be a string array");
    };
    assert_eq!(tokens.len(), 512, "tokens = vocab size = embedding rows");
    assert_eq!(
        &tokens[..3],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    let Some(MetaArray::I32(types)) = meta(&f, "tokenizer.ggml.token_type").as_array() else {
        panic!("token_type must be an i32 array");
    };
    assert_eq!(types.len(), 512);
    assert_eq!(&types[..4], [3, 3, 3, 1], "special tokens are control (3)");
    assert!(types[3..].iter().all(|&t| t == 1));
    let Some(MetaArray::String(merges)) = meta(&f, "tokenizer.ggml.merges").as_array() else {
        panic!("merges must be a string array");
    };
    assert_eq!(merges.len(), 253);
    assert!(
        merges.iter().all(|m| m.split(' ').count() == 2),
        "{:?}",
        &merges[..3]
    );
    // eos/padding from tokenizer_config.json; bos from config.json's bos_token_id (0);
    // unknown falls back to eos.
    assert_eq!(u32_key(&f, "tokenizer.ggml.eos_token_id"), 2);
    assert_eq!(u32_key(&f, "tokenizer.ggml.padding_token_id"), 0);
    assert_eq!(u32_key(&f, "tokenizer.ggml.bos_token_id"), 0);
    assert_eq!(u32_key(&f, "tokenizer.ggml.unknown_token_id"), 2);
    assert!(!bool_key(&f, "tokenizer.ggml.add_bos_token"));
    assert!(!bool_key(&f, "tokenizer.ggml.add_eos_token"));
    assert!(str_key(&f, "tokenizer.chat_template").contains("<|im_start|>"));

    // Tensors: names, shapes, types, packed in order at aligned offsets.
    let expected = expected_tensors(qwen2);
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let want: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, want);
    let mut offset = 0u64;
    let mut data_bytes = 0usize;
    let mut weights = 0usize;
    for (t, (_, shape)) in f.tensors.iter().zip(&expected) {
        assert_eq!(&t.shape, shape, "{}", t.name);
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        assert_eq!(t.ne, ne, "{}: ne is the shape reversed", t.name);
        assert_eq!(
            t.ty,
            expected_type(quant, &t.name, shape, qwen2),
            "{} at {}",
            t.name,
            quant
        );
        assert_eq!(t.offset, offset, "{}: packed in order", t.name);
        let n: usize = shape.iter().product();
        let size = t.ty.row_bytes(shape[shape.len() - 1]) * (n / shape[shape.len() - 1]);
        assert_eq!(f.tensor_bytes(&bytes, t).unwrap().len(), size);
        offset += (size as u64).div_ceil(32) * 32;
        data_bytes += size;
        weights += n;
    }
    assert_eq!(f.data_offset % 32, 0);
    assert_eq!(
        f.data_offset + offset,
        bytes.len() as u64,
        "no trailing bytes"
    );

    // Metrics.
    let m = &ran.metrics;
    assert_eq!(m["quant"], quant.name());
    assert_eq!(m["arch"], arch);
    assert_eq!(m["file"], format!("pipe-exp-{}.gguf", quant.name()));
    assert_eq!(m["file_bytes"], bytes.len() as u64);
    assert_eq!(m["tensors"], expected.len());
    let bpw = (8.0 * data_bytes as f64 / weights as f64 * 1000.0).round() / 1000.0;
    assert_eq!(m["bits_per_weight"].as_f64().unwrap(), bpw);
    eprintln!(
        "{name} {quant}: {} bytes, {} tensors, {bpw} bits/weight",
        bytes.len(),
        expected.len()
    );

    // The Modelfile beside it.
    let mf = std::fs::read_to_string(ran.out.join("Modelfile")).unwrap();
    assert!(
        mf.contains(&format!("FROM ./pipe-exp-{}.gguf\n", quant.name())),
        "{mf}"
    );
    assert!(
        mf.contains("TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}"),
        "{mf}"
    );
    assert!(mf.contains("PARAMETER stop \"<|im_end|>\""), "{mf}");

    python_reads(&path, &f);
}

#[test]
fn tiny_llama_exports_at_every_quant_with_exact_metadata_and_llama_cpp_types() {
    for q in Quant::ALL {
        check_file("tiny-llama", q);
    }
}

#[test]
fn tiny_qwen2_exports_at_every_quant_with_biases_and_an_output_weight() {
    for q in Quant::ALL {
        check_file("tiny-qwen2", q);
    }
}

#[test]
fn q4_k_m_mix_on_the_fixture_per_tensor() {
    // The table the report quotes: every matrix of the tied tiny-qwen2 at q4_k_m.
    let (_ran, _path, bytes) = export(&fixture("tiny-qwen2"), ArtifactKind::Model, Quant::Q4KM);
    let f = GgufFile::parse(&bytes).unwrap();
    let got: Vec<(String, &str)> = f
        .tensors
        .iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| (t.name.clone(), t.ty.name()))
        .collect();
    for (n, t) in &got {
        eprintln!("{n:<24} {t}");
    }
    let want = [
        ("token_embd.weight", "Q8_0"),
        ("blk.0.attn_q.weight", "Q5_0"),
        ("blk.0.attn_k.weight", "Q5_0"),
        ("blk.0.attn_v.weight", "Q5_0"),
        ("blk.0.attn_output.weight", "Q5_0"),
        ("blk.0.ffn_gate.weight", "Q5_0"),
        ("blk.0.ffn_up.weight", "Q5_0"),
        ("blk.0.ffn_down.weight", "F16"),
        ("blk.1.attn_q.weight", "Q5_0"),
        ("blk.1.attn_k.weight", "Q5_0"),
        ("blk.1.attn_v.weight", "Q8_0"),
        ("blk.1.attn_output.weight", "Q5_0"),
        ("blk.1.ffn_gate.weight", "Q5_0"),
        ("blk.1.ffn_up.weight", "Q5_0"),
        ("blk.1.ffn_down.weight", "F16"),
        ("output.weight", "Q8_0"),
    ];
    let want: Vec<(String, &str)> = want.iter().map(|(n, t)| (n.to_string(), *t)).collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------------
// RoPE layout, checked numerically.

/// Hugging Face's RoPE (`rotate_half`) on one head at position `pos`.
fn rope_hf(x: &[f32], pos: f64, theta: f64) -> Vec<f32> {
    let d = x.len();
    let h = d / 2;
    let mut out = vec![0.0; d];
    for i in 0..h {
        let a = pos * theta.powf(-((2 * i) as f64) / d as f64);
        let (s, c) = (a.sin() as f32, a.cos() as f32);
        out[i] = x[i] * c - x[i + h] * s;
        out[i + h] = x[i + h] * c + x[i] * s;
    }
    out
}

/// ggml's `rope` in its normal mode (llama.cpp's `llama`): consecutive pairs `(2i, 2i+1)`
/// rotated by `pos · θ^(-2i/d)`.
fn rope_ggml_pairs(x: &[f32], pos: f64, theta: f64) -> Vec<f32> {
    let d = x.len();
    let mut out = vec![0.0; d];
    for i in 0..d / 2 {
        let a = pos * theta.powf(-((2 * i) as f64) / d as f64);
        let (s, c) = (a.sin() as f32, a.cos() as f32);
        out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s;
        out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c;
    }
    out
}

/// `W x` for a row-major `[rows, cols]` W.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn exported_q_and_k_under_ggml_rope_give_transformers_rotations_and_scores() {
    let dir = fixture("tiny-llama");
    let (_ran, _path, bytes) = export(&dir, ArtifactKind::Model, Quant::F32);
    let f = GgufFile::parse(&bytes).unwrap();
    let hf = TensorFiles::open(&[dir.join("model.safetensors")]).unwrap();
    let (d, heads, kv_heads, theta) = (16usize, 4usize, 2usize, 1e4);
    let x: Vec<f32> = (0..64)
        .map(|i| ((i * 7919 % 113) as f32 / 113.0) - 0.5)
        .collect();
    let mut max_rot = 0f32;
    let mut max_score = 0f32;
    let mut unpermuted_score_gap = 0f32;
    for layer in 0..2 {
        let wq_hf = hf
            .read_f32(
                &format!("model.layers.{layer}.self_attn.q_proj.weight"),
                &[64, 64],
            )
            .unwrap();
        let wk_hf = hf
            .read_f32(
                &format!("model.layers.{layer}.self_attn.k_proj.weight"),
                &[32, 64],
            )
            .unwrap();
        let wq_gg = f
            .tensor_f32(&bytes, &format!("blk.{layer}.attn_q.weight"))
            .unwrap();
        let wk_gg = f
            .tensor_f32(&bytes, &format!("blk.{layer}.attn_k.weight"))
            .unwrap();
        let (q_hf, k_hf) = (matvec(&wq_hf, &x), matvec(&wk_hf, &x));
        let (q_gg, k_gg) = (matvec(&wq_gg, &x), matvec(&wk_gg, &x));
        for (pq, pk) in [(0.0, 0.0), (5.0, 3.0), (17.0, 11.0), (200.0, 199.0)] {
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let rq_hf = rope_hf(&q_hf[h * d..(h + 1) * d], pq, theta);
                let rq_gg = rope_ggml_pairs(&q_gg[h * d..(h + 1) * d], pq, theta);
                let rk_hf = rope_hf(&k_hf[kv * d..(kv + 1) * d], pk, theta);
                let rk_gg = rope_ggml_pairs(&k_gg[kv * d..(kv + 1) * d], pk, theta);
                // The rotated vectors are the same numbers, interleaved: gg[2i] = hf[i],
                // gg[2i+1] = hf[i + d/2].
                for i in 0..d / 2 {
                    max_rot = max_rot
                        .max((rq_gg[2 * i] - rq_hf[i]).abs())
                        .max((rq_gg[2 * i + 1] - rq_hf[i + d / 2]).abs())
                        .max((rk_gg[2 * i] - rk_hf[i]).abs())
                        .max((rk_gg[2 * i + 1] - rk_hf[i + d / 2]).abs());
                }
                // And so are the attention scores.
                let s_hf = dot(&rq_hf, &rk_hf);
                max_score = max_score.max((dot(&rq_gg, &rk_gg) - s_hf).abs());
                // Control: the unpermuted weights under ggml's rotation give other scores.
                let wrong = dot(
                    &rope_ggml_pairs(&q_hf[h * d..(h + 1) * d], pq, theta),
                    &rope_ggml_pairs(&k_hf[kv * d..(kv + 1) * d], pk, theta),
                );
                unpermuted_score_gap = unpermuted_score_gap.max((wrong - s_hf).abs());
            }
        }
    }
    eprintln!(
        "rope: max |rotated q/k diff| {max_rot:e}, max |score diff| {max_score:e}, \
         unpermuted control {unpermuted_score_gap:e}"
    );
    assert!(max_rot < 1e-5, "{max_rot:e}");
    assert!(max_score < 1e-5, "{max_score:e}");
    assert!(
        unpermuted_score_gap > 1e-2,
        "the control must fail: {unpermuted_score_gap:e}"
    );
}

#[test]
fn f32_export_holds_the_checkpoint_exactly_and_qwen2_unpermuted() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let (_ran, _path, bytes) = export(&dir, ArtifactKind::Model, Quant::F32);
        let f = GgufFile::parse(&bytes).unwrap();
        let hf = TensorFiles::open(&[dir.join("model.safetensors")]).unwrap();
        let pairs = [
            (
                "model.embed_tokens.weight",
                "token_embd.weight",
                vec![512, 64],
            ),
            (
                "model.layers.1.mlp.down_proj.weight",
                "blk.1.ffn_down.weight",
                vec![64, 176],
            ),
            (
                "model.layers.0.self_attn.v_proj.weight",
                "blk.0.attn_v.weight",
                vec![32, 64],
            ),
            ("model.norm.weight", "output_norm.weight", vec![64]),
        ];
        for (h, g, shape) in pairs {
            assert_eq!(
                hf.read_f32(h, &shape).unwrap(),
                f.tensor_f32(&bytes, g).unwrap(),
                "{g}"
            );
        }
        let q_hf = hf
            .read_f32("model.layers.0.self_attn.q_proj.weight", &[64, 64])
            .unwrap();
        let q_gg = f.tensor_f32(&bytes, "blk.0.attn_q.weight").unwrap();
        if name == "tiny-qwen2" {
            // qwen2 is NeoX-style in llama.cpp: no permutation, biases as they are.
            assert_eq!(q_hf, q_gg);
            let b = hf
                .read_f32("model.layers.0.self_attn.k_proj.bias", &[32])
                .unwrap();
            assert_eq!(b, f.tensor_f32(&bytes, "blk.0.attn_k.bias").unwrap());
            // Tied: output.weight is the embedding.
            assert_eq!(
                f.tensor_f32(&bytes, "output.weight").unwrap(),
                hf.read_f32("model.embed_tokens.weight", &[512, 64])
                    .unwrap()
            );
        } else {
            assert_ne!(q_hf, q_gg, "llama's q rows are permuted");
            let mut a = q_hf.clone();
            let mut b = q_gg.clone();
            a.sort_by(f32::total_cmp);
            b.sort_by(f32::total_cmp);
            assert_eq!(a, b, "… but hold the same values");
            assert_eq!(
                f.tensor_f32(&bytes, "output.weight").unwrap(),
                hf.read_f32("lm_head.weight", &[512, 64]).unwrap()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// candle runs the files.

/// Logits at every position of `ids` from candle's quantized model, one token at a time through
/// its KV cache.
fn candle_logits(path: &Path, ids: &[u32], qwen2: bool) -> Vec<f32> {
    use candle_core::quantized::gguf_file;
    use candle_core::{Device, Tensor as CTensor};
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let dev = Device::Cpu;
    let mut out = Vec::new();
    if qwen2 {
        let mut m = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
            content, &mut file, &dev,
        )
        .unwrap();
        for (pos, &id) in ids.iter().enumerate() {
            let x = CTensor::new(&[[id]], &dev).unwrap();
            let l = m.forward(&x, pos).unwrap();
            out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    } else {
        let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content, &mut file, &dev,
        )
        .unwrap();
        for (pos, &id) in ids.iter().enumerate() {
            let x = CTensor::new(&[[id]], &dev).unwrap();
            let l = m.forward(&x, pos).unwrap();
            out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
    out
}

/// Max |candle − burnish| over every logit of the reference text, relative to max |burnish|.
fn candle_vs_burnish(name: &str, quant: Quant) -> f32 {
    let dir = fixture(name);
    let ids = reference_ids(&dir);
    let loaded = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
    let ours = tensor_f32(loaded.model.forward(ids_tensor(&ids)));
    let (_ran, path, _bytes) = export(&dir, ArtifactKind::Model, quant);
    let theirs = candle_logits(&path, &ids, name == "tiny-qwen2");
    let rel = max_abs_diff(&ours, &theirs) / max_abs(&ours);
    let mean = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / ours.len() as f32;
    let vocab = 512;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let agree = ours
        .chunks(vocab)
        .zip(theirs.chunks(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    eprintln!(
        "candle vs burnish, {name} {quant}: max |Δlogit| / max |logit| = {rel:e}, mean |Δlogit| = {mean:e}, \
         argmax agrees at {agree}/{} positions (max |logit| {})",
        ids.len(),
        max_abs(&ours)
    );
    rel
}

/// The inverse of the export's RoPE row permutation (interleaved pairs → split halves).
fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..d / 2 {
            for s in 0..2 {
                let gg = h * d + 2 * j + s;
                let hf = h * d + s * d / 2 + j;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&w[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    out
}

/// A Hugging Face directory holding the GGUF file's weights dequantized (and un-permuted) under
/// `src`'s config and tokenizer: the exported numbers, run by burnish's own forward pass.
fn dequantized_model_dir(bytes: &[u8], src: &Path, llama: bool) -> TempDir {
    let f = GgufFile::parse(bytes).unwrap();
    let hf = TensorFiles::open(&[src.join("model.safetensors")]).unwrap();
    let mut tensors = Vec::new();
    for name in hf.names() {
        let shape = hf.shape(name).unwrap();
        let gg = if name == "model.embed_tokens.weight" {
            "token_embd.weight".to_owned()
        } else if name == "model.norm.weight" {
            "output_norm.weight".to_owned()
        } else if name == "lm_head.weight" {
            "output.weight".to_owned()
        } else {
            let rest = name.strip_prefix("model.layers.").unwrap();
            let (i, stem) = rest.split_once('.').unwrap();
            let stem = stem
                .replace("self_attn.q_proj", "attn_q")
                .replace("self_attn.k_proj", "attn_k")
                .replace("self_attn.v_proj", "attn_v")
                .replace("self_attn.o_proj", "attn_output")
                .replace("mlp.gate_proj", "ffn_gate")
                .replace("mlp.up_proj", "ffn_up")
                .replace("mlp.down_proj", "ffn_down")
                .replace("post_attention_layernorm", "ffn_norm")
                .replace("input_layernorm", "attn_norm");
            format!("blk.{i}.{stem}")
        };
        let mut v = f.tensor_f32(bytes, &gg).unwrap();
        if llama && (gg.contains("attn_q") || gg.contains("attn_k")) {
            let heads = if gg.contains("attn_q") { 4 } else { 2 };
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            v = unpermute_rows(&v, shape[0], cols, heads);
        }
        tensors.push((name.to_owned(), shape, v));
    }
    let tmp = TempDir::new().unwrap();
    model::weights::write_safetensors(&tmp.path().join("model.safetensors"), &tensors, None)
        .unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(file), tmp.path().join(file)).unwrap();
    }
    tmp
}

#[test]
fn q8_0_logit_error_splits_into_weight_rounding_and_candles_activation_quantization() {
    // candle multiplies Q8_0 weights by activations it quantizes itself (to Q8_0 blocks), so its
    // q8_0 logits carry two errors. burnish run on the dequantized file separates them.
    let dir = fixture("tiny-llama");
    let ids = reference_ids(&dir);
    let ours = tensor_f32(
        model::load_model_dir::<B>(&dir, &FlexDevice)
            .unwrap()
            .model
            .forward(ids_tensor(&ids)),
    );
    let scale = max_abs(&ours);
    let (_ran, path, bytes) = export(&dir, ArtifactKind::Model, Quant::Q8_0);
    let deq_dir = dequantized_model_dir(&bytes, &dir, true);
    let deq = tensor_f32(
        model::load_model_dir::<B>(deq_dir.path(), &FlexDevice)
            .unwrap()
            .model
            .forward(ids_tensor(&ids)),
    );
    let theirs = candle_logits(&path, &ids, false);
    let weights = max_abs_diff(&deq, &ours) / scale;
    let runtime = max_abs_diff(&theirs, &deq) / scale;
    let total = max_abs_diff(&theirs, &ours) / scale;
    eprintln!(
        "q8_0 tiny-llama: weight rounding {weights:e}, candle's runtime {runtime:e}, total {total:e}"
    );
    assert!(weights <= 1.5e-2, "{weights:e}");
    assert!(runtime <= 1.5e-2, "{runtime:e}");
    assert!(total <= 2e-2, "{total:e}");

    // The f32 file dequantizes (and un-permutes) to the checkpoint exactly.
    let (_ran, _path, bytes) = export(&dir, ArtifactKind::Model, Quant::F32);
    let same = model::load_model_dir::<B>(
        dequantized_model_dir(&bytes, &dir, true).path(),
        &FlexDevice,
    )
    .unwrap();
    assert_eq!(tensor_f32(same.model.forward(ids_tensor(&ids))), ours);
}

#[test]
fn candle_runs_the_exported_tiny_llama_like_burnish() {
    let f32_rel = candle_vs_burnish("tiny-llama", Quant::F32);
    assert!(f32_rel <= 1e-3, "f32: {f32_rel:e}");
    let q8_rel = candle_vs_burnish("tiny-llama", Quant::Q8_0);
    assert!(q8_rel <= 2e-2, "q8_0: {q8_rel:e}");
}

#[test]
fn candle_runs_the_exported_tiny_qwen2_like_burnish() {
    let f32_rel = candle_vs_burnish("tiny-qwen2", Quant::F32);
    assert!(f32_rel <= 1e-3, "f32: {f32_rel:e}");
    let q8_rel = candle_vs_burnish("tiny-qwen2", Quant::Q8_0);
    assert!(q8_rel <= 2e-2, "q8_0: {q8_rel:e}");
}

#[test]
fn candle_runs_every_quant_of_tiny_llama() {
    // Informative numbers for the lower-bit files (all of their types are ones candle reads:
    // F16, BF16, Q4_0, Q5_0, Q8_0), with loose bounds that catch a broken layout.
    for (q, bound) in [
        (Quant::F16, 5e-3),
        (Quant::Bf16, 5e-2),
        (Quant::Q4_0, 0.25),
        (Quant::Q4K, 0.25),
        (Quant::Q6K, 2e-2),
        (Quant::Q4KM, 0.25),
    ] {
        let rel = candle_vs_burnish("tiny-llama", q);
        assert!(rel <= bound, "{q}: {rel:e} > {bound:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Adapters.

/// A LoRA adapter on tiny-llama with non-zero B, written as an Adapter artifact (PEFT files and
/// the base in `base/`), and the logits of the adapted model on `ids`.
fn adapter_artifact(ids: &[u32]) -> (TempDir, Vec<f32>) {
    let dir = fixture("tiny-llama");
    let loaded = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
    let params = LoraParams {
        rank: 4,
        alpha: Some(8.0),
        dropout: 0.0,
        targets: vec![LoraTarget::QProj, LoraTarget::KProj, LoraTarget::DownProj],
    };
    let mut adapted = lora::inject(loaded.model, &params, 7);
    for layer in adapted.model.layers.iter_mut() {
        for lin in [
            &mut layer.self_attn.q_proj,
            &mut layer.self_attn.k_proj,
            &mut layer.mlp.down_proj,
        ] {
            let l = lin.lora.as_mut().unwrap();
            let [o, r] = l.b.val().dims();
            let v: Vec<f32> = (0..o * r)
                .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.02)
                .collect();
            l.b = Param::from_tensor(Tensor::from_data(TensorData::new(v, [o, r]), &FlexDevice));
        }
    }
    let logits = tensor_f32(adapted.forward(ids_tensor(ids)));
    let tmp = TempDir::new().unwrap();
    lora::write_adapter(&adapted, &params, "base", tmp.path()).unwrap();
    model::link_model_dir(&dir, &tmp.path().join("base")).unwrap();
    (tmp, logits)
}

#[test]
fn adapter_exports_to_gguf_merged() {
    let ids = reference_ids(&fixture("tiny-llama"));
    let (adapter, adapted_logits) = adapter_artifact(&ids);
    let base = model::load_model_dir::<B>(&fixture("tiny-llama"), &FlexDevice).unwrap();
    let base_logits = tensor_f32(base.model.forward(ids_tensor(&ids)));
    let (_ran, path, bytes) = export(adapter.path(), ArtifactKind::Adapter, Quant::F32);
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(
        f.tensors.len(),
        expected_tensors(false).len(),
        "no adapter tensors"
    );
    let theirs = candle_logits(&path, &ids, false);
    let rel = max_abs_diff(&adapted_logits, &theirs) / max_abs(&adapted_logits);
    let moved = max_abs_diff(&adapted_logits, &base_logits) / max_abs(&adapted_logits);
    eprintln!("adapter → gguf f32: candle vs adapted {rel:e} (adapter moved logits by {moved:e})");
    assert!(moved > 1e-2, "the adapter must matter: {moved:e}");
    assert!(rel <= 1e-3, "{rel:e}");
}

#[test]
fn export_hf_model_reloads_with_identical_logits() {
    let ids = [5u32, 17, 42, 99, 300, 2, 7, 8];
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let ran = run_stage::<HfStage>(
            serde_json::json!({"model": "m"}),
            artifact(&dir, ArtifactKind::Model),
        );
        assert_eq!(ran.metrics["format"], "model");
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(ran.out.join(f).is_file(), "{name}: {f}");
        }
        let a = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
        let b = model::load_model_dir::<B>(&ran.out, &FlexDevice).unwrap();
        assert_eq!(
            tensor_f32(a.model.forward(ids_tensor(&ids))),
            tensor_f32(b.model.forward(ids_tensor(&ids))),
            "{name}"
        );
        // The chat template travels too.
        let tok = burnish_stages::text::TextTokenizer::from_dir(&ran.out).unwrap();
        assert!(
            tok.checkpoint_template().unwrap().contains("<|im_start|>"),
            "{name}"
        );
    }
}

#[test]
fn export_hf_adapter_is_a_peft_directory_and_merges_on_request() {
    let ids = [5u32, 17, 42, 99, 300, 2, 7, 8];
    let (adapter, adapted_logits) = adapter_artifact(&ids);

    // merge: false → a PEFT adapter directory with the base in base/.
    let ran = run_stage::<HfStage>(
        serde_json::json!({"model": "m"}),
        artifact(adapter.path(), ArtifactKind::Adapter),
    );
    assert_eq!(ran.metrics["format"], "peft_adapter");
    // 2 layers × r=4 × [(64+64) q + (64+32) k + (176+64) down] = 3712
    assert_eq!(ran.metrics["adapter_params"], 3712);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ran.out.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["base_model_name_or_path"], "base");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "k_proj", "q_proj"])
    );
    let files = TensorFiles::open(&[ran.out.join("adapter_model.safetensors")]).unwrap();
    let names: Vec<&str> = files.names().collect();
    assert_eq!(names.len(), 2 * 3 * 2);
    assert!(names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert_eq!(
        files.shape("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"),
        Some(vec![32, 4])
    );
    assert!(ran.out.join("base/model.safetensors").is_file());
    assert!(ran.out.join("base/tokenizer.json").is_file());
    let back = model::load::<B>(&ran.out, &FlexDevice).unwrap();
    assert_eq!(
        tensor_f32(back.model.forward(ids_tensor(&ids))),
        adapted_logits
    );

    // merge: true → a model directory with the adapter folded in.
    let ran = run_stage::<HfStage>(
        serde_json::json!({"model": "m", "merge": true}),
        artifact(adapter.path(), ArtifactKind::Adapter),
    );
    assert_eq!(ran.metrics["format"], "model");
    assert!(!ran.out.join("adapter_config.json").exists());
    let merged = model::load_model_dir::<B>(&ran.out, &FlexDevice).unwrap();
    let d = max_abs_diff(
        &tensor_f32(merged.model.forward(ids_tensor(&ids))),
        &adapted_logits,
    );
    assert!(d < 1e-4, "merged vs adapted: {d:e}");
}

#[test]
fn export_hf_output_kind_follows_the_input_and_merge() {
    use std::collections::BTreeMap;
    let p: HfParams = serde_json::from_value(serde_json::json!({"model": "m"})).unwrap();
    let mut inputs = BTreeMap::new();
    inputs.insert("model".to_owned(), ArtifactType::of(ArtifactKind::Adapter));
    assert_eq!(
        HfStage::outputs(&p, &inputs)[0].ty.kind,
        ArtifactKind::Adapter
    );
    let merged: HfParams =
        serde_json::from_value(serde_json::json!({"model": "m", "merge": true})).unwrap();
    assert_eq!(
        HfStage::outputs(&merged, &inputs)[0].ty.kind,
        ArtifactKind::Model
    );
    inputs.insert("model".to_owned(), ArtifactType::of(ArtifactKind::Model));
    assert_eq!(
        HfStage::outputs(&p, &inputs)[0].ty.kind,
        ArtifactKind::Model
    );
}

// ---------------------------------------------------------------------------------------------
// Parameters.

#[test]
fn gguf_params_default_to_q8_0_and_check_the_pre_tokenizer() {
    let p: GgufParams = serde_json::from_value(serde_json::json!({"model": "m"})).unwrap();
    assert_eq!(p.quant, Quant::Q8_0);
    let bad: GgufParams =
        serde_json::from_value(serde_json::json!({"model": "m", "pre_tokenizer": "gpt2"})).unwrap();
    let problems = GgufStage::check(&bad);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "pre_tokenizer");
    assert_eq!(problems[0].help.as_deref(), Some("did you mean `gpt-2`?"));
    assert!(
        serde_json::from_value::<GgufParams>(serde_json::json!({"model": "m", "quant": "q5_k"}))
            .is_err()
    );
    let s = GgufStage::sensitivity(&p);
    assert!(s.names && !s.seed && !s.backend);
}

#[test]
fn gguf_file_name_is_pipeline_stage_quant_made_file_safe() {
    use burnish_stages::export::stages::gguf_file_name;
    assert_eq!(
        gguf_file_name("pipe", "exp", Quant::Q4KM),
        "pipe-exp-q4_k_m.gguf"
    );
    assert_eq!(
        gguf_file_name("my pipe", "export[quant=q4_0]", Quant::Q4_0),
        "my_pipe-export_quant_q4_0-q4_0.gguf"
    );
    assert_eq!(gguf_file_name("../x", "a/b", Quant::F16), "x-a_b-f16.gguf");
}

// ---------------------------------------------------------------------------------------------
// A SentencePiece-style (byte-fallback BPE) tokenizer, as Llama 2 and TinyLlama ship.

/// tiny-llama's weights with a Llama-2-style tokenizer.json: `<unk>`, `<s>`, `</s>`, the 256
/// `<0xNN>` byte tokens, `▁` and a–z, and five merges (`▁t`, `he`, `▁the`, `in`, `▁a`); 291 ids
/// of the embedding's 512.
fn spm_model_dir() -> TempDir {
    let src = fixture("tiny-llama");
    let tmp = TempDir::new().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    let mut add = |t: String| {
        let id = vocab.len();
        vocab.insert(t, id.into());
    };
    for t in ["<unk>", "<s>", "</s>"] {
        add(t.to_owned());
    }
    for b in 0..=255u8 {
        add(format!("<0x{b:02X}>"));
    }
    add("▁".to_owned());
    for c in 'a'..='z' {
        add(c.to_string());
    }
    let merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a")];
    for (a, b) in merges {
        add(format!("{a}{b}"));
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    });
    std::fs::write(tmp.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": null, "add_bos_token": true, "add_eos_token": false});
    std::fs::write(tmp.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    tmp
}

#[test]
fn byte_fallback_bpe_exports_as_a_llama_vocab_with_merge_rank_scores() {
    let dir = spm_model_dir();
    let tok = burnish_stages::text::TextTokenizer::from_dir(dir.path()).unwrap();
    // "▁the▁thin" → ▁the, ▁t, h, in
    assert_eq!(tok.encode("the thin").unwrap(), [288, 286, 267, 289]);
    let (ran, path, bytes) = export(dir.path(), ArtifactKind::Model, Quant::Q8_0);
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(str_key(&f, "tokenizer.ggml.model"), "llama");
    assert!(f.get("tokenizer.ggml.pre").is_none());
    assert!(f.get("tokenizer.ggml.merges").is_some());
    let Some(MetaArray::String(tokens)) = meta(&f, "tokenizer.ggml.tokens").as_array() else {
        panic!()
    };
    assert_eq!(tokens.len(), 512);
    assert_eq!(tokens[259], "▁");
    assert_eq!(tokens[288], "▁the");
    assert_eq!(tokens[291], "[PAD291]");
    let Some(MetaArray::I32(types)) = meta(&f, "tokenizer.ggml.token_type").as_array() else {
        panic!()
    };
    assert_eq!(&types[..3], [3, 3, 3]);
    assert!(types[3..259].iter().all(|&t| t == 6), "byte tokens");
    assert!(types[259..291].iter().all(|&t| t == 1));
    assert!(types[291..].iter().all(|&t| t == 5), "padding ids unused");
    let Some(MetaArray::F32(scores)) = meta(&f, "tokenizer.ggml.scores").as_array() else {
        panic!("scores must be an f32 array")
    };
    assert_eq!(scores.len(), 512);
    // Minus the rank of the merge that makes the token; base tokens 0.
    assert_eq!(&scores[286..291], [-1.0, -2.0, -3.0, -4.0, -5.0]);
    assert_eq!(scores[260], 0.0);
    assert_eq!(u32_key(&f, "tokenizer.ggml.bos_token_id"), 1);
    assert_eq!(u32_key(&f, "tokenizer.ggml.eos_token_id"), 2);
    assert_eq!(u32_key(&f, "tokenizer.ggml.unknown_token_id"), 0);
    // No pad token in tokenizer_config.json: config.json's pad_token_id (0), as the converter.
    assert_eq!(u32_key(&f, "tokenizer.ggml.padding_token_id"), 0);
    assert!(bool_key(&f, "tokenizer.ggml.add_bos_token"));
    // No chat template in the checkpoint: `auto` writes chatml, as train.sft trains with.
    assert!(str_key(&f, "tokenizer.chat_template").contains("<|im_start|>"));
    let mf = std::fs::read_to_string(ran.out.join("Modelfile")).unwrap();
    assert!(mf.contains("PARAMETER stop \"</s>\""), "{mf}");
    python_reads(&path, &f);
}

#[test]
fn a_pre_tokenizer_burnish_cannot_name_asks_for_the_parameter() {
    let src = fixture("tiny-llama");
    let tmp = TempDir::new().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    tok["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]});
    std::fs::write(tmp.path().join("tokenizer.json"), tok.to_string()).unwrap();

    let p: GgufParams = serde_json::from_value(serde_json::json!({"model": "m"})).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut cx = RunContext::standalone("exp", tmp.path(), 0)
        .with_input("model", artifact(tmp.path(), ArtifactKind::Model))
        .with_output("main", out.clone());
    let err = GgufStage::run(&p, &mut cx).err().unwrap();
    let code = err.code().map(|c| c.to_string());
    let help = err.help().map(|h| h.to_string()).unwrap_or_default();
    assert_eq!(code.as_deref(), Some("burnish::export::tokenizer"));
    assert!(err.to_string().contains("pre-tokenizer"), "{err}");
    assert!(help.contains("pre_tokenizer:"), "{help}");

    // Named explicitly, it exports.
    let ran = run_stage::<GgufStage>(
        serde_json::json!({"model": "m", "quant": "f16", "pre_tokenizer": "default"}),
        artifact(tmp.path(), ArtifactKind::Model),
    );
    let bytes = std::fs::read(ran.out.join("pipe-exp-f16.gguf")).unwrap();
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(str_key(&f, "tokenizer.ggml.pre"), "default");
}

// ---------------------------------------------------------------------------------------------
// llama.cpp itself, when its tools are at hand.

/// llama.cpp's tools (`llama-tokenize`, `llama-perplexity`) from `BURNISH_LLAMA_CPP` (a
/// directory, e.g. `llama-tools/bin` from `benches/llama_tools.sh llama-tools`).
fn llama_cpp_tools() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("BURNISH_LLAMA_CPP")?);
    dir.join("llama-perplexity").is_file().then_some(dir)
}

/// Serializes llama.cpp runs across the tests of this file.
static LLAMA_CPP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `llama-perplexity -c 64` on `text` in f32: the "Final estimate" PPL, or the running estimate
/// after chunk `n_chunks` (the same number). llama.cpp logs from a thread that can lose the last
/// lines at exit on a busy machine, so a run that printed neither is repeated (five tries).
fn llama_cpp_perplexity(tools: &Path, gguf: &Path, text: &Path, n_chunks: usize) -> f64 {
    // One llama.cpp at a time, and no OpenMP spinning: two of them busy-waiting on two cores
    // starve each other's log threads.
    let _one = LLAMA_CPP.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    for _ in 0..5 {
        let out = std::process::Command::new(tools.join("llama-perplexity"))
            .env("OMP_WAIT_POLICY", "passive")
            .args(["-m", gguf.to_str().unwrap(), "-f", text.to_str().unwrap()])
            .args(["-c", "64", "-b", "64", "-t", "2"])
            // f32 KV cache and no flash attention (whose CPU kernel rounds to f16): the f32
            // file then computes what burnish computes.
            .args(["-ctk", "f32", "-ctv", "f32", "-fa", "off"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let std_out = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "llama-perplexity failed on {}:\n{err}",
            gguf.display()
        );
        if let Some(at) = err.find("Final estimate: PPL = ") {
            return err[at + 22..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
        }
        let mark = format!("[{n_chunks}]");
        if let Some(v) = std_out.find(&mark).and_then(|at| {
            std_out[at + mark.len()..]
                .split(|c: char| c == ',' || c.is_whitespace())
                .next()
                .and_then(|v| v.parse().ok())
        }) {
            return v;
        }
        last = format!("stderr:\n{err}\nstdout:\n{std_out}");
    }
    panic!(
        "no PPL from llama-perplexity on {}:\n{last}",
        gguf.display()
    )
}

/// burnish's perplexity scored as llama-perplexity scores it: chunks of `n_ctx` tokens, each
/// scoring the predictions of tokens `n_ctx/2 + 1 .. n_ctx` (no bos: the fixtures do not add one).
fn burnish_perplexity_like_llama_cpp(model_dir: &Path, ids: &[u32], n_ctx: usize) -> f64 {
    let loaded = model::load_model_dir::<B>(model_dir, &FlexDevice).unwrap();
    let first = n_ctx / 2;
    let examples: Vec<burnish_stages::text::Example> = ids
        .chunks_exact(n_ctx)
        .map(|c| burnish_stages::text::Example {
            ids: c.to_vec(),
            targets: (0..n_ctx).map(|i| i > first).collect(),
            doc_starts: Vec::new(),
        })
        .collect();
    burnish_stages::train::batch::score(&loaded.model, &examples, 4, 0).perplexity()
}

#[test]
fn llama_cpp_tokenizes_loads_and_scores_every_export_like_burnish() {
    let Some(tools) = llama_cpp_tools() else {
        common::skip(
            "BURNISH_REQUIRE_LLAMA_CPP",
            "BURNISH_LLAMA_CPP does not name a directory with llama.cpp's llama-perplexity and llama-tokenize",
        );
        return;
    };
    let text_path = {
        let tmp = std::env::temp_dir().join(format!("burnish-ppl-{}.txt", std::process::id()));
        let data = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data/alpaca.jsonl"),
        )
        .unwrap();
        let outputs: Vec<String> = data
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["output"].as_str().unwrap().to_owned()
            })
            .collect();
        std::fs::write(&tmp, outputs.join("\n")).unwrap();
        tmp
    };
    let text = std::fs::read_to_string(&text_path).unwrap();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let tok = burnish_stages::text::TextTokenizer::from_dir(&dir).unwrap();
        let ids = tok.encode(&text).unwrap();
        let ours = burnish_perplexity_like_llama_cpp(&dir, &ids, 64);
        let mut f32_ppl = 0.0;
        for quant in Quant::ALL {
            let (_ran, path, bytes) = export(&dir, ArtifactKind::Model, quant);
            if quant == Quant::F32 {
                // llama.cpp's tokenizer, from the file's vocabulary, gives burnish's ids.
                let out = std::process::Command::new(tools.join("llama-tokenize"))
                    .args([
                        "-m",
                        path.to_str().unwrap(),
                        "-f",
                        text_path.to_str().unwrap(),
                    ])
                    .args(["--ids", "--log-disable"])
                    .output()
                    .unwrap();
                let printed = String::from_utf8_lossy(&out.stdout);
                let theirs: Vec<u32> = printed
                    .trim()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .split(", ")
                    .map(|s| s.parse().unwrap())
                    .collect();
                assert_eq!(theirs, ids, "{name}: llama.cpp tokenization");
            }
            let ppl = llama_cpp_perplexity(&tools, &path, &text_path, ids.len() / 64);
            // burnish on the file's own (dequantized) numbers.
            let deq = dequantized_model_dir(&bytes, &dir, name == "tiny-llama");
            let ours_q = burnish_perplexity_like_llama_cpp(deq.path(), &ids, 64);
            let rel = (ppl - ours_q).abs() / ours_q;
            eprintln!(
                "{name} {quant}: llama.cpp PPL {ppl:.4}, burnish on the dequantized file {ours_q:.4} \
                 (relative {rel:.2e}); burnish f32 checkpoint {ours:.4}"
            );
            if quant == Quant::F32 {
                f32_ppl = ppl;
                // PPL is printed with 4 decimals.
                assert!((ppl - ours).abs() <= 1.5e-4, "{name}: {ppl} vs {ours}");
            } else {
                // llama.cpp quantizes activations for quantized matmuls; the rest must agree.
                assert!(rel <= 5e-3, "{name} {quant}: {ppl} vs {ours_q}");
                assert!(
                    (ppl / f32_ppl - 1.0).abs() <= 0.05,
                    "{name} {quant}: {ppl} vs f32 {f32_ppl}"
                );
            }
        }
    }
    let _ = std::fs::remove_file(&text_path);
}

#[test]
fn llama_quantize_on_the_f32_export_gives_the_same_tensors_byte_for_byte() {
    let Some(tools) = llama_cpp_tools().filter(|t| t.join("llama-quantize").is_file()) else {
        common::skip(
            "BURNISH_REQUIRE_LLAMA_CPP",
            "BURNISH_LLAMA_CPP does not name a directory with llama.cpp's llama-quantize",
        );
        return;
    };
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let (_f32_ran, f32_path, _) = export(&dir, ArtifactKind::Model, Quant::F32);
        for (quant, ftype, pure) in [
            (Quant::Q8_0, "Q8_0", false),
            (Quant::Q4_0, "Q4_0", false),
            (Quant::Q6K, "Q6_K", false),
            (Quant::Q4KM, "Q4_K_M", false),
            (Quant::Q4K, "Q4_K_S", true),
        ] {
            let tmp = TempDir::new().unwrap();
            let reference = tmp.path().join("ref.gguf");
            let mut cmd = std::process::Command::new(tools.join("llama-quantize"));
            if pure {
                cmd.arg("--pure");
            }
            let out = cmd
                .args([
                    f32_path.to_str().unwrap(),
                    reference.to_str().unwrap(),
                    ftype,
                    "2",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let ref_bytes = std::fs::read(&reference).unwrap();
            let theirs = GgufFile::parse(&ref_bytes).unwrap();
            let (_ran, _path, bytes) = export(&dir, ArtifactKind::Model, quant);
            let ours = GgufFile::parse(&bytes).unwrap();
            assert_eq!(u32_key(&theirs, "general.file_type"), quant.file_type());
            assert_eq!(theirs.tensors.len(), ours.tensors.len());
            let mut identical = 0;
            for t in &theirs.tensors {
                let o = ours.tensor(&t.name).unwrap();
                let tied_embd = name == "tiny-qwen2" && t.name == "token_embd.weight";
                if tied_embd && o.ty != t.ty {
                    // llama-quantize sees output.weight in the file and treats the embedding as
                    // untied; burnish gives it the output's rule, which is what llama-quantize
                    // gives it on the converter's tied file (no output.weight).
                    assert_eq!(
                        o.ty,
                        ours.tensor("output.weight").unwrap().ty,
                        "{name} {quant}"
                    );
                    continue;
                }
                assert_eq!(o.ty, t.ty, "{name} {quant} {}", t.name);
                assert!(
                    ours.tensor_bytes(&bytes, o).unwrap()
                        == theirs.tensor_bytes(&ref_bytes, t).unwrap(),
                    "{name} {quant} {}: bytes differ from llama-quantize's",
                    t.name
                );
                identical += 1;
            }
            eprintln!(
                "{name} {quant}: {identical}/{} tensors byte-identical to llama-quantize {ftype}{}",
                theirs.tensors.len(),
                if pure { " --pure" } else { "" }
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Llama with `attention_bias: true`: biases on q, k, v and o; q/k biases permuted with their rows.

/// tiny-llama with `attention_bias: true` and non-zero biases on all four projections.
fn biased_llama_dir() -> TempDir {
    let src = fixture("tiny-llama");
    let tmp = TempDir::new().unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["attention_bias"] = true.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let hf = TensorFiles::open(&[src.join("model.safetensors")]).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = hf
        .names()
        .map(|n| {
            let shape = hf.shape(n).unwrap();
            (n.to_owned(), shape.clone(), hf.read_f32(n, &shape).unwrap())
        })
        .collect();
    for layer in 0..2 {
        for (proj, n) in [
            ("q_proj", 64),
            ("k_proj", 32),
            ("v_proj", 32),
            ("o_proj", 64),
        ] {
            let b: Vec<f32> = (0..n)
                .map(|i| (((i * 31 + layer * 7) % 23) as f32 - 11.0) * 0.01)
                .collect();
            tensors.push((
                format!("model.layers.{layer}.self_attn.{proj}.bias"),
                vec![n],
                b,
            ));
        }
    }
    model::weights::write_safetensors(&tmp.path().join("model.safetensors"), &tensors, None)
        .unwrap();
    tmp
}

#[test]
fn llama_attention_biases_are_written_and_q_k_biases_permuted_with_their_rows() {
    let dir = biased_llama_dir();
    let (_ran, path, bytes) = export(dir.path(), ArtifactKind::Model, Quant::F32);
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(str_key(&f, "general.architecture"), "llama");
    assert_eq!(f.tensors.len(), 21 + 2 * 4);
    let hf = TensorFiles::open(&[dir.path().join("model.safetensors")]).unwrap();
    let x: Vec<f32> = (0..64)
        .map(|i| ((i * 7919 % 113) as f32 / 113.0) - 0.5)
        .collect();
    let mut max_score = 0f32;
    for layer in 0..2 {
        let read = |n: &str, s: &[usize]| {
            hf.read_f32(&format!("model.layers.{layer}.self_attn.{n}"), s)
                .unwrap()
        };
        let gg = |n: &str| f.tensor_f32(&bytes, &format!("blk.{layer}.{n}")).unwrap();
        let add = |mut v: Vec<f32>, b: Vec<f32>| {
            v.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            v
        };
        let q_hf = add(
            matvec(&read("q_proj.weight", &[64, 64]), &x),
            read("q_proj.bias", &[64]),
        );
        let k_hf = add(
            matvec(&read("k_proj.weight", &[32, 64]), &x),
            read("k_proj.bias", &[32]),
        );
        let q_gg = add(matvec(&gg("attn_q.weight"), &x), gg("attn_q.bias"));
        let k_gg = add(matvec(&gg("attn_k.weight"), &x), gg("attn_k.bias"));
        assert_eq!(
            gg("attn_v.bias"),
            read("v_proj.bias", &[32]),
            "v bias as is"
        );
        assert_eq!(
            gg("attn_output.bias"),
            read("o_proj.bias", &[64]),
            "o bias as is"
        );
        for h in 0..4 {
            let kv = h / 2;
            let s_hf = dot(
                &rope_hf(&q_hf[h * 16..(h + 1) * 16], 9.0, 1e4),
                &rope_hf(&k_hf[kv * 16..(kv + 1) * 16], 4.0, 1e4),
            );
            let s_gg = dot(
                &rope_ggml_pairs(&q_gg[h * 16..(h + 1) * 16], 9.0, 1e4),
                &rope_ggml_pairs(&k_gg[kv * 16..(kv + 1) * 16], 4.0, 1e4),
            );
            max_score = max_score.max((s_hf - s_gg).abs());
        }
    }
    assert!(max_score < 1e-5, "{max_score:e}");

    // llama.cpp, when at hand, scores the biased model as burnish does.
    if let Some(tools) = llama_cpp_tools() {
        let text = std::env::temp_dir().join(format!("burnish-bias-{}.txt", std::process::id()));
        let data = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data/alpaca.jsonl"),
        )
        .unwrap();
        let outputs: Vec<String> = data
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["output"].as_str().unwrap().to_owned()
            })
            .collect();
        let joined = outputs.join("\n");
        std::fs::write(&text, &joined).unwrap();
        let tok = burnish_stages::text::TextTokenizer::from_dir(dir.path()).unwrap();
        let ids = tok.encode(&joined).unwrap();
        let ours = burnish_perplexity_like_llama_cpp(dir.path(), &ids, 64);
        let theirs = llama_cpp_perplexity(&tools, &path, &text, ids.len() / 64);
        let _ = std::fs::remove_file(&text);
        eprintln!("biased llama f32: llama.cpp PPL {theirs:.4}, burnish {ours:.4}");
        assert!((theirs - ours).abs() <= 1.5e-4, "{theirs} vs {ours}");
    }
}

#[test]
fn llama_cpp_tokenizes_the_byte_fallback_vocab_like_burnish() {
    let Some(tools) = llama_cpp_tools() else {
        common::skip(
            "BURNISH_REQUIRE_LLAMA_CPP",
            "BURNISH_LLAMA_CPP does not name a directory with llama.cpp's llama-tokenize",
        );
        return;
    };
    let dir = spm_model_dir();
    let (_ran, path, _bytes) = export(dir.path(), ArtifactKind::Model, Quant::F32);
    let tok = burnish_stages::text::TextTokenizer::from_dir(dir.path()).unwrap();
    for text in ["the thin", "a thing in the inn", "Zebra ünïcode 42"] {
        let out = std::process::Command::new(tools.join("llama-tokenize"))
            .args(["-m", path.to_str().unwrap(), "-p", text])
            .args(["--ids", "--log-disable", "--no-bos"])
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        let theirs: Vec<u32> = printed
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(", ")
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(theirs, tok.encode(text).unwrap(), "{text:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// llama-quantize as the oracle for whole-model q4_k / q6_k / q4_k_m files

/// A 1-layer Llama whose rows divide into 256-value super-blocks (hidden 256, ffn 512, the
/// fixture's 512-token vocabulary), so that Q4_K and Q6_K blocks are really used, with
/// deterministic weights (`model::init`, seed 7).
fn kquant_model() -> TempDir {
    let src = fixture("tiny-llama");
    let cfg = model::ModelConfig {
        arch: model::Arch::Llama,
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 1,
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 64,
        max_positions: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
    };
    let net = model::init::<Flex>(&cfg, 7, &FlexDevice);
    let dir = TempDir::new().unwrap();
    model::save_model_dir(
        &net,
        &cfg.to_hf_json(None, Some(2), Some(0)),
        &src,
        dir.path(),
    )
    .unwrap();
    dir
}

/// Tensor name → (ggml type, blake3 of its bytes).
fn tensor_digests(bytes: &[u8]) -> BTreeMap<String, (String, String)> {
    let f = GgufFile::parse(bytes).unwrap();
    f.tensors
        .iter()
        .map(|t| {
            let data = f.tensor_bytes(bytes, t).unwrap();
            (
                t.name.clone(),
                (
                    t.ty.name().to_owned(),
                    blake3::hash(data).to_hex().to_string(),
                ),
            )
        })
        .collect()
}

const QUANTIZE_GOLDEN: &str = "../fixtures/gguf/llama_quantize_golden.json";

/// burnish's q4_k, q6_k and q4_k_m exports of the k-quant model have exactly the tensor types
/// and bytes llama.cpp's `llama-quantize` produces from burnish's f32 export of it
/// (`--pure … Q4_K_S`, `--pure … Q6_K`, `… Q4_K_M`). The golden digests are regenerated by
/// `fixtures/gguf/make_quantize_golden.sh`, which builds llama.cpp from the llama-cpp-python
/// source package and reruns this test with `BURNISH_LLAMA_QUANTIZE` set.
#[test]
fn kquant_exports_equal_llama_quantize_output() {
    let dir = kquant_model();
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(QUANTIZE_GOLDEN);
    let cases = [
        (Quant::Q4K, "Q4_K_S", true),
        (Quant::Q6K, "Q6_K", true),
        (Quant::Q4KM, "Q4_K_M", false),
    ];
    if let Some(tool) = std::env::var_os("BURNISH_LLAMA_QUANTIZE") {
        // Bless: quantize burnish's f32 export with llama-quantize and record what it wrote.
        let (_ran, f32_path, _) = export(dir.path(), ArtifactKind::Model, Quant::F32);
        let tmp = TempDir::new().unwrap();
        let mut golden = BTreeMap::new();
        for (quant, ftype, pure) in cases {
            let out = tmp.path().join(format!("{ftype}.gguf"));
            let mut cmd = std::process::Command::new(&tool);
            if pure {
                cmd.arg("--pure");
            }
            let status = cmd.arg(&f32_path).arg(&out).arg(ftype).status().unwrap();
            assert!(status.success(), "llama-quantize {ftype} failed");
            golden.insert(
                quant.name().to_owned(),
                tensor_digests(&std::fs::read(&out).unwrap()),
            );
        }
        std::fs::write(
            &golden_path,
            serde_json::to_string_pretty(&golden).unwrap() + "\n",
        )
        .unwrap();
    }
    let golden: BTreeMap<String, BTreeMap<String, (String, String)>> =
        serde_json::from_str(&std::fs::read_to_string(&golden_path).unwrap()).unwrap();
    for (quant, _, _) in cases {
        let (_ran, _, bytes) = export(dir.path(), ArtifactKind::Model, quant);
        let ours = tensor_digests(&bytes);
        let theirs = &golden[quant.name()];
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{}: tensor names",
            quant.name()
        );
        for (name, (ty, digest)) in theirs {
            let (our_ty, our_digest) = &ours[name];
            assert_eq!(our_ty, ty, "{} {name}: ggml type", quant.name());
            assert_eq!(
                our_digest,
                digest,
                "{} {name}: bytes differ from llama-quantize",
                quant.name()
            );
        }
        // The point of this model: real k-quant blocks, not fallbacks.
        let kinds: Vec<&str> = theirs.values().map(|(t, _)| t.as_str()).collect();
        assert!(
            kinds.iter().any(|t| t.ends_with("_K")),
            "{}: {kinds:?}",
            quant.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming: `export.gguf` writes the file tensor by tensor from the checkpoint on disk.

/// The file the in-memory conversion gives for the Model or Adapter artifact in `dir`: the
/// artifact loaded (an adapter on its base as it trained), merged, converted by `to_gguf`, with
/// the name and vocabulary the stage uses.
fn in_memory_export(dir: &Path, quant: Quant) -> Vec<u8> {
    let ck = Checkpoint::open(dir).unwrap();
    let (vocab, _) = gguf_vocab(&ck, None, TemplateChoice::default()).unwrap();
    let loaded = model::load::<B>(dir, &FlexDevice).unwrap();
    let net = lora::merge(loaded.model);
    let opts = GgufOptions {
        quant,
        name: "pipe-exp".into(),
    };
    to_gguf(&net, &vocab, &opts)
        .unwrap()
        .writer
        .to_bytes()
        .unwrap()
}

/// tiny-llama with tied embeddings (no `lm_head`), stored in three dtypes: the embedding in
/// bf16, the projections in f16, the norms in f32.
fn mixed_dtype_tied_llama() -> TempDir {
    use safetensors::Dtype;
    let src = fixture("tiny-llama");
    let tmp = TempDir::new().unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let hf = TensorFiles::open(&[src.join("model.safetensors")]).unwrap();
    let mut stored = Vec::new();
    for n in hf.names().filter(|n| *n != "lm_head.weight") {
        let shape = hf.shape(n).unwrap();
        let v = hf.read_f32(n, &shape).unwrap();
        let (dtype, bytes): (Dtype, Vec<u8>) = if n.contains("embed") {
            let b = v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes());
            (Dtype::BF16, b.collect())
        } else if n.ends_with("proj.weight") {
            let b = v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes());
            (Dtype::F16, b.collect())
        } else {
            (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        stored.push((n.to_owned(), dtype, shape, bytes));
    }
    let views: Vec<_> = stored
        .iter()
        .map(|(n, dtype, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap();
            (n.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), bytes).unwrap();
    tmp
}

/// The stage's streamed file — and the same written in bands of 100 values, a row (or a head of
/// Q or K) at a time — equals the in-memory conversion of the loaded model byte for byte, at
/// every quant: both fixtures, attention biases (permuted for Llama), a tied bf16/f16/f32
/// checkpoint, a LoRA adapter and a QLoRA adapter (merged per tensor on its NF4 base).
#[test]
fn streamed_export_equals_the_in_memory_conversion_byte_for_byte() {
    let ids = reference_ids(&fixture("tiny-llama"));
    let (adapter, _) = adapter_artifact(&ids);
    let (qlora, _) = adapter_artifact(&ids);
    lora::write_base_quant(qlora.path(), Some(BaseQuant::Nf4)).unwrap();
    let biased = biased_llama_dir();
    let mixed = mixed_dtype_tied_llama();
    let cases = [
        (fixture("tiny-llama"), ArtifactKind::Model),
        (fixture("tiny-qwen2"), ArtifactKind::Model),
        (biased.path().to_path_buf(), ArtifactKind::Model),
        (mixed.path().to_path_buf(), ArtifactKind::Model),
        (adapter.path().to_path_buf(), ArtifactKind::Adapter),
        (qlora.path().to_path_buf(), ArtifactKind::Adapter),
    ];
    let tmp = TempDir::new().unwrap();
    for (i, (dir, kind)) in cases.iter().enumerate() {
        let ck = Checkpoint::open(dir).unwrap();
        let (vocab, _) = gguf_vocab(&ck, None, TemplateChoice::default()).unwrap();
        for quant in Quant::ALL {
            let (ran, _, streamed) = export(dir, *kind, quant);
            let expected = in_memory_export(dir, quant);
            assert!(streamed == expected, "case {i} ({kind:?}) at {quant}");
            let f = GgufFile::parse(&streamed).unwrap();
            assert_eq!(ran.metrics["tensors"], f.tensors.len(), "case {i}");

            let opts = GgufOptions {
                quant,
                name: "pipe-exp".into(),
            };
            let path = tmp.path().join(format!("banded-{i}-{quant}.gguf"));
            let mut reports = 0;
            let written = write_gguf_in_bands(&ck, &vocab, &opts, &path, 100, &mut |p| {
                reports += 1;
                assert_eq!((p.done, p.total), (reports, f.tensors.len()));
                Ok(())
            })
            .unwrap();
            assert_eq!(reports, f.tensors.len());
            assert!(
                std::fs::read(&path).unwrap() == expected,
                "case {i} ({kind:?}) at {quant} in bands"
            );
            assert_eq!(written.params, ck.num_params());
        }
    }
    // The merged model's parameter count, as the in-memory export reported it.
    let loaded = model::load::<B>(qlora.path(), &FlexDevice).unwrap();
    let ck = Checkpoint::open(qlora.path()).unwrap();
    assert_eq!(ck.num_params(), lora::merge(loaded.model).num_params());
}

/// `merge` and `export.hf` write a model tensor by tensor (`save_checkpoint_dir`): the files are
/// those the loaded, merged model gives (`save_model_dir`) byte for byte — both fixtures (one
/// tied), a tied bf16/f16/f32 checkpoint, a LoRA adapter and a QLoRA adapter merged on its NF4
/// base — and the adapter parameter count is the loaded model's.
#[test]
fn streamed_model_dir_equals_the_loaded_models_byte_for_byte() {
    let ids = reference_ids(&fixture("tiny-llama"));
    let (adapter, _) = adapter_artifact(&ids);
    let (qlora, _) = adapter_artifact(&ids);
    lora::write_base_quant(qlora.path(), Some(BaseQuant::Nf4)).unwrap();
    let mixed = mixed_dtype_tied_llama();
    let cases = [
        fixture("tiny-llama"),
        fixture("tiny-qwen2"),
        mixed.path().to_path_buf(),
        adapter.path().to_path_buf(),
        qlora.path().to_path_buf(),
    ];
    let tmp = TempDir::new().unwrap();
    for (i, dir) in cases.iter().enumerate() {
        let loaded = model::load::<B>(dir, &FlexDevice).unwrap();
        let adapter_params = lora::adapter_param_count(&loaded.model);
        let merged = lora::merge(loaded.model);
        let (want, got) = (
            tmp.path().join(format!("want{i}")),
            tmp.path().join(format!("got{i}")),
        );
        model::save_model_dir(&merged, &loaded.raw_config, &loaded.model_dir, &want).unwrap();
        let ck = Checkpoint::open(dir).unwrap();
        model::save_checkpoint_dir(&ck, &got, model::shard::DEFAULT_SHARD_BYTES).unwrap();
        for name in ["model.safetensors", "config.json", "tokenizer.json"] {
            let (a, b) = (
                std::fs::read(want.join(name)).unwrap(),
                std::fs::read(got.join(name)).unwrap(),
            );
            assert!(a == b, "case {i}: {name} differs");
        }
        assert_eq!(ck.adapter_params(), adapter_params, "case {i}");
        assert_eq!(ck.num_params(), merged.num_params(), "case {i}");
        // Nothing but the files themselves is left behind.
        let mut names: Vec<String> = std::fs::read_dir(&got)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
    }
}

/// Bad checkpoints fail before anything is written, naming the file and the tensor: a
/// truncated safetensors file, a tensor whose shape disagrees with config.json, and a tensor in
/// a dtype burnish does not read.
#[test]
fn a_truncated_or_misshapen_checkpoint_fails_naming_file_and_tensor() {
    let src = fixture("tiny-llama");
    let copy = |edit: &dyn Fn(&Path)| {
        let tmp = TempDir::new().unwrap();
        model::link_model_dir(&src, tmp.path()).unwrap();
        edit(tmp.path());
        tmp
    };
    let code = |e: &dyn miette::Diagnostic| e.code().map(|c| c.to_string()).unwrap_or_default();

    let truncated = copy(&|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    });
    let e = Checkpoint::open(truncated.path()).err().unwrap();
    let msg = e.to_string();
    assert_eq!(code(&e), "burnish::model::safetensors", "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("the file holds"), "{msg}");

    let header_only = copy(&|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &bytes[..12]).unwrap();
    });
    let e = Checkpoint::open(header_only.path()).err().unwrap();
    assert_eq!(code(&e), "burnish::model::safetensors", "{e}");
    assert!(e.to_string().contains("the header claims"), "{e}");

    let misshapen = copy(&|d| {
        let p = d.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg["intermediate_size"] = 160.into();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, cfg.to_string()).unwrap();
    });
    let e = Checkpoint::open(misshapen.path()).err().unwrap();
    let msg = e.to_string();
    assert_eq!(code(&e), "burnish::model::shape", "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.layers.0.mlp.gate_proj.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("[176, 64]") && msg.contains("[160, 64]"),
        "{msg}"
    );

    // The stage reports the same error and leaves no file behind.
    let p: GgufParams = serde_json::from_value(serde_json::json!({"model": "m"})).unwrap();
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut cx = RunContext::standalone("exp", tmp.path(), 0)
        .with_pipeline("pipe")
        .with_input("model", artifact(truncated.path(), ArtifactKind::Model))
        .with_output("main", out.clone());
    let e = GgufStage::run(&p, &mut cx).err().unwrap();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

/// Past `max_shard_size` a model directory is split as transformers splits it: the 128 KiB
/// embedding alone (over the 100 kB limit), the rest filling shards in parameter order, each
/// `model-0000k-of-0000n.safetensors`, with an index mapping every tensor; burnish loads the
/// directory back to the same model.
#[test]
fn a_model_past_the_shard_size_is_split_with_an_index_and_loads_back() {
    let dir = fixture("tiny-llama");
    let ck = Checkpoint::open(&dir).unwrap();
    let tmp = TempDir::new().unwrap();
    model::save_checkpoint_dir(&ck, tmp.path(), 100_000).unwrap();
    assert!(!tmp.path().join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let sizes: Vec<u64> = ck.tensors().iter().map(|t| t.len() as u64 * 4).collect();
    assert_eq!(index["metadata"]["total_size"], sizes.iter().sum::<u64>());
    assert_eq!(index["metadata"]["total_parameters"], ck.num_params());
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), ck.tensors().len());
    let shards = model::shard::split(&sizes, 100_000);
    assert!(shards.len() > 2, "{shards:?}");
    assert_eq!(shards[0], vec![0], "the embedding, over the limit, alone");
    for (k, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards.len());
        assert!(tmp.path().join(&file).is_file(), "{file}");
        for &i in members {
            assert_eq!(map[&ck.tensors()[i].name], file.as_str());
        }
        if members.len() > 1 {
            assert!(members.iter().map(|&i| sizes[i]).sum::<u64>() <= 100_000);
        }
    }
    // Loaded back: the same weights.
    let a = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap().model;
    let b = model::load_model_dir::<B>(tmp.path(), &FlexDevice)
        .unwrap()
        .model;
    let ids = reference_ids(&dir);
    assert_eq!(
        tensor_f32(a.forward(ids_tensor(&ids))),
        tensor_f32(b.forward(ids_tensor(&ids)))
    );
}

/// The shards are those huggingface_hub's `split_state_dict_into_shards_factory` (what
/// transformers' `save_pretrained` calls) makes of the same sizes, when it is importable
/// (`BURNISH_PYTHON`; `BURNISH_REQUIRE_PY=1` turns its absence into a failure).
#[test]
fn shards_match_huggingface_hubs_splitter() {
    let cases: [(&[u64], u64); 4] = [
        (&[6, 6, 2, 6, 2, 2], 10),
        (&[3, 12, 3, 9, 1], 10),
        (
            &[
                131072, 16384, 8192, 8192, 16384, 135168, 135168, 135168, 256,
            ],
            100_000,
        ),
        (&[5, 5, 5], 100),
    ];
    let script = r#"
import json, sys
try:
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
except ImportError:
    print("NO_HUB"); sys.exit(0)
for sizes, limit in json.loads(sys.argv[1]):
    sd = {f"t{i:03d}": s for i, s in enumerate(sizes)}
    split = split_state_dict_into_shards_factory(
        sd, get_storage_size=lambda s: s, filename_pattern="model{suffix}.safetensors",
        max_shard_size=limit)
    print(json.dumps([[int(k[1:]) for k in keys] for keys in split.filename_to_tensors.values()]))
"#;
    let arg = serde_json::to_string(&cases).unwrap();
    let Some(stdout) = common::run_python(script, &arg, "the splitter") else {
        return;
    };
    if stdout.trim() == "NO_HUB" {
        common::skip("BURNISH_REQUIRE_PY", "huggingface_hub is not importable");
        return;
    }
    let theirs: Vec<Vec<Vec<usize>>> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for ((sizes, limit), want) in cases.iter().zip(&theirs) {
        assert_eq!(
            &model::shard::split(sizes, *limit),
            want,
            "{sizes:?} under {limit}"
        );
    }
    assert_eq!(theirs.len(), cases.len());
}
