"""Language-model RL on the shared core: GRPO, Dr.GRPO, DAPO and NFT for transformers causal LMs.

`diffrl train` runs these when `algorithm` is lm_grpo, lm_drgrpo, lm_dapo or lm_nft (config.LM_ALGORITHMS).
The maths (advantages, clipped surrogate, NFT's token loss, KL estimators, aggregation) is
diffrl.core's, the same function objects the diffusion trainers call; this package holds the
LM-specific parts: sampling with `model.generate`, per-token log-probs, rewards over text, the loop.
"""

from diffrl.lm.losses import ClippedObjective, NFTObjective, lm_loss, make_objective
from diffrl.lm.policy import LMPolicy, Rollout, SamplingSettings
from diffrl.lm.rewards import LM_REWARDS, WeightedRewards, register_lm_reward, resolve_lm_reward
from diffrl.lm.tasks import LMDataset, load_lm_dataset

__all__ = [
    "LM_REWARDS",
    "ClippedObjective",
    "LMDataset",
    "LMPolicy",
    "NFTObjective",
    "Rollout",
    "SamplingSettings",
    "WeightedRewards",
    "lm_loss",
    "load_lm_dataset",
    "make_objective",
    "register_lm_reward",
    "resolve_lm_reward",
]
