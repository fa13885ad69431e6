"""Captions of the motion world: templates with some lexical variety, the train / held-out split, the prompt sets.

A record is {"tag", <label fields>, "prompt", "split"}, e.g.
    {"tag": "walk", "direction": "backward", "speed": "fast", "prompt": "a man walks backwards quickly",
     "split": "unseen"}

The split is by caption text, so "held-out" means never trained on:
- HELD_OUT_LABELS are captioned only in the evaluation set: unseen combinations of words that training shows
  separately (walk backward + fast, sidestep left + slow, sidestep right + normal, turn right + 180, jump + twice,
  wave + left, raise + left, squat + once, kick + right);
- the other labels are captioned in training with the "train" templates and in evaluation only with the
  "unseen" templates (other word orders of words training has).
Every word of an evaluation caption occurs in some training caption (a toy tokenizer knows them all).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .world import TAGS, all_labels, check_label

SUBJECTS: tuple[tuple[str, str], ...] = (
    ("a person", "their"), ("someone", "their"), ("a man", "his"), ("a woman", "her"), ("the person", "their"))
"""(subject, possessive pronoun) pairs every template is written with."""

HELD_OUT_LABELS: tuple[dict, ...] = (
    {"tag": "walk", "direction": "backward", "speed": "fast"},
    {"tag": "walk", "direction": "left", "speed": "slow"},
    {"tag": "walk", "direction": "right", "speed": "normal"},
    {"tag": "turn", "direction": "right", "angle": 180},
    {"tag": "jump", "count": 2},
    {"tag": "wave", "side": "left"},
    {"tag": "raise", "side": "left"},
    {"tag": "squat", "count": 1},
    {"tag": "kick", "side": "right"},
)
"""Labels whose captions appear only in the evaluation set (module docstring)."""

WALKING = {
    "forward": ("walks forward", "walks ahead", "walks straight ahead"),
    "backward": ("walks backward", "walks backwards", "steps backward"),
    "left": ("sidesteps to the left", "steps sideways to the left", "walks sideways to the left"),
    "right": ("sidesteps to the right", "steps sideways to the right", "walks sideways to the right"),
}
PACE = {"slow": ("slowly", "at a slow pace"), "normal": ("at a normal pace", "steadily"),
        "fast": ("quickly", "fast", "at a brisk pace")}
PACE_BEFORE_VERB = {"slow": "slowly", "normal": "steadily", "fast": "quickly"}
TIMES = {1: ("once", "one time"), 2: ("twice", "two times")}

Template = Callable[[dict, str, str], list[str]]


def _walk(train: bool) -> Template:
    def captions(label: dict, who: str, their: str) -> list[str]:
        verbs = WALKING[label["direction"]]
        if train:
            return [f"{who} {verb} {pace}" for verb in verbs for pace in PACE[label["speed"]]]
        return [f"{who} {PACE_BEFORE_VERB[label['speed']]} {verb}" for verb in verbs]
    return captions


def _turn(train: bool) -> Template:
    def captions(label: dict, who: str, their: str) -> list[str]:
        side = label["direction"]
        if label["angle"] == 90:
            if train:
                return [f"{who} turns {side} 90 degrees", f"{who} turns {side} ninety degrees",
                        f"{who} turns to the {side} by 90 degrees"]
            return [f"{who} turns ninety degrees to the {side}"]
        if train:
            return [f"{who} turns {side} 180 degrees", f"{who} turns around to the {side}",
                    f"{who} turns to the {side} by 180 degrees"]
        return [f"{who} turns 180 degrees to the {side}"]
    return captions


# tag -> (train templates, unseen templates); each template gives every wording of a label for one subject
TEMPLATES: dict[str, tuple[list[Template], list[Template]]] = {
    "walk": ([_walk(True)], [_walk(False)]),
    "run": ([lambda lab, who, their: [f"{who} runs forward", f"{who} runs ahead", f"{who} jogs forward"]],
            [lambda lab, who, their: [f"{who} runs straight ahead", f"{who} quickly runs forward"]]),
    "turn": ([_turn(True)], [_turn(False)]),
    "jump": ([lambda lab, who, their: [f"{who} {verb} {n}" for verb in ("jumps", "hops") for n in TIMES[lab["count"]]]],
             [lambda lab, who, their: [f"{who} jumps in place {n}" for n in TIMES[lab["count"]]]]),
    "wave": ([lambda lab, who, their: [f"{who} waves {their} {lab['side']} hand",
                                       f"{who} waves with {their} {lab['side']} hand"]],
             [lambda lab, who, their: [f"{who} waves {their} {lab['side']} hand above {their} head"]]),
    "raise": ([lambda lab, who, their: [f"{who} raises {_arm(lab, their)}", f"{who} lifts {_arm(lab, their)}",
                                        f"{who} raises {_arm(lab, their)} above {their} head"]],
              [lambda lab, who, their: [f"{who} lifts {_arm(lab, their)} above {their} head"]]),
    "sit": ([lambda lab, who, their: [f"{who} sits down", f"{who} sits down on a chair", f"{who} takes a seat"]],
            [lambda lab, who, their: [f"{who} takes a seat on a chair"]]),
    "squat": ([lambda lab, who, their: [f"{who} squats {n}" for n in TIMES[lab["count"]]] +
               ([f"{who} does two squats"] if lab["count"] == 2 else [])],
              [lambda lab, who, their: [f"{who} squats down {n}" for n in TIMES[lab["count"]]]]),
    "kick": ([lambda lab, who, their: [f"{who} kicks with {their} {lab['side']} leg",
                                       f"{who} kicks {their} {lab['side']} leg forward",
                                       f"{who} kicks with {their} {lab['side']} foot"]],
             [lambda lab, who, their: [f"{who} kicks forward with {their} {lab['side']} leg"]]),
    "stand": ([lambda lab, who, their: [f"{who} stands still", f"{who} stands in place"]],
              [lambda lab, who, their: [f"{who} stands still in place"]]),
}


def _arm(label: dict, their: str) -> str:
    return "both arms" if label["side"] == "both" else f"{their} {label['side']} arm"


def captions_of(label: dict, templates: str = "all") -> list[str]:
    """Every caption of `label` from its tag's "train" templates, "unseen" templates or "all", over SUBJECTS."""
    label = check_label(label)
    train, unseen = TEMPLATES[label["tag"]]
    chosen = {"train": train, "unseen": unseen, "all": train + unseen}[templates]
    return [text for template in chosen for who, their in SUBJECTS for text in template(label, who, their)]


def is_held_out(label: dict) -> bool:
    return check_label(label) in [check_label(h) for h in HELD_OUT_LABELS]


def caption_split() -> dict[str, list[dict]]:
    """Every caption of the world as a record, in "train" (training labels, train templates) or "unseen" (held-out
    labels with any template; training labels with the unseen templates)."""
    out: dict[str, list[dict]] = {"train": [], "unseen": []}
    for label in all_labels():
        held = is_held_out(label)
        for split, which in (("train", "train"), ("unseen", "unseen")):
            if held and split == "train":
                continue
            for text in captions_of(label, "all" if held else which):
                out[split].append({**label, "prompt": text, "split": split})
    return out


def draw_records(pool: list[dict], n: int, seed: int) -> list[dict]:
    """`n` records from `pool`, evenly over the tags; within a tag the labels take turns in seeded shuffled rounds,
    and each label's captions in seeded shuffled rounds of their own. Returned in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    tags = [t for t in TAGS if any(r["tag"] == t for r in pool)]
    by_label: dict[str, list[dict]] = {}
    for record in pool:
        by_label.setdefault(repr(check_label(record)), []).append(record)
    queues: dict[str, list[int]] = {key: [] for key in by_label}
    rows = []
    for i, tag in enumerate(tags):
        share = n // len(tags) + (i < n % len(tags))
        keys = [k for k, records in by_label.items() if records[0]["tag"] == tag]
        order: list[str] = []
        while len(order) < share:
            order += [keys[j] for j in rng.permutation(len(keys))]
        for key in order[:share]:
            if not queues[key]:
                queues[key] = rng.permutation(len(by_label[key])).tolist()
            rows.append(by_label[key][queues[key].pop()])
    return [rows[i] for i in rng.permutation(len(rows))]


def builtin_motion_prompt_sets() -> dict[str, list[dict]]:
    """The shipped prompt files: toy_motion_train (200 records of "train" captions, 20 per tag) and toy_motion_eval
    (200 records of "unseen" captions, 20 per tag)."""
    split = caption_split()
    return {"toy_motion_train": draw_records(split["train"], 200, seed=1),
            "toy_motion_eval": draw_records(split["unseen"], 200, seed=10_000)}


def write_motion_prompt_sets(folder: str | Path) -> list[Path]:
    """Write assets/prompts/{toy_motion_train,toy_motion_eval}.jsonl (builtin_motion_prompt_sets); returns the paths."""
    from diffrl.toyworld.prompts import write_jsonl

    paths = []
    for name, rows in builtin_motion_prompt_sets().items():
        path = Path(folder) / f"{name}.jsonl"
        write_jsonl(rows, path)
        paths.append(path)
    return paths
