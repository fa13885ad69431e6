"""Entry points that cannot silently do the wrong thing: each test here failed (or would have trained, sampled or
saved the wrong thing without a word) before the matching fix."""

import json
from pathlib import Path

import pytest
import yaml

from diffrl import cli
from diffrl.checks import ConfigError
from diffrl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-sd3", "reward=brightness", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
        "sampling.num_steps=2", "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=1",
        "train.group_size=2", "train.rollout_batch_size=2", "train.train_batch_size=2", "logging.log_with=none",
        "logging.progress=false"]


def train(*args) -> int:
    return cli.main(["train", *TINY, *args])


def iterations(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_output_dir_holding_a_run_is_continued_or_replaced_never_mixed_into(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("max_iterations=2", "logging.save_every=1", f"output_dir={out}") == 0
    before = (out / "metrics.jsonl").read_text()
    assert train("max_iterations=2", f"output_dir={out}") == 2  # refused before any model loads
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"resume={out}" in err and "overwrite=true" in err
    assert (out / "metrics.jsonl").read_text() == before
    # resume from the first checkpoint: iteration 2 is replayed, not logged twice
    assert train("max_iterations=2", f"output_dir={out}", f"resume={out / 'checkpoints' / 'iter_000001'}") == 0
    assert iterations(out) == [0, 1, 2]
    # overwrite: the old run's metrics and checkpoints (a stale newer one too) are gone
    (out / "checkpoints" / "iter_000099").mkdir()
    assert train("max_iterations=1", f"output_dir={out}", "overwrite=true") == 0
    assert iterations(out) == [0, 1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000001"]


def test_sample_refuses_a_checkpoint_folder_and_a_lora_of_another_family(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("max_iterations=1", f"output_dir={out}") == 0
    checkpoint = out / "checkpoints" / "iter_000001"
    common = ["sample", "--prompt", "a cat", "--steps", "2", "--resolution", "32", "--device", "cpu"]
    assert cli.main([*common, "--model", "tiny-sd3", "--lora", str(checkpoint), "--output-dir", str(tmp_path / "a")]) == 2
    assert f"its LoRA is {checkpoint / 'lora'}" in capsys.readouterr().err
    assert cli.main([*common, "--model", "tiny-flux", "--lora", str(checkpoint / "lora"), "--output-dir", str(tmp_path / "b")]) == 2
    assert "was trained on tiny-sd3 (a sd3 model); this is a flux model" in capsys.readouterr().err
    assert cli.main([*common, "--model", "tiny-sd3", "--lora", str(checkpoint / "lora"), "--output-dir", str(tmp_path / "c")]) == 0


def test_eval_refuses_an_image_reward_on_a_video_model_before_loading_it(tmp_path, capsys):
    command = ["eval", "--prompts", "builtin:toy_eval", "--rewards", "toyworld"]
    assert cli.main([*command, "--model", "tiny-wan", "--output-dir", str(tmp_path / "eval")]) == 2
    assert "toyworld scores image samples but tiny-wan makes video samples" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_dashed_options_get_their_key_value_spelling(capsys):
    assert cli.main(["train", "configs/quickstart.yaml", "--max_iterations", "3", "--train.learning-rate=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "max_iterations=3" in err and "train.learning_rate=1e-4" in err


def test_checkpoint_retention_and_the_lora_model_card(tmp_path):
    out = tmp_path / "run"
    assert train("max_iterations=3", "logging.save_every=1", "logging.checkpoints_total_limit=2", f"output_dir={out}") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000002", "iter_000003"]
    card = (out / "checkpoints" / "iter_000003" / "lora" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-sd3" and "grpo" in meta["tags"]
    assert "reward brightness, 3 iterations (6 samples)" in card and "load_lora_weights" in card
    with pytest.raises(ConfigError, match="logging.checkpoints_total_limit"):
        load_config(None, [*TINY, "logging.checkpoints_total_limit=0"])


def test_config_yaml_records_the_sampler_used_and_only_the_sections_in_use(tmp_path):
    out = tmp_path / "run"
    assert train("max_iterations=1", f"output_dir={out}") == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["sampling"]["sampler"] == "flow_sde"  # grpo's default on a flow model, written out
    assert "grpo" in saved and not {"nft", "crd", "prdp", "easytune", "draft", "lm"} & set(saved)
    again = load_config(out / "config.yaml")  # still a complete config
    assert again.sampling.sampler == "flow_sde" and again.nft.beta == 1.0


def test_help_by_section_and_print_config_load_no_model(monkeypatch, capsys):
    import diffrl.pipelines.registry as registry

    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    assert cli.main(["train", "configs/quickstart.yaml", "--help"]) == 0
    text = capsys.readouterr().out
    assert "\ngrpo:\n" in text and "\nsampling:\n" in text and "\nnft:\n" not in text and "\nlm:\n" not in text
    assert cli.main(["train", "configs/quickstart.yaml", "max_iterations=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["max_iterations"] == 7 and printed["sampling"]["sampler"] == "flow_sde" and "nft" not in printed
    for command in ("sample", "eval"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "(default: 40)" in " ".join(capsys.readouterr().out.split())  # --steps


def test_every_help_section_is_listed_without_a_recipe(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for section in ("run options", "policy", "sampling", "data", "train", "advantages", "grpo", "nft", "crd", "prdp",
                    "easytune", "draft", "lm", "logging"):
        assert f"\n{section}:\n" in text, section


def test_a_model_of_another_family_than_the_recipe_is_refused():
    """An SD3 recipe's true CFG 4.5 would become FLUX's embedded guidance; family sd would train tiny-sd3's UNet-less
    model as something else. Unstated families follow the model (FLUX then gets its own 3.5)."""
    with pytest.raises(ConfigError, match="'model' tiny-flux is a flux model but 'policy.family' is sd3"):
        load_config(ROOT / "configs" / "image" / "tiny_sd3_jpeg.yaml", ["model=tiny-flux"])
    with pytest.raises(ConfigError, match="'model' tiny-sd3 is a sd3 model but 'policy.family' is sd"):
        load_config(None, ["policy.family=sd", "model=tiny-sd3"])
    assert load_config(None, ["model=tiny-flux"]).sampling.guidance_scale == 3.5
    assert load_config(None, ["model=tiny-sd3"]).sampling.guidance_scale == 4.5
