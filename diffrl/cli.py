"""`diffrl train|sample`: YAML recipe + key=value overrides, validated before any model loads."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from diffrl.config import ConfigError, describe_options, load_config


def _options_help() -> str:
    lines = ["options (set in the YAML file or as key=value overrides):"]
    for key, type_name, default, doc in describe_options():
        lines.append(f"  {key} ({type_name}, default {default})")
        lines += textwrap.wrap(doc, width=92, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _train(args) -> int:
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None  # no recipe: all overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"diffrl: invalid config: {exc}", file=sys.stderr)
        return 2
    from diffrl.trainers.loop import Trainer

    Trainer(cfg).train()
    return 0


def _sample(args) -> int:
    import torch

    from diffrl.data import load_prompts
    from diffrl.pipelines.registry import load_policy
    from diffrl.rollout import sample
    from diffrl.sampling import make_sampler
    from diffrl.trainers.loop import DTYPES, derive_generator
    from diffrl.visual import save_grid

    if args.prompt:
        prompts = list(args.prompt)
    elif args.prompts:
        prompts = load_prompts(args.prompts).prompts
    else:
        print("diffrl sample: give --prompt TEXT (repeatable) or --prompts FILE", file=sys.stderr)
        return 2
    if args.lora and not Path(args.lora).is_dir():
        print(f"diffrl sample: --lora folder not found: {args.lora}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.model, torch_dtype=DTYPES[args.dtype], device=args.device, resolution=args.resolution, seed=args.model_seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"diffrl sample: {exc}", file=sys.stderr)
        return 2
    if args.lora:
        policy.load_lora(args.lora)
    flow = policy.prediction_type == "flow"
    sampler = make_sampler("flow_ode" if flow else "ddim", eta=0.0)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, all_images = [], []
    schedule = policy.schedule(args.steps)
    for i, prompt in enumerate(prompts):
        seeds = [args.seed + i * args.num_images + j for j in range(args.num_images)]
        noise = torch.cat([policy.initial_noise(1, generator=derive_generator(s)) for s in seeds]).to(policy.device)
        cond = policy.encode_prompt([prompt] * args.num_images, args.negative_prompt)
        with torch.no_grad():
            traj = sample(policy, cond, sampler, schedule, args.guidance_scale, latents=noise, record=False)
            images = policy.decode(traj.final)
        all_images.append(images)
        for j, (s, img) in enumerate(zip(seeds, images)):
            name = f"{i:04d}_{j:02d}.png"
            _save_png(img, out / name)
            records.append({"file": name, "prompt": prompt, "seed": s})
    (out / "samples.json").write_text(json.dumps({"model": args.model, "lora": args.lora, "steps": args.steps,
                                                   "guidance_scale": args.guidance_scale, "samples": records}, indent=1))
    save_grid(torch.cat(all_images), [r["prompt"] for r in records], out / "grid.png")
    print(f"diffrl: wrote {len(records)} images, samples.json and grid.png to {out}")
    return 0


def _save_png(image, path: Path) -> None:
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl",
        description="Reward fine-tuning and inference-time steering for diffusion and flow-matching generators.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample}")
    train = sub.add_parser(
        "train", help="fine-tune a model against a reward",
        description="Train with a YAML recipe; any option can be overridden as key=value "
                    "(e.g. train.learning_rate=1e-4 max_iterations=20 resume=outputs/run).",
        epilog=_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", help="YAML recipe (configs/...); omitted: all defaults")
    train.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections")
    train.set_defaults(func=_train)

    smp = sub.add_parser("sample", help="generate images (optionally with a trained LoRA) to a folder of PNGs")
    smp.add_argument("--model", default="tiny-sd3", help="tiny-sd | tiny-sd3 | tiny-flux | local diffusers folder | cached hub id")
    smp.add_argument("--lora", default=None, help="LoRA folder written by training (checkpoints/iter_*/lora)")
    smp.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    smp.add_argument("--prompts", default=None, help="a prompt file (.txt / .jsonl) or builtin:<name>")
    smp.add_argument("--num-images", type=int, default=1, help="images per prompt")
    smp.add_argument("--steps", type=int, default=40, help="denoising steps (deterministic ODE / DDIM)")
    smp.add_argument("--guidance-scale", type=float, default=4.5, help="classifier-free guidance scale")
    smp.add_argument("--negative-prompt", default="", help="negative prompt for CFG")
    smp.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    smp.add_argument("--seed", type=int, default=0, help="first seed; image j of prompt i uses seed + i * num_images + j")
    smp.add_argument("--model-seed", type=int, default=0, help="weights seed of the built-in tiny models")
    smp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    smp.add_argument("--device", default="cuda" if _cuda() else "cpu")
    smp.add_argument("--output-dir", default="outputs/samples")
    smp.set_defaults(func=_sample)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
