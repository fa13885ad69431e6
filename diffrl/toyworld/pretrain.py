"""Pretrain the SynthShapes toy base models from scratch (`diffrl pretrain-toy`).

Both models are ordinary diffusers pipelines saved with `save_pretrained`, so the standard policies
load them with no special code path:
- family "sd3": StableDiffusion3Pipeline = SD3Transformer2DModel (rectified flow) + two tiny
  CLIPTextModelWithProjection encoders trained jointly with it + a small AutoencoderKL; no T5.
- family "sd": StableDiffusionPipeline = UNet2DConditionModel (DDPM epsilon) + a tiny CLIPTextModel
  trained jointly + the same autoencoder.
The autoencoder is trained first (reconstruction, factor-2 downsampling, 4 latent channels) and
shared. Training stops at a held-out exact-scorer accuracy target so the base stays clearly
imperfect (headroom for reward fine-tuning), or at a step / time budget.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffrl.pipelines.tiny import tokenizer_path

IMAGE_SIZE = 32
LATENT_CHANNELS = 4


# ---- data --------------------------------------------------------------------------------------
def toy_eval_prompts(eval_prompts: int = 300) -> list[dict]:
    """Pretraining's evaluation prompts: the first `eval_prompts` of builtin:toy_eval (captions over the
    pretraining pairs) and a sixth as many of builtin:toy_eval_pairs (pairs pretraining never shows)."""
    from diffrl.toyworld.prompts import builtin_prompt_sets

    sets = builtin_prompt_sets()
    return sets["toy_eval"][:eval_prompts] + sets["toy_eval_pairs"][: max(1, eval_prompts // 6)]


def write_builtin_prompt_sets(folder: str | Path) -> None:
    """Write assets/prompts/{toy_train,toy_eval,toy_eval_pairs}.jsonl (prompts.builtin_prompt_sets)."""
    from diffrl.toyworld import write_jsonl
    from diffrl.toyworld.prompts import builtin_prompt_sets

    for name, rows in builtin_prompt_sets().items():
        write_jsonl(rows, Path(folder) / f"{name}.jsonl")


@dataclass
class SceneData:
    prompts: list[str]
    metadata: list[dict]
    images: torch.Tensor  # [N, 3, H, W] uint8


def render_dataset(n: int, seed: int, allowed_pairs=None, size: int = IMAGE_SIZE) -> SceneData:
    """n random (caption, scene) pairs from the training grammar (compositional split applied)."""
    from diffrl.toyworld import render, sample_metadata

    rng = np.random.default_rng(seed)
    metas, images = [], []
    for _ in tqdm(range(n), desc="rendering scenes", leave=False):
        meta = sample_metadata(rng, allowed_pairs=allowed_pairs)
        metas.append(meta)
        images.append(render(meta, rng, size=size))
    imgs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
    return SceneData([m["prompt"] for m in metas], metas, imgs)


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]


# ---- components --------------------------------------------------------------------------------
def toy_tokenizer(max_length: int):
    """The shipped CLIP BPE tokenizer with a short context: toy captions are a dozen tokens."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_path("clip"))
    tok.model_max_length = max_length
    return tok


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    )


def clip_config(vocab: int, max_length: int, hidden: int = 64, projection: int = 64):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=projection,
        hidden_act="quick_gelu", attention_dropout=0.0, dropout=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def train_vae(data: SceneData, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, log=print):
    """Reconstruction autoencoder for flat-colour scenes (MSE + a tiny KL keeps latents well scaled)."""
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="autoencoder", leave=False)
    for step in bar:
        idx = torch.randint(0, len(data.prompts), (batch,), generator=gen)
        x = to_unit(data.images[idx])  # [b, 3, H, W]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(mse=f"{F.mse_loss(rec, x).item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = to_unit(data.images[:256])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        log(f"[pretrain-toy] autoencoder reconstruction MSE on 256 scenes: {F.mse_loss(rec, x).item():.5f}")
    return vae


@torch.no_grad()
def encode_latents(vae, images_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of every scene. -> [N, C, h, w] (raw, unscaled)"""
    return torch.cat([vae.encode(to_unit(images_uint8[i : i + batch])).latent_dist.mode() for i in range(0, len(images_uint8), batch)])


def build_sd3(vae, tokenizer, latents: torch.Tensor, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))
    cfg = clip_config(len(tokenizer), tokenizer.model_max_length)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=6, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=2 * cfg.projection_dim,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(cfg), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(cfg), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def build_sd(vae, tokenizer, latents: torch.Tensor, seed: int = 0):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    vae.register_to_config(shift_factor=None, scaling_factor=float(1.0 / latents.std()))
    cfg = clip_config(len(tokenizer), tokenizer.model_max_length)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.hidden_size, attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(cfg), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---- denoiser training ---------------------------------------------------------------------------
def _load_pipeline(folder, family: str):
    """A saved toy pipeline folder (as written by `pretrain`), ready to train further."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    cls = StableDiffusion3Pipeline if family == "sd3" else StableDiffusionPipeline
    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(f"--init-from {folder}: no model_index.json there; pass a folder written by pretrain-toy")
    kwargs = {} if family == "sd3" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(folder, **kwargs)
    for m in _trainable(pipe, family):
        m.train().requires_grad_(True)
    return pipe


def _trainable(pipe, family: str) -> list[torch.nn.Module]:
    if family == "sd3":
        return [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    return [pipe.unet, pipe.text_encoder]


def _loss(pipe, family: str, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    """One denoising loss on scaled latents x0 [b, C, h, w] (text encoders receive gradients)."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    if family == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=1)
        sigma = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal (SD3)
        s = sigma.view(b, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise  # [b, C, h, w]
        v = pipe.transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=pe,
                             pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(v, noise - x0)
    pe, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (b,), generator=gen)
    x_t = pipe.scheduler.add_noise(x0, noise, t)
    eps = pipe.unet(x_t, t, encoder_hidden_states=pe, return_dict=False)[0]
    return F.mse_loss(eps, noise)


def scale_latents(pipe, family: str, raw: torch.Tensor) -> torch.Tensor:
    cfg = pipe.vae.config
    shift = cfg.shift_factor if family == "sd3" and cfg.shift_factor is not None else 0.0
    return (raw - shift) * cfg.scaling_factor


@torch.no_grad()
def evaluate_accuracy(pipe, family: str, metadata: list[dict], steps: int = 20, guidance: float = 4.5,
                      batch: int = 64, seed: int = 1234) -> dict:
    """Held-out exact accuracy per tag through the standard policy adapter and the ODE sampler."""
    from diffrl.pipelines.sd import StableDiffusionPolicy
    from diffrl.pipelines.sd3 import SD3Policy
    from diffrl.rollout import sample
    from diffrl.sampling import make_sampler
    from diffrl.toyworld import score_images

    for m in _trainable(pipe, family):
        m.eval()
    policy = SD3Policy(pipe, IMAGE_SIZE, IMAGE_SIZE) if family == "sd3" else StableDiffusionPolicy(pipe, IMAGE_SIZE, IMAGE_SIZE)
    sampler = make_sampler("flow_ode" if family == "sd3" else "ddim", eta=0.0)
    gen = torch.Generator().manual_seed(seed)
    results = []
    for i in range(0, len(metadata), batch):
        metas = metadata[i : i + batch]
        noise = policy.initial_noise(len(metas), generator=gen)
        traj = sample(policy, policy.encode_prompt([m["prompt"] for m in metas]), sampler, policy.schedule(steps),
                      guidance, latents=noise, record=False)
        results += score_images(policy.decode(traj.final), metas)
    for m in _trainable(pipe, family):
        m.train()
    per_tag: dict[str, list[float]] = {}
    for meta, r in zip(metadata, results):
        if meta.get("split") != "unseen_pair":  # reported apart, as "unseen"
            per_tag.setdefault(meta["tag"], []).append(float(r.correct))
    out = {tag: sum(v) / len(v) for tag, v in sorted(per_tag.items())}
    out["overall"] = sum(out.values()) / len(out)  # mean over tags, as GenEval reports it
    unseen = [float(r.correct) for m, r in zip(metadata, results) if m.get("split") == "unseen_pair"]
    if unseen:
        out["unseen"] = sum(unseen) / len(unseen)
    out["partial"] = sum(r.partial for r in results) / len(results)
    return out


def train_denoiser(pipe, params, latents: torch.Tensor, prompts: list[str], loss_fn, evaluate, args,
                   steps_before: int = 0) -> None:
    """The denoiser pretraining loop of every family: AdamW with 200 warm-up steps, `args.caption_dropout` empty
    captions, gradients clipped at 1; every `args.eval_every` steps (and at the end) `evaluate()` -> accuracies is
    logged to OUTPUT.log.jsonl, the pipeline saved to OUTPUT, and training stops at `args.target_accuracy`.
    loss_fn(x0 [b, ...], prompts, generator) -> scalar loss; latents [N, ...] are already scaled."""
    out = Path(args.output_dir)
    log_path = out.with_suffix(".log.jsonl")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    bar = tqdm(range(1, args.max_steps + 1), desc=f"pretrain {args.family}")
    for step in bar:
        idx = torch.randint(0, len(prompts), (args.batch_size,), generator=gen)
        batch_prompts = [prompts[i] if torch.rand(1, generator=gen) > args.caption_dropout else "" for i in idx.tolist()]
        loss = loss_fn(latents[idx], batch_prompts, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        minutes = (time.time() - start) / 60
        done = step == args.max_steps or minutes > args.max_minutes
        if step % args.eval_every == 0 or done:
            acc = evaluate()
            row = {"step": steps_before + step, "minutes": round(minutes, 2), "loss": loss.item(), **acc}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tqdm.write(f"[pretrain-toy] step {step} ({minutes:.1f} min): held-out accuracy {acc['overall']:.3f} "
                       + " ".join(f"{k}={v:.2f}" for k, v in acc.items() if k != "overall"))
            pipe.save_pretrained(out, safe_serialization=True)
            recorded_args = {k: v for k, v in vars(args).items() if not callable(v)}  # the CLI's handler is not data
            (out / "toy_pretrain.json").write_text(json.dumps({**row, "family": args.family, "args": recorded_args},
                                                              indent=1))
            if acc["overall"] >= args.target_accuracy:
                tqdm.write(f"[pretrain-toy] reached target accuracy {args.target_accuracy}: stopping")
                break
        if done:
            break


def pretrain(args) -> Path:
    from diffrl.toyworld import compositional_split

    if args.family == "wan":  # the clip world's video model
        from diffrl.toyworld.pretrain_clips import pretrain_clips

        return pretrain_clips(args)
    if args.family == "motion":  # the procedural motion world's text-to-motion model
        from diffrl.motion.pretrain import pretrain_motion

        return pretrain_motion(args)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: tqdm.write(msg)  # noqa: E731
    train_pairs, heldout_pairs = compositional_split(seed=0)
    data = render_dataset(args.num_scenes, seed=args.seed, allowed_pairs=train_pairs)
    # evaluation: prompts spread evenly over tags; some use colour-shape pairs never seen in pretraining
    heldout = toy_eval_prompts(args.eval_prompts)
    seen = set(data.prompts)
    log(f"[pretrain-toy] {len(data.prompts)} scenes ({len(seen)} distinct captions); {len(heldout)} evaluation prompts, "
        f"{sum(m['split'] == 'unseen_pair' for m in heldout)} with a colour-shape pair never seen in pretraining")

    steps_before = 0
    if args.init_from:
        # continue a saved model: its autoencoder, tokenizer and latent scaling are kept as they are
        pipe = _load_pipeline(args.init_from, args.family)
        vae = pipe.vae.eval().requires_grad_(False)
        raw = encode_latents(vae, data.images)  # [N, C, h, w]
        previous = Path(args.init_from) / "toy_pretrain.json"
        steps_before = json.loads(previous.read_text())["step"] if previous.is_file() else 0
        log(f"[pretrain-toy] continuing {args.init_from} after {steps_before} steps")
    else:
        token_lengths = [len(ids) for ids in toy_tokenizer(77)(data.prompts[:2000] + [m["prompt"] for m in heldout]).input_ids]
        tokenizer = toy_tokenizer(max(token_lengths) + 2)
        log(f"[pretrain-toy] longest caption {max(token_lengths)} tokens; text context {tokenizer.model_max_length}")

        vae_dir = Path(args.vae) if args.vae else None
        if vae_dir and (vae_dir / "config.json").is_file():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        else:
            vae = train_vae(data, args.vae_steps, seed=args.seed, log=log)
            if vae_dir:
                vae.save_pretrained(vae_dir)
        raw = encode_latents(vae, data.images)  # [N, C, h, w]
        pipe = (build_sd3 if args.family == "sd3" else build_sd)(vae, tokenizer, raw, seed=args.seed)
    pipe.set_progress_bar_config(disable=True)
    latents = scale_latents(pipe, args.family, raw)
    params = [p for m in _trainable(pipe, args.family) for p in m.parameters()]
    log(f"[pretrain-toy] {args.family}: {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters")
    train_denoiser(pipe, params, latents, data.prompts, lambda x0, prompts, gen: _loss(pipe, args.family, x0, prompts, gen),
                   lambda: evaluate_accuracy(pipe, args.family, heldout, steps=args.eval_steps), args, steps_before)
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="diffrl pretrain-toy")
    p.add_argument("--family", choices=["sd3", "sd", "wan", "motion"], default="sd3",
                   help="flow transformer (sd3), UNet DDPM (sd), the SynthShapes-clips video model (wan), or the "
                        "procedural motion world's text-to-motion model (motion)")
    p.add_argument("--output-dir", required=True, help="where the diffusers pipeline folder is saved (at each evaluation)")
    p.add_argument("--init-from", default=None,
                   help="continue training this saved toy pipeline folder (keeps its autoencoder and tokenizer)")
    p.add_argument("--vae", default=None, help="autoencoder folder: loaded if present, else trained and saved there")
    p.add_argument("--num-scenes", type=int, default=20000, help="pre-rendered training scenes")
    p.add_argument("--vae-steps", type=int, default=1500, help="autoencoder training steps")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop after this much training time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for CFG)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-prompts", type=int, default=300, help="evaluation prompts, spread evenly over the 6 tags")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--target-accuracy", type=float, default=0.3,
                   help="stop once held-out exact accuracy reaches this (keep the base imperfect: headroom for RL)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    pretrain(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
