"""Bring your own reward and prompts, from the command line and from Python: a reward given as module:Class or
module:function (the module in the working directory), a plugin declared by an installed package, and
diffrl.train, which runs exactly what `diffrl train` runs."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import diffrl
from diffrl import cli
from diffrl.checks import ConfigError
from diffrl.rewards import registry

TINY = ["model=tiny-sd3", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "sampling.num_steps=3",
        "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2", "train.group_size=2",
        "train.rollout_batch_size=4", "train.train_batch_size=4", "train.learning_rate=1e-2", "max_iterations=2",
        "logging.log_with=none", "logging.progress=false", "logging.save_every=0"]

MODULE = '''
import torch
from diffrl.rewards import Reward


class RedReward(Reward):
    """Mean of the red channel minus the others."""

    def score(self, samples, prompts, metadata):
        return samples[:, 0].mean(dim=(1, 2)) - samples[:, 1:].mean(dim=(1, 2, 3))


def greenness(samples, prompts, metadata):
    return [float(x) for x in samples[:, 1].mean(dim=(1, 2))]
'''


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("attr", ["RedReward", "greenness"])
def test_custom_reward_from_the_command_line(tmp_path, monkeypatch, attr):
    """reward=<module>:<Class or function>, the module a file in the working directory (no PYTHONPATH): two
    iterations train on its scores, and they are the module's own scores of the logged samples."""
    module = f"my_rewards_{attr.lower()}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY, f"reward={module}:{attr}", f"output_dir={tmp_path / 'run'}"]) == 0
    rows = rows_of(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and all("loss" in r for r in rows[1:])
    assert all(abs(r["reward_mean"]) < 1 for r in rows[1:])  # channel means / differences of [0, 1] pixels
    # the reward is the module's: a green image scores 1 with greenness, 0 with RedReward
    reward = registry.build_reward(f"{module}:{attr}")
    green = torch.zeros(1, 3, 8, 8)
    green[:, 1] = 1
    assert reward(green, ["x"]).item() == (1.0 if attr == "greenness" else -0.5)


def test_unknown_custom_rewards_fail_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY, "reward=no_such_module:fn", f"output_dir={tmp_path / 'a'}"]) == 2
    assert "'reward'" in capsys.readouterr().err and not (tmp_path / "a").exists()
    (tmp_path / "half.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="'reward'.*no attribute 'fn'"):
        diffrl.load_config(None, [*TINY, "reward=half:fn"])
    with pytest.raises(ConfigError, match="is a int"):
        diffrl.load_config(None, [*TINY, "reward=half:x"])


def test_an_installed_plugin_reward_is_found_by_name(tmp_path, monkeypatch):
    """A package declaring [project.entry-points."diffrl.rewards"] shows up in list_rewards and trains by name."""
    (tmp_path / "plugin_rewards.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))

    class EntryPoint:
        name = "reddish"

        def load(self):
            import plugin_rewards

            return plugin_rewards.RedReward

    monkeypatch.setattr(registry, "entry_point_objects", lambda group: {"reddish": EntryPoint()} if group == registry.ENTRY_POINT_GROUP else {})
    assert "reddish" in registry.list_rewards()
    rows = diffrl.train(None, *TINY, "reward=reddish", f"output_dir={tmp_path / 'run'}")
    assert len(rows) == 2 and rows[-1]["samples_seen"] == 8


def test_python_api_trains_the_same_run_as_the_cli(tmp_path):
    """diffrl.train with a RunConfig built in Python and a reward function object equals `diffrl train` with the
    same settings from the command line and the reward as module:function: same metrics, same LoRA, bit for bit."""
    (tmp_path / "api_rewards.py").write_text(textwrap.dedent(MODULE))
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        import api_rewards

        assert cli.main(["train", *TINY, "reward=api_rewards:greenness", "logging.save_every=2",
                         f"output_dir={tmp_path / 'cli'}"]) == 0
        cfg = diffrl.RunConfig(model="tiny-sd3", max_iterations=2, output_dir=str(tmp_path / "api"))
        cfg.policy.resolution, cfg.policy.lora_rank, cfg.policy.lora_alpha = 32, 4, 8
        cfg.sampling.num_steps, cfg.sampling.eval_num_steps, cfg.data.num_eval_prompts = 3, 2, 2
        cfg.train.prompts_per_iteration, cfg.train.group_size = 2, 2
        cfg.train.rollout_batch_size, cfg.train.train_batch_size, cfg.train.learning_rate = 4, 4, 1e-2
        cfg.logging.log_with, cfg.logging.progress, cfg.logging.save_every = "none", False, 2
        diffrl.train(cfg, reward=api_rewards.greenness)
    finally:
        sys.path.remove(str(tmp_path))
    a, b = rows_of(tmp_path / "cli"), rows_of(tmp_path / "api")
    same = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb") and not k.startswith("time_")}  # noqa: E731
    assert [same(r) for r in a] == [same(r) for r in b]
    wa = load_file(tmp_path / "cli" / "checkpoints" / "iter_000002" / "trainable.safetensors")
    wb = load_file(tmp_path / "api" / "checkpoints" / "iter_000002" / "trainable.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_python_prompts_and_a_raw_config_error(tmp_path):
    """Prompts as a Python list replace data.prompts; a RunConfig that skipped validation is refused clearly."""
    from diffrl.trainers.loop import Trainer

    trainer = diffrl.build_trainer(None, *TINY, "reward=brightness", f"output_dir={tmp_path}",
                                   prompts=["a red square", "a blue circle"], eval_prompts=["a cat"])
    assert trainer.prompts.prompts == ["a red square", "a blue circle"]
    assert list(trainer.eval_sets.values())[0].prompts == ["a cat"]
    with pytest.raises(ValueError, match="diffrl.train"):
        Trainer(diffrl.RunConfig())
