"""Many processes through accelerate: what the launcher asked for (read from the environment `accelerate launch`
sets), the Accelerator that honours it, and full tensors out of / into FSDP2 shards for checkpoints.

`accelerate launch --config_file configs/accelerate/fsdp2.yaml` (or torchrun with ACCELERATE_USE_FSDP=true and
FSDP_VERSION=2 in the environment) shards the denoiser with PyTorch's fully_shard. On a machine without a GPU
accelerate would drop that request silently and fall back to plain data parallelism; here the same FSDP2 path
runs over gloo instead, so sharded training and its checkpoints are testable on a CPU.

Checkpoints hold full (unsharded) tensors: every process joins the gather, the main process writes, and a resume
scatters the full tensors back into whatever sharding the new run has, so the process count may change.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class LaunchRequest:
    """What the launcher's environment asks of the run (accelerate launch writes these variables from its config)."""

    mixed_precision: str | None
    """ACCELERATE_MIXED_PRECISION: no / fp16 / bf16, or None when not launched by accelerate."""
    fsdp_version: int | None
    """1 or 2 when ACCELERATE_USE_FSDP is set, else None."""
    deepspeed: bool
    """ACCELERATE_USE_DEEPSPEED."""
    dynamo_backend: str | None
    """ACCELERATE_DYNAMO_BACKEND other than 'no'."""

    @classmethod
    def from_env(cls) -> "LaunchRequest":
        dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
        return cls(
            mixed_precision=os.environ.get("ACCELERATE_MIXED_PRECISION") or None,
            fsdp_version=int(os.environ.get("FSDP_VERSION", "1")) if _env_flag("ACCELERATE_USE_FSDP") else None,
            deepspeed=_env_flag("ACCELERATE_USE_DEEPSPEED"),
            dynamo_backend=None if dynamo == "no" else dynamo,
        )


def check_launch(cfg, lm: bool = False) -> None:
    """The accelerate launcher's settings are honoured or refused, never silently overridden: raises
    diffrl.checks.ConfigError before any model loads. `lm`: a language-model run (diffrl.lm)."""
    from diffrl.checks import ConfigError

    req = LaunchRequest.from_env()
    mine = cfg.train.mixed_precision
    if req.mixed_precision is not None and req.mixed_precision != mine:
        raise ConfigError(
            f"'train.mixed_precision' is {mine} but the accelerate launcher asks for {req.mixed_precision} (its config's "
            f"mixed_precision, or --mixed_precision): make them agree, e.g. train.mixed_precision={req.mixed_precision} or "
            f"accelerate launch --mixed_precision {mine}")
    if req.fsdp_version == 1:
        raise ConfigError("the accelerate config asks for FSDP version 1; diffrl shards with FSDP2 (PyTorch's fully_shard): "
                          "set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)")
    if req.fsdp_version is not None and lm:
        raise ConfigError(f"'algorithm' {cfg.algorithm} (language-model RL) is not supported under FSDP yet: use data "
                          "parallelism (configs/accelerate/ddp.yaml)")
    if req.fsdp_version is not None and cfg.algorithm in ("draft", "easytune", "crd"):
        raise ConfigError(
            f"'algorithm' {cfg.algorithm} is not supported under FSDP yet: "
            + ("its reward backpropagation averages gradients itself, outside the sharded backward"
               if cfg.algorithm != "crd" else "its snapshot adapters are added after the denoiser is sharded")
            + "; use data parallelism (configs/accelerate/ddp.yaml), or grpo / nft / prdp with FSDP2")
    if cfg.policy.adapter == "sara" and (req.fsdp_version is not None or req.deepspeed):
        raise ConfigError(f"'policy.adapter' sara is not supported under {'FSDP' if req.fsdp_version else 'DeepSpeed'}: its "
                          "sparse vectors write into whole (unsharded) weights; use data parallelism "
                          "(configs/accelerate/ddp.yaml), or LoRA / a full fine-tune with FSDP2")
    if cfg.policy.adapter == "sara" and cfg.policy.sara_remask_step is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("'policy.sara_remask_step' is not supported with more than one process: the re-mask resizes the "
                          "trainable vectors, and DDP's gradient buckets are built for the first mask; set "
                          "policy.sara_remask_step=null or train on one process")
    if req.fsdp_version is not None and cfg.policy.compile:
        raise ConfigError("'policy.compile' is not supported under FSDP yet (compiled blocks inside fully_shard are untested "
                          "here): set policy.compile=false or use data parallelism (configs/accelerate/ddp.yaml)")
    if req.fsdp_version is not None and cfg.policy.merge_lora_for_rollout:
        raise ConfigError("'policy.merge_lora_for_rollout' is not supported under FSDP: the base weights are sharded "
                          "DTensors, which the merge would replace; turn it off or use data parallelism")
    if req.deepspeed and cfg.policy.merge_lora_for_rollout:
        raise ConfigError("'policy.merge_lora_for_rollout' is not supported under DeepSpeed (untested; ZeRO-3 partitions the "
                          "base weights): turn it off")
    if req.fsdp_version is not None and cfg.train.ema:
        raise ConfigError("'train.ema' is not supported under FSDP yet (the EMA copy is not sharded): set train.ema=false "
                          "or use data parallelism")
    if req.deepspeed:
        if not torch.cuda.is_available():
            raise ConfigError("the accelerate config asks for DeepSpeed, which needs GPUs; this machine has none (FSDP2, "
                              "configs/accelerate/fsdp2.yaml, runs on CPUs too)")
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("the accelerate config asks for DeepSpeed but it is not installed: pip install deepspeed")
    if req.dynamo_backend is not None:
        raise ConfigError(f"the accelerate config asks for torch.compile (dynamo_backend {req.dynamo_backend}); diffrl does "
                          "not compile through accelerate: set dynamo_backend: 'NO' in the accelerate config")


def make_accelerator(mixed_precision: str, log_with: str | None, project_dir: str, kwargs_handlers: list):
    """The run's Accelerator. Without a GPU it runs on the CPU (gloo); an FSDP2 request from the launcher is then
    honoured by switching accelerate's state to FSDP with the plugin it built from the environment (accelerate
    itself would quietly run plain data parallelism on a CPU)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    cpu = not torch.cuda.is_available()
    acc = Accelerator(mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir, cpu=cpu,
                      kwargs_handlers=kwargs_handlers)
    req = LaunchRequest.from_env()
    if req.fsdp_version == 2 and acc.distributed_type != DistributedType.FSDP:
        if acc.num_processes > 1:
            from accelerate.utils import FullyShardedDataParallelPlugin

            acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # its fields from the launcher's FSDP_* variables
            acc.state.distributed_type = DistributedType.FSDP
    return acc


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process when it is an FSDP2 shard: a collective all must join)."""
    if not is_sharded(tensor):
        return tensor
    # full_tensor() may hand back a lazy collective result whose storage is not a plain tensor's (safetensors
    # rejects it): clone() waits for it and owns the memory
    return tensor.full_tensor().clone()


def like(full: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`full` (a whole tensor from a checkpoint) shaped as `target`: its shard on this process when `target` is an
    FSDP2 shard (every process holds the file's whole tensor, so no communication), else `full` itself; on target's
    device, in `dtype` (default: target's)."""
    dtype = dtype or target.dtype
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(target.device, dtype)
        return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    return full.to(target.device, dtype)


@contextlib.contextmanager
def whole_tensors(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, keep: bool = True,
                  lora_only: bool = False, write_back: bool = False):
    """Inside, `module`'s FSDP2-sharded parameters (and their optimizer state) are whole CPU tensors, so the ordinary
    single-process readers and writers (diffusers' save_pretrained / save_lora_weights, diffrl.checkpoint) see one
    model; the shards are put back on exit. Every process must enter (the gathers are collectives).

    keep=False: this process writes nothing, so each gathered tensor is dropped at once. lora_only: only the LoRA
    adapters' tensors (a LoRA run's checkpoint never reads the frozen base, so it is not gathered). write_back: on
    exit the whole parameters' values go back into the shards (a checkpoint was loaded into them; the optimizer's
    state is not swapped then: load_state_dict replaces it, and shard_like_params shards it). Without shards it
    changes nothing."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():  # a forward without backward (evaluation) leaves the root's parameters gathered
        if isinstance(sub, FSDPModule):
            sub.reshard()
    swapped: list[tuple[dict, str, torch.Tensor]] = []  # (the dict that held it, key, the shard)
    try:
        for module_name, sub in module.named_modules():
            for name, param in list(sub._parameters.items()):
                if param is None or not is_sharded(param) or (lora_only and "lora_" not in f"{module_name}.{name}"):
                    continue
                whole = full_tensor(param.detach()).cpu()
                if keep:
                    swapped.append((sub._parameters, name, param))
                    sub._parameters[name] = torch.nn.Parameter(whole, requires_grad=param.requires_grad)
        if optimizer is not None and not write_back:
            for state in optimizer.state.values():
                for key, value in list(state.items()):
                    if torch.is_tensor(value) and is_sharded(value):
                        whole = full_tensor(value).cpu()
                        if keep:
                            swapped.append((state, key, value))
                            state[key] = whole
        yield
    finally:
        for holder, key, shard in reversed(swapped):
            if write_back and isinstance(holder[key], torch.nn.Parameter):
                with torch.no_grad():
                    shard.copy_(like(holder[key].data, shard))
            holder[key] = shard


def shard_like_params(optimizer: torch.optim.Optimizer) -> None:
    """After optimizer.load_state_dict with whole tensors from a checkpoint: each state tensor of an FSDP2-sharded
    parameter becomes this process's shard of it (Adam's moments have the parameter's shape; its step stays)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if torch.is_tensor(value) and not is_sharded(value) and value.shape == param.shape:
                    state[key] = like(value, param, dtype=value.dtype)
