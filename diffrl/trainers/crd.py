"""CRD: Centered Reward Distillation (Zhu et al., 2026), a forward-process trainer.

Per iteration: K samples per prompt from a decoupled "sampling" snapshot (CFG-free, any sampler), keeping
only the final x0; rewards -> group advantages -> a = clamp(clip(A, +-5) / 10 + 0.5, 0, 1). At fresh x_t
of each x0 the implicit reward of the trained weights against an "old" snapshot is
r_theta = -(||v_theta - v||^2 / sg(mean|v_theta - v|) - ||v_old - v||^2 / sg(mean|v_old - v|)).
Centred within each prompt group, R_c = r_theta - sg(mean_g r_theta) and A_c = a - mean_g a, the
intractable normaliser cancels and the loss (A_max / beta) mean((beta R_c - A_c)^2) distils the reward
into the model. A reward-adaptive KL, kl_beta mean((m + a (1 - m)) ||v_theta - v_ref||^2) with
m = 1e-4 / kl_beta, anchors it to the CFG-guided pretrained model (adapters disabled, CFG 4.5). Both
snapshots are EMAs of the trained weights with their own schedules (old: min(0.25 + 0.005 step, 0.999);
sampling: 0 before step 75, then min(0.0075 (step - 75), 0.999)). Centring needs whole groups in every
batch: the loop gives each process whole groups and the config validation keeps batches to multiples
of the group size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffrl.checks import ConfigError, check_fields, decay_schedule, non_negative, positive
from diffrl.core import crd_implicit_reward, crd_kl_weight, crd_policy_loss, mean_sq, optimality
from diffrl.core.forward_process import CRD_LOSSES
from diffrl.trainers.base import Algorithm, RolloutBatch
from diffrl.trainers.forward_process import (FinalSampleUpdates, ForwardProcessConfig, LoraSnapshots, NoisedBatch,
                                             validate_forward_process)


@dataclass
class CRDConfig(ForwardProcessConfig):
    beta: float = 1.0
    """Implicit-reward scale: the loss matches beta (r_theta - mean_g r_theta) to a - mean_g a (CRD: 1, Flow-Factory crd_beta)."""
    loss: str = "mse"
    """Reward matching: "mse" (A_max / beta) (beta R_c - A_c)^2 (CRD) or "bce" BCE(beta R_c, sigmoid(A_c)) (the authors' variant)."""
    kl_beta: float = 0.1
    """KL strength against the CFG-guided reference (adapter disabled): kl_beta (m + a (1 - m)) mean((v_theta - v_ref)^2) (CRD: 0.1)."""
    kl_floor: float = 1e-4
    """KL coefficient at a = 0, m = kl_floor / kl_beta, when reward_adaptive_kl (CRD: 1e-4)."""
    reward_adaptive_kl: bool = True
    """Scale each sample's KL by m + a (1 - m), weaker for low-reward samples (CRD: on)."""
    ref_guidance_scale: float = 4.5
    """CFG scale of the KL reference, the pretrained model as used at inference (CRD: 4.5)."""
    old_decay: list[float] = field(default_factory=lambda: [0, 0.25, 0.005, 0.999])
    """EMA decay of the old adapter (v_old of the implicit reward), [start_step, start_value, slope, max]: min(0.25 + 0.005 step, 0.999) (CRD)."""
    sampling_decay: list[float] = field(default_factory=lambda: [75, 0.0, 0.0075, 0.999])
    """EMA decay of the sampling adapter (rollouts): 0 before step 75, then min(0.0075 (step - 75), 0.999) (CRD)."""

    def check(self, key: str = "crd") -> None:
        super().check(key)
        check_fields(self, key, {"loss": CRD_LOSSES, "kl_beta": non_negative, "kl_floor": non_negative,
                                 "ref_guidance_scale": positive})
        if self.reward_adaptive_kl and self.kl_beta > 0 and self.kl_floor > self.kl_beta:
            raise ConfigError(f"'{key}.kl_floor' ({self.kl_floor}) must not exceed {key}.kl_beta ({self.kl_beta}): it is the KL weight at a = 0")
        decay_schedule(self.sampling_decay, f"{key}.sampling_decay")


class CRD(Algorithm):
    name = "crd"
    config_class = CRDConfig
    record_trajectory = False  # final samples only
    default_flow_sampler = "flow_dpm2"
    default_guidance_scale = 1.0  # CFG-free rollouts and training

    @classmethod
    def uses_reference(cls, cfg) -> bool:
        return cfg.crd.kl_beta > 0  # the KL to the CFG-guided base

    @classmethod
    def validate(cls, cfg, ctx) -> None:
        validate_forward_process(cfg, "crd")
        t = cfg.train
        K = t.group_size
        if K < 2:
            raise ConfigError("'train.group_size' must be >= 2 for crd: rewards are centred within a prompt group, so a group of one carries no signal")
        # a process draws whole groups (the loop never splits a prompt across processes); its batches must too
        for key in ("train_batch_size", "micro_batch_size"):
            size = getattr(t, key)
            if size is not None and size % K:
                raise ConfigError(f"'train.{key}' ({size}) must be a multiple of train.group_size ({K}) for crd: it centres "
                                  "rewards within a prompt group, so every batch must hold whole groups")

    def __init__(self, cfg, policy, sampler, accelerator):
        super().__init__(cfg, policy, sampler, accelerator)
        c = cfg.crd
        self.snapshots = LoraSnapshots(policy, {"old": c.old_decay, "sampling": c.sampling_decay})
        self.updates = FinalSampleUpdates(cfg, c, policy, accelerator, self.step_guard)

    def rollout_context(self):
        return self.policy.use_adapter("sampling")  # the sampler is decoupled from the moving old snapshot

    def loss(self, nb: NoisedBatch, a: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample CRD loss at one noise level, and its metrics as 0-d tensors; nb holds whole groups.
        a, group_ids: [B] (group_ids read only when nb carries no group index). -> [b]"""
        c, g = self.cfg.crd, self.cfg.sampling.guidance_scale
        groups, num_groups = nb.groups, nb.num_groups  # [b]: group index 0 .. G - 1, from the update loop
        if groups is None:  # a NoisedBatch built elsewhere: its grouping read here
            groups, num_groups = self.updates.group_index(group_ids.cpu()[nb.rows.cpu()], nb.rows.device)
        with torch.no_grad(), self.policy.use_adapter("old"):
            v_old = self.updates.predict(nb, g)  # [b, *S]
        v_theta = self.updates.predict(nb, g)  # [b, *S]
        r_theta = crd_implicit_reward(v_theta, v_old, nb.target)  # [b]
        a_rows = a[nb.rows]  # [b]
        policy_loss = crd_policy_loss(r_theta, a_rows, groups, c.beta, c.adv_clip_max, c.loss, weight=nb.weight,
                                      num_groups=num_groups)  # [b]
        kl = torch.zeros_like(policy_loss)  # [b]
        kl_weight = crd_kl_weight(a_rows, c.kl_beta, c.kl_floor, c.reward_adaptive_kl).to(policy_loss.dtype)  # [b]
        if c.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = self.updates.predict(nb, c.ref_guidance_scale)  # [b, *S] the CFG-guided base model
            kl = mean_sq(v_theta, v_ref)  # [b]
        metrics = {
            "policy_loss": policy_loss.detach().mean(),
            "kl": kl.detach().mean(),
            "kl_weight_mean": kl_weight.mean(),
            "r_theta_mean": r_theta.detach().mean(),
            "old_deviate": mean_sq(v_theta.detach(), v_old).mean(),
        }
        return policy_loss + kl_weight * kl, metrics

    def update(self, batch: RolloutBatch, optimizer, generator) -> dict[str, float]:
        a = optimality(batch.advantages, self.cfg.crd.adv_clip_max)  # [B]
        metrics = self.updates.run(batch, optimizer, generator, lambda nb: self.loss(nb, a, batch.group_ids),
                                   whole_groups=True)
        metrics.update(self.snapshots.update(self.updates.steps))  # after each epoch (iteration)
        return metrics

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.snapshots.state_tensors("crd"), **self.updates.state_tensors("crd")}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.snapshots.load_state_tensors(tensors, "crd")
        self.updates.load_state_tensors(tensors, "crd")
