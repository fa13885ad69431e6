"""Tiny random-weight model builders for tests and smoke runs (no network, no weights).

Sizes follow diffusers' own pipeline tests (hidden 32, one or two layers, 32x32 images), so a
4-step sample takes milliseconds on a CPU. Tokenizers come from the package's assets
(built by assets/build_tokenizers.py). The SD (UNet) builder lives in `diffrl.pipelines.sd`.
"""

from __future__ import annotations

import importlib.resources
import pathlib

TOKENIZERS = ("clip", "t5")


def tokenizer_path(name: str) -> pathlib.Path:
    """Folder of a shipped tiny tokenizer: "clip" (CLIP byte-level BPE) or "t5" (T5 unigram)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tiny tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")
    path = pathlib.Path(str(importlib.resources.files("diffrl.assets") / "tokenizers" / name))
    if not path.is_dir():
        raise FileNotFoundError(
            f"tiny tokenizer {name!r} not found at {path}; rebuild it with `python assets/build_tokenizers.py` "
            "or reinstall diffrl (assets/tokenizers/** ships as package data)."
        )
    return path


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_path("clip"))


def t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(tokenizer_path("t5"))
