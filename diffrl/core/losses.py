"""Policy-gradient surrogate losses on per-element log-probabilities (PPO / GRPO family).

Every registered loss has the same signature ``fn(logp, logp_old, advantages, **kwargs) ->
(loss, metrics)``: ``loss`` is *unreduced* (same shape as ``logp``; reduce it with
:func:`diffrl.core.aggregation.aggregate`) and ``metrics`` maps names to detached 0-d tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Registry

__all__ = ["LOSSES", "clipped_surrogate", "log_ratio_to_ratio", "policy_gradient"]

LOSSES: Registry = Registry("loss")


def log_ratio_to_ratio(logp: Tensor, logp_old: Tensor, clamp: float = 20.0) -> Tensor:
    """Importance ratio ``rho = exp(clamp(logp - logp_old, -clamp, clamp))`` (clamp 20: Flow-GRPO / verl)."""
    if logp.shape != logp_old.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_old {tuple(logp_old.shape)} must have the same shape")
    return torch.exp((logp - logp_old).clamp(-clamp, clamp))


def _broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """``[B]`` (or any prefix shape of ``like``) -> unsqueezed on the right to broadcast against ``like``."""
    advantages = torch.as_tensor(advantages, dtype=like.dtype, device=like.device)
    if advantages.dim() > like.dim() or advantages.shape != like.shape[: advantages.dim()]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must match the leading dims of logp {tuple(like.shape)}"
        )
    return advantages.reshape(advantages.shape + (1,) * (like.dim() - advantages.dim()))


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def _ratio_metrics(ratio: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
    """Mean, max and min of the ratio over the `mask`-valid elements (1 when there are none). Masked reductions,
    not boolean indexing: nothing is read back from the device."""
    r = ratio.detach()
    if mask is None:
        valid = r.reshape(-1)
        if valid.numel() == 0:
            valid = r.new_ones(1)
        return {"ratio_mean": valid.mean(), "ratio_max": valid.max(), "ratio_min": valid.min()}
    return masked_extremes(r, mask.bool().expand_as(r))


def masked_extremes(values: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """ratio_mean / ratio_max / ratio_min of `values` where `valid` (same shape), each 1 when nothing is valid."""
    n = valid.sum()
    one = values.new_ones(())
    mean = (values * valid).sum() / n.clamp(min=1)
    big = torch.finfo(values.dtype).max
    hi = torch.where(valid, values, values.new_full((), -big)).max()
    lo = torch.where(valid, values, values.new_full((), big)).min()
    empty = n == 0
    return {"ratio_mean": torch.where(empty, one, mean), "ratio_max": torch.where(empty, one, hi),
            "ratio_min": torch.where(empty, one, lo)}


@LOSSES.register("clipped_surrogate")
def clipped_surrogate(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, elementwise: ``max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))``.

    Flow-GRPO uses a symmetric ``clip_low = clip_high = 1e-4`` on per-step ratios; DAPO's "clip-higher"
    uses ``clip_high > clip_low`` (0.28 vs 0.2). ``advantages`` of shape ``[B]`` broadcast over the
    trailing dims of ``logp`` (``[B]`` or ``[B, T]``).

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"; used by verl):
    for ``A < 0`` the loss is additionally capped at ``-A * dual_clip`` (``dual_clip > 1``, typically 3),
    i.e. ``loss = min(loss, -dual_clip * A)``, so a huge ratio on a negative-advantage sample cannot
    produce an unbounded loss; where the cap is active the gradient is zero. ``A >= 0`` is unaffected.

    Metrics (detached 0-d tensors, over ``mask``-valid elements when ``mask`` is given):
        ``clip_frac``: fraction where a clip is active, i.e. the clipped branch is strictly larger
            and the gradient is zero (``rho > 1 + clip_high`` with ``A > 0`` or ``rho < 1 - clip_low``
            with ``A < 0``), split into ``clip_frac_high`` and ``clip_frac_low``;
        ``ratio_out_of_range_frac``: Flow-GRPO's ``|rho - 1| > clip`` diagnostic (ignores the sign of A);
        ``dual_clip_frac`` (only with ``dual_clip``); ``ratio_mean``, ``ratio_max``, ``ratio_min``.
    """
    if clip_high is None:
        clip_high = clip_low
    if not (0 <= clip_low < 1) or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (typically 3), got {dual_clip}")
    ratio = log_ratio_to_ratio(logp, logp_old, clamp=log_ratio_clamp)  # same shape as logp
    adv = _broadcast_advantages(advantages, logp)  # broadcastable to logp
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)

    with torch.no_grad():
        adv_b = adv.expand_as(ratio)
        high = ((ratio > 1.0 + clip_high) & (adv_b > 0)).to(ratio.dtype)
        low = ((ratio < 1.0 - clip_low) & (adv_b < 0)).to(ratio.dtype)
        out = ((ratio > 1.0 + clip_high) | (ratio < 1.0 - clip_low)).to(ratio.dtype)
        metrics = {
            "clip_frac": _masked_mean(high + low, mask),
            "clip_frac_high": _masked_mean(high, mask),
            "clip_frac_low": _masked_mean(low, mask),
            "ratio_out_of_range_frac": _masked_mean(out, mask),
            **_ratio_metrics(ratio, mask),
        }

    if dual_clip is not None:
        cap = -dual_clip * adv  # positive where A < 0
        capped = torch.minimum(loss, cap)
        is_neg = adv < 0
        with torch.no_grad():
            metrics["dual_clip_frac"] = _masked_mean(((loss > cap) & is_neg).to(ratio.dtype), mask)
        loss = torch.where(is_neg, capped, loss)
    return loss, metrics


@LOSSES.register("policy_gradient")
def policy_gradient(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    *,
    log_ratio_clamp: float = 20.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Unclipped importance-weighted policy gradient ``-A rho``; on-policy (``rho = 1``) its gradient is
    REINFORCE's ``-A grad log pi``. Same signature and ratio metrics as :func:`clipped_surrogate`."""
    ratio = log_ratio_to_ratio(logp, logp_old, clamp=log_ratio_clamp)
    adv = _broadcast_advantages(advantages, logp)
    loss = -adv * ratio
    with torch.no_grad():
        metrics = {"clip_frac": ratio.new_zeros(()), **_ratio_metrics(ratio, mask)}
    return loss, metrics
