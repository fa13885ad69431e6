"""A causal language model as an RL policy: sampling with `model.generate` and per-token log-probs.

The interface the LM trainer sees: `generate` (prompts -> a padded `Rollout`), `token_log_probs` of
the sampled completion tokens under the current weights or the frozen reference, LoRA through peft,
and the trainable parameters. Conventions, all pinned by tests/test_lm_policy.py:

* Prompts are left-padded (decoder-only batch generation); a sequence is `[prompt | completion]`
  with the prompt block P and the completion block T wide. Position ids count real tokens only
  (`cumsum(attention_mask) - 1`), as `generate` does, so a padded row scores exactly like the same
  row alone.
* The completion mask is 1 up to and including the first end-of-sequence token; a completion that
  never ends keeps all T tokens (truncated at max_new_tokens).
* Log-probs are of the sampling distribution softmax(logits / temperature) (TRL, verl); top-k /
  top-p truncation is not part of them (the usual practice: it would make most log-probs -inf).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from diffrl.runtime import to_device

__all__ = ["BUILTIN_LMS", "LMPolicy", "Rollout", "SamplingSettings", "builtin_lm_path", "resolve_lm_path"]

BUILTIN_LMS = {"toy-arith": "toy_arith"}
"""Built-in model names -> folders under assets/lm/ (written by `diffrl pretrain-toy-lm`)."""


def builtin_lm_path(name: str) -> Path:
    return Path(str(importlib.resources.files("diffrl.assets") / "lm" / BUILTIN_LMS[name]))


def resolve_lm_path(model: str) -> str:
    """A built-in name ("toy-arith"), a local transformers folder, or a hub id (returned unchanged)."""
    if model in BUILTIN_LMS:
        path = builtin_lm_path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"built-in LM {model!r} not found at {path}: run `diffrl pretrain-toy-lm` "
                                    "or reinstall diffrl (assets/lm/** ships as package data)")
        return str(path)
    return model


@dataclass
class SamplingSettings:
    """Rollout sampling; `do_sample=False` is greedy decoding (evaluation)."""

    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True

    def generation_config(self, tokenizer):
        from transformers import GenerationConfig

        kw = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if self.do_sample else {}
        # every field explicit: the model's own generation_config.json (e.g. top_k 50) must not leak in
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **kw,
        )


@dataclass
class Rollout:
    """Sampled completions of B prompts: token blocks, masks and decoded text."""

    prompt_ids: Tensor  # [B, P] left-padded
    prompt_mask: Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: Tensor  # [B, T] pad after the end-of-sequence token
    completion_mask: Tensor  # [B, T] 1 up to and including the first eos
    completions: list[str]
    prompts: list[str] = field(default_factory=list)
    lengths: tuple[list[int], list[int]] | None = field(default=None, repr=False, compare=False)
    """Per row, the real prompt and completion token counts on the host; read from the masks on first use."""

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # [B, P + T]

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # [B, P + T]

    def host_lengths(self) -> tuple[list[int], list[int]]:
        """(prompt, completion) real token counts per row, read from the device once per rollout and kept: slicing
        micro-batches and weighing their losses then never waits for the device."""
        if self.lengths is None:
            counts = torch.stack([self.prompt_mask.sum(1), self.completion_mask.sum(1)]).tolist()  # [2, B]: one read
            self.lengths = (counts[0], counts[1])
        return self.lengths

    def index(self, rows: Tensor | list[int]) -> "Rollout":
        """The rows `rows` ([b] long, or a list), with the blocks trimmed to their widest real content."""
        idx = rows if isinstance(rows, list) else rows.tolist()
        prompt_len, completion_len = self.host_lengths()
        sub = ([prompt_len[i] for i in idx], [completion_len[i] for i in idx])
        p_keep = max(max(sub[0], default=0), 1)  # left padding: keep the last p_keep columns
        t_keep = max(max(sub[1], default=0), 1)  # right padding: keep the first t_keep columns
        rows = to_device(torch.tensor(idx, dtype=torch.long), self.completion_ids.device)  # [b]
        pm, cm = self.prompt_mask[rows], self.completion_mask[rows]  # [b, P], [b, T]
        return Rollout(
            prompt_ids=self.prompt_ids[rows][:, -p_keep:], prompt_mask=pm[:, -p_keep:],
            completion_ids=self.completion_ids[rows][:, :t_keep], completion_mask=cm[:, :t_keep],
            completions=[self.completions[i] for i in idx], prompts=[self.prompts[i] for i in idx] if self.prompts else [],
            lengths=sub,
        )

    @staticmethod
    def cat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Concatenate rollouts, left-padding prompt blocks and right-padding completion blocks to a common width."""
        P = max(r.prompt_ids.shape[1] for r in parts)
        T = max(r.completion_ids.shape[1] for r in parts)

        def left(x, width, value):
            return nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x, width, value):
            return nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return Rollout(
            prompt_ids=torch.cat([left(r.prompt_ids, P, pad_token_id) for r in parts]),
            prompt_mask=torch.cat([left(r.prompt_mask, P, 0) for r in parts]),
            completion_ids=torch.cat([right(r.completion_ids, T, pad_token_id) for r in parts]),
            completion_mask=torch.cat([right(r.completion_mask, T, 0) for r in parts]),
            completions=[c for r in parts for c in r.completions],
            prompts=[p for r in parts for p in r.prompts],
            lengths=None if any(r.lengths is None for r in parts) else
            ([n for r in parts for n in r.lengths[0]], [n for r in parts for n in r.lengths[1]]),
        )


def completion_mask(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """1 up to and including the first eos of each row, 0 after it. [B, T] -> [B, T] long"""
    is_eos = completion_ids == eos_token_id  # [B, T]
    # eos tokens strictly before position t: the row has ended before t
    ended_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # [B, T]
    return (~ended_before).long()


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counting real tokens only, as `generate` computes them for left-padded rows. [B, L] -> [B, L]"""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class LMPolicy:
    """A transformers causal LM and its tokenizer, trained with LoRA (peft) or fully.

    The reference policy is the same network with the LoRA adapter disabled (no second copy in
    memory) or, for a full fine-tune, a frozen copy made by `keep_reference_copy()`.
    """

    full_model_folder = "model"
    """Where a checkpoint of a full fine-tune puts the transformers model folder."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad and an eos token for batched sampling")
        tokenizer.padding_side = "left"
        self.model = model  # may become a DDP wrapper after accelerator.prepare
        self.tokenizer = tokenizer
        self.reference_model: nn.Module | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, torch_dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "LMPolicy":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_lm_path(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except OSError as exc:
            raise FileNotFoundError(f"cannot load causal LM {name_or_path!r} (looked in {path} and the Hugging Face "
                                    f"cache; offline runs need a local folder): {exc}") from None
        model.to(device).eval()
        model.requires_grad_(False)
        return cls(model, tokenizer)

    # ---- parameters -----------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        """The model with any DDP wrapper removed."""
        net = self.model
        while isinstance(getattr(net, "module", None), nn.Module):
            net = net.module
        return net

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.unwrapped, PeftModel)

    def add_lora(self, rank: int, alpha: float, targets: list[str] | None = None) -> None:
        """Wrap the model in a peft LoRA adapter ("default") on `targets` (None: every linear layer but the head)."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or "all-linear", lora_dropout=0.0,
                            bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(self.unwrapped, config)

    def train_full(self) -> None:
        """Full fine-tune: every weight trainable."""
        self.unwrapped.requires_grad_(True)

    def keep_reference_copy(self) -> None:
        """A frozen copy of the current weights as the reference (full fine-tunes with a KL term)."""
        self.reference_model = copy.deepcopy(self.unwrapped).eval().requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unwrapped.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Yields the module that computes reference log-probs: the LoRA model with its adapter
        disabled, or the frozen copy."""
        if self.has_lora:
            with self.unwrapped.disable_adapter():
                yield self.unwrapped
        elif self.reference_model is not None:
            yield self.reference_model
        else:
            raise RuntimeError("no reference policy: add LoRA (its adapter is disabled for the reference) or call "
                               "keep_reference_copy() for a full fine-tune")

    # ---- the policy interface diffrl.checkpoint uses -----------------------------------------------
    def trainable_module(self) -> nn.Module:
        """The network whose trainable tensors checkpoints save (as `Policy.trainable_module` of the diffusion policies)."""
        return self.unwrapped

    def save_lora(self, directory: str | Path) -> None:
        """A peft adapter folder: `PeftModel.from_pretrained(base_model, directory)` loads it."""
        if not self.has_lora:
            raise RuntimeError("save_lora() needs a LoRA adapter; call add_lora() first")
        self.unwrapped.save_pretrained(str(directory), safe_serialization=True)

    @property
    def device(self) -> torch.device:
        return next(self.unwrapped.parameters()).device

    # ---- sampling -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, [B, P] each."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], settings: SamplingSettings, seed: int | None = None) -> Rollout:
        """Sample (or greedily decode) one completion per prompt with `model.generate`.

        With a seed, the draw uses a forked global RNG seeded from it, so the surrounding RNG state
        is untouched (exact resume) and the same seed gives the same completions.
        """
        prompt_ids, prompt_mask = self.encode_prompts(prompts)  # [B, P]
        model = self.unwrapped
        was_training = model.training
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 generation_config=settings.generation_config(self.tokenizer))
        model.train(was_training)
        completion_ids = out[:, prompt_ids.shape[1] :]  # [B, T]
        if completion_ids.shape[1] == 0:  # max_new_tokens reached nothing; keep one pad column
            completion_ids = torch.full((len(prompts), 1), self.tokenizer.pad_token_id, device=out.device)
        mask = completion_mask(completion_ids, self.tokenizer.eos_token_id)  # [B, T]
        texts = self.tokenizer.batch_decode(completion_ids * mask + self.tokenizer.pad_token_id * (1 - mask),
                                            skip_special_tokens=True)
        return Rollout(prompt_ids, prompt_mask, completion_ids, mask, texts, list(prompts))

    # ---- scoring --------------------------------------------------------------------------------
    def token_log_probs(self, rollout: Rollout, *, temperature: float = 1.0, reference: bool = False,
                        with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """log softmax(logits / temperature) of each completion token given everything before it, [B, T]
        (float32, or float64 for a float64 model; padding positions hold finite values and must be masked by the caller). Runs through
        the (possibly DDP-wrapped) training model, or the reference; no_grad is the caller's business."""
        input_ids = rollout.input_ids  # [B, P + T]
        attention_mask = rollout.attention_mask  # [B, P + T]
        T = rollout.completion_ids.shape[1]
        ctx = self.reference() if reference else contextlib.nullcontext(self.model)
        with ctx as model:
            # logits at positions P - 1 .. P + T - 2 predict the T completion tokens
            logits = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False,
                           logits_to_keep=T + 1).logits[:, :-1]  # [B, T, V]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # >= float32
        logp_all = torch.log_softmax(logits, dim=-1)  # [B, T, V]
        logp = logp_all.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
        if not with_entropy:
            return logp
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, T]
        return logp, entropy.detach()
