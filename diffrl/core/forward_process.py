"""Pure maths of the forward-process trainers, DiffusionNFT (Zheng et al. 2026) and CRD (Zhu et al. 2026).

Both learn from final samples only: a clean sample x0 is noised afresh, x_t = alpha x0 + sigma eps, and
the losses compare model outputs at x_t (current weights theta, an "old" snapshot, the frozen reference)
with the forward process's target. Conventions, all explicit arguments and pinned by tests:

* "mean over elements" reduces every non-batch dimension: `||u||^2` below is `mean(u^2)` per sample.
* The adaptive weight is `sg(mean |err|)` per sample, clamped below at `min_weight` (1e-5 in both
  authors' code) and computed in the error's dtype.
* A group is the samples of one prompt (`group_ids`); group means are weighted by `weight` (0 for
  samples whose reward was not finite) and a group with no weight has mean 0.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "adaptive_sq_error",
    "crd_implicit_reward",
    "crd_kl_weight",
    "crd_policy_loss",
    "group_mean",
    "mean_sq",
    "nft_policy_loss",
    "optimality",
    "snapshot_decay",
]

CRD_LOSSES = ("mse", "bce")


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def mean_sq(a: Tensor, b: Tensor) -> Tensor:
    """mean over elements of (a - b)^2. a, b: [B, *S] -> [B]"""
    return ((a - b) ** 2).mean(dim=_dims(a))


def optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = clamp(0.5 + 0.5 clip(A, -A_max, A_max) / A_max, 0, 1): the advantage as a probability. [B] -> [B]"""
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)  # [B]
    return (0.5 + 0.5 * clipped / adv_clip_max).clamp(0, 1)


def adaptive_sq_error(pred: Tensor, target: Tensor, min_weight: float = 1e-5) -> Tensor:
    """mean((pred - target)^2) / sg(mean |pred - target|) per sample, the weight clamped >= min_weight. -> [B]"""
    err = pred - target  # [B, *S]
    weight = err.detach().abs().mean(dim=_dims(err), keepdim=True).clamp_min(min_weight)  # [B, 1, ..]
    return (err**2 / weight).mean(dim=_dims(err))  # [B]


def nft_policy_loss(
    x0_theta: Tensor,
    x0_old: Tensor,
    x0: Tensor,
    r: Tensor,
    beta: float,
    adv_clip_max: float,
    min_weight: float = 1e-5,
) -> Tensor:
    """DiffusionNFT's policy loss per sample, in x0 space with adaptive weights. -> [B]

    With the implicit positive / negative policies v+ = (1 - beta) sg(v_old) + beta v_theta and
    v- = (1 + beta) sg(v_old) - beta v_theta, their x0 predictions are the same mixes of the x0
    predictions `x0_old`, `x0_theta` [B, *S] (see diffrl.sampling.forward), and
    L = (A_max / beta) [r w(x0+) + (1 - r) w(x0-)],  w(y) = mean((y - x0)^2) / sg(mean |y - x0|)
    (the A_max / beta scale is the authors' code's). `r`: optimality [B].
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    old = x0_old.detach()
    x0_plus = (1 - beta) * old + beta * x0_theta  # [B, *S]
    x0_minus = (1 + beta) * old - beta * x0_theta  # [B, *S]
    positive = adaptive_sq_error(x0_plus, x0, min_weight)  # [B]
    negative = adaptive_sq_error(x0_minus, x0, min_weight)  # [B]
    return (adv_clip_max / beta) * (r * positive + (1 - r) * negative)


def group_mean(values: Tensor, group_ids: Tensor, weight: Tensor | None = None, num_groups: int | None = None) -> Tensor:
    """Each row's (weighted) group mean, broadcast back to the rows. values, group_ids, weight: [B] -> [B].
    `num_groups`: the group_ids are already indices 0 .. num_groups - 1 (then nothing is read from the device)."""
    if num_groups is None:
        _, inverse = torch.unique(group_ids, return_inverse=True)  # [B]
        n = int(inverse.max()) + 1
    else:
        inverse, n = group_ids, num_groups
    w = torch.ones_like(values) if weight is None else weight.to(values.dtype)  # [B]
    sums = values.new_zeros(n).index_add(0, inverse, values * w)  # [G]
    counts = values.new_zeros(n).index_add(0, inverse, w)  # [G]
    means = torch.where(counts > 0, sums / counts.clamp_min(torch.finfo(values.dtype).tiny), torch.zeros_like(sums))
    return means[inverse]  # [B]


def crd_implicit_reward(out_theta: Tensor, out_old: Tensor, target: Tensor, min_weight: float = 1e-5) -> Tensor:
    """CRD's implicit reward r_theta = -(||v_theta - v||^2 / sg(mean|v_theta - v|) - ||v_old - v||^2 / sg(mean|v_old - v|)).

    Model outputs and the forward-process target [B, *S] (velocities for flow models) -> [B]; `out_old`
    is the old snapshot's output (no gradient flows into it).
    """
    return -(adaptive_sq_error(out_theta, target, min_weight) - adaptive_sq_error(out_old.detach(), target, min_weight))


def crd_policy_loss(
    r_theta: Tensor,
    a: Tensor,
    group_ids: Tensor,
    beta: float,
    adv_clip_max: float,
    kind: str = "mse",
    weight: Tensor | None = None,
    num_groups: int | None = None,
) -> Tensor:
    """CRD's centred reward-matching loss per sample. -> [B]

    Rc = a - mean_g(a), R_theta_c = r_theta - sg(mean_g r_theta) (means within each prompt group, over the
    rows given: the caller passes whole groups).
    "mse": (A_max / beta) (beta R_theta_c - Rc)^2 (the batch mean of this is CRD's loss);
    "bce": (A_max / beta) BCE(logit beta R_theta_c, target sigmoid(Rc)) (the authors' variant; minimal,
    with zero gradient, exactly where the mse loss is zero, and its gradient is bounded).
    Adding a constant per group to `a` or to `r_theta` changes nothing (the normaliser cancels).
    r_theta, a: [B]; group_ids: [B] int; weight: [B] (0 drops a sample from its group's means); num_groups: the
    group_ids are already indices 0 .. num_groups - 1 (no host read of them).
    """
    if kind not in CRD_LOSSES:
        raise ValueError(f"kind must be one of {CRD_LOSSES}, got {kind!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    a = a.to(r_theta.dtype)
    rc = a - group_mean(a, group_ids, weight, num_groups)  # [B]
    r_c = r_theta - group_mean(r_theta.detach(), group_ids, weight, num_groups)  # [B]
    if kind == "mse":
        per_sample = (beta * r_c - rc) ** 2  # [B]
    else:
        per_sample = F.binary_cross_entropy_with_logits(beta * r_c, torch.sigmoid(rc), reduction="none")  # [B]
    return (adv_clip_max / beta) * per_sample


def crd_kl_weight(a: Tensor, kl_beta: float, kl_floor: float = 1e-4, adaptive: bool = True) -> Tensor:
    """CRD's per-sample KL coefficient: kl_beta (m + a (1 - m)) with m = kl_floor / kl_beta, i.e. kl_floor
    at a = 0 rising linearly to kl_beta at a = 1 (reward-adaptive KL); kl_beta for every sample when not
    `adaptive`. a: [B] in [0, 1] -> [B]"""
    if not adaptive or kl_beta == 0:
        return torch.full_like(a, kl_beta)
    m = kl_floor / kl_beta
    return kl_beta * (m + a * (1 - m))


def snapshot_decay(step: int, start_step: int, start_value: float, slope: float, max_value: float) -> float:
    """EMA decay of a snapshot after `step` optimiser steps: start_value before start_step, then
    min(start_value + slope (step - start_step), max_value). The snapshot update is
    snapshot <- decay snapshot + (1 - decay) theta (decay 0 copies theta)."""
    if step < start_step:
        return float(start_value)
    return float(min(start_value + slope * (step - start_step), max_value))
