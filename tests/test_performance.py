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


# ---- LoRA in bf16 with float32 master weights -----------------------------------------------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def bf16_policy(lora_dtype: str):
    """tiny-sd3 with bf16 base weights and a LoRA of rank 4: "bfloat16" computes it in bf16 from float32
    parameters; "stored-bf16" keeps the LoRA parameters themselves in bf16 (no master copy)."""
    policy = SD3Policy.tiny(seed=0, dtype=BF16)
    policy.add_lora(rank=4, alpha=4, compute_dtype=BF16 if lora_dtype == "bfloat16" else None)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # |w| in [0.14, 0.23], inside [1/8, 1/4) where one bf16 step (ulp) is 2^-10; values exactly representable
        for p in policy.trainable_parameters():
            magnitude = 0.14 + 0.09 * torch.rand(p.shape, generator=gen)
            sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
            p.copy_((sign * magnitude).bfloat16().float())
            if lora_dtype == "stored-bf16":
                p.data = p.data.bfloat16()
    return policy


def bf16_inputs(policy):
    cond = policy.encode_prompt(PROMPTS)
    x = policy.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0)).to(BF16)  # [B, C, h, w]
    t = policy.schedule(4).timesteps[1:2].repeat(len(PROMPTS))  # [B]
    return lambda: policy.predict(x, t, cond, 3.0)


class CastsToFloat32(TorchDispatchMode):
    """The storages of the tensors cast to float32."""

    def __init__(self):
        super().__init__()
        self.sources = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("_to_copy") and torch.is_tensor(out) and out.dtype == FP32:
            self.sources.add(args[0].untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("lora_dtype", ["float32", "bfloat16"])
def test_bf16_lora_casts_no_activation_to_float32(lora_dtype):
    from peft.tuners.lora import LoraLayer

    policy = SD3Policy.tiny(seed=0, dtype=BF16)
    policy.add_lora(rank=4, alpha=4, compute_dtype=DTYPE_NAMES[lora_dtype])
    inputs = set()
    for module in policy.trainable_module().modules():
        if isinstance(module, LoraLayer):
            module.register_forward_pre_hook(lambda m, args: inputs.add(args[0].untyped_storage().data_ptr()))
    predict = bf16_inputs(policy)
    with CastsToFloat32() as casts:
        out = predict()
    cast_inputs = inputs & casts.sources  # LoRA layer inputs copied to float32
    assert bool(cast_inputs) == (lora_dtype == "float32")
    out.float().square().mean().backward()
    params = policy.trainable_parameters()  # float32 either way, and so are their gradients
    assert all(p.dtype == FP32 and p.grad.dtype == FP32 for p in params) and any(p.grad.abs().max() > 0 for p in params)


DTYPE_NAMES = {"float32": None, "bfloat16": BF16}


def adamw_steps(policy, loss, optimizer, n: int) -> None:
    for _ in range(n):
        loss().float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("lora_dtype", ["bfloat16", "stored-bf16"])
def test_bf16_lora_master_keeps_updates_below_bf16_resolution(lora_dtype):
    """AdamW's first steps move each weight by lr = 2^-12, a quarter of bf16's resolution at these weights: the
    float32 master keeps every step and the bf16 weights the forward uses move once the sum crosses half a step;
    LoRA parameters stored in bf16 round every step away and never move (the failure the master prevents)."""
    policy = bf16_policy(lora_dtype)
    predict = bf16_inputs(policy)
    params = policy.trainable_parameters()
    initial = [p.detach().clone() for p in params]
    with torch.no_grad():
        out0 = predict()
    optimizer = torch.optim.AdamW(params, lr=2**-12, weight_decay=0.0)
    adamw_steps(policy, predict, optimizer, 1)
    with torch.no_grad():
        out1 = predict()
    moved = sum(int((p != q).sum()) for p, q in zip(params, initial))  # entries whose stored value changed
    rounded_moved = sum(int((p.bfloat16() != q.bfloat16()).sum()) for p, q in zip(params, initial))
    assert rounded_moved == 0 and torch.equal(out1, out0)  # one step is below bf16's resolution everywhere
    assert moved == (sum(p.numel() for p in params) if lora_dtype == "bfloat16" else 0)
    adamw_steps(policy, predict, optimizer, 8)
    with torch.no_grad():
        out9 = predict()
    rounded_moved = sum(int((p.bfloat16() != q.bfloat16()).sum()) for p, q in zip(params, initial))
    if lora_dtype == "bfloat16":  # the accumulated steps reached the bf16 weights and the output
        assert rounded_moved > 0 and not torch.equal(out9, out0)
        with torch.no_grad():  # the forward reads the master only through its bf16 rounding
            for p in params:
                p.copy_(p.bfloat16().float())
            assert torch.equal(predict(), out9)
    else:
        assert rounded_moved == 0 and torch.equal(out9, out0)


def test_bf16_lora_resume_is_bit_identical(tmp_path):
    from diffrl.trainers.loop import Trainer

    fast = ["policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "policy.dtype=bfloat16",
            "policy.lora_dtype=bfloat16", "sampling.num_steps=2",
            "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2", "train.group_size=2",
            "train.rollout_batch_size=4", "train.train_batch_size=2", "train.learning_rate=1e-3", "max_iterations=3",
            "logging.log_with=none", "logging.progress=false"]
    full = Trainer(load_config("configs/image/tiny_sd3_jpeg.yaml", [*fast, "logging.save_every=1", f"output_dir={tmp_path / 'a'}"]))
    assert all(p.dtype == FP32 for p in full.policy.trainable_parameters())  # the master copy
    rows = full.train()
    resumed = Trainer(load_config("configs/image/tiny_sd3_jpeg.yaml", [
        *fast, f"resume={tmp_path / 'a' / 'checkpoints' / 'iter_000002'}", f"output_dir={tmp_path / 'b'}"]))
    row = resumed.train()[0]
    assert row["iteration"] == 3 and row["loss"] == rows[2]["loss"]
    for a, b in zip(full.policy.trainable_parameters(), resumed.policy.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_bf16_lora_under_bf16_autocast_is_the_float32_lora_bit_for_bit():
    """Under train.mixed_precision bf16 the float32 LoRA's matmuls already run in bf16 (autocast), after peft copied
    each input to float32 and autocast copied it back: lora_dtype bfloat16 drops those copies and nothing else."""
    results = []
    for lora_dtype in ("float32", "bfloat16"):
        policy = bf16_policy(lora_dtype)
        with torch.autocast("cpu", dtype=BF16):
            out = bf16_inputs(policy)()
        out.float().square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in policy.trainable_parameters()]))
    (out32, grads32), (out16, grads16) = results
    assert torch.equal(out16, out32)
    for a, b in zip(grads32, grads16, strict=True):
        assert torch.equal(a, b)


# ---- activation offload ---------------------------------------------------------------------------------------
def test_activation_offload_moves_saved_tensors_and_changes_nothing(tmp_path, monkeypatch):
    """One GRPO iteration with and without train.activation_offload: the same weights bit for bit, and with it
    the tensors the update's forwards save pass through save_on_cpu's pack hook (counted by a spy)."""
    from diffrl.trainers.loop import Trainer

    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(tensor.nbytes) or pack(tensor)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    fast = ["policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "sampling.num_steps=2",
            "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2", "train.group_size=2",
            "train.rollout_batch_size=4", "train.train_batch_size=2", "train.learning_rate=1e-3", "max_iterations=1",
            "logging.log_with=none", "logging.progress=false", "logging.eval_every=0"]
    weights, counts = [], []
    for offload in (False, True):
        trainer = Trainer(load_config("configs/image/tiny_sd3_jpeg.yaml", [
            *fast, f"train.activation_offload={offload}", f"output_dir={tmp_path / str(offload)}"]))
        initial = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
        packed.clear()
        rows = trainer.train()
        counts.append(len(packed))
        weights.append(([p.detach().clone() for p in trainer.policy.trainable_parameters()], rows[-1]["loss"]))
    assert counts[0] == 0 and counts[1] > 0
    (plain, plain_loss), (offloaded, offloaded_loss) = weights
    assert offloaded_loss == plain_loss
    assert any(not torch.equal(p, q) for p, q in zip(plain, initial))  # the update did something
    for a, b in zip(plain, offloaded, strict=True):
        assert torch.equal(a, b)
