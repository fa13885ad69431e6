"""The LM loss variants, composed from the shared RL core (diffrl.core); no maths of their own.

Two objectives cover the four methods; their differences are settings (config.LM_ALGORITHMS):

* `ClippedObjective` (lm_grpo, lm_drgrpo, lm_dapo): group advantages (`combine_rewards` ->
  `group_advantages`, per-group std or none) weighting the clipped token surrogate
  (`clipped_surrogate`, eps_low / eps_high), aggregated per `aggregate` mode:
  GRPO seq_mean_token_mean + std; Dr.GRPO seq_mean_token_sum_norm, no std; DAPO token_mean + clip-higher
  (+ the dynamic-sampling filter `nonconstant_groups`, applied by the trainer).
* `NFTObjective` (lm_nft): correctness and the clamped group accuracy rhat (`nft_correct_rate`) into
  `nft_token_loss`.

Both add `kl_beta * kl_estimator(logp, logp_ref)` per token before aggregating (GRPO's form).
"""

from __future__ import annotations

from torch import Tensor

from diffrl.core import (
    aggregate,
    clipped_surrogate,
    combine_rewards,
    kl_estimator,
    nft_correct_rate,
    nft_token_loss,
)

__all__ = ["ClippedObjective", "NFTObjective", "lm_loss", "make_objective", "micro_batch_share"]


class ClippedObjective:
    """GRPO / Dr.GRPO / DAPO: group-relative advantages into the PPO-clipped token surrogate."""

    def __init__(self, lm) -> None:
        self.lm = lm

    def targets(self, per_reward: dict[str, Tensor], weights: dict[str, float], group_ids: Tensor) -> dict[str, Tensor]:
        """Per-completion training targets from the rewards: {"advantages": [B]}."""
        lm = self.lm
        adv = combine_rewards(per_reward, weights, group_ids, mode=lm.reward_combine, std_scope=lm.std_scope,
                              ddof=lm.std_ddof, eps=lm.std_eps, clip=lm.adv_clip)  # [B]
        return {"advantages": adv}

    def token_loss(self, logp: Tensor, logp_old: Tensor, mask: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return clipped_surrogate(logp, logp_old, targets["advantages"], clip_low=self.lm.clip_low,
                                 clip_high=self.lm.clip_high, mask=mask)  # [B, T]


class NFTObjective:
    """NFT: maximum likelihood on correct answers, the implicit negative policy on wrong ones."""

    def __init__(self, lm) -> None:
        self.lm = lm

    def targets(self, per_reward: dict[str, Tensor], weights: dict[str, float], group_ids: Tensor) -> dict[str, Tensor]:
        """{"correct": [B] 0/1, "rhat": [B] clamped group accuracy}; correct = weighted reward >= threshold."""
        total = sum(weights[n] * r for n, r in per_reward.items())  # [B]
        correct = (total >= self.lm.nft_correct_threshold).to(total.dtype)  # [B]
        rhat = nft_correct_rate(correct, group_ids, clamp=tuple(self.lm.nft_rhat_clamp))  # [B]
        return {"correct": correct, "rhat": rhat}

    def token_loss(self, logp: Tensor, logp_old: Tensor, mask: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return nft_token_loss(logp, logp_old, targets["correct"], targets["rhat"],
                              negative_clamp=self.lm.nft_negative_clamp, mask=mask)  # [B, T]


def make_objective(algorithm: str, lm):
    return NFTObjective(lm) if algorithm == "lm_nft" else ClippedObjective(lm)


def lm_loss(objective, logp: Tensor, logp_old: Tensor, mask: Tensor, targets: dict[str, Tensor],
            logp_ref: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss of one batch: token loss (+ kl_beta * KL per token) aggregated over `mask` ([B, T])."""
    lm = objective.lm
    loss, metrics = objective.token_loss(logp, logp_old, mask, targets)  # [B, T]
    metrics["policy_loss"] = aggregate(loss.detach(), mask, lm.loss_aggregation, norm_constant=lm.norm_constant)
    if lm.kl_beta > 0:
        if logp_ref is None:
            raise ValueError("kl_beta > 0 needs the reference log-probs")
        kl = kl_estimator(logp, logp_ref, lm.kl_estimator)  # [B, T]
        loss = loss + lm.kl_beta * kl
        metrics["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    return aggregate(loss, mask, lm.loss_aggregation, norm_constant=lm.norm_constant), metrics


def micro_batch_share(mode: str, tokens: float, rows: int, rows_total: int, tokens_total: float) -> float:
    """Factor turning a micro-batch's `aggregate` into its share of the whole mini-batch's: tokens / total
    tokens for token_mean, rows / total rows for the per-sequence modes (whose means are over rows). Host
    numbers (Rollout.host_lengths), so that weighing a micro-batch never waits for the device."""
    if mode == "token_mean":
        return tokens / max(tokens_total, 1.0)
    return rows / rows_total
