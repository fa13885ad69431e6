"""HPSv2 / HPSv2.1 (Wu et al., 2023): open_clip ViT-H/14 fine-tuned on human preference pairs.

    reward = build_reward("hpsv2")                 # xswu/HPSv2/HPS_v2_compressed.pt from the HF cache
    reward = build_reward("hpsv2.1")               # xswu/HPSv2/HPS_v2.1_compressed.pt
    reward = build_reward("hpsv2", checkpoint="/path/HPS_v2_compressed.pt")
    reward = build_reward("hpsv2", model="tiny")   # random tiny open_clip CLIP (tests)

Run as the authors' scorer does, with open_clip itself (a core dependency of diffrl): the ViT-H-14
architecture, the checkpoint's "state_dict", open_clip's ViT-H-14 tokenizer (77 tokens) and
score = cos(image features, text features) (the diagonal of image_features @ text_features.T, no
logit scale; about 0.2-0.3 for real images). Preprocessing is HPSv2's evaluation transform: the
longer side resized to 224 (bicubic; each side round(side * scale)), zero padding to 224 x 224,
centred, then OpenAI CLIP mean/std; exactly (torchvision on PIL images) or as tensor ops.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .hub import TINY, ModelReward, load_state_dict, resolve_file, seeded
from .imaging import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_longest_pad, to_pil
from .registry import register_reward

IMAGE_SIZE = 224
ARCH = "ViT-H-14"
TINY_CONFIG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=IMAGE_SIZE, layers=1, width=32, head_width=16, patch_size=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)
"""open_clip CLIP config of the random tiny model (the real one is open_clip's "ViT-H-14")."""


def _open_clip():
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - a core dependency; only a broken install gets here
        raise ImportError("reward 'hpsv2' needs open_clip: pip install open_clip_torch") from err
    return open_clip


def hps_exact_pixels(samples: Tensor) -> Tensor:
    """HPSv2's published evaluation transform on PIL images (torchvision): [B, 3, 224, 224]."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    out = []
    for image in to_pil(samples):
        w, h = image.size
        scale = IMAGE_SIZE / max(h, w)
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            image = TF.resize(image, [nh, nw], interpolation=InterpolationMode.BICUBIC)
            ph, pw = IMAGE_SIZE - nh, IMAGE_SIZE - nw
            image = TF.pad(image, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        out.append(TF.normalize(TF.to_tensor(image.convert("RGB")), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return torch.stack(out)  # [B, 3, 224, 224]


def hps_tensor_pixels(samples: Tensor) -> Tensor:
    """The same transform as differentiable tensor ops: [B, 3, H, W] in [0, 1] -> [B, 3, 224, 224]."""
    return normalize(resize_longest_pad(samples.float(), IMAGE_SIZE), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@register_reward("hpsv2")
class HPSv2(ModelReward):
    """Cosine similarity of HPSv2's open_clip ViT-H/14 image and text features."""

    default_model = ARCH
    default_checkpoint: ClassVar[str] = "xswu/HPSv2/HPS_v2_compressed.pt"

    def __init__(self, model: str | None = None, *, checkpoint: str | None = None, differentiable: bool = False,
                 dtype: str = "float32", device: str | None = None):
        """model: "ViT-H-14" (the architecture of the published checkpoints) or "tiny" (a random tiny
        open_clip model); checkpoint: a local file or "owner/name/file" in the HF cache (default: the
        published one for ViT-H-14, none for tiny; one given explicitly is loaded into either);
        differentiable: tensor preprocessing, gradients reach the pixels."""
        super().__init__(model, dtype=dtype, device=device)
        if self.model not in (ARCH, TINY):
            raise ValueError(f"reward {self._name()!r}: model must be {ARCH!r} (the published architecture) "
                             f"or 'tiny', got {self.model!r}; pass the weights as checkpoint=...")
        self.checkpoint = checkpoint or (None if self.model == TINY else self.default_checkpoint)
        self.differentiable = differentiable

    def _load(self) -> None:
        open_clip = _open_clip()
        self.tokenizer = open_clip.get_tokenizer(ARCH)  # SimpleTokenizer, ships with open_clip
        config = TINY_CONFIG if self.model == TINY else open_clip.get_model_config(ARCH)
        if self.checkpoint is None:
            self.clip = seeded(0, lambda: open_clip.CLIP(**config, output_dict=True))
        else:
            path = resolve_file(self.checkpoint, reward=self._name(), what="HPS checkpoint", fix_arg="checkpoint")
            self.clip = open_clip.CLIP(**config, output_dict=True)
            state = load_state_dict(path)
            self.clip.load_state_dict(state.get("state_dict", state))  # HPS files: {"state_dict": ...}
        self.clip.to(self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.clip]

    def pixel_values(self, samples: Tensor) -> Tensor:
        x = hps_tensor_pixels(samples) if self.differentiable else hps_exact_pixels(samples)
        return x.to(device=samples.device, dtype=self.dtype)  # [B, 3, 224, 224]

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        device = self._ready(samples)
        image = F.normalize(self.clip.encode_image(self.pixel_values(samples)).float(), dim=-1)  # [B, D]
        text = F.normalize(self.clip.encode_text(self.tokenizer(prompts).to(device)).float(), dim=-1)  # [B, D]
        return (image * text).sum(-1)  # [B]


@register_reward("hpsv2.1")
class HPSv21(HPSv2):
    """HPSv2 with the v2.1 checkpoint (trained on more data)."""

    default_checkpoint = "xswu/HPSv2/HPS_v2.1_compressed.pt"
