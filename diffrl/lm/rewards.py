"""Rewards for language-model RL: Python callables over (prompts, completions, metadata).

A reward is any callable `fn(prompts: list[str], completions: list[str], metadata: list[dict]) ->
list[float] | Tensor` returning one score per completion. Look one up by registered name
(`LM_REWARDS`) or as "package.module:function"; `WeightedRewards` scores a batch with several and
keeps each one's scores (the core's combine_rewards turns them into advantages).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping

import torch
from torch import Tensor

from diffrl.core import Registry
from diffrl.runtime import entry_point_objects, import_object

__all__ = ["LM_REWARDS", "WeightedRewards", "register_lm_reward", "resolve_lm_reward"]

LMRewardFn = Callable[[list[str], list[str], list[dict]], "list[float] | Tensor"]

LM_REWARDS: Registry = Registry("LM reward")


def register_lm_reward(name: str) -> Callable[[LMRewardFn], LMRewardFn]:
    """Decorator: `@register_lm_reward("my_reward")` makes "my_reward" usable in lm.rewards."""
    return LM_REWARDS.register(name)


ENTRY_POINT_GROUP = "diffrl.lm_rewards"
"""Installed packages declare LM rewards under this entry-point group."""


def resolve_lm_reward(name: str) -> LMRewardFn:
    """A registered name, "module:function" (imported, from the working directory too), or an installed
    plugin's name (entry-point group "diffrl.lm_rewards"); the object must be callable."""
    if ":" in name:
        fn = import_object(name, "LM reward")
    elif name in LM_REWARDS:
        return LM_REWARDS.get(name)
    else:
        plugins = entry_point_objects(ENTRY_POINT_GROUP)
        if name not in plugins:
            return LM_REWARDS.get(name)  # raises with the registered names and the closest one
        fn = plugins[name].load()
    if not callable(fn):
        raise ValueError(f"LM reward {name!r} is a {type(fn).__name__}, not a callable")
    return fn


_INT = re.compile(r"^-?\d+$")


def _answer(meta: dict) -> str:
    if "answer" not in meta:
        raise KeyError(f"this reward needs an \"answer\" field in the prompt's metadata, got keys {sorted(meta)}")
    return str(meta["answer"]).strip()


@register_lm_reward("exact_match")
def exact_match(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
    """1 when the completion (stripped) equals metadata["answer"], else 0: the verifiable reward."""
    return [float(c.strip() == _answer(m)) for c, m in zip(completions, metadata)]


@register_lm_reward("integer_format")
def integer_format(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
    """1 when the completion is a plain (optionally negative) integer, else 0: a format reward."""
    return [float(bool(_INT.match(c.strip()))) for c in completions]


@register_lm_reward("numeric_closeness")
def numeric_closeness(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
    """Partial credit exp(-|prediction - answer| / (1 + |answer|)): 1 when right, 0 when not a number."""
    out = []
    for c, m in zip(completions, metadata):
        c = c.strip()
        if not _INT.match(c):
            out.append(0.0)
            continue
        target = int(_answer(m))
        out.append(math.exp(-abs(int(c) - target) / (1 + abs(target))))
    return out


class WeightedRewards:
    """Several rewards with weights: `scores(...)` -> ({name: [B]}, weighted total [B])."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            raise ValueError("need at least one reward")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.fns = {name: resolve_lm_reward(name) for name in self.weights}

    def scores(self, prompts: list[str], completions: list[str], metadata: list[dict]) -> tuple[dict[str, Tensor], Tensor]:
        per_reward = {}
        for name, fn in self.fns.items():
            value = torch.as_tensor(fn(prompts, completions, metadata), dtype=torch.float32).reshape(-1)  # [B]
            if value.shape[0] != len(completions):
                raise ValueError(f"LM reward {name!r} returned {value.shape[0]} scores for {len(completions)} completions")
            per_reward[name] = value
        total = sum(self.weights[n] * v for n, v in per_reward.items())  # [B]
        return per_reward, total
