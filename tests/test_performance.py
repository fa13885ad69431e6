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


# ---- attention kernels ----------------------------------------------------------------------------------------
from torch.nn.attention import SDPBackend  # noqa: E402

from diffrl.pipelines.performance import AttentionPlan, attention_plan, sdpa_context  # noqa: E402

CUDNN, FLASH, EFFICIENT, MATH = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

AUTO_TABLE = [  # (capability, dtype) -> the kernel tried first; None: PyTorch's own choice
    (None, BF16, None), (None, FP32, None),  # no CUDA: plain sdpa
    ((9, 0), BF16, CUDNN), ((9, 0), FP16, CUDNN),  # Hopper (H100 / H200)
    ((8, 0), BF16, FLASH), ((8, 6), FP16, FLASH), ((8, 9), BF16, FLASH), ((10, 0), BF16, FLASH), ((12, 0), FP16, FLASH),
    ((7, 5), FP16, EFFICIENT), ((7, 0), BF16, EFFICIENT),  # Turing, Volta: no flash kernel
    ((9, 0), FP32, EFFICIENT), ((8, 0), FP32, EFFICIENT),  # flash and cuDNN take half precision only
    ((9, 0), FP64, None),  # only the math kernel takes float64
]


@pytest.mark.parametrize("capability, dtype, first", AUTO_TABLE)
def test_auto_attention_table(capability, dtype, first):
    plan = attention_plan("auto", capability, dtype, xformers_installed=True)  # auto never picks xformers
    assert plan.kind == "sdpa"
    if first is None:
        assert plan.kernels == ()
    else:  # the preferred kernel first, every other one still allowed behind it (a fallback, never an error)
        assert plan.kernels[0] == first and sorted(plan.kernels, key=int) == sorted((CUDNN, FLASH, EFFICIENT, MATH), key=int)


def test_attention_plan_for_named_backends():
    assert attention_plan("sdpa", (9, 0), BF16, True) == AttentionPlan("sdpa")
    assert attention_plan("xformers", (8, 0), FP16, True) == AttentionPlan("xformers")
    assert attention_plan("_native_flash", (9, 0), BF16, False) == AttentionPlan("dispatcher", name="_native_flash")
    for capability, installed in ((None, True), ((8, 0), False)):
        with pytest.raises(RuntimeError, match="xformers"):
            attention_plan("xformers", capability, FP16, installed)


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, written out."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, Nq, Nk]
    return weights @ v  # [B, H, Nq, D]


@pytest.mark.parametrize("kernel", [FLASH, MATH])  # the kernels a CPU has
def test_each_cpu_attention_kernel_is_the_formula(kernel):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=FP64) for n in (5, 7, 7))  # [B, H, N, D]
    with sdpa_context((kernel,)):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, math_attention(q, k, v), rtol=0, atol=1e-12)


class AttentionOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records which SDPA kernels (aten ops) run."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ or func.__name__.startswith("_safe_softmax"):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_policy_runs_the_planned_kernel_in_forward_and_recomputation(checkpointing):
    policy = lora_policy("sd3")
    policy.enable_gradient_checkpointing(checkpointing)
    loss = loss_fn(policy)
    with AttentionOps() as default:
        reference = lora_grads(policy, loss)
    assert default.ops and all(op.startswith("_scaled_dot_product_flash_attention_for_cpu") for op in default.ops)
    policy.apply_attention_plan(AttentionPlan("sdpa", (MATH,)))  # the math kernel: softmax written out in aten ops
    with AttentionOps() as planned:
        grads = lora_grads(policy, loss)
    assert planned.ops and not any("flash" in op for op in planned.ops), planned.ops
    # as many attention forwards as before (with checkpointing: the recomputation too), none of them flash
    assert planned.ops.count("_safe_softmax.default") == default.ops.count(default.ops[0]) == (2 if checkpointing == "full" else 1)
    for a, b in zip(reference, grads, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    policy.set_attention_backend("sdpa")  # the hooks go
    with AttentionOps() as again:
        lora_grads(policy, loss)
    assert again.ops == default.ops


# ---- torch.compile --------------------------------------------------------------------------------------------
def lora_file(policy, folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    policy.save_lora(folder)
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def check_compiled_matches_eager(tmp_path, backend: str) -> None:
    policy = lora_policy("sd3", torch.float32)
    loss = loss_fn(policy)
    cond, x, t = policy.encode_prompt(PROMPTS), policy.initial_noise(2, torch.Generator().manual_seed(1)), None
    t = policy.schedule(4).timesteps[2:3].repeat(2)  # [B]
    with torch.no_grad():
        out, base = policy.predict(x, t, cond, 3.0), None
        with policy.reference():
            base = policy.predict(x, t, cond, 3.0)
    grads = lora_grads(policy, loss)
    keys, saved = list(policy.trainable_module().state_dict()), lora_file(policy, tmp_path / "eager")

    policy.compile_networks("default", backend=backend)
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in policy.trainable_module().modules())
    with torch.no_grad():
        torch.testing.assert_close(policy.predict(x, t, cond, 3.0), out, rtol=0, atol=1e-5)
        with policy.reference():  # the LoRA switched off re-traces the block, still right
            torch.testing.assert_close(policy.predict(x, t, cond, 3.0), base, rtol=0, atol=1e-5)
    for eager, compiled in zip(grads, lora_grads(policy, loss), strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert list(policy.trainable_module().state_dict()) == keys  # no "_orig_mod." anywhere
    after = lora_file(policy, tmp_path / "compiled")
    assert list(after) == list(saved) and not any("_orig_mod" in k for k in after)
    for name in saved:
        assert torch.equal(after[name], saved[name]), name


def test_compiled_blocks_match_eager_and_keep_the_state_dict(tmp_path):
    """The compile wiring (blocks compiled in place, LoRA hooks, reference switch, saved names) with
    AOTAutograd's eager backend: seconds, where inductor's C++ build takes minutes on this CPU."""
    check_compiled_matches_eager(tmp_path, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager(tmp_path):
    """The same with inductor (a C++ compiler builds the kernels): outputs and LoRA gradients within 1e-5."""
    check_compiled_matches_eager(tmp_path, "inductor")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA graphs are available here")
def test_reduce_overhead_is_refused_without_cuda(tmp_path):
    policy = lora_policy("sd3", torch.float32)
    with pytest.raises(ValueError, match="CUDA graphs"):
        policy.compile_networks("reduce-overhead")
    with pytest.raises(Exception, match="policy.compile_mode"):
        load_config("configs/image/tiny_sd3_jpeg.yaml", ["policy.compile=true", "policy.compile_mode=reduce-overhead",
                                                         f"output_dir={tmp_path}"])
