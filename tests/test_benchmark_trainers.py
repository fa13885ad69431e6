"""The trainer benchmark end to end on tiny-sd3: runs at an equal sample budget (one trainer of each kind; every
registered trainer in a slow test), the
base row equal to an independent `evaluate`, the proxy - exact gap, time / memory, reuse of finished
runs, and budget / option validation before any training."""

import json
import math

import pytest
import torch

from diffrl.benchmarks import trainers as bench
from diffrl.benchmarks.evaluate import evaluate
from diffrl.data import load_prompts
from diffrl.pipelines.registry import load_policy
from diffrl.rewards import Reward, registry
from diffrl.trainers import ALGORITHMS

BUDGET = 8  # 2 iterations of 2 prompts x 2 samples
PROXY_VALUE = 0.75
TINY = [
    "--model", "tiny-sd3", "--sample-budget", str(BUDGET), "--curve-points", "2", "--eval-prompts", "6", "--pair-prompts", "2", "--train-prompts", "3", "--images-per-prompt", "1", "--eval-steps", "2", "--eval-batch-size", "3",
    "--threads", "1",
    "--set", "train.prompts_per_iteration=2", "--set", "train.group_size=2", "--set", "train.train_batch_size=4",
    "--set", "train.rollout_batch_size=4", "--set", "sampling.num_steps=3", "--set", "sampling.eval_num_steps=2",
    "--set", "data.num_eval_prompts=2", "--set", "policy.lora_rank=4", "--set", "policy.lora_alpha=8",
]
# the default suite benchmarks one trainer of each kind (scored rollouts, reward back-propagation); the slow test
# below runs every registered trainer through the same harness
KINDS = ["draft", "grpo"]


class ConstantProxy(Reward):
    """A stand-in for the learned proxy: PROXY_VALUE for every image, so the gap is known exactly."""

    differentiable = True  # as the proxy it replaces: easytune / draft train on it (their runs load the real one)

    def score(self, samples, prompts, metadata):
        return torch.full((len(samples),), PROXY_VALUE)


class MissingProxy(Reward):
    """A registered proxy whose weights are not there (as before they are trained)."""

    differentiable = True

    def __init__(self):
        raise FileNotFoundError("toy proxy weights not found")

    def score(self, samples, prompts, metadata):
        raise AssertionError("never built")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._REGISTRY, bench.PROXY, ConstantProxy)
        mp.setattr(ConstantProxy, "name", bench.PROXY, raising=False)
        assert bench.main([*TINY, "--algorithms", ",".join(KINDS), "--output-dir", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_outputs_and_table_rows(bench_run):
    out, results = bench_run
    assert (out / "accuracy_vs_samples.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    header = rows[0].split(" | ")
    assert {"unseen prompts", "unseen pairs", "train prompts"} <= set(header)
    assert header[-4:] == ["proxy − exact", "still clips", "pixel change", "flipped |"]  # still clips: – for images
    drift = [m["final"]["drift"] for m in results["methods"].values()]
    assert all(0 <= d["pixels"] <= 1 and 0 <= d["flipped"] <= 1 for d in drift) and "drift" not in results["base"]
    for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        assert tag in header
    names = [r.split(" | ")[0].removeprefix("| ") for r in rows[1:]]
    assert names[: 1 + len(KINDS)] == ["base", *KINDS]  # the main table; the accuracy-vs-samples table follows
    assert set(results["methods"]) == set(KINDS)
    assert all((out / "runs" / a / "metrics.jsonl").is_file() for a in KINDS)


@pytest.mark.slow
def test_every_registered_trainer_runs_at_the_equal_budget(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._REGISTRY, bench.PROXY, ConstantProxy)
        mp.setattr(ConstantProxy, "name", bench.PROXY, raising=False)
        assert bench.main([*TINY, "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == set(ALGORITHMS.names())
    assert all(m["samples_seen"] == BUDGET and len(m["curve"]) == 2 for m in results["methods"].values())


def test_equal_sample_budget_read_back_from_metrics(bench_run):
    out, results = bench_run
    seen = {}
    for name, m in results["methods"].items():
        rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        seen[name] = rows[-1]["samples_seen"]
        assert m["samples_seen"] == seen[name] and m["max_iterations"] == len(rows) - 1 == BUDGET // m["samples_per_iteration"]
        # --curve-points 2: a checkpoint half way and the final one, each evaluated
        assert [p["samples_seen"] for p in m["curve"]] == [BUDGET // 2, BUDGET]
    assert set(seen.values()) == {BUDGET}


def test_base_row_equals_an_independent_evaluation(bench_run, tmp_path):
    """The base row's three accuracies are GenEval's mean over tags of an independent `evaluate` of each split."""
    out, results = bench_run
    prompts = load_prompts(str(out / "prompts" / "heldout.jsonl"))
    splits = [m["split"] for m in prompts.metadata]
    assert splits == ["unseen"] * 6 + ["unseen_pair"] * 2 + ["train"] * 3
    assert len({m["tag"] for m in prompts.metadata[:6]}) == 6  # one unseen prompt per tag
    policy = load_policy("tiny-sd3", resolution=32)
    base = results["base"]
    for split, key in (("unseen", "accuracy"), ("unseen_pair", "accuracy_unseen_pairs"), ("train", "accuracy_train")):
        keep = [i for i, s in enumerate(splits) if s == split]
        subset = type(prompts)([prompts.prompts[i] for i in keep], [prompts.metadata[i] for i in keep])
        metrics = evaluate(policy, subset, ["toyworld_accuracy", "toyworld"], images_per_prompt=1, steps=2,
                           guidance_scale=4.5, seed=0, batch_size=3, output_dir=tmp_path / split, progress=False)
        acc = metrics["rewards"]["toyworld_accuracy"]
        rows = [json.loads(line) for line in (tmp_path / split / "scores.jsonl").read_text().splitlines()]
        per_tag = {}
        for r in rows:
            per_tag.setdefault(r["tag"], []).append(r["toyworld_accuracy"])
        assert base[key]["mean"] == pytest.approx(sum(sum(v) / len(v) for v in per_tag.values()) / len(per_tag))
        if split == "unseen":
            assert base["partial"] == pytest.approx(metrics["rewards"]["toyworld"]["mean"])
            assert {t: s["mean"] for t, s in base["accuracy_by_tag"].items()} == {t: s["mean"] for t, s in acc["tags"].items()}


def test_proxy_gap_is_proxy_minus_exact_partial_credit(bench_run):
    _, results = bench_run
    assert results["settings"]["proxy"] is True
    for ev in [results["base"], *results["methods"]["grpo"]["curve"]]:
        assert ev["proxy"] == pytest.approx(PROXY_VALUE)
        assert ev["gap"] == pytest.approx(PROXY_VALUE - ev["partial"])
        assert 0.0 <= ev["partial"] <= 1.0


def test_time_and_memory_are_positive(bench_run):
    _, results = bench_run
    for m in results["methods"].values():
        for key in ("train_seconds", "wall_seconds", "peak_rss_mb"):
            assert isinstance(m[key], float) and math.isfinite(m[key]) and m[key] > 0, key
        assert m["wall_seconds"] > m["train_seconds"]  # the subprocess also loads the model and evaluates
        assert (m["peak_cuda_mb"] is None) == (not torch.cuda.is_available())


def test_heldout_sets_are_disjoint_from_training_and_long_horizon_is_reported(bench_run):
    out, results = bench_run
    train = set(load_prompts("builtin:toy_train").prompts)
    rows = load_prompts(str(out / "prompts" / "heldout.jsonl")).metadata
    assert all((r["prompt"] in train) == (r["split"] == "train") for r in rows)
    for m in results["methods"].values():
        h = m["long_horizon"]
        best = max(p["accuracy"]["mean"] for p in m["curve"])
        assert h["best"] == best and h["final"] == m["final"]["accuracy"]["mean"] and h["drop"] == best - h["final"]
    assert "## Long horizon" in (out / "results.md").read_text()


@pytest.mark.parametrize("proxy, flag, note", [(MissingProxy, [], "toy_proxy unavailable: toy proxy weights not found"),
                                               (ConstantProxy, ["--no-proxy"], "--no-proxy")])
def test_rerun_reuses_finished_runs_and_reports_na_without_proxy(bench_run, capsys, monkeypatch, proxy, flag, note):
    out, _ = bench_run
    monkeypatch.setitem(registry._REGISTRY, bench.PROXY, proxy)
    log = out / "runs" / "grpo" / "train.log"
    before = log.stat().st_mtime_ns
    assert bench.main([*TINY, "--algorithms", ",".join(KINDS), "--output-dir", str(out), *flag]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    assert log.stat().st_mtime_ns == before
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["gap"] is None and results["settings"]["proxy_note"] == note
    md = (out / "results.md").read_text()
    grpo_row = next(r for r in md.splitlines() if r.startswith("| grpo | 8 |"))
    assert grpo_row.rstrip(" |").split(" | ")[-4:-2] == ["n/a", "–"] and note in md  # proxy − exact, still clips


def test_budget_and_options_are_checked_before_training(tmp_path, capsys):
    common = ["train.prompts_per_iteration=2", "train.group_size=2", "train.train_batch_size=4"]
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.plan_runs(bench.DEFAULT_CONFIG, ["grpo"], 6, common, tmp_path, 2)
    plans = bench.plan_runs(bench.DEFAULT_CONFIG, ["grpo"], 12, common, tmp_path, 2)
    assert plans[0].max_iterations == 3 and "logging.save_every=2" in plans[0].overrides
    assert all(o in plans[0].overrides for o in bench.ALGORITHM_OVERRIDES["grpo"])
    with pytest.raises(ValueError, match="Did you mean .grpo.. Valid names: .*grpo"):
        bench.plan_runs(bench.DEFAULT_CONFIG, ["grpoo"], 12, common, tmp_path, 2)
    assert bench.main(["--output-dir", str(tmp_path / "b"), "--set", "max_iterations=5"]) == 2
    assert "--sample-budget" in capsys.readouterr().err
    assert not (tmp_path / "b" / "runs").exists()


def test_adapters_plan_one_run_per_algorithm_and_mode(tmp_path):
    """--adapters: a run per (algorithm, mode), named <algorithm>-<mode>, the mode's settings after the algorithm's
    (so the mode's learning rate wins) and before --set; an unknown mode fails before anything runs."""
    from diffrl.config import load_config

    common = ["train.prompts_per_iteration=2", "train.group_size=2", "train.train_batch_size=4"]
    plans = bench.plan_runs(bench.DEFAULT_CONFIG, ["grpo", "crd"], 12, common, tmp_path, 2, adapters=["lora", "sara", "full"])
    assert [p.name for p in plans] == ["grpo-lora", "grpo-sara", "grpo-full", "crd-lora", "crd-sara", "crd-full"]
    assert {p.algorithm for p in plans} == {"grpo", "crd"} and len({p.run_dir for p in plans}) == 6
    cfgs = {p.name: load_config(bench.DEFAULT_CONFIG, p.overrides) for p in plans}
    assert {n: c.policy.resolved_adapter() for n, c in cfgs.items()} == {
        "grpo-lora": "lora", "grpo-sara": "sara", "grpo-full": "full", "crd-lora": "lora", "crd-sara": "sara", "crd-full": "full"}
    assert cfgs["grpo-lora"].train.learning_rate == 6e-4 and cfgs["grpo-sara"].train.learning_rate == 4.97e-4
    assert cfgs["crd-full"].train.learning_rate == 3e-5
    with pytest.raises(ValueError, match="unknown dora"):
        bench.plan_runs(bench.DEFAULT_CONFIG, ["grpo"], 12, common, tmp_path, 2, adapters=["dora"])


def test_clip_world_benchmark_scores_clips_and_counts_still_ones(tmp_path):
    """--world clips on tiny-wan: held-out rows come from builtin:toy_clips_eval, the exact columns are the clip
    scorer's, and the still-clip share equals one computed from the evaluation's lossless clips by
    diffrl.toyworld.clips.still_share (another formula: mean frame difference below 0.5 on the 0-255 scale)."""
    from diffrl.toyworld.clips import score_clips, still_share
    from diffrl.visual import read_video

    out = tmp_path / "clips"
    argv = ["--world", "clips", "--model", "tiny-wan", "--algorithms", "grpo", "--sample-budget", "4",
            "--curve-points", "1", "--eval-prompts", "8", "--train-prompts", "2", "--eval-steps", "2",
            "--eval-batch-size", "5", "--threads", "1", "--output-dir", str(out),
            "--set", "train.prompts_per_iteration=2", "--set", "train.group_size=2", "--set", "train.train_batch_size=4",
            "--set", "train.rollout_batch_size=4", "--set", "sampling.num_steps=3", "--set", "data.num_eval_prompts=2",
            "--set", "policy.lora_rank=2", "--set", "policy.lora_alpha=2"]
    assert bench.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    prompts = load_prompts(str(out / "prompts" / "heldout.jsonl"))
    eval_prompts = {m["prompt"] for m in load_prompts("builtin:toy_clips_eval").metadata}
    unseen = [i for i, m in enumerate(prompts.metadata) if m["split"] == "unseen"]
    assert len(unseen) == 8 and all(prompts.prompts[i] in eval_prompts for i in unseen)
    rows = [json.loads(line) for line in (out / "eval" / "base" / "scores.jsonl").read_text().splitlines()]
    clips = torch.stack([read_video(out / "eval" / "base" / r["frames"]) for r in rows]).float() / 255
    exact = [float(s.correct) for s in score_clips(clips, [prompts.metadata[r["prompt_index"]] for r in rows])]
    assert [r["toyclips_accuracy"] for r in rows] == exact
    motion = [k for k, r in enumerate(rows) if r["prompt_index"] in unseen and r["tag"] in ("moving", "counting")]
    assert results["base"]["still_share"] == pytest.approx(still_share(clips[motion]))
    assert results["methods"]["grpo"]["samples_seen"] == 4
    assert "still clips" in (out / "results.md").read_text()


def test_drift_from_base_compares_sample_by_sample(tmp_path):
    """pixels: the mean |x - x_base| over every sample and pixel ([0, 1] scale); flipped: the share of samples whose
    exact correctness differs from the base's, either way; samples are matched by (prompt, image) index."""
    import numpy as np
    from PIL import Image

    def write(folder, images, correct):
        (folder / "images").mkdir(parents=True)
        with open(folder / "scores.jsonl", "w") as fh:
            for i, (img, ok) in enumerate(zip(images, correct)):
                Image.fromarray(img).save(folder / "images" / f"{i:04d}_00.png")
                fh.write(json.dumps({"prompt_index": i, "image_index": 0, "file": f"images/{i:04d}_00.png",
                                     "toyworld_accuracy": ok}) + "\n")

    base = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]
    moved = [np.full((4, 4, 3), 51, np.uint8), np.full((4, 4, 3), 255, np.uint8)]  # the first by 0.2 everywhere
    write(tmp_path / "base", base, [0.0, 1.0])
    write(tmp_path / "run", moved, [1.0, 1.0])
    drift = bench.drift_from_base(tmp_path / "run", tmp_path / "base", "toyworld_accuracy")
    assert drift["pixels"] == pytest.approx(0.1, abs=1e-12) and drift["flipped"] == 0.5
    assert bench.drift_from_base(tmp_path / "base", tmp_path / "base", "toyworld_accuracy") == {"pixels": 0.0, "flipped": 0.0}
