//! The GPU lane's parts that run anywhere: `burnish selftest` and `burnish bench-train` from the
//! binary, and the report's FLOP and MFU arithmetic against hand-worked values.

mod common;

use std::path::Path;

use common::{burnish, fixtures};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn selftest_prints_a_line_per_check_and_writes_them_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("checks.json");
    let out = burnish()
        .args(["selftest", "--backend", "cpu", "--models"])
        .arg(fixtures().join("models"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 17, "{stdout}");
    assert!(
        lines[..16].iter().all(|l| l.starts_with("PASS cpu ")),
        "{stdout}"
    );
    assert!(
        lines[7].starts_with("PASS cpu   generate/tiny-llama"),
        "{stdout}"
    );
    assert_eq!(lines[16], "selftest cpu: 16 passed, 0 failed, 0 skipped");
    let checks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(checks.as_array().unwrap().len(), 16);
    assert_eq!(checks[0]["name"], "forward/tiny-llama");
    assert_eq!(checks[0]["reference"], "transformers");
}

#[test]
fn selftest_names_a_directory_without_the_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let out = burnish()
        .args(["selftest", "--models"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tiny-llama: no fixture model here"),
        "{stderr}"
    );
}

#[test]
fn bench_train_prints_one_json_line() {
    let out = burnish()
        .args([
            "bench-train",
            "--preset",
            "fixture",
            "--batch",
            "2",
            "--seq",
            "8",
        ])
        .args(["--steps", "1", "--warmup", "0", "--lora", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["framework"], "burnish");
    assert_eq!(r["preset"], "fixture");
    assert_eq!(r["shape"]["layers"], 2);
    assert_eq!(r["lora"], 2);
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);

    if !Path::new("/proc/driver/nvidia/version").exists() {
        let out = burnish()
            .args(["bench-train", "--backend", "cuda"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--backend cuda: no NVIDIA driver is loaded"),
            "{stderr}"
        );
    }
    let out = burnish()
        .args(["bench-train", "--preset", "7b"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown preset `7b`"), "{stderr}");
}

/// `report.py report` on a made-up H200 run: SmolLM2-135M's shape, full and LoRA rows.
#[test]
fn the_report_counts_flops_as_palm_and_mfu_against_the_chips_peak() {
    let python = std::env::var("BURNISH_PYTHON").unwrap_or_else(|_| "python3".into());
    if std::process::Command::new(&python)
        .arg("-V")
        .output()
        .is_err()
    {
        common::skip("BURNISH_REQUIRE_PY", &format!("{python} does not run"));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let shape = serde_json::json!({"vocab": 49152, "hidden": 576, "ffn": 1536, "layers": 30,
        "heads": 9, "kv_heads": 3, "tied": true});
    let row = |row: usize, fw: &str, lora: &str, tps: f64| {
        serde_json::json!({"row": row, "framework": fw, "status": "ok", "gpu_peak_mb": 1000.0,
            "spec": {"backend": "cuda", "preset": "smollm2-135m", "batch": 8, "seq": 1024,
                     "warmup": 3, "steps": 10, "dtype": "bf16",
                     "lora": if lora == "-" { None } else { Some(16) }},
            "result": {"shape": shape, "tokens_per_s": tps}})
        .to_string()
    };
    let lines = [
        row(1, "burnish", "-", 100_000.0),
        row(1, "pytorch", "-", 200_000.0),
        row(2, "burnish", "16", 100_000.0),
    ];
    std::fs::write(tmp.path().join("speed.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = std::process::Command::new(&python)
        .arg(root().join("benches/gpu/report.py"))
        .args(["report", "--out"])
        .arg(tmp.path())
        .args(["--gpu", "NVIDIA H200", "--mode", "gpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gpu: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("gpu.json")).unwrap())
            .unwrap();
    // N: 30 layers × (q 576·576 + k, v 2·576·192 + o 576·576 + MLP 3·576·1536) = 106,168,320,
    // plus the (tied) output head 49152·576 = 28,311,552: 134,479,872. Attention:
    // 12 · 30 · 576 · 1024 = 212,336,640.
    let full = 6.0 * 134_479_872.0 + 212_336_640.0;
    let lora = 4.0 * 134_479_872.0 + 212_336_640.0;
    let speed = &gpu["speed"];
    assert_eq!(speed[0]["flops_per_token"].as_f64().unwrap(), full);
    assert_eq!(speed[1]["flops_per_token"].as_f64().unwrap(), lora);
    let mfu = speed[0]["burnish"]["mfu"].as_f64().unwrap();
    assert!((mfu - 1e5 * full / 989.4e12).abs() < 1e-12, "{mfu}");
    assert!((mfu - 0.103_013).abs() < 1e-6, "{mfu}");
    assert_eq!(speed[0]["ratio"].as_f64().unwrap(), 0.5);
    let md = std::fs::read_to_string(tmp.path().join("gpu-report.md")).unwrap();
    assert!(md.contains("| 1 | cuda | smollm2-135m | 8 × 1024 | bf16 | full | 100,000 | 200,000 | 0.50 | 10.3% | 20.6% |"), "{md}");
}
