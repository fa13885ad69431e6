"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

    reward = build_reward("pickscore")                # yuvalkirstain/PickScore_v1 from the HF cache
    reward = build_reward("pickscore", model="tiny")  # random tiny CLIP: the same code, for tests
    scores = reward(images, prompts)  # images [B, 3, H, W] in [0, 1] -> float32 [B]

score = exp(logit_scale) * cos(image embedding, text embedding), as the PickScore authors compute it
(about 18-23 for real images; Flow-GRPO divides by 26, a constant that group normalisation removes).
Preprocessing is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor (resize the short side to 224,
bicubic, centre crop, CLIP mean/std), exactly or, with differentiable=True, as tensor ops.
"""

from __future__ import annotations

from torch import Tensor

from .clip import ClipReward
from .registry import register_reward


@register_reward("pickscore")
class PickScore(ClipReward):
    """exp(logit_scale) * cosine similarity of PickScore_v1's image and text embeddings."""

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    what = "PickScore model"

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        device = self._ready(samples)
        image = self.image_embeds(samples)  # [B, D]
        text = self.text_embeds(prompts, device)  # [B, D]
        return self.clip.logit_scale.exp().float() * (image * text).sum(-1)  # [B]
