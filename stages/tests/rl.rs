//! GRPO on a real model: the loss the loop trains on equals the hand-worked value of its
//! definition, its gradient equals the gradient of the surrogate Σ −A·logp / normalizer with
//! the log-probs computed independently (one unpadded row at a time, a plain log-softmax of
//! temperature-scaled logits); rollouts are the same whatever the decoding batch, with
//! group-relative advantages and the reference's per-token log-probs in place.

use std::path::PathBuf;
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burn::module::AutodiffModule;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burnish_stages::generate::Sampling;
use burnish_stages::model::{self, CausalLm};
use burnish_stages::rl::grpo::{LossType, ScaleRewards};
use burnish_stages::rl::rewards::{Reward, RewardKind, RewardSpec};
use burnish_stages::rl::rollout::{GrpoItem, GrpoObjective, PromptItem, Sample};
use burnish_stages::text::TextTokenizer;
use burnish_stages::train::Objective;

type AD = Autodiff<Flex>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/tiny-llama")
}

fn objective(loss_type: LossType, temperature: f64, rewards: Vec<Reward>) -> GrpoObjective {
    GrpoObjective {
        tok: TextTokenizer::from_dir(&fixture()).unwrap(),
        rewards,
        stop: Vec::new(),
        eos: vec![2],
        pad: 0,
        sampling: Sampling {
            do_sample: true,
            temperature,
            ..Sampling::default()
        },
        num_generations: 3,
        max_completion_length: 4,
        generation_batch_size: 4,
        scale_rewards: ScaleRewards::Group,
        beta: 0.0,
        epsilon: 0.2,
        epsilon_high: 0.2,
        loss_type,
        bias_correction_kl: true,
        mask_truncated_completions: false,
        num_iterations: 1,
        grad_accum: 1,
        seed: 11,
        log_completions_every: None,
        shuffle_advantages: false,
    }
}

fn prompt(ids: &[u32]) -> PromptItem {
    PromptItem {
        record: 1,
        ids: ids.to_vec(),
        text: String::new(),
        answer: None,
    }
}

/// Three samples: (prompt, completion, advantage); 6 completion tokens in all.
fn samples() -> Vec<GrpoItem> {
    let rows: [(&[u32], &[u32], f64); 3] = [
        (&[5, 17, 40], &[33, 8, 61], 1.0),
        (&[9, 3], &[70], -0.5),
        (&[12, 44, 7, 19], &[25, 2], 0.25),
    ];
    rows.iter()
        .map(|(p, c, a)| GrpoItem {
            prompt: Arc::new(prompt(p)),
            sample: Some(Sample {
                completion: c.to_vec(),
                active: true,
                advantage: *a,
                old: None,
                reference: None,
                rollout_tokens: 6.0,
            }),
        })
        .collect()
}

/// log p(completion token) for one sample on its own row, from `softmax(logits / t)`.
fn independent_logps<B: Backend>(m: &CausalLm<B>, item: &GrpoItem, t: f64) -> Tensor<B, 1> {
    let s = item.sample.as_ref().unwrap();
    let ids: Vec<i64> = item
        .prompt
        .ids
        .iter()
        .chain(&s.completion)
        .map(|&x| x as i64)
        .collect();
    let n = ids.len();
    let dev = m.model.embed_tokens.weight.val().device();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &dev);
    let lp = log_softmax(m.forward(ids.clone()) / t, 2); // [1, n, vocab]
    let p = item.prompt.ids.len();
    let c = s.completion.len();
    let next = ids.narrow(1, p, c).unsqueeze_dim::<3>(2); // [1, c, 1]
    lp.narrow(1, p - 1, c).gather(2, next).reshape([c])
}

fn load() -> CausalLm<AD> {
    model::load::<AD>(&fixture(), &FlexDevice).unwrap().model
}

fn scalar<B: Backend>(x: Tensor<B, 1>) -> f64 {
    x.into_data().to_vec::<f32>().unwrap()[0] as f64
}

#[test]
fn grpo_loss_and_gradient_on_a_model_match_the_definition() {
    let net = load();
    let items = samples();
    let refs: Vec<&GrpoItem> = items.iter().collect();
    // With one iteration ρ ≡ 1, so each token's loss is −A:
    //   grpo: mean over rows of −A = −(1 − 0.5 + 0.25)/3 = −0.25
    //   dapo: Σ −A·tokens / 6 = −(3 − 0.5 + 0.5)/6 = −0.5
    //   dr_grpo: Σ −A·tokens / (3 rows · 4) = −3/12 = −0.25
    for (lt, want, weights) in [
        (LossType::Grpo, -0.25, [1.0 / 9.0, 1.0 / 3.0, 1.0 / 6.0]),
        (LossType::Dapo, -0.5, [1.0 / 6.0; 3]),
        (LossType::DrGrpo, -0.25, [1.0 / 12.0; 3]),
    ] {
        let obj = objective(lt, 0.7, Vec::new());
        let (loss, metrics) = obj.loss(&net, &refs);
        let got = scalar(loss.clone());
        assert!((got - want).abs() < 1e-6, "{lt:?}: loss {got}, want {want}");
        assert!(metrics["entropy"] > 0.0);
        assert_eq!(metrics["clip_ratio/region_mean"], 0.0);

        // Its gradient is that of Σ_i −A_i · w_i · Σ_t logp_i,t (w_i the row's normalizer).
        let mut surrogate = Tensor::<AD, 1>::zeros([1], &FlexDevice);
        for (item, w) in items.iter().zip(weights) {
            let a = item.sample.as_ref().unwrap().advantage;
            surrogate = surrogate + independent_logps(&net, item, 0.7).sum() * (-a * w);
        }
        let g1 = loss.backward();
        let g2 = surrogate.backward();
        let w = &net.model.layers[0].self_attn.q_proj.weight;
        let a: Vec<f32> = w.grad(&g1).unwrap().into_data().to_vec().unwrap();
        let b: Vec<f32> = w.grad(&g2).unwrap().into_data().to_vec().unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 1e-6, "{lt:?}: the gradient is zero");
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "{lt:?}: gradients differ by {worst} (scale {scale})"
        );
    }
}

#[test]
fn a_masked_truncated_completion_adds_nothing() {
    let net = load();
    let mut items = samples();
    items[0].sample.as_mut().unwrap().active = false;
    let refs: Vec<&GrpoItem> = items.iter().collect();
    // dapo over the two remaining rows' tokens, normalizer still the given 6:
    // −(−0.5·1 + 0.25·2)/6 = 0
    let (loss, _) = objective(LossType::Dapo, 1.0, Vec::new()).loss(&net, &refs);
    assert!(scalar(loss).abs() < 1e-7);
    // grpo: the inactive row's mean is 0/max(0,1) = 0: −(0 − 0.5 + 0.25)/3 = 1/12
    let (loss, _) = objective(LossType::Grpo, 1.0, Vec::new()).loss(&net, &refs);
    assert!((scalar(loss) - 1.0 / 12.0).abs() < 1e-6);
}

fn length_reward() -> Reward {
    // −|tokens − 2|: completions of different lengths get different rewards.
    let spec: RewardSpec = serde_json::from_value(serde_json::json!({
        "kind": "length", "target": 2, "penalty": 1.0
    }))
    .unwrap();
    assert_eq!(spec.kind, RewardKind::Length);
    Reward::new(spec, None).unwrap()
}

#[test]
fn rollouts_do_not_depend_on_the_decoding_batch_and_carry_advantages_and_reference() {
    let policy = load().valid();
    let drawn_items: Vec<GrpoItem> = [&[5u32, 17, 40][..], &[9, 3], &[12, 44, 7, 19], &[8]]
        .iter()
        .map(|p| GrpoItem::prompt(prompt(p)))
        .collect();
    let drawn: Vec<Vec<&GrpoItem>> = vec![
        drawn_items[..2].iter().collect(),
        drawn_items[2..].iter().collect(),
    ];
    let mut obj = objective(LossType::Grpo, 1.0, vec![length_reward()]);
    obj.beta = 0.04;
    // Many ids end a completion, so that lengths (and rewards) vary.
    obj.eos = (0..200).collect();
    obj.generation_batch_size = 1;
    let a = obj.rollout(&policy, Some(&policy), 3, &drawn).unwrap();
    obj.generation_batch_size = 5;
    let b = obj.rollout(&policy, Some(&policy), 3, &drawn).unwrap();
    let c = obj.rollout(&policy, Some(&policy), 4, &drawn).unwrap();
    let completions = |r: &burnish_stages::train::Rollout<GrpoItem>| -> Vec<Vec<u32>> {
        r.micro
            .iter()
            .flatten()
            .map(|i| i.sample.as_ref().unwrap().completion.clone())
            .collect()
    };
    assert_eq!(a.micro.len(), 2);
    assert!(a.micro.iter().all(|m| m.len() == 2 * 3));
    assert_eq!(completions(&a), completions(&b));
    assert_ne!(
        completions(&a),
        completions(&c),
        "another step samples anew"
    );

    let all: Vec<&GrpoItem> = a.micro.iter().flatten().collect();
    for (k, group) in all.chunks(3).enumerate() {
        assert!(Arc::ptr_eq(&group[0].prompt, &drawn_items[k].prompt));
        let adv: Vec<f64> = group
            .iter()
            .map(|i| i.sample.as_ref().unwrap().advantage)
            .collect();
        assert!(adv.iter().sum::<f64>().abs() < 1e-9, "group {k}: {adv:?}");
        for item in group {
            let s = item.sample.as_ref().unwrap();
            let r = -((s.completion.len() as f64) - 2.0).abs();
            assert!((-4.0..=0.0).contains(&r));
            let want: Vec<f32> = independent_logps(&policy, item, 1.0)
                .into_data()
                .to_vec()
                .unwrap();
            let got = s.reference.as_ref().unwrap();
            assert_eq!(got.len(), want.len());
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "reference {got:?}, want {want:?}");
            }
        }
    }
    let mean_len = all
        .iter()
        .map(|i| i.sample.as_ref().unwrap().completion.len() as f64)
        .sum::<f64>()
        / all.len() as f64;
    assert!((a.metrics["completions/mean_length"] - mean_len).abs() < 1e-9);
    assert!(a.metrics["reward"] <= 0.0);
}
