"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024).

Per iteration: K samples per prompt from stochastic rollouts that store every step and its log-prob
(DDPM, i.e. DDIM eta 1, on UNets; the flow SDE on flow models). The rollout ran with the weights of the
iteration's start, so its log-probs are the snapshot's. The reference (the network with the LoRA adapter
disabled) re-scores every stored transition once, without gradient: delta_old = log pi_old - log pi_ref
[B, T]. Then, for `train.num_inner_epochs` passes over train batches of whole prompt groups (one
gradient step per train batch, so K gradient steps per sampling epoch), every same-prompt pair (a, b)
regresses its implicit reward difference onto the reward difference over beta, with PRDP's per-step
proximal clip (diffrl.core.prdp_loss).

Exact gradients without the whole graph. The loss is a square of a sum over steps, so a per-step
backward alone is not its gradient. Two passes give it exactly:
1. forward every (row, step) of the train batch without gradient -> delta [b, T]; the loss on a leaf
   copy of delta gives c = dL/d delta [b, T] by autograd on the pure loss, so branch selection
   (max(l, l_clipped)) and clipping (clipped terms get c = 0) are the loss function's own;
2. forward each (row, step) again with gradient and back-propagate sum(c * log pi_theta): by the chain
   rule, sum_{i,t} c_{i,t} d delta_{i,t} / d theta is dL/d theta (the reference carries no gradient).
Memory is one step's graph; cost is one extra forward per step. `prdp.timestep_fraction` < 1
back-propagates a random subset of each row's steps in pass 2, each scaled by T / n (an unbiased
estimate of the exact gradient); the loss always sums all steps, as the paper does. With an SDE window
(sampling.sde_window_size) the steps are the stochastic ones: the deterministic steps carry no density.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from diffrl.checks import ConfigError, check_fields, fraction, positive, require_lora, require_stochastic
from diffrl.core import prdp_loss
from diffrl.runtime import DeviceMetrics, to_device
from diffrl.sampling import StepOutput
from diffrl.trainers.base import Algorithm, RolloutBatch
from diffrl.trainers.forward_process import sample_order


@dataclass
class PRDPConfig:
    beta: float = 10.0
    """KL strength: implicit reward differences regress onto reward differences / beta (10 for aesthetic-scale rewards; toy sweep, benchmarks/RESULTS.md "PRDP sweep": 25.2 % vs 24.3 % held-out at beta 1, base 23.0 %)."""
    clip_range: Optional[float] = 1e-4
    """eps: each step's log-ratio is clipped to within eps of the sampling snapshot's, loss max(l, l_clipped) (1e-4; toy sweep: 25.2 % vs 24.3 % at 1e-3, where it never binds); None: no clip (plain RDP)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps back-propagated per gradient step, scaled by 1 / fraction (unbiased); the loss always sums every step (PRDP: all steps, 1.0)."""

    def check(self, key: str = "prdp") -> None:
        check_fields(self, key, {"beta": positive, "clip_range": positive})
        fraction(self.timestep_fraction, f"{key}.timestep_fraction")


class PRDP(Algorithm):
    name = "prdp"
    config_class = PRDPConfig

    @classmethod
    def uses_reference(cls, cfg) -> bool:
        return True  # its implicit reward

    @classmethod
    def validate(cls, cfg, ctx) -> None:
        require_stochastic(cfg, ctx, "prdp")
        require_lora(cfg, "prdp", "its implicit reward is a log-ratio to the reference, the base model with the LoRA adapter disabled")
        t = cfg.train
        if t.group_size < 2:
            raise ConfigError("'train.group_size' must be >= 2 for prdp: it regresses reward differences of same-prompt pairs")
        if t.train_batch_size % t.group_size:
            raise ConfigError(f"'train.train_batch_size' ({t.train_batch_size}) must be a multiple of train.group_size "
                              f"({t.group_size}) for prdp: a gradient step pairs the samples of whole prompt groups")
    record_trajectory = True
    default_flow_sampler = "flow_sde"
    default_guidance_scale = 5.0  # PRDP (as DDPO) samples SD 1.4 with CFG 5

    def step_log_prob(self, batch: RolloutBatch, rows: torch.Tensor, cols: torch.Tensor, reference: bool = False) -> StepOutput:
        """Re-score the stored transitions of `rows` at log-prob columns `cols` under the current (or
        reference) weights. rows, cols: [b] long."""
        steps = batch.trajectory.steps.to(cols.device)[cols]  # [b] schedule step of each column
        return self.rescore(batch, rows, steps, reference)

    @torch.no_grad()
    def log_probs(self, batch: RolloutBatch, rows: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """log pi(x_prev | x_t) of every stored step of `rows` [b], without gradient. -> [b, T]"""
        T = batch.trajectory.log_probs.shape[1]
        out = torch.empty(len(rows), T, dtype=batch.trajectory.log_probs.dtype, device=rows.device)  # [b, T]
        for start in range(0, len(rows), self.chunk):
            sub = rows[start : start + self.chunk]  # [m]
            for t in range(T):
                cols = torch.full_like(sub, t)  # [m]
                out[start : start + len(sub), t] = self.step_log_prob(batch, sub, cols, reference).log_prob
        return out

    @property
    def chunk(self) -> int:
        """Samples per denoiser call in the update (train.micro_batch_size, else the train batch)."""
        return self.cfg.train.micro_batch_size or self.cfg.train.train_batch_size

    def accumulate_gradients(self, batch: RolloutBatch, rows: torch.Tensor, delta_old: torch.Tensor,
                             ref: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The exact gradient of the PRDP loss of train batch `rows` [b], accumulated into .grad (the
        two passes of the module docstring). delta_old, ref: [B, T] for the whole batch. Returns the loss and
        its metrics as 0-d tensors, on the device (no host sync)."""
        c = self.cfg.prdp
        T = delta_old.shape[1]
        # pass 1: the loss at the current weights and its gradient w.r.t. each step's log-ratio
        delta = (self.log_probs(batch, rows) - ref[rows]).requires_grad_()  # [b, T]
        dev = delta.device  # rewards may sit wherever the reward model left them
        loss, m = prdp_loss(delta, delta_old[rows], batch.rewards.to(dev)[rows], batch.group_ids.to(dev)[rows],
                            beta=c.beta, eps=c.clip_range, valid=batch.valid.to(dev)[rows])
        (coef,) = torch.autograd.grad(loss, delta)  # [b, T] dL / d delta
        # pass 2: back-propagate sum(coef * log pi_theta), a step at a time
        n = max(1, int(T * c.timestep_fraction))
        order = to_device(self.draw_steps(len(rows), T, n, generator), rows.device)  # [b, n]
        scale = T / n  # unbiased for the sum over all T steps
        calls = math.ceil(len(rows) / self.chunk) * n
        for start in range(0, len(rows), self.chunk):
            local = torch.arange(start, min(start + self.chunk, len(rows)), device=rows.device)  # [m]
            for j in range(n):
                cols = order[local, j]  # [m]
                logp = self.step_log_prob(batch, rows[local], cols).log_prob  # [m]
                surrogate = (coef[local, cols].to(logp.dtype) * scale * logp).sum()
                calls -= 1
                sync = contextlib.nullcontext() if calls == 0 else self.accelerator.no_sync(self.policy.denoiser)
                with sync:
                    self.accelerator.backward(surrogate)
        return {"loss": loss.detach(), **m}

    def draw_steps(self, b: int, T: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """The log-prob columns each row back-propagates in pass 2: n of T drawn without replacement. -> [b, n]"""
        return torch.stack([torch.randperm(T, generator=generator)[:n] for _ in range(b)])

    def train_batches(self, batch: RolloutBatch, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch's train batches: rows of whole prompt groups, groups in random order, on the batch's device.
        -> [train_batch_size] each"""
        rows = sample_order(batch.group_ids, whole_groups=True, generator=generator)  # [B] on the host
        mb = self.cfg.train.train_batch_size
        return [to_device(rows[start : start + mb], batch.group_ids.device) for start in range(0, len(rows), mb)]

    def update(self, batch: RolloutBatch, optimizer, generator) -> dict[str, float]:
        cfg = self.cfg
        B = len(batch)
        all_rows = torch.arange(B, device=batch.group_ids.device)  # [B]
        ref = self.log_probs(batch, all_rows, reference=True)  # [B, T], once: the reference never moves
        delta_old = batch.trajectory.log_probs - ref  # [B, T] the sampling snapshot's log-ratios
        metrics = DeviceMetrics()  # on the device until the end of the update
        for _ in range(cfg.train.num_inner_epochs):
            for rows in self.train_batches(batch, generator):
                step_metrics = self.accumulate_gradients(batch, rows, delta_old, ref, generator)
                step_metrics["grad_norm"] = self.step_guard(optimizer)
                for key, value in step_metrics.items():
                    # pair_accuracy is NaN when no pair's rewards differ: its mean is over the steps with such pairs;
                    # every other metric shows a NaN/inf as it is (a non-finite loss must not vanish from the log)
                    metrics.add(key, value, only_finite=key == "pair_accuracy")
        return metrics.means()
