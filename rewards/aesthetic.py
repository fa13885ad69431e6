"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE"), as DDPO
uses it: the unit-norm CLIP ViT-L/14 image embedding through a 5-layer linear MLP, about 1-10.

    reward = build_reward("aesthetic")               # openai/clip-vit-large-patch14 + the MLP from the cache
    reward = build_reward("aesthetic", head="/path/sac+logos+ava1-l14-linearMSE.pth")
    reward = build_reward("aesthetic", model="tiny")  # random tiny CLIP and head (tests)
    scores = reward(images, prompts)  # prompts are not read

The head's default file is the copy TRL's DDPO example loads (trl-lib/ddpo-aesthetic-predictor,
aesthetic-model.pth); the original .pth from the improved-aesthetic-predictor repository has the same
keys. The MLP has no activations (Linear 768-1024-128-64-16-1 with dropout between), as published.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .clip import ClipReward
from .hub import TINY, load_state_dict, resolve_file, seeded
from .registry import register_reward


class AestheticHead(nn.Module):
    """The published MLP (state-dict keys layers.0/2/4/6/7); dropout is inactive in eval mode."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)  # [B, D] -> [B]

    @classmethod
    def tiny(cls, input_size: int, seed: int) -> AestheticHead:
        """Random weights ~ N(0, 1 / fan_in), zero biases: the linear stack keeps the input's scale, so
        tiny rewards vary visibly between images (nn.Linear's default would shrink it ~10x per layer)."""

        def build():
            head = cls(input_size)
            for layer in head.layers:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
                    nn.init.zeros_(layer.bias)
            return head

        return seeded(seed, build)


@register_reward("aesthetic")
class Aesthetic(ClipReward):
    """LAION aesthetic score of the image (prompts ignored)."""

    default_model = "openai/clip-vit-large-patch14"
    default_head = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
    what = "CLIP model"

    def __init__(self, model: str | None = None, *, head: str | None = None, processor: str | None = None,
                 differentiable: bool = False, dtype: str = "float32", device: str | None = None):
        """head: the MLP's weights, a local .pth/.safetensors file or "owner/name/file" in the HF cache
        (default: TRL's copy; with model="tiny" a random head unless one is given)."""
        super().__init__(model, processor=processor, differentiable=differentiable, dtype=dtype, device=device)
        self.head_spec = head or (None if self.model == TINY else self.default_head)

    def _load_head(self) -> None:
        dim = self.clip.config.projection_dim
        if self.head_spec is None:
            self.head = AestheticHead.tiny(dim, seed=1)
        else:
            path = resolve_file(self.head_spec, reward=self._name(), what="aesthetic MLP head", fix_arg="head")
            self.head = AestheticHead(dim)
            self.head.load_state_dict(load_state_dict(path))
        self.head.to(self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.clip, self.head]

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        self._ready(samples)
        embeds = self.image_embeds(samples)  # [B, D] unit norm, float32
        return self.head(embeds.to(self.dtype)).float()  # [B]
