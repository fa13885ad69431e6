"""SynthShapes scorer: parse an image into objects exactly, then score it GenEval's way.

parse_image (RGB in 0-255 units; W = white)
    1. Coverage: each pixel p is read as a mix of white and one palette colour c,
       p ~ W - alpha_c (W - c). For every colour, alpha_c is the projection of W - p on W - c
       clipped to [0, 1], and d_c the distance from p to that mix. A pixel belongs to the colour
       of smallest d_c when that colour covers at least half of it (alpha_c >= 0.5) and
       d_c < MAX_MIX_DISTANCE; else it is background. For the hard-edged renders this is exactly
       "snap to the nearest palette colour"; anti-aliasing, blur and noise move edge pixels along
       the mix, so the half-coverage cut keeps shapes at their true extent.
    2. Connected components of equal colour among those pixels, 8-connectivity; components of
       fewer than MIN_AREA_32 * (size / 32)^2 pixels are noise and dropped.
    3. Soft measurements: mass = sum of alpha_c over the component's pixels and the unclaimed
       pixels (background, within MAX_MIX_DISTANCE of the colour's mix) of its bounding box grown
       by 1 px; the centroid (cx, cy) is alpha-weighted. Blur conserves mass and keeps the centroid.
    4. Shape (classify_shape), from fill = mass / (bounding-box w * h), the vertical asymmetry
       (cy - box centre y) / h (an upward triangle's centroid is h / 6 below its box centre)
       and the aspect w / h: square fill ~1.0, circle ~0.78-0.85 (both symmetric), triangle
       ~0.50-0.56 with asymmetry ~0.13-0.17. Blobs like none of them (too small or large for
       SIDE_RANGE_32, elongated, upside down, symmetric but sparse) are "unknown": they count
       for no class, only for colour in the partial credit, so smeared noise does not pass for
       shapes.
score
    GenEval's rules on the detected objects (see `score`), with a dense partial credit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .world import BACKGROUND, COLORS, SceneObject, object_relations

MAX_MIX_DISTANCE = 60.0
"""Max RGB distance (0-255) of a pixel from the nearest white-colour mix to count as that colour."""
MIN_AREA_32 = 10
"""Components with fewer pixels than this (at 32 px; scaled by image area) are noise."""
UNKNOWN = "unknown"
"""Shape of a component that looks like none of SHAPES."""
MAX_ASPECT = 1.5
"""Components wider or taller than this ratio are unknown (every drawn shape is within 1.13)."""
SIDE_RANGE_32: tuple[int, int] = (6, 20)
"""Components whose longer box side (at 32 px; scaled with size) is outside this inclusive range
are unknown (drawn shapes are 9-13 px; blur trims at most a pixel or two)."""
TRIANGLE_ASYMMETRY = 0.06
"""Asymmetry above this: a triangle (drawn ~0.13-0.17; >= 0.07 at blur sigma 0.85 + noise 0.05);
below minus this: unknown; |asymmetry| within it: square or circle by fill."""
TRIANGLE_MAX_FILL = 0.85
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.68

DetectedObject = SceneObject
"""A parsed object: shape (a name in SHAPES or UNKNOWN), colour name, centroid (cx, cy), area
(soft pixel mass), bounding box (x0, y0, x1, y1; exclusive ends). The same record the renderer
returns, so the two compare directly."""

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_WHITE = np.array(BACKGROUND, dtype=np.float32)  # [3]
_TO_COLOR = _WHITE - np.array(list(COLORS.values()), dtype=np.float32)  # [6, 3]: W - c
_NEIGHBOURS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _as_float_images(images) -> np.ndarray:
    """float32 [N, H, W, 3] in 0-255 from uint8 [H, W, 3] / [N, H, W, 3] numpy, or float
    [3, H, W] / [N, 3, H, W] tensors or arrays in [0, 1]."""
    if isinstance(images, Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [H, W, 3] or [N, H, W, 3], got {images.shape}")
        return images.astype(np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"float images must be [3, H, W] or [N, 3, H, W] in [0, 1], got {images.shape}"
        )
    return np.clip(images.astype(np.float32), 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0


def coverage(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-colour coverage alpha in [0, 1] and distance to the white-colour mix, each
    [N, H, W, 6], of float [N, H, W, 3] pixels in 0-255."""
    v = _WHITE - pixels  # [N, H, W, 3]
    alpha = np.clip(v @ _TO_COLOR.T / (_TO_COLOR**2).sum(-1), 0.0, 1.0)  # [N, H, W, 6]
    dist = np.linalg.norm(v[..., None, :] - alpha[..., None] * _TO_COLOR, axis=-1)  # [N, H, W, 6]
    return alpha, dist


def color_codes(alpha: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """int [N, H, W]: 0 background, k for palette colour k - 1 (step 1 of the module docstring)."""
    best = dist.argmin(-1)  # [N, H, W]
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    d = np.take_along_axis(dist, best[..., None], -1)[..., 0]
    return np.where((a >= 0.5) & (d < MAX_MIX_DISTANCE), best + 1, 0)


def label_components(codes: np.ndarray) -> np.ndarray:
    """8-connected components of equal nonzero code in int [N, H, W]: int [N, H, W] labels.

    A component's label is the smallest flat index (over the whole batch) of its pixels; background
    is -1. Min-label propagation with pointer jumping (labels[labels]) until nothing changes.
    """
    n, h, w = codes.shape
    size = n * h * w
    padded = np.pad(codes, ((0, 0), (1, 1), (1, 1)))  # [N, H+2, W+2], background border
    index = np.arange(size).reshape(n, h, w)
    big = size  # a label larger than any index
    same = []  # per neighbour: (pixels whose neighbour has their code, the neighbour's index)
    for dy, dx in _NEIGHBOURS_8:
        nb_codes = padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        ok = ((nb_codes == codes) & (codes > 0)).reshape(-1)
        nb_index = np.clip(index + dy * w + dx, 0, size - 1).reshape(-1)  # only read where ok
        same.append((ok, nb_index))
    flat = np.where(codes > 0, index, big).reshape(-1)
    while True:
        new = flat.copy()
        for ok, nb_index in same:
            np.minimum(new, np.where(ok, flat[nb_index], big), out=new)
        fg = new < big
        new[fg] = new[new[fg]]  # pointer jumping: a label's own label is no larger
        if np.array_equal(new, flat):
            break
        flat = new
    return np.where(flat < big, flat, -1).reshape(n, h, w)


def classify_shape(fill: float, asymmetry: float, aspect: float) -> str:
    """A name in SHAPES, or UNKNOWN, from the component's fill ratio, vertical asymmetry and
    aspect w / h (step 4 of the module docstring):

        aspect outside [1 / MAX_ASPECT, MAX_ASPECT]          unknown
        asymmetry > TRIANGLE_ASYMMETRY                       triangle if fill < TRIANGLE_MAX_FILL
        asymmetry < -TRIANGLE_ASYMMETRY                      unknown (upside down)
        fill > SQUARE_FILL                                   square
        fill > CIRCLE_FILL                                   circle
        otherwise                                            unknown
    """
    if not 1.0 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        return UNKNOWN
    if asymmetry > TRIANGLE_ASYMMETRY:
        return "triangle" if fill < TRIANGLE_MAX_FILL else UNKNOWN
    if asymmetry < -TRIANGLE_ASYMMETRY:
        return UNKNOWN
    if fill > SQUARE_FILL:
        return "square"
    if fill > CIRCLE_FILL:
        return "circle"
    return UNKNOWN


def parse_images(images) -> list[list[DetectedObject]]:
    """parse_image for a batch: uint8 [N, H, W, 3] or float [N, 3, H, W] in [0, 1]."""
    pixels = _as_float_images(images)
    n, h, w, _ = pixels.shape
    alpha, dist = coverage(pixels)  # each [N, H, W, 6]
    codes = color_codes(alpha, dist)  # [N, H, W]
    labels = label_components(codes)  # [N, H, W]
    flat = labels.reshape(-1)
    comp, area = np.unique(flat[flat >= 0], return_counts=True)
    min_area = MIN_AREA_32 * (h * w) / (32 * 32)
    side_lo, side_hi = (s * w / 32 for s in SIDE_RANGE_32)
    results: list[list[DetectedObject]] = [[] for _ in range(n)]
    for label, count in zip(comp.tolist(), area.tolist()):
        if count < min_area:
            continue
        b, rem = divmod(label, h * w)
        mine = labels[b] == label  # [H, W]
        ys, xs = np.nonzero(mine)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        c = int(codes[b].reshape(-1)[rem]) - 1
        # soft mass over the box grown by 1 px: own pixels and unclaimed near-mix pixels
        wy0, wy1, wx0, wx1 = max(y0 - 1, 0), min(y1 + 1, h), max(x0 - 1, 0), min(x1 + 1, w)
        win = (slice(wy0, wy1), slice(wx0, wx1))
        take = mine[win] | ((labels[b][win] < 0) & (dist[b][win][..., c] < MAX_MIX_DISTANCE))
        weight = np.where(take, alpha[b][win][..., c], 0.0)  # [h', w']
        mass = float(weight.sum())
        gy, gx = np.mgrid[wy0:wy1, wx0:wx1]
        cx = float((weight * (gx + 0.5)).sum() / mass)
        cy = float((weight * (gy + 0.5)).sum() / mass)
        bw, bh = int(x1 - x0), int(y1 - y0)
        if side_lo <= max(bw, bh) <= side_hi:
            shape = classify_shape(mass / (bw * bh), (cy - (y0 + y1) / 2) / bh, bw / bh)
        else:
            shape = UNKNOWN
        results[b].append(DetectedObject(
            shape=shape, color=_COLOR_NAMES[c], cx=cx, cy=cy, area=mass,
            bbox=(int(x0), int(y0), int(x1), int(y1)),
        ))
    return results


def parse_image(image) -> list[DetectedObject]:
    """The objects in one image: uint8 [H, W, 3] numpy, or float [3, H, W] in [0, 1]."""
    if isinstance(image, Tensor | np.ndarray) and image.ndim != 3:
        raise ValueError(f"parse_image takes one image, got shape {tuple(image.shape)}; "
                         "use parse_images for a batch")
    return parse_images(image)[0]


@dataclass(frozen=True)
class ScoreResult:
    """GenEval verdict (`correct`), dense partial credit in [0, 1] (1.0 iff correct), and why."""

    correct: bool
    partial: float
    details: dict = field(default_factory=dict)


def _matches(obj: DetectedObject, entry: dict) -> bool:
    return obj.shape == entry["class"] and entry.get("color") in (None, obj.color)


def _count_credit(found: int, low: int, high: int | None) -> float:
    """1 if low <= found < high (high None: no upper bound); found / low below; 1 - excess / low
    above (excess = found - high + 1), floored at 0."""
    if found < low:
        return found / low
    if high is not None and found >= high:
        return max(0.0, 1.0 - (found - high + 1) / low)
    return 1.0


def score(metadata: dict, objects: list[DetectedObject]) -> ScoreResult:
    """Score detected objects against GenEval metadata.

    Correct (GenEval): for every include entry, n = number of objects of its class (and colour,
    if given) satisfies n >= count and n < e for every exclude entry of the same class and
    colour (count e; counting prompts exclude count + 1, so n == count); every position entry
    ["rel", j] holds for EVERY pair (object of this entry, object of include j) under
    world.relations (GenEval's rule: centroid offset shrunk by 0.1 x summed box sizes, normalised,
    beyond 0.5 on the asked axis); an exclude entry with no include of its class and colour fails
    if its n >= count.

    Partial credit (the dense reward): partial = mean over entries of the entry's credit, entries
    being the include entries plus the unmatched exclude entries. An include entry's credit is the
    mean of its terms:
        class     1 if any object of its class is present, else 0
        colour    (only if a colour is asked) 1 if any object of that colour is present, else 0
        count     1 if count <= n < e; n / count if n < count; max(0, 1 - (n - e + 1) / count)
                  if n >= e (e = the matching exclude count, or no upper bound)
        position  (only if asked) fraction of (object, reference) pairs, among the objects counted
                  in n for both entries, in which the relation holds; 0 if either has none.
    An unmatched exclude entry's credit is 1 if n < count else max(0, 1 - (n - count + 1) / count).
    Every term is 1 exactly when its condition for correctness holds, so partial == 1.0 iff correct.
    """
    includes = metadata.get("include")
    if not includes:
        raise ValueError(f"metadata has no 'include' entries: {metadata!r}")
    excludes = list(metadata.get("exclude", []))
    matched_excl: set[int] = set()
    per_entry = []
    credits = []
    correct = True
    members = [[o for o in objects if _matches(o, e)] for e in includes]
    for i, entry in enumerate(includes):
        n = len(members[i])
        count = int(entry["count"])
        high = None
        for k, ex in enumerate(excludes):
            if ex["class"] == entry["class"] and ex.get("color") == entry.get("color"):
                matched_excl.add(k)
                high = int(ex["count"]) if high is None else min(high, int(ex["count"]))
        terms = {
            "class": float(any(o.shape == entry["class"] for o in objects)),
        }
        if entry.get("color") is not None:
            terms["color"] = float(any(o.color == entry["color"] for o in objects))
        terms["count"] = _count_credit(n, count, high)
        ok = count <= n and (high is None or n < high)
        if entry.get("position"):
            relation, ref = entry["position"][0], int(entry["position"][1])
            pairs = [(a, b) for a in members[i] for b in members[ref]]
            held = sum(relation in object_relations(a, b) for a, b in pairs)
            terms["position"] = held / len(pairs) if pairs else 0.0
            ok = ok and bool(pairs) and held == len(pairs)
        correct = correct and ok
        credit = sum(terms.values()) / len(terms)
        credits.append(credit)
        per_entry.append({"class": entry["class"], "found": n, "ok": ok, "credit": credit,
                          "terms": terms})
    for k, ex in enumerate(excludes):
        if k in matched_excl:
            continue
        n = sum(_matches(o, ex) for o in objects)
        limit = int(ex["count"])
        ok = n < limit
        correct = correct and ok
        credit = 1.0 if ok else max(0.0, 1.0 - (n - limit + 1) / limit)
        credits.append(credit)
        per_entry.append({"exclude": ex["class"], "found": n, "ok": ok, "credit": credit})
    partial = sum(credits) / len(credits)
    return ScoreResult(correct=correct, partial=float(partial),
                       details={"tag": metadata.get("tag"), "entries": per_entry,
                                "num_objects": len(objects)})


def score_images(images, metadata: list[dict]) -> list[ScoreResult]:
    """Score a batch: float [B, 3, H, W] in [0, 1] (tensor or array) or uint8 [B, H, W, 3]."""
    parsed = parse_images(images)
    if len(parsed) != len(metadata):
        raise ValueError(f"{len(parsed)} images but {len(metadata)} metadata entries")
    return [score(m, objs) for m, objs in zip(metadata, parsed)]


__all__ = [
    "CIRCLE_FILL", "MAX_ASPECT", "MAX_MIX_DISTANCE", "MIN_AREA_32", "SIDE_RANGE_32", "SQUARE_FILL",
    "TRIANGLE_ASYMMETRY", "TRIANGLE_MAX_FILL", "UNKNOWN", "DetectedObject", "ScoreResult", "classify_shape", "color_codes", "coverage",
    "label_components", "parse_image", "parse_images", "score", "score_images",
]
