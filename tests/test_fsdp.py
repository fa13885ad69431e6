"""FSDP2 on the CPU (gloo): sharded GRPO trains the same weights as one process with the same global batch, its
checkpoints hold whole tensors that resume exactly (same process count) or to the same weights (another count),
a two-node launch (torchrun --nnodes 2, c10d rendezvous on 127.0.0.1) trains as two local processes, and the
launcher's settings are honoured or refused before any model loads.

Every run replays the rollouts one process recorded (tests/fsdp_worker.py): sampling noise is drawn per process,
so only replayed batches make the layouts comparable. Weights agree to float32 summation order: LoRA updates of
~1e-3 per step, differences below 1e-6.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fsdp_worker.py")
TOLERANCE = 1e-6
"""Largest |difference| between LoRA tensors of two layouts (a step moves them by ~1e-3)."""
FULL_TOLERANCE = 1e-5
"""The same for a full fine-tune: Adam divides each gradient by its running RMS, which magnifies float32 summation-order
differences in the weights whose gradients are tiny."""


def run(out: Path, record: Path, mode: str, processes: int = 1, *overrides: str, fsdp: bool = True, nodes: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if fsdp:
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    args = [str(WORKER), str(out), str(record), mode, *overrides]
    if processes == 1 and nodes == 1:
        cmds = [[sys.executable, *args]]
    elif nodes == 1:
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]]
    else:  # one torchrun per node, meeting at a c10d rendezvous on localhost
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(processes),
                 "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "diffrl-test", *args]
                for _ in range(nodes)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)
    return logs


def trainable(run_dir: Path, iteration: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"iter_{iteration:06d}" / "trainable.safetensors")


def optimizer_state(run_dir: Path, iteration: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"iter_{iteration:06d}" / "optimizer.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    largest = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"max |difference| over {len(a)} tensors: {largest:.2e}")  # pytest -s shows the figures
    return largest


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One process, LoRA: its rollouts (replayed by every other layout) and its checkpoints."""
    root = tmp_path_factory.mktemp("fsdp")
    run(root / "one", root / "record", "record", fsdp=False)
    return root


@pytest.mark.multiprocess
def test_fsdp2_two_processes_match_one(recorded, tmp_path):
    run(tmp_path / "two", recorded / "record", "replay", 2)
    for it in (1, 2):
        one, two = trainable(recorded / "one", it), trainable(tmp_path / "two", it)
        moved = max_difference(one, trainable(recorded / "one", it - 1)) if it > 1 else None
        assert max_difference(one, two) < TOLERANCE, it
        assert max_difference(optimizer_state(recorded / "one", it), optimizer_state(tmp_path / "two", it)) < TOLERANCE
        if moved is not None:
            assert moved > 100 * TOLERANCE  # the comparison is not between untrained weights
    # the diffusers LoRA file of the sharded run holds whole tensors too
    lora = load_file(tmp_path / "two" / "checkpoints" / "iter_000002" / "lora" / "pytorch_lora_weights.safetensors")
    assert len(lora) == len(trainable(tmp_path / "two", 2))
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[-1]["samples_seen"] == 24


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_four_processes_and_full_finetune(recorded, tmp_path):
    run(tmp_path / "four", recorded / "record", "replay", 4)
    assert max_difference(trainable(recorded / "one", 2), trainable(tmp_path / "four", 2)) < TOLERANCE
    # full fine-tune: every weight sharded and trained, gathered into the checkpoint's diffusers folder
    full = ("policy.lora_rank=0", "grpo.kl_beta=0")
    run(tmp_path / "full1", recorded / "record", "replay", 1, *full, fsdp=False)
    run(tmp_path / "full2", recorded / "record", "replay", 2, *full)
    one, two = trainable(tmp_path / "full1", 2), trainable(tmp_path / "full2", 2)
    assert len(one) > len(trainable(recorded / "one", 2)) and max_difference(one, two) < FULL_TOLERANCE
    assert (tmp_path / "full2" / "checkpoints" / "iter_000002" / "denoiser" / "config.json").is_file()


def resumed_copy(source: Path, target: Path) -> Path:
    """The run `source` as if killed after its first checkpoint: iteration 2's checkpoint and rows removed."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "iter_000002")
    return target


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_resume_exact_and_across_process_counts(recorded, tmp_path):
    run(tmp_path / "two", recorded / "record", "replay", 2)
    # same process count: bit-identical
    again = resumed_copy(tmp_path / "two", tmp_path / "again")
    run(again, recorded / "record", "replay", 2, f"resume={again}")
    assert max_difference(trainable(tmp_path / "two", 2), trainable(again, 2)) == 0
    assert max_difference(optimizer_state(tmp_path / "two", 2), optimizer_state(again, 2)) == 0
    # four processes, and one process without FSDP, from the two-process checkpoint
    for name, processes, fsdp in (("four", 4, True), ("single", 1, False)):
        other = resumed_copy(tmp_path / "two", tmp_path / name)
        run(other, recorded / "record", "replay", processes, f"resume={other}", fsdp=fsdp)
        assert max_difference(trainable(recorded / "one", 2), trainable(other, 2)) < TOLERANCE, name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_on_localhost(recorded, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1 with a c10d rendezvous: the same weights as two local processes."""
    run(tmp_path / "nodes", recorded / "record", "replay", 1, nodes=2)
    run(tmp_path / "local", recorded / "record", "replay", 2)
    assert max_difference(trainable(tmp_path / "local", 2), trainable(tmp_path / "nodes", 2)) == 0


# ---- the launcher's settings: honoured or refused before any model loads ------------------------------------------
def launch_error(monkeypatch, env: dict, *overrides: str) -> str:
    from diffrl.checks import ConfigError
    from diffrl.config import load_config

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model=tiny-sd3", *overrides])
    return str(err.value)


@pytest.mark.parametrize("env, overrides, expected", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, (), "train.mixed_precision"),  # the config file's bf16 vs the run's no
    ({"ACCELERATE_MIXED_PRECISION": "no"}, ("train.mixed_precision=bf16",), "accelerate launch --mixed_precision bf16"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, (), "fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ("algorithm=draft", "reward=colorfulness"), "'algorithm' draft"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ("algorithm=crd",), "'algorithm' crd"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ("train.ema=true",), "'train.ema'"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ("policy.compile=true",), "'policy.compile'"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, (), "dynamo_backend"),
])
def test_launcher_settings_are_refused_when_they_conflict(monkeypatch, env, overrides, expected):
    assert expected in launch_error(monkeypatch, env, *overrides)


def test_deepspeed_on_a_machine_without_gpu_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs GPUs" in launch_error(monkeypatch, {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_launcher_settings_that_agree_are_honoured(monkeypatch):
    from diffrl.config import load_config

    for key, value in {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    assert load_config(None, ["model=tiny-sd3"]).train.mixed_precision == "no"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_shipped_fsdp2_accelerate_config_runs_sharded_on_a_cpu(tmp_path):
    """The user's command: accelerate launch with configs/accelerate/fsdp2.yaml. Its bf16 is refused against the
    recipe's float32 before any model loads; with --mixed_precision no the run shards over gloo and resumes."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(root / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2"]
    train = ["-m", "diffrl.cli", "train", str(root / "configs" / "image" / "tiny_sd3_jpeg.yaml"),
             f"output_dir={tmp_path / 'run'}", "max_iterations=2", "logging.progress=false", "logging.save_every=1",
             "train.prompts_per_iteration=1", "train.rollout_batch_size=8", "train.train_batch_size=8",
             "data.num_eval_prompts=2"]
    refused = subprocess.run([*launch, *train], env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "'train.mixed_precision' is no but the accelerate launcher asks for bf16" in refused.stderr
    assert not (tmp_path / "run").exists()
    done = subprocess.run([*launch, "--mixed_precision", "no", *train], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[diffrl] 2 processes on cpu (gloo): FSDP2" in done.stdout + done.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # continued on one process from the sharded run's first checkpoint: it resumes and ends at iteration 3
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "iter_000002")
    more = subprocess.run([sys.executable, *train[0:], "max_iterations=3", "train.prompts_per_iteration=2",
                           f"resume={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "2 process(es) wrote" in more.stdout + more.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
