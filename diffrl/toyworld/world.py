"""SynthShapes world: the constants and a renderer of scenes that satisfy a GenEval-style prompt.

A scene is 1-4 flat shapes on a plain white background, drawn without anti-aliasing so every
shape pixel has exactly its palette colour. Sizes are given for 32 px images and scale linearly
with `size` (e.g. side 9-13 px at 32 px, 18-26 px at 64 px).

Coordinates: x to the right, y down, in pixels from the image's top-left corner; pixel (row i,
column j) covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5). Bounding boxes are
(x0, y0, x1, y1) with x1, y1 exclusive.

Relative position (shared by the renderer and the scorer; GenEval's rule, with pixel-mass
centroids in place of detector box centres): with o = centroid(A) - centroid(B) and d = the
bounding-box widths / heights of A plus those of B, shrink each axis towards 0 by
POSITION_MARGIN * d, r = sign(o) * max(|o| - POSITION_MARGIN * d, 0), and normalise by |o|:
A is "left of" B iff r_x / |o| < -0.5, "right of" iff > 0.5, "above" iff r_y / |o| < -0.5,
"below" iff > 0.5. The renderer draws position scenes with the asked axis at 0.7 or more and
the other axis at 0.3 or less, so the asked relation holds with room to spare and no other does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (250, 230, 0),
    "purple": (130, 30, 190),
    "orange": (240, 120, 0),
}
"""Six saturated palette colours (pairwise RGB distance >= 106), named as GenEval names them."""

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Plain white background."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Object classes; "triangle" is an upward isosceles triangle filling its bounding box's base."""

PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}

TAGS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)
"""GenEval's six task tags, in GenEval's order."""

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
"""Counts as caption words (counting prompts use 2-4, as GenEval does)."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""GenEval's relative-position phrases: `position: [relation, reference_index]`."""

OPPOSITE: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}

MAX_OBJECTS = 4
SIDE_RANGE_32: tuple[int, int] = (9, 13)
"""Bounding-box side range, inclusive, in pixels at 32 px."""
GAP_32 = 2
"""Minimum number of empty pixels between two objects' bounding boxes (along x or y) at 32 px."""
POSITION_MARGIN = 0.1
"""GenEval's position threshold: each axis offset is shrunk by this times the summed box sizes."""
_RENDER_PRIMARY_MIN = 0.7
_RENDER_SECONDARY_MAX = 0.3


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: class, colour name, pixel-mass centroid, pixel count, bounding box."""

    shape: str
    color: str
    cx: float
    cy: float
    area: float
    bbox: tuple[int, int, int, int]


def scale(size: int) -> float:
    """Linear size factor relative to the 32 px world."""
    return size / 32.0


def side_range(size: int) -> tuple[int, int]:
    """Inclusive range of bounding-box sides at image size `size`."""
    lo, hi = SIDE_RANGE_32
    return round(lo * scale(size)), round(hi * scale(size))


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean [side, side] mask of `shape` filling a side x side box, hard edges.

    A pixel is inside when its centre is: square all; circle within radius side / 2 of the box
    centre; triangle below the two edges from the top-centre apex to the bottom corners.
    """
    c = (np.arange(side) + 0.5)  # pixel centres along one axis
    ys, xs = np.meshgrid(c, c, indexing="ij")  # [side, side]
    half = side / 2.0
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (xs - half) ** 2 + (ys - half) ** 2 <= half**2
    if shape == "triangle":
        return np.abs(xs - half) <= ys / 2.0  # half-width grows from 0 at the top to side/2
    raise ValueError(f"unknown shape {shape!r}; valid shapes are {list(SHAPES)}")


def relations(
    center_a: tuple[float, float],
    dims_a: tuple[float, float],
    center_b: tuple[float, float],
    dims_b: tuple[float, float],
    margin: float = POSITION_MARGIN,
) -> set[str]:
    """The relations A has to B, a subset of RELATIONS (GenEval's rule: module docstring)."""
    nx, ny = _normalized_offset(center_a, dims_a, center_b, dims_b, margin)
    found = set()
    if nx < -0.5:
        found.add("left of")
    if nx > 0.5:
        found.add("right of")
    if ny < -0.5:
        found.add("above")
    if ny > 0.5:
        found.add("below")
    return found


def _normalized_offset(center_a, dims_a, center_b, dims_b, margin) -> tuple[float, float]:
    ox, oy = center_a[0] - center_b[0], center_a[1] - center_b[1]
    norm = math.hypot(ox, oy)
    if norm == 0.0:
        return 0.0, 0.0
    rx = math.copysign(max(abs(ox) - margin * (dims_a[0] + dims_b[0]), 0.0), ox)
    ry = math.copysign(max(abs(oy) - margin * (dims_a[1] + dims_b[1]), 0.0), oy)
    return rx / norm, ry / norm


def object_relations(a: SceneObject, b: SceneObject) -> set[str]:
    """relations() of two objects, from their centroids and bounding boxes."""
    return relations((a.cx, a.cy), _dims(a.bbox), (b.cx, b.cy), _dims(b.bbox))


def _dims(bbox: tuple[int, int, int, int]) -> tuple[int, int]:
    return bbox[2] - bbox[0], bbox[3] - bbox[1]


def _clear_relation(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """A has `relation` to B with the renderer's margins (asked axis >= 0.7, other <= 0.3)."""
    nx, ny = _normalized_offset((a.cx, a.cy), _dims(a.bbox), (b.cx, b.cy), _dims(b.bbox),
                                POSITION_MARGIN)
    along, across = {
        "left of": (-nx, ny), "right of": (nx, ny), "above": (-ny, nx), "below": (ny, nx),
    }[relation]
    return along >= _RENDER_PRIMARY_MIN and abs(across) <= _RENDER_SECONDARY_MAX


def _place(shape: str, color: str, side: int, x0: int, y0: int) -> SceneObject:
    mask = shape_mask(shape, side)
    ys, xs = np.nonzero(mask)
    bbox = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
    return SceneObject(
        shape=shape, color=color,
        cx=float(x0 + xs.mean() + 0.5), cy=float(y0 + ys.mean() + 0.5),
        area=int(mask.sum()), bbox=bbox,
    )


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Boxes separated by at least `gap` empty pixels along x or along y."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0]
            or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _objects_for(metadata: dict, rng: np.random.Generator, allowed_pairs) -> list[tuple[str, str]]:
    """(shape, colour) for every object the metadata asks for; unspecified colours drawn."""
    if "include" not in metadata:
        raise ValueError(f"metadata has no 'include' list: {metadata!r}")
    specs: list[tuple[str, str]] = []
    for entry in metadata["include"]:
        shape = entry["class"]
        if shape not in SHAPES:
            raise ValueError(f"unknown class {shape!r}; the toy world has {list(SHAPES)}")
        count = int(entry["count"])
        color = entry.get("color")
        if color is not None and color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; the toy world has {list(COLORS)}")
        for _ in range(count):
            if color is not None:
                specs.append((shape, color))
                continue
            choices = [c for c in COLORS if allowed_pairs is None or (c, shape) in allowed_pairs]
            if not choices:
                raise ValueError(f"no allowed colour for shape {shape!r} in allowed_pairs")
            specs.append((shape, choices[int(rng.integers(len(choices)))]))
    if not 1 <= len(specs) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1-{MAX_OBJECTS} objects; metadata asks for {len(specs)}")
    return specs


def render_scene(
    metadata: dict,
    rng: np.random.Generator,
    size: int = 32,
    allowed_pairs=None,
    max_tries: int = 2000,
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw a random scene satisfying `metadata` exactly; return (uint8 [size, size, 3], objects).

    Exactly the included objects are drawn (no distractors): counts are exact, asked colours are
    used and the others drawn uniformly (from colours allowed for that shape by `allowed_pairs`,
    a set of (colour, shape), if given); sides are uniform in side_range(size); objects lie
    inside the image, GAP_32 * scale pixels apart; position entries hold with the renderer's
    margins (module docstring). Objects are placed by rejection sampling.
    """
    specs = _objects_for(metadata, rng, allowed_pairs)
    lo, hi = side_range(size)
    gap = max(1, round(GAP_32 * scale(size)))
    starts: dict[int, int] = {}  # include index -> index of its first object in `specs`
    k = 0
    for i, entry in enumerate(metadata["include"]):
        starts[i] = k
        k += int(entry["count"])
    constraints = [
        (starts[i], starts[entry["position"][1]], entry["position"][0])
        for i, entry in enumerate(metadata["include"]) if entry.get("position")
    ]
    for attempt in range(max_tries):
        # many objects rarely fit at the largest sides: shrink the upper bound after failures
        top = max(lo, hi - attempt // 200)
        objects: list[SceneObject] = []
        for shape, color in specs:
            for _ in range(50):
                side = int(rng.integers(lo, top + 1))
                x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                obj = _place(shape, color, side, x0, y0)
                if all(_apart(obj.bbox, other.bbox, gap) for other in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) < len(specs):
            continue
        if all(_clear_relation(objects[a], objects[b], rel) for a, b, rel in constraints):
            return draw(objects, size), objects
    raise RuntimeError(f"could not place a scene for {metadata!r} in {max_tries} tries")


def draw(objects: list[SceneObject], size: int) -> np.ndarray:
    """Paint `objects` (boxes as placed by render_scene) on white: uint8 [size, size, 3]."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox
        side = max(x1 - x0, y1 - y0)
        mask = shape_mask(obj.shape, side)
        ys, xs = np.nonzero(mask)
        # the mask's own box can be smaller than side x side (a triangle's empty top row)
        ys = ys - ys.min() + y0
        xs = xs - xs.min() + x0
        image[ys, xs] = COLORS[obj.color]
    return image


def render(
    metadata: dict, rng: np.random.Generator, size: int = 32, allowed_pairs=None
) -> np.ndarray:
    """A random scene satisfying `metadata` exactly (see render_scene): uint8 [size, size, 3]."""
    return render_scene(metadata, rng, size=size, allowed_pairs=allowed_pairs)[0]
