"""SynthShapes learned proxy reward: a small differentiable CNN that imitates the exact scorer.

    reward = build_reward("toy_proxy")                  # predicted dense partial credit in [0, 1]
    reward = build_reward("toy_proxy", head="correct")  # predicted P(exact scorer says correct)
    reward = build_reward("toy_proxy", path="runs/proxy")  # weights from a folder, not the shipped
    scores = reward(images, prompts, metadata)  # images [B, 3, H, W] in [0, 1] -> float32 [B]

Gradients flow to `images` (use it with differentiable-reward trainers); judge the result with the
exact rewards "toyworld" / "toyworld_accuracy" to measure how much of the gain is reward hacking.
`metadata` is required (GenEval-format dicts from diffrl.toyworld.make_prompt_set); prompts are
not read. Images of another size are resized to 32 px (area averaging when shrinking, bilinear
otherwise; both differentiable). Model, prompt encoding and training: diffrl.toyworld.proxy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffrl.toyworld.proxy import IMAGE_SIZE, encode_batch, load_proxy

from .base import Reward
from .registry import register_reward

HEADS = ("partial", "correct")


@register_reward("toy_proxy")
class ToyProxyReward(Reward):
    """Learned SynthShapes reward: predicted partial credit ("partial") or P(correct)
    ("correct")."""

    differentiable = True

    def __init__(self, path: str | Path | None = None, head: str = "partial",
                 device: torch.device | str = "cpu"):
        if head not in HEADS:
            raise ValueError(f"toy_proxy head must be one of {list(HEADS)}, got {head!r}")
        self.head = head
        self.model = load_proxy(path, device=device).requires_grad_(False)

    def to(self, device: torch.device | str) -> ToyProxyReward:
        self.model.to(device)
        return self

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        if metadata is None:
            raise ValueError(
                f"reward {self._name()!r} needs GenEval-format metadata (one dict with an "
                "'include' list per sample), got metadata=None; pass the prompt set's rows"
            )
        codes = encode_batch(metadata).to(samples.device)  # [B, PROMPT_DIM]
        if self.model.coords.device != samples.device:
            self.to(samples.device)
        x = samples.float()  # [B, 3, H, W]
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            shrink = x.shape[-2] >= IMAGE_SIZE and x.shape[-1] >= IMAGE_SIZE
            size = (IMAGE_SIZE, IMAGE_SIZE)
            x = (F.interpolate(x, size=size, mode="area") if shrink
                 else F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        partial, logit = self.model(x.clamp(0.0, 1.0), codes)  # each [B]
        return partial if self.head == "partial" else torch.sigmoid(logit)
