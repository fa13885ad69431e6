"""SynthShapes clips: a closed world for text-to-video with exact ground truth.

A clip is `frames` frames (9 by default: Wan's 4k + 1) of the SynthShapes canvas (white, hard-edged palette
shapes, 32 px), showing one of five events. Captions name colours, counts, directions and events, not shape
classes (the image world tests those; at 32 px the toy video autoencoder blurs corners enough to blur the
classes too): each object is drawn as a random circle, square or triangle. Metadata is a flat dict {"tag",
"prompt", "color", "count", ...}; captions come from a grammar:

    moving       "a red shape moving left"          one object travelling left / right / up / down
    counting     "two blue shapes moving up"        two equal objects travelling together
    appearing    "a green shape appearing"          absent in the first frame, there (still) from a later one
    disappearing "an orange shape disappearing"     there (still) in the first frame, gone from a later one
    turning      "a yellow shape turning purple"    one still object whose colour changes once

Rendering: sides 8-10 px at 32 px (scaled with `size`); a moving object travels 10-14 px (scaled) in a straight
line at constant speed, rounded to whole pixels per frame; the other events change at a random frame in the
middle of the clip. The objects of a counting clip keep GAP_32 empty pixels between their boxes.

Scoring (`score_clip`): every frame is parsed by the image scorer's exact parser (scorer.parse_images); the
objects of the caption's colour are counted per frame, n_t. Then

    moving, counting   n_t == count in every frame, and the mean centroid of the matches moves from the first
                       frame to the last by d with d . direction >= MIN_TRAVEL_32 (scaled) and
                       |d . across| <= 0.5 d . direction
    appearing          n_0 == 0, n_last == 1, n_t <= 1 in every frame (disappearing: the same, reversed)
    turning            first frame: one object in the first colour and none in the second;
                       last frame: one in the second colour and none in the first

A still clip therefore fails every motion caption, whatever it shows. The dense partial credit is the mean of
terms that are each 1 exactly when their condition holds, so partial == 1.0 iff correct.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .prompts import _article, draw_records
from .scorer import DetectedObject, ScoreResult, parse_images
from .world import BACKGROUND, COLORS, NUMBER_WORDS, SHAPES, scale, shape_mask

CLIP_TAGS: tuple[str, ...] = ("moving", "counting", "appearing", "disappearing", "turning")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Unit steps (dx, dy) in image coordinates (y down)."""
CLIP_FRAMES = 9
CLIP_SIZE = 32
CLIP_COUNTS: tuple[int, ...] = (2,)
"""Counts of counting captions (three objects of 8-10 px fell apart into fragments in the toy autoencoder)."""
SIDE_RANGE_32: tuple[int, int] = (8, 10)
TRAVEL_RANGE_32: tuple[int, int] = (10, 14)
"""Pixels a moving object travels from the first frame to the last (at 32 px), inclusive."""
MIN_TRAVEL_32 = 5.0
"""Travel along the asked direction that counts as moving (half the smallest rendered travel)."""
MAX_ACROSS = 0.5
"""Largest |sideways travel| / travel along the asked direction that still counts as that direction."""
GAP_32 = 2


# ---- grammar -----------------------------------------------------------------------------------------------
def _caption(tag: str, color: str, count: int = 1, direction: str | None = None, to_color: str | None = None) -> str:
    if tag in ("moving", "counting"):
        noun = f"{NUMBER_WORDS[count]} {color} shapes" if count > 1 else f"{_article(color)} {color} shape"
        return f"{noun} moving {direction}"
    if tag in ("appearing", "disappearing"):
        return f"{_article(color)} {color} shape {tag}"
    return f"{_article(color)} {color} shape turning {to_color}"


def clip_metadata(tag: str, color: str, count: int = 1, direction: str | None = None,
                  to_color: str | None = None) -> dict:
    """One caption's metadata (module docstring), with its prompt."""
    row = {"tag": tag, "color": color, "count": count}
    if direction is not None:
        row["direction"] = direction
    if to_color is not None:
        row["to_color"] = to_color
    row["prompt"] = _caption(tag, color, count, direction, to_color)
    return row


def enumerate_clip_metadata(tag: str) -> list[dict]:
    """Every caption of `tag`."""
    rows = []
    for color in COLORS:
        if tag == "moving":
            rows += [clip_metadata(tag, color, 1, d) for d in DIRECTIONS]
        elif tag == "counting":
            rows += [clip_metadata(tag, color, n, d) for n in CLIP_COUNTS for d in DIRECTIONS]
        elif tag in ("appearing", "disappearing"):
            rows.append(clip_metadata(tag, color))
        elif tag == "turning":
            rows += [clip_metadata(tag, color, to_color=c2) for c2 in COLORS if c2 != color]
        else:
            raise ValueError(f"unknown clip tag {tag!r}; the clip world has {list(CLIP_TAGS)}")
    return rows


def clip_prompt_split(seed: int = 0, eval_fraction: float = 0.5) -> dict[str, list[dict]]:
    """Every caption in "train" or "unseen", per tag a seeded `eval_fraction` of the captions unseen (at least one
    on each side). Reward fine-tuning draws from "train" only, so accuracy on "unseen" measures generalisation."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict]] = {"train": [], "unseen": []}
    for tag in CLIP_TAGS:
        rows = enumerate_clip_metadata(tag)
        n_eval = min(max(1, int(eval_fraction * len(rows))), len(rows) - 1)
        held = set(rng.permutation(len(rows))[:n_eval].tolist())
        for i, row in enumerate(rows):
            out["unseen" if i in held else "train"].append(row)
    return out


def builtin_clip_prompt_sets(seed: int = 0) -> dict[str, list[dict]]:
    """The shipped clip prompt files: toy_clips_train (200 records of "train" captions, 40 per tag) and
    toy_clips_eval (200 records of "unseen" captions, 40 per tag)."""
    split = clip_prompt_split(seed)
    return {
        "toy_clips_train": draw_records(split["train"], 200, seed=1, split="train", tags=CLIP_TAGS),
        "toy_clips_eval": draw_records(split["unseen"], 200, seed=10_000, split="unseen", tags=CLIP_TAGS),
    }


def sample_clip_metadata(rng: np.random.Generator) -> dict:
    """A random caption: a uniform tag, then a uniform caption of that tag."""
    rows = enumerate_clip_metadata(CLIP_TAGS[int(rng.integers(len(CLIP_TAGS)))])
    return rows[int(rng.integers(len(rows)))]


# ---- renderer ----------------------------------------------------------------------------------------------
def _paint(frame: np.ndarray, shape: str, color: str, side: int, x0: int, y0: int) -> None:
    mask = shape_mask(shape, side)  # [side, side]
    ys, xs = np.nonzero(mask)
    frame[ys + y0, xs + x0] = COLORS[color]


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    """Boxes (x0, y0, side, ...) at least `gap` empty pixels apart along x or y."""
    (ax, ay, asz), (bx, by, bsz) = a[:3], b[:3]
    return ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay


def render_clip(metadata: dict, rng: np.random.Generator, size: int = CLIP_SIZE, frames: int = CLIP_FRAMES,
                max_tries: int = 2000) -> np.ndarray:
    """A random clip satisfying `metadata` exactly: uint8 [frames, size, size, 3]. Each object is a random class."""
    tag, color, count = metadata["tag"], metadata["color"], int(metadata.get("count", 1))
    if tag not in CLIP_TAGS:
        raise ValueError(f"unknown clip tag {tag!r}; the clip world has {list(CLIP_TAGS)}")
    if color not in COLORS:
        raise ValueError(f"unknown colour in {metadata!r}; the clip world has {list(COLORS)}")
    if frames < 3:
        raise ValueError(f"a clip needs at least 3 frames, got {frames}")
    k = scale(size)
    lo, hi = (round(v * k) for v in SIDE_RANGE_32)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    change = int(rng.integers(2, frames - 1))  # appearing / turning: the first frame of the new state
    if tag in ("appearing", "disappearing", "turning"):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        side = int(rng.integers(lo, hi + 1))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        for t in range(frames):
            if (tag == "appearing" and t >= change) or (tag == "disappearing" and t < change):
                _paint(video[t], shape, color, side, x0, y0)
            elif tag == "turning":
                _paint(video[t], shape, color if t < change else metadata["to_color"], side, x0, y0)
        return video
    dx, dy = DIRECTIONS[metadata["direction"]]
    for _ in range(max_tries):
        travel = int(rng.integers(round(TRAVEL_RANGE_32[0] * k), round(TRAVEL_RANGE_32[1] * k) + 1))
        boxes = []
        for _ in range(count):
            side = int(rng.integers(lo, hi + 1))
            # the start box such that the whole path stays inside the frame
            xs = (max(0, -dx * travel), size - side - max(0, dx * travel))
            ys = (max(0, -dy * travel), size - side - max(0, dy * travel))
            if xs[1] < xs[0] or ys[1] < ys[0]:
                break
            box = (int(rng.integers(xs[0], xs[1] + 1)), int(rng.integers(ys[0], ys[1] + 1)), side,
                   SHAPES[int(rng.integers(len(SHAPES)))])
            if not all(_apart(box, other, max(1, round(GAP_32 * k))) for other in boxes):
                break
            boxes.append(box)
        if len(boxes) < count:
            continue
        for t in range(frames):
            step = round(travel * t / (frames - 1))
            for x0, y0, side, shape in boxes:
                _paint(video[t], shape, color, side, x0 + dx * step, y0 + dy * step)
        return video
    raise RuntimeError(f"could not place a clip for {metadata!r} in {max_tries} tries")


# ---- scorer ------------------------------------------------------------------------------------------------
def _as_frames(video) -> np.ndarray | Tensor:
    """[F, 3, H, W] float in [0, 1] or [F, H, W, 3] uint8, as parse_images takes them."""
    if isinstance(video, Tensor):
        return video.detach().to("cpu", torch.float32)
    return np.asarray(video)


def parse_clip(video) -> list[list[DetectedObject]]:
    """The objects of every frame: float [F, 3, H, W] in [0, 1] or uint8 [F, H, W, 3]."""
    return parse_images(_as_frames(video))


def _matching(objects: list[DetectedObject], color: str) -> list[DetectedObject]:
    """The objects of `color`, whatever their parsed class (shape classes are not part of the clip captions)."""
    return [o for o in objects if o.color == color]


def score_clip(metadata: dict, frames: list[list[DetectedObject]], size: int = CLIP_SIZE) -> ScoreResult:
    """Score one parsed clip against its metadata (rules in the module docstring).

    Partial credit terms (each 1 exactly when its condition holds):
        moving, counting  share of frames with exactly `count` matches; direction credit
                          min(along / min_travel, 1), halved when the sideways travel is too large (0 when the
                          first or last frame does not hold `count` matches)
        appearing         [n_0 == 0], [n_last == 1], share of frames with n_t <= 1 (disappearing: first and
                          last swapped)
        turning           the four first / last frame conditions
    """
    tag, color = metadata["tag"], metadata["color"]
    count = int(metadata.get("count", 1))
    if not frames:
        raise ValueError("score_clip needs at least one parsed frame")
    counts = [len(_matching(objs, color)) for objs in frames]
    details: dict = {"tag": tag, "counts": counts}
    if tag in ("moving", "counting"):
        count_share = sum(n == count for n in counts) / len(counts)
        direction_credit = 0.0
        first, last = _matching(frames[0], color), _matching(frames[-1], color)
        if len(first) == count and len(last) == count:
            dx = np.mean([o.cx for o in last]) - np.mean([o.cx for o in first])
            dy = np.mean([o.cy for o in last]) - np.mean([o.cy for o in first])
            ux, uy = DIRECTIONS[metadata["direction"]]
            along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
            details.update(along=float(along), across=float(across))
            direction_credit = float(np.clip(along / (MIN_TRAVEL_32 * scale(size)), 0.0, 1.0))
            if across > MAX_ACROSS * max(along, 0.0):
                direction_credit *= 0.5
        terms = [count_share, direction_credit]
    elif tag in ("appearing", "disappearing"):
        start, end = (0, 1) if tag == "appearing" else (1, 0)
        terms = [float(counts[0] == start), float(counts[-1] == end), sum(n <= 1 for n in counts) / len(counts)]
    elif tag == "turning":
        to_color = metadata["to_color"]
        terms = [float(counts[0] == 1), float(len(_matching(frames[0], to_color)) == 0),
                 float(len(_matching(frames[-1], to_color)) == 1), float(counts[-1] == 0)]
    else:
        raise ValueError(f"unknown clip tag {tag!r}; the clip world has {list(CLIP_TAGS)}")
    partial = float(sum(terms) / len(terms))
    return ScoreResult(correct=partial == 1.0, partial=partial, details=details)


def score_clips(videos, metadata: list[dict]) -> list[ScoreResult]:
    """Score a batch: float [B, F, 3, H, W] in [0, 1] (tensor or array) or uint8 [B, F, H, W, 3]."""
    if len(videos) != len(metadata):
        raise ValueError(f"{len(videos)} clips but {len(metadata)} metadata entries")
    if len(videos) == 0:
        return []
    b, f = videos.shape[:2]
    size = videos.shape[-1] if videos.shape[-1] != 3 else videos.shape[-2]
    flat = videos.reshape(b * f, *videos.shape[2:])  # every frame of every clip, one parse
    parsed = parse_images(_as_frames(flat))
    return [score_clip(m, parsed[i * f:(i + 1) * f], size=size) for i, m in enumerate(metadata)]


def still_share(videos: Tensor, threshold: float = 0.5) -> float:
    """Share of clips whose mean absolute frame-to-frame difference is below `threshold` (0-255 scale): the
    still clips a motion-blind generator would make. videos: float [B, F, 3, H, W] in [0, 1]."""
    x = videos.to(torch.float32) * 255
    diff = (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(dim=1)  # [B]
    return float((diff < threshold).float().mean())


__all__ = [
    "CLIP_FRAMES", "CLIP_SIZE", "CLIP_TAGS", "DIRECTIONS", "MIN_TRAVEL_32", "builtin_clip_prompt_sets",
    "clip_metadata", "clip_prompt_split", "enumerate_clip_metadata", "parse_clip", "render_clip",
    "sample_clip_metadata", "score_clip", "score_clips", "still_share",
]
