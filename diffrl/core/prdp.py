"""PRDP's reward difference prediction loss (Deng et al., CVPR 2024), pure maths.

The implicit reward of a trajectory is its summed per-step log-ratio to the reference,
``rhat = sum_t [log pi_theta(x_{t-1} | x_t) - log pi_ref(x_{t-1} | x_t)]``. For every pair (a, b) of
trajectories of one prompt the model regresses the reward difference,
``l = ((rhat_a - rhat_b) - (r_a - r_b) / beta)^2``; at the optimum ``pi_theta ∝ pi_ref exp(r / beta)``, the
KL-regularised RL solution. The proximal version clips each step's term to ``[old_t - eps, old_t + eps]``
(``old``: the per-step log-ratio of the snapshot that sampled), recomputes ``l`` from the clipped sum and
takes ``max(l, l_clipped)``: once a step has moved ``eps`` away from the snapshot in the direction that
lowers the loss, its gradient stops (PPO's clip, on a regression loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["prdp_loss", "same_group_pairs"]


def same_group_pairs(group_ids: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows (a, b), a < b, of every pair sharing a group id (and both valid): C(K, 2) per group of K.

    ``group_ids``: [B]; ``valid``: [B] bool or None. Returns two [P] long tensors.
    """
    same = group_ids[:, None] == group_ids[None, :]  # [B, B]
    if valid is not None:
        same = same & valid[:, None] & valid[None, :]  # [B, B]
    a, b = torch.triu(same, diagonal=1).nonzero(as_tuple=True)  # [P], [P]
    return a, b


def prdp_loss(
    delta: Tensor,
    delta_old: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    beta: float,
    eps: float | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over same-group pairs of ``max(l, l_clipped)``; returns (0-d loss, detached metrics).

    ``delta``: [B, T] per-step ``log pi_theta - log pi_ref`` of the stored transitions (differentiable);
    ``delta_old``: [B, T] the same under the sampling snapshot; ``rewards``: [B]; ``group_ids``: [B];
    ``valid``: [B] bool, rows with a usable reward (others join no pair). ``eps`` None: no proximal clip
    (the plain RDP objective). The clipped branch is taken only where it is strictly larger, so at a tie
    (every step within eps) the gradient is the unclipped one; a clipped step term passes no gradient
    (torch.clamp's inclusive bounds: a term exactly at old +- eps still does).

    Metrics: ``pairs``; ``clipped_pair_frac`` (pairs on the clipped branch); ``clip_frac`` (step terms
    of paired rows outside old +- eps); ``pair_accuracy`` (pairs with r_a != r_b whose rhat difference
    has the reward difference's sign; NaN without such pairs); ``rhat_mean`` (mean implicit reward, a KL-to-reference estimate
    on the sampled trajectories); ``drift`` (mean |delta - delta_old|).
    """
    if delta.shape != delta_old.shape or delta.ndim != 2:
        raise ValueError(f"delta {tuple(delta.shape)} and delta_old {tuple(delta_old.shape)} must both be [B, T]")
    if beta <= 0 or (eps is not None and eps <= 0):
        raise ValueError(f"need beta > 0 and eps > 0 (or None), got beta={beta}, eps={eps}")
    a, b = same_group_pairs(group_ids, valid)  # [P], [P]
    rhat = delta.sum(dim=1)  # [B]
    target = (rewards[a] - rewards[b]).to(delta.dtype) / beta  # [P]
    err = rhat[a] - rhat[b] - target  # [P]
    loss_pairs = err**2  # [P]
    use_clip = torch.zeros_like(loss_pairs, dtype=torch.bool)  # [P]
    outside = torch.zeros_like(delta, dtype=torch.bool)  # [B, T]
    if eps is not None:
        clipped = torch.clamp(delta, delta_old - eps, delta_old + eps)  # [B, T]
        rhat_clip = clipped.sum(dim=1)  # [B]
        loss_clip = (rhat_clip[a] - rhat_clip[b] - target) ** 2  # [P]
        use_clip = loss_clip > loss_pairs  # [P]
        loss_pairs = torch.where(use_clip, loss_clip, loss_pairs)  # [P]
        outside = (delta - delta_old).abs() > eps  # [B, T]
    # no pair: a zero that still depends on delta, so backward and DDP see the same graph
    loss = loss_pairs.mean() if len(a) else delta.sum() * 0.0

    with torch.no_grad():
        paired = torch.zeros(delta.shape[0], dtype=torch.bool, device=delta.device)  # [B]
        paired[a], paired[b] = True, True
        differ = target != 0  # [P]
        agree = torch.sign(rhat[a] - rhat[b]) == torch.sign(target)  # [P]
        zero = delta.new_zeros(())
        metrics = {
            "pairs": torch.tensor(float(len(a))),
            "clipped_pair_frac": use_clip.to(delta.dtype).mean() if len(a) else zero,
            "clip_frac": outside[paired].to(delta.dtype).mean() if bool(paired.any()) else zero,
            "pair_accuracy": agree[differ].to(delta.dtype).mean() if bool(differ.any()) else zero + float("nan"),
            "rhat_mean": rhat[paired].mean() if bool(paired.any()) else zero,
            "drift": (delta - delta_old)[paired].abs().mean() if bool(paired.any()) else zero,
        }
    return loss, metrics
