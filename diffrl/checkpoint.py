"""Checkpoints: safetensors only (never pickle), written atomically, restoring a run exactly.

Layout of one checkpoint folder:
    lora/pytorch_lora_weights.safetensors   stock diffusers LoRA (pipe.load_lora_weights(dir/lora))
    denoiser/ (model/ for a language model)  full fine-tunes only: a diffusers (transformers) model folder
    trainable.safetensors                   every trainable tensor, by parameter name (exact resume)
    optimizer.safetensors + optimizer.json  optimizer tensors / hyper-parameters and step counts
    rng.safetensors                         torch CPU (and CUDA) generator states
    extra.safetensors                       algorithm tensors (EMA, snapshots), optional
    state.json                              iteration, samples seen, stat-tracker history, ...
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


def _named_trainable(policy) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in policy.trainable_module().named_parameters() if p.requires_grad}


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    policy,
    optimizer: torch.optim.Optimizer,
    state: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    card: str | None = None,
) -> Path:
    """Write a checkpoint to `path` atomically: a temporary folder renamed into place when complete. `card`
    (a model card, Markdown) goes into the LoRA (or full-model) folder as README.md, as diffusers' scripts do."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    if policy.has_lora:
        policy.save_lora(tmp / "lora")
    else:
        policy.trainable_module().save_pretrained(tmp / policy.full_model_folder, safe_serialization=True)
    if card is not None:
        (tmp / ("lora" if policy.has_lora else policy.full_model_folder) / "README.md").write_text(card)
    save_file({n: p.detach().contiguous().cpu() for n, p in _named_trainable(policy).items()}, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    if extra_tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))

    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def prune_checkpoints(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (iter_*) in `folder`; returns the deleted ones."""
    done = sorted(Path(folder).glob("iter_*"))
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old)
    return done[: max(0, len(done) - keep)]


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest complete checkpoint under path/checkpoints."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = sorted((path / "checkpoints").glob("iter_*/" + STATE_FILE)) if (path / "checkpoints").is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected {path / STATE_FILE} or {path / 'checkpoints'}/iter_*/{STATE_FILE}"
        )
    return found[-1].parent


def load_checkpoint(path: str | Path, policy, optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore trainable weights, optimizer and RNG in place; return (state, extra_tensors)."""
    path = latest_checkpoint(path)
    params = _named_trainable(policy)
    saved = load_file(path / "trainable.safetensors")
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model: {len(missing)} trainable tensors missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it made with "
            "the same model and LoRA settings?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    meta = json.loads((path / "optimizer.json").read_text())
    opt_tensors = load_file(path / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    extra = load_file(path / "extra.safetensors") if (path / "extra.safetensors").is_file() else {}
    return json.loads((path / STATE_FILE).read_text()), extra
