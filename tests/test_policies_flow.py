"""SD3Policy and FluxPolicy: parity with the stock diffusers pipelines, LoRA switches, registry.

The references are the stock `StableDiffusion3Pipeline` / `FluxPipeline.__call__` run on the same
components and the same initial noise; the schedule's shift is checked against its closed form.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from diffrl.pipelines import load_policy, resolve_family
from diffrl.pipelines.flux import FluxPolicy
from diffrl.pipelines.sd3 import SD3Policy
from diffrl.rollout import sample
from diffrl.sampling import make_sampler

PROMPTS = ["a red circle to the left of a blue square", "two green triangles"]
STEPS = 4
FAMILIES = {"sd3": SD3Policy, "flux": FluxPolicy}


@pytest.fixture(scope="module")
def policies():
    """One frozen tiny policy per family (no LoRA), shared by the parity tests."""
    return {name: cls.tiny(seed=0) for name, cls in FAMILIES.items()}


def noise_for(policy, seed: int = 0, batch: int = len(PROMPTS)) -> torch.Tensor:
    return policy.initial_noise(batch, torch.Generator().manual_seed(seed))  # [B, C, h, w]


def run_policy(policy, noise, guidance, steps=STEPS, prompts=PROMPTS):
    cond = policy.encode_prompt(prompts)
    traj = sample(policy, cond, make_sampler("flow_ode"), policy.schedule(steps), guidance, latents=noise)
    return traj.final  # [B, C, h, w]


def run_pipe(policy, noise, guidance, output_type, steps=STEPS, prompts=PROMPTS, pipe=None):
    """The stock pipeline's own sampling loop from the same noise (packed for FLUX)."""
    pipe = pipe or policy.pipeline()
    latents = policy.pack(noise) if isinstance(policy, FluxPolicy) else noise
    out = pipe(
        prompt=prompts,
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=policy.height,
        width=policy.width,
        max_sequence_length=policy.max_sequence_length,
        output_type=output_type,
    ).images
    if output_type == "latent" and isinstance(policy, FluxPolicy):
        out = policy.unpack(out, *noise.shape[-2:])
    return out


CASES = [("sd3", 1.0), ("sd3", 4.5), ("flux", 3.5), ("flux", 1.0)]


@pytest.mark.parametrize("family,guidance", CASES)
def test_ode_sampling_reproduces_the_diffusers_pipeline(policies, family, guidance):
    policy = policies[family]
    noise = noise_for(policy)
    ours = run_policy(policy, noise, guidance)
    torch.testing.assert_close(ours, run_pipe(policy, noise, guidance, "latent"), rtol=0, atol=1e-5)
    images = policy.decode(ours)
    assert images.shape == (len(PROMPTS), 3, policy.height, policy.width) and images.dtype == torch.float32
    torch.testing.assert_close(images, run_pipe(policy, noise, guidance, "pt"), rtol=0, atol=1e-5)
    assert images.std() > 1e-3  # not a constant image


def test_guidance_changes_the_output(policies):
    """CFG (SD3) and the distilled guidance embedding (FLUX) are really wired in."""
    for family, (g0, g1) in {"sd3": (1.0, 4.5), "flux": (1.0, 3.5)}.items():
        policy = policies[family]
        noise = noise_for(policy)
        assert (run_policy(policy, noise, g0) - run_policy(policy, noise, g1)).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_initial_noise_is_drawn_like_the_pipeline(policies, family):
    policy = policies[family]
    pipe = policy.pipeline()
    ours = noise_for(policy, seed=3)
    if family == "sd3":
        theirs = pipe.prepare_latents(2, 4, policy.height, policy.width, torch.float32, "cpu", torch.Generator().manual_seed(3))
    else:
        packed, _ = pipe.prepare_latents(2, 4, policy.height, policy.width, torch.float32, "cpu", torch.Generator().manual_seed(3))
        theirs = policy.unpack(packed, *ours.shape[-2:])
    assert torch.equal(ours, theirs)


def test_flux_schedule_is_the_mu_shifted_linspace(policies):
    """FLUX: sigmas = linspace(1, 1/N, N) shifted by exp(mu) / (exp(mu) + 1/s - 1), mu from the token count."""
    policy = policies["flux"]
    sched = policy.schedule(STEPS)
    _, h, w = policy.latent_shape()
    seq = (h // 2) * (w // 2)
    m = (1.15 - 0.5) / (4096 - 256)
    mu = seq * m + (0.5 - m * 256)
    s = np.linspace(1.0, 1 / STEPS, STEPS)
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    torch.testing.assert_close(sched.sigmas[:-1].double(), torch.tensor(expected), rtol=0, atol=1e-6)
    assert sched.sigmas[-1] == 0 and len(sched) == STEPS and sched.sigmas.shape == (STEPS + 1,)
    torch.testing.assert_close(sched.timesteps, sched.sigmas[:-1] * 1000)


def test_sd3_schedule_is_shifted_by_three(policies):
    """SD3 (shift 3, no dynamic shifting): every sigma s satisfies s = 3u / (1 + 2u) for an evenly spaced u."""
    sched = policies["sd3"].schedule(STEPS)
    s = sched.sigmas[:-1].double()
    u = s / (3 - 2 * s)  # inverse of the shift
    assert torch.allclose(u.diff(), u.diff()[0].expand(STEPS - 1), atol=1e-6)
    assert abs(float(s[0]) - 1.0) < 1e-6 and sched.sigmas[-1] == 0


def test_sd3_cfg_needs_unconditional_embeddings(policies):
    policy = policies["sd3"]
    cond = policy.encode_prompt(PROMPTS)
    cond.uncond = None
    noise = noise_for(policy)
    with pytest.raises(ValueError, match="unconditional"):
        policy.predict(noise, policy.schedule(STEPS).timesteps[:1].expand(2), cond, 4.5)
    assert policies["flux"].encode_prompt(PROMPTS).uncond is None  # guidance-distilled: no uncond branch


# ---- LoRA, reference, checkpointing, dtype ----------------------------------------------------------


def perturb_lora(policy, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def guided_prediction(policy, noise, guidance, step=1):
    cond = policy.encode_prompt(PROMPTS)
    t = policy.schedule(STEPS).timesteps[step].expand(noise.shape[0])  # [B]
    return policy.predict(noise, t, cond, guidance)


GUIDANCE = {"sd3": 4.5, "flux": 3.5}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_reference_and_trainable_parameters(family):
    policy = FAMILIES[family].tiny(seed=0)
    noise, g = noise_for(policy), GUIDANCE[family]
    with torch.no_grad():
        base = guided_prediction(policy, noise, g)
        base_sample = run_policy(policy, noise, g)
    policy.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        torch.testing.assert_close(guided_prediction(policy, noise, g), base, rtol=0, atol=0)  # lora_B starts at 0

    names = [n for n, p in policy.trainable_module().named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    lora = [p for n, p in policy.trainable_module().named_parameters() if "lora_" in n]
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in lora}
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert not any(p.requires_grad for p in getattr(policy.pipe, name).parameters())

    perturb_lora(policy)
    with torch.no_grad():
        tuned = guided_prediction(policy, noise, g)
        assert (tuned - base).abs().max() > 1e-3
        with policy.reference():
            torch.testing.assert_close(guided_prediction(policy, noise, g), base, rtol=0, atol=0)
            torch.testing.assert_close(run_policy(policy, noise, g), base_sample, rtol=0, atol=0)
        torch.testing.assert_close(guided_prediction(policy, noise, g), tuned, rtol=0, atol=0)  # adapter back on


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_lora_gradients(family):
    policy = FAMILIES[family].tiny(seed=0)
    policy.add_lora(rank=4, alpha=4)
    perturb_lora(policy, scale=0.1)
    noise, g = noise_for(policy), GUIDANCE[family]
    net = policy.trainable_module()

    def grads():
        for p in policy.trainable_parameters():
            p.grad = None
        guided_prediction(policy, noise, g).square().mean().backward()
        return [p.grad.clone() for p in policy.trainable_parameters()]

    plain = grads()
    policy.enable_gradient_checkpointing()
    calls = []
    inner = net._gradient_checkpointing_func
    net._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    checkpointed = grads()
    assert calls, "gradient checkpointing was not used in the forward pass"
    assert all(gr.abs().sum() > 0 for gr in plain[:4])
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    policy.enable_gradient_checkpointing(False)
    assert not net.gradient_checkpointing


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_policy_samples_and_backpropagates(policies, family):
    p64 = FAMILIES[family].tiny(seed=0, dtype=torch.float64)
    p32 = policies[family]
    assert p64.dtype == torch.float64 and p64.pipe.vae.dtype == torch.float64
    noise = noise_for(p32)
    g = GUIDANCE[family]
    x64 = run_policy(p64, noise.double(), g)
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), run_policy(p32, noise, g), rtol=0, atol=1e-4)  # same weights
    assert p64.decode(x64).dtype == torch.float64  # a float64 run stays float64 through decode
    p64.add_lora(rank=2, alpha=2)
    guided_prediction(p64, noise.double(), g).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in p64.trainable_parameters())


def test_tiny_models_are_seeded(policies):
    for family, policy in policies.items():
        again = FAMILIES[family].tiny(seed=0)
        other = FAMILIES[family].tiny(seed=1)
        a, b, c = (dict(m.trainable_module().named_parameters()) for m in (policy, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)


# ---- loading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_by_path_with_the_same_outputs(policies, family, tmp_path):
    policy = policies[family]
    policy.pipeline().save_pretrained(tmp_path)
    assert resolve_family(str(tmp_path)) == family
    loaded = load_policy(str(tmp_path), resolution=policy.height)
    assert isinstance(loaded, FAMILIES[family])
    loaded.max_sequence_length = policy.max_sequence_length
    noise = noise_for(policy)
    torch.testing.assert_close(run_policy(loaded, noise, GUIDANCE[family]), run_policy(policy, noise, GUIDANCE[family]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [SD3Policy, FluxPolicy])
def test_missing_local_folder_names_the_path(cls, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        cls.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        cls.from_pretrained(str(tmp_path))  # a folder, but not a pipeline


def test_uncached_hub_id_names_the_cache_and_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        SD3Policy.from_pretrained("someone/not-a-cached-model")
    msg = str(err.value)
    assert "someone/not-a-cached-model" in msg and str(tmp_path / "hub") in msg and "hf download someone/not-a-cached-model" in msg


def test_registry_names_and_suggestions():
    assert resolve_family("tiny-sd3") == "sd3" and resolve_family("tiny-flux") == "flux" and resolve_family("tiny-sd") == "sd"
    with pytest.raises(ValueError, match="Did you mean 'tiny-flux'"):
        load_policy("tiny-flx")
    with pytest.raises(ValueError, match="tiny-sd3"):
        resolve_family("tiny-sd35")
    with pytest.raises(ValueError, match="valid families"):
        resolve_family("tiny-sd3", family="sdxl")
    policy = load_policy("tiny-flux", torch_dtype=torch.float64, resolution=16)
    assert isinstance(policy, FluxPolicy) and policy.dtype == torch.float64 and policy.height == 16
    assert noise_for(policy).shape == (2, 4, 8, 8)


def test_registry_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_family(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="Valid names"):
        resolve_family("stable-diffusion")
