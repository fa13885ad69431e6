"""DRaFT-K / ReFL / AlignProp: DRaFT-K's gradient against central finite differences of the truncated objective
(float64), ReFL's single denoiser call with gradient, AlignProp's limits p = 1 (the full chain) and p = 0
(DRaFT-1), step checkpointing leaving the gradient unchanged, the trainer on the tiny policies, exact resume,
and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.trainers.draft import keep_mask, refl_steps
from reward_backprop_helpers import (EXACT, colorfulness_loss, make_trainer, randomize_lora, record_steps,
                                     set_params, spy_predict, update_once)

ROOT = Path(__file__).resolve().parents[1]


def euler_chain(predict, cond, g, schedule, x, steps):
    """The flow ODE written out: x <- x + (sigma_{i+1} - sigma_i) v(x) over `steps`."""
    for i in steps:
        t = schedule.timesteps[i].expand(x.shape[0])
        x = x + (schedule.sigmas[i + 1].double() - schedule.sigmas[i].double()) * predict(x, t, cond, g)
    return x


@pytest.mark.parametrize("k", [1, 2, None])
def test_draft_k_gradient_matches_finite_differences(tmp_path, k):
    """In a float64 run the optimiser's gradient, projected on a direction d of the LoRA weights, equals the
    derivative of L(w + h d) at h = 0 to 1e-9, for L = -mean R(decode(chain of the last K steps from x_{N-K})),
    x_{N-K} fixed at the starting weights; for K < N it differs from the untruncated chain's derivative.

    The derivative is a central difference extrapolated to h -> 0 (Richardson, steps h, h/2, h/4: the h^2 and
    h^4 error terms cancel). A plain central difference cannot resolve 1e-9 here: L is about 74 while DRaFT-1's
    derivative is about 1e-2, so float64 rounding of L (~1e-14) alone is ~1e-7 of it at h = 1e-5."""
    n = 3
    trainer = make_trainer(tmp_path, "draft", *EXACT, f"sampling.num_steps={n}", f"draft.k={'null' if k is None else k}")
    randomize_lora(trainer, scale=0.2)
    _, predict = spy_predict(trainer.policy)
    steps = record_steps(trainer)
    batch = trainer.rollout(0)
    noise, cond, g = batch.trajectory.latents[:, 0], batch.cond, trainer.cfg.sampling.guidance_scale
    # a float64 run is float64 end to end: the chain, the decoded images and the reward the optimiser sees
    images = trainer.policy.decode(noise)
    assert noise.dtype == images.dtype == trainer.reward(images, batch.prompts).dtype == torch.float64
    w0 = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    update_once(trainer)
    assert len(steps) == 1  # one train batch, one optimiser step
    grad = steps[0]["grads"]

    set_params(trainer, w0)
    schedule = trainer.policy.schedule(n)
    first = 0 if k is None else n - k
    gen = torch.Generator().manual_seed(3)
    unit = lambda vs: [v / torch.sqrt(sum((u**2).sum() for u in vs)) for v in vs]  # noqa: E731
    # along the gradient plus a random part (a random direction alone is nearly orthogonal to it)
    d = unit([a + b for a, b in zip(unit(grad), unit([torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in w0]))])
    analytic = sum((a * b).sum() for a, b in zip(grad, d)).item()

    def central(start: int, h: float) -> float:
        with torch.no_grad():
            x_start = euler_chain(predict, cond, g, schedule, noise, range(start))  # fixed: the weights before the update
            losses = []
            for sign in (1, -1):
                set_params(trainer, [w + sign * h * v for w, v in zip(w0, d)])
                x = euler_chain(predict, cond, g, schedule, x_start, range(start, n))
                losses.append(colorfulness_loss(trainer.policy, x).item())
        set_params(trainer, w0)
        return (losses[0] - losses[1]) / (2 * h)

    def directional(start: int, h: float = 2e-2) -> float:
        d1, d2, d4 = (central(start, h / m) for m in (1, 2, 4))
        r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3  # O(h^4)
        return (16 * r2 - r1) / 15  # O(h^6)

    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx(directional(first), rel=1e-9)
    if first > 0:  # truncation is real: the full chain's derivative is another number
        assert abs(directional(0) - analytic) > 1e-3 * abs(analytic)


def test_refl_backpropagates_one_late_denoiser_call(tmp_path):
    """8 steps, ReFL range [0.75, 1] -> step 6 or 7; per train batch (2 of 2 samples) exactly one denoiser call with
    gradient, from a detached input, whose gradient is that of -R(decode(x_j - sigma_j v(x_j)))."""
    trainer = make_trainer(tmp_path, "draft", *EXACT, "sampling.num_steps=8", "draft.mode=refl", "train.group_size=4")
    randomize_lora(trainer)
    calls, predict = spy_predict(trainer.policy)
    steps = record_steps(trainer)
    metrics = update_once(trainer)
    schedule = trainer.policy.schedule(8)
    assert len(calls) == len(steps) == 2 and 6 <= metrics["refl_step"] <= 7
    g = trainer.cfg.sampling.guidance_scale
    for call, step in zip(calls, steps):
        assert not call["x_requires_grad"]
        (j,) = (schedule.timesteps == call["t"][0]).nonzero()[0].tolist()
        assert j in (6, 7)
        set_params(trainer, step["params"])
        x0 = call["x"] - schedule.sigmas[j].double() * predict(call["x"], call["t"], call["cond"], g)
        expected = torch.autograd.grad(colorfulness_loss(trainer.policy, x0), trainer.policy.trainable_parameters())
        for got, want in zip(step["grads"], expected):
            # float64 model; the schedule's sigmas are float32, so the coefficients differ from ours by float32 round-off
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_alignprop_limits_and_checkpointing(tmp_path):
    """Same weights, noise and seed: AlignProp p = 1 gives DRaFT-all's gradient, p = 0 DRaFT-1's; step
    checkpointing (recompute in backward) leaves DRaFT-all's gradient unchanged."""
    trainer = make_trainer(tmp_path, "draft", *EXACT, "sampling.num_steps=3")
    randomize_lora(trainer)
    w0 = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    steps = record_steps(trainer)
    d = trainer.cfg.draft

    def grads(mode, k=None, keep_prob=0.5, checkpoint=True):
        d.mode, d.k, d.keep_prob, d.checkpoint_steps = mode, k, keep_prob, checkpoint
        set_params(trainer, w0)
        update_once(trainer)
        return steps[-1]["grads"]

    full, last = grads("draft_k", None), grads("draft_k", 1)
    for a, b in zip(grads("alignprop", keep_prob=1.0), full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for a, b in zip(grads("alignprop", keep_prob=0.0), last):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for a, b in zip(grads("draft_k", None, checkpoint=False), full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert max((a - b).abs().max() for a, b in zip(full, last)) > 1e-4  # the limits are different gradients


def test_keep_mask_and_refl_steps():
    gen = torch.Generator().manual_seed(0)
    assert keep_mask(5, "draft_k", 2, 0.0, gen).tolist() == [False, False, False, True, True]
    assert keep_mask(5, "draft_k", None, 0.0, gen).all()
    masks = torch.stack([keep_mask(50, "alignprop", None, 0.3, gen) for _ in range(2000)])  # [2000, 50]
    assert masks[:, -1].all()  # the last step always carries the gradient
    assert masks[:, :-1].float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert [refl_steps(n, 0.75, 1.0) for n in (40, 10, 4, 1)] == [(30, 39), (7, 9), (3, 3), (0, 0)]  # ImageReward: 30..39 of 40


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sd3"])
def test_two_iterations_change_every_lora_tensor_and_nothing_frozen(tmp_path, model):
    trainer = make_trainer(tmp_path, "draft", "max_iterations=2", "draft.k=2", "train.group_size=4", model=model)
    net = trainer.policy.trainable_module()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    rows = trainer.train()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    assert rows[-1]["samples_seen"] == 8 and rows[-1]["kept_steps"] == 2
    for key in ("reward_mean", "loss", "reward_grad_mean", "grad_norm"):
        assert torch.isfinite(torch.tensor(rows[-1][key])), key


def test_resume_is_exact(tmp_path):
    """AlignProp's random keep masks and a flow SDE's noise come from the iteration's generator: a resumed run
    repeats the straight run's second iteration exactly."""
    extra = ["max_iterations=2", "logging.save_every=1", "draft.mode=alignprop", "sampling.sampler=flow_sde"]
    straight = make_trainer(tmp_path / "a", "draft", *extra)
    rows = straight.train()
    resumed = make_trainer(tmp_path / "b", "draft", *extra, f"resume={tmp_path / 'a' / 'checkpoints' / 'iter_000001'}")
    row = resumed.train()[0]
    assert row["iteration"] == 2
    for key in ("loss", "reward_mean", "grad_norm", "kept_steps"):
        assert row[key] == rows[1][key], key
    for a, b in zip(straight.policy.trainable_parameters(), resumed.policy.trainable_parameters()):
        assert torch.equal(a, b)


def test_defaults_and_configs():
    d = load_config(None, ["algorithm=draft", "reward=toy_proxy"]).draft
    assert (d.mode, d.k, d.refl_range, d.keep_prob, d.reward_scale, d.checkpoint_steps) == ("draft_k", 1, [0.75, 1.0], 0.2, 1.0, True)
    toy = load_config(ROOT / "configs" / "toy" / "sd3_draft_toyworld.yaml")
    assert toy.algorithm == "draft" and toy.reward == "toy_proxy" and toy.data.eval_reward == "toyworld_accuracy"
    sd15 = load_config(ROOT / "configs" / "image" / "sd15_draft_aesthetic.yaml", ["model=tiny-sd"])  # no weights here
    assert sd15.sampling.num_steps == 50 and sd15.sampling.eta == 0 and sd15.reward_kwargs["differentiable"] is True
    assert load_config(ROOT / "configs" / "image" / "tiny_sd3_draft_colorfulness.yaml").reward == "colorfulness"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["reward=jpeg_compressibility"], "'reward' jpeg_compressibility is not differentiable"),
        (["reward=pickscore"], "'reward' pickscore is not differentiable"),
        (["draft.mode=drafk"], "draft.mode"),
        (["draft.k=0"], "draft.k"),
        (["draft.k=5"], "draft.k"),  # more than sampling.num_steps (4)
        (["draft.refl_range=[0.9,0.5]"], "draft.refl_range"),
        (["draft.keep_prob=1.5"], "draft.keep_prob"),
        (["draft.reward_scale=-1"], "draft.reward_scale"),
    ],
)
def test_invalid_configs_name_the_field(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, ["algorithm=draft", "reward=colorfulness", "sampling.num_steps=4", *overrides])
