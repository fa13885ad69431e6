"""VBench dynamic degree: is a clip moving, by optical flow (torchvision's RAFT).

    s_t     = mean of the top 5 % flow magnitudes (pixels) between sampled frames t and t + 1
    thres   = 6.0 * min(H, W) / 256
    dynamic = 1 if at least round(4 * N / 16) of the N - 1 pairs have s_t > thres, else 0   (N sampled frames)
    mean    = mean_t s_t / thres                                      (output="mean": a soft, unbounded degree)

as VBench's dynamic_degree.py: frames sampled at about 8 fps (every round(fps / 8)-th frame, at least every
frame), 8-bit pixels, each pair replicate-padded (centred) to a multiple of 8, 20 RAFT refinements, the statistic
over the padded flow field, Python's round (ties to even). VBench runs the original RAFT repository's
raft-things.pth; torchvision's Raft_Large_Weights.C_T_V1 are those weights ported (the default here).

    reward = build_reward("dynamic_degree")                             # raft_large C_T_V1 from the torch hub cache
    reward = build_reward("dynamic_degree", weights="/path/raft_large_C_T_V1-22a6c225.pth")
    reward = build_reward("dynamic_degree", model="raft_small", weights="C_T_V2")
    reward = build_reward("dynamic_degree", model="raft_small", weights=None)  # random init: plumbing tests only

Weights are never downloaded: a torchvision weights name is looked for as its file in the torch hub cache
(torch.hub.get_dir()/checkpoints, where torchvision's own download puts it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .hub import ModelReward
from .registry import register_reward

MODELS = ("raft_large", "raft_small")
OUTPUTS = ("dynamic", "mean")
TOP_FRACTION = 0.05
FLOW_UPDATES = 20  # VBench: iters=20
SAMPLE_FPS = 8.0  # VBench reads every round(fps / 8)-th frame
MIN_SIDE = 128  # torchvision RAFT's correlation pyramid needs feature maps of 16 = 128 / 8 pixels


def top_flow_magnitude(flow: Tensor, fraction: float = TOP_FRACTION) -> Tensor:
    """Mean of the largest `fraction` of flow magnitudes per field: [N, 2, H, W] -> [N] (VBench keeps
    int(H * W * fraction) values; at least one here, where VBench's mean of nothing would be NaN)."""
    magnitude = flow.float().pow(2).sum(dim=1).sqrt().flatten(1)  # [N, H*W]
    keep = max(1, int(magnitude.shape[1] * fraction))
    return magnitude.topk(keep, dim=1).values.mean(dim=1)  # [N]


def dynamic_threshold(height: int, width: int) -> float:
    """VBench's motion threshold in pixels for frames of this size: 6 at 256 px on the short side."""
    return 6.0 * min(height, width) / 256.0


def required_pairs(num_frames: int) -> int:
    """How many pairs must exceed the threshold: round(4 * N / 16), N the sampled frames (Python's round)."""
    return round(4 * (num_frames / 16.0))


def dynamic_decision(pair_scores: Tensor, num_frames: int, height: int, width: int) -> Tensor:
    """VBench's verdict per clip from its pair statistics [B, N - 1]: 1.0 if moving, else 0.0 -> [B]."""
    moving = (pair_scores > dynamic_threshold(height, width)).sum(dim=1)  # [B]
    return (moving >= required_pairs(num_frames)).float()


def sample_stride(fps: float) -> int:
    """VBench's frame interval: max(1, round(fps / 8))."""
    return max(1, round(fps / SAMPLE_FPS))


def pad_to_multiple_of_8(frames: Tensor) -> Tensor:
    """Replicate padding, split evenly (VBench's InputPadder, 'sintel' mode): [N, 3, H, W] -> [N, 3, H', W']."""
    height, width = frames.shape[-2:]
    pad_h, pad_w = (-height) % 8, (-width) % 8
    return F.pad(frames, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], mode="replicate")


def _weights_enum(model: str):
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights

    return Raft_Large_Weights if model == "raft_large" else Raft_Small_Weights


def hub_checkpoint_path(model: str, weights: str) -> Path:
    """Where torchvision's download of `model` `weights` lands: the torch hub cache's checkpoints folder."""
    enum = _weights_enum(model)
    if weights not in enum.__members__:
        raise ValueError(f"reward 'dynamic_degree': {model} has no weights {weights!r}; torchvision's are "
                         f"{sorted(enum.__members__)}, or pass a local file")
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(enum[weights].url).name


def _is_path(weights: str) -> bool:
    """A file path rather than a torchvision weights name ("C_T_V1" has no suffix and no slash)."""
    return bool(Path(weights).suffix) or "/" in weights or weights.startswith("~")


def resolve_raft_weights(model: str, weights: str) -> Path:
    """The file of `weights`: a local path, or a torchvision weights name found in the torch hub cache.
    FileNotFoundError naming the file, where it was looked for, and the fix."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if _is_path(weights):
        raise FileNotFoundError(f"reward 'dynamic_degree': RAFT weights file {str(path)!r} does not exist "
                                f"(looked for {path.resolve()}). Pass an existing file or a torchvision weights "
                                f"name such as 'C_T_V1'.")
    cached = hub_checkpoint_path(model, weights)
    if cached.is_file():
        return cached
    url = _weights_enum(model)[weights].url
    raise FileNotFoundError(
        f"reward 'dynamic_degree': torchvision {model} weights {weights} ({cached.name}) are not in the torch hub "
        f"cache (looked for {cached}; TORCH_HOME moves it). Fix: on a machine with network run `python -c \"import "
        f"torchvision; torchvision.models.optical_flow.{model}(weights='{weights}')\"` (or download {url}) and copy "
        f"the file to {cached.parent}/, or pass weights=/path/to/{cached.name}.")


@register_reward("dynamic_degree")
class DynamicDegree(ModelReward):
    """VBench dynamic degree by RAFT optical flow (see module docstring): 1.0 for a moving clip, 0.0 for a static one."""

    accepts = ("video",)
    default_model = "raft_large"

    def __init__(self, model: str | None = None, *, weights: str | None = "C_T_V1", output: str = "dynamic",
                 fps: float = 16.0, pair_batch: int = 8, dtype: str = "float32", device: str | None = None):
        """model: "raft_large" (VBench's RAFT) or "raft_small"; weights: a torchvision weights name (found in the
        torch hub cache), a local .pth file, or None for random weights (tests); output: "dynamic" (VBench's 0 / 1)
        or "mean" (mean pair statistic / threshold); fps: the clips' frame rate (Wan: 16), which sets the ~8 fps
        sampling; pair_batch: frame pairs per RAFT call (memory)."""
        super().__init__(model, dtype=dtype, device=device)
        if self.model not in MODELS:
            raise ValueError(f"reward 'dynamic_degree': model must be one of {list(MODELS)}, got {self.model!r}")
        if output not in OUTPUTS:
            raise ValueError(f"reward 'dynamic_degree': output must be one of {list(OUTPUTS)}, got {output!r}")
        if fps <= 0 or pair_batch < 1:
            raise ValueError(f"reward 'dynamic_degree': fps must be > 0 and pair_batch >= 1, got {fps}, {pair_batch}")
        if weights is not None and not _is_path(weights):
            hub_checkpoint_path(self.model, weights)  # an unknown weights name fails here, before any run
        self.weights, self.output, self.fps, self.pair_batch = weights, output, fps, pair_batch

    def _load(self) -> None:
        from torchvision.models import optical_flow

        self.raft = getattr(optical_flow, self.model)(weights=None)
        if self.weights is not None:
            path = resolve_raft_weights(self.model, self.weights)
            self.raft.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.raft.to(self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.raft]

    def sampled_frames(self, videos: Tensor) -> Tensor:
        """Every round(fps / 8)-th frame on VBench's 8-bit scale, in RAFT's [-1, 1]: [B, F, 3, H, W] -> [B, N, 3, H, W]."""
        frames = videos[:, :: sample_stride(self.fps)]
        eight_bit = (frames.float() * 255).round().clamp(0, 255)  # what VBench reads from the video file
        return eight_bit / 127.5 - 1  # RAFT's 2 * (x / 255) - 1

    def pair_scores(self, frames: Tensor) -> Tensor:
        """top_flow_magnitude of each consecutive pair: [B, N, 3, H, W] -> [B, N - 1]."""
        batch, count = frames.shape[:2]
        first = pad_to_multiple_of_8(frames[:, :-1].flatten(0, 1)).to(self.dtype)  # [B*(N-1), 3, H', W']
        second = pad_to_multiple_of_8(frames[:, 1:].flatten(0, 1)).to(self.dtype)
        scores = [top_flow_magnitude(self.raft(a, b, num_flow_updates=FLOW_UPDATES)[-1])  # [chunk]
                  for a, b in zip(first.split(self.pair_batch), second.split(self.pair_batch))]
        return torch.cat(scores).view(batch, count - 1)

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        height, width = samples.shape[-2:]
        if min(height, width) < MIN_SIDE:
            raise ValueError(f"reward 'dynamic_degree': torchvision's RAFT needs frames of at least {MIN_SIDE} px a "
                             f"side, got {height} x {width}")
        self._ready(samples)
        frames = self.sampled_frames(samples)
        if frames.shape[1] < 2:
            raise ValueError(f"reward 'dynamic_degree' needs at least 2 sampled frames (every "
                             f"{sample_stride(self.fps)}th of {samples.shape[1]}), got {frames.shape[1]}")
        pairs = self.pair_scores(frames)  # [B, N-1]
        if self.output == "mean":
            return pairs.mean(dim=1) / dynamic_threshold(height, width)  # [B]
        return dynamic_decision(pairs, frames.shape[1], height, width)  # [B]

