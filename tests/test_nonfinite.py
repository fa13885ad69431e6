"""Nothing lost, nothing silent (issue 17): a NaN/inf gradient never reaches the weights, the optimiser state or a
checkpoint, in every trainer family; too many in a row stop the run naming the last good checkpoint; a NaN/inf
sample scores NaN (masked and counted by the loop), never an ordinary-looking reward."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffrl.config import ConfigError, load_config
from diffrl.optim import GuardedStep, NonFiniteTrainingError
from diffrl.rewards import build_reward
from diffrl.trainers.loop import Trainer

NAN = float("nan")
TINY = [
    "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=6", "train.train_batch_size=3",
    "train.adam_weight_decay=0", "train.learning_rate=1e-3", "logging.log_with=none", "logging.progress=false",
]
BACKPROP = [  # DRaFT / EasyTune: a differentiable reward, one chain batch per train batch
    "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "reward=colorfulness",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=1", "train.group_size=2", "train.rollout_batch_size=2", "train.train_batch_size=2",
    "train.adam_weight_decay=0", "train.learning_rate=1e-2", "logging.log_with=none", "logging.progress=false",
]
LM = [
    "model=toy-arith", "algorithm=lm_grpo", "policy.lora_rank=4", "policy.lora_alpha=8",
    "train.prompts_per_iteration=3", "train.group_size=4", "train.rollout_batch_size=6", "train.train_batch_size=6",
    "train.learning_rate=1e-2", "train.adam_weight_decay=0", "lm.max_new_tokens=4", "lm.num_eval=4",
    "logging.log_with=none", "logging.progress=false",
]
DIFFUSION = {  # algorithm -> its settings: one per optimiser-step path (grpo.py, prdp.py, forward_process.py, reward_backprop.py)
    "grpo": [*TINY, "algorithm=grpo"],
    "prdp": [*TINY, "algorithm=prdp"],
    "nft": [*TINY, "algorithm=nft"],
    "crd": [*TINY, "algorithm=crd"],
    "draft": [*BACKPROP, "algorithm=draft"],
    "easytune": [*BACKPROP, "algorithm=easytune"],
}


def make_trainer(tmp_path, algorithm, *extra):
    if algorithm == "lm_grpo":
        from diffrl.lm.trainer import LMTrainer

        return LMTrainer(load_config(None, [*LM, f"output_dir={tmp_path}", *extra]))
    return Trainer(load_config(None, [*DIFFUSION[algorithm], "model=tiny-sd3", f"output_dir={tmp_path}", *extra]))


def guard_of(trainer) -> GuardedStep:
    return trainer.step_guard if hasattr(trainer, "step_guard") else trainer.algorithm.step_guard


def update(trainer, iteration: int = 0) -> dict:
    """One iteration's update (the loop's steps without logging); returns its metrics."""
    gen = torch.Generator().manual_seed(iteration)
    if hasattr(trainer, "step_guard"):  # the LM trainer
        trainer.policy.model.train()
        return trainer.update(trainer.rollout(iteration), gen)
    batch = trainer.rollout(iteration)
    if not trainer.algorithm.samples_in_update:
        trainer.advantages(batch)
    trainer.policy.denoiser.train()
    return trainer.algorithm.update(batch, trainer.optimizer, gen)


def poison_gradient(trainer):
    """A hook that makes the gradient of one trainable tensor NaN: every later step's gradient norm is NaN."""
    return trainer.policy.trainable_parameters()[0].register_hook(lambda g: torch.full_like(g, NAN))


def assert_same_state(a: dict, b: dict) -> None:
    """Two optimiser state_dicts hold exactly the same values."""
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        assert a["state"][idx].keys() == b["state"][idx].keys()
        for key, value in a["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][idx][key])), (idx, key)


# ---- (a) a non-finite gradient changes nothing ------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", [*DIFFUSION, "lm_grpo"])
def test_nonfinite_gradient_leaves_weights_and_optimizer_unchanged(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, algorithm, "train.max_nonfinite_steps=100")
    guard = guard_of(trainer)
    first = update(trainer, 0)  # a finite update first: the optimiser has moments to protect
    assert guard.skipped == 0 and math.isfinite(first["grad_norm"])
    params = trainer.policy.trainable_parameters()
    weights = [p.detach().clone() for p in params]
    state = copy.deepcopy(trainer.optimizer.state_dict())
    assert state["state"], "the finite update stepped the optimiser"

    poison_gradient(trainer)
    guard.start_iteration(2)
    metrics = update(trainer, 1)
    assert guard.skipped >= 1 and guard.consecutive == guard.skipped  # every step of the iteration was skipped
    assert math.isnan(metrics["grad_norm"])  # shown, not hidden
    for p, w in zip(params, weights):
        assert torch.equal(p.detach(), w)
        assert p.grad is None  # zeroed: the next step does not add to them
    assert_same_state(trainer.optimizer.state_dict(), state)


# ---- (b) too many in a row stop the run, naming the last good checkpoint; no checkpoint holds NaN ----------------
def assert_checkpoints_finite(out):
    files = sorted((out / "checkpoints").rglob("*.safetensors"))
    assert files
    for path in files:
        for name, t in load_file(path).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{path}: {name} holds NaN/inf"


def poison_from_iteration(trainer, iteration: int, poison) -> None:
    """Call poison(trainer) when the run starts iteration `iteration` (1-based, as metrics.jsonl numbers them)."""
    real = trainer.train_iteration

    def train_iteration():
        if trainer.iteration == iteration - 1:
            poison(trainer)
        return real()

    trainer.train_iteration = train_iteration


def nan_weight(trainer):
    """One trainable weight NaN (as a flipped byte in a checkpoint would make it): the loss is NaN from then on."""
    with torch.no_grad():
        trainer.policy.trainable_parameters()[0].view(-1)[0] = NAN


@pytest.mark.parametrize("algorithm", ["grpo", "lm_grpo"])
def test_skips_in_a_row_stop_the_run_naming_the_last_good_checkpoint(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, algorithm, "max_iterations=4", "logging.save_every=1", "logging.eval_every=0",
                           "train.max_nonfinite_steps=2", *(["train.train_batch_size=2"] if algorithm == "lm_grpo" else []))
    poison_from_iteration(trainer, 3, poison_gradient)
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.train()
    message = str(err.value)
    good = tmp_path / "checkpoints" / "iter_000002"
    assert "2 optimiser steps in a row had a non-finite gradient norm" in message and "iteration 3" in message
    assert f"The last good checkpoint is {good}" in message and "lower learning rate" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    assert_checkpoints_finite(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows[1:]] == [0, 0]


def test_nan_loss_is_logged_and_its_steps_skipped(tmp_path):
    """A NaN loss (here NaN advantages, finite rewards) shows as NaN in metrics.jsonl; its steps are skipped, so the
    checkpoint written after it holds the weights and optimiser state of the last good step."""
    trainer = make_trainer(tmp_path, "grpo", "max_iterations=2", "logging.save_every=1", "logging.eval_every=0",
                           "train.max_nonfinite_steps=100")
    real = trainer.advantages

    def advantages(batch):
        row = real(batch)
        if trainer.iteration == 1:
            batch.advantages = torch.full_like(batch.advantages, NAN)
        return row

    trainer.advantages = advantages
    trainer.train()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["iteration"] == 2 and row["skipped_steps"] == 2 and math.isnan(row["loss"]) and math.isnan(row["grad_norm"])
    assert_checkpoints_finite(tmp_path)
    first, second = (load_file(tmp_path / "checkpoints" / f"iter_00000{i}" / name) for i in (1, 2)
                     for name in ("trainable.safetensors",))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_nan_weights_are_never_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, "grpo", "max_iterations=1", "logging.eval_every=0")
    trainer.train()
    good = tmp_path / "checkpoints" / "iter_000001"
    before = load_file(good / "trainable.safetensors")
    nan_weight(trainer)
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.save()
    assert "refusing to write the checkpoint of iteration 1: 1 of its" in str(err.value)
    assert f"The last good checkpoint is {good}" in str(err.value)
    after = load_file(good / "trainable.safetensors")  # not overwritten
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001"]


@pytest.mark.parametrize("algorithm", ["grpo", "draft"])
def test_nan_weights_mid_run_stop_naming_the_last_good_checkpoint(tmp_path, algorithm):
    """A NaN weight (a flipped byte) makes every sample NaN: they score NaN, not a reward, and the run stops."""
    trainer = make_trainer(tmp_path, algorithm, "max_iterations=3", "logging.save_every=1", "logging.eval_every=0")
    poison_from_iteration(trainer, 2, nan_weight)
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.train()
    assert "is NaN/inf" in str(err.value)
    assert f"The last good checkpoint is {tmp_path / 'checkpoints' / 'iter_000001'}" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001"]
    assert_checkpoints_finite(tmp_path)


def test_no_checkpoint_yet_is_said(tmp_path):
    trainer = make_trainer(tmp_path, "grpo", "max_iterations=2", "logging.eval_every=0", "train.max_nonfinite_steps=1")
    poison_from_iteration(trainer, 1, poison_gradient)
    with pytest.raises(NonFiniteTrainingError, match="No checkpoint was written yet"):
        trainer.train()
    assert not (tmp_path / "checkpoints").exists()


def test_max_nonfinite_steps_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    import diffrl.pipelines.registry as registry

    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(ConfigError, match="'train.max_nonfinite_steps' must be > 0"):
        load_config(None, ["train.max_nonfinite_steps=0", f"output_dir={tmp_path}"])


# ---- (c) a finite step is the plain clip + step ----------------------------------------------------------------
def two_copies():
    from accelerate import Accelerator

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    copies = []
    for _ in range(2):
        model = copy.deepcopy(net)
        copies.append((model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)))
    return Accelerator(cpu=True), copies


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05, 100.0])  # no clip, a clip that binds, one that does not
def test_finite_steps_are_bit_identical_to_clip_and_step(max_grad_norm):
    acc, [(a, opt_a), (b, opt_b)] = two_copies()
    guard = GuardedStep(acc, max_grad_norm, 3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        a(x).square().sum().backward()
        norm_a = guard(opt_a)
        b(x).square().sum().backward()
        norm_b = acc.clip_grad_norm_(list(b.parameters()), max_grad_norm or float("inf"))  # the code before the guard
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
        assert norm_a == float(norm_b) and guard.stepped
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert_same_state(opt_a.state_dict(), opt_b.state_dict())
    assert guard.skipped == guard.consecutive == 0


def test_finite_grpo_update_is_unchanged(tmp_path):
    """The GRPO trainer with the guard and with the code it replaced (clip, step, zero) gives the same weights."""
    trainers = [make_trainer(tmp_path / name, "grpo") for name in ("guarded", "plain")]
    acc = trainers[1].accelerator

    def plain(optimizer):  # the code before the guard: clip the policy's trainable parameters, then step
        params = trainers[1].policy.trainable_parameters()
        norm = acc.clip_grad_norm_(params, trainers[1].cfg.train.max_grad_norm or float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    trainers[1].algorithm.step_guard = plain
    metrics = [update(t) for t in trainers]
    assert metrics[0]["grad_norm"] == metrics[1]["grad_norm"] and metrics[0]["loss"] == metrics[1]["loss"]
    for p, q in zip(*(t.policy.trainable_parameters() for t in trainers)):
        assert torch.equal(p, q)


def test_a_finite_step_ends_a_run_of_skips():
    acc, [(net, opt), _] = two_copies()
    guard = GuardedStep(acc, 1.0, 3)
    x = torch.randn(4, 5)
    for poisoned in (True, True, False, True, True):
        loss = net(x).square().sum() * (NAN if poisoned else 1.0)
        loss.backward()
        guard(opt)
    assert guard.skipped == 4 and guard.consecutive == 2
    net(x).square().sum().mul(float("inf")).backward()
    guard.start_iteration(7)
    with pytest.raises(NonFiniteTrainingError, match=r"3 optimiser steps in a row .* iteration 7"):
        guard(opt)


def test_fp16_loss_scale_overflows_back_off_before_they_count():
    """Under fp16 loss scaling an overflow at a scale > 1 may be the scale's fault: the scaler halves it (update)
    and the skip does not count towards the limit; at a scale <= 1 it does. The weights never move."""

    class ScaledAccelerator:
        def __init__(self, optimizer):
            self.scaler, self.optimizer = torch.amp.GradScaler("cpu", init_scale=4.0), optimizer

        def clip_grad_norm_(self, params, max_norm):
            self.scaler.unscale_(self.optimizer)
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

    _, [(net, opt), _] = two_copies()
    acc = ScaledAccelerator(opt)
    guard = GuardedStep(acc, 1.0, 2)
    before = [p.detach().clone() for p in net.parameters()]
    scales = []
    with pytest.raises(NonFiniteTrainingError):
        for _ in range(10):
            acc.scaler.scale(net(torch.ones(1, 5)).sum() * float("inf")).backward()
            scales.append(acc.scaler.get_scale())
            guard(opt)
    assert scales == [4.0, 2.0, 1.0, 0.5]  # two skips at scales 4 and 2 back off; those at 1 and 0.5 count
    assert guard.skipped == 4 and all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


# ---- (d) a NaN/inf sample scores NaN; the finite rows score as before -------------------------------------------
def poisoned(samples: torch.Tensor, rows=(1,), value=NAN) -> torch.Tensor:
    out = samples.clone()
    for r in rows:
        out[r].view(-1)[3] = value
    return out


def images(batch=3, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


REWARD_CASES = {  # name -> (kwargs, samples)
    "jpeg_compressibility": ({}, lambda: images()),
    "aesthetic": ({"model": "tiny"}, lambda: images()),
    "temporal_flicker": ({}, lambda: torch.rand(3, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
    "motion_physics": ({}, lambda: torch.randn(3, 24, 263, generator=torch.Generator().manual_seed(0))),
    "tmr": ({"model": "tiny"}, lambda: torch.randn(3, 24, 263, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("name", list(REWARD_CASES))
@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_nonfinite_samples_score_nan_and_the_rest_as_before(name, value):
    kwargs, make = REWARD_CASES[name]
    reward = build_reward(name, **kwargs).load()
    samples = make()
    prompts = [f"prompt {i}" for i in range(len(samples))]
    clean = reward(samples, prompts)
    assert torch.isfinite(clean).all()
    scores = reward(poisoned(samples, value=value), prompts)
    assert torch.isnan(scores[1])
    torch.testing.assert_close(scores[[0, 2]], clean[[0, 2]], rtol=1e-6, atol=1e-6)
    assert torch.isnan(reward(poisoned(samples, rows=(0, 1, 2)), prompts)).all()


def test_the_reward_model_never_sees_a_nonfinite_sample():
    reward = build_reward("jpeg_compressibility")
    seen = []
    real = reward.score
    reward.score = lambda samples, prompts, metadata: seen.append(samples.clone()) or real(samples, prompts, metadata)
    scores = reward(poisoned(images(4), rows=(0, 2)), ["a", "b", "c", "d"], [{"i": i} for i in range(4)])
    assert len(seen) == 1 and seen[0].shape[0] == 2 and torch.isfinite(seen[0]).all()
    assert torch.isnan(scores[[0, 2]]).all() and torch.isfinite(scores[[1, 3]]).all()
    reward(poisoned(images(2), rows=(0, 1)), ["a", "b"])
    assert len(seen) == 1  # nothing finite: not called at all


def test_mixture_components_and_total_are_nan_for_a_nan_sample():
    from diffrl.rewards.mixture import RewardMixture, RolloutScorer

    mixture = RewardMixture.from_spec({"jpeg_compressibility": 1.0, "colorfulness": 0.5})
    x = images()
    clean_total, clean_parts = RolloutScorer(mixture)._score(x, ["a"] * 3, None)
    total, parts = RolloutScorer(mixture)._score(poisoned(x), ["a"] * 3, None)
    assert torch.isnan(total[1]) and all(torch.isnan(v[1]) for v in parts.values())
    assert torch.equal(total[[0, 2]], clean_total[[0, 2]])
    assert torch.isnan(mixture(poisoned(x), ["a"] * 3)[1])


def test_differentiable_reward_keeps_the_gradient_of_the_finite_rows():
    reward = build_reward("colorfulness")
    x = poisoned(images()).requires_grad_()
    scores = reward(x, ["a"] * 3)
    assert torch.isnan(scores[1])
    scores[[0, 2]].sum().backward()
    assert x.grad[[0, 2]].abs().sum() > 0 and torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
