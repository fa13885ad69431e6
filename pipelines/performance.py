"""Speed and memory switches of a denoiser that leave its maths alone: gradient-checkpointing policies, the
attention kernel, torch.compile of the repeated blocks and the LoRA's compute dtype.

Each is a function of a network (or a pure function of the device and dtype), applied by `Policy`
(diffrl.pipelines.base) and tested on the CPU against the unoptimised computation.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend

# ---- gradient checkpointing ------------------------------------------------------------------------------------
CHECKPOINTING = ("none", "full", "selective")
"""policy.gradient_checkpointing: keep every activation, recompute each block, or keep the attention (and
convolution) outputs of each block and recompute the rest of it."""


def checkpointing_mode(value: bool | str) -> str:
    """"none" | "full" | "selective" from the config value; true / false (the old boolean) mean full / none."""
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return "full" if str(value).lower() == "true" else "none"
    if value not in CHECKPOINTING:
        raise ValueError(f"gradient checkpointing {value!r}: choose one of {', '.join(CHECKPOINTING)}")
    return str(value)


@functools.lru_cache(maxsize=None)
def _saved_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: the attention kernels (the O(N^2) part of a block, the
    costliest to recompute at long sequences) and convolutions (a UNet's bulk; GroupNorm keeps their outputs for
    backward anyway). Linears are recomputed: with the base weights frozen (LoRA), autograd keeps no input or output
    of a frozen linear, so caching every matmul output would keep more than no checkpointing at all (tiny-sd3: 1.7 MB
    against 1.3 MB). Norms, activations, adds and casts are recomputed."""
    aten = torch.ops.aten
    names = ("convolution", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, name) for name in names if hasattr(aten, name))


def save_attention_outputs(ctx, op, *args, **kwargs):
    """torch.utils.checkpoint selective policy: save what _saved_ops lists, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    saved = getattr(op, "overloadpacket", None) in _saved_ops()
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_function(mode: str, context: Callable[[], ContextManager] = contextlib.nullcontext) -> Callable:
    """A diffusers `gradient_checkpointing_func(block, *args)`: torch.utils.checkpoint (non-reentrant) of the block,
    with `mode` "full" (keep only the block's inputs) or "selective" (PyTorch's selective activation checkpointing
    with save_attention_outputs). `context()` is entered around every run of the block, the recomputation in
    backward too (the attention kernel choice: a recomputation must run the kernel the forward ran)."""
    if mode not in ("full", "selective"):
        raise ValueError(f"checkpoint_function needs 'full' or 'selective', got {mode!r}")

    def run(block, *args, **kwargs):
        def call(*inputs, **kw):
            with context():
                return block(*inputs, **kw)

        options = {"use_reentrant": False}
        if mode == "selective":
            from torch.utils.checkpoint import create_selective_checkpoint_contexts

            options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, save_attention_outputs)
        # looked up at call time (not imported): tests count the calls by patching torch.utils.checkpoint.checkpoint
        return torch.utils.checkpoint.checkpoint(call, *args, **options, **kwargs)

    run.mode = mode
    return run


# ---- attention kernels -----------------------------------------------------------------------------------------
SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
"""PyTorch's scaled_dot_product_attention kernels by short name."""


@dataclass(frozen=True)
class AttentionPlan:
    """How a policy's attention runs: kind "sdpa" (torch's scaled_dot_product_attention; `kernels` the kernels it
    may use in priority order, () for PyTorch's own choice), "xformers", or "dispatcher" (diffusers' attention
    dispatcher backend `name`)."""

    kind: str
    kernels: tuple[SDPBackend, ...] = ()
    name: str = ""


def attention_plan(backend: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                   xformers_installed: bool) -> AttentionPlan:
    """The attention of policy.attention_backend `backend` on a device of CUDA compute capability `capability`
    (None: no CUDA device) computing in `dtype`. "auto" keeps PyTorch's choice on the CPU and in float64, and on
    CUDA puts first cuDNN attention on Hopper (sm90) in bf16 / fp16, flash attention on other sm80+ GPUs in bf16 /
    fp16, memory-efficient attention otherwise; every kernel stays allowed after it (PyTorch's order), so an input
    the first cannot take (a mask, a head size) falls back instead of failing. A pure function: unit-tested."""
    if backend == "sdpa":
        return AttentionPlan("sdpa")
    if backend == "xformers":
        if capability is None or not xformers_installed:
            raise RuntimeError("attention_backend 'xformers' needs CUDA and the xformers package "
                               "(pip install 'diffrl[xformers]'); use 'sdpa' or 'auto' on this machine.")
        return AttentionPlan("xformers")
    if backend != "auto":
        return AttentionPlan("dispatcher", name=backend)
    if capability is None or dtype == torch.float64:
        return AttentionPlan("sdpa")
    half = dtype in (torch.bfloat16, torch.float16)
    if half and capability[0] == 9:
        first = SDPBackend.CUDNN_ATTENTION
    elif half and capability[0] >= 8:
        first = SDPBackend.FLASH_ATTENTION
    else:
        first = SDPBackend.EFFICIENT_ATTENTION
    default_order = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                     SDPBackend.CUDNN_ATTENTION)  # torch._C._get_sdp_priority_order() of torch 2.5+
    return AttentionPlan("sdpa", (first, *(k for k in default_order if k != first)))


def sdpa_context(kernels: tuple[SDPBackend, ...]) -> ContextManager:
    """torch.nn.attention.sdpa_kernel restricted to `kernels`, tried in their order; () changes nothing."""
    if not kernels:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(list(kernels), set_priority=True)


def run_forward_in(net: nn.Module, context: Callable[[], ContextManager]) -> list:
    """Enter `context()` around every forward of `net` (hooks: the state dict and the forward's signature stay
    as they are); returns the hook handles (`handle.remove()` undoes it)."""
    entered: list[ContextManager] = []

    def enter(module, args):
        ctx = context()
        ctx.__enter__()
        entered.append(ctx)

    def leave(module, args, output):
        entered.pop().__exit__(None, None, None)

    return [net.register_forward_pre_hook(enter), net.register_forward_hook(leave, always_call=True)]


# ---- torch.compile ---------------------------------------------------------------------------------------------
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""torch.compile modes: inductor's defaults, CUDA graphs on top (fixed shapes, CUDA only), or autotuned kernels."""


def repeated_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks compiled one by one (regional compilation): modules of the classes the network lists in
    `_repeated_blocks` (diffusers' own list: UNet, FLUX, Wan), else in `_no_split_modules` (SD3, the motion
    transformer); outermost ones only."""
    names = set(getattr(net, "_repeated_blocks", None) or getattr(net, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    for module in net.modules():
        if type(module).__name__ in names and not any(module in set(b.modules()) for b in blocks):
            blocks.append(module)
    return blocks


def compile_blocks(net: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """torch.compile each of `net`'s repeated blocks in place (nn.Module.compile: parameter names and the state dict
    keep no "_orig_mod." prefix); returns how many. Blocks rather than the whole network: one block's graph is
    compiled once and serves every block of its class, and what varies between calls (the LoRA switched off for
    the reference, another adapter for EMA snapshots, gradients on or off) re-traces a small graph."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    device = next(net.parameters()).device
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"compile mode 'reduce-overhead' records CUDA graphs; this network is on {device.type}: use "
                         "'default' or 'max-autotune'")
    blocks = repeated_blocks(net)
    if not blocks:
        raise ValueError(f"{type(net).__name__} names no repeated blocks (_repeated_blocks / _no_split_modules) to compile")
    options = {"mode": mode} if backend == "inductor" else {}  # modes are inductor's
    for block in blocks:
        block.compile(backend=backend, **options)
    return len(blocks)


# ---- LoRA compute dtype ----------------------------------------------------------------------------------------
LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""policy.lora_dtype: what the LoRA adapters compute in; their parameters stay float32 either way."""


def compute_lora_in(net: nn.Module, dtype: torch.dtype) -> int:
    """Make every peft LoRA layer of `net` compute its adapters in `dtype` (bf16 on a bf16 base) while the LoRA
    parameters stay float32: autocast inside the layer rounds the small LoRA weights to `dtype` at each forward, so
    the float32 parameters are the master copy the optimiser updates (an update below bf16's resolution is kept and
    adds up until the rounded weight moves), gradients reach them in float32, and peft's cast of the activations to
    the weights' dtype (a float32 copy of every LoRA layer's input) is switched off. Checkpoints, EMA and resume see
    the float32 parameters as before. Returns the number of layers changed; idempotent."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in net.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "_lora_compute_dtype", None) is not None:
            continue
        module.cast_input_dtype_enabled = False  # peft's switch (peft.helpers.disable_input_dtype_casting)
        inner = module.forward

        def forward(x, *args, _inner=inner, **kwargs):
            with torch.autocast(x.device.type, dtype=dtype):
                return _inner(x, *args, **kwargs)

        module.forward, module._lora_compute_dtype = forward, dtype
        changed += 1
    return changed
