//! STaR as a pipeline: `pipelines/star-math-tiny.yaml` (one of its two seeds) raises held-out
//! greedy exact match round after round, beyond what as many more SFT steps on the worked
//! examples alone give. About 2–3 minutes in the test profile on 2 cores; the numbers are
//! bit-reproducible on flex, so they are asserted with margins that only a real regression
//! crosses.

mod common;

use common::{fixtures, lock, metric, run_ok};

#[test]
fn star_rounds_raise_held_out_exact_match_beyond_the_control() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixtures().join("../pipelines/star-math-tiny.yaml"))
        .unwrap()
        .replace("seed: [0, 1]", "seed: [1]");
    let m = tmp.path().join("pipeline.yaml");
    std::fs::write(&m, text).unwrap();
    run_ok(&["run", m.to_str().unwrap(), "-q"], tmp.path());
    let l = lock(tmp.path());
    let em = |stage: &str| metric(&l, &format!("{stage}[seed=1]"), "exact_match");
    let (e0, e1, e2, e3) = (em("eval0"), em("eval1"), em("eval2"), em("eval3"));
    let control = em("eval_more_gold");
    // Measured: 0.164 → 0.636 → 0.758 → 0.780; the control 0.280.
    assert!(
        e1 > e0 && e2 > e1 && e3 > e1 + 0.05,
        "{e0} → {e1} → {e2} → {e3}"
    );
    assert!(e1 > control + 0.2, "round 1 {e1} vs control {control}");
    // Each round kept more correct samples than the one before.
    let kept = |s: &str| metric(&l, &format!("{s}[seed=1]"), "kept");
    assert!(kept("keep2") > kept("keep1") && kept("keep3") > kept("keep2"));
}
