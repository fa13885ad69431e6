"""JPEG file size rewards, exactly as in DDPO (Black et al., 2023; kvablack/ddpo-pytorch).

Each image in [0, 1] becomes uint8 via round(x * 255) clamped to [0, 255], is saved by PIL as a
JPEG at quality 95 in memory, and scores its size in kB (bytes / 1000). Compressibility is -size,
incompressibility is +size. (Flow-GRPO rescales compressibility to -size / 500; we keep DDPO's
units, and advantage normalisation makes the scale irrelevant to GRPO-style trainers.)
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from .base import Reward
from .registry import register_reward


def to_uint8_hwc(images: Tensor) -> Tensor:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8 on the CPU, DDPO's rounding.

    Upcasts to float32 first so bf16/fp16 samples round the same way as float32 ones.
    """
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)  # [B, 3, H, W]
    return pixels.permute(0, 2, 3, 1).cpu()  # [B, H, W, 3]


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG size in kB (1000 bytes) of each image in [B, 3, H, W] in [0, 1]; float64 [B] on CPU."""
    sizes = []
    for pixels in to_uint8_hwc(images).numpy():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float64)


class _JpegSize(Reward):
    differentiable = False
    accepts = ("image",)
    sign: float = 1.0

    def __init__(self, quality: int = 95):
        """quality: PIL JPEG quality (DDPO uses 95)."""
        if not 1 <= quality <= 100:
            raise ValueError(f"reward {self.name!r}: quality must be in [1, 100], got {quality}")
        self.quality = quality

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return self.sign * jpeg_size_kb(samples, self.quality)  # [B]


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """Minus the JPEG size in kB: smaller files score higher (DDPO)."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """The JPEG size in kB: larger files score higher (DDPO)."""

    sign = 1.0
