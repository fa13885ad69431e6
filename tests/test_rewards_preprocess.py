"""Differentiable preprocessing of the CLIP-family rewards against the reference processors on PIL images.

Tolerance (stated in rewards/imaging.py): the tensor path skips PIL's uint8 rounding after each resize
pass, so per pixel it may differ by about 1/255 in [0, 1] units; we allow 1.5/255 at most and 0.5/255
on average, in pixel units (the normalised difference times the channel std).
"""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from diffrl.rewards.hpsv2 import hps_exact_pixels, hps_tensor_pixels
from diffrl.rewards.imagereward import ImageReward, imagereward_exact_pixels
from diffrl.rewards.imaging import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ShortestEdgeCrop, to_pil

MAX_PIXEL_ERR = 1.5 / 255
MEAN_PIXEL_ERR = 0.5 / 255
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
# sizes: upscaling and downscaling, square, portrait, landscape; noise (worst case) and smooth images
SHAPES = [(32, 32), (64, 48), (48, 80), (300, 260), (512, 384)]


def _images(h, w, smooth, seed=0):
    g = torch.Generator().manual_seed(seed)
    if smooth:
        x = torch.nn.functional.interpolate(torch.rand(2, 3, max(h // 8, 2), max(w // 8, 2), generator=g),
                                            size=(h, w), mode="bilinear", align_corners=False)
    else:
        x = torch.rand(2, 3, h, w, generator=g)
    return (x * 255).round() / 255  # representable exactly as uint8, so both paths start equal


def _pixel_err(ours, ref):
    d = ((ours - ref) * STD).abs()  # normalised units -> [0, 1] pixel units
    return d.max().item(), d.mean().item()


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_clip_tensor_preprocess_matches_clip_image_processors(shape, smooth):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    x = _images(*shape, smooth)
    pil = CLIPImageProcessorPil()  # the PIL backend: CLIPProcessor as published (and what "exact" runs)
    ours = ShortestEdgeCrop.from_image_processor(pil)(x)  # [2, 3, 224, 224]
    for processor in (pil, CLIPImageProcessor()):  # and the torchvision backend, also on PIL images
        ref = processor(images=to_pil(x), return_tensors="pt")["pixel_values"]
        assert ref.shape == ours.shape == (2, 3, 224, 224)
        worst, mean = _pixel_err(ours, ref)
        assert worst <= MAX_PIXEL_ERR and mean <= MEAN_PIXEL_ERR, (shape, smooth, type(processor).__name__, worst * 255)


def test_clip_tensor_preprocess_reads_the_processor_config():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 40}, resample=2,
                                 image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    t = ShortestEdgeCrop.from_image_processor(proc)
    assert (t.size, t.crop, t.mode, t.mean, t.std) == (64, (48, 40), "bilinear", (0.5,) * 3, (0.25,) * 3)
    x = _images(100, 90, smooth=True)
    ref = proc(images=to_pil(x), return_tensors="pt")["pixel_values"]
    d = ((t(x) - ref) * 0.25).abs()
    assert d.max().item() <= MAX_PIXEL_ERR


def test_clip_tensor_preprocess_passes_gradients_to_the_pixels():
    x = _images(64, 48, smooth=True).requires_grad_()
    out = ShortestEdgeCrop()(x)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # every pixel inside the crop window influences the output; none outside it (rows are cropped away
    # only in the longer dimension: 64 px high -> 298 -> rows 37..261 kept)
    assert (x.grad.abs().sum(dim=(0, 1, 3)) > 0).float().mean() > 0.7


@pytest.mark.parametrize("shape", [(32, 32), (64, 48), (48, 80), (300, 260)])
def test_hps_tensor_preprocess_matches_torchvision_resize_max_size(shape):
    """HPSv2's evaluation transform, written independently with torchvision's classes:
    Resize to (round(h * s), round(w * s)) with s = 224 / max(h, w), Pad to 224 centred with 0."""
    x = _images(*shape, smooth=False)
    h, w = shape
    s = 224 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    ref_tf = T.Compose([
        T.Resize((nh, nw), interpolation=InterpolationMode.BICUBIC),
        T.Pad(((224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2), fill=0),
        T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])
    ref = torch.stack([ref_tf(im) for im in to_pil(x)])
    torch.testing.assert_close(hps_exact_pixels(x), ref, atol=1e-6, rtol=0)  # the exact path is the published one
    worst, mean = _pixel_err(hps_tensor_pixels(x), ref)
    assert worst <= MAX_PIXEL_ERR and mean <= MEAN_PIXEL_ERR, worst * 255
    # the padding is exactly the normalised black of the reference
    if nw < 224:
        torch.testing.assert_close(hps_tensor_pixels(x)[..., :(224 - nw) // 2], ref[..., :(224 - nw) // 2])


@pytest.mark.parametrize("shape", [(32, 32), (64, 49), (301, 260)])
def test_imagereward_preprocess_matches_published_torchvision_transform(shape):
    """ImageReward's _transform(224): Resize(224, bicubic), CenterCrop(224), ToTensor, Normalize(CLIP)."""
    x = _images(*shape, smooth=False)
    ref_tf = T.Compose([T.Resize(224, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224),
                        T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    ref = torch.stack([ref_tf(im.convert("RGB")) for im in to_pil(x)])
    torch.testing.assert_close(imagereward_exact_pixels(x), ref, atol=1e-6, rtol=0)
    worst, mean = _pixel_err(ImageReward.tensor_preprocess(x), ref)  # torchvision's rounded crop offset
    assert worst <= MAX_PIXEL_ERR and mean <= MEAN_PIXEL_ERR, worst * 255


def test_to_pil_rounds_like_ddpo():
    x = torch.tensor([0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 1.0, 1.2, -0.1]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    pixels = np.asarray(to_pil(x)[0])[0, :, 0]
    assert pixels.tolist() == [0, 0, 1, 2, 255, 255, 0]  # round(x * 255), clamped; 0.5 rounds to even
    assert isinstance(to_pil(x)[0], Image.Image)
