"""CRD: the implicit reward and centred loss against independent float64 computations (group-constant
invariance, zero exactly at the centred match, the reward-adaptive KL weight), and the trainer on the tiny
policies through the shared loop (whole groups per batch, the two snapshots, exact resume, configs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.core import crd_implicit_reward, crd_kl_weight, crd_policy_loss, group_advantages, optimality
from diffrl.sampling import add_noise, training_target
from diffrl.trainers.forward_process import NoisedBatch
from diffrl.trainers.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "algorithm=crd", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=6", "train.train_batch_size=3",
    "train.adam_weight_decay=0", "train.learning_rate=1e-3", "logging.log_with=none", "logging.progress=false",
]
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


def make_trainer(tmp_path, *extra, model="tiny-sd3"):
    return Trainer(load_config(None, [*FAST, f"model={model}", f"output_dir={tmp_path}", *extra]))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def centred(x, groups):
    """x minus its group mean, with python loops."""
    out = x.clone()
    for g in set(groups.tolist()):
        idx = [i for i, gi in enumerate(groups.tolist()) if gi == g]
        out[idx] = x[idx] - sum(x[i].item() for i in idx) / len(idx)
    return out


# ----------------------------------------------------------------------------- the maths


def test_implicit_reward_matches_the_formula():
    B, S = 4, (3, 5, 6)
    v_theta, v_old, v = (rand(B, *S, seed=k) for k in range(3))
    ours = crd_implicit_reward(v_theta, v_old, v)
    D = math.prod(S)
    for b in range(B):
        e1 = (v_theta[b] - v[b]).flatten().tolist()
        e0 = (v_old[b] - v[b]).flatten().tolist()
        term = lambda e: (sum(x * x for x in e) / D) / max(sum(abs(x) for x in e) / D, 1e-5)  # noqa: E731
        assert ours[b].item() == pytest.approx(-(term(e1) - term(e0)), rel=1e-12)
    assert crd_implicit_reward(v_old, v_old, v).abs().max() == 0  # theta = old: no implicit reward


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_mse_loss_matches_the_formula(beta):
    r_theta, a = rand(12, seed=3), torch.rand(12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = crd_policy_loss(r_theta, a, GROUPS, beta, 5.0, "mse")
    expected = 5.0 / beta * (beta * centred(r_theta, GROUPS) - centred(a, GROUPS)) ** 2
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_loss_is_invariant_to_a_constant_per_group(kind):
    r_theta, a = rand(12, seed=5), torch.rand(12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    shift = torch.tensor([0.3, -1.7, 11.0], dtype=torch.float64)[GROUPS]  # one constant per group
    base = crd_policy_loss(r_theta, a, GROUPS, 1.0, 5.0, kind)
    torch.testing.assert_close(crd_policy_loss(r_theta, a + shift, GROUPS, 1.0, 5.0, kind), base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(crd_policy_loss(r_theta + shift, a, GROUPS, 1.0, 5.0, kind), base, rtol=1e-12, atol=1e-12)


def test_loss_is_invariant_to_shifting_the_rewards():
    """From raw rewards: a constant added to every reward (global std), or a constant per group (per-group
    std), leaves the advantages, a, and the loss unchanged."""
    rewards, r_theta = rand(12, seed=7), rand(12, seed=8)

    def loss(rw, scope):
        a = optimality(group_advantages(rw, GROUPS, std_scope=scope, eps=1e-4), 5.0)
        return crd_policy_loss(r_theta, a, GROUPS, 1.0, 5.0, "mse")

    torch.testing.assert_close(loss(rewards + 3.0, "global"), loss(rewards, "global"), rtol=1e-10, atol=1e-12)
    per_group = torch.tensor([2.0, -5.0, 0.25], dtype=torch.float64)[GROUPS]
    torch.testing.assert_close(loss(rewards + per_group, "group"), loss(rewards, "group"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_loss_is_zero_exactly_at_the_centred_match(beta):
    a = torch.rand(12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    offset = torch.tensor([0.7, -0.2, 5.0], dtype=torch.float64)[GROUPS]  # the normaliser: any per-group constant
    r_match = (centred(a, GROUPS) / beta + offset).requires_grad_()
    loss = crd_policy_loss(r_match, a, GROUPS, beta, 5.0, "mse")
    assert loss.abs().max() < 1e-24
    loss.sum().backward()
    assert r_match.grad.abs().max() < 1e-12
    assert crd_policy_loss(r_match.detach() + 0.01 * rand(12, seed=10), a, GROUPS, beta, 5.0).sum() > 1e-8
    # bce: its minimum (zero gradient) sits at the same point; any move away raises it
    r_bce = r_match.detach().clone().requires_grad_()
    bce = crd_policy_loss(r_bce, a, GROUPS, beta, 5.0, "bce")
    bce.sum().backward()
    assert r_bce.grad.abs().max() < 1e-12
    moved = crd_policy_loss(r_bce.detach() + 0.05 * rand(12, seed=11), a, GROUPS, beta, 5.0, "bce")
    assert moved.sum() > bce.sum()


def test_invalid_samples_drop_out_of_the_group_means():
    r_theta, a = rand(12, seed=12), torch.rand(12, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    weight = torch.ones(12, dtype=torch.float64)
    weight[[1, 6]] = 0
    keep = weight.bool()
    ours = crd_policy_loss(r_theta, a, GROUPS, 1.0, 5.0, weight=weight)[keep]
    expected = 5.0 * (centred(r_theta[keep], GROUPS[keep]) - centred(a[keep], GROUPS[keep])) ** 2
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


def test_kl_weight_moves_with_a():
    a = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    m = 1e-4 / 0.1
    torch.testing.assert_close(crd_kl_weight(a, 0.1), 0.1 * (m + a * (1 - m)))  # docs/algorithms.md
    torch.testing.assert_close(crd_kl_weight(a, 0.1), torch.tensor([1e-4, 0.025075, 0.05005, 0.1], dtype=torch.float64))
    torch.testing.assert_close(crd_kl_weight(a, 0.1, adaptive=False), torch.full((4,), 0.1, dtype=torch.float64))


# ----------------------------------------------------------------------------- the trainer


def noised_group(trainer, batch, rows, step=1):
    """Rows of a rollout noised at one schedule step with fixed noise (the forward process, written out)."""
    x0 = batch.trajectory.final[rows]
    schedule = batch.trajectory.schedule
    sigma = schedule.sigmas[step].double().expand(len(rows))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    return NoisedBatch(
        rows=rows, x0=x0, noise=noise, x_t=add_noise(x0, noise, 1 - sigma, sigma),
        target=training_target(x0, noise, 1 - sigma, sigma, "flow"), timestep=schedule.timesteps[step].expand(len(rows)),
        alpha=1 - sigma, sigma=sigma, weight=torch.ones(len(rows)), cond=batch.cond.index(rows),
    )


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_kl_anchors_to_the_cfg_guided_reference_with_the_adaptive_weight(tmp_path, adaptive):
    trainer = make_trainer(tmp_path, f"crd.reward_adaptive_kl={str(adaptive).lower()}")
    policy, algo = trainer.policy, trainer.algorithm
    batch = trainer.rollout(0)
    nb = noised_group(trainer, batch, torch.arange(3))
    with torch.no_grad():
        with policy.reference():
            v_ref = policy.predict(nb.x_t, nb.timestep, nb.cond, 4.5)  # the pretrained model with CFG 4.5
        v_theta = policy.predict(nb.x_t, nb.timestep, nb.cond, 1.0)
        kl = ((v_theta - v_ref) ** 2).flatten(1).mean(1)
        # a and a + 0.5 have the same centred values: only the KL weight differs
        a0 = torch.zeros(6)
        loss0, m0 = algo.loss(nb, a0, batch.group_ids)
        loss1, _ = algo.loss(nb, a0 + 1.0, batch.group_ids)
        loss_half, _ = algo.loss(nb, a0 + 0.5, batch.group_ids)
    assert m0["kl"] == pytest.approx(kl.mean().item(), rel=1e-5) and kl.min() > 0
    slope = (0.1 - 1e-4) if adaptive else 0.0
    torch.testing.assert_close(loss1 - loss0, slope * kl, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(loss_half - loss0, 0.5 * slope * kl, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_two_iterations_change_every_lora_tensor_and_nothing_frozen(tmp_path, model):
    trainer = make_trainer(tmp_path, "max_iterations=2", "train.train_batch_size=6", "train.micro_batch_size=3", model=model)
    assert trainer.sampler.kind == "flow_dpm2"
    net, policy = trainer.policy.trainable_module(), trainer.policy
    params = dict(net.named_parameters())
    lora = {n for n in params if ".lora_A.default." in n or ".lora_B.default." in n}
    frozen = {n for n in params if "lora_" not in n}
    before = {n: p.detach().clone() for n, p in params.items()}
    seen = []  # the rows of every loss call must be whole groups
    loss = trainer.algorithm.loss
    trainer.algorithm.loss = lambda nb, a, g: (seen.append(g[nb.rows].tolist()), loss(nb, a, g))[1]
    rows = trainer.train()
    for n in lora:
        assert not torch.equal(params[n], before[n]), f"LoRA tensor {n} did not change"
    for n in frozen:
        assert torch.equal(params[n], before[n]), f"frozen tensor {n} changed"
    assert seen and all(len(ids) == 3 and len(set(ids)) == 1 for ids in seen)  # micro-batches of one group each
    assert trainer.algorithm.updates.steps == 2  # one step per iteration (train batch 6)
    # the sampling snapshot copies the trained weights until step 75 (decay 0), bit for bit
    assert all(torch.equal(s, d) for s, d in zip(policy.adapter_parameters("sampling"), policy.adapter_parameters("default")))
    assert rows[-1]["old_decay"] == pytest.approx(0.26) and rows[-1]["sampling_decay"] == 0.0
    for key in ("loss", "policy_loss", "kl", "kl_weight_mean", "r_theta_mean", "old_deviate", "grad_norm", "eval_reward_mean"):
        assert key in rows[-1], key


def test_old_snapshot_follows_its_schedule(tmp_path):
    """old_k = d_k old_(k-1) + (1 - d_k) theta_k, d_k = min(0.25 + 0.005 steps_k, 0.999), old_0 = theta_0."""
    trainer = make_trainer(tmp_path)  # 2 optimiser steps per iteration
    policy = trainer.policy
    old = [p.detach().double().clone() for p in policy.adapter_parameters("default")]
    for d in (0.25 + 0.005 * 2, 0.25 + 0.005 * 4):
        trainer.train_iteration()
        theta = [p.detach().double() for p in policy.adapter_parameters("default")]
        old = [d * o + (1 - d) * q for o, q in zip(old, theta)]
        for snap, expect in zip(policy.adapter_parameters("old"), old):
            torch.testing.assert_close(snap.double(), expect, rtol=0, atol=1e-7)


def test_rollouts_come_from_the_sampling_adapter(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_iteration()
    policy = trainer.policy
    first = trainer.rollout(5).trajectory.final
    with torch.no_grad():
        for name in ("default", "old"):
            for p in policy.adapter_parameters(name):
                p.add_(0.5)
    assert torch.equal(trainer.rollout(5).trajectory.final, first)
    with torch.no_grad():
        for p in policy.adapter_parameters("sampling"):
            p.add_(0.5)
    assert not torch.equal(trainer.rollout(5).trajectory.final, first)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_resume_is_exact(tmp_path, model):
    extra = ["max_iterations=2", "crd.sampling_decay=[0,0.5,0.0,0.5]"]  # a lagging sampling snapshot too
    straight = make_trainer(tmp_path / "a", *extra, "logging.save_every=1", model=model)
    rows = straight.train()
    resumed = make_trainer(tmp_path / "b", *extra, f"resume={tmp_path / 'a' / 'checkpoints' / 'iter_000001'}", model=model)
    assert resumed.iteration == 1 and resumed.algorithm.updates.steps == 2
    row = resumed.train()[0]
    assert row["loss"] == rows[1]["loss"] and row["reward_mean"] == rows[1]["reward_mean"]
    for name in ("default", "old", "sampling"):
        for a, b in zip(straight.policy.adapter_parameters(name), resumed.policy.adapter_parameters(name)):
            assert torch.equal(a, b), name
    assert not torch.equal(straight.policy.adapter_parameters("sampling")[1], straight.policy.adapter_parameters("default")[1])


def test_unet_forward_process(tmp_path):
    trainer = make_trainer(tmp_path, "max_iterations=1", "sampling.eta=0", "crd.loss=bce", "crd.timestep_source=logit_normal",
                           model="tiny-sd")
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    row = trainer.train()[0]
    assert torch.isfinite(torch.tensor(row["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))


# ----------------------------------------------------------------------------- config


def test_crd_defaults_are_the_authors():
    cfg = load_config(None, ["algorithm=crd", "train.train_batch_size=24"])
    c = cfg.crd
    assert cfg.sampling.guidance_scale == 1.0  # CFG-free rollouts; the KL reference has its own CFG
    assert (c.beta, c.loss, c.kl_beta, c.kl_floor, c.ref_guidance_scale, c.adv_clip_max) == (1.0, "mse", 0.1, 1e-4, 4.5, 5.0)
    assert c.old_decay == [0, 0.25, 0.005, 0.999] and c.sampling_decay == [75, 0.0, 0.0075, 0.999]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.train_batch_size=8"], "'train.train_batch_size' (8) must be a multiple of train.group_size (24)"),
        (["train.train_batch_size=24", "train.micro_batch_size=12"], "'train.micro_batch_size' (12) must be a multiple"),
        (["train.group_size=1", "train.train_batch_size=1"], "train.group_size"),
        (["train.train_batch_size=24", "crd.loss=hinge"], "crd.loss"),
        (["train.train_batch_size=24", "crd.kl_floor=0.5"], "crd.kl_floor"),
        (["train.train_batch_size=24", "crd.sampling_decay=[75,0.0,-1,0.999]"], "crd.sampling_decay"),
        (["train.train_batch_size=24", "policy.lora_rank=0"], "policy.lora_rank"),
    ],
)
def test_invalid_crd_configs_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm=crd", *overrides])
    assert expected in str(err.value)


def test_crd_recipes_load():
    image = load_config(ROOT / "configs" / "image" / "sd3_crd_jpeg.yaml", ["model=tiny-sd3"])  # no weights here
    assert image.algorithm == "crd" and image.sampling.guidance_scale == 1.0 and image.crd.ref_guidance_scale == 4.5
    assert image.train.train_batch_size % image.train.group_size == 0
    toy = load_config(ROOT / "configs" / "toy" / "sd3_crd_toyworld.yaml")
    assert toy.model == "toy-sd3" and toy.reward == "toyworld_accuracy" and toy.data.eval_reward == "toyworld_accuracy"
