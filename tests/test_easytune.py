"""EasyTune: every trained step's gradient starts at its own detached input (one denoiser call, recomputed by
hand in float64), as many optimiser steps as window steps, the window and its curriculum, the trainer on the
tiny policies through the shared loop, exact resume, and configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.trainers.easytune import window_size, window_start
from reward_backprop_helpers import (EXACT, colorfulness_loss, make_trainer, randomize_lora, record_steps,
                                     set_params, spy_predict, update_once)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("score_on", ["x0", "x_prev"])
def test_each_trained_step_backpropagates_one_denoiser_call_from_a_detached_input(tmp_path, score_on):
    """5 steps, window 0.4 -> the last 2: two optimiser steps, each with the gradient of -R(decode(target)) at the
    weights of that moment, target = x_t - sigma_i v(x_t) (x0) or x_t + (sigma_{i+1} - sigma_i) v(x_t) (x_prev)."""
    trainer = make_trainer(tmp_path, "easytune", *EXACT, "sampling.num_steps=5", "easytune.window_fraction=0.4",
                           f"easytune.score_on={score_on}")
    randomize_lora(trainer)
    calls, predict = spy_predict(trainer.policy)
    steps = record_steps(trainer)
    metrics = update_once(trainer)
    schedule = trainer.policy.schedule(5)
    assert len(steps) == len(calls) == 2 and metrics["optimizer_steps"] == 2 and metrics["window_start"] == 3
    assert [int(c["t"][0]) for c in calls] == schedule.timesteps[3:].long().tolist()
    g = trainer.cfg.sampling.guidance_scale
    for k, (call, step) in enumerate(zip(calls, steps)):
        assert not call["x_requires_grad"]  # nothing before this step's input is in its graph
        i = 3 + k
        set_params(trainer, step["params"])
        x = call["x"]  # [b, C, h, w]
        v = predict(x, call["t"], call["cond"], g)
        sigma, sigma_next = schedule.sigmas[i].double(), schedule.sigmas[i + 1].double()
        target = x - sigma * v if score_on == "x0" else x + (sigma_next - sigma) * v
        params = trainer.policy.trainable_parameters()
        expected = torch.autograd.grad(colorfulness_loss(trainer.policy, target), params)
        for got, want in zip(step["grads"], expected):
            # float64 model; the schedule's sigmas are float32, so the coefficients differ from ours by float32 round-off
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert any(not torch.equal(a, b) for a, b in zip(steps[0]["params"], steps[1]["params"]))  # sampling went on with new weights


def test_window_and_curriculum():
    assert [window_size(n, 0.2) for n in (50, 20, 10, 3, 1)] == [10, 4, 2, 1, 1]  # EasyTune: the last 10 of 50
    assert window_start(50, 10, 0.5, 0.0) == 40
    # curriculum over the first quarter of training: from the first 10 steps (high noise) to the last 10, floored
    assert [window_start(50, 10, p, 0.25) for p in (0.0, 0.0625, 0.125, 0.2, 0.25, 0.5)] == [0, 10, 20, 32, 40, 40]
    assert window_start(50, 10, 0.0, 0.03) == 0 and window_start(50, 10, 0.03, 0.03) == 40  # EasyTune's 3 %


def test_curriculum_moves_the_trained_steps_and_resume_is_exact(tmp_path):
    """Curriculum over half of 4 iterations on a flow SDE (sampler noise from the update's generator): the window
    starts at 0, then floor(0.25 / 0.5 * 3) = 1, then sits at the end (3); a run resumed after iteration 2 matches a
    straight one."""
    extra = ["max_iterations=4", "easytune.window_fraction=0.25", "easytune.curriculum_fraction=0.5",
             "sampling.sampler=flow_sde", "logging.save_every=1"]
    straight = make_trainer(tmp_path / "a", "easytune", *extra)
    rows = straight.train()
    assert [r["window_start"] for r in rows] == [0, 1, 3, 3]
    resumed = make_trainer(tmp_path / "b", "easytune", *extra, f"resume={tmp_path / 'a' / 'checkpoints' / 'iter_000002'}")
    assert resumed.algorithm.iterations == 2
    again = resumed.train()
    assert [r["window_start"] for r in again] == [3, 3]
    for key in ("loss", "reward_mean", "grad_norm"):
        assert [r[key] for r in again] == [r[key] for r in rows[2:]], key
    for a, b in zip(straight.policy.trainable_parameters(), resumed.policy.trainable_parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3"])
def test_two_iterations_change_every_lora_tensor_and_nothing_frozen(tmp_path, model):
    trainer = make_trainer(tmp_path, "easytune", "max_iterations=2", "train.group_size=4", model=model)
    net = trainer.policy.trainable_module()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    rows = trainer.train()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [0, 1, 2] and logged[-1]["samples_seen"] == 8
    for key in ("reward_mean", "reward_std", "loss", "reward_grad_mean", "grad_norm", "optimizer_steps", "time_update"):
        assert key in logged[-1] and torch.isfinite(torch.tensor(logged[-1][key])), key
    assert rows[-1]["optimizer_steps"] == 2  # window round(0.2 * 4) = 1 step x 2 train batches of 2


def test_defaults_and_configs():
    cfg = load_config(None, ["algorithm=easytune", "reward=toy_proxy"])
    e = cfg.easytune
    assert (e.window_fraction, e.score_on, e.curriculum_fraction, e.reward_scale) == (0.2, "x0", 0.0, 1.0)
    assert cfg.sampling.guidance_scale == 4.5
    toy = load_config(ROOT / "configs" / "toy" / "sd3_easytune_toyworld.yaml")
    assert toy.algorithm == "easytune" and toy.reward == "toy_proxy" and toy.data.eval_reward == "toyworld_accuracy"
    image = load_config(ROOT / "configs" / "image" / "sd3_easytune_aesthetic.yaml", ["model=tiny-sd3"])  # no weights here
    assert image.reward == "aesthetic" and image.reward_kwargs["differentiable"] is True


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["reward=jpeg_compressibility"], "'reward' jpeg_compressibility is not differentiable"),
        (["reward=aesthetic"], "'reward' aesthetic is not differentiable"),  # the CLIP family: only with differentiable=true
        (["rewards={colorfulness: 1.0, jpeg_compressibility: 0.5}"], "'rewards.jpeg_compressibility'"),
        (["easytune.window_fraction=0"], "easytune.window_fraction"),
        (["easytune.score_on=x_t"], "easytune.score_on"),
        (["easytune.curriculum_fraction=1.5"], "easytune.curriculum_fraction"),
        (["easytune.reward_scale=0"], "easytune.reward_scale"),
        (["train.micro_batch_size=1"], "train.micro_batch_size"),
        (["train.num_inner_epochs=2"], "train.num_inner_epochs"),
    ],
)
def test_invalid_configs_name_the_field(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, ["algorithm=easytune", "reward=colorfulness", *overrides])


def test_differentiable_clip_reward_is_accepted_without_loading_it():
    cfg = load_config(None, ["algorithm=easytune", "reward=aesthetic", "reward_kwargs={model: tiny, differentiable: true}"])
    assert cfg.reward_kwargs["differentiable"] is True
