"""GRPO for diffusion: Flow-GRPO on flow models (SDE sampler), DDPO on UNets (DDIM with eta).

Per iteration: K samples per prompt with their step log-probs are scored; group-relative advantages
(clipped to +-adv_clip_max) weight a PPO-clipped surrogate on the per-step ratio, recomputed for a
random `timestep_fraction` of the stochastic steps (all of them, or the SDE window of MixGRPO /
Flow-GRPO-Fast), plus beta * KL(step) against the reference (the same
network with the LoRA adapter disabled). Gradients accumulate over those steps; one optimiser step
per train batch (Flow-GRPO, Liu et al. 2025; DDPO, Black et al. 2023).

Without KL (kl_beta 0) a sample whose advantage is 0 (a group whose rewards are all equal, common with a
0/1 reward) adds nothing to the loss or its gradient, so its re-scoring forward and backward are skipped;
the loss stays the mean over the whole train batch, so the gradient is unchanged. The diagnostics
(clip_frac, ratio_mean, ...) are then over the samples that train.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from diffrl.checks import ConfigError, check_fields, fraction, non_negative, positive, require_lora, require_stochastic
from diffrl.core import clipped_surrogate, flow_grpo_kl, gaussian_kl
from diffrl.pipelines.base import CFG_GRADIENTS
from diffrl.runtime import DeviceMetrics, to_device, wide
from diffrl.sampling import StepOutput
from diffrl.trainers.base import Algorithm, RolloutBatch

KL_CONVENTIONS = ("flow_grpo", "exact")


@dataclass
class GRPOConfig:
    clip_range: float = 1e-4
    """PPO clip on the per-step ratio, low side (Flow-GRPO: 1e-4)."""
    clip_range_high: Optional[float] = None
    """High-side clip (DAPO clip-higher); None uses clip_range."""
    kl_beta: float = 0.04
    """KL coefficient against the reference model (Flow-GRPO: 0.04; 0.01 for PickScore)."""
    kl_convention: str = "flow_grpo"
    """"flow_grpo": mean_elems((mu - mu_ref)^2) / (2 std_t^2) as Flow-GRPO's code; "exact": the step Gaussian KL."""
    timestep_fraction: float = 0.99
    """Fraction of the sampling steps trained per sample (Flow-GRPO: 0.99)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO: 5)."""
    kl_batched: bool = False
    """With kl_beta > 0: the policy and reference re-scoring in one denoiser call on a doubled batch (the reference half with the LoRA off) instead of two; same loss and gradients, the reference half's activations kept for backward (docs/performance.md)."""
    cfg_gradient: str = "both"
    """"cond" = gradient through the conditional branch of classifier-free guidance only, the unconditional prediction detached (as Flow-GRPO's train_sd3.py in its July 2025 revisions); "both" = through both branches, as DDPO's code. Same values; only the gradient differs."""

    def check(self, key: str = "grpo") -> None:
        check_fields(self, key, {"clip_range": positive, "clip_range_high": positive, "kl_beta": non_negative,
                                 "kl_convention": KL_CONVENTIONS, "adv_clip_max": positive,
                                 "cfg_gradient": CFG_GRADIENTS})
        fraction(self.timestep_fraction, f"{key}.timestep_fraction")


def check_kl_batched(cfg, key: str, coefficient: float, coefficient_key: str) -> None:
    """A batched reference pass needs a reference pass (a KL coefficient > 0), a LoRA (the reference rows switch it off
    per row) and no torch.compile (the per-call row masks would re-trace the compiled blocks)."""
    if coefficient <= 0:
        raise ConfigError(f"'{key}' batches the KL reference pass, which {coefficient_key} {coefficient} does not run: "
                          f"remove it or set {coefficient_key} > 0")
    if cfg.policy.resolved_adapter() != "lora":
        raise ConfigError(f"'{key}' switches the LoRA off on the reference rows of one batch; policy.adapter is "
                          f"{cfg.policy.resolved_adapter()}: train a LoRA or turn it off")
    if cfg.policy.compile:
        raise ConfigError(f"'{key}' with policy.compile: the reference rows' LoRA masks would re-trace the compiled "
                          "blocks at every call; turn one of them off")


class GRPO(Algorithm):
    name = "grpo"
    config_class = GRPOConfig
    record_trajectory = True

    def __init__(self, cfg, policy, sampler, accelerator):
        super().__init__(cfg, policy, sampler, accelerator)
        self.cfg_gradient = cfg.grpo.cfg_gradient  # rescore()'s CFG branches with gradient

    @classmethod
    def uses_reference(cls, cfg) -> bool:
        return cfg.grpo.kl_beta > 0  # the KL term

    @classmethod
    def validate(cls, cfg, ctx) -> None:
        require_stochastic(cfg, ctx, "grpo")
        if cfg.grpo.kl_beta > 0:
            require_lora(cfg, "grpo", "'grpo.kl_beta' > 0 needs a frozen reference, the base model with the LoRA adapter "
                                      "disabled (or set grpo.kl_beta=0)")
        t = cfg.train
        if t.micro_batch_size is not None and t.micro_batch_size != t.train_batch_size:
            raise ConfigError("'train.micro_batch_size' is used by nft, crd and prdp; grpo runs each train batch in one pass: leave it unset")
        if cfg.grpo.kl_batched:
            check_kl_batched(cfg, "grpo.kl_batched", cfg.grpo.kl_beta, "grpo.kl_beta")
        if cfg.grpo.cfg_gradient == "cond":
            s = cfg.sampling
            no_cfg = "FLUX.1 is guidance-distilled" if ctx.family == "flux" else (
                f"sampling.guidance_scale {s.guidance_scale}" if max(s.guidance_scale, s.guidance_scale_2 or 0) <= 1 else "")
            if no_cfg:
                raise ConfigError("'grpo.cfg_gradient' cond detaches the unconditional branch of classifier-free guidance; "
                                  f"this run has none ({no_cfg}): leave it at both")

    def step_log_prob(self, batch: RolloutBatch, rows: torch.Tensor, steps: torch.Tensor, reference: bool = False) -> StepOutput:
        """Re-score the stored transition x_steps -> x_steps+1 of samples `rows`. rows, steps: [b] long."""
        return self.rescore(batch, rows, steps, reference)

    def kl(self, step: StepOutput, ref: StepOutput) -> torch.Tensor:
        """Per-sample KL(step) in the configured convention. -> [b]"""
        if self.cfg.grpo.kl_convention == "exact":
            return gaussian_kl(step.mean, ref.mean.detach(), step.std, reduction="sum")
        return flow_grpo_kl(step.mean, ref.mean.detach(), step.sde_std)

    def update(self, batch: RolloutBatch, optimizer, generator) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.grpo
        B, N = batch.trajectory.log_probs.shape  # N: the stochastic steps (all, or the SDE window)
        device = batch.trajectory.log_probs.device
        step_index = batch.trajectory.steps.to(device)  # [N] long: schedule step of each log-prob column
        n_train = max(1, int(N * g.timestep_fraction))
        adv = batch.advantages.to(device).clamp(-g.adv_clip_max, g.adv_clip_max)  # [B]
        weight = batch.valid.to(device=device, dtype=adv.dtype)  # [B]: non-finite rewards contribute nothing
        mb = cfg.train.train_batch_size
        # without KL a row with advantage 0 has surrogate 0 and no gradient: its forward is skipped. Which rows learn
        # is read on the host once per update (one transfer), so that picking rows never waits for the device.
        learns_all = ((adv != 0) & (weight > 0)).cpu() if g.kl_beta == 0 else None  # [B] bool
        batch_reference = g.kl_beta > 0 and g.kl_batched
        metrics = DeviceMetrics()  # per-step values stay on the device until the end of the update
        trained = 0
        grad_norms: list[float] = []

        for _ in range(cfg.train.num_inner_epochs):
            order = torch.randperm(B, generator=generator)  # [B]
            step_order = torch.stack([torch.randperm(N, generator=generator) for _ in range(B)])  # [B, N]
            for start in range(0, B, mb):
                rows_host = order[start : start + mb]  # [b]
                w_sum = weight[to_device(rows_host, device)].sum().clamp_min(1)  # the loss is a mean over the whole train batch
                if learns_all is not None:
                    learns = learns_all[rows_host]  # [b]
                    # with none, one row still runs (its gradient is 0): every process makes the same backward calls
                    rows_host = rows_host[learns] if learns.any() else rows_host[:1]
                trained += len(rows_host)
                rows = to_device(rows_host, device)  # [b]
                cols_all = to_device(step_order[rows_host, :n_train], device)  # [b, n_train]: log-prob columns
                w = weight[rows]  # [b]
                for j in range(n_train):
                    cols = cols_all[:, j]  # [b]
                    steps = step_index[cols]  # [b]: their schedule steps
                    # kl_batched: policy and reference rows in one denoiser call, the row masks open through backward
                    with self.reference_rows(len(rows)) if batch_reference else contextlib.nullcontext():
                        if batch_reference:
                            step, ref = self.rescore_with_reference(batch, rows, steps)
                        else:
                            step = self.step_log_prob(batch, rows, steps)
                        old = batch.trajectory.log_probs[rows, cols]  # [b]
                        surrogate, m = clipped_surrogate(
                            step.log_prob, old, adv[rows], clip_low=g.clip_range, clip_high=g.clip_range_high
                        )  # [b]
                        loss_rows = surrogate
                        kl = torch.zeros_like(surrogate)
                        if g.kl_beta > 0:
                            if not batch_reference:
                                with torch.no_grad():
                                    ref = self.step_log_prob(batch, rows, steps, reference=True)
                            kl = self.kl(step, ref)  # [b]
                            loss_rows = surrogate + g.kl_beta * kl
                        loss = (loss_rows * w).sum() / w_sum / n_train
                        last = j == n_train - 1
                        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy.denoiser)
                        with sync:
                            self.accelerator.backward(loss)
                    ratio = torch.exp(step.log_prob.detach() - old)  # [b]
                    metrics.add("loss", loss, scale=n_train)
                    metrics.add("policy_loss", wide((surrogate.detach() * w).sum()) / wide(w_sum))
                    metrics.add("kl", kl.detach().mean())
                    metrics.add("clip_frac", m["clip_frac"])
                    metrics.add("ratio_mean", ratio.mean())
                    metrics.maximum("ratio_max", ratio.max())
                grad_norms.append(self.step_guard(optimizer))
        out = metrics.means()  # the update's one read of the device
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["ratio_max"] = max(0.0, out["ratio_max"])
        out["trained_frac"] = trained / (B * cfg.train.num_inner_epochs)  # samples whose forward ran
        return out
