//! The backend probes (`burnish selftest`, the GPU lane's correctness lines) on the CPU backend:
//! every check passes on the fixtures, and a check fails when the model is wrong.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burn::module::Param;
use burnish_stages::model;
use burnish_stages::probe::checks::{self, CheckResult, Options, Status};
use burnish_stages::probe::speed;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models")
}

fn run(backend: &str, models: PathBuf) -> Vec<CheckResult> {
    let opts = Options {
        backend: backend.into(),
        models,
        allow_cpu_adapter: true,
        from: 0,
        stop_after_panic: false,
    };
    checks::run(&opts, |r| eprintln!("{}", r.line()))
}

#[test]
fn every_check_passes_on_the_cpu_backend() {
    let results = run("cpu", models());
    // 8 probes on each of the 2 fixture models.
    assert_eq!(results.len(), 16);
    for r in &results {
        assert_eq!(r.status, Status::Pass, "{}", r.line());
        let (m, t) = (r.measured.unwrap(), r.tolerance.unwrap());
        assert!(m <= t, "{}", r.line());
    }
    // Against transformers the CPU backend is not exact: the forward check measures something.
    let fwd = results
        .iter()
        .find(|r| r.name == "forward/tiny-llama")
        .unwrap();
    assert!(fwd.measured.unwrap() > 0.0, "{}", fwd.line());
    let bf16 = results
        .iter()
        .find(|r| r.name == "forward_bf16/tiny-llama")
        .unwrap();
    assert!(
        bf16.measured.unwrap() > 1e-6,
        "bf16 products must differ from f32: {}",
        bf16.line()
    );
}

/// A copy of the fixture models with tiny-llama's final norm scaled by 1.5.
fn perturbed_models(root: &Path) -> PathBuf {
    let out = root.join("models");
    for name in checks::MODELS {
        let (from, to) = (models().join(name), out.join(name));
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    let dir = out.join("tiny-llama");
    let mut loaded = model::load_model_dir::<Flex>(&dir, &FlexDevice).unwrap();
    let w = loaded.model.model.norm.weight.val();
    loaded.model.model.norm.weight = Param::from_tensor(w * 1.5);
    let saved = root.join("perturbed");
    model::save_model_dir(&loaded.model, &loaded.raw_config, &dir, &saved).unwrap();
    std::fs::copy(
        saved.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    out
}

#[test]
fn a_wrong_model_fails_the_transformers_checks_and_only_those() {
    let tmp = tempfile::tempdir().unwrap();
    let results = run("cpu", perturbed_models(tmp.path()));
    let status = |name: &str| results.iter().find(|r| r.name == name).unwrap();
    let fwd = status("forward/tiny-llama");
    assert_eq!(fwd.status, Status::Fail, "{}", fwd.line());
    assert!(fwd.measured.unwrap() > 1e-3, "{}", fwd.line());
    assert_eq!(status("forward_bf16/tiny-llama").status, Status::Fail);
    // The other model, and the checks against the CPU backend (the same wrong model on both
    // sides), still pass.
    assert_eq!(status("forward/tiny-qwen2").status, Status::Pass);
    assert_eq!(status("train_step/tiny-llama").status, Status::Pass);
}

#[test]
fn a_backend_not_in_the_build_is_skipped_with_the_reason() {
    let results = run("tpu", models());
    assert!(results.iter().all(|r| r.status == Status::Skip));
    assert!(
        results[0]
            .detail
            .contains("backend `tpu` is not in this build"),
        "{}",
        results[0].line()
    );
}

#[test]
fn the_speed_probe_trains_the_fixture_shape() {
    let opts = speed::Options {
        backend: "cpu".into(),
        shape: speed::shape("fixture").unwrap(),
        batch: 2,
        seq: 16,
        steps: 2,
        warmup: 1,
        bf16: false,
        lora: None,
        seed: 0,
    };
    let r = speed::run(&opts).unwrap();
    // Embeddings and head 2 × 512 × 64, per layer q, o 64² and k, v 64 × 32, the MLP 3 × 64 ×
    // 176 and two norms of 64; a final norm.
    let per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64;
    assert_eq!(r.params, 2 * 512 * 64 + 2 * per_layer + 64);
    assert_eq!(r.trainable, r.params);
    assert!(r.tokens_per_s > 0.0 && r.tokens_per_s.is_finite());
    // Random tokens over 512: the first loss is near ln 512.
    assert!((r.loss_first - 512f64.ln()).abs() < 0.5, "{}", r.loss_first);

    let lora = speed::run(&speed::Options {
        lora: Some(4),
        bf16: true,
        ..opts
    })
    .unwrap();
    // Rank 4 on 7 projections per layer: 4 × (in + out) each.
    let per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 176) * 2 + (176 + 64));
    assert_eq!(lora.trainable, 2 * per_layer);
    assert_eq!(lora.params, r.params + lora.trainable);
    assert_eq!(lora.dtype, "bf16");
}

#[test]
fn bf16_is_refused_on_a_backend_without_it_and_auto_falls_back_to_f32() {
    use burnish_stages::train::ComputeDType;
    let err = ComputeDType::Bf16.bf16_on("wgpu").unwrap_err();
    assert_eq!(
        err.to_string(),
        "`dtype: bf16` cannot run on the `wgpu` backend: its shader compiler has no bf16"
    );
    assert!(!ComputeDType::Auto.bf16_on("wgpu").unwrap());
    assert!(ComputeDType::Auto.bf16_on("cuda").unwrap());
    assert!(ComputeDType::Bf16.bf16_on("cpu").unwrap());
}
