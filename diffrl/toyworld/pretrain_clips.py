"""Pretrain the SynthShapes-clips toy video model from scratch (`diffrl pretrain-toy --family wan`).

The result is a stock diffusers `WanPipeline` saved with `save_pretrained` (WanPolicy loads it like any Wan folder):
- AutoencoderKLWan, the causal 3-D VAE, trained first on clip reconstruction: 4x in space (32 px -> 8 x 8) and 2x
  in time (9 frames -> 5 latent frames; the real Wan's 4x lost the shapes' colours at this size and CPU budget);
  per-channel latents_mean / latents_std are set from the encoded clips, as the real VAE's config carries them;
- WanTransformer3DModel (rectified flow, velocity target, patch 1 x 2 x 2) and a UMT5 text encoder over the shipped
  T5 tokenizer, trained jointly, with 10 % empty captions for classifier-free guidance.
Training stops at a held-out exact-scorer accuracy target so the base stays imperfect (headroom for reward
fine-tuning), or at a step / time budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .pretrain import train_denoiser

LATENT_CHANNELS = 16
OBJECT_WEIGHT = 0.5
"""Extra weight of the shape pixels in the autoencoder's loss: they are a few percent of a clip, and their palette
colours are what the exact scorer reads. Without it the shapes were not learned (their error stayed at 1.75 over
100 steps while the background converged); at 4 nothing converged; at 0.5 both did."""


def render_clip_dataset(n: int, seed: int, size: int, frames: int):
    """n random (caption, clip) pairs: (prompts, uint8 [N, F, 3, H, W])."""
    from .clips import render_clip, sample_clip_metadata

    rng = np.random.default_rng(seed)
    prompts, clips = [], []
    for _ in tqdm(range(n), desc="rendering clips", leave=False):
        meta = sample_clip_metadata(rng)
        prompts.append(meta["prompt"])
        clips.append(render_clip(meta, rng, size=size, frames=frames))
    return prompts, torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).contiguous()


def to_unit(clips_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, 3, H, W] -> float [B, 3, F, H, W] in [-1, 1] (the VAE's layout)."""
    return clips_uint8.permute(0, 2, 1, 3, 4).float() / 127.5 - 1.0


def build_video_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True], latents_mean=[0.0] * LATENT_CHANNELS,
                            latents_std=[1.0] * LATENT_CHANNELS, scale_factor_spatial=4, scale_factor_temporal=2)


def train_video_vae(clips: torch.Tensor, steps: int, batch: int = 16, lr: float = 1e-3, seed: int = 0, log=print):
    torch.manual_seed(seed)
    vae = build_video_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - 0.9 * s / steps))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="video autoencoder", leave=False)
    for step in bar:
        x = to_unit(clips[torch.randint(0, len(clips), (batch,), generator=gen)])  # [b, 3, F, H, W]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        shape_pixels = (x < 0.99).any(dim=1, keepdim=True).float()  # [b, 1, F, H, W]: not white
        shape_mse = ((rec - x) ** 2 * shape_pixels).sum() / (3 * shape_pixels.sum()).clamp(min=1)
        loss = mse + OBJECT_WEIGHT * shape_mse + 1e-4 * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}", shape_mse=f"{shape_mse.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = to_unit(clips[:64])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        log(f"[pretrain-toy] video autoencoder reconstruction MSE on 64 clips: {F.mse_loss(rec, x).item():.5f}")
    return vae


@torch.no_grad()
def encode_clip_latents(vae, clips: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Posterior means, raw: [N, C, F', h, w]."""
    return torch.cat([vae.encode(to_unit(clips[i:i + batch])).latent_dist.mode() for i in range(0, len(clips), batch)])


def build_wan(vae, tokenizer, raw_latents: torch.Tensor, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    dims = (0, 2, 3, 4)
    vae.register_to_config(latents_mean=raw_latents.mean(dim=dims).tolist(), latents_std=raw_latents.std(dim=dims).tolist())
    text_config = UMT5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                                        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=64,
                                        freq_dim=64, ffn_dim=256, num_layers=6, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanPipeline(tokenizer=tokenizer, text_encoder=UMT5EncoderModel(text_config), vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def normalise(pipe, raw: torch.Tensor) -> torch.Tensor:
    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return (raw - mean) / std


def flow_loss(pipe, x0: torch.Tensor, prompts: list[str], gen: torch.Generator, max_length: int) -> torch.Tensor:
    """Rectified-flow loss on normalised latents x0 [b, C, F', h, w] (logit-normal sigma, velocity target)."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    pe = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_length, device=torch.device("cpu"))
    sigma = torch.sigmoid(torch.randn(b, generator=gen))
    s = sigma.view(b, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = pipe.transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=pe, return_dict=False)[0]
    return F.mse_loss(v, noise - x0)


@torch.no_grad()
def evaluate_clip_accuracy(pipe, metadata: list[dict], size: int, frames: int, steps: int = 10,
                           guidance: float = 4.5, batch: int = 50, seed: int = 1234) -> dict:
    """Exact accuracy per tag through WanPolicy and the ODE sampler (the path every trainer samples through)."""
    from diffrl.pipelines.wan import WanPolicy
    from diffrl.rollout import sample
    from diffrl.sampling import make_sampler

    from .clips import score_clips, still_share

    for m in (pipe.transformer, pipe.text_encoder):
        m.eval()
    policy = WanPolicy(pipe, size, size, num_frames=frames)
    sampler = make_sampler("flow_ode", eta=0.0)
    gen = torch.Generator().manual_seed(seed)
    results, still = [], []
    for i in range(0, len(metadata), batch):
        metas = metadata[i:i + batch]
        noise = policy.initial_noise(len(metas), generator=gen)
        traj = sample(policy, policy.encode_prompt([m["prompt"] for m in metas]), sampler, policy.schedule(steps),
                      guidance, latents=noise, record=False)
        videos = policy.decode(traj.final)  # [b, F, 3, H, W]
        results += score_clips(videos, metas)
        still.append(still_share(videos) * len(metas))
    for m in (pipe.transformer, pipe.text_encoder):
        m.train()
    per_tag: dict[str, list[float]] = {}
    for meta, r in zip(metadata, results):
        per_tag.setdefault(meta["tag"], []).append(float(r.correct))
    out = {tag: sum(v) / len(v) for tag, v in sorted(per_tag.items())}
    out["overall"] = sum(out.values()) / len(out)
    out["partial"] = sum(r.partial for r in results) / len(results)
    out["still"] = sum(still) / len(metadata)
    return out


def pretrain_clips(args) -> Path:
    from diffrl.pipelines.tiny import t5_tokenizer

    from .clips import CLIP_FRAMES, CLIP_SIZE, CLIP_TAGS, builtin_clip_prompt_sets, enumerate_clip_metadata

    torch.set_num_threads(args.threads)
    size, frames = CLIP_SIZE, CLIP_FRAMES
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: tqdm.write(msg)  # noqa: E731
    prompts, clips = render_clip_dataset(args.num_scenes, args.seed, size, frames)
    sets = builtin_clip_prompt_sets()
    heldout = sets["toy_clips_eval"][: args.eval_prompts]
    log(f"[pretrain-toy] {len(prompts)} clips ({len(set(prompts))} distinct captions); {len(heldout)} evaluation prompts")

    tokenizer = t5_tokenizer()
    captions = [m["prompt"] for tag in CLIP_TAGS for m in enumerate_clip_metadata(tag)]
    max_length = max(len(ids) for ids in tokenizer(captions).input_ids) + 1
    tokenizer.model_max_length = max_length  # saved with the pipeline: WanPolicy's default text length
    log(f"[pretrain-toy] longest caption {max_length - 1} tokens; text context {max_length}")

    vae_dir = Path(args.vae) if args.vae else None
    if vae_dir and (vae_dir / "config.json").is_file():
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(vae_dir).eval().requires_grad_(False)
    else:
        vae = train_video_vae(clips, args.vae_steps, seed=args.seed, log=log)
        if vae_dir:
            vae.save_pretrained(vae_dir)
    raw = encode_clip_latents(vae, clips)  # [N, C, F', h, w]
    pipe = build_wan(vae, tokenizer, raw, seed=args.seed)
    pipe.set_progress_bar_config(disable=True)
    latents = normalise(pipe, raw)
    trainable = [pipe.transformer, pipe.text_encoder]
    for m in trainable:
        m.train().requires_grad_(True)
    params = [p for m in trainable for p in m.parameters()]
    log(f"[pretrain-toy] wan: {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters; latents {tuple(latents.shape[1:])}")
    train_denoiser(pipe, params, latents, prompts, lambda x0, texts, gen: flow_loss(pipe, x0, texts, gen, max_length),
                   lambda: evaluate_clip_accuracy(pipe, heldout, size, frames, steps=args.eval_steps), args)
    return out
