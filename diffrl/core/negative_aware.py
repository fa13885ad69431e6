"""Negative-aware fine-tuning (NFT; Chen et al. 2025, "Bridging Supervised Learning and Reinforcement
Learning in Math Reasoning") on per-token log-probabilities: pure maths, no models.

Per question, `rhat = clamp(group accuracy, 0.02, 0.98)` (the old policy's success rate) and per token
`R = pi_theta / pi_old`. NFT trains an implicit negative policy `(pi_old - rhat pi_theta) / (1 - rhat)`
on the wrong answers, which amounts to

    correct answers:  -log R
    wrong answers:    -log(gpc((1 - rhat R) / (1 - rhat), min=negative_clamp))

with `gpc` a gradient-preserving clamp (forward value clamped, backward the identity), and the whole
loss weighted by `(1 - rhat)`. At `R = 1` (strictly on-policy) the gradient is `-(c - rhat) grad log pi`
(c = 1 correct, 0 wrong): the group-mean-baseline policy gradient (Dr.GRPO without std) for any group
with accuracy inside the clamp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffrl.runtime import check_on_device

from .forward_process import group_mean
from .losses import masked_extremes

__all__ = ["gradient_preserving_clamp", "nft_correct_rate", "nft_token_loss"]


def gradient_preserving_clamp(x: Tensor, min: float | None = None, max: float | None = None) -> Tensor:
    """Forward: `x.clamp(min, max)`; backward: the identity, so a clamped element keeps its gradient
    (a plain clamp would zero it). NFT's `clamp_preserve_grad`."""
    return x + (x.clamp(min=min, max=max) - x).detach()


def nft_correct_rate(correct: Tensor, group_ids: Tensor, clamp: tuple[float, float] = (0.02, 0.98)) -> Tensor:
    """rhat: each sample's group accuracy clamped to `clamp` (NFT: [0.02, 0.98]). correct: [B] 0/1
    (or bool), group_ids: [B] int -> [B] float."""
    lo, hi = clamp
    if not 0 < lo <= hi < 1:
        raise ValueError(f"clamp must satisfy 0 < lo <= hi < 1 (1 - rhat divides), got {clamp}")
    c = correct.to(torch.get_default_dtype() if not correct.is_floating_point() else correct.dtype)
    return group_mean(c, group_ids).clamp(lo, hi)  # [B]


def nft_token_loss(
    logp: Tensor,
    logp_old: Tensor,
    correct: Tensor,
    rhat: Tensor,
    *,
    negative_clamp: float = 1.0,
    log_ratio_clamp: float = 20.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """NFT's elementwise loss `(1 - rhat) [c (-log R) + (1 - c) (-log gpc((1 - rhat R) / (1 - rhat)))]`.

    Args:
        logp, logp_old: `[B, T]` token log-probs under the current and the sampling policy.
        correct: `[B]` 1 for a correct answer, 0 for a wrong one (bool or float).
        rhat: `[B]` the question's clamped accuracy (`nft_correct_rate`), strictly inside (0, 1).
        negative_clamp: lower clamp of the negative likelihood ratio (1 - rhat R) / (1 - rhat), applied
            with the gradient-preserving clamp (NFT's code: clamp_negative 1.0, which caps the wrong
            answers' loss at 0 while their gradient keeps pushing R down).
        log_ratio_clamp: `R = exp(clamp(logp - logp_old, -c, c))` (the shared core's 20).
        mask: `[B, T]` validity, only used for the metrics; reduce the loss with `aggregate`.

    Returns:
        (`[B, T]` unreduced loss, metrics: ratio mean/max/min and `negative_clamp_frac`, the fraction of
        wrong-answer tokens whose ratio was clamped).
    """
    if logp.shape != logp_old.shape or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_old {tuple(logp_old.shape)} must both be [B, T]")
    B = logp.shape[0]
    if correct.shape != (B,) or rhat.shape != (B,):
        raise ValueError(f"correct {tuple(correct.shape)} and rhat {tuple(rhat.shape)} must be [{B}]")
    check_on_device((rhat > 0) & (rhat < 1), "rhat must lie strictly inside (0, 1); clamp it with nft_correct_rate")
    if negative_clamp <= 0:
        raise ValueError(f"negative_clamp must be > 0 (it is the argument of a log), got {negative_clamp}")
    log_ratio = (logp - logp_old).clamp(-log_ratio_clamp, log_ratio_clamp)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    r = rhat.to(logp.dtype).unsqueeze(1)  # [B, 1]
    c = correct.to(logp.dtype).unsqueeze(1)  # [B, 1]
    proxy = (1 - r * ratio) / (1 - r)  # [B, T]: the implicit negative policy's ratio to pi_old
    negative = -torch.log(gradient_preserving_clamp(proxy, min=negative_clamp))  # [B, T]
    positive = -log_ratio  # [B, T] = -log R
    loss = (1 - r) * (c * positive + (1 - c) * negative)  # [B, T]

    with torch.no_grad():
        valid = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
        wrong = valid & (c < 0.5).expand_as(valid)
        clamped = ((proxy < negative_clamp) & wrong).sum() / wrong.sum().clamp(min=1)
        metrics = {**masked_extremes(ratio, valid), "negative_clamp_frac": clamped.to(logp.dtype)}
    return loss, metrics
