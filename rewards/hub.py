"""Weights of model rewards: local folders or the Hugging Face cache, never a download; lazy loading.

Every model reward takes a `model` argument naming its weights:
    "tiny"                   random tiny weights built from a config (tests, smoke runs): the same
                             loading, preprocessing and forward code as the real model
    "/path/to/folder"        a local folder (a hub snapshot or `save_pretrained` output)
    "owner/name"             a hub repo id already in the local Hugging Face cache
and single files (heads, checkpoints) as a local path or "owner/name/file.pt" (a file of a cached
hub repo). Nothing is downloaded: when weights are absent the error says what was looked for, where,
and how to fix it.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from diffrl.hub import cached_file, cached_snapshot, hub_cache_dir, looks_like_hub_id
from diffrl.runtime import DTYPES

from .base import Reward

TINY = "tiny"
"""The `model` value that builds random tiny weights from a config."""

def _absent(reward: str, what: str, spec: str, fix_arg: str) -> str:
    return (
        f"reward {reward!r}: {what} {spec!r} is neither a local path nor in the Hugging Face cache "
        f"({hub_cache_dir()}; HF_HUB_CACHE / HF_HOME move it). Fix: on a machine with network run "
        f"`hf download {spec}` and copy the cache here, or pass {fix_arg}=/local/folder "
        f"({fix_arg}='tiny' builds random tiny weights for tests)."
    )


def resolve_folder(spec: str, *, reward: str, what: str, needs: tuple[str, ...] = (),
                   fix_arg: str = "model") -> Path:
    """The local folder of `spec` (a folder path, or a hub repo id in the local cache), checked to hold
    every file in `needs`. Raises FileNotFoundError naming what, where, and the fix."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        folder = path
    elif looks_like_hub_id(spec):
        try:
            folder = cached_snapshot(spec)
        except Exception as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, offline mode ...
            raise FileNotFoundError(_absent(reward, what, spec, fix_arg)) from err
    else:
        raise FileNotFoundError(
            f"reward {reward!r}: {what} folder {str(path)!r} does not exist (looked for {path.resolve()}). "
            f"Pass an existing folder, a hub repo id already in the Hugging Face cache, or {fix_arg}='tiny'."
        )
    missing = [name for name in needs if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"reward {reward!r}: {what} folder {folder} lacks {', '.join(missing)} (an incomplete download, "
            f"or not the right model)."
        )
    return folder


def resolve_file(spec: str, *, reward: str, what: str, fix_arg: str) -> Path:
    """The local path of a single file: a path, or "owner/name/path/in/repo" in the local HF cache."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return path
    parts = spec.split("/")
    if len(parts) >= 3 and not spec.startswith((".", "~", "/")):
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            return cached_file(repo, filename)
        except Exception as err:
            raise FileNotFoundError(
                f"reward {reward!r}: {what} {spec!r} is neither a local file nor file {filename!r} of hub repo "
                f"{repo!r} in the Hugging Face cache ({hub_cache_dir()}). Fix: on a machine with network run "
                f"`hf download {repo} {filename}` and copy the cache here, or pass {fix_arg}=/local/file."
            ) from err
    raise FileNotFoundError(
        f"reward {reward!r}: {what} file {str(path)!r} does not exist (looked for {path.resolve()}). "
        f"Pass an existing file or 'owner/name/file' of a hub repo in the Hugging Face cache."
    )


class ModelReward(Reward):
    """A reward backed by network weights, loaded on first use (or by `load()`) onto the device of the
    samples it scores (or the one given to `to()`), in `dtype`. Subclasses implement `_load` (build
    every module from `self.model`: TINY or real weights) and `_modules`."""

    default_model: ClassVar[str]
    """The weights used when `model` is not given (a hub repo id)."""

    def __init__(self, model: str | None = None, *, dtype: str = "float32", device: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"reward {self._name()!r}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = model or self.default_model
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device) if device is not None else None
        self._loaded = False

    @abc.abstractmethod
    def _load(self) -> None:
        """Build and load every module (on the CPU, in self.dtype); raise FileNotFoundError if absent."""

    @abc.abstractmethod
    def _modules(self) -> list[torch.nn.Module]:
        """The loaded modules, moved by `to`."""

    def load(self) -> ModelReward:
        if not self._loaded:
            self._load()
            for module in self._modules():
                module.requires_grad_(False).eval()
            self._loaded = True
            if self.device is not None:
                self._move(self.device)
        return self

    def to(self, device: torch.device | str) -> ModelReward:
        self.device = torch.device(device)
        if self._loaded:
            self._move(self.device)
        return self

    def _move(self, device: torch.device) -> None:
        for module in self._modules():
            module.to(device)

    def _ready(self, samples: Tensor) -> torch.device:
        """Load if needed and follow the samples' device (the policy's); returns the model's device."""
        self.load()
        if self.device != samples.device:
            self.to(samples.device)
        return samples.device


def seeded(seed: int, build):
    """`build()` under torch.manual_seed(seed), leaving the global RNG as it was (tiny weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns in 5.x)."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (weights only: no pickled code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
