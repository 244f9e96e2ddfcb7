//! Preference tuning: the objectives (`losses`), completion log-probs, the reference log-probs
//! artifact and the `train.dpo` / `train.kto` / `train.orpo` trainers.

pub mod losses;
