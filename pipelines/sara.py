"""SaRA: progressive sparse low-rank adaptation (Hu et al., ICLR 2025), the parameter-efficient mode beside LoRA.

SaRA trains the entries of a pretrained network that are nearly zero: in every parameter tensor the entries with
|P| < threshold (2e-3 by default) train and all others stay frozen. Like the authors' code it covers every
floating-point parameter of the trained network (linear and convolution kernels, biases, norm scales,
embeddings); a tensor without such entries is left alone. Two additions from the paper:

* a nuclear-norm penalty: before each optimiser step one randomly drawn 2-D weight with min(shape) > 64 gets the
  gradient of lambda_rank * ||P * M||_*, the nuclear norm of the weight's current trainable entries with zeros
  elsewhere (what the authors' code takes the norm of: the masked current weight, not the update P - P0);
* progressive re-masking: once, after `remask_step` optimiser steps, the mask is recomputed on the current weights
  (|P| < threshold) and the optimiser state of the trainable vectors is reset.

How it sits in memory. Each tensor with trainable entries is parametrized (torch.nn.utils.parametrize): the dense
tensor stays where it was as the frozen `original`, and a `SparseValues` module holds the trainable entries as one
1-D leaf `values` [n] (float32 on a half-precision base) with their flat `index` [n]. Every read of the weight goes
through `SparseWrite`, which writes the values into the dense storage in place and hands that storage on; its
backward returns grad.flatten()[index] only. No dense gradient is kept, and the optimiser's moments are [n] too.
The dense storage is a cache of the values: it is rewritten at every read, so copying into `values` (a checkpoint,
an EMA swap) takes effect at the next forward.

The reference and snapshots cost no model copy: `original` [n] keeps the base value of every entry ever trained,
and `reference()` writes those back for as long as it lasts; EMA snapshots (NFT, CRD) are vectors of the same size,
written in the same way by `use(name)`.

Re-masking. The authors ship two optimisers: `optim/adamw.py` (the default, memory-efficient one) rebuilds the
trainable vectors on the new mask alone and a fresh optimiser; `optim/adamw2.py` (dense moments) intersects the new
mask with the old one and keeps the optimiser state. The two masks are the same set: an entry outside the first mask
is never written, so it stays >= threshold and cannot enter a later one. What differs is the optimiser; this module
follows adamw.py (state reset), the only one of the two whose moments can stay as small as the trainable vectors.
Entries that leave the mask keep their trained values (`retired_*`) and still return to their originals inside
`reference()`. Unlike adamw.py, the gradient of the step at which the mask changes is not dropped: re-masking runs
right after that step.

Not copied: the authors' initialisation writes |P[mask]| (absolute values) back into the weights, which flips the
sign of every negative trained entry before training starts; here training starts from the pretrained values.
Their learning-rate default is 1e-3 * exp(-350 * threshold) (`sara_learning_rate`, 5e-4 at 2e-3).

Files: `save` writes the values and indices only (sara_weights.safetensors); `merge` writes them into a fresh copy of
the base model and saves a stock diffusers folder: `python -m diffrl.pipelines.sara merge <checkpoint> <out>`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from diffrl.runtime import derive_generator

SARA_FILE = "sara_weights.safetensors"
"""The file `SaraAdapter.save` writes: per tensor its trainable values and flat indices (and retired ones)."""
FORMAT = "diffrl-sara-1"
NUCLEAR_MIN_SIDE = 64
"""The nuclear-norm penalty draws among 2-D weights with min(shape) > 64 (the authors')."""
PENALTY_DRAW = 11
"""The purpose key of the penalty's draws: derive_generator(seed, step, PENALTY_DRAW)."""
FIELDS = (".retired_index", ".retired_values", ".index", ".values")
"""Suffixes of the keys of a SaRA file: <component>.<parameter name><suffix>."""


def sara_learning_rate(threshold: float) -> float:
    """The authors' default learning rate for a threshold: 1e-3 exp(-350 threshold) (5.0e-4 at 2e-3)."""
    return 1e-3 * math.exp(-350 * threshold)


class SparseWrite(torch.autograd.Function):
    """dense <- values at index, in place; the output is the dense storage, its gradient reaches `values` only.

    The write goes through `.data`, so the frozen tensor's version counter does not move: a graph that saved the
    weight stays valid across later forwards (which write the same values) and across reference / snapshot contexts
    (which restore the trained values when they end, before any backward)."""

    @staticmethod
    def forward(ctx, dense: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        dense.data.view(-1).index_copy_(0, index, values.to(dense.dtype))
        ctx.save_for_backward(index)
        ctx.values_dtype = values.dtype
        return dense.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return None, grad.reshape(-1).index_select(0, index).to(ctx.values_dtype), None  # [n]: no dense gradient kept


class SparseValues(nn.Module):
    """The parametrization of one dense tensor: its trainable entries `values` [n] at flat positions `index` [n].

    `original` [n] holds their base values; `retired_index` / `retired_values` / `retired_original` [m] the entries a
    re-mask took out of training (kept at their trained values). `override` [n + m], when set, is written over all of
    them instead (the reference, a snapshot), without gradient. Index and originals are plain attributes, not
    buffers: DDP would broadcast buffers at every forward."""

    def __init__(self, dense: torch.Tensor, index: torch.Tensor):
        super().__init__()
        flat = dense.detach().reshape(-1)
        self.values_dtype = torch.promote_types(dense.dtype, torch.float32)  # optimiser updates vanish in bf16
        self.index = index  # [n] int64
        self.original = flat[index].clone()  # [n] in the base dtype
        self.values = nn.Parameter(self.original.to(self.values_dtype, copy=True))  # [n] (never the originals' storage)
        self.retired_index = index.new_empty(0)  # [m]
        self.retired_original = flat.new_empty(0)  # [m]
        self.retired_values = torch.empty(0, dtype=self.values_dtype, device=flat.device)  # [m]
        self.override: torch.Tensor | None = None  # [n + m] in the base dtype

    def union_index(self) -> torch.Tensor:
        """Every entry ever trained: trainable, then retired. -> [n + m]"""
        return torch.cat([self.index, self.retired_index])

    def current(self) -> torch.Tensor:
        """The trained values of every entry ever trained, in union_index order (no gradient). -> [n + m]"""
        if self.retired_index.numel() == 0:
            return self.values.detach()
        return torch.cat([self.values.detach(), self.retired_values])

    def originals(self) -> torch.Tensor:
        """The base values in union_index order. -> [n + m]"""
        return torch.cat([self.original, self.retired_original])

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        flat = dense.data.view(-1)  # .data: see SparseWrite
        if self.override is not None:
            flat.index_copy_(0, self.union_index(), self.override)
            return dense
        if self.retired_index.numel():
            flat.index_copy_(0, self.retired_index, self.retired_values.to(dense.dtype))
        if torch.is_grad_enabled():
            return SparseWrite.apply(dense, self.values, self.index)
        flat.index_copy_(0, self.index, self.values.detach().to(dense.dtype))
        return dense


@dataclass
class SparseTensor:
    """One parametrized tensor: where it lives and its SparseValues."""

    component: str
    """The pipeline attribute of its network ("transformer", "unet", "transformer_2")."""
    name: str
    """Its parameter name in that network (the key of the network's state dict)."""
    module: nn.Module
    attr: str
    sparse: SparseValues

    @property
    def dense(self) -> nn.Parameter:
        """The frozen dense tensor (it holds the trained values once a forward or sync() wrote them)."""
        return self.module.parametrizations[self.attr].original

    @property
    def key(self) -> str:
        return f"{self.component}.{self.name}"


def _locate(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry of `new` [k], its position in `old` [j] and whether it is there: (where [k], found [k] bool)."""
    if old.numel() == 0:
        return torch.zeros_like(new), torch.zeros_like(new, dtype=torch.bool)
    ordered, perm = old.sort()
    pos = torch.searchsorted(ordered, new).clamp(max=old.numel() - 1)
    return perm[pos], ordered[pos] == new


class SaraAdapter:
    """SaRA over the trained networks ({component: module}); freezes them and parametrizes every tensor with entries
    below `threshold`. Hooks for the optimiser step: `before_step()` (the nuclear-norm gradient) and
    `after_step(optimizer)` (counts steps, re-masks once after `remask_step`). Build it once the networks are on their
    device: indices and originals are plain tensors, which a later .to() does not move."""

    def __init__(self, networks: dict[str, nn.Module], threshold: float = 2e-3, lambda_rank: float = 5e-4,
                 remask_step: int | None = None, seed: int = 0):
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold, self.lambda_rank, self.remask_step, self.seed = threshold, lambda_rank, remask_step, seed
        self.steps = 0
        """Optimiser steps taken (the penalty's draws and the re-mask are functions of it; checkpointed)."""
        self.last_penalty = 0.0
        """lambda_rank ||P * M||_* of the weight the last step drew (0 when none is eligible)."""
        self.snapshots: dict[str, list[torch.Tensor]] = {}
        self.tensors: list[SparseTensor] = []
        with torch.no_grad():
            for component, net in networks.items():
                net.requires_grad_(False)
                uses: dict[int, int] = {}
                for _, p in net.named_parameters(remove_duplicate=False):
                    uses[id(p)] = uses.get(id(p), 0) + 1
                for name, param in list(net.named_parameters()):
                    if not param.is_floating_point() or uses[id(param)] > 1:  # a shared tensor: one owner would not see it
                        continue
                    index = (param.detach().abs() < threshold).reshape(-1).nonzero().squeeze(1)  # [n]
                    if index.numel() == 0:
                        continue
                    if not param.is_contiguous():
                        raise ValueError(f"{component}.{name} is not contiguous; SaRA writes into its flat storage")
                    module_name, _, attr = name.rpartition(".")
                    module = net.get_submodule(module_name)
                    sparse = SparseValues(param, index)
                    parametrize.register_parametrization(module, attr, sparse)
                    self.tensors.append(SparseTensor(component, name, module, attr, sparse))
        if not self.tensors:
            raise ValueError(f"no entry of the trained networks is below the SaRA threshold {threshold}")

    # ---- what trains ---------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The trainable vectors, one per tensor, in a fixed order."""
        return [t.sparse.values for t in self.tensors]

    @property
    def num_trainable(self) -> int:
        return sum(t.sparse.values.numel() for t in self.tensors)

    @property
    def num_dense(self) -> int:
        """Entries of the parametrized tensors (those with at least one trainable entry)."""
        return sum(t.dense.numel() for t in self.tensors)

    @torch.no_grad()
    def sync(self) -> None:
        """Write the trained values into the dense tensors (a forward does it too): for code reading them directly."""
        for t in self.tensors:
            t.sparse(t.dense)

    # ---- the reference and snapshots: other values written over the same entries -------------------------------
    @contextlib.contextmanager
    def overridden(self, vectors: list[torch.Tensor]) -> Iterator[None]:
        """Inside, every tensor holds `vectors` (one [n + m] each, union_index order) instead of its trained values;
        on exit the previous values are back in the dense storage (before any backward of a graph made outside)."""
        previous = [t.sparse.override for t in self.tensors]
        with torch.no_grad():
            for t, v in zip(self.tensors, vectors, strict=True):
                t.sparse.override = v.to(t.dense.dtype)
                t.sparse(t.dense)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, v in zip(self.tensors, previous):
                    t.sparse.override = v
                    t.sparse(t.dense)

    def reference(self) -> contextlib.AbstractContextManager:
        """The base model: every entry ever trained back at its original value (no copy of the model)."""
        return self.overridden([t.sparse.originals() for t in self.tensors])

    def use(self, name: str) -> contextlib.AbstractContextManager:
        """Run with snapshot `name` instead of the trained values (use under torch.no_grad())."""
        return self.overridden(self.snapshot(name))

    def current(self) -> list[torch.Tensor]:
        """The trained values of every entry ever trained, per tensor. -> [n + m] each"""
        return [t.sparse.current() for t in self.tensors]

    def add_snapshot(self, name: str) -> None:
        """A snapshot `name`: a copy of the current values, one vector per tensor (what an EMA of them starts from)."""
        if name in self.snapshots:
            raise ValueError(f"SaRA snapshot {name!r} already exists")
        self.snapshots[name] = [v.clone() for v in self.current()]

    def snapshot(self, name: str) -> list[torch.Tensor]:
        if name not in self.snapshots:
            raise KeyError(f"no SaRA snapshot named {name!r} (have: {', '.join(self.snapshots) or 'none'})")
        return self.snapshots[name]

    # ---- the nuclear-norm penalty -------------------------------------------------------------------
    def eligible(self) -> list[SparseTensor]:
        """The tensors the penalty draws from: 2-D with min(shape) > 64 and trainable entries (a re-mask may leave
        none; the norm of a zero matrix has no gradient)."""
        return [t for t in self.tensors
                if t.dense.ndim == 2 and min(t.dense.shape) > NUCLEAR_MIN_SIDE and t.sparse.values.numel()]

    @torch.no_grad()
    def add_nuclear_gradient(self, lambda_rank: float, generator: torch.Generator) -> float:
        """Add the gradient of lambda_rank ||P * M||_* to `values.grad` of one eligible tensor drawn with `generator`;
        returns the penalty's value (0 when no tensor is eligible)."""
        candidates = self.eligible()
        if not candidates or lambda_rank == 0:
            return 0.0
        t = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
        sp = t.sparse
        masked = torch.zeros(t.dense.numel(), dtype=sp.values_dtype, device=sp.values.device)  # [rows * cols]
        masked[sp.index] = sp.values.detach()
        U, S, Vh = torch.linalg.svd(masked.view(t.dense.shape), full_matrices=False)  # [r, k], [k], [k, c]
        # d||X||_* / dX = U V^T over the non-zero singular values (the smallest-norm subgradient when X is singular)
        keep = S > S.max() * max(t.dense.shape) * torch.finfo(S.dtype).eps  # [k] the numerically non-zero ones
        grad = (U[:, keep] @ Vh[keep]).reshape(-1)[sp.index] * lambda_rank  # [n]
        sp.values.grad = grad if sp.values.grad is None else sp.values.grad.add_(grad.to(sp.values.grad.dtype))
        return lambda_rank * float(S.sum())

    def before_step(self) -> None:
        """diffrl.optim.GuardedStep's hook right before optimizer.step(): the penalty of the weight drawn for this
        step, a function of (seed, steps) so a resumed run draws the same."""
        if self.lambda_rank > 0:
            self.last_penalty = self.add_nuclear_gradient(self.lambda_rank, derive_generator(self.seed, self.steps, PENALTY_DRAW))

    def after_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """GuardedStep's hook after a step was taken: count it, and re-mask (resetting the optimiser state of the
        trainable vectors) once `remask_step` steps are done. Returns whether it re-masked."""
        self.steps += 1
        if self.remask_step is None or self.steps != self.remask_step:
            return False
        replace_parameters(optimizer, self.remask())
        reset_optimizer_state(optimizer, self.parameters())
        return True

    # ---- re-masking and layouts ----------------------------------------------------------------------
    @torch.no_grad()
    def remask(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Recompute the mask on the current weights (|P| < threshold): entries leaving it keep their trained values
        (retired), entries joining it start from their current values. Returns (old, new) for every trainable vector
        that changed size (a new Parameter: autograd keeps a leaf's shape); the optimiser must hold the new ones and
        forget the state of all (after_step does both)."""
        self._no_override("remask")
        self.sync()
        replaced = []
        for i, t in enumerate(self.tensors):
            sp, flat = t.sparse, t.dense.detach().view(-1)
            index = (flat.abs() < self.threshold).nonzero().squeeze(1)  # [n'] on the current weights
            union, current = sp.union_index(), sp.current()  # [n + m]
            where, found = _locate(union, index)
            values = torch.where(found, current[where], flat[index].to(sp.values_dtype))  # [n']
            leaving = ~torch.isin(union, index)  # [n + m]
            replaced += self._relayout(i, index, values, union[leaving], current[leaving])
        return replaced

    def _relayout(self, i: int, index: torch.Tensor, values: torch.Tensor, retired_index: torch.Tensor,
                  retired_values: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Give tensor i a new layout (trainable [n'], retired [m']); originals and snapshots follow their entries:
        an entry never trained before has its base value in the dense tensor, and every snapshot holds that too.
        Returns [(old, new)] when the trainable vector is a new Parameter (its size changed), else []."""
        t = self.tensors[i]
        sp, flat = t.sparse, t.dense.detach().view(-1)
        old_union, new_union = sp.union_index(), torch.cat([index, retired_index])  # [n + m], [n' + m']
        where, found = _locate(old_union, new_union)
        fresh = flat[new_union]  # [n' + m'] right only where not found: never written, so the base value
        originals = torch.where(found, sp.originals()[where] if old_union.numel() else fresh, fresh)
        for vectors in self.snapshots.values():
            old = vectors[i]
            vectors[i] = torch.where(found, old[where] if old.numel() else fresh.to(old.dtype), fresh.to(old.dtype))
        n = index.numel()
        sp.index, sp.retired_index = index, retired_index
        sp.original, sp.retired_original = originals[:n].clone(), originals[n:].clone()
        old = sp.values
        if values.shape == old.shape:  # the same Parameter (DDP and the optimiser hold it)
            old.copy_(values)
            old.grad = None
            replaced = []
        else:  # a leaf's shape is fixed in autograd's records: resizing .data breaks its next backward
            sp.values = nn.Parameter(values.to(sp.values_dtype, copy=True))
            replaced = [(old, sp.values)]
        sp.retired_values = retired_values.to(sp.values_dtype).clone()
        sp(t.dense)  # the dense storage holds the new layout's values
        return replaced

    def _no_override(self, what: str) -> None:
        if any(t.sparse.override is not None for t in self.tensors):
            raise RuntimeError(f"SaRA {what} inside a reference() / use() context")

    # ---- files -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per tensor "<component>.<name>.index" / ".values" (trainable) and, after a re-mask, ".retired_index" /
        ".retired_values": the values and indices only."""
        out = {}
        for t in self.tensors:
            sp = t.sparse
            out[f"{t.key}.index"], out[f"{t.key}.values"] = sp.index, sp.values.detach()
            if sp.retired_index.numel():
                out[f"{t.key}.retired_index"], out[f"{t.key}.retired_values"] = sp.retired_index, sp.retired_values
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The layout and values of a SaRA file (state_dict's keys); a re-masked run's layout replaces the current one.
        Returns (old, new) for every trainable vector that is a new Parameter (see remask)."""
        self._no_override("load")
        known = {t.key: t for t in self.tensors}
        groups = split_keys(tensors)
        unknown = sorted(set(groups) - set(known))
        missing = sorted(set(known) - set(groups))
        if unknown or missing:
            raise ValueError(f"the SaRA weights do not fit this model: {len(missing)} of its tensors missing (e.g. "
                             f"{missing[:2]}), {len(unknown)} unknown (e.g. {unknown[:2]}); made with the same model and "
                             "threshold?")
        replaced = []
        for i, t in enumerate(self.tensors):
            key, fields = t.key, groups[t.key]
            device, numel = t.dense.device, t.dense.numel()
            index = fields["index"].to(device, torch.int64)
            retired = fields.get("retired_index", index.new_empty(0)).to(device, torch.int64)
            values = fields["values"].to(device)
            retired_values = fields.get("retired_values", values.new_empty(0)).to(device)
            if index.shape != values.shape or retired.shape != retired_values.shape:
                raise ValueError(f"{key}: {index.numel()} indices for {values.numel()} values")
            both = torch.cat([index, retired])
            if both.numel() and (both.min() < 0 or both.max() >= numel or both.unique().numel() != both.numel()):
                raise ValueError(f"{key}: indices out of range or repeated for a tensor of {numel} entries")
            replaced += self._relayout(i, index, values, retired, retired_values)
        return replaced

    def save(self, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write sara_weights.safetensors (values and indices only) into `folder`; returns the file."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "threshold": repr(self.threshold), **{k: str(v) for k, v in (metadata or {}).items()}}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, folder / SARA_FILE, metadata=meta)
        return folder / SARA_FILE

    def load(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore what `save` wrote (a folder holding sara_weights.safetensors, the file, or a checkpoint folder);
        `optimizer` then holds the trainable vectors of the loaded layout (load its state after this)."""
        tensors, meta = read_sara(path)
        saved = float(meta.get("threshold", self.threshold))
        if saved != self.threshold:
            raise ValueError(f"the SaRA weights in {path} were trained with threshold {saved}, this adapter has {self.threshold}")
        replaced = self.load_state_dict(tensors)
        if optimizer is not None:
            replace_parameters(optimizer, replaced)

    # ---- the run's state (checkpointed beside the optimiser) ---------------------------------------------
    def state_tensors(self, prefix: str = "sara") -> dict[str, torch.Tensor]:
        return {f"{prefix}.steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "sara") -> None:
        key = f"{prefix}.steps"
        if key not in tensors:
            raise ValueError(f"checkpoint lacks {key}: was it written by a SaRA run?")
        self.steps = int(tensors[key])

    def metrics(self) -> dict[str, float]:
        return {"sara_trainable": self.num_trainable, "sara_rank_penalty": self.last_penalty}


def replace_parameters(optimizer: torch.optim.Optimizer, replaced: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Put each new Parameter where the optimiser held the old one (its state dropped); an accelerate-wrapped
    optimiser too."""
    inner = getattr(optimizer, "optimizer", optimizer)
    new_of = {id(old): new for old, new in replaced}
    for group in inner.param_groups:
        group["params"] = [new_of.get(id(p), p) for p in group["params"]]
    for old, _ in replaced:
        inner.state.pop(old, None)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Forget the optimiser state (moments, step count) of `params` (an accelerate-wrapped optimiser too)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for p in params:
        inner.state.pop(p, None)


def split_keys(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A SaRA file's tensors by "<component>.<name>" -> {"index", "values", "retired_index", "retired_values"}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in FIELDS if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{key!r} is not a SaRA tensor (<component>.<parameter>{'|'.join(FIELDS)})")
        groups.setdefault(key[: -len(suffix)], {})[suffix[1:]] = value
    for key, fields in groups.items():
        if "index" not in fields or "values" not in fields:
            raise ValueError(f"SaRA tensor {key} lacks its {'index' if 'index' not in fields else 'values'}")
    return groups


def sara_file(path: str | Path) -> Path:
    """The SaRA file of `path`: the file itself, a folder holding it, or a checkpoint folder (its sara/)."""
    path = Path(path)
    for candidate in (path, path / SARA_FILE, path / "sara" / SARA_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no SaRA weights at {path}: expected {SARA_FILE} there or in its sara/ folder")


def read_sara(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a SaRA file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = sara_file(path)
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a diffrl SaRA file (format {meta.get('format')!r}, expected {FORMAT})")
    return load_file(file), meta


@torch.no_grad()
def apply_sara(networks: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> int:
    """Write a SaRA file's values into plain networks ({component: module}, no adapter): the merged model. Returns
    the entries written."""
    written = 0
    for key, fields in split_keys(tensors).items():
        component, _, name = key.partition(".")
        if component not in networks:
            raise ValueError(f"the SaRA weights train '{component}', this model's trained networks are {', '.join(networks)}")
        try:
            param = networks[component].get_parameter(name)
        except AttributeError:
            raise ValueError(f"the SaRA weights hold {key}, which this model's {component} lacks") from None
        flat = param.data.view(-1)
        for index, values in ((fields["index"], fields["values"]),
                              (fields.get("retired_index"), fields.get("retired_values"))):
            if index is not None and index.numel():
                flat.index_copy_(0, index.to(flat.device, torch.int64), values.to(flat.device, flat.dtype))
                written += index.numel()
    return written


def merge(checkpoint: str | Path, out: str | Path, base: str | None = None, denoiser_only: bool = False) -> Path:
    """The SaRA weights of a diffrl checkpoint (or a run folder: its newest checkpoint) merged into the base model
    its state.json names (`base`: another path to the same model), saved as a stock diffusers pipeline folder at
    `out` (`denoiser_only`: only the trained networks, each as a model folder out/<component>)."""
    from diffrl.checkpoint import latest_checkpoint
    from diffrl.pipelines.registry import load_policy, policy_class, resolve_family
    from diffrl.runtime import DTYPES

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose a new output folder")
    folder = latest_checkpoint(checkpoint)
    state = json.loads((folder / "state.json").read_text())
    config = state.get("config") or {}
    policy_cfg = config.get("policy") or {}
    model = base or config.get("model")
    if model is None:
        raise ValueError(f"{folder}/state.json names no model: pass the base model (--base)")
    tensors, _ = read_sara(folder)
    family = resolve_family(model, policy_cfg.get("family"))
    sizes = {} if policy_class(family).sample_kind == "motion" else {
        k: policy_cfg.get(k) for k in ("resolution", "height", "width")}
    if policy_cfg.get("num_frames") is not None:
        sizes["num_frames"] = policy_cfg["num_frames"]
    policy = load_policy(model, family=family, torch_dtype=DTYPES[policy_cfg.get("dtype", "float32")], **sizes)
    if policy_cfg.get("wan_experts", "high") != "high":
        policy.set_trained_experts(policy_cfg["wan_experts"])
    networks = policy.trained_networks()
    apply_sara(networks, tensors)
    if denoiser_only:
        for component, net in networks.items():
            net.save_pretrained(out / component, safe_serialization=True)
    else:
        policy.pipeline().save_pretrained(out, safe_serialization=True)
    return out


def merge_usage(checkpoint: str = "path/to/checkpoint") -> str:
    """The commands that turn a SaRA checkpoint into a stock diffusers pipeline (a model card's usage lines)."""
    return (f"# diffrl sara-merge {checkpoint} merged/   (or: python -m diffrl.pipelines.sara merge ...)\n"
            "from diffusers import DiffusionPipeline\n"
            'pipe = DiffusionPipeline.from_pretrained("merged/")')


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The merge command's arguments (`python -m diffrl.pipelines.sara merge`, `diffrl sara-merge`)."""
    parser.add_argument("checkpoint", help="a checkpoint folder (<output_dir>/checkpoints/iter_N) or a run's output_dir")
    parser.add_argument("out", help="a new folder for the merged diffusers pipeline")
    parser.add_argument("--base", help="the base model, when its path differs from the one the run's config names")
    parser.add_argument("--denoiser-only", action="store_true",
                        help="write only the trained network(s), each a diffusers model folder out/<component>")


def run_merge(args: argparse.Namespace, prog: str = "python -m diffrl.pipelines.sara merge") -> int:
    """Run the merge command: 0, or 2 with one line naming what is wrong."""
    import sys

    try:
        path = merge(args.checkpoint, args.out, base=args.base, denoiser_only=args.denoiser_only)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(f"merged the SaRA weights of {args.checkpoint} into {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffrl.pipelines.sara",
                                     description="SaRA weights of a diffrl checkpoint as a stock diffusers folder")
    sub = parser.add_subparsers(dest="command", required=True)
    add_merge_arguments(sub.add_parser("merge", help="write the base model with the trained SaRA values in place"))
    return run_merge(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
