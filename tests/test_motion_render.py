"""Stick-figure renders of joint motions: the left / right colours land where the raised arm is, clips have a frame
per pose and change where the body moves, the written grid / GIF / MP4 hold exactly those pictures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl.motion import skeleton
from diffrl.motion.render import (LEFT_COLOUR, RIGHT_COLOUR, render_clip, render_strip, save_motion_gif,
                                  save_motion_grid, save_motion_mp4)
from diffrl.visual import read_video


def pose(raised: str | None = None) -> torch.Tensor:
    """The rest pose [22, 3] by forward kinematics written here, with the `raised` ("l" / "r") arm pointing up."""
    offsets = skeleton.rest_offsets()  # [22, 3]
    if raised:
        for joint in ("elbow", "wrist"):
            offsets[skeleton.J[f"{raised}_{joint}"]] = torch.tensor([0.0, 0.26, 0.0], dtype=torch.float64)
    joints = [offsets[0]]
    for j in range(1, skeleton.NUM_JOINTS):
        joints.append(joints[skeleton.PARENTS[j]] + offsets[j])
    return torch.stack(joints)  # [22, 3]


def walk(frames: int, speed: float = 1.2, raised: str | None = None) -> torch.Tensor:
    """The pose carried forward (+z) at `speed` m/s, 20 frames a second: joints [T, 22, 3]."""
    t = torch.arange(frames, dtype=torch.float64) / skeleton.FPS  # [T]
    joints = pose(raised)[None].repeat(frames, 1, 1)  # [T, 22, 3]
    joints[..., 2] += speed * t[:, None]
    return joints


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    """[H, W] pixels within a small distance of the hex colour (the cores of the anti-aliased bones)."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return np.abs(image.astype(int) - rgb).sum(-1) < 60


def top_row(mask: np.ndarray) -> int:
    return int(np.argmax(mask.any(axis=1)))


def test_the_raised_arm_is_drawn_highest_in_its_own_colour():
    """Left arm up: the highest blue (left) pixel is well above the highest red (right) one; right arm up: the
    reverse. The left / right key sits at the bottom, so it cannot decide the top rows."""
    left_up = render_strip(walk(3, raised="l"), n_frames=2, caption="left arm up")
    right_up = render_strip(walk(3, raised="r"), n_frames=2, caption="right arm up")
    assert left_up.shape == right_up.shape and left_up.dtype == np.uint8
    assert left_up.shape[1] == 2 * 120  # two panels of the default width
    arm = 0.3 * 200 / 2.9  # 0.3 m (about a forearm's rise) in pixels: a 200-px panel shows 2.9 m
    assert top_row(colour_mask(left_up, LEFT_COLOUR)) < top_row(colour_mask(left_up, RIGHT_COLOUR)) - arm
    assert top_row(colour_mask(right_up, RIGHT_COLOUR)) < top_row(colour_mask(right_up, LEFT_COLOUR)) - arm
    assert top_row(colour_mask(left_up, LEFT_COLOUR)) < top_row(colour_mask(right_up, LEFT_COLOUR)) - arm


def test_clip_has_a_frame_per_pose_and_changes_only_where_something_moves():
    """A body standing still: consecutive frames differ only in the time label (top-left corner); walking: they
    differ in the picture's body, floor and path region as well."""
    still = render_clip(pose()[None].repeat(5, 1, 1), size=(128, 160))
    moving = render_clip(walk(5, speed=2.0), size=(128, 160))
    assert still.shape == moving.shape == (5, 160, 128, 3) and still.dtype == np.uint8
    changed = (still[1:] != still[:-1]).any(axis=(0, -1))  # [H, W]
    rows, cols = np.nonzero(changed)
    assert rows.size and rows.max() < 20 and cols.max() < 50  # the "0.05 s" label only
    assert (moving[1:] != moving[:-1]).any(axis=(0, -1))[20:].any()


def test_grid_gif_and_mp4_hold_the_rendered_pictures(tmp_path):
    """grid.png's first cell is the strip pixel for pixel (no resampling); the GIF has one frame per frame of the
    longest motion at 20 frames a second; the MP4 has the clip's frame count and size."""
    long, short = walk(6), walk(4, raised="r")
    grid = np.asarray(Image.open(save_motion_grid([long, short], ["walks", "walks, right arm up"],
                                                  tmp_path / "grid.png", n_frames=3)).convert("RGB"))
    strip = render_strip(long, n_frames=3)
    assert grid.shape[1] == 2 * strip.shape[1]  # two strips a row
    np.testing.assert_array_equal(grid[: strip.shape[0], : strip.shape[1]], strip)

    with Image.open(save_motion_gif([long, short], ["walks", "walks, right arm up"], tmp_path / "grid.gif", size=96)) as gif:
        assert gif.n_frames == 6
        assert gif.size == (2 * 96, 96 + 44)  # two clips side by side, captions below
        assert gif.info["duration"] == 1000 / skeleton.FPS

    video = read_video(save_motion_mp4(short, tmp_path / "one.mp4", caption="walks", size=(96, 128)))
    assert video.shape == (4, 3, 128, 96)


def test_bad_shapes_are_refused_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"\[T, 22, 3\].*got shape \(5, 263\)"):
        render_strip(torch.zeros(5, 263))
    with pytest.raises(ValueError, match="no frames"):
        render_clip(np.zeros((0, 22, 3)))


def test_diffrl_sample_on_a_motion_model_writes_reloadable_features_and_stick_figures(tmp_path):
    """`diffrl sample --model tiny-motion --num-frames 20`: the .safetensors holds the features a direct rollout of
    the same seed makes and joints whose pelvis height is feature channel 3; the MP4 and grid.gif have 20 frames."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from diffrl import cli
    from diffrl.benchmarks.evaluate import deterministic_sampler
    from diffrl.pipelines.registry import load_policy
    from diffrl.rollout import sample
    from diffrl.runtime import derive_generator

    out = tmp_path / "s"
    code = cli.main(["sample", "--model", "tiny-motion", "--num-frames", "20", "--steps", "2", "--prompt", "a person walks",
                     "--prompt", "a person jumps", "--device", "cpu", "--output-dir", str(out)])
    assert code == 0
    meta = json.loads((out / "samples.json").read_text())
    assert meta["num_frames"] == 20 and meta["fps"] == skeleton.FPS
    saved = load_file(out / meta["samples"][1]["features"])
    assert saved["features"].shape == (20, 263) and saved["joints"].shape == (20, 22, 3)
    torch.testing.assert_close(saved["joints"][:, 0, 1], saved["features"][:, 3], rtol=0, atol=0)
    with safe_open(out / meta["samples"][1]["features"], "pt") as fh:
        assert fh.metadata() == {"caption": "a person jumps", "fps": "20"}

    policy = load_policy("tiny-motion", num_frames=20)  # the second prompt's motion, seed 1, rebuilt here
    noise = policy.initial_noise(1, generator=derive_generator(meta["samples"][1]["seed"]))
    with torch.no_grad():
        traj = sample(policy, policy.encode_prompt(["a person jumps"]), deterministic_sampler(policy), policy.schedule(2),
                      4.5, latents=noise, record=False)
        expected = policy.decode(traj.final)[0].float()  # [20, 263]
    torch.testing.assert_close(saved["features"], expected, rtol=0, atol=0)  # float32 stored exactly

    assert read_video(out / meta["samples"][1]["file"]).shape[0] == 20
    with Image.open(out / "grid.gif") as gif:
        assert gif.n_frames == 20
    assert (out / "grid.png").is_file()


def test_diffrl_eval_on_a_motion_model_stores_exact_features_and_resumes_to_the_same_scores(tmp_path):
    """evaluate() on tiny-motion: per motion an MP4 and a .safetensors; a second run loads them (none generated)
    and scores exactly what the first run scored; grid.gif plays the motions' 20 frames."""
    from diffrl.benchmarks.evaluate import evaluate
    from diffrl.data import PromptSet
    from diffrl.pipelines.registry import load_policy
    from diffrl.rewards import build_reward

    policy = load_policy("tiny-motion", num_frames=20)
    prompts = PromptSet(["a person walks", "a person jumps"], [{}, {}])
    common = dict(images_per_prompt=2, steps=2, guidance_scale=4.5, seed=0, batch_size=4, output_dir=tmp_path,
                  progress=False, fps=skeleton.FPS)
    first = evaluate(policy, prompts, [build_reward("tmr", model="tiny")], **common)
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["features"] for r in rows][:2] == ["images/0000_00.safetensors", "images/0000_01.safetensors"]
    assert read_video(tmp_path / rows[3]["file"]).shape[0] == 20
    with Image.open(tmp_path / "grid.gif") as gif:
        assert gif.n_frames == 20
    stamps = {r["features"]: (tmp_path / r["features"]).stat().st_mtime_ns for r in rows}
    again = evaluate(policy, prompts, [build_reward("tmr", model="tiny")], **common)
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in stamps} == stamps  # loaded, not rewritten
    assert again["rewards"] == first["rewards"]
    assert [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()] == rows


def test_training_panel_of_motions_is_a_strip_grid_and_a_gif_sent_to_the_trackers(tmp_path):
    """Trainer._save_panel on motion features [B, T, 263]: the first 2 motions of each of 4 prompts become
    images/<name>.png (strips, 2 a row) and images/<name>.gif (T frames); the PNG goes to log_image."""
    from types import SimpleNamespace

    from diffrl.motion.representation import joints_to_features
    from diffrl.trainers.loop import Trainer

    features = torch.stack([joints_to_features(walk(9, speed=0.5 + 0.1 * b, raised="lr"[b % 2])) for b in range(8)])
    logged = []
    trainer = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(eval_images_per_prompt=2)), out=tmp_path,
                              policy=SimpleNamespace(sample_kind="motion"), log_image=lambda k, p: logged.append((k, p)))
    rows = [{"prompt": f"prompt {b // 2}", "image_index": b % 2, "score": 0.1 * b} for b in range(8)]
    Trainer._save_panel(trainer, features.float(), rows, "iter_000000", "eval/motions")
    panel = np.asarray(Image.open(tmp_path / "images" / "iter_000000.png").convert("RGB"))
    strip = render_strip(walk(8))  # the default strip: one cell of the panel
    assert panel.shape[1] == 2 * strip.shape[1] and panel.shape[0] == 4 * (strip.shape[0] + 44)
    with Image.open(tmp_path / "images" / "iter_000000.gif") as gif:
        assert gif.n_frames == features.shape[1]
    assert logged == [("eval/motions", tmp_path / "images" / "iter_000000.png")]
