"""Model families by name: `load_policy("tiny-sd3")`, a local diffusers folder, or a cached hub id.

Imports are lazy (strings) so that `resolve_family` can validate a config without loading torch
models or weights.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from diffrl.core.registry import suggest
from diffrl.hub import cached_snapshot, hub_cache_dir, looks_like_hub_id

POLICY_FAMILIES = {
    "sd": "diffrl.pipelines.sd:StableDiffusionPolicy",
    "sd3": "diffrl.pipelines.sd3:SD3Policy",
    "flux": "diffrl.pipelines.flux:FluxPolicy",
    "wan": "diffrl.pipelines.wan:WanPolicy",
    "motion": "diffrl.pipelines.motion:MotionPolicy",
}
TINY_VARIANTS = {
    "tiny-wan22": ("wan", {"two_experts": True}),  # Wan2.2 A14B's layout: two experts split at boundary_ratio
    "tiny-wan22-ti2v": ("wan", {"ti2v": True}),  # Wan2.2 TI2V-5B's: one expert, its VAE, per-token timesteps
    "random-mdm": ("motion", {"mdm_size": True}),  # MDM's denoiser size, random weights: memory / speed benchmarks
}
"""Tiny random models of another layout of a family: name -> (family, options of the family's `tiny`)."""
TINY_MODELS = {"tiny-sd", "tiny-sd3", "tiny-flux", "tiny-wan", "tiny-motion", *TINY_VARIANTS}
FLOW_FAMILIES = ("sd3", "flux", "wan")
"""Families trained with rectified flow (velocity prediction); the others are DDPM / DDIM UNets."""
# trained SynthShapes toy base models shipped in assets/toy/ (diffrl pretrain-toy)
SHIPPED_MODELS = {"toy-sd3": "sd3", "toy-sd": "sd", "toy-wan": "wan", "toy-motion": "motion"}
SHIPPED_SIZES = {"toy-wan": {"resolution": 32, "num_frames": 9}}
"""The size a shipped model was trained at, used when none is given (the image toy models carry theirs in their
configs; WanPolicy's own default is Wan's 480 x 832 and 33 frames)."""


def shipped_model_dir(model: str) -> Path:
    """The installed folder of a shipped toy model ("toy-sd3" -> .../diffrl/assets/toy/sd3)."""
    import importlib.resources

    path = Path(str(importlib.resources.files("diffrl.assets") / "toy" / SHIPPED_MODELS[model]))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"shipped model {model!r} is missing from {path}: reinstall diffrl, or rebuild it with "
                                f"`diffrl pretrain-toy --family {SHIPPED_MODELS[model]} --output-dir {path}`")
    return path

# diffusers pipeline `_class_name` (model_index.json) -> family
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "WanPipeline": "wan",
    "MotionDiffusionPipeline": "motion",
}


def policy_class(family: str):
    """The Policy subclass of a family, imported on demand."""
    if family not in POLICY_FAMILIES:
        raise ValueError(f"unknown policy family {family!r}; valid families: {', '.join(sorted(POLICY_FAMILIES))}")
    module, name = POLICY_FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def resolve_model_dir(model: str) -> Path:
    """A local diffusers folder (with model_index.json) for `model`: a path, or a hub id found in the
    local Hugging Face cache. Never downloads; raises FileNotFoundError saying what was looked for,
    where, and how to fix it."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but not a diffusers pipeline: no model_index.json in it. "
                "Point at a folder written by `pipe.save_pretrained(...)` or a hub snapshot."
            )
        return path
    if not looks_like_hub_id(model):
        raise FileNotFoundError(
            f"model folder {str(path)!r} does not exist (looked for {path.resolve()}/model_index.json). "
            "Pass an existing diffusers folder, a hub id already in the local HF cache, or one of "
            f"{', '.join(sorted(TINY_MODELS))}."
        )
    try:
        snap = cached_snapshot(model)
    except Exception as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, ...
        raise FileNotFoundError(
            f"model {model!r} is neither a local folder nor a snapshot in the Hugging Face cache "
            f"({hub_cache_dir()}; set HF_HUB_CACHE / HF_HOME to use another). Fix: on a machine with network, "
            f"`hf download {model}` (then copy the cache here), or pass the local folder path."
        ) from err
    if not (snap / "model_index.json").is_file():
        raise FileNotFoundError(
            f"cached snapshot of {model!r} at {snap} has no model_index.json: it is not a diffusers pipeline "
            "or only part of it was downloaded."
        )
    return snap


def _family_of_dir(folder: Path) -> str:
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    if name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[name]
    raise ValueError(
        f"{folder} holds a {name or 'unnamed'} pipeline; supported pipelines: "
        + ", ".join(f"{k} ({v})" for k, v in PIPELINE_CLASSES.items())
    )


def _unknown(model: str) -> ValueError:
    names = sorted(TINY_MODELS | set(SHIPPED_MODELS))
    return ValueError(
        f"unknown model {model!r}.{suggest(model, names)} Valid names: {', '.join(names)}, a local diffusers folder "
        "(with model_index.json), or a hub id present in the local Hugging Face cache."
    )


def resolve_family(model: str, family: str | None = None) -> str:
    """The policy family of `model` without loading any weights (reads model_index.json at most)."""
    if family is not None:
        if family not in POLICY_FAMILIES:
            raise ValueError(f"unknown policy family {family!r}; valid families: {', '.join(sorted(POLICY_FAMILIES))}")
        return family
    if model in TINY_VARIANTS:
        return TINY_VARIANTS[model][0]
    if model in TINY_MODELS:
        return model.removeprefix("tiny-")
    if model in SHIPPED_MODELS:
        return SHIPPED_MODELS[model]
    path_like = "/" in model or os.sep in model or model.startswith((".", "~"))
    if model.startswith("tiny-") or not (path_like or Path(model).exists()):
        raise _unknown(model)  # a bare unknown name; paths and hub ids get FileNotFoundError below
    return _family_of_dir(resolve_model_dir(model))


def load_policy(
    model: str,
    *,
    family: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    resolution: int | None = None,
    seed: int = 0,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    vae_tile_size: int | None = None,
    vae_tile_stride: int | None = None,
):
    """Build the Policy for `model`: "tiny-<family>" (random tiny weights), a local diffusers
    folder, or a hub id in the local HF cache. `resolution` sets height = width (None: the
    pipeline's default; 32 for the tiny models), `height` / `width` a non-square size; `num_frames` the clip
    length of a video or motion family (a motion model has no resolution); `vae_*` how a video family's VAE decodes
    (`set_vae_chunking`: slicing, tiling)."""
    fam = resolve_family(model, family)
    cls = policy_class(fam)
    if num_frames is not None and cls.sample_kind not in ("video", "motion"):
        raise ValueError(f"num_frames is for video and motion models; {model} is a {fam} ({cls.sample_kind}) model")
    if cls.sample_kind == "motion" and any(v is not None for v in (resolution, height, width)):
        raise ValueError(f"{model} is a motion model: it has no resolution / height / width (got {resolution}, "
                         f"{height}, {width}); set num_frames for the clip length")
    chunking = {"slicing": vae_slicing, "tiling": vae_tiling, "tile_size": vae_tile_size, "tile_stride": vae_tile_stride}
    chunked = any(v not in (None, False) for v in chunking.values())
    if chunked and not hasattr(cls, "set_vae_chunking"):
        raise ValueError(f"vae_slicing / vae_tiling are options of the video (wan) VAE; {model} is a {fam} model")
    extra = {"num_frames": num_frames} if num_frames is not None else {}
    if model in TINY_MODELS:
        if (height or resolution) != (width or resolution):
            raise ValueError(f"the tiny models are square: got height {height or resolution}, width {width or resolution}")
        options = dict(TINY_VARIANTS.get(model, ("", {}))[1])
        if cls.sample_kind != "motion":
            options["resolution"] = height or resolution or 32
        policy = cls.tiny(seed=seed, dtype=torch_dtype, **options, **extra)
        policy.pipeline().to(device)
    else:
        if model in SHIPPED_MODELS:
            sizes = SHIPPED_SIZES.get(model, {})
            resolution = resolution or (None if height or width else sizes.get("resolution"))
            if "num_frames" in sizes and num_frames is None:
                extra = {"num_frames": sizes["num_frames"]}
            model = str(shipped_model_dir(model))
        policy = cls.from_pretrained(model, torch_dtype=torch_dtype, device=device, height=height or resolution,
                                     width=width or resolution, **extra)
    if chunked:
        policy.set_vae_chunking(**chunking)
    return policy


def denoiser_modules(model: str, family: str | None = None) -> dict[str, str] | None:
    """The trained network's submodules of `model` (dotted name -> class name), built on the meta device from its
    config: no weights are read and no memory is taken. None for a hub id not in the cache."""
    cls = policy_class(resolve_family(model, family))
    if model in TINY_MODELS:
        options = dict(TINY_VARIANTS.get(model, ("", {}))[1])
        with torch.device("meta"):
            net = cls.tiny(**options).trainable_module()
    else:
        try:
            folder = shipped_model_dir(model) if model in SHIPPED_MODELS else resolve_model_dir(model)
        except FileNotFoundError:
            return None
        library, class_name = json.loads((folder / "model_index.json").read_text())[cls.lora_component]
        net_class = getattr(importlib.import_module(library), class_name)
        with torch.device("meta"):
            net = net_class.from_config(net_class.load_config(folder / cls.lora_component))
    return {name: type(module).__name__ for name, module in net.named_modules() if name}


def pipeline_index(model: str) -> dict | None:
    """model_index.json of a diffusers folder, shipped toy model or cached hub id, without loading weights; None for
    the tiny builders and for a model not found (loading it says what is missing)."""
    if model in TINY_MODELS:
        return None
    try:
        folder = shipped_model_dir(model) if model in SHIPPED_MODELS else resolve_model_dir(model)
    except FileNotFoundError:
        return None
    return json.loads((folder / "model_index.json").read_text())


def freeze_for_sampling(pipe):
    """Every module of `pipe` in eval mode (no dropout) with gradients off; adapters add LoRA later."""
    pipe.set_progress_bar_config(disable=True)
    for name in pipe.components:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.eval()
            module.requires_grad_(False)
    return pipe


def _dtype_kwarg(torch_dtype: torch.dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); older versions know only `torch_dtype`."""
    try:
        from diffusers.utils import deprecation_utils

        renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    except ImportError:
        renamed = False
    return {"dtype": torch_dtype} if renamed else {"torch_dtype": torch_dtype}


def load_pipeline(pipeline_cls, model: str, *, torch_dtype: torch.dtype = torch.float32, device="cpu", **kwargs):
    """`pipeline_cls.from_pretrained` on a local folder or cached hub snapshot, offline, frozen.
    `kwargs` go to `from_pretrained` (e.g. safety_checker=None)."""
    folder = resolve_model_dir(model)
    index = json.loads((folder / "model_index.json").read_text())
    found = index.get("_class_name")
    # components saved as absent ([null, null], e.g. an SD3 without T5) must be passed as None to load
    for name, entry in index.items():
        if isinstance(entry, list) and entry == [None, None]:
            kwargs.setdefault(name, None)
    if found and found != pipeline_cls.__name__:
        raise ValueError(f"{folder} holds a {found}, not a {pipeline_cls.__name__}; use load_policy({model!r}) to pick the family")
    pipe = pipeline_cls.from_pretrained(str(folder), **_dtype_kwarg(torch_dtype), local_files_only=True, **kwargs)
    return freeze_for_sampling(pipe.to(device))
