"""Image grids with captions, for evaluation snapshots a person would rather look at than read."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def save_grid(images: torch.Tensor, captions: list[str], path: str | Path, cols: int | None = None, cell: int = 160) -> Path:
    """images [B, 3, H, W] in [0, 1] -> a PNG grid, each image upscaled to `cell` px with its caption below."""
    B = images.shape[0]
    cols = cols or min(B, 8)
    rows = (B + cols - 1) // cols
    text_h = 44
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(B):
        r, c = divmod(i, cols)
        img = Image.fromarray(pixels[i]).resize((cell, cell), Image.NEAREST)
        canvas.paste(img, (c * cell, r * (cell + text_h)))
        lines = []
        for part in captions[i].split("\n"):
            lines += textwrap.wrap(part, width=cell // 6)[:2]
        draw.multiline_text((c * cell + 2, r * (cell + text_h) + cell + 1), "\n".join(lines[:3]), fill="black", font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
