"""The reward interface (docs/design.md, seam 3).

A reward maps decoded samples, their prompts and optional per-sample metadata to one float per
sample. Subclasses implement `score`; callers use `__call__`, which checks the input at the door
(shape for the declared kinds, batch sizes) and the output (float32 [B] on the samples' device; float64
for float64 samples). A sample holding a NaN or inf scores NaN, and `score` never sees it: a model (or
JPEG's 8-bit quantisation) would turn it into an ordinary-looking score, and the loop masks and counts
NaN rewards instead of training towards a broken sample.

Sample kinds and their shapes (what `Policy.decode` returns):
    "image"  [B, 3, H, W]     pixel values in [0, 1]
    "video"  [B, F, 3, H, W]  pixel values in [0, 1]
    "motion" [B, T, D]        feature vectors (e.g. HumanML3D's D = 263)
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, ClassVar

import torch
from torch import Tensor

# kind -> (number of dimensions, {dim: required size}, shape written for error messages)
SAMPLE_KINDS: dict[str, tuple[int, dict[int, int], str]] = {
    "image": (4, {1: 3}, "[B, 3, H, W]"),
    "video": (5, {2: 3}, "[B, F, 3, H, W]"),
    "motion": (3, {}, "[B, T, D]"),
}


def sample_kind(samples: Tensor) -> str | None:
    """The kind whose shape `samples` has, or None. Kinds differ in ndim, so this is unambiguous."""
    for kind, (ndim, fixed, _) in SAMPLE_KINDS.items():
        if samples.ndim == ndim and all(samples.shape[d] == n for d, n in fixed.items()):
            return kind
    return None


class Reward(abc.ABC):
    """Base class of every reward: subclass, set the class attributes, implement `score`."""

    name: ClassVar[str]
    """Registry name; set by `@register_reward(name)`."""
    differentiable: ClassVar[bool] = False
    """Whether `score` is built from torch ops that let gradients reach `samples`."""
    accepts: ClassVar[tuple[str, ...]] = ("image",)
    """Sample kinds this reward takes, keys of SAMPLE_KINDS."""

    @abc.abstractmethod
    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        """Return one score per sample, shape [B]. Inputs are already validated."""

    def __call__(
        self, samples: Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> Tensor:
        """Validate, score, and return float32 [B] (float64 for float64 samples) on samples.device.

        Runs under torch.no_grad() unless the reward is differentiable.
        """
        kind = self._check_inputs(samples, prompts, metadata)
        batch = samples.shape[0]
        # float32, or float64 for float64 samples (a float64 run is float64 end to end)
        dtype = torch.float64 if samples.dtype == torch.float64 else torch.float32
        finite = torch.isfinite(samples.detach()).flatten(1).all(1)  # [B]
        if bool(finite.all()):
            return self._score_checked(samples, prompts, metadata, kind).to(device=samples.device, dtype=dtype)
        scores = torch.full((batch,), float("nan"), dtype=dtype, device=samples.device)  # [B]
        if not bool(finite.any()):
            return scores
        rows = finite.nonzero().squeeze(1)  # [n]: score the finite samples only
        keep = rows.tolist()
        scored = self._score_checked(samples[rows], [prompts[i] for i in keep],
                                     None if metadata is None else [metadata[i] for i in keep], kind)
        return scores.index_put((rows,), scored.to(device=samples.device, dtype=dtype))  # out of place: keeps the gradient

    def _score_checked(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None, kind: str) -> Tensor:
        """`score` under no_grad unless differentiable, its output checked to be [B]."""
        grad_ctx = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        with grad_ctx:
            scores = self.score(samples, prompts, metadata)
        scores = torch.as_tensor(scores)
        batch = samples.shape[0]
        if scores.shape != (batch,):
            raise ValueError(
                f"reward {self._name()!r} returned shape {tuple(scores.shape)} for {kind} samples "
                f"of batch size {batch}; expected ({batch},)"
            )
        return scores

    def frames_needed(self, num_frames: int) -> int | None:
        """Of clips of `num_frames` frames, how many leading frames `score` reads (a video policy then decodes only
        those); None: all of them (the default, and what every temporal reward needs)."""
        return None

    def to(self, device: torch.device | str) -> Reward:
        """Move any weights to `device`; rewards without weights need nothing. Returns self."""
        return self

    def load(self) -> Reward:
        """Load any weights now (model rewards otherwise load on first use), so that missing weights
        fail before a run starts. Rewards without weights need nothing. Returns self."""
        return self

    def _name(self) -> str:
        return getattr(self, "name", type(self).__name__)

    @classmethod
    def declares_differentiable(cls, kwargs: dict[str, Any] | None = None) -> bool:
        """Whether `cls(**kwargs)` lets gradients reach the samples, read without building it (no weights load):
        the constructor's `differentiable` argument where it takes one (the CLIP family), else `differentiable`."""
        import inspect

        param = inspect.signature(cls.__init__).parameters.get("differentiable")
        if param is not None:
            return bool((kwargs or {}).get("differentiable", param.default))
        return bool(cls.differentiable)

    def describe(self) -> str:
        """The reward as a model card or a log names it (a mixture lists its parts and weights)."""
        return self._name()

    def _check_inputs(
        self, samples: Tensor, prompts: list[str], metadata: list[dict] | None
    ) -> str:
        if not isinstance(samples, Tensor):
            raise TypeError(
                f"reward {self._name()!r} takes a torch.Tensor of samples, "
                f"got {type(samples).__name__}"
            )
        kind = sample_kind(samples)
        if kind not in self.accepts:
            expected = " or ".join(f"{k} {SAMPLE_KINDS[k][2]}" for k in self.accepts)
            raise ValueError(
                f"reward {self._name()!r} expects {expected}, got samples of shape "
                f"{list(samples.shape)}"
            )
        batch = samples.shape[0]
        if len(prompts) != batch:
            raise ValueError(
                f"reward {self._name()!r} got {batch} samples but {len(prompts)} prompts"
            )
        if metadata is not None and len(metadata) != batch:
            raise ValueError(
                f"reward {self._name()!r} got {batch} samples but {len(metadata)} metadata entries"
            )
        return kind
