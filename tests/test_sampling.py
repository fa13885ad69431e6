"""Property tests for diffrl.sampling against independent float64 references and diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffrl.sampling import (
    SAMPLERS,
    Sampler,
    Schedule,
    ddim_step,
    flow_ode_step,
    flow_sde_step,
    gaussian_log_prob,
    make_sampler,
)

SHAPE = (4, 3, 5, 6)  # [B, C, H, W]


def ref_log_density(x, mean, std, reduction):
    """Per-sample Gaussian log density in float64 with the math module: x, mean [B, ...], std list of floats."""
    out = []
    for b in range(x.shape[0]):
        xs = x[b].double().flatten().tolist()
        ms = mean[b].double().flatten().tolist()
        s = float(std[b])
        vals = [-((xi - mi) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi) for xi, mi in zip(xs, ms)]
        out.append(sum(vals) / len(vals) if reduction == "mean" else sum(vals))
    return torch.tensor(out, dtype=torch.float64)


def ref_flow_sde(x, v, sigma, sigma_prev, a, sigma_max):
    """Flow-GRPO SDE mean and step std from docs/algorithms.md, in float64 with python-float schedule values."""
    dt = sigma_prev - sigma
    denom = sigma_max if sigma == 1 else sigma
    std_t = a * math.sqrt(sigma / (1 - denom))
    mean = x.double() * (1 + std_t**2 * dt / (2 * sigma)) + v.double() * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt), std_t


# ----------------------------------------------------------------------------- gaussian_log_prob


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_log_prob_matches_torch_normal_float64(reduction):
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)
    std = torch.rand(SHAPE[0], generator=g, dtype=torch.float64) + 0.1  # [B]
    ours = gaussian_log_prob(x, mean, std, reduction)
    elem = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x).flatten(1)
    ref = elem.mean(1) if reduction == "mean" else elem.sum(1)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, ref_log_density(x, mean, std.tolist(), reduction))
    # a scalar std broadcasts like a constant [B] std
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3, reduction), gaussian_log_prob(x, mean, torch.full((4,), 0.3, dtype=torch.float64), reduction))


def test_gaussian_log_prob_hand_value_and_bad_reduction():
    # x = mean -> -log(std) - log(sqrt(2 pi)); std = 1 -> -0.9189385...
    x = torch.zeros(2, 3)
    torch.testing.assert_close(gaussian_log_prob(x, x, 1.0), torch.full((2,), -0.5 * math.log(2 * math.pi)))
    torch.testing.assert_close(gaussian_log_prob(x, x, 1.0, "sum"), torch.full((2,), -1.5 * math.log(2 * math.pi)))
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, x, 1.0, "max")


# ----------------------------------------------------------------------------- flow SDE


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sigma,sigma_prev", [(0.8, 0.7), (0.3, 0.0), (1.0, 0.95)])
def test_flow_sde_log_prob_matches_independent_float64(sigma, sigma_prev, reduction):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sigma_max = 0.97
    out = flow_sde_step(x, v, sigma, sigma_prev, noise_level=0.7, sigma_max=sigma_max, generator=g, reduction=reduction)
    mean, step_std, std_t = ref_flow_sde(x, v, sigma, sigma_prev, 0.7, sigma_max)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.std.double(), torch.full((4,), step_std, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.sde_std.double(), torch.full((4,), std_t, dtype=torch.float64), rtol=1e-5, atol=0)
    ref = ref_log_density(out.prev_sample, mean, [step_std] * 4, reduction)
    torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-5, atol=1e-4)
    # scoring a stored trajectory: the given prev_sample is used, no noise drawn
    again = flow_sde_step(x, v, sigma, sigma_prev, sigma_max=sigma_max, prev_sample=out.prev_sample, reduction=reduction)
    assert torch.equal(again.prev_sample, out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob)


def test_flow_sde_sigma_one_uses_sigma_max():
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    out = flow_sde_step(x, v, 1.0, 0.9, noise_level=0.5, sigma_max=0.96)
    torch.testing.assert_close(out.sde_std, torch.full((2,), 0.5 * math.sqrt(1.0 / (1 - 0.96))))
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(x, v, 1.0, 0.9)


def test_flow_sde_monte_carlo_mean_and_std():
    B = 20000
    x = torch.randn(1, 4).expand(B, 4).contiguous()
    v = torch.randn(1, 4).expand(B, 4).contiguous()
    out = flow_sde_step(x, v, 0.6, 0.5, noise_level=0.7, generator=torch.Generator().manual_seed(2))
    mean, step_std, _ = ref_flow_sde(x[:1], v[:1], 0.6, 0.5, 0.7, None)
    se = step_std / math.sqrt(B)
    emp_mean, emp_std = out.prev_sample.double().mean(0), out.prev_sample.double().std(0)
    assert (emp_mean - mean[0]).abs().max() < 5 * se
    assert (emp_std - step_std).abs().max() < 5 * step_std / math.sqrt(2 * B)


def test_flow_sde_per_sample_sigma_equals_scalar_rows():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sig, sig_prev = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.9, 0.6, 0.4, 0.0])
    batched = flow_sde_step(x, v, sig, sig_prev, sigma_max=0.95, generator=g)
    for b in range(4):
        row = flow_sde_step(x[b : b + 1], v[b : b + 1], float(sig[b]), float(sig_prev[b]), sigma_max=0.95,
                            prev_sample=batched.prev_sample[b : b + 1])
        torch.testing.assert_close(row.mean, batched.mean[b : b + 1])
        torch.testing.assert_close(row.std, batched.std[b : b + 1])
        torch.testing.assert_close(row.log_prob, batched.log_prob[b : b + 1])


def test_flow_sde_noise_level_zero_is_exact_euler():
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for sigma, sigma_prev in [(1.0, 0.9), (0.4, 0.0)]:
        out = flow_sde_step(x, v, sigma, sigma_prev, noise_level=0.0, sigma_max=0.95)
        dt = torch.tensor(sigma_prev, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
        assert torch.equal(out.prev_sample, x + dt * v)
        assert torch.equal(out.std, torch.zeros(4))
        assert out.log_prob is None and not torch.isnan(out.prev_sample).any()


# ----------------------------------------------------------------------------- flow ODE vs diffusers


def flow_schedule_from_diffusers(steps=10, shift=3.0):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    return sched, Schedule(kind="flow", timesteps=sched.timesteps, sigmas=sched.sigmas)


def test_flow_ode_matches_diffusers_euler_over_schedule():
    sched, schedule = flow_schedule_from_diffusers()
    assert len(schedule) == 10 and schedule.sigmas.shape == (11,)
    assert schedule.sigmas[0] == 1.0 and schedule.sigmas[-1] == 0.0 and (schedule.sigmas.diff() < 0).all()
    # shift 3: sigma = 3 s / (1 + 2 s) on a linear grid from 1 to the shifted training minimum
    # shift(1/1000), and timesteps = 1000 sigma
    s_min = 3 * 1e-3 / (1 + 2 * 1e-3)
    s = torch.linspace(1.0, s_min, 10, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigmas[:-1].double(), 3 * s / (1 + 2 * s), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(schedule.timesteps.double(), 1000 * schedule.sigmas[:-1].double(), rtol=1e-6, atol=1e-4)

    g = torch.Generator().manual_seed(5)
    x_ref = x_ours = torch.randn(SHAPE, generator=g)
    sampler = make_sampler("flow_ode")
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(SHAPE, generator=g)
        x_ref = sched.step(v, t, x_ref).prev_sample
        x_ours = sampler.step(schedule, i, x_ours, v).prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-6)
    assert torch.equal(x_ours, x_ref)


# ----------------------------------------------------------------------------- DDIM


def ddim_scheduler(prediction_type, steps=20):
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    sched.set_timesteps(steps)
    ts = sched.timesteps
    alphas = torch.cat([sched.alphas_cumprod[ts], sched.final_alpha_cumprod.reshape(1)])
    return sched, Schedule(kind="ddim", timesteps=ts, alphas_cumprod=alphas)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta0_matches_diffusers_over_schedule(prediction_type):
    sched, schedule = ddim_scheduler(prediction_type)
    g = torch.Generator().manual_seed(6)
    x_ref = x_ours = torch.randn(SHAPE, generator=g)
    sampler = make_sampler("ddim", eta=0.0)
    assert not sampler.stochastic
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(SHAPE, generator=g)
        x_ref = sched.step(out, t, x_ref, eta=0.0).prev_sample
        step = sampler.step(schedule, i, x_ours, out, prediction_type=prediction_type)
        assert step.log_prob is None and torch.equal(step.std, torch.zeros(4))
        x_ours = step.prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_log_prob_matches_independent_float64(prediction_type, eta):
    g = torch.Generator().manual_seed(7)
    x, out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    a_t, a_prev = 0.35, 0.6
    step = ddim_step(x, out, a_t, a_prev, eta=eta, prediction_type=prediction_type, generator=g)
    xd, od = x.double(), out.double()
    if prediction_type == "epsilon":
        x0, eps = (xd - math.sqrt(1 - a_t) * od) / math.sqrt(a_t), od
    else:
        x0, eps = math.sqrt(a_t) * xd - math.sqrt(1 - a_t) * od, math.sqrt(a_t) * od + math.sqrt(1 - a_t) * xd
    std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
    torch.testing.assert_close(step.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.std.double(), torch.full((4,), std, dtype=torch.float64))
    torch.testing.assert_close(step.sde_std, step.std)
    for reduction in ("mean", "sum"):
        scored = ddim_step(x, out, a_t, a_prev, eta=eta, prediction_type=prediction_type,
                           prev_sample=step.prev_sample, reduction=reduction)
        ref = ref_log_density(step.prev_sample, mean, [std] * 4, reduction)
        torch.testing.assert_close(scored.log_prob.double(), ref, rtol=1e-5, atol=1e-3)


def test_ddim_eta1_std_is_ddpm_posterior_std():
    _, schedule = ddim_scheduler("epsilon", steps=10)
    a = schedule.alphas_cumprod.double().tolist()
    x = torch.randn(2, 3)
    for i in range(len(schedule)):
        step = ddim_step(x, torch.randn(2, 3), schedule.alphas_cumprod[i], schedule.alphas_cumprod[i + 1], eta=1.0)
        posterior = math.sqrt((1 - a[i + 1]) / (1 - a[i]) * (1 - a[i] / a[i + 1]))
        torch.testing.assert_close(step.std.double(), torch.full((2,), posterior, dtype=torch.float64), rtol=1e-5, atol=0)


def test_ddim_zero_variance_step_is_deterministic():
    """alpha_prev == 1 (the last step of a DDIMScheduler with set_alpha_to_one=True, its default) has variance 0
    for every eta: the step is the DDIM mean, here exactly the x0 prediction (x - sqrt(1 - a_t) eps) / sqrt(a_t),
    with no log-prob (a density of 0 / 0 was NaN); a batch mixing zero and non-zero variance is refused."""
    g = torch.Generator().manual_seed(4)
    x, eps = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)
    a_t = 0.9
    for eta in (0.5, 1.0):
        step = ddim_step(x, eps, a_t, 1.0, eta=eta, generator=g)
        assert step.log_prob is None
        assert torch.equal(step.std, torch.zeros(SHAPE[0], dtype=torch.float64))
        torch.testing.assert_close(step.prev_sample, (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step(x, eps, torch.full((4,), a_t), torch.tensor([1.0, 0.95, 0.95, 0.95]), eta=1.0, generator=g)


def test_ddim_per_sample_alphas_equal_scalar_rows():
    g = torch.Generator().manual_seed(8)
    x, out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    a_t, a_prev = torch.tensor([0.1, 0.3, 0.5, 0.9]), torch.tensor([0.2, 0.5, 0.7, 0.99])
    batched = ddim_step(x, out, a_t, a_prev, eta=1.0, generator=g)
    for b in range(4):
        row = ddim_step(x[b : b + 1], out[b : b + 1], float(a_t[b]), float(a_prev[b]), eta=1.0,
                        prev_sample=batched.prev_sample[b : b + 1])
        torch.testing.assert_close(row.mean, batched.mean[b : b + 1])
        torch.testing.assert_close(row.log_prob, batched.log_prob[b : b + 1])


# ----------------------------------------------------------------------------- Sampler


def test_sampler_dispatch_int_and_tensor_index():
    _, flow = flow_schedule_from_diffusers(steps=6)
    g = torch.Generator().manual_seed(9)
    x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sde = make_sampler("flow_sde", noise_level=0.7)
    assert sde.stochastic and not make_sampler("flow_ode").stochastic
    sig = flow.sigmas.tolist()
    by_int = sde.step(flow, 0, x, v, generator=torch.Generator().manual_seed(0))
    direct = flow_sde_step(x, v, sig[0], sig[1], sigma_max=sig[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(by_int.prev_sample, direct.prev_sample)
    torch.testing.assert_close(by_int.log_prob, direct.log_prob)
    # per-sample step indices re-score stored rows
    idx = torch.tensor([0, 2, 5, 3])
    by_tensor = sde.step(flow, idx, x, v, prev_sample=by_int.prev_sample)
    for b, i in enumerate(idx.tolist()):
        row = flow_sde_step(x[b : b + 1], v[b : b + 1], sig[i], sig[i + 1], sigma_max=sig[1],
                            prev_sample=by_int.prev_sample[b : b + 1])
        torch.testing.assert_close(by_tensor.log_prob[b : b + 1], row.log_prob)

    _, ddim = ddim_scheduler("v_prediction", steps=5)
    al = ddim.alphas_cumprod
    d = make_sampler("ddim", eta=1.0)
    by_tensor = d.step(ddim, torch.tensor([4, 1, 0, 2]), x, v, prev_sample=x, prediction_type="v_prediction")
    row = ddim_step(x[1:2], v[1:2], al[1], al[2], eta=1.0, prediction_type="v_prediction", prev_sample=x[1:2])
    torch.testing.assert_close(by_tensor.log_prob[1:2], row.log_prob)


def test_sampler_validation():
    _, flow = flow_schedule_from_diffusers(steps=4)
    _, ddim = ddim_scheduler("epsilon", steps=4)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="'flow' schedule"):
        make_sampler("flow_sde").step(ddim, 0, x, x)
    with pytest.raises(ValueError, match="'ddim' schedule"):
        make_sampler("ddim").step(flow, 0, x, x, prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("ddim").step(ddim, 0, x, x)  # default "flow" is not a ddim prediction
    with pytest.raises(ValueError, match="flow_sde, flow_ode, ddim"):
        make_sampler("euler_a")
    with pytest.raises(ValueError, match="eta"):
        Sampler("ddim", eta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        Sampler("flow_sde", reduction="max")
    assert set(SAMPLERS) == {"flow_sde", "flow_ode", "ddim", "flow_dpm2"}
