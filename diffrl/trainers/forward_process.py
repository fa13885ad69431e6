"""Shared machinery of the forward-process trainers (DiffusionNFT, CRD): they learn from final samples only.

Rollouts keep only the first and last latents (`record_trajectory = False`), so any sampler works (ODE,
higher order) and no log-probabilities are needed. Each update noises the final samples afresh,
x_t = alpha x0 + sigma eps at drawn noise levels, and compares model outputs at x_t from
  * the trained weights: the trainable LoRA adapter "default" (or SaRA's sparse vectors, or every weight);
  * EMA snapshots of them ("old", "sampling"): extra peft LoRA adapters on the same network (SaRA: sparse
    vectors written over the trained entries; a full fine-tune: whole-weight copies), updated after every
    iteration with their own decay schedules and checkpointed with the run;
  * the reference: the same network with every adapter disabled (SaRA: its entries back at their base values;
    no copy of the base model, but for policy.adapter full).
The pieces are composed by nft.py and crd.py: `NoiseLevelSampler` draws noise levels, `LoraSnapshots`
keeps the snapshots, `FinalSampleUpdates` runs the gradient steps over a loss function of a `NoisedBatch`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from diffrl.checks import ConfigError, check_fields, decay_schedule, fraction, positive, require_lora
from diffrl.core import snapshot_decay
from diffrl.runtime import DeviceMetrics, to_device, wide
from diffrl.sampling import Schedule, add_noise, predict_x0, training_target
from diffrl.trainers.base import RolloutBatch

TIMESTEP_SOURCES = ("schedule", "uniform", "logit_normal")


@dataclass
class ForwardProcessConfig:
    """Shared by the forward-process trainers (nft, crd): how final samples are noised for training."""

    timestep_source: str = "schedule"
    """Training noise levels: "schedule" (the rollout schedule's steps, DiffusionNFT), "uniform" or "logit_normal" t in (0, 1)."""
    timestep_fraction: float = 0.99
    """Noise levels trained per sample and inner epoch: max(1, int(fraction * sampling.num_steps)), fresh noise each (DiffusionNFT: 0.99)."""
    logit_normal_mean: float = 0.0
    """Mean of the logit-normal timestep density t = sigmoid(m + s z) (SD3, Esser et al. 2024: 0)."""
    logit_normal_std: float = 1.0
    """Std of the logit-normal timestep density (SD3, Esser et al. 2024: 1)."""
    adv_clip_max: float = 5.0
    """A_max: advantages are clipped to +-A_max and mapped to r = 0.5 + 0.5 A / A_max in [0, 1] (DiffusionNFT, CRD: 5)."""

    def check(self, key: str) -> None:
        check_fields(self, key, {"timestep_source": TIMESTEP_SOURCES, "logit_normal_std": positive,
                                 "adv_clip_max": positive, "beta": positive})
        fraction(self.timestep_fraction, f"{key}.timestep_fraction")
        decay_schedule(self.old_decay, f"{key}.old_decay")


def validate_forward_process(cfg, name: str) -> None:
    """nft / crd: the snapshots are LoRA adapters on the trained network (or SaRA vectors, or whole-weight copies with
    policy.adapter full), the reference is that network with them off."""
    require_lora(cfg, name, "its snapshots of the trained weights are extra LoRA adapters on the same network and its "
                            "reference is that network with the adapters disabled; a full fine-tune (lora_rank 0) would "
                            "need extra copies of the whole model in memory")


# ---- noise levels ------------------------------------------------------------------------------
@dataclass
class NoiseLevels:
    """Forward-process noise levels for B samples x n training slots."""

    timestep: torch.Tensor  # [B, n] what the denoiser is fed
    alpha: torch.Tensor  # [B, n] float64 signal coefficient
    sigma: torch.Tensor  # [B, n] float64 noise coefficient


class NoiseLevelSampler:
    """Draws training noise levels: the rollout schedule's steps (DiffusionNFT), or t ~ uniform / logit-normal.

    Flow models: sigma = t, alpha = 1 - t, timestep = t * num_train_timesteps (as the flow schedulers feed
    the denoiser). UNets: t picks the discrete DDPM timestep k = floor(t T), alpha = sqrt(a_k),
    sigma = sqrt(1 - a_k) from the scheduler's alphas_cumprod.
    """

    def __init__(self, policy, source: str, fraction: float, logit_mean: float = 0.0, logit_std: float = 1.0):
        if source not in TIMESTEP_SOURCES:
            raise ValueError(f"timestep source must be one of {TIMESTEP_SOURCES}, got {source!r}")
        self.source, self.fraction = source, fraction
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.flow = policy.prediction_type == "flow"
        scheduler = policy.pipe.scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = None if self.flow else scheduler.alphas_cumprod.double().cpu()  # [T]

    def count(self, schedule: Schedule) -> int:
        """Training slots per sample: max(1, int(fraction * N)) for an N-step rollout schedule."""
        return max(1, int(len(schedule) * self.fraction))

    def draw(self, schedule: Schedule, batch_size: int, generator: torch.Generator) -> NoiseLevels:
        """[B, n] noise levels on the CPU; "schedule" takes n distinct steps per sample in random order."""
        B, n, N = batch_size, self.count(schedule), len(schedule)
        if self.source == "schedule":
            idx = torch.stack([torch.randperm(N, generator=generator)[:n] for _ in range(B)])  # [B, n]
            timestep = schedule.timesteps.cpu()[idx]  # [B, n]
            if self.flow:
                sigma = schedule.sigmas.cpu().double()[idx]  # [B, n]
                return NoiseLevels(timestep, 1 - sigma, sigma)
            a = schedule.alphas_cumprod.cpu().double()[idx]  # [B, n]
            return NoiseLevels(timestep, a.sqrt(), (1 - a).sqrt())
        if self.source == "uniform":
            t = torch.rand(B, n, generator=generator, dtype=torch.float64)  # [B, n]
        else:
            z = torch.randn(B, n, generator=generator, dtype=torch.float64)  # [B, n]
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        T = self.num_train_timesteps
        if self.flow:
            return NoiseLevels((t * T).float(), 1 - t, t)
        k = (t * T).long().clamp(0, T - 1)  # [B, n]
        a = self.alphas_cumprod[k]  # [B, n]
        return NoiseLevels(k, a.sqrt(), (1 - a).sqrt())


# ---- snapshots of the trained weights ----------------------------------------------------------
class LoraSnapshots:
    """EMA snapshots of the trainable LoRA adapter, each an extra peft adapter on the same network (SaRA: sparse vectors
    of its trained entries; policy.adapter full: float32 copies of every trained weight), through the Policy's
    add_adapter_copy / adapter_parameters / use_adapter.

    `schedules`: adapter name -> [start_step, start_value, slope, max] (diffrl.core.snapshot_decay).
    Snapshots start as copies of the trained weights; `update(step)` applies
    snapshot <- decay snapshot + (1 - decay) theta with decay = snapshot_decay(step, *schedule).
    """

    def __init__(self, policy, schedules: dict[str, list[float]]):
        self.policy, self.schedules = policy, {k: list(v) for k, v in schedules.items()}
        for name in self.schedules:
            policy.add_adapter_copy(name)

    def decay(self, name: str, step: int) -> float:
        start_step, start_value, slope, max_value = self.schedules[name]
        return snapshot_decay(step, int(start_step), start_value, slope, max_value)

    @torch.no_grad()
    def update(self, step: int) -> dict[str, float]:
        """Blend every snapshot towards the trained weights after `step` optimiser steps; returns the decays."""
        theta = self.policy.adapter_parameters("default")
        decays = {}
        for name in self.schedules:
            d = self.decay(name, step)
            for snap, p in zip(self.policy.adapter_parameters(name), theta, strict=True):
                snap.mul_(d).add_(p.detach().to(snap.dtype), alpha=1 - d)
            decays[f"{name}_decay"] = d
        return decays

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}.{i:05d}": p.detach() for name in self.schedules
                for i, p in enumerate(self.policy.adapter_parameters(name))}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for name in self.schedules:
            params = self.policy.adapter_parameters(name)
            keys = [f"{prefix}.{name}.{i:05d}" for i in range(len(params))]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(f"checkpoint lacks the '{name}' snapshot ({len(missing)} of {len(keys)} tensors, e.g. {missing[0]})")
            for key, p in zip(keys, params):
                if tensors[key].shape != p.shape:
                    raise ValueError(f"checkpoint tensor {key} has shape {tuple(tensors[key].shape)}, the adapter {tuple(p.shape)}")
                p.copy_(tensors[key].to(p.device, p.dtype))


# ---- the update loop ---------------------------------------------------------------------------
@dataclass
class NoisedBatch:
    """b final samples noised at one training slot each."""

    rows: torch.Tensor  # [b] indices into the RolloutBatch
    x0: torch.Tensor  # [b, *S] the final samples
    noise: torch.Tensor  # [b, *S] fresh eps
    x_t: torch.Tensor  # [b, *S] alpha x0 + sigma eps
    target: torch.Tensor  # [b, *S] the forward process's target in the model's parameterisation
    timestep: torch.Tensor  # [b] denoiser input
    alpha: torch.Tensor  # [b]
    sigma: torch.Tensor  # [b]
    weight: torch.Tensor  # [b] 1, or 0 where the reward was not finite
    cond: object  # diffrl.pipelines.Condition with b rows
    groups: torch.Tensor | None = None  # [b] each row's prompt group as an index 0 .. num_groups - 1 (whole_groups runs)
    num_groups: int = 0


def sample_order(group_ids: torch.Tensor, whole_groups: bool, generator: torch.Generator) -> torch.Tensor:
    """A random order of the B rows; with `whole_groups` the groups are shuffled and kept contiguous. -> [B] (CPU)"""
    if not whole_groups:
        return torch.randperm(len(group_ids), generator=generator)
    members: dict[int, list[int]] = {}  # group id -> its rows, in row order (host lists: no device reads)
    for row, gid in enumerate(group_ids.tolist()):
        members.setdefault(gid, []).append(row)
    groups = sorted(members)  # [G]
    perm = torch.randperm(len(groups), generator=generator)  # [G]
    return torch.tensor([row for g in perm.tolist() for row in members[groups[g]]], dtype=torch.long)  # [B]


class FinalSampleUpdates:
    """Gradient steps on noised final samples: one optimiser step per train batch, accumulated over its
    micro-batches and `n` training slots (each with its own noise level and fresh noise), DiffusionNFT-style.
    Each step is taken by `step_guard` (diffrl.optim.GuardedStep: skipped on a NaN/inf gradient norm); the steps
    taken (`steps`, checkpointed) are the snapshot decay schedules' clock."""

    def __init__(self, cfg, section, policy, accelerator, step_guard):
        self.cfg, self.policy, self.accelerator, self.step_guard = cfg, policy, accelerator, step_guard
        self.levels = NoiseLevelSampler(policy, section.timestep_source, section.timestep_fraction,
                                        section.logit_normal_mean, section.logit_normal_std)
        self.steps = 0
        self.step_context: Callable[[NoisedBatch], contextlib.AbstractContextManager] | None = None
        """Entered around each training slot's loss and backward (e.g. the LoRA row masks of a batched reference)."""

    def predict(self, nb: NoisedBatch, guidance_scale: float) -> torch.Tensor:
        """The policy's output at nb.x_t under whatever adapter context is active, in x_t's dtype. -> [b, *S]"""
        with self.accelerator.autocast():
            out = self.policy.predict(nb.x_t, nb.timestep, nb.cond, guidance_scale)  # [b, *S]
        return out.to(nb.x_t.dtype)

    def predict_with_reference(self, nb: NoisedBatch, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the policy's output, the reference's detached output) at nb.x_t from one call on the doubled batch; call it
        inside Algorithm.reference_rows(b) (see Algorithm.rescore_with_reference for the memory trade-off). -> [b, *S] x2"""
        b = len(nb.rows)
        idx = torch.arange(b, device=nb.rows.device).repeat(2)  # [2b]
        with self.accelerator.autocast():
            out = self.policy.predict(nb.x_t[idx], nb.timestep[idx], nb.cond.index(idx), guidance_scale)  # [2b, *S]
        out = out.to(nb.x_t.dtype)
        return out[:b], out[b:].detach()

    def x0(self, nb: NoisedBatch, output: torch.Tensor) -> torch.Tensor:
        """The clean sample `output` implies at nb.x_t. -> [b, *S]"""
        return predict_x0(nb.x_t, output, nb.alpha, nb.sigma, self.policy.prediction_type)

    def run(
        self,
        batch: RolloutBatch,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        loss_fn: Callable[[NoisedBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        whole_groups: bool = False,
    ) -> dict[str, float]:
        """`loss_fn(nb) -> (loss [b], metrics: name -> 0-d tensor)`; the batch loss is the weighted mean over the
        train batch. The metrics stay on the device until the end (one host read per update). `whole_groups`:
        batches hold whole prompt groups (checked) and each NoisedBatch carries its rows' group index."""
        cfg, acc = self.cfg, self.accelerator
        x0_all = batch.trajectory.final  # [B, *S]
        device, dtype = x0_all.device, x0_all.dtype
        weight_all = batch.valid.to(dtype)  # [B]: non-finite rewards contribute nothing
        B = len(batch)
        mb = cfg.train.train_batch_size
        micro = cfg.train.micro_batch_size or mb
        schedule = batch.trajectory.schedule
        group_ids = batch.group_ids.cpu()  # [B]: the grouping is read on the host, once
        metrics = DeviceMetrics()  # per-step values stay on the device until the end of the update

        for _ in range(cfg.train.num_inner_epochs):
            order = sample_order(group_ids, whole_groups, generator)  # [B]
            levels = self.levels.draw(schedule, B, generator)  # [B, n], by row
            n = levels.timestep.shape[1]
            # host-drawn values go to the device through pinned memory, without waiting for it
            timestep_all = to_device(levels.timestep, device)  # [B, n]
            alpha_all, sigma_all = to_device(levels.alpha, device), to_device(levels.sigma, device)  # [B, n] float64
            for start in range(0, B, mb):
                rows_tb = order[start : start + mb]  # [mb]
                denom = weight_all[to_device(rows_tb, device)].sum().clamp_min(1)
                chunks = rows_tb.split(micro)
                for c, rows in enumerate(chunks):
                    rows_d = to_device(rows, device)
                    groups, num_groups = self.group_index(group_ids[rows], device) if whole_groups else (None, 0)
                    x0 = x0_all[rows_d]  # [b, *S]
                    for j in range(n):
                        noise = to_device(torch.randn(x0.shape, generator=generator, dtype=dtype), device)  # [b, *S]
                        alpha = alpha_all[rows_d, j]  # [b] float64
                        sigma = sigma_all[rows_d, j]  # [b] float64
                        nb = NoisedBatch(
                            rows=rows_d, x0=x0, noise=noise, x_t=add_noise(x0, noise, alpha, sigma),
                            target=training_target(x0, noise, alpha, sigma, self.policy.prediction_type),
                            timestep=timestep_all[rows_d, j], alpha=alpha, sigma=sigma,
                            weight=weight_all[rows_d], cond=batch.cond.index(rows_d), groups=groups,
                            num_groups=num_groups,
                        )
                        with self.step_context(nb) if self.step_context else contextlib.nullcontext():
                            loss_rows, step_metrics = loss_fn(nb)  # [b]
                            loss = (loss_rows * nb.weight).sum() / denom / n
                            last = c == len(chunks) - 1 and j == n - 1
                            sync = contextlib.nullcontext() if last else acc.no_sync(self.policy.denoiser)
                            with sync:
                                acc.backward(loss)
                        step_metrics["loss"] = wide((loss_rows.detach() * nb.weight).sum()) / wide(nb.weight.sum()).clamp_min(1)
                        for key, value in step_metrics.items():
                            metrics.add(key, value)
                metrics.add("grad_norm", self.step_guard(optimizer))  # a host float: averaged over the steps
                self.steps += self.step_guard.stepped  # the snapshots' clock counts the steps taken
        out = metrics.means()
        out["optimizer_steps"] = self.steps
        return out

    def group_index(self, ids: torch.Tensor, device) -> tuple[torch.Tensor, int]:
        """Prompt-group ids [b] (CPU) of whole groups -> (each row's group index 0 .. G - 1 on `device`, G)."""
        _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)  # [b], [G]
        if not bool((counts == self.cfg.train.group_size).all()):
            raise RuntimeError(f"a micro-batch splits a prompt group (group sizes {counts.tolist()}); centring needs whole groups")
        return to_device(inverse, device), len(counts)

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.optimizer_steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        key = f"{prefix}.optimizer_steps"
        if key not in tensors:
            raise ValueError(f"checkpoint lacks {key}: was it written by the same algorithm?")
        self.steps = int(tensors[key])
