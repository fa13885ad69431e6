"""Feature consistency of a clip: VBench's subject / background consistency over any frame encoder.

    score = mean_{t=2..F} [max(0, cos(f_t, f_{t-1})) + max(0, cos(f_t, f_1))] / 2

with f_t the features of frame t. 1 for a frozen clip; lower when frames drift from their neighbour and from the
first frame. VBench's background consistency is this with CLIP ViT-B/32 image embeddings (`encoder="clip"`:
clipscore's CLIP, openai/clip-vit-base-patch32 by default); its subject consistency uses DINO ViT-B/16 (not
here: no DINO encoder in diffrl). Encoders:

    "pixels"   each frame area-averaged to size x size (default 32), flattened: no weights, differentiable
    "clip"     the image embeddings of the clipscore reward's CLIP (an alias of "clipscore")
    NAME       any reward with `image_embeds` (clipscore, pickscore, aesthetic): its vision tower and projection;
               encoder_kwargs go to it (model="tiny" in tests; differentiable=True lets gradients through)

Pixel vectors are non-negative, so their cosine never reaches the clamp: 8 frames of unrelated uniform noise score
0.751 with "pixels" at 32 x 32 (the expected cosine of two such vectors is 0.75) and 0.922 at 64 x 64 (averaging
2 x 2 cells shrinks the noise), against 1 for a frozen clip.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Reward
from .registry import build_reward, register_reward

PIXELS = "pixels"
ENCODER_ALIASES = {"clip": "clipscore"}


def frame_consistency(features: Tensor) -> Tensor:
    """VBench's consistency of per-frame features [B, F, D] -> [B]: the mean over t >= 2 of the clamped cosine
    to the previous frame and to the first frame, averaged."""
    unit = F.normalize(features, dim=-1)  # [B, F, D]
    to_previous = (unit[:, 1:] * unit[:, :-1]).sum(-1).clamp(min=0)  # [B, F-1]
    to_first = (unit[:, 1:] * unit[:, :1]).sum(-1).clamp(min=0)  # [B, F-1]
    return ((to_previous + to_first) / 2).mean(dim=1)  # [B]


def pixel_features(videos: Tensor, size: int) -> Tensor:
    """Frames area-averaged to size x size and flattened: [B, F, 3, H, W] -> [B, F, 3 * size * size]."""
    frames = videos.flatten(0, 1).to(torch.promote_types(videos.dtype, torch.float32))  # [B*F, 3, H, W]
    pooled = F.adaptive_avg_pool2d(frames, size)  # [B*F, 3, size, size]
    return pooled.flatten(1).unflatten(0, videos.shape[:2])  # [B, F, 3*size*size]


@register_reward("feature_consistency")
class FeatureConsistency(Reward):
    """VBench subject / background consistency of frame features (see module docstring); 1 for a frozen clip."""

    accepts = ("video",)

    def __init__(self, encoder: str = PIXELS, size: int = 32, encoder_kwargs: dict[str, Any] | None = None):
        """encoder: "pixels", "clip", or an image reward with image embeddings; size: the pixel grid of "pixels";
        encoder_kwargs: the encoder reward's arguments (model, differentiable, dtype, ...)."""
        if size < 1:
            raise ValueError(f"feature_consistency size must be >= 1, got {size}")
        self.encoder_name, self.size = encoder, size
        self.encoder = None if encoder == PIXELS else self._build_encoder(encoder, encoder_kwargs or {})
        self.differentiable = self.encoder is None or self.encoder.differentiable

    @staticmethod
    def _build_encoder(name: str, kwargs: dict[str, Any]) -> Reward:
        encoder = build_reward(ENCODER_ALIASES.get(name, name), **kwargs)  # lazy: no weights load here
        if not callable(getattr(encoder, "image_embeds", None)):
            raise ValueError(f"feature_consistency encoder {name!r} has no image embeddings; use {PIXELS!r}, "
                             f"'clip' or a CLIP-based image reward (clipscore, pickscore, aesthetic)")
        return encoder

    @classmethod
    def declares_differentiable(cls, kwargs: dict[str, Any] | None = None) -> bool:
        """Pixels are differentiable; an encoder reward is when built with differentiable=True."""
        from .registry import declares_differentiable

        kwargs = kwargs or {}
        encoder = kwargs.get("encoder", PIXELS)
        if encoder == PIXELS:
            return True
        return declares_differentiable(ENCODER_ALIASES.get(encoder, encoder), kwargs.get("encoder_kwargs"))

    def describe(self) -> str:
        return f"feature_consistency({self.encoder_name})"

    def to(self, device):
        if self.encoder is not None:
            self.encoder.to(device)
        return self

    def load(self):
        if self.encoder is not None:
            self.encoder.load()
        return self

    def features(self, videos: Tensor) -> Tensor:
        """Per-frame features [B, F, D] (float32, or float64 pixels for float64 clips)."""
        if self.encoder is None:
            return pixel_features(videos, self.size)
        self.encoder._ready(videos)  # load on first use and follow the clips' device
        embeds = self.encoder.image_embeds(videos.flatten(0, 1))  # [B*F, D]
        return embeds.unflatten(0, videos.shape[:2])  # [B, F, D]

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        if samples.shape[1] < 2:
            raise ValueError(f"reward 'feature_consistency' needs clips of at least 2 frames, got {samples.shape[1]}")
        return frame_consistency(self.features(samples))  # [B]
