"""Stick-figure pictures of joint motions [T, 22, 3], for people to look at: a strip of key frames (panels, report
grids) and one image per frame (MP4s, GIFs), drawn with matplotlib's Agg canvas (no display, no global backend).

One fixed 3/4 camera (orthographic, from the body's front-left at frame 0, slightly above) follows the pelvis over
the floor: the floor grid stays fixed in the world, so it slides under a walking body. Left limbs are blue, right
limbs red, the spine and head dark grey; the pelvis' ground path is green (solid where the body has been, faint
ahead). Written files reuse diffrl.visual's grid, GIF and MP4 writers.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch

from diffrl.motion.skeleton import FPS, JOINT_NAMES, KINEMATIC_CHAINS, NUM_JOINTS

LEFT_COLOUR = "#1f5fd6"
"""Left arm and leg (blue)."""
RIGHT_COLOUR = "#d62020"
"""Right arm and leg (red)."""
SPINE_COLOUR = "#333333"
PATH_COLOUR = "#2ca02c"
FLOOR_COLOUR = "#d0d0d0"
AZIMUTH_DEG = 35.0
"""The camera's heading from +z (the body's front at frame 0) towards +x (its left)."""
ELEVATION_DEG = 15.0
"""How far above the horizon the camera looks down."""
FLOOR_SPACING = 0.5
"""Metres between floor grid lines."""
FLOOR_RADIUS = 1.5
"""Half the side of the floor patch drawn around the pelvis, metres."""
VIEW_BOTTOM, VIEW_TOP = -0.55, 2.35
"""Metres below / above the pelvis' ground point shown (a standing body is 1.7 m, raised hands 2.2 m)."""


def _side(chain: tuple[int, ...]) -> str:
    names = [JOINT_NAMES[j] for j in chain]
    return "left" if any(n.startswith("l_") for n in names) else "right" if any(n.startswith("r_") for n in names) else "spine"


_CHAINS_BY_SIDE = {side: [c for c in KINEMATIC_CHAINS if _side(c) == side] for side in ("left", "right", "spine")}
_COLOURS = {"left": LEFT_COLOUR, "right": RIGHT_COLOUR, "spine": SPINE_COLOUR}
_HEAD = JOINT_NAMES.index("head")


def _as_joints(joints) -> np.ndarray:
    """A torch tensor or array [T, 22, 3] -> float64 numpy, non-finite values as NaN (drawn as gaps)."""
    if isinstance(joints, torch.Tensor):
        joints = joints.detach().to("cpu", torch.float64).numpy()
    joints = np.array(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"joints must be [T, {NUM_JOINTS}, 3] (metres, y up), got shape {tuple(joints.shape)}; "
                         "features [T, 263] become joints through diffrl.motion.representation.recover_from_ric")
    if joints.shape[0] == 0:
        raise ValueError("joints have no frames (T = 0)")
    joints[~np.isfinite(joints)] = np.nan
    return joints


def _camera() -> np.ndarray:
    """Rows: the image's right, the image's up, and the direction towards the viewer, in world axes [3, 3]."""
    az, el = math.radians(AZIMUTH_DEG), math.radians(ELEVATION_DEG)
    toward = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    right = np.cross([0.0, 1.0, 0.0], toward)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(toward, right), toward])


_CAMERA = _camera()


def _project(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """World points [..., 3] -> (image x, image y, depth towards the viewer) [..., 3], relative to `centre` [3]."""
    return (points - centre) @ _CAMERA.T


def _polyline(points: np.ndarray, chains: list[tuple[int, ...]]) -> np.ndarray:
    """Joint points [22, k] -> the chains as one polyline [n, k] with NaN rows between chains."""
    gap = np.full((1, points.shape[1]), np.nan)
    return np.concatenate([part for chain in chains for part in (points[list(chain)], gap)])


def _floor_lines(centre: np.ndarray, radius: float) -> np.ndarray:
    """World-fixed floor grid lines within `radius` of `centre` [3] as one polyline [n, 3] (NaN rows between lines);
    always the same number of points, so an artist can be updated in place."""
    count = int(2 * radius / FLOOR_SPACING) + 1  # the most grid positions a window of 2 radius can hold
    segments = []
    for axis in (0, 2):
        other = 2 - axis
        start = math.ceil((centre[axis] - radius) / FLOOR_SPACING) * FLOOR_SPACING
        for k in range(count):
            a, b = np.zeros(3), np.zeros(3)
            position = start + k * FLOOR_SPACING
            a[axis] = b[axis] = position if position <= centre[axis] + radius else np.nan  # past the edge: hidden
            a[other], b[other] = centre[other] - radius, centre[other] + radius
            segments += [a, b, np.full(3, np.nan)]
    return np.stack(segments)


class _Stage:
    """One view of a motion on matplotlib axes: the floor, the pelvis path, the three limb groups and a time label,
    redrawn for frame t by `show` (artists updated in place, so a clip reuses one figure)."""

    def __init__(self, ax, joints: np.ndarray, width_px: float, height_px: float):
        self.ax, self.joints = ax, joints  # [T, 22, 3]
        ground = joints[:, 0].copy()  # [T, 3]
        ground[:, 1] = 0.0
        self.ground = ground  # the pelvis' path on the floor
        self.centres = np.nan_to_num(ground, nan=0.0, posinf=0.0, neginf=0.0)  # [T, 3]
        half_width = (VIEW_TOP - VIEW_BOTTOM) * width_px / height_px / 2  # equal scale on both image axes
        ax.set_xlim(-half_width, half_width)
        ax.set_ylim(VIEW_BOTTOM, VIEW_TOP)
        ax.set_axis_off()
        (self.floor,) = ax.plot([], [], color=FLOOR_COLOUR, lw=0.8, zorder=1)
        (self.path_ahead,) = ax.plot([], [], color=PATH_COLOUR, lw=1.0, alpha=0.35, ls="--", zorder=2)
        (self.path_done,) = ax.plot([], [], color=PATH_COLOUR, lw=1.5, zorder=2)
        self.bones = {side: ax.plot([], [], color=_COLOURS[side], lw=2.6, solid_capstyle="round", zorder=3)[0]
                      for side in _CHAINS_BY_SIDE}
        (self.head,) = ax.plot([], [], "o", color=SPINE_COLOUR, ms=6, zorder=5)
        self.label = ax.text(0.03, 0.97, "", transform=ax.transAxes, va="top", ha="left", fontsize=7, color="#555555")

    def show(self, t: int) -> None:
        centre = self.centres[t]
        floor = _project(_floor_lines(centre, FLOOR_RADIUS), centre)  # [n, 3]
        self.floor.set_data(floor[:, 0], floor[:, 1])
        path = _project(self.ground, centre)  # [T, 3]
        self.path_done.set_data(path[: t + 1, 0], path[: t + 1, 1])
        self.path_ahead.set_data(path[t:, 0], path[t:, 1])
        body = _project(self.joints[t], centre)  # [22, 3]
        for side, chains in _CHAINS_BY_SIDE.items():
            line = _polyline(body, chains)  # [n, 3]
            self.bones[side].set_data(line[:, 0], line[:, 1])
            if side != "spine":  # the side nearer the camera is drawn over the spine, the far side under it
                depth = np.nanmean(line[:, 2]) if np.isfinite(line[:, 2]).any() else 0.0
                self.bones[side].set_zorder(4 if depth > np.nan_to_num(body[0, 2]) else 2.5)
        self.head.set_data([body[_HEAD, 0]], [body[_HEAD, 1]])
        self.label.set_text(f"{t / FPS:.2f} s")


def _figure(width_px: int, height_px: int):
    """A white matplotlib figure of exactly width_px x height_px pixels on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor="white")
    return fig, FigureCanvasAgg(fig)


def _pixels(canvas) -> np.ndarray:
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # [H, W, 3] uint8


def _caption(fig, caption: str | None, width_px: int) -> None:
    if caption:
        text = "\n".join(textwrap.wrap(caption, width=max(10, width_px // 7))[:2])
        fig.text(0.5, 1 - 3 / fig.bbox.height, text, ha="center", va="top", fontsize=8)


def _legend(fig) -> None:
    """'left' in the left colour and 'right' in the right colour, bottom left, below the floor."""
    box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
    fig.text(0.01, 0.01, "left", color=LEFT_COLOUR, fontsize=7, ha="left", va="bottom", weight="bold", bbox=box)
    fig.text(0.01 + 24 / fig.bbox.width, 0.01, "right", color=RIGHT_COLOUR, fontsize=7, ha="left", va="bottom",
             weight="bold", bbox=box, zorder=6)


CAPTION_PX = 30
"""Height of the caption band above the pictures, pixels."""


def render_strip(joints, n_frames: int = 6, caption: str | None = None, panel_size: tuple[int, int] = (120, 200)) -> np.ndarray:
    """joints [T, 22, 3] (metres, y up) -> one RGB strip [H, W, 3] uint8 of `n_frames` evenly spaced frames (first
    and last included; a short motion repeats frames), each a panel of `panel_size` (width, height) pixels centred
    on the pelvis, with the caption on top and the left / right colour key at the bottom."""
    joints = _as_joints(joints)
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    panel_w, panel_h = panel_size
    top = CAPTION_PX if caption else 0
    width, height = n_frames * panel_w, panel_h + top
    fig, canvas = _figure(width, height)
    picks = np.linspace(0, len(joints) - 1, n_frames).round().astype(int)  # [n_frames]
    for k, t in enumerate(picks):
        ax = fig.add_axes((k / n_frames, 0, 1 / n_frames, panel_h / height))
        _Stage(ax, joints, panel_w, panel_h).show(int(t))
        if k:  # a thin rule between panels
            fig.add_artist(_vertical_rule(fig, k / n_frames, panel_h / height))
    _caption(fig, caption, width)
    _legend(fig)
    return _pixels(canvas)


def _vertical_rule(fig, x: float, top: float):
    from matplotlib.lines import Line2D

    return Line2D([x, x], [0, top], transform=fig.transFigure, color="#e4e4e4", lw=1)


def render_clip(joints, caption: str | None = None, size: int | tuple[int, int] = 256) -> np.ndarray:
    """joints [T, 22, 3] -> T RGB frames [T, H, W, 3] uint8 (size: the side of a square frame, or (width, height) in
    pixels, caption band included; keep both even for H.264), one figure reused and its artists moved each frame."""
    joints = _as_joints(joints)
    width, height = (size, size) if isinstance(size, int) else size
    top = CAPTION_PX if caption else 0
    fig, canvas = _figure(width, height)
    ax = fig.add_axes((0, 0, 1, (height - top) / height))
    stage = _Stage(ax, joints, width, height - top)
    _caption(fig, caption, width)
    _legend(fig)
    frames = []
    for t in range(len(joints)):
        stage.show(t)
        frames.append(_pixels(canvas))
    return np.stack(frames)  # [T, H, W, 3]


def _to_chw(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> uint8 [..., 3, H, W] (diffrl.visual's layout)."""
    return torch.from_numpy(pixels).movedim(-1, -3)


def save_motion_grid(motions, captions: list[str], path: str | Path, n_frames: int = 6, cols: int | None = None) -> Path:
    """Motions (joints [T, 22, 3] each) -> a PNG of their strips (`n_frames` key frames each, 2 a row), each
    captioned below as diffrl.visual.save_grid captions images."""
    from diffrl.visual import save_grid

    strips = np.stack([render_strip(j, n_frames) for j in motions])  # [B, H, W, 3]
    return save_grid(_to_chw(strips), list(captions), path, cols=cols or min(len(strips), 2), cell=strips.shape[1])


def _playing(motions, size) -> torch.Tensor:
    """Motions -> their clips uint8 [B, T_max, 3, H, W]; a shorter motion holds its last frame."""
    clips = [render_clip(j, size=size) for j in motions]  # [T_b, H, W, 3] each
    length = max(len(c) for c in clips)
    clips = [np.concatenate([c, np.repeat(c[-1:], length - len(c), axis=0)]) for c in clips]
    return _to_chw(np.stack(clips))  # [B, T_max, 3, H, W]


def save_motion_gif(motions, captions: list[str], path: str | Path, size: int | tuple[int, int] = 192,
                    cols: int | None = None, fps: float = FPS) -> Path:
    """Motions (joints [T, 22, 3] each) -> an animated GIF playing them side by side (4 a row) at `fps` (HumanML3D's
    20 by default, so they move at their real speed), captioned as diffrl.visual.save_clip_grid captions clips."""
    from diffrl.visual import save_clip_grid

    videos = _playing(motions, size)
    return save_clip_grid(videos, list(captions), path, cols=cols or min(len(videos), 4), cell=videos.shape[-2], fps=fps)


def save_motion_mp4(joints, path: str | Path, caption: str | None = None, size: int | tuple[int, int] = 256,
                    fps: float = FPS) -> Path:
    """One motion -> an H.264 MP4 of the stick figure at `fps` (diffrl.visual.save_mp4)."""
    from diffrl.visual import save_mp4

    return save_mp4(_to_chw(render_clip(joints, caption, size)), path, fps)
