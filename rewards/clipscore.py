"""CLIPScore (Hessel et al., 2021): w * max(cos(image, text), 0) with a CLIP backbone, w = 2.5.

    reward = build_reward("clipscore")                                      # openai/clip-vit-base-patch32
    reward = build_reward("clipscore", model="openai/clip-vit-large-patch14", weight=100)  # torchmetrics' scale
    reward = build_reward("clipscore", model="tiny")                        # random tiny CLIP (tests)

The paper uses ViT-B/32 and w = 2.5; any transformers CLIP folder works (its own processor is used).
"""

from __future__ import annotations

from torch import Tensor

from .clip import ClipReward
from .registry import register_reward


@register_reward("clipscore")
class CLIPScore(ClipReward):
    """weight * max(cos(image embedding, text embedding), 0)."""

    default_model = "openai/clip-vit-base-patch32"
    what = "CLIP model"

    def __init__(self, model: str | None = None, *, weight: float = 2.5, processor: str | None = None,
                 differentiable: bool = False, dtype: str = "float32", device: str | None = None):
        """weight: w of the paper (2.5); torchmetrics reports 100 * max(cos, 0)."""
        super().__init__(model, processor=processor, differentiable=differentiable, dtype=dtype, device=device)
        self.weight = float(weight)

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        device = self._ready(samples)
        cos = (self.image_embeds(samples) * self.text_embeds(prompts, device)).sum(-1)  # [B]
        return self.weight * cos.clamp(min=0.0)
