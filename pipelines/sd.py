"""Stable Diffusion 1.x / 2.x: a UNet2DConditionModel with a DDIM schedule, behind `Policy`.

The policy keeps the stock `StableDiffusionPipeline` and reads everything off its components, so
the deterministic DDIM path (`make_sampler("ddim", eta=0.0)`) reproduces
`pipe(prompt, latents=noise, num_inference_steps=n, guidance_scale=g)` exactly. The model output is
"epsilon" or "v_prediction", as the scheduler config says.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from diffrl.pipelines.base import Condition, Policy, at_least_float32, ddim_schedule
from diffrl.sampling import Schedule


def _ddim_scheduler(scheduler):
    """The DDIMScheduler the SD pipeline would run with, whatever scheduler the folder ships.

    A non-DDIM scheduler (SD 1.x ships PNDM) is converted with `DDIMScheduler.from_config`;
    `set_alpha_to_one` defaults to False when the source config does not say (SD's convention, the
    DDIM default is True). `steps_offset=1` and `clip_sample=False` are forced exactly as
    `StableDiffusionPipeline.__init__` forces them on outdated configs.
    """
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        extra = {} if "set_alpha_to_one" in scheduler.config else {"set_alpha_to_one": False}
        scheduler = DDIMScheduler.from_config(scheduler.config, **extra)
    fixes = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if getattr(scheduler.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    if fixes:
        scheduler = DDIMScheduler.from_config(scheduler.config, **fixes)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"SD scheduler prediction_type must be 'epsilon' or 'v_prediction', got {scheduler.config.prediction_type!r}"
        )
    if scheduler.config.thresholding:
        raise ValueError("SD scheduler with thresholding=True is not supported (the DDIM sampler has no thresholding)")
    return scheduler


class StableDiffusionPolicy(Policy):
    """SD 1.x / 2.x over a stock `StableDiffusionPipeline` (safety checker None).

    `denoiser` is the UNet; latents are [B, 4, H / f, W / f] with f the VAE scale factor.
    """

    family: ClassVar[str] = "sd"
    lora_component: ClassVar[str] = "unet"  # the pipeline's name for its denoiser

    def __init__(self, pipe, height: int, width: int):
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("UNet with time_cond_proj_dim (guidance-embedded / LCM) is not supported by the SD policy")
        f = pipe.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the VAE scale factor {f}, got {height}x{width}")
        pipe.scheduler = _ddim_scheduler(pipe.scheduler)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.eval()
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.height, self.width = int(height), int(width)
        self.prediction_type = pipe.scheduler.config.prediction_type

    # ---- components -----------------------------------------------------------------------
    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def vae(self):
        return self.pipe.vae

    def encode_prompt(self, prompts: list[str], negative_prompt: str = "") -> Condition:
        """CLIP text embeddings via the pipeline's own `encode_prompt`: cond and the negative prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            list(prompts),
            self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * len(prompts),
        )
        return Condition(
            cond={"encoder_hidden_states": prompt_embeds},  # [B, L, D]
            uncond={"encoder_hidden_states": negative_embeds},  # [B, L, D]
        )

    def schedule(self, num_steps: int) -> Schedule:
        """DDIM timesteps and alphas as DDIMScheduler.step walks them, the final alpha its set_alpha_to_one's."""
        return ddim_schedule(self.scheduler, num_steps)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """As `prepare_latents`: randn [B, C, H / f, W / f] (drawn on the generator's device) * init_noise_sigma."""
        from diffusers.utils.torch_utils import randn_tensor

        f = self.pipe.vae_scale_factor
        shape = (batch_size, self.trainable_module().config.in_channels, self.height // f, self.width // f)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return noise * self.scheduler.init_noise_sigma  # [B, C, h, w]

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Condition, guidance_scale: float) -> torch.Tensor:
        """UNet output (epsilon or v) with CFG `uncond + g (text - uncond)` when g > 1, batched [uncond, cond]."""
        x_t = x_t.to(self.dtype)  # trajectories are kept in float32 or wider; the model runs in its own dtype
        text = cond.cond["encoder_hidden_states"]  # [B, L, D]
        timestep = timestep.to(x_t.device)  # [B]
        if guidance_scale > 1:
            if cond.uncond is None:
                raise ValueError("guidance_scale > 1 needs unconditional embeddings (Condition.uncond is None)")
            x_in = torch.cat([x_t, x_t])  # [2B, C, h, w]
            t_in = torch.cat([timestep, timestep])  # [2B]
            ehs = torch.cat([cond.uncond["encoder_hidden_states"], text])  # [2B, L, D]
        else:
            x_in, t_in, ehs = x_t, timestep, text
        x_in = self.scheduler.scale_model_input(x_in, t_in)  # identity for DDIM; kept as the pipeline does
        out = self.denoiser(x_in, t_in, encoder_hidden_states=ehs, return_dict=False)[0]  # [2B or B, C, h, w]
        if guidance_scale > 1:
            out_uncond, out_text = out.chunk(2)  # [B, C, h, w] each
            out = self.classifier_free_guidance(out_uncond, out_text, guidance_scale)
        return out  # [B, C, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """vae.decode(latents / scaling_factor), then (x / 2 + 0.5).clamp(0, 1) as float32 [B, 3, H, W]."""
        vae = self.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor  # [B, C, h, w]
        image = vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return at_least_float32((image / 2 + 0.5).clamp(0, 1))

    def default_lora_targets(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0"]

    # ---- builders ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        height: int | None = None,
        width: int | None = None,
    ) -> "StableDiffusionPolicy":
        """Load a diffusers SD folder, or a hub id already in the local HF cache (never downloads).

        height / width default to the UNet's sample_size times the VAE scale factor, like the pipeline.
        """
        from diffusers import StableDiffusionPipeline

        from diffrl.pipelines.registry import load_pipeline

        pipe = load_pipeline(
            StableDiffusionPipeline, str(path_or_hub_id), torch_dtype=torch_dtype, device=device,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return cls(pipe, height or default, width or default)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        resolution: int = 32,
        prediction_type: str = "epsilon",
    ) -> "StableDiffusionPolicy":
        """Random-weight SD with diffusers' test sizes (~100k params); a 4-step 32x32 sample takes milliseconds.

        Weights depend only on `seed` (the global RNG is left untouched); dropout is 0, all in eval mode.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from diffrl.pipelines.tiny import clip_tokenizer

        tokenizer = clip_tokenizer()
        vae_channels = (8, 8)
        vae_scale = 2 ** (len(vae_channels) - 1)
        if resolution % vae_scale:
            raise ValueError(f"resolution must be a multiple of {vae_scale}, got {resolution}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(
                sample_size=resolution // vae_scale,
                in_channels=4,
                out_channels=4,
                block_out_channels=(8, 16),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=2,
                norm_num_groups=4,
            )
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
                block_out_channels=vae_channels,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=resolution,
            )
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=tokenizer.model_max_length,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    attention_dropout=0.0,
                    dropout=0.0,
                )
            )
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        )
        if dtype != torch.float32:
            unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)
        pipe = StableDiffusionPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            unet=unet.eval(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, resolution, resolution)
