"""Toy differentiable rewards on pixel statistics, for demos and gradient-based trainers.

Both take images [B, 3, H, W] or videos [B, F, 3, H, W] with pixel values in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Reward
from .registry import register_reward


def _float_at_least_32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/integer inputs; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with gradient 0 (not inf, hence NaN) at x == 0, e.g. for grey images."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def colorfulness(images: Tensor, pixel_scale: float = 255.0) -> Tensor:
    """Hasler & Süsstrunk (2003) colourfulness M of [N, 3, H, W] images in [0, 1] -> [N].

    Pixels are first multiplied by `pixel_scale` (default 255: the paper's units, in which its
    thresholds apply, e.g. ~33 "moderately", ~59 "quite", ~82 "highly colourful").
        rg = R - G,  yb = (R + G) / 2 - B
        M  = sqrt(var_rg + var_yb) + 0.3 * sqrt(mean_rg^2 + mean_yb^2)
    Means and variances are over the H * W pixels of each image; variance is the population
    variance (divide by H * W), as numpy's default std in the reference implementations.
    """
    x = images.to(_float_at_least_32(images.dtype)) * pixel_scale  # [N, 3, H, W]
    r, g, b = x.unbind(dim=1)  # each [N, H, W]
    rg = (r - g).flatten(1)  # [N, H*W]
    yb = (0.5 * (r + g) - b).flatten(1)  # [N, H*W]
    var = rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0)  # [N]
    mean_sq = rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2  # [N]
    return _safe_sqrt(var) + 0.3 * _safe_sqrt(mean_sq)  # [N]


@register_reward("brightness")
class Brightness(Reward):
    """Mean pixel value over all channels, pixels (and frames), in the samples' [0, 1] units."""

    differentiable = True
    accepts = ("image", "video")

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return samples.to(_float_at_least_32(samples.dtype)).flatten(1).mean(dim=1)  # [B]


@register_reward("colorfulness")
class Colorfulness(Reward):
    """Hasler–Süsstrunk colourfulness (see `colorfulness`); a video scores its frames' mean."""

    differentiable = True
    accepts = ("image", "video")

    def __init__(self, pixel_scale: float = 255.0):
        """pixel_scale: multiply [0, 1] pixels by this first; 255 gives the paper's units."""
        self.pixel_scale = pixel_scale

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        if samples.ndim == 4:  # image [B, 3, H, W]
            return colorfulness(samples, self.pixel_scale)  # [B]
        batch, frames = samples.shape[:2]  # video [B, F, 3, H, W]
        per_frame = colorfulness(samples.flatten(0, 1), self.pixel_scale)  # [B*F]
        return per_frame.view(batch, frames).mean(dim=1)  # [B]
