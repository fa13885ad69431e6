"""A learned, differentiable proxy of the SynthShapes scorer (reward `toy_proxy`).

The exact scorer (diffrl.toyworld.scorer) parses images into objects and has no useful gradient.
This module trains a small CNN to predict, for a 32 px image and a prompt, the scorer's dense
partial credit and its GenEval verdict. Differentiable-reward trainers optimise the proxy; the
exact scorer then says how much of the gain is real (reward hacking shows as the gap).

Prompt encoding (no text model): `encode_metadata` turns GenEval-format metadata into a fixed
vector of PROMPT_DIM = 2 * 23 + 6 = 52 numbers, one block per include slot (the grammar has at
most MAX_INCLUDES = 2 entries) followed by the tag:

    per slot (23; all zeros if the prompt has no such entry)
        present      1   1.0 if the entry exists
        shape        3   one-hot over SHAPES
        colour       7   one-hot over COLORS, or the last position for "any colour" (none asked)
        count        4   one-hot over 1-4
        exact        1   1.0 if an exclude entry of the same class and colour has count + 1
                         (counting prompts: "n == count"); other exclude forms are rejected
        relation     5   one-hot over ("none",) + RELATIONS
        reference    2   one-hot include index the relation refers to (zeros when none)
    tag              6   one-hot over TAGS

Every field of the grammar is written exactly, so distinct prompts give distinct vectors
(tests/test_toy_proxy.py checks all 240). Anything the vector cannot express raises ValueError.

Model (ProxyCNN): the image in [0, 1] is mapped to [-1, 1] and two coordinate channels (x, y in
[-1, 1]) are appended; five 3x3 conv layers (32 -> 16 -> 8 -> 4 px by max pooling), each followed
by FiLM (per-channel scale and shift from the prompt embedding) and ReLU; a 1x1 conv to 24
channels, flattened (the 4x4 layout keeps where things are), concatenated with the prompt
embedding, and an MLP to two outputs: partial credit (through a sigmoid) and the logit of
"correct". About 207k parameters; weights ship as float16 safetensors plus config.json.

Training data (`make_dataset`): scenes rendered for random prompts (3/4; tag uniform, then prompt)
and scenes of 0-4 random objects (1/4), each blurred (Gaussian, sigma up to 1 px) and/or noised
with some probability because diffusion samples are not clean; every degraded image is parsed
once with the exact scorer and scored against all 240 prompts of the grammar. Each image gives one
positive (a tag uniformly among those with a prompt it satisfies, then such a prompt) and one
negative (half the time of the source prompt's tag, else of a uniform tag; within it, with
probability 3/4 a hard negative one or two edits from the source prompt, e.g. another colour,
count, relation, shape or order (`_neighbours`), else any prompt of the tag it fails). So the
examples are about half positive and every tag gets its share of negatives. Labels are the exact
scorer's partial credit and verdict. Loss: MSE on partial credit + 0.5 * BCE on the verdict.

    python -m diffrl.toyworld.proxy --output assets/toy/proxy     # ~12 min on one CPU thread
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prompts import enumerate_metadata
from .scorer import parse_images, score
from .world import COLORS, MAX_OBJECTS, RELATIONS, SHAPES, TAGS, render, render_scene

IMAGE_SIZE = 32
MAX_INCLUDES = 2
"""Include entries per prompt the encoding has slots for (the grammar uses 1 or 2)."""
MAX_COUNT = 4
_COLOR_NAMES = tuple(COLORS)
_RELATION_SLOTS = ("none", *RELATIONS)
# offsets inside one slot
_PRESENT, _SHAPE, _COLOR = 0, 1, 1 + len(SHAPES)
_COUNT = _COLOR + len(COLORS) + 1
_EXACT = _COUNT + MAX_COUNT
_RELATION = _EXACT + 1
_REFERENCE = _RELATION + len(_RELATION_SLOTS)
SLOT_DIM = _REFERENCE + MAX_INCLUDES  # 23
PROMPT_DIM = MAX_INCLUDES * SLOT_DIM + len(TAGS)  # 52
ENCODING_VERSION = 1
"""Bumped whenever the layout above changes; stored in config.json and checked on load."""


# ---- prompt encoding ---------------------------------------------------------------------------
def encode_metadata(metadata: dict) -> np.ndarray:
    """float32 [PROMPT_DIM] structured encoding of one GenEval-format prompt (module docstring)."""
    if not isinstance(metadata, dict) or not metadata.get("include"):
        raise ValueError(
            f"metadata needs a non-empty 'include' list (GenEval format): {metadata!r}")
    includes, excludes = metadata["include"], list(metadata.get("exclude", []))
    if len(includes) > MAX_INCLUDES:
        raise ValueError(f"the proxy encodes at most {MAX_INCLUDES} include entries, "
                         f"got {len(includes)}: {metadata!r}")
    tag = metadata.get("tag")
    if tag not in TAGS:
        raise ValueError(f"metadata tag {tag!r} is not one of {list(TAGS)}: {metadata!r}")
    vec = np.zeros(PROMPT_DIM, dtype=np.float32)
    used_excludes: set[int] = set()
    for i, entry in enumerate(includes):
        base = i * SLOT_DIM
        shape, color, count = entry.get("class"), entry.get("color"), int(entry.get("count", 0))
        if shape not in SHAPES:
            raise ValueError(f"unknown class {shape!r}; valid shapes are {list(SHAPES)}")
        if color is not None and color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; valid colours are {list(COLORS)}")
        if not 1 <= count <= MAX_COUNT:
            raise ValueError(f"include count must be 1-{MAX_COUNT}, got {count} in {entry!r}")
        vec[base + _PRESENT] = 1.0
        vec[base + _SHAPE + SHAPES.index(shape)] = 1.0
        vec[base + _COLOR + (len(COLORS) if color is None else _COLOR_NAMES.index(color))] = 1.0
        vec[base + _COUNT + count - 1] = 1.0
        for k, ex in enumerate(excludes):
            if ex.get("class") == shape and ex.get("color") == color:
                if int(ex["count"]) != count + 1:
                    raise ValueError(f"the proxy encodes exclude entries only as count + 1 of an "
                                     f"include entry; got {ex!r} for {entry!r}")
                vec[base + _EXACT] = 1.0
                used_excludes.add(k)
        position = entry.get("position")
        if position:
            relation, ref = position[0], int(position[1])
            if relation not in RELATIONS:
                raise ValueError(f"unknown relation {relation!r}; valid are {list(RELATIONS)}")
            if not 0 <= ref < len(includes) or ref == i:
                raise ValueError(
                    f"position reference {ref} is not another include entry: {entry!r}")
            vec[base + _RELATION + _RELATION_SLOTS.index(relation)] = 1.0
            vec[base + _REFERENCE + ref] = 1.0
        else:
            vec[base + _RELATION] = 1.0  # "none"
    unused = [ex for k, ex in enumerate(excludes) if k not in used_excludes]
    if unused:
        raise ValueError(f"the proxy cannot encode exclude entries without a matching include: "
                         f"{unused!r}")
    vec[MAX_INCLUDES * SLOT_DIM + TAGS.index(tag)] = 1.0
    return vec


def encode_batch(metadata: list[dict]) -> Tensor:
    """float32 [B, PROMPT_DIM] encodings of a list of prompts."""
    return torch.from_numpy(np.stack([encode_metadata(m) for m in metadata]))


# ---- model -------------------------------------------------------------------------------------
@dataclass
class ProxyConfig:
    """Architecture of ProxyCNN; saved as config.json next to the weights."""

    channels: tuple[int, ...] = (32, 48, 48, 64, 80)
    """Output channels of the five 3x3 convs (at 32, 16, 16, 8, 4 px)."""
    embed_dim: int = 64
    """Width of the prompt embedding MLP (input to FiLM and the head)."""
    head_channels: int = 24
    """Channels of the 1x1 conv before flattening the 4x4 map."""
    hidden: int = 96
    """Width of the head MLP."""
    prompt_dim: int = PROMPT_DIM
    encoding_version: int = ENCODING_VERSION
    image_size: int = IMAGE_SIZE


class ProxyCNN(nn.Module):
    """(images [B, 3, 32, 32] in [0, 1], prompt vectors [B, PROMPT_DIM]) -> (partial [B] in
    [0, 1], correct_logit [B])."""

    # max-pool after these conv indices: 32 -> 16 -> 8 -> 4 px
    _POOL_AFTER = (0, 2, 3)

    def __init__(self, config: ProxyConfig):
        super().__init__()
        if len(config.channels) != 5:
            raise ValueError(f"ProxyConfig.channels needs 5 entries, got {config.channels}")
        self.config = config
        e = config.embed_dim
        self.embed = nn.Sequential(nn.Linear(config.prompt_dim, e), nn.ReLU(), nn.Linear(e, e),
                                   nn.ReLU())
        ins = (5, *config.channels[:-1])  # RGB + two coordinate channels first
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, 3, padding=1) for i, o in zip(ins, config.channels))
        self.film = nn.Linear(e, 2 * sum(config.channels))
        self.reduce = nn.Conv2d(config.channels[-1], config.head_channels, 1)
        side = config.image_size // 2 ** len(self._POOL_AFTER)
        self.head = nn.Sequential(
            nn.Linear(config.head_channels * side * side + e, config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 2),
        )
        c = torch.linspace(-1.0, 1.0, config.image_size)
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        coords = torch.stack([xs, ys])[None]  # [1, 2, S, S]
        self.register_buffer("coords", coords, persistent=False)

    def forward(self, images: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = images.shape
        s = self.config.image_size
        if (h, w) != (s, s):
            raise ValueError(f"ProxyCNN takes [B, 3, {s}, {s}] images, got {list(images.shape)}")
        emb = self.embed(prompts)  # [B, E]
        film = self.film(emb)  # [B, 2 * sum(C)]
        x = torch.cat([images * 2.0 - 1.0, self.coords.expand(b, -1, -1, -1)], 1)  # [B, 5, S, S]
        start = 0
        for i, conv in enumerate(self.convs):
            x = conv(x)  # [B, C_i, s_i, s_i]
            n = x.shape[1]
            gamma = film[:, start:start + n, None, None]
            beta = film[:, start + n:start + 2 * n, None, None]
            start += 2 * n
            x = F.relu(x * (1.0 + gamma) + beta)
            if i in self._POOL_AFTER:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.reduce(x)).flatten(1)  # [B, head_channels * 16]
        out = self.head(torch.cat([x, emb], 1))  # [B, 2]
        return torch.sigmoid(out[:, 0]), out[:, 1]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- save / load -------------------------------------------------------------------------------
def default_proxy_path() -> Path:
    """The shipped weights: diffrl.assets/toy/proxy (works from a wheel or an editable install)."""
    return Path(str(importlib.resources.files("diffrl.assets") / "toy" / "proxy"))


def save_proxy(model: ProxyCNN, path: str | Path, extra: dict | None = None) -> None:
    """config.json (architecture, plus `extra`, e.g. training metrics) and model.safetensors
    (float16, never pickle)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(model.config)
    config["channels"] = list(config["channels"])
    (path / "config.json").write_text(
        json.dumps({"model": config, **(extra or {})}, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().to("cpu", torch.float16).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))


def load_proxy(path: str | Path | None = None, device: torch.device | str = "cpu") -> ProxyCNN:
    """A ProxyCNN in eval mode (float32) from `path` (a folder with config.json and
    model.safetensors; None: the shipped weights). Missing files raise FileNotFoundError."""
    from safetensors.torch import load_file

    path = default_proxy_path() if path is None else Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"toy proxy weights not found: {path / name} is missing (train them with "
                f"`python -m diffrl.toyworld.proxy --output {path}`)")
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))["model"]
    if raw.get("encoding_version") != ENCODING_VERSION:
        raise ValueError(f"{path / 'config.json'}: prompt encoding version "
                         f"{raw.get('encoding_version')} but this code writes {ENCODING_VERSION}")
    config = ProxyConfig(**{**raw, "channels": tuple(raw["channels"])})
    model = ProxyCNN(config)
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval().to(device)


# ---- data --------------------------------------------------------------------------------------
def all_prompts() -> list[dict]:
    """Every prompt of the grammar (240), in enumerate_metadata's order, tag by tag."""
    return [m for tag in TAGS for m in enumerate_metadata(tag)]


def _neighbours(prompts: list[dict], codes: np.ndarray) -> list[np.ndarray]:
    """For each prompt, the indices of prompts one or two edits away: encodings that differ in at
    most 4 entries (one changed field, e.g. colour, count or relation, is 2; two changed fields,
    a field plus the tag, or two swapped shapes, is 4)."""
    dist = np.abs(codes[:, None, :] - codes[None, :, :]).sum(-1)  # [P, P]
    return [np.flatnonzero((row > 0) & (row <= 4)) for row in dist]


def _random_objects(rng: np.random.Generator) -> dict:
    """Metadata-like spec of 1-MAX_OBJECTS random coloured shapes (no relations), for distractor
    scenes the grammar's renderer would never draw."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    return {"include": [{"class": SHAPES[int(rng.integers(len(SHAPES)))], "count": 1,
                         "color": _COLOR_NAMES[int(rng.integers(len(COLORS)))]}
                        for _ in range(n)]}


def degrade(images: Tensor, rng: np.random.Generator, p_blur: float = 0.5,
            p_noise: float = 0.5) -> Tensor:
    """Per image: Gaussian blur with probability p_blur (sigma ~ U(0.3, 1.0) px, 5-tap separable,
    edges replicated), then with probability p_noise a global colour offset ~ N(0, 0.02) and
    pixel noise with std ~ U(0, 0.06); clipped to [0, 1]. images float [N, 3, H, W]."""
    n = images.shape[0]
    sigma = np.where(rng.random(n) < p_blur, rng.uniform(0.3, 1.0, n), 0.0)
    taps = np.arange(-2, 3)
    kernel = np.exp(-taps[None] ** 2 / (2 * np.maximum(sigma, 1e-3)[:, None] ** 2))  # [N, 5]
    kernel = torch.from_numpy(kernel / kernel.sum(1, keepdims=True)).float()
    k = kernel.repeat_interleave(3, 0)  # [N * 3, 5]: one kernel per channel
    x = F.pad(images.reshape(1, n * 3, *images.shape[2:]), (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, k[:, None, None, :], groups=n * 3)
    x = F.conv2d(x, k[:, None, :, None], groups=n * 3).reshape(images.shape)
    noisy = torch.from_numpy(rng.random(n) < p_noise)[:, None, None, None]
    offset = torch.from_numpy(rng.normal(0.0, 0.02, (n, 3, 1, 1))).float()
    std = torch.from_numpy(rng.uniform(0.0, 0.06, (n, 1, 1, 1))).float()
    noise = offset + std * torch.from_numpy(rng.standard_normal(images.shape)).float()
    return (x + noisy * noise).clamp(0.0, 1.0)


@dataclass
class ProxyData:
    """Labelled examples: images float [N, 3, 32, 32], prompt indices into all_prompts() [N],
    exact partial credit [N], exact verdict [N] (1.0 correct), hard-negative flag [N]."""

    images: Tensor
    prompt_index: Tensor
    partial: Tensor
    correct: Tensor
    hard: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def make_dataset(n_images: int, seed: int, p_same_tag: float = 0.5, p_hard: float = 0.75,
                 chunk: int = 500) -> ProxyData:
    """About 2 * n_images examples, one positive and one negative per scene (module docstring)."""
    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    by_tag = {t: np.array([i for i, m in enumerate(prompts) if m["tag"] == t]) for t in TAGS}
    codes = np.stack([encode_metadata(m) for m in prompts])
    near = _neighbours(prompts, codes)
    out: dict[str, list] = {k: [] for k in ("images", "index", "partial", "correct", "hard")}
    for start in range(0, n_images, chunk):
        m = min(chunk, n_images - start)
        sources, raw = [], []
        for _ in range(m):
            if rng.random() < 0.75:  # a scene for a prompt of a uniformly drawn tag
                src = int(_pick(rng, by_tag[_pick(rng, TAGS)]))
                raw.append(render(prompts[src], rng))
            else:
                src = -1
                blank = rng.random() < 0.1
                raw.append(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8) if blank
                           else render_scene(_random_objects(rng), rng)[0])
            sources.append(src)
        images = torch.from_numpy(np.stack(raw)).permute(0, 3, 1, 2).float() / 255.0
        images = degrade(images, rng)
        parsed = parse_images(images)
        for j, objects in enumerate(parsed):
            results = [score(p, objects) for p in prompts]
            ok = np.array([r.correct for r in results])
            picks = []
            if ok.any():  # positive: a tag uniformly (among those it satisfies), then a prompt
                tag = _pick(rng, [t for t in TAGS if ok[by_tag[t]].any()])
                picks.append((_pick(rng, [q for q in by_tag[tag] if ok[q]]), False))
            src = sources[j]
            if src >= 0 and rng.random() < p_same_tag:  # negative of the source prompt's tag
                tag = prompts[src]["tag"]
            else:
                tag = _pick(rng, [t for t in TAGS if not ok[by_tag[t]].all()] or [None])
            if tag is not None and not ok[by_tag[tag]].all():
                hard = [int(q) for q in near[src] if not ok[q] and prompts[q]["tag"] == tag] \
                    if src >= 0 else []
                if hard and rng.random() < p_hard:
                    picks.append((_pick(rng, hard), True))
                else:
                    picks.append((_pick(rng, [q for q in by_tag[tag] if not ok[q]]), False))
            for q, is_hard in picks:
                out["images"].append(images[j])
                out["index"].append(q)
                out["partial"].append(results[q].partial)
                out["correct"].append(float(results[q].correct))
                out["hard"].append(is_hard)
    return ProxyData(
        images=torch.stack(out["images"]),
        prompt_index=torch.tensor(out["index"]),
        partial=torch.tensor(out["partial"], dtype=torch.float32),
        correct=torch.tensor(out["correct"], dtype=torch.float32),
        hard=torch.tensor(out["hard"]),
    )


# ---- training and evaluation -------------------------------------------------------------------
def proxy_loss(partial: Tensor, logit: Tensor, target_partial: Tensor, target_correct: Tensor,
               bce_weight: float = 0.5) -> tuple[Tensor, dict]:
    """MSE on partial credit + bce_weight * BCE on the verdict (means over the batch)."""
    mse = F.mse_loss(partial, target_partial)
    bce = F.binary_cross_entropy_with_logits(logit, target_correct)
    return mse + bce_weight * bce, {"mse": mse.item(), "bce": bce.item()}


@torch.no_grad()
def evaluate(model: ProxyCNN, data: ProxyData, codes: Tensor, batch: int = 1000) -> dict:
    """Held-out metrics: partial-credit MSE and Pearson correlation with the exact partial credit;
    verdict accuracy of sigmoid(correct_logit) > 0.5, overall, on positives, on negatives, on
    hard negatives and per prompt tag."""
    model.eval()
    parts, logits = [], []
    for s in range(0, len(data), batch):
        p, lg = model(data.images[s:s + batch], codes[data.prompt_index[s:s + batch]])
        parts.append(p)
        logits.append(lg)
    part, logit = torch.cat(parts), torch.cat(logits)
    pred = logit > 0.0
    truth = data.correct > 0.5
    agree = (pred == truth).float()
    corr = torch.corrcoef(torch.stack([part, data.partial]))[0, 1]
    tags = np.array([m["tag"] for m in all_prompts()])[data.prompt_index.numpy()]
    return {
        "n": len(data), "positives": int(truth.sum()),
        "partial_mse": float(F.mse_loss(part, data.partial)),
        "partial_corr": float(corr),
        "accuracy": float(agree.mean()),
        "accuracy_positives": float(agree[truth].mean()),
        "accuracy_negatives": float(agree[~truth].mean()),
        "accuracy_hard_negatives": float(agree[data.hard].mean()),
        "accuracy_by_tag": {t: round(float(agree[torch.from_numpy(tags == t)].mean()), 4)
                            for t in TAGS},
    }


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    data = make_dataset(args.images, seed=args.seed)
    held = make_dataset(args.eval_images, seed=args.seed + 1)
    t_data = time.time() - t0
    print(f"data: {len(data)} train / {len(held)} held-out examples "
          f"({int(data.correct.sum())} / {int(held.correct.sum())} positive) in {t_data:.0f}s",
          flush=True)
    codes = encode_batch(all_prompts())  # [P, D]
    model = ProxyCNN(ProxyConfig())
    print(f"ProxyCNN: {num_parameters(model)} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(data) / args.batch)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    t1, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(data), generator=gen)
        for s in range(0, len(data), args.batch):
            idx = order[s:s + args.batch]
            part, logit = model(data.images[idx], codes[data.prompt_index[idx]])
            loss, stats = proxy_loss(part, logit, data.partial[idx], data.correct[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}/{total} loss {loss.item():.4f} "
                      f"mse {stats['mse']:.4f} bce {stats['bce']:.4f} "
                      f"{time.time() - t1:.0f}s", flush=True)
        metrics = evaluate(model, held, codes)
        print(f"epoch {epoch}: held-out {json.dumps(metrics)}", flush=True)
    t_train = time.time() - t1
    # the float16 copy is what ships: evaluate it, not the float32 weights
    save_proxy(model, args.output)
    metrics = evaluate(load_proxy(args.output), held, codes)
    extra = {
        "heldout": metrics,
        "training": {"images": args.images, "examples": len(data), "epochs": args.epochs,
                     "batch": args.batch, "lr": args.lr, "seed": args.seed,
                     "threads": args.threads, "data_seconds": round(t_data),
                     "train_seconds": round(t_train), "parameters": num_parameters(model)},
    }
    save_proxy(model, args.output, extra)
    print(json.dumps(extra, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for the weights")
    parser.add_argument("--images", type=int, default=28_000,
                        help="training scenes (two labelled examples each)")
    parser.add_argument("--eval-images", type=int, default=2_000, help="held-out scenes")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    main_args = parser.parse_args(argv)
    train(main_args)


if __name__ == "__main__":
    main()
