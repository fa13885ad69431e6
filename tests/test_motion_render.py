"""Stick-figure renders of joint motions: the left / right colours land where the raised arm is, clips have a frame
per pose and change where the body moves, the written grid / GIF / MP4 hold exactly those pictures."""

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
