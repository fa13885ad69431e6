"""The verifiable toy task (small-number arithmetic) and LM prompt datasets.

A problem is a prompt string ("12+7=") with metadata ({"answer": "19", ...}); a completion is whatever
the model writes after the prompt, up to its end-of-sequence token. The shipped sets
(assets/lm/arith_{train,eval}.jsonl, written by `diffrl pretrain-toy-lm`) are disjoint: the evaluation
problems are held out from pretraining and from RL prompts, so accuracy on them measures what the
model learned, not what it memorised.
"""

from __future__ import annotations

import importlib.resources
import json
import random
from pathlib import Path

from diffrl.data import PromptSet, load_prompts

__all__ = [
    "ARITH_CHARS",
    "LMDataset",
    "arithmetic_problems",
    "builtin_lm_datasets",
    "load_lm_dataset",
    "split_arithmetic",
    "write_jsonl",
]

ARITH_CHARS = "0123456789+-="
"""Every character an arithmetic prompt or answer uses (the toy tokenizer's vocabulary)."""


LMDataset = PromptSet
"""Prompts and one metadata dict per prompt (the reward's ground truth, e.g. {"answer": "19"})."""


def arithmetic_problems(max_operand: int = 99, ops: str = "+-") -> list[dict]:
    """Every problem `a op b =` with 0 <= a, b <= max_operand, in a fixed order.

    Subtraction keeps a >= b, so every answer is a non-negative integer written in decimal.
    """
    problems = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and b > a:
                    continue
                value = a + b if op == "+" else a - b
                problems.append({"prompt": f"{a}{op}{b}=", "answer": str(value), "op": op})
    return problems


def split_arithmetic(seed: int = 0, n_eval: int = 500, n_rl: int = 2000, max_operand: int = 99,
                     ops: str = "+-") -> tuple[list[dict], list[dict], list[dict]]:
    """(pretrain pool, RL train, held-out eval): a seeded shuffle of every problem cut into three
    disjoint parts. Pretraining draws its examples from the first part only."""
    problems = arithmetic_problems(max_operand, ops)
    random.Random(seed).shuffle(problems)
    if n_eval + n_rl >= len(problems):
        raise ValueError(f"n_eval + n_rl ({n_eval + n_rl}) must leave problems for pretraining (of {len(problems)})")
    evaluation, rl = problems[:n_eval], problems[n_eval : n_eval + n_rl]
    return problems[n_eval + n_rl :], rl, evaluation


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _assets_lm() -> Path:
    return Path(str(importlib.resources.files("diffrl.assets") / "lm"))


def builtin_lm_datasets() -> list[str]:
    root = _assets_lm()
    return sorted(p.stem for p in root.glob("*.jsonl")) if root.is_dir() else []


def resolve_lm_dataset(spec: str) -> Path:
    """"builtin:<name>" (assets/lm/<name>.jsonl) or a path to a .jsonl file -> its path (which exists)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = _assets_lm() / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no built-in LM dataset '{name}'; available: {', '.join(builtin_lm_datasets())}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"LM dataset not found: {path}")
    if path.suffix != ".jsonl":
        raise ValueError(f"LM dataset {path} must be a .jsonl file with a \"prompt\" field per line")
    return path


def load_lm_dataset(spec: str) -> LMDataset:
    """A .jsonl file (or "builtin:<name>") with a "prompt" field per line; each whole record is the metadata."""
    return load_prompts(str(resolve_lm_dataset(spec)))
