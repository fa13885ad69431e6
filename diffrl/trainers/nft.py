"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al., ICLR 2026).

Per iteration: K samples per prompt from the old (sampling) policy with any sampler (a deterministic
ODE, CFG-free, by default), of which only the final x0 is kept; rewards -> group advantages ->
optimality r = clamp(0.5 + 0.5 clip(A, +-A_max) / A_max, 0, 1). At fresh x_t of each x0 the trained
velocity v_theta and the old one define an implicit positive policy v+ = (1 - beta) sg(v_old) + beta
v_theta and an implicit negative one v- = (1 + beta) sg(v_old) - beta v_theta; the loss pulls v+ to the
flow-matching target on good samples and v- on bad ones, in x0 space with adaptive weights, scaled by
A_max / beta, plus kl_coef mean((v_theta - v_ref)^2) against the reference (adapters disabled). At
v_theta = v_old its gradient is 2 beta (2r - 1)(v_old - v): an advantage-weighted flow-matching step.
After each iteration the old adapter is soft-updated, old <- eta old + (1 - eta) theta, eta =
min(0.001 step, 0.5). On UNets the same loss runs on the epsilon / v-prediction forward process (x0 is
affine in the model output, so the implicit policies map to the same mixes of x0 predictions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffrl.checks import non_negative
from diffrl.core import mean_sq, nft_policy_loss, optimality
from diffrl.trainers.base import Algorithm, RolloutBatch
from diffrl.trainers.forward_process import (FinalSampleUpdates, ForwardProcessConfig, LoraSnapshots, NoisedBatch,
                                             validate_forward_process)
from diffrl.trainers.grpo import check_kl_batched


@dataclass
class NFTConfig(ForwardProcessConfig):
    beta: float = 1.0
    """Implicit-policy strength: v+- = sg(v_old) +- beta (v_theta - sg(v_old)) (DiffusionNFT: 1; 0.1 for OCR)."""
    kl_coef: float = 1e-4
    """Weight of mean((v_theta - v_ref)^2) against the reference (adapter disabled) (DiffusionNFT: 1e-4)."""
    old_decay: list[float] = field(default_factory=lambda: [0, 0.0, 0.001, 0.5])
    """EMA decay of the old (sampling) adapter after each iteration, [start_step, start_value, slope, max]: min(0.001 step, 0.5) (DiffusionNFT decay_type 1)."""
    kl_batched: bool = False
    """With kl_coef > 0: v_theta and the reference's v_ref from one denoiser call on a doubled batch (the reference half with the LoRA off) instead of two; same loss and gradients, the reference half's activations kept for backward (docs/performance.md)."""

    def check(self, key: str = "nft") -> None:
        super().check(key)
        non_negative(self.kl_coef, f"{key}.kl_coef")


class DiffusionNFT(Algorithm):
    name = "nft"
    config_class = NFTConfig
    record_trajectory = False  # final samples only
    default_flow_sampler = "flow_dpm2"  # DiffusionNFT's deterministic "dpm2" solver
    default_guidance_scale = 1.0  # CFG-free rollouts and training

    @classmethod
    def uses_reference(cls, cfg) -> bool:
        return cfg.nft.kl_coef > 0  # the KL term

    @classmethod
    def validate(cls, cfg, ctx) -> None:
        validate_forward_process(cfg, "nft")
        if cfg.nft.kl_batched:
            check_kl_batched(cfg, "nft.kl_batched", cfg.nft.kl_coef, "nft.kl_coef")

    def __init__(self, cfg, policy, sampler, accelerator):
        super().__init__(cfg, policy, sampler, accelerator)
        self.snapshots = LoraSnapshots(policy, {"old": cfg.nft.old_decay})
        self.updates = FinalSampleUpdates(cfg, cfg.nft, policy, accelerator, self.step_guard)
        if cfg.nft.kl_coef > 0 and cfg.nft.kl_batched:  # the row masks stay open through each slot's backward
            self.updates.step_context = lambda nb: self.reference_rows(len(nb.rows))

    def rollout_context(self):
        return self.policy.use_adapter("old")  # rollouts come from the sampling policy v_old

    def loss(self, nb: NoisedBatch, r: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample NFT loss at one noise level, and its metrics as 0-d tensors. r: [B] optimality of the whole
        batch. -> [b]"""
        n, g = self.cfg.nft, self.cfg.sampling.guidance_scale
        with torch.no_grad(), self.policy.use_adapter("old"):
            v_old = self.updates.predict(nb, g)  # [b, *S]
        batched = n.kl_coef > 0 and n.kl_batched
        if batched:  # v_theta and v_ref from one call (inside the step_context's row masks)
            v_theta, v_ref = self.updates.predict_with_reference(nb, g)  # [b, *S] each
        else:
            v_theta = self.updates.predict(nb, g)  # [b, *S]
        policy_loss = nft_policy_loss(
            self.updates.x0(nb, v_theta), self.updates.x0(nb, v_old), nb.x0, r[nb.rows], n.beta, n.adv_clip_max
        )  # [b]
        kl = torch.zeros_like(policy_loss)  # [b]
        if n.kl_coef > 0:
            if not batched:
                with torch.no_grad(), self.policy.reference():
                    v_ref = self.updates.predict(nb, g)  # [b, *S]
            kl = mean_sq(v_theta, v_ref)  # [b]
        metrics = {
            "policy_loss": policy_loss.detach().mean(),
            "kl": kl.detach().mean(),
            "old_deviate": mean_sq(v_theta.detach(), v_old).mean(),
        }
        return policy_loss + n.kl_coef * kl, metrics

    def update(self, batch: RolloutBatch, optimizer, generator) -> dict[str, float]:
        r = optimality(batch.advantages, self.cfg.nft.adv_clip_max)  # [B]
        metrics = self.updates.run(batch, optimizer, generator, lambda nb: self.loss(nb, r))
        metrics["r_mean"] = r[batch.valid].mean().item() if batch.valid.any() else 0.5
        metrics.update(self.snapshots.update(self.updates.steps))  # after each epoch (iteration)
        return metrics

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.snapshots.state_tensors("nft"), **self.updates.state_tensors("nft")}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.snapshots.load_state_tensors(tensors, "nft")
        self.updates.load_state_tensors(tensors, "nft")
