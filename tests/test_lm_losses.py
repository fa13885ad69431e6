"""LM loss variants (GRPO, Dr.GRPO, DAPO, NFT) against independent float64 implementations of their
published formulas, NFT's on-policy gradient, micro-batch accumulation, and the shared-core identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl.config import load_config
from diffrl.core import nonconstant_groups
from diffrl.lm.losses import lm_loss, make_objective, micro_batch_share

T = 7
GROUPS = {7: 1, 2: 2, 11: 3, 0: 5, 5: 4, 9: 3}  # id -> size: a group of one (7), all-correct (5), all-wrong (9)


def lm_settings(algorithm, *overrides):
    return load_config(None, [f"algorithm={algorithm}", "model=toy-arith", "logging.log_with=none", *overrides]).lm


def random_batch(seed=0):
    """Shuffled rows of GROUPS with 0/1 rewards, token log-probs with ratios on both sides of every clip,
    right-padded masks (lengths 1..T) and garbage (finite) values on the padding."""
    rng = np.random.default_rng(seed)
    groups, rewards = [], []
    for gid, n in GROUPS.items():
        groups += [gid] * n
        if gid == 5:
            rewards += [1.0] * n
        elif gid == 9:
            rewards += [0.0] * n
        elif n == 1:
            rewards += [1.0]
        else:
            r = rng.integers(0, 2, size=n).astype(float)
            r[0], r[1] = 1.0, 0.0  # mixed
            rewards += list(r)
    perm = rng.permutation(len(groups))
    groups, rewards = np.asarray(groups)[perm], np.asarray(rewards)[perm]
    B = len(groups)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(float)  # [B, T]
    logp = -rng.uniform(0.05, 3.0, size=(B, T))
    logp_old = logp + rng.normal(0, 0.35, size=(B, T))  # ratios from ~0.4 to ~2.5
    logp_ref = logp + rng.normal(0, 0.3, size=(B, T))
    for x in (logp, logp_old, logp_ref):
        x[mask == 0] = rng.uniform(-50, 5, size=int((mask == 0).sum()))  # must never leak into the loss
    return dict(groups=groups, rewards=rewards, mask=mask, logp=logp, logp_old=logp_old, logp_ref=logp_ref)


# ---- independent references (numpy float64, explicit loops over rows and tokens) ------------------
def ref_advantages(rewards, groups, std, ddof=1, eps=1e-4):
    out = np.zeros_like(rewards)
    for g in np.unique(groups):
        idx = np.where(groups == g)[0]
        r = rewards[idx]
        if len(r) == 1 or np.all(r == r[0]):
            continue
        centred = r - r.mean()
        out[idx] = centred / (np.std(r, ddof=ddof) + eps) if std else centred
    return out


def ref_kl(lp, lpr, kind):
    if kind == "k1":
        return lp - lpr
    if kind == "k2":
        return 0.5 * (lp - lpr) ** 2
    return np.exp(lpr - lp) - (lpr - lp) - 1.0


def ref_loss(algorithm, lm, b):
    """The method's loss as its paper writes it, on the rows the method trains."""
    groups, rewards, mask = b["groups"], b["rewards"], b["mask"]
    rows = np.arange(len(groups))
    if lm.dynamic_sampling:  # DAPO / NFT recipes: only groups with 0 < accuracy < 1
        rows = np.array([i for i in rows if len(set(rewards[groups == groups[i]])) > 1])
    g, r, m = groups[rows], rewards[rows], mask[rows]
    lp, lpo, lpr = b["logp"][rows], b["logp_old"][rows], b["logp_ref"][rows]
    B = len(rows)
    tok = np.zeros((B, T))
    if algorithm == "lm_nft":
        for i in range(B):
            rhat = min(max(r[g == g[i]].mean(), 0.02), 0.98)
            for t in range(T):
                R = np.exp(lp[i, t] - lpo[i, t])
                if r[i] == 1:
                    tok[i, t] = -np.log(R)
                else:
                    tok[i, t] = -np.log(max((1 - rhat * R) / (1 - rhat), 1.0))
                tok[i, t] *= 1 - rhat
    else:
        adv = ref_advantages(r, g, std=algorithm != "lm_drgrpo")
        eps_lo, eps_hi = 0.2, 0.28 if algorithm == "lm_dapo" else 0.2
        for i in range(B):
            for t in range(T):
                rho = np.exp(lp[i, t] - lpo[i, t])
                tok[i, t] = max(-adv[i] * rho, -adv[i] * min(max(rho, 1 - eps_lo), 1 + eps_hi))
    if lm.kl_beta:
        tok = tok + lm.kl_beta * ref_kl(lp, lpr, lm.kl_estimator)
    if algorithm == "lm_grpo":  # 1/G sum_i 1/|o_i| sum_t
        return np.mean([(tok[i] * m[i]).sum() / m[i].sum() for i in range(B)])
    if algorithm == "lm_dapo":  # 1/sum_i |o_i| sum_i sum_t
        return (tok * m).sum() / m.sum()
    return np.mean([(tok[i] * m[i]).sum() / lm.max_new_tokens for i in range(B)])  # Dr.GRPO, NFT: constant


def ours(algorithm, lm, b, dtype=torch.float64):
    """The trainer's composition: dynamic filter -> objective targets -> lm_loss."""
    t = {k: torch.tensor(v, dtype=dtype) for k, v in b.items() if k not in ("groups",)}
    groups = torch.tensor(b["groups"])
    rows = torch.arange(len(groups))
    if lm.dynamic_sampling:
        rows = nonconstant_groups(t["rewards"], groups).nonzero().squeeze(1)
    objective = make_objective(algorithm, lm)
    targets = objective.targets({"exact_match": t["rewards"][rows]}, {"exact_match": 1.0}, groups[rows])
    logp = t["logp"][rows].clone().requires_grad_(True)
    loss, metrics = lm_loss(objective, logp, t["logp_old"][rows], t["mask"][rows], targets, t["logp_ref"][rows])
    return loss, logp, rows


CASES = [
    ("lm_grpo", []),  # k3 KL at beta 0.04 (DeepSeekMath)
    ("lm_grpo", ["lm.kl_estimator=k1", "lm.kl_beta=0.1"]),
    ("lm_drgrpo", []),
    ("lm_drgrpo", ["lm.kl_estimator=k2", "lm.kl_beta=0.05"]),
    ("lm_dapo", []),
    ("lm_nft", []),
    ("lm_nft", ["lm.kl_beta=0.02"]),
]


@pytest.mark.parametrize("algorithm, overrides", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_published_formula_float64(algorithm, overrides, seed):
    lm = lm_settings(algorithm, *overrides)
    b = random_batch(seed)
    loss, _, _ = ours(algorithm, lm, b)
    expected = ref_loss(algorithm, lm, b)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_algorithm_defaults_are_the_published_ones():
    grpo, drgrpo, dapo, nft = (lm_settings(a) for a in ("lm_grpo", "lm_drgrpo", "lm_dapo", "lm_nft"))
    assert (grpo.loss_aggregation, grpo.std_scope, grpo.clip_high, grpo.kl_beta, grpo.kl_estimator) == (
        "seq_mean_token_mean", "group", 0.2, 0.04, "k3")
    assert (drgrpo.loss_aggregation, drgrpo.std_scope, drgrpo.norm_constant, drgrpo.kl_beta) == (
        "seq_mean_token_sum_norm", "none", float(drgrpo.max_new_tokens), 0.0)
    assert (dapo.loss_aggregation, dapo.clip_low, dapo.clip_high, dapo.dynamic_sampling, dapo.kl_beta) == (
        "token_mean", 0.2, 0.28, True, 0.0)
    assert (nft.nft_rhat_clamp, nft.nft_negative_clamp, nft.dynamic_sampling) == ([0.02, 0.98], 1.0, True)
    assert not grpo.dynamic_sampling and not drgrpo.dynamic_sampling


def test_padding_never_leaks():
    """Changing log-probs on padded positions changes neither loss nor gradient."""
    for algorithm in ("lm_grpo", "lm_drgrpo", "lm_dapo", "lm_nft"):
        lm = lm_settings(algorithm)
        b = random_batch(3)
        loss_a, logp_a, rows = ours(algorithm, lm, b)
        loss_a.backward()
        pad = b["mask"] == 0
        for key in ("logp", "logp_old", "logp_ref"):
            b[key] = b[key].copy()
            b[key][pad] = -b[key][pad] * 3.7 + 1.0
        loss_b, logp_b, _ = ours(algorithm, lm, b)
        loss_b.backward()
        assert loss_a.item() == loss_b.item()
        torch.testing.assert_close(logp_a.grad, logp_b.grad, rtol=0, atol=0)
        assert (logp_a.grad[torch.tensor(pad)[rows]] == 0).all()
        assert logp_a.grad.abs().max() > 0


def test_nft_gradient_matches_the_analytic_derivative():
    """The gradient-preserving clamp: where (1 - rhat R)/(1 - rhat) < 1 is clamped in value, the gradient
    is still d/dlogp [-log proxy] / clamp-scaled: (1 - rhat) rhat R / ((1 - rhat) max(proxy, 1))."""
    lm = lm_settings("lm_nft", "lm.loss_aggregation=seq_mean_token_sum")
    b = random_batch(4)
    loss, logp, _ = ours("lm_nft", lm, b)
    loss.backward()
    groups, r, m = b["groups"], b["rewards"], b["mask"]
    rows = [i for i in range(len(groups)) if len(set(r[groups == groups[i]])) > 1]
    expected = np.zeros((len(rows), T))
    for k, i in enumerate(rows):
        rhat = min(max(r[groups == groups[i]].mean(), 0.02), 0.98)
        for t in range(T):
            if not m[i, t]:
                continue
            R = np.exp(b["logp"][i, t] - b["logp_old"][i, t])
            if r[i] == 1:
                d = -1.0  # d(-log R)/dlogp
            else:
                proxy = (1 - rhat * R) / (1 - rhat)
                d = (rhat * R / (1 - rhat)) / max(proxy, 1.0)
            expected[k, t] = (1 - rhat) * d / len(rows)
    clamped = sum(1 for k, i in enumerate(rows) for t in range(T)
                  if m[i, t] and r[i] == 0 and np.exp(b["logp"][i, t] - b["logp_old"][i, t]) > 1)
    assert clamped > 3  # the clamp was active on several tokens, and their gradient survived
    torch.testing.assert_close(logp.grad, torch.tensor(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_sum_norm", "token_mean", "seq_mean_token_mean"])
def test_nft_on_policy_gradient_is_the_group_mean_baseline_policy_gradient(aggregation):
    """At logp_old = logp (R = 1), NFT's gradient equals Dr.GRPO's -(c - mean_g c) grad log pi for
    groups whose accuracy lies inside the rhat clamp."""
    b = random_batch(5)
    keep = np.array([len(set(b["rewards"][b["groups"] == g])) > 1 for g in b["groups"]])
    b = {k: v[keep] for k, v in b.items()}  # mixed groups only (what dynamic sampling trains)
    b["logp_old"] = b["logp"].copy()
    nft = lm_settings("lm_nft", f"lm.loss_aggregation={aggregation}", "lm.dynamic_sampling=false")
    drgrpo = lm_settings("lm_drgrpo", f"lm.loss_aggregation={aggregation}")
    loss_nft, g_nft, _ = ours("lm_nft", nft, b)
    loss_pg, g_pg, _ = ours("lm_drgrpo", drgrpo, b)
    loss_nft.backward()
    loss_pg.backward()
    assert g_nft.grad.abs().max() > 1e-3
    torch.testing.assert_close(g_nft.grad, g_pg.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean", "seq_mean_token_sum"])
def test_micro_batch_shares_reassemble_the_batch_loss(aggregation):
    """Gradient accumulation over uneven micro-batches, each scaled by micro_batch_share, gives exactly the
    whole mini-batch's aggregated loss (what the trainer relies on)."""
    lm = lm_settings("lm_grpo", f"lm.loss_aggregation={aggregation}")
    b = random_batch(6)
    whole, _, _ = ours("lm_grpo", lm, b)
    objective = make_objective("lm_grpo", lm)
    t = {k: torch.tensor(v) for k, v in b.items()}
    targets = objective.targets({"r": t["rewards"]}, {"r": 1.0}, t["groups"])
    total = 0.0
    B = len(b["groups"])
    for rows in (torch.arange(0, 5), torch.arange(5, 6), torch.arange(6, B)):
        mask = t["mask"][rows]
        loss, _ = lm_loss(objective, t["logp"][rows], t["logp_old"][rows], mask, {k: v[rows] for k, v in targets.items()},
                          t["logp_ref"][rows])
        total = total + loss * micro_batch_share(aggregation, float(mask.sum()), len(rows), B, float(t["mask"].sum()))
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)


def test_diffusion_and_lm_share_the_same_core_functions():
    """One copy of the maths: the diffusion trainers and the LM objectives hold the very same function
    objects from diffrl.core."""
    import diffrl.core as core
    import diffrl.core.losses
    import diffrl.lm.losses as lm_losses
    import diffrl.lm.trainer as lm_trainer
    import diffrl.trainers.grpo as diffusion_grpo
    import diffrl.trainers.loop as diffusion_loop

    assert lm_losses.clipped_surrogate is diffusion_grpo.clipped_surrogate is core.clipped_surrogate
    assert core.clipped_surrogate is diffrl.core.losses.clipped_surrogate
    assert lm_trainer.zero_std_fraction is diffusion_loop.zero_std_fraction is core.zero_std_fraction
    for name in ("aggregate", "combine_rewards", "kl_estimator", "nft_correct_rate", "nft_token_loss"):
        assert getattr(lm_losses, name) is getattr(core, name), name
    assert core.nft_correct_rate.__module__ == "diffrl.core.negative_aware"
    assert core.nonconstant_groups.__module__ == "diffrl.core.advantages"


def test_nonconstant_groups_and_gradient_preserving_clamp_hand_values():
    from diffrl.core import gradient_preserving_clamp

    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.25])
    g = torch.tensor([3, 3, 4, 4, 5, 5, 8, 9, 9])  # all correct, mixed, all wrong, a group of one, continuous
    assert nonconstant_groups(r, g).tolist() == [False, False, True, True, False, False, False, True, True]
    x = torch.tensor([0.2, 1.5, 3.0], requires_grad=True)
    y = gradient_preserving_clamp(x, min=1.0, max=2.0)
    assert y.tolist() == [1.0, 1.5, 2.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]  # a plain clamp would give [0, 2, 0]
