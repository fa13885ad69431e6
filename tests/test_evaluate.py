"""`diffrl eval`: the same images as `diffrl sample`, metrics that agree with the per-image scores,
resume without resampling, a report whose links resolve, and validation before any model loads."""

import json
import math
import os
import re
import statistics

import numpy as np
import pytest
from PIL import Image

from diffrl import cli
from diffrl.benchmarks.evaluate import evaluate
from diffrl.data import load_prompts
from diffrl.pipelines.registry import load_policy
from diffrl.rewards import list_rewards

STEPS = 2
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"},
    {"tag": "single_object", "include": [{"class": "horse", "count": 1}], "prompt": "a photo of a horse"},
    {"tag": "counting", "include": [{"class": "bird", "count": 3}], "prompt": "a photo of three birds"},
]


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny-sd3", resolution=32)


@pytest.fixture
def geneval(tmp_path):
    path = tmp_path / "geneval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    return load_prompts(str(path))


def _count_predicts(monkeypatch, policy) -> list[int]:
    calls = [0]
    original = policy.predict

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(policy, "predict", counted)
    return calls


def _run(policy, prompt_set, out, **kw):
    args = dict(images_per_prompt=2, steps=STEPS, guidance_scale=4.5, seed=3, batch_size=3, output_dir=out, progress=False)
    return evaluate(policy, prompt_set, ["brightness", "jpeg_compressibility"], **{**args, **kw})


def _rows(out):
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def test_eval_images_equal_diffrl_sample(tmp_path):
    (tmp_path / "two.txt").write_text("a photo of a cat\na photo of a dog\n")
    (tmp_path / "three.txt").write_text("a photo of a cat\na photo of a dog\na photo of a horse\n")
    common = ["--model", "tiny-sd3", "--steps", str(STEPS), "--resolution", "32", "--device", "cpu", "--seed", "5"]
    assert cli.main(["sample", *common, "--prompts", str(tmp_path / "two.txt"), "--num-images", "2",
                     "--output-dir", str(tmp_path / "s")]) == 0
    # --num-prompts 2 keeps the first two; batch size 3: the second denoiser batch mixes the two prompts
    assert cli.main(["eval", *common, "--prompts", str(tmp_path / "three.txt"), "--num-prompts", "2",
                     "--images-per-prompt", "2", "--batch-size", "3", "--rewards", "brightness",
                     "--output-dir", str(tmp_path / "e")]) == 0
    samples = json.loads((tmp_path / "s" / "samples.json").read_text())["samples"]
    rows = _rows(tmp_path / "e")
    assert [r["seed"] for r in rows] == [s["seed"] for s in samples] == [5, 6, 7, 8]
    for s, r in zip(samples, rows):
        assert s["prompt"] == r["prompt"]
        a = np.asarray(Image.open(tmp_path / "s" / s["file"])).astype(int)
        b = np.asarray(Image.open(tmp_path / "e" / r["file"])).astype(int)
        assert a.shape == b.shape == (32, 32, 3)
        assert np.abs(a - b).max() <= 1


def test_metrics_agree_with_scores_and_tags(policy, geneval, tmp_path):
    out = tmp_path / "e"
    metrics = _run(policy, geneval, out)
    rows = _rows(out)
    assert len(rows) == len(GENEVAL) * 2 and metrics["num_images"] == len(rows)
    assert {r["tag"] for r in rows} == {"single_object", "counting"}
    for r in rows:  # each row's score is the score of the PNG it names (brightness = mean pixel / 255)
        pixels = np.asarray(Image.open(out / r["file"])).astype(np.float64) / 255
        assert r["brightness"] == pytest.approx(pixels.mean(), abs=1e-6)
        assert r["seed"] == 3 + r["prompt_index"] * 2 + r["image_index"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for name in ("brightness", "jpeg_compressibility"):
        m = metrics["rewards"][name]
        values = [r[name] for r in rows]
        assert m["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert m["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert m["n"] == 8 and m["n_prompts"] == 4
        prompt_means = [statistics.fmean(values[2 * i : 2 * i + 2]) for i in range(4)]
        assert m["stderr"] == pytest.approx(statistics.stdev(prompt_means) / 2, abs=1e-12)
        assert m["ci95"] == pytest.approx([m["mean"] - 3.182 * m["stderr"], m["mean"] + 3.182 * m["stderr"]])
        for tag in ("single_object", "counting"):
            sel = [r[name] for r in rows if r["tag"] == tag]
            assert m["tags"][tag]["mean"] == pytest.approx(statistics.fmean(sel), abs=1e-12)
            assert m["tags"][tag]["n"] == 4
        assert m["mean_over_tags"] == pytest.approx(statistics.fmean([m["tags"][t]["mean"] for t in m["tags"]]))


def test_resume_loads_existing_images(policy, geneval, tmp_path, monkeypatch):
    out = tmp_path / "e"
    calls = _count_predicts(monkeypatch, policy)
    first = _run(policy, geneval, out)
    assert calls[0] == STEPS * 3  # 8 images in batches of 3
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 8
    mtimes = {p.name: p.stat().st_mtime_ns for p in pngs}

    calls[0] = 0
    second = _run(policy, geneval, out)
    assert calls[0] == 0  # nothing resampled
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in pngs} == mtimes

    before = np.asarray(Image.open(out / "images" / "0002_01.png")).astype(int)
    (out / "images" / "0002_01.png").unlink()
    third = _run(policy, geneval, out)
    assert calls[0] == STEPS  # one batch holding only the missing image
    after = np.asarray(Image.open(out / "images" / "0002_01.png")).astype(int)
    assert np.abs(after - before).max() <= 1
    assert {p.name: p.stat().st_mtime_ns for p in pngs if p.name != "0002_01.png"} == \
        {k: v for k, v in mtimes.items() if k != "0002_01.png"}
    assert third["rewards"]["brightness"]["mean"] == pytest.approx(first["rewards"]["brightness"]["mean"], abs=1 / 255)


def test_resume_refuses_other_settings(policy, geneval, tmp_path, monkeypatch):
    out = tmp_path / "e"
    _run(policy, geneval, out)
    calls = _count_predicts(monkeypatch, policy)
    with pytest.raises(ValueError, match="steps"):
        _run(policy, geneval, out, steps=STEPS + 1)
    assert calls[0] == 0


def test_report_has_a_row_per_tag_and_links_existing_files(policy, geneval, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "reward_mean": 0.1 * i, "reward_std": 0.05, "loss": 1.0 / (i + 1), "kl": 0.01 * i}) + "\n"
        for i in range(1, 5)))
    out = tmp_path / "e"
    _run(policy, geneval, out, run_dir=run)
    report = (out / "report.md").read_text()
    for reward in ("brightness", "jpeg_compressibility"):
        section = report.split(f"### {reward}")[1].split("###")[0]
        table = [line for line in section.splitlines() if line.startswith("| ")]
        assert [line.split("|")[1].strip() for line in table[1:]] == ["counting", "single_object", "**overall**"]
    links = re.findall(r"\]\(([^)]+)\)", report)
    for name in ("grid.png", "reward_hist.png", "training_curves.png"):
        assert name in links
    for link in links:
        assert (out / link).is_file(), link
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 0


def test_motion_report_names_the_files_evaluate_writes(tmp_path):
    """A motion model's report.md counts motions, links grid.png / grid.gif (which exist) and says each motion is
    images/PPPP_JJ.mp4 plus PPPP_JJ.safetensors with `features` [T, 263] and `joints` [T, 22, 3]: exactly what
    scores.jsonl lists and the files hold (no .mkv, a video's exact frames)."""
    from safetensors.torch import load_file

    motion = load_policy("tiny-motion", num_frames=8)
    prompts = load_prompts("builtin:toy_motion_eval")
    prompts = type(prompts)(prompts.prompts[:2], prompts.metadata[:2])
    out = tmp_path / "e"
    evaluate(motion, prompts, ["motion_physics"], images_per_prompt=1, steps=STEPS, guidance_scale=2.5, seed=0,
             batch_size=2, output_dir=out, progress=False, fps=20)
    report = (out / "report.md").read_text()
    assert "## Motions" in report and "2 prompts x 1 motions = 2 motions" in report and ".mkv" not in report
    assert "`images/PPPP_JJ.mp4`" in report and "`images/PPPP_JJ.safetensors`" in report
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert {"grid.png", "grid.gif"} <= set(links) and all((out / link).is_file() for link in links)
    for row in _rows(out):
        stem = f"images/{row['prompt_index']:04d}_{row['image_index']:02d}"
        assert (row["file"], row["features"]) == (f"{stem}.mp4", f"{stem}.safetensors") and (out / row["file"]).is_file()
        tensors = load_file(out / row["features"])
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {"features": (8, 263), "joints": (8, 22, 3)}


def test_toyworld_accuracy_is_a_rate(policy, geneval, tmp_path):
    try:
        import diffrl.toyworld  # noqa: F401  (registers the toyworld rewards where it exists)
    except ImportError:
        pass
    if "toyworld_accuracy" not in list_rewards():
        pytest.skip("toyworld_accuracy reward not registered")
    out = tmp_path / "e"
    metrics = evaluate(policy, geneval, ["toyworld_accuracy"], images_per_prompt=1, steps=STEPS, guidance_scale=4.5,
                       seed=0, batch_size=4, output_dir=out, progress=False)
    values = [r["toyworld_accuracy"] for r in _rows(out)]
    assert set(values) <= {0.0, 1.0}
    assert metrics["rewards"]["toyworld_accuracy"]["mean"] == pytest.approx(statistics.fmean(values))


def test_cli_unknown_reward_fails_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import diffrl.pipelines.registry as registry

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(registry, "load_policy", no_load)
    code = cli.main(["eval", "--model", "tiny-sd3", "--prompts", "builtin:animals", "--rewards", "brightness", "brightnes",
                     "--output-dir", str(tmp_path / "e")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Did you mean 'brightness'" in err and "jpeg_compressibility" in err
    assert not (tmp_path / "e").exists()


def test_cli_missing_run_dir_metrics_fails_early(tmp_path, capsys, monkeypatch):
    import diffrl.pipelines.registry as registry

    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    code = cli.main(["eval", "--prompts", "builtin:animals", "--rewards", "brightness", "--run-dir", str(tmp_path),
                     "--output-dir", str(tmp_path / "e")])
    assert code == 2 and "metrics.jsonl" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e")


def test_cli_compare_to_base_reports_the_paired_difference(tmp_path, capsys):
    """--compare-to base evaluates the model without the LoRA on the same prompts and seeds into OUTPUT/baseline:
    its images are those of a plain evaluation of the base, and comparison.json's difference is the mean of the
    per-image differences of the two scores.jsonl files, with a zero stderr when the two models are the same."""
    import torch

    policy = load_policy("tiny-sd3", resolution=32)
    policy.add_lora(4, 8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    policy.save_lora(tmp_path / "lora")
    common = ["eval", "--model", "tiny-sd3", "--steps", str(STEPS), "--resolution", "32", "--device", "cpu",
              "--prompts", "builtin:toy_eval", "builtin:toy_train", "--num-prompts", "2", "--images-per-prompt", "2",
              "--rewards", "brightness"]
    assert cli.main([*common, "--lora", str(tmp_path / "lora"), "--compare-to", "base", "--output-dir", str(tmp_path / "e")]) == 0
    assert "paired difference vs base" in capsys.readouterr().out
    assert cli.main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    tuned, base, plain = _rows(tmp_path / "e"), _rows(tmp_path / "e" / "baseline"), _rows(tmp_path / "plain")
    assert [r["brightness"] for r in base] == [r["brightness"] for r in plain]
    assert [r["brightness"] for r in tuned] != [r["brightness"] for r in base]
    d = json.loads((tmp_path / "e" / "comparison.json").read_text())["rewards"]["brightness"]
    diffs = [a["brightness"] - b["brightness"] for a, b in zip(tuned, base)]
    assert d["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    per_prompt = [statistics.fmean(diffs[2 * i : 2 * i + 2]) for i in range(4)]  # stderr over the 4 prompts
    assert d["stderr"] == pytest.approx(statistics.stdev(per_prompt) / math.sqrt(4), abs=1e-12)
    # the two files' records carry their split: each reported apart (GenEval's mean over its tags)
    for split, rows in (("unseen", range(0, 4)), ("train", range(4, 8))):
        by_tag = {}
        for i in rows:
            by_tag.setdefault(base[i]["tag"], []).append(diffs[i])
        assert d["splits"][split]["mean_over_tags"] == pytest.approx(statistics.fmean(statistics.fmean(v) for v in by_tag.values()))
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())["rewards"]["brightness"]
    assert set(metrics["splits"]) == {"unseen", "train"} and "By split" in (tmp_path / "e" / "report.md").read_text()
    assert (tmp_path / "e" / "comparison.md").is_file() and "comparison.md" in (tmp_path / "e" / "report.md").read_text()
    # the base against itself: every image identical, a difference of exactly 0
    assert cli.main([*common, "--compare-to", "base", "--output-dir", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "comparison.json").read_text())["rewards"]["brightness"]
    assert same["mean"] == 0.0 and same["stderr"] == 0.0
