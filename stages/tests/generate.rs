//! Generation held against transformers and against the model's own full forward pass.
//!
//! `fixtures/models/*/generation.json` (written by `fixtures/models/make_models.py`) holds
//! transformers' greedy `generate` ids for prompts alone, as one left-padded batch, and for a
//! prompt stopped early by an end-of-sequence id.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use burnish_stages::generate::sampler::{self, Sampling};
use burnish_stages::generate::{Completion, DecodeOptions, Finish, Request, generate};
use burnish_stages::model::{self, CausalLm, fused};
use rand::Rng;
use serde_json::Value;

type B = Flex;

const MODELS: [&str; 2] = ["tiny-llama", "tiny-qwen2"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/models")
        .join(name)
}

fn load(name: &str) -> CausalLm<B> {
    model::load_model_dir::<B>(&fixture(name), &FlexDevice)
        .unwrap()
        .model
}

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("generation.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn requests(prompts: &[Vec<u32>]) -> Vec<Request> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            prompt_index: i,
            sample_index: 0,
        })
        .collect()
}

fn options(max_new: usize, eos: Vec<u32>, batch_size: usize) -> DecodeOptions {
    DecodeOptions {
        sampling: Sampling::default(),
        max_new_tokens: max_new,
        eos,
        pad: 0,
        seed: 7,
        batch_size,
    }
}

fn run(net: &CausalLm<B>, reqs: &[Request], opts: &DecodeOptions) -> Vec<Completion> {
    generate(net, reqs, opts, &|_| false, &mut |_, _| true)
}

#[test]
fn greedy_ids_equal_transformers_alone_batched_and_stopped_early() {
    for name in MODELS {
        let net = load(name);
        let r = reference(name);
        let prompts: Vec<Vec<u32>> = r["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let max_new = r["max_new_tokens"].as_u64().unwrap() as usize;
        let eos = ids(&r["eos"]);
        let alone: Vec<Vec<u32>> = r["alone"].as_array().unwrap().iter().map(ids).collect();
        let batched: Vec<Vec<u32>> = r["batched"].as_array().unwrap().iter().map(ids).collect();
        let reqs = requests(&prompts);
        for (i, req) in reqs.iter().enumerate() {
            let got = run(
                &net,
                std::slice::from_ref(req),
                &options(max_new, eos.clone(), 1),
            );
            assert_eq!(got[0].tokens, alone[i], "{name}: prompt {i} alone");
            let finish = if alone[i].last().is_some_and(|t| eos.contains(t)) {
                Finish::Stop
            } else {
                Finish::Length
            };
            assert_eq!(got[0].finish, finish, "{name}: prompt {i}");
        }
        let got = run(&net, &reqs, &options(max_new, eos.clone(), reqs.len()));
        let got: Vec<Vec<u32>> = got.into_iter().map(|c| c.tokens).collect();
        assert_eq!(got, batched, "{name}: left-padded batch");

        let early = &r["early_stop"];
        let i = early["prompt"].as_u64().unwrap() as usize;
        let got = run(&net, &reqs[i..=i], &options(max_new, ids(&early["eos"]), 1));
        assert_eq!(got[0].tokens, ids(&early["tokens"]), "{name}: early stop");
        assert_eq!(got[0].finish, Finish::Stop);
        assert!(got[0].tokens.len() < max_new);
    }
}

/// The last position's logits of a full forward pass over `ids`.
fn full_last_logits(net: &CausalLm<B>, ids: &[u32]) -> Vec<f32> {
    let t = ids.len();
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, t]), &FlexDevice);
    net.forward(x)
        .narrow(1, t - 1, 1)
        .into_data()
        .into_vec::<f32>()
        .unwrap()
}

#[test]
fn cached_decoding_gives_the_full_forward_logits_of_each_row() {
    for name in MODELS {
        let net = load(name);
        let prompts: [Vec<u32>; 3] = [vec![5, 17, 99, 3, 250, 41, 8], vec![300], vec![12, 13, 14]];
        let t = prompts.iter().map(Vec::len).max().unwrap();
        let pads: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
        let mut data = Vec::new();
        for (p, &pad) in prompts.iter().zip(&pads) {
            data.extend(std::iter::repeat_n(0i64, pad));
            data.extend(p.iter().map(|&i| i as i64));
        }
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [3, t]), &FlexDevice);
        let steps = 6;
        let (mut logits, mut cache) = net.prefill(x, &pads, steps);
        let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
        let vocab = net.config.vocab_size;
        let mut worst = 0.0f32;
        for step in 0..=steps {
            let host = logits.into_data().into_vec::<f32>().unwrap();
            let mut next = Vec::new();
            for (row, seq) in seqs.iter_mut().enumerate() {
                let l = &host[row * vocab..(row + 1) * vocab];
                let full = full_last_logits(&net, seq);
                for (a, b) in l.iter().zip(&full) {
                    worst = worst.max((a - b).abs());
                }
                // Feed a token that is not the greedy one too, so rows differ.
                let tok = (sampler::argmax(l) + row as u32 * 7) % vocab as u32;
                seq.push(tok);
                next.push(tok as i64);
            }
            if step == steps {
                break;
            }
            let x = Tensor::<B, 2, Int>::from_data(TensorData::new(next, [3, 1]), &FlexDevice);
            logits = net.decode(x, &mut cache);
        }
        assert!(worst < 1e-4, "{name}: cached logits differ by {worst}");
        assert_eq!(cache.len(), t + steps);
    }
}

#[test]
fn flex_decode_attention_equals_the_composed_one() {
    let device = FlexDevice;
    let (b, h, g, d, cap, len) = (3, 2, 4, 16, 12, 9);
    let q = Tensor::<B, 4>::random([b, h, g, d], Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<B, 4>::random([b, h, cap, d], Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::<B, 4>::random([b, h, cap, d], Distribution::Normal(0.0, 1.0), &device);
    let firsts = [0, 3, 8];
    let fast = fused::decode_attention(q.clone(), &k, &v, len, &firsts);
    let slow = fused::decode_attention_composed(q, &k, &v, len, &firsts);
    let (fast, slow) = (
        fast.into_data().into_vec::<f32>().unwrap(),
        slow.into_data().into_vec::<f32>().unwrap(),
    );
    let worst = fast
        .iter()
        .zip(&slow)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "decode kernel differs by {worst}");
}

#[test]
fn sampled_completions_do_not_depend_on_the_batch() {
    let net = load("tiny-llama");
    let prompts = [vec![5, 17, 99], vec![300, 2, 7, 7, 9], vec![12]];
    let mut reqs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for s in 0..2 {
            reqs.push(Request {
                prompt: p.clone(),
                prompt_index: i,
                sample_index: s,
            });
        }
    }
    let mut opts = options(12, vec![2], 1);
    opts.sampling = Sampling {
        do_sample: true,
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        min_p: 0.01,
        repetition_penalty: 1.1,
    };
    let one = run(&net, &reqs, &opts);
    opts.batch_size = 4;
    let four = run(&net, &reqs, &opts);
    opts.batch_size = 6;
    let six = run(&net, &reqs, &opts);
    let tokens = |c: &[Completion]| c.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(tokens(&one), tokens(&four));
    assert_eq!(tokens(&one), tokens(&six));
    // Two samples of one prompt differ (a different stream), and a sampled completion is not
    // the greedy one.
    assert_ne!(one[0].tokens, one[1].tokens);
    for (a, b) in one.iter().zip(&six) {
        assert!((a.logprob - b.logprob).abs() < 1e-4);
    }
}

/// Draw `n` tokens from `logits` under `s`, each with a fresh uniform.
fn counts(logits: &[f32], s: &Sampling, n: usize) -> Vec<usize> {
    let mut rng = sampler::row_rng(11, 0, 0);
    let mut c = vec![0; logits.len()];
    for _ in 0..n {
        let mut l = logits.to_vec();
        let tok = sampler::choose(&mut l, &[], s, &mut rng);
        c[tok as usize] += 1;
    }
    c
}

/// The distribution `s` should sample from, computed here from the definitions: temperature,
/// then top-k, top-p (smallest set of most likely tokens reaching p) and min-p, renormalized.
fn expected(logits: &[f32], s: &Sampling) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&x| x as f64 / s.temperature).collect();
    let soft = |keep: &[bool]| {
        let m = scaled.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = scaled
            .iter()
            .zip(keep)
            .map(|(x, k)| if *k { (x - m).exp() } else { 0.0 })
            .collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|v| v / z).collect::<Vec<f64>>()
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a])); // descending
    let mut keep = vec![true; logits.len()];
    if s.top_k > 0 {
        for &i in &order[s.top_k..] {
            keep[i] = false;
        }
    }
    let p = soft(&keep);
    let mut cum = 0.0;
    let mut reached = false;
    for &i in &order {
        if !keep[i] {
            continue;
        }
        if reached {
            keep[i] = false;
        }
        cum += p[i];
        reached |= cum >= s.top_p;
    }
    let p = soft(&keep);
    let top = p.iter().cloned().fold(0.0, f64::max);
    for i in 0..p.len() {
        if p[i] < s.min_p * top {
            keep[i] = false;
        }
    }
    soft(&keep)
}

#[test]
fn sampled_token_frequencies_match_the_filtered_softmax() {
    let mut rng = sampler::row_rng(3, 0, 0);
    let logits: Vec<f32> = (0..12).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
    let n = 40_000;
    let cases = [
        Sampling {
            do_sample: true,
            temperature: 0.7,
            ..Sampling::default()
        },
        Sampling {
            do_sample: true,
            top_k: 4,
            ..Sampling::default()
        },
        Sampling {
            do_sample: true,
            temperature: 1.3,
            top_p: 0.6,
            ..Sampling::default()
        },
        Sampling {
            do_sample: true,
            min_p: 0.3,
            ..Sampling::default()
        },
    ];
    for s in &cases {
        let got = counts(&logits, s, n);
        let want = expected(&logits, s);
        for (i, (&c, &p)) in got.iter().zip(&want).enumerate() {
            let mean = p * n as f64;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (c as f64 - mean).abs() <= 4.0 * sd + 1e-9,
                "{s:?}: token {i} drawn {c} times, expected {mean:.1} ± {sd:.1}"
            );
            if p == 0.0 {
                assert_eq!(c, 0, "{s:?}: token {i} is filtered out");
            }
        }
    }
}
