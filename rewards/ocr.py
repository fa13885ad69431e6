"""OCR reward (Flow-GRPO): how well the text rendered in the image matches the prompt's quoted span.

    reward = build_reward("ocr")                            # TrOCR (microsoft/trocr-base-printed) from the cache
    reward = build_reward("ocr", model="tiny")              # random tiny TrOCR (tests)
    reward = build_reward("ocr", recognizer="mypkg.ocr:read")  # any engine: images -> list of strings
    scores = reward(images, ['a sign reading "Open Late"', ...])  # in [0, 1]

Flow-GRPO's score: the target is the text between the prompt's first pair of double quotes (the whole
prompt when it has none); target and recognised text lose their spaces and are lower-cased; the
distance is 0 when the target occurs in the recognised text, else their Levenshtein distance, capped
at the target's length; score = 1 - distance / len(target). A prompt whose target is empty scores
NaN (missing; the training loop masks and counts it). `metadata[i]["text"]`, when present, overrides
the quoted span.

Recognisers: "trocr", a transformers VisionEncoderDecoderModel with its processor, in-process and
batched (TrOCR reads one line of text: it suits images dominated by their text; Flow-GRPO used
PaddleOCR, a detector + recogniser); or "module:function", any callable taking a list of RGB uint8
PIL images and returning one string per image. To run an engine in its own environment or on
another machine, serve this reward there (`diffrl serve-reward ocr recognizer=...`) and train with
the `remote` reward.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .hub import TINY, ModelReward, resolve_folder, seeded
from .imaging import to_pil
from .registry import register_reward


def target_text(prompt: str) -> str:
    """Flow-GRPO's target: the first double-quoted span of the prompt, or the whole prompt."""
    return prompt.split('"')[1] if '"' in prompt else prompt


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_score(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward of recognised text against the target text, in [0, 1]; NaN for an
    empty target (after removing spaces)."""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        return math.nan
    distance = 0 if target in recognized else levenshtein(recognized, target)
    return 1.0 - min(distance, len(target)) / len(target)


class TrOCRRecognizer:
    """A transformers VisionEncoderDecoderModel (TrOCR) with its processor; greedy decoding."""

    def __init__(self, model: str, *, reward: str, dtype: torch.dtype, max_new_tokens: int = 32):
        from transformers import AutoTokenizer, VisionEncoderDecoderModel
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        self.max_new_tokens = max_new_tokens
        if model == TINY:
            self.model, self.image_processor, self.tokenizer = tiny_trocr()
        else:
            from .hub import dtype_kwarg

            folder = resolve_folder(model, reward=reward, what="TrOCR model",
                                    needs=("config.json", "preprocessor_config.json"))
            self.model = VisionEncoderDecoderModel.from_pretrained(folder, local_files_only=True, **dtype_kwarg(dtype))
            # the PIL backend: TrOCR's published processor (ViT: 384 x 384 bilinear, mean = std = 0.5)
            self.image_processor = ViTImageProcessorPil.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model.to(dtype).eval().requires_grad_(False)

    def pixel_values(self, images: list) -> Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # [B, 3, 384, 384]

    def __call__(self, images: list, device: torch.device) -> list[str]:
        pixels = self.pixel_values(images).to(device=device, dtype=self.model.dtype)
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  num_beams=1)  # [B, T]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def tiny_trocr():
    """Random tiny TrOCR: ViT encoder (384 px, patch 32, width 32) + TrOCR decoder over the shipped
    tiny CLIP tokenizer; TrOCR's published image processor settings."""
    from transformers import TrOCRConfig, TrOCRForCausalLM, ViTConfig, ViTModel, VisionEncoderDecoderModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from diffrl.pipelines.tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    encoder = seeded(0, lambda: ViTModel(ViTConfig(image_size=384, patch_size=32, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=37), add_pooling_layer=False))
    decoder = seeded(1, lambda: TrOCRForCausalLM(TrOCRConfig(
        vocab_size=len(tokenizer), d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=37,
        max_position_embeddings=64, cross_attention_hidden_size=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.bos_token_id)))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    for key in ("decoder_start_token_id", "bos_token_id"):
        setattr(model.config, key, tokenizer.bos_token_id)
    # the shipped tokenizer pads with eos; generation pads finished rows with bos instead, so that it
    # does not take pad == eos for an unmasked batch (TrOCR's own tokenizer pads with a separate id)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    image_processor = ViTImageProcessorPil(size={"height": 384, "width": 384}, resample=2,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return model.eval(), image_processor, tokenizer


def _import_callable(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"recognizer {spec!r}: expected 'trocr' or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"recognizer {spec!r}: cannot import {name!r} from {module!r} ({err})") from err
    if not callable(fn):
        raise ValueError(f"recognizer {spec!r} is not callable")
    return fn


@register_reward("ocr")
class OCR(ModelReward):
    """Flow-GRPO's normalised edit-distance score of the recognised text against the quoted span."""

    default_model = "microsoft/trocr-base-printed"

    def __init__(self, model: str | None = None, *, recognizer: str = "trocr", max_new_tokens: int = 32,
                 dtype: str = "float32", device: str | None = None):
        """recognizer: "trocr" (model: its folder, cached hub id or "tiny") or "module:function"
        (a callable: list of PIL images -> list of str; model unused); max_new_tokens: TrOCR's
        longest output."""
        super().__init__(model, dtype=dtype, device=device)
        self.recognizer_spec = recognizer
        self.max_new_tokens = max_new_tokens
        if recognizer != "trocr":
            self.recognize_fn = _import_callable(recognizer)

    def _load(self) -> None:
        if self.recognizer_spec == "trocr":
            self.recognizer = TrOCRRecognizer(self.model, reward=self._name(), dtype=self.dtype,
                                              max_new_tokens=self.max_new_tokens)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.recognizer.model] if self.recognizer_spec == "trocr" else []

    def recognize(self, samples: Tensor) -> list[str]:
        """The text read in each image [B, 3, H, W] in [0, 1]."""
        device = self._ready(samples)
        images = to_pil(samples)
        if self.recognizer_spec == "trocr":
            texts = self.recognizer(images, device)
        else:
            texts = list(self.recognize_fn(images))
        if len(texts) != len(images) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"reward 'ocr': the recognizer returned {texts!r} for {len(images)} images; "
                             "expected one string per image")
        return texts

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        texts = self.recognize(samples)
        targets = [(m or {}).get("text") or target_text(p) for p, m in zip(prompts, metadata or [None] * len(prompts))]
        return torch.tensor([ocr_score(t, g) for t, g in zip(texts, targets)], dtype=torch.float32)  # [B]
