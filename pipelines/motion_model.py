"""The text-to-motion denoiser (MDM's `trans_enc`) and its stock diffusers pipeline.

`MotionTransformer` denoises HumanML3D feature sequences [B, T, 263] (normalised by the data's mean / std, which it
keeps as buffers so that a saved folder is self-contained). One token, the timestep embedding plus the projected
pooled CLIP text embedding, is prepended to the frame tokens; a transformer encoder runs over all of them and the
frame tokens are projected back to features. Attention is written with separate `to_q` / `to_k` / `to_v` / `to_out`
layers so that peft LoRA targets them as it targets the image denoisers' attention.

`MotionDiffusionPipeline` samples with its scheduler's own `step` (DDPMScheduler: ancestral DDPM; DDIMScheduler: DDIM
with eta): it is the reference that diffrl's rollout loop is tested against, and the way to use a trained model
without diffrl. Nothing here imports diffrl: a folder saved by `save_pretrained` loads with
`MotionDiffusionPipeline.from_pretrained(folder)` once this module is imported (diffusers records the denoiser by its
module path and resolves it among the imported modules).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

MDM_FRAMES = 120
"""MDM's default clip length: 6 s at HumanML3D's 20 fps (its `--motion_length 6.0`)."""
OUTPUT_TYPES = ("features", "normalized")


def sinusoidal_embedding(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """MDM's sinusoidal code of positions [*] (frame indices or diffusion timesteps) -> [*, dim], in `dtype`:
    channel 2k holds sin(p w_k), channel 2k + 1 cos(p w_k), w_k = 10000^(-2k / dim). Computed in float32 or wider
    (bf16 cannot even hold t = 999), in float64 for a float64 model, so that it stays float64 end to end."""
    wide = torch.promote_types(dtype, torch.float32)
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=wide, device=positions.device) * (-math.log(10000.0) / dim))  # [dim/2]
    angles = positions.to(wide)[..., None] * freqs  # [*, dim/2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).to(dtype)  # [*, dim]


class MotionAttention(nn.Module):
    """Multi-head self-attention over the sequence; `keep` [B, 1, 1, S] bool masks out padded keys."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])  # diffusers' layout: LoRA "to_out.0"

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        B, S, L = x.shape
        heads = lambda t: t.view(B, S, self.num_heads, L // self.num_heads).transpose(1, 2)  # noqa: E731  [B, H, S, L/H]
        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        h = h.transpose(1, 2).reshape(B, S, L)  # [B, S, L]
        return self.to_out[1](self.to_out[0](h))  # [B, S, L]


class MotionFeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear, as PyTorch's TransformerEncoderLayer (MDM's activation "gelu")."""

    def __init__(self, dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.proj_in = nn.Linear(dim, ff_dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(ff_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.dropout(F.gelu(self.proj_in(x))))  # [B, S, L]


class MotionBlock(nn.Module):
    """One transformer encoder layer: post-norm as MDM's `nn.TransformerEncoderLayer` (norm_first=False), or pre-norm."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.attn = MotionAttention(dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.ff = MotionFeedForward(dim, ff_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout1(self.attn(self.norm1(x), keep))  # [B, S, L]
            return x + self.dropout2(self.ff(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self.attn(x, keep)))  # [B, S, L]
        return self.norm2(x + self.dropout2(self.ff(x)))


@dataclass
class MotionTransformerOutput(BaseOutput):
    sample: torch.Tensor  # [B, T, D]: the model output (x0 or epsilon, as the scheduler was trained)


class MotionTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """MDM's `trans_enc` denoiser over normalised motion features [B, T, feature_dim].

    Defaults are MDM's HumanML3D model: 263 features, latent 512, 8 layers, 4 heads, ff 1024, dropout 0.1, post-norm,
    clips of at most 196 frames; `text_dim` is the text encoder's pooled width. `feature_mean` / `feature_std` [D]
    are the data normalisation (features = sample * std + mean), stored with the weights.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["MotionBlock"]

    @register_to_config
    def __init__(
        self,
        feature_dim: int = 263,
        latent_dim: int = 512,
        num_layers: int = 8,
        num_heads: int = 4,
        ff_dim: int = 1024,
        text_dim: int = 512,
        max_frames: int = 196,
        dropout: float = 0.1,
        norm_first: bool = False,
    ):
        super().__init__()
        if latent_dim % 2 or latent_dim % num_heads:
            raise ValueError(f"latent_dim must be even and a multiple of num_heads ({num_heads}), got {latent_dim}")
        self.proj_in = nn.Linear(feature_dim, latent_dim)
        self.time_embedding = TimestepEmbedding(latent_dim, latent_dim)  # Linear -> SiLU -> Linear, as MDM's
        self.text_embedding = nn.Linear(text_dim, latent_dim)
        self.input_dropout = nn.Dropout(dropout)  # MDM's dropout after the positional encoding
        self.blocks = nn.ModuleList(
            [MotionBlock(latent_dim, num_heads, ff_dim, dropout, norm_first) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(latent_dim) if norm_first else nn.Identity()  # pre-norm ends on a norm
        self.proj_out = nn.Linear(latent_dim, feature_dim)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))  # [D]
        self.register_buffer("feature_std", torch.ones(feature_dim))  # [D]
        self.gradient_checkpointing = False

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The data's per-feature mean and std [D] (features = normalised * std + mean); std must be positive."""
        D = self.config.feature_dim
        if tuple(mean.shape) != (D,) or tuple(std.shape) != (D,):
            raise ValueError(f"mean and std must have shape [{D}] (feature_dim), "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("std must be positive in every feature (clamp the data's std, e.g. at 1e-5)")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_embeds: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """sample [B, T, D] (normalised features at noise level `timestep` [B] or []), text_embeds [B, text_dim],
        frame_mask [B, T] bool (True: a frame of the clip; False: padding, masked as a key, output 0 there)."""
        cfg = self.config
        if sample.ndim != 3 or sample.shape[-1] != cfg.feature_dim:
            raise ValueError(f"sample must be [B, T, {cfg.feature_dim}] (feature_dim={cfg.feature_dim}), got "
                             f"{tuple(sample.shape)}: features per frame differ from the model's config")
        B, T, _ = sample.shape
        if T > cfg.max_frames:
            raise ValueError(f"the clip has {T} frames but this MotionTransformer takes at most max_frames="
                             f"{cfg.max_frames}; generate at most {cfg.max_frames} frames")
        if tuple(text_embeds.shape) != (B, cfg.text_dim):
            raise ValueError(f"text_embeds must be [{B}, {cfg.text_dim}] (text_dim={cfg.text_dim}), "
                             f"got {tuple(text_embeds.shape)}")
        if frame_mask is not None and (frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (B, T)):
            raise ValueError(f"frame_mask must be a bool tensor [{B}, {T}] (True: a frame of the clip), "
                             f"got {frame_mask.dtype} {tuple(frame_mask.shape)}")
        dtype, L = sample.dtype, cfg.latent_dim
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)  # [B]
        t_emb = self.time_embedding(sinusoidal_embedding(timestep, L, dtype))  # [B, L]
        cond = t_emb + self.text_embedding(text_embeds.to(dtype))  # [B, L]
        tokens = torch.cat([cond[:, None], self.proj_in(sample)], dim=1)  # [B, 1 + T, L]
        positions = torch.arange(T + 1, device=sample.device)  # the condition token sits at position 0
        tokens = self.input_dropout(tokens + sinusoidal_embedding(positions, L, dtype))  # [B, 1 + T, L]
        keep = None
        if frame_mask is not None:
            with_cond = torch.cat([frame_mask.new_ones(B, 1), frame_mask], dim=1)  # [B, 1 + T]
            keep = with_cond[:, None, None, :]  # [B, 1, 1, 1 + T]: every query sees the condition token
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, keep)
            else:
                tokens = block(tokens, keep)  # [B, 1 + T, L]
        out = self.proj_out(self.norm_out(tokens[:, 1:]))  # [B, T, D]
        if frame_mask is not None:
            out = out.masked_fill(~frame_mask[..., None], 0.0)  # [B, T, D]
        return MotionTransformerOutput(sample=out) if return_dict else (out,)


@dataclass
class MotionPipelineOutput(BaseOutput):
    motions: torch.Tensor  # [B, T, D]: HumanML3D features (de-normalised), or normalised ones


class MotionDiffusionPipeline(DiffusionPipeline):
    """Text-to-motion with a `MotionTransformer`, CLIP's pooled text embedding and a DDPM / DDIM scheduler.

    `default_frames` (saved in model_index.json) is the clip length when `num_frames` is not given.
    """

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: MotionTransformer, text_encoder, tokenizer, scheduler,
                 default_frames: int = MDM_FRAMES):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(default_frames=default_frames)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """CLIP's pooled text embedding (the end-of-text token's final state) of each prompt -> [B, text_dim]."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # [B, 77]
        return self.text_encoder(ids.to(device or self._execution_device)).pooler_output  # [B, text_dim]

    def check_frames(self, num_frames: int) -> None:
        limit = self.transformer.config.max_frames
        if not 1 <= num_frames <= limit:
            raise ValueError(f"num_frames must be in 1..{limit} (the transformer's max_frames), got {num_frames}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.5,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        negative_prompt: str = "",
        output_type: str = "features",
        return_dict: bool = True,
    ):
        """Sample motions [B, num_frames, D]: de-normalised features (output_type "features") or the model's
        normalised ones ("normalized"). CFG `uncond + g (cond - uncond)` when g > 1 (MDM samples at 2.5), the
        unconditional embedding being the negative prompt's (the empty prompt). `eta`: DDIM's noise scale (None: 0);
        a DDPMScheduler samples ancestrally, which is eta 1."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        takes_eta = "eta" in inspect.signature(self.scheduler.step).parameters
        if eta is not None and not takes_eta and eta != 1:
            raise ValueError(f"{type(self.scheduler).__name__} samples ancestrally (eta 1); got eta={eta}. Use a "
                             "DDIMScheduler (DDIMScheduler.from_config(pipe.scheduler.config)) for another eta")
        step_kwargs = {"eta": 0.0 if eta is None else eta} if takes_eta else {}
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        num_frames = num_frames or self.config.default_frames
        self.check_frames(num_frames)
        device, net = self._execution_device, self.transformer
        text = self.encode_prompt(prompts, device).to(net.dtype)  # [B, C]
        guided = guidance_scale > 1
        if guided:
            uncond = self.encode_prompt([negative_prompt] * len(prompts), device).to(net.dtype)  # [B, C]
            text = torch.cat([uncond, text])  # [2B, C]
        shape = (len(prompts), num_frames, net.config.feature_dim)
        dtype = torch.promote_types(net.dtype, torch.float32)  # the chain in float32 or wider
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (prompts, num_frames, feature_dim), "
                             f"got {tuple(latents.shape)}")
        x = latents.to(device=device, dtype=torch.promote_types(latents.dtype, torch.float32))  # [B, T, D]
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = torch.cat([x, x]) if guided else x  # [2B or B, T, D]
            x_in = self.scheduler.scale_model_input(x_in, t)
            out = net(x_in.to(net.dtype), t.expand(x_in.shape[0]), text, return_dict=False)[0]  # [2B or B, T, D]
            if guided:
                out_uncond, out_text = out.chunk(2)  # [B, T, D] each
                out = out_uncond + guidance_scale * (out_text - out_uncond)
            x = self.scheduler.step(out.to(x.dtype), t, x, generator=generator, return_dict=False, **step_kwargs)[0]
        if output_type == "features":
            x = x * net.feature_std.to(x.dtype) + net.feature_mean.to(x.dtype)  # [B, T, D]
        self.maybe_free_model_hooks()
        return MotionPipelineOutput(motions=x) if return_dict else (x,)
