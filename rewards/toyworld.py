"""SynthShapes rewards: the exact GenEval-style scorer of diffrl.toyworld as rewards.

    reward = build_reward("toyworld")            # dense partial credit in [0, 1]
    reward = build_reward("toyworld_accuracy")   # 1.0 if the image is correct (GenEval), else 0.0
    reward = build_reward("toyclips_accuracy")   # clips: 1.0 if the clip shows its caption's event
    scores = reward(images, prompts, metadata)   # images [B, 3, H, W] in [0, 1] -> float32 [B]

`metadata` is required: one GenEval-format dict per sample ({"tag", "include", ...}, as made by
diffrl.toyworld.make_prompt_set); prompts are not read. The formula is diffrl.toyworld.scorer.score.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffrl.toyworld.scorer import ScoreResult, score_images

from .base import Reward
from .registry import register_reward


def _results(name: str, samples: Tensor, metadata: list[dict] | None) -> list[ScoreResult]:
    if metadata is None:
        raise ValueError(
            f"reward {name!r} needs GenEval-format metadata (one dict with an 'include' list per "
            "sample), got metadata=None; pass the prompt set's rows as metadata"
        )
    for i, m in enumerate(metadata):
        if not isinstance(m, dict) or "include" not in m:
            raise ValueError(
                f"reward {name!r}: metadata[{i}] has no 'include' list (GenEval format), got {m!r}"
            )
    return score_images(samples, metadata)


@register_reward("toyworld")
class ToyWorldPartialCredit(Reward):
    """Dense partial credit of the SynthShapes scorer, in [0, 1]; 1.0 exactly when correct."""

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        results = _results(self._name(), samples, metadata)
        return torch.tensor([r.partial for r in results], dtype=torch.float32)


@register_reward("toyworld_accuracy")
class ToyWorldAccuracy(Reward):
    """1.0 if the image satisfies its prompt under GenEval's rules (SynthShapes scorer), else 0."""

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        results = _results(self._name(), samples, metadata)
        return torch.tensor([float(r.correct) for r in results], dtype=torch.float32)


def _clip_results(name: str, samples: Tensor, metadata: list[dict] | None) -> list[ScoreResult]:
    from diffrl.toyworld.clips import CLIP_TAGS, score_clips

    if metadata is None:
        raise ValueError(f"reward {name!r} needs the clip world's metadata (one dict with 'tag', 'class', 'color' per "
                         "clip), got metadata=None; use a builtin:toy_clips_* prompt set")
    for i, m in enumerate(metadata):
        if not isinstance(m, dict) or m.get("tag") not in CLIP_TAGS:
            raise ValueError(f"reward {name!r}: metadata[{i}] is not a clip-world record (tag one of {list(CLIP_TAGS)}), "
                             f"got {m!r}")
    return score_clips(samples, metadata)


@register_reward("toyclips")
class ToyClipsPartialCredit(Reward):
    """Dense partial credit of the SynthShapes-clips track scorer, in [0, 1]; 1.0 exactly when correct."""

    accepts = ("video",)

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        results = _clip_results(self._name(), samples, metadata)
        return torch.tensor([r.partial for r in results], dtype=torch.float32)


@register_reward("toyclips_accuracy")
class ToyClipsAccuracy(Reward):
    """1.0 if the clip shows its caption's event (diffrl.toyworld.clips.score_clip), else 0."""

    accepts = ("video",)

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        results = _clip_results(self._name(), samples, metadata)
        return torch.tensor([float(r.correct) for r in results], dtype=torch.float32)
