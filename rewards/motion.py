"""Weight-free physics rewards on motion samples: minus a penalty of diffrl.motion.physics, so 0 is best.

    motion_skating      -foot_skating        sustained toe sliding while in soft contact with the floor (m/s)
    motion_penetration  -ground_penetration  how far the lowest joint goes below the floor (m)
    motion_floating     -floating            how far a body hovers above the floor (jumps excepted) (m)
    motion_jerk         -jerk                limb jerk above the clean motion's limit (m/s^3)
    motion_bone_length  -bone_length_error   relative deviation from the skeleton's bone lengths
    motion_physics      minus the weighted sum of the five (weights as keyword arguments)
    motion_skating_ratio -foot_skating_ratio share of frames with a skating toe (GMD's metric; not differentiable)

Samples are DE-normalised HumanML3D features [B, T, 263] (x * Std + Mean; the 67-d root + ric prefix works too),
turned into joints by recover_from_ric (y up, the floor at y = 0, 20 fps). A sample whose metadata carries
"length" (a number of frames) is scored on its first `length` frames only: the padding after a shorter clip does not
count. Every reward but motion_skating_ratio is differentiable with respect to the features. Keyword arguments of the single-term rewards go
to their penalty (e.g. build_reward("motion_jerk", limit=2000.0)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from diffrl.motion import physics
from diffrl.motion.representation import FEATURE_DIM, RIC_DIM, recover_from_ric

from .base import Reward
from .registry import register_reward


def _check_width(samples: Tensor, name: str) -> None:
    width = samples.shape[-1]
    if width not in (FEATURE_DIM, RIC_DIM):
        raise ValueError(f"reward {name!r} takes de-normalised HumanML3D features [B, T, {FEATURE_DIM}] (or their "
                         f"{RIC_DIM}-d root + ric prefix); got feature width {width} in samples of shape "
                         f"{list(samples.shape)}")


def _lengths(samples: Tensor, metadata: list[dict] | None, name: str) -> list[int]:
    """Frames that count per sample: metadata's "length" where given, else all T."""
    frames = samples.shape[1]
    lengths = []
    for index, meta in enumerate(metadata or [{}] * samples.shape[0]):
        length = (meta or {}).get("length", frames)
        if isinstance(length, Tensor):
            length = length.item()
        if isinstance(length, float) and length.is_integer():
            length = int(length)
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= frames:
            raise ValueError(f"reward {name!r}: metadata[{index}]['length'] must be a whole number of frames in "
                             f"1..{frames} (the samples' T), got {length!r}")
        lengths.append(length)
    return lengths


def penalty_per_sample(penalty: Callable[[Tensor], Tensor], samples: Tensor, metadata: list[dict] | None,
                       name: str) -> Tensor:
    """penalty(joints) [B] of features [B, T, D], each sample cut to its metadata length (samples of one length
    go through together)."""
    _check_width(samples, name)
    lengths = _lengths(samples, metadata, name)
    joints = recover_from_ric(samples)  # [B, T, 22, 3]
    values = [None] * len(lengths)
    for length in sorted(set(lengths)):
        group = [i for i, n in enumerate(lengths) if n == length]
        scored = penalty(joints[group, :length])  # [b]
        for position, index in enumerate(group):
            values[index] = scored[position]
    return torch.stack(values)  # [B]


class MotionPenalty(Reward):
    """Minus one physics penalty of the recovered joints; subclasses name the penalty."""

    accepts = ("motion",)
    differentiable = True
    penalty: ClassVar[Callable[..., Tensor]]

    def __init__(self, **penalty_kwargs):
        """penalty_kwargs: the penalty function's own arguments (tolerances, limits; see diffrl.motion.physics)."""
        self.penalty_kwargs = penalty_kwargs

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        penalty = type(self).penalty
        return -penalty_per_sample(lambda j: penalty(j, **self.penalty_kwargs), samples, metadata, self._name())


@register_reward("motion_skating")
class MotionSkating(MotionPenalty):
    """-foot_skating: toes that slide while on the floor (0 for planted feet and ordinary swings)."""

    penalty = staticmethod(physics.foot_skating)


@register_reward("motion_penetration")
class MotionPenetration(MotionPenalty):
    """-ground_penetration: the lowest joint below the floor, 5 mm forgiven."""

    penalty = staticmethod(physics.ground_penetration)


@register_reward("motion_floating")
class MotionFloating(MotionPenalty):
    """-floating: hovering above the floor (frames whose lowest point neither moves nor falls; jumps give 0)."""

    penalty = staticmethod(physics.floating)


@register_reward("motion_jerk")
class MotionJerk(MotionPenalty):
    """-jerk: limb jerk above the limit of clean motion (per-frame jitter)."""

    penalty = staticmethod(physics.jerk)


@register_reward("motion_bone_length")
class MotionBoneLength(MotionPenalty):
    """-bone_length_error: bones that stretch or shrink."""

    penalty = staticmethod(physics.bone_length_error)


@register_reward("motion_physics")
class MotionPhysics(Reward):
    """Minus the weighted sum of the five physics penalties (default penalty arguments).

    Default weights make a plainly visible failure cost about 1: a toe sliding at 1.2 m/s (skating 1 per m/s),
    10 cm under or over the floor (penetration and floating 10 per m), 2 cm per-frame jitter (jerk about 300 m/s^3,
    weight 0.003), every bone 10 % off (bone length 10)."""

    accepts = ("motion",)
    differentiable = True

    def __init__(self, skating: float = 1.0, penetration: float = 10.0, floating: float = 10.0, jerk: float = 0.003,
                 bone_length: float = 10.0):
        """Weights of foot_skating, ground_penetration, floating, jerk and bone_length_error (each >= 0)."""
        self.weights = {"skating": skating, "penetration": penetration, "floating": floating, "jerk": jerk,
                        "bone_length": bone_length}
        negative = {k: w for k, w in self.weights.items() if w < 0}
        if negative:
            raise ValueError(f"motion_physics weights must be >= 0, got {negative}")
        self.terms = {"skating": physics.foot_skating, "penetration": physics.ground_penetration,
                      "floating": physics.floating, "jerk": physics.jerk, "bone_length": physics.bone_length_error}

    def describe(self) -> str:
        return "motion_physics(" + ", ".join(f"{k} {w:g}" for k, w in self.weights.items()) + ")"

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        def weighted(joints: Tensor) -> Tensor:
            return sum(w * self.terms[k](joints) for k, w in self.weights.items() if w != 0) + joints.new_zeros(
                joints.shape[0])  # [b]

        return -penalty_per_sample(weighted, samples, metadata, self._name())


@register_reward("motion_skating_ratio")
class MotionSkatingRatio(MotionPenalty):
    """-foot_skating_ratio: the share of frames with a skating toe as GMD / OmniControl report it (not differentiable;
    a metric to compare with data: it is not 0 on clean walks, whose swing toes move while still low)."""

    differentiable = False
    penalty = staticmethod(physics.foot_skating_ratio)
