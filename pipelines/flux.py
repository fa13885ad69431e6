"""FLUX.1 (guidance-distilled rectified flow) behind the Policy interface.

Latents stay unpacked [B, C, h, w] everywhere outside this file; they are packed into 2x2 patch
tokens [B, h/2 * w/2, 4C] only around the transformer call, with the pipeline's own helpers.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from diffrl.pipelines.base import Condition, Policy, at_least_float32
from diffrl.pipelines.registry import freeze_for_sampling
from diffrl.sampling import Schedule


class FluxPolicy(Policy):
    """FLUX transformer with the distilled guidance embedding (no true CFG: `Condition.uncond` is None)."""

    family = "flux"
    pipeline_class = FluxPipeline
    default_guidance_scale = 3.5

    def __init__(
        self,
        pipe: FluxPipeline,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 512,
    ):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.prediction_type = "flow"
        default = pipe.default_sample_size * pipe.vae_scale_factor  # as the pipeline's __call__
        self.height = int(height or default)
        self.width = int(width or default)
        self.max_sequence_length = max_sequence_length

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, resolution: int = 32) -> "FluxPolicy":
        """Random tiny FLUX (diffusers' test sizes): ~0.1 M parameters, milliseconds per step on a CPU."""
        from diffrl.pipelines.tiny import tiny_flux_pipeline

        pipe = freeze_for_sampling(tiny_flux_pipeline(seed=seed, dtype=dtype, resolution=resolution))
        return cls(pipe, height=resolution, width=resolution, max_sequence_length=32)

    # ---- the interface ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompt: str = "") -> Condition:
        """`negative_prompt` is ignored: FLUX.1 is guidance-distilled and has no unconditional branch."""
        pe, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        dt = self.dtype
        return Condition(
            cond={"encoder_hidden_states": pe.to(dt), "pooled_projections": pooled.to(dt)},  # [B, L, D], [B, P]
            uncond=None,
            extra={"txt_ids": text_ids.to(dt)},  # [L, 3], shared by the batch
        )

    def latent_shape(self) -> tuple[int, int, int]:
        f2 = self.pipe.vae_scale_factor * 2  # VAE factor times the 2x2 packing, as prepare_latents
        return (self.pipe.transformer.config.in_channels // 4, 2 * (self.height // f2), 2 * (self.width // f2))

    def schedule(self, num_steps: int) -> Schedule:
        scheduler = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)  # as FluxPipeline.__call__
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        _, h, w = self.latent_shape()
        mu = calculate_shift(
            (h // 2) * (w // 2),  # packed image sequence length
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        return Schedule(
            kind="flow",
            timesteps=scheduler.timesteps.clone().to(self.device),  # [N]
            sigmas=scheduler.sigmas.clone().to(self.device),  # [N + 1], last 0
        )

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return randn_tensor((batch_size, *self.latent_shape()), generator=generator, device=self.device, dtype=self.dtype)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)  # [B, h/2 * w/2, 4C]

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        f = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(tokens, h * f, w * f, f)  # [B, C, h, w]

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Condition, guidance_scale: float) -> torch.Tensor:
        x_t = x_t.to(self.dtype)  # trajectories are kept in float32 or wider; the model runs in its own dtype
        b, _, h, w = x_t.shape
        net = self.denoiser
        guidance = None
        if self.trainable_module().config.guidance_embeds:
            guidance = torch.full([b], float(guidance_scale), device=x_t.device, dtype=torch.float32)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)  # [h/2 * w/2, 3]
        v = net(
            hidden_states=self.pack(x_t),
            timestep=timestep.to(x_t.dtype) / 1000,  # the pipeline feeds t / 1000
            guidance=guidance,
            pooled_projections=cond.cond["pooled_projections"],
            encoder_hidden_states=cond.cond["encoder_hidden_states"],
            txt_ids=cond.extra["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return self.unpack(v, h, w)  # [B, C, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return at_least_float32((image / 2 + 0.5).clamp(0, 1))
