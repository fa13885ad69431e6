"""Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) behind the Policy interface."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from diffrl.pipelines.base import Condition, Policy, at_least_float32
from diffrl.pipelines.registry import freeze_for_sampling
from diffrl.sampling import Schedule


class SD3Policy(Policy):
    """SD3 transformer with CFG over two CLIP encoders + T5; latents [B, C, H/f, W/f], velocity output."""

    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
    ):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.prediction_type = "flow"
        default = pipe.default_sample_size * pipe.vae_scale_factor  # as the pipeline's __call__
        self.height = int(height or default)
        self.width = int(width or default)
        if max_sequence_length is None:
            # without a T5 encoder diffusers feeds max_sequence_length all-zero tokens: one is enough
            # (a stock pipeline reproduces our samples when given the same max_sequence_length)
            max_sequence_length = 256 if pipe.text_encoder_3 is not None else 1
        self.max_sequence_length = max_sequence_length  # T5 tokens, passed to pipe.encode_prompt

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, resolution: int = 32) -> "SD3Policy":
        """Random tiny SD3 (diffusers' test sizes): ~0.1 M parameters, milliseconds per step on a CPU."""
        from diffrl.pipelines.tiny import tiny_sd3_pipeline

        pipe = freeze_for_sampling(tiny_sd3_pipeline(seed=seed, dtype=dtype, resolution=resolution))
        return cls(pipe, height=resolution, width=resolution, max_sequence_length=32)

    # ---- the interface ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompt: str = "") -> Condition:
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        dt = self.dtype
        return Condition(
            cond={"encoder_hidden_states": pe.to(dt), "pooled_projections": pooled.to(dt)},  # [B, L, D], [B, P]
            uncond={"encoder_hidden_states": npe.to(dt), "pooled_projections": npooled.to(dt)},
        )

    def latent_shape(self) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels, self.height // f, self.width // f)

    def schedule(self, num_steps: int) -> Schedule:
        scheduler = self.pipe.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):  # mu from the image sequence length, as __call__
            _, h, w = self.latent_shape()
            p = self.pipe.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (h // p) * (w // p),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, num_steps, self.device, **kwargs)
        return Schedule(
            kind="flow",
            timesteps=scheduler.timesteps.clone().to(self.device),  # [N]
            sigmas=scheduler.sigmas.clone().to(self.device),  # [N + 1], last 0
        )

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return randn_tensor((batch_size, *self.latent_shape()), generator=generator, device=self.device, dtype=self.dtype)

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Condition, guidance_scale: float) -> torch.Tensor:
        x_t = x_t.to(self.dtype)  # trajectories are kept in float32 or wider; the model runs in its own dtype
        c = cond.cond
        if guidance_scale > 1:  # CFG exactly as the pipeline: batch [uncond, cond]
            if cond.uncond is None:
                raise ValueError(f"guidance_scale {guidance_scale} > 1 needs unconditional embeddings (Condition.uncond)")
            u = cond.uncond
            v = self.denoiser(
                hidden_states=torch.cat([x_t, x_t]),  # [2B, C, h, w]
                timestep=torch.cat([timestep, timestep]),  # [2B]
                encoder_hidden_states=torch.cat([u["encoder_hidden_states"], c["encoder_hidden_states"]]),
                pooled_projections=torch.cat([u["pooled_projections"], c["pooled_projections"]]),
                return_dict=False,
            )[0]
            v_uncond, v_cond = v.chunk(2)  # [B, C, h, w] each
            return self.classifier_free_guidance(v_uncond, v_cond, guidance_scale)
        return self.denoiser(
            hidden_states=x_t,
            timestep=timestep,
            encoder_hidden_states=c["encoder_hidden_states"],
            pooled_projections=c["pooled_projections"],
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return at_least_float32((image / 2 + 0.5).clamp(0, 1))
