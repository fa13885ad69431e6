"""Reduction of an elementwise loss ``[B, T]`` (T tokens, or timesteps for diffusion) to a scalar.

Modes (naming follows verl's ``loss_agg_mode``):

* ``"token_mean"``: sum over all valid elements / number of valid elements (DAPO).
* ``"seq_mean_token_mean"``: mean over each sequence's valid elements, then mean over the B sequences
  (original GRPO).
* ``"seq_mean_token_sum"``: sum over each sequence's valid elements, then mean over sequences.
* ``"seq_mean_token_sum_norm"``: sum over each sequence's valid elements / ``norm_constant``
  (default ``T``), then mean over sequences (Dr.GRPO: a constant normaliser, no length bias).

The mean over sequences is always over all B rows (a constant normaliser); a row with no valid
element contributes 0. With no valid element at all, ``"token_mean"`` returns 0 (keeping the graph).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .registry import Registry

__all__ = ["AGGREGATIONS", "aggregate"]

AGGREGATIONS: Registry = Registry("loss aggregation")


@AGGREGATIONS.register("token_mean")
def _token_mean(loss: Tensor, mask: Tensor, norm_constant: float | None) -> Tensor:
    return (loss * mask).sum() / mask.sum().clamp(min=1)


@AGGREGATIONS.register("seq_mean_token_mean")
def _seq_mean_token_mean(loss: Tensor, mask: Tensor, norm_constant: float | None) -> Tensor:
    per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
    return per_seq.mean()


@AGGREGATIONS.register("seq_mean_token_sum")
def _seq_mean_token_sum(loss: Tensor, mask: Tensor, norm_constant: float | None) -> Tensor:
    return (loss * mask).sum(dim=1).mean()


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, norm_constant: float | None) -> Tensor:
    c = float(loss.shape[1]) if norm_constant is None else float(norm_constant)
    return ((loss * mask).sum(dim=1) / c).mean()


def aggregate(loss: Tensor, mask: Tensor | None, mode: str, *, norm_constant: float | None = None) -> Tensor:
    """Reduce ``loss`` ``[B, T]`` with validity ``mask`` ``[B, T]`` (bool or 0/1; None = all valid) to a scalar.

    ``norm_constant`` is only used by ``"seq_mean_token_sum_norm"`` (default ``T``); passing it to
    another mode is an error.
    """
    fn: Callable = AGGREGATIONS.get(mode)
    if loss.dim() != 2:
        raise ValueError(f"loss must be [B, T], got shape {tuple(loss.shape)}")
    if norm_constant is not None:
        if mode != "seq_mean_token_sum_norm":
            raise ValueError(f"norm_constant is only used by 'seq_mean_token_sum_norm', not {mode!r}")
        if norm_constant <= 0:
            raise ValueError(f"norm_constant must be > 0, got {norm_constant}")
    if mask is None:
        mask_f = loss.new_ones(loss.shape)  # [B, T]
    else:
        if mask.shape != loss.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have loss's shape {tuple(loss.shape)}")
        mask_f = mask.to(device=loss.device, dtype=loss.dtype)  # [B, T]
    return fn(loss, mask_f, norm_constant)
