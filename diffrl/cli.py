"""`diffrl train|sample|eval`: YAML recipe + key=value overrides, validated before any model loads."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from diffrl.config import ConfigError, describe_options, load_config

MODEL_HELP = ("toy-sd3 | toy-sd | toy-wan (shipped toy bases) | toy-motion (procedural motion world) | tiny-sd | tiny-sd3 | "
              "tiny-flux | tiny-wan | tiny-wan22 | tiny-wan22-ti2v | tiny-motion | random-mdm (random weights; random-mdm "
              "at MDM's size) | local diffusers folder | cached hub id")
"""--model of `diffrl sample` and `diffrl eval`."""


def _options_help(sections: list[str] | None = None) -> str:
    """Every option (or those of `sections`, "run" for the top-level ones), grouped by section."""
    groups: dict[str, list[str]] = {}
    for key, type_name, default, doc in describe_options():
        section = key.split(".", 1)[0] if "." in key else "run"
        if sections is not None and section not in sections:
            continue
        lines = groups.setdefault(section, [])
        lines.append(f"  {key} ({type_name}, default {default})")
        lines += textwrap.wrap(doc, width=92, initial_indent="      ", subsequent_indent="      ")
    out = []
    for section, lines in groups.items():
        out += [f"{section}:" if section != "run" else "run options:", *lines, ""]
    return "\n".join(out).rstrip()


def _train_help(parser, args) -> str:
    """`diffrl train [CONFIG] [key=value ...] --help`: with a recipe, only the sections that run uses."""
    sections, note = None, "options (set in the YAML file or as key=value overrides), by section:"
    if args.config or args.overrides:
        try:
            cfg = load_config(args.config, args.overrides)
            sections = ["run", *(k for k, v in cfg.in_use().items() if isinstance(v, dict))]
            note = f"options of this run ({cfg.algorithm} on {cfg.model}), by section; other algorithms' sections left out:"
        except ConfigError as exc:
            note = f"(the recipe does not validate: {exc}; every option follows)\noptions, by section:"
    return "\n".join([parser.format_usage().rstrip(), "", parser.description, "", note, _options_help(sections)])


def _train(args) -> int:
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None  # no recipe: all overrides
    if args.help:
        print(_train_help(args.parser, args))
        return 0
    if args.print_config:  # the resolved config, validated; no model loads
        from omegaconf import OmegaConf

        try:
            print(OmegaConf.to_yaml(OmegaConf.create(load_config(args.config, args.overrides).in_use())), end="")
        except ConfigError as exc:
            print(f"diffrl: invalid config: {exc}", file=sys.stderr)
            return 2
        return 0
    from diffrl.api import build_trainer

    try:
        trainer = build_trainer(args.config, *args.overrides)
    except ConfigError as exc:
        print(f"diffrl: invalid config: {exc}", file=sys.stderr)
        return 2
    import errno

    from diffrl.checkpoint import CheckpointWriteError
    from diffrl.runloop import quiet_thread_oserrors

    try:
        with quiet_thread_oserrors():  # TensorBoard's writer thread on a full disk: the main thread reports it
            trainer.train()
    except CheckpointWriteError as exc:  # a full disk while checkpointing: one line; the earlier checkpoints are intact
        print(f"diffrl: {exc.strerror}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"diffrl: training stopped: {exc.strerror} ({exc.filename or 'a log or tracker file'}); resume from the "
              f"run's newest checkpoint with resume={trainer.out}", file=sys.stderr)
        return 1
    return 0


def _sample(args) -> int:
    import torch

    from diffrl.benchmarks.evaluate import generate, image_seed, save_png
    from diffrl.data import load_prompts
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
    if _rlg_error(args, "sample"):
        return 2
    kind = _sample_kind(args, "sample")
    if kind is None:
        return 2
    policy = _load_policy(args, "sample")
    if policy is None:
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "video":
        return _sample_clips(args, policy, prompts, out)
    if kind == "motion":
        return _sample_motions(args, policy, prompts, out)
    records, all_images = [], []
    for i, prompt in enumerate(prompts):
        seeds = [image_seed(args.seed, i, args.num_images, j) for j in range(args.num_images)]
        images = generate(policy, [prompt] * args.num_images, seeds, steps=args.steps,
                          guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt)
        all_images.append(images)
        for j, (s, img) in enumerate(zip(seeds, images)):
            name = f"{i:04d}_{j:02d}.png"
            save_png(img, out / name)
            records.append({"file": name, "prompt": prompt, "seed": s})
    (out / "samples.json").write_text(json.dumps({**_samples_settings(args), "samples": records}, indent=1))
    save_grid(torch.cat(all_images), [r["prompt"] for r in records], out / "grid.png")
    print(f"diffrl: wrote {len(records)} images, samples.json and grid.png to {out}")
    return 0


def _samples_settings(args) -> dict:
    """What samples.json records besides the samples: model, LoRA, sampling (and RL guidance) settings."""
    return {"model": args.model, "lora": args.lora, "steps": args.steps, "guidance_scale": args.guidance_scale,
            **_rlg_settings(args)}


def _sample_clips(args, policy, prompts: list[str], out: Path) -> int:
    """`diffrl sample` on a video model: one MP4 per clip, samples.json, and the first clips as grid.png (strips of 4
    frames, 2 a row) and grid.gif (playing, 4 a row)."""
    import torch
    from tqdm.auto import tqdm

    from diffrl.benchmarks.evaluate import GRID_CLIPS, generate, image_seed
    from diffrl.visual import save_clip_grid, save_grid, save_mp4, to_uint8

    fps, n = _fps(args), args.num_images
    records, grid = [], []
    bar = tqdm(total=len(prompts) * args.steps, desc="sample", unit="step")  # a clip takes minutes on a real Wan
    for i, prompt in enumerate(prompts):
        seeds = [image_seed(args.seed, i, n, j) for j in range(n)]
        clips = to_uint8(generate(policy, [prompt] * n, seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                                  negative_prompt=args.negative_prompt, progress=bar))  # [n, F, 3, H, W]
        for j, (s, clip) in enumerate(zip(seeds, clips)):
            name = f"{i:04d}_{j:02d}.mp4"
            save_mp4(clip, out / name, fps)
            records.append({"file": name, "prompt": prompt, "seed": s})
        grid.extend(clips[: GRID_CLIPS - len(grid)])
    bar.close()
    settings = {**_samples_settings(args), "num_frames": policy.num_frames, "fps": fps}
    (out / "samples.json").write_text(json.dumps({**settings, "samples": records}, indent=1))
    captions = [r["prompt"] for r in records[: len(grid)]]
    save_grid(torch.stack(grid), captions, out / "grid.png", cols=min(len(grid), 2))
    save_clip_grid(torch.stack(grid), captions, out / "grid.gif", fps=fps)
    print(f"diffrl: wrote {len(records)} clips of {policy.num_frames} frames ({fps:g} fps MP4s), samples.json, "
          f"grid.png and grid.gif to {out}")
    return 0


def _sample_motions(args, policy, prompts: list[str], out: Path) -> int:
    """`diffrl sample` on a motion model: per motion PPPP_JJ.mp4 (the stick figure) and PPPP_JJ.safetensors (its
    de-normalised features [T, 263] and joints [T, 22, 3], metres, y up, for Blender and other tools), samples.json,
    and the first motions as grid.png (key-frame strips, 2 a row) and grid.gif (playing, 4 a row)."""
    from tqdm.auto import tqdm

    from diffrl.benchmarks.evaluate import GRID_CLIPS, generate, image_seed, save_motion
    from diffrl.motion.render import save_motion_gif, save_motion_grid
    from diffrl.motion.representation import recover_from_ric

    fps, n = _fps(args, "motion"), args.num_images
    records, grid = [], []
    bar = tqdm(total=len(prompts) * args.steps, desc="sample", unit="step")
    for i, prompt in enumerate(prompts):
        seeds = [image_seed(args.seed, i, n, j) for j in range(n)]
        features = generate(policy, [prompt] * n, seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                            negative_prompt=args.negative_prompt, progress=bar).float().cpu()  # [n, T, 263]
        for j, s in enumerate(seeds):
            stem = f"{i:04d}_{j:02d}"
            save_motion(features[j], out / stem, fps, prompt)
            records.append({"file": f"{stem}.mp4", "features": f"{stem}.safetensors", "prompt": prompt, "seed": s})
        grid.extend(recover_from_ric(features[: GRID_CLIPS - len(grid)]))  # [T, 22, 3] each
    bar.close()
    settings = {**_samples_settings(args), "num_frames": features.shape[1], "fps": fps}
    (out / "samples.json").write_text(json.dumps({**settings, "samples": records}, indent=1))
    captions = [r["prompt"] for r in records[: len(grid)]]
    save_motion_grid(grid, captions, out / "grid.png")
    save_motion_gif(grid, captions, out / "grid.gif", fps=fps)
    print(f"diffrl: wrote {len(records)} motions of {features.shape[1]} frames (stick-figure MP4s at {fps:g} fps; "
          f"features and joints as .safetensors), samples.json, grid.png and grid.gif to {out}")
    return 0


def _fps(args, kind: str = "video") -> float:
    """--fps, else the model's own rate: Wan2.1's 16 for clips, HumanML3D's 20 for motions."""
    from diffrl.motion.skeleton import FPS
    from diffrl.visual import DEFAULT_FPS

    return args.fps if args.fps is not None else FPS if kind == "motion" else DEFAULT_FPS


def _sample_kind(args, command: str) -> str | None:
    """The kind of samples --model makes ("image", "video", "motion"), read without loading it, with --num-frames /
    --fps checked against it; None after printing why not."""
    from diffrl.pipelines.registry import policy_class, resolve_family

    try:
        kind = policy_class(resolve_family(args.model, None)).sample_kind
        video_options = [flag for flag, value in (("--num-frames", args.num_frames), ("--fps", args.fps)) if value is not None]
        if kind not in ("video", "motion") and video_options:
            raise ValueError(f"{', '.join(video_options)}: for video and motion models only; {args.model} makes {kind} samples")
        if args.fps is not None and not args.fps > 0:
            raise ValueError(f"--fps must be > 0, got {args.fps}")
        if args.num_frames is not None and kind == "video":
            from diffrl.pipelines.wan import check_frames

            check_frames(args.num_frames, "--num-frames")
        if args.num_frames is not None and kind == "motion":
            from diffrl.pipelines.motion import model_limits

            limit = model_limits(args.model)["max_frames"]  # the model's JSON, no weights
            if not 1 <= args.num_frames <= limit:
                raise ValueError(f"--num-frames must be in 1..{limit} for {args.model} (its max_frames, {limit / 20:.1f} s "
                                 f"at 20 fps), got {args.num_frames}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"diffrl {command}: {exc}", file=sys.stderr)
        return None
    return kind


def _load_policy(args, command: str):
    """The policy of --model (--dtype, --device, --resolution, --num-frames, --model-seed) with --lora applied; None
    after printing the reason when the model cannot be found."""
    from diffrl.pipelines.registry import load_policy
    from diffrl.runtime import DTYPES

    try:
        policy = load_policy(args.model, torch_dtype=DTYPES[args.dtype], device=args.device, resolution=args.resolution,
                             seed=args.model_seed, num_frames=args.num_frames)
        if args.lora:
            policy.load_lora(args.lora)  # fails on a folder without a LoRA or a LoRA of another model
    except (ValueError, FileNotFoundError) as exc:
        print(f"diffrl {command}: {exc}", file=sys.stderr)
        return None
    schedule = _rlg_schedule(args)
    if schedule is not None:
        from diffrl.guidance import RLGuidedPolicy

        policy = RLGuidedPolicy(policy, schedule)  # base = the same denoiser with the LoRA off
    return policy


def _add_video_options(parser) -> None:
    parser.add_argument("--num-frames", type=int, default=None, metavar="F",
                        help="video models: frames per clip, 4k + 1 (default: the model's: Wan 33, tiny-wan and toy-wan 9); "
                             "motion models: poses per motion, 20 a second")
    parser.add_argument("--fps", type=float, default=None,
                        help="video models: frame rate of the MP4s and GIFs (default 16, Wan2.1's own); motion models: "
                             "playback rate of the stick-figure MP4s and GIFs (default 20, HumanML3D's)")


def _add_rlg_options(parser) -> None:
    parser.add_argument("--rlg-scale", type=float, default=None, metavar="W",
                        help="RL guidance weight w mixing base (0) and --lora model (1); > 1 extrapolates")
    parser.add_argument("--rlg-start-scale", type=float, default=None, metavar="W0",
                        help="ramp w linearly from W0 at the first guided step to --rlg-scale at the last")
    parser.add_argument("--rlg-skip-steps", type=int, default=0, metavar="N",
                        help="sample the first N steps with the base model alone (w = 0)")


def _rlg_schedule(args):
    """The RL guidance schedule of --rlg-* (None when --rlg-scale is not given)."""
    if args.rlg_scale is None:
        return None
    from diffrl.guidance import GuidanceSchedule

    return GuidanceSchedule(scale=args.rlg_scale, start_scale=args.rlg_start_scale, skip_steps=args.rlg_skip_steps)


def _rlg_error(args, command: str) -> bool:
    """Print why the --rlg-* options cannot be used and return True; False when they are fine."""
    if args.rlg_scale is None:
        if args.rlg_start_scale is not None or args.rlg_skip_steps:
            print(f"diffrl {command}: --rlg-start-scale / --rlg-skip-steps need --rlg-scale", file=sys.stderr)
            return True
        return False
    if not args.lora:
        print(f"diffrl {command}: --rlg-scale needs --lora (RL guidance mixes the LoRA model with its base)",
              file=sys.stderr)
        return True
    try:
        _rlg_schedule(args)
    except ValueError as exc:
        print(f"diffrl {command}: {exc}", file=sys.stderr)
        return True
    return False


def _rlg_settings(args) -> dict:
    """The RL guidance options as recorded in samples.json / eval settings (empty without --rlg-scale)."""
    if args.rlg_scale is None:
        return {}
    return {"rlg_scale": args.rlg_scale, "rlg_start_scale": args.rlg_start_scale, "rlg_skip_steps": args.rlg_skip_steps}


def _rewards_refuse(names: list[str], kind: str, model: str) -> bool:
    """Print why a reward cannot score the model's samples (an image reward on clips) and return True; False when
    every reward accepts them. Read from the reward classes: nothing loads."""
    from diffrl.rewards.registry import reward_accepts

    for name in names:
        accepts = reward_accepts(name)
        if kind not in accepts:
            hint = "; per_frame scores an image reward on every frame" if kind == "video" else ""
            print(f"diffrl eval: reward {name} scores {' / '.join(accepts)} samples but {model} makes {kind} samples{hint}",
                  file=sys.stderr)
            return True
    return False


def _eval_rewards(args) -> list | None:
    """The --rewards built with their --reward-kwargs and loaded, so that a wrong argument or missing weights fail
    before the model loads and samples; None after printing why."""
    from diffrl.rewards import build_reward

    kwargs = {}
    try:
        for item in args.reward_kwargs or []:
            name, sep, text = item.partition("=")
            if not sep or name not in args.rewards:
                raise ValueError(f"--reward-kwargs takes NAME=JSON with NAME one of --rewards ({', '.join(args.rewards)}), "
                                 f"got {item!r}")
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--reward-kwargs {name}: {text!r} is not JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError(f"--reward-kwargs {name}: a JSON object of keyword arguments, e.g. "
                                 f"{name}='{{\"model\": \"tiny\"}}', got {text!r}")
            kwargs[name] = value
        return [build_reward(name, **kwargs.get(name, {})).load() for name in args.rewards]
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"diffrl eval: {exc}", file=sys.stderr)
        return None


def _eval(args) -> int:
    from diffrl.data import load_prompts
    from diffrl.rewards import build_reward, list_rewards

    # everything that can be checked without a model is checked first
    for name in args.rewards:
        if name not in list_rewards():
            try:
                build_reward(name)  # raises with the valid names and the closest match
            except ValueError as exc:
                print(f"diffrl eval: {exc}", file=sys.stderr)
                return 2
    for flag, value in (("--images-per-prompt", args.images_per_prompt), ("--steps", args.steps),
                        ("--batch-size", args.batch_size), ("--num-prompts", args.num_prompts or 1)):
        if value < 1:
            print(f"diffrl eval: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        sets = [load_prompts(spec) for spec in args.prompts]
    except (ValueError, FileNotFoundError) as exc:
        print(f"diffrl eval: {exc}", file=sys.stderr)
        return 2
    n = args.num_prompts
    prompt_set = type(sets[0])([p for s in sets for p in s.prompts[:n]], [m for s in sets for m in s.metadata[:n]])
    if args.lora and not Path(args.lora).is_dir():
        print(f"diffrl eval: --lora folder not found: {args.lora}", file=sys.stderr)
        return 2
    if args.compare_to and args.compare_to != "base" and not Path(args.compare_to).is_dir():
        print(f"diffrl eval: --compare-to is 'base' or a LoRA folder; not found: {args.compare_to}", file=sys.stderr)
        return 2
    if args.run_dir and not (Path(args.run_dir) / "metrics.jsonl").is_file():
        print(f"diffrl eval: --run-dir has no metrics.jsonl: {args.run_dir}", file=sys.stderr)
        return 2
    if _rlg_error(args, "eval"):
        return 2
    kind = _sample_kind(args, "eval")
    if kind is None or _rewards_refuse(args.rewards, kind, args.model):
        return 2
    rewards = _eval_rewards(args)
    if rewards is None:
        return 2
    policy = _load_policy(args, "eval")
    if policy is None:
        return 2
    from diffrl.benchmarks.evaluate import evaluate
    from diffrl.benchmarks.report import write_comparison
    from diffrl.stats import headline

    settings = {"model": args.model, "lora": args.lora, "resolution": args.resolution, "dtype": args.dtype,
                "model_seed": args.model_seed, **_rlg_settings(args)}
    common = dict(images_per_prompt=args.images_per_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                  seed=args.seed, batch_size=args.batch_size, negative_prompt=args.negative_prompt, fps=_fps(args, kind),
                  motion_videos=not args.no_motion_videos)
    try:
        metrics = evaluate(policy, prompt_set, rewards, output_dir=args.output_dir, run_dir=args.run_dir,
                           settings=settings, **common)
        comparison = None
        if args.compare_to:
            # the baseline: the same model, prompts and seeds, with the other LoRA (or none), into OUTPUT/baseline
            baseline_lora = None if args.compare_to == "base" else args.compare_to
            del policy
            baseline = _load_policy(argparse.Namespace(**{**vars(args), "lora": baseline_lora, "rlg_scale": None}), "eval")
            if baseline is None:
                return 2
            evaluate(baseline, prompt_set, rewards, output_dir=Path(args.output_dir) / "baseline",
                     settings={**settings, "lora": baseline_lora, **{k: None for k in _rlg_settings(args)}}, **common)
            comparison = write_comparison(args.output_dir, Path(args.output_dir) / "baseline", [r.name for r in rewards],
                                          label=f"{args.lora or 'base'} vs {args.compare_to}")
    except ValueError as exc:  # e.g. resuming into a folder made with other settings
        print(f"diffrl eval: {exc}", file=sys.stderr)
        return 2
    unit = {"video": "clip", "motion": "motion"}.get(kind, "image")
    for name, m in metrics["rewards"].items():
        lo, hi = m["ci95"]
        line = f"{name}: {m['mean']:.4f} per {unit} (95% CI {lo:.4f} .. {hi:.4f}, {m['n']} {unit}s)"
        if "mean_over_tags" in m:  # GenEval's overall score leads
            line = (f"{name}: {m['mean_over_tags']:.4f} ± {m['mean_over_tags_stderr']:.4f} mean over "
                    f"{len(m['tags'])} tags (± s.e.); {m['mean']:.4f} per {unit}, {m['n']} {unit}s")
        print(line)
        for split, s in m.get("splits", {}).items():
            value, se = headline(s)
            print(f"  {split}: {value:.4f} ± {se:.4f}{' mean over tags' if 'mean_over_tags' in s else ''}, {s['n']} {unit}s")
        if comparison is not None:
            d = comparison["rewards"][name]
            value, se = headline(d)
            print(f"  paired difference vs {args.compare_to}: {value:+.4f} ± {se:.4f} (95% CI {value - 1.96 * se:+.4f} .. "
                  f"{value + 1.96 * se:+.4f}){' over tags' if 'mean_over_tags' in d else ''}, on the same {d['n']} {unit}s (prompts x seeds)")
            for split, s in d.get("splits", {}).items():
                value, se = headline(s)
                print(f"    {split}: {value:+.4f} ± {se:.4f}")
    clips = {"video": "; every clip as images/PPPP_JJ.mp4 (and .mkv, its exact frames), grid.gif",
             "motion": "; every motion as images/PPPP_JJ" + (".safetensors (features, joints)" if args.no_motion_videos else
                                                             ".mp4 (stick figure) and .safetensors (features, joints)")
                       + ", grid.gif"}.get(kind, "")
    print(f"diffrl: wrote scores.jsonl, metrics.json, report.md and plots to {args.output_dir}{clips}"
          + ("; comparison.md / comparison.json with the baseline in baseline/" if comparison is not None else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl",
        description="Reward fine-tuning and inference-time steering for diffusion and flow-matching generators.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,eval,serve-reward,pretrain-toy,pretrain-toy-lm,sara-merge}")
    train = sub.add_parser(
        "train", help="fine-tune a model against a reward", add_help=False,
        description="Train with a YAML recipe; any option can be overridden as key=value "
                    "(e.g. train.learning_rate=1e-4 max_iterations=20 resume=outputs/run).",
    )
    train.add_argument("config", nargs="?", help="YAML recipe (configs/...); omitted: all defaults")
    train.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections")
    train.add_argument("-h", "--help", action="store_true",
                       help="every option, by section (with a recipe: only the sections that run uses)")
    train.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    train.set_defaults(func=_train, parser=train)

    smp = sub.add_parser("sample", help="generate images (optionally with a trained LoRA) to a folder of PNGs; clips of "
                         "a video model to MP4s", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    smp.add_argument("--model", default="tiny-sd3", help=MODEL_HELP)
    smp.add_argument("--lora", default=None, help="LoRA folder written by training (checkpoints/iter_*/lora)")
    smp.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    smp.add_argument("--prompts", default=None, help="a prompt file (.txt / .jsonl) or builtin:<name>")
    smp.add_argument("--num-images", type=int, default=1, help="images (a video model: clips) per prompt")
    smp.add_argument("--steps", type=int, default=40, help="denoising steps (deterministic ODE / DDIM)")
    smp.add_argument("--guidance-scale", type=float, default=4.5, help="classifier-free guidance scale")
    smp.add_argument("--negative-prompt", default="", help="negative prompt for CFG")
    smp.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    smp.add_argument("--seed", type=int, default=0, help="first seed; image j of prompt i uses seed + i * num_images + j")
    smp.add_argument("--model-seed", type=int, default=0, help="weights seed of the built-in tiny models")
    smp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    smp.add_argument("--device", default="cuda" if _cuda() else "cpu")
    smp.add_argument("--output-dir", default="outputs/samples")
    _add_video_options(smp)
    _add_rlg_options(smp)
    smp.set_defaults(func=_sample)

    ev = sub.add_parser(
        "eval", help="score fixed-seed samples of a prompt set with rewards; resumable; report.md + plots",
        description="Sample every prompt with fixed seeds and the deterministic sampler, score each image with "
                    "every reward, and write scores.jsonl, metrics.json (mean, std, 95% CI, per tag), report.md, "
                    "grid.png and reward_hist.png. Images already in OUTPUT_DIR/images are loaded, not resampled. "
                    "A video model's clips are images/PPPP_JJ.mp4 (to watch) and .mkv (the exact frames scored and "
                    "reloaded), with grid.png as strips of 4 frames and grid.gif playing them. A motion model's "
                    "motions are images/PPPP_JJ.mp4 (a stick figure) and .safetensors (the exact features scored, "
                    "and the joints).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--model", default="tiny-sd3", help=MODEL_HELP)
    ev.add_argument("--lora", default=None, help="LoRA folder written by training (checkpoints/iter_*/lora)")
    ev.add_argument("--prompts", required=True, nargs="+", metavar="SPEC",
                    help="prompt files (.txt / GenEval-style .jsonl with metadata) or builtin:<name>, evaluated together; "
                         "records with a \"split\" (e.g. builtin:toy_eval builtin:toy_eval_pairs builtin:toy_train) are "
                         "also reported per split")
    ev.add_argument("--num-prompts", type=int, default=None, help="evaluate only the first N prompts of each file")
    ev.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt")
    ev.add_argument("--rewards", nargs="+", required=True, metavar="NAME", help="reward names (diffrl.rewards.list_rewards())")
    ev.add_argument("--reward-kwargs", nargs="+", default=None, metavar="NAME=JSON",
                    help="constructor arguments of a reward in --rewards as a JSON object, e.g. "
                         "tmr='{\"model\": \"tiny\"}' per_frame='{\"reward\": \"aesthetic\"}' (diffrl train's "
                         "reward_kwargs)")
    ev.add_argument("--steps", type=int, default=40, help="denoising steps (deterministic ODE / DDIM)")
    ev.add_argument("--guidance-scale", type=float, default=4.5, help="classifier-free guidance scale")
    ev.add_argument("--negative-prompt", default="", help="negative prompt for CFG")
    ev.add_argument("--no-motion-videos", action="store_true",
                    help="motion models: skip the stick-figure MP4 of every motion (about 0.5 s each on a CPU); the "
                         "exact features (.safetensors), the scores and the grid are written as always")
    ev.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    ev.add_argument("--seed", type=int, default=0, help="first seed; image j of prompt i uses seed + i * images_per_prompt + j")
    ev.add_argument("--batch-size", type=int, default=8, help="images per denoiser batch (across prompts)")
    ev.add_argument("--run-dir", default=None, help="a training output_dir: also plot its metrics.jsonl")
    ev.add_argument("--compare-to", default=None, metavar="base|LORA",
                    help="also evaluate a baseline on the same prompts and seeds (base: the model without LoRA; or "
                         "another LoRA folder) into OUTPUT_DIR/baseline and report the paired difference with its 95%% CI")
    ev.add_argument("--model-seed", type=int, default=0, help="weights seed of the built-in tiny models")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ev.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ev.add_argument("--output-dir", required=True)
    _add_video_options(ev)
    _add_rlg_options(ev)
    ev.set_defaults(func=_eval)

    srv = sub.add_parser(
        "serve-reward", help="serve one reward over HTTP for trainers elsewhere (the `remote` reward)",
        description="Load reward NAME once and score batches over HTTP (pip install \"diffrl[server]\"). Binds to "
                    "loopback by default; bound elsewhere it needs a token (DIFFRL_REWARD_TOKEN or --token), which "
                    "clients send as a bearer token. Train against it with reward: remote, reward_kwargs: {url: ...}.",
    )
    srv.add_argument("name", help="reward name (diffrl.rewards.list_rewards())")
    srv.add_argument("kwargs", nargs="*", metavar="KEY=VALUE", help="constructor arguments, e.g. model=tiny (YAML values)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 needs a token)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--token", default=None, help="bearer token clients must send (default: $DIFFRL_REWARD_TOKEN)")
    srv.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where the reward model runs")
    srv.add_argument("--max-body-mib", type=float, default=None, metavar="MIB",
                     help="largest /score request body in MiB (default 64); a larger one is answered HTTP 413 unread, "
                          "and the remote reward splits its batches to fit")
    srv.set_defaults(func=_serve_reward)

    from diffrl.toyworld.pretrain import build_parser as pretrain_parser

    pre = sub.add_parser("pretrain-toy", help="train a SynthShapes toy base model from scratch (sd3 flow or sd UNet)")
    pretrain_parser(pre)
    pre.set_defaults(func=_pretrain_toy)

    from diffrl.lm.pretrain import build_parser as pretrain_lm_parser

    pre_lm = sub.add_parser("pretrain-toy-lm", help="train the toy arithmetic causal LM (assets/lm/toy_arith) from scratch")
    pretrain_lm_parser(pre_lm)
    pre_lm.set_defaults(func=_pretrain_toy_lm)

    from diffrl.pipelines.sara import add_merge_arguments

    merge = sub.add_parser("sara-merge", help="a SaRA checkpoint merged into its base model: a stock diffusers pipeline "
                           "folder (docs/sara.md)")
    add_merge_arguments(merge)
    merge.set_defaults(func=_sara_merge)
    return parser


def _sara_merge(args) -> int:
    from diffrl.pipelines.sara import run_merge

    return run_merge(args, prog="diffrl sara-merge")


def _serve_reward(args) -> int:
    import os

    from omegaconf import OmegaConf

    from diffrl.rewards import list_rewards
    from diffrl.rewards.server import MAX_BODY_MIB, TOKEN_ENV, serve_reward

    if args.name not in list_rewards():
        print(f"diffrl serve-reward: unknown reward {args.name!r}; valid: {', '.join(list_rewards())}", file=sys.stderr)
        return 2
    bad = [item for item in args.kwargs if "=" not in item]
    if bad:
        print(f"diffrl serve-reward: arguments must be KEY=VALUE, got {bad}", file=sys.stderr)
        return 2
    max_body_mib = MAX_BODY_MIB if args.max_body_mib is None else args.max_body_mib
    if not max_body_mib > 0:
        print(f"diffrl serve-reward: --max-body-mib must be > 0, got {args.max_body_mib}", file=sys.stderr)
        return 2
    kwargs = OmegaConf.to_container(OmegaConf.from_dotlist(args.kwargs)) if args.kwargs else {}
    try:
        serve_reward(args.name, kwargs, host=args.host, port=args.port, device=args.device,
                     token=args.token or os.environ.get(TOKEN_ENV), max_body_mib=max_body_mib)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"diffrl serve-reward: {exc}", file=sys.stderr)
        return 2
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _pretrain_toy(args) -> int:
    from diffrl.toyworld.pretrain import pretrain

    pretrain(args)
    return 0


def _pretrain_toy_lm(args) -> int:
    from diffrl.lm.pretrain import pretrain

    pretrain(args)
    return 0


def _dashed_train_options(argv: list[str]) -> str | None:
    """`diffrl train --max_iterations 3` -> the key=value spelling it means, or None when there is no such option."""
    if not argv or argv[0] != "train":
        return None
    hints, rest = [], argv[1:]
    for i, item in enumerate(rest):
        if item.startswith("--") and item not in ("--help", "--print-config"):
            key, _, value = item[2:].partition("=")
            if not value and i + 1 < len(rest) and not rest[i + 1].startswith("--") and "=" not in rest[i + 1]:
                value = rest[i + 1]
            hints.append(f"{key.replace('-', '_')}={value or 'VALUE'}")
    return " ".join(hints) or None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    hint = _dashed_train_options(argv)
    if hint:
        print(f"diffrl train: options are key=value (no dashes), e.g. diffrl train CONFIG {hint}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
