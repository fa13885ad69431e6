"""GPU speed and memory switches (diffrl.pipelines.performance, docs/performance.md) leave the maths alone.

Each option is checked on the CPU against the unoptimised computation: LoRA gradients under every checkpointing
policy in float64, and the memory ordering that shows each policy really ran.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from diffrl.config import load_config
from diffrl.pipelines.sd import StableDiffusionPolicy
from diffrl.pipelines.sd3 import SD3Policy

FAMILIES = {"sd3": SD3Policy, "sd": StableDiffusionPolicy}
PROMPTS = ["a red circle", "two blue squares"]


def lora_policy(family: str, dtype=torch.float64):
    """A tiny policy with a LoRA whose B is non-zero (the gaussian init zeroes it: no gradient reaches A)."""
    policy = FAMILIES[family].tiny(seed=0, dtype=dtype)
    policy.add_lora(rank=4, alpha=4)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in policy.trainable_module().named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return policy


def loss_fn(policy):
    """The squared guided prediction at one timestep, as a closure (the inputs drawn once)."""
    cond = policy.encode_prompt(PROMPTS)
    x = policy.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0)).to(policy.dtype)  # [B, C, h, w]
    t = policy.schedule(4).timesteps[1:2].repeat(len(PROMPTS))  # [B]
    return lambda: policy.predict(x, t, cond, 3.0).square().mean()


def lora_grads(policy, loss) -> list[torch.Tensor]:
    for p in policy.trainable_parameters():
        p.grad = None
    loss().backward()
    return [p.grad.clone() for p in policy.trainable_parameters()]


def bytes_kept_by_forward(loss) -> int:
    """Bytes the forward allocated that are still alive when it returns (what backward keeps, plus the scalar loss),
    from the profiler's allocation records. An outer saved_tensors_hooks cannot see them: torch.utils.checkpoint packs
    a block's saved tensors with its own hooks, and selective checkpointing caches its saved outputs itself."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = loss()
    del kept
    return sum(event.self_cpu_memory_usage for event in prof.events())


# ---- gradient checkpointing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_policies_give_the_same_lora_gradients_and_keep_less(family):
    policy = lora_policy(family)
    loss = loss_fn(policy)
    grads, kept = {}, {}
    for mode in ("none", "full", "selective"):
        policy.enable_gradient_checkpointing(mode)
        grads[mode] = lora_grads(policy, loss)
        kept[mode] = bytes_kept_by_forward(loss)
    assert all(g.abs().max() > 0 for g in grads["none"])
    for mode in ("full", "selective"):
        for plain, other in zip(grads["none"], grads[mode], strict=True):
            torch.testing.assert_close(other, plain, rtol=0, atol=1e-12)
    # full keeps each block's inputs; selective also its attention (and convolution) outputs; none everything
    assert kept["full"] < kept["selective"] < kept["none"], kept


def test_checkpointing_config_accepts_the_old_booleans(tmp_path):
    recipe = "configs/image/tiny_sd3_jpeg.yaml"
    for value, mode in (("true", "full"), ("false", "none"), ("selective", "selective"), ("none", "none")):
        cfg = load_config(recipe, [f"policy.gradient_checkpointing={value}", f"output_dir={tmp_path / value}"])
        assert cfg.policy.gradient_checkpointing == mode
