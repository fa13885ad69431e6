"""StableDiffusionPolicy: parity with the stock diffusers pipeline and closed-form schedule / log-probs.

Reference values are computed here independently (float64 beta schedule, DDPM posterior formulas),
never by calling the code under test a second time.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from diffrl.pipelines.sd import StableDiffusionPolicy
from diffrl.rollout import sample
from diffrl.sampling import make_sampler

PROMPTS = ["a red circle", "two blue squares on black"]
T = 1000  # num_train_timesteps of the tiny scheduler
RES = 32


def ref_alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear schedule in float64: betas = linspace(sqrt(0.00085), sqrt(0.012), T) ** 2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)  # [T]


def ref_schedule(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM "leading" timesteps with steps_offset 1 and the alpha_cumprod chain incl. the final alpha."""
    ratio = T // n
    timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64) * ratio + 1  # [N]
    ac = ref_alphas_cumprod()
    prev = [int(t) - ratio for t in timesteps]
    chain = [ac[int(timesteps[0])]] + [ac[p] if p >= 0 else ac[0] for p in prev]  # set_alpha_to_one False
    return timesteps, torch.stack(chain)  # [N], [N + 1]


@pytest.fixture(scope="module")
def policies() -> dict[str, StableDiffusionPolicy]:
    return {pt: StableDiffusionPolicy.tiny(seed=0, prediction_type=pt) for pt in ("epsilon", "v_prediction")}


def _noise(policy, batch=len(PROMPTS), seed=0):
    return policy.initial_noise(batch, torch.Generator().manual_seed(seed))


def _ode(policy, n, g, noise):
    cond = policy.encode_prompt(PROMPTS)
    return sample(policy, cond, make_sampler("ddim", eta=0.0), policy.schedule(n), g, latents=noise).final


# ---- parity with StableDiffusionPipeline -----------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_ode_sampling_reproduces_pipeline(policies, prediction_type, guidance_scale):
    policy = policies[prediction_type]
    n = 4
    noise = _noise(policy)
    ours = _ode(policy, n, guidance_scale, noise)  # [B, 4, 16, 16]
    pipe = policy.pipeline()
    assert pipe.scheduler.config.prediction_type == prediction_type == policy.prediction_type
    kw = dict(latents=noise, num_inference_steps=n, guidance_scale=guidance_scale, height=RES, width=RES)
    latents = pipe(PROMPTS, output_type="latent", **kw).images
    torch.testing.assert_close(ours, latents, atol=1e-5, rtol=1e-5)

    image = policy.decode(ours)  # [B, 3, H, W]
    assert image.dtype == torch.float32 and image.shape == (len(PROMPTS), 3, RES, RES)
    torch.testing.assert_close(image, pipe(PROMPTS, output_type="pt", **kw).images, atol=1e-5, rtol=1e-5)
    np_images = pipe(PROMPTS, output_type="np", **kw).images  # [B, H, W, 3]
    np.testing.assert_allclose(image.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-5, rtol=1e-5)


def test_guidance_changes_the_sample(policies):
    """Guards the parity test against a vacuous pass: CFG at g=5 must move the tiny model's output."""
    policy = policies["epsilon"]
    noise = _noise(policy)
    assert (_ode(policy, 4, 5.0, noise) - _ode(policy, 4, 1.0, noise)).abs().max() > 1e-2


def test_initial_noise_is_prepare_latents(policies):
    policy = policies["epsilon"]
    noise = _noise(policy, batch=3, seed=7)
    expected = torch.randn(3, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(7))  # init sigma 1
    torch.testing.assert_close(noise, expected, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")  # the pipeline's own clip_sample fix
def test_pndm_folder_scheduler_is_converted_to_sd_ddim(policies):
    """SD 1.x folders ship PNDM (and old ones steps_offset 0): the policy runs SD's DDIM instead."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    base = policies["epsilon"].pipe
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    policy = StableDiffusionPolicy(StableDiffusionPipeline(scheduler=pndm, **parts), RES, RES)
    assert isinstance(policy.scheduler, DDIMScheduler)
    assert policy.scheduler.config.steps_offset == 1 and policy.scheduler.config.set_alpha_to_one is False
    assert policy.scheduler.config.clip_sample is False
    timesteps, alphas = ref_schedule(10)
    sched = policy.schedule(10)
    assert torch.equal(sched.timesteps, timesteps)
    torch.testing.assert_close(sched.alphas_cumprod.double(), alphas, atol=2e-6, rtol=0)

    stock = StableDiffusionPipeline(scheduler=DDIMScheduler.from_config(pndm.config), **parts)
    stock.set_progress_bar_config(disable=True)
    noise = _noise(policy)
    expected = stock(PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                     height=RES, width=RES).images
    torch.testing.assert_close(_ode(policy, 4, 5.0, noise), expected, atol=1e-5, rtol=1e-5)


# ---- schedule ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 4, 10, 50])
def test_schedule_matches_closed_form(policies, n):
    sched = policies["epsilon"].schedule(n)
    timesteps, alphas = ref_schedule(n)
    assert sched.kind == "ddim" and len(sched) == n
    assert torch.equal(sched.timesteps, timesteps)
    assert sched.alphas_cumprod.shape == (n + 1,)
    # float32 cumprod over <= 1000 factors vs float64: agreement to a few 1e-7
    torch.testing.assert_close(sched.alphas_cumprod.double(), alphas, atol=2e-6, rtol=0)
    # the last step lands on final_alpha_cumprod = alphas_cumprod[0] = 1 - beta_start (set_alpha_to_one False)
    assert abs(float(sched.alphas_cumprod[-1]) - (1 - 0.00085)) < 1e-7


# ---- DDPM (eta = 1) log-probs --------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_step_log_prob_matches_posterior(policies, prediction_type):
    policy = policies[prediction_type]
    n, g = 4, 5.0
    cond = policy.encode_prompt(PROMPTS)
    gen = torch.Generator().manual_seed(3)
    traj = sample(policy, cond, make_sampler("ddim", eta=1.0), policy.schedule(n), g,
                  latents=_noise(policy), generator=gen)
    assert traj.log_probs.shape == (len(PROMPTS), n)
    timesteps, alphas = ref_schedule(n)
    zs = []
    for i in range(n):
        x = traj.latents[:, i]
        x_prev = traj.latents[:, i + 1].double()
        with torch.no_grad():
            out = policy.predict(x, timesteps[i].expand(x.shape[0]), cond, g).double()
        x = x.double()
        a_t, a_prev = alphas[i], alphas[i + 1]
        if prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # DDPM posterior variance
        std = var.sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
        elem = -((x_prev - mean) ** 2) / (2 * var) - std.log() - 0.5 * math.log(2 * math.pi)
        expected = elem.flatten(1).mean(dim=1)  # [B] mean over latent elements (DDPO convention)
        torch.testing.assert_close(traj.log_probs[:, i].double(), expected, atol=1e-4, rtol=1e-5)
        zs.append(((x_prev - mean) / std).flatten())
    z = torch.cat(zs)  # the drawn noise must be standard normal
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


# ---- LoRA, reference, checkpointing, float64 -----------------------------------------------------
@pytest.fixture(scope="module")
def lora_setup():
    policy = StableDiffusionPolicy.tiny(seed=1)
    unet = policy.denoiser
    targets = [name for name, m in unet.named_modules()
               if isinstance(m, nn.Linear) and (name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"))]
    cond = policy.encode_prompt(PROMPTS)
    x = _noise(policy, seed=5)
    t = torch.tensor([901, 401])
    with torch.no_grad():
        before = policy.predict(x, t, cond, 5.0)
    policy.add_lora(rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # gaussian init zeroes lora_B: give the adapter a real effect
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return policy, targets, cond, x, t, before


def test_lora_reference_is_the_base_model(lora_setup):
    policy, _, cond, x, t, before = lora_setup
    with torch.no_grad():
        adapted = policy.predict(x, t, cond, 5.0)
        with policy.reference():
            ref = policy.predict(x, t, cond, 5.0)
        again = policy.predict(x, t, cond, 5.0)
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(ref, before, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)


def test_trainable_parameters_are_exactly_lora(lora_setup):
    policy, targets, *_ = lora_setup
    assert len(targets) > 0
    expected = {f"{m}.lora_{ab}.default.weight" for m in targets for ab in ("A", "B")}
    named = dict(policy.denoiser.named_parameters())
    trainable = {name for name, p in named.items() if p.requires_grad}
    assert trainable == expected
    assert {id(p) for p in policy.trainable_parameters()} == {id(named[n]) for n in expected}
    assert not any(p.requires_grad for p in policy.pipe.vae.parameters())
    assert not any(p.requires_grad for p in policy.pipe.text_encoder.parameters())


def _lora_grads(policy, cond, x, t):
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    loss = policy.predict(x, t, cond, 5.0).square().mean()
    loss.backward()
    return [p.grad.clone() for p in params]


def test_gradient_checkpointing_gives_identical_grads(lora_setup, monkeypatch):
    import torch.utils.checkpoint as ckpt

    policy, _, cond, x, t, _ = lora_setup
    plain = _lora_grads(policy, cond, x, t)
    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    policy.enable_gradient_checkpointing(True)
    try:
        checkpointed = _lora_grads(policy, cond, x, t)
    finally:
        policy.enable_gradient_checkpointing(False)
    assert len(calls) > 0  # checkpointing really ran
    assert any(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-5)


def test_float64_sampling_and_lora_backward(policies):
    p64 = StableDiffusionPolicy.tiny(seed=0, dtype=torch.float64)
    assert p64.dtype == torch.float64
    noise = _noise(policies["epsilon"]).double()
    out64 = _ode(p64, 4, 5.0, noise)
    assert out64.dtype == torch.float64
    stock = p64.pipeline()(PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=5.0,
                           output_type="latent", height=RES, width=RES).images
    # DDIMScheduler.step takes sqrt of its float32 alphas before promoting; ddim_step promotes first,
    # so the two differ by float32 rounding of the coefficients (~6e-7 here), not by float64 noise
    torch.testing.assert_close(out64, stock, atol=1e-5, rtol=1e-5)
    out32 = _ode(policies["epsilon"], 4, 5.0, noise.float())  # same seed-0 weights in float32
    torch.testing.assert_close(out64.float(), out32, atol=1e-3, rtol=1e-4)
    assert p64.decode(out64).dtype == torch.float64  # a float64 run stays float64 through decode

    p64.add_lora(rank=2, alpha=2.0)
    cond = p64.encode_prompt(PROMPTS)
    grads = _lora_grads(p64, cond, noise, torch.tensor([501, 1]))
    assert all(g.dtype == torch.float64 for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_pipeline_unwraps_a_wrapped_denoiser(policies):
    policy = StableDiffusionPolicy.tiny(seed=0)
    unet = policy.denoiser
    policy.denoiser = nn.DataParallel(unet)  # a wrapper with .module, unwrapped as accelerate unwraps DDP
    assert policy.trainable_module() is unet and policy.pipeline().unet is unet
    noise = _noise(policy)
    torch.testing.assert_close(_ode(policy, 2, 5.0, noise), _ode(policies["epsilon"], 2, 5.0, noise), atol=0, rtol=0)


def test_default_lora_targets(policies):
    assert policies["epsilon"].default_lora_targets() == ["to_q", "to_k", "to_v", "to_out.0"]
    assert StableDiffusionPolicy.family == "sd"


# ---- loading -------------------------------------------------------------------------------------
def test_from_pretrained_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no_such_sd_model"
    with pytest.raises(FileNotFoundError) as err:
        StableDiffusionPolicy.from_pretrained(missing)
    msg = str(err.value)
    assert str(missing) in msg and "diffusers folder" in msg


def test_from_pretrained_missing_hub_id_names_cache():
    from huggingface_hub import constants

    with pytest.raises(FileNotFoundError) as err:
        StableDiffusionPolicy.from_pretrained("diffrl-tests/no-such-sd-model")
    msg = str(err.value)
    assert "diffrl-tests/no-such-sd-model" in msg and str(constants.HF_HUB_CACHE) in msg


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_save_and_from_pretrained_round_trip(policies, tmp_path, prediction_type):
    policy = policies[prediction_type]
    policy.pipeline().save_pretrained(tmp_path)
    loaded = StableDiffusionPolicy.from_pretrained(tmp_path)
    assert (loaded.height, loaded.width) == (RES, RES)  # sample_size 16 * VAE factor 2
    assert loaded.prediction_type == prediction_type
    assert not loaded.denoiser.training and not loaded.pipe.vae.training
    noise = _noise(policy)
    a, b = _ode(policy, 4, 5.0, noise), _ode(loaded, 4, 5.0, noise)
    torch.testing.assert_close(b, a, atol=0, rtol=0)
    torch.testing.assert_close(loaded.decode(b), policy.decode(a), atol=0, rtol=0)
