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
