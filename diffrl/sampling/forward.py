"""The forward (noising) process on clean samples, for trainers that learn from final samples only.

x_t = alpha x0 + sigma eps with per-sample coefficients: rectified flow has alpha = 1 - sigma (the
noise level t = sigma), DDPM has alpha = sqrt(a_t), sigma = sqrt(1 - a_t) with a_t the cumulative
alpha product. A model output is a velocity ("flow", v = eps - x0), a noise ("epsilon") or a
v-prediction ("v_prediction", v = alpha eps - sigma x0). For a fixed x_t the x0 it implies is affine in
the output with coefficients that do not depend on the output, so any mix of outputs whose weights sum
to one (DiffusionNFT's implicit policies) maps to the same mix of x0 predictions.
"""

from __future__ import annotations

import torch

from diffrl.sampling.gaussian import per_sample

PREDICTION_TYPES = ("flow", "epsilon", "v_prediction", "sample")


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x_t = alpha x0 + sigma eps. x0, noise: [B, *S]; alpha, sigma: float, 0-d or [B]. -> [B, *S]"""
    return per_sample(alpha, x0, x0.dtype) * x0 + per_sample(sigma, x0, x0.dtype) * noise


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """What the model should output at x_t = alpha x0 + sigma eps. -> [B, *S]

    flow: eps - x0; epsilon: eps; v_prediction: alpha eps - sigma x0; sample (x0-prediction): x0.
    """
    _check(prediction_type)
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return noise
    return per_sample(alpha, x0, x0.dtype) * noise - per_sample(sigma, x0, x0.dtype) * x0


def predict_x0(x_t: torch.Tensor, output: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The clean sample a model output implies at x_t, exact for any (alpha, sigma). -> [B, *S]

    flow: (x_t - sigma v) / (alpha + sigma)  (= x_t - t v when alpha = 1 - t);
    epsilon: (x_t - sigma eps) / alpha;  v_prediction: (alpha x_t - sigma v) / (alpha^2 + sigma^2);
    sample: the output itself.
    """
    _check(prediction_type)
    if prediction_type == "sample":
        return output
    a, s = per_sample(alpha, x_t, x_t.dtype), per_sample(sigma, x_t, x_t.dtype)  # [] or [B, 1, ..]
    if prediction_type == "flow":
        return (x_t - s * output) / (a + s)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a
    return (a * x_t - s * output) / (a**2 + s**2)
