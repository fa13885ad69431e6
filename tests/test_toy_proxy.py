"""The learned SynthShapes proxy reward (`toy_proxy`): shipped weights load and track the exact
scorer on fresh scenes, gradients reach the images, the prompt encoding is exact and injective,
and weights load from a user path or fail naming the missing file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl.rewards import build_reward
from diffrl.toyworld import enumerate_metadata, make_prompt_set, render, score_images
from diffrl.toyworld.proxy import (
    PROMPT_DIM,
    SLOT_DIM,
    ProxyCNN,
    ProxyConfig,
    default_proxy_path,
    encode_batch,
    encode_metadata,
    save_proxy,
)

N = 200
SEED = 1234  # the shipped weights were trained on seeds 0 (train) and 1 (held-out)


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, 32, 32]


@pytest.fixture(scope="module")
def scenes():
    """N fresh scenes, each drawn for its own prompt (matched), and for each a different prompt of
    the same tag (a hard negative: other colour, count, relation, shape or order)."""
    rng = np.random.default_rng(SEED)
    matched = make_prompt_set(N, seed=SEED, unique=False)
    images = _batch([render(m, rng) for m in matched])
    other = []
    for m in matched:
        pool = [q for q in enumerate_metadata(m["tag"]) if q["prompt"] != m["prompt"]]
        other.append(pool[int(rng.integers(len(pool)))])
    return images, matched, other


@pytest.fixture(scope="module")
def rewards():
    return build_reward("toy_proxy"), build_reward("toy_proxy", head="correct")


def test_shipped_weights_load_through_the_registry(rewards):
    partial, _ = rewards
    assert type(partial).differentiable
    path = default_proxy_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "model.safetensors").stat().st_size < 600_000


def test_matched_scenes_score_high(scenes, rewards):
    # measured: mean predicted partial credit 0.958, mean P(correct) 0.894 on these 200 scenes
    images, matched, _ = scenes
    assert all(r.correct for r in score_images(images, matched))  # the renderer is exact
    partial, correct = rewards
    pred = partial(images, [m["prompt"] for m in matched], matched)
    assert pred.shape == (N,) and pred.dtype == torch.float32
    assert pred.mean().item() > 0.8
    assert correct(images, [m["prompt"] for m in matched], matched).mean().item() > 0.8


def test_hard_negatives_agree_with_the_exact_verdict(scenes, rewards):
    # measured: P(correct) > 0.5 agrees with the exact scorer on 90.0 % of these 200 pairs (192
    # exact negatives; 94.5 % with seed 99); weakest tags position and colors
    images, _, other = scenes
    exact = torch.tensor([r.correct for r in score_images(images, other)])
    assert (~exact).sum() > N // 2  # mostly real negatives
    _, correct = rewards
    pred = correct(images, [m["prompt"] for m in other], other) > 0.5
    assert (pred == exact).float().mean().item() >= 0.85


def test_gradients_reach_the_images_at_any_size(scenes, rewards):
    images, matched, _ = scenes
    partial, _ = rewards
    for x in (images[:8], torch.nn.functional.interpolate(images[:8], size=64)):
        x = x.clone().requires_grad_(True)
        partial(x, [m["prompt"] for m in matched[:8]], matched[:8]).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_encoding_is_injective_over_the_grammar():
    rows = make_prompt_set(240, seed=0, unique=True)  # every prompt of the grammar
    codes = encode_batch(rows)
    assert codes.shape == (240, PROMPT_DIM)
    assert len({tuple(c.tolist()) for c in codes}) == 240


def test_encoding_by_hand():
    # "three triangles": slot 0 = present, triangle, any colour, count 3, exact, no relation
    code = encode_metadata({"tag": "counting", "include": [{"class": "triangle", "count": 3}],
                            "exclude": [{"class": "triangle", "count": 4}]})
    expected = np.zeros(PROMPT_DIM, dtype=np.float32)
    # present 0 | shape 1-3 | colour 4-10 (10 = any) | count 11-14 | exact 15 | relation 16-20
    expected[[0, 3, 10, 13, 15, 16]] = 1.0
    expected[2 * SLOT_DIM + 2] = 1.0  # tag "counting" (third in TAGS)
    np.testing.assert_array_equal(code, expected)
    # "a circle left of a square": slot 1 holds the circle, relation "left of" to include 0
    code = encode_metadata({"tag": "position", "include": [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]}]})
    assert code[SLOT_DIM + 1] == 1.0 and code[SLOT_DIM + 17] == 1.0 and code[SLOT_DIM + 21] == 1.0
    with pytest.raises(ValueError, match="exclude"):
        encode_metadata({"tag": "counting", "include": [{"class": "circle", "count": 2}],
                         "exclude": [{"class": "circle", "count": 5}]})


def test_user_path_loads_and_missing_path_names_the_file(tmp_path):
    torch.manual_seed(0)
    model = ProxyCNN(ProxyConfig())
    save_proxy(model, tmp_path / "mine")
    reward = build_reward("toy_proxy", path=tmp_path / "mine")
    meta = make_prompt_set(4, seed=0)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.half().float()(x, encode_batch(meta))[0]  # weights ship as float16
    torch.testing.assert_close(reward(x, [m["prompt"] for m in meta], meta), expected)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_reward("toy_proxy", path=missing)


def test_needs_metadata_and_a_valid_head(rewards):
    partial, _ = rewards
    with pytest.raises(ValueError, match="metadata"):
        partial(torch.rand(2, 3, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="head"):
        build_reward("toy_proxy", head="logit")
