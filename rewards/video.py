"""Video rewards: any image reward frame by frame, and weight-free temporal terms (VBench-style definitions).

Videos are [B, F, 3, H, W] with pixel values in [0, 1]. Differences are taken on the 0-255 scale VBench uses.

    per_frame        an image reward on every `stride`-th frame (from the first), aggregated by mean or min
                     (Flow-GRPO's video OCR: every 4th frame, mean; Flow-Factory's PickScore: all frames, mean);
                     `max_frames` keeps it to the opening frames (1: the first frame alone)
    temporal_flicker VBench temporal flickering: (255 - mean_t MAE(I_t, I_t+1)) / 255, 1 for a frozen clip
    motion_smoothness  1 - mean_t mean|I_t-1 - 2 I_t + I_t+1| / (2 * 255): VBench's interpolation test with the
                     average of the neighbours as the interpolation (no AMT weights); 1 for constant motion
    dynamics         how much a clip moves: min(mean_t MAE(I_t, I_t+1) / threshold, 1) (a soft dynamic degree)
    video_temporal   motion_smoothness + 0.5 dynamics: the default weight-free video term; a
                     frozen clip (smoothness 1, dynamics 0) scores below a clip that moves smoothly

Flicker or smoothness alone is maximised by a frozen clip; pair them with `dynamics` (as video_temporal does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Reward
from .registry import build_reward, register_reward

AGGREGATES = ("mean", "min")


def frame_differences(videos: Tensor) -> Tensor:
    """Mean absolute difference of consecutive frames on the 0-255 scale: [B, F, 3, H, W] -> [B, F - 1]."""
    x = videos.to(torch.promote_types(videos.dtype, torch.float32)) * 255
    return (x[:, 1:] - x[:, :-1]).abs().flatten(2).mean(dim=2)  # [B, F-1]


def _check_frames(videos: Tensor, need: int, name: str) -> None:
    if videos.shape[1] < need:
        raise ValueError(f"reward {name!r} needs clips of at least {need} frames, got {videos.shape[1]}")


@register_reward("per_frame")
class PerFrame(Reward):
    """An image reward on the frames of a video: every `stride`-th frame from the first (below `max_frames`),
    `aggregate` over them."""

    accepts = ("video",)

    def __init__(self, reward: str = "brightness", stride: int = 1, aggregate: str = "mean",
                 reward_kwargs: dict[str, Any] | None = None, max_frames: int | None = None):
        """reward: the image reward's name (its kwargs in reward_kwargs); stride: score frames 0, s, 2s, ...;
        aggregate: "mean" (the peers' choice) or "min" (the worst frame); max_frames: only frames before this index
        (1: the first frame alone; the rest of the clip is then not even decoded), None: the whole clip."""
        if stride < 1:
            raise ValueError(f"per_frame stride must be >= 1, got {stride}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"per_frame max_frames must be >= 1 or None, got {max_frames}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"per_frame aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.inner = build_reward(reward, **(reward_kwargs or {}))
        if "image" not in self.inner.accepts:
            raise ValueError(f"per_frame needs an image reward; {reward!r} scores {self.inner.accepts}")
        self.stride, self.aggregate, self.max_frames = stride, aggregate, max_frames
        self.differentiable = self.inner.differentiable

    def describe(self) -> str:
        first = "" if self.max_frames is None else f", first {self.max_frames} frames"
        return f"per_frame({self.inner.describe()}, stride {self.stride}{first}, {self.aggregate})"

    def frames_needed(self, num_frames: int) -> int:
        """Up to the last frame scored: frames 0, s, 2s, ... below min(num_frames, max_frames)."""
        span = min(num_frames, self.max_frames or num_frames)
        return (span - 1) // self.stride * self.stride + 1

    @classmethod
    def declares_differentiable(cls, kwargs: dict[str, Any] | None = None) -> bool:
        """As differentiable as the image reward it wraps."""
        from .registry import declares_differentiable

        kwargs = kwargs or {}
        return declares_differentiable(kwargs.get("reward", "brightness"), kwargs.get("reward_kwargs"))

    def to(self, device):
        self.inner.to(device)
        return self

    def load(self):
        self.inner.load()
        return self

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        frames = samples[:, : self.max_frames : self.stride]  # [B, F', 3, H, W]
        batch, count = frames.shape[:2]
        repeat = lambda items: [x for x in items for _ in range(count)]  # noqa: E731  (frame-major per video)
        scores = self.inner(frames.flatten(0, 1), repeat(prompts), repeat(metadata) if metadata is not None else None)
        per_video = scores.view(batch, count)  # [B, F']
        return per_video.mean(dim=1) if self.aggregate == "mean" else per_video.min(dim=1).values  # [B]


@register_reward("temporal_flicker")
class TemporalFlicker(Reward):
    """VBench temporal flickering, (255 - mean_t MAE(I_t, I_t+1)) / 255 in [0, 1]; 1 for a frozen clip."""

    accepts = ("video",)
    differentiable = True

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        _check_frames(samples, 2, "temporal_flicker")
        return (255 - frame_differences(samples).mean(dim=1)) / 255  # [B]


@register_reward("motion_smoothness")
class MotionSmoothness(Reward):
    """1 - mean_t mean|I_t-1 - 2 I_t + I_t+1| / (2 * 255): how far each frame is from the average of its neighbours."""

    accepts = ("video",)
    differentiable = True

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        _check_frames(samples, 3, "motion_smoothness")
        x = samples.to(torch.promote_types(samples.dtype, torch.float32)) * 255
        second = (x[:, :-2] - 2 * x[:, 1:-1] + x[:, 2:]).abs().flatten(1).mean(dim=1)  # [B]
        return 1 - second / (2 * 255)


@register_reward("dynamics")
class Dynamics(Reward):
    """How much a clip moves, min(mean_t MAE(I_t, I_t+1) / threshold, 1): 0 for a frozen clip."""

    accepts = ("video",)
    differentiable = True

    def __init__(self, threshold: float = 2.0):
        """threshold: the mean absolute frame difference (0-255 scale) that counts as fully dynamic."""
        if threshold <= 0:
            raise ValueError(f"dynamics threshold must be > 0, got {threshold}")
        self.threshold = threshold

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        _check_frames(samples, 2, "dynamics")
        return (frame_differences(samples).mean(dim=1) / self.threshold).clamp(max=1.0)  # [B]


@register_reward("video_temporal")
class VideoTemporal(Reward):
    """motion_smoothness + dynamics_weight * dynamics: smooth motion scores above a frozen clip and above flicker."""

    accepts = ("video",)
    differentiable = True

    def __init__(self, dynamics_weight: float = 0.5, threshold: float = 2.0):
        """dynamics_weight 0.5: moving smoothly (about 1.5) > frozen (1.0) > flickering (about 0.5)."""
        self.smoothness, self.dynamics = MotionSmoothness(), Dynamics(threshold)
        self.dynamics_weight = dynamics_weight

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return self.smoothness.score(samples, prompts, metadata) + self.dynamics_weight * self.dynamics.score(
            samples, prompts, metadata)  # [B]
