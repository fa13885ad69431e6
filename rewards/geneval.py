"""GenEval-style reward: GenEval's judging rules (counts, colours, positions) over detected objects.

    reward = build_reward("geneval", detector="toyworld")           # SynthShapes' exact parser
    reward = build_reward("geneval", detector="mypkg.det:detect")   # any detector: see Detector
    reward = build_reward("geneval", detector=my_callable, mode="partial")
    scores = reward(images, prompts, metadata)  # metadata: GenEval rows {"tag", "include", "exclude"}

The rules are diffrl.toyworld.scorer.score, shared with the toy world (not a copy): an include entry
holds when the number of detected objects of its class (and colour, if asked) is at least its count
and below any matching exclude count; a position entry ["right of", j] holds for every pair of
(object of this entry, object of entry j) under GenEval's relation rule (box-centre offset shrunk by
0.1 x the summed box sizes, normalised, beyond 0.5 on the asked axis); unmatched excludes must stay
below their count. mode="accuracy" scores 1.0 / 0.0 (GenEval's per-image verdict), mode="partial"
the scorer's dense partial credit in [0, 1] (1.0 exactly when correct).

Detector: a callable (images [B, 3, H, W] in [0, 1], metadata rows) -> one list of DetectedObject per
image, each with `shape` = the class name, `color` (a GenEval colour name, or None when unknown),
centre (cx, cy) and bbox (x0, y0, x1, y1) in pixels; `detection()` builds one from a box. Thresholds
and per-class limits (GenEval: confidence 0.3, 0.9 for counting prompts, at most 16 per class) are
the detector's business. "toyworld" is the exact SynthShapes parser, the detector-free instance.
A detector too heavy for the training process runs behind the reward server: serve this reward
with it (`diffrl serve-reward geneval detector=mypkg.det:detect`) and train with `remote`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from diffrl.toyworld.scorer import DetectedObject, ScoreResult, parse_images, score

from .base import Reward
from .registry import register_reward

MODES = ("accuracy", "partial")
Detector = Callable[[Tensor, list[dict]], list[list[DetectedObject]]]


def detection(class_name: str, box: tuple[float, float, float, float], color: str | None = None) -> DetectedObject:
    """A detected object from its class, box (x0, y0, x1, y1) in pixels and colour: centre = box
    centre (GenEval's relative positions use box centres), area = box area."""
    x0, y0, x1, y1 = box
    return DetectedObject(shape=class_name, color=color, cx=(x0 + x1) / 2, cy=(y0 + y1) / 2,
                          area=(x1 - x0) * (y1 - y0), bbox=(x0, y0, x1, y1))


def toyworld_detector(images: Tensor, metadata: list[dict]) -> list[list[DetectedObject]]:
    """SynthShapes' exact parser (diffrl.toyworld.scorer.parse_images)."""
    return parse_images(images)


DETECTORS: dict[str, Detector] = {"toyworld": toyworld_detector}


def resolve_detector(spec: str | Detector) -> Detector:
    """A detector by name (DETECTORS), "package.module:function", or a callable."""
    if callable(spec):
        return spec
    if spec in DETECTORS:
        return DETECTORS[spec]
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise ValueError(f"reward 'geneval': detector must be one of {sorted(DETECTORS)}, "
                         f"'package.module:function' or a callable, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward 'geneval': cannot import detector {name!r} from {module!r} ({err})") from err
    return fn


def _check_metadata(metadata: list[dict] | None) -> list[dict]:
    if metadata is None:
        raise ValueError("reward 'geneval' needs GenEval-format metadata (one dict with an 'include' list per "
                         "sample), got metadata=None; use a GenEval-style .jsonl prompt file")
    for i, m in enumerate(metadata):
        if not isinstance(m, dict) or not m.get("include"):
            raise ValueError(f"reward 'geneval': metadata[{i}] has no 'include' list (GenEval format), got {m!r}")
    return metadata


def judge(metadata: list[dict], detections: list[list[DetectedObject]]) -> list[ScoreResult]:
    """GenEval's verdict and partial credit for each image's detections."""
    _check_metadata(metadata)
    if len(detections) != len(metadata):
        raise ValueError(f"reward 'geneval': the detector returned {len(detections)} lists for {len(metadata)} images")
    return [score(m, objects) for m, objects in zip(metadata, detections)]


@register_reward("geneval")
class GenEval(Reward):
    """GenEval rules over a pluggable detector's objects: accuracy (0/1) or dense partial credit."""

    def __init__(self, detector: str | Detector = "toyworld", mode: str = "accuracy"):
        """detector: see the module docstring; mode: "accuracy" (GenEval's 0/1) or "partial"."""
        if mode not in MODES:
            raise ValueError(f"reward 'geneval': mode must be one of {list(MODES)}, got {mode!r}")
        self.detector = resolve_detector(detector)
        self.mode = mode

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        results = judge(metadata, self.detector(samples, _check_metadata(metadata)))
        values = [float(r.correct) if self.mode == "accuracy" else r.partial for r in results]
        return torch.tensor(values, dtype=torch.float32)  # [B]
