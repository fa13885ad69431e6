"""Evaluation harness (`diffrl eval`): fixed-seed deterministic samples of a prompt set, scored by rewards.

    from diffrl.benchmarks.evaluate import evaluate
    metrics = evaluate(policy, load_prompts("prompts.jsonl"), ["brightness"], images_per_prompt=4,
                       steps=40, guidance_scale=4.5, seed=0, batch_size=8, output_dir="outputs/eval")

Image j of prompt i starts from noise seeded by `seed + i * images_per_prompt + j` (the `diffrl sample`
convention, so both commands draw the same image for the same prompt, seed and settings) and is
sampled with the deterministic sampler (flow ODE / DDIM eta 0). Images are PNGs under
`output_dir/images/`; a re-run loads the PNGs already there instead of sampling them again and
re-scores everything. Rewards always score the saved 8-bit pixels (generated images are rounded to
uint8 first), so a resumed run gives exactly the metrics of an uninterrupted one.

Video models (`policy.sample_kind == "video"`) go through the same harness clip by clip: clip j of prompt i
is `images/PPPP_JJ.mp4` to watch (H.264, lossy) and `images/PPPP_JJ.mkv`, its exact 8-bit frames (FFV1,
lossless), which the rewards score and a re-run loads; grid.png shows the first clips as strips of 4
frames and grid.gif plays them.

Motion models (`policy.sample_kind == "motion"`): motion j of prompt i is `images/PPPP_JJ.mp4`, a stick figure
to watch, and `images/PPPP_JJ.safetensors`, its de-normalised features [T, 263] (what the rewards score and a
re-run loads, exactly) with the joints [T, 22, 3] recovered from them; grid.png and grid.gif show the first
motions as stick-figure clips.

Statistics are `diffrl.stats`': mean, sample std over images, stderr over prompts (images of one prompt
are correlated), ci95, per tag and the mean over tags (GenEval's overall score) with its stderr.
`compare_scores` gives the paired difference of two evaluations on the same prompts and seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from diffrl.data import PromptSet
from diffrl.rewards import Reward, build_reward
from diffrl.rollout import sample
from diffrl.sampling import make_sampler
from diffrl.stats import paired, score_summary
from diffrl.runtime import derive_generator
from diffrl.visual import DEFAULT_FPS, read_video, save_lossless_clip, save_mp4, to_uint8

GRID_IMAGES = 32
"""How many images (the first ones, in prompt order) go into grid.png."""
GRID_CLIPS = 8
"""How many clips go into grid.png / grid.gif: a strip of 4 frames is 4 images wide, so 8 clips fill the area of 32
images."""
_SETTINGS_FILE = "eval_settings.json"


# ---- sampling pieces shared with `diffrl sample` ------------------------------------------------
def image_seed(seed: int, prompt_index: int, images_per_prompt: int, image_index: int) -> int:
    """The noise seed of image `image_index` of prompt `prompt_index` (the `diffrl sample` convention)."""
    return seed + prompt_index * images_per_prompt + image_index


def deterministic_sampler(policy):
    """Flow ODE (Euler) for flow models, DDIM with eta 0 for epsilon / v-prediction models."""
    return make_sampler("flow_ode" if policy.prediction_type == "flow" else "ddim", eta=0.0)


@torch.no_grad()
def generate(policy, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
             negative_prompt: str = "", progress=None) -> torch.Tensor:
    """One denoiser batch: image b from prompts[b] and noise seeded by seeds[b] -> [B, 3, H, W] in [0, 1]
    (clips [B, F, 3, H, W] for a video model). `progress` (a tqdm bar) advances by one per denoising step.

    Each image's noise is drawn alone from its own seed, so an image does not depend on its batch-mates.
    """
    noise = torch.cat([policy.initial_noise(1, generator=derive_generator(s)) for s in seeds]).to(policy.device)  # [B, *S]
    cond = policy.encode_prompt(list(prompts), negative_prompt)
    traj = sample(policy, cond, deterministic_sampler(policy), policy.schedule(steps), guidance_scale,
                  latents=noise, record=False, progress=progress)
    return policy.decode(traj.final)  # [B, 3, H, W] or [B, F, 3, H, W]


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write one image [3, H, W] (float in [0, 1] or uint8) as a PNG, atomically (temporary file + rename),
    so a killed run never leaves a truncated PNG that a resume would trust."""
    from PIL import Image

    pixels = image if image.dtype == torch.uint8 else to_uint8(image[None])[0]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_clip(clip: torch.Tensor, stem: Path, fps: float) -> None:
    """One clip uint8 [F, 3, H, W] -> stem.mp4 (to watch) and stem.mkv (its exact pixels, what a resume loads); the
    .mkv goes last, so a clip whose .mkv exists is complete."""
    save_mp4(clip, stem.with_suffix(".mp4"), fps)
    save_lossless_clip(clip, stem.with_suffix(".mkv"), fps)


def load_png(path: str | Path) -> torch.Tensor:
    """A PNG -> uint8 [3, H, W]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB")).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)  # [3, H, W]


# ---- statistics ----------------------------------------------------------------------------------
def _by_split(rows: list[dict], summarize_rows) -> dict:
    """{split: summarize_rows(rows of that split)} when the prompts carry a "split" (e.g. the toy world's train /
    unseen / unseen_pair sets evaluated together); {} otherwise."""
    splits = sorted({r["split"] for r in rows if r.get("split") is not None})
    return {split: summarize_rows([r for r in rows if r.get("split") == split]) for split in splits}


def compute_metrics(rows: list[dict], reward_names: list[str]) -> dict:
    """Per reward: `diffrl.stats.score_summary` over the images (clustered by prompt), with per-tag entries and
    `mean_over_tags` (GenEval's overall score) ± its stderr when any row has a tag; the same per split under
    "splits" when the prompts carry one."""
    def summary(name):
        def of(sel):
            return score_summary([r[name] for r in sel], [r["prompt_index"] for r in sel], [r["tag"] for r in sel])
        entry = of(rows)
        if splits := _by_split(rows, of):
            entry["splits"] = splits
        return entry

    return {name: summary(name) for name in reward_names}


def compare_scores(before: list[dict], after: list[dict], reward_names: list[str]) -> dict:
    """Per reward, the paired difference after - before over the same images (`diffrl.stats.paired`), per split
    too when the prompts carry one; the rows of two `evaluate` runs of one prompt set with the same seeds (the
    images must match one to one)."""
    keys = [(r["prompt_index"], r["seed"]) for r in before]
    if keys != [(r["prompt_index"], r["seed"]) for r in after]:
        raise ValueError("the two evaluations did not score the same prompts and seeds")
    out = {}
    for name in reward_names:
        def diff(indices):
            return paired([before[i][name] for i in indices], [after[i][name] for i in indices],
                          [before[i]["prompt_index"] for i in indices], [before[i]["tag"] for i in indices])
        entry = diff(range(len(before)))
        splits = sorted({r["split"] for r in before if r.get("split") is not None})
        if splits:
            entry["splits"] = {s: diff([i for i, r in enumerate(before) if r.get("split") == s]) for s in splits}
        out[name] = entry
    return out


# ---- the harness ---------------------------------------------------------------------------------
def _check_settings(out: Path, settings: dict, prompts: list[str]) -> None:
    """Refuse to resume into a folder whose images were made with other settings or prompts."""
    path = out / _SETTINGS_FILE
    if not path.is_file() or not any(f.suffix in (".png", ".mkv", ".safetensors") for f in (out / "images").iterdir()):
        return
    old = json.loads(path.read_text())
    diff = [f"{k}: {old['settings'].get(k)!r} then, {v!r} now" for k, v in settings.items() if old["settings"].get(k) != v]
    diff += [f"prompt {i}: {a!r} then, {b!r} now" for i, (a, b) in enumerate(zip(old["prompts"], prompts)) if a != b][:3]
    if diff:
        raise ValueError(f"{out} holds images made with other settings ({'; '.join(diff)}); "
                         "use a fresh output dir or delete its images/ folder")


def _files(kind: str, prompt_index: int, image_index: int, motion_videos: bool = True) -> dict[str, str]:
    """The files of one sample, relative to the output dir: "file" to open, and for a clip "frames", its exact pixels,
    for a motion "features", its exact features (and "file" its stick-figure MP4, unless `motion_videos` is off)."""
    stem = f"images/{prompt_index:04d}_{image_index:02d}"
    if kind == "motion":
        return {"file": f"{stem}.mp4" if motion_videos else f"{stem}.safetensors", "features": f"{stem}.safetensors"}
    return {"file": f"{stem}.mp4", "frames": f"{stem}.mkv"} if kind == "video" else {"file": f"{stem}.png"}


def save_motion(features: torch.Tensor, stem: Path, fps: float, caption: str, video: bool = True) -> None:
    """One motion's features [T, 263] -> stem.mp4 (the stick figure, to watch) and stem.safetensors (the features
    and their joints [T, 22, 3] in metres, y up, with the caption and frame rate as metadata: what a resume loads,
    and what Blender and other tools can read); the .safetensors goes last, so a motion whose file exists is
    complete. `video` False: no MP4 (rendering it takes about 0.5 s a motion on a CPU)."""
    from safetensors.torch import save_file

    from diffrl.motion.render import save_motion_mp4
    from diffrl.motion.representation import recover_from_ric

    joints = recover_from_ric(features)  # [T, 22, 3]
    if video:
        save_motion_mp4(joints, stem.with_suffix(".mp4"), caption=caption, fps=fps)
    tmp = stem.with_name(f".{stem.name}.safetensors.tmp")
    save_file({"features": features.contiguous(), "joints": joints.contiguous()}, tmp,
              metadata={"caption": caption, "fps": f"{fps:g}"})
    os.replace(tmp, stem.with_suffix(".safetensors"))


def _stick_figure_clip(features: torch.Tensor) -> torch.Tensor:
    """A motion's features [T, 263] -> its stick figure uint8 [T, 3, H, W] at the report grid's cell height (160)."""
    from diffrl.motion.render import render_clip
    from diffrl.motion.representation import recover_from_ric

    return torch.from_numpy(render_clip(recover_from_ric(features), size=160)).permute(0, 3, 1, 2)  # [T, 3, H, W]


def load_motion_features(path: str | Path) -> torch.Tensor:
    """A motion's .safetensors -> its features [T, 263]."""
    from safetensors.torch import load_file

    return load_file(path)["features"]


def _sample_or_load(policy, out: Path, files: list[dict], prompts: list[str], seeds: list[int], *, fps: float,
                    progress, motion_videos: bool = True, **sampling) -> tuple[torch.Tensor, int]:
    """The uint8 pixels of one batch ([b, 3, H, W], clips [b, F, 3, H, W]; motions: float32 features [b, T, 263]):
    loaded where their file exists, the rest generated in one denoiser batch and saved. Returns (pixels, how many
    were generated)."""
    video, motion = "frames" in files[0], "features" in files[0]
    stored = [f["frames" if video else "features" if motion else "file"] for f in files]  # what a resume loads
    missing = [b for b, f in enumerate(stored) if not (out / f).is_file()]
    pixels: list[torch.Tensor | None] = [None] * len(files)
    if missing:
        made = generate(policy, [prompts[b] for b in missing], [seeds[b] for b in missing], progress=progress, **sampling)
        made = made.float().cpu() if motion else to_uint8(made)
        for b, px in zip(missing, made):
            if video:
                save_clip(px, out / Path(stored[b]).with_suffix(""), fps)
            elif motion:
                save_motion(px, out / Path(stored[b]).with_suffix(""), fps, prompts[b], video=motion_videos)
            else:
                save_png(px, out / stored[b])
            pixels[b] = px
    for b, f in enumerate(stored):
        if pixels[b] is None:
            pixels[b] = read_video(out / f) if video else load_motion_features(out / f) if motion else load_png(out / f)
    return torch.stack(pixels), len(missing)


def evaluate(
    policy,
    prompt_set: PromptSet,
    rewards: Sequence[str | Reward],
    *,
    images_per_prompt: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    batch_size: int,
    output_dir: str | Path,
    negative_prompt: str = "",
    run_dir: str | Path | None = None,
    settings: dict | None = None,
    progress: bool = True,
    fps: float = DEFAULT_FPS,
    motion_videos: bool = True,
) -> dict:
    """Sample (or load) every image of `prompt_set`, score it with every reward, write the outputs.

    Writes under `output_dir`: images/PPPP_JJ.png, scores.jsonl (one row per image), metrics.json (the
    returned dict), grid.png, reward_hist.png, report.md, and training_curves.png when `run_dir` (a
    training output_dir) holds metrics.jsonl. `batch_size` images (across prompts) go through the
    denoiser at once. `settings` (e.g. model name, LoRA) is recorded and must match on a resume.
    A video model writes images/PPPP_JJ.mp4 and .mkv per clip instead, and grid.gif; `fps` is their frame rate.
    A motion model writes images/PPPP_JJ.mp4 (stick figure) and .safetensors (features, joints) per motion; with
    `motion_videos` False only the .safetensors (the trainers benchmark: hundreds of motions per checkpoint).
    """
    from tqdm.auto import tqdm

    from diffrl.benchmarks.report import write_report

    if images_per_prompt < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"images_per_prompt, batch_size and steps must be >= 1, got {images_per_prompt}, {batch_size}, {steps}")
    reward_fns = [build_reward(r) if isinstance(r, str) else r for r in rewards]
    names = [r.name for r in reward_fns]
    clash = set(names) & {"prompt_index", "image_index", "prompt", "tag", "seed", "file", "frames", "features"}
    if clash or len(set(names)) != len(names):
        raise ValueError(f"reward names must be distinct and not clash with score columns: {names}")
    device = policy.device
    reward_fns = [r.to(device) for r in reward_fns]
    video, motion = policy.sample_kind == "video", policy.sample_kind == "motion"

    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    full = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "images_per_prompt": images_per_prompt,
            "negative_prompt": negative_prompt, **({"num_frames": policy.num_frames, "fps": fps} if video or motion else {}),
            **(settings or {})}
    _check_settings(out, full, prompt_set.prompts)
    (out / _SETTINGS_FILE).write_text(json.dumps({"settings": full, "prompts": prompt_set.prompts}, indent=1))

    K = images_per_prompt
    items = [(i, j) for i in range(len(prompt_set)) for j in range(K)]
    rows, grid_images = [], []
    n_generated = 0
    grid_size = GRID_CLIPS if video or motion else GRID_IMAGES
    # clips take long: count denoising steps (one per step of each batch); images: count images
    chunks = range(0, len(items), batch_size)
    bar = tqdm(total=len(chunks) * steps if video else len(items), desc="eval", unit="step" if video else "img",
               disable=not progress)
    for start in chunks:
        chunk = items[start : start + batch_size]
        files = [_files(policy.sample_kind, i, j, motion_videos) for i, j in chunk]
        seeds = [image_seed(seed, i, K, j) for i, j in chunk]
        prompts = [prompt_set.prompts[i] for i, _ in chunk]
        pixels, made = _sample_or_load(policy, out, files, prompts, seeds, fps=fps, progress=bar if video else None,
                                       motion_videos=motion_videos,
                                       steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
        n_generated += made
        images = pixels if motion else pixels.float().div(255)  # [b, 3, H, W] or [b, F, 3, H, W] in [0, 1], exactly the saved pixels
        metadata = [prompt_set.metadata[i] for i, _ in chunk]
        scores = {r.name: r(images.to(device), prompts, metadata).tolist() for r in reward_fns}
        for b, (i, j) in enumerate(chunk):
            rows.append({"prompt_index": i, "image_index": j, "prompt": prompts[b], "tag": metadata[b].get("tag"),
                         **({"split": metadata[b]["split"]} if "split" in metadata[b] else {}),
                         "seed": seeds[b], **files[b], **{n: scores[n][b] for n in names}})
        grid_images.extend(pixels[: max(0, grid_size - len(grid_images))])
        bar.set_postfix(generated=n_generated, loaded=len(rows) - n_generated, refresh=False)
        if not (video and made):  # a generated batch of clips advanced the bar step by step
            bar.update(steps if video else len(chunk))
    bar.close()

    with open(out / "scores.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    metrics = {
        "num_prompts": len(prompt_set),
        "images_per_prompt": K,
        "num_images": len(rows),
        "sample_kind": policy.sample_kind,
        "settings": full,
        "rewards": compute_metrics(rows, names),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if motion:  # the report shows motions as stick-figure clips
        grid_images = [_stick_figure_clip(features) for features in grid_images]
    write_report(out, metrics, rows, names, grid_images=torch.stack(grid_images), run_dir=run_dir, fps=fps)
    return metrics
