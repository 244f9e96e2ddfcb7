//! Preference tuning: the objectives (`losses`), completion log-probs (`data`), the loop
//! objectives (`objectives`) and the stage kinds (`stages`): `logprobs` (the reference
//! log-probs artifact), `train.dpo`, `train.kto`, `train.orpo`.

pub mod data;
pub mod losses;
pub mod objectives;
pub mod stages;

use burnish_engine::stage::Registry;

/// Register `logprobs`, `train.dpo`, `train.kto` and `train.orpo`.
pub fn register_pref(reg: &mut Registry) {
    reg.register::<stages::LogProbsStage>()
        .register::<stages::DpoStage>()
        .register::<stages::KtoStage>()
        .register::<stages::OrpoStage>();
}
