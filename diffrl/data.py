"""Prompt sources: built-in lists, plain text files, GenEval-style jsonl; deterministic per-iteration draws."""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.prompts)


def builtin_prompt_sets() -> list[str]:
    root = importlib.resources.files("diffrl.assets") / "prompts"
    return sorted(p.name.rsplit(".", 1)[0] for p in root.iterdir() if p.name.endswith((".txt", ".jsonl")))


def load_prompts(spec: str) -> PromptSet:
    """"builtin:<name>", a .txt file (one prompt a line) or a .jsonl file with a "prompt" field per line."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        root = importlib.resources.files("diffrl.assets") / "prompts"
        for ext in (".txt", ".jsonl"):
            candidate = root / f"{name}{ext}"
            if candidate.is_file():
                return _parse(candidate.read_text(), ext, spec)
        raise FileNotFoundError(f"no built-in prompt set '{name}'; available: {', '.join(builtin_prompt_sets())}")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return _parse(path.read_text(), path.suffix, spec)


def _parse(text: str, ext: str, source: str) -> PromptSet:
    prompts, metadata = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if ext == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}:{n}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                got = f"its 'prompt' is {record['prompt']!r}" if isinstance(record, dict) and "prompt" in record else \
                    f"got {line.strip()[:60]!r}"
                raise ValueError(f"{source}:{n}: a jsonl prompt record needs a 'prompt' field holding a string; {got}")
            prompts.append(record["prompt"])
            metadata.append(record)
        else:
            prompts.append(line.strip())
            metadata.append({"prompt": line.strip()})
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return PromptSet(prompts, metadata)


def draw_prompt_indices(num_prompts: int, per_iteration: int, iteration: int, seed: int) -> torch.Tensor:
    """Indices of the prompts of one iteration (all processes), walking seeded epoch permutations.

    Depends only on (seed, iteration), so a resumed run draws exactly what the original would have.
    """
    start = iteration * per_iteration
    out = []
    while len(out) < per_iteration:
        epoch, offset = divmod(start + len(out), num_prompts)
        perm = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(per_iteration - len(out), num_prompts - offset)
        out.extend(perm[offset : offset + take].tolist())
    return torch.tensor(out, dtype=torch.long)
