//! Reinforcement learning from rewards: the reward functions a manifest lists, scored on
//! generated completions ([`rewards`]), and GRPO's objective ([`grpo`]).

pub mod grpo;
pub mod rewards;

pub use rewards::{Reward, RewardError, RewardInput, RewardKind, RewardSpec};
