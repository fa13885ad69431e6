"""Image grids with captions, for evaluation snapshots a person would rather look at than read, and clips as video
files (MP4 to watch, lossless FFV1 to keep exact pixels) through PyAV."""

from __future__ import annotations

import os
import textwrap
from fractions import Fraction
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] of any shape -> uint8 on the CPU (round(x * 255), clamped)."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def frame_strips(videos: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """Videos [B, F, 3, H, W] -> strips [B, 3, H, k W] of k = min(frames, F) evenly spaced frames (first and last
    included), for grids of clips."""
    count = videos.shape[1]
    picks = torch.linspace(0, count - 1, min(frames, count)).round().long()  # [k]
    return torch.cat(list(videos[:, picks].unbind(dim=1)), dim=-1)  # [B, 3, H, k W]


def _grid_canvas(images: torch.Tensor, captions: list[str], cols: int, cell: int) -> Image.Image:
    """images [B, 3, H, W] in [0, 1] -> one RGB canvas, `cols` to a row, each `cell` px high with its caption below."""
    B = images.shape[0]
    rows = (B + cols - 1) // cols
    cell_w = max(1, round(cell * images.shape[-1] / images.shape[-2]))
    text_h = 44
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (cols * cell_w, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images if images.dtype == torch.uint8 else to_uint8(images)).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    for i in range(B):
        r, c = divmod(i, cols)
        img = Image.fromarray(pixels[i]).resize((cell_w, cell), Image.NEAREST)
        canvas.paste(img, (c * cell_w, r * (cell + text_h)))
        lines = []
        for part in captions[i].split("\n"):
            lines += textwrap.wrap(part, width=cell_w // 6)[:2]
        draw.multiline_text((c * cell_w + 2, r * (cell + text_h) + cell + 1), "\n".join(lines[:3]), fill="black", font=font, spacing=1)
    return canvas


def save_grid(images: torch.Tensor, captions: list[str], path: str | Path, cols: int | None = None, cell: int = 160) -> Path:
    """images [B, 3, H, W] in [0, 1] or uint8 (videos [B, F, 3, H, W]: a strip of 4 frames each) -> a PNG grid, each
    image scaled to `cell` px high (its aspect kept) with its caption below."""
    if images.ndim == 5:
        images = frame_strips(images)
    canvas = _grid_canvas(images, captions, cols or min(images.shape[0], 8), cell)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_clip_grid(videos: torch.Tensor, captions: list[str], path: str | Path, cols: int | None = None,
                   cell: int = 160, fps: float = 8.0) -> Path:
    """videos [B, F, 3, H, W] in [0, 1] or uint8 -> an animated GIF (looping, `fps` frames a second) whose frame f is the
    captioned grid of every clip's frame f: the clips play side by side."""
    cols = cols or min(videos.shape[0], 4)
    frames = [_grid_canvas(videos[:, f], captions, cols, cell) for f in range(videos.shape[1])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


# ---- clips as video files -------------------------------------------------------------------------
DEFAULT_FPS = 16.0
"""Frame rate of written clips: Wan2.1 makes 16-frame-a-second video (81 frames = 5 s), so motion plays at its speed."""
MP4_CRF = 18
"""x264's constant rate factor for MP4s: 18 is the customary "visually lossless" setting (its default is 23)."""
_CONTAINERS = {".mp4": "mp4", ".mkv": "matroska"}


def write_video(video: torch.Tensor, path: str | Path, fps: float, codec: str, pix_fmt: str,
                options: dict[str, str] | None = None) -> Path:
    """One clip [F, 3, H, W] (floats in [0, 1] or uint8) -> a video file (.mp4 or .mkv) of F frames at `fps`, written
    to a temporary file and renamed into place, so a killed run never leaves a truncated clip."""
    import av

    path = Path(path)
    if path.suffix not in _CONTAINERS:
        raise ValueError(f"video files are {' or '.join(_CONTAINERS)}, got {path.name}")
    frames = (video if video.dtype == torch.uint8 else to_uint8(video)).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [F, H, W, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), mode="w", format=_CONTAINERS[path.suffix]) as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        for index, pixels in enumerate(frames):
            # converted here, not inside stream.encode, where x264's output varied between runs far more often (PyAV 18)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format=pix_fmt)
            frame.pts, frame.time_base = index, 1 / rate  # frame `index` at index / fps seconds
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    os.replace(tmp, path)
    return path


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """One clip [F, 3, H, W] -> an H.264 MP4 that browsers and players open: 4:2:0 chroma (so H and W must be even;
    Wan's are multiples of 16) at x264 CRF 18. Lossy: colours are subsampled 2x2, so sharp colour edges blur."""
    if video.shape[-1] % 2 or video.shape[-2] % 2:
        raise ValueError(f"H.264 4:2:0 needs an even height and width, got {video.shape[-2]}x{video.shape[-1]}")
    return write_video(video, path, fps, "libx264", "yuv420p", {"crf": str(MP4_CRF)})


def save_lossless_clip(video: torch.Tensor, path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """One clip [F, 3, H, W] -> an FFV1 .mkv whose decoded frames are exactly the clip's 8-bit pixels."""
    return write_video(video, path, fps, "ffv1", "bgr0")  # bgr0 is a byte shuffle of rgb24: no colour conversion


def read_video(path: str | Path) -> torch.Tensor:
    """A video file -> its frames, uint8 [F, 3, H, W]."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]  # [H, W, 3] each
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # [F, 3, H, W]


def eval_series(rows: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """Evaluation curves of metrics.jsonl rows: set label -> [(iteration, headline, stderr)], the headline the
    mean over tags when the rows have it, else the mean ("eval" is the headline set, eval_<name>_* the others)."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        for key in r:
            if not (key.startswith("eval_") and key.endswith("reward_mean")):
                continue
            prefix = key[: -len("reward_mean")]  # eval_ or eval_<name>_
            label = "eval" if prefix == "eval_" else prefix[len("eval_"):-1]
            value = r.get(prefix + "mean_over_tags", r[key])
            se = r.get(prefix + "mean_over_tags_stderr", r.get(prefix + "reward_stderr", float("nan")))
            series.setdefault(label, []).append((r["iteration"], value, se))
    return series


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Training curves from metrics.jsonl: train reward (mean +- std), every evaluation set (± stderr, from the
    base model at iteration 0), loss, KL / clip fraction."""
    import json
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "reward_mean" in r]  # row 0 is the before-training evaluation only
    it = [r["iteration"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    mean = [r["reward_mean"] for r in train]
    std = [r["reward_std"] for r in train]
    axes[0].plot(it, mean, label="train reward (mean)")
    axes[0].fill_between(it, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    for label, points in eval_series(rows).items():
        xs, ys, es = zip(*points)
        axes[0].errorbar(xs, ys, yerr=[e if math.isfinite(e) else 0.0 for e in es], marker="o", capsize=3,
                         label=f"{label} (fixed seeds)")
    axes[0].set_title("reward")
    axes[0].legend(fontsize=8)
    axes[1].plot(it, [r["loss"] for r in train])
    axes[1].set_title("loss")
    for key in ("kl", "clip_frac", "zero_std_frac"):
        if train and key in train[0]:
            axes[2].plot(it, [r.get(key, float("nan")) for r in train], label=key)
    axes[2].set_title("diagnostics")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
