//! Training semantics held to the numbers of transformers, TRL and torch, saved by
//! `fixtures/pref/make_reference.py` in `fixtures/pref/reference.json`: completion log-probs
//! after a multi-turn prompt, KTO's mismatched companions and KL estimate, ORPO's loss and NLL on
//! a fixed batch, which parameters AdamW decays, and the warmup schedules.

use std::path::{Path, PathBuf};

use burn::backend::flex::FlexDevice;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burnish_stages::data::records::{LabeledRecord, Message, PreferenceRecord};
use burnish_stages::model::{self, CausalLm};
use burnish_stages::pref::data::{encode_labeled, encode_pairs, logprobs, mismatched_indices};
use burnish_stages::pref::objectives::{KtoObjective, OrpoNll, OrpoObjective, fill_reference};
use burnish_stages::text::{ChatTemplate, TemplateChoice, TextTokenizer};
use burnish_stages::train::Objective;
use burnish_stages::train::optim::{Schedule, decays, lr_at};
use serde_json::Value;

type AD = Autodiff<Flex>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("pref/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str) -> CausalLm<AD> {
    model::load_model_dir::<AD>(&fixtures().join("models").join(name), &FlexDevice)
        .unwrap()
        .model
}

fn tok() -> (TextTokenizer, ChatTemplate) {
    let t = TextTokenizer::from_dir(&fixtures().join("models/tiny-llama")).unwrap();
    let c = ChatTemplate::resolve(TemplateChoice::Chatml, &t).unwrap();
    (t, c)
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn msg(role: &str, text: &str) -> Message {
    serde_json::from_value(serde_json::json!({"role": role, "content": text})).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn completion_log_probs_count_the_completion_only_after_a_multi_turn_prompt() {
    let r = reference();
    let (t, c) = tok();
    let net = load("tiny-llama").valid();
    for case in ["one_turn", "three_turns"] {
        let x = &r["multi_turn"][case];
        let rec = PreferenceRecord {
            prompt: messages(&x["prompt"]),
            chosen: messages(&x["chosen"]),
            rejected: messages(&x["rejected"]),
            meta: Default::default(),
        };
        let items = encode_pairs(&t, &c, &[rec], 256).unwrap().items;
        let seqs = [&items[0].chosen, &items[0].rejected];
        let lp = logprobs(&net, &seqs, 2, 0);
        for (side, got) in [("chosen", lp[0]), ("rejected", lp[1])] {
            let want = f(&x[format!("{side}_sum")]);
            let n = x[format!("{side}_tokens")].as_u64().unwrap() as usize;
            assert_eq!(got.tokens, n, "{case} {side}: target tokens");
            assert!(
                (got.sum - want).abs() < 1e-4,
                "{case} {side}: burnish {} vs transformers {want}",
                got.sum
            );
        }
    }
    // The same reply scores the same number of tokens after one turn and after three.
    let one = &r["multi_turn"]["one_turn"]["chosen_tokens"];
    assert_eq!(one, &r["multi_turn"]["three_turns"]["chosen_tokens"]);
}

fn kto_records(case: &str) -> Vec<LabeledRecord> {
    match case {
        "kto" => {
            let text = std::fs::read_to_string(fixtures().join("data/kto.jsonl")).unwrap();
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    labeled(
                        &v["prompt"],
                        &v["completion"],
                        v["label"].as_bool().unwrap(),
                    )
                })
                .collect()
        }
        _ => {
            // Pairs written as `data.convert to: kto` writes them: chosen, then rejected.
            let text = std::fs::read_to_string(fixtures().join("data/prefs.jsonl")).unwrap();
            text.lines()
                .flat_map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    [
                        labeled(&v["prompt"], &v["chosen"], true),
                        labeled(&v["prompt"], &v["rejected"], false),
                    ]
                })
                .collect()
        }
    }
}

fn labeled(prompt: &Value, completion: &Value, label: bool) -> LabeledRecord {
    LabeledRecord {
        prompt: vec![msg("user", prompt.as_str().unwrap())],
        completion: vec![msg("assistant", completion.as_str().unwrap())],
        label,
        meta: Default::default(),
    }
}

#[test]
fn kto_companions_never_share_the_prompt_and_the_kl_estimate_matches() {
    let r = reference();
    let (t, c) = tok();
    let policy = load("tiny-llama");
    let qwen = load("tiny-qwen2").valid();
    for case in ["kto", "kto_from_pairs"] {
        let x = &r[case];
        let recs = kto_records(case);
        let companions = mismatched_indices(&recs);
        for (i, want) in x["companions"].as_array().unwrap().iter().enumerate() {
            let j = companions[i];
            assert_eq!(j as u64, want.as_u64().unwrap(), "{case}: companion of {i}");
            assert_ne!(recs[j].prompt, recs[i].prompt, "{case}: {i} and {j}");
        }
        let mut items = encode_labeled(&t, &c, &recs, 256).unwrap().items;
        assert_eq!(items.len(), recs.len());
        // Reference: the tiny Qwen2 (same tokenizer), so that policy and reference differ.
        fill_reference(&qwen, &mut items, 8, 0);
        let mm: Vec<_> = items.iter().map(|i| &i.mismatched).collect();
        let lp = logprobs(&policy.valid(), &mm, 8, 0);
        for (k, item) in items.iter().enumerate() {
            let want_p = f(&x["policy_mismatched"][k]);
            let want_r = f(&x["reference_mismatched"][k]);
            let got_r = item.reference.unwrap().1.sum;
            assert!(
                (lp[k].sum - want_p).abs() < 1e-4,
                "{case} {k}: policy {} vs {want_p}",
                lp[k].sum
            );
            assert!(
                (got_r - want_r).abs() < 1e-4,
                "{case} {k}: reference {got_r} vs {want_r}"
            );
        }
        let o = KtoObjective {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            pad: 0,
        };
        let (_, m) = o.eval(&policy.valid(), &items, items.len());
        let want = f(&x["kl"]);
        assert!(
            want > 0.1,
            "{case}: the reference KL {want} should not be clamped"
        );
        assert!(
            (m["kl"] - want).abs() < 1e-4,
            "{case}: KL {} vs {want}",
            m["kl"]
        );
    }
}

#[test]
fn kto_companions_skip_runs_of_one_prompt_and_wrap() {
    let rec = |p: &str| labeled(&Value::from(p), &Value::from("x"), true);
    // A A B A: both A's before B take B; B takes the A after it; the last A wraps round, past
    // the first two A's, to B.
    let recs: Vec<_> = ["A", "A", "B", "A"].into_iter().map(rec).collect();
    assert_eq!(mismatched_indices(&recs), [2, 2, 3, 2]);
    // One prompt everywhere: the next record, as there is no other prompt.
    let recs: Vec<_> = ["A", "A", "A"].into_iter().map(rec).collect();
    assert_eq!(mismatched_indices(&recs), [1, 2, 0]);
    assert!(mismatched_indices(&[]).is_empty());
}

#[test]
fn orpo_loss_and_nll_equal_trl_on_a_fixed_batch() {
    let r = reference();
    let x = &r["orpo"];
    let (t, c) = tok();
    let text = std::fs::read_to_string(fixtures().join("data/prefs.jsonl")).unwrap();
    let recs: Vec<PreferenceRecord> = text
        .lines()
        .take(4)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            PreferenceRecord {
                prompt: vec![msg("user", v["prompt"].as_str().unwrap())],
                chosen: vec![msg("assistant", v["chosen"].as_str().unwrap())],
                rejected: vec![msg("assistant", v["rejected"].as_str().unwrap())],
                meta: Default::default(),
            }
        })
        .collect();
    let items = encode_pairs(&t, &c, &recs, 256).unwrap().items;
    let o = OrpoObjective {
        beta: f(&x["beta"]),
        nll: OrpoNll::AllTokens,
        pad: 0,
    };
    let net = load("tiny-llama");
    let refs: Vec<_> = items.iter().collect();
    let (loss, m) = o.loss(&net, &refs);
    let n = items.len() as f64;
    let loss = f64::from(loss.into_data().to_vec::<f32>().unwrap()[0]) / n;
    let nll = m["nll_chosen"] / n;
    assert!(
        (nll - f(&x["nll"])).abs() < 1e-5,
        "nll {nll} vs TRL {}",
        x["nll"]
    );
    assert!(
        (loss - f(&x["loss"])).abs() < 1e-5,
        "loss {loss} vs TRL {}",
        x["loss"]
    );
    let log_odds = m["log_odds"];
    let want: f64 = x["log_odds"].as_array().unwrap().iter().map(f).sum();
    assert!(
        (log_odds - want).abs() < 1e-4,
        "Σ log odds {log_odds} vs {want}"
    );
    // The completion-only NLL is the other named choice, and it differs.
    let o = OrpoObjective {
        nll: OrpoNll::Completion,
        ..o
    };
    let (_, m) = o.loss(&net, &refs);
    assert!((m["nll_chosen"] / n - nll).abs() > 0.05);
}

#[test]
fn weight_decay_skips_biases_and_norms_as_transformers_does() {
    let r = reference();
    for (list, want) in [("decayed", true), ("not_decayed", false)] {
        let names = r["decay"][list].as_array().unwrap();
        assert!(!names.is_empty());
        for name in names {
            let name = name.as_str().unwrap();
            assert_eq!(decays(name), want, "{name}");
        }
    }
    // LoRA matrices are decayed, like every weight matrix.
    assert!(decays("model.layers.0.self_attn.q_proj.lora.a"));
}

#[test]
fn warmup_and_decay_follow_transformers_schedules() {
    let r = reference();
    let s = &r["schedules"];
    let (base, warmup, total) = (
        f(&s["base"]),
        s["warmup"].as_u64().unwrap() as usize,
        s["total"].as_u64().unwrap() as usize,
    );
    for (name, schedule) in [
        ("constant", Schedule::Constant),
        ("linear", Schedule::Linear),
        ("cosine", Schedule::Cosine),
    ] {
        for (step, want) in s["lr"][name].as_array().unwrap().iter().enumerate() {
            let got = lr_at(base, schedule, warmup, total, step);
            assert!(
                (got - f(want)).abs() < 1e-15,
                "{name} step {step}: {got} vs {want}"
            );
        }
    }
    assert_eq!(lr_at(1.0, Schedule::Linear, 4, 10, 0), 0.0);
}
