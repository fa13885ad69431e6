"""SynthShapes prompts: the caption grammar, GenEval-format metadata, prompt sets and jsonl I/O.

Metadata is GenEval's format, {"tag", "include", ["exclude"], "prompt"}, with `class` a shape
name. Captions follow GenEval's templates with "a photo of" dropped ("an" before "orange"):

    single_object  "a circle"                       include [{circle, 1}]
    colors         "a red circle"                   include [{circle, 1, red}]
    two_object     "a circle and a square"          include [{circle, 1}, {square, 1}]
                                                    (shapes differ)
    counting       "three triangles"                include [{triangle, 3}], exclude [{triangle, 4}]
                                                    (counts 2-4, no colour, as GenEval)
    position       "a circle right of a square"     include [{square, 1}, {circle, 1, position:
                                                    ["right of", 0]}]  (shapes differ, no colours,
                                                    as GenEval: 24 distinct prompts)
    color_attr     "a red circle and a blue square" include [{circle, 1, red}, {square, 1, blue}]
                                                    (shapes differ, colours differ)

`allowed_pairs`, a set of (colour, shape), restricts the coloured objects a prompt may name
(compositional splits: see compositional_split).

`prompt_split` partitions the 240 captions by text into the reward fine-tuning split ("train"), the
held-out captions over pretraining's colour-shape pairs ("unseen") and the captions naming a pair
pretraining never showed ("unseen_pair"); `builtin_prompt_sets` draws the shipped prompt files from it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .world import COLORS, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES, TAGS

COUNT_RANGE: tuple[int, int] = (2, 4)
"""Counts used by counting prompts, inclusive."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: str, color: str | None = None) -> str:
    phrase = f"{color} {shape}" if color else shape
    return f"{_article(phrase)} {phrase}"


def _pairs_ok(pairs: Iterable[tuple[str, str]], allowed_pairs) -> bool:
    return allowed_pairs is None or all(p in allowed_pairs for p in pairs)


def _entry(shape: str, count: int = 1, color: str | None = None, position=None) -> dict:
    entry: dict = {"class": shape, "count": count}
    if color is not None:
        entry["color"] = color
    if position is not None:
        entry["position"] = list(position)
    return entry


def enumerate_metadata(tag: str, allowed_pairs=None) -> list[dict]:
    """Every distinct prompt of `tag` (in a fixed order), restricted by `allowed_pairs`."""
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; valid tags are {list(TAGS)}")
    rows: list[dict] = []
    if tag == "single_object":
        for s in SHAPES:
            rows.append({"tag": tag, "include": [_entry(s)], "prompt": _noun(s)})
    elif tag == "colors":
        for s, c in itertools.product(SHAPES, COLORS):
            if _pairs_ok([(c, s)], allowed_pairs):
                rows.append({"tag": tag, "include": [_entry(s, color=c)], "prompt": _noun(s, c)})
    elif tag == "two_object":
        for a, b in itertools.permutations(SHAPES, 2):
            rows.append({"tag": tag, "include": [_entry(a), _entry(b)],
                         "prompt": f"{_noun(a)} and {_noun(b)}"})
    elif tag == "counting":
        for s, n in itertools.product(SHAPES, range(COUNT_RANGE[0], COUNT_RANGE[1] + 1)):
            rows.append({"tag": tag, "include": [_entry(s, n)], "exclude": [_entry(s, n + 1)],
                         "prompt": f"{NUMBER_WORDS[n]} {PLURALS[s]}"})
    elif tag == "position":
        # GenEval order: the reference first, then the object placed relative to it
        for target, ref in itertools.permutations(SHAPES, 2):
            for rel in RELATIONS:
                rows.append({"tag": tag,
                             "include": [_entry(ref), _entry(target, position=(rel, 0))],
                             "prompt": f"{_noun(target)} {rel} {_noun(ref)}"})
    else:  # color_attr
        for a, b in itertools.permutations(SHAPES, 2):
            for ca, cb in itertools.permutations(COLORS, 2):
                if _pairs_ok([(ca, a), (cb, b)], allowed_pairs):
                    rows.append({"tag": tag,
                                 "include": [_entry(a, color=ca), _entry(b, color=cb)],
                                 "prompt": f"{_noun(a, ca)} and {_noun(b, cb)}"})
    return rows


def sample_metadata(
    rng: np.random.Generator, tag: str | None = None, allowed_pairs=None
) -> dict:
    """A random prompt in GenEval format; `tag` uniform over TAGS when None.

    Each tag's distinct prompts (enumerate_metadata) are equally likely.
    """
    if tag is None:
        tag = TAGS[int(rng.integers(len(TAGS)))]
    pool = enumerate_metadata(tag, allowed_pairs)
    if not pool:
        raise ValueError(f"no {tag} prompt uses only the allowed (colour, shape) pairs")
    return pool[int(rng.integers(len(pool)))]


def make_prompt_set(
    n: int, seed: int, tags: Iterable[str] = TAGS, allowed_pairs=None, unique: bool = True
) -> list[dict]:
    """`n` prompts spread evenly over `tags` (in shuffled order), deterministic in `seed`.

    unique=True: no prompt twice; tags whose distinct prompts run out give their remaining share
    to the others (e.g. there are only 3 single_object prompts); fails if fewer than `n`
    distinct prompts exist. unique=False: draws with replacement, exactly even tag counts (up to
    one). Returned in a shuffled order.
    """
    tags = list(tags)
    if not tags:
        raise ValueError("make_prompt_set needs at least one tag")
    rng = np.random.default_rng(seed)
    if not unique:
        rows = [sample_metadata(rng, tags[i % len(tags)], allowed_pairs) for i in range(n)]
        return [rows[i] for i in rng.permutation(n)]
    pools = {}
    for tag in tags:
        pool = enumerate_metadata(tag, allowed_pairs)
        pools[tag] = [pool[i] for i in rng.permutation(len(pool))]
    total = sum(len(p) for p in pools.values())
    if n > total:
        raise ValueError(
            f"asked for {n} unique prompts but tags {tags} have only {total} distinct prompts "
            f"(with these allowed pairs); use unique=False or fewer prompts"
        )
    taken = {tag: 0 for tag in tags}
    order = [tags[i] for i in rng.permutation(len(tags))]
    rows: list[dict] = []
    while len(rows) < n:
        for tag in order:
            if len(rows) < n and taken[tag] < len(pools[tag]):
                rows.append(pools[tag][taken[tag]])
                taken[tag] += 1
    return [rows[i] for i in rng.permutation(n)]


def compositional_split(
    seed: int, heldout_fraction: float = 0.25
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """Split the (colour, shape) pairs into (train_pairs, heldout_pairs), deterministic in `seed`.

    round(heldout_fraction * 18) pairs are held out (at least 1), chosen uniformly among the
    splits in which every colour and every shape still has a training pair.
    """
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    k = max(1, round(heldout_fraction * len(pairs)))
    rng = np.random.default_rng(seed)
    for _ in range(10_000):
        held = {pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)}
        train = set(pairs) - held
        if {c for c, _ in train} == set(COLORS) and {s for _, s in train} == set(SHAPES):
            return train, held
    raise ValueError(f"cannot hold out {k} pairs and keep every colour and shape in training")


SPLITS: tuple[str, ...] = ("train", "unseen", "unseen_pair")
"""The three prompt splits of the toy world (see prompt_split)."""


def scene_key(metadata: dict) -> tuple:
    """A key shared by the captions that ask for the same scene, whatever their word order:
    "a circle and a square" / "a square and a circle", and a position caption and its mirror
    ("a circle left of a square" / "a square right of a circle")."""
    entries = metadata["include"]
    if metadata["tag"] == "position":
        ref, target = entries[0]["class"], entries[1]["class"]
        rel = entries[1]["position"][0]
        from .world import OPPOSITE

        return ("position", *min((target, rel, ref), (ref, OPPOSITE[rel], target)))
    objects = sorted((e["class"], e.get("color") or "", e["count"]) for e in entries)
    return (metadata["tag"], *objects)


def prompt_split(seed: int = 0, eval_fraction: float = 0.5) -> dict[str, list[dict]]:
    """Every caption of the grammar in exactly one of SPLITS, deterministic in `seed`:

    - "unseen_pair": the captions naming a colour-shape pair held out of pretraining
      (compositional_split(seed=0), the split the shipped toy bases were trained on);
    - of the rest, per tag, scenes (captions grouped by `scene_key`, so a caption and its reordering
      land on the same side) go to "unseen" with `eval_fraction` (at least one scene, and at least
      one left for training) and to "train" otherwise.

    Reward fine-tuning draws from "train" only; "unseen" and "unseen_pair" captions are never trained
    on, so accuracy on them measures generalisation, not memorisation.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    train_pairs, _ = compositional_split(seed=0)
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for tag in TAGS:
        seen = {m["prompt"] for m in enumerate_metadata(tag, allowed_pairs=train_pairs)}
        scenes: dict[tuple, list[dict]] = {}
        for row in enumerate_metadata(tag):
            if row["prompt"] in seen:
                scenes.setdefault(scene_key(row), []).append(row)
            else:
                out["unseen_pair"].append(row)
        keys = sorted(scenes)
        n_eval = min(max(1, int(eval_fraction * len(keys))), len(keys) - 1)
        held = {keys[i] for i in rng.permutation(len(keys))[:n_eval]}
        for key in keys:
            out["unseen" if key in held else "train"].extend(scenes[key])
    return out


def draw_records(pool: list[dict], n: int, seed: int, split: str, tags: Iterable[str] = TAGS) -> list[dict]:
    """`n` records from `pool`, evenly over `tags` (up to one); within a tag the captions take turns in
    seeded shuffled rounds, so each appears floor or ceil of (its tag's share / its tag's captions) times.
    Returned in a shuffled order; each record gains "split": `split`."""
    tags = [t for t in tags if any(m["tag"] == t for m in pool)]
    rng = np.random.default_rng(seed)
    shares = {t: n // len(tags) + (i < n % len(tags)) for i, t in enumerate(tags)}
    rows = []
    for tag in tags:
        captions = [m for m in pool if m["tag"] == tag]
        order: list[int] = []
        while len(order) < shares[tag]:
            order.extend(rng.permutation(len(captions)).tolist())
        rows += [{**captions[i], "split": split} for i in order[: shares[tag]]]
    return [rows[i] for i in rng.permutation(len(rows))]


def builtin_prompt_sets(seed: int = 0) -> dict[str, list[dict]]:
    """The shipped prompt files (assets/prompts/<name>.jsonl), drawn from `prompt_split(seed)`:

    - toy_train: 300 records of "train" captions, 50 per tag (reward fine-tuning);
    - toy_eval: 300 records of "unseen" captions, 50 per tag (the held-out headline set);
    - toy_eval_pairs: 100 records of "unseen_pair" captions (50 colors, 50 color_attr).
    """
    split = prompt_split(seed)
    return {
        "toy_train": draw_records(split["train"], 300, seed=1, split="train"),
        "toy_eval": draw_records(split["unseen"], 300, seed=10_000, split="unseen"),
        "toy_eval_pairs": draw_records(split["unseen_pair"], 100, seed=20_000, split="unseen_pair"),
    }


def vocabulary() -> list[str]:
    """Every word a caption can use, sorted (for word-level tokenizers)."""
    words: set[str] = set()
    for tag in TAGS:
        for row in enumerate_metadata(tag):
            words.update(row["prompt"].split())
    return sorted(words)


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object per line, keys in their order, GenEval's separators; ends with a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON object on every non-blank line, keys in file order."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
    return rows
