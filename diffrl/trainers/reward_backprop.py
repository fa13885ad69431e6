"""Shared by the reward-backprop trainers (easytune.py, draft.py): they sample inside update(), with
gradients, and climb a differentiable reward directly, instead of learning from scored rollouts.

`Chain` is one batch of sampling chains: it takes the guided model output at a step (with or without
gradient; optionally under torch.utils.checkpoint, so that backpropagating through many steps keeps
only each step's input, not its activations), the sampler step, and the one-step x0 prediction.
`reward_of` decodes and scores, `reward_loss` is `-scale mean(R)`, `optimizer_step` backpropagates and
steps. `RewardBackprop` is the Algorithm part both trainers share: train batches of whole chains from
the rollout's initial noise, the final samples handed back to the loop, metrics averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from diffrl.checks import ConfigError
from diffrl.optim import NonFiniteTrainingError
from diffrl.rollout import Trajectory
from diffrl.runtime import DeviceMetrics
from diffrl.sampling import Sampler, Schedule, StepOutput, predict_x0
from diffrl.trainers.base import Algorithm, RolloutBatch


def noise_coefficients(schedule: Schedule, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with x_t = alpha x0 + sigma eps at step i: flow (1 - sigma_i, sigma_i), DDPM (sqrt a_i, sqrt(1 - a_i))."""
    if schedule.kind == "flow":
        sigma = schedule.sigmas[i]
        return 1 - sigma, sigma
    a = schedule.alphas_cumprod[i]
    return a.sqrt(), (1 - a).sqrt()


@dataclass
class Chain:
    """What one batch of sampling chains shares, and its steps."""

    policy: object  # diffrl.pipelines.Policy
    sampler: Sampler
    schedule: Schedule
    cond: object  # diffrl.pipelines.Condition with b rows
    guidance_scale: float
    accelerator: object
    generator: torch.Generator | None = None  # noise of stochastic samplers

    def _predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.policy.predict(x, t, self.cond, self.guidance_scale)

    def predict(self, i: int, x: torch.Tensor, grad: bool = True, checkpointed: bool = False) -> torch.Tensor:
        """The CFG-guided model output at step i, x [b, *S] -> [b, *S]; `checkpointed`: recompute the
        denoiser's activations in backward (the call is deterministic: no sampler noise inside)."""
        t = self.schedule.timesteps[i].expand(x.shape[0])  # [b]
        if not grad:
            with torch.no_grad():
                return self._predict(x, t)
        if checkpointed:
            return checkpoint(self._predict, x, t, use_reentrant=False)
        return self._predict(x, t)

    def step(self, i: int, x: torch.Tensor, out: torch.Tensor, history=None) -> StepOutput:
        """Sampler step i from x [b, *S]; differentiable in x and out (the reparameterised noise is a constant)."""
        return self.sampler.step(self.schedule, i, x, out, generator=self.generator,
                                 prediction_type=self.policy.prediction_type, history=history)

    def x0(self, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """One-step prediction of the clean sample at step i. -> [b, *S]

        x0 is affine in the model output at fixed x_t with coefficients that sum to one across a CFG mix,
        so the x0 of the CFG-combined output is the CFG combination of the x0 predictions."""
        alpha, sigma = noise_coefficients(self.schedule, i)
        return predict_x0(x, out, alpha, sigma, self.policy.prediction_type)


def reward_of(policy, reward, latents: torch.Tensor, prompts: list[str], metadata: list[dict] | None):
    """Decode latents [b, *S] and score them with gradients: (R [b] float32, the decoded samples)."""
    samples = policy.decode(latents)  # [b, 3, H, W] (or the family's sample shape)
    return reward(samples, prompts, metadata), samples


def reward_loss(rewards: torch.Tensor, scale: float) -> torch.Tensor:
    """-scale mean(R) over the finite rewards. rewards: [b] -> []"""
    finite = torch.isfinite(rewards)  # [b]
    if not finite.any():
        raise NonFiniteTrainingError("every differentiable reward of this train batch is NaN/inf: nothing to train on")
    return -scale * rewards[finite].mean()


def optimizer_step(loss: torch.Tensor, optimizer, policy, accelerator, step_guard) -> float:
    """Backward, gradients averaged over processes, then `step_guard` (diffrl.optim.GuardedStep: clip, step unless
    the gradient norm is NaN/inf); returns the gradient norm before clipping.

    Call it inside `accelerator.no_sync(policy.denoiser)` around the chain's forwards too: a chain may call
    the denoiser many times before one backward, which DDP's per-forward gradient hooks do not allow, so
    DDP stays out of it and the gradients are averaged here."""
    params = policy.trainable_parameters()
    accelerator.backward(loss)
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
    return step_guard(optimizer)


class RewardBackprop(Algorithm):
    """The shared part of EasyTune and DRaFT / ReFL / AlignProp: each train batch of `train.train_batch_size`
    samples is one batch of chains from the rollout's initial noise, run by `train_chain`."""

    record_trajectory = False
    samples_in_update = True
    needs_differentiable_reward = True
    default_flow_sampler = "flow_ode"  # deterministic chains (DRaFT: DDIM eta 0); any sampler works

    @classmethod
    def validate(cls, cfg, ctx) -> None:
        """A differentiable training reward (read from the registry without loading it), one sampling per step."""
        from diffrl.rewards.mixture import parse_mixture
        from diffrl.rewards.registry import declares_differentiable, differentiable_rewards

        name, t = cls.name, cfg.train
        parts = {k: (f"rewards.{k}", kw) for k, (_, kw) in parse_mixture(cfg.rewards).items()} if cfg.rewards else \
            {cfg.reward: ("reward", cfg.reward_kwargs)}
        for reward, (key, kwargs) in parts.items():
            if not declares_differentiable(reward, kwargs):
                raise ConfigError(
                    f"'{key}' {reward} is not differentiable; {name} back-propagates the reward into the model. Use one of "
                    f"{', '.join(differentiable_rewards())} (CLIP-family rewards with kwargs differentiable: true)")
        if t.micro_batch_size is not None:
            raise ConfigError(f"'train.micro_batch_size' is not used by {name}: a train batch is one batch of sampling chains; leave it unset")
        if t.num_inner_epochs != 1:
            raise ConfigError(f"'train.num_inner_epochs' must be 1 for {name}: it samples anew for every optimiser step")

    def train_chain(self, chain: Chain, noise: torch.Tensor, prompts: list[str], metadata: list[dict],
                    optimizer) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | float]]:
        """Sample from noise [b, *S] and train; returns (final latents [b, *S], decoded samples, metrics: 0-d
        tensors left on the device, or floats)."""
        raise NotImplementedError

    def update(self, batch: RolloutBatch, optimizer, generator) -> dict[str, float]:
        if self.reward is None or not self.reward.differentiable:
            raise RuntimeError(f"{self.name} needs a differentiable training reward (checked by config validation)")
        noise = batch.trajectory.latents[:, 0]  # [B, *S]
        schedule = batch.trajectory.schedule
        tb = self.cfg.train.train_batch_size
        finals, samples = [], []
        metrics = DeviceMetrics()  # averaged over the train batches; read once, at the end
        with self.accelerator.no_sync(self.policy.denoiser):  # gradients are averaged by optimizer_step
            for start in range(0, len(batch), tb):
                rows = slice(start, start + tb)
                chain = Chain(self.policy, self.sampler, schedule, batch.cond.index(rows),
                              self.cfg.sampling.guidance_scale, self.accelerator, generator)
                final, images, chain_metrics = self.train_chain(chain, noise[rows], batch.prompts[rows], batch.metadata[rows],
                                                          optimizer)
                finals.append(final.detach())
                samples.append(images.detach().float())
                for key, value in chain_metrics.items():
                    metrics.add(key, value)
        batch.trajectory = Trajectory(latents=torch.stack([noise, torch.cat(finals)], dim=1), log_probs=None,
                                      schedule=schedule)  # [B, 2, *S]: noise and sample
        batch.images = torch.cat(samples)
        return metrics.means()
