"""Reward mixtures: several rewards, weighted (optionally per prompt source); plus the rollout scorer that can
score chunks in the background. Rewards produce scores; diffrl.core.combine_rewards turns them into advantages.

In a run config:

    rewards: {pickscore: 1.0, ocr: {weight: 0.7, kwargs: {model: microsoft/trocr-base-printed}}}
    reward_combine: normalize_then_sum        # or sum_then_normalize (the default)
    reward_source_weights: {ocr_prompts: {ocr: 1.0, pickscore: 0.2}}

Weights: w_k for reward k, or, for a sample whose metadata "source" names an entry of
reward_source_weights, that entry's weights (rewards it omits weigh 0 there). A reward weighing 0 on a
sample is not part of its score: it may be NaN there (ocr on a prompt without quoted text).

Advantages (diffrl.core.combine_rewards with `sample_weights`), groups = samples of the same prompt string:
    sum_then_normalize   A = group_advantages(sum_k w_k r_k)          (Flow-GRPO); identical to a
                         single reward whose value is the weighted sum
    normalize_then_sum   a_k = group_advantages(r_k) over the samples where w_k != 0 (0 elsewhere),
                         s = sum_k w_k a_k, A = (s - mean(s)) / (std(s) + eps)   (GDPO / MR-GRPO)
with the run's std scope, ddof and eps (tests/test_rewards_mixture.py checks both against float64).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from concurrent.futures import Executor, Future
from typing import Any

import torch
from torch import Tensor

from diffrl.core.advantages import COMBINE_MODES

from .base import Reward
from .registry import build_reward

SOURCE_KEY = "source"
"""The metadata field naming a prompt's source set (a field of a .jsonl prompt record)."""


def check_mixture(cfg) -> None:
    """A run's reward options (reward, reward_kwargs, rewards, reward_combine, reward_source_weights) before any reward
    loads: diffrl.checks.ConfigError naming the field."""
    from diffrl.checks import ConfigError, one_of
    from diffrl.rewards.registry import resolve_reward

    def known(name: str, key: str) -> None:
        try:
            resolve_reward(name)
        except ValueError as exc:
            raise ConfigError(f"'{key}': {exc}") from None

    known(cfg.reward, "reward")
    one_of(cfg.reward_combine, COMBINE_MODES, "reward_combine")
    if not cfg.rewards:
        if cfg.reward_source_weights:
            raise ConfigError("'reward_source_weights' needs a mixture in 'rewards' (e.g. rewards: {pickscore: 1.0, ocr: 0.7})")
        return
    if cfg.reward_kwargs:
        raise ConfigError("'reward_kwargs' belongs to 'reward'; with a mixture in 'rewards' give each reward's "
                          "kwargs as rewards.NAME: {weight: w, kwargs: {...}}")
    for name in cfg.rewards:
        known(name, f"rewards.{name}")
    try:
        parse_mixture(cfg.rewards)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for source, table in cfg.reward_source_weights.items():
        if not isinstance(table, dict):
            raise ConfigError(f"'reward_source_weights.{source}' must map reward names to weights, got {table!r}")
        for name, weight in table.items():
            if name not in cfg.rewards:
                raise ConfigError(f"'reward_source_weights.{source}.{name}' is not a reward of the mixture "
                                  f"({', '.join(cfg.rewards)})")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"'reward_source_weights.{source}.{name}' must be a number, got {weight!r}")


def parse_mixture(spec: Mapping[str, Any]) -> dict[str, tuple[float, dict]]:
    """{name: weight | {weight: w, kwargs: {...}}} -> {name: (weight, kwargs)}; raises ValueError."""
    out = {}
    for name, entry in spec.items():
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - {"weight", "kwargs"})
            if unknown or "weight" not in entry:
                raise ValueError(f"rewards.{name}: expected a weight or {{weight: w, kwargs: {{...}}}}, got {dict(entry)!r}")
            weight, kwargs = entry["weight"], dict(entry.get("kwargs") or {})
        else:
            weight, kwargs = entry, {}
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"rewards.{name}: the weight must be a finite number, got {weight!r}")
        out[str(name)] = (float(weight), kwargs)
    if not out:
        raise ValueError("rewards: an empty mixture")
    return out


class RewardMixture(Reward):
    """Weighted rewards; `score` is the weighted sum (what evaluation reports), `score_components` the
    parts (what the loop logs and normalize_then_sum uses)."""

    def __init__(self, components: Mapping[str, Reward], weights: Mapping[str, float],
                 combine: str = "sum_then_normalize", source_weights: Mapping[str, Mapping[str, float]] | None = None,
                 source_key: str = SOURCE_KEY):
        if combine not in COMBINE_MODES:
            raise ValueError(f"reward_combine must be one of {list(COMBINE_MODES)}, got {combine!r}")
        if set(components) != set(weights):
            raise ValueError(f"mixture components {sorted(components)} and weights {sorted(weights)} differ")
        for source, table in (source_weights or {}).items():
            unknown = sorted(set(table) - set(components))
            if unknown:
                raise ValueError(f"reward_source_weights.{source} names {unknown}, not rewards of the mixture "
                                 f"({', '.join(components)})")
        self.components = dict(components)
        self.weights = {k: float(v) for k, v in weights.items()}
        self.combine = combine
        self.source_weights = {s: {k: float(v) for k, v in t.items()} for s, t in (source_weights or {}).items()}
        self.source_key = source_key
        self.differentiable = all(r.differentiable for r in self.components.values())
        kinds = [set(r.accepts) for r in self.components.values()]
        self.accepts = tuple(sorted(set.intersection(*kinds)))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], combine: str = "sum_then_normalize",
                  source_weights: Mapping[str, Mapping[str, float]] | None = None) -> RewardMixture:
        parsed = parse_mixture(spec)
        return cls({n: build_reward(n, **kw) for n, (_, kw) in parsed.items()}, {n: w for n, (w, _) in parsed.items()},
                   combine, source_weights)

    def _name(self) -> str:
        return "mixture(" + ", ".join(f"{k}: {w:g}" for k, w in self.weights.items()) + ")"

    def frames_needed(self, num_frames: int) -> int | None:
        """The most any part reads; None when one reads every frame."""
        needs = [r.frames_needed(num_frames) for r in self.components.values()]
        return None if None in needs else max(needs)

    def to(self, device) -> RewardMixture:
        for r in self.components.values():
            r.to(device)
        return self

    def load(self) -> RewardMixture:
        for r in self.components.values():
            r.load()
        return self

    # ---- scores ------------------------------------------------------------------------------
    def score_components(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> dict[str, Tensor]:
        """name -> float32 [B] scores of every component."""
        return {name: r(samples, prompts, metadata) for name, r in self.components.items()}

    def sample_weights(self, metadata: list[dict] | None, batch: int) -> dict[str, Tensor]:
        """name -> float64 [B] weight of each component on each sample (its prompt source's, or the default)."""
        rows = metadata or [None] * batch
        tables = [self.source_weights.get((m or {}).get(self.source_key), None) if self.source_weights else None
                  for m in rows]
        return {name: torch.tensor([self.weights[name] if t is None else t.get(name, 0.0) for t in tables],
                                   dtype=torch.float64) for name in self.components}

    def total(self, components: Mapping[str, Tensor], metadata: list[dict] | None) -> Tensor:
        """sum_k w_k r_k per sample [B] (float32); terms whose weight is 0 are left out, NaN or not, but a sample
        no component could score (a NaN/inf sample: every component NaN) totals NaN."""
        batch = next(iter(components.values())).shape[0]
        weights = self.sample_weights(metadata, batch)
        out = torch.zeros(batch, dtype=torch.float64)
        unscored = torch.ones(batch, dtype=torch.bool)  # [B]
        for name, value in components.items():
            w = weights[name]
            value = value.detach().cpu().double()
            out += torch.where(w != 0, w * value, torch.zeros_like(w))
            unscored &= ~torch.isfinite(value)
        out[unscored] = math.nan
        return out.float().to(next(iter(components.values())).device)  # [B]

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        if self.differentiable:
            comps = self.score_components(samples, prompts, metadata)
            weights = self.sample_weights(metadata, samples.shape[0])
            return sum(torch.where(weights[n].to(v.device) != 0, weights[n].to(v) * v, torch.zeros_like(v))
                       for n, v in comps.items())  # [B], differentiable
        return self.total(self.score_components(samples, prompts, metadata), metadata)

    # ---- advantages --------------------------------------------------------------------------
    def component_metrics(self, components: Mapping[str, Tensor]) -> dict[str, float]:
        """reward_<name>_mean / _std over each component's finite values."""
        out = {}
        for name, value in components.items():
            finite = value[torch.isfinite(value)].double()
            out[f"reward_{name}_mean"] = finite.mean().item() if len(finite) else math.nan
            out[f"reward_{name}_std"] = finite.std(unbiased=False).item() if len(finite) else math.nan
        return out


def prompt_group_ids(prompts: list[str]) -> Tensor:
    """int64 [B]: one id per distinct prompt string, in order of first appearance."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts], dtype=torch.long)


def build_training_reward(reward: str, reward_kwargs: Mapping[str, Any] | None = None,
                          rewards: Mapping[str, Any] | None = None, combine: str = "sum_then_normalize",
                          source_weights: Mapping[str, Mapping[str, float]] | None = None) -> Reward:
    """The run's reward: a RewardMixture when `rewards` is given, else `reward` with `reward_kwargs`."""
    if rewards:
        return RewardMixture.from_spec(rewards, combine, source_weights)
    return build_reward(reward, **dict(reward_kwargs or {}))


class RolloutScorer:
    """Scores a rollout chunk by chunk as it is decoded: at once, or on `executor` (a background
    thread) so that scoring overlaps the sampling of the next chunk. `collect` returns the rewards
    [B] and, for a mixture, its components {name: [B]}, in submission order."""

    def __init__(self, reward: Reward, executor: Executor | None = None):
        self.reward, self.executor = reward, executor
        self.parts: list[Future | tuple] = []

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None):
        # a new thread's current CUDA device is 0: score on the images' device (process k's GPU under DDP), so that
        # a reward creating tensors on "the current device" does not land on GPU 0 from a background thread
        with torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext():
            if isinstance(self.reward, RewardMixture):
                comps = self.reward.score_components(images, prompts, metadata)
                return self.reward.total(comps, metadata), comps
            return self.reward(images, prompts, metadata).float(), None

    def submit(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> None:
        if self.executor is None:
            self.parts.append(self._score(images, prompts, metadata))
        else:
            self.parts.append(self.executor.submit(self._score, images, prompts, metadata))

    def collect(self) -> tuple[Tensor, dict[str, Tensor] | None]:
        parts = [p.result() if isinstance(p, Future) else p for p in self.parts]
        self.parts = []
        rewards = torch.cat([r for r, _ in parts])  # [B]
        if parts[0][1] is None:
            return rewards, None
        return rewards, {name: torch.cat([c[name] for _, c in parts]) for name in parts[0][1]}
