"""EasyTune (MotionRFT): step-wise reward optimisation inside the sampling loop.

Per chain, at each denoising step in the training window (the last `window_fraction` of the N steps;
EasyTune: the last 10 of 50) the input x_t is detached, the denoiser runs once with gradient, the
CFG-guided output gives the one-step x0 prediction, which is decoded and scored by a differentiable
reward; `loss = -lambda mean(R)` and the optimiser steps at once. The sampler step x_t -> x_{t-1} uses
that same (pre-step) output, detached, and sampling continues with the updated weights. No gradient
crosses steps, so memory does not grow with N. Variant (`score_on: x_prev`): score the decoded
x_{t-1} instead, for a noise-aware reward. Curriculum (`curriculum_fraction` > 0): over that first
fraction of training the window slides from the first (high-noise) steps to the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.checks import check_fields, fraction, positive
from diffrl.runtime import DeviceMetrics
from diffrl.trainers.reward_backprop import Chain, RewardBackprop, optimizer_step, reward_loss, reward_of

SCORE_ON = ("x0", "x_prev")


@dataclass
class EasyTuneConfig:
    window_fraction: float = 0.2
    """Trained steps per chain: the last max(1, round(fraction N)) of the N sampling steps (EasyTune: the last 10 of 50)."""
    score_on: str = "x0"
    """What a trained step scores: "x0", its decoded one-step x0 prediction (EasyTune), or "x_prev", the decoded x_{t-1} (EasyTune's noise-aware-reward variant)."""
    curriculum_fraction: float = 0.0
    """Fraction of training over which the window slides from the first (high-noise) steps to the last; 0: off (EasyTune's curriculum: 0.03)."""
    reward_scale: float = 1.0
    """lambda in loss = -lambda mean(R) (the paper gives none: 1 keeps the reward's scale; the learning rate sets the step)."""

    def check(self, key: str = "easytune") -> None:
        fraction(self.window_fraction, f"{key}.window_fraction")
        fraction(self.curriculum_fraction, f"{key}.curriculum_fraction", allow_zero=True)
        check_fields(self, key, {"score_on": SCORE_ON, "reward_scale": positive})


def window_size(num_steps: int, fraction: float) -> int:
    """Trained steps per chain: max(1, round(fraction N)) (0.2 of 50 is EasyTune's 10)."""
    return max(1, min(num_steps, round(fraction * num_steps)))


def window_start(num_steps: int, size: int, progress: float, curriculum_fraction: float) -> int:
    """First trained step: N - W (the lowest-noise steps), or, while training progress (0..1) is below
    curriculum_fraction, floor(progress / curriculum_fraction (N - W)): from 0 (the highest-noise steps) towards N - W."""
    if curriculum_fraction <= 0 or progress >= curriculum_fraction:
        return num_steps - size
    return int(progress / curriculum_fraction * (num_steps - size))


class EasyTune(RewardBackprop):
    name = "easytune"
    config_class = EasyTuneConfig

    def __init__(self, cfg, policy, sampler, accelerator):
        super().__init__(cfg, policy, sampler, accelerator)
        self.iterations = 0  # updates done: the curriculum's clock, checkpointed

    def window(self, num_steps: int) -> tuple[int, int]:
        """[start, end) of this iteration's trained steps."""
        e = self.cfg.easytune
        size = window_size(num_steps, e.window_fraction)
        start = window_start(num_steps, size, self.iterations / self.cfg.max_iterations, e.curriculum_fraction)
        return start, start + size

    def train_chain(self, chain: Chain, noise, prompts, metadata, optimizer):
        e = self.cfg.easytune
        start, end = self.window(len(chain.schedule))
        x, history = noise, None  # [b, *S]
        metrics = DeviceMetrics()  # the chain's trained steps, on the device until the update's end
        for i in range(len(chain.schedule)):
            if not start <= i < end:
                with torch.no_grad():
                    out = chain.predict(i, x, grad=False)
                    x_next = chain.step(i, x, out, history).prev_sample
            else:
                x = x.detach()  # the step's loss reaches only this step's denoiser call
                out = chain.predict(i, x)  # [b, *S], with gradient
                step = chain.step(i, x, out, history)
                target = chain.x0(i, x, out) if e.score_on == "x0" else step.prev_sample  # [b, *S]
                r, _ = reward_of(self.policy, self.reward, target, prompts, metadata)  # [b]
                loss = reward_loss(r, e.reward_scale)
                grad_norm = optimizer_step(loss, optimizer, self.policy, self.accelerator, self.step_guard)
                metrics.add("loss", loss)
                metrics.add("reward_grad_mean", r.detach().nanmean())
                metrics.add("grad_norm", grad_norm)
                out, x_next = out.detach(), step.prev_sample.detach()
            history = (x, out)
            x = x_next
        with torch.no_grad():
            samples = self.policy.decode(x)
        return x, samples, metrics.mean_tensors()

    def update(self, batch, optimizer, generator):
        start, end = self.window(len(batch.trajectory.schedule))
        metrics = super().update(batch, optimizer, generator)  # each chain trains steps start .. end - 1
        chains = -(-len(batch) // self.cfg.train.train_batch_size)
        metrics.update(window_start=float(start), optimizer_steps=float((end - start) * chains))
        self.iterations += 1
        return metrics

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"easytune.iterations": torch.tensor(self.iterations)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.iterations = int(tensors["easytune.iterations"])
