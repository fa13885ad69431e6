"""KL divergence estimators and exact Gaussian KLs for one denoising step.

Sample estimators (Schulman, "Approximating KL divergence", 2020), for ``x ~ pi`` with
``logp = log pi(x)`` and ``logp_ref = log pi_ref(x)``, estimate ``KL(pi || pi_ref)``:

* ``k1 = logp - logp_ref``: unbiased, high variance, can be negative.
* ``k2 = 0.5 (logp - logp_ref)^2``: biased (low bias when the policies are close), non-negative.
* ``k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1``: unbiased, non-negative (GRPO, DeepSeekMath).

For diffusion, a denoising step is Gaussian with a shared std for policy and reference, so the exact
KL is available: :func:`gaussian_kl`. Flow-GRPO's code uses a differently scaled version:
:func:`flow_grpo_kl`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffrl.runtime import check_on_device

from .registry import Registry

__all__ = ["KL_ESTIMATORS", "flow_grpo_kl", "gaussian_kl", "kl_estimator"]

KL_ESTIMATORS: Registry = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    return logp - logp_ref


@KL_ESTIMATORS.register("k2")
def _k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    return 0.5 * (logp - logp_ref) ** 2


@KL_ESTIMATORS.register("k3")
def _k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1.0


def kl_estimator(logp: Tensor, logp_ref: Tensor, kind: str = "k3") -> Tensor:
    """Elementwise estimate of ``KL(pi || pi_ref)`` from log-probs of samples drawn from ``pi``.

    ``kind`` is ``"k1"``, ``"k2"`` or ``"k3"`` (see module docstring). Output has ``logp``'s shape.
    """
    if logp.shape != logp_ref.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_ref {tuple(logp_ref.shape)} must have the same shape")
    return KL_ESTIMATORS.get(kind)(logp, logp_ref)


def _per_sample_std(std: float | Tensor, like: Tensor) -> Tensor:
    """``std`` as a ``[B]`` tensor (from a float, a 0-d/1-element tensor, or any tensor with B elements)."""
    b = like.shape[0]
    std = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    if std.numel() == 1:
        std = std.reshape(()).expand(b)
    elif std.numel() == b and std.shape[0] == b:
        std = std.reshape(b)
    else:
        raise ValueError(f"std must be a float or have one value per sample ([{b}]), got shape {tuple(std.shape)}")
    check_on_device(std > 0, "std must be > 0")  # on CUDA without waiting for the device
    return std  # [B]


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: float | Tensor, *, reduction: str = "sum") -> Tensor:
    """Exact ``KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) = ||mean - mean_ref||^2 / (2 std^2)`` per sample.

    Args:
        mean, mean_ref: ``[B, ...]`` means of one denoising step (policy and reference).
        std: the step's *real* std (e.g. ``std_t * sqrt(-dt)`` for Flow-GRPO's SDE, ``eta * sigma_t``
            for DDIM/DDPO): a float or one value per sample ``[B]``.
        reduction: ``"sum"`` over all non-batch elements (the exact KL) or ``"mean"`` (divided by the
            number of elements per sample).

    Returns:
        ``[B]``.
    """
    if mean.shape != mean_ref.shape or mean.dim() < 1:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must have the same shape [B, ...]")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    sq = (mean - mean_ref).pow(2).reshape(mean.shape[0], -1)  # [B, D]
    sq = sq.sum(dim=1) if reduction == "sum" else sq.mean(dim=1)  # [B]
    s = _per_sample_std(std, mean)  # [B]
    return sq / (2.0 * s**2)  # [B]


def flow_grpo_kl(mean: Tensor, mean_ref: Tensor, sde_std: float | Tensor) -> Tensor:
    """Flow-GRPO code's KL term: ``mean_over_elements((mean - mean_ref)^2) / (2 sde_std^2)``, ``[B]``.

    ``sde_std`` is Flow-GRPO's ``std_dev_t = a * sqrt(sigma / (1 - sigma))``, which lacks the
    ``sqrt(-dt)`` factor of the step's real std, and the squared distance is averaged, not summed,
    over latent elements. So this equals ``gaussian_kl(..., std=sde_std * sqrt(-dt)) * (-dt) / D``
    (``D`` elements per sample): its scale differs from the exact KL, and Flow-GRPO's ``beta`` (0.04)
    is calibrated to this convention. Use it when reproducing Flow-GRPO recipes.
    """
    return gaussian_kl(mean, mean_ref, sde_std, reduction="mean")
