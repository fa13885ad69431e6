"""Wan2.1 / Wan2.2 text-to-video (flow matching) behind the Policy interface.

Latents are video latents [B, C, F', H/f, W/f] in the pipeline's normalised space (f = 8, C = 16; Wan2.2 TI2V-5B's
VAE: f = 16, C = 48), with F' = (frames - 1) / 4 + 1 (the VAE compresses time 4x, causally: `frames - 1` must be a
multiple of 4); `decode` returns videos [B, F, 3, H, W] in [0, 1]. Classifier-free guidance is
`uncond + g (cond - uncond)` as WanPipeline computes it. Wan2.2 A14B's two experts: `transformer` denoises the steps
with t >= boundary_ratio * 1000 (high noise), `transformer_2` the rest; `set_trained_experts` chooses which train
(LoRA), the other stays frozen. TI2V-5B (one expert, `expand_timesteps`) is fed one timestep per latent token, as
WanPipeline feeds it. The sampling schedule is the flow-matching sigma schedule of the pipeline's scheduler (its
`shift`), which every rollout sampler walks (Euler ODE, the Flow-GRPO SDE), as Flow-GRPO does for Wan.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffrl.pipelines.base import Condition, Policy, at_least_float32
from diffrl.pipelines.registry import freeze_for_sampling
from diffrl.sampling import Schedule

TEMPORAL_FACTOR = 4
"""Wan's VAE compresses time 4x, causally: a clip has 4k + 1 frames."""
SPATIAL_FACTOR = 8
"""Wan's VAE compresses height and width 8x."""
DIFFUSERS_TILE = (256, 192)
"""AutoencoderKLWan's own tile side and stride in pixels, used where policy.vae_tile_size / _stride are None."""
WAN_EXPERTS = ("high", "low", "both")
"""policy.wan_experts: which of Wan2.2's experts train: the high-noise `transformer`, the low-noise `transformer_2`,
or both."""
LOW_NOISE_FOLDER = "transformer_2"
"""Subfolder of a LoRA folder holding the low-noise expert's LoRA. Its keys are `transformer.*`, as diffusers saves
any Wan LoRA, so a stock pipeline loads it with `load_lora_weights(folder / "transformer_2", load_into_transformer_2=True)`;
a folder apart keeps a plain `load_lora_weights(folder)` from putting it into the high-noise expert."""


def check_frames(num_frames: int, key: str = "num_frames") -> None:
    """Wan clips have 4k + 1 frames; otherwise ValueError naming the two nearest valid counts."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR:
        below = max(1, (num_frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1)
        raise ValueError(f"'{key}' must be 4k + 1 for Wan's VAE (1, 5, 9, 13, ..., 33, ..., 81), got {num_frames}: "
                         f"the nearest are {below} and {below + TEMPORAL_FACTOR}")


def latent_frames_for(num_frames: int) -> int:
    """Latent frames whose decode holds the first `num_frames` frames: latent frame 0 gives frame 0, each later one
    the next 4 (the VAE is causal, so those frames do not depend on the latent frames after them)."""
    return -(-(num_frames - 1) // TEMPORAL_FACTOR) + 1  # 1 + ceil((num_frames - 1) / 4)


def vae_tile(tile_size: int | None, tile_stride: int | None, key: str = "policy",
             factor: int = SPATIAL_FACTOR) -> tuple[int, int]:
    """(side, stride) in pixels of tiled decoding, diffusers' defaults filling the Nones; ValueError unless both are
    positive multiples of the VAE's spatial factor (8; 16 for Wan2.2's VAE) and the stride at most the side (the
    overlap, side - stride, is blended)."""
    side, stride = tile_size or DIFFUSERS_TILE[0], tile_stride or DIFFUSERS_TILE[1]
    for name, value in (("vae_tile_size", side), ("vae_tile_stride", stride)):
        if value <= 0 or value % factor:
            raise ValueError(f"'{key}.{name}' must be a positive multiple of {factor} (the VAE's factor), got {value}")
    if stride > side:
        raise ValueError(f"'{key}.vae_tile_stride' {stride} is larger than the tile side {side} (set '{key}.vae_tile_size' "
                         f"or a smaller stride): tiles would leave gaps")
    return side, stride


def expert_count(model: str) -> int | None:
    """How many experts a Wan model has, read from its name or model_index.json (no weights): 2 for Wan2.2 A14B
    (a `transformer_2` and a `boundary_ratio`), 1 for Wan2.1 and Wan2.2 TI2V-5B; None where the model cannot be
    found yet (a hub id not in the cache: loading says what is missing)."""
    from diffrl.pipelines.registry import TINY_MODELS, TINY_VARIANTS, pipeline_index

    if model in TINY_MODELS:
        return 2 if TINY_VARIANTS.get(model, ("", {}))[1].get("two_experts") else 1
    index = pipeline_index(model)
    if index is None:
        return None
    second = index.get("transformer_2") or [None, None]
    return 2 if index.get("boundary_ratio") is not None and second[0] is not None else 1


class WanExperts(nn.Module):
    """Wan2.2's two experts as one module, the `denoiser` when both train: accelerate wraps (and DDP synchronises)
    one module that holds every trained tensor. A call runs the expert `high_noise` names."""

    def __init__(self, high: nn.Module, low: nn.Module):
        super().__init__()
        self.high, self.low = high, low

    def forward(self, hidden_states, timestep, encoder_hidden_states, high_noise: bool = True, **kwargs):
        # the tensors are named parameters (not *args) so that RL guidance can find the batch in hidden_states
        expert = self.high if high_noise else self.low
        return expert(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    def save_pretrained(self, folder, **kwargs) -> None:
        """A full fine-tune of both experts: a diffusers model folder for each, named as in the pipeline."""
        self.high.save_pretrained(Path(folder) / "transformer", **kwargs)
        self.low.save_pretrained(Path(folder) / LOW_NOISE_FOLDER, **kwargs)


class WanPolicy(Policy):
    """WanTransformer3DModel with CFG over a UMT5 text encoder; video latents, velocity output."""

    family = "wan"
    pipeline_class = WanPipeline
    sample_kind = "video"

    def __init__(self, pipe: WanPipeline, height: int | None = None, width: int | None = None, num_frames: int = 33,
                 max_sequence_length: int | None = None):
        check_frames(num_frames)
        if pipe.transformer is None:
            raise ValueError("WanPolicy needs the pipeline's transformer (the high-noise expert on Wan2.2)")
        self.pipe = pipe
        self.two_experts = pipe.config.boundary_ratio is not None and pipe.transformer_2 is not None
        self.guidance_scale_2: float | None = None  # the low-noise expert's CFG scale (set_low_noise_guidance)
        self.experts = "high"  # which experts train (set_trained_experts); Wan2.1 and TI2V-5B: their only one
        self.denoiser = pipe.transformer  # the trained expert(s)
        self.prediction_type = "flow"
        f = pipe.vae_scale_factor_spatial
        self.height, self.width = int(height or 480), int(width or 832)
        if self.height % (2 * f) or self.width % (2 * f):
            raise ValueError(f"height and width must be multiples of {2 * f} (VAE {f}x and patch 2), got {self.height}x{self.width}")
        self.num_frames = num_frames
        # WanPipeline's 226 text tokens, or fewer where the tokenizer is shorter (the toy model's captions)
        self.max_sequence_length = max_sequence_length or min(226, pipe.tokenizer.model_max_length)
        # the sigma schedule of the pipeline's scheduler (UniPC with flow sigmas, or FlowMatchEuler), walked by our samplers
        self.flow_scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
            shift=pipe.scheduler.config.get("flow_shift", None) or pipe.scheduler.config.get("shift", 1.0))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, resolution: int = 32, num_frames: int = 9,
             two_experts: bool = False, ti2v: bool = False) -> "WanPolicy":
        """Random tiny Wan2.1 (diffusers' test sizes): milliseconds per step on a CPU. `two_experts`: Wan2.2 A14B's
        layout; `ti2v`: Wan2.2 TI2V-5B's (its VAE, 48 latent channels, per-token timesteps)."""
        from diffrl.pipelines.tiny import tiny_wan_pipeline

        pipe = freeze_for_sampling(tiny_wan_pipeline(seed=seed, dtype=dtype, two_experts=two_experts, ti2v=ti2v))
        return cls(pipe, height=resolution, width=resolution, num_frames=num_frames, max_sequence_length=16)

    # ---- which experts train -------------------------------------------------------------------
    def set_trained_experts(self, experts: str) -> None:
        """Wan2.2's experts that train: "high" (`transformer`, the default), "low" (`transformer_2`) or "both";
        the others stay frozen. Call before add_lora and before accelerate wraps `denoiser`."""
        if experts not in WAN_EXPERTS:
            raise ValueError(f"experts must be one of {', '.join(WAN_EXPERTS)}, got {experts!r}")
        if experts != "high" and not self.two_experts:
            raise ValueError(f"training the {experts!r} expert(s) needs Wan2.2's two experts (transformer_2 and a "
                             "boundary_ratio); this Wan model has one")
        if experts == self.experts:
            return
        if any(getattr(net, "_hf_peft_config_loaded", False) for net in self.trained_networks().values()):
            raise RuntimeError("choose the trained experts before adding or loading a LoRA")
        high, low = self.pipe.transformer, self.pipe.transformer_2
        self.denoiser = WanExperts(high, low) if experts == "both" else high if experts == "high" else low
        self.experts = experts

    def trains(self, high_noise: bool) -> bool:
        """Whether the expert of that noise level is trained."""
        return self.experts == "both" or (self.experts == "high") == high_noise

    def trained_networks(self) -> dict[str, nn.Module]:
        net = self.trainable_module()
        if self.experts == "both":
            return {"transformer": net.high, LOW_NOISE_FOLDER: net.low}
        return {"transformer" if self.experts == "high" else LOW_NOISE_FOLDER: net}

    def networks(self) -> list[nn.Module]:
        return [self.pipe.transformer] + ([self.pipe.transformer_2] if self.two_experts else [])

    # ---- the interface ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompt: str = "") -> Condition:
        pe, npe = self.pipe.encode_prompt(prompt=list(prompts), negative_prompt=negative_prompt, do_classifier_free_guidance=True,
                                          max_sequence_length=self.max_sequence_length, device=self.device)
        return Condition(cond={"encoder_hidden_states": pe.to(self.dtype)},  # [B, L, D]
                         uncond={"encoder_hidden_states": npe.to(self.dtype)})

    def latent_shape(self) -> tuple[int, int, int, int]:
        f = self.pipe.vae_scale_factor_spatial
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (self.pipe.transformer.config.in_channels, frames, self.height // f, self.width // f)

    def schedule(self, num_steps: int) -> Schedule:
        self.flow_scheduler.set_timesteps(num_steps, device=self.device)
        return Schedule(kind="flow", timesteps=self.flow_scheduler.timesteps.clone(),  # [N]
                        sigmas=self.flow_scheduler.sigmas.clone())  # [N + 1], last 0

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """float32 [B, C, F', h, w], as WanPipeline.prepare_latents draws them."""
        return randn_tensor((batch_size, *self.latent_shape()), generator=generator, device=self.device, dtype=torch.float32)

    def expert_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """[B] bool: True where the high-noise expert (`transformer`) denoises (always on Wan2.1)."""
        if not self.two_experts:
            return torch.ones_like(timestep, dtype=torch.bool)
        boundary = self.pipe.config.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps
        return timestep >= boundary

    def set_low_noise_guidance(self, scale: float | None) -> None:
        """CFG scale of the low-noise expert's steps (WanPipeline's guidance_scale_2); None: the run's guidance_scale."""
        if scale is not None and not self.two_experts:
            raise ValueError("guidance_scale_2 is for Wan2.2's two experts; this Wan model has one (no boundary_ratio)")
        self.guidance_scale_2 = scale

    def _scale(self, high: bool, guidance_scale: float) -> float:
        return guidance_scale if high or self.guidance_scale_2 is None else self.guidance_scale_2

    def _net(self, high: bool):
        """The expert of a noise level: a trained one through `denoiser` (accelerate's wrapper), or the frozen one."""
        if not self.trains(high):
            return self.pipe.transformer if high else self.pipe.transformer_2
        return functools.partial(self.denoiser, high_noise=high) if self.experts == "both" else self.denoiser

    def model_timestep(self, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the transformer is fed: timestep [B], or with the pipeline's `expand_timesteps` (TI2V-5B) one per latent
        token [B, L], L = F' h w / (patch volume), every token at t (text-to-video), as WanPipeline builds it."""
        if not getattr(self.pipe.config, "expand_timesteps", False):
            return timestep
        p_t, p_h, p_w = self.pipe.transformer.config.patch_size
        tokens = (x.shape[2] // p_t) * (x.shape[3] // p_h) * (x.shape[4] // p_w)
        return timestep[:, None].expand(-1, tokens)  # [B, L]

    def _guided(self, net, x_t, timestep, cond: Condition, guidance_scale: float) -> torch.Tensor:
        h = cond.cond["encoder_hidden_states"]
        t = self.model_timestep(timestep, x_t)  # [B] or [B, L]
        if guidance_scale > 1:  # CFG as the pipeline: uncond + g (cond - uncond), as one batch [uncond, cond]
            if cond.uncond is None:
                raise ValueError(f"guidance_scale {guidance_scale} > 1 needs unconditional embeddings (Condition.uncond)")
            v = net(hidden_states=torch.cat([x_t, x_t]), timestep=torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([cond.uncond["encoder_hidden_states"], h]), return_dict=False)[0]
            v_uncond, v_cond = v.chunk(2)  # [B, C, F', h, w] each
            return self.classifier_free_guidance(v_uncond, v_cond, guidance_scale)
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=h, return_dict=False)[0]

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Condition, guidance_scale: float) -> torch.Tensor:
        x_t = x_t.to(self.dtype)  # trajectories are kept in float32 or wider; the model runs in its own dtype
        high = self.expert_of(timestep)  # [B]
        if bool(high.all()) or bool((~high).all()):
            side = bool(high[0])
            out = self._guided(self._net(side), x_t, timestep, cond, self._scale(side, guidance_scale))
        else:  # per-sample noise levels on both sides of the boundary: each expert its rows
            out = torch.empty_like(x_t)
            for side in (True, False):
                rows = (high == side).nonzero().squeeze(1)
                out[rows] = self._guided(self._net(side), x_t[rows], timestep[rows], cond.index(rows),
                                         self._scale(side, guidance_scale))
        return self._with_idle_experts(out, high, x_t, timestep, cond)

    def _with_idle_experts(self, out, high, x_t, timestep, cond: Condition) -> torch.Tensor:
        """`out` unchanged, but under autograd a trained expert that denoised no row of this call runs once on one
        latent token and one text token, times 0, into it: a loss then always reaches every trained tensor (gradient
        0 where an expert did nothing; without it a batch of frozen-expert steps has no gradient at all and backward
        fails), and DDP, which waits for every trained tensor's gradient in each backward, gets them all."""
        if not (self.two_experts and torch.is_grad_enabled()):
            return out
        p_t, p_h, p_w = self.pipe.transformer.config.patch_size
        for side in (True, False):
            if self.trains(side) and not bool((high == side).any()):
                token = x_t[:1, :, :p_t, :p_h, :p_w]  # [1, C, p_t, p_h, p_w]: one latent token
                idle = self._net(side)(hidden_states=token, timestep=self.model_timestep(timestep[:1], token),
                                       encoder_hidden_states=cond.cond["encoder_hidden_states"][:1, :1], return_dict=False)[0]
                out = out + 0 * idle.sum()
        return out

    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Latents [B, C, F', h, w] -> videos [B, F, 3, H, W] in [0, 1], un-normalised as the pipeline does.
        `num_frames`: only the first frames (those a reward reads), from the first latent frames alone: the causal
        VAE gives them exactly as the full decode does, in a fraction of its time and memory."""
        if num_frames is not None:
            if not 1 <= num_frames <= 1 + (latents.shape[2] - 1) * TEMPORAL_FACTOR:
                raise ValueError(f"num_frames must be in 1..{1 + (latents.shape[2] - 1) * TEMPORAL_FACTOR} for "
                                 f"{latents.shape[2]} latent frames, got {num_frames}")
            latents = latents[:, :, : latent_frames_for(num_frames)]  # [B, C, m, h, w]
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        video = vae.decode(z * std + mean, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        video = video[:, :, :num_frames]  # [B, 3, num_frames, H, W]: the prefix decode may hold up to 3 more
        return at_least_float32((video.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1))

    def set_vae_chunking(self, slicing: bool = False, tiling: bool = False, tile_size: int | None = None,
                         tile_stride: int | None = None) -> None:
        """diffusers' memory switches of the VAE decode. `slicing`: one clip of a batch at a time (the same output,
        the peak memory of one clip). `tiling`: overlapping spatial tiles of `tile_size` pixels every `tile_stride`
        pixels (None: diffusers' 256 / 192), blended where they overlap; approximate, since a tile is decoded
        without its neighbours. Either False turns that switch off."""
        if not tiling and (tile_size is not None or tile_stride is not None):
            raise ValueError("a VAE tile size or stride is set but tiling is off: pass tiling=True")
        vae = self.pipe.vae
        if slicing:
            vae.enable_slicing()
        else:
            vae.disable_slicing()
        if tiling:
            side, stride = vae_tile(tile_size, tile_stride, factor=self.pipe.vae_scale_factor_spatial)
            vae.enable_tiling(side, side, stride, stride)  # square tiles
        else:
            vae.disable_tiling()

    def default_lora_targets(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0"]

    # ---- LoRA files of the experts ---------------------------------------------------------------
    def lora_folder(self, directory: Path, component: str) -> Path:
        """The high-noise expert's (or the only expert's) LoRA in `directory`, the low-noise expert's in its
        `transformer_2` subfolder."""
        return directory / LOW_NOISE_FOLDER if component == LOW_NOISE_FOLDER else directory

    def lora_usage(self, folder: str = "path/to/this/folder") -> str:
        lines = []
        if self.experts != "low":
            which = "  # transformer: the high-noise expert" if self.two_experts else ""
            lines.append(f'pipe.load_lora_weights("{folder}"){which}')
        if self.experts != "high":
            lines.append(f'pipe.load_lora_weights("{folder}/{LOW_NOISE_FOLDER}", load_into_transformer_2=True)  '
                         "# transformer_2: the low-noise expert")
        return "\n".join(lines)

    def load_lora(self, directory) -> None:
        """Load a LoRA folder written by `save_lora` (or any diffusers Wan LoRA) as the trainable "default" adapter,
        replacing an existing one. The folder says which experts it trains: a LoRA file of its own for the high-noise
        (or only) expert, one in `transformer_2/` for the low-noise expert; `set_trained_experts` follows it."""
        directory = Path(directory)
        high = (directory / "pytorch_lora_weights.safetensors").is_file()
        low = (directory / LOW_NOISE_FOLDER / "pytorch_lora_weights.safetensors").is_file()
        if not (high or low):
            self._require_lora_file(directory)  # raises, saying what was expected
        if low and not self.two_experts:
            raise ValueError(f"the LoRA in {directory} trains Wan2.2's low-noise expert ({LOW_NOISE_FOLDER}/); this Wan "
                             "model has one expert")
        self._check_lora_card(directory)
        self._drop_lora()
        self.set_trained_experts("both" if high and low else "low" if low else "high")
        for component, net in self.trained_networks().items():
            into_low = {"load_into_transformer_2": True} if component == LOW_NOISE_FOLDER else {}
            self._read_lora(self.lora_folder(directory, component), net, **into_low)
        self._train_lora_only()
