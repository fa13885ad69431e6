"""RL guidance sweep: reward and exact accuracy of a fine-tuned LoRA against the guidance weight w.

    python -m diffrl.benchmarks.rl_guidance --lora outputs/toy_sd3_grpo/checkpoints/iter_000040/lora \
        --output-dir outputs/rlg_sweep                      # toy-sd3, builtin:toy_eval, w in 0 .. 3

For every w in --scales the base model plus LoRA is sampled with RL guidance (`RLGuidedPolicy`:
w = 0 is the base model, 1 the LoRA model, > 1 extrapolates) on the same prompts and the same
fixed seeds (paired: image j of prompt i starts from the same noise at every w), with the
deterministic sampler, and scored by `evaluate` with the exact toy-world scorer: `toyworld` (dense
partial credit) and `toyworld_accuracy` (0/1, GenEval rules). Means carry the standard error over
prompts (`evaluate.summarize`).

Outputs in --output-dir: eval/w_<w>/ (evaluate's folders: images, scores.jsonl, metrics.json,
report.md; a re-run reuses the images already there), results.json, results.md and rlg_sweep.png
(reward and accuracy against w, +- one standard error).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
REWARD, ACCURACY = "toyworld", "toyworld_accuracy"


def scale_dir(w: float) -> str:
    """The folder name of weight w under eval/ ("w_1.5")."""
    return f"w_{w:g}"


def run_sweep(policy, prompt_set, scales: Sequence[float], output_dir: str | Path, *, images_per_prompt: int = 1,
              steps: int = 20, guidance_scale: float = 4.5, seed: int = 0, batch_size: int = 64,
              skip_steps: int = 0, settings: dict | None = None, progress: bool = True) -> list[dict]:
    """Evaluate `policy` (a Policy with its LoRA loaded) under RL guidance at every w of `scales`; one
    result row per w: {"w", "reward", "reward_stderr", "accuracy", "accuracy_stderr", "accuracy_over_tags",
    "accuracy_tags", "num_images"}. `skip_steps`: the first steps use the base model alone."""
    from diffrl.benchmarks.evaluate import evaluate
    from diffrl.guidance import GuidanceSchedule, RLGuidedPolicy

    out = Path(output_dir)
    rows = []
    for w in scales:
        guided = RLGuidedPolicy(policy, GuidanceSchedule(scale=float(w), skip_steps=skip_steps))
        metrics = evaluate(guided, prompt_set, [REWARD, ACCURACY], images_per_prompt=images_per_prompt, steps=steps,
                           guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                           output_dir=out / "eval" / scale_dir(w),
                           settings={**(settings or {}), "rlg_scale": float(w), "rlg_skip_steps": skip_steps},
                           progress=progress)
        r, a = metrics["rewards"][REWARD], metrics["rewards"][ACCURACY]
        rows.append({
            "w": float(w),
            "reward": r["mean"], "reward_stderr": r["stderr"],
            "accuracy": a["mean"], "accuracy_stderr": a["stderr"],
            "accuracy_over_tags": a.get("mean_over_tags", a["mean"]),
            "accuracy_tags": {tag: s["mean"] for tag, s in a.get("tags", {}).items()},
            "num_images": metrics["num_images"],
        })
    return rows


def _pct(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{100 * x:.1f}"


def write_results(rows: list[dict], output_dir: str | Path, header: dict) -> None:
    """results.json, results.md and rlg_sweep.png from the sweep's rows."""
    out = Path(output_dir)
    (out / "results.json").write_text(json.dumps({"settings": header, "results": rows}, indent=1))
    tags = sorted({t for r in rows for t in r["accuracy_tags"]})
    lines = ["# RL guidance sweep", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in header.items()), "",
             "| w | reward (toyworld) | accuracy % | accuracy over tags % | " + " | ".join(tags) + (" |" if tags else ""),
             "|---:|---:|---:|---:|" + "---:|" * len(tags)]
    for r in rows:
        cells = [f"{r['w']:g}", f"{r['reward']:.4f} ± {r['reward_stderr']:.4f}",
                 f"{_pct(r['accuracy'])} ± {_pct(r['accuracy_stderr'])}", _pct(r["accuracy_over_tags"])]
        cells += [_pct(r["accuracy_tags"].get(t, math.nan)) for t in tags]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{rows[0]['num_images'] if rows else 0} images per w, the same prompts and seeds at every w; "
              "± one standard error over prompts. w = 0 is the base model, w = 1 the LoRA model.", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot_sweep(rows, out / "rlg_sweep.png")


def plot_sweep(rows: list[dict], path: Path) -> Path:
    """Two panels against w: mean reward and exact accuracy, error bars one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["w"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = [("reward", "reward_stderr", f"{REWARD} (partial credit)", 1.0),
              ("accuracy", "accuracy_stderr", f"{ACCURACY} (%)", 100.0)]
    for ax, (key, err, title, mult) in zip(axes, panels):
        ys = [mult * r[key] for r in rows]
        es = [mult * r[err] if math.isfinite(r[err]) else 0.0 for r in rows]
        ax.errorbar(ws, ys, yerr=es, marker="o", capsize=3)
        for ref, label in ((0.0, "base"), (1.0, "LoRA")):
            ax.axvline(ref, color="grey", linestyle=":", linewidth=1)
            ax.text(ref, 1.0, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
        ax.set_xlabel("RL guidance weight w")
        ax.set_title(title, pad=14)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffrl.benchmarks.rl_guidance",
                                description="Toy-world reward and exact accuracy against the RL guidance weight w.")
    p.add_argument("--lora", required=True, help="LoRA folder written by training (checkpoints/iter_*/lora)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", default="toy-sd3", help="the base model the LoRA was trained on")
    p.add_argument("--prompts", default="builtin:toy_eval", help="toy-world prompt set (.jsonl with metadata or builtin:<name>)")
    p.add_argument("--num-prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES), metavar="W", help="the weights w")
    p.add_argument("--skip-steps", type=int, default=0, help="sample the first N steps with the base model alone")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="deterministic sampler steps (README's toy evaluation: 20)")
    p.add_argument("--guidance-scale", type=float, default=4.5, help="CFG scale, applied to both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.lora).is_dir():
        print(f"rl_guidance: --lora folder not found: {args.lora}", file=sys.stderr)
        return 2
    import torch

    from diffrl.data import load_prompts
    from diffrl.pipelines.registry import load_policy

    prompt_set = load_prompts(args.prompts)
    if args.num_prompts is not None:
        prompt_set = type(prompt_set)(prompt_set.prompts[: args.num_prompts], prompt_set.metadata[: args.num_prompts])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_policy(args.model, device=device, resolution=args.resolution)
    policy.load_lora(args.lora)
    header = {"model": args.model, "lora": str(args.lora), "prompts": args.prompts, "num_prompts": len(prompt_set),
              "images_per_prompt": args.images_per_prompt, "steps": args.steps, "guidance_scale": args.guidance_scale,
              "seed": args.seed, "skip_steps": args.skip_steps}
    rows = run_sweep(policy, prompt_set, args.scales, args.output_dir, images_per_prompt=args.images_per_prompt,
                     steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size,
                     skip_steps=args.skip_steps,
                     settings={"model": args.model, "lora": str(args.lora), "resolution": args.resolution})
    write_results(rows, args.output_dir, header)
    for r in rows:
        print(f"w {r['w']:g}: {REWARD} {r['reward']:.4f}, {ACCURACY} {_pct(r['accuracy'])} %")
    print(f"rl_guidance: wrote results.md, results.json and rlg_sweep.png to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
