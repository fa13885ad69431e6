"""The evaluation report: report.md (a table per reward, per tag and overall), grid.png (clips: strips of frames, and
grid.gif playing them), reward_hist.png, training_curves.png. Everything is written from the rows and metrics
`evaluate` computed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from diffrl.stats import headline
from diffrl.visual import DEFAULT_FPS, plot_metrics, save_clip_grid, save_grid


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4g}"


def _row(label: str, s: dict) -> str:
    lo, hi = s["ci95"]
    half = (hi - lo) / 2
    return f"| {label} | {s['n']} | {s['n_prompts']} | {_fmt(s['mean'])} | {_fmt(s['std'])} | ±{_fmt(half)} | {_fmt(s['stderr'])} |"


def reward_table(name: str, entry: dict) -> list[str]:
    """Markdown lines: one row per tag (when the prompts have tags), then the overall row."""
    lines = [f"### {name}", "", "| tag | images | prompts | mean | std | 95% CI | stderr |", "|---|---:|---:|---:|---:|---:|---:|"]
    for tag, s in entry.get("tags", {}).items():
        lines.append(_row(tag, s))
    lines.append(_row("**overall**", entry))
    if "mean_over_tags" in entry:
        lo, hi = entry["mean_over_tags_ci95"]
        lines = [f"### {name}", "", f"**Mean over tags (GenEval's overall score): {_fmt(entry['mean_over_tags'])} ± "
                 f"{_fmt(entry['mean_over_tags_stderr'])}** (s.e.; 95% CI {_fmt(lo)} .. {_fmt(hi)})", ""] + lines[2:]
    if entry.get("splits"):
        lines += ["", "By split (each its own prompts; mean over tags ± s.e. when tagged):", "",
                  "| split | images | prompts | headline ± s.e. | per image |", "|---|---:|---:|---:|---:|"]
        for split, s in entry["splits"].items():
            value, se = headline(s)
            lines.append(f"| {split} | {s['n']} | {s['n_prompts']} | {_fmt(value)} ± {_fmt(se)} | {_fmt(s['mean'])} |")
    if entry["nonfinite"]:
        lines += ["", f"{entry['nonfinite']} non-finite scores were left out."]
    return lines + [""]


def plot_reward_hist(rows: list[dict], names: list[str], path: Path) -> Path:
    """One histogram panel per reward over all images, the mean marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        xs = [r[name] for r in rows if math.isfinite(r[name])]
        if xs:
            ax.hist(xs, bins=min(30, max(5, len(xs) // 2)), color="tab:blue", alpha=0.8)
            mean = sum(xs) / len(xs)
            ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.4g}")
            ax.legend(fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("reward")
        ax.set_ylabel("images")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _samples_section(grid_images: torch.Tensor, fps: float, kind: str = "image") -> list[str]:
    """report.md's lines on the grid: images, clips or motions (grid.png as strips of 4 frames, grid.gif playing
    them), and which file of each sample holds what the rewards scored."""
    n = len(grid_images)
    if kind == "image":
        return ["## Images", "", f"First {n} images (prompt order): [grid.png](grid.png)", "", "![samples](grid.png)", ""]
    if kind == "motion":
        return ["## Motions", "", f"First {n} motions (prompt order) as stick figures, 4 poses of each: [grid.png](grid.png); "
                f"the same motions playing at {fps:g} frames a second: [grid.gif](grid.gif). Every motion: "
                "`images/PPPP_JJ.mp4` (the stick figure, to watch) and `images/PPPP_JJ.safetensors` (the exact "
                "de-normalised HumanML3D features [T, 263] the rewards scored, `features`, and the joints [T, 22, 3] in "
                "metres recovered from them, `joints`).", "",
                "![motions, 4 poses each](grid.png)", "", "![motions playing](grid.gif)", ""]
    return ["## Clips", "", f"First {n} clips (prompt order), 4 frames of each: [grid.png](grid.png); the same clips "
            f"playing at {fps:g} frames a second: [grid.gif](grid.gif). Every clip: `images/PPPP_JJ.mp4` (H.264, to "
            "watch) and `images/PPPP_JJ.mkv` (FFV1, the exact frames the rewards scored).", "",
            "![clips, 4 frames each](grid.png)", "", "![clips playing](grid.gif)", ""]


def write_report(out: Path, metrics: dict, rows: list[dict], names: list[str], *, grid_images: torch.Tensor,
                 run_dir: str | Path | None = None, fps: float = DEFAULT_FPS) -> Path:
    """grid.png (first images, captioned with prompt and rewards; clips [B, F, 3, H, W]: strips of 4 frames, 2 a row,
    and grid.gif playing them at `fps`), reward_hist.png, training_curves.png (when `run_dir` has metrics.jsonl) and
    report.md linking them. Returns report.md's path."""
    out = Path(out)
    captions = [r["prompt"] + "\n" + " ".join(f"{n[:10]} {r[n]:.3g}" for n in names) for r in rows[: len(grid_images)]]
    video = grid_images.ndim == 5
    save_grid(grid_images, captions, out / "grid.png", cols=min(len(grid_images), 2) if video else None)
    if video:
        save_clip_grid(grid_images, captions, out / "grid.gif", fps=fps)
    plot_reward_hist(rows, names, out / "reward_hist.png")
    curves = None
    if run_dir is not None:
        src = Path(run_dir) / "metrics.jsonl"
        if not src.is_file():
            raise FileNotFoundError(f"no metrics.jsonl in run dir {run_dir}")
        curves = plot_metrics(src, out / "training_curves.png")

    s = metrics["settings"]
    kind = metrics.get("sample_kind", "video" if video else "image")  # motions reach here as stick-figure clips
    unit = {"image": "images", "video": "clips", "motion": "motions"}[kind]
    lines = ["# Evaluation", "",
             f"{metrics['num_prompts']} prompts x {metrics['images_per_prompt']} {unit} = {metrics['num_images']} {unit}; "
             + ", ".join(f"{k} {v}" for k, v in s.items() if v not in (None, "")), "",
             f"Per reward: mean and sample std (ddof 1) over {unit}; stderr over prompts (std of per-prompt "
             f"means / sqrt(prompts); over {unit} for a single prompt); 95% CI = t(0.975, units - 1) x stderr.", "",
             "## Rewards", ""]
    for name in names:
        lines += reward_table(name, metrics["rewards"][name])
    lines += _samples_section(grid_images, fps, kind)
    lines += ["## Reward distributions", "", "[reward_hist.png](reward_hist.png)", "",
              "![reward distributions](reward_hist.png)", ""]
    if curves is not None:
        lines += ["## Training curves", "", f"From `{Path(run_dir) / 'metrics.jsonl'}`: [training_curves.png](training_curves.png)",
                  "", "![training curves](training_curves.png)", ""]
    lines += ["Per-image scores: [scores.jsonl](scores.jsonl); summary: [metrics.json](metrics.json).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _read_scores(folder: Path) -> list[dict]:
    path = Path(folder) / "scores.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no scores.jsonl in {folder}: evaluate it first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_comparison(candidate: str | Path, baseline: str | Path, names: list[str], label: str = "") -> dict:
    """The paired difference candidate - baseline of two evaluations of one prompt set with the same seeds
    (`evaluate.compare_scores`): comparison.json and comparison.md in `candidate`, linked from its report.md.
    Returns {"label", "baseline", "rewards": {name: paired summary}}."""
    from diffrl.benchmarks.evaluate import compare_scores
    from diffrl.stats import score_summary

    candidate, baseline = Path(candidate), Path(baseline)
    after, before = _read_scores(candidate), _read_scores(baseline)
    diffs = compare_scores(before, after, names)
    result = {"label": label, "baseline": str(baseline), "rewards": diffs}
    (candidate / "comparison.json").write_text(json.dumps(result, indent=1))
    groups, tags = [r["prompt_index"] for r in before], [r["tag"] for r in before]
    lines = [f"# Paired comparison{': ' + label if label else ''}", "",
             f"The same {len(before)} images (prompts and seeds) sampled by both models; baseline in `{baseline}`. "
             "difference = candidate - baseline per image; s.e. over prompts; over tags: the mean of the per-tag "
             "differences, s.e. combined over tags; 95% CI = difference ± 1.96 s.e.", ""]
    for name in names:
        b = score_summary([r[name] for r in before], groups, tags)
        a = score_summary([r[name] for r in after], groups, tags)
        d = diffs[name]
        lines += [f"## {name}", "", "| | baseline | candidate | difference ± s.e. | 95% CI |", "|---|---:|---:|---:|---:|"]
        keyed = [("mean over tags", "mean_over_tags", "mean_over_tags_stderr")] if "mean_over_tags" in d else []
        for label_, key, se_key in keyed + [("per image", "mean", "stderr")]:
            lines.append(f"| {label_} | {_fmt(b[key])} | {_fmt(a[key])} | {d[key]:+.4f} ± {_fmt(d[se_key])} | "
                         f"{d[key] - 1.959964 * d[se_key]:+.4f} .. {d[key] + 1.959964 * d[se_key]:+.4f} |")
        for split, s_ in d.get("splits", {}).items():
            value, se = headline(s_)
            lines.append(f"| split {split} | | | {value:+.4f} ± {_fmt(se)} | {value - 1.959964 * se:+.4f} .. {value + 1.959964 * se:+.4f} |")
        for tag, s_ in d.get("tags", {}).items():
            lines.append(f"| {tag} | {_fmt(b['tags'][tag]['mean'])} | {_fmt(a['tags'][tag]['mean'])} | "
                         f"{s_['mean']:+.4f} ± {_fmt(s_['stderr'])} | {s_['ci95'][0]:+.4f} .. {s_['ci95'][1]:+.4f} |")
        lines.append("")
    (candidate / "comparison.md").write_text("\n".join(lines))
    report = candidate / "report.md"
    if report.is_file() and "comparison.md" not in report.read_text():
        report.write_text(report.read_text() + "\n## Paired comparison\n\n[comparison.md](comparison.md): difference to "
                          f"`{baseline}` on the same prompts and seeds.\n")
    return result
