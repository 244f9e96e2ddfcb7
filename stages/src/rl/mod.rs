//! Reinforcement learning from rewards: the reward functions a manifest lists, scored on
//! generated completions ([`rewards`]), GRPO's objective ([`grpo`]), its rollouts on the
//! shared training loop ([`rollout`]) and the `train.grpo` stage ([`stage`]).

pub mod grpo;
pub mod rewards;
pub mod rollout;
pub mod stage;

pub use rewards::{Reward, RewardError, RewardInput, RewardKind, RewardSpec};
pub use stage::{GrpoParams, GrpoStage};

/// Register `train.grpo`.
pub fn register_rl(reg: &mut burnish_engine::stage::Registry) {
    reg.register::<GrpoStage>();
}
