"""The perf benchmark (benchmarks/perf.py): its FLOP accounting, its bare-model floor and the harness's table."""

from __future__ import annotations

import contextlib
import json
import math
import os

import pytest
import torch

from diffrl.benchmarks import perf


def test_sd35_medium_forward_flops_at_512px():
    """One SD3.5 Medium forward at 512 px (64 x 64 latents: 1024 image tokens; 77 CLIP + 256 T5 text tokens, batch 1)
    is the published 2.44 TFLOP, and matches the MMDiT's closed form: 2 FLOPs per multiply-add of every linear
    layer per token, plus attention's QK^T and PV (4 n^2 d per layer), counted on the meta device."""
    flops = perf.denoiser_forward_flops("sd3.5-medium", latent_size=(64, 64), text_tokens=333)
    assert abs(flops / 2.44e12 - 1) < 0.02, flops

    c = perf.full_size("sd3.5-medium").denoiser[1]
    d, blocks = c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"]  # 1536 wide, 24 blocks
    image, text = (64 // c["patch_size"]) ** 2, 333
    dual = len(c["dual_attention_layers"])  # blocks with a second, image-only attention
    block_linear = 12 * d * d  # q, k, v, out (4 d^2) and the 4x MLP (8 d^2), per token
    closed = 2 * (blocks * block_linear * image  # image stream
                  + (blocks - 1) * block_linear * text + 3 * d * d * text  # text stream; the last block: q, k, v only
                  + dual * 4 * d * d * image  # the second attention's q, k, v, out
                  + c["joint_attention_dim"] * d * text)  # context embedder
    closed += blocks * 4 * (image + text) ** 2 * d + dual * 4 * image**2 * d  # joint and image-only attention
    assert abs(flops / closed - 1) < 0.005, (flops, closed)


def test_recipe_flops_multiply_the_calls_out():
    """Per image: rollout = encode / K + N predictions; update = epochs x fraction x steps x (train + reference)."""
    calls = perf.CallFlops(predict=10, train=25, reference=9, decode=7, encode=48, reward=3)
    out = perf.recipe_flops(calls, perf.Recipe(num_steps=10, trained_steps=9, kl=True, inner_epochs=2, group_size=24,
                                               trained_fraction=0.5))
    assert out == {"rollout": 48 / 24 + 10 * 10, "decode": 7, "reward": 3, "update": 2 * 0.5 * 9 * (25 + 9)}
    assert perf.recipe_flops(calls, perf.Recipe(10, 9, kl=False))["update"] == 9 * 25


def test_variant_parsing():
    assert perf.parse_variant("window=sampling.sde_window_range=[0,3],sampling.sde_window_size=3") == (
        "window", ["sampling.sde_window_range=[0,3]", "sampling.sde_window_size=3"])
    assert perf.parse_variant("compile=policy.compile=true") == ("compile", ["policy.compile=true"])
    with pytest.raises(SystemExit, match="NAME=key=value"):
        perf.parse_variant("compile")


def test_flow_grpo_mode_names_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="sd3_pipeline_with_logprob.py"):
        perf.import_flow_grpo(tmp_path)


@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory):
    """A float64 tiny-sd3 GRPO run with the KL on, its LoRA's B matrices made non-zero (so the adapter, the KL and
    the reference differ from the base), and one scored rollout with advantages."""
    from diffrl.config import load_config
    from diffrl.trainers.loop import Trainer

    cfg = load_config(None, [
        "model=tiny-sd3", "algorithm=grpo", "reward=brightness", "data.prompts=builtin:animals", "policy.dtype=float64",
        "policy.lora_rank=4", "policy.lora_alpha=8", "sampling.num_steps=3", "sampling.guidance_scale=4.5",
        "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=6", "train.train_batch_size=6",
        "train.max_grad_norm=1e9", "grpo.kl_beta=0.04", "grpo.timestep_fraction=1.0", "grpo.clip_range=0.2",
        "logging.log_with=none", "logging.progress=false", f"output_dir={tmp_path_factory.mktemp('run')}"])
    trainer = Trainer(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.policy.trainable_module().named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = trainer.rollout(0)
    trainer.advantages(batch)
    return trainer, batch


def test_floor_update_is_grpos_update(tiny_trainer):
    """The floor measures GRPO's work: on the same rollout its bare loop gives the same loss and the same optimiser
    step (plain SGD, lr 1: minus the gradient) as diffrl's GRPO.update, KL and reference included (float64)."""
    trainer, batch = tiny_trainer
    params = trainer.policy.trainable_parameters()
    start = [p.detach().clone() for p in params]
    traj = batch.trajectory

    floor = perf.Floor(trainer.policy, perf.FloorSettings.of(trainer.cfg))
    floor_loss = floor.update(traj.schedule, traj.steps, traj.latents, traj.log_probs, batch.cond.cond,
                              batch.cond.uncond, batch.advantages, torch.optim.SGD(params, lr=1.0),
                              contextlib.nullcontext())
    floor_step = [p.detach() - s for p, s in zip(params, start)]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    metrics = trainer.algorithm.update(batch, torch.optim.SGD(params, lr=1.0), torch.Generator().manual_seed(1))
    grpo_step = [p.detach() - s for p, s in zip(params, start)]

    assert metrics["kl"] > 0 and any(s.abs().max() > 0 for s in grpo_step)
    assert math.isclose(floor_loss, metrics["loss"], rel_tol=1e-9), (floor_loss, metrics["loss"])
    for a, b in zip(floor_step, grpo_step):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_iteration_rows_time_decode_and_reward_inside_the_rollout(tiny_trainer):
    trainer, _ = tiny_trainer
    row = trainer.train_iteration()
    assert row["time_decode"] > 0 and row["time_reward"] > 0
    assert row["time_decode"] + row["time_reward"] <= row["time_rollout"]


def check_results(folder, model: str):
    """results.json has the baseline, the floor and their ratio, every value finite and positive; the FLOPs counted
    on a whole iteration equal the accounting's per-phase sums, phase by phase."""
    data = json.loads((folder / "results.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert {"baseline", "floor"} <= rows.keys()
    for r in rows.values():
        assert all(math.isfinite(v) and v >= 0 for v in r["seconds"].values()) and sum(r["seconds"].values()) > 0
        assert math.isfinite(r["peak_memory_mb"]) and r["peak_memory_mb"] > 0
    ratio = data["ratio_to_floor"]["baseline"]
    assert math.isfinite(ratio) and ratio > 0
    base = rows["baseline"]
    assert base["counted_flops"] and base["flops"] and sum(base["flops"].values()) > 0
    for phase, counted in base["counted_flops"].items():  # integers / images per iteration: equal up to rounding
        assert math.isclose(counted, base["flops"][phase], rel_tol=1e-12, abs_tol=1e-9), phase
    assert math.isclose(sum(base["counted_flops"].values()), sum(base["flops"].values()), rel_tol=1e-12)
    table = (folder / "results.md").read_text()
    assert f"| {model} | baseline |" in table
    assert "ratio to floor" in table and (folder / "perf.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [
    ("toy-sd3", []),  # the quickstart: SDE window, no KL (zero-advantage samples skipped)
    ("tiny-sd3", ["grpo.kl_beta=0.04", "sampling.sde_window_size=0", "sampling.sde_window_range=null",
                  "grpo.timestep_fraction=0.5"]),
])
def test_harness_on_the_cpu(tmp_path, model, extra):
    """The harness on a small model: a table with the baseline, a variant, the floor and ratios; the FLOPs of a whole
    iteration, counted, equal the sum of the accounting's per-phase counts."""
    out = tmp_path / "perf"
    perf.main(["--model", model, "--iterations", "1", "--warmup", "1", "--in-process", "--flops", "counted",
               "--output-dir", str(out), "--set", "train.prompts_per_iteration=2", "train.group_size=4",
               "train.rollout_batch_size=8", "train.train_batch_size=8", "sampling.num_steps=4", *extra,
               "--variant", "small_rollouts=train.rollout_batch_size=4"])
    check_results(out, model)
    data = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["baseline", "small_rollouts", "floor"]


@pytest.mark.slow
def test_full_size_path_on_the_cpu(tmp_path):
    """SD3.5 Medium's architecture (its first block only, 64 px) with random weights and random prompt embeddings
    through the Trainer and the floor; the counted FLOPs equal the accounting."""
    out = tmp_path / "perf"
    perf.main(["--model", "sd3.5-medium", "--layers", "1", "--iterations", "1", "--warmup", "0", "--in-process",
               "--flops", "counted", "--output-dir", str(out), "--set", "policy.resolution=64", "policy.dtype=float32",
               "train.mixed_precision=no", "train.prompts_per_iteration=1", "train.group_size=2",
               "train.rollout_batch_size=2", "train.train_batch_size=2", "sampling.num_steps=2", "train.ema=false"])
    check_results(out, "sd3.5-medium")
    assert "random embeddings" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIFFRL_FLOW_GRPO"), reason="set DIFFRL_FLOW_GRPO to a Flow-GRPO checkout")
def test_flow_grpo_side_by_side(tmp_path):
    """Flow-GRPO's own pipeline_with_logprob / sde_step_with_logprob run the same iteration beside diffrl's."""
    out = tmp_path / "perf"
    perf.main(["--model", "tiny-sd3", "--iterations", "1", "--warmup", "0", "--in-process", "--no-floor",
               "--output-dir", str(out), "--flow-grpo", os.environ["DIFFRL_FLOW_GRPO"], "--set",
               "train.prompts_per_iteration=2", "train.group_size=4", "train.rollout_batch_size=8",
               "train.train_batch_size=8", "sampling.num_steps=4", "sampling.sde_window_size=0",
               "sampling.sde_window_range=null", "grpo.kl_beta=0.04"])
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows.keys() == {"baseline", "Flow-GRPO"}
    theirs = rows["Flow-GRPO"]["seconds"]
    assert all(math.isfinite(v) and v > 0 for k, v in theirs.items() if k != "reward")
