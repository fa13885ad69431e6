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
