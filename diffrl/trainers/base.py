"""What every algorithm sees: one scored rollout batch, and the small interface the loop calls."""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from diffrl.optim import GuardedStep
from diffrl.rollout import Trajectory


@dataclass
class RolloutBatch:
    """This process's samples of one iteration. B = prompts_per_iteration * group_size."""

    prompts: list[str]
    metadata: list[dict]
    group_ids: torch.Tensor  # [B] prompt index within the iteration (global across processes)
    cond: object  # diffrl.pipelines.Condition with B rows
    trajectory: Trajectory  # latents [B, N + 1, *S], log_probs [B, N]
    images: torch.Tensor | None  # [B, 3, H, W] in [0, 1]; None until update() samples (samples_in_update)
    rewards: torch.Tensor | None  # [B]; non-finite entries are kept here and masked by `valid`
    valid: torch.Tensor | None  # [B] bool: reward was finite
    advantages: torch.Tensor | None = None  # [B]
    reward_components: dict[str, torch.Tensor] | None = None  # a reward mixture's parts, name -> [B]
    seconds: dict[str, float] = field(default_factory=dict)
    """Seconds spent in parts of the rollout: "decode" (Policy.decode) and "reward" (scoring, or waiting for it)."""

    def __len__(self) -> int:
        return len(self.prompts)


class Algorithm(abc.ABC):
    """A training method: what a rollout records and the update it makes from a scored batch."""

    name: ClassVar[str]
    record_trajectory: ClassVar[bool] = True
    """True: rollouts keep every x_t and the step log-probs (policy-gradient methods)."""
    default_flow_sampler: ClassVar[str] = "flow_sde"
    """Rollout sampler on flow models when sampling.sampler is None (UNets default to ddim)."""
    default_guidance_scale: ClassVar[float] = 4.5
    """sampling.guidance_scale when the config leaves it None (Flow-GRPO SD3.5: 4.5)."""
    samples_in_update: ClassVar[bool] = False
    """True: update() draws the iteration's samples itself, with gradients, from the initial noise
    batch.trajectory.latents[:, 0] and batch.cond, and leaves the chains' first and last latents in
    batch.trajectory and the decoded samples in batch.images; the loop then scores them for the log
    (reward-backprop methods: the weights may change inside one chain). False: the loop samples
    without gradients and scores before update()."""
    needs_differentiable_reward: ClassVar[bool] = False
    """True: the training reward must let gradients reach the samples (checked by config validation)."""
    reward = None
    """The training reward (a diffrl.rewards.Reward), set by the loop after construction."""
    config_class: ClassVar[type | None] = None
    """The dataclass of this algorithm's config section (RunConfig.<name>), with a check(key) of its own fields."""
    cfg_gradient: str = "both"
    """The classifier-free guidance branches rescore() back-propagates through (Policy.cfg_gradient): "both", or
    "cond" with the unconditional prediction detached. GRPO sets it from grpo.cfg_gradient."""

    @classmethod
    def validate(cls, cfg, ctx) -> None:
        """Cross-section checks of a run with this algorithm, before any model loads: cfg is the RunConfig, ctx the
        diffrl.checks.RunContext (model family, rollout sampler) the run-wide checks resolved. Raises
        diffrl.checks.ConfigError naming the field. Every section's own fields are checked elsewhere."""

    @classmethod
    def uses_reference(cls, cfg) -> bool:
        """Whether update() runs the frozen reference (policy.reference()) under this config: a full fine-tune
        (policy.adapter full) then keeps a whole-weight copy of the base for it."""
        return False

    def __init__(self, cfg, policy, sampler, accelerator):
        self.cfg, self.policy, self.sampler, self.accelerator = cfg, policy, sampler, accelerator
        self.step_guard = GuardedStep.from_config(accelerator, cfg.train)
        """Every optimiser step of update(): clip, and skip (count) a step whose gradient norm is NaN/inf."""

    @abc.abstractmethod
    def update(self, batch: RolloutBatch, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, float]:
        """Gradient steps on one scored batch; returns metrics (must include "loss")."""

    def rescore(self, batch: RolloutBatch, rows: torch.Tensor, steps: torch.Tensor, reference: bool = False):
        """The stored transition x_steps -> x_steps+1 of samples `rows` re-scored under the current (or, with
        `reference`, the adapter-disabled) model: a sampling.StepOutput with its log-prob. rows, steps: [b] long."""
        traj = batch.trajectory
        x_t = traj.latents[rows, steps]  # [b, *S]
        x_prev = traj.latents[rows, steps + 1]  # [b, *S]
        ctx = self.policy.reference() if reference else contextlib.nullcontext()
        with ctx, self.accelerator.autocast(), self.policy.cfg_gradient(self.cfg_gradient):
            out = self.policy.predict(x_t, traj.schedule.timesteps[steps], batch.cond.index(rows),
                                      self.cfg.sampling.guidance_scale)  # [b, *S]
        return self.sampler.step(traj.schedule, steps, x_t, out.to(x_t.dtype), prev_sample=x_prev,
                                 prediction_type=self.policy.prediction_type)

    def rescore_with_reference(self, batch: RolloutBatch, rows: torch.Tensor, steps: torch.Tensor):
        """rescore(rows, steps) and rescore(rows, steps, reference=True) from one denoiser call on the doubled batch
        [rows; rows], the second half with the LoRA off (Policy.lora_off_rows: call it inside
        `self.reference_rows(len(rows))`, kept open through the backward). -> (policy StepOutput, reference
        StepOutput with a detached mean). rows, steps: [b] long.

        Memory and compute: the reference half runs inside the policy's autograd graph (one call cannot be half
        no_grad), so its activations are kept for backward and the backward runs over 2b rows (the reference rows'
        gradients are zero): about twice the step's activation memory and backward work, against one denoiser call
        instead of two (fewer kernel launches, larger matrix multiplies: a gain where b is small)."""
        traj = batch.trajectory
        both, both_steps = torch.cat([rows, rows]), torch.cat([steps, steps])  # [2b]
        x_t = traj.latents[both, both_steps]  # [2b, *S]
        x_prev = traj.latents[both, both_steps + 1]  # [2b, *S]
        with self.accelerator.autocast(), self.policy.cfg_gradient(self.cfg_gradient):
            out = self.policy.predict(x_t, traj.schedule.timesteps[both_steps], batch.cond.index(both),
                                      self.cfg.sampling.guidance_scale).to(x_t.dtype)  # [2b, *S]
        b = len(rows)
        step = self.sampler.step(traj.schedule, steps, x_t[:b], out[:b], prev_sample=x_prev[:b],
                                 prediction_type=self.policy.prediction_type)
        ref = self.sampler.step(traj.schedule, steps, x_t[b:], out[b:].detach(), prev_sample=x_prev[b:],
                                prediction_type=self.policy.prediction_type)
        return step, ref

    def reference_rows(self, rows: int) -> contextlib.AbstractContextManager:
        """The LoRA off on the second half of a [2 rows] batch (Policy.lora_off_rows): the batched reference pass."""
        off = torch.arange(2 * rows, device=self.policy.device) >= rows  # [2 rows]: False policy, True reference
        return self.policy.lora_off_rows(off)

    def rollout_context(self) -> contextlib.AbstractContextManager:
        """Entered around the rollout's sampling: e.g. run a sampling snapshot instead of the trained weights."""
        return contextlib.nullcontext()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Extra tensors to checkpoint (snapshots, EMAs)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
