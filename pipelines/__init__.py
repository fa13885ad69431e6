"""Model adapters over diffusers pipelines (installed as `diffrl.pipelines`)."""

from diffrl.pipelines.base import Condition, Policy
