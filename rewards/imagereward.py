"""ImageReward (Xu et al., 2023): BLIP (ViT-L/16 image encoder, BERT text encoder with cross-attention to
the image) and an MLP head, trained on human preference rankings. Output ~N(0, 1) over typical images.

    reward = build_reward("imagereward")                # THUDM/ImageReward + google-bert/bert-base-uncased (HF cache)
    reward = build_reward("imagereward", model="/path/with/ImageReward.pt+med_config.json",
                          tokenizer="/path/to/bert-base-uncased")
    reward = build_reward("imagereward", model="tiny")  # random tiny BLIP (tests)

The `image-reward` package pins old timm / transformers internals, so the published checkpoint
(ImageReward.pt: BLIP's own ViT and med.py BERT, plus the MLP) is loaded into transformers'
BlipVisionModel and BlipTextModel (a port of the same BLIP code) by renaming keys; the test suite
checks the conversion against an independent implementation of the published architecture.
Scoring follows ImageReward.score: the prompt tokenized by BERT (max_length 35, padded), image
tokens from the ViT, the text encoder's [CLS] state after cross-attending to them, the MLP, then
(r - 0.16717362830052426) / 1.0333394966054072. Preprocessing: resize the short side to 224
(bicubic), centre crop 224, OpenAI CLIP mean/std: torchvision on PIL, or as tensor ops.
"""

from __future__ import annotations

import json
import math
import re
import string

import torch
from torch import Tensor

from .aesthetic import AestheticHead
from .hub import TINY, ModelReward, load_state_dict, resolve_file, resolve_folder, seeded
from .imaging import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ShortestEdgeCrop, to_pil
from .registry import register_reward

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
IMAGE_SIZE = 224
VIT_HEAD_DIM = 64
"""BLIP's ViTs use 64-dim attention heads (ViT-B 768 / 12, ViT-L 1024 / 16): heads = width // 64."""

_VISION_RENAMES = [  # BLIP ViT (timm naming) -> transformers BlipVisionModel
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _subdict(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_vision_state(vit: dict[str, Tensor]) -> dict[str, Tensor]:
    """BLIP's VisionTransformer state dict -> BlipVisionModel's (every key must be renamed)."""
    out = {}
    for key, value in vit.items():
        for pattern, repl in _VISION_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in the ImageReward checkpoint's visual encoder")
    return out


def vision_config_from_state(vit: dict[str, Tensor]):
    """BlipVisionConfig of a BLIP ViT state dict: sizes read from the shapes (heads = width // 64)."""
    from transformers import BlipVisionConfig

    width = vit["cls_token"].shape[-1]
    patch = vit["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(vit["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in vit if k.startswith("blocks."))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=vit["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_DIM, image_size=grid * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6,  # BLIP: nn.GELU, partial(nn.LayerNorm, eps=1e-6)
        attention_dropout=0.0,
    )


def text_config_from_med(med: dict, vision_width: int, tokenizer):
    """BlipTextConfig of BLIP's med_config.json, cross-attending to `vision_width`-wide image tokens.
    is_decoder=True only makes transformers build the cross-attention layers; scoring calls the model
    with is_decoder=False (bidirectional self-attention, as BLIP's encoder mode)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_act=med.get("hidden_act", "gelu"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        encoder_hidden_size=vision_width, is_decoder=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
    )


def blip_tokenizer(tokenizer):
    """ImageReward's init_tokenizer on a BERT tokenizer: [DEC] as bos, [ENC] as an extra special token."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tiny_bert_tokenizer():
    """An uncased WordPiece tokenizer over letters, digits and a few words (in memory, offline)."""
    from transformers import BertTokenizer

    pieces = list(string.ascii_lowercase + string.digits)
    words = ["a", "photo", "of", "the", "and", "with", "on", "cat", "dog", "red", "blue", "green", "circle",
             "square", "triangle", "two", "three", "left", "right", "above", "below"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *list(string.punctuation), *pieces,
             *("##" + p for p in pieces), *[w for w in words if w not in pieces]]
    return blip_tokenizer(BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}))


def _tiny_modules(tokenizer):
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_config = BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=64 // VIT_HEAD_DIM, image_size=IMAGE_SIZE, patch_size=32,
                                     layer_norm_eps=1e-6, attention_dropout=0.0,
                                     initializer_range=0.02)  # timm's ViT init; transformers' default is 1e-10
    med = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=37, max_position_embeddings=40)
    text_config = text_config_from_med(med, 64, tokenizer)
    # BERT's init (std 0.02) leaves the image's cross-attention a ~1e-5 effect on the [CLS] state: too
    # faint to test that images matter; std 0.1 makes it visible and keeps the score smooth in the pixels
    text_config.initializer_range = 0.1
    vision = seeded(0, lambda: BlipVisionModel(vision_config))
    text = seeded(1, lambda: BlipTextModel(text_config, add_pooling_layer=False))
    head = AestheticHead.tiny(32, seed=2)
    return vision, text, head


def imagereward_exact_pixels(samples: Tensor) -> Tensor:
    """ImageReward's published transform (torchvision on PIL): [B, 3, H, W] -> [B, 3, 224, 224]."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    out = []
    for image in to_pil(samples):
        image = TF.center_crop(TF.resize(image, IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC), IMAGE_SIZE)
        out.append(TF.normalize(TF.to_tensor(image.convert("RGB")), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return torch.stack(out)


@register_reward("imagereward")
class ImageReward(ModelReward):
    """ImageReward-v1.0 score (standardised by the published mean and std)."""

    default_model = "THUDM/ImageReward"
    default_tokenizer = "google-bert/bert-base-uncased"  # the hub's current id (the cache folder is named by it)
    tensor_preprocess = ShortestEdgeCrop(size=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE), crop_rounding="round")
    """torchvision's Resize(224) + CenterCrop(224) (which rounds the crop offset) as tensor ops."""

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, checkpoint: str = "ImageReward.pt",
                 differentiable: bool = False, dtype: str = "float32", device: str | None = None):
        """model: a folder (or cached hub repo) holding `checkpoint` and med_config.json, or "tiny";
        tokenizer: a bert-base-uncased folder or cached hub id; differentiable: tensor preprocessing."""
        super().__init__(model, dtype=dtype, device=device)
        self.tokenizer_spec = tokenizer or self.default_tokenizer
        self.checkpoint = checkpoint
        self.differentiable = differentiable

    def _load(self) -> None:
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        if self.model == TINY:
            self.tokenizer = tiny_bert_tokenizer()
            self.vision, self.text, self.head = _tiny_modules(self.tokenizer)
        else:
            name = self._name()
            folder = resolve_folder(self.model, reward=name, what="ImageReward model",
                                    needs=(self.checkpoint, "med_config.json"))
            tok_folder = resolve_folder(self.tokenizer_spec, reward=name, what="BERT tokenizer",
                                        needs=("vocab.txt",), fix_arg="tokenizer")
            self.tokenizer = blip_tokenizer(BertTokenizer.from_pretrained(tok_folder, local_files_only=True))
            state = load_state_dict(resolve_file(str(folder / self.checkpoint), reward=name,
                                                 what="ImageReward checkpoint", fix_arg="model"))
            vit = _subdict(state, "blip.visual_encoder.")
            vision_config = vision_config_from_state(vit)
            med = json.loads((folder / "med_config.json").read_text())
            text_config = text_config_from_med(med, vision_config.hidden_size, self.tokenizer)
            self.vision = BlipVisionModel(vision_config)
            self.vision.load_state_dict(convert_vision_state(vit))
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
            text_state = {k: v for k, v in _subdict(state, "blip.text_encoder.").items()
                          if not k.endswith("position_ids")}  # a buffer in med.py, recomputed here
            self.text.load_state_dict(text_state)
            self.head = AestheticHead(text_config.hidden_size)
            self.head.load_state_dict(_subdict(state, "mlp."))
        for module in self._modules():
            module.to(self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.vision, self.text, self.head]

    def pixel_values(self, samples: Tensor) -> Tensor:
        x = self.tensor_preprocess(samples) if self.differentiable else imagereward_exact_pixels(samples)
        return x.to(device=samples.device, dtype=self.dtype)  # [B, 3, 224, 224]

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        device = self._ready(samples)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt")
        image_embeds = self.vision(pixel_values=self.pixel_values(samples)).last_hidden_state  # [B, N + 1, Dv]
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device)  # [B, N + 1]
        text = self.text(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
                         encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, is_decoder=False)
        features = text.last_hidden_state[:, 0].float()  # [B, Dt]: the [CLS] state
        return (self.head(features.to(self.dtype)).float() - REWARD_MEAN) / REWARD_STD  # [B]
