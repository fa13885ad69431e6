"""Video rewards that need an encoder or weights: feature consistency (VBench subject / background consistency),
dynamic degree (VBench, RAFT optical flow) and VideoAlign's VideoReward (Qwen2-VL), on random tiny models: the
statistics against independent float64 computations, the frame and checkpoint rules against the reference's, the
errors for absent weights, and image policies refused before any model loads."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffrl.checks import ConfigError
from diffrl.config import load_config
from diffrl.rewards import build_reward
from diffrl.rewards.video_consistency import frame_consistency
from diffrl.rewards.video_flow import (dynamic_decision, dynamic_threshold, pad_to_multiple_of_8, required_pairs,
                                       top_flow_magnitude)
from diffrl.rewards.videoalign import (RELEASE_NORMALIZATION, VideoRewardNet, add_reward_tokens, build_prompt,
                                       frame_count, frame_indices, frame_size, release_settings, tiny_base_processor,
                                       tiny_config)

VIDEO_REWARDS = ["feature_consistency", "dynamic_degree", "videoalign"]


def clip(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---- feature consistency --------------------------------------------------------------------------------------
def vbench_consistency(features: np.ndarray) -> float:
    """VBench's loop (subject_consistency.py) for one clip, float64: features [F, D]."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    total = 0.0
    for t in range(1, len(unit)):
        total += (max(0.0, unit[t] @ unit[t - 1]) + max(0.0, unit[t] @ unit[0])) / 2
    return total / (len(unit) - 1)


def test_feature_consistency_is_vbench_formula_in_float64():
    features = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.tensor([vbench_consistency(f.numpy()) for f in features], dtype=torch.float64)
    torch.testing.assert_close(frame_consistency(features), expected, rtol=0, atol=1e-12)
    # the reward on pixels: each frame averaged over 2 x 2 cells to 32 x 32, flattened
    videos = clip(2, 5, 3, 64, 64, seed=2).double()
    cells = videos.numpy().reshape(2, 5, 3, 32, 2, 32, 2).mean(axis=(4, 6)).reshape(2, 5, -1)
    scores = build_reward("feature_consistency")(videos, ["x", "y"])
    torch.testing.assert_close(scores, torch.tensor([vbench_consistency(c) for c in cells], dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("encoder", ["pixels", "clip"])
def test_feature_consistency_is_one_for_a_frozen_clip_and_lower_for_noise(encoder):
    reward = build_reward("feature_consistency", encoder=encoder,
                          encoder_kwargs=None if encoder == "pixels" else {"model": "tiny"})
    frozen = clip(1, 1, 3, 64, 64).expand(1, 8, 3, 64, 64).clone()
    noise = clip(1, 8, 3, 64, 64, seed=3)
    still = reward(frozen, ["x"]).item()
    assert still == pytest.approx(1.0, abs=1e-6)
    assert reward(noise, ["x"]).item() < still - 1e-3  # pixels 0.922, tiny CLIP 0.992 (measured)


def test_feature_consistency_gradients_and_encoders():
    videos = clip(1, 4, 3, 32, 32, seed=4).requires_grad_()
    build_reward("feature_consistency")(videos, ["x"]).sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    assert not build_reward("feature_consistency", encoder="clip", encoder_kwargs={"model": "tiny"}).differentiable
    with pytest.raises(ValueError, match="no image embeddings"):
        build_reward("feature_consistency", encoder="jpeg_compressibility")


# ---- dynamic degree -------------------------------------------------------------------------------------------
def vbench_top_magnitude(flow: np.ndarray) -> float:
    """VBench's get_score, float64: flow [2, H, W]."""
    rad = np.sqrt(flow[0] ** 2 + flow[1] ** 2).flatten()
    cut = int(rad.size * 0.05)
    return float(np.mean(np.abs(np.sort(-rad))[:cut]))


def vbench_check_move(scores: list[float], frames: int, height: int, width: int) -> bool:
    """VBench's set_params + check_move."""
    thres, count_num = 6.0 * (min(height, width) / 256.0), round(4 * (frames / 16.0))
    count = 0
    for score in scores:
        if score > thres:
            count += 1
        if count >= count_num:
            return True
    return False


def test_flow_statistic_is_vbench_top_five_percent():
    # magnitudes 1..400 on a 20 x 20 field, split into (u, v) at random angles: the top 20 are 381..400
    angles = torch.rand(400, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 * math.pi
    radius = torch.randperm(400, generator=torch.Generator().manual_seed(6)).double() + 1
    field = torch.stack([radius * angles.cos(), radius * angles.sin()]).view(1, 2, 20, 20)
    assert top_flow_magnitude(field).item() == pytest.approx(390.5, abs=1e-4)
    flows = torch.randn(4, 2, 30, 34, generator=torch.Generator().manual_seed(7)) * 5
    expected = torch.tensor([vbench_top_magnitude(f.double().numpy()) for f in flows], dtype=torch.float32)
    torch.testing.assert_close(top_flow_magnitude(flows), expected, rtol=1e-5, atol=1e-5)


def test_dynamic_decision_is_vbench_check_move():
    assert dynamic_threshold(480, 832) == 6.0 * 480 / 256 and [required_pairs(n) for n in (9, 10, 14, 41)] == [2, 2, 4, 10]
    gen = torch.Generator().manual_seed(8)
    for frames in (3, 6, 10, 14, 41):
        scores = torch.rand(16, frames - 1, generator=gen) * 12  # around the threshold of 256 px frames (6.0)
        expected = [float(vbench_check_move(row.tolist(), frames, 256, 320)) for row in scores]
        assert dynamic_decision(scores, frames, 256, 320).tolist() == expected


def test_flow_padding_is_centred_replicate():
    frames = clip(1, 3, 130, 131, seed=9)
    padded = pad_to_multiple_of_8(frames)
    assert padded.shape == (1, 3, 136, 136)
    torch.testing.assert_close(padded[..., 3:133, 2:133], frames, rtol=0, atol=0)
    torch.testing.assert_close(padded[..., 0, 2:133], frames[..., 0, :], rtol=0, atol=0)


def test_dynamic_degree_plumbing_on_a_random_raft():
    """Random weights (weights=None) only check shapes and outputs: 5 frames at fps 8 (every frame), 4 pairs."""
    videos = clip(2, 5, 3, 128, 128, seed=10)
    verdict = build_reward("dynamic_degree", model="raft_small", weights=None, fps=8.0, pair_batch=3)(videos, ["a", "b"])
    assert verdict.shape == (2,) and set(verdict.tolist()) <= {0.0, 1.0}
    soft = build_reward("dynamic_degree", model="raft_small", weights=None, fps=16.0, output="mean")(videos, ["a", "b"])
    assert soft.shape == (2,) and torch.isfinite(soft).all() and (soft >= 0).all()
    with pytest.raises(ValueError, match="at least 128 px"):
        build_reward("dynamic_degree", weights=None)(clip(1, 5, 3, 64, 64), ["a"])


def test_dynamic_degree_weights_come_from_the_torch_hub_cache_or_fail_clearly(tmp_path, monkeypatch):
    from torchvision.models.optical_flow import raft_small

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        build_reward("dynamic_degree").load()
    msg = str(err.value)
    expected_file = tmp_path / "checkpoints" / "raft_large_C_T_V1-22a6c225.pth"
    assert str(expected_file) in msg and "raft_large(weights='C_T_V1')" in msg and "weights=/path/to/" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward("dynamic_degree", weights=str(tmp_path / "raft.pth")).load()
    with pytest.raises(ValueError, match="no weights 'C_T_V9'"):
        build_reward("dynamic_degree", weights="C_T_V9")
    # the file torchvision's download would leave is found and loaded
    state = raft_small(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "raft_small_C_T_V2-01064c6d.pth")
    loaded = build_reward("dynamic_degree", model="raft_small", weights="C_T_V2").load().raft.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ---- VideoAlign -----------------------------------------------------------------------------------------------
PROMPTS = ["a red cat", "two dogs playing in the park at night, cinematic"]


@pytest.fixture(scope="module")
def tiny_videoalign():
    return build_reward("videoalign", model="tiny").load()


def test_videoalign_frame_rules_are_the_references():
    """qwen-vl-utils' smart_nframes / smart_resize, computed by hand for a Wan clip (81 frames at 16 fps, 480 x 832)
    and a tiny one (9 frames, 32 x 32)."""
    assert frame_count(81, 16.0, 2.0, None) == 10  # 81 / 16 * 2 = 10.1 -> even 10
    assert frame_indices(81, 10) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert frame_count(9, 16.0, 2.0, None) == 4 and frame_indices(9, 4) == [0, 3, 5, 8]  # at least 4 frames
    assert frame_count(9, 16.0, None, 7) == 8 and frame_count(5, 16.0, None, 8) == 5  # nframes: even, at most F
    assert frame_size(480, 832, 200704) == (336, 588)  # 476 x 840 > max: scaled by sqrt(480 * 832 / 200704)
    assert frame_size(32, 32, 200704) == (336, 336)  # below 128 * 28 * 28: scaled up


def test_videoalign_prompt_is_the_released_one():
    """sha256 of prompt_template.build_prompt("a red cat jumps over a fence", ["VQ", "MQ", "TA"], "detailed_special")
    from KwaiVGI/VideoAlign (commit 219ab9d)."""
    text = build_prompt("a red cat jumps over a fence")
    assert hashlib.sha256(text.encode()).hexdigest() == "174711d6837498c681da1ec5a2b39874ad049ac3ade295257659d6ffe688cc19"


def test_videoalign_heads_normalisation_and_batch_independence(tiny_videoalign):
    videos = clip(2, 9, 3, 32, 32, seed=11)
    heads = tiny_videoalign.head_scores(videos, PROMPTS)  # [B, 3]
    raw = tiny_videoalign.head_scores(videos, PROMPTS, normalize=False)
    mean, std = torch.tensor([RELEASE_NORMALIZATION[d] for d in ("VQ", "MQ", "TA")]).T
    torch.testing.assert_close(heads, (raw - mean) / std)
    overall = tiny_videoalign(videos, PROMPTS)
    assert overall.shape == (2,) and torch.isfinite(overall).all()
    torch.testing.assert_close(overall, heads.sum(1))
    for k, head in enumerate(("vq", "mq", "ta")):  # a fresh tiny model per head: the same seeded weights
        torch.testing.assert_close(build_reward("videoalign", model="tiny", head=head)(videos, PROMPTS), heads[:, k])
    # each clip scored alone (no right padding) as in the batch; the clip and the prompt both matter
    alone = torch.cat([tiny_videoalign.head_scores(videos[i:i + 1], PROMPTS[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(alone, heads, rtol=0, atol=1e-5)
    swapped = tiny_videoalign.head_scores(videos.flip(0), PROMPTS)
    assert (swapped - heads).abs().max() > 1e-4


def _peft_checkpoint(folder, net, vocab):
    """model.pth as the reference saves it: the PEFT-wrapped Qwen2VLRewardModelBT (transformers 4.45 names:
    visual, model, lm_head, rm_head) with LoRA on the language model's linears, random LoRA B. Returns the
    VideoRewardNet state that peft's own merge gives."""
    from peft import LoraConfig, get_peft_model

    class ReferenceLayout(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.model, self.rm_head = net.vlm.visual, net.vlm.language_model, net.rm_head
            self.lm_head = nn.Linear(net.rm_head.in_features, vocab, bias=False)

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = get_peft_model(ReferenceLayout(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    (folder / "checkpoint-40").mkdir(parents=True)
    torch.save(wrapped.state_dict(), folder / "checkpoint-40" / "model.pth")
    merged = wrapped.merge_and_unload()
    return {**{f"vlm.visual.{k}": v for k, v in merged.visual.state_dict().items()},
            **{f"vlm.language_model.{k}": v for k, v in merged.model.state_dict().items()},
            "rm_head.weight": merged.rm_head.weight}


def test_videoalign_loads_a_reference_checkpoint_folder(tmp_path):
    """A VideoReward folder laid out as the release (model_config.json, checkpoint-<step>/model.pth) and a Qwen2-VL
    base folder: the LoRA merge equals peft's merge_and_unload, inference_config is the normalisation."""
    base = tiny_base_processor()
    base.save_pretrained(tmp_path / "base")
    tiny_config(base.tokenizer).save_pretrained(tmp_path / "base")
    tokenizer = tiny_base_processor().tokenizer
    token_ids = add_reward_tokens(tokenizer)
    net = VideoRewardNet(tiny_config(tokenizer), token_ids).eval()
    expected = _peft_checkpoint(tmp_path / "reward", net, len(tokenizer))
    settings = release_settings()
    settings["peft_lora_config"] = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False}
    settings["inference_config"] = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 4.0,
                                    "TA_mean": 0.25, "TA_std": 0.5}
    (tmp_path / "reward" / "model_config.json").write_text(json.dumps(settings))

    reward = build_reward("videoalign", model=str(tmp_path / "reward"), base=str(tmp_path / "base")).load()
    state = reward.net.state_dict()
    assert sorted(state) == sorted(expected)
    for key in state:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=1e-6)
    videos = clip(1, 9, 3, 32, 32, seed=13)
    raw = reward.head_scores(videos, PROMPTS[:1], normalize=False)
    net.load_state_dict(expected)
    with torch.no_grad():
        direct = net(reward.model_inputs(videos, PROMPTS[:1], torch.device("cpu")))
    torch.testing.assert_close(raw, direct)
    torch.testing.assert_close(reward.head_scores(videos, PROMPTS[:1]),
                               (raw - torch.tensor([1.0, -0.5, 0.25])) / torch.tensor([2.0, 4.0, 0.5]))


def test_videoalign_absent_weights_fail_clearly(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        build_reward("videoalign").load()
    msg = str(err.value)
    assert "'KwaiVGI/VideoReward'" in msg and "hf download KwaiVGI/VideoReward" in msg and str(tmp_path / "hub") in msg
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        build_reward("videoalign", model=str(missing)).load()
    folder = tmp_path / "reward"
    folder.mkdir()
    (folder / "model_config.json").write_text(json.dumps(release_settings()))
    with pytest.raises(FileNotFoundError, match=rf"{folder} has no checkpoint-<step>/model.pth.*checkpoint="):
        build_reward("videoalign", model=str(folder)).load()
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "model.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="'Qwen/Qwen2-VL-2B-Instruct'.*hf download.*base="):
        build_reward("videoalign", model=str(folder)).load()


# ---- all three ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VIDEO_REWARDS)
def test_video_rewards_refuse_image_policies_before_loading(name, monkeypatch):
    import diffrl.pipelines.registry as registry

    monkeypatch.setattr(registry, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    reward = build_reward(name)  # lazy: no weights are read to build it
    assert reward.accepts == ("video",)
    with pytest.raises(ConfigError, match=f"'reward' {name} scores video samples but 'tiny-sd3' makes image samples"):
        load_config(None, ["model=tiny-sd3", f"reward={name}", "logging.log_with=none"])
    with pytest.raises(ValueError, match="expects video"):
        reward(clip(2, 3, 32, 32), ["x", "y"])  # an image batch, refused before any weights load
