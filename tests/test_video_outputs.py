"""Clips a person can look at: `diffrl sample` on a video model (an MP4 per clip, a GIF grid, a frame-strip grid),
`diffrl eval` on clips (scores of the seeded clips, exact frames kept for a resume), RL guidance on the video policy
and on a stock WanPipeline, the frame strips in TensorBoard, and bad options refused before any model loads.
Tiny random Wan (32 x 32 px, 9 frames), 2-3 steps.

MP4 tolerance: the MP4s are H.264 at CRF 18 with 4:2:0 chroma (what players open), so they are lossy. Read back, the
smooth synthetic clip below is off by 3.3 of 255 on average (its colour ramp loses to the 2x2 chroma averaging):
tolerance 5. The tiny Wan's noise-like 5-frame clips (neighbouring pixels differ by about 10 of 255) are off by 7.8:
tolerance 10 (the same clips with red and blue swapped are off by 13). Every decoded frame must also be nearer its own
frame than any other frame of the clip (measured margins 6 of 255 or more), and every colour channel nearer its own
channel, which a dropped or reordered frame or a channel order mix-up fails. The lossless .mkv must match exactly.
"""

from __future__ import annotations

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av
import numpy as np
import pytest
import torch
from PIL import Image

from diffrl import cli
from diffrl.benchmarks.evaluate import generate
from diffrl.config import load_config
from diffrl.guidance import RLGuidedPolicy, rl_guidance
from diffrl.pipelines.registry import load_policy
from diffrl.pipelines.wan import WanPolicy
from diffrl.rewards import build_reward
from diffrl.rollout import sample
from diffrl.sampling import make_sampler
from diffrl.trainers.loop import Trainer
from diffrl.visual import read_video, save_lossless_clip, save_mp4, to_uint8

PROMPTS = ["a red circle moving right", "two squares"]
TINY = ["--model", "tiny-wan", "--steps", "2", "--device", "cpu"]


def mean_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two uint8 clips, on the 0-255 scale."""
    return (a.float() - b.float()).abs().mean().item()


def assert_frames_in_place(decoded: torch.Tensor, clip: torch.Tensor, tolerance: float) -> None:
    """decoded [F, 3, H, W] is clip [F, 3, H, W] through a lossy codec: close on average, and each frame and each colour
    channel nearest its own."""
    assert decoded.shape == clip.shape
    assert mean_error(decoded, clip) <= tolerance
    for f in range(len(clip)):
        errors = [mean_error(decoded[f], clip[g]) for g in range(len(clip))]
        assert min(range(len(clip)), key=errors.__getitem__) == f, (f, errors)
    for c in range(3):
        errors = [mean_error(decoded[:, c], clip[:, k]) for k in range(3)]
        assert min(range(3), key=errors.__getitem__) == c, (c, errors)


def smooth_clip(frames: int = 9, size: int = 32) -> torch.Tensor:
    """uint8 [F, 3, H, W]: a red-green gradient under a blue-ish square sliding 2 px a frame."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    clip = torch.stack([xs * 6, ys * 6, torch.full_like(xs, 90)]).expand(frames, 3, size, size).clone()  # [F, 3, H, W]
    for t in range(frames):
        clip[t, :, 10:22, 2 + 2 * t : 14 + 2 * t] = torch.tensor([40, 80, 220]).view(3, 1, 1)
    return clip.to(torch.uint8)


def tuned_wan(two_experts: bool = False, dtype=torch.float32) -> WanPolicy:
    """The tiny Wan (weights seed 0, as --model tiny-wan) with a random LoRA on its (high-noise) transformer."""
    policy = WanPolicy.tiny(dtype=dtype, two_experts=two_experts)
    policy.add_lora(4, 8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return policy


def frame_rate(path) -> float:
    with av.open(str(path)) as container:
        return float(container.streams.video[0].average_rate)


# ---- the files ---------------------------------------------------------------------------------------------
def test_mp4_and_lossless_clip_read_back(tmp_path):
    clip = smooth_clip()
    save_mp4(clip, tmp_path / "c.mp4", fps=8)
    assert frame_rate(tmp_path / "c.mp4") == 8
    assert_frames_in_place(read_video(tmp_path / "c.mp4"), clip, tolerance=5.0)
    save_lossless_clip(clip, tmp_path / "c.mkv")
    assert torch.equal(read_video(tmp_path / "c.mkv"), clip)  # FFV1: every 8-bit pixel back
    with pytest.raises(ValueError, match="even"):
        save_mp4(clip[..., :31], tmp_path / "odd.mp4")


def test_sample_writes_an_mp4_per_clip_a_gif_and_a_strip_grid(tmp_path):
    out = tmp_path / "s"
    assert cli.main(["sample", *TINY, "--num-frames", "5", "--fps", "8", "--prompt", PROMPTS[0], "--num-images", "2",
                     "--seed", "3", "--output-dir", str(out)]) == 0
    meta = json.loads((out / "samples.json").read_text())
    assert meta["num_frames"] == 5 and meta["fps"] == 8 and [s["seed"] for s in meta["samples"]] == [3, 4]
    policy = load_policy("tiny-wan", num_frames=5)
    with torch.no_grad():
        clips = to_uint8(generate(policy, [PROMPTS[0]] * 2, [3, 4], steps=2, guidance_scale=4.5))  # [2, 5, 3, 32, 32]
    for s, clip in zip(meta["samples"], clips):
        assert frame_rate(out / s["file"]) == 8
        assert_frames_in_place(read_video(out / s["file"]), clip, tolerance=10.0)
    with Image.open(out / "grid.gif") as gif:
        assert gif.n_frames == 5
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 4 * 160, 160 + 44)  # 2 clips a row, each a strip of 4 frames 160 px high


def test_eval_on_clips_scores_the_seeded_clips_and_keeps_their_frames(tmp_path, monkeypatch):
    out = tmp_path / "e"
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["eval", *TINY, "--prompts", str(tmp_path / "p.txt"), "--images-per-prompt", "1", "--seed", "5",
            "--rewards", "video_temporal", "per_frame", "--output-dir", str(out)]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(rows) == metrics["num_images"] == 2 and metrics["sample_kind"] == "video"
    policy = load_policy("tiny-wan")
    with torch.no_grad():
        clips = to_uint8(generate(policy, PROMPTS, [5, 6], steps=2, guidance_scale=4.5))  # [2, 9, 3, 32, 32]
    for name in ("video_temporal", "per_frame"):
        direct = build_reward(name)(clips.float() / 255, PROMPTS)
        assert [r[name] for r in rows] == pytest.approx(direct.tolist(), abs=1e-6)
    for row, clip in zip(rows, clips):
        assert torch.equal(read_video(out / row["frames"]), clip)
        assert read_video(out / row["file"]).shape == (9, 3, 32, 32)
    assert "grid.gif" in (out / "report.md").read_text() and "2 prompts x 1 clips" in (out / "report.md").read_text()
    with Image.open(out / "grid.gif") as gif:
        assert gif.n_frames == 9
    # a second run loads the kept frames instead of sampling, and scores them the same
    import diffrl.benchmarks.evaluate as evaluate

    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("sampled again"))
    assert cli.main(args) == 0
    assert [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()] == rows


# ---- RL guidance on video ---------------------------------------------------------------------------------
@pytest.mark.parametrize("two_experts", [False, True])
def test_rl_guidance_w0_is_the_base_and_w1_the_tuned_video_policy(two_experts):
    """The ODE rollout of RLGuidedPolicy on 5-D latents: w = 0 is the base clip, w = 1 the tuned one, bit for bit; in
    between it is neither. On Wan2.2 the low-noise steps (frozen transformer_2) are shared by all three."""
    policy = tuned_wan(two_experts)
    cond = policy.encode_prompt(PROMPTS)
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))  # [2, 16, 3, 4, 4]

    def run(p):
        with torch.no_grad():
            return sample(p, cond, make_sampler("flow_ode"), p.schedule(4), 5.0, latents=noise, record=False).final

    tuned, mid = run(policy), run(RLGuidedPolicy(policy, 0.5))
    with policy.reference():
        base = run(policy)
    assert (tuned - base).abs().max() > 1e-2  # the LoRA matters
    assert torch.equal(run(RLGuidedPolicy(policy, 0.0)), base)
    assert torch.equal(run(RLGuidedPolicy(policy, 1.0)), tuned)
    assert (mid - base).abs().max() > 1e-3 and (mid - tuned).abs().max() > 1e-3


def test_rl_guidance_on_video_latents_is_affine_in_w():
    """One guided prediction [B, C, F', h, w] (float64): base + w (tuned - base), each with CFG, for any w."""
    policy = tuned_wan(dtype=torch.float64)
    cond = policy.encode_prompt(PROMPTS)
    x = policy.initial_noise(2, generator=torch.Generator().manual_seed(0)).double()
    t = policy.schedule(3).timesteps[1].expand(2)
    with torch.no_grad():
        tuned = policy.predict(x, t, cond, 5.0)
        with policy.reference():
            base = policy.predict(x, t, cond, 5.0)
        for w in (0.5, 1.5, 3.0):
            torch.testing.assert_close(RLGuidedPolicy(policy, w).predict(x, t, cond, 5.0), base + w * (tuned - base),
                                       rtol=0, atol=1e-10)


@pytest.mark.parametrize("two_experts", [False, True])
def test_rl_guidance_plugin_on_a_stock_wan_pipeline(tmp_path, two_experts):
    """rl_guidance on WanPipeline with a LoRA from load_lora_weights: w = 0 is the pipeline without the LoRA, w = 1
    with it, exactly; a LoRA on Wan2.2's unmixed transformer_2 is refused."""
    tuned_wan(two_experts).save_lora(tmp_path / "lora")
    kwargs = dict(prompt=PROMPTS[:1], latents=WanPolicy.tiny().initial_noise(1, generator=torch.Generator().manual_seed(3)),
                  num_inference_steps=3, guidance_scale=5.0, height=32, width=32, num_frames=9, output_type="latent",
                  max_sequence_length=16)
    pipe = WanPolicy.tiny(two_experts=two_experts).pipe
    with torch.no_grad():
        base = pipe(**kwargs).frames
        pipe.load_lora_weights(str(tmp_path / "lora"))
        tuned = pipe(**kwargs).frames
        assert (tuned - base).abs().max() > 1e-2
        for w, expected in ((0.0, base), (1.0, tuned)):
            with rl_guidance(pipe, w):
                assert torch.equal(pipe(**kwargs).frames, expected)
    if two_experts:
        pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="expert_2", load_into_transformer_2=True)
        with pytest.raises(ValueError, match="transformer_2 carries a LoRA"):
            rl_guidance(pipe, 1.5)


def test_sample_rlg_scale_on_video_gives_the_base_and_the_tuned_clips(tmp_path):
    """--rlg-scale 0 samples the base clip, 1 the tuned one: compared on grid.png, 4 frames of the clip stored without
    loss (x264 is not bit-reproducible between runs in one process, so the MP4s may differ by a few bytes)."""
    tuned_wan().save_lora(tmp_path / "lora")
    common = [*TINY, "--prompt", PROMPTS[0]]

    def strips(name, *extra):
        assert cli.main(["sample", *common, *extra, "--output-dir", str(tmp_path / name)]) == 0
        with Image.open(tmp_path / name / "grid.png") as grid:
            return np.asarray(grid.convert("RGB")).astype(int)

    lora = ["--lora", str(tmp_path / "lora")]
    base, tuned = strips("base"), strips("tuned", *lora)
    assert np.abs(base - tuned).max() > 3  # the LoRA changes the clip
    assert np.array_equal(strips("w0", *lora, "--rlg-scale", "0"), base)
    assert np.array_equal(strips("w1", *lora, "--rlg-scale", "1"), tuned)
    assert json.loads((tmp_path / "w1" / "samples.json").read_text())["rlg_scale"] == 1.0


# ---- TensorBoard and checks before loading ------------------------------------------------------------------
def test_a_video_run_logs_its_frame_strip_panel_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(load_config(None, [
        "model=tiny-wan", "reward=video_temporal", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
        "sampling.num_steps=2", "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2",
        "train.group_size=2", "train.rollout_batch_size=4", "train.train_batch_size=4", "logging.progress=false",
        "max_iterations=1", "logging.save_every=0", "logging.log_with=tensorboard", f"output_dir={tmp_path}"])).train()
    events = EventAccumulator(str(tmp_path / "diffrl"), size_guidance={"images": 0}).Reload()
    logged = events.Images("eval/eval")
    assert [e.step for e in logged] == [0, 1]
    with Image.open(io.BytesIO(logged[1].encoded_image_string)) as shown, \
            Image.open(tmp_path / "images" / "iter_000001.png") as panel:
        assert panel.size == (2 * 4 * 160, 160 + 44)  # 2 clips as strips of 4 frames
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(panel.convert("RGB")))


def test_bad_video_options_fail_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import diffrl.pipelines.registry as registry

    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    out = ["--output-dir", str(tmp_path)]
    eval_args = ["eval", *TINY, "--prompts", "builtin:toy_eval", *out]
    for args in (["sample", *TINY, "--prompt", "x", "--num-frames", "8", *out],
                 [*eval_args, "--rewards", "video_temporal", "--num-frames", "8"]):
        assert cli.main(args) == 2
        assert "'--num-frames' must be 4k + 1" in (err := capsys.readouterr().err) and "the nearest are 5 and 9" in err
    assert cli.main([*eval_args, "--rewards", "jpeg_compressibility"]) == 2
    assert "jpeg_compressibility scores image samples but tiny-wan makes video samples; per_frame" in capsys.readouterr().err
    assert cli.main(["sample", "--model", "tiny-sd3", "--prompt", "x", "--num-frames", "9", *out]) == 2
    assert "--num-frames: for video and motion models only; tiny-sd3 makes image samples" in capsys.readouterr().err
