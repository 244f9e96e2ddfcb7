//! The model held against transformers: the fixture checkpoints in `fixtures/models/` carry the
//! logits and perplexity transformers computed on a fixed text (`reference.json`,
//! `reference.safetensors`, written by `fixtures/models/make_models.py`).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_stages::model::weights::{TensorFiles, tensor_f32};
use burnish_stages::model::{self, LoraParams, LoraTarget, lora};
use burnish_stages::text::{Example, TextTokenizer};
use burnish_stages::train::batch::score;

type B = Flex;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/models")
        .join(name)
}

struct Reference {
    text: String,
    ids: Vec<u32>,
    logits: Vec<f32>,
    perplexity: f64,
}

fn reference(dir: &Path, vocab: usize) -> Reference {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let files = TensorFiles::open(&[dir.join("reference.safetensors")]).unwrap();
    let logits = files.read_f32("logits", &[1, ids.len(), vocab]).unwrap();
    Reference {
        text: json["text"].as_str().unwrap().to_owned(),
        ids,
        logits,
        perplexity: json["perplexity"].as_f64().unwrap(),
    }
}

fn ids_tensor(ids: &[u32]) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), &FlexDevice)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_against_transformers(name: &str) {
    let dir = fixture(name);
    let loaded = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
    let vocab = loaded.model.config.vocab_size;
    let r = reference(&dir, vocab);

    // The tokenizer gives the ids the reference was computed on.
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.encode(&r.text).unwrap(), r.ids, "{name}: tokenization");

    let logits = tensor_f32(loaded.model.forward(ids_tensor(&r.ids)));
    let diff = max_abs_diff(&logits, &r.logits);
    eprintln!("{name}: max |logits - transformers| = {diff:e}");
    assert!(
        diff <= 1e-4,
        "{name}: max |logits - transformers| = {diff:e}"
    );

    let mut targets = vec![true; r.ids.len()];
    targets[0] = false;
    let ex = Example {
        ids: r.ids.clone(),
        targets,
        doc_starts: Vec::new(),
    };
    let s = score(&loaded.model, &[ex], 1, 0);
    let rel = (s.perplexity() - r.perplexity).abs() / r.perplexity;
    eprintln!(
        "{name}: perplexity {} vs {} (relative {rel:e})",
        s.perplexity(),
        r.perplexity
    );
    assert!(
        rel <= 1e-3,
        "{name}: perplexity {} vs transformers {} (relative {rel:e})",
        s.perplexity(),
        r.perplexity
    );
}

#[test]
fn tiny_llama_matches_transformers() {
    check_against_transformers("tiny-llama");
}

#[test]
fn tiny_qwen2_with_biases_and_tied_embeddings_matches_transformers() {
    let dir = fixture("tiny-qwen2");
    let loaded = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
    assert!(loaded.model.config.tie_word_embeddings);
    assert!(loaded.model.lm_head.is_none());
    assert!(loaded.model.model.layers[0].self_attn.q_proj.bias.is_some());
    check_against_transformers("tiny-qwen2");
}

#[test]
fn saved_model_reloads_with_identical_logits() {
    let dir = fixture("tiny-qwen2");
    let loaded = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
    let out = tempfile::tempdir().unwrap();
    model::save_model_dir(&loaded.model, &loaded.raw_config, &dir, out.path()).unwrap();
    let back = model::load_model_dir::<B>(out.path(), &FlexDevice).unwrap();
    let ids = ids_tensor(&[5, 17, 42, 99, 300, 2]);
    let a = tensor_f32(loaded.model.forward(ids.clone()));
    let b = tensor_f32(back.model.forward(ids));
    assert_eq!(a, b);
    // Tied: no lm_head.weight written, as transformers writes it.
    let files = TensorFiles::open(&[out.path().join("model.safetensors")]).unwrap();
    assert!(!files.contains("lm_head.weight"));
    assert!(out.path().join("tokenizer.json").is_file());
}

#[test]
fn lora_starts_as_identity_counts_what_rank_implies_and_merges_exactly() {
    let dir = fixture("tiny-llama");
    let loaded = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
    let ids = ids_tensor(&[5, 17, 42, 99, 300, 2, 7, 8]);
    let base_logits = tensor_f32(loaded.model.forward(ids.clone()));
    let params = LoraParams {
        rank: 4,
        alpha: Some(8.0),
        dropout: 0.0,
        targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj],
    };
    let with = lora::inject(loaded.model, &params, 7);
    // B = 0: the adapter changes nothing yet.
    assert_eq!(tensor_f32(with.forward(ids.clone())), base_logits);
    // 2 layers × r=4 × [(64+64) q + (64+32) v + (176+64) down] = 2 × 4 × 464 = 3712
    assert_eq!(lora::adapter_param_count(&with), 3712);
    assert_eq!(lora::expected_adapter_params(&with, &params), 3712);

    // Give B values, then merging must reproduce the adapted forward pass.
    let mut adapted = with;
    for layer in adapted.model.layers.iter_mut() {
        for lin in [
            &mut layer.self_attn.q_proj,
            &mut layer.self_attn.v_proj,
            &mut layer.mlp.down_proj,
        ] {
            let l = lin.lora.as_mut().unwrap();
            let [o, r] = l.b.val().dims();
            let v: Vec<f32> = (0..o * r)
                .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.01)
                .collect();
            l.b = burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(v, [o, r]),
                &FlexDevice,
            ));
        }
    }
    let adapted_logits = tensor_f32(adapted.forward(ids.clone()));
    assert!(
        max_abs_diff(&adapted_logits, &base_logits) > 1e-3,
        "the adapter must matter"
    );
    let merged = lora::merge(adapted.clone());
    let merged_logits = tensor_f32(merged.forward(ids.clone()));
    let d = max_abs_diff(&adapted_logits, &merged_logits);
    assert!(d < 1e-4, "merged vs adapted: {d:e}");

    // PEFT layout round trip.
    let out = tempfile::tempdir().unwrap();
    lora::write_adapter(&adapted, &params, "base", out.path()).unwrap();
    let files = TensorFiles::open(&[out.path().join("adapter_model.safetensors")]).unwrap();
    assert!(files.contains("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"));
    assert!(files.contains("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "q_proj", "v_proj"])
    );
    let fresh = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap().model;
    let (reloaded, p2) = lora::load_adapter(fresh, out.path()).unwrap();
    assert_eq!(p2.rank, 4);
    assert_eq!(tensor_f32(reloaded.forward(ids)), adapted_logits);
}

#[test]
fn shape_mismatch_names_the_file_and_tensor() {
    let dir = fixture("tiny-llama");
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = 128.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = model::load_model_dir::<B>(tmp.path(), &FlexDevice)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[176, 64]")
            && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let dir = fixture("tiny-llama");
    let whole = TensorFiles::open_model_dir(&dir).unwrap();
    let names: Vec<String> = whole.names().map(str::to_owned).collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<_> = part
            .iter()
            .map(|n| {
                let shape = whole.shape(n).unwrap();
                (n.clone(), shape.clone(), whole.read_f32(n, &shape).unwrap())
            })
            .collect();
        burnish_stages::model::weights::write_safetensors(&tmp.path().join(&file), &tensors, None)
            .unwrap();
        for n in part {
            map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    let sharded = model::load_model_dir::<B>(tmp.path(), &FlexDevice).unwrap();
    let single = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap();
    let ids = ids_tensor(&[3, 30, 300, 2]);
    assert_eq!(
        tensor_f32(sharded.model.forward(ids.clone())),
        tensor_f32(single.model.forward(ids))
    );
}

#[test]
fn nf4_round_trip_stays_within_half_a_level_of_its_block_scale() {
    use burnish_stages::model::nf4::{BLOCK, NF4_CODES, Nf4Tensor};
    // Seeded normal-ish values (sum of uniforms), 64 × 1024, with one block of zeros and one
    // block holding a huge outlier.
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut uniform = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f32 / (1u64 << 53) as f32
    };
    let n = 64 * 1024;
    let mut v: Vec<f32> = (0..n)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
        .collect();
    for z in &mut v[BLOCK..2 * BLOCK] {
        *z = 0.0;
    }
    v[5 * BLOCK + 3] = 80.0;
    let q = Nf4Tensor::quantize(&v, &[64, 1024]);
    let back = q.dequantize();
    // Largest half-gap between neighbouring NF4 levels: (−0.696 − −1)/2 = 0.152.
    let half_gap = NF4_CODES
        .windows(2)
        .map(|w| (w[1] - w[0]) / 2.0)
        .fold(0.0f32, f32::max);
    assert!((half_gap - 0.151_903_6).abs() < 1e-6);
    for b in 0..n / BLOCK {
        let block = &v[b * BLOCK..(b + 1) * BLOCK];
        let amax = block.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        // The block scale itself went through int8: its error adds at most |code| ≤ 1 times it.
        let scale_err = (q.absmax(b) - amax).abs();
        for (i, &orig) in block.iter().enumerate() {
            let err = (back[b * BLOCK + i] - orig).abs();
            assert!(
                err <= half_gap * amax + scale_err + 1e-6,
                "block {b} value {i}: {orig} → {} (amax {amax}, scale error {scale_err})",
                back[b * BLOCK + i]
            );
        }
    }
    assert!(back[BLOCK..2 * BLOCK].iter().all(|&z| z.abs() < 0.02));
    // 4 bits + 8 bits per 64 values + one f32 per 256 blocks + one f32 mean.
    let bits = q.bits_per_value();
    let expected = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0) + 32.0 / n as f64;
    assert!((bits - expected).abs() < 1e-9, "{bits} bits per value");
}

#[test]
fn qlora_forward_equals_the_forward_with_dequantized_weights() {
    let dir = fixture("tiny-llama");
    let base = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap().model;
    let (quantized, bits) = lora::quantize_base_nf4(base.clone());
    // 64×64-ish projections: 4 + 8/64 bits, plus per-tensor overheads.
    assert!((4.12..4.2).contains(&bits), "{bits}");
    // The same model with each NF4 weight dequantized back into an ordinary f32 weight.
    let mut plain = quantized.clone();
    for layer in plain.model.layers.iter_mut() {
        for lin in [
            &mut layer.self_attn.q_proj,
            &mut layer.self_attn.k_proj,
            &mut layer.self_attn.v_proj,
            &mut layer.self_attn.o_proj,
            &mut layer.mlp.gate_proj,
            &mut layer.mlp.up_proj,
            &mut layer.mlp.down_proj,
        ] {
            let q = lin.nf4.take().unwrap();
            lin.weight = burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(q.dequantize(), [q.shape[0], q.shape[1]]),
                &FlexDevice,
            ));
        }
    }
    let ids = ids_tensor(&[5, 17, 42, 99, 300, 2, 7]);
    let q = tensor_f32(quantized.forward(ids.clone()));
    assert_eq!(q, tensor_f32(plain.forward(ids.clone())));
    // And NF4 is an approximation: close to, but not equal to, the f32 base.
    let f = tensor_f32(base.forward(ids));
    let d = max_abs_diff(&q, &f);
    let scale = f.iter().fold(0.0f32, |a, x| a.max(x.abs()));
    assert!(
        d > 1e-4 && d < 0.2 * scale,
        "NF4 vs f32 logits differ by {d} (largest logit {scale})"
    );
    // A QLoRA adapter trains on top: inject keeps the NF4 base and finds the right shapes.
    let p = LoraParams {
        rank: 4,
        alpha: None,
        dropout: 0.0,
        targets: LoraTarget::ALL.to_vec(),
    };
    let with = lora::inject(quantized, &p, 1);
    assert_eq!(
        lora::adapter_param_count(&with),
        lora::expected_adapter_params(&with, &p)
    );
    assert!(with.model.layers[0].mlp.down_proj.nf4.is_some());
}

#[test]
fn bf16_compute_stays_close_to_f32_and_trains() {
    use burn::backend::Autodiff;
    use burnish_engine::stage::RunContext;
    use burnish_stages::train::looper::{self, LoopSpec};
    use burnish_stages::train::{AdamW, Schedule};
    let dir = fixture("tiny-llama");
    let f32_model = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap().model;
    let bf16_model = f32_model.clone().set_bf16(true);
    let ids = ids_tensor(&[5, 17, 42, 99, 300, 2, 7, 8, 9, 10]);
    let a = tensor_f32(f32_model.forward(ids.clone()));
    let b = tensor_f32(bf16_model.forward(ids));
    let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let d = max_abs_diff(&a, &b);
    // bf16 keeps 8 mantissa bits: products carry ~2⁻⁸ relative error, accumulated in f32.
    assert!(d > 0.0, "bf16 must actually change the arithmetic");
    assert!(
        d < 0.05 * scale,
        "bf16 vs f32 logits: {d} (largest {scale})"
    );

    // Training in bf16 compute (f32 master weights) lowers the loss on its batch.
    let net = model::load_model_dir::<Autodiff<B>>(&dir, &FlexDevice)
        .unwrap()
        .model
        .set_bf16(true);
    let ex = Example {
        ids: vec![1, 320, 198, 77, 201, 54, 315, 477, 2],
        targets: vec![false, true, true, true, true, true, true, true, true],
        doc_starts: Vec::new(),
    };
    let spec = LoopSpec {
        steps: 3,
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
    let mut cx = RunContext::standalone("bf16", tmp.path(), 1);
    let r = looper::train(net, std::slice::from_ref(&ex), None, &spec, &mut cx).unwrap();
    assert!(r.log[2].loss < r.log[0].loss, "{:?}", r.log);
}

/// Seeded values in `[-scale, scale)`.
fn seeded(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[test]
fn fused_softmax_silu_and_cross_entropy_match_the_composed_ops_and_their_gradients() {
    use burn::backend::Autodiff;
    use burn::tensor::activation::{log_softmax, silu, softmax};
    use burnish_stages::model::fused;
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    // The custom ops are really taken on the training backend, and only there.
    assert!(fused::has_fused_ops::<A>());
    assert!(!fused::has_fused_ops::<Flex>());

    // Rows longer than the loops' 16 lanes, with a remainder.
    let (n, v) = (7, 37);
    let data = TensorData::new(seeded(n * v, 1, 6.0), [n, v]);
    let weights = Tensor::<A, 2>::from_data(TensorData::new(seeded(n * v, 2, 1.0), [n, v]), &dev);
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 5 + 3) % v as i64).collect();
    let t = Tensor::<A, 1, Int>::from_data(TensorData::new(targets, [n]), &dev);
    let row_w = Tensor::<A, 1>::from_data(TensorData::new(seeded(n, 3, 1.0), [n]), &dev);

    let run = |fused_ops: bool| {
        let x = Tensor::<A, 2>::from_data(data.clone(), &dev).require_grad();
        let (p, nll, act) = if fused_ops {
            (
                fused::softmax_last(x.clone()),
                fused::cross_entropy(x.clone(), t.clone()),
                fused::silu(x.clone()),
            )
        } else {
            let nll = log_softmax(x.clone(), 1)
                .gather(1, t.clone().reshape([n, 1]))
                .reshape([n])
                .neg();
            (softmax(x.clone(), 1), nll, silu(x.clone()))
        };
        // A loss that weighs every output differently, so every gradient entry matters.
        let loss = (p.clone() * weights.clone()).sum()
            + (nll.clone() * row_w.clone()).sum()
            + (act.clone() * weights.clone().flip([1])).sum();
        let g = loss.backward();
        let grad = x.grad(&g).expect("x is tracked").into_data();
        (
            p.into_data().to_vec::<f32>().unwrap(),
            nll.into_data().to_vec::<f32>().unwrap(),
            grad.to_vec::<f32>().unwrap(),
            act.into_data().to_vec::<f32>().unwrap(),
        )
    };
    let (p_f, nll_f, g_f, a_f) = run(true);
    let (p_c, nll_c, g_c, a_c) = run(false);
    assert!(
        max_abs_diff(&a_f, &a_c) < 1e-5,
        "silu {:e}",
        max_abs_diff(&a_f, &a_c)
    );
    assert!(
        max_abs_diff(&p_f, &p_c) < 1e-6,
        "softmax {:e}",
        max_abs_diff(&p_f, &p_c)
    );
    assert!(
        max_abs_diff(&nll_f, &nll_c) < 1e-5,
        "nll {:e}",
        max_abs_diff(&nll_f, &nll_c)
    );
    assert!(
        max_abs_diff(&g_f, &g_c) < 1e-5,
        "grad {:e}",
        max_abs_diff(&g_f, &g_c)
    );
    // The gradient is not trivially small: rows of a 37-way softmax with logits in ±6.
    assert!(g_c.iter().map(|g| g.abs()).fold(0.0, f32::max) > 0.1);
    // Hand check of one row: nll = logsumexp(x) − x[target].
    let x = data.to_vec::<f32>().unwrap();
    let row = &x[..v];
    let m = row.iter().cloned().fold(f32::MIN, f32::max);
    let lse = m + row.iter().map(|r| (r - m).exp()).sum::<f32>().ln();
    assert!((nll_f[0] - (lse - row[3])).abs() < 1e-5);
}

#[test]
fn fused_rope_and_permute_match_the_composed_ops_and_their_gradients() {
    use burn::backend::Autodiff;
    use burnish_stages::model::fused;
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    let (b, t, heads, hd) = (2, 5, 3, 8);
    let w = heads * hd;
    let data = TensorData::new(seeded(b * t * w, 4, 2.0), [b, t, w]);
    // Tables longer than needed, as the model's are (max positions).
    let table = |seed| {
        Tensor::<A, 2>::from_data(TensorData::new(seeded(7 * w, seed, 1.0), [1, 7 * w]), &dev)
    };
    let (cos, sin) = (table(5), table(6));
    let weights = Tensor::<A, 4>::from_data(
        TensorData::new(seeded(b * t * w, 7, 1.0), [b, heads, hd, t]),
        &dev,
    );

    let run = |fused_ops: bool| {
        let x = Tensor::<A, 3>::from_data(data.clone(), &dev).require_grad();
        let (y, p) = if fused_ops {
            let y = fused::rope(x.clone(), &cos, &sin, hd);
            let p = fused::permute(y.clone().reshape([b, t, heads, hd]), [0, 2, 3, 1]);
            (y, p)
        } else {
            // y = x ⊙ cos + [x₂, x₁] ⊙ sin per head, written out.
            let n = t * w;
            let heads_x = x.clone().reshape([b * t * heads, hd]);
            let swapped = Tensor::cat(
                vec![
                    heads_x.clone().narrow(1, hd / 2, hd / 2),
                    heads_x.narrow(1, 0, hd / 2),
                ],
                1,
            )
            .reshape([b, n]);
            let y = (x.clone().reshape([b, n]) * cos.clone().narrow(1, 0, n)
                + swapped * sin.clone().narrow(1, 0, n))
            .reshape([b, t, w]);
            let p = y.clone().reshape([b, t, heads, hd]).permute([0, 2, 3, 1]);
            (y, p)
        };
        let loss = (p.clone() * weights.clone()).sum() + (y.clone() * y.clone()).sum();
        let g = loss.backward();
        let grad = x.grad(&g).expect("x is tracked").into_data();
        (
            y.into_data().to_vec::<f32>().unwrap(),
            p.into_data().to_vec::<f32>().unwrap(),
            grad.to_vec::<f32>().unwrap(),
        )
    };
    let (y_f, p_f, g_f) = run(true);
    let (y_c, p_c, g_c) = run(false);
    // The same products and sums in the same order: equal to the bit.
    assert_eq!(y_f, y_c);
    assert_eq!(p_f, p_c);
    assert!(
        max_abs_diff(&g_f, &g_c) < 1e-5,
        "grad {:e}",
        max_abs_diff(&g_f, &g_c)
    );
    assert!(g_c.iter().map(|g| g.abs()).fold(0.0, f32::max) > 0.1);
}

#[test]
fn fused_rms_norm_matches_the_composed_ops_and_both_gradients() {
    use burn::backend::Autodiff;
    use burnish_stages::model::fused;
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    // 37 features: the loops' 16 lanes twice and a remainder.
    let (b, t, d) = (2, 3, 37);
    let data = TensorData::new(seeded(b * t * d, 8, 3.0), [b, t, d]);
    let w_data = TensorData::new(seeded(d, 9, 2.0), [d]);
    let weights =
        Tensor::<A, 3>::from_data(TensorData::new(seeded(b * t * d, 10, 1.0), [b, t, d]), &dev);
    let eps = 1e-5;
    let run = |fused_ops: bool| {
        let x = Tensor::<A, 3>::from_data(data.clone(), &dev).require_grad();
        let w = Tensor::<A, 1>::from_data(w_data.clone(), &dev).require_grad();
        let y = if fused_ops {
            fused::rms_norm(x.clone(), w.clone(), eps)
        } else {
            let var = x.clone().powi_scalar(2).mean_dim(2);
            x.clone() * (var + eps).sqrt().recip() * w.clone().unsqueeze::<3>()
        };
        let g = (y.clone() * weights.clone()).sum().backward();
        let v = |t: Tensor<Autodiff<Flex>, 3>| t.into_data().to_vec::<f32>().unwrap();
        (
            v(y),
            x.grad(&g)
                .expect("x is tracked")
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
            w.grad(&g)
                .expect("w is tracked")
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
        )
    };
    let (y_f, gx_f, gw_f) = run(true);
    let (y_c, gx_c, gw_c) = run(false);
    for (what, f, c) in [
        ("y", &y_f, &y_c),
        ("∂x", &gx_f, &gx_c),
        ("∂w", &gw_f, &gw_c),
    ] {
        let diff = max_abs_diff(f, c);
        assert!(diff < 2e-5, "{what} {diff:e}");
        assert!(
            c.iter().map(|v| v.abs()).fold(0.0, f32::max) > 0.1,
            "{what} is not trivial"
        );
    }
}

#[test]
fn fused_swiglu_matches_silu_times_up_and_both_gradients() {
    use burn::backend::Autodiff;
    use burn::tensor::activation::silu;
    use burnish_stages::model::fused;
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    let (b, t, d) = (2, 3, 37);
    let a_data = TensorData::new(seeded(b * t * d, 11, 6.0), [b, t, d]);
    let b_data = TensorData::new(seeded(b * t * d, 12, 2.0), [b, t, d]);
    let weights =
        Tensor::<A, 3>::from_data(TensorData::new(seeded(b * t * d, 13, 1.0), [b, t, d]), &dev);
    let run = |fused_ops: bool| {
        let a = Tensor::<A, 3>::from_data(a_data.clone(), &dev).require_grad();
        let up = Tensor::<A, 3>::from_data(b_data.clone(), &dev).require_grad();
        let y = if fused_ops {
            fused::swiglu(a.clone(), up.clone())
        } else {
            silu(a.clone()) * up.clone()
        };
        let g = (y.clone() * weights.clone()).sum().backward();
        let v = |t: Tensor<A, 3>| t.into_data().to_vec::<f32>().unwrap();
        (
            v(y),
            a.grad(&g)
                .expect("a is tracked")
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
            up.grad(&g)
                .expect("b is tracked")
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
        )
    };
    let (y_f, ga_f, gb_f) = run(true);
    let (y_c, ga_c, gb_c) = run(false);
    for (what, f, c) in [
        ("y", &y_f, &y_c),
        ("∂a", &ga_f, &ga_c),
        ("∂b", &gb_f, &gb_c),
    ] {
        let diff = max_abs_diff(f, c);
        assert!(diff < 1e-5, "{what} {diff:e}");
        assert!(
            c.iter().map(|v| v.abs()).fold(0.0, f32::max) > 0.1,
            "{what} is not trivial"
        );
    }
}

#[test]
fn causal_softmax_equals_bias_plus_softmax_to_the_bit() {
    use burn::backend::Autodiff;
    use burnish_stages::model::{
        fused,
        llama::{AttentionMask, causal_bias},
    };
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    // Two query heads per key/value head and rows longer than the loops' 16 lanes.
    let (b, kv, groups, t) = (2, 3, 2, 21);
    let shape = [b, kv, groups * t, t];
    let n = b * kv * groups * t * t;
    let data = TensorData::new(seeded(n, 14, 5.0), shape);
    let weights = Tensor::<A, 4>::from_data(TensorData::new(seeded(n, 15, 1.0), shape), &dev);
    let causal = causal_bias::<A>(t, groups, &dev);
    let run = |fused_ops: bool| {
        let x = Tensor::<A, 4>::from_data(data.clone(), &dev).require_grad();
        let p = if fused_ops {
            fused::causal_softmax(x.clone(), &AttentionMask::causal(t, groups, &dev))
        } else {
            let s = (x.clone().reshape([b * kv, groups * t * t]) + causal.clone()).reshape(shape);
            fused::softmax_last(s)
        };
        let g = (p.clone() * weights.clone()).sum().backward();
        (
            p.into_data().to_vec::<f32>().unwrap(),
            x.grad(&g)
                .expect("x is tracked")
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
        )
    };
    let (p_f, g_f) = run(true);
    let (p_c, g_c) = run(false);
    assert_eq!(p_f, p_c);
    assert!(
        max_abs_diff(&g_f, &g_c) < 1e-6,
        "grad {:e}",
        max_abs_diff(&g_f, &g_c)
    );
    // Position 4 of the second query group of the first head sees exactly 5 keys.
    let row = &p_f[(t + 4) * t..(t + 5) * t];
    assert!(row[..5].iter().all(|&p| p > 0.0) && row[5..].iter().all(|&p| p == 0.0));
    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
}

/// `op(x)` of a row-major `[r, c]` matrix as a row-major f64 matrix (`op` transposes when `t`).
fn op_f64(x: &[f32], r: usize, c: usize, t: bool) -> Vec<f64> {
    match t {
        false => x.iter().map(|&v| v as f64).collect(),
        true => (0..c * r).map(|i| x[(i % r) * c + i / r] as f64).collect(),
    }
}

/// Row-major `[m, k] · [k, n]` in f64.
fn mm_f64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for l in 0..k {
            let x = a[i * k + l];
            for j in 0..n {
                y[i * n + j] += x * b[l * n + j];
            }
        }
    }
    y
}

/// The largest `|got − want|` over two equally long sequences.
fn max_abs_diff_f64(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// Row-major transpose of an `[r, c]` f64 matrix.
fn t_f64(x: &[f64], r: usize, c: usize) -> Vec<f64> {
    (0..c * r).map(|i| x[(i % r) * c + i / r]).collect()
}

#[test]
fn fused_matmul_matches_f64_products_and_gradients_for_every_transpose_and_batch() {
    use burn::backend::Autodiff;
    use burnish_stages::model::fused;
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    // (batch, m, k, n): one thread; bands of columns over the threads (m·n·k ≥ 192³); bands
    // of rows for a narrow product (n = 60, and ∂b of 200 × 60); rayon over the
    // batch.
    let cases = [
        (1, 5, 37, 19),
        (1, 200, 190, 210),
        (1, 640, 200, 60),
        (8, 100, 96, 90),
    ];
    for (case, (batch, m, k, n)) in cases.into_iter().enumerate() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let seed = 100 + 10 * case as u64 + 2 * ta as u64 + tb as u64;
            let (a_v, b_v) = (
                seeded(batch * ar * ac, seed, 1.0),
                seeded(batch * br * bc, seed + 50, 1.0),
            );
            let w_v = seeded(batch * m * n, seed + 90, 1.0);
            // `a` enters as a strided view: stored `[ac, batch, ar]`, permuted to `[batch, ar, ac]`.
            let a_stored: Vec<f32> = (0..ac * batch * ar)
                .map(|i| {
                    let (c, rest) = (i / (batch * ar), i % (batch * ar));
                    let (bi, r) = (rest / ar, rest % ar);
                    a_v[bi * ar * ac + r * ac + c]
                })
                .collect();
            let a_leaf =
                Tensor::<A, 3>::from_data(TensorData::new(a_stored, [ac, batch, ar]), &dev)
                    .require_grad();
            let a = a_leaf.clone().permute([1, 2, 0]); // [batch, ar, ac]
            let b = Tensor::<A, 3>::from_data(TensorData::new(b_v.clone(), [batch, br, bc]), &dev)
                .require_grad();
            let w = Tensor::<A, 3>::from_data(TensorData::new(w_v.clone(), [batch, m, n]), &dev);
            let y = fused::matmul(a, ta, b.clone(), tb);
            assert_eq!(y.dims(), [batch, m, n]);
            let g = (y.clone() * w).sum().backward();
            let y = y.into_data().to_vec::<f32>().unwrap();
            let ga = a_leaf.grad(&g).unwrap().permute([1, 2, 0]);
            let ga = ga.into_data().to_vec::<f32>().unwrap();
            let gb = b.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
            for i in 0..batch {
                let sa = op_f64(&a_v[i * ar * ac..(i + 1) * ar * ac], ar, ac, ta); // [m, k]
                let sb = op_f64(&b_v[i * br * bc..(i + 1) * br * bc], br, bc, tb); // [k, n]
                let sw: Vec<f64> = w_v[i * m * n..(i + 1) * m * n]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let want_y = mm_f64(&sa, &sb, m, k, n);
                // ∂op(a) = w · op(b)ᵀ, ∂op(b) = op(a)ᵀ · w, then back through `op`.
                let d_opa = mm_f64(&sw, &t_f64(&sb, k, n), m, n, k);
                let d_opb = mm_f64(&t_f64(&sa, m, k), &sw, k, m, n);
                let want_ga = if ta { t_f64(&d_opa, m, k) } else { d_opa };
                let want_gb = if tb { t_f64(&d_opb, k, n) } else { d_opb };
                for (what, got, want) in [
                    ("y", &y[i * m * n..(i + 1) * m * n], &want_y),
                    ("∂a", &ga[i * ar * ac..(i + 1) * ar * ac], &want_ga),
                    ("∂b", &gb[i * br * bc..(i + 1) * br * bc], &want_gb),
                ] {
                    let worst = max_abs_diff_f64(got, want);
                    assert!(
                        worst < 1e-4,
                        "{what} batch {i} of {batch}x{m}x{k}x{n} ta={ta} tb={tb}: off by {worst:e}"
                    );
                }
            }
        }
    }
}

/// Holds head `h` of an attention run (`got`: the output and ∂q, ∂k, ∂v over every head, for
/// the loss `Σ out ⊙ w`) to [`attention_f64`] on the same head of `[q, k, v, w]`, query row `i`
/// seeing keys `first[i]..=i`; `[rows, t, d]`: query rows, keys and width per head.
fn assert_head_matches_f64(
    label: &str,
    got: &[Vec<f32>; 4],
    [q, k, v, w]: [&[f32]; 4],
    first: &[usize],
    h: usize,
    [rows, t, d]: [usize; 3],
) {
    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (qs, ks) = (h * rows * d..(h + 1) * rows * d, h * t * d..(h + 1) * t * d);
    let want = attention_f64(
        &f64s(&q[qs.clone()]),
        &f64s(&k[ks.clone()]),
        &f64s(&v[ks.clone()]),
        &f64s(&w[qs.clone()]),
        first,
        d,
    );
    for (what, got, want) in [
        ("out", &got[0][qs.clone()], &want[0]),
        ("∂q", &got[1][qs.clone()], &want[1]),
        ("∂k", &got[2][ks.clone()], &want[2]),
        ("∂v", &got[3][ks.clone()], &want[3]),
    ] {
        let worst = max_abs_diff_f64(got, want);
        assert!(worst < 1e-4, "{what} of {label}: off by {worst:e}");
    }
}

/// Causal attention in f64 for one key/value head: `q` `[g·t, d]`, `k`, `v` `[t, d]`, and the
/// gradients of `Σ out ⊙ w`; position `i` sees the keys `first[i]..=i`. Returns
/// `(out, ∂q, ∂k, ∂v)`.
fn attention_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    w: &[f64],
    first: &[usize],
    d: usize,
) -> [Vec<f64>; 4] {
    let (rows, t) = (q.len() / d, first.len());
    let (mut out, mut dq) = (vec![0.0; rows * d], vec![0.0; rows * d]);
    let (mut dk, mut dv) = (vec![0.0; t * d], vec![0.0; t * d]);
    for r in 0..rows {
        let keys = first[r % t]..r % t + 1;
        let s: Vec<f64> = keys
            .clone()
            .map(|j| (0..d).map(|c| q[r * d + c] * k[j * d + c]).sum())
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|x| x / z).collect();
        for (&p, j) in p.iter().zip(keys.clone()) {
            for c in 0..d {
                out[r * d + c] += p * v[j * d + c];
            }
        }
        // ∂p = w·vᵀ, ∂s = p ⊙ (∂p − Σ ∂p ⊙ p)
        let dp: Vec<f64> = keys
            .clone()
            .map(|j| (0..d).map(|c| w[r * d + c] * v[j * d + c]).sum())
            .collect();
        let dot: f64 = dp.iter().zip(&p).map(|(a, b)| a * b).sum();
        for ((&p, &dp), j) in p.iter().zip(&dp).zip(keys) {
            let ds = p * (dp - dot);
            for c in 0..d {
                dq[r * d + c] += ds * k[j * d + c];
                dk[j * d + c] += ds * q[r * d + c];
                dv[j * d + c] += p * w[r * d + c];
            }
        }
    }
    [out, dq, dk, dv]
}

#[test]
fn causal_attention_matches_f64_attention_and_its_gradients() {
    use burn::backend::Autodiff;
    use burnish_stages::model::{fused, llama::AttentionMask};
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    // (batch, kv heads, query groups, t, head_dim): three blocks of query rows, the last one
    // partial, with two query groups per head; and a single block.
    for (case, (b, kv, groups, t, d)) in [(2, 2, 2, 150, 24), (1, 3, 1, 21, 16)]
        .into_iter()
        .enumerate()
    {
        let (heads, rows) = (b * kv, groups * t);
        let seed = 300 + 10 * case as u64;
        let (qv, kv_, vv, wv) = (
            seeded(heads * rows * d, seed, 1.0),
            seeded(heads * t * d, seed + 1, 1.0),
            seeded(heads * t * d, seed + 2, 1.0),
            seeded(heads * rows * d, seed + 3, 1.0),
        );
        let leaf = |v: &Vec<f32>, n: usize| {
            Tensor::<A, 4>::from_data(TensorData::new(v.clone(), [b, kv, n, d]), &dev)
                .require_grad()
        };
        let (q, k, v) = (leaf(&qv, rows), leaf(&kv_, t), leaf(&vv, t));
        let w = Tensor::<A, 4>::from_data(TensorData::new(wv.clone(), [b, kv, rows, d]), &dev);
        let causal = AttentionMask::<A>::causal(t, groups, &dev);
        let out = fused::causal_attention(q.clone(), k.clone(), v.clone(), &causal);
        let g = (out.clone() * w).sum().backward();
        let vals = |t: TensorData| t.to_vec::<f32>().unwrap();
        let got = [
            vals(out.into_data()),
            vals(q.grad(&g).unwrap().into_data()),
            vals(k.grad(&g).unwrap().into_data()),
            vals(v.grad(&g).unwrap().into_data()),
        ];
        // Inference on plain flex takes the same kernel.
        let plain = |v: &Vec<f32>, n: usize| {
            Tensor::<Flex, 4>::from_data(TensorData::new(v.clone(), [b, kv, n, d]), &dev)
        };
        let plain_out = fused::causal_attention(
            plain(&qv, rows),
            plain(&kv_, t),
            plain(&vv, t),
            &AttentionMask::causal(t, groups, &dev),
        );
        assert_eq!(plain_out.into_data().to_vec::<f32>().unwrap(), got[0]);
        for h in 0..heads {
            let label = format!("head {h}, {b}x{kv}x{groups}x{t}x{d}");
            let inputs = [&qv[..], &kv_[..], &vv[..], &wv[..]];
            assert_head_matches_f64(&label, &got, inputs, &vec![0; t], h, [rows, t, d]);
        }
    }
}

#[test]
fn documents_restart_positions_and_see_only_their_own_document() {
    use burnish_stages::model::llama::{Documents, document_bias};
    // Row 0: three documents of 3, 4 and 2 tokens, then 2 of padding (part of the last
    // document); row 1: one document.
    let docs = Documents::new(&[&[3, 7], &[]], 11);
    let pos = docs.positions();
    assert_eq!(pos[..11], [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]);
    assert_eq!(pos[11..], (0..11).collect::<Vec<_>>());
    let seen = |b: usize, q: usize| (0..11).filter(|&k| docs.sees(b, q, k)).collect::<Vec<_>>();
    assert_eq!(seen(0, 0), [0]);
    assert_eq!(seen(0, 2), [0, 1, 2]);
    assert_eq!(seen(0, 3), [3]);
    assert_eq!(seen(0, 6), [3, 4, 5, 6]);
    assert_eq!(seen(0, 7), [7]);
    assert_eq!(seen(0, 8), [7, 8]);
    assert_eq!(seen(0, 10), [7, 8, 9, 10]);
    assert_eq!(seen(1, 6), [0, 1, 2, 3, 4, 5, 6]);
    // The composed path's bias: 0 where a query sees a key, −∞ elsewhere, for both query
    // heads of a key/value head.
    let groups = 2;
    let bias = document_bias::<B>(&docs, groups, &FlexDevice);
    assert_eq!(bias.dims(), [2, groups * 11 * 11]);
    let bias = tensor_f32(bias);
    for b in 0..2 {
        for g in 0..groups {
            for q in 0..11 {
                for k in 0..11 {
                    let v = bias[((b * groups + g) * 11 + q) * 11 + k];
                    match docs.sees(b, q, k) {
                        true => assert_eq!(v, 0.0, "row {b}, query {q}, key {k}"),
                        false => assert_eq!(v, f32::NEG_INFINITY, "row {b}, query {q}, key {k}"),
                    }
                }
            }
        }
    }
}

#[test]
fn document_attention_matches_f64_and_the_composed_path_with_gradients() {
    use burn::backend::Autodiff;
    use burnish_stages::model::{
        fused,
        llama::{AttentionMask, Documents},
    };
    type A = Autodiff<Flex>;
    let dev = FlexDevice;
    // (batch, kv heads, query groups, t, head_dim, each row's document starts): three blocks
    // of query rows with documents inside a block, across blocks, on a block boundary (64) and
    // of one token; and one block with a one-token document.
    type Case<'a> = ((usize, usize, usize, usize, usize), &'a [&'a [usize]]);
    let cases: [Case; 2] = [
        ((2, 2, 2, 150, 24), &[&[40, 64, 100, 101, 130], &[70]]),
        ((1, 3, 1, 21, 16), &[&[5, 6, 13]]),
    ];
    for (case, ((b, kv, groups, t, d), rows_starts)) in cases.into_iter().enumerate() {
        let (heads, rows) = (b * kv, groups * t);
        let seed = 400 + 10 * case as u64;
        let (qv, kv_, vv, wv) = (
            seeded(heads * rows * d, seed, 1.0),
            seeded(heads * t * d, seed + 1, 1.0),
            seeded(heads * t * d, seed + 2, 1.0),
            seeded(heads * rows * d, seed + 3, 1.0),
        );
        let docs = Documents::new(rows_starts, t);
        let vals = |t: TensorData| t.to_vec::<f32>().unwrap();
        // Output and gradients of `Σ out ⊙ w` through the fused op or the composed one.
        let run = |composed: bool| {
            let leaf = |v: &Vec<f32>, n: usize| {
                Tensor::<A, 4>::from_data(TensorData::new(v.clone(), [b, kv, n, d]), &dev)
                    .require_grad()
            };
            let (q, k, v) = (leaf(&qv, rows), leaf(&kv_, t), leaf(&vv, t));
            let w = Tensor::<A, 4>::from_data(TensorData::new(wv.clone(), [b, kv, rows, d]), &dev);
            let mask = AttentionMask::<A>::documents(docs.clone(), groups, &dev);
            let out = match composed {
                false => fused::causal_attention(q.clone(), k.clone(), v.clone(), &mask),
                true => fused::causal_attention_composed(q.clone(), k.clone(), v.clone(), &mask),
            };
            let g = (out.clone() * w).sum().backward();
            [
                vals(out.into_data()),
                vals(q.grad(&g).unwrap().into_data()),
                vals(k.grad(&g).unwrap().into_data()),
                vals(v.grad(&g).unwrap().into_data()),
            ]
        };
        let (fused_run, composed_run) = (run(false), run(true));
        // Inference on plain flex takes the same kernel.
        let plain = |v: &Vec<f32>, n: usize| {
            Tensor::<Flex, 4>::from_data(TensorData::new(v.clone(), [b, kv, n, d]), &dev)
        };
        let plain_out = fused::causal_attention(
            plain(&qv, rows),
            plain(&kv_, t),
            plain(&vv, t),
            &AttentionMask::documents(docs.clone(), groups, &dev),
        );
        assert_eq!(vals(plain_out.into_data()), fused_run[0]);
        for h in 0..heads {
            let row = h / kv;
            let first: Vec<usize> = (0..t)
                .map(|i| (0..=i).find(|&j| docs.sees(row, i, j)).unwrap())
                .collect();
            for (path, got) in [("fused", &fused_run), ("composed", &composed_run)] {
                let label = format!("{path}, head {h}, {b}x{kv}x{groups}x{t}x{d}");
                let inputs = [&qv[..], &kv_[..], &vv[..], &wv[..]];
                assert_head_matches_f64(&label, got, inputs, &first, h, [rows, t, d]);
            }
        }
        // The first token of a document sees only itself: its output is its value row.
        let (h, i) = (0, rows_starts[0][0]);
        assert!(
            max_abs_diff(
                &fused_run[0][(h * rows + i) * d..(h * rows + i + 1) * d],
                &vv[(h * t + i) * d..(h * t + i + 1) * d]
            ) < 1e-6
        );
    }
}

/// Four documents of the reference text, each alone; and a batch of the first three packed in
/// one row (longest first, as best-fit decreasing puts them) beside the fourth unpacked (padded).
fn packed_fixture(ids: &[u32]) -> (Vec<Example>, Vec<Example>) {
    let doc = |range: std::ops::Range<usize>| Example {
        ids: ids[range.clone()].to_vec(),
        targets: (0..range.len()).map(|i| i > 0).collect(),
        doc_starts: Vec::new(),
    };
    let alone = vec![doc(0..5), doc(5..12), doc(12..16), doc(16..22)];
    let row = Example {
        ids: [&alone[1], &alone[0], &alone[2]]
            .map(|e| e.ids.as_slice())
            .concat(),
        targets: [&alone[1], &alone[0], &alone[2]]
            .map(|e| e.targets.as_slice())
            .concat(),
        doc_starts: vec![7, 12],
    };
    (alone.clone(), vec![row, alone[3].clone()])
}

#[test]
fn packed_documents_score_and_train_as_they_would_alone() {
    use burn::backend::Autodiff;
    use burnish_stages::model::llama::Documents;
    use burnish_stages::train::batch::make_batch;
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixture(name);
        let net = model::load_model_dir::<B>(&dir, &FlexDevice).unwrap().model;
        let r = reference(&dir, net.config.vocab_size);
        assert!(r.ids.len() >= 22);
        let (alone, packed) = packed_fixture(&r.ids);
        // Logits: each document's positions of the packed row equal the document alone.
        let row = &packed[0];
        let docs = Documents::new(&[&row.doc_starts], row.len());
        let logits = tensor_f32(net.forward_with(ids_tensor(&row.ids), Some(&docs)));
        let v = net.config.vocab_size;
        let mut at = 0;
        for (i, ex) in [&alone[1], &alone[0], &alone[2]].into_iter().enumerate() {
            let own = tensor_f32(net.forward(ids_tensor(&ex.ids)));
            let diff = max_abs_diff(&logits[at * v..(at + ex.len()) * v], &own);
            assert!(
                diff < 1e-4,
                "{name}: document {i} packed vs alone: {diff:e}"
            );
            at += ex.len();
        }
        // The loss over target tokens (what eval_loss reports): packed rows, batched beside an
        // unpacked padded row, against each example scored alone.
        let one_by_one = alone
            .iter()
            .map(|e| score(&net, std::slice::from_ref(e), 1, 0))
            .fold((0.0, 0), |(n, c), s| (n + s.nll_sum, c + s.targets));
        let per_doc = one_by_one.0 / one_by_one.1 as f64;
        let s = score(&net, &packed, 2, 0);
        assert_eq!(s.targets, one_by_one.1);
        let diff = (s.mean_nll() - per_doc).abs();
        eprintln!("{name}: packed {} vs per-document {per_doc}", s.mean_nll());
        assert!(diff < 1e-5, "{name}: packed {} vs {per_doc}", s.mean_nll());
        // Without the documents the packed row scores differently (context across documents).
        let mut wrapped = packed.clone();
        wrapped[0].doc_starts.clear();
        let w = score(&net, &wrapped, 2, 0);
        assert!((w.mean_nll() - per_doc).abs() > 1e-3, "{}", w.mean_nll());

        // Gradients: the summed loss of the packed batch against that of the examples alone.
        type A = Autodiff<Flex>;
        let grads = |examples: &[Example], rows: usize| {
            let net = model::load_model_dir::<A>(&dir, &FlexDevice).unwrap().model;
            let mut total = Vec::new();
            let mut loss = 0.0;
            for chunk in examples.chunks(rows) {
                let refs: Vec<&Example> = chunk.iter().collect();
                let batch = make_batch::<A>(&refs, 0, &FlexDevice);
                let (nll, w) = net.token_nll_with(batch.ids, batch.targets, batch.docs.as_ref());
                let l = (nll * w).sum();
                loss += tensor_f32(l.clone())[0] as f64;
                let g = l.backward();
                let layer = &net.model.layers[0];
                let parts = [
                    layer.self_attn.q_proj.weight.val(),
                    layer.self_attn.k_proj.weight.val(),
                    net.model.layers[1].mlp.down_proj.weight.val(),
                ];
                let flat: Vec<f32> = parts
                    .iter()
                    .flat_map(|p| p.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap())
                    .collect();
                if total.is_empty() {
                    total = flat;
                } else {
                    total.iter_mut().zip(flat).for_each(|(a, b)| *a += b);
                }
            }
            (loss, total)
        };
        let (l_packed, g_packed) = grads(&packed, 2);
        let (l_alone, g_alone) = grads(&alone, 1);
        assert!(
            (l_packed - l_alone).abs() < 1e-4,
            "{name}: loss {l_packed} vs {l_alone}"
        );
        let scale = g_alone.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&g_packed, &g_alone);
        assert!(
            scale > 0.0 && diff < 1e-4 * scale.max(1.0),
            "{name}: grad {diff:e} of {scale:e}"
        );
    }
}
