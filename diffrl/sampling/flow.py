"""Rectified-flow steps: the Euler ODE step, the second-order multistep DPM-Solver++(2M) ODE step, and
Flow-GRPO's SDE step with its exact log-probability.

Convention: x_t = (1 - sigma) x0 + sigma eps, the model predicts the velocity v = eps - x0, and a
step goes from `sigma` to `sigma_prev` < sigma (dt = sigma_prev - sigma < 0).
"""

from __future__ import annotations

import torch

from diffrl.sampling.gaussian import (
    StepOutput,
    batch_vector,
    check_reduction,
    draw_noise,
    gaussian_log_prob,
    per_sample,
)


def flow_ode_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_prev) -> StepOutput:
    """Euler step x_prev = x + (sigma_prev - sigma) v, deterministic.

    Mirrors diffusers `FlowMatchEulerDiscreteScheduler.step` bit-for-bit: the sample is upcast to
    float32 (a float64 chain stays float64), sigmas likewise, and the result is cast back to the model
    output's dtype. `sigma`, `sigma_prev`: python float, 0-d tensor or Tensor[B].
    """
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x = sample.to(dtype)  # [B, *S]
    s = per_sample(sigma, x, dtype)  # [] or [B, 1, ..]
    s_prev = per_sample(sigma_prev, x, dtype)  # [] or [B, 1, ..]
    dt = s_prev - s  # [] or [B, 1, ..]
    prev = (x + dt * velocity).to(velocity.dtype)  # [B, *S]
    zeros = torch.zeros(x.shape[0], device=x.device, dtype=dtype)  # [B]
    return StepOutput(prev_sample=prev, mean=prev, std=zeros, log_prob=None, sde_std=None)


def flow_dpm2_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_prev,
    *,
    last_sample: torch.Tensor | None = None,
    last_velocity: torch.Tensor | None = None,
    sigma_last=None,
) -> StepOutput:
    """Multistep DPM-Solver++(2M) step (Lu et al. 2022) for rectified flow, deterministic; DiffusionNFT's "dpm2".

    Data prediction x0 = x - sigma v with alpha = 1 - sigma and lambda(s) = log((1 - s) / s). The 2M update
    x_prev = (sigma_prev / sigma) x - alpha_prev (e^-h - 1) (D0 + D1 / 2), D0 = x0, D1 = (x0 - x0_last) h / h_last,
    h = lambda(sigma_prev) - lambda(sigma), h_last = lambda(sigma) - lambda(sigma_last), is written here in the
    equivalent form of an Euler step on an extrapolated x0 (since -alpha_prev (e^-h - 1) = 1 - sigma_prev / sigma):
    x_prev = x + (sigma_prev / sigma - 1) (x - x0_eff), x0_eff = x0 + (h / (2 h_last)) (x0 - x0_last).

    First order (the Euler / DDIM step) without a previous step (`last_*` None, the first step), into
    sigma_prev == 0 (the last step: diffusers' lower_order_final) and after sigma_last == 1 (h_last = inf).
    `last_sample`, `last_velocity`: the previous step's input x and model output, at `sigma_last`.
    Schedule values: python float, 0-d tensor or Tensor[B]. Computed (and returned) in at least float32, with
    the step coefficients in float64.
    """
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x = sample.to(dtype)  # [B, *S]
    x0 = x - per_sample(sigma, x, dtype) * velocity.to(dtype)  # [B, *S]
    s = per_sample(sigma, x, torch.float64)  # [] or [B, 1, ..]
    s_prev = per_sample(sigma_prev, x, torch.float64)  # [] or [B, 1, ..]
    ratio = (s_prev / s).to(dtype)  # [] or [B, 1, ..]
    if last_sample is not None and last_velocity is not None and sigma_last is not None:
        s_last = per_sample(sigma_last, x, torch.float64)  # [] or [B, 1, ..]
        lam = lambda v: torch.log1p(-v) - torch.log(v)  # noqa: E731  log-SNR of rectified flow
        h, h_last = lam(s_prev) - lam(s), lam(s) - lam(s_last)  # [] or [B, 1, ..]; h = inf at s_prev == 0
        coef = torch.where(s_prev > 0, h / (2 * h_last), torch.zeros_like(h)).to(dtype)  # 0 after s_last == 1
        x0_last = last_sample.to(dtype) - per_sample(sigma_last, x, dtype) * last_velocity.to(dtype)  # [B, *S]
        x0 = x0 + coef * (x0 - x0_last)  # [B, *S]
    prev = x + (ratio - 1) * (x - x0)  # [B, *S]
    zeros = torch.zeros(x.shape[0], device=x.device, dtype=dtype)  # [B]
    return StepOutput(prev_sample=prev, mean=prev, std=zeros, log_prob=None, sde_std=None)


def flow_sde_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma,
    sigma_prev,
    *,
    noise_level: float = 0.7,
    sigma_max=None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """Flow-GRPO's SDE step (Liu et al. 2025, `sde_step_with_logprob`) with its Gaussian log-prob.

    dt = sigma_prev - sigma; std_t = a sqrt(sigma / (1 - sigma)) with a = `noise_level` (at
    sigma == 1 the denominator uses `sigma_max`, the schedule's second value sigmas[1]);
    mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt;
    x_prev = mean + std_t sqrt(-dt) z.

    With `prev_sample` given, no noise is drawn and the log-prob of that stored x_prev is returned
    (trajectory re-scoring). As in Flow-GRPO the log-prob is computed against `prev_sample.detach()`
    (gradients flow through the mean only), and everything is computed in at least float32;
    `prev_sample` is returned in that compute dtype.

    `noise_level == 0` is the Euler step computed explicitly (mean = x + dt v, std 0, sde_std 0,
    log_prob None: a point mass has no density), never through 0/0.
    """
    check_reduction(reduction)
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x = sample.to(dtype)  # [B, *S]
    v = velocity.to(dtype)  # [B, *S]
    B = x.shape[0]
    s = per_sample(sigma, x, dtype)  # [] or [B, 1, ..]
    s_prev = per_sample(sigma_prev, x, dtype)  # [] or [B, 1, ..]
    dt = s_prev - s  # [] or [B, 1, ..], negative

    if noise_level == 0:
        mean = x + dt * v  # [B, *S]
        zeros = torch.zeros(B, device=x.device, dtype=dtype)  # [B]
        prev = mean if prev_sample is None else prev_sample.to(dtype)  # [B, *S]
        return StepOutput(prev_sample=prev, mean=mean, std=zeros, log_prob=None, sde_std=zeros)

    if sigma_max is None:
        if bool((s == 1).any()):
            raise ValueError("flow_sde_step at sigma == 1 needs sigma_max (the schedule's sigmas[1])")
        denom_sigma = s
    else:
        denom_sigma = torch.where(s == 1, per_sample(sigma_max, x, dtype), s)  # [] or [B, 1, ..]
    std_t = noise_level * torch.sqrt(s / (1 - denom_sigma))  # [] or [B, 1, ..]
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt  # [B, *S]
    step_std = std_t * torch.sqrt(-dt)  # [] or [B, 1, ..]

    if prev_sample is None:
        prev = mean + step_std * draw_noise(x.shape, x, dtype, generator)  # [B, *S]
    else:
        prev = prev_sample.to(dtype)  # [B, *S]
    std = batch_vector(step_std, B)  # [B]
    log_prob = gaussian_log_prob(prev.detach(), mean, std, reduction)  # [B]
    return StepOutput(prev_sample=prev, mean=mean, std=std, log_prob=log_prob, sde_std=batch_vector(std_t, B))
