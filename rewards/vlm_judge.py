"""VLM-as-judge reward: a vision-language model answers a templated question about each image; the
number (or yes / no) in its reply, mapped to [0, 1], is the score.

    reward = build_reward("vlm_judge", model="Qwen/Qwen2.5-VL-7B-Instruct")   # transformers, in-process
    reward = build_reward("vlm_judge", backend="openai", base_url="http://127.0.0.1:8001/v1",
                          model="Qwen2.5-VL-7B-Instruct")                     # vLLM / SGLang / ... on loopback
    reward = build_reward("vlm_judge", model="tiny")                          # random tiny LLaVA (tests)
    reward = build_reward("vlm_judge", answer="yes_no",
                          template='Does this image show "{prompt}"? Answer yes or no.')

The template is filled with str.format(prompt=...) (and any metadata keys). Replies are parsed by
`parse_score` / `parse_yes_no`; a reply they cannot read scores NaN, which the training loop masks
and counts (nonfinite_rewards), never a crash. Decoding is greedy (temperature 0). A server that
cannot be reached or answers with an HTTP error raises, naming the URL: that is not a bad reply.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .hub import TINY, ModelReward, dtype_kwarg, resolve_folder, seeded
from .imaging import to_pil
from .registry import register_reward

DEFAULT_TEMPLATE = (
    'This image was generated for the prompt: "{prompt}". On a scale from 0 to 10, how well does the image '
    "match the prompt? Reply with a single number."
)
ANSWERS = ("score", "yes_no")
BACKENDS = ("transformers", "openai")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

_NUMBER = r"[-+]?\d+(?:\.\d+)?"


def parse_score(reply: str, low: float = 0.0, high: float = 10.0) -> float:
    """The score in a judge's free-text reply, mapped linearly from [low, high] to [0, 1]; NaN if
    there is none or it is ambiguous. Read in order: "N/high" or "N out of high"; "score: N" /
    "rating: N"; else the reply's only distinct number. A number outside [low, high] is NaN."""
    if not isinstance(reply, str):
        return math.nan
    text = reply.replace("*", "").strip().lower()
    top = f"{high:g}"
    patterns = [rf"({_NUMBER})\s*(?:/|out of)\s*{re.escape(top)}(?:\.0+)?\b",
                rf"(?:score|rating|grade)\s*(?:is|of|:|=)?\s*({_NUMBER})"]
    value = None
    for pattern in patterns:
        found = {float(m) for m in re.findall(pattern, text)}
        if len(found) == 1:
            value = found.pop()
            break
        if len(found) > 1:
            return math.nan  # "7/10 ... 3/10": two verdicts
    if value is None:
        numbers = {float(m) for m in re.findall(_NUMBER, text)}
        if len(numbers) != 1:
            return math.nan
        value = numbers.pop()
    if not low <= value <= high:
        return math.nan
    return (value - low) / (high - low)


def parse_yes_no(reply: str) -> float:
    """1.0 for a yes, 0.0 for a no, NaN when the reply has both words, neither, or is not a string
    (only the first word counts when it is one of them: "No, yes-men aside ..." is a no)."""
    if not isinstance(reply, str):
        return math.nan
    words = re.findall(r"[a-z]+", reply.lower())
    if words and words[0] in ("yes", "no"):
        return 1.0 if words[0] == "yes" else 0.0
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes == has_no:
        return math.nan
    return 1.0 if has_yes else 0.0


def png_data_url(image) -> str:
    """A PIL image as a data:image/png;base64 URL (lossless: the judge sees the exact pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_llava():
    """A random tiny LLaVA (CLIP vision 224 px / patch 32, a one-layer Llama) with a processor built
    from the shipped tiny CLIP tokenizer plus an <image> token and a minimal chat template."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from diffrl.pipelines.tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.model_max_length = 512  # room for the 49 image tokens and the question
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer,
                               chat_template=TINY_CHAT_TEMPLATE, patch_size=32,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=image_token, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = seeded(0, lambda: LlavaForConditionalGeneration(config))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


@register_reward("vlm_judge")
class VLMJudge(ModelReward):
    """The score a vision-language model gives each image for a templated question, in [0, 1]."""

    default_model = "Qwen/Qwen2.5-VL-7B-Instruct"

    def __init__(self, model: str | None = None, *, backend: str = "transformers", template: str = DEFAULT_TEMPLATE,
                 answer: str = "score", score_range: tuple[float, float] = (0.0, 10.0), max_new_tokens: int = 16,
                 base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None, timeout: float = 120.0,
                 concurrency: int = 8, allow_remote: bool = False, dtype: str = "float32", device: str | None = None):
        """backend: "transformers" (model: folder, cached hub id or "tiny") or "openai" (model: the
        served model name, at base_url); template: the question, with {prompt}; answer: "score" (a
        number in score_range) or "yes_no"; api_key: for the openai backend (default: the
        OPENAI_API_KEY environment variable, if set); concurrency: parallel requests (openai);
        allow_remote: let base_url leave this machine (off: loopback only, images stay local)."""
        super().__init__(model, dtype=dtype, device=device)
        if backend not in BACKENDS:
            raise ValueError(f"reward 'vlm_judge': backend must be one of {list(BACKENDS)}, got {backend!r}")
        if answer not in ANSWERS:
            raise ValueError(f"reward 'vlm_judge': answer must be one of {list(ANSWERS)}, got {answer!r}")
        low, high = (float(v) for v in score_range)
        if not low < high:
            raise ValueError(f"reward 'vlm_judge': score_range must be (low, high) with low < high, got {score_range}")
        if backend == "openai":
            host = urllib.parse.urlparse(base_url).hostname
            if host not in LOOPBACK and not allow_remote:
                raise ValueError(f"reward 'vlm_judge': base_url {base_url!r} is not on loopback ({', '.join(sorted(LOOPBACK))}); "
                                 "images would leave this machine. Pass allow_remote=True if that is intended.")
        self.backend, self.template, self.answer = backend, template, answer
        self.score_range = (low, high)
        self.max_new_tokens, self.timeout, self.concurrency = max_new_tokens, timeout, concurrency
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    # ---- loading -----------------------------------------------------------------------------
    def _load(self) -> None:
        if self.backend == "openai":
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.model == TINY:
            self.vlm, self.processor = tiny_llava()
        else:
            folder = resolve_folder(self.model, reward=self._name(), what="vision-language model",
                                    needs=("config.json",))
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.vlm = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True,
                                                                   **dtype_kwarg(self.dtype))
        self.vlm.to(self.dtype)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end

    def _modules(self) -> list[torch.nn.Module]:
        return [self.vlm] if self.backend == "transformers" else []

    # ---- scoring -----------------------------------------------------------------------------
    def question(self, prompt: str, metadata: dict | None) -> str:
        return self.template.format(**{**(metadata or {}), "prompt": prompt})

    def parse(self, reply: str) -> float:
        if self.answer == "yes_no":
            return parse_yes_no(reply)
        return parse_score(reply, *self.score_range)

    def replies(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> list[str]:
        """The judge's raw reply for each image."""
        images = to_pil(samples)
        questions = [self.question(p, m) for p, m in zip(prompts, metadata or [None] * len(prompts))]
        if self.backend == "openai":
            with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
                return list(pool.map(self._ask_server, images, questions))
        device = self._ready(samples)
        messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]}]
                    for image, q in zip(images, questions)]
        options = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        if "processor_kwargs" in inspect.signature(self.processor.apply_chat_template).parameters:
            options["processor_kwargs"] = {"padding": True}  # transformers >= 5
        else:
            options["padding"] = True
        inputs = self.processor.apply_chat_template(messages, **options).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.vlm.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)  # [B, T + new]
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def _ask_server(self, image, question: str) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_new_tokens, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                                         {"type": "text", "text": question}]}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"reward 'vlm_judge': {url} answered HTTP {err.code}: {err.read()[:500]!r}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise ConnectionError(f"reward 'vlm_judge': cannot reach the OpenAI-compatible server at {url} "
                                  f"({getattr(err, 'reason', err)}); is it running?") from err
        except json.JSONDecodeError:
            return ""  # not a chat completion: scored as missing
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return ""
        return content if isinstance(content, str) else ""

    def score(self, samples: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return torch.tensor([self.parse(r) for r in self.replies(samples, prompts, metadata)], dtype=torch.float32)
