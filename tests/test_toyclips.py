"""SynthShapes clips: the renderer satisfies every caption, the track scorer is exact, still and reversed clips fail."""

import json

import numpy as np
import pytest
import torch

from diffrl.toyworld.clips import (
    CLIP_TAGS,
    DIRECTIONS,
    builtin_clip_prompt_sets,
    clip_metadata,
    clip_prompt_split,
    enumerate_clip_metadata,
    render_clip,
    score_clips,
)


def _render(rows, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([render_clip(m, rng) for m in rows])  # uint8 [B, F, H, W, 3]


@pytest.fixture(scope="module")
def eval_rows():
    return builtin_clip_prompt_sets()["toy_clips_eval"]


def test_rendered_clips_satisfy_their_captions(eval_rows):
    clips = _render(eval_rows)
    results = score_clips(clips, eval_rows)
    assert all(r.correct and r.partial == 1.0 for r in results)
    # float [B, F, 3, H, W] in [0, 1] (what a policy decodes) scores the same
    as_float = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255
    assert [r.correct for r in score_clips(as_float, eval_rows)] == [True] * len(eval_rows)


def test_still_clips_fail_every_caption(eval_rows):
    clips = _render(eval_rows)
    for frame in (0, -1):  # the first or the last frame held for the whole clip
        still = np.repeat(clips[:, frame:frame + 1 if frame == 0 else None], clips.shape[1], axis=1)
        results = score_clips(still, eval_rows)
        assert not any(r.correct for r in results)
        assert all(r.partial < 1.0 for r in results)


def test_reversed_clips_fail_and_match_the_opposite_caption():
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    rows = [clip_metadata("moving", "red", 1, d) for d in DIRECTIONS]
    rows += [clip_metadata("counting", "blue", 2, d) for d in DIRECTIONS]
    clips = _render(rows, seed=3)[:, ::-1]  # played backwards
    assert not any(r.correct for r in score_clips(clips, rows))
    flipped = [{**m, "direction": opposite[m["direction"]]} for m in rows]
    assert all(r.correct for r in score_clips(clips, flipped))
    # a turning clip played backwards turns the other way; an appearing one disappears, and the reverse
    turn = clip_metadata("turning", "green", to_color="yellow")
    appear = clip_metadata("appearing", "orange")
    vanish = clip_metadata("disappearing", "purple")
    clips = _render([turn, appear, vanish], seed=4)[:, ::-1]
    assert [r.correct for r in score_clips(clips, [turn, appear, vanish])] == [False, False, False]
    backwards = [clip_metadata("turning", "yellow", to_color="green"), clip_metadata("disappearing", "orange"),
                 clip_metadata("appearing", "purple")]
    assert [r.correct for r in score_clips(clips, backwards)] == [True, True, True]


def test_wrong_colour_or_count_fails():
    row = clip_metadata("counting", "red", 2, "up")
    clip = _render([row], seed=5)
    assert score_clips(clip, [row])[0].correct
    for wrong in ({**row, "count": 3}, {**row, "count": 1}, {**row, "color": "blue"}, {**row, "direction": "left"}):
        result = score_clips(clip, [wrong])[0]
        assert not result.correct and result.partial < 1.0


def test_prompt_split_is_disjoint_and_covers_every_tag():
    split = clip_prompt_split()
    train = {m["prompt"] for m in split["train"]}
    unseen = {m["prompt"] for m in split["unseen"]}
    assert train and unseen and not train & unseen
    every = {m["prompt"] for tag in CLIP_TAGS for m in enumerate_clip_metadata(tag)}
    assert train | unseen == every
    for tag in CLIP_TAGS:
        assert any(m["tag"] == tag for m in split["train"]) and any(m["tag"] == tag for m in split["unseen"])


def test_shipped_clip_prompt_files_are_the_builtin_split():
    from diffrl.data import load_prompts

    for name, rows in builtin_clip_prompt_sets().items():
        shipped = load_prompts(f"builtin:{name}")
        assert shipped.metadata == json.loads(json.dumps(rows))
        assert {m["tag"] for m in rows} == set(CLIP_TAGS)
        assert all(sum(m["tag"] == t for m in rows) == 40 for t in CLIP_TAGS)
    train = {m["prompt"] for m in load_prompts("builtin:toy_clips_train").metadata}
    held = {m["prompt"] for m in load_prompts("builtin:toy_clips_eval").metadata}
    assert not train & held


def test_clip_rewards_score_videos_only(eval_rows):
    from rewards.registry import build_reward

    rows = eval_rows[:8]
    clips = torch.from_numpy(_render(rows)).permute(0, 1, 4, 2, 3).float() / 255  # [B, F, 3, H, W]
    acc = build_reward("toyclips_accuracy")
    assert acc(clips, [m["prompt"] for m in rows], rows).tolist() == [1.0] * 8
    still = clips[:, :1].expand_as(clips)
    assert acc(still, [m["prompt"] for m in rows], rows).tolist() == [0.0] * 8
    assert "image" not in acc.accepts and "image" not in build_reward("toyclips").accepts
    with pytest.raises(ValueError, match="clip-world record"):
        acc(clips[:1], ["x"], [{"include": []}])
