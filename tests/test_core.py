"""Property tests for diffrl.core against hand computations and independent float64 references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffrl.core import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    LOSSES,
    PerPromptStatTracker,
    Registry,
    aggregate,
    clipped_surrogate,
    combine_rewards,
    flow_grpo_kl,
    gaussian_kl,
    group_advantages,
    kl_estimator,
    log_ratio_to_ratio,
    rloo_advantages,
    zero_std_fraction,
)

EPS = 1e-4
DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# independent references (numpy float64, explicit loops)
# --------------------------------------------------------------------------------------------------
def ref_group_adv(rewards, groups, std_scope, ddof, eps):
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(groups)
    out = np.zeros_like(r)
    n_all = len(r)
    global_std = np.std(r, ddof=ddof) if n_all - ddof > 0 else 0.0
    for gid in np.unique(g):
        idx = np.where(g == gid)[0]
        vals = r[idx]
        if np.all(vals == vals[0]):
            continue  # zero-std group (includes groups of one): advantage 0
        mean = vals.mean()
        if std_scope == "group":
            std = np.std(vals, ddof=ddof) if len(vals) - ddof > 0 else 0.0
            out[idx] = (vals - mean) / (std + eps)
        elif std_scope == "global":
            out[idx] = (vals - mean) / (global_std + eps)
        else:
            out[idx] = vals - mean
    return out


def random_batch(seed=0):
    """Groups of sizes 1, 2, 3, 5 and a constant group of 4, non-contiguous ids, shuffled."""
    rng = np.random.default_rng(seed)
    sizes = {7: 1, 2: 2, 11: 3, 0: 5, 5: 4}
    groups, rewards = [], []
    for gid, n in sizes.items():
        groups += [gid] * n
        rewards += [0.25] * n if gid == 5 else list(rng.normal(size=n))
    perm = rng.permutation(len(groups))
    return np.asarray(rewards)[perm], np.asarray(groups)[perm]


# --------------------------------------------------------------------------------------------------
# group advantages
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages_hand_values(dtype):
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    g = torch.tensor([0, 0, 1, 1])
    sign = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=dtype)
    # r - mean_group = +-0.5; population std of {1,2} is 0.5, sample std sqrt(0.5)
    torch.testing.assert_close(group_advantages(r, g, ddof=0, eps=EPS), sign * 0.5 / (0.5 + EPS), **tol(dtype))
    torch.testing.assert_close(
        group_advantages(r, g, ddof=1, eps=EPS), sign * 0.5 / (math.sqrt(0.5) + EPS), **tol(dtype)
    )
    # global: population std of {1,2,3,4} is sqrt(1.25)
    torch.testing.assert_close(
        group_advantages(r, g, std_scope="global", ddof=0, eps=EPS), sign * 0.5 / (math.sqrt(1.25) + EPS), **tol(dtype)
    )
    torch.testing.assert_close(group_advantages(r, g, std_scope="none"), sign * 0.5, **tol(dtype))
    assert group_advantages(r, g).dtype == dtype


@pytest.mark.parametrize("std_scope", ["group", "global", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_group_advantages_match_reference(std_scope, ddof, dtype, device):
    r, g = random_batch()
    ours = group_advantages(
        torch.tensor(r, dtype=dtype, device=device), torch.tensor(g, device=device), std_scope=std_scope, ddof=ddof, eps=EPS
    )
    assert ours.device.type == device and ours.dtype == dtype
    expected = torch.tensor(ref_group_adv(r, g, std_scope, ddof, EPS), dtype=dtype, device=device)
    torch.testing.assert_close(ours, expected, **tol(dtype))


def test_group_of_one_and_zero_std_groups_are_exactly_zero():
    r, g = random_batch()
    for ddof in (0, 1):
        for scope in ("group", "global", "none"):
            a = group_advantages(torch.tensor(r), torch.tensor(g), std_scope=scope, ddof=ddof)
            assert torch.isfinite(a).all()
            assert (a[torch.tensor(g == 7)] == 0).all()  # group of one
            assert (a[torch.tensor(g == 5)] == 0).all()  # constant group
    # constant values that do not survive sum/n exactly in binary floating point
    a = group_advantages(torch.full((3,), 0.1, dtype=torch.float32), torch.zeros(3, dtype=torch.long))
    assert (a == 0).all()
    # single sample, sample std undefined -> treated as 0, advantage 0
    assert group_advantages(torch.tensor([3.0]), torch.tensor([0]), ddof=1).item() == 0.0


def test_group_advantages_zero_mean_unit_std_per_group():
    r, g = random_batch(3)
    a = group_advantages(torch.tensor(r), torch.tensor(g), ddof=0, eps=0.0)
    for gid in (2, 11, 0):
        ag = a[torch.tensor(g == gid)]
        assert abs(ag.mean().item()) < 1e-12
        assert abs(ag.std(correction=0).item() - 1.0) < 1e-12


def test_group_advantages_clip_and_validation():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 100.0])
    g = torch.zeros(5, dtype=torch.long)
    a = group_advantages(r, g, clip=1.5)
    assert a.max().item() == 1.5 and a.min().item() >= -1.5
    with pytest.raises(ValueError, match="std_scope"):
        group_advantages(r, g, std_scope="batch")
    with pytest.raises(ValueError, match="ddof"):
        group_advantages(r, g, ddof=2)
    with pytest.raises(ValueError, match="same length"):
        group_advantages(r, g[:3])
    with pytest.raises(ValueError, match="integer"):
        group_advantages(r, g.float())
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


# --------------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_rloo_equals_explicit_leave_one_out(dtype):
    r, g = random_batch(1)
    expected = []
    for i in range(len(r)):
        others = [r[j] for j in range(len(r)) if j != i and g[j] == g[i]]
        expected.append(0.0 if not others else r[i] - sum(others) / len(others))
    ours = rloo_advantages(torch.tensor(r, dtype=dtype), torch.tensor(g))
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=dtype), **tol(dtype))
    assert (ours[torch.tensor(g == 7)] == 0).all()


def test_rloo_hand_value():
    # group {1, 2, 6}: baselines 4, 3.5, 1.5
    a = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([4, 4, 4]))
    torch.testing.assert_close(a, torch.tensor([-3.0, -1.5, 4.5]))


def test_advantage_registry_estimators():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 1, 1])
    assert set(ADVANTAGES.names()) == {"group", "global_std", "drgrpo", "rloo"}
    torch.testing.assert_close(ADVANTAGES.get("drgrpo")(r, g), torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(ADVANTAGES.get("rloo")(r, g), torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        ADVANTAGES.get("global_std")(r, g, eps=0.0), torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=torch.float64) / math.sqrt(1.25)
    )
    torch.testing.assert_close(ADVANTAGES.get("group")(r, g, eps=0.0), torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# zero-std fraction
# --------------------------------------------------------------------------------------------------
def test_zero_std_fraction():
    r = torch.tensor([1.0, 1.0, 2.0, 3.0, 5.0])
    g = torch.tensor([0, 0, 1, 1, 2])
    assert zero_std_fraction(r, g) == pytest.approx(2 / 3)  # constant group and group of one
    assert zero_std_fraction(torch.tensor([1.0, 1.05, 2.0, 3.0]), torch.tensor([0, 0, 1, 1]), atol=0.1) == 0.5
    assert zero_std_fraction(torch.tensor([1.0, 1.05]), torch.tensor([0, 0])) == 0.0


# --------------------------------------------------------------------------------------------------
# per-prompt stat tracker
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("std_scope", ["group", "global", "none"])
def test_tracker_without_history_matches_reference(std_scope):
    prompts = ["a", "b", "a", "c", "b", "a", "d", "d"]
    r = np.array([1.0, 5.0, 2.0, 7.0, 3.0, 6.0, 4.0, 4.0])
    ids = {"a": 0, "b": 1, "c": 2, "d": 3}
    expected = ref_group_adv(r, [ids[p] for p in prompts], std_scope, 0, EPS)
    tr = PerPromptStatTracker(std_scope=std_scope, ddof=0, eps=EPS)
    torch.testing.assert_close(tr.update(prompts, torch.tensor(r)), torch.tensor(expected))
    # second call without history: same answer
    torch.testing.assert_close(tr.update(prompts, torch.tensor(r)), torch.tensor(expected))
    s = tr.stats()
    assert s["num_prompts"] == 4
    assert s["mean_group_size"] == 2.0
    assert s["zero_std_fraction"] == 0.5  # "c" (single) and "d" (constant)


def test_tracker_with_history_uses_all_past_rewards():
    tr = PerPromptStatTracker(std_scope="group", ddof=0, eps=0.0, keep_history=True)
    a1 = tr.update(["x", "x"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(a1, torch.tensor([-1.0, 1.0]))
    # history for x: {0, 2, 4, 6}: mean 3, population std sqrt(5)
    a2 = tr.update(["x", "x", "y", "y"], torch.tensor([4.0, 6.0, 1.0, 3.0]))
    torch.testing.assert_close(a2, torch.tensor([1 / math.sqrt(5), 3 / math.sqrt(5), -1.0, 1.0]))
    assert tr.stats()["history_samples"] == 6 and tr.stats()["history_prompts"] == 2
    tr.clear()
    assert tr.history == {}
    torch.testing.assert_close(tr.update(["x", "x"], torch.tensor([4.0, 6.0])), torch.tensor([-1.0, 1.0]))


def test_tracker_state_dict_roundtrip_through_json():
    tr = PerPromptStatTracker(std_scope="global", ddof=1, eps=EPS, keep_history=True)
    tr.update(["p", "q", "p", "q"], torch.tensor([0.1, 0.7, 0.4, 0.2]))
    state = json.loads(json.dumps(tr.state_dict()))
    restored = PerPromptStatTracker(std_scope="global", ddof=1, eps=EPS, keep_history=True)
    restored.load_state_dict(state)
    nxt = (["p", "q", "r", "p"], torch.tensor([0.3, 0.9, 0.5, 0.8], dtype=torch.float64))
    assert torch.equal(tr.update(*nxt), restored.update(*nxt))
    with pytest.raises(ValueError, match="ddof"):
        PerPromptStatTracker(std_scope="global", ddof=0, keep_history=True).load_state_dict(state)


def test_tracker_validation():
    with pytest.raises(ValueError, match="one prompt per reward"):
        PerPromptStatTracker().update(["a"], torch.tensor([1.0, 2.0]))


# --------------------------------------------------------------------------------------------------
# multi-reward combination
# --------------------------------------------------------------------------------------------------
def test_combine_sum_then_normalize_matches_reference():
    r, g = random_batch(2)
    r2 = np.random.default_rng(5).uniform(size=len(r))
    ours = combine_rewards(
        {"a": torch.tensor(r), "b": torch.tensor(r2)}, {"a": 2.0, "b": 0.5}, torch.tensor(g), std_scope="group", ddof=0
    )
    torch.testing.assert_close(ours, torch.tensor(ref_group_adv(2.0 * r + 0.5 * r2, g, "group", 0, EPS)))


def test_combine_normalize_then_sum_matches_reference_with_per_sample_weights():
    r, g = random_batch(4)
    r2 = np.random.default_rng(6).uniform(size=len(r)) * 100.0  # very different scale
    w_a = np.where(g % 2 == 0, 1.0, 0.25)  # weights depending on the prompt's source set
    s = w_a * ref_group_adv(r, g, "group", 1, EPS) + 0.5 * ref_group_adv(r2, g, "group", 1, EPS)
    expected = (s - s.mean()) / (np.std(s, ddof=1) + EPS)
    ours = combine_rewards(
        {"a": torch.tensor(r), "b": torch.tensor(r2)},
        {"a": torch.tensor(w_a), "b": 0.5},
        torch.tensor(g),
        mode="normalize_then_sum",
        std_scope="group",
        ddof=1,
        eps=EPS,
    )
    torch.testing.assert_close(ours, torch.tensor(expected))
    assert abs(ours.mean().item()) < 1e-12


def test_combine_normalize_then_sum_is_scale_invariant_per_reward():
    r, g = random_batch(7)
    r2 = np.random.default_rng(8).normal(size=len(r))
    base = combine_rewards({"a": torch.tensor(r), "b": torch.tensor(r2)}, {"a": 1.0, "b": 1.0}, torch.tensor(g),
                           mode="normalize_then_sum", eps=0.0)
    scaled = combine_rewards({"a": torch.tensor(r), "b": torch.tensor(1000.0 * r2)}, {"a": 1.0, "b": 1.0},
                             torch.tensor(g), mode="normalize_then_sum", eps=0.0)
    torch.testing.assert_close(base, scaled)


def test_combine_validation_and_clip():
    g = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="missing weights"):
        combine_rewards({"a": torch.tensor([1.0, 2.0])}, {}, g)
    with pytest.raises(ValueError, match="mode"):
        combine_rewards({"a": torch.tensor([1.0, 2.0])}, {"a": 1.0}, g, mode="avg")
    a = combine_rewards({"a": torch.tensor([1.0, 2.0])}, {"a": 1.0}, g, std_scope="none", clip=0.25)
    torch.testing.assert_close(a, torch.tensor([-0.25, 0.25]))


# --------------------------------------------------------------------------------------------------
# clipped surrogate
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_surrogate_hand_values(dtype):
    e = math.e
    # log-ratios 1 (ratio e) and -1 (ratio 1/e); advantages +1 and -1
    logp = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.1], dtype=dtype)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0], dtype=dtype)
    loss, m = clipped_surrogate(logp, torch.zeros_like(logp), adv, clip_low=0.2)
    expected = torch.tensor([-1.2, e, 0.8, -1 / e, -math.exp(0.1)], dtype=dtype)
    torch.testing.assert_close(loss, expected, **tol(dtype))
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)  # ratio e, A > 0
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)  # ratio 1/e, A < 0
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert m["ratio_out_of_range_frac"].item() == pytest.approx(4 / 5)
    assert m["ratio_max"].item() == pytest.approx(e, rel=1e-6)
    assert m["ratio_min"].item() == pytest.approx(1 / e, rel=1e-6)
    assert m["ratio_mean"].item() == pytest.approx((2 * e + 2 / e + math.exp(0.1)) / 5, rel=1e-6)


def test_clipped_surrogate_asymmetric_clip_higher():
    loss, _ = clipped_surrogate(torch.tensor([1.0, -1.0]), torch.zeros(2), torch.tensor([1.0, -1.0]),
                                clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8]))


def test_clipped_surrogate_gradients():
    logp = torch.tensor([1.0, 1.0, -1.0, 0.05], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    loss, _ = clipped_surrogate(logp, torch.zeros(4, dtype=torch.float64), adv, clip_low=0.2)
    loss.sum().backward()
    # d(-A rho)/dlogp = -A rho; zero where the clipped branch is active
    expected = torch.tensor([0.0, math.e, 0.0, -2.0 * math.exp(0.05)], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_clipped_surrogate_dual_clip():
    logp = torch.tensor([2.0, 1.0, 2.0], requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 1.0])
    loss, m = clipped_surrogate(logp, torch.zeros(3), adv, clip_low=0.2, dual_clip=3.0)
    # A<0, ratio e^2 = 7.39 > 3 -> capped at 3; ratio e = 2.72 < 3 -> unchanged; A>0 unaffected
    torch.testing.assert_close(loss, torch.tensor([3.0, math.e, -1.2]))
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, math.e, 0.0]))
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(logp, torch.zeros(3), adv, clip_low=0.2, dual_clip=0.5)


def test_clipped_surrogate_broadcast_and_mask_metrics():
    logp = torch.tensor([[1.0, 0.0, 5.0], [0.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])  # [B] against [B, T]
    loss, m = clipped_surrogate(logp, torch.zeros_like(logp), adv, clip_low=0.2, mask=mask)
    assert loss.shape == (2, 3)
    torch.testing.assert_close(loss[0, :2], torch.tensor([-1.2, -1.0]))
    torch.testing.assert_close(loss[1], torch.tensor([1.0, 0.8, 1.0]))
    assert m["clip_frac"].item() == pytest.approx(2 / 5)  # the padded ratio e^5 is ignored
    assert m["ratio_max"].item() == pytest.approx(math.e, rel=1e-6)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(logp, torch.zeros_like(logp), torch.ones(3), clip_low=0.2)


def test_log_ratio_clamp():
    r = log_ratio_to_ratio(torch.tensor([100.0, -100.0, 0.5]), torch.zeros(3))
    torch.testing.assert_close(r, torch.tensor([math.exp(20.0), math.exp(-20.0), math.exp(0.5)]))
    assert torch.isfinite(log_ratio_to_ratio(torch.tensor([1e4]), torch.tensor([0.0]), clamp=5.0)).all()


def test_policy_gradient_loss_registered():
    loss, m = LOSSES.get("policy_gradient")(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]))
    torch.testing.assert_close(loss, torch.tensor([-2.0 * math.e]))
    assert set(m) >= {"clip_frac", "ratio_mean", "ratio_max", "ratio_min"}


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    logp, logp_ref = torch.tensor([0.0]), torch.tensor([math.log(0.5)])
    torch.testing.assert_close(kl_estimator(logp, logp_ref, "k1"), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_estimator(logp, logp_ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(kl_estimator(logp, logp_ref, "k3"), torch.tensor([0.5 + math.log(0.5) * -1 - 1]))
    torch.testing.assert_close(kl_estimator(logp, logp_ref), torch.tensor([math.log(2) - 0.5]))


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (kl_estimator(a, b, "k3") >= 0).all()
    assert (kl_estimator(a, b, "k2") >= 0).all()
    assert (kl_estimator(a, a, "k3") == 0).all()


def test_k1_k3_are_unbiased_for_the_exact_gaussian_kl():
    g = torch.Generator().manual_seed(1234)
    n, d, s = 200_000, 3, 0.7
    mu = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    mu_ref = torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64)
    x = mu + s * torch.randn(n, d, generator=g, dtype=torch.float64)  # samples of pi

    def logdens(x, m):
        return (-0.5 * ((x - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)

    exact = float(((mu - mu_ref) ** 2).sum()) / (2 * s**2)  # hand closed form
    logp, logp_ref = logdens(x, mu), logdens(x, mu_ref)
    for kind in ("k1", "k3"):
        est = kl_estimator(logp, logp_ref, kind)
        se = est.std().item() / math.sqrt(n)
        assert abs(est.mean().item() - exact) < 5 * se, kind
    torch.testing.assert_close(gaussian_kl(mu[None], mu_ref[None], s), torch.tensor([exact], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_kl_closed_form(dtype):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 2, 3, 3, generator=g).to(dtype)
    mean_ref = torch.randn(4, 2, 3, 3, generator=g).to(dtype)
    std = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=dtype)
    assert (gaussian_kl(mean, mean, std) == 0).all()
    # independent reference: torch.distributions per-element KL, summed
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.double(), std.double().view(4, 1, 1, 1).expand_as(mean)),
        torch.distributions.Normal(mean_ref.double(), std.double().view(4, 1, 1, 1).expand_as(mean)),
    ).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std), ref.to(dtype), **tol(dtype))
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std, reduction="mean"), (ref / 18).to(dtype), **tol(dtype))
    # float std and [B, 1, 1, 1] std
    torch.testing.assert_close(
        gaussian_kl(mean, mean_ref, 0.5), ((mean - mean_ref) ** 2).sum(dim=(1, 2, 3)) / 0.5, **tol(dtype)
    )
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std.view(4, 1, 1, 1)), ref.to(dtype), **tol(dtype))
    with pytest.raises(ValueError, match="one value per sample"):
        gaussian_kl(mean, mean_ref, torch.ones(3))


def test_flow_grpo_kl_convention_and_relation_to_exact():
    mean = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    mean_ref = torch.tensor([[1.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    sde_std, dt = 0.7, -0.1
    # mean((0, 1, 0, 2)^2) = 5/4; / (2 * 0.49)
    torch.testing.assert_close(flow_grpo_kl(mean, mean_ref, sde_std), torch.tensor([1.25 / 0.98], dtype=torch.float64))
    exact = gaussian_kl(mean, mean_ref, sde_std * math.sqrt(-dt))  # the step's real std
    torch.testing.assert_close(flow_grpo_kl(mean, mean_ref, sde_std), exact * (-dt) / 4)


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0]])  # padded entries are junk
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token_mean", 21 / 6),
        ("seq_mean_token_mean", (2.5 + 5.5) / 2),
        ("seq_mean_token_sum", (10 + 11) / 2),
        ("seq_mean_token_sum_norm", (10 / 4 + 11 / 4) / 2),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregation_hand_values(mode, expected, dtype):
    loss = LOSS.to(dtype).clone().requires_grad_(True)
    out = aggregate(loss, MASK, mode)
    assert out.dim() == 0 and out.dtype == dtype
    assert out.item() == pytest.approx(expected)
    out.backward()
    assert (loss.grad[~MASK] == 0).all() and (loss.grad[MASK] > 0).all()


def test_aggregation_norm_constant_no_mask_and_float_mask():
    assert aggregate(LOSS, MASK, "seq_mean_token_sum_norm", norm_constant=2.0).item() == pytest.approx(5.25)
    assert aggregate(LOSS[:1], None, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(LOSS, None, "seq_mean_token_sum").item() == pytest.approx((10 + 211) / 2)
    assert aggregate(LOSS, MASK.float(), "token_mean").item() == pytest.approx(3.5)
    # fully padded row contributes 0 and the sequence mean stays over B rows
    m = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert aggregate(LOSS, m, "seq_mean_token_mean").item() == pytest.approx(1.25)
    assert aggregate(LOSS, torch.zeros_like(MASK), "token_mean").item() == 0.0
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(LOSS, MASK, "token_mean", norm_constant=2.0)
    with pytest.raises(ValueError, match="shape"):
        aggregate(LOSS, MASK[:, :2], "token_mean")


# --------------------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "registry,typo,suggestion",
    [
        (LOSSES, "clipped_surogate", "clipped_surrogate"),
        (AGGREGATIONS, "token_mena", "token_mean"),
        (ADVANTAGES, "global-std", "global_std"),
        (KL_ESTIMATORS, "k_3", "k3"),
    ],
)
def test_registry_suggests_closest_name(registry, typo, suggestion):
    with pytest.raises(KeyError) as info:
        registry.get(typo)
    msg = str(info.value)
    assert f"Did you mean {suggestion!r}" in msg
    assert all(name in msg for name in registry.names())
    assert isinstance(info.value, ValueError)


def test_registry_basics():
    reg = Registry("widget")
    assert reg.register("a")(len) is len
    assert reg.get("a") is len and reg.names() == ["a"] and "a" in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(max)
    with pytest.raises(ValueError, match="Valid names: a"):
        reg.get("zzzzzz")
    with pytest.raises(KeyError, match="k1"):
        kl_estimator(torch.zeros(1), torch.zeros(1), kind="k4")
    with pytest.raises(KeyError, match="seq_mean_token_mean"):
        aggregate(LOSS, MASK, "seq_mean")


def test_zero_eps_gives_no_nan_for_constant_groups():
    r, g = random_batch()
    for scope in ("group", "global"):
        a = group_advantages(torch.tensor(r), torch.tensor(g), std_scope=scope, eps=0.0, ddof=1)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, torch.tensor(ref_group_adv(r, g, scope, 1, 0.0)))
    a = group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]), std_scope="global", eps=0.0)
    assert (a == 0).all()
