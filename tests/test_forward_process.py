"""Forward-process machinery shared by nft and crd, each property checked against an independent float64
computation: the noising maths, the DPM-Solver++(2M) ODE sampler, noise-level draws, the optimality map,
the snapshot decay schedules and EMA updates, and the reference (adapters disabled) = the base model."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffrl.core import adaptive_sq_error, optimality, snapshot_decay
from diffrl.pipelines.registry import load_policy
from diffrl.sampling import Schedule, add_noise, flow_dpm2_step, make_sampler, predict_x0, training_target
from diffrl.trainers.forward_process import LoraSnapshots, NoiseLevelSampler, sample_order

SHAPE = (4, 3, 5, 6)  # [B, C, H, W]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- noising maths


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon", "v_prediction"])
def test_forward_process_target_and_x0_round_trip(prediction_type):
    x0, eps = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    if prediction_type == "flow":
        sigma = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
        alpha = 1 - sigma
    else:
        a = torch.tensor([0.999, 0.6, 0.2, 0.01], dtype=torch.float64)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
    x_t = add_noise(x0, eps, alpha, sigma)
    for b in range(4):  # closed form per sample with python floats
        torch.testing.assert_close(x_t[b], float(alpha[b]) * x0[b] + float(sigma[b]) * eps[b])
    target = training_target(x0, eps, alpha, sigma, prediction_type)
    expected = {"flow": eps - x0, "epsilon": eps,
                "v_prediction": alpha.view(-1, 1, 1, 1) * eps - sigma.view(-1, 1, 1, 1) * x0}[prediction_type]
    torch.testing.assert_close(target, expected)
    # the target's implied x0 is the clean sample; x0 is affine in the output (weights summing to 1 mix x0s alike)
    if prediction_type != "flow" or bool((alpha > 0).all()):
        torch.testing.assert_close(predict_x0(x_t, target, alpha, sigma, prediction_type), x0)
    o1, o2, beta = rand(*SHAPE, seed=3), rand(*SHAPE, seed=4), 0.3
    mix = predict_x0(x_t, (1 + beta) * o1 - beta * o2, alpha, sigma, prediction_type)
    torch.testing.assert_close(mix, (1 + beta) * predict_x0(x_t, o1, alpha, sigma, prediction_type)
                               - beta * predict_x0(x_t, o2, alpha, sigma, prediction_type))
    if prediction_type == "flow":  # x0_hat = x_t - t v (docs/algorithms.md)
        torch.testing.assert_close(predict_x0(x_t, o1, alpha, sigma, "flow"), x_t - sigma.view(-1, 1, 1, 1) * o1)


def test_adaptive_weighting_value_and_stop_gradient():
    pred, target = rand(*SHAPE, seed=5).requires_grad_(), rand(*SHAPE, seed=6)
    out = adaptive_sq_error(pred, target)
    D = math.prod(SHAPE[1:])
    for b in range(SHAPE[0]):
        err = (pred[b] - target[b]).detach().flatten().tolist()
        w = max(sum(abs(e) for e in err) / D, 1e-5)
        assert out[b].item() == pytest.approx(sum(e * e for e in err) / D / w, rel=1e-12)
    out.sum().backward()
    w = (pred - target).detach().abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach() / (w * D))  # the weight is a constant
    tiny = adaptive_sq_error(target + 1e-9, target)  # weight clamped at 1e-5
    torch.testing.assert_close(tiny, torch.full((4,), 1e-18 / 1e-5, dtype=torch.float64))


def test_optimality_maps_clipped_advantages_to_unit_interval():
    adv = torch.tensor([-12.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(optimality(adv, 5.0), torch.tensor([0, 0, 0.25, 0.5, 0.6, 1, 1], dtype=torch.float64))
    torch.testing.assert_close(optimality(adv, 2.0), torch.tensor([0, 0, 0, 0.5, 0.75, 1, 1], dtype=torch.float64))


# ----------------------------------------------------------------------------- DPM-Solver++(2M)


def velocity_field(x, sigma, seed=7):
    """A smooth nonlinear velocity field for solver parity tests."""
    W = rand(3, 3, seed=seed).to(x.dtype) * 0.4
    return torch.tanh(torch.einsum("ij,bjhw->bihw", W, x)) * (1 + sigma) + 0.2 * sigma * x


def test_dpm2_matches_diffusers_multistep_dpm_solver():
    """Our 2M sampler walks the same path as diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2,
    flow_prediction, lower_order_final) on a shifted SD3-style schedule, first and last steps included."""
    N = 7
    t = torch.linspace(1, 0, N + 1)
    sigmas = 3 * t / (1 + 2 * t)  # shift 3, sigmas[0] = 1, sigmas[N] = 0
    ref = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
                                      algorithm_type="dpmsolver++", lower_order_final=True, final_sigmas_type="zero")
    ref.set_timesteps(N)
    ref.sigmas = sigmas.clone()  # walk our schedule
    schedule = Schedule("flow", timesteps=sigmas[:-1] * 1000, sigmas=sigmas)
    sampler = make_sampler("flow_dpm2")
    assert not sampler.stochastic
    x_ref = x_ours = rand(2, 3, 4, 4, seed=8).float()
    history = None
    for i in range(N):
        x_ref = ref.step(velocity_field(x_ref, float(sigmas[i])), ref.timesteps[i], x_ref).prev_sample
        out = velocity_field(x_ours, float(sigmas[i]))
        step = sampler.step(schedule, i, x_ours, out, history=history)
        assert step.log_prob is None
        history, x_ours = (x_ours, out), step.prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=5e-6)


def test_dpm2_step_equals_the_lambda_form_in_float64():
    """One 2M step against DPM-Solver++'s exponential-integrator form, computed with python floats."""
    s_last, s, s_prev = 0.8, 0.55, 0.3
    x_last, v_last, x, v = (rand(*SHAPE, seed=k) for k in (9, 10, 11, 12))
    out = flow_dpm2_step(x, v, s, s_prev, last_sample=x_last, last_velocity=v_last, sigma_last=s_last).prev_sample
    lam = lambda q: math.log((1 - q) / q)  # noqa: E731
    h, h0 = lam(s_prev) - lam(s), lam(s) - lam(s_last)
    m0, m1 = x - s * v, x_last - s_last * v_last  # data predictions
    d1 = (m0 - m1) / (h0 / h)
    expected = (s_prev / s) * x - (1 - s_prev) * (math.exp(-h) - 1) * (m0 + 0.5 * d1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # without a previous step, after sigma_last = 1, and into sigma = 0 it is the Euler step
    euler = x + (s_prev - s) * v
    torch.testing.assert_close(flow_dpm2_step(x, v, s, s_prev).prev_sample, euler)
    torch.testing.assert_close(flow_dpm2_step(x, v, s, s_prev, last_sample=x_last, last_velocity=v_last,
                                              sigma_last=1.0).prev_sample, euler)
    torch.testing.assert_close(flow_dpm2_step(x, v, s, 0.0, last_sample=x_last, last_velocity=v_last,
                                              sigma_last=s_last).prev_sample, x - s * v)


def test_dpm2_is_second_order_on_an_exact_gaussian_flow():
    """Data N(0, c^2): the exact velocity is x (t - (1 - t) c^2) / s(t)^2 and the ODE maps x(a) to
    x(a) s(b) / s(a), s(t)^2 = (1 - t)^2 c^2 + t^2. Halving the step divides the 2M error by ~4, Euler's by ~2."""
    c, a, b = 0.5, 0.9, 0.1
    s = lambda q: math.sqrt((1 - q) ** 2 * c**2 + q**2)  # noqa: E731
    x_a = rand(4, 8, seed=13)
    exact = x_a * s(b) / s(a)
    errors = {}
    for kind in ("flow_ode", "flow_dpm2"):
        sampler, errors[kind] = make_sampler(kind), []
        for N in (16, 32, 64):
            sigmas = torch.linspace(a, b, N + 1, dtype=torch.float64)
            schedule = Schedule("flow", timesteps=sigmas[:-1] * 1000, sigmas=sigmas)
            x, history = x_a.clone(), None
            for i in range(N):
                q = float(sigmas[i])
                v = x * (q - (1 - q) * c**2) / s(q) ** 2
                x_next = sampler.step(schedule, i, x, v, history=history).prev_sample
                history, x = (x, v), x_next
            errors[kind].append((x - exact).abs().max().item())
    euler, dpm2 = errors["flow_ode"], errors["flow_dpm2"]
    assert all(1.8 < e1 / e2 < 2.2 for e1, e2 in zip(euler, euler[1:])), euler
    assert all(3.5 < e1 / e2 < 4.5 for e1, e2 in zip(dpm2, dpm2[1:])), dpm2
    assert dpm2[-1] < euler[-1] / 20


# ----------------------------------------------------------------------------- noise levels


@pytest.fixture(scope="module")
def sd3():
    return load_policy("tiny-sd3")


@pytest.fixture(scope="module")
def sd():
    return load_policy("tiny-sd")


def test_noise_levels_from_the_rollout_schedule(sd3, sd):
    gen = torch.Generator().manual_seed(0)
    for policy in (sd3, sd):
        schedule = policy.schedule(10)
        levels = NoiseLevelSampler(policy, "schedule", 0.99).draw(schedule, 5, gen)
        assert levels.timestep.shape == (5, 9)  # int(0.99 * 10) distinct steps per sample, as DiffusionNFT
        for b in range(5):
            ts = levels.timestep[b].tolist()
            assert len(set(ts)) == 9
            for j, value in enumerate(ts):
                i = schedule.timesteps.tolist().index(value)
                if policy.prediction_type == "flow":
                    assert levels.sigma[b, j].item() == pytest.approx(float(schedule.sigmas[i]))
                    assert levels.alpha[b, j].item() == pytest.approx(1 - float(schedule.sigmas[i]))
                else:
                    acp = float(schedule.alphas_cumprod[i])
                    assert levels.alpha[b, j].item() == pytest.approx(math.sqrt(acp))
                    assert levels.sigma[b, j].item() == pytest.approx(math.sqrt(1 - acp))
        assert NoiseLevelSampler(policy, "schedule", 0.01).count(schedule) == 1


@pytest.mark.parametrize("source", ["uniform", "logit_normal"])
def test_continuous_noise_levels(sd3, sd, source):
    gen = torch.Generator().manual_seed(1)
    flow = NoiseLevelSampler(sd3, source, 1.0).draw(sd3.schedule(4), 300, gen)
    assert flow.timestep.shape == (300, 4)
    assert bool(((flow.sigma > 0) & (flow.sigma < 1)).all())
    torch.testing.assert_close(flow.alpha, 1 - flow.sigma)
    torch.testing.assert_close(flow.timestep.double(), flow.sigma * 1000, rtol=1e-6, atol=1e-4)
    if source == "logit_normal":  # symmetric around t = 0.5, denser in the middle than uniform
        assert abs(flow.sigma.mean().item() - 0.5) < 0.02
        assert ((flow.sigma - 0.5).abs() < 0.25).double().mean() > 0.6
    unet = NoiseLevelSampler(sd, source, 1.0).draw(sd.schedule(4), 50, gen)
    acp = sd.pipe.scheduler.alphas_cumprod.double()
    torch.testing.assert_close(unet.alpha**2, acp[unet.timestep])
    torch.testing.assert_close(unet.alpha**2 + unet.sigma**2, torch.ones_like(unet.alpha))


def test_sample_order_keeps_groups_whole():
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    order = sample_order(ids, True, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(12))
    chunks = ids[order].view(4, 3)
    assert all(len(set(c.tolist())) == 1 for c in chunks)  # every run of 3 is one whole group
    orders = {tuple(ids[sample_order(ids, True, torch.Generator().manual_seed(k))].tolist()) for k in range(6)}
    assert len(orders) > 1  # groups are shuffled


# ----------------------------------------------------------------------------- snapshots


def test_decay_schedules_match_the_authors():
    nft = [0, 0.0, 0.001, 0.5]  # DiffusionNFT decay_type 1: min(0.001 step, 0.5)
    assert [snapshot_decay(s, *nft) for s in (0, 1, 100, 499, 500, 10_000)] == pytest.approx([0, 0.001, 0.1, 0.499, 0.5, 0.5])
    old = [0, 0.25, 0.005, 0.999]  # CRD old: min(0.25 + 0.005 step, 0.999)
    assert [snapshot_decay(s, *old) for s in (0, 10, 100, 149, 150, 1000)] == pytest.approx([0.25, 0.3, 0.75, 0.995, 0.999, 0.999])
    samp = [75, 0.0, 0.0075, 0.999]  # CRD sampling: 0 before step 75, then min(0.0075 (step - 75), 0.999)
    assert [snapshot_decay(s, *samp) for s in (0, 74, 75, 76, 175, 208, 209, 500)] == pytest.approx(
        [0, 0, 0, 0.0075, 0.75, 0.9975, 0.999, 0.999])


def test_snapshot_updates_follow_the_decay_schedules():
    policy = load_policy("tiny-sd3")
    policy.add_lora(4, 8)
    snaps = LoraSnapshots(policy, {"old": [0, 0.25, 0.005, 0.999], "sampling": [75, 0.0, 0.0075, 0.999]})
    theta = policy.adapter_parameters("default")
    for name in ("old", "sampling"):  # start as copies of the trained weights, frozen
        assert all(torch.equal(a, b) for a, b in zip(policy.adapter_parameters(name), theta))
        assert not any(p.requires_grad for p in policy.adapter_parameters(name))
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in theta}
    gen = torch.Generator().manual_seed(3)
    for step, expect in ((10, {"old": 0.3, "sampling": 0.0}), (80, {"old": 0.65, "sampling": 0.0375})):
        with torch.no_grad():
            for p in [*theta, *policy.adapter_parameters("old"), *policy.adapter_parameters("sampling")]:
                p.copy_(torch.randn(p.shape, generator=gen))
        before = {n: [p.detach().double().clone() for p in policy.adapter_parameters(n)] for n in ("old", "sampling")}
        decays = snaps.update(step)
        assert decays == pytest.approx({f"{k}_decay": v for k, v in expect.items()})
        for name, d in expect.items():
            for new, old, p in zip(policy.adapter_parameters(name), before[name], theta):
                torch.testing.assert_close(new.double(), d * old + (1 - d) * p.detach().double(), rtol=0, atol=1e-6)
    # decay 0 copies the trained weights bit for bit
    snaps.update(0)
    assert all(torch.equal(a, b) for a, b in zip(policy.adapter_parameters("sampling"), theta))
    # checkpoint round trip
    state = {k: v.clone() for k, v in snaps.state_tensors("crd").items()}
    with torch.no_grad():
        for p in policy.adapter_parameters("old"):
            p.zero_()
    snaps.load_state_tensors(state, "crd")
    assert all(torch.equal(p, state[f"crd.old.{i:05d}"]) for i, p in enumerate(policy.adapter_parameters("old")))


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux", "tiny-sd"])
def test_reference_is_the_base_model_and_adapters_switch(model):
    """With a trained "default" and two snapshot adapters attached, reference() (every adapter disabled)
    reproduces a fresh policy that never had LoRA, bit for bit; use_adapter picks the snapshot and restores
    "default" (and which tensors are trainable) on exit."""
    policy, fresh = load_policy(model), load_policy(model)
    policy.add_lora(4, 8)
    LoraSnapshots(policy, {"old": [0, 0, 0.001, 0.5], "sampling": [0, 0, 0.001, 0.5]})
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in ("default", "old", "sampling"):
            for p in policy.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    trainable = {id(p) for p in policy.trainable_parameters()}
    prompts = ["a red circle", "two blue squares"]
    x = policy.initial_noise(2, generator=torch.Generator().manual_seed(5))
    t = policy.schedule(4).timesteps[1].expand(2)
    g = 1.0 if model == "tiny-flux" else 3.0
    with torch.no_grad():
        cond = policy.encode_prompt(prompts)
        base = fresh.predict(x, t, fresh.encode_prompt(prompts), g)
        with policy.reference():
            ref = policy.predict(x, t, cond, g)
        tuned = policy.predict(x, t, cond, g)
        with policy.use_adapter("old"):
            old = policy.predict(x, t, cond, g)
        again = policy.predict(x, t, cond, g)
    assert torch.equal(ref, base)
    assert (tuned - base).abs().max() > 1e-3 and (old - tuned).abs().max() > 1e-3
    assert torch.equal(again, tuned)
    assert {id(p) for p in policy.trainable_parameters()} == trainable
