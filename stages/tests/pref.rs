//! Preference objectives on fixed log-probs, against values worked out by hand (each case shows
//! its arithmetic), then gradients of a tiny model against finite differences.

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burn::tensor::{Tensor, TensorData};
use burnish_stages::pref::losses::{DpoLoss, dpo, kto, kto_balance, orpo};

type B = Flex;

fn t(v: &[f64]) -> Tensor<B, 1> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), &FlexDevice)
}

fn vals(x: Tensor<B, 1>) -> Vec<f64> {
    x.into_data()
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "got {got:?}, want {want:?}");
    }
}

// Policy/reference log-probs of three pairs, β = 0.1:
//   pair 0: δ = (−10 − −12) − (−15 − −14) = 2 − (−1) = 3
//   pair 1: δ = (−20 − −19) − (−18 − −18.5) = −1 − 0.5 = −1.5
//   pair 2: δ = (−5 − −5.5) − (−6 − −5) = 0.5 − (−1) = 1.5
fn pairs() -> [Tensor<B, 1>; 4] {
    [
        t(&[-10.0, -20.0, -5.0]),
        t(&[-15.0, -18.0, -6.0]),
        t(&[-12.0, -19.0, -5.5]),
        t(&[-14.0, -18.5, -5.0]),
    ]
}

#[test]
fn dpo_sigmoid_is_minus_log_sigmoid_of_beta_delta() {
    let [pc, pr, rc, rr] = pairs();
    let out = dpo(pc, pr, rc, rr, 0.1, DpoLoss::Sigmoid, 0.0);
    // −log σ(0.3) = log(1 + e^−0.3) = 0.554355; −log σ(−0.15) = log(1 + e^0.15) = 0.770957;
    // −log σ(0.15) = 0.620957
    close(&vals(out.losses), &[0.5543552, 0.7709570, 0.6209570]);
    // rewards: β·(π − ref): chosen 0.1·2, 0.1·(−1), 0.1·0.5; rejected 0.1·(−1), 0.1·0.5, 0.1·(−1)
    close(&vals(out.chosen_rewards), &[0.2, -0.1, 0.05]);
    close(&vals(out.rejected_rewards), &[-0.1, 0.05, -0.1]);
}

#[test]
fn dpo_hinge_ipo_and_robust() {
    let [pc, pr, rc, rr] = pairs();
    let h = dpo(
        pc.clone(),
        pr.clone(),
        rc.clone(),
        rr.clone(),
        0.1,
        DpoLoss::Hinge,
        0.0,
    );
    // max(0, 1 − 0.1δ): 1 − 0.3, 1 + 0.15, 1 − 0.15
    close(&vals(h.losses), &[0.7, 1.15, 0.85]);
    let i = dpo(
        pc.clone(),
        pr.clone(),
        rc.clone(),
        rr.clone(),
        0.1,
        DpoLoss::Ipo,
        0.0,
    );
    // (δ − 1/(2·0.1))² = (δ − 5)²: (3−5)², (−1.5−5)², (1.5−5)²
    close(&vals(i.losses), &[4.0, 42.25, 12.25]);
    let r = dpo(pc, pr, rc, rr, 0.1, DpoLoss::Robust, 0.1);
    // [0.9·(−log σ(βδ)) + 0.1·log σ(−βδ)] / 0.8, e.g. pair 0: (0.9·0.554355 + 0.1·(−0.854355))/0.8
    close(&vals(r.losses), &[0.5168552, 0.7897070, 0.6022070]);
}

#[test]
fn kto_uses_the_detached_mismatched_kl_and_the_weights() {
    // Four examples, desirable, undesirable, desirable, undesirable; β = 0.1, λ_U = 2.
    // Mismatched ratios: 0.5, −1, 0.5, 0.5 → mean 0.125 = z.
    // Δ = 1, −1, 0, 1:
    //   0 desirable:   1 − σ(0.1·(1 − 0.125))  = 0.478139
    //   1 undesirable: 2·(1 − σ(0.1·(0.125 + 1))) = 0.943809
    //   2 desirable:   1 − σ(0.1·(0 − 0.125))  = 0.503125
    //   3 undesirable: 2·(1 − σ(0.1·(0.125 − 1))) = 1.043722
    let out = kto(
        t(&[-10.0, -20.0, -5.0, -8.0]),
        t(&[-11.0, -19.0, -5.0, -9.0]),
        t(&[-12.0, -22.0, -9.0, -7.0]),
        t(&[-12.5, -21.0, -9.5, -7.5]),
        t(&[1.0, 0.0, 1.0, 0.0]),
        0.1,
        1.0,
        2.0,
    );
    close(&vals(out.kl), &[0.125]);
    close(
        &vals(out.losses),
        &[0.4781389, 0.9438093, 0.5031250, 1.0437221],
    );
    close(&vals(out.rewards), &[0.1, -0.1, 0.0, 0.1]);

    // A negative mismatched mean clamps z to 0.
    let out = kto(
        t(&[-1.0, -1.0]),
        t(&[-1.0, -1.0]),
        t(&[-3.0, -3.0]),
        t(&[-1.0, -1.0]),
        t(&[1.0, 0.0]),
        0.1,
        1.0,
        1.0,
    );
    close(&vals(out.kl), &[0.0]);
    // Δ = 0, z = 0: 1 − σ(0) = 0.5 for both.
    close(&vals(out.losses), &[0.5, 0.5]);
}

#[test]
fn kto_balance_follows_the_paper_range() {
    // The seed data: 746 desirable, 254 undesirable. 746/254 = 2.937 > 4/3, so λ_U is raised
    // until 746 / (λ_U·254) = 4/3: λ_U = 746 / (254·4/3) = 2.202756.
    let (d, u) = kto_balance(746, 254);
    assert_eq!(d, 1.0);
    assert!((u - 2.202756).abs() < 1e-6, "{u}");
    // In range already: unchanged.
    assert_eq!(kto_balance(120, 100), (1.0, 1.0));
    // Too few desirable: λ_D = 300/100 = 3 gives a ratio of exactly 1.
    assert_eq!(kto_balance(100, 300), (3.0, 1.0));
}

#[test]
fn orpo_log_odds_on_mean_log_probs() {
    // log_odds = (lw − ll) − (log(1 − e^lw) − log(1 − e^ll))
    //   pair 0: lw = −0.5, ll = −0.9: 0.4 − (log(1 − 0.606531) − log(1 − 0.406570)) = 0.810917
    //   pair 1: lw = −1.2, ll = −0.7: −0.5 − (log(0.698806) − log(0.503415)) = −0.827959
    // ratio loss = −0.1·log σ(log_odds): 0.036773, 0.119047
    let out = orpo(t(&[-0.5, -1.2]), t(&[-0.9, -0.7]), 0.1);
    close(&vals(out.log_odds), &[0.8109167, -0.8279586]);
    close(&vals(out.ratio_losses), &[0.0367729, 0.1190475]);
}

// ---------------------------------------------------------------------------------------------
// gradients of the objectives through a tiny model, against central finite differences

mod finite_differences {
    use std::collections::BTreeMap;
    use std::path::Path;

    use burn::backend::flex::FlexDevice;
    use burn::backend::{Autodiff, Flex};
    use burn::module::Param;
    use burn::tensor::{Tensor, TensorData};
    use burnish_stages::data::records::{LabeledRecord, Message, PreferenceRecord};
    use burnish_stages::model::{self, CausalLm, LoraParams, LoraTarget, lora};
    use burnish_stages::pref::data::{encode_labeled, encode_pairs};
    use burnish_stages::pref::losses::DpoLoss;
    use burnish_stages::pref::objectives::{
        DpoObjective, KtoObjective, OrpoNll, OrpoObjective, fill_reference,
    };
    use burnish_stages::text::{ChatTemplate, TemplateChoice, TextTokenizer};
    use burnish_stages::train::Objective;

    type AD = Autodiff<Flex>;

    fn policy() -> CausalLm<AD> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/tiny-llama");
        let base = model::load_model_dir::<AD>(&dir, &FlexDevice)
            .unwrap()
            .model;
        let p = LoraParams {
            rank: 2,
            alpha: Some(4.0),
            dropout: 0.0,
            targets: vec![LoraTarget::QProj, LoraTarget::VProj],
        };
        let mut m = lora::inject(base, &p, 5);
        // Non-zero B so that the policy differs from the reference.
        for layer in m.model.layers.iter_mut() {
            for lin in [&mut layer.self_attn.q_proj, &mut layer.self_attn.v_proj] {
                let l = lin.lora.as_mut().unwrap();
                let [o, r] = l.b.val().dims();
                let v: Vec<f32> = (0..o * r)
                    .map(|i| ((i * 29 % 13) as f32 - 6.0) * 0.02)
                    .collect();
                l.b =
                    Param::from_tensor(Tensor::from_data(TensorData::new(v, [o, r]), &FlexDevice));
            }
        }
        m
    }

    fn with_b(m: &CausalLm<AD>, idx: usize, delta: f32) -> CausalLm<AD> {
        let mut m = m.clone();
        let l = m.model.layers[0].self_attn.v_proj.lora.as_mut().unwrap();
        let [o, r] = l.b.val().dims();
        let mut v = l.b.val().into_data().to_vec::<f32>().unwrap();
        v[idx] += delta;
        l.b = Param::from_tensor(Tensor::from_data(TensorData::new(v, [o, r]), &FlexDevice));
        m
    }

    fn tok() -> (TextTokenizer, ChatTemplate) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/tiny-llama");
        let t = TextTokenizer::from_dir(&dir).unwrap();
        let c = ChatTemplate::resolve(TemplateChoice::Chatml, &t).unwrap();
        (t, c)
    }

    /// d loss / d B[0][v_proj][idx] by autodiff and by (L(b+h) − L(b−h)) / 2h, for a few idx.
    fn check<O: Objective>(o: &O, items: &[O::Item], what: &str) {
        let m = policy();
        let refs: Vec<&O::Item> = items.iter().collect();
        let (loss, _) = o.loss(&m, &refs);
        let grads = loss.backward();
        let b = m.model.layers[0]
            .self_attn
            .v_proj
            .lora
            .as_ref()
            .unwrap()
            .b
            .val();
        let g = b.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let h = 1e-2f32;
        let value = |mm: &CausalLm<AD>| -> f64 {
            let (l, _) = o.loss(mm, &refs);
            f64::from(l.into_data().to_vec::<f32>().unwrap()[0])
        };
        let mut checked = BTreeMap::new();
        for idx in [0usize, 7, 40, 63] {
            let fd = (value(&with_b(&m, idx, h)) - value(&with_b(&m, idx, -h))) / (2.0 * h as f64);
            let ad = f64::from(g[idx]);
            assert!(
                (ad - fd).abs() <= 2e-3 + 0.03 * fd.abs(),
                "{what}: d/dB[{idx}] autodiff {ad:e} vs finite difference {fd:e}"
            );
            checked.insert(idx, (ad, fd));
        }
        assert!(
            checked.values().any(|(ad, _)| ad.abs() > 1e-3),
            "{what}: gradients all ~0, the check proves nothing: {checked:?}"
        );
    }

    fn msg(role: &str, text: &str) -> Message {
        serde_json::from_value(serde_json::json!({"role": role, "content": text})).unwrap()
    }

    fn pairs() -> Vec<burnish_stages::pref::data::PairItem> {
        let (t, c) = tok();
        let recs: Vec<PreferenceRecord> = [
            (
                "What is the capital of France?",
                "Paris.",
                "Tokyo, I think.",
            ),
            ("Reverse \"abc\".", "cba", "abc"),
            ("Compute 2 + 2.", "2 + 2 = 4.", "2 + 2 = 5."),
        ]
        .iter()
        .map(|(p, ch, rj)| PreferenceRecord {
            prompt: vec![msg("user", p)],
            chosen: vec![msg("assistant", ch)],
            rejected: vec![msg("assistant", rj)],
            meta: Default::default(),
        })
        .collect();
        let mut items = encode_pairs(&t, &c, &recs, 64).unwrap().items;
        let reference = lora::without_adapters(policy());
        fill_reference(&reference, &mut items, 4, 0);
        items
    }

    #[test]
    fn dpo_gradients_match_finite_differences() {
        let items = pairs();
        for loss in [
            DpoLoss::Sigmoid,
            DpoLoss::Ipo,
            DpoLoss::Hinge,
            DpoLoss::Robust,
        ] {
            let o = DpoObjective {
                beta: 0.5,
                loss,
                label_smoothing: if loss == DpoLoss::Robust { 0.1 } else { 0.0 },
                pad: 0,
            };
            check(&o, &items, &format!("dpo {loss:?}"));
        }
    }

    #[test]
    fn orpo_gradients_match_finite_differences() {
        check(
            &OrpoObjective {
                beta: 0.5,
                nll: OrpoNll::AllTokens,
                pad: 0,
            },
            &pairs(),
            "orpo",
        );
    }

    #[test]
    fn kto_gradients_match_finite_differences() {
        let (t, c) = tok();
        let recs: Vec<LabeledRecord> = [
            ("What is 2 × 7?", "2 × 7 = 14.", true),
            ("What is 4 × 9?", "4 × 9 = 39.", false),
            ("What is 5 × 10?", "5 × 10 = 50.", true),
            ("What is 3 × 3?", "3 × 3 = 6.", false),
        ]
        .iter()
        .map(|(p, comp, label)| LabeledRecord {
            prompt: vec![msg("user", p)],
            completion: vec![msg("assistant", comp)],
            label: *label,
            meta: Default::default(),
        })
        .collect();
        let mut items = encode_labeled(&t, &c, &recs, 64).unwrap().items;
        let reference = lora::without_adapters(policy());
        fill_reference(&reference, &mut items, 4, 0);
        // The KL estimate z is detached: the gradient treats it as a constant, while a finite
        // difference would move it too. Raise the mismatched reference log-probs so the
        // estimate clamps to 0 (locally constant) and the two must agree.
        for i in items.iter_mut() {
            if let Some((_, m)) = i.reference.as_mut() {
                m.sum += 100.0;
            }
        }
        let o = KtoObjective {
            beta: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.5,
            pad: 0,
        };
        check(&o, &items, "kto");
    }
}
