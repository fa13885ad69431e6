"""Image preprocessing of reward models, two ways.

exact          what the published reward code does: pixels become uint8 PIL images (DDPO's rounding,
               round(x * 255)), then the reference transform (a transformers image processor, or
               torchvision transforms on PIL images). Not differentiable; on the CPU.
differentiable the same steps as torch ops on the float samples, on their device, so gradients
               reach the pixels: resize with bicubic/bilinear antialiasing (torch uses PIL's kernels
               then: Keys a = -0.5 and support scaled when shrinking), centre crop, normalise.
               It skips the uint8 rounding after each PIL pass, so it matches the exact path to
               about 1/255 in pixel units (tests/test_rewards_preprocess.py pins the tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes (what image processor configs store) -> torch interpolate modes
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def to_pil(images: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in [0, 1] -> B RGB PIL images, rounded as DDPO does (round(x * 255))."""
    from .jpeg import to_uint8_hwc

    return [Image.fromarray(pixels) for pixels in to_uint8_hwc(images).numpy()]


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `size` and the longer int(size * long / short): the rule of
    transformers' image processors and of torchvision's Resize(int)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize(x: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """[B, C, H, W] -> [B, C, h, w] as PIL resizes uint8 images: antialiased, separable, the width
    pass first, each pass clipped to [0, 1] (PIL stores the intermediate image as uint8; without the
    clip between passes, high-contrast pixels differ by up to 24/255, with it by about 1/255)."""
    h, w = size
    if tuple(x.shape[-2:]) == (h, w):
        return x  # PIL returns an unchanged copy
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), mode=mode, align_corners=False, antialias=True).clamp(0.0, 1.0)
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=True).clamp(0.0, 1.0)
    return x  # [B, C, h, w]


def center_crop(x: Tensor, size: tuple[int, int], rounding: str = "floor") -> Tensor:
    """[B, C, H, W] -> [B, C, ch, cw]. Offsets (H - ch) // 2 ("floor": transformers) or
    round((H - ch) / 2) ("round": torchvision); images smaller than the crop are zero-padded first."""
    ch, cw = size
    h, w = x.shape[-2:]
    if h < ch or w < cw:  # both libraries pad with zeros, centred
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    if rounding == "floor":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


def normalize(x: Tensor, mean, std) -> Tensor:
    """(x - mean) / std per channel of [B, 3, H, W]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resize_longest_pad(x: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """[B, C, H, W] -> [B, C, size, size]: the longer side scaled to `size` (each side round(s * scale)),
    then zero-padded, centred (open_clip's ResizeMaxSize, HPSv2's evaluation transform)."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = resize(x, (nh, nw), mode)  # [B, C, nh, nw]
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # [B, C, size, size]
    return x


@dataclass(frozen=True)
class ShortestEdgeCrop:
    """Resize the shorter side, centre crop, normalise: CLIP's preprocessing (and BLIP's, TrOCR's
    square resize when `square`), as differentiable tensor ops."""

    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "bicubic"
    crop_rounding: str = "floor"

    def __call__(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, crop_h, crop_w] normalised, differentiable."""
        x = images.float()
        x = resize(x, shortest_edge_size(x.shape[-2], x.shape[-1], self.size), self.mode)
        return normalize(center_crop(x, self.crop, self.crop_rounding), self.mean, self.std)

    @classmethod
    def from_image_processor(cls, processor) -> ShortestEdgeCrop:
        """The tensor twin of a transformers CLIP-style image processor (reads its config)."""
        size = processor.size
        short = size["shortest_edge"] if "shortest_edge" in size else size["height"]
        crop = processor.crop_size if getattr(processor, "do_center_crop", True) else size
        resample = int(getattr(processor.resample, "value", processor.resample))
        if resample not in _RESAMPLE:
            raise ValueError(f"no differentiable twin of PIL resample {resample}; supported: {sorted(_RESAMPLE)}")
        return cls(size=short, crop=(crop["height"], crop["width"]), mean=tuple(processor.image_mean),
                   std=tuple(processor.image_std), mode=_RESAMPLE[resample], crop_rounding="floor")
