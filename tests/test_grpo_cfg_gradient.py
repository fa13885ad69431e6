"""grpo.cfg_gradient: the classifier-free guidance branches GRPO's re-scoring back-propagates through.

"both" (default, as DDPO's code): d(u + g (c - u)) = (1 - g) du + g dc. "cond" (as a July 2025 revision of
Flow-GRPO's train_sd3.py): the unconditional prediction u detached, g dc only. The reference below runs the denoiser
on the conditional and the unconditional inputs in two separate calls (predict at guidance 1, no CFG code involved),
detaches u itself where the mode says so, and back-propagates the GRPO loss of a whole train batch in float64.
"""

from __future__ import annotations

import pytest
import torch

from diffrl.config import load_config
from diffrl.core import flow_grpo_kl
from diffrl.pipelines import Condition
from diffrl.trainers.loop import Trainer

# one optimiser step over the whole batch (train_batch_size = B) and every stochastic step (timestep_fraction 1), no
# gradient clipping: the step's gradient is the full loss's gradient, whatever order the update draws
FAST = ["policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "policy.dtype=float64",
        "sampling.num_steps=3", "sampling.eval_num_steps=2", "sampling.guidance_scale=4.5", "data.num_eval_prompts=2",
        "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=6", "train.train_batch_size=6",
        "train.max_grad_norm=0", "grpo.timestep_fraction=1", "logging.log_with=none", "logging.progress=false"]


def make_trainer(tmp_path, *extra):
    trainer = Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", *extra]))
    gen = torch.Generator().manual_seed(1)  # LoRA B starts at 0; a seeded LoRA lets both branches carry gradient
    with torch.no_grad():
        for p in trainer.policy.trainable_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return trainer


def reference_gradient(trainer, batch, detach_uncond: bool) -> list[torch.Tensor]:
    """d/d(LoRA) of the GRPO loss: mean over valid rows and trained steps of -A ratio (the clip is inactive on
    policy), plus beta * Flow-GRPO's KL against the LoRA-off model, with v = u + g (c - u) from two separate calls."""
    policy, sampler, cfg = trainer.policy, trainer.algorithm.sampler, trainer.cfg
    traj, g = batch.trajectory, cfg.sampling.guidance_scale
    B, N = traj.log_probs.shape
    adv = batch.advantages.clamp(-cfg.grpo.adv_clip_max, cfg.grpo.adv_clip_max)  # [B]
    w = batch.valid.to(adv.dtype)  # [B]
    cond = Condition(batch.cond.cond, None, batch.cond.extra)
    uncond = Condition(batch.cond.uncond, None, batch.cond.extra)
    loss = torch.zeros((), dtype=torch.float64)
    for col in range(N):
        step = int(traj.steps[col])
        steps = torch.full([B], step)  # [B]
        x_t, x_prev = traj.latents[:, step], traj.latents[:, step + 1]  # [B, *S]
        t = traj.schedule.timesteps[steps]  # [B]
        v_cond = policy.predict(x_t, t, cond, 1.0)  # [B, *S]
        v_uncond = policy.predict(x_t, t, uncond, 1.0)  # [B, *S]
        if detach_uncond:
            v_uncond = v_uncond.detach()
        v = v_uncond + g * (v_cond - v_uncond)
        out = sampler.step(traj.schedule, steps, x_t, v, prev_sample=x_prev, prediction_type=policy.prediction_type)
        rows = -adv * torch.exp(out.log_prob - traj.log_probs[:, col])  # [B]
        if cfg.grpo.kl_beta > 0:
            with torch.no_grad(), policy.reference():
                v_ref = policy.predict(x_t, t, batch.cond, g)
                ref = sampler.step(traj.schedule, steps, x_t, v_ref, prev_sample=x_prev,
                                   prediction_type=policy.prediction_type)
            rows = rows + cfg.grpo.kl_beta * flow_grpo_kl(out.mean, ref.mean, out.sde_std)
        loss = loss + (rows * w).sum() / w.sum().clamp_min(1) / N
    params = policy.trainable_parameters()
    grads = torch.autograd.grad(loss, params)
    return [gr.detach().clone() for gr in grads]


def update_gradient(trainer, batch) -> tuple[list[torch.Tensor], dict]:
    """The gradient GRPO's update steps with (its one optimiser step), and its metrics."""
    params, step, grads = trainer.policy.trainable_parameters(), trainer.optimizer.step, []

    def record(*args, **kwargs):
        grads.append([p.grad.detach().clone() for p in params])
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    metrics = trainer.algorithm.update(batch, trainer.optimizer, torch.Generator().manual_seed(0))
    assert len(grads) == 1
    return grads[0], metrics


def run(tmp_path, mode: str, *extra):
    trainer = make_trainer(tmp_path / mode, f"grpo.cfg_gradient={mode}", *extra)
    assert trainer.algorithm.cfg_gradient == mode
    batch = trainer.rollout(0)
    trainer.advantages(batch)
    assert batch.valid.all() and (batch.advantages != 0).any()
    expected = reference_gradient(trainer, batch, detach_uncond=mode == "cond")
    got, metrics = update_gradient(trainer, batch)
    return trainer, batch, expected, got, metrics


def assert_same(got, expected):
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd"])
def test_cfg_gradient_matches_the_two_call_reference(tmp_path, model):
    """float64, CFG 4.5, no KL: "cond" steps with the gradient of g v_cond alone, "both" with the undetached one, each
    equal to the reference within 1e-12; the two differ; the loss (a forward value) is the same in both modes."""
    runs = {mode: run(tmp_path, mode, f"model={model}", "grpo.kl_beta=0") for mode in ("cond", "both")}
    for mode, (_, _, expected, got, _) in runs.items():
        assert_same(got, expected)
    cond, both = runs["cond"][3], runs["both"][3]
    gap = max(float((a - b).abs().max()) for a, b in zip(cond, both))
    scale = max(float(b.abs().max()) for b in both)
    assert gap > 1e-3 * scale  # the unconditional branch's (1 - g) du is a sizeable part of the gradient
    assert runs["cond"][4]["loss"] == runs["both"][4]["loss"]
    assert runs["cond"][4]["policy_loss"] == runs["both"][4]["policy_loss"]


@pytest.mark.parametrize("batched", [False, True])
def test_cfg_gradient_cond_with_kl_and_the_batched_reference(tmp_path, batched):
    """With Flow-GRPO's KL (beta 0.04), two-pass and grpo.kl_batched (policy and LoRA-off rows in one call, where the
    CFG pairs of both halves go through the same combination): "cond" equals the detached reference within 1e-12."""
    extra = ["model=tiny-sd3", "grpo.kl_beta=0.04", f"grpo.kl_batched={str(batched).lower()}"]
    _, _, expected, got, metrics = run(tmp_path, "cond", *extra)
    assert metrics["kl"] > 0
    assert_same(got, expected)


def test_cfg_gradient_leaves_the_prediction_unchanged(tmp_path):
    """Policy.cfg_gradient("cond") changes no value of predict (bit for bit), only what its gradient reaches: the
    gradient of sum(predict) w.r.t. the unconditional embeddings is zero under it and not otherwise."""
    trainer = make_trainer(tmp_path, "model=tiny-sd3")
    policy = trainer.policy
    batch = trainer.rollout(0)
    x, t = batch.trajectory.latents[:3, 1], batch.trajectory.schedule.timesteps[1].expand(3)
    cond = batch.cond.index(torch.arange(3))
    embeds = cond.uncond["encoder_hidden_states"].clone().requires_grad_(True)
    cond.uncond = {**cond.uncond, "encoder_hidden_states": embeds}
    outputs, grads = {}, {}
    for mode in ("both", "cond"):
        with policy.cfg_gradient(mode):
            outputs[mode] = policy.predict(x, t, cond, 4.5)
        (grads[mode],) = torch.autograd.grad(outputs[mode].sum(), embeds)
    assert torch.equal(outputs["cond"], outputs["both"])
    assert grads["cond"].abs().max() == 0 < grads["both"].abs().max()
    assert policy._cfg_gradient == "both"  # restored on exit
    with pytest.raises(ValueError, match="cfg_gradient"):
        with policy.cfg_gradient("uncond"):
            pass
