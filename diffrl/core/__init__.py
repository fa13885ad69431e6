"""Pure RL core: advantages, surrogate losses, KL estimators, loss aggregation, the forward-process (DiffusionNFT,
CRD) losses, LM NFT's negative-aware token loss (no models, no I/O)."""

from .advantages import (
    ADVANTAGES,
    PerPromptStatTracker,
    combine_rewards,
    group_advantages,
    nonconstant_groups,
    rloo_advantages,
    zero_std_fraction,
)
from .aggregation import AGGREGATIONS, aggregate
from .forward_process import (
    adaptive_sq_error,
    crd_implicit_reward,
    crd_kl_weight,
    crd_policy_loss,
    group_mean,
    mean_sq,
    nft_policy_loss,
    optimality,
    snapshot_decay,
)
from .kl import KL_ESTIMATORS, flow_grpo_kl, gaussian_kl, kl_estimator
from .losses import LOSSES, clipped_surrogate, log_ratio_to_ratio, policy_gradient
from .negative_aware import gradient_preserving_clamp, nft_correct_rate, nft_token_loss
from .prdp import prdp_loss, same_group_pairs
from .registry import Registry, UnknownNameError, suggest

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LOSSES",
    "PerPromptStatTracker",
    "Registry",
    "suggest",
    "UnknownNameError",
    "adaptive_sq_error",
    "aggregate",
    "clipped_surrogate",
    "combine_rewards",
    "crd_implicit_reward",
    "crd_kl_weight",
    "crd_policy_loss",
    "flow_grpo_kl",
    "gaussian_kl",
    "gradient_preserving_clamp",
    "group_advantages",
    "group_mean",
    "kl_estimator",
    "log_ratio_to_ratio",
    "mean_sq",
    "nft_correct_rate",
    "nft_policy_loss",
    "nft_token_loss",
    "nonconstant_groups",
    "optimality",
    "policy_gradient",
    "prdp_loss",
    "rloo_advantages",
    "same_group_pairs",
    "snapshot_decay",
    "zero_std_fraction",
]
