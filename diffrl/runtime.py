"""Runtime helpers every layer may use: dtype names, seeded generators, memory probes. Imports only torch."""

from __future__ import annotations

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
