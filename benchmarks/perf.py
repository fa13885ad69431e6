"""Speed and memory of diffrl's training loop against the bare model: seconds per image in each phase, peak memory,
achieved TFLOP/s, and the ratio to a "floor" that does the same model work in plain diffusers + peft.

    python -m diffrl.benchmarks.perf --model toy-sd3 --iterations 2 --output-dir outputs/perf          # CPU, quickstart
    python -m diffrl.benchmarks.perf --model sd3.5-medium --iterations 2 --set train.group_size=8 \\
        --variant ckpt_off=policy.gradient_checkpointing=false --output-dir outputs/perf_sd35m        # a GPU
    python -m diffrl.benchmarks.perf --model sd3.5-medium --flops-only          # the FLOP accounting alone (meta device)
    python -m diffrl.benchmarks.perf --model toy-sd3 --set sampling.sde_window_size=0 --flow-grpo PATH/flow_grpo

What runs, each in a fresh process (its own peak memory), on the GPU when torch sees one:
- diffrl, once per variant: `Trainer.train_iteration` of the recipe (--config, or the model's default recipe; GRPO
  unless --algorithm; --set key=value on top; each --variant NAME=key=value[,key=value] on top of that), --warmup
  iterations, then --iterations measured ones. Phases from the metrics row: rollout = time_rollout - time_decode -
  time_reward (prompt encoding and the sampler steps), decode, reward, update = time_update (advantages, the update,
  EMA). Seconds per image = seconds / (prompts_per_iteration x group_size).
- the floor: the same work written as a bare loop over the diffusers modules (`floor_iteration`): prompt
  embeddings, N sampler steps with CFG through the denoiser carrying a peft LoRA (the SDE / DDIM step with its
  log-prob written inline), VAE decode, the same reward function, group advantages, then GRPO's training forwards
  (and reference forwards when the KL is on) and backwards over the same trained steps, one AdamW step per train
  batch. tests/test_perf.py checks that it computes GRPO's loss and gradients; "ratio to floor" is diffrl's
  seconds over the floor's, total and per phase. The floor does GRPO's update: for another --algorithm the update
  ratio is left out.
- Flow-GRPO (--flow-grpo PATH, SD3 models): their `pipeline_with_logprob` and `sde_step_with_logprob`, imported from
  the checkout at PATH, driven by a re-statement of their scripts/train_sd3.py's per-iteration work (`flow_grpo_iteration`)
  on the same model, prompts, sizes and LoRA as the diffrl run.

Peak memory: torch.cuda.max_memory_allocated over the measured iterations (weights included) on a GPU; the worker
process's peak resident set size on the CPU. FLOPs (`recipe_flops`): torch.utils.flop_counter.FlopCounterMode counts
one call of each model function (denoiser with CFG, with gradient and backward, with the adapter off; VAE decode;
text encoders; reward) and the recipe multiplies them out; TFLOP/s = those FLOPs / the measured seconds. --flops
counted also counts one whole extra iteration and checks that it equals the accounting. On a CPU the absolute
seconds mean little: read the ratios.

Full-size models (FULL_SIZE) are built from their published configs with random weights, nothing downloaded; their
text encoders (T5-XXL, ...) sit outside the trained loop, so prompts become random embeddings of the encoders' output
shapes, one seeded draw per prompt text (`random_prompt_embeddings`). The tiny and shipped toy models
(diffrl.pipelines.registry) run whole, text encoders included.

Outputs in --output-dir: results.md (the command line, the table), results.json, perf.png (seconds per image per
phase for each variant, the floor and Flow-GRPO).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The recipes of a source checkout (configs/ is not installed with the package)."""
PHASES = ("rollout", "decode", "reward", "update")
"""Phases of one iteration, in order; rollout is prompt encoding and the sampler steps."""

# ---- full-size architectures, random weights ----------------------------------------------------------------
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
               use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
"""SD3 / SD3.5's AutoencoderKL: SDXL's VAE layout with 16 latent channels, as diffusers'
scripts/convert_sd3_to_diffusers.py builds it (from_config of SDXL's vae with latent_channels=16, no quant convs,
scaling 1.5305, shift 0.0609)."""


@dataclass(frozen=True)
class FullSizeModel:
    """A published architecture built with random weights: its denoiser and VAE configs, the recipe it runs."""

    family: str
    hub_id: str  # the config's `model` (checked for syntax only: the weights are never read)
    recipe: str  # under configs/: the shipped recipe of this model
    denoiser: tuple[str, dict]  # diffusers class name, constructor arguments
    vae: tuple[str, dict]
    scheduler: tuple[str, dict]
    source: str  # where the configs were read
    overrides: tuple[str, ...] = ()  # on top of the recipe: a weight-free reward where the recipe's needs weights


FULL_SIZE: dict[str, FullSizeModel] = {
    "sd3.5-medium": FullSizeModel(
        "sd3", "stabilityai/stable-diffusion-3.5-medium", "image/sd3_grpo_jpeg.yaml",
        ("SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
        ("AutoencoderKL", SD3_VAE),
        ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
        "diffusers scripts/convert_sd3_to_diffusers.py: num_layers and heads 24 (2.24 B parameters), caption "
        "projection 24 x 64, attn2 ('dual attention') on blocks 0-12 and rms qk-norm for SD3.5, pos_embed_max_size 384 "
        "for SD3.5 Medium (192 for Large); the same values as the model's transformer/config.json"),
    "sd1.5": FullSizeModel(
        "sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", "image/sd15_ddpo_jpeg.yaml",
        ("UNet2DConditionModel", dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)),
        ("AutoencoderKL", dict(SD3_VAE, latent_channels=4, sample_size=512, use_quant_conv=True, use_post_quant_conv=True,
                               scaling_factor=0.18215, shift_factor=None)),
        ("DDIMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1)),
        "the model's unet/config.json (diffusers' UNet2DConditionModel defaults with sample_size 64 and CLIP ViT-L's "
        "768-wide cross-attention) and vae/config.json (4 latent channels, scaling 0.18215)"),
    "flux.1-dev": FullSizeModel(
        "flux", "black-forest-labs/FLUX.1-dev", "image/flux_grpo_jpeg.yaml",
        ("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))),
        ("AutoencoderKL", dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)),
        ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                 base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                 max_image_seq_len=4096)),
        "the model's transformer/config.json (19 double + 38 single blocks, 24 x 128, guidance embedding) and "
        "vae/config.json (SD3's layout, scaling 0.3611, shift 0.1159)"),
    "wan2.1-1.3b": FullSizeModel(
        "wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "video/wan21_grpo_ocr.yaml",
        ("WanTransformer3DModel", {}),  # WAN21_T2V_1_3B of benchmarks.video_cost, filled in below
        ("AutoencoderKLWan", {}),  # diffusers' defaults are Wan2.1's VAE (base_dim 96, z_dim 16)
        ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),  # Wan's flow_shift at 480p
        "diffusers scripts/convert_wan_to_diffusers.py ('Wan-T2V-1.3B': 12 heads x 128, 30 layers, ffn 8960) and "
        "AutoencoderKLWan's defaults",
        overrides=("reward_kwargs={reward: jpeg_compressibility, stride: 4, aggregate: mean}",)),
}
"""--model names of the full-size architectures."""


def full_size(name: str) -> FullSizeModel:
    spec = FULL_SIZE[name]
    if spec.family == "wan" and not spec.denoiser[1]:
        from diffrl.benchmarks.video_cost import WAN21_T2V_1_3B

        spec = FullSizeModel(**{**asdict(spec), "denoiser": ("WanTransformer3DModel", dict(WAN21_T2V_1_3B))})
    return spec


def truncated(config: dict, class_name: str, layers: int | None) -> dict:
    """The denoiser config with its first `layers` blocks only (a CPU smoke run of a full-size path); None: all."""
    if layers is None:
        return config
    if class_name == "FluxTransformer2DModel":
        return {**config, "num_layers": layers, "num_single_layers": layers}
    if class_name == "UNet2DConditionModel":
        return {**config, "layers_per_block": min(layers, config["layers_per_block"])}
    keep = {**config, "num_layers": layers}
    if "dual_attention_layers" in config:
        keep["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < layers)
    return keep


def build_full_size(name: str, *, dtype, device, height: int, width: int, num_frames: int | None = None,
                    layers: int | None = None):
    """The Policy of a full-size architecture with random weights (initialised where it runs: a 2 B-parameter model
    is slow to initialise on a CPU; on the meta device it takes no memory) and random prompt embeddings. The tiny
    model of its family lends the tokenizers and text encoders, which the random embeddings leave unused."""
    import diffusers
    import torch

    from diffrl.pipelines.registry import freeze_for_sampling, load_policy

    spec = full_size(name)
    net_class, net_config = spec.denoiser
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        # nn.Module.to: diffusers' own .to(dtype) warns about float32-kept modules (these models have none)
        net = torch.nn.Module.to(getattr(diffusers, net_class)(**truncated(net_config, net_class, layers)), dtype)
        vae = torch.nn.Module.to(getattr(diffusers, spec.vae[0])(**spec.vae[1]), dtype)
    scheduler = getattr(diffusers, spec.scheduler[0])(**spec.scheduler[1])
    tiny = load_policy(f"tiny-{spec.family}", torch_dtype=dtype, device=device)
    component = "unet" if spec.family == "sd" else "transformer"
    pipe = type(tiny.pipe)(**{**tiny.pipe.components, component: net, "vae": vae, "scheduler": scheduler})
    pipe = freeze_for_sampling(pipe)
    kwargs = {"num_frames": num_frames or 33} if spec.family == "wan" else {}
    policy = type(tiny)(pipe, height=height, width=width, **kwargs)
    if spec.family == "wan":  # WanPolicy's 226 text tokens, not the tiny tokenizer's length
        policy.max_sequence_length = 226
    if spec.family == "sd3":
        policy.max_sequence_length = 256  # with T5: 77 CLIP + 256 T5 tokens
    use_random_prompt_embeddings(policy)
    return policy


def text_shapes(policy) -> dict[str, tuple[int, ...]]:
    """Per prompt, the shape of each embedding the family's text encoders produce at full size: name -> shape."""
    family = policy.family
    if family == "sd3":  # CLIP-L + CLIP-G (77 tokens, 768 + 1280 wide, zero-padded to T5's 4096) then T5-XXL tokens
        return {"encoder_hidden_states": (77 + policy.max_sequence_length, 4096), "pooled_projections": (2048,)}
    if family == "flux":  # T5-XXL tokens, CLIP-L's pooled projection
        return {"encoder_hidden_states": (policy.max_sequence_length, 4096), "pooled_projections": (768,)}
    if family == "sd":  # CLIP-L's 77 tokens
        return {"encoder_hidden_states": (77, 768)}
    if family == "wan":  # UMT5-XXL
        return {"encoder_hidden_states": (policy.max_sequence_length, 4096)}
    raise ValueError(f"no full-size text shapes for family {family!r}")


def random_prompt_embeddings(prompts: list[str], shapes: dict[str, tuple[int, ...]], dtype, device) -> dict:
    """One standard-normal draw per prompt text (seeded by its CRC-32), so the same prompt always gets the same
    embeddings in every process and in the floor: name -> [B, *shape]."""
    import torch

    out = {}
    for name, shape in shapes.items():
        rows = []
        for text in prompts:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{name}:{text}".encode()))
            rows.append(torch.randn(shape, generator=gen))
        out[name] = torch.stack(rows).to(device, dtype)  # [B, *shape]
    return out


def use_random_prompt_embeddings(policy) -> None:
    """Replace `policy.encode_prompt` (an instance attribute shadows the method) with random embeddings of the full
    model's text-encoder output shapes: T5-XXL and friends stay out of a perf run."""
    import torch

    from diffrl.pipelines.base import Condition

    shapes = text_shapes(policy)

    def encode_prompt(prompts: list[str], negative_prompt: str = ""):
        cond = random_prompt_embeddings(list(prompts), shapes, policy.dtype, policy.device)
        if policy.family == "flux":  # guidance-distilled: no unconditional branch; text ids all zero as FluxPipeline's
            ids = torch.zeros(shapes["encoder_hidden_states"][0], 3, device=policy.device, dtype=policy.dtype)
            return Condition(cond=cond, uncond=None, extra={"txt_ids": ids})
        uncond = random_prompt_embeddings([negative_prompt] * len(prompts), shapes, policy.dtype, policy.device)
        return Condition(cond=cond, uncond=uncond)

    policy.encode_prompt = encode_prompt
    policy.random_prompts = True


# ---- FLOP accounting --------------------------------------------------------------------------------------
def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """FLOPs of fn(*args, **kwargs) by torch.utils.flop_counter.FlopCounterMode, and its result.

    Attention runs on PyTorch's math backend while counting: FlopCounterMode has formulas for the fused CUDA
    kernels (flash, memory-efficient, cuDNN) but not for every CPU / meta dispatch of scaled_dot_product_attention,
    whereas the math path is plain bmm + softmax, which it always counts (QK^T and PV: 4 b h s^2 d, the same figure
    the fused formulas give). Counts are shapes only: meta tensors count without memory or compute."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def denoiser_forward_flops(name: str, *, batch: int = 1, latent_size: tuple[int, ...] = (64, 64),
                           text_tokens: int | None = None, layers: int | None = None) -> int:
    """FLOPs of one forward of a full-size denoiser (FULL_SIZE[name], no LoRA, no CFG) on the meta device, for
    `batch` latents of spatial size `latent_size` (h, w; Wan: f, h, w) and `text_tokens` prompt tokens (None: the
    family's full-size length). SD3.5 Medium at 512 px (64 x 64 latents, 1024 image tokens, 333 text tokens): 2.44 T."""
    import diffusers
    import torch

    spec = full_size(name)
    net_class, net_config = spec.denoiser
    with torch.device("meta"):
        net = getattr(diffusers, net_class)(**truncated(net_config, net_class, layers))
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    channels = net.config.in_channels
    tokens = text_tokens or {"sd3": 333, "flux": 512, "sd": 77, "wan": 226}[spec.family]
    with torch.no_grad():
        if spec.family == "sd3":
            call = lambda: net(hidden_states=meta(batch, channels, *latent_size), timestep=meta(batch),  # noqa: E731
                               encoder_hidden_states=meta(batch, tokens, net.config.joint_attention_dim),
                               pooled_projections=meta(batch, net.config.pooled_projection_dim), return_dict=False)
        elif spec.family == "sd":
            call = lambda: net(meta(batch, channels, *latent_size), meta(batch),  # noqa: E731
                               encoder_hidden_states=meta(batch, tokens, net.config.cross_attention_dim), return_dict=False)
        elif spec.family == "wan":
            call = lambda: net(hidden_states=meta(batch, channels, *latent_size), timestep=meta(batch),  # noqa: E731
                               encoder_hidden_states=meta(batch, tokens, net.config.text_dim), return_dict=False)
        else:  # flux: packed 2 x 2 latent patches, ids of image and text tokens
            h, w = latent_size
            image_tokens = (h // 2) * (w // 2)
            call = lambda: net(hidden_states=meta(batch, image_tokens, channels), timestep=meta(batch),  # noqa: E731
                               guidance=meta(batch), pooled_projections=meta(batch, net.config.pooled_projection_dim),
                               encoder_hidden_states=meta(batch, tokens, net.config.joint_attention_dim),
                               txt_ids=meta(tokens, 3), img_ids=meta(image_tokens, 3), return_dict=False)
        flops, _ = count_flops(call)
    return flops


@dataclass
class CallFlops:
    """FLOPs of one call of each model function a training iteration runs, per image (per prompt for encode)."""

    predict: int  # the guided prediction at sampling (CFG doubles the denoiser batch), no gradient
    train: int  # the same with gradient, plus its backward (only what the trained weights need: grad-input through
    # frozen layers, grad-weight of the LoRA)
    reference: int  # the guided prediction with the adapter disabled, no gradient (the KL's reference)
    decode: int  # VAE decode of one sample
    encode: int  # text encoders for one prompt (its negative prompt included); 0 for random embeddings
    reward: int  # the reward model on one sample (0 for rule rewards)


@dataclass
class Recipe:
    """What a GRPO iteration does per image, as FLOP multipliers."""

    num_steps: int  # sampler steps of a rollout (every one runs the guided prediction)
    trained_steps: int  # steps re-scored with gradient per sample: max(1, int(stochastic steps x timestep_fraction))
    kl: bool  # a reference forward per trained step
    inner_epochs: int = 1
    group_size: int = 1  # K images per prompt share one prompt encoding
    trained_fraction: float = 1.0  # samples whose update forwards run (kl off: zero-advantage samples are skipped)

    @classmethod
    def of(cls, cfg, trained_fraction: float = 1.0) -> "Recipe":
        s, g = cfg.sampling, cfg.grpo
        stochastic = s.sde_window_size or s.num_steps
        return cls(num_steps=s.num_steps, trained_steps=max(1, int(stochastic * g.timestep_fraction)),
                   kl=g.kl_beta > 0, inner_epochs=cfg.train.num_inner_epochs, group_size=cfg.train.group_size,
                   trained_fraction=trained_fraction)


def recipe_flops(calls: CallFlops, recipe: Recipe) -> dict[str, float]:
    """FLOPs per image of each phase of a GRPO iteration: rollout = prompt encoding / K + N guided predictions;
    decode; reward; update = epochs x trained fraction x trained steps x (forward + backward [+ reference])."""
    per_step = calls.train + (calls.reference if recipe.kl else 0)
    return {"rollout": calls.encode / recipe.group_size + recipe.num_steps * calls.predict, "decode": calls.decode,
            "reward": calls.reward,
            "update": recipe.inner_epochs * recipe.trained_fraction * recipe.trained_steps * per_step}


def call_flops(policy, guidance_scale: float, reward=None, decode_kwargs: dict | None = None,
               negative_prompt: str = "", prompt: str = "a prompt", metadata: dict | None = None) -> CallFlops:
    """One call of each model function on one image of `policy` (its LoRA attached), counted on the policy's own
    device and weights (a meta-device policy counts without memory); the reward scores `prompt` with `metadata`."""
    import torch

    device = policy.device
    x = policy.initial_noise(1).to(device)  # [1, *S]
    t = policy.schedule(4).timesteps[:1]  # [1]
    cond = policy.encode_prompt([prompt], negative_prompt)
    encode, _ = count_flops(policy.encode_prompt, [prompt], negative_prompt)
    with torch.no_grad():
        predict, _ = count_flops(policy.predict, x, t, cond, guidance_scale)
        reference = 0
        if policy.has_lora:
            with policy.reference():
                reference, _ = count_flops(policy.predict, x, t, cond, guidance_scale)

    def forward_backward():
        out = policy.predict(x, t, cond, guidance_scale)
        out.float().sum().backward()

    train, _ = count_flops(forward_backward)
    policy.trainable_module().zero_grad(set_to_none=True)
    with torch.no_grad():
        decode, image = count_flops(policy.decode, x, **(decode_kwargs or {}))
    reward_flops = 0
    if reward is not None and device.type != "meta":
        reward_flops, _ = count_flops(reward, image.float(), [prompt], [metadata or {"prompt": prompt}])
    return CallFlops(predict=predict, train=train, reference=reference, decode=decode, encode=encode, reward=reward_flops)


def flops_report(name: str, *, resolution: int, steps: int, trained_steps: int, kl: bool, group_size: int,
                 lora_rank: int, lora_alpha: float, lora_targets: list[str] | None, text_tokens: list[int]) -> list[str]:
    """Markdown lines of the FLOP accounting of a full-size model at a GRPO recipe, on the meta device."""
    import torch

    lines = [f"# FLOP accounting: {name}, {resolution} px, {steps} steps with CFG, {trained_steps} trained steps, "
             f"KL {'on' if kl else 'off'}, K = {group_size}, LoRA r{lora_rank}", "",
             "| text tokens | denoiser forward (no LoRA, batch 1) | sampling / image | training / image | "
             "of which backward / image | decode / image |", "|---:|---:|---:|---:|---:|---:|"]
    for tokens in text_tokens:
        bare = denoiser_forward_flops(name, latent_size=(resolution // 8, resolution // 8), text_tokens=tokens)
        policy = build_full_size(name, dtype=torch.float32, device="meta", height=resolution, width=resolution)
        if policy.family == "sd3":
            policy.max_sequence_length = tokens - 77
        elif policy.family in ("flux", "wan"):
            policy.max_sequence_length = tokens
        use_random_prompt_embeddings(policy)
        policy.add_lora(lora_rank, lora_alpha, lora_targets)
        calls = call_flops(policy, 4.5)
        per_image = recipe_flops(calls, Recipe(steps, trained_steps, kl, group_size=group_size))
        backward = trained_steps * (calls.train - calls.predict)
        lines.append(f"| {tokens} | {bare / 1e12:.3f} T | {per_image['rollout'] / 1e12:.1f} T | "
                     f"{per_image['update'] / 1e12:.1f} T | {backward / 1e12:.1f} T | {per_image['decode'] / 1e12:.2f} T |")
    lines += ["", "Sampling: steps x the guided prediction (CFG: batch 2) with the LoRA; training: trained steps x "
              "(forward with gradient + its backward + the reference forward when the KL is on); the backward through "
              "frozen weights computes input gradients only (about 1x the forward, not 2x), the LoRA's weight "
              "gradients are small. Prompt encoding is outside (random embeddings). Counted with FlopCounterMode on "
              "the meta device, attention on the math backend (bmm).", ""]
    return lines


# ---- the bare-model floor ----------------------------------------------------------------------------------
def floor_denoiser(policy):
    """The plain diffusers denoiser call of a family: (net, x [B, *S], t [B], embeddings dict, guidance) -> output."""
    import torch

    family = policy.family
    if family == "sd3":
        return lambda net, x, t, e, g: net(hidden_states=x, timestep=t, encoder_hidden_states=e["encoder_hidden_states"],
                                           pooled_projections=e["pooled_projections"], return_dict=False)[0]
    if family == "wan":
        return lambda net, x, t, e, g: net(hidden_states=x, timestep=t, encoder_hidden_states=e["encoder_hidden_states"],
                                           return_dict=False)[0]
    if family == "sd":
        return lambda net, x, t, e, g: net(x, t, encoder_hidden_states=e["encoder_hidden_states"], return_dict=False)[0]
    if family == "flux":
        from diffusers import FluxPipeline

        def flux(net, x, t, e, g):
            b, c, h, w = x.shape
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)  # [h/2 * w/2, 3]
            guidance = torch.full([b], float(g), device=x.device, dtype=torch.float32)
            out = net(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=t.to(x.dtype) / 1000,
                      guidance=guidance, pooled_projections=e["pooled_projections"],
                      encoder_hidden_states=e["encoder_hidden_states"], txt_ids=e["txt_ids"], img_ids=ids,
                      return_dict=False)[0]
            f = policy.pipe.vae_scale_factor
            return FluxPipeline._unpack_latents(out, h * f, w * f, f)  # [B, C, h, w]

        return flux
    raise ValueError(f"the floor has no denoiser call for family {family!r}")


def guided(call, net, x, t, cond: dict, uncond: dict | None, guidance: float):
    """CFG as the pipelines do it: one batch [uncond, cond], uncond + g (cond - uncond); no CFG without uncond."""
    import torch

    if uncond is None or guidance <= 1:
        return call(net, x, t, cond, guidance)
    both = {k: torch.cat([uncond[k], v]) if k in uncond else v for k, v in cond.items()}
    out_uncond, out_cond = call(net, torch.cat([x, x]), torch.cat([t, t]), both, guidance).chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def sde_step(x, v, sigma, sigma_prev, sigma_max, noise_level, prev=None, generator=None):
    """Flow-GRPO's SDE step and its Gaussian log-prob averaged over elements, in float32 (or wider):
    std_t = a sqrt(sigma / (1 - sigma)) (sigma_max in the denominator at sigma 1), mean = x (1 + std_t^2 dt / 2 sigma)
    + v (1 + std_t^2 (1 - sigma) / 2 sigma) dt, x_prev = mean + std_t sqrt(-dt) z. -> (x_prev, log_prob [B], mean, std_t)."""
    import torch

    dtype = torch.promote_types(x.dtype, torch.float32)
    x, v = x.to(dtype), v.to(dtype)
    dt = sigma_prev - sigma
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    if prev is None:
        prev = mean + std * torch.randn(x.shape, generator=generator, dtype=dtype).to(x.device)
    prev = prev.to(dtype)
    log_prob = (-((prev.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
    return prev, log_prob.flatten(1).mean(1), mean, std_t


def ddim_eta_step(x, out, a_t, a_prev, eta, prediction_type, prev=None, generator=None):
    """DDPO's DDIM step with noise eta sigma_t and its log-prob averaged over elements (epsilon or v prediction)."""
    import torch

    dtype = torch.promote_types(x.dtype, torch.float32)
    x, out = x.to(dtype), out.to(dtype)
    if prediction_type == "epsilon":
        x0, eps = (x - (1 - a_t) ** 0.5 * out) / a_t**0.5, out
    else:  # v_prediction
        x0, eps = a_t**0.5 * x - (1 - a_t) ** 0.5 * out, a_t**0.5 * out + (1 - a_t) ** 0.5 * x
    std = eta * (((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)) ** 0.5
    mean = a_prev**0.5 * x0 + max(1 - a_prev - std**2, 0.0) ** 0.5 * eps
    if prev is None:
        prev = mean + std * torch.randn(x.shape, generator=generator, dtype=dtype).to(x.device)
    prev = prev.to(dtype)
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return prev, log_prob.flatten(1).mean(1), mean, std


@dataclass
class FloorSettings:
    """The recipe as the floor reads it (plain numbers, from the run's config)."""

    guidance: float
    noise_level: float
    eta: float
    clip_range: float
    kl_beta: float
    adv_clip_max: float
    timestep_fraction: float
    max_grad_norm: float
    train_batch_size: int
    inner_epochs: int = 1

    @classmethod
    def of(cls, cfg) -> "FloorSettings":
        s, g, t = cfg.sampling, cfg.grpo, cfg.train
        return cls(guidance=s.guidance_scale, noise_level=s.noise_level, eta=s.eta, clip_range=g.clip_range,
                   kl_beta=g.kl_beta, adv_clip_max=g.adv_clip_max, timestep_fraction=g.timestep_fraction,
                   max_grad_norm=t.max_grad_norm, train_batch_size=t.train_batch_size, inner_epochs=t.num_inner_epochs)


class Floor:
    """GRPO's work on a diffusers denoiser with a peft LoRA, written as a bare loop: what diffrl's loop costs at least.

    `net` is the diffusers module (its "default" adapter trains), `step` the family's step maths above; the schedule
    is a table of N timesteps and N + 1 sigmas (flow) or alphas (DDIM)."""

    def __init__(self, policy, settings: FloorSettings):
        self.policy, self.s = policy, settings
        self.net = policy.trainable_module()
        self.call = floor_denoiser(policy)
        self.flow = policy.prediction_type == "flow"
        self.extra: dict = {}  # settings shared by the batch (FLUX's text ids)

    def predict(self, x, t, cond, uncond):
        return guided(self.call, self.net, x.to(self.policy.dtype), t, {**cond, **self.extra}, uncond, self.s.guidance)

    def table(self, schedule) -> list[float]:
        """The schedule's sigmas (flow) or cumulative alphas (DDIM) as Python floats, read once: a float() of a
        CUDA tensor at every step would wait for the GPU each time."""
        if getattr(self, "_table_of", None) is not schedule:
            self._table_of = schedule
            self._table = (schedule.sigmas if self.flow else schedule.alphas_cumprod).tolist()
        return self._table

    def step(self, schedule, i: int, x, out, prev=None, generator=None):
        v = self.table(schedule)
        if self.flow:
            return sde_step(x, out, v[i], v[i + 1], v[1], self.s.noise_level, prev, generator)
        return ddim_eta_step(x, out, v[i], v[i + 1], self.s.eta, self.policy.prediction_type, prev, generator)

    def ode_step(self, schedule, i: int, x, v):
        """The deterministic flow step outside the SDE window (Euler)."""
        import torch

        sigmas = self.table(schedule)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return x + (sigmas[i + 1] - sigmas[i]) * v.to(x.dtype)

    def sample(self, schedule, noise, cond, uncond, window: range, generator=None):
        """N guided steps from `noise` [B, *S]: the stochastic step in `window`, Euler elsewhere (flow).
        -> latents [B, N + 1, *S], log_probs [B, W]."""
        import torch

        x, chain, log_probs = noise, [noise], []
        with torch.no_grad():
            for i in range(len(schedule.timesteps)):
                t = schedule.timesteps[i].expand(len(x))  # [B]
                out = self.predict(x, t, cond, uncond)
                if i in window:
                    x, log_prob, _, _ = self.step(schedule, i, x, out, generator=generator)
                    log_probs.append(log_prob)
                else:
                    x = self.ode_step(schedule, i, x, out)
                chain.append(x)
        return torch.stack(chain, 1), torch.stack(log_probs, 1)

    def decode(self, latents, **decode_kwargs):
        """The family's decode (un-scale the latents, vae.decode, map to [0, 1]; a video reward's frames only), which
        is the VAE's own work and nothing else."""
        import torch

        with torch.no_grad():
            return self.policy.decode(latents, **decode_kwargs).float()

    def loss_terms(self, schedule, steps, latents, old_log_probs, rows, j, cond, uncond, advantages):
        """Trained step j of samples `rows`: the clipped surrogate and the KL to the adapter-disabled model, [b] each."""
        import torch

        i = int(steps[j])
        x, x_prev = latents[rows, i], latents[rows, i + 1]  # [b, *S]
        t = schedule.timesteps[i].expand(len(rows))  # [b]
        c = {k: v[rows] for k, v in cond.items()}
        u = None if uncond is None else {k: v[rows] for k, v in uncond.items()}
        _, log_prob, mean, std_t = self.step(schedule, i, x, self.predict(x, t, c, u), prev=x_prev)
        ratio = torch.exp(log_prob - old_log_probs[rows, j])  # [b]
        adv = advantages[rows].clamp(-self.s.adv_clip_max, self.s.adv_clip_max)  # [b]
        surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.s.clip_range, 1 + self.s.clip_range))
        kl = torch.zeros_like(surrogate)
        if self.s.kl_beta > 0:
            with torch.no_grad():
                self.net.disable_adapters()
                try:
                    _, _, mean_ref, _ = self.step(schedule, i, x, self.predict(x, t, c, u), prev=x_prev)
                finally:
                    self.net.enable_adapters()
            # Flow-GRPO's KL: mean over elements of (mu - mu_ref)^2 / (2 std_t^2); DDIM: std_t is the step std
            kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std_t**2)
        return surrogate, kl

    def update(self, schedule, steps, latents, old_log_probs, cond, uncond, advantages, optimizer, autocast,
               trained_fraction: float | None = None) -> float:
        """GRPO's update: per train batch, every trained step's loss (mean over the batch and the steps) backward,
        then one clipped optimiser step. Without KL, samples whose advantage is 0 add nothing and are not run; with
        `trained_fraction` instead that fraction of each train batch runs (the diffrl run's: the same number of
        forwards whatever this floor's own rewards were). Returns the summed loss."""
        import torch

        B, W = old_log_probs.shape
        n_train = max(1, int(W * self.s.timestep_fraction))
        total = torch.zeros((), device=advantages.device, dtype=torch.float64)  # read once at the end: no sync a step
        params = [p for p in self.net.parameters() if p.requires_grad]
        for _ in range(self.s.inner_epochs):
            for start in range(0, B, self.s.train_batch_size):
                rows = torch.arange(start, min(start + self.s.train_batch_size, B), device=advantages.device)  # [b]
                count = len(rows)
                if trained_fraction is not None:
                    rows = rows[: max(1, round(trained_fraction * count))]
                elif self.s.kl_beta == 0:
                    learns = advantages[rows] != 0
                    rows = rows[learns] if learns.any() else rows[:1]
                for j in range(n_train):
                    with autocast:
                        surrogate, kl = self.loss_terms(schedule, steps, latents, old_log_probs, rows, j, cond,
                                                        uncond, advantages)
                    loss = (surrogate + self.s.kl_beta * kl).sum() / count / n_train
                    loss.backward()
                    total += loss.detach()
                if self.s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return float(total)


def group_advantages(rewards, group_size: int, eps: float = 1e-4):
    """(r - mean of its prompt group) / (group std + eps), population std: the recipes' per-prompt normalisation."""
    groups = rewards.view(-1, group_size)  # [P, K]
    adv = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + eps)
    return adv.flatten()  # [B]


# ---- measurements (one worker process each) ------------------------------------------------------------------
@dataclass
class Measurement:
    """One row of the table: seconds per image per phase (medians are not taken: sums over the measured
    iterations / images), peak memory, FLOPs per image per phase."""

    kind: str  # "diffrl" | "floor" | "flow_grpo"
    variant: str
    seconds: dict[str, float]  # phase -> seconds per image
    peak_memory_mb: float
    memory_kind: str
    images: int  # images per iteration
    iterations: int
    device: str
    flops: dict[str, float] | None = None  # phase -> FLOPs per image (the accounting)
    counted_flops: dict[str, float] | None = None  # phase -> FLOPs per image counted on a whole extra iteration
    trained_fraction: float | None = None  # samples whose update forwards ran, mean over the measured iterations
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def peak_memory(device) -> tuple[float, str]:
    import torch

    from diffrl.runtime import peak_memory_mb

    kind = "torch.cuda.max_memory_allocated (weights included)" if device.type == "cuda" else "peak RSS of the worker"
    return peak_memory_mb(device) if device.type == "cuda" else peak_memory_mb(torch.device("cpu")), kind


def adamw(params, train):
    """AdamW with the run's train section's settings, as the Trainer builds it."""
    import torch

    return torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                             weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)


def measure_iterations(run, args, device) -> tuple[list, float, str]:
    """`run(i)` for args.warmup iterations, then args.iterations measured ones with the peak memory reset between:
    (the measured iterations' results, peak memory, its kind)."""
    for i in range(args.warmup):
        run(i)
    reset_peak(device)
    results = [run(args.warmup + i) for i in range(args.iterations)]
    return (results, *peak_memory(device))


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def run_config(args, variant_overrides: list[str], out: str):
    """The run's RunConfig: the recipe, the model, the harness's settings, --algorithm, --set, then the variant's."""
    from diffrl.config import load_config

    recipe = args.config or default_recipe(args.model)
    model = [f"model={args.model}"]
    if args.model in FULL_SIZE:
        spec = full_size(args.model)
        model = [f"model={spec.hub_id}", f"policy.family={spec.family}", *spec.overrides]
    harness = [f"output_dir={out}", "logging.log_with=none", "logging.progress=false", "reward_async=false"]
    algorithm = [f"algorithm={args.algorithm}"] if args.algorithm else []
    return load_config(recipe, [*model, *algorithm, *harness, *args.set, *variant_overrides])


def default_recipe(model: str) -> Path:
    path = REPO_CONFIGS / (full_size(model).recipe if model in FULL_SIZE else "quickstart.yaml")
    if not path.is_file():
        raise SystemExit(f"perf: the default recipe {path} is not here (configs/ ships with a source checkout): pass --config")
    return path


def build_policy(args, cfg, device):
    """A full-size architecture (random weights) for FULL_SIZE names; None lets the Trainer load cfg.model."""
    if args.model not in FULL_SIZE:
        return None
    from diffrl.runtime import DTYPES

    p = cfg.policy
    size = p.size_kwargs(cfg.model)
    height, width = size["height"] or size["resolution"], size["width"] or size["resolution"]
    return build_full_size(args.model, dtype=DTYPES[p.dtype], device=device, height=height, width=width,
                           num_frames=p.num_frames, layers=args.layers)


def run_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def diffrl_worker(args) -> Measurement:
    """--warmup then --iterations of Trainer.train_iteration; the accounting's FLOPs; optionally one counted iteration."""
    from diffrl.trainers.loop import Trainer

    device = run_device()
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, args.variant_overrides, out)
        trainer = Trainer(cfg, policy=build_policy(args, cfg, device))
        for _ in range(args.warmup):
            trainer.train_iteration()
        reset_peak(trainer.accelerator.device)
        rows = [trainer.train_iteration() for _ in range(args.iterations)]
        memory, memory_kind = peak_memory(trainer.accelerator.device)
        images = cfg.train.prompts_per_iteration * cfg.train.group_size
        seconds = {"rollout": sum(r["time_rollout"] - r["time_decode"] - r["time_reward"] for r in rows),
                   "decode": sum(r["time_decode"] for r in rows), "reward": sum(r["time_reward"] for r in rows),
                   "update": sum(r["time_update"] for r in rows)}
        if trainer.algorithm.samples_in_update:  # the reward was scored inside time_update
            seconds["update"] -= seconds["reward"]
        seconds = {k: v / (images * len(rows)) for k, v in seconds.items()}
        m = Measurement("diffrl", args.variant_name, seconds, memory, memory_kind, images, len(rows), device.type)
        if cfg.algorithm == "grpo":
            trained = m.trained_fraction = sum(r.get("trained_frac", 1.0) for r in rows) / len(rows)
            m.flops = recipe_flops(trainer_call_flops(trainer), Recipe.of(cfg, trained))
        else:
            m.notes.append(f"FLOPs of {cfg.algorithm}: counted on an extra iteration (the accounting is GRPO's)")
        if args.flops == "counted" or cfg.algorithm != "grpo":
            counted, row = counted_iteration(trainer)
            m.counted_flops = {k: v / images for k, v in counted.items()}
            if cfg.algorithm == "grpo":  # the accounting of that very iteration (its own trained fraction)
                m.flops = recipe_flops(trainer_call_flops(trainer), Recipe.of(cfg, row.get("trained_frac", 1.0)))
        if getattr(trainer.policy, "random_prompts", False):
            m.notes.append("prompts: random embeddings of the full model's text-encoder shapes (encoders not run)")
    return m


def trainer_call_flops(trainer) -> CallFlops:
    """call_flops of a Trainer's policy, reward and sampling settings, on its first training prompt."""
    s = trainer.cfg.sampling
    return call_flops(trainer.policy, s.guidance_scale, trainer.reward, trainer.decode_kwargs, s.negative_prompt,
                      trainer.prompts.prompts[0], trainer.prompts.metadata[0])


@contextlib.contextmanager
def shadowed(obj, method: str, wrapper):
    """obj.method replaced by wrapper(original) while inside (an instance attribute shadows the method)."""
    original = getattr(obj, method)
    setattr(obj, method, wrapper(original))
    try:
        yield
    finally:
        delattr(obj, method)


def counted_iteration(trainer) -> tuple[dict[str, int], dict]:
    """One more train_iteration under FlopCounterMode (untimed): FLOPs per phase (decode: inside policy.decode; reward:
    inside the reward's score; rollout: the rest of Trainer.rollout; update: everything after it), and its metrics row."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    spent = {"decode": 0, "reward": 0}
    at_rollout_end: dict[str, int] = {}

    def attribute(phase):
        def wrap(fn):
            def counted(*a, **kw):
                before = counter.get_total_flops()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[phase] += counter.get_total_flops() - before
            return counted
        return wrap

    def mark_rollout_end(fn):
        def counted(*a, **kw):
            try:
                return fn(*a, **kw)
            finally:
                at_rollout_end.update(total=counter.get_total_flops(), **spent)
        return counted

    with contextlib.ExitStack() as stack:
        stack.enter_context(shadowed(trainer.policy, "decode", attribute("decode")))
        stack.enter_context(shadowed(trainer.reward, "score", attribute("reward")))
        stack.enter_context(shadowed(trainer, "rollout", mark_rollout_end))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))  # see count_flops
        with counter:
            row = trainer.train_iteration()
    total = counter.get_total_flops()
    end = at_rollout_end
    rollout = end["total"] - end["decode"] - end["reward"]
    flops = {"rollout": rollout, "decode": spent["decode"], "reward": spent["reward"],
             "update": total - rollout - spent["decode"] - spent["reward"]}
    return flops, row


def mixed_precision_autocast(cfg, device):
    """The autocast of the run's train.mixed_precision (accelerate's), or none."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def floor_policy(args, cfg, device):
    """The run's model with a peft LoRA added here (diffrl's add_lora not used): the same weights, the same adapter
    config, LoRA weights in float32 as diffrl keeps them."""
    import torch
    from peft import LoraConfig

    from diffrl.pipelines.registry import load_policy
    from diffrl.runtime import DTYPES

    p = cfg.policy
    policy = build_policy(args, cfg, device) or load_policy(
        cfg.model, family=p.family, torch_dtype=DTYPES[p.dtype], device=device, num_frames=p.num_frames,
        **p.size_kwargs(cfg.model), **p.vae_chunking())
    net = policy.trainable_module()
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, init_lora_weights="gaussian",
                               target_modules=p.lora_targets or policy.default_lora_targets()))
    for param in net.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    enable_checkpointing(policy, net, p.gradient_checkpointing)
    return policy


def enable_checkpointing(policy, net, setting) -> None:
    """The run's policy.gradient_checkpointing on a bare network: diffusers' own switch for true; a named policy
    (a string other than "none") through the adapter, which is where such policies live."""
    if setting in (False, None, "none"):
        return
    if setting is True:
        net.enable_gradient_checkpointing()
    else:
        policy.enable_gradient_checkpointing(setting)


def trains_lora(cfg) -> bool:
    """Whether the run trains a LoRA (policy.adapter where the config has it, else lora_rank > 0)."""
    p = cfg.policy
    adapter = p.resolved_adapter() if hasattr(p, "resolved_adapter") else "lora" if p.lora_rank > 0 else "full"
    return adapter == "lora" and p.lora_rank > 0


def floor_worker(args) -> Measurement:
    """The bare-model floor of the run's baseline config: --warmup then --iterations of `floor_iteration`."""
    import torch

    from diffrl.data import load_prompts
    from diffrl.rewards.mixture import build_training_reward

    device = run_device()
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, [], out)
    if not trains_lora(cfg):
        raise SystemExit("perf: the floor trains a LoRA; this run trains another adapter or the full denoiser "
                         "(use --no-floor)")
    torch.manual_seed(cfg.seed)
    policy = floor_policy(args, cfg, device)
    reward = build_training_reward(cfg.reward, cfg.reward_kwargs, cfg.rewards, cfg.reward_combine,
                                   cfg.reward_source_weights).to(device).load()
    prompts = load_prompts(cfg.data.prompts)
    t = cfg.train
    params = [q for q in policy.trainable_module().parameters() if q.requires_grad]
    optimizer = adamw(params, t)
    floor = Floor(policy, FloorSettings.of(cfg))
    times, memory, memory_kind = measure_iterations(
        lambda i: floor_iteration(floor, cfg, prompts, reward, optimizer, i, device, args.floor_trained_fraction),
        args, device)
    images = t.prompts_per_iteration * t.group_size
    seconds = {k: sum(x[k] for x in times) / (images * len(times)) for k in PHASES}
    m = Measurement("floor", "floor", seconds, memory, memory_kind, images, len(times), device.type,
                    trained_fraction=args.floor_trained_fraction)
    if args.floor_trained_fraction is not None and args.floor_trained_fraction < 1:
        m.notes.append(f"trains {args.floor_trained_fraction:.3g} of the samples, the baseline's mean trained fraction "
                       "(zero-advantage samples skipped without KL)")
    if cfg.algorithm != "grpo":
        m.notes.append(f"the floor's update is GRPO's; {cfg.algorithm}'s update has no floor")
    return m


def floor_iteration(floor: Floor, cfg, prompts, reward, optimizer, iteration: int, device,
                    trained_fraction: float | None = None) -> dict[str, float]:
    """One iteration of the floor: P prompts x K samples in rollout batches (guided sampler steps with log-probs,
    decode, reward), group advantages, GRPO's update (of `trained_fraction` of the samples when given).
    -> seconds per phase."""
    import torch

    from diffrl.trainers.loop import decode_kwargs, phase_clock

    s, t = cfg.sampling, cfg.train
    P, K = t.prompts_per_iteration, t.group_size
    policy = floor.policy
    autocast = mixed_precision_autocast(cfg, device)
    seconds = dict.fromkeys(PHASES, 0.0)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    start = phase_clock(device)
    picked = [(iteration * P + i) % len(prompts.prompts) for i in range(P)]
    chosen = [prompts.prompts[i] for i in picked]
    batch_prompts = [p for p in chosen for _ in range(K)]
    metadata = [prompts.metadata[i] for i in picked for _ in range(K)]
    condition = policy.encode_prompt(chosen, s.negative_prompt).repeat_interleave(K)  # the family's text encoders
    cond, uncond = condition.cond, condition.uncond
    floor.extra = condition.extra
    schedule = policy.schedule(s.num_steps)
    frames = decode_kwargs(policy, reward)  # a video reward's frames, as the loop decodes them
    window = range(s.num_steps)
    if s.sde_window_size and floor.flow:
        lo = (s.sde_window_range or (0, s.num_steps))[0]
        window = range(lo, lo + s.sde_window_size)
    noise = torch.randn(P * K, *policy.initial_noise(1).shape[1:], generator=gen).to(device, policy.dtype)  # [B, *S]
    seconds["rollout"] += phase_clock(device) - start
    chains, log_probs, rewards = [], [], []
    for lo in range(0, P * K, t.rollout_batch_size):
        rows = slice(lo, lo + t.rollout_batch_size)
        start = phase_clock(device)
        with autocast:
            chain, lp = floor.sample(schedule, noise[rows], {k: v[rows] for k, v in cond.items()},
                                     None if uncond is None else {k: v[rows] for k, v in uncond.items()}, window, gen)
        chains.append(chain)
        log_probs.append(lp)
        mid = phase_clock(device)
        with autocast:
            images = floor.decode(chain[:, -1], **frames)
        end = phase_clock(device)
        rewards.append(reward(images, batch_prompts[rows], metadata[rows]).float())
        seconds["rollout"] += mid - start
        seconds["decode"] += end - mid
        seconds["reward"] += phase_clock(device) - end
    start = phase_clock(device)
    advantages = group_advantages(torch.cat(rewards).to(device), K)  # [B]
    steps = torch.tensor(list(window))  # [W] schedule step of each log-prob column
    floor.update(schedule, steps, torch.cat(chains), torch.cat(log_probs), cond, uncond, advantages, optimizer, autocast,
                 trained_fraction)
    seconds["update"] += phase_clock(device) - start
    return seconds


# ---- Flow-GRPO's loop, driven with their functions ------------------------------------------------------------
FLOW_GRPO_FILES = ("flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py",
                   "flow_grpo/diffusers_patch/sd3_sde_with_logprob.py")


def import_flow_grpo(path: str | Path):
    """pipeline_with_logprob and sde_step_with_logprob from a Flow-GRPO checkout at `path` (never copied here);
    SystemExit naming what is missing when they cannot be imported."""
    path = Path(path).expanduser().resolve()
    missing = [f for f in FLOW_GRPO_FILES if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"perf --flow-grpo {path}: not a Flow-GRPO checkout (github.com/yifan123/flow_grpo): missing "
                         f"{', '.join(missing)}")
    sys.path.insert(0, str(path))
    try:
        from flow_grpo.diffusers_patch.sd3_pipeline_with_logprob import pipeline_with_logprob
        from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    except ImportError as err:
        raise SystemExit(f"perf --flow-grpo {path}: their pipeline_with_logprob / sde_step_with_logprob do not import "
                         f"with this environment ({type(err).__name__}: {err}); missing: {err.name or 'see the message'}")
    finally:
        sys.path.remove(str(path))
    return pipeline_with_logprob, sde_step_with_logprob


def flow_grpo_worker(args) -> Measurement:
    """Flow-GRPO's per-iteration work (scripts/train_sd3.py) with their functions on the run's model and sizes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from diffrl.data import load_prompts
    from diffrl.pipelines.registry import load_policy
    from diffrl.rewards.mixture import build_training_reward
    from diffrl.runtime import DTYPES

    pipeline_with_logprob, sde_step_with_logprob = import_flow_grpo(args.flow_grpo)
    device = run_device()
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, [], out)
    from diffrl.pipelines.registry import resolve_family

    s, p = cfg.sampling, cfg.policy
    family = full_size(args.model).family if args.model in FULL_SIZE else resolve_family(cfg.model, p.family)
    problems = [f"the model family is {family} (their train_sd3.py trains SD3)" if family != "sd3" else "",
                "sampling.sde_window_size > 0 (their loop has no SDE window)" if s.sde_window_size else "",
                f"the rollout sampler is {s.sampler} (theirs: flow_sde)" if s.sampler not in (None, "flow_sde") else "",
                f"algorithm {cfg.algorithm} (theirs: grpo)" if cfg.algorithm != "grpo" else "",
                "no LoRA (their run trains one)" if not trains_lora(cfg) else ""]
    problems = [x for x in problems if x]
    if problems:
        raise SystemExit("perf --flow-grpo: the run cannot be replayed by Flow-GRPO's loop: " + "; ".join(problems))
    torch.manual_seed(cfg.seed)
    policy = build_policy(args, cfg, device) or load_policy(cfg.model, family=p.family, torch_dtype=DTYPES[p.dtype],
                                                           device=device, **p.size_kwargs(cfg.model))
    pipe = policy.pipe
    lora = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, init_lora_weights="gaussian",
                      target_modules=p.lora_targets or policy.default_lora_targets())
    pipe.transformer = get_peft_model(pipe.transformer, lora)  # as their script: a PeftModel around the transformer
    for param in pipe.transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    enable_checkpointing(policy, pipe.transformer.base_model.model, p.gradient_checkpointing)
    reward = build_training_reward(cfg.reward, cfg.reward_kwargs, cfg.rewards, cfg.reward_combine,
                                   cfg.reward_source_weights).to(device).load()
    prompts = load_prompts(cfg.data.prompts)
    t = cfg.train
    params = [q for q in pipe.transformer.parameters() if q.requires_grad]
    optimizer = adamw(params, t)
    runs, memory, memory_kind = measure_iterations(
        lambda i: flow_grpo_iteration(pipeline_with_logprob, sde_step_with_logprob, policy, cfg, prompts, reward,
                                      optimizer, i, device), args, device)
    images = t.prompts_per_iteration * t.group_size
    seconds = {k: sum(x[k] for x, _ in runs) / (images * len(runs)) for k in PHASES}
    m = Measurement("flow_grpo", "Flow-GRPO", seconds, memory, memory_kind, images, len(runs), device.type,
                    trained_fraction=sum(f for _, f in runs) / len(runs))
    m.notes.append("their pipeline_with_logprob and sde_step_with_logprob (imported from the checkout), driven by a "
                   "re-statement of scripts/train_sd3.py's per-iteration work on this run's model, prompts, sizes and "
                   f"LoRA; one optimiser step per train batch; trained {m.trained_fraction:.3g} of the samples (their "
                   "loop drops zero-advantage samples, KL or not)")
    return m


def flow_grpo_iteration(pipeline_with_logprob, sde_step_with_logprob, policy, cfg, prompts, reward, optimizer,
                        iteration: int, device) -> tuple[dict[str, float], float]:
    """Their loop's iteration: sampling with log-probs (pipeline_with_logprob, which decodes), rewards, per-prompt
    advantages, samples with advantage 0 dropped, then per train batch and trained timestep j (the first
    int(steps x timestep_fraction)): the CFG forward with the unconditional half detached, sde_step_with_logprob of
    the stored next latents, the reference under disable_adapter when beta > 0, their clipped loss + beta KL,
    backward; clip, one optimiser step per train batch. -> (seconds per phase, the fraction of samples trained)."""
    import torch

    from diffrl.trainers.loop import phase_clock

    s, t, g = cfg.sampling, cfg.train, cfg.grpo
    P, K = t.prompts_per_iteration, t.group_size
    pipe = policy.pipe
    transformer = pipe.transformer
    autocast = mixed_precision_autocast(cfg, device)
    seconds = dict.fromkeys(PHASES, 0.0)
    decoding = {"seconds": 0.0}

    def timed_decode(fn):
        def decode(*a, **kw):
            start = phase_clock(device)
            try:
                return fn(*a, **kw)
            finally:
                decoding["seconds"] += phase_clock(device) - start
        return decode

    start = phase_clock(device)
    picked = [(iteration * P + i) % len(prompts.prompts) for i in range(P)]
    chosen = [prompts.prompts[i] for i in picked]
    batch_prompts = [p for p in chosen for _ in range(K)]
    metadata = [prompts.metadata[i] for i in picked for _ in range(K)]
    condition = policy.encode_prompt(chosen, s.negative_prompt).repeat_interleave(K)
    embeds, pooled = condition.cond["encoder_hidden_states"], condition.cond["pooled_projections"]
    neg_embeds, neg_pooled = condition.uncond["encoder_hidden_states"], condition.uncond["pooled_projections"]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
    seconds["rollout"] += phase_clock(device) - start
    samples = []
    for lo in range(0, P * K, t.rollout_batch_size):
        rows = slice(lo, lo + t.rollout_batch_size)
        start = phase_clock(device)
        with shadowed(pipe.vae, "decode", timed_decode), autocast, torch.no_grad():
            images, latents, log_probs = pipeline_with_logprob(
                pipe, prompt_embeds=embeds[rows], pooled_prompt_embeds=pooled[rows],
                negative_prompt_embeds=neg_embeds[rows], negative_pooled_prompt_embeds=neg_pooled[rows],
                num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale, output_type="pt",
                height=policy.height, width=policy.width, noise_level=s.noise_level, generator=gen)
        end = phase_clock(device)
        scores = reward(images.float(), batch_prompts[rows], metadata[rows]).float()
        seconds["reward"] += phase_clock(device) - end
        seconds["rollout"] += end - start
        latents = torch.stack(latents, dim=1)  # [b, N + 1, C, h, w]
        samples.append({"embeds": embeds[rows], "pooled": pooled[rows], "latents": latents[:, :-1],
                        "next_latents": latents[:, 1:], "log_probs": torch.stack(log_probs, dim=1),  # [b, N]
                        "timesteps": pipe.scheduler.timesteps.repeat(latents.shape[0], 1), "rewards": scores})
    seconds["decode"] = decoding["seconds"]
    seconds["rollout"] -= decoding["seconds"]

    start = phase_clock(device)
    samples = {k: torch.cat([x[k] for x in samples]) for k in samples[0]}
    advantages = group_advantages(samples.pop("rewards").to(device), K)  # [B]
    keep = advantages != 0  # their mask: samples whose advantages are all zero do not train
    samples = {k: v[keep] for k, v in samples.items()}
    advantages = advantages[keep]
    trained_steps = int(s.num_steps * g.timestep_fraction)
    params = [q for q in transformer.parameters() if q.requires_grad]
    for lo in range(0, len(advantages), t.train_batch_size):
        b = {k: v[lo:lo + t.train_batch_size] for k, v in samples.items()}
        adv = advantages[lo:lo + t.train_batch_size].clamp(-g.adv_clip_max, g.adv_clip_max)  # [b]
        n = len(adv)
        cfg_embeds = torch.cat([neg_embeds[:n], b["embeds"]])
        cfg_pooled = torch.cat([neg_pooled[:n], b["pooled"]])

        def log_prob_at(j):
            x, ts = b["latents"][:, j], b["timesteps"][:, j]
            out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([ts, ts]),
                              encoder_hidden_states=cfg_embeds, pooled_projections=cfg_pooled, return_dict=False)[0]
            out_uncond, out_text = out.chunk(2)
            out = out_uncond.detach() + s.guidance_scale * (out_text - out_uncond.detach())
            return sde_step_with_logprob(pipe.scheduler, out.float(), ts, x.float(),
                                         prev_sample=b["next_latents"][:, j].float(), noise_level=s.noise_level)

        for j in range(trained_steps):
            with autocast:
                _, log_prob, mean, std_t = log_prob_at(j)
                if g.kl_beta > 0:
                    with torch.no_grad(), transformer.disable_adapter():
                        _, _, mean_ref, _ = log_prob_at(j)
            ratio = torch.exp(log_prob - b["log_probs"][:, j])
            policy_loss = torch.mean(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - g.clip_range, 1 + g.clip_range)))
            loss = policy_loss
            if g.kl_beta > 0:
                kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim)), keepdim=True) / (2 * std_t**2)
                loss = policy_loss + g.kl_beta * kl.mean()
            (loss / trained_steps).backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds["update"] += phase_clock(device) - start
    return seconds, float(keep.float().mean())


# ---- the driver -------------------------------------------------------------------------------------------
VARIANT_ITEM = re.compile(r",(?=[A-Za-z_][\w.]*=)")
"""Splits "a.b=1,c=[0,3]" at the commas that start another key=value."""


def parse_variant(text: str) -> tuple[str, list[str]]:
    """NAME=key=value[,key=value...] -> (NAME, ["key=value", ...])."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest or "=" not in rest:
        raise SystemExit(f"perf: --variant {text!r}: expected NAME=key=value[,key=value...]")
    return name, VARIANT_ITEM.split(rest)


def variants_of(args) -> dict[str, list[str]]:
    out = {"baseline": []}
    for text in [*(args.variant or []), *(args.variants or [])]:
        name, overrides = parse_variant(text)
        if name in out:
            raise SystemExit(f"perf: variant {name!r} given twice")
        out[name] = overrides
    return out


def worker_argv(argv: list[str], kind: str, variant: str, result: str) -> list[str]:
    return [sys.executable, "-m", "diffrl.benchmarks.perf", *argv, *worker_flags(kind, variant), "--result", result]


def worker_flags(kind: str, variant: str) -> list[str]:
    return ["--worker", kind, "--worker-variant", variant]


def run_worker(args) -> Measurement:
    from diffusers.utils import logging as diffusers_logging

    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # loading bars of the shipped models
    transformers_logging.disable_progress_bar()
    args.variant_name = args.worker_variant
    args.variant_overrides = variants_of(args).get(args.worker_variant, [])
    if args.worker == "diffrl":
        return diffrl_worker(args)
    if args.worker == "floor":
        return floor_worker(args)
    return flow_grpo_worker(args)


def measure(args, argv: list[str], kind: str, variant: str) -> Measurement:
    """One measurement in a fresh process (its own peak memory), or in this one with --in-process (the tests)."""
    if args.in_process:
        worker_args = build_parser().parse_args([*argv, *worker_flags(kind, variant)])
        return run_worker(worker_args)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(worker_argv(argv, kind, variant, str(result)), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        result.unlink(missing_ok=True)
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"perf: the {kind} worker ({variant}) failed (exit {proc.returncode}): {tail}")
    data = json.loads(result.read_text())
    result.unlink()
    return Measurement(**data)


def median_of(runs: list[Measurement]) -> Measurement:
    """One row from --rounds measurements of it: the median seconds of each phase, the largest peak memory."""
    import statistics

    first = runs[0]
    if len(runs) == 1:
        return first
    seconds = {p: statistics.median(m.seconds[p] for m in runs) for p in PHASES}
    return Measurement(**{**asdict(first), "seconds": seconds, "peak_memory_mb": max(m.peak_memory_mb for m in runs),
                          "iterations": sum(m.iterations for m in runs),
                          "notes": [*first.notes, f"median of {len(runs)} rounds"]})


def fmt_seconds(x: float) -> str:
    return f"{x:.4f}" if x < 10 else f"{x:.1f}"


def tflops(m: Measurement, flops: dict[str, float] | None) -> float | None:
    if not flops or m.total <= 0:
        return None
    return sum(flops.values()) / m.total / 1e12


def table(model: str, rows: list[Measurement], floor: Measurement | None) -> list[str]:
    """The results table: one row per variant, then the floor and Flow-GRPO."""
    base = rows[0]
    work = base.flops if floor is not None and floor_has_update(floor) else None  # the floor does GRPO's work
    head = ["model", "variant", *(f"{p} s/img" for p in PHASES), "total s/img", "peak memory MiB", "TFLOP/s",
            "ratio to floor", "vs baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for m in rows:
        ratio = ratio_to_floor(m, floor)
        speed = tflops(m, m.flops or m.counted_flops if m.kind == "diffrl" else work if m.kind == "floor" else None)
        cells = [model, m.variant, *(fmt_seconds(m.seconds[p]) for p in PHASES), fmt_seconds(m.total),
                 f"{m.peak_memory_mb:.0f}", "n/a" if speed is None else f"{speed:.3g}",
                 "1" if m.kind == "floor" else "n/a" if ratio is None else f"{ratio:.2f}",
                 f"{m.total / base.total:.2f}" if m.kind == "diffrl" else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_to_floor(m: Measurement, floor: Measurement | None, phase: str | None = None) -> float | None:
    """Seconds over the floor's, of one phase or of the total (without the update when the floor lacks it)."""
    if floor is None or m.kind == "floor":
        return None
    phases = PHASES if floor_has_update(floor) else PHASES[:-1]
    if phase is not None:
        return m.seconds[phase] / floor.seconds[phase] if phase in phases and floor.seconds[phase] > 0 else None
    return sum(m.seconds[p] for p in phases) / sum(floor.seconds[p] for p in phases)


def floor_has_update(floor: Measurement) -> bool:
    """The floor's update is GRPO's: it stands for the run's update only when the run is GRPO."""
    return not any("has no floor" in note for note in floor.notes)


def write_report(args, argv: list[str], rows: list[Measurement], floor: Measurement | None,
                 elapsed: float) -> list[str]:
    import platform

    import torch

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "diffrl.benchmarks.perf", *argv])
    measured = [*rows, *([floor] if floor else [])]
    lines = [f"# Speed and memory: {args.model}", "", f"Command: `{command}`", "",
             f"Device: {rows[0].device}; torch {torch.__version__}, {platform.machine()}; "
             f"{rows[0].images} images per iteration, {args.warmup} warm-up + {args.iterations} measured iterations "
             f"per row{f', {args.rounds} rounds (per-phase medians)' if args.rounds > 1 else ''}, each row in "
             f"{'this process' if args.in_process else 'a fresh process'}; {elapsed:.0f} s in all.",
             "", *table(args.model, measured, floor), ""]
    if floor is not None:
        per_phase = ", ".join(f"{p} {ratio_to_floor(rows[0], floor, p):.2f}" for p in PHASES
                              if ratio_to_floor(rows[0], floor, p) is not None)
        lines += [f"Baseline / floor per phase: {per_phase}.", ""]
    for m in rows:
        if m.counted_flops and m.flops:
            same = all(m.counted_flops[p] == m.flops[p] for p in PHASES)
            lines.append(f"FLOPs of {m.variant}: counted on a whole iteration {sum(m.counted_flops.values()) / 1e12:.6g} T "
                         f"per image, the accounting's per-phase sum {sum(m.flops.values()) / 1e12:.6g} T: "
                         f"{'equal in every phase' if same else 'DIFFERENT'}.")
    per_image = (rows[0].flops or rows[0].counted_flops or {})
    if per_image:
        lines.append("FLOPs per image (baseline): " + ", ".join(f"{p} {per_image[p] / 1e12:.4g} T" for p in PHASES) + ".")
    lines += ["", f"Memory: {rows[0].memory_kind}.",
              "Phases: rollout = prompt encoding and sampler steps; decode = VAE decode; reward = scoring; update = "
              "advantages, the update's forwards and backwards, optimiser steps (and EMA). TFLOP/s = the FLOP "
              "accounting (FlopCounterMode) over the measured seconds; the floor does the baseline's work."]
    if rows[0].device == "cpu":
        lines.append("On a CPU the absolute seconds mean little: read the ratios.")
    for m in measured:
        lines += [f"- {m.variant}: {note}" for note in dict.fromkeys(m.notes)]
    lines += ["", "![seconds per image per phase](perf.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({
        "command": command, "model": args.model, "elapsed_s": elapsed,
        "variants": variants_of(args), "rows": [asdict(m) for m in measured],
        "ratio_to_floor": {m.variant: ratio_to_floor(m, floor) for m in rows} if floor else None}, indent=1))
    plot(measured, out / "perf.png", args.model)
    return lines


def plot(rows: list[Measurement], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(rows)))
    names = [m.variant for m in rows]
    left = [0.0] * len(rows)
    for phase in PHASES:
        values = [m.seconds[phase] for m in rows]
        ax.barh(names, values, left=left, label=phase)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds per image ({rows[0].device})")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncol=4, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.1 + 0.1 / len(rows), 1, 1))  # the legend below the bars, clear of them
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffrl.benchmarks.perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sd3", help=f"a registry model (toy-sd3, tiny-sd3, ...) or a full-size "
                                                      f"architecture with random weights: {', '.join(FULL_SIZE)}")
    p.add_argument("--config", default=None, help="the recipe (default: configs/quickstart.yaml, or the full-size "
                                                  "model's own recipe under configs/)")
    p.add_argument("--algorithm", default=None, help="any diffrl algorithm (default: the recipe's; GRPO)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--variant", action="append", metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="a variant measured beside the baseline (repeatable), e.g. compile=policy.compile=true")
    p.add_argument("--variants", nargs="+", metavar="NAME=KEY=VALUE[,KEY=VALUE]", help="several variants at once")
    p.add_argument("--iterations", type=int, default=2, help="measured iterations per row")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured iterations first (lazy init, optimiser state)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every row this many times, alternating, and take per-phase medians (a busy machine)")
    p.add_argument("--flops", choices=["predicted", "counted"], default="predicted",
                   help="counted: also count one whole extra iteration and check it against the accounting")
    p.add_argument("--flow-grpo", default=None, metavar="PATH", help="a Flow-GRPO checkout: run their loop side by side")
    p.add_argument("--no-floor", action="store_true", help="skip the bare-model floor")
    p.add_argument("--layers", type=int, default=None, help="full-size models: build only the first blocks (CPU smoke)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of each worker (CPU)")
    p.add_argument("--in-process", action="store_true", help="measure in this process (quicker; peak memory shared)")
    p.add_argument("--output-dir", default="outputs/perf")
    p.add_argument("--flops-only", action="store_true", help="print the FLOP accounting of a full-size model and exit")
    p.add_argument("--text-tokens", type=int, nargs="+", default=None,
                   help="--flops-only: prompt token counts (default: the family's; SD3 also 205, Flow-GRPO's 77 + 128)")
    p.add_argument("--worker", choices=["diffrl", "floor", "flow_grpo"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-variant", default="baseline", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--floor-trained-fraction", type=float, default=None, help=argparse.SUPPRESS)
    return p


def flops_only(args) -> list[str]:
    if args.model not in FULL_SIZE:
        raise SystemExit(f"perf --flops-only: --model must be one of {', '.join(FULL_SIZE)}")
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, [], out)
    spec = full_size(args.model)
    resolution = cfg.policy.resolution or 512
    default_tokens = {"sd3": [333, 205], "flux": [512], "sd": [77], "wan": [226]}[spec.family]
    stochastic = cfg.sampling.sde_window_size or cfg.sampling.num_steps
    return flops_report(args.model, resolution=resolution, steps=cfg.sampling.num_steps,
                        trained_steps=max(1, int(stochastic * cfg.grpo.timestep_fraction)), kl=cfg.grpo.kl_beta > 0,
                        group_size=cfg.train.group_size, lora_rank=cfg.policy.lora_rank,
                        lora_alpha=cfg.policy.lora_alpha, lora_targets=cfg.policy.lora_targets,
                        text_tokens=args.text_tokens or default_tokens)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        measurement = run_worker(args)
        Path(args.result).write_text(json.dumps(asdict(measurement)))
        return 0
    if args.flops_only:
        print("\n".join(flops_only(args)))
        return 0
    if args.iterations < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("perf: --iterations and --rounds must be >= 1 and --warmup >= 0")
    if args.flow_grpo:
        import_flow_grpo(args.flow_grpo)  # fail now, before any measurement, when their code cannot run here
    started = time.perf_counter()
    rounds: list[list[Measurement]] = []
    floors: list[Measurement] = []
    for r in range(args.rounds):  # rows alternate: load from other processes falls on all of them alike
        rounds.append([])
        for name in variants_of(args):
            rounds[-1].append(measure(args, argv, "diffrl", name))
            print(f"[perf] round {r + 1}: diffrl {name}: {rounds[-1][-1].total:.4g} s/image", flush=True)
        if not args.no_floor:
            fraction = rounds[0][0].trained_fraction
            floor_argv = [*argv, "--floor-trained-fraction", repr(fraction)] if fraction is not None else argv
            floors.append(measure(args, floor_argv, "floor", "floor"))
            print(f"[perf] round {r + 1}: floor: {floors[-1].total:.4g} s/image", flush=True)
        if args.flow_grpo:
            rounds[-1].append(measure(args, argv, "flow_grpo", "Flow-GRPO"))
            print(f"[perf] round {r + 1}: Flow-GRPO: {rounds[-1][-1].total:.4g} s/image", flush=True)
    rows = [median_of(list(same)) for same in zip(*rounds)]
    floor = median_of(floors) if floors else None
    lines = write_report(args, argv, rows, floor, time.perf_counter() - started)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
