//! Export through the binary: a pipeline with `export.gguf` (a matrix over quants) and
//! `export.hf` on the fixture Llama, the file names and metrics in the lock file, names entering
//! the fingerprint (renaming the pipeline re-exports, nothing else), and `burnish inspect` on the
//! result and on a broken file.

mod common;

use std::path::Path;

use common::{burnish, find, fixtures, run_ok};

fn manifest(pipeline: &str) -> String {
    format!(
        "pipeline: {pipeline}
backend: cpu
stages:
  base: {{kind: model, from: {}}}
  gguf:
    kind: export.gguf
    model: base
    matrix: {{quant: [q8_0, q4_k_m]}}
  hf: {{kind: export.hf, model: base}}
",
        fixtures().join("models/tiny-llama").display()
    )
}

fn plan_states(m: &Path, cwd: &Path) -> serde_json::Value {
    let out = run_ok(&["plan", m.to_str().unwrap(), "--json"], cwd);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut states = serde_json::Map::new();
    for s in v["stages"].as_array().unwrap() {
        states.insert(s["stage"].as_str().unwrap().to_owned(), s["state"].clone());
    }
    serde_json::Value::Object(states)
}

#[test]
fn pipeline_exports_gguf_per_quant_and_hf_and_inspect_reads_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("exp.yaml");
    std::fs::write(&m, manifest("export-test")).unwrap();
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());

    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("exp.lock")).unwrap())
            .unwrap();
    let cells: Vec<&String> = lock["stages"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("gguf"))
        .collect();
    assert_eq!(cells.len(), 2, "{cells:?}");
    let mut files = Vec::new();
    for cell in &cells {
        let metrics = &lock["stages"][cell.as_str()]["metrics"];
        let quant = metrics["quant"].as_str().unwrap().to_owned();
        let file = metrics["file"].as_str().unwrap().to_owned();
        assert!(
            file.starts_with("export-test-gguf_quant_")
                && file.ends_with(&format!("-{quant}.gguf")),
            "{file}"
        );
        let found = find(&tmp.path().join(".burnish"), &file);
        assert_eq!(found.len(), 1, "{file}: {found:?}");
        let bytes = std::fs::metadata(&found[0]).unwrap().len();
        assert_eq!(metrics["file_bytes"], bytes);
        assert!(found[0].with_file_name("Modelfile").is_file());
        files.push((quant, found[0].clone()));
    }
    assert_eq!(lock["stages"]["hf"]["metrics"]["format"], "model");
    assert_eq!(
        find(&tmp.path().join(".burnish"), "model.safetensors").len(),
        2,
        "base + hf"
    );

    // inspect: header, typed keys, the tensor table.
    let (_, q4km) = files.iter().find(|(q, _)| q == "q4_k_m").unwrap();
    let out = run_ok(&["inspect", q4km.to_str().unwrap()], tmp.path());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("GGUF v3, alignment 32, "), "{text}");
    assert!(text.contains(", 21 tensors, "), "{text}");
    for line in [
        r#"general.architecture                  string  "llama""#,
        "general.file_type                     u32     15",
        "llama.attention.layer_norm_rms_epsilon  f32     1e-5",
        r#"tokenizer.ggml.tokens                 array   [string × 512] "<|endoftext|>", "<|im_start|>", "<|im_end|>","#,
        "tokenizer.ggml.token_type             array   [i32 × 512] 3, 3, 3, 1, 1, 1, …",
    ] {
        let want: Vec<&str> = line.split_whitespace().collect();
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().starts_with(&want)),
            "no line like `{line}` in\n{text}"
        );
    }
    let header = text
        .lines()
        .find(|l| l.trim_start().starts_with("name "))
        .unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["name", "shape", "type", "offset", "bytes"]
    );
    // token_embd [512, 64] Q5_0 (Q4_K falls back on rows of 64): 512 × 2 blocks × 22 bytes.
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("token_embd.weight"))
        .unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["token_embd.weight", "512", "×", "64", "Q5_0", "0", "22528"]
    );
    assert!(text.contains("blk.1.ffn_down.weight"), "{text}");

    // A rerun is cached; renaming the pipeline changes the exports' file names, so only they
    // run again.
    let states = plan_states(&m, tmp.path());
    assert!(
        states.as_object().unwrap().values().all(|s| s == "cached"),
        "{states}"
    );
    std::fs::write(&m, manifest("renamed")).unwrap();
    let states = plan_states(&m, tmp.path());
    assert_eq!(states["base"], "cached", "{states}");
    assert_eq!(states["hf"], "cached", "{states}");
    for (stage, state) in states.as_object().unwrap() {
        if stage.starts_with("gguf") {
            assert_ne!(state, "cached", "{stage}: {states}");
        }
    }
}

#[test]
fn inspect_reports_a_broken_file_with_its_code() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00\xff\xff").unwrap();
    let out = burnish()
        .args(["inspect", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("burnish::gguf::"), "{err}");
    assert!(err.contains("bad.gguf"), "{err}");

    let p = tmp.path().join("not.gguf");
    std::fs::write(&p, b"PK\x03\x04 not a gguf file at all").unwrap();
    let out = burnish()
        .args(["inspect", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("burnish::gguf::magic"), "{err}");
}

/// Peak resident memory, in kB, of `burnish run` on `m` (only the stages not yet cached run),
/// as the binary reports it with `BURNISH_REPORT_PEAK_RSS`.
fn peak_rss_kb(m: &Path, cwd: &Path) -> u64 {
    peak_rss_kb_until(m, cwd, None)
}

/// [`peak_rss_kb`] of `burnish run`, up to `until` when given.
fn peak_rss_kb_until(m: &Path, cwd: &Path, until: Option<&str>) -> u64 {
    let mut cmd = burnish();
    cmd.args(["run", m.to_str().unwrap(), "-q"]);
    if let Some(stage) = until {
        cmd.args(["--until", stage]);
    }
    let out = cmd
        .env("BURNISH_REPORT_PEAK_RSS", "1")
        .current_dir(cwd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    err.lines()
        .find_map(|l| l.strip_prefix("peak RSS: "))
        .and_then(|v| v.strip_suffix(" kB"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS line in {err}"))
}

/// The fixture Llama's shape (hidden 64, 2 layers, 4 heads / 2 kv heads, MLP 176) with `vocab`
/// tokens and tied embeddings, random weights, as a model directory in `dir` (f32).
fn llama_with_vocab(dir: &Path, vocab: usize) {
    use burn::backend::Flex;
    use burn::backend::flex::FlexDevice;
    use burnish_stages::model::{self, Arch, ModelConfig};
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 176,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        max_positions: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
    };
    let net = model::init::<Flex>(&cfg, 3, &FlexDevice);
    let raw = cfg.to_hf_json(Some(0), Some(2), Some(0));
    let tokenizer = fixtures().join("models/tiny-llama");
    model::save_model_dir(&net, &raw, &tokenizer, dir).unwrap();
}

/// The vocabulary that makes the test model's embedding (tied, so also the output head) the
/// largest tensor by far: 262144 × 64 f32 = 64 MiB.
const BIG_VOCAB: usize = 262_144;
const LARGEST_KB: u64 = (BIG_VOCAB * 64 * 4 / 1024) as u64;

/// Peak RSS (kB) of the model stage alone, then of the rest of a pipeline whose other stages are
/// `stages` (YAML, on `base`), for the 512-token model and the [`BIG_VOCAB`] one; and what each
/// costs beyond the small one. `check` looks at each run's cache.
fn peaks_beyond_the_small_model(stages: &str, check: impl Fn(&Path)) -> (u64, u64) {
    let mut peaks = Vec::new();
    for vocab in [512, BIG_VOCAB] {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        llama_with_vocab(&model, vocab);
        let m = tmp.path().join("mem.yaml");
        let manifest = format!(
            "pipeline: mem\nbackend: cpu\nstages:\n  base: {{kind: model, from: {}}}\n{stages}",
            model.display()
        );
        std::fs::write(&m, manifest).unwrap();
        let base = peak_rss_kb_until(&m, tmp.path(), Some("base"));
        let rest = peak_rss_kb(&m, tmp.path());
        eprintln!("vocab {vocab}: peak RSS {base} kB (model stage), {rest} kB (the rest)");
        check(&tmp.path().join(".burnish"));
        peaks.push((base, rest));
    }
    (
        peaks[1].0.saturating_sub(peaks[0].0),
        peaks[1].1.saturating_sub(peaks[0].1),
    )
}

/// The export's memory is bounded by a band of rows, not the model: exporting a model whose
/// embedding is 64 MiB at f32 and q4_k_m costs less than three quarters of that tensor in peak
/// resident memory beyond what exporting the 512-token fixture costs (the binary, the
/// tokenizer). What it does cost is a band of rows and its quantized bytes, and the metadata of
/// 262144 tokens (about half the tensor in all). Converting the loaded model in memory held the
/// checkpoint's bytes, the model, a copy of the embedding and every quantized tensor at once:
/// five times the tensor at f32. The model stage checks the checkpoint without reading its
/// weights: its own peak does not grow with the tensor.
#[test]
fn export_gguf_peak_memory_is_a_fraction_of_the_largest_tensor() {
    let stages =
        "  gguf:\n    kind: export.gguf\n    model: base\n    matrix: {quant: [f32, q4_k_m]}\n";
    let (base, extra) = peaks_beyond_the_small_model(stages, |cache| {
        assert_eq!(find(cache, "Modelfile").len(), 2);
    });
    eprintln!(
        "{base} kB (model stage) and {extra} kB (export) more for a largest tensor of {LARGEST_KB} kB"
    );
    assert!(
        extra < LARGEST_KB * 3 / 4,
        "exporting the large-vocabulary model took {extra} kB more at peak, the bound is three \
         quarters of its {LARGEST_KB} kB embedding"
    );
    assert!(
        base < LARGEST_KB / 2,
        "the model stage took {base} kB more at peak for the large vocabulary"
    );
}

/// `export.hf` writes a model one tensor at a time: its peak memory beyond the 512-token
/// fixture's is about the largest tensor twice (its f32 values and their bytes), not the model
/// and its serialized copy.
#[test]
fn export_hf_peak_memory_is_about_twice_the_largest_tensor() {
    let (_, extra) =
        peaks_beyond_the_small_model("  hf: {kind: export.hf, model: base}\n", |cache| {
            // The model stage's and the export's.
            assert_eq!(find(cache, "model.safetensors").len(), 2);
        });
    eprintln!("{extra} kB more for a largest tensor of {LARGEST_KB} kB");
    assert!(
        extra < LARGEST_KB * 5 / 2,
        "exporting the large-vocabulary model took {extra} kB more at peak, the bound is 2.5 \
         times its {LARGEST_KB} kB embedding"
    );
}

/// `max_shard_size` on `export.hf` and `merge`, as transformers reads it: a bad size is a
/// validation error at its line; "100KB" splits the fixture into shards with an index.
#[test]
fn export_hf_max_shard_size_splits_and_a_bad_size_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("shard.yaml");
    let manifest = |size: &str| {
        format!(
            "pipeline: shard\nbackend: cpu\nstages:\n  base: {{kind: model, from: {}}}\n  hf:\n    kind: export.hf\n    model: base\n    max_shard_size: {size}\n",
            fixtures().join("models/tiny-llama").display()
        )
    };
    std::fs::write(&m, manifest("5GiB")).unwrap();
    let out = burnish()
        .args(["validate", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`5GiB` has no unit KB, MB, GB or TB"), "{err}");
    assert!(err.contains("shard.yaml:8"), "{err}");

    std::fs::write(&m, manifest("100KB")).unwrap();
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let cache = tmp.path().join(".burnish");
    assert_eq!(find(&cache, "model.safetensors.index.json").len(), 1);
    // The model stage's single file; the export's are shards.
    assert_eq!(find(&cache, "model.safetensors").len(), 1);
}
