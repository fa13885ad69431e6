"""Checkpoints a kill, a bad disk or a wrong command line has damaged: every damaged file is found before any model
loads, a resume falls back to the newest intact checkpoint and says so (or fails naming the files), a run stopped
before its first checkpoint starts over, settings that only change the future are applied and listed, the others
refused, and metrics.jsonl keeps exactly one row per iteration. Each test here failed before diffrl.checkpoint
verified checkpoints (issue 17)."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrl import checkpoint as ckpt
from diffrl import cli
from diffrl.checks import ConfigError
from diffrl.config import load_config
from diffrl.trainers.loop import Trainer

TINY = ["model=tiny-sd3", "reward=brightness", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
        "sampling.num_steps=2", "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=1",
        "train.group_size=2", "train.rollout_batch_size=2", "train.train_batch_size=2", "logging.log_with=none",
        "logging.progress=false", "logging.eval_every=0", "logging.save_every=1", "train.ema=true",
        "train.learning_rate=1e-2", "max_iterations=3"]
"""Three iterations, a checkpoint after each (with EMA: extra.safetensors too)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run: checkpoints iter_000001..3, metrics rows 0..3."""
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(load_config(None, [*TINY, f"output_dir={out}"])).train()
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the errors here come before any model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("diffrl.pipelines.registry.load_policy", refuse)


def resume_config(run: Path, *extra: str):
    return load_config(None, [*TINY, f"output_dir={run}", f"resume={run}", *extra])


def iterations(run: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip(file: Path) -> None:
    """8 bytes of the last tensor's data set to 0xff: in a float32 tensor, two NaN values."""
    data = bytearray(file.read_bytes())
    data[-8:] = b"\xff" * 8
    file.write_bytes(bytes(data))


def garble(file: Path) -> None:
    file.write_text(file.read_text()[:-10] + "}{ not json")


DAMAGES = {"truncate": truncate, "flip": flip, "delete": Path.unlink, "garble": garble}
FILES = ["trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "extra.safetensors",
         "state.json", "lora/pytorch_lora_weights.safetensors", "lora/README.md"]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_file_makes_the_resume_fall_back_to_the_previous_checkpoint(run, name, damage, no_model):
    if damage == "garble" and not name.endswith((".json", ".md")):
        pytest.skip("garbling is for text files; flip covers the binary ones")
    DAMAGES[damage](run / "checkpoints" / "iter_000003" / name)
    plan = ckpt.resolve_resume(resume_config(run))
    assert plan.checkpoint == run / "checkpoints" / "iter_000002"
    skipped = [line for line in plan.notes if "skipping iter_000003" in line]
    assert len(skipped) == 1 and name.split("/")[-1] in skipped[0], plan.notes
    assert any(f"falling back to {run / 'checkpoints' / 'iter_000002'}" in line for line in plan.notes)


def test_nan_weights_are_refused_even_without_checksums(run, no_model):
    """A checkpoint of a diffrl without checksums (or NaN written by training itself): the NaN is found by the
    finiteness check, naming the file and tensor."""
    newest = run / "checkpoints" / "iter_000003"
    state = json.loads((newest / "state.json").read_text())
    del state["files"]
    (newest / "state.json").write_text(json.dumps(state))
    flip(newest / "trainable.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"trainable\.safetensors: tensor '.+' holds NaN"):
        ckpt.verify_checkpoint(newest)
    assert ckpt.resolve_resume(resume_config(run)).checkpoint == run / "checkpoints" / "iter_000002"


def test_no_intact_checkpoint_fails_naming_every_damaged_file_before_any_model_loads(run, no_model, capsys):
    config_yaml = (run / "config.yaml").read_text()
    metrics = (run / "metrics.jsonl").read_text()
    (run / "checkpoints" / "iter_000003" / "state.json").unlink()
    truncate(run / "checkpoints" / "iter_000002" / "optimizer.safetensors")
    flip(run / "checkpoints" / "iter_000001" / "trainable.safetensors")
    assert cli.main(["train", *TINY, f"output_dir={run}", f"resume={run}", "train.learning_rate=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffrl: invalid config: 'resume': no intact checkpoint")
    for name in ("iter_000003/state.json", "iter_000002/optimizer.safetensors", "iter_000001/trainable.safetensors"):
        assert name in err, name
    assert (run / "config.yaml").read_text() == config_yaml and (run / "metrics.jsonl").read_text() == metrics


def test_a_named_damaged_checkpoint_fails_naming_the_file_and_the_intact_one_beside_it(run, no_model):
    newest = run / "checkpoints" / "iter_000003"
    flip(newest / "optimizer.safetensors")
    with pytest.raises(ConfigError, match=r"optimizer\.safetensors: its sha256 differs.*iter_000002 \(resume="):
        Trainer(load_config(None, [*TINY, f"output_dir={run}", f"resume={newest}"]))


@pytest.mark.parametrize("where, message", [("missing", "does not exist"), ("file", "is a file"),
                                            ("empty", "is neither a checkpoint")])
def test_a_resume_path_that_holds_no_run_fails_before_any_model_loads(tmp_path, where, message, no_model):
    path = tmp_path / where
    if where == "file":
        path.write_text("x")
    elif where == "empty":
        path.mkdir()
    with pytest.raises(ConfigError, match=f"'resume': resume path {path} {message}"):
        Trainer(load_config(None, [*TINY, f"output_dir={tmp_path / 'out'}", f"resume={path}"]))


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_resume_after_a_kill_falls_back_logs_each_iteration_once_and_clears_dead_writers(run, capsys):
    """Killed after logging iteration 3 but before its checkpoint was complete (its state.json missing), in the middle
    of writing a row, and with the folders of two killed checkpoint writes left behind."""
    checkpoints = run / "checkpoints"
    (checkpoints / "iter_000003" / "state.json").unlink()
    pid = dead_pid()
    shutil.copytree(checkpoints / "iter_000002", checkpoints / f".iter_000004.tmp-{pid}")
    shutil.copytree(checkpoints / "iter_000001", checkpoints / f".iter_000001.old-{pid}")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "samples_')
    trainer = Trainer(resume_config(run))
    out = capsys.readouterr().out
    assert trainer.iteration == 2 and trainer.samples_seen == 4
    assert f"removed {checkpoints / f'.iter_000004.tmp-{pid}'}" in out and f".iter_000001.old-{pid}" in out
    assert f"skipping iter_000003: {checkpoints / 'iter_000003' / 'state.json'} is missing" in out
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    trainer.train()
    assert iterations(run) == [0, 1, 2, 3]
    ckpt.verify_checkpoint(checkpoints / "iter_000003")


def test_an_old_folder_whose_checkpoint_is_gone_is_restored(tmp_path):
    """A kill between the two renames of a checkpoint replacing one of the same iteration: the old one comes back."""
    pid = dead_pid()
    (tmp_path / f".iter_000002.old-{pid}").mkdir()
    (tmp_path / f".iter_000002.old-{pid}" / "state.json").write_text("{}")
    notes = ckpt.clear_stale_writes(tmp_path)
    assert len(notes) == 1 and "restored" in notes[0]
    assert [p.name for p in tmp_path.iterdir()] == ["iter_000002"]


def test_a_resume_before_the_first_checkpoint_starts_over(run, capsys):
    shutil.rmtree(run / "checkpoints")
    trainer = Trainer(resume_config(run, "max_iterations=1"))
    assert trainer.iteration == 0
    assert "holds no checkpoint yet" in capsys.readouterr().out
    trainer.train()
    assert iterations(run) == [0, 1]


def test_a_changed_learning_rate_is_applied_and_reported(run, capsys):
    trainer = Trainer(resume_config(run, "train.learning_rate=0.5", "max_iterations=4"))
    out = capsys.readouterr().out
    assert "resume: applying changed settings: max_iterations 3 -> 4, train.learning_rate 0.01 -> 0.5" in out
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.5]
    assert "learning_rate: 0.5" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("override, setting", [("seed=1", "seed 0 -> 1"), ("policy.lora_rank=2", "policy.lora_rank 4 -> 2"),
                                               ("model=tiny-sd", "model tiny-sd3 -> tiny-sd"),
                                               ("train.group_size=4", "train.group_size 2 -> 4")])
def test_a_resume_that_changes_what_the_run_is_is_refused_before_any_model_loads(run, override, setting, no_model):
    config_yaml = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="start a new run in another output_dir") as info:
        Trainer(resume_config(run, override))
    assert setting in str(info.value)
    assert (run / "config.yaml").read_text() == config_yaml


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = ckpt.save_file

    def fill_disk(tensors, file, *args, **kwargs):
        if "iter_000002" in str(file) and file.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(tensors, file, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fill_disk)
    assert cli.main(["train", *TINY, f"output_dir={out}", "max_iterations=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write checkpoint {out / 'checkpoints' / 'iter_000002'}: No space left on device" in err
    assert f"{out / 'checkpoints' / 'iter_000001'}, is intact" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_000001"]
    ckpt.verify_checkpoint(out / "checkpoints" / "iter_000001")


def test_state_json_records_every_file_and_the_tensors_come_in_as_dicts(tmp_path):
    """save_checkpoint writes what it is given (a distributed caller's gathered tensors) and records each file."""
    trainable = {"layer.weight": torch.ones(2, 3)}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    opt_tensors, opt_meta = ckpt.flatten_optimizer(optimizer)
    path = ckpt.save_checkpoint(tmp_path / "iter_000001", trainable, opt_tensors, opt_meta, {"iteration": 1},
                                extra_tensors={"ema.0": torch.zeros(3)})
    state = ckpt.verify_checkpoint(path)
    assert sorted(state["files"]) == ["extra.safetensors", "optimizer.json", "optimizer.safetensors",
                                      "rng.safetensors", "trainable.safetensors"]
    assert state["files"]["trainable.safetensors"]["size"] == (path / "trainable.safetensors").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000001"]
