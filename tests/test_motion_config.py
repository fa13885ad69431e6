"""Config validation on motion models: a clip longer than the model's max_frames, a model without HumanML3D's 263
features, an image reward, an image size or a flow sampler each fail with a message naming the field, read from
the model's JSON files while loading any weights fails the test; a valid motion config passes. The same for
`diffrl sample` / `diffrl eval` on a motion model (--num-frames, --reward-kwargs), and eval's --reward-kwargs reach
the reward."""

import json
import shutil

import pytest
import torch

from diffrl import cli
from diffrl.config import ConfigError, load_config

MOTION = ["model=tiny-motion", "reward=motion_physics", "data.prompts=builtin:toy_motion_train"]


@pytest.fixture(scope="module")
def saved_motion(tmp_path_factory):
    """A tiny motion model saved as a diffusers folder (built once, before any test forbids loading)."""
    from diffrl.pipelines.motion import MotionPolicy

    folder = tmp_path_factory.mktemp("motion") / "model"
    MotionPolicy.tiny(seed=0, num_frames=40).pipe.save_pretrained(folder)
    return folder


def variant(saved_motion, tmp_path, **transformer_config):
    """A copy of the saved folder with `transformer_config` written into transformer/config.json."""
    folder = tmp_path / "model"
    shutil.copytree(saved_motion, folder)
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **transformer_config}))
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Building any policy or pipeline fails the test: validation must need only the JSON files."""
    import diffrl.pipelines.registry as registry
    from diffrl.pipelines.motion import MotionPolicy
    from diffrl.pipelines.motion_model import MotionDiffusionPipeline

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(registry, "load_policy", boom)
    monkeypatch.setattr(MotionPolicy, "from_pretrained", boom)
    monkeypatch.setattr(MotionPolicy, "tiny", boom)
    monkeypatch.setattr(MotionDiffusionPipeline, "from_pretrained", boom)


def refused(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    return str(err.value)


@pytest.mark.parametrize("overrides, expected", [
    (["policy.num_frames=197"], ["'policy.num_frames' 197", "'tiny-motion' takes 1..196 frames"]),
    (["reward=jpeg_compressibility"], ["'reward' jpeg_compressibility scores image", "makes motion samples"]),
    (["reward=toyworld"], ["'reward' toyworld scores image", "makes motion samples"]),
    (["rewards.motion_physics=1", "rewards.jpeg_compressibility=1"], ["'rewards.jpeg_compressibility'", "motion samples"]),
    (["data.eval_reward=aesthetic"], ["'data.eval_reward' aesthetic scores image", "motion samples"]),
    (["policy.height=64"], ["'policy.height' is an image size", "motion model", "policy.num_frames"]),
    (["policy.width=64"], ["'policy.width' is an image size", "motion model"]),
    (["sampling.sampler=flow_sde"], ["'sampling.sampler' flow_sde needs a flow model", "(motion)", "use ddim"]),
])
def test_bad_motion_input_names_the_field_before_any_model_loads(no_model_loading, overrides, expected):
    message = refused([*MOTION, *overrides])
    assert all(part in message for part in expected), message


def test_frames_over_a_saved_models_max_frames_are_read_from_its_config(saved_motion, tmp_path, no_model_loading):
    """max_frames 80 in transformer/config.json: 80 frames validate, 100 fail naming the field and the limit."""
    folder = variant(saved_motion, tmp_path, max_frames=80)
    message = refused([*MOTION, f"model={folder}", "policy.num_frames=100"])
    assert "'policy.num_frames' 100" in message and "takes 1..80 frames (4.0 s at 20 fps)" in message, message
    cfg = load_config(None, [*MOTION, f"model={folder}", "policy.num_frames=80"])
    assert cfg.policy.num_frames == 80 and cfg.sampling.sampler == "ddim"


def test_a_model_without_263_features_is_refused(saved_motion, tmp_path, no_model_loading):
    """feature_dim 67 (the root + joint-position prefix alone): the rewards read HumanML3D's 263 features."""
    folder = variant(saved_motion, tmp_path, feature_dim=67)
    message = refused([*MOTION, f"model={folder}"])
    assert message.startswith(f"'model' {folder} has 67 features per frame") and "263" in message, message


def test_cli_train_refuses_and_creates_nothing(tmp_path, no_model_loading, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *MOTION, "policy.num_frames=300", f"output_dir={out}"]) == 2
    assert "'policy.num_frames' 300" in capsys.readouterr().err
    assert not out.exists()


def test_valid_motion_configs_validate(saved_motion, no_model_loading):
    """The longest clip tiny-motion takes, the model's default length, and a saved folder: the motion family, ddim."""
    longest = load_config(None, [*MOTION, "policy.num_frames=196"])
    assert longest.policy.num_frames == 196 and longest.sampling.sampler == "ddim"
    default = load_config(None, MOTION)
    assert default.policy.num_frames is None and default.policy.height is None and default.sampling.sampler == "ddim"
    saved = load_config(None, [*MOTION, f"model={saved_motion}", "rewards.motion_physics=1", "rewards.toymotion=1"])
    assert saved.sampling.sampler == "ddim" and set(saved.rewards) == {"motion_physics", "toymotion"}


def test_cli_sample_refuses_too_many_frames_before_loading(tmp_path, no_model_loading, capsys):
    out = tmp_path / "samples"
    assert cli.main(["sample", "--model", "tiny-motion", "--num-frames", "197", "--prompt", "a person walks",
                     "--output-dir", str(out)]) == 2
    assert "--num-frames must be in 1..196 for tiny-motion" in capsys.readouterr().err and not out.exists()


EVAL = ["eval", "--model", "tiny-motion", "--num-frames", "8", "--prompts", "builtin:toy_motion_eval", "--num-prompts",
        "2", "--images-per-prompt", "1", "--steps", "2", "--device", "cpu", "--rewards", "tmr"]


@pytest.mark.parametrize("reward_kwargs, expected", [
    ([], "reward 'tmr' has no default weights"),
    (['tmr={"modle": "tiny"}'], "unexpected keyword argument 'modle'"),
    (["tmx={}"], "--reward-kwargs takes NAME=JSON with NAME one of --rewards (tmr), got 'tmx={}'"),
    (["tmr=[1]"], "--reward-kwargs tmr: a JSON object of keyword arguments"),
    (["tmr={model: tiny}"], "--reward-kwargs tmr: '{model: tiny}' is not JSON"),
])
def test_cli_eval_refuses_bad_reward_kwargs_before_loading(tmp_path, no_model_loading, capsys, reward_kwargs, expected):
    out = tmp_path / "eval"
    extra = ["--reward-kwargs", *reward_kwargs] if reward_kwargs else []
    assert cli.main([*EVAL, *extra, "--output-dir", str(out)]) == 2
    assert expected in capsys.readouterr().err and not out.exists()


def test_cli_eval_reward_kwargs_reach_the_reward(tmp_path):
    """--reward-kwargs tmr={"model": "tiny"}: the tmr column of scores.jsonl is the tiny TMR's score of each saved
    motion's features, computed here from the files."""
    from safetensors.torch import load_file

    from diffrl.rewards import build_reward

    out = tmp_path / "eval"
    assert cli.main([*EVAL, "--reward-kwargs", 'tmr={"model": "tiny"}', "--output-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    features = torch.stack([load_file(out / row["features"])["features"] for row in rows])  # [2, 8, 263]
    direct = build_reward("tmr", model="tiny")(features, [row["prompt"] for row in rows], [{} for _ in rows])  # [2]
    assert len(rows) == 2 and [row["tmr"] for row in rows] == pytest.approx(direct.tolist(), abs=1e-6)
