"""GRPO through the shared loop on the tiny policies: on-policy ratios, what training changes, resume."""

import json
import math

import pytest
import torch

from diffrl.config import load_config
from diffrl.trainers.loop import Trainer

FAST = [
    "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=4",
    "train.train_batch_size=2", "train.adam_weight_decay=0", "logging.log_with=none", "logging.progress=false",
]


MOTION = ["reward=motion_physics", "data.prompts=builtin:toy_motion_train", "policy.num_frames=16",
          "sampling.num_steps=4"]
"""tiny-motion: a motion reward and prompt set, 16 frames (0.8 s); DDPM's last step lands on alpha 1 (not trained)."""


def make_trainer(tmp_path, *extra, model="tiny-sd3"):
    cfg = load_config(None, [*FAST, f"model={model}", f"output_dir={tmp_path}", *extra])
    return Trainer(cfg)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3", "tiny-flux", "tiny-motion"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-6)])
def test_first_update_ratio_is_one_on_policy(tmp_path, model, dtype, tol):
    """Re-scoring stored transitions under the sampling weights gives ratio 1, although the rollout
    ran in batches of 4 with CFG over all steps and re-scoring runs 2 rows at a time, steps shuffled."""
    trainer = make_trainer(tmp_path, f"policy.dtype={dtype}", *(MOTION if model == "tiny-motion" else []), model=model)
    batch = trainer.rollout(0)
    B, N = batch.trajectory.log_probs.shape
    assert batch.trajectory.log_probs.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(B, generator=gen)
    with torch.no_grad():
        for start in range(0, B, 2):
            rows = order[start : start + 2]
            steps = torch.randint(0, N, (len(rows),), generator=gen)
            new = trainer.algorithm.step_log_prob(batch, rows, steps).log_prob
            ratio = torch.exp(new - batch.trajectory.log_probs[rows, steps])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=tol, rtol=0)


def test_ddim_set_alpha_to_one_last_step_is_not_trained(tmp_path):
    """With diffusers' DDIMScheduler default set_alpha_to_one=True the last step's alpha_prev is 1, so at eta 1
    its variance is 0: the rollout records log-probs for the other steps only, they are finite, and GRPO's
    surrogate and KL over them are finite (the zero-variance step's log-prob used to be NaN)."""
    from diffusers import DDIMScheduler

    trainer = make_trainer(tmp_path, "sampling.eta=1.0", "grpo.kl_beta=0.04", "grpo.timestep_fraction=1.0", model="tiny-sd")
    trainer.policy.pipe.scheduler = DDIMScheduler.from_config(trainer.policy.scheduler.config, set_alpha_to_one=True)
    batch = trainer.rollout(0)
    N = trainer.cfg.sampling.num_steps
    assert float(batch.trajectory.schedule.alphas_cumprod[-1]) == 1.0
    assert batch.trajectory.steps.tolist() == list(range(N - 1))
    assert torch.isfinite(batch.trajectory.log_probs).all()
    trainer.advantages(batch)
    trainer.policy.denoiser.train()
    metrics = trainer.algorithm.update(batch, trainer.optimizer, torch.Generator().manual_seed(0))
    assert all(math.isfinite(metrics[k]) for k in ("loss", "kl", "grad_norm")), metrics
    assert metrics["grad_norm"] > 0


def test_group_members_get_distinct_noise(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = trainer.rollout(0)
    x0 = batch.trajectory.latents[:, 0].flatten(1)  # [B, D]
    dist = torch.cdist(x0, x0) + torch.eye(len(x0)) * 1e9
    assert dist.min() > 1.0
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.prompts[0] == batch.prompts[2] != batch.prompts[3]


def test_two_iterations_change_every_lora_tensor_and_nothing_frozen(tmp_path):
    trainer = make_trainer(tmp_path, "max_iterations=2", "grpo.kl_beta=0.04", "train.learning_rate=1e-3")
    net = trainer.policy.trainable_module()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    trainer.train()
    for n, p in net.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"LoRA tensor {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen tensor {n} changed"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # row 0: the base model's evaluation
    assert rows[0]["samples_seen"] == 0 and "eval_reward_mean" in rows[0] and "loss" not in rows[0]
    assert rows[-1]["samples_seen"] == 12 and "eval_gain" in rows[-1]
    for key in ("reward_mean", "reward_std", "loss", "seconds", "kl", "clip_frac", "ratio_mean", "ratio_max",
                "grad_norm", "zero_std_frac", "time_rollout", "time_update"):
        assert key in rows[-1]
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "images" / "iter_000002.png").is_file() and (tmp_path / "eval" / "iter_000000.jsonl").is_file()
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_resume_continues_bit_identically(tmp_path, schedule):
    full = make_trainer(tmp_path / "a", "max_iterations=3", "logging.save_every=1", "train.learning_rate=1e-3",
                        f"train.lr_schedule={schedule}")
    rows = full.train()
    ckpt = tmp_path / "a" / "checkpoints" / "iter_000002"
    assert sorted(p.suffix for p in ckpt.iterdir() if p.is_file()) == [".json", ".json", ".safetensors", ".safetensors", ".safetensors"]
    resumed = make_trainer(tmp_path / "b", "max_iterations=3", f"resume={ckpt}", "train.learning_rate=1e-3",
                           f"train.lr_schedule={schedule}")
    assert resumed.iteration == 2 and resumed.samples_seen == 12
    row = resumed.train()[0]
    assert row["iteration"] == 3
    assert row["loss"] == rows[2]["loss"] and row["reward_mean"] == rows[2]["reward_mean"]
    for a, b in zip(full.policy.trainable_parameters(), resumed.policy.trainable_parameters()):
        assert torch.equal(a, b)


def test_nonfinite_rewards_are_reported_and_excluded(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = trainer.rollout(0)
    batch.rewards[1] = float("nan")
    batch.rewards[4] = float("inf")
    batch.valid = torch.isfinite(batch.rewards)
    row = trainer.advantages(batch)
    assert row["nonfinite_rewards"] == 2
    assert torch.isfinite(batch.advantages).all()
    assert batch.advantages[1] == 0 and batch.advantages[4] == 0
    finite = batch.rewards[batch.valid]
    assert row["reward_mean"] == pytest.approx(finite.mean().item())


def test_ema_tracks_the_weights_and_is_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, "max_iterations=1", "train.ema=true", "train.ema_decay=0.75", "train.learning_rate=1e-3")
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    trainer.train()
    after = trainer.policy.trainable_parameters()
    for e, p0, p1 in zip(trainer.ema, before, after):
        torch.testing.assert_close(e, 0.75 * p0 + 0.25 * p1.detach(), rtol=0, atol=1e-7)
    resumed = make_trainer(tmp_path / "r", "max_iterations=2", "train.ema=true", "train.ema_decay=0.75",
                           f"resume={tmp_path}")
    for a, b in zip(trainer.ema, resumed.ema):
        assert torch.equal(a, b)


def test_trained_checkpoint_loads_into_a_stock_diffusers_pipeline(tmp_path):
    from diffrl.pipelines.registry import freeze_for_sampling
    from diffrl.pipelines.tiny import tiny_sd3_pipeline
    from diffrl.rollout import sample
    from diffrl.sampling import make_sampler

    trainer = make_trainer(tmp_path, "max_iterations=1", "train.learning_rate=1e-2")
    trainer.train()
    policy = trainer.policy
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(5))
    prompts = ["a photo of a cat", "a photo of a owl"]
    with torch.no_grad():
        trained = sample(policy, policy.encode_prompt(prompts), make_sampler("flow_ode"), policy.schedule(3), 4.5,
                         latents=noise, record=False).final
        with policy.reference():
            base = sample(policy, policy.encode_prompt(prompts), make_sampler("flow_ode"), policy.schedule(3), 4.5,
                          latents=noise, record=False).final
    assert (trained - base).abs().max() > 1e-4  # training changed the model

    pipe = freeze_for_sampling(tiny_sd3_pipeline(seed=0, resolution=32))  # the same base weights, fresh objects
    pipe.load_lora_weights(tmp_path / "checkpoints" / "iter_000001" / "lora")
    out = pipe(prompt=prompts, latents=noise, num_inference_steps=3, guidance_scale=4.5, height=32, width=32,
               max_sequence_length=policy.max_sequence_length, output_type="latent").images
    torch.testing.assert_close(out, trained, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_bf16_base_trains_float32_lora(tmp_path, model):
    trainer = make_trainer(tmp_path, "max_iterations=1", "policy.dtype=bfloat16", "train.learning_rate=1e-3", model=model)
    assert trainer.policy.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.policy.trainable_parameters()} == {torch.float32}
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    row = trainer.train()[0]
    assert torch.isfinite(torch.tensor(row["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))


def test_skipping_zero_advantage_rows_leaves_the_gradient_unchanged(tmp_path):
    """Without KL, samples whose advantage is 0 are not re-scored; the loss is still the mean over the whole train
    batch, so the gradient equals the one computed with every row (float64), while fewer samples run."""
    trainer = make_trainer(tmp_path, "policy.dtype=float64", "grpo.kl_beta=0", "grpo.timestep_fraction=1.0", "train.train_batch_size=6",
                           "train.max_grad_norm=0")
    batch = trainer.rollout(0)
    trainer.advantages(batch)
    batch.advantages = torch.tensor([0.0, 1.5, -1.5, 0.0, 0.0, 0.7], dtype=torch.float64)  # rows 0, 3, 4 learn nothing
    params = trainer.policy.trainable_parameters()
    with torch.no_grad():  # LoRA B starts at 0: give every tensor a value so that every gradient is non-zero
        for p in params:
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    grads = []
    real_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: grads.append([p.grad.clone() for p in params])
    metrics = trainer.algorithm.update(batch, trainer.optimizer, torch.Generator().manual_seed(0))
    assert metrics["trained_frac"] == 0.5
    # the same update with every row re-scored: the surrogate written out over all six rows
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.optimizer.step = real_step
    g, N = trainer.cfg.grpo, batch.trajectory.log_probs.shape[1]
    rows = torch.arange(6)
    for j in range(N):
        cols = torch.full((6,), j)
        step = trainer.algorithm.step_log_prob(batch, rows, batch.trajectory.steps[cols])
        ratio = torch.exp(step.log_prob - batch.trajectory.log_probs[rows, cols])
        adv = batch.advantages
        surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - g.clip_range, 1 + g.clip_range))
        (surrogate.mean() / N).backward()
    for a, p in zip(grads[0], params):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-14)
    assert any(p.grad.abs().sum() > 0 for p in params)


def test_update_of_a_model_trained_with_dropout_starts_on_policy(tmp_path):
    """toy-motion was pretrained with dropout 0.1 (MDM's): the update must run the same function as the rollout, so
    a one-epoch iteration whose only train batch is taken before any optimiser step has every ratio 1."""
    trainer = make_trainer(tmp_path, *MOTION, "train.train_batch_size=6", "grpo.timestep_fraction=1.0", model="toy-motion")
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.policy.denoiser.modules())
    row = trainer.train_iteration()
    assert abs(row["ratio_max"] - 1.0) < 1e-5 and abs(row["ratio_mean"] - 1.0) < 1e-5
