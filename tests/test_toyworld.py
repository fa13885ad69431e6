"""SynthShapes (diffrl.toyworld): the renderer is exact, the scorer parses exactly and scores
GenEval's way, prompts and jsonl round-trip, compositional splits hold out what they say."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffrl.rewards import build_reward
from diffrl.toyworld import (
    COLORS,
    SHAPES,
    TAGS,
    DetectedObject,
    compositional_split,
    enumerate_metadata,
    make_prompt_set,
    parse_image,
    read_jsonl,
    relations,
    render,
    render_scene,
    sample_metadata,
    score,
    score_images,
    vocabulary,
    write_jsonl,
)
from diffrl.toyworld.scorer import UNKNOWN, classify_shape, label_components
from diffrl.toyworld.world import OPPOSITE, side_range

GENEVAL = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "geneval_test.jsonl"
PER_TAG = 100


@pytest.fixture(scope="module")
def scenes():
    """PER_TAG random prompts of every tag, 32 px: (metadata, image uint8 [32, 32, 3], objects)."""
    rng = np.random.default_rng(0)
    out = []
    for tag in TAGS:
        for _ in range(PER_TAG):
            meta = sample_metadata(rng, tag)
            image, objects = render_scene(meta, rng)
            out.append((meta, image, objects))
    return out


def _float_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]


def _incompatible(meta: dict, objects) -> list[dict]:
    """Prompts the scene drawn for `meta` must fail, built by hand per tag."""
    inc = meta["include"]
    tag = meta["tag"]

    def other_shape(*shapes):
        return next(s for s in SHAPES if s not in shapes)

    if tag == "single_object":
        return [{"tag": tag, "include": [{"class": other_shape(inc[0]["class"]), "count": 1}]}]
    if tag == "colors":
        wrong = next(c for c in COLORS if c != inc[0]["color"])
        return [
            {"tag": tag, "include": [dict(inc[0], color=wrong)]},
            {"tag": tag, "include": [dict(inc[0], **{"class": other_shape(inc[0]["class"])})]},
        ]
    if tag == "two_object":
        missing = other_shape(inc[0]["class"], inc[1]["class"])
        return [{"tag": tag, "include": [inc[0], {"class": missing, "count": 1}]}]
    if tag == "counting":
        shape, n = inc[0]["class"], inc[0]["count"]
        return [  # one fewer (the scene has one too many) and one more (one too few)
            {"tag": tag, "include": [{"class": shape, "count": m}],
             "exclude": [{"class": shape, "count": m + 1}]}
            for m in (n - 1, n + 1)
        ]
    if tag == "position":
        ref, target = inc
        relation = target["position"][0]
        return [
            {"tag": tag, "include": [ref, dict(target, position=[OPPOSITE[relation], 0])]},
            # roles swapped: the reference is now said to stand where the target is
            {"tag": tag, "include": [{"class": target["class"], "count": 1},
                                     {"class": ref["class"], "count": 1,
                                      "position": [relation, 0]}]},
        ]
    # color_attr: colours swapped between the two (different) shapes
    a, b = inc
    return [{"tag": tag, "include": [dict(a, color=b["color"]), dict(b, color=a["color"])]}]


# ---------------------------------------------------------------- world and renderer


def test_render_is_exact_for_every_tag(scenes):
    results = [score(meta, parse_image(image)) for meta, image, _ in scenes]
    by_tag = collections.Counter(m["tag"] for (m, _, _), r in zip(scenes, results) if r.correct)
    assert by_tag == {tag: PER_TAG for tag in TAGS}
    assert all(r.partial == 1.0 for r in results)


def test_scenes_for_incompatible_prompts_score_incorrect(scenes):
    checked = collections.Counter()
    for meta, image, objects in scenes:
        parsed = parse_image(image)
        for variant in _incompatible(meta, objects):
            result = score(variant, parsed)
            assert not result.correct, (meta["prompt"], variant)
            assert 0.0 <= result.partial < 1.0
            checked[meta["tag"]] += 1
    assert set(checked) == set(TAGS)


def test_scene_geometry(scenes):
    lo, hi = side_range(32)
    for meta, image, objects in scenes:
        assert len(objects) == sum(e["count"] for e in meta["include"])
        for o in objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            assert lo <= max(x1 - x0, y1 - y0) <= hi
        for i, a in enumerate(objects):  # at least 2 empty pixels between boxes along x or y
            for b in objects[i + 1:]:
                assert (a.bbox[2] + 2 <= b.bbox[0] or b.bbox[2] + 2 <= a.bbox[0]
                        or a.bbox[3] + 2 <= b.bbox[1] or b.bbox[3] + 2 <= a.bbox[1])
        # hard edges: every pixel is white or exactly a palette colour
        palette = {(255, 255, 255), *COLORS.values()}
        assert {tuple(p) for p in image.reshape(-1, 3).tolist()} <= palette


def test_render_uses_asked_colours_and_allowed_pairs():
    rng = np.random.default_rng(1)
    allowed = {("red", "circle"), ("blue", "circle")}
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 4}]}
    for _ in range(20):
        _, objects = render_scene(meta, rng, allowed_pairs=allowed)
        assert {o.color for o in objects} <= {"red", "blue"}
    with pytest.raises(ValueError, match="unknown class"):
        render({"include": [{"class": "cow", "count": 1}]}, rng)
    with pytest.raises(ValueError, match="unknown colour"):
        render({"include": [{"class": "circle", "count": 1, "color": "pink"}]}, rng)
    with pytest.raises(ValueError, match="1-4 objects"):
        render({"include": [{"class": "circle", "count": 5}]}, rng)


def test_render_64px_is_exact():
    rng = np.random.default_rng(2)
    metas = [sample_metadata(rng, TAGS[i % len(TAGS)]) for i in range(60)]
    images = [render(m, rng, size=64) for m in metas]
    assert images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
    assert all(r.correct for r in score_images(_float_batch(images), metas))


def test_relations_hand_computed():
    # o = (-10, -2), |o| = 10.198; shrink by 0.1 * (4 + 4) = 0.8: r = (-9.2, -1.2) / 10.198
    assert relations((10, 10), (4, 4), (20, 12), (4, 4)) == {"left of"}
    assert relations((20, 12), (4, 4), (10, 10), (4, 4)) == {"right of"}
    # o = (-10, -10): r = (-9.2, -9.2) / 14.14 = -0.65 on both axes
    assert relations((10, 10), (4, 4), (20, 20), (4, 4)) == {"left of", "above"}
    # o = (0, 3) with tall boxes: |3| - 0.1 * (20 + 20) < 0 -> no relation
    assert relations((10, 13), (4, 20), (10, 10), (4, 20)) == set()
    assert relations((10, 30), (4, 4), (10, 10), (4, 4)) == {"below"}


# ---------------------------------------------------------------- parsing


def test_parse_recovers_rendered_objects(scenes):
    for _, image, objects in scenes:
        parsed = parse_image(image)
        assert len(parsed) == len(objects)
        for o in objects:
            match = min((p for p in parsed if (p.shape, p.color) == (o.shape, o.color)),
                        key=lambda p: abs(p.cx - o.cx) + abs(p.cy - o.cy))
            assert abs(match.cx - o.cx) < 1 and abs(match.cy - o.cy) < 1
            assert match.bbox == o.bbox and match.area == pytest.approx(o.area)


def test_parse_accepts_uint8_and_float_tensor(scenes):
    _, image, objects = scenes[0]
    as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0  # [3, H, W]
    assert parse_image(as_tensor) == parse_image(image)
    with pytest.raises(ValueError, match="one image"):
        parse_image(as_tensor[None])


def test_label_components_8_connectivity():
    codes = np.array([[[1, 0, 2],
                       [0, 1, 2],
                       [3, 0, 1]]])
    labels = label_components(codes)[0]
    # the diagonal 1s form one component (label = first pixel's index), 2s one, the 3 alone
    assert labels.tolist() == [[0, -1, 2], [-1, 0, 2], [6, -1, 0]]


def test_blobs_that_are_no_shape_are_unknown():
    assert classify_shape(1.0, 0.0, 1.0) == "square"
    assert classify_shape(0.8, 0.0, 1.0) == "circle"
    assert classify_shape(0.52, 0.15, 1.0) == "triangle"
    assert classify_shape(1.0, 0.0, 3.0) == UNKNOWN  # a bar
    assert classify_shape(0.52, -0.15, 1.0) == UNKNOWN  # upside down
    assert classify_shape(0.5, 0.0, 1.0) == UNKNOWN  # a diamond: sparse but symmetric
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    image[2:6, 2:30] = COLORS["red"]  # 4 x 28 bar
    image[10:30, 10:30] = COLORS["blue"]  # 20 x 20 square: within the side range
    image[12:16, 2:6] = COLORS["green"]  # 4 x 4 square: too small for a shape
    parsed = {o.color: o.shape for o in parse_image(image)}
    assert parsed == {"red": UNKNOWN, "blue": "square", "green": UNKNOWN}
    big = np.full((32, 32, 3), 255, dtype=np.uint8)
    big[2:30, 2:30] = COLORS["blue"]  # 28 px: larger than any drawn shape
    assert [o.shape for o in parse_image(big)] == [UNKNOWN]


def test_uniform_noise_scores_near_zero():
    g = torch.Generator().manual_seed(0)
    metas = make_prompt_set(300, seed=0, unique=False)
    results = score_images(torch.rand(300, 3, 32, 32, generator=g), metas)
    assert np.mean([r.correct for r in results]) < 0.02
    assert np.mean([r.partial for r in results]) < 0.05


def _gauss(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)


def _box3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


@pytest.mark.parametrize("blur", ["gauss0.5", "box3"])
def test_robust_to_mild_blur_and_noise(scenes, blur):
    """Measured on these 600 scenes: 100 % for both blurs, alone and with noise std 0.03 (on
    1,200 other scenes: 100 % up to sigma 0.7 + noise 0.08, 98.4 % at sigma 0.85 + 0.08)."""
    metas = [m for m, _, _ in scenes]
    x = _float_batch([im for _, im, _ in scenes])
    blurred = _gauss(x, 0.5) if blur == "gauss0.5" else _box3(x)
    assert np.mean([r.correct for r in score_images(blurred, metas)]) == 1.0
    g = torch.Generator().manual_seed(0)
    noisy = (blurred + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert np.mean([r.correct for r in score_images(noisy, metas)]) >= 0.98


# ---------------------------------------------------------------- scoring and partial credit


def _obj(shape, color, cx, cy, side=10):
    x0, y0 = int(cx - side / 2), int(cy - side / 2)
    return DetectedObject(shape=shape, color=color, cx=cx, cy=cy, area=side * side * 0.8,
                          bbox=(x0, y0, x0 + side, y0 + side))


def test_partial_credit_hand_computed():
    three = {"tag": "counting", "include": [{"class": "triangle", "count": 3}],
             "exclude": [{"class": "triangle", "count": 4}]}
    tri = [_obj("triangle", "red", 6 + 7 * i, 10) for i in range(4)]
    assert score(three, tri[:3]).correct
    # 4 found: class 1, count 1 - (4 - 4 + 1) / 3 -> (1 + 2/3) / 2
    assert score(three, tri).partial == pytest.approx(5 / 6) and not score(three, tri).correct
    # 2 found: class 1, count 2/3
    assert score(three, tri[:2]).partial == pytest.approx(5 / 6)
    red_circle = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    # right shape, wrong colour: class 1, colour 0, count 0
    assert score(red_circle, [_obj("circle", "blue", 10, 10)]).partial == pytest.approx(1 / 3)
    # right colour, wrong shape: class 0, colour 1, count 0
    assert score(red_circle, [_obj("square", "red", 10, 10)]).partial == pytest.approx(1 / 3)
    pos = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1,
                                           "position": ["left of", 0]}]}
    left, right = _obj("circle", "red", 6, 16), _obj("square", "blue", 26, 16)
    assert score(pos, [left, right]).correct
    # circle on the wrong side: square entry 1, circle entry (1 + 1 + 0) / 3
    moved = _obj("circle", "red", 26, 16), _obj("square", "blue", 6, 16)
    assert score(pos, list(moved)).partial == pytest.approx((1 + 2 / 3) / 2)
    # two circles, one on each side of the square: every pair must hold (GenEval); square
    # entry 1, circle entry (class 1 + count 1 + position 1/2) / 3
    pair = [_obj("square", "blue", 16, 16), _obj("circle", "red", 4, 16),
            _obj("circle", "green", 28, 16)]
    result = score(pos, pair)
    assert not result.correct and result.partial == pytest.approx((1 + 2.5 / 3) / 2)
    attr = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                             {"class": "square", "count": 1, "color": "red"}]}
    # circle entry all 1; square: class 1, colour 1 (red is present, on the circle), count 0
    assert score(attr, [left, right]).partial == pytest.approx((1 + 2 / 3) / 2)


def test_partial_one_iff_correct_and_blank_is_zero(scenes):
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    for meta, image, objects in scenes:
        parsed = parse_image(image)
        for m in [meta, *_incompatible(meta, objects)]:
            r = score(m, parsed)
            assert (r.partial == 1.0) == r.correct
        assert score(meta, parse_image(blank)).partial == 0.0
    # right shape, wrong colour is strictly between
    meta = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "green"}]}
    image = render({"tag": "colors", "include": [{"class": "square", "count": 1,
                                                   "color": "purple"}]},
                   np.random.default_rng(3))
    assert 0.0 < score(meta, parse_image(image)).partial < 1.0


def test_score_needs_include():
    with pytest.raises(ValueError, match="include"):
        score({"tag": "colors", "prompt": "a red circle"}, [])


# ---------------------------------------------------------------- rewards


def test_rewards_on_rendered_batch(scenes):
    batch = scenes[::25]
    metas = [m for m, _, _ in batch]
    prompts = [m["prompt"] for m in metas]
    images = _float_batch([im for _, im, _ in batch])
    for name in ("toyworld", "toyworld_accuracy"):
        reward = build_reward(name)
        out = reward(images, prompts, metas)
        assert out.dtype == torch.float32 and out.shape == (len(batch),)
        assert torch.equal(out, torch.ones(len(batch)))
    # prompts shifted by one: the dense reward drops below 1 for at least most of them
    shifted = metas[1:] + metas[:1]
    dense = build_reward("toyworld")(images, prompts, shifted)
    acc = build_reward("toyworld_accuracy")(images, prompts, shifted)
    assert torch.equal(acc, (dense == 1.0).float()) and acc.mean() < 0.5
    with pytest.raises(ValueError, match="metadata"):
        build_reward("toyworld")(images, prompts)
    with pytest.raises(ValueError, match="include"):
        build_reward("toyworld_accuracy")(images, prompts, [{"prompt": p} for p in prompts])


# ---------------------------------------------------------------- prompts and jsonl


def test_caption_grammar():
    def prompts(tag):
        return {r["prompt"]: r for r in enumerate_metadata(tag)}

    assert prompts("single_object")["a circle"]["include"] == [{"class": "circle", "count": 1}]
    assert prompts("colors")["an orange square"]["include"] == [
        {"class": "square", "count": 1, "color": "orange"}]
    assert prompts("counting")["three triangles"] == {
        "tag": "counting", "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}], "prompt": "three triangles"}
    assert prompts("position")["a circle right of a square"]["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["right of", 0]}]
    assert prompts("color_attr")["a red circle and a blue square"]["include"] == [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue"}]
    sizes = {tag: len(enumerate_metadata(tag)) for tag in TAGS}
    assert sizes == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 18,
                     "position": 24, "color_attr": 180}
    words = set(vocabulary())
    for tag in TAGS:
        for row in enumerate_metadata(tag):
            assert set(row["prompt"].split()) <= words


def test_make_prompt_set():
    rows = make_prompt_set(120, seed=5)
    assert rows == make_prompt_set(120, seed=5) and rows != make_prompt_set(120, seed=6)
    assert len({r["prompt"] for r in rows}) == 120
    counts = collections.Counter(r["tag"] for r in rows)
    # 20 per tag where the tag has that many; the short tags' share goes to the others
    assert counts["single_object"] == 3 and counts["two_object"] == 6
    assert counts["counting"] == 9 and counts["colors"] == 18
    all_rows = make_prompt_set(240, seed=0)
    assert len({r["prompt"] for r in all_rows}) == 240
    with pytest.raises(ValueError, match="unique"):
        make_prompt_set(241, seed=0)
    many = make_prompt_set(600, seed=0, unique=False)
    assert collections.Counter(r["tag"] for r in many) == {t: 100 for t in TAGS}
    assert {r["tag"] for r in make_prompt_set(10, seed=0, tags=["position"])} == {"position"}


def test_compositional_split_holds_pairs_out():
    for seed in range(5):
        train, held = compositional_split(seed)
        assert len(held) == 4 and not train & held
        assert train | held == {(c, s) for c in COLORS for s in SHAPES}
        assert {c for c, _ in train} == set(COLORS) and {s for _, s in train} == set(SHAPES)
        rows = make_prompt_set(600, seed=seed, allowed_pairs=train, unique=False)
        rows += make_prompt_set(150, seed=seed, allowed_pairs=train, unique=True)
        named = {(e["color"], e["class"]) for r in rows for e in r["include"] if "color" in e}
        assert named and not named & held
        rng = np.random.default_rng(seed)
        for r in rows[:100]:  # unnamed colours are drawn from training pairs too
            _, objects = render_scene(r, rng, allowed_pairs=train)
            assert not {(o.color, o.shape) for o in objects} & held
    assert compositional_split(0) == compositional_split(0)


def test_geneval_jsonl_round_trips(tmp_path):
    """The shipped GenEval metadata (builtin:geneval_test) reads and writes back byte for byte."""
    text = GENEVAL.read_text()
    lines = text.splitlines()
    rows = read_jsonl(GENEVAL)
    assert len(rows) == len(lines) > 2000
    for line, row in zip(lines, rows):
        original = json.loads(line)
        assert row == original and list(row) == list(original)
    out = tmp_path / "geneval.jsonl"
    write_jsonl(rows, out)
    # byte-identical, up to the final newline the source file lacks and write_jsonl adds
    assert out.read_text() == text.rstrip("\n") + "\n"
    assert read_jsonl(out) == rows


def test_toy_prompt_sets_round_trip(tmp_path):
    rows = make_prompt_set(200, seed=3)
    write_jsonl(rows, tmp_path / "sub" / "toy.jsonl")
    back = read_jsonl(tmp_path / "sub" / "toy.jsonl")
    assert back == rows and [list(r) for r in back] == [list(r) for r in rows]


# ---- the shipped prompt split ---------------------------------------------------------------------------
def test_train_and_eval_prompt_sets_share_no_prompt_and_no_scene():
    """builtin:toy_train and the held-out sets share no caption text, nor a reordering of one ("a circle and a
    square" / "a square and a circle", a position caption and its mirror); every caption of the grammar is in
    exactly one split; the shipped files are what builtin_prompt_sets draws."""
    from diffrl.data import load_prompts
    from diffrl.toyworld.prompts import SPLITS, builtin_prompt_sets, prompt_split, scene_key

    sets = {name: load_prompts(f"builtin:{name}").metadata for name in ("toy_train", "toy_eval", "toy_eval_pairs")}
    assert sets == builtin_prompt_sets()
    train = {m["prompt"] for m in sets["toy_train"]}
    for name in ("toy_eval", "toy_eval_pairs"):
        assert not train & {m["prompt"] for m in sets[name]}, name
        assert not {scene_key(m) for m in sets["toy_train"]} & {scene_key(m) for m in sets[name]}, name
    split = prompt_split()
    captions = [m["prompt"] for s in SPLITS for m in split[s]]
    assert len(captions) == len(set(captions)) == sum(len(enumerate_metadata(t)) for t in TAGS) == 240
    # the scene key groups exactly the reorderings: "a circle left of a square" == "a square right of a circle"
    pos = {m["prompt"]: scene_key(m) for m in enumerate_metadata("position")}
    assert pos["a circle left of a square"] == pos["a square right of a circle"] != pos["a circle right of a square"]


def test_split_flags_follow_the_compositional_split():
    """toy_train and toy_eval use only colour-shape pairs pretraining saw; every toy_eval_pairs prompt names a
    pair it never saw; each set covers its tags evenly (50 per tag; pairs: colors and color_attr)."""
    from collections import Counter

    from diffrl.data import load_prompts

    train_pairs, held = compositional_split(seed=0)

    def pairs(m):
        return {(e["color"], e["class"]) for e in m["include"] if "color" in e}

    for name, expect_held in (("toy_train", False), ("toy_eval", False), ("toy_eval_pairs", True)):
        rows = load_prompts(f"builtin:{name}").metadata
        assert all(bool(pairs(m) & held) == expect_held for m in rows), name
        counts = Counter(m["tag"] for m in rows)
        assert set(counts.values()) == {50}, (name, counts)
    assert {m["split"] for m in load_prompts("builtin:toy_eval").metadata} == {"unseen"}
