"""VideoAlign's VideoReward (Liu et al., 2025, "Improving Video Generation with Human Feedback"): Qwen2-VL-2B-Instruct
with a bias-free linear reward head read at three special tokens, trained with Bradley-Terry losses on human
preference pairs for visual quality (VQ), motion quality (MQ) and text alignment (TA).

    reward = build_reward("videoalign")                     # KwaiVGI/VideoReward + Qwen/Qwen2-VL-2B-Instruct (HF cache)
    reward = build_reward("videoalign", head="mq")          # one head: "overall" (default), "vq", "mq", "ta"
    reward = build_reward("videoalign", model="/path/VideoReward", base="/path/Qwen2-VL-2B-Instruct", dtype="bfloat16")
    reward = build_reward("videoalign", model="tiny")       # random tiny Qwen2-VL (tests)

What follows KwaiVGI/VideoAlign's inference.py (read, not imported) for the released checkpoint, whose
model_config.json says: prompt "detailed_special", reward_token "special", output_dim 1, LoRA on the language model:
- Frames: the clip in 8-bit, `n` frames at `fps` (2.0) of a clip played at `source_fps` (16 here: decoded clips carry
  no frame rate; Wan writes 16) by qwen-vl-utils' rule (n = F / source_fps * fps, clamped to [4, min(768, F)], rounded
  to an even count; indices round(linspace(0, F - 1, n))), or `num_frames` of them; each frame resized (bicubic,
  antialiased) to multiples of 28 with at most `max_frame_pixels` (200704) and at least 128 * 28 * 28 pixels.
- Text: the user turn <video> + the released prompt (PROMPT_TEMPLATE, verbatim: the model's input, with the three
  tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> added to the tokenizer) through the base's chat template.
- Scores: the head on the last hidden states at the three tokens gives VQ, MQ, TA; each is normalised by
  model_config.json's inference_config, (x - mean) / std (the release: VQ 3.6757 / 2.2476, MQ 1.1646 / 1.3811,
  TA 2.8105 / 2.5121, used by model="tiny" too); Overall = VQ + MQ + TA.
- Weights: checkpoint-*/model.pth (the highest step, as the reference picks) is the PEFT model's full state dict;
  the LoRA is merged into the language model, W + (lora_alpha / lora_r) B A, and the model is the base's config with
  the checkpoint's vocabulary (base tokenizer + the three tokens). Base weights are not read.

Verified here on random tiny models: the LoRA merge and key mapping against peft's own merge_and_unload of a
checkpoint laid out as the reference saves it; the frame rules against hand-computed values; the prompt against a
hash of the reference's; Overall = VQ + MQ + TA; the normalisation; scores independent of batch-mates (padding).
Not verified (no weights here): scores equal to the reference's on real videos. Known differences: the reference reads
an encoded mp4 (compression artefacts) where this reads decoded frames; it ran flash-attention 2 in bfloat16.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .hub import TINY, ModelReward, resolve_folder, seeded
from .registry import register_reward

PROMPT_TEMPLATE = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, "
    "Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three "
    "categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the "
    "others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
    "sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a "
    "sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, "
    "unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, "
    "or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing "
    "should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, "
    "mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different "
    "motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend "
    "naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas "
    "where the video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion "
    "quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions "
    "like talking or blinking) align with the described prompt. The motion should match the prompt in terms "
    "of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes "
    "checking if real-world locations or scenes are accurately represented, though some stylistic adaptation "
    "is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how "
    "well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus "
    "shifts) are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)
"""The released model's user prompt (prompt_template.py, "detailed_special"), verbatim; {text_prompt} is the prompt."""

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA")
HEADS = ("overall", "vq", "mq", "ta")
RELEASE_NORMALIZATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
"""inference_config of KwaiVGI/VideoReward's model_config.json: (mean, std) per dimension."""
RELEASE_DATA = {"fps": 2.0, "num_frames": None, "max_frame_pixels": 200704}
"""data_config of the release: frames sampled at 2 fps, at most 200704 pixels each."""
DEFAULT_BASE = "Qwen/Qwen2-VL-2B-Instruct"
SIZE_FACTOR = 28  # patch 14 x spatial merge 2
FRAME_FACTOR = 2  # temporal patch
VIDEO_MIN_PIXELS = 128 * 28 * 28
MIN_FRAMES, MAX_FRAMES = 4, 768


def build_prompt(prompt: str) -> str:
    """The text of the user turn for `prompt`."""
    return PROMPT_TEMPLATE.format(text_prompt=prompt)


# ---- frames (qwen-vl-utils' rules, as VideoAlign's vision_process.py) ----------------------------------------
def _round_to(value: float, factor: int) -> int:
    return round(value / factor) * factor


def frame_count(total: int, source_fps: float, fps: float | None, num_frames: int | None) -> int:
    """How many frames the model sees of a `total`-frame clip: `num_frames` rounded to even, or `fps` frames a
    second of a clip at `source_fps`, clamped to [4, min(768, total)]; never more than `total`."""
    if num_frames is not None:
        count = _round_to(num_frames, FRAME_FACTOR)
    else:
        low = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        count = _round_to(min(max(total / source_fps * fps, low), high), FRAME_FACTOR)
    count = min(count, total)
    if count < FRAME_FACTOR:
        raise ValueError(f"reward 'videoalign' needs at least {FRAME_FACTOR} frames to sample, got {count} of {total}")
    return count


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frames spread evenly over the clip, first and last included."""
    return torch.linspace(0, total - 1, count).round().long().tolist()


def frame_size(height: int, width: int, max_pixels: int, min_pixels: int = VIDEO_MIN_PIXELS) -> tuple[int, int]:
    """(height, width) in multiples of 28 near the aspect ratio, with min_pixels <= h * w <= max_pixels."""
    factor = SIZE_FACTOR
    h, w = max(factor, _round_to(height, factor)), max(factor, _round_to(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def prepare_frames(video: Tensor, *, source_fps: float, fps: float | None, num_frames: int | None,
                   max_pixels: int) -> Tensor:
    """One clip [F, 3, H, W] in [0, 1] -> the frames the model sees [T, 3, h, w], float on the 0-255 scale."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    total, _, height, width = video.shape
    picked = video[frame_indices(total, frame_count(total, source_fps, fps, num_frames))]  # [T, 3, H, W]
    eight_bit = (picked.float() * 255).round().clamp(0, 255).to(torch.uint8)  # what a video file holds
    size = list(frame_size(height, width, max_pixels))
    return TF.resize(eight_bit, size, interpolation=InterpolationMode.BICUBIC, antialias=True).float()


# ---- the network ------------------------------------------------------------------------------------------
class VideoRewardNet(nn.Module):
    """Qwen2-VL (vision tower + language model, no LM head) and the reward head read at the three reward tokens."""

    def __init__(self, config, reward_token_ids: list[int]):
        from transformers import Qwen2VLModel

        super().__init__()
        self.vlm = Qwen2VLModel(config)
        self.rm_head = nn.Linear(config.text_config.hidden_size, 1, bias=False)
        self.reward_token_ids = list(reward_token_ids)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """Processor outputs -> raw (VQ, MQ, TA) [B, 3]."""
        hidden = self.vlm(**inputs, use_cache=False).last_hidden_state  # [B, L, D]
        positions = reward_token_positions(inputs["input_ids"], self.reward_token_ids)  # [B, 3]
        states = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, 3, D]
        return self.rm_head(states).squeeze(-1)  # [B, 3]


def reward_token_positions(input_ids: Tensor, token_ids: list[int]) -> Tensor:
    """Where each reward token sits in each row: [B, L] -> [B, len(token_ids)]; each must occur exactly once."""
    hits = torch.stack([input_ids == t for t in token_ids], dim=1)  # [B, 3, L]
    counts = hits.sum(-1)  # [B, 3]
    if not (counts == 1).all():
        raise ValueError(f"reward 'videoalign': every prompt must hold each reward token once, counts {counts.tolist()}")
    return hits.int().argmax(-1)  # [B, 3]


# ---- the released checkpoint ---------------------------------------------------------------------------------
_PREFIXES = (  # reference layout (transformers 4.45, or a later re-save) -> VideoRewardNet
    ("model.visual.", "vlm.visual."),
    ("model.language_model.", "vlm.language_model."),
    ("visual.", "vlm.visual."),
    ("model.", "vlm.language_model."),
    ("rm_head.", "rm_head."),
)


def _rename(key: str) -> str | None:
    """A checkpoint key as VideoRewardNet names it; None for what scoring does not use (the LM head)."""
    key = key.removeprefix("base_model.model.")  # the PEFT wrapper
    if key.startswith("lm_head.") or ".original_module." in key or key.endswith(".inv_freq"):
        return None  # rotary frequencies are recomputed at construction
    key = key.replace(".modules_to_save.default.", ".")
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown: strict loading names it


def convert_checkpoint(state: dict[str, Tensor], lora_scale: float, dtype: torch.dtype) -> dict[str, Tensor]:
    """The reference's model.pth (a PEFT model's state dict) -> VideoRewardNet's, each LoRA merged into its layer:
    W + lora_scale * B @ A (computed in float32, stored in `dtype`)."""
    renamed = {new: value for key, value in state.items() if (new := _rename(key)) is not None}
    merged = {}
    for key, value in renamed.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            module, param = key.split(".base_layer.")
            if param == "weight":
                down, up = renamed[f"{module}.lora_A.default.weight"], renamed[f"{module}.lora_B.default.weight"]
                value = value.float() + lora_scale * (up.float() @ down.float())  # [out, in]
            key = f"{module}.{param}"
        merged[key] = value.to(dtype)
    return merged


def latest_checkpoint(folder: Path) -> Path | None:
    """checkpoint-<step>/model.pth with the highest step (the reference's default), or None."""
    found = sorted(glob.glob(str(folder / "checkpoint-*" / "model.pth")),
                   key=lambda p: int(Path(p).parent.name.split("-")[-1]))
    return Path(found[-1]) if found else None


def lora_scale(peft_config: dict) -> float:
    """PEFT's LoRA scaling of the release's peft_lora_config: alpha / r (alpha / sqrt(r) with rslora); 0 without LoRA."""
    if not peft_config.get("lora_enable", False):
        return 0.0
    rank = peft_config["lora_r"]
    return peft_config["lora_alpha"] / (math.sqrt(rank) if peft_config.get("use_rslora") else rank)


def check_release_layout(settings: dict, path: Path) -> None:
    """The fields this implementation follows; anything else is a different model."""
    data, model = settings.get("data_config", {}), settings.get("model_config", {})
    expected = {("data_config", "prompt_template_type"): "detailed_special", ("data_config", "sample_type"): "uniform",
                ("data_config", "eval_dim"): list(DIMENSIONS), ("model_config", "reward_token"): "special",
                ("model_config", "output_dim"): 1, ("model_config", "use_special_tokens"): True}
    for (section, field), value in expected.items():
        got = (data if section == "data_config" else model).get(field)
        if got != value:
            raise ValueError(f"reward 'videoalign': {path} has {section}.{field} = {got!r}; this reward implements "
                             f"the released VideoReward ({value!r})")


# ---- tiny random model (tests) ------------------------------------------------------------------------------
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
    "'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat layout for text and video turns (system prompt, <|im_start|> turns, the video placeholder)."""
QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_base_processor():
    """A Qwen2VLProcessor for tiny models: the shipped tiny CLIP BPE plus Qwen2-VL's special tokens and chat
    layout (no tiny Qwen2 tokenizer is shipped), with Qwen2-VL's default image and video processors."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from diffrl.pipelines.tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    tokenizer.model_max_length = 1 << 16  # the prompt alone is ~700 tokens here
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=TINY_CHAT_TEMPLATE)


def tiny_config(tokenizer):
    """Qwen2-VL at width 32, one layer each (Qwen2-VL-2B's patch 14, merge 2, temporal patch 2; M-RoPE sections
    [2, 3, 3] for 16-dim heads, as [16, 24, 24] for 128)."""
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def add_reward_tokens(tokenizer) -> list[int]:
    """The reference's three special tokens, appended to the vocabulary; their ids (VQ, MQ, TA)."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    return tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))


def release_settings() -> dict:
    """model_config.json of the release, as far as scoring reads it (model="tiny" scores with these)."""
    return {"data_config": {**RELEASE_DATA, "eval_dim": list(DIMENSIONS), "prompt_template_type": "detailed_special",
                            "sample_type": "uniform"},
            "model_config": {"model_name_or_path": DEFAULT_BASE, "output_dim": 1, "use_special_tokens": True,
                             "reward_token": "special"},
            "inference_config": {f"{d}_{stat}": v for d, pair in RELEASE_NORMALIZATION.items()
                                 for stat, v in zip(("mean", "std"), pair)}}


# ---- the reward ------------------------------------------------------------------------------------------------
@register_reward("videoalign")
class VideoAlign(ModelReward):
    """VideoReward's Overall (VQ + MQ + TA), or one of its heads, normalised as the release (see module docstring)."""

    accepts = ("video",)
    default_model = "KwaiVGI/VideoReward"

    def __init__(self, model: str | None = None, *, head: str = "overall", base: str | None = None,
                 checkpoint: str | None = None, source_fps: float = 16.0, fps: float | None = None,
                 num_frames: int | None = None, max_frame_pixels: int | None = None, normalize: bool = True,
                 dtype: str = "float32", device: str | None = None):
        """model: the VideoReward folder (model_config.json, checkpoint-*/model.pth), a cached hub id, or "tiny";
        head: "overall", "vq", "mq" or "ta"; base: the Qwen2-VL folder or cached hub id for the config, tokenizer and
        processor (default: model_config.json's model_name_or_path); checkpoint: a model.pth path (default: the
        highest checkpoint-<step>); source_fps: the clips' frame rate; fps / num_frames / max_frame_pixels: override
        the release's frame sampling (default: model_config.json's data_config); normalize: apply inference_config."""
        super().__init__(model, dtype=dtype, device=device)
        if head not in HEADS:
            raise ValueError(f"reward 'videoalign': head must be one of {list(HEADS)}, got {head!r}")
        if fps is not None and num_frames is not None:
            raise ValueError("reward 'videoalign': give fps or num_frames, not both")
        if source_fps <= 0:
            raise ValueError(f"reward 'videoalign': source_fps must be > 0, got {source_fps}")
        self.head, self.base_spec, self.checkpoint_spec = head, base, checkpoint
        self.source_fps, self.normalize = source_fps, normalize
        self.overrides = {"fps": fps, "num_frames": num_frames, "max_frame_pixels": max_frame_pixels}

    def describe(self) -> str:
        return f"videoalign({self.head})"

    # ---- loading ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self.model == TINY:
            settings = release_settings()
            self.processor = tiny_base_processor()
            token_ids = add_reward_tokens(self.processor.tokenizer)
            config = tiny_config(self.processor.tokenizer)
            self.net = seeded(0, lambda: VideoRewardNet(config, token_ids))
        else:
            settings = self._load_release()
        self._read_settings(settings)
        self.net.to(self.dtype)
        self.processor.tokenizer.padding_side = "right"  # as the reference; positions are found per row anyway

    def _load_release(self) -> dict:
        from accelerate import init_empty_weights
        from transformers import AutoProcessor, Qwen2VLConfig

        name = self._name()
        folder = resolve_folder(self.model, reward=name, what="VideoReward model", needs=("model_config.json",))
        settings = json.loads((folder / "model_config.json").read_text())
        check_release_layout(settings, folder / "model_config.json")
        checkpoint = self._checkpoint_file(folder)
        base_spec = self.base_spec or settings["model_config"].get("model_name_or_path") or DEFAULT_BASE
        base = resolve_folder(base_spec, reward=name, what="Qwen2-VL base (config, tokenizer, processor)",
                              needs=("config.json",), fix_arg="base")
        self.processor = AutoProcessor.from_pretrained(base, local_files_only=True)
        token_ids = add_reward_tokens(self.processor.tokenizer)
        state = convert_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True),
                                   lora_scale(settings.get("peft_lora_config", {})), self.dtype)
        config = Qwen2VLConfig.from_pretrained(base, local_files_only=True)
        rows = state["vlm.language_model.embed_tokens.weight"].shape[0]
        if rows != len(self.processor.tokenizer):
            raise ValueError(f"reward 'videoalign': {checkpoint} has {rows} token embeddings but base {base} has "
                             f"{len(self.processor.tokenizer)} tokens with the three reward tokens; pass the base the "
                             f"checkpoint was trained from (base={DEFAULT_BASE!r})")
        config.text_config.vocab_size = rows
        with init_empty_weights():  # parameters come from the checkpoint: skip a 2B-parameter random init
            self.net = VideoRewardNet(config, token_ids)
        try:
            self.net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"reward 'videoalign': {checkpoint} does not hold VideoReward's layout over base {base}: "
                             f"{err}") from err
        return settings

    def _checkpoint_file(self, folder: Path) -> Path:
        if self.checkpoint_spec is not None:
            path = Path(os.path.expanduser(self.checkpoint_spec))
            path = path if path.is_absolute() else folder / path
            if not path.is_file():
                raise FileNotFoundError(f"reward 'videoalign': checkpoint {str(path)!r} does not exist. Pass the "
                                        f"model.pth of a VideoReward checkpoint (checkpoint=...).")
            return path
        found = latest_checkpoint(folder)
        if found is None:
            raise FileNotFoundError(f"reward 'videoalign': VideoReward folder {folder} has no checkpoint-<step>/model.pth "
                                    f"(an incomplete download?). Fix: `hf download {self.default_model}` on a machine "
                                    f"with network and copy the cache here, or pass checkpoint=/path/to/model.pth.")
        return found

    def _read_settings(self, settings: dict) -> None:
        data = settings.get("data_config", {})
        sampling = {key: data.get(key) for key in RELEASE_DATA}
        chosen = {key: value for key, value in self.overrides.items() if value is not None}
        if "num_frames" in chosen:
            sampling["fps"] = None  # the two are exclusive: an explicit count replaces the rate
        if "fps" in chosen:
            sampling["num_frames"] = None
        self.sampling = {**sampling, **chosen}
        inference = settings.get("inference_config")
        # (mean, std) per dimension, [2, 3]; None: the release without inference_config is used raw, as the reference
        self.normalization = None if inference is None else torch.tensor(
            [[inference[f"{d}_mean"] for d in DIMENSIONS], [inference[f"{d}_std"] for d in DIMENSIONS]])

    def _modules(self) -> list[nn.Module]:
        return [self.net]

    # ---- scoring ----------------------------------------------------------------------------------------------
    def model_inputs(self, samples: Tensor, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        """The processor's tensors for a batch of clips and prompts, on `device`."""
        videos = [prepare_frames(video, source_fps=self.source_fps, fps=self.sampling["fps"],
                                 num_frames=self.sampling["num_frames"], max_pixels=self.sampling["max_frame_pixels"])
                  for video in samples.detach().cpu()]
        chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(p)}]}]
                 for p in prompts]
        texts = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        options = {"do_sample_frames": False}  # frames are already sampled and sized: the processor only patchifies
        if hasattr(self.processor.video_processor, "cap_pixels_per_frame"):
            options["cap_pixels_per_frame"] = False
        inputs = self.processor(text=texts, videos=videos, padding=True, return_tensors="pt", **options)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        return inputs

    def head_scores(self, samples: Tensor, prompts: list[str], normalize: bool | None = None) -> Tensor:
        """(VQ, MQ, TA) per clip [B, 3], normalised unless normalize=False (default: the reward's setting)."""
        device = self._ready(samples)
        with torch.no_grad():
            raw = self.net(self.model_inputs(samples, prompts, device)).float()  # [B, 3]
        normalize = self.normalize if normalize is None else normalize
        if not normalize or self.normalization is None:
            return raw
        mean, std = self.normalization.to(device)
        return (raw - mean) / std

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        heads = self.head_scores(samples, prompts)  # [B, 3]
        return heads.sum(dim=1) if self.head == "overall" else heads[:, HEADS.index(self.head) - 1]  # [B]
