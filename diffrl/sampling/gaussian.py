"""Gaussian log densities and the step output shared by every sampler.

The reduction over latent elements is an explicit argument: Flow-GRPO and DDPO average the
per-element log density over the latent (`"mean"`), a true log-likelihood sums it (`"sum"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """One sampler step x_t -> x_prev for a batch of B samples with latents of shape [B, *S]."""

    prev_sample: torch.Tensor  # [B, *S] the next latent
    mean: torch.Tensor  # [B, *S] Gaussian mean of x_prev given x_t (the deterministic update)
    std: torch.Tensor  # [B] std of x_prev given x_t; zeros for deterministic steps
    log_prob: torch.Tensor | None  # [B] log p(x_prev | x_t) reduced over *S; None when std == 0
    sde_std: torch.Tensor | None = None  # [B] flow: Flow-GRPO's std_dev_t (no sqrt(-dt)); ddim: == std


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def per_sample(value, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A python float, 0-d tensor or Tensor[B] as a tensor broadcastable against `like` [B, *S].

    Returns a 0-d tensor for scalars and a [B, 1, ..., 1] view for per-sample values, in `dtype` on
    `like.device`.
    """
    # python floats go through float64: torch.as_tensor would round them to float32 first
    t = (value if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float64)).to(device=like.device, dtype=dtype)
    if t.ndim == 0:
        return t  # []
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"per-sample schedule values must be a scalar or shape [{like.shape[0]}], got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))  # [B, 1, ..., 1]


def batch_vector(value: torch.Tensor, batch: int) -> torch.Tensor:
    """A broadcastable per-sample tensor (0-d or [B, 1, ..., 1]) flattened to [B]."""
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)  # [B]


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduction: str = "mean"
) -> torch.Tensor:
    """log N(x; mean, std^2) per element, reduced over all non-batch dims -> [B].

    `x`, `mean`: [B, *S]; `std`: [B] (one std per sample) or a scalar. `reduction="mean"` is the
    Flow-GRPO / DDPO convention (average over latent elements), `"sum"` the exact joint log density.
    """
    check_reduction(reduction)
    std = torch.as_tensor(std, device=x.device)
    if std.ndim == 1:
        std = std.view(-1, *([1] * (x.ndim - 1)))  # [B, 1, ..., 1]
    elif std.ndim != 0:
        raise ValueError(f"std must be a scalar or shape [B], got {tuple(std.shape)}")
    elem = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI  # [B, *S]
    if elem.ndim == 1:
        return elem  # [B] nothing to reduce
    dims = tuple(range(1, elem.ndim))
    return elem.mean(dim=dims) if reduction == "mean" else elem.sum(dim=dims)  # [B]


def draw_noise(shape: torch.Size, like: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device then moved to `like.device`."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).to(like.device)  # [B, *S]
