"""Group-relative advantages (GRPO family) and a per-prompt statistics tracker.

Conventions, all explicit arguments and pinned by ``tests/test_core.py``:

* ``A_i = (r_i - mean_g(r)) / (std + eps)``; ``eps`` is *added to the std* (Flow-GRPO, DanceGRPO:
  ``eps = 1e-4``).
* ``ddof`` selects population (``0``, numpy's default and Flow-GRPO's) or sample (``1``, torch's
  default and TRL's) standard deviation. When ``n - ddof <= 0`` (e.g. ``ddof=1`` and a group of one)
  the std is undefined; we define it as ``0``. Such a group's centred reward is ``0`` anyway.
* A group whose rewards are all equal (including a group of one) gets advantages of exactly ``0``
  (no floating-point residue from ``r - mean``), whatever the std scope.
* ``std_scope``: ``"group"`` per-group std (DeepSeekMath GRPO, DanceGRPO), ``"global"`` std over the
  whole batch of raw rewards with per-group mean (Flow-GRPO, DiffusionNFT), ``"none"`` no division
  (Dr.GRPO, Liu et al. 2025).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .registry import Registry

__all__ = [
    "ADVANTAGES",
    "STD_SCOPES",
    "PerPromptStatTracker",
    "combine_rewards",
    "group_advantages",
    "nonconstant_groups",
    "rloo_advantages",
    "zero_std_fraction",
]

STD_SCOPES = ("group", "global", "none")
COMBINE_MODES = ("sum_then_normalize", "normalize_then_sum")

ADVANTAGES: Registry = Registry("advantage estimator")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_inputs(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if not isinstance(group_ids, Tensor) or group_ids.dim() != 1 or group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"group_ids must be a 1-D tensor with the same length as rewards ({rewards.shape[0]}), "
            f"got {getattr(group_ids, 'shape', type(group_ids))}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if rewards.shape[0] == 0:
        raise ValueError("rewards is empty")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    return rewards, group_ids.to(rewards.device)


def _check_scope(std_scope: str, ddof: int, eps: float) -> None:
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


def _std(values: Tensor, ddof: int) -> Tensor:
    """Std of a 1-D tensor with ``ddof``; ``0`` when ``n - ddof <= 0`` (documented convention)."""
    n = values.shape[0]
    if n - ddof <= 0:
        return values.new_zeros(())
    return values.std(correction=ddof)


def _safe_denominator(denom: Tensor) -> Tensor:
    """Replace zero denominators by 1: they only occur with ``eps = 0`` where the centred reward is
    exactly 0 (constant group), so the advantage stays 0 instead of 0/0 = NaN."""
    return torch.where(denom > 0, denom, torch.ones_like(denom))


class _Groups:
    """Per-group statistics of a 1-D tensor, computed with index_add (no Python loop over groups)."""

    def __init__(self, values: Tensor, group_ids: Tensor, ddof: int) -> None:
        _, inv = torch.unique(group_ids, return_inverse=True)  # [B]
        g = int(inv.max().item()) + 1
        self.inv = inv
        self.counts = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(
            0, inv, torch.ones_like(values)
        )  # [G]
        sums = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, inv, values)  # [G]
        self.mean = sums / self.counts  # [G]
        gmax = torch.full((g,), -torch.inf, dtype=values.dtype, device=values.device)
        gmax = gmax.scatter_reduce(0, inv, values, reduce="amax")  # [G]
        gmin = torch.full((g,), torch.inf, dtype=values.dtype, device=values.device)
        gmin = gmin.scatter_reduce(0, inv, values, reduce="amin")  # [G]
        self.constant = gmax == gmin  # [G]  all rewards equal (includes groups of one)
        centered = values - self.mean[inv]  # [B]
        self.centered = torch.where(self.constant[inv], torch.zeros_like(centered), centered)  # [B]
        sq = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, inv, self.centered**2)  # [G]
        dof = self.counts - ddof  # [G]
        var = torch.where(dof > 0, sq / dof.clamp(min=1), torch.zeros_like(sq))  # [G]
        self.std = var.sqrt()  # [G]


# --------------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_scope: str = "group",
    ddof: int = 0,
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """Group-relative advantages ``(r - mean_group) / (std + eps)``.

    Args:
        rewards: ``[B]`` scalar rewards (float32/float64, any device).
        group_ids: ``[B]`` integer id of each sample's group (the prompt); ids need not be contiguous.
        std_scope: ``"group"`` (GRPO, DanceGRPO), ``"global"`` (Flow-GRPO / DiffusionNFT: std of all
            rewards in the batch), ``"none"`` (Dr.GRPO: mean-centering only, ``eps`` unused).
        ddof: ``0`` population std (Flow-GRPO, numpy), ``1`` sample std (TRL). With ``n - ddof <= 0``
            the std is taken as 0.
        eps: added to the std before dividing (Flow-GRPO: 1e-4).
        clip: if given, clamp the advantages to ``[-clip, clip]`` (Flow-GRPO: 5).

    Returns:
        ``[B]`` advantages in ``rewards``' dtype. Groups with equal rewards (or of size one) get exactly 0.
    """
    _check_scope(std_scope, ddof, eps)
    rewards, group_ids = _check_inputs(rewards, group_ids)
    groups = _Groups(rewards, group_ids, ddof)
    if std_scope == "group":
        adv = groups.centered / _safe_denominator(groups.std[groups.inv] + eps)  # [B]
    elif std_scope == "global":
        adv = groups.centered / _safe_denominator(_std(rewards, ddof) + eps)  # [B]
    else:  # "none"
        adv = groups.centered  # [B]
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip!r}")
        adv = adv.clamp(-clip, clip)  # [B]
    return adv


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out (RLOO, Kool et al. 2019; Ahmadian et al. 2024) advantages.

    ``A_i = r_i - mean_{j != i, j in g} r_j = G / (G - 1) * (r_i - mean_g)``. A group of one has no
    baseline and gets advantage 0.
    """
    rewards, group_ids = _check_inputs(rewards, group_ids)
    groups = _Groups(rewards, group_ids, ddof=0)
    g = groups.counts[groups.inv]  # [B]
    scale = torch.where(g > 1, g / (g - 1).clamp(min=1), torch.zeros_like(g))  # [B]
    return scale * groups.centered  # [B]


def nonconstant_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """``[B]`` bool: True for the samples whose group's rewards are not all equal.

    DAPO's dynamic sampling (Yu et al. 2025) keeps only these: a group that is all correct or all
    wrong (any constant-reward group, including a group of one) has zero group-relative advantage
    and gives no gradient, so it only dilutes the batch.
    """
    rewards, group_ids = _check_inputs(rewards, group_ids)
    groups = _Groups(rewards, group_ids, ddof=0)
    return ~groups.constant[groups.inv]  # [B]


def zero_std_fraction(rewards: Tensor, group_ids: Tensor, atol: float = 0.0) -> float:
    """Fraction of groups whose rewards all lie within ``atol`` of each other (``max - min <= atol``).

    Such groups give no learning signal under group normalisation (DAPO's "dynamic sampling"
    motivation). Groups of one count as zero-std.
    """
    rewards, group_ids = _check_inputs(rewards, group_ids)
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B]
    g = int(inv.max().item()) + 1
    gmax = torch.full((g,), -torch.inf, dtype=rewards.dtype, device=rewards.device).scatter_reduce(
        0, inv, rewards, reduce="amax"
    )  # [G]
    gmin = torch.full((g,), torch.inf, dtype=rewards.dtype, device=rewards.device).scatter_reduce(
        0, inv, rewards, reduce="amin"
    )  # [G]
    return float(((gmax - gmin) <= atol).float().mean().item())


def combine_rewards(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float | Tensor],
    group_ids: Tensor,
    mode: str = "sum_then_normalize",
    **adv_kwargs,
) -> Tensor:
    """Combine several rewards into one advantage per sample.

    Modes:
        ``"sum_then_normalize"``: ``group_advantages(sum_k w_k r_k)`` (Flow-GRPO multi-reward).
        ``"normalize_then_sum"``: GDPO / MR-GRPO: ``a_k = group_advantages(r_k)`` per reward, then
            ``s = sum_k w_k a_k`` and the batch normalisation ``(s - mean(s)) / (std(s) + eps)``
            (``ddof`` and ``eps`` from ``adv_kwargs``).

    ``weights[k]`` is a float or a per-sample ``[B]`` tensor (weights that depend on the prompt's
    source set). Where a reward's weight is 0 it is not part of the sample's score: its value there is
    ignored (it may be NaN, e.g. OCR on a prompt without text) and, in ``normalize_then_sum``, the reward's
    group normalisation runs over the samples where its weight is non-zero only. ``adv_kwargs``
    (``std_scope``, ``ddof``, ``eps``, ``clip``) go to :func:`group_advantages`; ``clip`` is applied once,
    to the final advantages.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"mode must be one of {COMBINE_MODES}, got {mode!r}")
    if not rewards:
        raise ValueError("rewards is empty")
    missing = sorted(set(rewards) - set(weights))
    extra = sorted(set(weights) - set(rewards))
    if missing or extra:
        raise ValueError(f"rewards and weights must have the same keys; missing weights: {missing}, "
                         f"weights without a reward: {extra}")
    unknown = sorted(set(adv_kwargs) - {"std_scope", "ddof", "eps", "clip"})
    if unknown:
        raise ValueError(f"unknown advantage kwargs {unknown}; valid: std_scope, ddof, eps, clip")
    clip = adv_kwargs.pop("clip", None)
    ddof = adv_kwargs.get("ddof", 0)
    eps = adv_kwargs.get("eps", 1e-4)

    names = list(rewards)
    shape, dtype = rewards[names[0]].shape, rewards[names[0]].dtype
    w, active, values = {}, {}, {}
    for name in names:
        if rewards[name].shape != shape:
            raise ValueError(f"all rewards must have the same shape; {name!r} has {tuple(rewards[name].shape)}, "
                             f"{names[0]!r} has {tuple(shape)}")
        value = rewards[name].to(dtype)  # [B]
        weight = torch.as_tensor(weights[name], device=value.device, dtype=dtype)  # [] or [B]
        if weight.ndim and weight.shape != shape:
            raise ValueError(f"weight tensor for {name!r} must have shape {tuple(shape)}, got {tuple(weight.shape)}")
        w[name] = weight.expand(shape)  # [B]
        active[name] = w[name] != 0  # [B]
        if not bool(torch.isfinite(value[active[name]]).all()):
            raise ValueError(f"reward {name!r} has non-finite values where its weight is non-zero; pass only the valid samples")
        values[name] = torch.where(active[name], value, torch.zeros_like(value))  # [B]

    if mode == "sum_then_normalize":
        total = sum(w[n] * values[n] for n in names)  # [B]
        adv = group_advantages(total, group_ids, **adv_kwargs)  # [B]
    else:
        total = torch.zeros(shape, dtype=dtype, device=values[names[0]].device)  # [B]
        for n in names:
            if bool(active[n].any()):
                a = torch.zeros_like(total)  # [B]
                a[active[n]] = group_advantages(values[n][active[n]], group_ids[active[n]], **adv_kwargs)
                total = total + w[n] * a
        adv = (total - total.mean()) / _safe_denominator(_std(total, ddof) + eps)  # [B]
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip!r}")
        adv = adv.clamp(-clip, clip)  # [B]
    return adv


# --------------------------------------------------------------------------------------------------
# per-prompt tracker
# --------------------------------------------------------------------------------------------------
class PerPromptStatTracker:
    """Advantages with the mean taken per prompt *string* (Flow-GRPO's ``PerPromptStatTracker``).

    Args:
        std_scope: ``"global"`` (Flow-GRPO default: std of the current batch's rewards), ``"group"``
            (std of this prompt's rewards / history) or ``"none"`` (Dr.GRPO).
        ddof: 0 population std, 1 sample std; with ``n - ddof <= 0`` the std is taken as 0.
        eps: added to the std.
        keep_history: if True, every prompt's rewards accumulate across :meth:`update` calls and the
            per-prompt mean (and ``"group"`` std) use the whole history including the current batch;
            if False only the current batch is used. The ``"global"`` std is always over the
            current batch.

    Prompts whose statistics set has all-equal rewards get advantage 0.
    """

    def __init__(self, std_scope: str = "global", ddof: int = 0, eps: float = 1e-4, keep_history: bool = False) -> None:
        _check_scope(std_scope, ddof, eps)
        self.std_scope = std_scope
        self.ddof = ddof
        self.eps = eps
        self.keep_history = keep_history
        self.history: dict[str, list[float]] = {}
        self._last: dict[str, float] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Return ``[B]`` advantages for ``rewards`` ``[B]`` of samples of ``prompts`` (length B)."""
        if len(prompts) != (rewards.shape[0] if isinstance(rewards, Tensor) and rewards.dim() == 1 else -1):
            raise ValueError(f"need one prompt per reward: {len(prompts)} prompts, rewards shape "
                             f"{tuple(getattr(rewards, 'shape', ()))}")
        rewards, _ = _check_inputs(rewards, torch.zeros(len(prompts), dtype=torch.long))
        values = rewards.detach().to("cpu", torch.float64)  # [B]
        index: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            index.setdefault(p, []).append(i)
        batch_std = float(_std(values, self.ddof))
        adv = torch.zeros_like(values)  # [B]
        n_constant = 0
        for prompt, idx in index.items():
            current = values[idx]  # [n]
            if self.keep_history:
                self.history.setdefault(prompt, []).extend(current.tolist())
                ref = torch.tensor(self.history[prompt], dtype=torch.float64)  # [H]
            else:
                ref = current
            if bool(ref.max() == ref.min()):
                n_constant += 1
                continue  # advantages stay 0
            centered = current - ref.mean()  # [n]
            if self.std_scope == "group":
                adv[idx] = centered / (float(_std(ref, self.ddof)) + self.eps)
            elif self.std_scope == "global":
                adv[idx] = centered / (batch_std + self.eps)
            else:
                adv[idx] = centered
        self._last = {
            "num_prompts": float(len(index)),
            "mean_group_size": float(len(prompts) / len(index)),
            "zero_std_fraction": float(n_constant / len(index)),
            "history_prompts": float(len(self.history)),
            "history_samples": float(sum(len(v) for v in self.history.values())),
        }
        return adv.to(device=rewards.device, dtype=rewards.dtype)

    def stats(self) -> dict[str, float]:
        """Statistics of the last :meth:`update`: number of prompts, mean group size, fraction of
        zero-std prompts, and the history size."""
        return dict(self._last)

    def clear(self) -> None:
        """Forget the history (Flow-GRPO clears after every epoch when not keeping history)."""
        self.history.clear()
        self._last = {}

    def state_dict(self) -> dict:
        """JSON-serialisable state (config and per-prompt history as lists of floats)."""
        return {
            "std_scope": self.std_scope,
            "ddof": self.ddof,
            "eps": self.eps,
            "keep_history": self.keep_history,
            "history": {p: list(map(float, v)) for p, v in self.history.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; a config mismatch raises ``ValueError`` naming the fields."""
        mismatched = [k for k in ("std_scope", "ddof", "eps", "keep_history") if k in state and state[k] != getattr(self, k)]
        if mismatched:
            raise ValueError("PerPromptStatTracker state does not match this tracker's config: " + ", ".join(
                f"{k}={state[k]!r} (tracker has {getattr(self, k)!r})" for k in mismatched))
        self.history = {str(p): [float(x) for x in v] for p, v in state.get("history", {}).items()}
        self._last = {}


# --------------------------------------------------------------------------------------------------
# registry: every estimator takes (rewards [B], group_ids [B], **kwargs) -> [B]
# --------------------------------------------------------------------------------------------------
@ADVANTAGES.register("group")
def _group(rewards: Tensor, group_ids: Tensor, **kwargs) -> Tensor:
    """Per-group mean and std (GRPO, DanceGRPO)."""
    return group_advantages(rewards, group_ids, std_scope="group", **kwargs)


@ADVANTAGES.register("global_std")
def _global_std(rewards: Tensor, group_ids: Tensor, **kwargs) -> Tensor:
    """Per-group mean, batch std (Flow-GRPO, DiffusionNFT)."""
    return group_advantages(rewards, group_ids, std_scope="global", **kwargs)


@ADVANTAGES.register("drgrpo")
def _drgrpo(rewards: Tensor, group_ids: Tensor, **kwargs) -> Tensor:
    """Per-group mean, no std division (Dr.GRPO)."""
    return group_advantages(rewards, group_ids, std_scope="none", **kwargs)


@ADVANTAGES.register("rloo")
def _rloo(rewards: Tensor, group_ids: Tensor, **kwargs) -> Tensor:
    """Leave-one-out baseline (RLOO); accepts ``clip`` only."""
    clip = kwargs.pop("clip", None)
    if kwargs:
        raise ValueError(f"rloo takes no options besides clip, got {sorted(kwargs)}")
    adv = rloo_advantages(rewards, group_ids)  # [B]
    return adv if clip is None else adv.clamp(-clip, clip)
