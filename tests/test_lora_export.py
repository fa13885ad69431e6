"""LoRA export: what `Policy.save_lora` writes loads into a FRESH stock diffusers pipeline with
`pipe.load_lora_weights(dir)` and gives the same images as the LoRA policy (rank != alpha, so a
dropped `lora_alpha` would show), and `Policy.load_lora` restores it as a trainable adapter."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffrl.pipelines.flux import FluxPolicy
from diffrl.pipelines.sd3 import SD3Policy
from diffrl.rollout import sample
from diffrl.sampling import make_sampler

PROMPTS = ["a yellow star above a purple ring", "three black cubes"]
STEPS = 4
CASES = {
    "sd3": (SD3Policy, StableDiffusion3Pipeline, 4.5),
    "flux": (FluxPolicy, FluxPipeline, 3.5),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """A tiny policy with a perturbed LoRA (rank 4, alpha 12), its base folder and its LoRA folder."""
    cls, pipe_cls, guidance = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    policy = cls.tiny(seed=0)
    policy.pipeline().save_pretrained(root / "base")  # base weights, before any adapter
    policy.add_lora(rank=4, alpha=12)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    assert all(p.abs().sum() > 0 for n, p in policy.trainable_module().named_parameters() if "lora_B" in n)
    policy.save_lora(root / "lora")
    return policy, pipe_cls, guidance, root


def policy_images(policy, noise, guidance):
    cond = policy.encode_prompt(PROMPTS)
    traj = sample(policy, cond, make_sampler("flow_ode"), policy.schedule(STEPS), guidance, latents=noise)
    return policy.decode(traj.final)  # [B, 3, H, W]


def stock_images(pipe, policy, noise, guidance):
    latents = policy.pack(noise) if isinstance(policy, FluxPolicy) else noise
    return pipe(
        prompt=PROMPTS,
        latents=latents,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=policy.height,
        width=policy.width,
        max_sequence_length=policy.max_sequence_length,
        output_type="pt",
    ).images


def test_stock_pipeline_loads_the_exported_lora(exported):
    policy, pipe_cls, guidance, root = exported
    noise = policy.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    ours = policy_images(policy, noise, guidance)

    pipe = pipe_cls.from_pretrained(root / "base")  # fresh components from disk
    pipe.set_progress_bar_config(disable=True)
    base = stock_images(pipe, policy, noise, guidance)
    pipe.load_lora_weights(root / "lora")
    theirs = stock_images(pipe, policy, noise, guidance)

    assert (theirs - ours).abs().max() < 1e-5
    assert (base - ours).abs().max() > 1e-3  # the LoRA matters, so the match above means something
    with torch.no_grad(), policy.reference():
        torch.testing.assert_close(policy_images(policy, noise, guidance), base, rtol=0, atol=1e-5)


def test_policy_load_lora_restores_a_trainable_adapter(exported):
    policy, _, guidance, root = exported
    cls = type(policy)
    fresh = cls.tiny(seed=0)
    fresh.load_lora(root / "lora")
    noise = policy.initial_noise(len(PROMPTS), torch.Generator().manual_seed(1))
    torch.testing.assert_close(policy_images(fresh, noise, guidance), policy_images(policy, noise, guidance), rtol=0, atol=1e-6)

    names = [n for n, p in fresh.trainable_module().named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == len(policy.trainable_parameters())
    with fresh.reference():
        pass  # has a disable-able adapter
    fresh.load_lora(root / "lora")  # loading again replaces the adapter instead of stacking a second one
    assert len(fresh.trainable_parameters()) == len(names)
