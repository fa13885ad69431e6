"""Model adapters over diffusers pipelines (installed as `diffrl.pipelines`).

Family classes import diffusers pipelines; get them through `load_policy` / `policy_class`
(lazy) or import `diffrl.pipelines.sd3` / `.flux` / `.sd` / `.wan` / `.motion` directly. `.motion_model` holds the
text-to-motion denoiser and its stock pipeline (MDM-style, no diffrl imports).
"""

from diffrl.pipelines.base import Condition, Policy
from diffrl.pipelines.registry import (
    POLICY_FAMILIES,
    TINY_MODELS,
    load_policy,
    policy_class,
    resolve_family,
    resolve_model_dir,
)

__all__ = [
    "POLICY_FAMILIES",
    "TINY_MODELS",
    "Condition",
    "Policy",
    "load_policy",
    "policy_class",
    "resolve_family",
    "resolve_model_dir",
]
