"""Trainer benchmark on the SynthShapes toy world: every trainer in `diffrl.trainers.ALGORITHMS`
fine-tunes the same toy base model with the same sample budget, then every checkpoint is scored on a
held-out prompt set with the exact scorer. (One file of ~500 lines on purpose: the protocol, the runs, the
evaluation and the report read top to bottom as the benchmark does them.)

    python -m diffrl.benchmarks.trainers --model toy-sd3 --sample-budget 2048 --output-dir outputs/bench
    python -m diffrl.benchmarks.trainers --algorithms grpo --set train.learning_rate=3e-4 ...

Protocol:
- Training prompts: the recipe's data.prompts (builtin:toy_train: captions of the "train" split of
  `toyworld.prompt_split`, over the colour-shape pairs the toy bases were pretrained on).
- Evaluation: three disjoint prompt sets in prompts/heldout.jsonl, each record flagged with its "split":
  "unseen" (the first --eval-prompts of builtin:toy_eval, evenly over the tags: captions never trained on),
  "unseen_pair" (the first --pair-prompts of builtin:toy_eval_pairs: a colour-shape pair pretraining never
  showed) and "train" (the first --train-prompts of the training prompts). Accuracy is GenEval's overall
  score, the mean over tags, ± its standard error; the headline is the unseen split.
- The proxy reward toy_proxy is optional: not registered, --no-proxy, or its weights missing
  (FileNotFoundError) -> the gap is "n/a" and the reason is written in results.md.
- Equal sample budget: a method's samples per iteration are prompts_per_iteration * group_size of its
  resolved config; max_iterations = budget / that, and a budget that some method cannot hit exactly is
  an error (the message gives the least common multiple). samples_seen is read back from each run's
  metrics.jsonl and checked against the budget.
- Each trainer runs as its own subprocess (`python -m diffrl.cli train`); its wall clock and peak RSS
  (`os.wait4`, that child alone) are recorded, plus the summed per-iteration `seconds` and, on CUDA, the
  largest `peak_memory_mb` (torch.cuda.max_memory_allocated) of its metrics.jsonl.
- Evaluation (this process): `benchmarks.evaluate.evaluate` with the deterministic sampler and fixed
  seeds on the base model (no LoRA) and on every checkpoint's LoRA (`--curve-points` of them per method
  plus the final one), rewards toyworld_accuracy (exact 0/1), toyworld (exact partial credit) and, when
  registered, the learned proxy toy_proxy. proxy - exact gap = mean toy_proxy - mean toyworld on the
  same (unseen) images: a gap that grows with training is reward hacking of the proxy.
- Long horizon: each method's best curve point and its final one; the drop from best to final in units of
  the final accuracy's standard error (a recipe that keeps improving, or stays flat, drops by < 2).

Outputs in --output-dir: results.md, results.json, accuracy_vs_samples.png, prompts/heldout.jsonl, runs/<method>/
(the trainer's output_dir, train.log, benchmark_run.json) and eval/<base|method/iter_N>/ (evaluate's
folders). A finished run whose command and training prompts are unchanged is reused on a re-run;
--overwrite retrains everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS / "toy_trainers.yaml"
PROXY = "toy_proxy"


@dataclass(frozen=True)
class World:
    """A closed world the benchmark can judge: its recipe, exact rewards and held-out prompt sets."""

    name: str
    config: Path
    exact: str  # 0/1 correctness: the accuracy columns
    partial: str  # dense partial credit
    unseen: str  # captions never trained on
    unseen_pairs: str | None  # captions naming a colour-shape pair pretraining never showed
    motion_tags: tuple[str, ...] = ()  # clips: captions a still clip always fails (the still-clip exploit check)
    overrides: dict[str, tuple[str, ...]] | None = None  # per-algorithm settings; None: ALGORITHM_OVERRIDES
    measures: tuple[tuple[str, str, float], ...] = ()
    """Extra columns: (label, reward, scale): scale x the reward's mean over the unseen prompts (e.g. the foot-skating
    ratio of motions, reported by a reward that scores minus it)."""
    title: str = "SynthShapes toy world"


MOTION_OVERRIDES: dict[str, tuple[str, ...]] = {
    # GRPO as DDPO runs it on a DDPM model: DDIM eta 1 (ancestral) rollouts, 10 of the 50 steps trained per sample
    # learning rate 3e-4 (LoRA): on 12 iterations GRPO's held-out accuracy did not move at 1e-4 (+0.0 points) and
    # fell at 1e-3 (-4.0 ± 1.4)
    "grpo": ("grpo.timestep_fraction=0.2", "grpo.kl_beta=0.0", "train.learning_rate=3.0e-4"),
    "nft": ("nft.timestep_fraction=0.2", "train.learning_rate=3.0e-4"),
    "crd": ("crd.timestep_fraction=0.2",),
    # EasyTune as MotionRFT runs it: the last 10 of 50 deterministic DDIM steps, one optimiser step each (10 per
    # chain batch: a lower learning rate than the one-step-per-batch methods)
    "easytune": ("sampling.eta=0.0", "easytune.window_fraction=0.2", "train.learning_rate=2.0e-5"),
    "draft": ("sampling.eta=0.0", "draft.k=1"),
}
"""The motion world's per-algorithm settings (its base recipe: benchmarks/configs/toy_motion_trainers.yaml)."""

WORLDS = {
    "shapes": World("shapes", DEFAULT_CONFIG, "toyworld_accuracy", "toyworld", "builtin:toy_eval", "builtin:toy_eval_pairs"),
    "clips": World("clips", CONFIGS / "toy_video_trainers.yaml", "toyclips_accuracy", "toyclips", "builtin:toy_clips_eval",
                   None, motion_tags=("moving", "counting")),
    "motion": World("motion", CONFIGS / "toy_motion_trainers.yaml", "toymotion_accuracy", "toymotion",
                    "builtin:toy_motion_eval", None, overrides=MOTION_OVERRIDES,
                    measures=(("foot skating m/s", "motion_skating", -1.0),
                                                               ("skating ratio", "motion_skating_ratio", -1.0)), title="procedural motion world"),
}
"""shapes: SynthShapes images (toy-sd3 / toy-sd); clips: SynthShapes clips (toy-wan); motion: the procedural motion
world (toy-motion)."""
STILL_THRESHOLD = 0.25
"""A clip whose `dynamics` (mean frame difference / 2 on the 0-255 scale, capped at 1) is below this is still."""

ALGORITHM_OVERRIDES: dict[str, tuple[str, ...]] = {
    # key=value options applied to one algorithm after the base YAML and before --set; an algorithm
    # missing here runs with the base recipe alone.
    # the quickstart's GRPO: noise on the first 3 of 10 steps only (MixGRPO / Flow-GRPO-Fast), no KL, lr 6e-4 for
    # the first half of the run, then linearly to 0 (at a constant 6e-4 the run collapsed after 3200 samples)
    "grpo": ("sampling.sde_window_size=3", "sampling.sde_window_range=[0,3]", "grpo.timestep_fraction=1.0",
             "grpo.clip_range=1.0e-3", "grpo.kl_beta=0.0", "train.learning_rate=6.0e-4", "train.lr_schedule=linear",
             "train.lr_decay_start=0.5"),
    # PRDP: its section's defaults (beta 10, eps 1e-4), the toy recipe's SDE window, and two gradient steps
    # per sampling epoch (train batches of two whole groups) so that the proximal clip acts
    "prdp": ("sampling.sde_window_size=3", "sampling.sde_window_range=[0,3]", "train.train_batch_size=16"),
    # nft / crd: their config sections' defaults (the authors'), but with the shared CFG 4.5 of the base
    # recipe so that every method is trained and judged at one guidance scale, and 3 noise levels per
    # sample (the authors train 0.99 of the steps): GRPO's 3 window steps, and a third of the CPU time
    "nft": ("nft.timestep_fraction=0.3",),
    "crd": ("crd.timestep_fraction=0.3",),
    # easytune / draft back-propagate a differentiable reward: the learned proxy, judged by the exact scorer
    # like every method (the proxy - exact column shows how much of the gain is the proxy's)
    "easytune": ("reward=toy_proxy",),
    "draft": ("reward=toy_proxy",),
}
"""Per-algorithm settings of the benchmark (sampler, method hyper-parameters, batch shape)."""

ADAPTER_OVERRIDES: dict[str, tuple[str, ...]] = {
    # what is trained (--adapters), applied after the algorithm's row: the recipe's LoRA (r16 / alpha 32) as it is;
    # SaRA at the authors' defaults (threshold 2e-3, lambda_rank 5e-4) and their learning rate 1e-3 exp(-350 x 2e-3);
    # every weight of the denoiser at 3e-5 (Adam moves each weight by about the learning rate per step; at the
    # LoRA's 3e-4 two CRD steps took toy-sd3's held-out accuracy from 10.7 % to 0 on 12 prompts). Not tuned further
    "lora": (),
    "sara": ("policy.adapter=sara", "train.learning_rate=4.97e-4"),
    "full": ("policy.adapter=full", "train.learning_rate=3.0e-5"),
}
"""Per-mode settings of the benchmark's --adapters runs."""

_OWNED_KEYS = ("algorithm", "output_dir", "max_iterations", "logging.save_every", "resume")


# ---- planning ------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    algorithm: str
    overrides: list[str]  # everything after the YAML, max_iterations and save_every included
    samples_per_iteration: int
    max_iterations: int
    run_dir: Path
    name: str = ""  # the run's label: the algorithm, or "<algorithm>-<adapter>" with --adapters

    def __post_init__(self):
        self.name = self.name or self.algorithm


def samples_per_iteration(cfg) -> int:
    """Samples one iteration of the shared loop draws (one process): prompts x group size."""
    return cfg.train.prompts_per_iteration * cfg.train.group_size


def plan_runs(config: str | Path, algorithms: list[str], sample_budget: int, common: list[str],
              runs_dir: Path, curve_points: int, overrides: dict[str, tuple[str, ...]] | None = None,
              adapters: list[str] | None = None) -> list[RunPlan]:
    """Resolve and validate every method's config (no model loads) and size it to the sample budget; with
    `adapters`, one run per (algorithm, adapter) named "<algorithm>-<adapter>", each adapter's ADAPTER_OVERRIDES
    applied after the algorithm's."""
    from diffrl.config import load_config
    from diffrl.trainers import ALGORITHMS

    for item in common:
        if item.split("=", 1)[0].strip() in _OWNED_KEYS:
            raise ValueError(f"--set {item}: the benchmark sets {', '.join(_OWNED_KEYS)} itself "
                             "(use --sample-budget and --curve-points)")
    if sample_budget < 1 or curve_points < 1:
        raise ValueError(f"--sample-budget and --curve-points must be >= 1, got {sample_budget}, {curve_points}")
    plans = []
    unknown = sorted(set(adapters or ()) - set(ADAPTER_OVERRIDES))
    if unknown:
        raise ValueError(f"--adapters: unknown {', '.join(unknown)}; choose from {', '.join(ADAPTER_OVERRIDES)}")
    for algorithm in algorithms:
        ALGORITHMS.get(algorithm)  # unknown names fail with the valid ones
        own = (ALGORITHM_OVERRIDES if overrides is None else overrides).get(algorithm, ())
        for adapter in adapters or [None]:
            name = algorithm if adapter is None else f"{algorithm}-{adapter}"
            mode = () if adapter is None else ADAPTER_OVERRIDES[adapter]
            base = [f"algorithm={algorithm}", *own, *mode, *common, f"output_dir={runs_dir / name}"]
            per_iter = samples_per_iteration(load_config(config, base))
            plans.append(RunPlan(algorithm, base, per_iter, 0, runs_dir / name, name))
    uneven = [p for p in plans if sample_budget % p.samples_per_iteration]
    if uneven:
        lcm = math.lcm(*(p.samples_per_iteration for p in plans))
        per = ", ".join(f"{p.name} {p.samples_per_iteration}" for p in plans)
        raise ValueError(f"--sample-budget {sample_budget} is not a whole number of iterations for every method "
                         f"(samples per iteration: {per}); use a multiple of {lcm}")
    for p in plans:
        p.max_iterations = sample_budget // p.samples_per_iteration
        save_every = max(1, math.ceil(p.max_iterations / curve_points))
        p.overrides += [f"max_iterations={p.max_iterations}", f"logging.save_every={save_every}"]
        load_config(config, p.overrides)  # the final config must validate too
    return plans


# ---- prompt sets ---------------------------------------------------------------------------------
def even_head(rows: list[dict], n: int) -> list[dict]:
    """The first `n` rows taken evenly over their tags (round-robin over the tags in first-seen order)."""
    queues: dict = {}
    for row in rows:
        queues.setdefault(row.get("tag"), []).append(row)
    out, depth = [], 0
    while len(out) < n and any(depth < len(q) for q in queues.values()):
        out += [q[depth] for q in queues.values() if depth < len(q)][: n - len(out)]
        depth += 1
    return out


def write_heldout_prompts(path: Path, eval_prompts: int, pair_prompts: int, train_prompts: list[dict],
                          n_train: int, world: World = WORLDS["shapes"]) -> Path:
    """The evaluation prompts, each flagged with its "split": the first `eval_prompts` of builtin:toy_eval
    ("unseen"), the first `pair_prompts` of builtin:toy_eval_pairs ("unseen_pair") and the first `n_train` of
    the training prompts ("train"), each evenly over its tags."""
    from diffrl.data import load_prompts
    from diffrl.toyworld import write_jsonl

    rows = [{**m, "split": "unseen"} for m in even_head(load_prompts(world.unseen).metadata, eval_prompts)]
    if world.unseen_pairs and pair_prompts:
        rows += [{**m, "split": "unseen_pair"} for m in even_head(load_prompts(world.unseen_pairs).metadata, pair_prompts)]
    rows += [{**m, "split": "train"} for m in even_head(train_prompts, n_train)]
    write_jsonl(rows, path)
    return path


# ---- training in a subprocess --------------------------------------------------------------------
def _maxrss_mb(ru_maxrss: int) -> float:
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 1024  # bytes on macOS, KiB on Linux


def train_command(config: str | Path, plan: RunPlan) -> list[str]:
    return [sys.executable, "-m", "diffrl.cli", "train", str(config), *plan.overrides]


def run_trainer(config: str | Path, plan: RunPlan, threads: int | None) -> dict:
    """`python -m diffrl.cli train` for one plan; wall seconds and that child's peak RSS."""
    cmd = train_command(config, plan)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    log = plan.run_dir / "train.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone (RUSAGE_CHILDREN is a max over all)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"training {plan.name} failed (exit {proc.returncode}); {log}:\n{tail}")
    return {"command": cmd, "wall_seconds": wall, "peak_rss_mb": _maxrss_mb(usage.ru_maxrss)}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoints(run_dir: Path) -> list[tuple[int, int, Path]]:
    """(iteration, samples_seen, checkpoint folder) of every checkpoint, in order."""
    out = []
    for folder in sorted((Path(run_dir) / "checkpoints").glob("iter_*")):
        state = json.loads((folder / "state.json").read_text())
        out.append((state["iteration"], state["samples_seen"], folder))
    return out


def load_trained(policy, checkpoint: Path) -> str:
    """The trained weights of a checkpoint folder into `policy`: its LoRA (replacing any), or, for SaRA and full
    fine-tunes, its values / whole denoiser written over the weights (so `policy` must hold the base weights).
    Returns the mode ("lora", "sara" or "full")."""
    from safetensors.torch import load_file

    from diffrl.pipelines.sara import SARA_FILE, apply_sara, read_sara

    if (checkpoint / "lora").is_dir():
        policy.load_lora(checkpoint / "lora")
        return "lora"
    if (checkpoint / "sara" / SARA_FILE).is_file():
        apply_sara(policy.trained_networks(), read_sara(checkpoint)[0])
        return "sara"
    files = sorted((checkpoint / policy.full_model_folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} holds no LoRA, SaRA weights or {policy.full_model_folder}/ model folder")
    weights = {k: v for f in files for k, v in load_file(f).items()}
    policy.trainable_module().load_state_dict(weights, strict=True)
    return "full"


# ---- evaluation ----------------------------------------------------------------------------------
def _stat(s: dict) -> dict:
    """mean, stderr (None when undefined: one prompt and one image) and image count of a summary."""
    return {"mean": s["mean"], "stderr": s["stderr"] if math.isfinite(s["stderr"]) else None, "n": s["n"]}


def _split_accuracy(rows: list[dict], split_of: list[str], split: str, exact: str) -> dict | None:
    """Exact accuracy of one split: the mean over tags ± its stderr (GenEval's overall score), per tag, per image."""
    from diffrl.stats import score_summary

    sel = [r for r in rows if split_of[r["prompt_index"]] == split]
    if not sel:
        return None
    s = score_summary([r[exact] for r in sel], [r["prompt_index"] for r in sel], [r["tag"] for r in sel])
    se = s.get("mean_over_tags_stderr", s["stderr"])
    return {"mean": s.get("mean_over_tags", s["mean"]), "stderr": se if math.isfinite(se) else None, "n": s["n"],
            "per_image": s["mean"], "by_tag": {tag: _stat(t) for tag, t in s.get("tags", {}).items()}}


def evaluate_one(policy, checkpoint: Path | None, prompt_set, rewards: list, out_dir: Path, eval_kw: dict,
                 settings: dict, world: World = WORLDS["shapes"]) -> dict:
    """Scores of the base (checkpoint None) or of one checkpoint (`load_trained`; a SaRA or full checkpoint needs a
    policy holding the base weights): exact accuracy of each split (unseen prompts, unseen
    colour-shape pairs, training prompts), per tag on the unseen split, and on the unseen split the exact
    partial credit, the proxy's mean and the proxy - exact gap; for clips, the share of still clips among the
    unseen motion captions (`dynamics` below STILL_THRESHOLD)."""
    from diffrl.benchmarks.evaluate import evaluate

    trained = None if checkpoint is None else load_trained(policy, checkpoint)
    weights = None if checkpoint is None else str(checkpoint / "lora" if trained == "lora" else checkpoint)
    evaluate(policy, prompt_set, rewards, output_dir=out_dir, progress=False, motion_videos=False,
             settings={**settings, "lora": weights}, **eval_kw)
    rows = [json.loads(line) for line in (out_dir / "scores.jsonl").read_text().splitlines()]
    split_of = [m.get("split", "unseen") for m in prompt_set.metadata]
    unseen = [r for r in rows if split_of[r["prompt_index"]] == "unseen"]
    partial = sum(r[world.partial] for r in unseen) / len(unseen)
    proxy = sum(r[PROXY] for r in unseen) / len(unseen) if unseen and PROXY in unseen[0] else None
    accuracy = _split_accuracy(rows, split_of, "unseen", world.exact)
    moving = [r for r in unseen if r["tag"] in world.motion_tags and "dynamics" in r]
    measures = {label: scale * sum(r[reward] for r in unseen) / len(unseen) for label, reward, scale in world.measures}
    return {
        "measures": measures,
        "eval_dir": str(out_dir),
        "accuracy": accuracy,
        "accuracy_by_tag": accuracy["by_tag"],
        "accuracy_unseen_pairs": _split_accuracy(rows, split_of, "unseen_pair", world.exact),
        "accuracy_train": _split_accuracy(rows, split_of, "train", world.exact),
        "still_share": sum(r["dynamics"] < STILL_THRESHOLD for r in moving) / len(moving) if moving else None,
        "partial": partial,
        "proxy": proxy,
        "gap": None if proxy is None else proxy - partial,
    }


def drift_from_base(eval_dir: str | Path, base_dir: str | Path, exact: str) -> dict:
    """How far a checkpoint's held-out samples moved from the base model's, sample by sample (same prompt, same
    seed): `pixels`, the mean absolute difference of the images on the [0, 1] scale (None when the samples are not
    PNG images), and `flipped`, the share of samples whose exact correctness differs from the base's (either way)."""
    import numpy as np
    from PIL import Image

    def rows(folder):
        return {(r["prompt_index"], r["image_index"]): r for r in map(json.loads, (Path(folder) / "scores.jsonl").open())}

    mine, base = rows(eval_dir), rows(base_dir)
    if mine.keys() != base.keys():
        raise ValueError(f"{eval_dir} and {base_dir} hold different samples: evaluate both with the same prompts and seeds")
    flipped = sum(mine[k][exact] != base[k][exact] for k in mine) / len(mine)
    if not all(r["file"].endswith(".png") for r in mine.values()):
        return {"pixels": None, "flipped": flipped}

    def pixels(folder, row):  # [H, W, 3] in [0, 1]
        return np.asarray(Image.open(Path(folder) / row["file"]).convert("RGB"), dtype=np.float64) / 255

    change = [np.abs(pixels(eval_dir, mine[k]) - pixels(base_dir, base[k])).mean() for k in mine]
    return {"pixels": float(np.mean(change)), "flipped": flipped}


def long_horizon(curve: list[dict]) -> dict:
    """The best curve point and the final one: accuracy drop from best to final, in points and in units of the
    final accuracy's stderr."""
    best = max(curve, key=lambda p: p["accuracy"]["mean"])
    final = curve[-1]
    drop = best["accuracy"]["mean"] - final["accuracy"]["mean"]
    se = final["accuracy"]["stderr"]
    return {"best_samples": best["samples_seen"], "best": best["accuracy"]["mean"], "final": final["accuracy"]["mean"],
            "drop": drop, "drop_in_stderr": drop / se if se else None}


# ---- report --------------------------------------------------------------------------------------
def _num(x, fmt=".1f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _acc(s: dict | None) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:.3f} ± " + _num(s["stderr"], ".3f")


def results_table(results: dict) -> list[str]:
    tags = sorted(results["base"]["accuracy_by_tag"])
    measures = list(results["base"].get("measures", {}))
    head = ["method", "samples", "train s", "wall s", "peak RSS MB", "peak CUDA MB", "unseen prompts", "unseen pairs",
            "train prompts", *tags, "partial credit", "proxy − exact", "still clips", *measures, "pixel change",
            "flipped"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def row(name, samples, run, ev):
        gap = "n/a" if ev["gap"] is None else f"{ev['gap']:+.3f}"
        cells = [name, str(samples), _num(run.get("train_seconds")), _num(run.get("wall_seconds")),
                 _num(run.get("peak_rss_mb"), ".0f"), _num(run.get("peak_cuda_mb"), ".0f"), _acc(ev["accuracy"]),
                 _acc(ev["accuracy_unseen_pairs"]), _acc(ev["accuracy_train"]),
                 *(_acc(ev["accuracy_by_tag"].get(t)) for t in tags),
                 f"{ev['partial']:.3f}", gap, _num(ev.get("still_share"), ".3f"),
                 *(_num(ev["measures"][m], ".4f") for m in measures),
                 *(_num((ev.get("drift") or {}).get(k), ".4f" if k == "pixels" else ".3f") for k in ("pixels", "flipped"))]
        lines.append("| " + " | ".join(cells) + " |")

    row("base", 0, {}, results["base"])
    for name, m in results["methods"].items():
        row(name, m["samples_seen"], m, m["final"])
    return lines


def write_markdown(results: dict, path: Path) -> None:
    s = results["settings"]
    world = WORLDS[s.get("world", "shapes")]
    lines = [
        f"# Trainer benchmark ({world.title}: {world.name})", "",
        f"Model `{s['model']}`, equal sample budget {s['sample_budget']} samples per method. Evaluation: "
        f"{s['eval_prompts']} unseen prompts, {s['pair_prompts'] if world.unseen_pairs else 0} unseen-pair prompts and "
        f"{s['train_prompts']} training "
        f"prompts, x {s['images_per_prompt']} images each ({s['eval_steps']} deterministic steps, CFG "
        f"{s['guidance_scale']}, seed {s['eval_seed']}).", "",
        *results_table(results), "",
        f"Accuracy columns: exact accuracy ({world.exact}) as GenEval reports it, the mean over tags ± "
        f"its standard error (per-tag standard errors over prompts, combined). unseen prompts: captions never trained on "
        f"({world.unseen}); unseen pairs: captions with a colour-shape pair pretraining never showed "
        f"({world.unseen_pairs or 'none in this world'}); train prompts: the training prompts themselves. Per-tag columns: "
        f"the unseen prompts per tag (– when a tag has one prompt and one image). partial credit: mean exact partial "
        f"credit ({world.partial}) on "
        "the unseen prompts. pixel change / flipped: drift from the base on every held-out sample (same prompt and seed): the "
        "mean absolute pixel difference on the [0, 1] scale, and the share of samples whose exact correctness differs "
        "from the base's. train s: summed per-iteration time of the trainer (rollout + update); wall s: the whole "
        "training subprocess (start-up, model load, its own evaluations, checkpoints). peak RSS: that subprocess's "
        "maximum resident memory; peak CUDA: torch.cuda.max_memory_allocated from its metrics.jsonl. "
        f"proxy − exact: mean {PROXY} minus mean exact partial credit ({world.partial}) on the same images"
        + ("" if s["proxy"] else f" (n/a: {s['proxy_note']})") + ". "
        + (f"still clips: the share of unseen {' / '.join(world.motion_tags)} clips (captions a still clip always fails) "
           f"whose `dynamics` is below {STILL_THRESHOLD} (mean absolute frame difference under "
           f"{2 * STILL_THRESHOLD:g} on the 0-255 scale): a generator that learned to stop moving shows here."
           if world.motion_tags else "still clips: – (not clips).")
        + "".join(f" {label}: {scale:g} x the mean of reward {reward} on the unseen prompts." for label, reward, scale in
                  world.measures), "",
        "## Accuracy against samples seen", "",
        "| method | samples | unseen prompts | unseen pairs | train prompts | proxy − exact |", "|---|---:|---:|---:|---:|---:|",
        f"| base | 0 | {_acc(results['base']['accuracy'])} | {_acc(results['base']['accuracy_unseen_pairs'])} | "
        f"{_acc(results['base']['accuracy_train'])} | {_num(results['base']['gap'], '+.3f')} |",
    ]
    for name, m in results["methods"].items():
        for point in m["curve"]:
            lines.append(f"| {name} | {point['samples_seen']} | {_acc(point['accuracy'])} | "
                         f"{_acc(point['accuracy_unseen_pairs'])} | {_acc(point['accuracy_train'])} | {_num(point['gap'], '+.3f')} |")
    lines += ["", "## Long horizon: best curve point against the final one (unseen prompts)", "",
              "| method | best at samples | best | final | drop | drop / final s.e. |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in results["methods"].items():
        h = m["long_horizon"]
        lines.append(f"| {name} | {h['best_samples']} | {h['best']:.3f} | {h['final']:.3f} | {h['drop']:+.3f} | "
                     f"{_num(h['drop_in_stderr'], '.2f')} |")
    lines += ["", "![accuracy against samples seen](accuracy_vs_samples.png)", ""]
    path.write_text("\n".join(lines))


def plot_curves(results: dict, path: Path) -> Path:
    """Held-out accuracy against samples seen, one line per method (from the base at 0), the base as a
    dashed horizontal line; a second panel with the proxy - exact gap when the proxy is available."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_gap = results["base"]["gap"] is not None
    fig, axes = plt.subplots(1, 2 if with_gap else 1, figsize=(11 if with_gap else 6, 4), squeeze=False)
    base = results["base"]
    panels = [("accuracy", lambda e: e["accuracy"]["mean"], lambda e: e["accuracy"]["stderr"],
               "exact accuracy, unseen prompts (mean over tags)")]
    if with_gap:
        panels.append(("gap", lambda e: e["gap"], lambda e: None, f"{PROXY} − toyworld"))
    for ax, (_, value, err, label) in zip(axes[0], panels):
        ax.axhline(value(base), color="black", linestyle="--", label="base")
        for name, m in results["methods"].items():
            points = [(0, base)] + [(p["samples_seen"], p) for p in m["curve"]]
            xs, ys = [x for x, _ in points], [value(e) for _, e in points]
            es = [err(e) or 0.0 for _, e in points]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
        ax.set_xlabel("samples seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title(f"{results['settings']['model']}: equal budget {results['settings']['sample_budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the benchmark -------------------------------------------------------------------------------
def run_benchmark(args) -> dict:
    import torch

    from diffrl.config import load_config
    from diffrl.data import load_prompts
    from diffrl.pipelines.registry import load_policy
    from diffrl.rewards import build_reward, list_rewards
    from diffrl.trainers import ALGORITHMS
    from diffrl.runtime import DTYPES

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    world = WORLDS[args.world]
    config = args.config or world.config
    if args.eval_prompts < 1 or args.images_per_prompt < 1 or args.pair_prompts < 0 or args.train_prompts < 0:
        raise ValueError("--eval-prompts and --images-per-prompt must be >= 1, --pair-prompts and --train-prompts >= 0")
    if args.overwrite:
        for sub in ("runs", "eval"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()] if args.algorithms else ALGORITHMS.names()
    eval_path = out / "prompts" / "heldout.jsonl"
    shared = [*([f"model={args.model}"] if args.model else []), *args.set]
    # the held-out file is built from the training prompts, and validation reads it: written before any config
    # names it
    train_prompts = load_prompts(load_config(config, shared).data.prompts)
    write_heldout_prompts(eval_path, args.eval_prompts, args.pair_prompts, train_prompts.metadata, args.train_prompts,
                          world)
    common = [f"data.eval_prompts={eval_path}", *shared]
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()] if args.adapters else None
    plans = plan_runs(config, algorithms, args.sample_budget, common, out / "runs", args.curve_points, world.overrides,
                      adapters)
    base_cfg = load_config(config, common)  # evaluation settings shared by every method
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # loaded before training so that a missing model fails at once; the trainers load their own copy
    def base_policy():
        return load_policy(base_cfg.model, family=base_cfg.policy.family, torch_dtype=DTYPES[base_cfg.policy.dtype],
                           device=device, num_frames=base_cfg.policy.num_frames,
                           **base_cfg.policy.size_kwargs(base_cfg.model))

    policy = base_policy()

    proxy_note = ""
    rewards = [build_reward(world.exact), build_reward(world.partial)]
    if world.motion_tags:
        rewards.append(build_reward("dynamics"))
    rewards += [build_reward(reward) for _, reward, _ in world.measures]
    if world.name != "shapes":
        proxy_note = f"{PROXY} scores images of the shapes world"
    elif args.no_proxy:
        proxy_note = "--no-proxy"
    elif PROXY not in list_rewards():
        proxy_note = f"reward '{PROXY}' is not registered"
    else:
        try:
            rewards.append(build_reward(PROXY, **json.loads(args.proxy_kwargs)))
        except FileNotFoundError as exc:  # registered, weights not trained / shipped yet
            proxy_note = f"{PROXY} unavailable: {exc}"
    if proxy_note:
        print(f"[bench] proxy - exact gap: n/a ({proxy_note})")

    # ---- train (one subprocess each) ---------------------------------------------------------------
    train_sha = hashlib.sha256("\n".join(train_prompts.prompts).encode()).hexdigest()
    runs = {}
    for plan in plans:
        record_path = plan.run_dir / "benchmark_run.json"
        cmd = train_command(config, plan)
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record and record["command"][1:] == cmd[1:] and record["train_prompts_sha256"] == train_sha:
            print(f"[bench] {plan.name}: reusing the finished run in {plan.run_dir}")
        else:
            if plan.run_dir.exists() and any(plan.run_dir.iterdir()):
                raise FileExistsError(f"{plan.run_dir} holds a run made with other settings (or unfinished); "
                                      "pass --overwrite or another --output-dir")
            shutil.rmtree(out / "eval" / plan.name, ignore_errors=True)  # images of an older run
            print(f"[bench] {plan.name}: {plan.max_iterations} iterations x {plan.samples_per_iteration} samples "
                  f"-> {plan.run_dir}", flush=True)
            record = {**run_trainer(config, plan, args.threads), "train_prompts_sha256": train_sha}
            record_path.write_text(json.dumps(record, indent=1))
        rows = read_metrics(plan.run_dir)
        samples = rows[-1]["samples_seen"]
        if samples != args.sample_budget:
            raise RuntimeError(f"{plan.name} saw {samples} samples, not the budget {args.sample_budget}")
        runs[plan.name] = {
            "samples_per_iteration": plan.samples_per_iteration, "max_iterations": plan.max_iterations,
            "samples_seen": samples, "train_seconds": sum(r.get("seconds", 0.0) for r in rows),  # row 0: the base model's evaluation
            "wall_seconds": record["wall_seconds"], "peak_rss_mb": record["peak_rss_mb"],
            "peak_cuda_mb": max(r.get("peak_memory_mb", 0.0) for r in rows) if torch.cuda.is_available() else None,
            "run_dir": str(plan.run_dir), "overrides": plan.overrides,
        }

    # ---- evaluate: the base, then every checkpoint ------------------------------------------------
    prompt_set = load_prompts(str(eval_path))
    steps = args.eval_steps or base_cfg.sampling.eval_num_steps
    eval_kw = dict(images_per_prompt=args.images_per_prompt, steps=steps, guidance_scale=base_cfg.sampling.guidance_scale,
                   seed=args.eval_seed, batch_size=args.eval_batch_size, negative_prompt=base_cfg.sampling.negative_prompt)
    settings = {"model": base_cfg.model, "resolution": base_cfg.policy.resolution, "dtype": base_cfg.policy.dtype}
    print(f"[bench] evaluating the base model on {len(prompt_set)} held-out prompts", flush=True)
    base = evaluate_one(policy, None, prompt_set, rewards, out / "eval" / "base", eval_kw, settings, world)
    for name, run in runs.items():
        curve = []
        for iteration, samples, folder in checkpoints(Path(run["run_dir"])):
            print(f"[bench] evaluating {name} at {samples} samples", flush=True)
            # a LoRA replaces the previous one on the shared policy; SaRA values and full weights overwrite the
            # base weights, so those get a fresh base model
            on = policy if (folder / "lora").is_dir() else base_policy()
            ev = evaluate_one(on, folder, prompt_set, rewards, out / "eval" / name / f"iter_{iteration:06d}",
                              eval_kw, settings, world)
            ev["drift"] = drift_from_base(ev["eval_dir"], base["eval_dir"], world.exact)
            curve.append({"iteration": iteration, "samples_seen": samples, **ev})
        if not curve or curve[-1]["samples_seen"] != run["samples_seen"]:
            raise RuntimeError(f"{name}: no final checkpoint in {run['run_dir']}/checkpoints")
        run["curve"], run["final"], run["long_horizon"] = curve, curve[-1], long_horizon(curve)

    results = {
        "settings": {
            "world": world.name, "model": base_cfg.model, "config": str(config), "set": list(args.set), "algorithms": algorithms,
            "sample_budget": args.sample_budget, "eval_prompts": args.eval_prompts,
            "images_per_prompt": args.images_per_prompt, "eval_steps": steps,
            "guidance_scale": base_cfg.sampling.guidance_scale, "eval_seed": args.eval_seed,
            "pair_prompts": args.pair_prompts, "train_prompts": args.train_prompts,
            "train_prompt_set": base_cfg.data.prompts, "heldout_prompts": str(eval_path),
            "device": device, "proxy": not proxy_note, "proxy_note": proxy_note,
        },
        "base": base,
        "methods": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out / "results.md")
    plot_curves(results, out / "accuracy_vs_samples.png")
    print("\n".join(results_table(results)))
    print(f"[bench] wrote results.md, results.json and accuracy_vs_samples.png to {out}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffrl.benchmarks.trainers",
        description="Fine-tune a toy model with every trainer at an equal sample budget; report held-out exact "
                    "accuracy (overall, per tag, against samples seen), the proxy - exact gap, time and memory.",
    )
    p.add_argument("--world", choices=sorted(WORLDS), default="shapes",
                   help="shapes: SynthShapes images (toy-sd3); clips: SynthShapes clips (toy-wan), with the still-clip "
                        "check; motion: the procedural motion world (toy-motion), with the foot-skating ratio")
    p.add_argument("--config", default=None, help="base YAML recipe (default: the world's, benchmarks/configs/"
                                                  "toy_trainers.yaml or toy_video_trainers.yaml)")
    p.add_argument("--model", default=None, help="model for every trainer and the base row (default: the YAML's), e.g. toy-sd3")
    p.add_argument("--algorithms", default=None, help="comma-separated subset of diffrl.trainers.ALGORITHMS (default: all)")
    p.add_argument("--adapters", default=None,
                   help=f"comma-separated training modes ({', '.join(ADAPTER_OVERRIDES)}): every algorithm once per mode, "
                        "runs named <algorithm>-<adapter> (default: the recipe's own mode, runs named by algorithm)")
    p.add_argument("--sample-budget", type=int, default=1024, help="samples each method sees in training")
    p.add_argument("--curve-points", type=int, default=4, help="checkpoints evaluated per method (the final one included)")
    p.add_argument("--eval-prompts", type=int, default=300,
                   help="unseen prompts (builtin:toy_eval or builtin:toy_clips_eval, evenly over the tags)")
    p.add_argument("--pair-prompts", type=int, default=100, help="unseen-pair prompts (builtin:toy_eval_pairs)")
    p.add_argument("--train-prompts", type=int, default=100, help="training prompts scored too (training accuracy)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="held-out images per prompt")
    p.add_argument("--eval-steps", type=int, default=None, help="deterministic sampling steps (default: sampling.eval_num_steps)")
    p.add_argument("--eval-seed", type=int, default=0, help="first noise seed of the held-out images")
    p.add_argument("--eval-batch-size", type=int, default=32, help="images per denoiser batch in evaluation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every trainer (repeatable)")
    p.add_argument("--proxy-kwargs", default="{}", help=f"JSON keyword arguments for the {PROXY} reward")
    p.add_argument("--no-proxy", action="store_true", help=f"skip {PROXY} even when it is registered")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for training subprocesses and evaluation")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda when available)")
    p.add_argument("--output-dir", default="outputs/bench_trainers")
    p.add_argument("--overwrite", action="store_true", help="retrain and re-evaluate instead of reusing finished runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_benchmark(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"diffrl benchmark: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
