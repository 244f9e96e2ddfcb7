//! The wgpu backend computes what flex computes: the fixture forward pass and one training step,
//! unpacked and with packed documents (wgpu masks them with an additive bias, flex in its
//! attention kernel), on whatever adapter wgpu finds (Mesa's lavapipe on a CPU-only machine:
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
use burnish_stages::train::batch::{make_batch, score};
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

/// The fixture tokens as one sequence.
fn unpacked() -> Vec<Example> {
    let mut targets = vec![true; TOKENS.len()];
    targets[0] = false;
    vec![Example {
        ids: TOKENS.to_vec(),
        targets,
        doc_starts: Vec::new(),
    }]
}

/// A packed row (the fixture tokens as documents of 5, 4 and 3 tokens, each one's first token
/// not a target) beside an unpacked row of 9 tokens, padded.
fn packed() -> Vec<Example> {
    let starts = vec![5, 9];
    let targets = (0..TOKENS.len())
        .map(|i| i > 0 && !starts.contains(&i))
        .collect();
    vec![
        Example {
            ids: TOKENS.to_vec(),
            targets,
            doc_starts: starts,
        },
        Example {
            ids: TOKENS[3..].to_vec(),
            targets: (0..9).map(|i| i > 0).collect(),
            doc_starts: Vec::new(),
        },
    ]
}

#[test]
fn wgpu_packed_forward_matches_flex() {
    if !have_adapter() {
        return;
    }
    let data = packed();
    let refs: Vec<&Example> = data.iter().collect();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let flex = model::load_model_dir::<Flex>(&dir, &FlexDevice).unwrap();
        let dev = WgpuDevice::default();
        let gpu = model::load_model_dir::<Wgpu>(&dir, &dev).unwrap();
        let fb = make_batch::<Flex>(&refs, 0, &FlexDevice);
        let gb = make_batch::<Wgpu>(&refs, 0, &dev);
        assert!(fb.docs.is_some());
        let a = tensor_f32(flex.model.forward_with(fb.ids, fb.docs.as_ref()));
        let b = tensor_f32(gpu.model.forward_with(gb.ids, gb.docs.as_ref()));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{name}: packed max |wgpu - flex| logits = {diff:e}");
        assert!(diff <= 1e-4, "{name}: packed max |wgpu - flex| = {diff:e}");
        // The last document of the packed row gives the logits it gives alone.
        let alone = tensor_f32(flex.model.forward(ids::<Flex>(&TOKENS[9..], &FlexDevice)));
        let v = flex.model.config.vocab_size;
        let own = &b[9 * v..12 * v];
        let diff = own
            .iter()
            .zip(&alone)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-4,
            "{name}: wgpu packed document vs flex alone = {diff:e}"
        );
    }
}

/// One full-fine-tuning AdamW step on `data` as one batch: (loss, grad norm, loss after the
/// step).
fn one_step<B: AutodiffBackend>(device: B::Device, data: &[Example]) -> (f64, f64, f64) {
    let dir = fixture("tiny-llama");
    let net = model::load_model_dir::<B>(&dir, &device).unwrap().model;
    let spec = LoopSpec {
        steps: 1,
        batch_size: data.len(),
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
    let r = looper::train(net, data, None, &spec, &mut cx).unwrap();
    let after = score(&r.model.valid(), data, data.len(), 0).mean_nll();
    (r.log[0].loss, r.log[0].grad_norm, after)
}

#[test]
fn wgpu_training_step_matches_flex() {
    if !have_adapter() {
        return;
    }
    // One unpacked sequence, then a packed row beside an unpacked one (documents masked,
    // positions restarting, padding).
    for (what, data) in [("unpacked", unpacked()), ("packed", packed())] {
        let f = one_step::<Autodiff<Flex>>(FlexDevice, &data);
        let g = one_step::<Autodiff<Wgpu>>(WgpuDevice::default(), &data);
        eprintln!("{what}: flex (loss, grad norm, loss after) = {f:?}\nwgpu = {g:?}");
        let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
        assert!(rel(f.0, g.0) <= 1e-4, "{what}: loss {} vs {}", f.0, g.0);
        assert!(
            rel(f.1, g.1) <= 1e-4,
            "{what}: grad norm {} vs {}",
            f.1,
            g.1
        );
        assert!(
            rel(f.2, g.2) <= 1e-4,
            "{what}: loss after the step {} vs {}",
            f.2,
            g.2
        );
        assert!(f.2 < f.0, "one step must lower the loss on its own batch");
    }
}
