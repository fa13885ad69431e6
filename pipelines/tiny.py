"""Tiny random-weight model builders for tests and smoke runs (no network, no weights).

Sizes follow diffusers' own pipeline tests (hidden 32, one or two layers, 32x32 images), so a
4-step sample takes milliseconds on a CPU. Tokenizers come from the package's assets
(built by assets/build_tokenizers.py). The SD (UNet) builder lives in `diffrl.pipelines.sd`.
"""

from __future__ import annotations

import importlib.resources
import pathlib

import torch

TOKENIZERS = ("clip", "t5")


def tokenizer_path(name: str) -> pathlib.Path:
    """Folder of a shipped tiny tokenizer: "clip" (CLIP byte-level BPE) or "t5" (T5 unigram)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tiny tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")
    path = pathlib.Path(str(importlib.resources.files("diffrl.assets") / "tokenizers" / name))
    if not path.is_dir():
        raise FileNotFoundError(
            f"tiny tokenizer {name!r} not found at {path}; rebuild it with `python assets/build_tokenizers.py` "
            "or reinstall diffrl (assets/tokenizers/** ships as package data)."
        )
    return path


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_path("clip"))


def t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(tokenizer_path("t5"))


def _tiny_clip_config(vocab_size: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=0,  # <|startoftext|> in the shipped tokenizer
        eos_token_id=1,  # <|endoftext|>: pooling reads the first eos position
        pad_token_id=1,
        **kw,
    )


def _tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,  # the default 0.1 makes sampling non-deterministic if a module is left in train mode
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _tiny_vae(resolution: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),  # vae_scale_factor 2: 32x32 images -> 16x16 latents
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _seeded(seed: int, build):
    """Build a module from `build()` under torch.manual_seed(seed) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _finish(pipe, dtype):
    for name in pipe.components:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            if dtype != torch.float32:
                # plain nn.Module.to: diffusers' override warns about fp32-kept modules (none here)
                torch.nn.Module.to(module, dtype)
            module.eval()
    return pipe


def tiny_sd3_pipeline(seed: int = 0, dtype=None, resolution: int = 32):
    """A random tiny `StableDiffusion3Pipeline` (diffusers' test sizes) with the shipped tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=resolution // 2,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,  # two CLIP projections of 32, concatenated
            out_channels=4,
        ),
    )
    clip_config = _tiny_clip_config(len(clip), projection_dim=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_seeded(seed + 1, lambda: _tiny_vae(resolution)),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModelWithProjection(clip_config)),
        tokenizer=clip,
        text_encoder_2=_seeded(seed + 3, lambda: CLIPTextModelWithProjection(clip_config)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_seeded(seed + 4, lambda: _tiny_t5(len(t5))),
        tokenizer_3=t5,
    )
    return _finish(pipe, dtype or torch.float32)


def tiny_flux_pipeline(seed: int = 0, dtype=None, resolution: int = 32):
    """A random tiny `FluxPipeline` (diffusers' test sizes, guidance-distilled) with the shipped tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config: shift from the image size
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_seeded(seed + 1, lambda: _tiny_vae(resolution)),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(_tiny_clip_config(len(clip)))),
        tokenizer=clip,
        text_encoder_2=_seeded(seed + 4, lambda: _tiny_t5(len(t5))),
        tokenizer_2=t5,
        transformer=transformer,
    )
    return _finish(pipe, dtype or torch.float32)


def tiny_wan_pipeline(seed: int = 0, dtype=None, two_experts: bool = False, ti2v: bool = False):
    """A random tiny `WanPipeline` (diffusers' test sizes; a UMT5 encoder built from a local config and the shipped
    T5 tokenizer). `two_experts`: Wan2.2 A14B-style, a second (low-noise) expert and boundary_ratio 0.875. `ti2v`:
    Wan2.2 TI2V-5B-style, one expert over the Wan2.2 VAE (residual, patch 2: 16x spatial, 4x temporal, 48 latent
    channels with their own mean / std), `expand_timesteps` and TI2V's flow shift 5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if two_experts and ti2v:
        raise ValueError("Wan2.2 TI2V-5B has one expert: two_experts and ti2v exclude each other")
    tokenizer = t5_tokenizer()
    channels = 48 if ti2v else 16

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=channels, out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=32,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    text_config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(seed + 2, lambda: UMT5EncoderModel(text_config)),
        vae=_seeded(seed + 1, _tiny_wan22_vae if ti2v else _tiny_wan_vae),
        transformer=_seeded(seed, transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0 if ti2v else 7.0),
        transformer_2=_seeded(seed + 3, transformer) if two_experts else None,
        boundary_ratio=0.875 if two_experts else None,
        expand_timesteps=ti2v,
    )
    return _finish(pipe, dtype or torch.float32)


def _tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _tiny_wan22_vae():
    """The Wan2.2 VAE's layout (diffusers' conversion settings) at diffusers' test sizes; the 48 channels' mean and
    std are made up, unequal, so that decoding checks the un-normalisation."""
    from diffusers import AutoencoderKLWan

    z = 48
    return AutoencoderKLWan(base_dim=3, z_dim=z, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                            dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                            scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=[round(0.1 * (k % 7 - 3), 2) for k in range(z)],
                            latents_std=[round(0.5 + 0.25 * (k % 5), 2) for k in range(z)])
