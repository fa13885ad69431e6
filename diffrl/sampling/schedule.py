"""The discretised noise schedule a sampler walks, read off a diffusers scheduler by the policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class Schedule:
    """Everything a pure step function needs about the N sampling steps.

    `kind == "flow"`: rectified flow, x_t = (1 - sigma) x0 + sigma eps, step i goes from
    `sigmas[i]` to `sigmas[i + 1]` (sigmas[N] == 0).
    `kind == "ddim"`: DDPM/DDIM, step i goes from alpha_cumprod `alphas_cumprod[i]` to
    `alphas_cumprod[i + 1]` (alphas_cumprod[N] is the scheduler's final alpha).
    """

    kind: Literal["flow", "ddim"]
    timesteps: torch.Tensor  # [N] what the denoiser is fed at step i
    sigmas: torch.Tensor | None = None  # [N + 1] flow only
    alphas_cumprod: torch.Tensor | None = None  # [N + 1] ddim only

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device | str) -> "Schedule":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Schedule(self.kind, move(self.timesteps), move(self.sigmas), move(self.alphas_cumprod))
