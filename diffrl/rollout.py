"""The sampling loop: policy predictions joined to a pure sampler step, recording the trajectory.

Written out once (no copied diffusers `__call__`): every trainer, the evaluator and the parity
tests walk the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.sampling import Sampler, Schedule


@dataclass
class Trajectory:
    """One batch of sampled chains. B samples, N steps, latents of any shape [B, *S]."""

    latents: torch.Tensor  # [B, N + 1, *S]; latents[:, 0] is the initial noise, latents[:, -1] the sample
    log_probs: torch.Tensor | None  # [B, W]; None for deterministic samplers
    schedule: Schedule
    log_prob_steps: torch.Tensor | None = None
    """[W] long: the step index of each log_probs column (the stochastic steps); None: all N steps."""

    @property
    def steps(self) -> torch.Tensor:
        """[W] long: the step index of each log_probs column."""
        if self.log_prob_steps is not None:
            return self.log_prob_steps
        return torch.arange(self.log_probs.shape[1], device=self.latents.device)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]  # [B, *S]


@torch.no_grad()
def sample(
    policy,
    cond,
    sampler: Sampler,
    schedule: Schedule,
    guidance_scale: float,
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
    record: bool = True,
    progress=None,
) -> Trajectory:
    """Run the N steps of `schedule` from `latents` [B, *S] with the policy's guided prediction.

    `record=False` keeps only the first and last latents (evaluation, forward-process trainers).
    """
    x = latents
    chain = [x]
    log_probs, log_prob_steps = [], []
    history = None  # the previous step's (x_t, model output), for multistep solvers (flow_dpm2)
    for i in range(len(schedule)):
        t = schedule.timesteps[i].expand(x.shape[0])  # [B]
        out = policy.predict(x, t, cond, guidance_scale)  # [B, *S]
        step = sampler.step(schedule, i, x, out, generator=generator, prediction_type=policy.prediction_type,
                            history=history)
        history = (x, out)
        x = step.prev_sample
        if record or i == len(schedule) - 1:
            chain.append(x)
        if step.log_prob is not None:
            log_probs.append(step.log_prob)
            log_prob_steps.append(i)
        if progress is not None:
            progress.update(1)
    return Trajectory(
        latents=torch.stack(chain, dim=1),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
        schedule=schedule,
        log_prob_steps=torch.tensor(log_prob_steps, dtype=torch.long, device=x.device) if log_probs else None,
    )
