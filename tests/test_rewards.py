"""Rewards: properties checked against independent computations (PIL directly, numpy float64)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl.rewards import Reward, build_reward, list_rewards, register_reward


def _prompts(n):
    return ["a photo"] * n


def _pil_jpeg_kb(pixels_hwc_uint8, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(pixels_hwc_uint8).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def _np_colorfulness(image_chw, scale=255.0):
    """Hasler & Süsstrunk (2003) in float64 numpy, population std, as in the paper's recipe."""
    r, g, b = (image_chw.astype(np.float64) * scale)
    rg = r - g
    yb = 0.5 * (r + g) - b
    std_root = np.sqrt(np.std(rg) ** 2 + np.std(yb) ** 2)
    mean_root = np.sqrt(np.mean(rg) ** 2 + np.mean(yb) ** 2)
    return std_root + 0.3 * mean_root


# --- registry ------------------------------------------------------------------------------------


def test_builtin_rewards_registered_with_declared_properties():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "brightness", "colorfulness"} <= set(
        list_rewards()
    )
    assert list_rewards() == sorted(list_rewards())
    for name in list_rewards():
        reward = build_reward(name)
        assert isinstance(reward, Reward)
        assert reward.name == name
        assert reward.to("cpu") is reward
    assert not build_reward("jpeg_compressibility").differentiable
    assert build_reward("colorfulness").differentiable
    assert build_reward("brightness").differentiable


def test_unknown_name_suggests_closest_and_lists_valid():
    with pytest.raises(ValueError) as err:
        build_reward("jpeg_compresibility")
    msg = str(err.value)
    assert "Did you mean 'jpeg_compressibility'?" in msg
    for name in list_rewards():
        assert name in msg


def test_register_rejects_duplicate_names_and_non_rewards():
    with pytest.raises(ValueError, match="already registered"):

        @register_reward("brightness")
        class Other(Reward):
            def score(self, samples, prompts, metadata):
                return samples.flatten(1).mean(1)

    with pytest.raises(TypeError):
        register_reward("not_a_reward")(object)
    assert "not_a_reward" not in list_rewards()


def test_constructor_kwargs_pass_through():
    assert build_reward("jpeg_incompressibility", quality=50).quality == 50
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_incompressibility", quality=0)


# --- JPEG ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("quality", [95, 50])
def test_jpeg_size_matches_pil_on_hand_made_uint8(quality):
    gen = np.random.default_rng(0)
    pixels = gen.integers(0, 256, size=(3, 32, 48, 3), dtype=np.uint8)  # [B, H, W, 3]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # exact round trip
    expected = [_pil_jpeg_kb(p, quality) for p in pixels]
    got = build_reward("jpeg_incompressibility", quality=quality)(images, _prompts(3))
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_jpeg_rounds_and_clamps_like_ddpo():
    # x * 255 within 0.4 of a level rounds to it; values outside [0, 1] clamp to 0 and 255.
    pixels = np.array([[[0, 255, 128], [255, 0, 7]]], dtype=np.uint8)  # [H=1, W=2, 3]
    pixels = np.tile(pixels, (16, 8, 1))  # [16, 16, 3]
    images = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255  # [1, 3, 16, 16]
    images = images + 0.4 / 255  # rounds back to the same levels
    images[images < 0.01] = -0.3  # zeros pushed below range
    images[images > 0.99] = 1.7  # 255s pushed above range
    got = build_reward("jpeg_incompressibility")(images, _prompts(1))
    torch.testing.assert_close(got, torch.tensor([_pil_jpeg_kb(pixels)], dtype=torch.float32))


def test_compressibility_is_minus_incompressibility_and_prefers_flat():
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 64, 64, generator=gen)
    flat = torch.full((2, 3, 64, 64), 0.5)
    images = torch.cat([flat, noise])
    comp = build_reward("jpeg_compressibility")(images, _prompts(4))
    incomp = build_reward("jpeg_incompressibility")(images, _prompts(4))
    torch.testing.assert_close(comp, -incomp)
    assert (incomp > 0).all()
    assert comp[:2].min() > comp[2:].max()


def test_jpeg_accepts_half_precision_without_changing_the_score():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    images = images.to(torch.bfloat16)
    reward = build_reward("jpeg_incompressibility")
    torch.testing.assert_close(reward(images, _prompts(2)), reward(images.float(), _prompts(2)))


# --- colour --------------------------------------------------------------------------------------


def test_colorfulness_matches_numpy_float64():
    images = torch.rand(4, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    images[1, 0] *= 0.2  # a less red image, so scores differ
    expected = [_np_colorfulness(im) for im in images.double().numpy()]
    got = build_reward("colorfulness")(images, _prompts(4))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    unit = build_reward("colorfulness", pixel_scale=1.0)(images, _prompts(4))
    torch.testing.assert_close(unit * 255, got)


def test_colorfulness_of_pure_hue_hand_computed():
    # Solid red at scale 255: rg = 255, yb = 127.5, no variance -> 0.3 * sqrt(255^2 + 127.5^2).
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    got = build_reward("colorfulness")(red, _prompts(1))
    torch.testing.assert_close(got, torch.tensor([0.3 * (255**2 + 127.5**2) ** 0.5]))


def test_colorfulness_zero_for_grey_and_gradient_finite():
    levels = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    grey = levels.expand(3, 3, 16, 16).clone().requires_grad_(True)
    score = build_reward("colorfulness")(grey, _prompts(3))
    assert torch.equal(score, torch.zeros(3))
    score.sum().backward()
    assert torch.isfinite(grey.grad).all()


def test_colorfulness_video_is_mean_over_frames():
    video = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(4))  # [B, F, 3, H, W]
    expected = [np.mean([_np_colorfulness(f) for f in v]) for v in video.double().numpy()]
    got = build_reward("colorfulness")(video, _prompts(2))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_brightness_value_and_gradient_reach_input():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    score = build_reward("brightness")(images, _prompts(2))
    torch.testing.assert_close(score, images.detach().double().mean(dim=(1, 2, 3)).float())
    score.sum().backward()
    # d mean / d pixel = 1 / (3 * 8 * 8) for each pixel of its own image.
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / 192))


def test_colorfulness_gradient_matches_finite_differences():
    from diffrl.rewards.color import colorfulness

    images = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    images.requires_grad_(True)
    # float64 in, float64 out: autograd against central finite differences.
    assert torch.autograd.gradcheck(lambda x: colorfulness(x, 1.0), (images,))
    # The reward (float32 output) gives the same gradient at float32 precision.
    (grad64,) = torch.autograd.grad(colorfulness(images, 255.0).sum(), images)
    images32 = images.detach().float().requires_grad_(True)
    build_reward("colorfulness")(images32, _prompts(2)).sum().backward()
    torch.testing.assert_close(images32.grad, grad64.float(), rtol=1e-4, atol=1e-3)


def test_non_differentiable_reward_runs_without_grad():
    images = torch.rand(1, 3, 8, 8, requires_grad=True)
    assert not build_reward("jpeg_compressibility")(images, _prompts(1)).requires_grad
    assert build_reward("brightness")(images, _prompts(1)).requires_grad


# --- input validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape",
    [
        ("jpeg_compressibility", (2, 16, 16)),  # [B, H, W]: no channel dim
        ("jpeg_compressibility", (2, 1, 16, 16)),  # one channel
        ("jpeg_compressibility", (2, 4, 3, 16, 16)),  # video, image-only reward
        ("colorfulness", (2, 16, 16)),
        ("colorfulness", (2, 4, 16, 16, 3)),  # channels last
        ("brightness", (2, 10, 263)),  # motion
    ],
)
def test_bad_shapes_raise_naming_the_reward_and_expected_shape(name, shape):
    with pytest.raises(ValueError) as err:
        build_reward(name)(torch.rand(shape), _prompts(2))
    msg = str(err.value)
    assert repr(name) in msg
    assert "[B, 3, H, W]" in msg
    assert str(list(shape)) in msg


def test_mismatched_prompts_or_metadata_raise():
    reward = build_reward("brightness")
    with pytest.raises(ValueError, match="2 samples but 3 prompts"):
        reward(torch.rand(2, 3, 4, 4), _prompts(3))
    with pytest.raises(ValueError, match="2 samples but 1 metadata"):
        reward(torch.rand(2, 3, 4, 4), _prompts(2), [{}])


def test_custom_reward_output_is_checked_and_cast():
    class Motion(Reward):
        name = "test_motion"
        accepts = ("motion",)

        def score(self, samples, prompts, metadata):
            return samples.double().pow(2).sum(dim=(1, 2))  # [B], float64

    scores = Motion()(torch.ones(3, 5, 4), _prompts(3))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.full((3,), 20.0))

    class Wrong(Reward):
        name = "test_wrong"

        def score(self, samples, prompts, metadata):
            return samples.mean(dim=(2, 3))  # [B, 3]: wrong

    with pytest.raises(ValueError, match="'test_wrong' returned shape"):
        Wrong()(torch.rand(2, 3, 4, 4), _prompts(2))
