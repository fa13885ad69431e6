"""DDIM with eta (Song et al. 2021) and its Gaussian log-probability, as used by DDPO (Black et al. 2023).

Convention: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t the cumulative alpha product; a step
goes from `alpha_t` to `alpha_prev` > alpha_t.
"""

from __future__ import annotations

import torch

from diffrl.runtime import check_on_device
from diffrl.sampling.gaussian import (
    StepOutput,
    batch_vector,
    check_reduction,
    draw_noise,
    gaussian_log_prob,
    per_sample,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""What the model outputs: the noise, the v-prediction, or the clean sample itself (x0-prediction, MDM)."""


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_t,
    alpha_prev,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """DDPO's `ddim_step_with_logprob`: the DDIM update with noise eta * sigma_t and its log-prob.

    sigma_t^2 = (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev); std = eta sigma_t;
    mean = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - std^2) eps_pred; x_prev = mean + std z.
    eta = 1 is DDPM ancestral sampling, eta = 0 is deterministic DDIM (std 0, log_prob None) and
    matches diffusers `DDIMScheduler.step` with clip_sample=False (same arithmetic order). A step whose
    variance is zero for eta > 0 (alpha_prev == 1, the last step under `set_alpha_to_one=True`) is
    deterministic too: it returns log_prob None, so the rollout records no log-prob for it and no
    trainer trains on it (its Gaussian density would be 0 / 0).

    `alpha_t`, `alpha_prev`: python float, 0-d tensor or Tensor[B]. Computed in at least float32.
    With `prev_sample` given, no noise is drawn and its log-prob is returned; as in DDPO the
    log-prob uses `prev_sample.detach()`. `sde_std` equals `std`.
    """
    check_reduction(reduction)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"ddim prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x = sample.to(dtype)  # [B, *S]
    out = model_output.to(dtype)  # [B, *S]
    B = x.shape[0]
    a_t = per_sample(alpha_t, x, dtype)  # [] or [B, 1, ..]
    a_prev = per_sample(alpha_prev, x, dtype)  # [] or [B, 1, ..]
    beta_t = 1 - a_t  # [] or [B, 1, ..]

    if prediction_type == "epsilon":
        pred_x0 = (x - beta_t ** (0.5) * out) / a_t ** (0.5)  # [B, *S]
        pred_eps = out  # [B, *S]
    elif prediction_type == "sample":  # x0-prediction (diffusers' "sample"): eps follows from x_t
        pred_x0 = out  # [B, *S]
        pred_eps = (x - a_t ** (0.5) * out) / beta_t ** (0.5)  # [B, *S]
    else:  # v_prediction
        pred_x0 = (a_t**0.5) * x - (beta_t**0.5) * out  # [B, *S]
        pred_eps = (a_t**0.5) * out + (beta_t**0.5) * x  # [B, *S]

    variance = ((1 - a_prev) / beta_t) * (1 - a_t / a_prev)  # [] or [B, 1, ..]
    std_t = eta * variance ** (0.5)  # [] or [B, 1, ..]
    # clamp only guards float rounding at eta == 1 (the exact value is > 0); exact when positive
    direction = (1 - a_prev - std_t**2).clamp(min=0) ** (0.5) * pred_eps  # [B, *S]
    mean = a_prev ** (0.5) * pred_x0 + direction  # [B, *S]
    std = batch_vector(std_t, B)  # [B]

    zero = std_t == 0  # [] or [B, 1, ..]: alpha_prev == 1 (DDIMScheduler's set_alpha_to_one) leaves no noise
    # re-scoring stored transitions at per-sample steps (a trainer's inner loop): those are the trajectory's
    # stochastic steps, so zero variance is an error, checked on the device without waiting for it
    rescoring = prev_sample is not None and zero.ndim > 0
    if eta == 0 or (not rescoring and bool(zero.all())):  # deterministic: no log-prob, nothing to train on this step
        prev = mean if prev_sample is None else prev_sample.to(dtype)  # [B, *S]
        return StepOutput(prev_sample=prev, mean=mean, std=std, log_prob=None, sde_std=std)
    message = ("some samples' DDIM step has zero variance (alpha_prev == 1: a deterministic step with no "
               "log-prob); re-score only the trajectory's stochastic steps (Trajectory.steps)")
    if rescoring:
        check_on_device(~zero, message)
    elif bool(zero.any()):
        raise ValueError(message)
    if prev_sample is None:
        prev = mean + std_t * draw_noise(x.shape, x, dtype, generator)  # [B, *S]
    else:
        prev = prev_sample.to(dtype)  # [B, *S]
    log_prob = gaussian_log_prob(prev.detach(), mean, std, reduction)  # [B]
    return StepOutput(prev_sample=prev, mean=mean, std=std, log_prob=log_prob, sde_std=std)
