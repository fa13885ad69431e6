"""Text-to-motion diffusion (MDM-style, HumanML3D features) behind the Policy interface.

Latents are normalised feature sequences [B, T, 263] (T frames at 20 fps); `decode` de-normalises them with the
mean / std the denoiser stores, giving HumanML3D features [B, T, 263] (`diffrl.motion` turns them into joints). The
model predicts x0 ("sample", MDM's START_X) or epsilon, as its scheduler config says. The schedule is the DDIM
schedule of the folder's scheduler config: with a DDPMScheduler (MDM's 1000-step cosine DDPM) our DDIM step at
eta = 1 on the same timesteps is DDPM's ancestral step (fixed-small posterior variance), eta = 0 deterministic DDIM.
Classifier-free guidance is `uncond + g (cond - uncond)`, the unconditional embedding being the empty prompt's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffrl.pipelines.base import Condition, Policy, at_least_float32, ddim_schedule
from diffrl.pipelines.motion_model import MotionDiffusionPipeline, MotionTransformer
from diffrl.sampling import Schedule

HUMANML3D_FEATURES = 263
"""Features per frame of HumanML3D's representation."""
PREDICTION_TYPES = ("sample", "epsilon")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TINY_FRAMES, TINY_MAX_FRAMES = 60, 196
MDM_SIZE = {"latent_dim": 512, "num_layers": 8, "ff_dim": 1024}
"""MDM's HumanML3D denoiser size (trans_enc, 4 heads)."""
"""tiny-motion's default clip length (3 s at 20 fps) and its max_frames (MDM's 196)."""


def check_scheduler(scheduler) -> None:
    """A DDPMScheduler or DDIMScheduler whose step our DDIM step reproduces: x0 or epsilon output, no clipping or
    thresholding of x0, DDPM's fixed-small variance; otherwise ValueError naming the setting."""
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        raise ValueError(f"a motion pipeline needs a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
    config = scheduler.config
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"motion scheduler prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {config.prediction_type!r}")
    if config.clip_sample or config.thresholding:
        raise ValueError("motion scheduler with clip_sample=True or thresholding=True is not supported (normalised "
                         "features are not bounded to [-1, 1]; our DDIM step does not clip): set both False")
    if isinstance(scheduler, DDPMScheduler) and config.variance_type != "fixed_small":
        raise ValueError(f"DDPMScheduler variance_type must be 'fixed_small' (MDM's FIXED_SMALL, the eta = 1 DDIM "
                         f"variance), got {config.variance_type!r}")


class MotionPolicy(Policy):
    """A `MotionTransformer` with CLIP text conditioning over a stock `MotionDiffusionPipeline`.

    `denoiser` is the transformer; latents are normalised features [B, num_frames, feature_dim].
    """

    family: ClassVar[str] = "motion"
    sample_kind: ClassVar[str] = "motion"  # decode returns HumanML3D features [B, T, 263]
    lora_component: ClassVar[str] = "transformer"
    pipeline_class: ClassVar[type] = MotionDiffusionPipeline

    def __init__(self, pipe: MotionDiffusionPipeline, num_frames: int | None = None):
        check_scheduler(pipe.scheduler)
        if not isinstance(pipe.transformer, MotionTransformer):
            raise ValueError("a motion pipeline's transformer must be a MotionTransformer, "
                             f"got {type(pipe.transformer).__name__}")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.prediction_type = pipe.scheduler.config.prediction_type
        self.num_frames = int(num_frames or pipe.config.default_frames)
        self.check_frames(self.num_frames)

    @property
    def max_frames(self) -> int:
        return int(self.pipe.transformer.config.max_frames)

    @property
    def feature_dim(self) -> int:
        return int(self.pipe.transformer.config.feature_dim)

    def check_frames(self, num_frames: int, key: str = "num_frames") -> None:
        if not 1 <= num_frames <= self.max_frames:
            raise ValueError(f"'{key}' must be in 1..{self.max_frames} (the model's max_frames, "
                             f"{self.max_frames / 20:.1f} s at 20 fps), got {num_frames}")

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", height: int | None = None, width: int | None = None,
                        num_frames: int | None = None) -> "MotionPolicy":
        """A MotionDiffusionPipeline folder (or a cached hub id; never downloads). `num_frames` defaults to the
        pipeline's `default_frames`."""
        from diffrl.pipelines.registry import load_pipeline

        if height is not None or width is not None:
            raise ValueError(f"motion models have no image size (got height={height}, width={width}); set num_frames")
        pipe = load_pipeline(MotionDiffusionPipeline, str(path_or_hub_id), torch_dtype=torch_dtype, device=device)
        return cls(pipe, num_frames=num_frames)

    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, num_frames: int = TINY_FRAMES,
             prediction_type: str = "sample", mdm_size: bool = False) -> "MotionPolicy":
        """Random tiny MDM (latent 32, 2 layers, 4 heads, ff 64, tiny CLIP; mean 0 / std 1): milliseconds a step.

        The scheduler is MDM's: DDPMScheduler, 1000 steps, cosine betas, x0-prediction, no clipping. A DDPM config
        (rather than SD's DDIM with set_alpha_to_one False, steps_offset 1) keeps MDM's convention that the last
        step lands on t = 0 with alpha_prev 1, i.e. returns the model's clean-sample prediction; DDIM sampling
        reads the same config. Weights depend only on `seed`; dropout 0, eval mode. `mdm_size`: the denoiser at MDM's
        HumanML3D size instead (latent 512, 8 layers, 4 heads, ff 1024: 17.6 M parameters; "random-mdm"), for memory
        and speed measurements; the text encoder stays tiny (it runs once per batch, without gradient).
        """
        from transformers import CLIPTextModel

        from diffrl.pipelines.registry import freeze_for_sampling
        from diffrl.pipelines.tiny import _finish, _seeded, _tiny_clip_config, clip_tokenizer

        tokenizer = clip_tokenizer()
        clip_config = _tiny_clip_config(len(tokenizer))
        transformer = _seeded(seed, lambda: MotionTransformer(
            feature_dim=HUMANML3D_FEATURES, **(MDM_SIZE if mdm_size else {"latent_dim": 32, "num_layers": 2, "ff_dim": 64}),
            num_heads=4,
            text_dim=clip_config.hidden_size, max_frames=TINY_MAX_FRAMES, dropout=0.0))
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                  prediction_type=prediction_type, clip_sample=False)
        pipe = MotionDiffusionPipeline(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer,
                                       text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(clip_config)),
                                       default_frames=num_frames)
        return cls(freeze_for_sampling(_finish(pipe, dtype)), num_frames=num_frames)

    # ---- the interface ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompt: str = "") -> Condition:
        """Pooled CLIP embeddings [B, C] of the prompts and of the negative prompt, as the pipeline encodes them."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text = self.pipe.encode_prompt(prompts, self.device)  # [B, C]
        uncond = self.pipe.encode_prompt([negative_prompt] * len(prompts), self.device)  # [B, C]
        return Condition(cond={"text_embeds": text.to(self.dtype)}, uncond={"text_embeds": uncond.to(self.dtype)})

    def schedule(self, num_steps: int) -> Schedule:
        return ddim_schedule(self.pipe.scheduler, num_steps)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """randn [B, num_frames, D] in float32 (float64 for a float64 policy), as the pipeline draws it."""
        shape = (batch_size, self.num_frames, self.feature_dim)
        dtype = torch.promote_types(self.dtype, torch.float32)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)  # [B, T, D]
        return noise * self.pipe.scheduler.init_noise_sigma  # [B, T, D]

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Condition, guidance_scale: float) -> torch.Tensor:
        """Transformer output (x0 or epsilon) with CFG `uncond + g (cond - uncond)` when g > 1, batched [uncond, cond].
        (DDPM / DDIM's scale_model_input is the identity, so it is not called.)"""
        x_t = x_t.to(self.dtype)  # trajectories are kept in float32 or wider; the model runs in its own dtype
        text = cond.cond["text_embeds"]  # [B, C]
        timestep = timestep.to(x_t.device)  # [B]
        if guidance_scale > 1:
            if cond.uncond is None:
                raise ValueError(f"guidance_scale {guidance_scale} > 1 needs unconditional embeddings (Condition.uncond)")
            x_in = torch.cat([x_t, x_t])  # [2B, T, D]
            t_in = torch.cat([timestep, timestep])  # [2B]
            text = torch.cat([cond.uncond["text_embeds"], text])  # [2B, C]
        else:
            x_in, t_in = x_t, timestep
        out = self.denoiser(x_in, t_in, text_embeds=text, return_dict=False)[0]  # [2B or B, T, D]
        if guidance_scale > 1:
            out_uncond, out_text = out.chunk(2)  # [B, T, D] each
            out = self.classifier_free_guidance(out_uncond, out_text, guidance_scale)
        return out  # [B, T, D]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, T, D] -> HumanML3D features latents * std + mean [B, T, D] (float32 or float64)."""
        net = self.trainable_module()
        x = at_least_float32(latents)  # [B, T, D]
        return x * net.feature_std.to(x.dtype) + net.feature_mean.to(x.dtype)  # [B, T, D]

    def set_attention_backend(self, backend: str = "sdpa", compute_dtype: torch.dtype | None = None) -> None:
        """The motion transformer calls torch's scaled_dot_product_attention itself (no diffusers dispatcher): "sdpa"
        or "auto" (its kernels ordered for the GPU) only."""
        if backend not in ("sdpa", "auto"):
            raise ValueError(f"attention_backend {backend!r} is not available for the motion transformer, which calls "
                             "torch's scaled_dot_product_attention directly: use 'sdpa' or 'auto'")
        super().set_attention_backend(backend, compute_dtype)

    # ---- LoRA through the model-level peft API (the pipeline has no LoRA loader mixin) ----------
    def _write_lora(self, net: nn.Module, folder: Path) -> None:
        """`net`'s "default" adapter as `pytorch_lora_weights.safetensors` in `folder`, keys as peft names them
        (no component prefix), its peft config (lora_alpha included) as the file's metadata."""
        net.save_lora_adapter(str(folder), adapter_name="default", weight_name=LORA_WEIGHTS)

    def lora_usage(self, folder: str = "path/to/this/folder") -> str:
        return f'pipe.transformer.load_lora_adapter("{folder}", prefix=None, weight_name="{LORA_WEIGHTS}")'

    def _read_lora(self, directory: Path, net: nn.Module, **load_kwargs) -> None:
        """The LoRA file in `directory` into `net` as adapter "default" with `load_lora_adapter`; keys without a
        prefix (as `save_lora` writes them) or under "transformer." (a pipeline-level LoRA file). ValueError unless
        every LoRA layer of the file found its module."""
        from safetensors import safe_open

        with safe_open(str(self._require_lora_file(directory)), "pt") as f:
            keys = list(f.keys())
        prefixed = bool(keys) and all(k.startswith(f"{self.lora_component}.") for k in keys)
        in_file = sum(".lora_A." in k or ".lora_down." in k for k in keys)
        net.load_lora_adapter(str(directory), prefix=self.lora_component if prefixed else None, adapter_name="default",
                              weight_name=LORA_WEIGHTS, local_files_only=True, **load_kwargs)
        loaded = sum(".lora_A.default." in name for name, _ in net.named_parameters())
        if loaded == 0 or loaded < in_file:
            raise ValueError(f"the LoRA in {directory} does not fit this {self.family} model's {self.lora_component}: "
                             f"{loaded} of its {in_file} LoRA layers loaded (a LoRA of another model or family?)")


def model_limits(model: str) -> dict[str, int]:
    """{"feature_dim", "max_frames", "default_frames"} of a motion model, read from its folder's JSON files without
    loading weights (config validation uses it); the tiny builder's values for "tiny-motion"."""
    import json

    from diffrl.pipelines.motion_model import MDM_FRAMES
    from diffrl.pipelines.registry import SHIPPED_MODELS, TINY_MODELS, pipeline_index, resolve_model_dir, shipped_model_dir

    if model in TINY_MODELS:
        return {"feature_dim": HUMANML3D_FEATURES, "max_frames": TINY_MAX_FRAMES, "default_frames": TINY_FRAMES}
    folder = shipped_model_dir(model) if model in SHIPPED_MODELS else resolve_model_dir(model)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    index = pipeline_index(model) or {}
    return {"feature_dim": int(config.get("feature_dim", HUMANML3D_FEATURES)), "max_frames": int(config["max_frames"]),
            "default_frames": int(index.get("default_frames", MDM_FRAMES))}
