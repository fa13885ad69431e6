"""Video: the Wan policy against diffusers' own WanPipeline (Wan2.1, and Wan2.2's two experts), exact log-probs on
5-D latents, GRPO on-policy ratio 1, the LoRA in a stock WanPipeline, frame counts and sample kinds checked before
any model loads, and the video rewards (per frame, temporal terms, a frozen clip scoring below a moving one)."""

import math

import pytest
import torch

from diffrl.checks import ConfigError
from diffrl.config import load_config
from diffrl.pipelines.wan import WanPolicy
from diffrl.rewards import build_reward
from diffrl.rollout import sample
from diffrl.sampling import flow_sde_step, make_sampler
from diffrl.trainers.loop import Trainer

PROMPTS = ["a red circle moving right", "two squares"]
FAST = ["model=tiny-wan", "reward=video_temporal", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
        "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2",
        "train.group_size=2", "train.rollout_batch_size=4", "train.train_batch_size=4", "logging.log_with=none",
        "logging.progress=false"]


@pytest.mark.parametrize("two_experts", [False, True])
def test_ode_rollout_equals_the_stock_wan_pipeline(two_experts):
    """Our Euler ODE through the policy reproduces WanPipeline's latents (float32, 1e-5); on Wan2.2 the boundary
    (t >= 875: the high-noise expert) falls inside the 4 steps, so both experts run, each on its steps."""
    policy = WanPolicy.tiny(two_experts=two_experts)
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))  # [2, 16, 3, 4, 4]
    assert noise.shape == (2, 16, 3, 4, 4)
    schedule = policy.schedule(4)
    high = policy.expert_of(schedule.timesteps).tolist()
    assert high == ([True, True, False, False] if two_experts else [True] * 4)  # t = 1000, 934 | 781, 47
    with torch.no_grad():
        ours = sample(policy, policy.encode_prompt(PROMPTS), make_sampler("flow_ode"), schedule, 6.0, latents=noise,
                      record=False).final
        stock = policy.pipeline()(prompt=PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=6.0, height=32,
                                  width=32, num_frames=9, output_type="latent", max_sequence_length=16).frames
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    video = policy.decode(ours)
    assert video.shape == (2, 9, 3, 32, 32) and 0 <= video.min() and video.max() <= 1


def test_flow_sde_log_prob_on_video_latents_is_the_float64_gaussian():
    """The Flow-GRPO SDE step on [B, C, F', h, w]: the log density averaged over every non-batch element equals an
    independent float64 computation."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    sigma, sigma_prev, a = 0.8, 0.6, 0.7
    step = flow_sde_step(x, v, sigma, sigma_prev, noise_level=a, sigma_max=0.9, generator=g)
    dt = sigma_prev - sigma
    std_t = a * math.sqrt(sigma / (1 - sigma))
    mean = x * (1 + std_t**2 * dt / (2 * sigma)) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    ref = (-((step.prev_sample - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob, ref, rtol=1e-12, atol=1e-12)


def test_grpo_on_video_rescores_its_rollout_with_ratio_one(tmp_path):
    trainer = Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", "policy.dtype=float64"]))
    batch = trainer.rollout(0)
    assert batch.images.shape == (4, 9, 3, 32, 32) and batch.trajectory.latents.shape[2:] == (16, 3, 4, 4)
    B, N = batch.trajectory.log_probs.shape
    rows, steps = torch.arange(B), torch.arange(B) % N
    with torch.no_grad():
        new = trainer.algorithm.step_log_prob(batch, rows, steps).log_prob
    ratio = torch.exp(new - batch.trajectory.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-12, rtol=0)


@pytest.mark.parametrize("algorithm", ["grpo", "nft", "crd", "prdp", "easytune", "draft"])
def test_two_iterations_train_every_lora_tensor_on_video(tmp_path, algorithm):
    """Every trainer on 5-D latents: finite losses, every LoRA tensor moved, a checkpoint; EasyTune and DRaFT
    back-propagate video_temporal (differentiable) through the Wan VAE decode of the whole clip."""
    trainer = Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", f"algorithm={algorithm}", "max_iterations=2",
                                         "train.learning_rate=1e-2", "logging.save_every=2"]))
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    rows = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))
    assert (tmp_path / "checkpoints" / "iter_000002" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_lora_loads_in_a_stock_wan_pipeline(tmp_path):
    """A LoRA saved by the policy, loaded with WanPipeline.load_lora_weights into a fresh tiny pipeline, samples what
    the policy samples with it."""
    policy = WanPolicy.tiny()
    policy.add_lora(4, 8)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    policy.save_lora(tmp_path / "lora")
    noise = policy.initial_noise(1, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt=PROMPTS[:1], latents=noise, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                  num_frames=9, output_type="latent", max_sequence_length=16)
    with torch.no_grad():
        ours = sample(policy, policy.encode_prompt(PROMPTS[:1]), make_sampler("flow_ode"), policy.schedule(3), 5.0,
                      latents=noise, record=False).final
        stock = WanPolicy.tiny().pipe
        base = stock(**kwargs).frames
        stock.load_lora_weights(str(tmp_path / "lora"))
        tuned = stock(**kwargs).frames
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the clip
    torch.testing.assert_close(tuned, ours, rtol=0, atol=1e-5)


def test_frame_counts_and_sample_kinds_are_checked_before_any_model_loads(monkeypatch):
    import diffrl.pipelines.registry as registry

    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(ConfigError, match=r"'policy.num_frames' must be 4k \+ 1.*got 8: the nearest are 5 and 9"):
        load_config(None, [*FAST, "policy.num_frames=8"])
    with pytest.raises(ConfigError, match="'reward' jpeg_compressibility scores image samples but 'tiny-wan' makes video samples; score each frame with per_frame"):
        load_config(None, [*FAST, "reward=jpeg_compressibility"])
    with pytest.raises(ConfigError, match="'reward' video_temporal scores video samples but 'tiny-sd3' makes image samples"):
        load_config(None, [*FAST, "model=tiny-sd3"])
    with pytest.raises(ConfigError, match="'policy.num_frames' is for video models"):
        load_config(None, ["model=tiny-sd3", "policy.num_frames=9"])
    cfg = load_config(None, [*FAST, "reward=per_frame", "reward_kwargs={reward: jpeg_compressibility, stride: 4}",
                             "policy.num_frames=13"])
    assert cfg.policy.num_frames == 13


def test_per_frame_is_the_image_reward_frame_by_frame():
    videos = torch.rand(2, 9, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    image = build_reward("colorfulness")
    frames = videos[:, ::4]  # frames 0, 4, 8
    expected = torch.stack([image(frames[:, k], ["x", "y"]) for k in range(3)], dim=1)  # [2, 3]
    torch.testing.assert_close(build_reward("per_frame", reward="colorfulness", stride=4)(videos, ["x", "y"]), expected.mean(1))
    torch.testing.assert_close(build_reward("per_frame", reward="colorfulness", stride=4, aggregate="min")(videos, ["x", "y"]),
                               expected.min(1).values)
    with pytest.raises(ValueError, match="expects video"):
        build_reward("per_frame")(videos[:, 0], ["x", "y"])  # an image batch


def test_a_frozen_clip_scores_below_a_moving_one():
    """The weight-free video term: a frozen clip is perfectly steady (flicker 1, smoothness 1) but does not move, so
    video_temporal ranks a smoothly moving square above it, and a flickering clip below both."""
    frames, size = 9, 32
    moving = torch.ones(1, frames, 3, size, size)
    for t in range(frames):
        moving[0, t, :, 12:20, 2 + 2 * t : 10 + 2 * t] = 0.0  # a black square sliding right, 2 px a frame
    frozen = moving[:, :1].expand(1, frames, 3, size, size).clone()
    flicker = frozen.clone()
    flicker[0, 1::2] = 1 - flicker[0, 1::2]  # every other frame inverted
    prompts = ["a square moving right"]
    assert build_reward("temporal_flicker")(frozen, prompts).item() == 1.0
    assert build_reward("motion_smoothness")(frozen, prompts).item() == 1.0 and build_reward("dynamics")(frozen, prompts).item() == 0.0
    score = build_reward("video_temporal")
    assert score(moving, prompts).item() > score(frozen, prompts).item() > score(flicker, prompts).item()


def test_clip_grid_gif_plays_every_frame_of_every_clip(tmp_path):
    from PIL import Image

    from diffrl.visual import save_clip_grid

    F = 5
    levels = torch.linspace(0, 1, F)  # clip 0 brightens frame by frame, clip 1 darkens
    videos = torch.stack([levels, levels.flip(0)]).view(2, F, 1, 1, 1).expand(2, F, 3, 8, 8)  # [2, F, 3, 8, 8]
    path = save_clip_grid(videos, ["up", "down"], tmp_path / "clips.gif", cols=2, cell=16)
    with Image.open(path) as gif:
        assert gif.n_frames == F
        for f in range(F):
            gif.seek(f)
            frame = gif.convert("L")
            want = (round(255 * levels[f].item()), round(255 * levels[F - 1 - f].item()))
            assert abs(frame.getpixel((8, 8)) - want[0]) <= 2 and abs(frame.getpixel((24, 8)) - want[1]) <= 2


def test_a_video_run_writes_its_clips_as_a_gif_beside_the_panel(tmp_path):
    from PIL import Image

    Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", "max_iterations=1", "logging.save_every=0"])).train()
    with Image.open(tmp_path / "images" / "iter_000001.gif") as gif:
        assert gif.n_frames == 9  # the tiny Wan's clip length
    assert (tmp_path / "images" / "iter_000001.png").is_file()


def test_wan22_low_noise_guidance_scale_equals_the_stock_pipeline_guidance_scale_2():
    """sampling.guidance_scale_2 sets the low-noise expert's CFG scale: our ODE equals WanPipeline(guidance_scale_2=...)
    and differs from one scale for both experts; on other families the option fails before any model loads."""
    policy = WanPolicy.tiny(two_experts=True)
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompt(PROMPTS)
    with torch.no_grad():
        one_scale = sample(policy, cond, make_sampler("flow_ode"), policy.schedule(4), 6.0, latents=noise, record=False).final
        policy.set_low_noise_guidance(2.0)
        ours = sample(policy, cond, make_sampler("flow_ode"), policy.schedule(4), 6.0, latents=noise, record=False).final
        stock = policy.pipeline()(prompt=PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=6.0,
                                  guidance_scale_2=2.0, height=32, width=32, num_frames=9, output_type="latent",
                                  max_sequence_length=16).frames
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    assert (ours - one_scale).abs().max() > 1e-3
    with pytest.raises(ValueError, match="two experts"):
        WanPolicy.tiny(two_experts=False).set_low_noise_guidance(2.0)
    with pytest.raises(ConfigError, match="sampling.guidance_scale_2"):
        load_config(None, ["model=tiny-sd3", "sampling.guidance_scale_2=2.0"])
