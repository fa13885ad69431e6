"""DiffusionNFT: the loss against its formula in float64, its gradient at v_theta = v_old, and the trainer on
the tiny policies through the shared loop (what changes, the old snapshot's EMA, rollouts from the old
adapter, exact resume, configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.sections import SamplingConfig, resolve_sampler
from diffrl.trainers import ALGORITHMS
from diffrl.core import nft_policy_loss
from diffrl.trainers.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "algorithm=nft", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=6", "train.train_batch_size=3",
    "train.adam_weight_decay=0", "train.learning_rate=1e-3", "logging.log_with=none", "logging.progress=false",
]


def make_trainer(tmp_path, *extra, model="tiny-sd3"):
    return Trainer(load_config(None, [*FAST, f"model={model}", f"output_dir={tmp_path}", *extra]))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- the loss


def nft_reference(v_theta, v_old, x0, noise, t, r, beta, a_max):
    """docs/algorithms.md, written out in velocity space, float64."""
    x_t = (1 - t) * x0 + t * noise
    v_plus = (1 - beta) * v_old + beta * v_theta
    v_minus = (1 + beta) * v_old - beta * v_theta
    out = []
    for v_pm in (v_plus, v_minus):
        x0_hat = x_t - t * v_pm
        err = (x0_hat - x0).flatten(1)
        w = err.abs().mean(1).clamp_min(1e-5)
        out.append((err**2).mean(1) / w)
    return a_max / beta * (r * out[0] + (1 - r) * out[1])


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches_the_formula(beta):
    B, S = 4, (3, 5, 6)
    x0, noise, v_theta, v_old = (rand(B, *S, seed=k) for k in range(4))
    t = torch.tensor([0.1, 0.4, 0.75, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    r = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    x_t = (1 - t) * x0 + t * noise
    ours = nft_policy_loss(x_t - t * v_theta, x_t - t * v_old, x0, r, beta, 5.0)
    torch.testing.assert_close(ours, nft_reference(v_theta, v_old, x0, noise, t, r, beta, 5.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_at_the_old_policy_is_advantage_weighted_flow_matching(beta):
    """At v_theta = v_old: dL/dv_theta = 2 beta (2r - 1)(v_old - v), times the adaptive weight's
    (A_max / beta) t^2 / (w D) with w = mean|x0_old - x0| = t mean|v_old - v| (x0 space, mean over D elements)."""
    B, S, a_max = 4, (3, 5, 6), 5.0
    x0, noise, v_old = (rand(B, *S, seed=k) for k in (4, 5, 6))
    t = torch.tensor([0.2, 0.5, 0.8, 0.95], dtype=torch.float64).view(-1, 1, 1, 1)
    r = torch.tensor([0.1, 0.5, 0.7, 1.0], dtype=torch.float64)
    x_t = (1 - t) * x0 + t * noise
    v = noise - x0  # the flow-matching target
    v_theta = v_old.clone().requires_grad_()
    nft_policy_loss(x_t - t * v_theta, x_t - t * v_old, x0, r, beta, a_max).sum().backward()
    D = 3 * 5 * 6
    w = (t * (v_old - v)).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    scale = a_max / beta * t**2 / (w * D)
    expected = 2 * beta * (2 * r.view(-1, 1, 1, 1) - 1) * (v_old - v) * scale
    torch.testing.assert_close(v_theta.grad, expected, rtol=1e-10, atol=1e-12)
    assert v_theta.grad[1].abs().max() < 1e-12  # r = 0.5: no signal


# ----------------------------------------------------------------------------- the trainer


def lora_and_frozen(trainer):
    net = trainer.policy.trainable_module()
    params = dict(net.named_parameters())
    lora = {n for n in params if ".lora_A.default." in n or ".lora_B.default." in n}
    frozen = {n for n in params if "lora_" not in n}
    return params, lora, frozen


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_two_iterations_change_every_lora_tensor_and_nothing_frozen(tmp_path, model):
    trainer = make_trainer(tmp_path, "max_iterations=2", "nft.kl_coef=0.1", model=model)
    assert trainer.sampler.kind == "flow_dpm2" and not trainer.algorithm.record_trajectory
    params, lora, frozen = lora_and_frozen(trainer)
    assert {id(p) for p in trainer.policy.trainable_parameters()} == {id(params[n]) for n in lora}
    before = {n: p.detach().clone() for n, p in params.items()}
    rows = trainer.train()
    for n in lora:
        assert not torch.equal(params[n], before[n]), f"LoRA tensor {n} did not change"
    for n in frozen:
        assert torch.equal(params[n], before[n]), f"frozen tensor {n} changed"
    assert trainer.algorithm.updates.steps == 4  # 6 samples / 3 per step, 2 iterations
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [0, 1, 2]
    for key in ("loss", "policy_loss", "kl", "old_deviate", "grad_norm", "r_mean", "old_decay", "reward_mean",
                "eval_reward_mean", "time_rollout", "time_update"):
        assert key in rows[-1], key
    assert rows[-1]["old_decay"] == pytest.approx(0.004) and rows[-1]["kl"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_old_snapshot_is_the_ema_of_the_trained_weights(tmp_path):
    """old_k = d_k old_(k-1) + (1 - d_k) theta_k after iteration k, d_k = min(0.001 steps_k, 0.5), old_0 = theta_0."""
    trainer = make_trainer(tmp_path, "nft.old_decay=[0,0.0,0.1,0.5]")  # 0.2, then 0.4: visible mixing
    policy = trainer.policy
    old = [p.detach().double().clone() for p in policy.adapter_parameters("default")]
    for k, d in ((1, 0.2), (2, 0.4)):
        trainer.train_iteration()
        theta = [p.detach().double() for p in policy.adapter_parameters("default")]
        old = [d * o + (1 - d) * q for o, q in zip(old, theta)]
        for snap, expect in zip(policy.adapter_parameters("old"), old):
            torch.testing.assert_close(snap.double(), expect, rtol=0, atol=1e-7)
        assert not torch.equal(policy.adapter_parameters("old")[1], policy.adapter_parameters("default")[1])


def test_rollouts_come_from_the_old_adapter(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_iteration()  # default has moved away from old
    policy = trainer.policy
    first = trainer.rollout(5).trajectory.final
    with torch.no_grad():
        for p in policy.adapter_parameters("default"):
            p.add_(0.5)
    assert torch.equal(trainer.rollout(5).trajectory.final, first)  # the trained weights are not sampled
    with torch.no_grad():
        for p in policy.adapter_parameters("old"):
            p.add_(0.5)
    assert not torch.equal(trainer.rollout(5).trajectory.final, first)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_resume_is_exact(tmp_path, model):
    straight = make_trainer(tmp_path / "a", "max_iterations=2", "logging.save_every=1", model=model)
    rows = straight.train()
    ckpt = tmp_path / "a" / "checkpoints" / "iter_000001"
    resumed = make_trainer(tmp_path / "b", "max_iterations=2", f"resume={ckpt}", model=model)
    assert resumed.iteration == 1 and resumed.algorithm.updates.steps == 2
    row = resumed.train()[0]
    assert row["iteration"] == 2 and row["loss"] == rows[1]["loss"] and row["reward_mean"] == rows[1]["reward_mean"]
    for name in ("default", "old"):
        for a, b in zip(straight.policy.adapter_parameters(name), resumed.policy.adapter_parameters(name)):
            assert torch.equal(a, b), name
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_unet_forward_process(tmp_path):
    """tiny-sd: NFT on the epsilon forward process with deterministic DDIM rollouts and uniform noise levels."""
    trainer = make_trainer(tmp_path, "max_iterations=1", "sampling.eta=0", "nft.timestep_source=uniform",
                           "train.micro_batch_size=1", model="tiny-sd")
    assert trainer.sampler.kind == "ddim" and trainer.policy.prediction_type == "epsilon"
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    row = trainer.train()[0]
    assert torch.isfinite(torch.tensor(row["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))


# ----------------------------------------------------------------------------- config


def test_nft_defaults_are_the_authors():
    cfg = load_config(None, ["algorithm=nft"])
    n = cfg.nft
    assert (n.beta, n.kl_coef, n.adv_clip_max, n.timestep_fraction, n.timestep_source) == (1.0, 1e-4, 5.0, 0.99, "schedule")
    assert n.old_decay == [0, 0.0, 0.001, 0.5]
    assert cfg.sampling.guidance_scale == 1.0  # CFG-free unless set
    assert load_config(None, ["algorithm=nft", "sampling.guidance_scale=4.5"]).sampling.guidance_scale == 4.5
    assert load_config(None, []).sampling.guidance_scale == 4.5  # grpo keeps Flow-GRPO's CFG
    # the resolved sampler is recorded in the config (tiny-sd3 is a flow model)
    assert cfg.sampling.sampler == "flow_dpm2" and load_config(None, []).sampling.sampler == "flow_sde"  # grpo
    nft_default = ALGORITHMS.get("nft").default_flow_sampler
    assert resolve_sampler(SamplingConfig(), nft_default, flow=True) == "flow_dpm2"
    assert resolve_sampler(SamplingConfig(), nft_default, flow=False) == "ddim"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["policy.lora_rank=0"], "policy.lora_rank"),
        (["model=tiny-sd", "sampling.sampler=flow_dpm2"], "sampling.sampler"),
        (["nft.timestep_fraction=0"], "nft.timestep_fraction"),
        (["nft.timestep_source=cosine"], "nft.timestep_source"),
        (["nft.beta=0"], "nft.beta"),
        (["nft.old_decay=[0,0.0,0.001]"], "nft.old_decay"),
        (["nft.old_decay=[0,0.0,0.001,1.5]"], "nft.old_decay"),
        (["train.micro_batch_size=5"], "train.micro_batch_size"),
    ],
)
def test_invalid_nft_configs_name_the_field(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, ["algorithm=nft", *overrides])


def test_grpo_rejects_the_deterministic_samplers():
    with pytest.raises(ConfigError, match="stochastic sampler"):
        load_config(None, ["sampling.sampler=flow_dpm2"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(None, ["train.micro_batch_size=4"])


def test_nft_recipes_load():
    # no weights here; the recipe's LoRA targets include SD3.5's attn.to_add_out, which tiny-sd3's only block
    # (context_pre_only) lacks, and a target that names no module is refused
    with pytest.raises(ConfigError, match="'policy.lora_targets' 'attn.to_add_out' names no module of 'tiny-sd3'"):
        load_config(ROOT / "configs" / "image" / "sd3_nft_jpeg.yaml", ["model=tiny-sd3"])
    image = load_config(ROOT / "configs" / "image" / "sd3_nft_jpeg.yaml", ["model=tiny-sd3", "policy.lora_targets=null"])
    assert image.algorithm == "nft" and image.sampling.sampler == "flow_dpm2" and image.sampling.guidance_scale == 1.0
    assert image.train.group_size == 24 and image.policy.lora_rank == 32
    toy = load_config(ROOT / "configs" / "toy" / "sd3_nft_toyworld.yaml")
    assert toy.model == "toy-sd3" and toy.reward == "toyworld_accuracy" and toy.data.eval_reward == "toyworld_accuracy"
