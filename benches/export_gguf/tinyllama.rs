//! `export_gguf -- --tinyllama`: the streaming export at real size against `llama-quantize`
//! (see the bench's doc). Each export runs in a fresh process — this bench run again with
//! [`CHILD`] — so that its wall time includes opening the checkpoint and its peak memory is its
//! own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burnish_stages::export::Quant;
use burnish_stages::export::llama::GgufOptions;
use burnish_stages::export::stages::gguf_vocab;
use burnish_stages::export::stream::write_gguf;
use burnish_stages::model::checkpoint::model_tensors;
use burnish_stages::model::{Arch, Checkpoint, ModelConfig};
use burnish_stages::probe::peak_rss_kb;
use burnish_stages::text::template::TemplateChoice;

/// The argument that makes this bench one export: `CHILD MODEL_DIR QUANT OUT`.
pub const CHILD: &str = "--export-child";

/// The quants compared, with `llama-quantize`'s names for them.
const QUANTS: [(Quant, &str); 2] = [(Quant::Q4KM, "Q4_K_M"), (Quant::Q8_0, "Q8_0")];

/// TinyLlama-1.1B's dimensions.
fn config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 32000,
        hidden_size: 2048,
        intermediate_size: 5632,
        num_layers: 22,
        num_heads: 32,
        num_kv_heads: 4,
        head_dim: 64,
        max_positions: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
    }
}

/// One export in this process; prints `{"peak_rss_kb": N}` on success.
pub fn child(args: &[String]) {
    let [dir, quant, out, ..] = args else {
        panic!("usage: {CHILD} MODEL_DIR QUANT OUT");
    };
    let quant = quant_named(quant);
    let ck = Checkpoint::open(Path::new(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
    let (vocab, _) = gguf_vocab(&ck, None, TemplateChoice::Auto).unwrap_or_else(|e| panic!("{e}"));
    let opts = GgufOptions {
        quant,
        name: "bench".into(),
    };
    write_gguf(&ck, &vocab, &opts, Path::new(out), &mut |_| Ok(()))
        .unwrap_or_else(|e| panic!("{quant}: {e}"));
    println!(
        "{}",
        serde_json::json!({ "peak_rss_kb": peak_rss_kb().unwrap_or(0) })
    );
}

fn quant_named(name: &str) -> Quant {
    Quant::ALL
        .into_iter()
        .find(|q| q.name() == name)
        .unwrap_or_else(|| panic!("no quant `{name}`"))
}

pub fn run(args: &[String]) {
    let rounds = flag(args, "--rounds").map_or(3, |r| r.parse().expect("--rounds N"));
    let tool = llama_quantize();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let root = std::env::var_os("BURNISH_BENCH_DIR").map_or_else(
        || std::env::temp_dir().join("burnish-bench-tinyllama"),
        PathBuf::from,
    );
    let model = root.join("model");
    let cfg = config();
    make_checkpoint(&model, &cfg);

    // llama-quantize's input: the bf16 GGUF of the same weights (burnish's bf16 export, whose
    // bytes are those of llama.cpp's converter: stages/tests/export.rs).
    let bf16 = root.join("bf16.gguf");
    let made = export(&model, Quant::Bf16, &bf16);
    eprintln!(
        "bf16 GGUF: {:.2} s, {} MB peak",
        made.wall.as_secs_f64(),
        made.peak_kb / 1000
    );

    let largest = model_tensors(&cfg)
        .iter()
        .map(|t| t.len())
        .max()
        .unwrap_or(0)
        * 4;
    let bound_kb = (2 * largest as u64 + 100_000_000) / 1000;
    let mut rows = Vec::new();
    for (quant, ggml_name) in QUANTS {
        let out = root.join(format!("out-{}.gguf", quant.name()));
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for round in 0..rounds {
            ours.push(export(&model, quant, &out));
            let size_ours = file_len(&out);
            let _ = std::fs::remove_file(&out);
            if let Some(tool) = &tool {
                theirs.push(llama(tool, &bf16, &out, ggml_name, threads));
                let size_theirs = file_len(&out);
                let _ = std::fs::remove_file(&out);
                if round == 0 {
                    eprintln!(
                        "{}: file bytes burnish {size_ours}, llama-quantize {size_theirs}",
                        quant.name()
                    );
                }
            }
        }
        rows.push((
            quant,
            summarize(&ours),
            (!theirs.is_empty()).then(|| summarize(&theirs)),
        ));
    }
    let _ = std::fs::remove_file(&bf16);

    println!(
        "TinyLlama-1.1B shape, bf16 checkpoint, {threads} threads, {rounds} rounds (median wall, largest peak RSS)"
    );
    println!("| quant | burnish | peak | llama-quantize | peak | speed ratio |");
    println!("|---|---|---|---|---|---|");
    for (quant, ours, theirs) in &rows {
        let (t_wall, t_peak, ratio) = match theirs {
            Some(t) => (
                format!("{:.2} s", t.wall.as_secs_f64()),
                format!("{} MB", t.peak_kb / 1000),
                format!("{:.2}×", t.wall.as_secs_f64() / ours.wall.as_secs_f64()),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {:.2} s | {} MB | {t_wall} | {t_peak} | {ratio} |",
            quant.name(),
            ours.wall.as_secs_f64(),
            ours.peak_kb / 1000,
        );
    }
    let worst = rows.iter().map(|(_, o, _)| o.peak_kb).max().unwrap_or(0);
    println!(
        "largest tensor {} MB as f32; bound 2× + 100 MB = {} MB; burnish's largest peak {} MB: {}",
        largest / 1_000_000,
        bound_kb / 1000,
        worst / 1000,
        if worst <= bound_kb { "within" } else { "OVER" }
    );
    for (quant, ours, theirs) in &rows {
        println!(
            "{}",
            serde_json::json!({
                "bench": "export_gguf_tinyllama",
                "quant": quant.name(),
                "threads": threads,
                "burnish_s": ours.wall.as_secs_f64(),
                "burnish_peak_kb": ours.peak_kb,
                "llama_quantize_s": theirs.as_ref().map(|t| t.wall.as_secs_f64()),
                "llama_quantize_peak_kb": theirs.as_ref().map(|t| t.peak_kb),
                "bound_kb": bound_kb,
            })
        );
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

/// `llama-quantize` from `$BURNISH_LLAMA_CPP` (as the export tests find llama.cpp's tools).
fn llama_quantize() -> Option<PathBuf> {
    let dir = std::env::var_os("BURNISH_LLAMA_CPP").map(PathBuf::from);
    let tool = dir
        .map(|d| d.join("llama-quantize"))
        .filter(|t| t.is_file());
    if tool.is_none() {
        eprintln!(
            "llama-quantize not found: set BURNISH_LLAMA_CPP to llama.cpp's tools (benches/llama_tools.sh); timing burnish alone"
        );
    }
    tool
}

#[derive(Clone, Copy)]
struct Measured {
    wall: Duration,
    peak_kb: u64,
}

fn summarize(runs: &[Measured]) -> Measured {
    let mut walls: Vec<Duration> = runs.iter().map(|m| m.wall).collect();
    walls.sort();
    Measured {
        wall: walls[walls.len() / 2],
        peak_kb: runs.iter().map(|m| m.peak_kb).max().unwrap_or(0),
    }
}

fn export(model: &Path, quant: Quant, out: &Path) -> Measured {
    let exe = std::env::current_exe().expect("the bench's path");
    let mut cmd = Command::new(exe);
    cmd.arg(CHILD).arg(model).arg(quant.name()).arg(out);
    let (m, stdout) = measure(cmd);
    // The child's own high-water mark is exact; the polled one may miss its last milliseconds.
    let own = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["peak_rss_kb"].as_u64())
        .unwrap_or(0);
    Measured {
        peak_kb: m.peak_kb.max(own),
        ..m
    }
}

fn llama(tool: &Path, input: &Path, out: &Path, ty: &str, threads: usize) -> Measured {
    let mut cmd = Command::new(tool);
    cmd.arg(input).arg(out).arg(ty).arg(threads.to_string());
    measure(cmd).0
}

/// Run `cmd` to completion: wall time and the peak resident memory `/proc` showed while it ran
/// (polled every 2 ms); panics with its output when it fails.
fn measure(mut cmd: Command) -> (Measured, String) {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if let Some(kb) = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|s| hwm(&s))
        {
            peak_kb = peak_kb.max(kb);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall = t0.elapsed();
    let output = child.wait_with_output().expect("output");
    assert!(
        status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        Measured { wall, peak_kb },
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Write the checkpoint once: `config.json`, the tiny fixture Llama's tokenizer (its 512 tokens
/// padded to the vocabulary by the export, as llama.cpp's converter pads) and `model.safetensors`
/// in bf16, values uniform with the std of 0.02 from a fixed seed. A `.done` marker says it is
/// whole.
fn make_checkpoint(dir: &Path, cfg: &ModelConfig) {
    let done = dir.join(".done");
    if done.exists() {
        return;
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).expect("bench directory");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/tiny-llama");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(fixture.join(f), dir.join(f)).expect("fixture tokenizer");
    }
    let mut config = cfg.to_hf_json(Some(0), Some(2), Some(0));
    config["torch_dtype"] = "bfloat16".into();
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");

    let tensors = model_tensors(cfg);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in &tensors {
        let bytes = t.len() * 2;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("model file"));
    file.write_all(&(header.len() as u64).to_le_bytes())
        .expect("write");
    file.write_all(&header).expect("write");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let amplitude = 0.02 * 3f32.sqrt(); // uniform on ±a has std a/√3
    let mut buf = Vec::new();
    for t in &tensors {
        buf.clear();
        let norm = t.shape.len() == 1;
        for _ in 0..t.len() {
            let v = if norm {
                1.0
            } else {
                // splitmix64 → a uniform in [-1, 1)
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * amplitude
            };
            buf.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
        }
        file.write_all(&buf).expect("write");
    }
    file.flush().expect("flush");
    std::fs::write(&done, "").expect("marker");
    eprintln!(
        "made {} ({:.1} GB) in {:.1} s",
        dir.display(),
        offset as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
}
