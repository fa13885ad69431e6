"""Two processes on the CPU (torchrun, gloo): whole groups per rank, distinct noise, synchronised weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def run_two_processes(tmp_path, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = Path(__file__).with_name("mp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path),
           *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.multiprocess
def test_two_process_grpo(tmp_path):
    run_two_processes(tmp_path)

    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    dumps = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2]
    assert [i["rank"] for i in info] == [0, 1]

    # whole groups per rank: each group id lives on one rank only, with all K = 3 members
    g0, g1 = dumps[0]["group_ids"].tolist(), dumps[1]["group_ids"].tolist()
    assert not set(g0) & set(g1)
    for ids in (g0, g1):
        assert all(ids.count(g) == 3 for g in set(ids))
    for r in (0, 1):
        prompts = info[r]["prompts"]
        assert all(len({prompts[k] for k in range(len(prompts)) if dumps[r]["group_ids"][k] == g}) == 1 for g in set(dumps[r]["group_ids"].tolist()))

    # distinct initial noise across ranks (and within a rank)
    noise = torch.cat([dumps[0]["noise"], dumps[1]["noise"]]).flatten(1)
    dist = torch.cdist(noise, noise) + torch.eye(len(noise)) * 1e9
    assert dist.min() > 1.0

    # gradients were synchronised: every trainable tensor identical on both ranks after training on different data
    keys = [k for k in dumps[0] if k.startswith("param.")]
    assert keys
    for k in keys:
        assert torch.equal(dumps[0][k], dumps[1][k]), k
    assert any(dumps[0][k].abs().sum() > 0 for k in keys if True)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["samples_seen"] == 2 * 2 * 2 * 3  # iterations x ranks x prompts x K


@pytest.mark.multiprocess
def test_two_process_crd(tmp_path):
    """CRD under DDP: each rank centres whole groups of its own, gradients are synchronised, and the EMA
    snapshot adapters (added after DDP wrapped the network) stay identical on both ranks."""
    run_two_processes(tmp_path, "algorithm=crd", "crd.sampling_decay=[0,0.5,0.0,0.5]")
    dumps = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    g0, g1 = dumps[0]["group_ids"].tolist(), dumps[1]["group_ids"].tolist()
    assert not set(g0) & set(g1) and all(ids.count(g) == 3 for ids in (g0, g1) for g in set(ids))
    for name in ("default", "old", "sampling"):
        keys = [k for k in dumps[0] if k.startswith(f"adapter.{name}.")]
        assert keys, name
        assert all(torch.equal(dumps[0][k], dumps[1][k]) for k in keys), name
    assert any(not torch.equal(dumps[0][f"adapter.old.{i}"], dumps[0][f"adapter.default.{i}"]) for i in range(4))


@pytest.mark.multiprocess
def test_two_process_reward_backprop(tmp_path):
    """DRaFT-all under DDP: every step's denoiser call (step-checkpointed) before one backward, which DDP's hooks
    cannot follow, so the update runs under no_sync and averages gradients itself: the LoRA weights, trained on
    different prompts and noise per rank, stay identical on both ranks."""
    run_two_processes(tmp_path, "algorithm=draft", "draft.k=null", "reward=colorfulness")
    dumps = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    keys = [k for k in dumps[0] if k.startswith("param.")]
    assert keys and all(torch.equal(dumps[0][k], dumps[1][k]) for k in keys)
    assert not torch.equal(dumps[0]["noise"], dumps[1]["noise"])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["samples_seen"] == 24 and metrics[-1]["kept_steps"] == 3
