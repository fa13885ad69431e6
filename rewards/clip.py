"""What the CLIP-based rewards share (pickscore, clipscore, aesthetic): a transformers CLIPModel, its
image processor and tokenizer, the exact and the differentiable preprocessing, embeddings.

The exact path runs the model folder's own image processor on PIL images with the PIL backend
(`CLIPImageProcessorPil`: what `CLIPProcessor` was when these rewards were published); the
differentiable path is its tensor twin (`imaging.ShortestEdgeCrop`, read from the same config).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .hub import TINY, ModelReward, dtype_kwarg, resolve_folder, seeded
from .imaging import ShortestEdgeCrop, to_pil


def tiny_clip_model(seed: int = 0, projection_dim: int = 16):
    """A random tiny CLIPModel (vision 224 px, patch 32; one layer of width 32) for the shipped tiny
    CLIP tokenizer. Real preprocessing sizes, so the tiny reward runs the published transforms."""
    from transformers import CLIPConfig, CLIPModel

    from diffrl.pipelines.tiny import clip_tokenizer

    vocab = len(clip_tokenizer())
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),  # the shipped tokenizer's ids; pooling reads the first eos
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=projection_dim,
    )
    return seeded(seed, lambda: CLIPModel(config)).eval()


def pooled(output) -> Tensor:
    """get_image_features / get_text_features: a tensor in transformers 4, an output whose
    pooler_output holds the projection in transformers 5."""
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipReward(ModelReward):
    """A transformers CLIPModel with its image processor and tokenizer (see module docstring)."""

    default_processor: ClassVar[str | None] = None
    """Folder of the processor when it is not the model's own (PickScore's is laion's CLIP-H)."""
    what: ClassVar[str] = "CLIP model"

    def __init__(self, model: str | None = None, *, processor: str | None = None, differentiable: bool = False,
                 dtype: str = "float32", device: str | None = None):
        """model: "tiny", a local folder or a cached hub id; processor: where the image processor and
        tokenizer live (None: the default, else the model folder); differentiable: score with the
        tensor preprocessing so gradients reach the pixels (else the exact PIL preprocessing)."""
        super().__init__(model, dtype=dtype, device=device)
        self.processor = processor or self.default_processor
        self.differentiable = differentiable

    # ---- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPModel
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        if self.model == TINY:
            from diffrl.pipelines.tiny import clip_tokenizer

            self.clip = tiny_clip_model(projection_dim=self.tiny_projection_dim).to(self.dtype)
            self.image_processor = CLIPImageProcessorPil()  # defaults = OpenAI / laion CLIP's config
            self.tokenizer = clip_tokenizer()
        else:
            name = self._name()
            folder = resolve_folder(self.model, reward=name, what=self.what, needs=("config.json",))
            self.clip = CLIPModel.from_pretrained(folder, local_files_only=True, **dtype_kwarg(self.dtype))
            pfolder = folder if self.processor in (None, self.model) else resolve_folder(
                self.processor, reward=name, what="CLIP processor", needs=("preprocessor_config.json",),
                fix_arg="processor")
            self.image_processor = CLIPImageProcessorPil.from_pretrained(pfolder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(pfolder, local_files_only=True)
        self.tensor_preprocess = ShortestEdgeCrop.from_image_processor(self.image_processor)
        self._load_head()

    tiny_projection_dim: ClassVar[int] = 16

    def _load_head(self) -> None:
        """Extra weights on top of CLIP (the aesthetic MLP)."""

    def _modules(self) -> list[torch.nn.Module]:
        return [self.clip]

    # ---- features ----------------------------------------------------------------------------
    def pixel_values(self, samples: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, 224, 224] normalised, on the model's device and dtype."""
        if self.differentiable:
            x = self.tensor_preprocess(samples)  # [B, 3, 224, 224], differentiable
        else:
            x = self.image_processor(images=to_pil(samples), return_tensors="pt")["pixel_values"]
        return x.to(device=samples.device, dtype=self.dtype)

    def image_embeds(self, samples: Tensor) -> Tensor:
        """Unit-norm projected image embeddings [B, D] in float32."""
        feats = pooled(self.clip.get_image_features(pixel_values=self.pixel_values(samples)))  # [B, D]
        return F.normalize(feats.float(), dim=-1)

    def text_embeds(self, prompts: list[str], device: torch.device) -> Tensor:
        """Unit-norm projected text embeddings [B, D] in float32 (77 tokens, truncated)."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        feats = pooled(self.clip.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                   attention_mask=tokens["attention_mask"].to(device)))  # [B, D]
        return F.normalize(feats.float(), dim=-1)
