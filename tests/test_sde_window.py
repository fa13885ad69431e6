"""SDE window (MixGRPO / Flow-GRPO-Fast): noise on a few consecutive steps, deterministic elsewhere,
and GRPO trains exactly those steps."""

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.rollout import sample
from diffrl.sampling import make_sampler
from diffrl.sampling.flow import flow_ode_step, flow_sde_step
from diffrl.trainers.loop import Trainer

FAST = [
    "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
    "sampling.num_steps=5", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=4",
    "train.train_batch_size=2", "train.adam_weight_decay=0", "logging.log_with=none", "logging.progress=false",
]


def make_trainer(tmp_path, *extra, model="tiny-sd3"):
    return Trainer(load_config(None, [*FAST, f"model={model}", f"output_dir={tmp_path}", *extra]))


def test_window_steps_are_sde_and_the_rest_euler():
    """Each step of a windowed chain equals the Euler step outside [2, 4) and the Flow-GRPO SDE step
    (same noise) inside it, written out from the step functions of the sampling module."""
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.0], dtype=torch.float64)

    class Schedule:  # the two fields the sampler reads
        kind = "flow"

    schedule = Schedule()
    schedule.sigmas = sigmas
    windowed = make_sampler("flow_sde", noise_level=0.7, window=(2, 4))
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    for i in range(5):
        v = torch.randn_like(x)
        got = windowed.step(schedule, i, x, v, generator=torch.Generator().manual_seed(i))
        if 2 <= i < 4:
            want = flow_sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level=0.7, sigma_max=sigmas[1],
                                 generator=torch.Generator().manual_seed(i))
            torch.testing.assert_close(got.log_prob, want.log_prob, rtol=0, atol=0)
        else:
            want = flow_ode_step(x, v, sigmas[i], sigmas[i + 1])
            assert got.log_prob is None
            torch.testing.assert_close(got.prev_sample, x + (sigmas[i + 1] - sigmas[i]) * v, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=0, atol=0)
        x = got.prev_sample


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd"])
def test_rollout_records_only_the_window_and_is_deterministic_before_it(tmp_path, model):
    trainer = make_trainer(tmp_path, "sampling.sde_window_size=2", "sampling.sde_window_range=[1,5]", model=model)
    batch = trainer.rollout(0)
    traj = batch.trajectory
    start = int(traj.steps[0])
    assert traj.log_probs.shape == (6, 2) and traj.steps.tolist() == [start, start + 1] and 1 <= start <= 3
    # up to the window the chain is the deterministic sampler's, from the same initial noise
    policy, sched = trainer.policy, traj.schedule
    ode = make_sampler("flow_ode" if model == "tiny-sd3" else "ddim", eta=0.0)
    cond = batch.cond
    ref = sample(policy, cond, ode, sched, trainer.cfg.sampling.guidance_scale, latents=traj.latents[:, 0])
    torch.testing.assert_close(traj.latents[:, : start + 1], ref.latents[:, : start + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(traj.latents[:, start + 1], ref.latents[:, start + 1], atol=1e-3)  # noise drawn
    # re-scoring the window's steps on-policy gives ratio 1
    rows = torch.arange(6)
    for col in range(2):
        steps = traj.steps[col].expand(6)
        new = trainer.algorithm.step_log_prob(batch, rows, steps).log_prob
        torch.testing.assert_close(new, traj.log_probs[:, col], rtol=0, atol=1e-5)


def test_windows_are_drawn_per_iteration_inside_the_range(tmp_path):
    trainer = make_trainer(tmp_path, "sampling.num_steps=10", "sampling.sde_window_size=2", "sampling.sde_window_range=[0,6]")
    windows = [trainer.rollout_sampler(i).window for i in range(40)]
    assert all(0 <= s and e == s + 2 and e <= 6 for s, e in windows)
    assert {s for s, _ in windows} == {0, 1, 2, 3, 4}
    assert windows == [trainer.rollout_sampler(i).window for i in range(40)]  # a function of (seed, iteration)
    assert make_trainer(tmp_path / "b").rollout_sampler(0).window is None  # default: every step stochastic


def test_grpo_with_a_window_trains_and_changes_the_lora(tmp_path):
    trainer = make_trainer(tmp_path, "max_iterations=1", "sampling.sde_window_size=1", "grpo.timestep_fraction=1.0",
                           "train.learning_rate=1e-3", "grpo.kl_beta=0.04")
    net = trainer.policy.trainable_module()
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    rows = trainer.train()
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    changed = [n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


@pytest.mark.parametrize("overrides, expected", [
    (["sampling.sde_window_size=6"], "sampling.sde_window_size"),
    (["sampling.sde_window_size=-1"], "sampling.sde_window_size"),
    (["sampling.sde_window_range=[0,3]"], "sampling.sde_window_size"),
    (["sampling.sde_window_size=3", "sampling.sde_window_range=[2,4]"], "shorter"),
    (["sampling.sde_window_size=1", "sampling.sde_window_range=[3,9]"], "sampling.sde_window_range"),
    (["sampling.sde_window_size=1", "sampling.sampler=flow_ode"], "stochastic sampler"),
])
def test_invalid_windows_name_the_field(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, [*FAST, "model=tiny-sd3", f"output_dir={tmp_path}", *overrides])
