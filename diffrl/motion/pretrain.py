"""Pretrain the toy text-to-motion base model from scratch (`diffrl pretrain-toy --family motion`).

The result is a `MotionDiffusionPipeline` folder (diffrl.pipelines.motion) saved with `save_pretrained`:
- the MDM-style transformer denoiser over HumanML3D features [T, 263], x0-prediction (MDM's objective: the plain
  MSE between the predicted and the clean normalised features), DDPM with 1000 cosine steps;
- a small CLIP text encoder over the shipped tokenizer, trained jointly (MDM freezes a pretrained CLIP; none can be
  downloaded here), with 10 % empty captions for classifier-free guidance;
- the features' mean / std, measured on the training motions, stored in the denoiser (MDM's Mean.npy / Std.npy).
Training data: the procedural world's motions of the training captions only (builtin:toy_motion_train, several
seeds each); the held-out captions (builtin:toy_motion_eval) are never trained on. Training stops at a held-out
exact-scorer accuracy target so the base stays imperfect (headroom for reward fine-tuning), or at a step / time
budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffrl.toyworld.pretrain import train_denoiser

STD_FLOOR = 1e-2
"""Smallest feature std used for normalisation: some features barely vary in the toy world (e.g. a rotation channel
of a joint that never bends that way); dividing by their tiny std would blow the model's small errors up."""


def motion_dataset(records: list[dict], seeds_per_caption: int, seed: int = 0):
    """(prompts, features float32 [N, T, 263]) of the world's motions for `records`, `seeds_per_caption` each."""
    from diffrl.motion.representation import joints_to_features
    from diffrl.motion.world import generate

    prompts, feats = [], []
    for k in tqdm(range(seeds_per_caption), desc="generating motions", leave=False):
        for i, rec in enumerate(records):
            joints = generate(rec, seed=seed + k * len(records) + i)  # [P, 22, 3] float64
            feats.append(joints_to_features(joints).float())  # [T, 263]
            prompts.append(rec["prompt"])
    return prompts, torch.stack(feats)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over every frame of every motion [N, T, D] -> ([D], [D]), std floored."""
    flat = features.reshape(-1, features.shape[-1])  # [N T, D]
    return flat.mean(0), flat.std(0).clamp(min=STD_FLOOR)


def build_pipeline(tokenizer, mean: torch.Tensor, std: torch.Tensor, num_frames: int, seed: int = 0, latent: int = 128,
                   layers: int = 4, text_hidden: int = 64):
    """The toy model's components, random-initialised: denoiser (latent 128, 4 layers, 4 heads, ff 256), CLIP text
    encoder (hidden 64, 2 layers), DDPM scheduler (1000 cosine steps, x0-prediction, as MDM)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    from diffrl.motion.representation import FEATURE_DIM
    from diffrl.pipelines.motion import MotionDiffusionPipeline, MotionTransformer
    from diffrl.toyworld.pretrain import clip_config

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(len(tokenizer), tokenizer.model_max_length, hidden=text_hidden,
                                             projection=text_hidden))
    transformer = MotionTransformer(feature_dim=FEATURE_DIM, latent_dim=latent, num_layers=layers, num_heads=4,
                                    ff_dim=2 * latent, text_dim=text_hidden, max_frames=max(num_frames, 120), dropout=0.1)
    transformer.set_normalization(mean, std)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                              clip_sample=False)
    return MotionDiffusionPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, default_frames=num_frames)


def pooled_text(pipe, prompts: list[str]) -> torch.Tensor:
    """CLIP's pooled embedding of each prompt [b, text_dim], with gradients (the pipeline's encode_prompt has none)."""
    ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # [b, L]
    return pipe.text_encoder(ids).pooler_output  # [b, text_dim]


def x0_loss(pipe, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    """MDM's loss on normalised features x0 [b, T, D]: MSE between the x0-prediction at a uniform timestep and x0."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)  # [b, T, D]
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (b,), generator=gen)  # [b]
    x_t = pipe.scheduler.add_noise(x0, noise, t)  # [b, T, D]
    text = pooled_text(pipe, prompts)  # [b, text_dim]
    pred = pipe.transformer(x_t, t, text, return_dict=False)[0]  # [b, T, D]
    return F.mse_loss(pred, x0)


@torch.no_grad()
def evaluate_motion_accuracy(pipe, metadata: list[dict], num_frames: int, steps: int = 50, guidance: float = 2.5,
                             batch: int = 100, seed: int = 1234) -> dict:
    """Held-out exact accuracy per tag (and overall, the mean over tags), partial credit and the foot-skating ratio,
    through the policy adapter and deterministic DDIM, as fine-tuning evaluates."""
    from diffrl.motion.physics import foot_skating_ratio
    from diffrl.motion.representation import recover_from_ric
    from diffrl.pipelines.motion import MotionPolicy
    from diffrl.rewards import build_reward
    from diffrl.rollout import sample
    from diffrl.sampling import make_sampler

    trained = (pipe.transformer, pipe.text_encoder)
    for m in trained:
        m.eval()
    policy = MotionPolicy(pipe, num_frames=num_frames)
    exact, partial = build_reward("toymotion_accuracy"), build_reward("toymotion")
    gen = torch.Generator().manual_seed(seed)
    correct, credit, skating = [], [], []
    for i in range(0, len(metadata), batch):
        metas = metadata[i:i + batch]
        prompts = [m["prompt"] for m in metas]
        noise = policy.initial_noise(len(metas), generator=gen)
        traj = sample(policy, policy.encode_prompt(prompts), make_sampler("ddim", eta=0.0), policy.schedule(steps),
                      guidance, latents=noise, record=False)
        features = policy.decode(traj.final)  # [b, T, 263]
        correct += exact(features, prompts, metas).tolist()
        credit += partial(features, prompts, metas).tolist()
        skating += foot_skating_ratio(recover_from_ric(features)).tolist()
    for m in trained:
        m.train()
    per_tag: dict[str, list[float]] = {}
    for meta, c in zip(metadata, correct):
        per_tag.setdefault(meta["tag"], []).append(c)
    out = {tag: sum(v) / len(v) for tag, v in sorted(per_tag.items())}
    out["overall"] = sum(out.values()) / len(out)
    out["partial"] = sum(credit) / len(credit)
    out["skating"] = sum(skating) / len(skating)
    return out


def pretrain_motion(args) -> Path:
    from diffrl.data import load_prompts
    from diffrl.toyworld.pretrain import toy_tokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: tqdm.write(msg)  # noqa: E731
    train = load_prompts("builtin:toy_motion_train").metadata
    heldout = load_prompts("builtin:toy_motion_eval").metadata[: args.eval_prompts]
    seeds = max(1, args.num_scenes // len(train))
    prompts, features = motion_dataset(train, seeds, seed=args.seed)
    num_frames = features.shape[1]
    log(f"[pretrain-toy] {len(prompts)} motions ({len(set(prompts))} distinct captions, {num_frames} frames each); "
        f"{len(heldout)} held-out evaluation captions, none of them trained on")
    captions = sorted({*prompts, *(m["prompt"] for m in load_prompts("builtin:toy_motion_eval").metadata)})
    max_length = max(len(ids) for ids in toy_tokenizer(77)(captions).input_ids) + 2
    tokenizer = toy_tokenizer(max_length)
    mean, std = feature_statistics(features)
    pipe = build_pipeline(tokenizer, mean, std, num_frames, seed=args.seed)
    pipe.set_progress_bar_config(disable=True)
    x0 = (features - mean) / std  # [N, T, D] normalised, as the denoiser sees them
    trainable = [pipe.transformer, pipe.text_encoder]
    for m in trainable:
        m.train().requires_grad_(True)
    params = [p for m in trainable for p in m.parameters()]
    log(f"[pretrain-toy] motion: {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters")
    train_denoiser(pipe, params, x0, prompts, lambda x, texts, gen: x0_loss(pipe, x, texts, gen),
                   lambda: evaluate_motion_accuracy(pipe, heldout, num_frames, steps=args.eval_steps), args)
    return out
