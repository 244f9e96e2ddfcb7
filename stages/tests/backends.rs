//! The wgpu backend computes what flex computes: the fixture forward pass and one training step,
//! on whatever adapter wgpu finds (Mesa's lavapipe on a CPU-only machine:
//! `apt-get install mesa-vulkan-drivers`).
//!
//! Tolerances: logits within 1e-4 absolute (the same bound transformers is held to); the loss,
//! gradient norm and the loss after one AdamW step within 1e-4 relative.
//!
//! Without any wgpu adapter the tests say so and pass, unless `BURNISH_REQUIRE_WGPU=1` (set by CI),
//! where a missing adapter fails them.
#![cfg(feature = "wgpu")]

use std::path::{Path, PathBuf};

use burn::backend::flex::FlexDevice;
use burn::backend::wgpu::WgpuDevice;
use burn::backend::{Autodiff, Flex, Wgpu};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_engine::stage::RunContext;
use burnish_stages::backend::wgpu_adapters;
use burnish_stages::model::{self, weights::tensor_f32};
use burnish_stages::text::Example;
use burnish_stages::train::batch::score;
use burnish_stages::train::looper::{self, LoopSpec};
use burnish_stages::train::{AdamW, Schedule};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/models")
        .join(name)
}

/// Whether to run: an adapter exists (or CI demands one and the test must fail without it).
fn have_adapter() -> bool {
    let adapters = wgpu_adapters();
    eprintln!("wgpu adapters: {adapters:?}");
    if adapters.is_empty() {
        assert!(
            std::env::var_os("BURNISH_REQUIRE_WGPU").is_none(),
            "BURNISH_REQUIRE_WGPU is set but wgpu finds no adapter (install mesa-vulkan-drivers)"
        );
        eprintln!("no wgpu adapter: skipping (install mesa-vulkan-drivers to run this test)");
        return false;
    }
    true
}

fn ids<B: burn::tensor::backend::Backend>(v: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let x: Vec<i64> = v.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(x, [1, v.len()]), device)
}

const TOKENS: [u32; 12] = [1, 320, 198, 77, 201, 54, 315, 477, 2, 201, 1, 88];

#[test]
fn wgpu_forward_matches_flex() {
    if !have_adapter() {
        return;
    }
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let flex = model::load_model_dir::<Flex>(&dir, &FlexDevice).unwrap();
        let dev = WgpuDevice::default();
        let gpu = model::load_model_dir::<Wgpu>(&dir, &dev).unwrap();
        let a = tensor_f32(flex.model.forward(ids::<Flex>(&TOKENS, &FlexDevice)));
        let b = tensor_f32(gpu.model.forward(ids::<Wgpu>(&TOKENS, &dev)));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{name}: max |wgpu - flex| logits = {diff:e}");
        assert!(diff <= 1e-4, "{name}: max |wgpu - flex| = {diff:e}");
    }
}

/// One full-fine-tuning AdamW step: (loss, grad norm, loss after the step).
fn one_step<B: AutodiffBackend>(device: B::Device) -> (f64, f64, f64) {
    let dir = fixture("tiny-llama");
    let net = model::load_model_dir::<B>(&dir, &device).unwrap().model;
    let mut targets = vec![true; TOKENS.len()];
    targets[0] = false;
    let data = vec![Example {
        ids: TOKENS.to_vec(),
        targets,
    }];
    let spec = LoopSpec {
        steps: 1,
        batch_size: 1,
        grad_accum: 1,
        lr: 1e-3,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        adamw: AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        max_grad_norm: None,
        checkpoint_every: 0,
        eval_every: None,
        seed: 1,
        pad_id: 0,
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut cx = RunContext::standalone("step", tmp.path(), 1);
    let r = looper::train(net, &data, None, &spec, &mut cx).unwrap();
    let after = score(&r.model.valid(), &data, 1, 0).mean_nll();
    (r.log[0].loss, r.log[0].grad_norm, after)
}

#[test]
fn wgpu_training_step_matches_flex() {
    if !have_adapter() {
        return;
    }
    let f = one_step::<Autodiff<Flex>>(FlexDevice);
    let g = one_step::<Autodiff<Wgpu>>(WgpuDevice::default());
    eprintln!("flex (loss, grad norm, loss after) = {f:?}\nwgpu = {g:?}");
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    assert!(rel(f.0, g.0) <= 1e-4, "loss {} vs {}", f.0, g.0);
    assert!(rel(f.1, g.1) <= 1e-4, "grad norm {} vs {}", f.1, g.1);
    assert!(
        rel(f.2, g.2) <= 1e-4,
        "loss after the step {} vs {}",
        f.2,
        g.2
    );
    assert!(f.2 < f.0, "one step must lower the loss on its own batch");
}
