"""PRDP: the reward difference prediction loss against independent float64 pair loops (zero exactly at
r / beta, symmetric, all C(K, 2) pairs, the clipped branch and its gradient by hand), DDPM step
log-probs against the closed-form posterior, the two-pass gradient against autograd on the whole graph,
and the trainer on the tiny policies through the shared loop (training changes the LoRA, whole groups,
exact resume, configs)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.core import prdp_loss
from diffrl.trainers.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "algorithm=prdp", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=6", "train.train_batch_size=3",
    "train.adam_weight_decay=0", "train.learning_rate=1e-3", "logging.log_with=none", "logging.progress=false",
]
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])  # K = 4, 4, 3


def make_trainer(tmp_path, *extra, model="tiny-sd3"):
    return Trainer(load_config(None, [*FAST, f"model={model}", f"output_dir={tmp_path}", *extra]))


def rand(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_loss(delta, delta_old, rewards, groups, beta, eps, valid=None):
    """The spec with python loops: per pair max(l, l_clipped), mean over pairs; also the pairs and branches."""
    B, T = delta.shape
    d, o, r = delta.tolist(), delta_old.tolist(), rewards.tolist()
    ok = [True] * B if valid is None else valid.tolist()
    clip = lambda x, c: x if eps is None else min(max(x, c - eps), c + eps)  # noqa: E731
    pairs, losses, branches = [], [], []
    for i, j in itertools.combinations(range(B), 2):
        if groups[i] != groups[j] or not (ok[i] and ok[j]):
            continue
        target = (r[i] - r[j]) / beta
        l = (sum(d[i]) - sum(d[j]) - target) ** 2
        lc = (sum(clip(d[i][t], o[i][t]) for t in range(T)) - sum(clip(d[j][t], o[j][t]) for t in range(T)) - target) ** 2
        pairs.append((i, j))
        losses.append(max(l, lc))
        branches.append(lc > l)
    return sum(losses) / len(losses), pairs, branches


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("eps", [None, 0.05, 0.3])
def test_loss_matches_the_pairwise_formula_over_all_pairs(eps):
    delta, old, rewards = rand(11, 4, seed=0), rand(11, 4, seed=1, scale=0.3), rand(11, seed=2)
    old = delta + old  # the current terms sit 0-1 eps from the snapshot's
    valid = torch.ones(11, dtype=torch.bool)
    valid[5] = False  # a NaN reward joins no pair
    rewards[5] = float("nan")
    loss, m = prdp_loss(delta, old, rewards, GROUPS, beta=2.0, eps=eps, valid=valid)
    expected, pairs, branches = reference_loss(delta, old, rewards, GROUPS, 2.0, eps, valid)
    assert len(pairs) == math.comb(4, 2) + math.comb(3, 2) + math.comb(3, 2) == m["pairs"].item() == 12
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["clipped_pair_frac"].item() == pytest.approx(sum(branches) / len(branches))
    if eps == 0.05:
        assert 0 < sum(branches) < len(branches)  # both branches occur


@pytest.mark.parametrize("beta", [1.0, 10.0])
def test_loss_is_zero_exactly_at_reward_differences_over_beta(beta):
    rewards = rand(11, seed=3)
    offset = torch.tensor([0.4, -2.0, 7.0], dtype=torch.float64)[GROUPS]  # a per-group constant cancels in differences
    split = torch.softmax(rand(11, 5, seed=4), dim=1)  # [B, T] any split of rhat over the steps
    delta = ((rewards / beta + offset)[:, None] * split).requires_grad_()  # rhat = r / beta + c_g
    for eps in (None, 1e-3):
        loss, _ = prdp_loss(delta, delta.detach(), rewards, GROUPS, beta=beta, eps=eps)
        assert loss.item() < 1e-26
        (grad,) = torch.autograd.grad(loss, delta)
        assert grad.abs().max() < 1e-12
        moved, _ = prdp_loss(delta.detach() + rand(11, 5, seed=5, scale=1e-3), delta.detach(), rewards, GROUPS,
                             beta=beta, eps=eps)
        assert moved.item() > 1e-10


def test_loss_is_symmetric_in_pair_order():
    delta, old, rewards = rand(11, 3, seed=6), rand(11, 3, seed=7), rand(11, seed=8)
    loss, _ = prdp_loss(delta, old, rewards, GROUPS, beta=3.0, eps=0.5)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(9))  # every pair appears with either order
    flipped, _ = prdp_loss(delta[perm], old[perm], rewards[perm], GROUPS[perm], beta=3.0, eps=0.5)
    assert flipped.item() == pytest.approx(loss.item(), rel=1e-13)
    ab, _ = prdp_loss(delta[:2], old[:2], rewards[:2], torch.zeros(2), beta=3.0, eps=0.5)
    ba, _ = prdp_loss(delta[[1, 0]], old[[1, 0]], rewards[[1, 0]], torch.zeros(2), beta=3.0, eps=0.5)
    assert ab.item() == ba.item()


@pytest.mark.parametrize(
    "step, clipped, grad_a",
    [
        (0.5, True, [0.0, -1.8]),  # moved toward the target by more than eps: the clipped step stops
        (1.5, True, [0.0, -1.8]),  # overshot it: clipping back to 0.1 is worse, the clipped branch still wins
        (-0.5, False, [-3.0, -3.0]),  # moved away from the target: the unclipped loss pulls every step back
    ],
)
def test_the_clipped_branch_is_taken_exactly_when_clipping_raises_the_error(step, clipped, grad_a):
    """One pair, T = 2, old = 0, eps 0.1, target (r_a - r_b) / beta = 1. Row a's first step has moved to `step`."""
    delta = torch.tensor([[step, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss, m = prdp_loss(delta, torch.zeros(2, 2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64),
                        torch.zeros(2), beta=1.0, eps=0.1)
    l, lc = (step - 1) ** 2, (0.1 - 1) ** 2  # by hand
    assert (lc > l) == clipped and m["clipped_pair_frac"].item() == float(clipped)
    assert loss.item() == pytest.approx(max(l, lc), rel=1e-14)
    loss.backward()
    torch.testing.assert_close(delta.grad[0], torch.tensor(grad_a, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(delta.grad[1], torch.full((2,), -grad_a[1], dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_gradient_matches_the_branchwise_derivative():
    """dL/d delta_(i,t) = (2 / P) sum over pairs with i of +-err, times 1[term unclipped] on the clipped branch."""
    delta, old, rewards = rand(11, 4, seed=10), rand(11, 4, seed=11, scale=0.2), rand(11, seed=12)
    old = delta + old
    eps, beta = 0.15, 2.0
    leaf = delta.clone().requires_grad_()
    loss, _ = prdp_loss(leaf, old, rewards, GROUPS, beta=beta, eps=eps)
    loss.backward()
    _, pairs, branches = reference_loss(delta, old, rewards, GROUPS, beta, eps)
    expected = torch.zeros(11, 4, dtype=torch.float64)
    inside = ((delta - old).abs() <= eps).double()
    clipped = torch.clamp(delta, old - eps, old + eps)
    for (i, j), use_clip in zip(pairs, branches):
        d = clipped if use_clip else delta
        err = (d[i].sum() - d[j].sum() - (rewards[i] - rewards[j]) / beta).item()
        w = inside if use_clip else torch.ones_like(inside)
        expected[i] += 2 * err * w[i] / len(pairs)
        expected[j] -= 2 * err * w[j] / len(pairs)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-14)


def test_metrics_pair_accuracy_and_no_pairs():
    delta = torch.tensor([[0.2], [0.1], [0.0], [0.5]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    _, m = prdp_loss(delta, delta, rewards, torch.tensor([0, 0, 1, 1]), beta=1.0, eps=None)
    assert m["pairs"].item() == 2 and m["pair_accuracy"].item() == 1.0  # group 1's equal rewards do not count
    lone = delta[:1].clone().requires_grad_()
    loss, m = prdp_loss(lone, delta[:1], rewards[:1], torch.tensor([0]), beta=1.0, eps=None)
    loss.backward()
    assert loss.item() == 0 and m["pairs"].item() == 0 and lone.grad.abs().max() == 0
    with pytest.raises(ValueError, match="beta > 0"):
        prdp_loss(delta, delta, rewards, torch.tensor([0, 0, 1, 1]), beta=0.0, eps=None)


# ----------------------------------------------------------------------------- the trainer


def test_ddpm_step_log_probs_are_the_closed_form_posterior(tmp_path):
    """UNet rollouts default to DDIM eta 1: each stored log-prob is log N(x_prev; DDPM posterior mean, beta~_t),
    written here from the scheduler's alpha table (mean over latent elements, the DDPO convention)."""
    trainer = make_trainer(tmp_path, "policy.dtype=float64", model="tiny-sd")
    assert trainer.sampler.kind == "ddim" and trainer.sampler.eta == 1.0
    batch = trainer.rollout(0)
    traj, policy = batch.trajectory, trainer.policy
    table = policy.scheduler.alphas_cumprod.double()  # [1000]
    N, stride = len(traj.schedule), 1000 // len(traj.schedule)
    assert traj.log_probs.shape == (6, N)
    for i, t in enumerate(traj.schedule.timesteps.tolist()):
        a_t = table[t].item()
        a_prev = table[t - stride].item() if t - stride >= 0 else table[0].item()  # set_alpha_to_one False
        x_t, x_prev = traj.latents[:, i], traj.latents[:, i + 1]
        with torch.no_grad():
            eps = policy.predict(x_t, torch.full((6,), t), batch.cond, trainer.cfg.sampling.guidance_scale)
        x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        alpha = a_t / a_prev  # the step's own alpha (Ho et al. 2020, eq. 7 over a strided chain)
        mean = math.sqrt(a_prev) * (1 - alpha) / (1 - a_t) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a_t) * x_t
        var = (1 - a_prev) / (1 - a_t) * (1 - alpha)
        logp = (-((x_prev - mean) ** 2) / (2 * var) - 0.5 * math.log(2 * math.pi * var)).flatten(1).mean(1)
        torch.testing.assert_close(traj.log_probs[:, i], logp, rtol=1e-9, atol=1e-9)


def full_graph_gradient(algo, batch, delta_old, ref):
    """Autograd through every (row, step) at once: the loss built on one graph, then backward."""
    B, T = delta_old.shape
    rows = torch.arange(B)
    logp = torch.stack([algo.step_log_prob(batch, rows, torch.full((B,), t)).log_prob for t in range(T)], dim=1)  # [B, T]
    c = algo.cfg.prdp
    loss, m = prdp_loss(logp - ref, delta_old, batch.rewards, batch.group_ids, beta=c.beta, eps=c.clip_range,
                        valid=batch.valid)
    loss.backward()
    return loss.item(), m


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd"])
def test_two_pass_gradient_equals_autograd_on_the_full_graph(tmp_path, model):
    trainer = make_trainer(tmp_path, "policy.dtype=float64", "train.group_size=4", "train.train_batch_size=8",
                           "train.micro_batch_size=2", "prdp.beta=0.5", model=model)
    algo, params = trainer.algorithm, trainer.policy.trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a snapshot away from the reference, then current weights away from the snapshot
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = trainer.rollout(0)
    batch.rewards = torch.arange(8, dtype=torch.float64) % 3  # differing rewards within each group
    with torch.no_grad():
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    rows = torch.arange(8)
    ref = algo.log_probs(batch, rows, reference=True)
    delta_old = batch.trajectory.log_probs - ref
    drift = (algo.log_probs(batch, rows) - ref - delta_old).abs()
    trainer.cfg.prdp.clip_range = drift.median().item()  # about half the step terms clip
    for p in params:
        p.grad = None
    loss_full, m = full_graph_gradient(algo, batch, delta_old, ref)
    assert 0 < m["clip_frac"] < 1 and 0 < m["clipped_pair_frac"] < 1 and m["pairs"] == 12
    full = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    m2 = algo.accumulate_gradients(batch, rows, delta_old, ref, torch.Generator().manual_seed(1))
    assert m2["loss"] == pytest.approx(loss_full, rel=1e-12)
    assert sum(p.grad.abs().sum() for p in params) > 0
    for g_full, p in zip(full, params):
        torch.testing.assert_close(p.grad, g_full, rtol=1e-9, atol=1e-15)


def test_step_subsampling_is_unbiased(tmp_path, monkeypatch):
    """timestep_fraction 2/3 of T = 3: averaged over the three 2-step subsets, the pass-2 gradient is the exact one."""
    trainer = make_trainer(tmp_path, "policy.dtype=float64", "prdp.timestep_fraction=0.67")
    algo, params = trainer.algorithm, trainer.policy.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    batch = trainer.rollout(0)
    rows = torch.arange(3)  # one group
    ref = algo.log_probs(batch, torch.arange(6), reference=True)
    delta_old = batch.trajectory.log_probs - ref
    grads = []
    for subset in ([0, 1], [0, 2], [1, 2]):
        monkeypatch.setattr(algo, "draw_steps", lambda b, T, n, gen, s=subset: torch.tensor([s] * b))
        for p in params:
            p.grad = None
        algo.accumulate_gradients(batch, rows, delta_old, ref, torch.Generator())
        grads.append([p.grad.clone() for p in params])
    monkeypatch.undo()
    trainer.cfg.prdp.timestep_fraction = 1.0
    for p in params:
        p.grad = None
    algo.accumulate_gradients(batch, rows, delta_old, ref, torch.Generator())
    for i, p in enumerate(params):
        torch.testing.assert_close(sum(g[i] for g in grads) / 3, p.grad, rtol=1e-9, atol=1e-15)
    assert not torch.allclose(grads[0][1], params[1].grad)  # one subset alone is not the exact gradient


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3"])
def test_two_iterations_change_every_lora_tensor_and_nothing_frozen(tmp_path, model):
    trainer = make_trainer(tmp_path, "max_iterations=2", "train.num_inner_epochs=2", model=model)
    net = trainer.policy.trainable_module()
    params = dict(net.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in params.items()}
    seen = []  # the group ids of every train batch: whole groups only
    step = trainer.algorithm.accumulate_gradients
    trainer.algorithm.accumulate_gradients = lambda b, rows, *a: (seen.append(b.group_ids[rows].tolist()), step(b, rows, *a))[1]
    rows = trainer.train()
    for n, p in params.items():
        assert torch.equal(p, before[n]) != (n in trainable), n
    assert len(seen) == 2 * 2 * 2 and all(len(ids) == 3 and len(set(ids)) == 1 for ids in seen)
    state = trainer.optimizer.state[next(iter(trainer.policy.trainable_parameters()))]
    assert int(state["step"]) == 8  # 2 iterations x 2 inner epochs x 2 train batches
    for key in ("loss", "pairs", "clip_frac", "clipped_pair_frac", "pair_accuracy", "rhat_mean", "drift", "grad_norm",
                "eval_reward_mean"):
        assert key in rows[-1], key
    assert rows[-1]["pairs"] == 3 and 0 <= rows[-1]["clip_frac"] <= 1


def test_resume_is_exact(tmp_path):
    straight = make_trainer(tmp_path / "a", "max_iterations=3", "logging.save_every=1", "train.num_inner_epochs=2")
    rows = straight.train()
    resumed = make_trainer(tmp_path / "b", "max_iterations=3", "train.num_inner_epochs=2",
                           f"resume={tmp_path / 'a' / 'checkpoints' / 'iter_000002'}")
    assert resumed.iteration == 2 and resumed.samples_seen == 12
    row = resumed.train()[0]
    assert row["iteration"] == 3 and row["loss"] == rows[2]["loss"] and row["reward_mean"] == rows[2]["reward_mean"]
    for a, b in zip(straight.policy.trainable_parameters(), resumed.policy.trainable_parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- config


def test_prdp_defaults():
    cfg = load_config(None, ["algorithm=prdp", "train.train_batch_size=24"])
    assert (cfg.prdp.beta, cfg.prdp.clip_range, cfg.prdp.timestep_fraction) == (10.0, 1e-4, 1.0)
    assert cfg.sampling.guidance_scale == 5.0  # PRDP / DDPO
    unet = load_config(None, ["algorithm=prdp", "model=tiny-sd", "train.train_batch_size=24"])
    assert unet.sampling.eta == 1.0  # DDPM rollouts


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.train_batch_size=8"], "'train.train_batch_size' (8) must be a multiple of train.group_size (24)"),
        (["train.group_size=1", "train.train_batch_size=1"], "'train.group_size' must be >= 2"),
        (["prdp.beta=0"], "'prdp.beta' must be > 0"),
        (["prdp.clip_range=-1e-4"], "'prdp.clip_range' must be > 0"),
        (["prdp.timestep_fraction=0"], "'prdp.timestep_fraction'"),
        (["sampling.sampler=flow_ode"], "'sampling.sampler' flow_ode"),
        (["model=tiny-sd", "sampling.eta=0"], "'sampling.sampler' ddim"),
        (["sampling.noise_level=0"], "noise_level 0"),
        (["policy.lora_rank=0"], "'policy.lora_rank' must be > 0 for prdp"),
    ],
)
def test_invalid_prdp_configs_name_the_field(overrides, expected):
    base = [] if any(o.startswith("train.") for o in overrides) else ["train.train_batch_size=24"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm=prdp", *base, *overrides])
    assert expected in str(err.value)


def test_prdp_recipes_load():
    toy = load_config(ROOT / "configs" / "toy" / "sd3_prdp_toyworld.yaml")
    assert toy.algorithm == "prdp" and toy.model == "toy-sd3" and toy.data.eval_reward == "toyworld_accuracy"
    assert toy.data.num_eval_prompts == 300 and toy.sampling.eval_num_steps == 10
    image = load_config(ROOT / "configs" / "image" / "sd15_prdp_jpeg.yaml", ["model=tiny-sd"])  # no weights here
    assert image.algorithm == "prdp" and image.sampling.sampler == "ddim" and image.sampling.eta == 1.0
    assert image.sampling.num_steps == 50 and image.sampling.guidance_scale == 5.0
