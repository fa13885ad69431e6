"""Pure RL core: advantages, surrogate losses, KL estimators, loss aggregation (no models, no I/O)."""

from .advantages import (
    ADVANTAGES,
    PerPromptStatTracker,
    combine_rewards,
    group_advantages,
    rloo_advantages,
    zero_std_fraction,
)
from .aggregation import AGGREGATIONS, aggregate
from .kl import KL_ESTIMATORS, flow_grpo_kl, gaussian_kl, kl_estimator
from .losses import LOSSES, clipped_surrogate, log_ratio_to_ratio, policy_gradient
from .registry import Registry, UnknownNameError

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LOSSES",
    "PerPromptStatTracker",
    "Registry",
    "UnknownNameError",
    "aggregate",
    "clipped_surrogate",
    "combine_rewards",
    "flow_grpo_kl",
    "gaussian_kl",
    "group_advantages",
    "kl_estimator",
    "log_ratio_to_ratio",
    "policy_gradient",
    "rloo_advantages",
    "zero_std_fraction",
]
