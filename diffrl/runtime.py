"""Runtime helpers every layer may use: dtype names, seeded generators, memory probes. Imports only torch."""

from __future__ import annotations

import math

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}
"""Config / command-line dtype names -> torch dtypes."""


def derive_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (seed, iteration, process, purpose): every random draw of a
    run is a function of such a tuple, so a resumed run draws exactly what the original would have."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: torch.cuda.max_memory_allocated on CUDA, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def import_object(spec: str, what: str = "object"):
    """The object named by "package.module:attribute", importable from the installed packages or from the
    working directory (as `python -m` would find it: no PYTHONPATH needed). ValueError says what failed."""
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'package.module:attribute'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({exc}); looked in the working "
                         f"directory {cwd} and the installed packages") from None
    finally:
        if added:
            sys.path.remove(cwd)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"{what} {spec!r}: module {module_name!r} ({module.__file__}) has no attribute {attr!r}") from None
    return obj


def entry_point_objects(group: str) -> dict:
    """name -> entry point (not yet loaded) of the installed plugins of `group` (importlib.metadata)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


# ---- keeping the host off the device's critical path ----------------------------------------------
# A CUDA kernel launch returns at once, so the host queues work ahead of the device. Anything that reads a device
# value on the host (.item(), .tolist(), float(t), bool(t), .cpu(), boolean-mask indexing) or copies a pageable
# CPU tensor to the device (a plain .to(device)) makes the host wait until the device has caught up, and the device
# then idles while the host launches the next kernels. The update loops keep their per-step values on the device
# with these helpers and read them back once per update.

HOST_CHECK_DEVICES: tuple[str, ...] = ("cpu", "mps")
"""Device types whose `check_on_device` conditions are read on the host (a CPU read costs nothing; MPS has no
device-side assert). Elsewhere (CUDA) the check is a device-side assert."""


def check_on_device(condition: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless every element of `condition` (a bool tensor) is true. On CUDA the check is
    queued on the device (torch._assert_async): no host sync; a failure stops the process at the next
    synchronisation with a device-side assert naming `message`."""
    if condition.device.type in HOST_CHECK_DEVICES:
        if not bool(condition.all()):
            raise ValueError(message)
        return
    torch._assert_async(condition.all(), message)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`. A CPU tensor bound for CUDA is copied from pinned memory with non_blocking=True: a plain
    .to() from pageable memory waits for the device to finish its queued work before copying."""
    device = torch.device(device)
    if tensor.device == device or (device.index is None and tensor.device.type == device.type):
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def metric_dtype(device: torch.device) -> torch.dtype:
    """float64 (float32 on MPS, which has none): a float32 metric widened to it and summed in order gives exactly
    the Python-float sum of its .item() values."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def wide(value: torch.Tensor) -> torch.Tensor:
    """A detached tensor in `metric_dtype` of its device (a float32 value exactly; no host sync)."""
    return value.detach().to(metric_dtype(value.device))


class DeviceMetrics:
    """Running sums (and extremes) of per-step metrics, kept where they were computed.

    `add` with a tensor queues a device addition and never waits for the device; `means()` reads every value back in
    one transfer per device (one host sync per update instead of one per metric and step). Tensor values are summed
    in `metric_dtype` (float64), in the order they are added: the same sum, bit for bit, as adding their .item()
    values as Python floats. Python floats (a gradient norm the optimiser step already read) are summed on the host.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, torch.Tensor | int] = {}
        self.extremes: dict[str, torch.Tensor | float] = {}

    def add(self, key: str, value: torch.Tensor | float, scale: float = 1.0, only_finite: bool = False) -> None:
        """Add `value` (a 0-d tensor or a float), times `scale` after widening, to `key`'s sum; `only_finite`: a
        NaN / inf value is left out of both the sum and the count (on the device, without reading it)."""
        if torch.is_tensor(value):
            value = wide(value) * scale if scale != 1.0 else wide(value)
            count: torch.Tensor | int = 1
            if only_finite:
                finite = torch.isfinite(value)
                value, count = torch.where(finite, value, torch.zeros_like(value)), finite.to(value.dtype)
        else:
            value = float(value) * scale
            count = 1
            if only_finite and not math.isfinite(value):
                value, count = 0.0, 0
        if key in self.sums:
            self.sums[key] = self.sums[key] + value  # float + tensor is a device addition: no read
            self.counts[key] = self.counts[key] + count
        else:
            self.sums[key], self.counts[key] = value, count

    def maximum(self, key: str, value: torch.Tensor | float) -> None:
        """Keep the largest `value` seen for `key` (NaN propagates)."""
        self._extreme(key, value, torch.maximum, max)

    def minimum(self, key: str, value: torch.Tensor | float) -> None:
        """Keep the smallest `value` seen for `key` (NaN propagates)."""
        self._extreme(key, value, torch.minimum, min)

    def _extreme(self, key, value, pick, pick_host) -> None:
        value = wide(value) if torch.is_tensor(value) else float(value)
        old = self.extremes.get(key)
        if old is None:
            self.extremes[key] = value
        elif torch.is_tensor(old) or torch.is_tensor(value):
            old_t = old if torch.is_tensor(old) else torch.full_like(value, old)
            new_t = value if torch.is_tensor(value) else torch.full_like(old, value)
            self.extremes[key] = pick(old_t, new_t)
        else:
            self.extremes[key] = pick_host(old, value)

    def mean_tensors(self) -> dict[str, torch.Tensor | float]:
        """Each mean (sum / count) and extreme, still on the device (no sync); a key with count 0 is NaN."""
        out: dict[str, torch.Tensor | float] = {}
        for key, total in self.sums.items():
            count = self.counts[key]
            if torch.is_tensor(total) or torch.is_tensor(count):
                out[key] = total / count
            else:
                out[key] = total / count if count else math.nan
        out.update(self.extremes)
        return out

    def means(self) -> dict[str, float]:
        """Each mean (sum / count) and extreme as a Python float, read back in one transfer per device; keys whose
        values were all left out (`only_finite`) are dropped."""
        values: dict[str, torch.Tensor | float] = {**self.sums, **{f"\0count\0{k}": c for k, c in self.counts.items()},
                                                   **{f"\0ext\0{k}": v for k, v in self.extremes.items()}}
        host = read_back(values)
        out = {}
        for key in self.sums:
            count = host[f"\0count\0{key}"]
            if count:
                out[key] = host[key] / count
        out.update({k: host[f"\0ext\0{k}"] for k in self.extremes})
        return out


def read_back(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Python floats of 0-d tensors (and floats, as they are), with one device-to-host transfer per device."""
    out = {k: float(v) for k, v in values.items() if not torch.is_tensor(v)}
    by_device: dict[torch.device, list[str]] = {}
    for key, value in values.items():
        if torch.is_tensor(value):
            by_device.setdefault(value.device, []).append(key)
    for device, keys in by_device.items():
        dtype = metric_dtype(device)
        stacked = torch.stack([values[k].detach().reshape(()).to(dtype) for k in keys])  # [K]
        out.update(zip(keys, stacked.tolist()))
    return out
