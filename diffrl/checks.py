"""Validation of config sections, before any model loads: the error type and the checks every section uses.

Each section checks its own fields (`check(section, key)`), each algorithm its cross-field rules
(`Algorithm.validate`); all raise ConfigError with a message that names the field (`'train.group_size' ...`).
Pure Python: no torch, no models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffrl.core.registry import suggest


class ConfigError(ValueError):
    """An invalid run configuration; the message names the offending field."""


def one_of(value: Any, allowed, key: str) -> None:
    """`value` must be one of `allowed` (the message lists them and suggests the closest)."""
    if value not in allowed:
        hint = suggest(value, allowed).replace(" Did you mean", "; did you mean")
        raise ConfigError(f"'{key}' is {value!r}; choose one of {', '.join(map(str, allowed))}{hint}")


def positive(value, key: str, allow_zero: bool = False) -> None:
    """`value` > 0 (>= 0 with allow_zero); NaN is neither (it passed every comparison-based check and poisoned the
    run after the model loaded)."""
    if not value >= 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def non_negative(value, key: str) -> None:
    """`value` >= 0."""
    positive(value, key, allow_zero=True)


def fraction(value, key: str, allow_zero: bool = False) -> None:
    """`value` in (0, 1] ([0, 1] with allow_zero)."""
    if not (0 <= value <= 1) or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be in {'[0' if allow_zero else '(0'}, 1], got {value}")


def decay_schedule(schedule, key: str) -> None:
    """An EMA decay schedule [start_step, start_value, slope, max] (core.snapshot_decay)."""
    if len(schedule) != 4:
        raise ConfigError(f"'{key}' must be [start_step, start_value, slope, max], got {list(schedule)}")
    start_step, start_value, slope, max_value = schedule
    if start_step < 0 or slope < 0 or not 0 <= start_value <= 1 or not 0 <= max_value <= 1:
        raise ConfigError(
            f"'{key}' {list(schedule)}: start_step and slope must be >= 0 and start_value, max in [0, 1] "
            "(a decay of 1 freezes the snapshot, 0 copies the trained weights)"
        )


def check_fields(section, key: str, rules: dict) -> None:
    """Apply `rules` {field: check} to a section's fields: a check is a tuple of allowed values, or a callable
    (value, "key.field") -> None; None values of Optional fields are skipped."""
    for name, rule in rules.items():
        value = getattr(section, name)
        if value is None:
            continue
        if isinstance(rule, tuple):
            one_of(value, rule, f"{key}.{name}")
        else:
            rule(value, f"{key}.{name}")


@dataclass(frozen=True)
class RunContext:
    """What the run-wide checks resolved, for the algorithm's own checks: the model family and the sampler."""

    family: str
    flow: bool
    sampler: str
    draws_noise: bool
    """Whether rollouts draw noise (and so have step log-probabilities): flow_sde with noise, ddim with eta > 0."""


def require_stochastic(cfg, ctx: RunContext, name: str) -> None:
    """`name` (an algorithm) learns from the rollout's step log-probabilities: the sampler must draw noise."""
    if not ctx.draws_noise:
        s = cfg.sampling
        raise ConfigError(f"{name} needs a stochastic sampler for its log-probabilities: 'sampling.sampler' {ctx.sampler} "
                          f"(eta {s.eta}, noise_level {s.noise_level}) draws no noise; use flow_sde with "
                          "sampling.noise_level > 0, or ddim with sampling.eta > 0 (1: DDPM)")


def require_lora(cfg, name: str, why: str) -> None:
    """`name` needs a frozen reference or snapshots of the trained weights: a LoRA adapter (they are adapters on the
    same network), SaRA (its sparse entries written back, no model copy), or an explicit policy.adapter full, which
    keeps whole-weight copies of the denoiser (one for the reference, one per snapshot). A full fine-tune spelled
    lora_rank 0 is refused, as before policy.adapter existed; under FSDP the copies are not supported."""
    import os

    p = cfg.policy
    if p.adapter == "lora" and p.lora_rank == 0:
        raise ConfigError(f"'policy.lora_rank' must be > 0 for {name}: {why}; or train SaRA (policy.adapter=sara), or "
                          "policy.adapter=full, which keeps whole-weight copies of the denoiser for it")
    if p.adapter == "full" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise ConfigError(f"'policy.adapter' full with {name} under FSDP is not supported: {why}, and its whole-weight "
                          "copies are not sharded; train LoRA or use data parallelism")
