"""Build the tiny tokenizers shipped in assets/tokenizers/ (offline, milliseconds, deterministic).

    python assets/build_tokenizers.py

- clip/: a CLIP-style byte-level BPE (lowercase, `</w>` word ends, <|startoftext|> / <|endoftext|>),
  loadable with `transformers.CLIPTokenizer.from_pretrained`.
- t5/: a T5-style unigram (<pad>=0, </s>=1, <unk>=2, metaspace), loadable with `T5TokenizerFast`.

Both are trained on a small caption corpus written here, so prompts used in tests and toy runs
tokenize into real sub-words instead of a sea of unknowns. They are for tiny random models only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent / "tokenizers"

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray", "cyan"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cube", "sphere", "ring", "hexagon", "cross"]
OBJECTS = [
    "cat", "dog", "horse", "bird", "car", "bicycle", "train", "boat", "apple", "banana", "cup", "chair",
    "table", "clock", "book", "tree", "flower", "house", "bench", "umbrella", "kite", "pizza", "cake",
    "laptop", "phone", "bottle", "vase", "giraffe", "elephant", "zebra", "sheep", "cow", "bear", "person",
    "teddy bear", "backpack", "suitcase", "toothbrush", "motorcycle", "airplane", "bus", "truck",
]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "a", "an", "1", "2", "3", "4"]
POSITIONS = [
    "to the left of", "to the right of", "above", "below", "on top of", "under", "next to", "behind",
    "in front of", "near", "inside", "beside",
]
PLACES = [
    "on a white background", "on a black background", "in a field", "on the beach", "in a kitchen",
    "in the city at night", "under a cloudy sky", "in the snow", "on a wooden table", "in a forest",
    "at sunset", "in a living room", "by the river", "on a busy street", "in the mountains",
]
STYLES = [
    "a photo of", "a painting of", "a drawing of", "a close-up photo of", "a watercolor of", "a sketch of",
    "a 3d render of", "an illustration of", "a picture of", "a blurry photo of", "a high quality photo of",
]
ADJECTIVES = ["small", "large", "tiny", "big", "old", "new", "shiny", "fluffy", "wooden", "metal", "bright", "dark"]
FIXED = [
    "A cat sitting on a windowsill in the morning light.",
    "Two dogs playing with a ball in the park!",
    "The quick brown fox jumps over the lazy dog.",
    "An astronaut riding a horse on the moon, digital art.",
    "It's a sunny day; the sky is clear and blue.",
    "There are 3 red apples and 2 green pears on the plate.",
    "A bowl of soup that looks like a monster, knitted out of wool.",
    "A stop sign next to a fire hydrant, photographed from below.",
    "Don't forget: we'll meet you've seen they're here, I'm sure.",
    "A robot painting a portrait, 4k, highly detailed, trending.",
]


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = list(FIXED)
    for _ in range(n):
        kind = rng.randrange(5)
        color, shape, obj = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(OBJECTS)
        if kind == 0:
            lines.append(f"{rng.choice(STYLES)} {rng.choice(NUMBERS)} {color} {obj}s {rng.choice(PLACES)}")
        elif kind == 1:
            lines.append(f"a {color} {shape} {rng.choice(POSITIONS)} a {rng.choice(COLORS)} {rng.choice(SHAPES)}")
        elif kind == 2:
            lines.append(f"{rng.choice(NUMBERS)} {rng.choice(ADJECTIVES)} {obj} {rng.choice(POSITIONS)} the {rng.choice(OBJECTS)}")
        elif kind == 3:
            lines.append(f"{rng.choice(STYLES)} a {rng.choice(ADJECTIVES)} {color} {obj}, {rng.choice(PLACES)}.")
        else:
            lines.append(f"{rng.choice(NUMBERS)} {color} {shape}s and {rng.choice(NUMBERS)} {rng.choice(COLORS)} {rng.choice(SHAPES)}s")
    return lines


def build_clip(lines: list[str], vocab_size: int = 800) -> None:
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    spec = json.loads(tok.to_str())["model"]
    vocab = spec["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]  # tuples (transformers 5)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    out = HERE / "clip"
    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(out)
    # The classic vocab.json / merges.txt pair too, so older CLIPTokenizer (slow) versions load it.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_t5(lines: list[str], vocab_size: int = 400, extra_ids: int = 8) -> None:
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(lines, trainer=trainer)
    spec = json.loads(tok.to_str())["model"]
    vocab = [(str(p), float(s)) for p, s in spec["vocab"]]
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    t5 = T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, model_max_length=512)
    out = HERE / "t5"
    out.mkdir(parents=True, exist_ok=True)
    t5.save_pretrained(out)


def main() -> None:
    lines = corpus()
    build_clip(lines)
    build_t5(lines)
    for name in ("clip", "t5"):
        size = sum(p.stat().st_size for p in (HERE / name).iterdir())
        print(f"{name}: {sorted(p.name for p in (HERE / name).iterdir())} {size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
