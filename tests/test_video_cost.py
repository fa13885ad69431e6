"""Decoding clips cheaply and measuring what video costs: Wan's causal VAE decodes a prefix of the latent frames into
exactly the prefix of the clip; sliced decoding is the plain decode, tiled decoding engages and stays close; the VAE
options are checked before any model loads and reach the policy; a run decodes only the frames its reward reads; the
video cost benchmark's CPU mode writes its table, and its GPU mode builds the full-size Wan2.1-1.3B transformer (on
the meta device), runs one layer of it on the CPU and its step reaches the LoRA."""

import json

import pytest
import torch

from diffrl.checks import ConfigError
from diffrl.config import load_config
from diffrl.pipelines.registry import load_policy
from diffrl.pipelines.wan import latent_frames_for
from diffrl.rewards import build_reward
from diffrl.rewards.mixture import RewardMixture
from diffrl.trainers.loop import Trainer

FAST = ["model=tiny-wan", "reward=video_temporal", "policy.resolution=32", "policy.num_frames=9", "policy.lora_rank=4",
        "policy.lora_alpha=8", "sampling.num_steps=3", "train.prompts_per_iteration=2", "train.group_size=2", "train.rollout_batch_size=4",
        "train.train_batch_size=4", "logging.log_with=none", "logging.progress=false"]
FIRST_FRAME = ["reward=per_frame", "reward_kwargs={reward: colorfulness, max_frames: 1}"]


def latents(policy, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *policy.latent_shape(), generator=torch.Generator().manual_seed(seed))  # [B, C, F', h, w]


def test_the_first_latent_frames_decode_to_exactly_the_first_frames_of_the_clip():
    policy = load_policy("tiny-wan", num_frames=17)  # 5 latent frames
    z = latents(policy, 2)
    full = policy.decode(z)  # [2, 17, 3, 32, 32]
    assert [latent_frames_for(k) for k in (1, 2, 5, 6, 9, 13, 17)] == [1, 2, 2, 3, 3, 4, 5]
    for k in (1, 2, 5, 6, 13, 17):
        prefix = policy.decode(z, num_frames=k)
        assert prefix.shape == (2, k, 3, 32, 32)
        torch.testing.assert_close(prefix, full[:, :k], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="num_frames must be in 1..17"):
        policy.decode(z, num_frames=18)


def test_sliced_decode_is_the_plain_decode():
    policy = load_policy("tiny-wan", num_frames=5)
    z = latents(policy, 3)
    plain = policy.decode(z)
    policy.set_vae_chunking(slicing=True)
    assert policy.pipe.vae.use_slicing
    torch.testing.assert_close(policy.decode(z), plain, rtol=0, atol=1e-5)  # one clip at a time: batch-size rounding only


def test_tiled_decode_engages_and_stays_close_to_the_plain_decode(monkeypatch):
    # At 256 px the latent frame is 32 x 32 and 192 px tiles are 24 latents wide, so tiling engages (2 x 2 tiles). It is
    # an approximation (a tile is decoded without its neighbours; the random VAE's mid-block attention sees the whole
    # frame): measured mean |difference| 0.007, against 0.040 between the decodes of two unrelated latents.
    policy = load_policy("tiny-wan", num_frames=5, resolution=256)
    z, other = latents(policy, 1), latents(policy, 1, seed=1)
    plain, unrelated = policy.decode(z), policy.decode(other)
    vae = policy.pipe.vae
    tiled_calls = []
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, _f=vae.tiled_decode, **k: tiled_calls.append(1) or _f(*a, **k))
    policy.set_vae_chunking(tiling=True, tile_size=192, tile_stride=128)
    tiled = policy.decode(z)
    assert tiled_calls and tiled.shape == plain.shape
    assert (tiled - plain).abs().mean() < 0.01 < 0.03 < (unrelated - plain).abs().mean()
    policy.set_vae_chunking(tiling=False)
    assert torch.equal(policy.decode(z), plain)


def test_vae_options_are_checked_before_loading_and_reach_the_policy(monkeypatch):
    import diffrl.pipelines.registry as registry

    tiled = ["policy.vae_tiling=true", "policy.vae_tile_size=64", "policy.vae_tile_stride=48", "policy.vae_slicing=true"]
    real_load = registry.load_policy
    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(ConfigError, match="'policy.vae_tile_size' / 'policy.vae_tile_stride' are set but 'policy.vae_tiling' is false"):
        load_config(None, [*FAST, "policy.vae_tile_stride=64"])
    with pytest.raises(ConfigError, match="'policy.vae_tile_stride' 96 is larger than the tile side 64"):
        load_config(None, [*FAST, "policy.vae_tiling=true", "policy.vae_tile_size=64", "policy.vae_tile_stride=96"])
    with pytest.raises(ConfigError, match="'policy.vae_tile_size' must be a positive multiple of 8"):
        load_config(None, [*FAST, "policy.vae_tiling=true", "policy.vae_tile_size=60"])
    with pytest.raises(ConfigError, match="options of the video \\(wan\\) VAE; 'tiny-sd3' is a sd3 model"):
        load_config(None, ["model=tiny-sd3", "policy.vae_slicing=true"])
    cfg = load_config(None, [*FAST, *tiled])
    monkeypatch.setattr(registry, "load_policy", real_load)
    policy = registry.load_policy("tiny-wan", num_frames=5, **cfg.policy.vae_chunking())
    vae = policy.pipe.vae
    assert vae.use_slicing and vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (64, 48)
    with pytest.raises(ValueError, match="options of the video \\(wan\\) VAE"):
        registry.load_policy("tiny-sd3", vae_slicing=True)


def test_rewards_say_which_leading_frames_they_read():
    videos = torch.rand(2, 9, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    first = build_reward("per_frame", reward="colorfulness", max_frames=1)
    assert first.frames_needed(33) == 1
    torch.testing.assert_close(first(videos, ["x", "y"]), build_reward("colorfulness")(videos[:, 0], ["x", "y"]))
    torch.testing.assert_close(first(videos[:, :1], ["x", "y"]), first(videos, ["x", "y"]))  # the prefix is enough
    assert build_reward("per_frame", stride=4).frames_needed(33) == 33  # frames 0, 4, ..., 32
    assert build_reward("per_frame", stride=5).frames_needed(33) == 31  # frames 0, 5, ..., 30
    assert build_reward("per_frame", stride=4, max_frames=10).frames_needed(33) == 9  # frames 0, 4, 8
    assert build_reward("video_temporal").frames_needed(33) is None  # every frame
    parts = {"a": first, "b": build_reward("per_frame", max_frames=5)}
    assert RewardMixture(parts, {"a": 1, "b": 1}).frames_needed(33) == 5
    assert RewardMixture({**parts, "t": build_reward("dynamics")}, {"a": 1, "b": 1, "t": 1}).frames_needed(33) is None


def test_a_run_decodes_only_the_frames_its_reward_reads_and_scores_the_same(tmp_path):
    trainer = Trainer(load_config(None, [*FAST, *FIRST_FRAME, f"output_dir={tmp_path / 'a'}"]))
    assert trainer.decode_kwargs == {"num_frames": 1}
    batch = trainer.rollout(0)
    assert batch.images.shape == (4, 1, 3, 32, 32)
    trainer.decode_kwargs = {}  # whole clips: the same rewards
    whole = trainer.rollout(0)
    assert whole.images.shape == (4, 9, 3, 32, 32)
    assert torch.equal(whole.rewards, batch.rewards)
    temporal = Trainer(load_config(None, [*FAST, f"output_dir={tmp_path / 'b'}"]))
    assert temporal.decode_kwargs == {}


def test_video_cost_cpu_mode_writes_its_table_plot_and_results_section(tmp_path):
    from diffrl.benchmarks.video_cost import CPU_COLUMNS, main

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nNewest first.\n\n## An older section\n\ntext\n")
    assert main(["--models", "tiny-wan", "--frames", "1", "5", "--repeats", "1", "--steps", "2", "--prompts", "1", "--group", "2", "--in-process",
                 "--output-dir", str(tmp_path), "--results-md", str(results)]) == 0
    table = [line for line in (tmp_path / "video_cost.md").read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(CPU_COLUMNS) + " |"
    cells = [line.strip("| ").split(" | ") for line in table[2:]]
    assert [(c[1], c[2], c[3]) for c in cells] == [("1", "needed", "1"), ("1", "all", "1"), ("5", "needed", "1"), ("5", "all", "5")]
    rows = json.loads((tmp_path / "video_cost.json").read_text())["rows"]
    assert all(len(r["iteration"]) == 1 and r["memory_kind"] for r in rows)
    assert rows[2]["reward_mean"] == rows[3]["reward_mean"]  # the prefix decode scores the same clips the same
    assert (tmp_path / "video_cost.png").stat().st_size > 0
    text = results.read_text()
    assert text.index("## Video cost: GRPO iteration against frames, CPU") < text.index("## An older section")


def test_video_cost_gpu_mode_is_the_full_size_wan21_transformer_and_runs_one_layer_on_cpu(tmp_path):
    from diffusers import WanTransformer3DModel

    from diffrl.benchmarks.video_cost import GPU_COLUMNS, WAN21_T2V_1_3B, main

    with torch.device("meta"):
        full = WanTransformer3DModel(**WAN21_T2V_1_3B)
    assert len(full.blocks) == 30 and full.blocks[0].attn1.to_q.in_features == 1536
    assert sum(p.numel() for p in full.parameters()) == 1_418_996_800  # Wan2.1-T2V-1.3B's 1.42e9
    assert main(["--gpu", "--layers", "1", "--frames", "5", "--height", "32", "--width", "32", "--batch", "1",
                 "--dtype", "float32", "--device", "cpu", "--repeats", "1", "--in-process", "--output-dir", str(tmp_path)]) == 0
    table = [line for line in (tmp_path / "video_cost_gpu.md").read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(GPU_COLUMNS) + " |" and len(table) == 4  # checkpointing on, off
    rows = json.loads((tmp_path / "video_cost_gpu.json").read_text())["rows"]
    assert [r["checkpointing"] for r in rows] == ["on", "off"] and all(r["error"] is None and r["step"] for r in rows)


def test_the_gpu_modes_step_sends_a_gradient_to_every_lora_tensor():
    import contextlib

    from diffrl.benchmarks.video_cost import full_size_wan, grpo_step, grpo_step_inputs

    policy = full_size_wan(1, 5, 32, 32, torch.float32, "cpu")
    policy.add_lora(4, 8)
    policy.enable_gradient_checkpointing()
    policy.denoiser.train()
    generator = torch.Generator().manual_seed(0)
    inputs = grpo_step_inputs(policy, 2, 10, generator, contextlib.nullcontext())
    assert inputs.x_t.shape == (2, 16, 2, 4, 4) and inputs.log_prob.shape == (2,)
    grpo_step(policy, inputs, contextlib.nullcontext(), torch.tensor([1.0, -1.0]))
    lora = policy.trainable_parameters()
    assert lora and all(p.grad is not None for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)  # LoRA B starts at 0: A's gradients are 0 until it moves
