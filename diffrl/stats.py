"""Statistics of evaluation scores, shared by the training loop's evaluation and `diffrl eval`.

Pure Python over lists of floats. Conventions, stated once:
- `std` is the sample standard deviation (ddof 1).
- `stderr` is the standard error of a mean over *prompts*: the std of the per-prompt means / sqrt(#prompts),
  because the images of one prompt are correlated and the prompt set is the sample that would change in a
  re-run. With a single prompt it falls back to the images.
- `ci95` is mean +- t(0.975, units - 1) * stderr.
- The mean over tags (GenEval's overall score) is the unweighted mean of the per-tag means; its stderr
  combines the per-tag ones, sqrt(sum stderr_t^2) / #tags (tags hold disjoint prompts).
- A paired difference (`paired`) compares two models on the same prompts and seeds: per image
  d = after - before, summarised like any score, so the noise shared by both images cancels.
"""

from __future__ import annotations

import math

# two-sided 95 % Student t quantiles t(0.975, df) for df = 1..30
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """t(0.975, df): a table up to 30 degrees of freedom, a Cornish-Fisher expansion (error < 1e-3) above."""
    if df < 1:
        return math.nan
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def sample_std(xs: list[float]) -> float:
    """Sample standard deviation (ddof 1); nan for fewer than two values."""
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(values: list[float], groups: list) -> dict:
    """mean / std / n over the finite `values`; stderr and ci95 clustered by `groups` (prompt indices)."""
    pairs = [(v, g) for v, g in zip(values, groups) if math.isfinite(v)]
    xs = [v for v, _ in pairs]
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    by_group: dict = {}
    for v, g in pairs:
        by_group.setdefault(g, []).append(v)
    units = [sum(v) / len(v) for v in by_group.values()] if len(by_group) > 1 else xs  # one prompt: images
    stderr = sample_std(units) / math.sqrt(len(units)) if len(units) > 1 else math.nan
    half = t975(len(units) - 1) * stderr
    return {"mean": mean, "std": sample_std(xs), "n": n, "n_prompts": len(by_group), "stderr": stderr,
            "ci95": [mean - half, mean + half], "nonfinite": len(values) - n}


def by_tag(values: list[float], groups: list, tags: list) -> dict:
    """`summarize` per tag, plus the mean over tags with its stderr and a normal 95 % interval.

    -> {"tags": {tag: summary}, "mean_over_tags": m, "mean_over_tags_stderr": s, "mean_over_tags_ci95": [lo, hi]}
    (stderr nan when a tag's is undefined)."""
    per_tag = {}
    for tag in sorted({t for t in tags}, key=str):
        sel = [i for i, t in enumerate(tags) if t == tag]
        per_tag[tag] = summarize([values[i] for i in sel], [groups[i] for i in sel])
    means = [s["mean"] for s in per_tag.values()]
    mean = sum(means) / len(means) if means else math.nan
    stderr = math.sqrt(sum(s["stderr"] ** 2 for s in per_tag.values())) / len(per_tag) if per_tag else math.nan
    return {"tags": per_tag, "mean_over_tags": mean, "mean_over_tags_stderr": stderr,
            "mean_over_tags_ci95": [mean - 1.959964 * stderr, mean + 1.959964 * stderr]}


def headline(summary: dict) -> tuple[float, float]:
    """(value, stderr) a report leads with: the mean over tags when the prompts have tags, else the mean."""
    if "mean_over_tags" in summary:
        return summary["mean_over_tags"], summary["mean_over_tags_stderr"]
    return summary["mean"], summary["stderr"]


def score_summary(values: list[float], groups: list, tags: list | None = None) -> dict:
    """`summarize`, and with `tags` (any not None) also `by_tag`'s entries."""
    out = summarize(values, groups)
    if tags is not None and any(t is not None for t in tags):
        out.update(by_tag(values, groups, ["untagged" if t is None else t for t in tags]))
    return out


def paired(before: list[float], after: list[float], groups: list, tags: list | None = None) -> dict:
    """The difference after - before of two models' scores on the same images (same prompts and seeds):
    `score_summary` of the per-image differences (a pair with a non-finite score is left out)."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison needs the same images: {len(before)} scores before, {len(after)} after")
    diffs = [a - b if math.isfinite(a) and math.isfinite(b) else math.nan for b, a in zip(before, after)]
    return score_summary(diffs, groups, tags)
