"""Motion-world rewards: the exact rule scorer of diffrl.motion.scorer on motion samples.

    reward = build_reward("toymotion_accuracy")   # 1.0 if the motion does what its label says, else 0.0
    reward = build_reward("toymotion")            # dense partial credit in [0, 1], 1.0 exactly when correct
    reward = build_reward("toymotion_soft")       # smooth score in (0, 1], differentiable (EasyTune, DRaFT)
    scores = reward(features, prompts, metadata)  # DE-normalised features [B, T, 263] -> [B]

Samples are de-normalised HumanML3D features (x * Std + Mean; the 67-d root + ric prefix works too), turned into
joints by recover_from_ric. `metadata` is required: one motion-world record per sample ({"tag", label fields...},
as in builtin:toy_motion_train / builtin:toy_motion_eval); prompts are not read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffrl.motion.representation import FEATURE_DIM, RIC_DIM, recover_from_ric
from diffrl.motion.scorer import MotionScore, score_motions, soft_score
from diffrl.motion.world import TAGS, check_label

from .base import Reward
from .registry import register_reward


def _joints_and_labels(name: str, samples: Tensor, metadata: list[dict] | None) -> tuple[Tensor, list[dict]]:
    if samples.shape[-1] not in (FEATURE_DIM, RIC_DIM):
        raise ValueError(f"reward {name!r} takes de-normalised HumanML3D features [B, T, {FEATURE_DIM}] (or their "
                         f"{RIC_DIM}-d root + ric prefix), got samples of shape {list(samples.shape)}")
    if metadata is None:
        raise ValueError(f"reward {name!r} needs the motion world's metadata (one record with 'tag' and its label "
                         "fields per sample), got metadata=None; use a builtin:toy_motion_* prompt set")
    labels = []
    for i, record in enumerate(metadata):
        try:
            labels.append(check_label(record))
        except ValueError as err:
            raise ValueError(f"reward {name!r}: metadata[{i}] is not a motion-world record (tag one of {list(TAGS)} "
                             f"with its label fields): {err}; use a builtin:toy_motion_* prompt set") from None
    return recover_from_ric(samples), labels


def _results(name: str, samples: Tensor, metadata: list[dict] | None) -> list[MotionScore]:
    joints, labels = _joints_and_labels(name, samples, metadata)
    return score_motions(joints, labels)


@register_reward("toymotion_accuracy")
class ToyMotionAccuracy(Reward):
    """1.0 if the motion keeps every rule of its label (diffrl.motion.scorer), else 0."""

    accepts = ("motion",)

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return torch.tensor([float(r.correct) for r in _results(self._name(), samples, metadata)])


@register_reward("toymotion")
class ToyMotionPartialCredit(Reward):
    """Partial credit of the motion scorer in [0, 1]: the mean over the label's rules, 1.0 exactly when correct."""

    accepts = ("motion",)

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return torch.tensor([r.partial for r in _results(self._name(), samples, metadata)])


@register_reward("toymotion_soft")
class ToyMotionSoft(Reward):
    """The scorer's smooth score in (0, 1] (geometric mean of sigmoid / exp credits of the label's rules), built
    from torch ops so gradients reach the features (reward backpropagation)."""

    accepts = ("motion",)
    differentiable = True

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        joints, labels = _joints_and_labels(self._name(), samples, metadata)
        return soft_score(joints, labels)
