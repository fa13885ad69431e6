"""The config sections the training loop owns (policy, sampling, data, train, advantages, logging), their own
checks, and the run-wide checks that tie them to the model and the algorithm.

Every field is declared once with a one-line docstring (read back by `diffrl train --help`) that says what it
does and where its default comes from. Algorithms own their sections (`diffrl/trainers/<name>.py`), the language
models theirs (`diffrl/lm/config.py`); `diffrl.config` puts them together into one RunConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from diffrl.checks import ConfigError, RunContext, check_fields, fraction, non_negative, one_of, positive
from diffrl.core.advantages import STD_SCOPES
from diffrl.runtime import DTYPES
from diffrl.sampling.gaussian import REDUCTIONS
from diffrl.sampling.sampler import SAMPLERS

ADAPTERS = ("lora", "sara", "full")
"""What a run trains (PolicyConfig.adapter)."""
MIXED_PRECISION = ("no", "bf16", "fp16")
"""accelerate's mixed-precision modes."""
LR_SCHEDULES = ("constant", "linear", "cosine")
"""Learning-rate schedules (TrainConfig.learning_rate_at)."""
TRACKERS = ("tensorboard", "wandb", "none")
"""Experiment trackers through accelerate."""


DEFAULT_RESOLUTION = 512
"""Image size of a diffusers folder or hub model when the config sets none (Flow-GRPO's)."""


@dataclass
class PolicyConfig:
    family: Optional[str] = None
    """Model family ("sd", "sd3", "flux", "wan", "motion"); None detects it from the model folder's model_index.json."""
    resolution: Optional[int] = None
    """Image height and width in pixels; None: the model's own, 32 for the tiny models and the trained size of the shipped toy models, 512 for a diffusers folder or hub model (Flow-GRPO: 512)."""
    height: Optional[int] = None
    """Height in pixels when it differs from the width (e.g. Flow-GRPO's Wan2.1 clips: 240 x 416); None: resolution."""
    width: Optional[int] = None
    """Width in pixels when it differs from the height; None: resolution."""
    dtype: str = "float32"
    """Dtype of the frozen base weights: float32, bfloat16, float16 or float64 (LoRA weights stay float32, float64 in a float64 run)."""
    adapter: str = "lora"
    """What trains: "lora" (peft LoRA: lora_*), "sara" (SaRA, Hu et al. 2025: the entries with |P| < sara_threshold of every denoiser tensor, as sparse vectors: sara_*) or "full" (every weight; a reference or EMA snapshots are whole-weight copies); "lora" with lora_rank 0 is a full fine-tune too (docs/sara.md)."""
    lora_rank: int = 32
    """LoRA rank on the denoiser's attention projections; 0 trains the full denoiser (Flow-GRPO: 32)."""
    lora_alpha: float = 64.0
    """LoRA alpha (Flow-GRPO: 64)."""
    lora_targets: Optional[list[str]] = None
    """Module names LoRA attaches to; None uses the family's attention projections."""
    sara_threshold: float = 2e-3
    """SaRA: entries with |P| below it train, in every tensor of the denoiser (SaRA: 2e-3; its lr default 1e-3 exp(-350 threshold), 5e-4 at 2e-3)."""
    sara_lambda_rank: float = 5e-4
    """SaRA: weight of the nuclear-norm penalty lambda ||P * M||_* on one randomly drawn 2-D weight (min side > 64) per optimiser step; 0: none (SaRA: 5e-4)."""
    sara_remask_step: Optional[int] = None
    """SaRA: after this many optimiser steps the mask is recomputed once on the current weights and the optimiser state reset; None: never (SaRA's script: 2500)."""
    gradient_checkpointing: str = "none"
    """Recompute activations in backward, block by block: "none", "full" (keep each block's inputs: least memory, 10-25 % more time on an 18M-parameter UNet) or "selective" (keep attention and convolution outputs, recompute the rest); true / false mean full / none."""
    attention_backend: str = "sdpa"
    """"sdpa" (PyTorch scaled_dot_product_attention, its own kernel choice), "auto" (its kernels ordered for the GPU and dtype: cuDNN first on Hopper in bf16 / fp16, flash on other sm80+, memory-efficient otherwise; plain sdpa on the CPU), "xformers" (CUDA), or a diffusers dispatcher backend."""
    compile: bool = False
    """torch.compile the denoiser's repeated blocks (regional compilation) for rollouts and training: faster steps after a one-off compile (minutes on a big model); the state dict and saved LoRA keep their names."""
    compile_mode: str = "default"
    """With compile: "default", "reduce-overhead" (CUDA graphs on top: fixed-shape rollouts; CUDA only) or "max-autotune" (longer compile, autotuned kernels)."""
    lora_dtype: str = "float32"
    """What the LoRA adapters compute in: "float32", or "bfloat16" on a bfloat16 base (no float32 copy of each LoRA layer's input; the float32 LoRA parameters are the master copy the optimiser updates, and what checkpoints hold)."""
    merge_lora_for_rollout: bool = False
    """Merge the LoRA into the base weights for the no-grad rollouts and evaluation samples (one matmul per layer instead of three), the originals kept aside and restored exactly after; costs a copy of the LoRA-targeted weights meanwhile, and in a bf16 base the merged weights are rounded to bf16 (docs/performance.md)."""
    num_frames: Optional[int] = None
    """Video models: frames per clip, 4k + 1 for Wan (Flow-GRPO Wan2.1: 33); motion models: frames at 20 fps, at most the model's max_frames; None: the model's default (Wan 33, tiny-wan 9, toy-motion and tiny-motion 60)."""
    vae_slicing: bool = False
    """Video (Wan): decode one clip of a batch at a time (diffusers' vae.enable_slicing): the same clips, the decode's peak memory of one."""
    vae_tiling: bool = False
    """Video (Wan): decode overlapping spatial tiles, blended at the seams (diffusers' vae.enable_tiling): less decode memory at large sizes, approximate near the seams."""
    vae_tile_size: Optional[int] = None
    """With vae_tiling: tile side in pixels, a multiple of 8; None: diffusers' 256 (tiling engages only on larger frames)."""
    vae_tile_stride: Optional[int] = None
    """With vae_tiling: pixels from one tile to the next, a multiple of 8 and at most the side (the rest overlaps); None: diffusers' 192."""
    wan_experts: str = "high"
    """Wan2.2 A14B (two experts): which train, with the LoRA or fully: "high" (transformer, the high-noise expert), "low" (transformer_2) or "both"; the others stay frozen. Other models: high only."""

    def __post_init__(self):
        # recipes written when this was a bool: OmegaConf hands a str field the bool as "True" / "False"
        if str(self.gradient_checkpointing).lower() in ("true", "false"):
            self.gradient_checkpointing = "full" if str(self.gradient_checkpointing).lower() == "true" else "none"

    def check(self, key: str = "policy") -> None:
        from diffrl.pipelines.base import ATTENTION_BACKENDS
        from diffrl.pipelines.performance import CHECKPOINTING, COMPILE_MODES, LORA_DTYPES
        from diffrl.pipelines.wan import WAN_EXPERTS

        check_fields(self, key, {"dtype": tuple(DTYPES), "attention_backend": ATTENTION_BACKENDS, "resolution": positive,
                                 "height": positive, "width": positive, "lora_rank": non_negative, "lora_alpha": positive,
                                 "wan_experts": WAN_EXPERTS, "adapter": ADAPTERS, "sara_threshold": positive,
                                 "sara_lambda_rank": non_negative, "sara_remask_step": positive})
        one_of(self.gradient_checkpointing, CHECKPOINTING, f"{key}.gradient_checkpointing")
        one_of(self.compile_mode, COMPILE_MODES, f"{key}.compile_mode")
        one_of(self.lora_dtype, tuple(LORA_DTYPES), f"{key}.lora_dtype")
        if self.lora_dtype == "bfloat16" and (self.dtype != "bfloat16" or self.lora_rank == 0):
            raise ConfigError(f"'{key}.lora_dtype' bfloat16 computes the LoRA in the base model's bfloat16: it needs "
                              f"'{key}.dtype' bfloat16 (is {self.dtype}) and a LoRA ('{key}.lora_rank' > 0, is {self.lora_rank})")
        if self.merge_lora_for_rollout and self.resolved_adapter() != "lora":
            raise ConfigError(f"'{key}.merge_lora_for_rollout' merges a LoRA into the base weights; '{key}.adapter' is "
                              f"{self.resolved_adapter()}: train a LoRA or turn it off")
        if self.merge_lora_for_rollout and self.compile and self.compile_mode == "reduce-overhead":
            raise ConfigError(f"'{key}.merge_lora_for_rollout' with '{key}.compile_mode' reduce-overhead: CUDA graphs replay "
                              "the weights at the addresses they recorded, and the merge swaps in new tensors; use "
                              "compile_mode default or max-autotune, or turn the merge off")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"'{key}.compile_mode' is {self.compile_mode} but '{key}.compile' is false: turn compile on or remove it")
        if self.compile and self.compile_mode == "reduce-overhead":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"'{key}.compile_mode' reduce-overhead records CUDA graphs and this machine has no CUDA "
                                  "device: use default or max-autotune")
        for name in ("resolution", "height", "width"):
            if (getattr(self, name) or 16) % 16:
                raise ConfigError(f"'{key}.{name}' must be a multiple of 16 (VAE and patch size), got {getattr(self, name)}")
        if not self.vae_tiling and (self.vae_tile_size is not None or self.vae_tile_stride is not None):
            raise ConfigError(f"'{key}.vae_tile_size' / '{key}.vae_tile_stride' are set but '{key}.vae_tiling' is false: "
                              "turn tiling on or remove them")

    def resolved_adapter(self) -> str:
        """What trains: adapter, with "lora" at lora_rank 0 meaning "full" (configs written before policy.adapter)."""
        return "full" if self.adapter == "lora" and self.lora_rank == 0 else self.adapter

    def vae_chunking(self) -> dict:
        """The VAE options as load_policy takes them."""
        return {"vae_slicing": self.vae_slicing, "vae_tiling": self.vae_tiling, "vae_tile_size": self.vae_tile_size,
                "vae_tile_stride": self.vae_tile_stride}

    def size_kwargs(self, model: str) -> dict:
        """The pixel size as load_policy takes it ({} for a motion model: it has none, and refuses one); no size
        set leaves a tiny or shipped model at its own and gives any other model DEFAULT_RESOLUTION."""
        from diffrl.pipelines.registry import SHIPPED_MODELS, TINY_MODELS, policy_class, resolve_family

        if policy_class(resolve_family(model, self.family)).sample_kind == "motion":
            return {}
        resolution = self.resolution
        if resolution is None and self.height is None and self.width is None and model not in TINY_MODELS | set(SHIPPED_MODELS):
            resolution = DEFAULT_RESOLUTION
        return {"resolution": resolution, "height": self.height, "width": self.width}


@dataclass
class SamplingConfig:
    num_steps: int = 10
    """Denoising steps per training rollout (Flow-GRPO: 10)."""
    eval_num_steps: int = 40
    """Denoising steps for evaluation images (Flow-GRPO: 40)."""
    guidance_scale: Optional[float] = None
    """CFG scale of rollouts, training and evaluation (FLUX: embedded guidance); None: 3.5 on FLUX (FLUX.1-dev's embedded guidance), else the algorithm's: 4.5 for grpo, prdp, easytune and draft (Flow-GRPO SD3.5), 1.0 CFG-free for nft/crd (DiffusionNFT, CRD)."""
    sampler: Optional[str] = None
    """Rollout sampler: "flow_sde", "flow_ode" (Euler), "flow_dpm2" (DPM-Solver++(2M) ODE), "ddim" (eta below); None: flow_sde for grpo, flow_dpm2 for nft/crd (DiffusionNFT) and flow_ode for easytune/draft (deterministic chains) on flow models, ddim on UNets."""
    noise_level: float = 0.7
    """Flow SDE noise level a in std_t = a sqrt(sigma / (1 - sigma)) (Flow-GRPO: 0.7)."""
    sde_window_size: int = 0
    """Stochastic steps per rollout: 0 makes every step stochastic (Flow-GRPO); k > 0 draws noise on k
    consecutive steps only, the rest deterministic, and grpo trains on those k steps (MixGRPO,
    Flow-GRPO-Fast: 1-3 steps train faster and assign credit better)."""
    sde_window_range: Optional[list[int]] = None
    """[lo, hi): where the stochastic window lies; its start is drawn each iteration uniformly from
    lo..hi - sde_window_size (Flow-GRPO-Fast). None: [0, num_steps)."""
    eta: float = 1.0
    """DDIM eta for UNet rollouts; 1 is DDPM ancestral sampling (DDPO: 1.0), 0 the deterministic DDIM ODE (nft/crd take either)."""
    logprob_reduction: str = "mean"
    """How a step's Gaussian log-density is reduced over latent elements: "mean" (Flow-GRPO, DDPO) or "sum" (exact)."""
    negative_prompt: str = ""
    """Negative prompt for classifier-free guidance (Flow-GRPO: empty)."""
    guidance_scale_2: Optional[float] = None
    """Wan2.2 (two experts) only: the CFG scale of the low-noise expert's steps, as WanPipeline's guidance_scale_2; None: guidance_scale."""

    def check(self, key: str = "sampling") -> None:
        check_fields(self, key, {"num_steps": positive, "eval_num_steps": positive, "guidance_scale": non_negative,
                                 "guidance_scale_2": non_negative,
                                 "sampler": SAMPLERS, "noise_level": non_negative, "logprob_reduction": REDUCTIONS})
        fraction(self.eta, f"{key}.eta", allow_zero=True)
        if not 0 <= self.sde_window_size <= self.num_steps:
            raise ConfigError(f"'{key}.sde_window_size' must be in 0..{key}.num_steps ({self.num_steps}), got {self.sde_window_size}")
        if self.sde_window_range is not None:
            lo_hi = list(self.sde_window_range)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= self.num_steps:
                raise ConfigError(f"'{key}.sde_window_range' must be [lo, hi) with 0 <= lo < hi <= num_steps ({self.num_steps}), got {lo_hi}")
            if self.sde_window_size == 0:
                raise ConfigError(f"'{key}.sde_window_range' is set but '{key}.sde_window_size' is 0 (every step stochastic): set a window size")
            if lo_hi[1] - lo_hi[0] < self.sde_window_size:
                raise ConfigError(f"'{key}.sde_window_range' {lo_hi} is shorter than '{key}.sde_window_size' {self.sde_window_size}")


@dataclass
class DataConfig:
    prompts: str = "builtin:animals"
    """Training prompts: "builtin:<name>" (assets/prompts/<name>.txt), a .txt file (one a line) or a GenEval-style .jsonl."""
    eval_prompts: Optional[str] = None
    """Evaluation prompts in the same forms (the headline set, reported as eval_*); None uses the training prompts."""
    eval_name: str = "eval"
    """What the headline evaluation set is called in the before / after lines (e.g. unseen_prompts)."""
    num_eval_prompts: int = 8
    """How many evaluation prompts (the first ones, fixed seeds) to sample at each evaluation."""
    eval_images_per_prompt: int = 1
    """Images per evaluation prompt."""
    eval_sets: dict[str, Any] = field(default_factory=dict)
    """More evaluation sets, reported apart as eval_<name>_*: name -> prompt spec, or {prompts: spec, num_prompts: N} (e.g. {train_prompts: {prompts: builtin:toy_train, num_prompts: 100}})."""
    eval_batch_size: Optional[int] = None
    """Images per denoiser batch while evaluating (a speed / memory knob); None: train.rollout_batch_size."""
    eval_reward: Optional[str] = None
    """Reward reported at evaluation (e.g. toyworld_accuracy while training on toyworld); None: the training reward."""

    def check(self, key: str = "data") -> None:
        specs = eval_set_specs(self, key)
        check_prompt_sources(self, specs, key)
        if self.eval_reward is not None:
            from diffrl.rewards.registry import resolve_reward

            try:
                resolve_reward(self.eval_reward)
            except ValueError as exc:
                raise ConfigError(f"'{key}.eval_reward': {exc}") from None

    def eval_specs(self) -> dict[str, tuple[Optional[str], int]]:
        """The evaluation sets, headline first: name -> (prompt spec or None for the training prompts, how many)."""
        return eval_set_specs(self)


def eval_set_specs(data: DataConfig, key: str = "data") -> dict[str, tuple[Optional[str], int]]:
    """The evaluation sets, headline first: name -> (prompt spec, how many of its first prompts); a spec of
    None is the training prompts. Raises ConfigError naming the field of a malformed entry."""
    positive(data.num_eval_prompts, f"{key}.num_eval_prompts")
    positive(data.eval_images_per_prompt, f"{key}.eval_images_per_prompt")
    if data.eval_batch_size is not None:
        positive(data.eval_batch_size, f"{key}.eval_batch_size")
    if not data.eval_name.isidentifier():
        raise ConfigError(f"'{key}.eval_name' must be a plain name (letters, digits, _), got {data.eval_name!r}")
    specs = {data.eval_name: (data.eval_prompts, data.num_eval_prompts)}
    for name, entry in data.eval_sets.items():
        item = f"{key}.eval_sets.{name}"
        if not str(name).isidentifier() or name in specs:
            raise ConfigError(f"'{item}': a set needs a plain name (letters, digits, _) other than {sorted(specs)}")
        if isinstance(entry, str):
            entry = {"prompts": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("prompts"), str) or set(entry) - {"prompts", "num_prompts"}:
            raise ConfigError(f"'{item}' must be a prompt spec or {{prompts: SPEC, num_prompts: N}}, got {entry!r}")
        n = entry.get("num_prompts", data.num_eval_prompts)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"'{item}.num_prompts' must be an integer >= 1, got {n!r}")
        specs[name] = (entry["prompts"], n)
    return specs


def check_prompt_sources(data: DataConfig, specs: dict[str, tuple[Optional[str], int]], key: str = "data") -> None:
    """Every prompt file read and parsed now (a missing or empty file, a jsonl record without a string "prompt"),
    so that it fails naming its field before any model loads; the files are small next to any model."""
    from diffrl.data import load_prompts

    fields = {key + ".prompts": data.prompts}
    for index, (name, (spec, _)) in enumerate(specs.items()):
        if spec is not None:
            fields[f"{key}.eval_prompts" if index == 0 else f"{key}.eval_sets.{name}"] = spec
    for field_key, spec in fields.items():
        try:
            load_prompts(spec)
        except (ValueError, OSError) as exc:  # FileNotFoundError, unreadable, empty, malformed records
            raise ConfigError(f"'{field_key}': {exc}") from None


@dataclass
class TrainConfig:
    prompts_per_iteration: int = 2
    """Prompts sampled per process per iteration; each gets group_size samples."""
    group_size: int = 24
    """Samples per prompt, K (Flow-GRPO: 24)."""
    rollout_batch_size: int = 8
    """Samples per denoiser batch while sampling (memory knob only)."""
    train_batch_size: int = 8
    """Samples per gradient step; must divide prompts_per_iteration * group_size (Flow-GRPO: 8 per GPU)."""
    micro_batch_size: Optional[int] = None
    """nft/crd/prdp: samples per forward/backward pass within a train batch (gradients accumulate; memory knob only); None: the whole train batch."""
    num_inner_epochs: int = 1
    """Passes over each iteration's samples (Flow-GRPO: 1)."""
    learning_rate: float = 3e-4
    """AdamW learning rate (Flow-GRPO LoRA: 3e-4)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (Flow-GRPO: 0.9)."""
    adam_beta2: float = 0.999
    """AdamW beta2 (Flow-GRPO: 0.999)."""
    adam_weight_decay: float = 1e-4
    """AdamW weight decay (Flow-GRPO: 1e-4)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (Flow-GRPO: 1e-8)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (Flow-GRPO: 1.0); 0 disables."""
    max_nonfinite_steps: int = 3
    """An optimiser step whose gradient norm is NaN/inf is skipped (weights and optimiser state untouched); this many skipped in a row stop the run with an error naming the last good checkpoint."""
    mixed_precision: str = "no"
    """accelerate mixed precision: "no", "bf16" or "fp16"."""
    lr_schedule: str = "constant"
    """Learning rate over the run: "constant" (Flow-GRPO), "linear" or "cosine" decay to 0 at max_iterations, starting at lr_decay_start."""
    lr_decay_start: float = 0.0
    """Fraction of max_iterations run at the full learning rate before a linear / cosine decay begins (0: decay from the start)."""
    activation_offload: bool = False
    """Keep what the update's forwards save for backward in CPU memory (pinned on CUDA) until backward reads it (torch's save_on_cpu): less GPU memory for long video sequences, paid in host-device copies; results identical."""
    ema: bool = False
    """Keep an EMA of the trainable weights for evaluation (Flow-GRPO: on for SD3)."""
    ema_decay: float = 0.9
    """EMA decay per update (Flow-GRPO: 0.9)."""

    def check(self, key: str = "train", unit: str = "samples") -> None:
        sizes = ("prompts_per_iteration", "group_size", "rollout_batch_size", "train_batch_size", "num_inner_epochs")
        check_fields(self, key, {**{k: positive for k in sizes}, "micro_batch_size": positive,
                                 "learning_rate": positive, "mixed_precision": MIXED_PRECISION,
                                 "adam_epsilon": positive, "adam_weight_decay": non_negative,
                                 "max_grad_norm": non_negative,  # a negative clip norm flips the gradient's sign
                                 "max_nonfinite_steps": positive})
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"'{key}.{name}' must be in [0, 1), got {getattr(self, name)}")
        samples = self.prompts_per_iteration * self.group_size
        if samples % self.train_batch_size:
            raise ConfigError(f"'{key}.train_batch_size' ({self.train_batch_size}) must divide {key}.prompts_per_iteration * "
                              f"{key}.group_size ({samples} {unit} per process per iteration)")
        if self.micro_batch_size is not None and self.train_batch_size % self.micro_batch_size:
            raise ConfigError(f"'{key}.micro_batch_size' ({self.micro_batch_size}) must divide {key}.train_batch_size ({self.train_batch_size})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"'{key}.ema_decay' must be in [0, 1), got {self.ema_decay}")
        one_of(self.lr_schedule, LR_SCHEDULES, f"{key}.lr_schedule")
        if not 0 <= self.lr_decay_start < 1:
            raise ConfigError(f"'{key}.lr_decay_start' must be in [0, 1), got {self.lr_decay_start}")

    def learning_rate_at(self, iteration: int, max_iterations: int) -> float:
        """The learning rate of iteration `iteration` (0-based) of `max_iterations`: a function of the iteration
        alone, so a resumed run continues on the same schedule."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        start = self.lr_decay_start * max_iterations
        progress = max(0.0, (iteration - start) / max(1.0, max_iterations - start))  # 0 .. 1 over the decay
        if self.lr_schedule == "linear":
            return self.learning_rate * (1 - progress)
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class AdvantageConfig:
    """Group-relative advantages of the scored rollouts, A = (r - mean_group) / (std + eps), for every algorithm."""

    std_scope: str = "global"
    """Advantage std: "global" over the batch (Flow-GRPO, DiffusionNFT), "group" per prompt (DDPO's stat tracker), "none" (Dr.GRPO)."""
    std_ddof: int = 0
    """Degrees of freedom of that std: 0 population (Flow-GRPO's numpy std), 1 sample."""
    std_eps: float = 1e-4
    """Added to the std before dividing (Flow-GRPO: 1e-4)."""

    def check(self, key: str = "advantages") -> None:
        check_fields(self, key, {"std_scope": STD_SCOPES, "std_ddof": (0, 1), "std_eps": non_negative})


@dataclass
class LoggingConfig:
    log_with: str = "tensorboard"
    """Experiment tracker through accelerate: "tensorboard", "wandb" or "none"."""
    eval_every: int = 10
    """Evaluate (reward on fixed-seed eval prompts + image grid) every N iterations; 0 only at start and end."""
    save_every: int = 10
    """Write a checkpoint every N iterations (and always at the end); 0 only at the end."""
    checkpoints_total_limit: Optional[int] = None
    """Keep only the newest N checkpoints (older ones are deleted after each save); None keeps them all."""
    progress: bool = True
    """Show progress bars."""

    def check(self, key: str = "logging") -> None:
        import importlib.util

        check_fields(self, key, {"log_with": TRACKERS, "eval_every": non_negative, "save_every": non_negative,
                                 "checkpoints_total_limit": positive})
        if self.log_with != "none" and importlib.util.find_spec(self.log_with) is None:
            extra = ' (pip install "diffrl[wandb]")' if self.log_with == "wandb" else ""
            raise ConfigError(f"'{key}.log_with' is {self.log_with!r} but that package is not installed{extra}; or use 'none'")


# ---- the run as a whole -------------------------------------------------------------------------
def resolve_sampler(sampling: SamplingConfig, default_flow_sampler: str, flow: bool) -> str:
    """The rollout sampler's name: sampling.sampler, else the algorithm's default on flow models, ddim on UNets."""
    if sampling.sampler:
        return sampling.sampler
    return default_flow_sampler if flow else "ddim"


def check_run(cfg, default_flow_sampler: str) -> RunContext:
    """Checks that tie the shared sections to the model (family, sampler kind) and each other; returns the
    resolved family and sampler. Reads no weights."""
    from diffrl.pipelines.registry import FLOW_FAMILIES, POLICY_FAMILIES, resolve_family

    stated = cfg.policy.family
    if stated is not None:
        one_of(stated, tuple(POLICY_FAMILIES), "policy.family")
    try:
        detected = resolve_family(cfg.model)  # reads model_index.json at most
    except FileNotFoundError as exc:
        if stated is None:
            raise ConfigError(f"'model': {exc}") from None
        detected = None  # e.g. a hub id not cached yet: the family is the recipe's, loading will say what is missing
    except ValueError as exc:  # an unknown name, or a folder of an unsupported pipeline: no family makes it load
        raise ConfigError(f"'model': {exc}") from None
    if stated is not None and detected is not None and stated != detected:
        raise ConfigError(
            f"'model' {cfg.model} is a {detected} model but 'policy.family' is {stated} (the recipe's family): its "
            f"family-specific settings would not carry over (sampling.guidance_scale {cfg.sampling.guidance_scale} is true CFG "
            "on sd / sd3 and embedded guidance on flux; schedules, resolution, LoRA targets differ). Use a recipe for "
            f"{detected}, or set policy.family={detected} and check those settings")
    family = stated or detected
    if cfg.policy.lora_dtype == "bfloat16" and cfg.train.mixed_precision == "fp16":
        raise ConfigError("'policy.lora_dtype' bfloat16 with 'train.mixed_precision' fp16: the LoRA would compute in bf16 "
                          "inside fp16 autocast; use train.mixed_precision bf16 (or no)")
    s = cfg.sampling
    if s.guidance_scale is None:
        raise ConfigError("'sampling.guidance_scale' is unset: build the config with load_config or call apply_algorithm_defaults")
    if s.guidance_scale_2 is not None and family != "wan":
        raise ConfigError(f"'sampling.guidance_scale_2' is the low-noise expert's CFG scale of Wan2.2; '{cfg.model}' is "
                          f"a {family} model: remove it")
    flow = family in FLOW_FAMILIES
    sampler = resolve_sampler(s, default_flow_sampler, flow)
    if flow and sampler == "ddim":
        raise ConfigError(f"'sampling.sampler' ddim needs a DDPM / DDIM model (sd, motion); '{cfg.model}' is a flow model ({family}): "
                          "use flow_sde, flow_ode or flow_dpm2")
    if not flow and sampler.startswith("flow"):
        raise ConfigError(f"'sampling.sampler' {sampler} needs a flow model; '{cfg.model}' is a DDPM / DDIM ({family}) "
                          "model: use ddim")
    check_samples(cfg, family)
    check_tiny_size(cfg)
    check_lora_targets(cfg, family)
    check_vae_chunking(cfg, family)
    check_wan_experts(cfg, family)
    check_sara(cfg)
    draws_noise = (sampler == "flow_sde" and s.noise_level > 0) or (sampler == "ddim" and s.eta > 0)
    if s.sde_window_size and not draws_noise:
        raise ConfigError(f"'sampling.sde_window_size' needs a stochastic sampler; 'sampling.sampler' {sampler} draws no noise")
    positive(cfg.max_iterations, "max_iterations")
    non_negative(cfg.seed, "seed")  # torch generators take no negative seed: it failed after the model loaded
    return RunContext(family, flow, sampler, draws_noise)


def check_output_dir(cfg):
    """An output_dir that already holds a run is continued (resume=) or replaced (overwrite=true), never mixed
    into: appending would repeat iterations in metrics.jsonl and leave newer checkpoints that a resume would pick.
    A resume returns its diffrl.checkpoint.ResumePlan (the verified checkpoint, or None to start over), else None."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'output_dir' {out} is a file, not a folder")
    held = [name for name in ("metrics.jsonl", "checkpoints") if (out / name).exists()]
    if held and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"'output_dir' {out} already holds a run ({', '.join(held)}): continue it with resume={out}, "
                          "start over with overwrite=true, or choose another output_dir")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("'overwrite' and 'resume' contradict each other: resume continues a run, overwrite deletes it")
    if cfg.resume:  # the newest intact checkpoint, fitting this config (diffrl.checkpoint.resolve_resume)
        from diffrl.checkpoint import resolve_resume

        return resolve_resume(cfg)
    return None


def check_output_path(cfg) -> None:
    """output_dir can be made and written: not a file, not under a file, not in a read-only folder. Nothing is
    created here (a run that fails validation leaves no folder behind)."""
    import os

    out = Path(cfg.output_dir)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is under {existing}, which is a file"
        raise ConfigError(f"'output_dir' {out} {where}, not a folder: choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"'output_dir' {out} cannot be written: {existing} is read-only for this user; choose "
                          "another output_dir")


def check_tiny_size(cfg) -> None:
    """The tiny models are square (their builders take one resolution)."""
    from diffrl.pipelines.registry import TINY_MODELS

    p = cfg.policy
    if cfg.model in TINY_MODELS and p.height is not None and p.width is not None and p.height != p.width:
        raise ConfigError(f"'policy.height' {p.height} and 'policy.width' {p.width} differ; '{cfg.model}' is square: "
                          "set policy.resolution instead")


LORA_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding")
"""torch.nn layer classes peft's LoRA attaches to."""


def check_lora_targets(cfg, family: str) -> None:
    """policy.lora_targets name modules of the trained network: peft matches each as a module's full dotted name or
    its suffix (after a dot). Read from a build of the network on the meta device (its config, no weights); a hub
    model not in the cache is checked for syntax only (loading it says what is missing)."""
    from diffrl.core.registry import suggest
    from diffrl.pipelines.registry import denoiser_modules

    p = cfg.policy
    if p.lora_targets is None:
        return
    if p.lora_rank == 0:
        raise ConfigError("'policy.lora_targets' is set but 'policy.lora_rank' is 0 (a full fine-tune, no LoRA): "
                          "remove it or set a rank")
    if p.adapter != "lora":
        raise ConfigError(f"'policy.lora_targets' is set but 'policy.adapter' is {p.adapter} (no LoRA): remove it")
    malformed = [t for t in p.lora_targets if not isinstance(t, str) or not t.strip() or t != t.strip()]
    if malformed or not p.lora_targets:
        raise ConfigError(f"'policy.lora_targets' must list module names such as to_q or attn.to_out.0 (null: the "
                          f"family's attention projections), got {list(p.lora_targets)!r}")
    modules = denoiser_modules(cfg.model, family)
    if modules is None:
        return
    layers = {name: kind for name, kind in modules.items() if kind in LORA_LAYER_TYPES}
    # each layer by its last name, with its parent's for a numbered one (to_out.0)
    leaves = sorted({".".join(name.split(".")[-2 if name.split(".")[-1].isdigit() else -1:]) for name in layers})
    for target in p.lora_targets:
        matched = [name for name in modules if name == target or name.endswith("." + target)]
        if not matched:
            raise ConfigError(f"'policy.lora_targets' {target!r} names no module of '{cfg.model}''s denoiser."
                              f"{suggest(target, leaves)} Its layers LoRA can wrap end in: {', '.join(leaves[:12])}"
                              f"{', ...' if len(leaves) > 12 else ''}")
        kinds = sorted({modules[name] for name in matched} - set(LORA_LAYER_TYPES))
        if kinds:
            raise ConfigError(f"'policy.lora_targets' {target!r} matches {', '.join(kinds)} modules of '{cfg.model}''s "
                              f"denoiser; LoRA wraps layers ({', '.join(LORA_LAYER_TYPES)}): name those, e.g. "
                              f"{', '.join(leaves[:4])}")


def check_vae_chunking(cfg, family: str) -> None:
    """policy.vae_* only on a family whose VAE has the switches (Wan), with a valid tile."""
    from diffrl.pipelines.registry import policy_class

    p = cfg.policy
    if not (p.vae_slicing or p.vae_tiling):
        return
    if not hasattr(policy_class(family), "set_vae_chunking"):
        raise ConfigError(f"'policy.vae_slicing' / 'policy.vae_tiling' are options of the video (wan) VAE; '{cfg.model}' "
                          f"is a {family} model: remove them")
    if p.vae_tiling:
        from diffrl.pipelines.wan import vae_tile

        try:
            vae_tile(p.vae_tile_size, p.vae_tile_stride)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def check_sara(cfg) -> None:
    """policy.adapter against the options of the other adapters; SaRA with a re-mask: the trainable vectors change size
    at the re-mask, which train.ema's copies do not follow; SaRA under torch.compile: its in-place writes into the
    frozen weights break the compiled backward."""
    p = cfg.policy
    if p.adapter != "lora" and p.lora_dtype != "float32":
        raise ConfigError(f"'policy.lora_dtype' {p.lora_dtype} sets what a LoRA computes in; 'policy.adapter' is {p.adapter}: "
                          "remove it")
    if p.adapter == "sara" and p.compile:
        raise ConfigError("'policy.compile' with 'policy.adapter' sara is not supported: SaRA writes its values into the "
                          "frozen weights in place at every forward, which the compiled graphs do not allow; turn one off")
    if p.adapter == "sara" and p.sara_remask_step is not None and cfg.train.ema:
        raise ConfigError("'policy.sara_remask_step' is set with 'train.ema': the EMA copies the SaRA vectors, whose entries "
                          "change at the re-mask; set train.ema=false or policy.sara_remask_step=null")


def check_wan_experts(cfg, family: str) -> None:
    """policy.wan_experts low / both only on a Wan model with two experts (read from its model_index.json)."""
    experts = cfg.policy.wan_experts
    if experts == "high":
        return
    if family != "wan":
        raise ConfigError(f"'policy.wan_experts' {experts} chooses among Wan2.2's two experts; '{cfg.model}' is a {family} "
                          "model: remove it")
    from diffrl.pipelines.wan import expert_count

    if expert_count(cfg.model) == 1:
        raise ConfigError(f"'policy.wan_experts' {experts} needs Wan2.2's two experts (transformer_2 and a boundary_ratio, "
                          f"as Wan2.2-T2V-A14B); '{cfg.model}' has one, as Wan2.1 and Wan2.2 TI2V-5B: remove it (its only "
                          "expert is 'high')")


def check_motion(cfg) -> None:
    """A motion model: no pixel size, a clip length within the model's max_frames, HumanML3D's 263 features (what
    the motion rewards read); all from the model's JSON files, before any weights load."""
    from diffrl.pipelines.motion import HUMANML3D_FEATURES, model_limits

    p = cfg.policy
    for name in ("height", "width"):
        if getattr(p, name) is not None:
            raise ConfigError(f"'policy.{name}' is an image size; '{cfg.model}' is a motion model: remove it "
                              "(policy.num_frames sets the clip length)")
    try:
        limits = model_limits(cfg.model)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ConfigError(f"'model': {exc}") from None
    frames = p.num_frames if p.num_frames is not None else limits["default_frames"]
    if not 1 <= frames <= limits["max_frames"]:
        what = "over the model's maximum" if frames > limits["max_frames"] else "not a clip length"
        raise ConfigError(f"'policy.num_frames' {frames} is {what}: '{cfg.model}' takes 1.."
                          f"{limits['max_frames']} frames ({limits['max_frames'] / 20:.1f} s at 20 fps)")
    if limits["feature_dim"] != HUMANML3D_FEATURES:
        raise ConfigError(f"'model' {cfg.model} has {limits['feature_dim']} features per frame; diffrl's motion "
                          f"rewards read HumanML3D's {HUMANML3D_FEATURES}-d features: use a {HUMANML3D_FEATURES}-feature model")


def reward_parts(cfg) -> dict[str, tuple[dict, str]]:
    """Every reward the run builds: name -> (constructor arguments, the field that holds them); reward_kwargs, or
    each mixture part's kwargs, and the evaluation reward (built without arguments)."""
    from diffrl.rewards.mixture import parse_mixture

    parts = ({name: (dict(kwargs), f"rewards.{name}.kwargs") for name, (_, kwargs) in parse_mixture(cfg.rewards).items()}
             if cfg.rewards else {cfg.reward: (dict(cfg.reward_kwargs), "reward_kwargs")})
    if cfg.data.eval_reward is not None and cfg.data.eval_reward not in parts:
        parts[cfg.data.eval_reward] = ({}, "data.eval_reward")
    return parts


def check_reward_arguments(cfg, service: bool = False) -> None:
    """The constructor arguments of every reward the run builds fit its signature, read without building it; with
    `service`, a reward served by another process (remote) also answers (diffrl.api runs that before the model
    loads; a recipe validates offline without it)."""
    from diffrl.rewards.registry import RewardArgumentError, check_reward_kwargs, check_reward_service

    for name, (kwargs, key) in reward_parts(cfg).items():
        try:
            (check_reward_service if service else check_reward_kwargs)(name, kwargs)
        except RewardArgumentError as exc:
            at = f"{key}.{exc.argument}" if exc.argument and key != "data.eval_reward" else key
            raise ConfigError(f"'{at}': {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"'{key}': {exc}") from None


def check_samples(cfg, family: str) -> None:
    """The policy's samples (images or videos), their size, and the rewards that score them agree."""
    from diffrl.pipelines.registry import policy_class
    from diffrl.rewards.mixture import parse_mixture
    from diffrl.rewards.registry import reward_accepts

    kind = policy_class(family).sample_kind
    frames = cfg.policy.num_frames
    if kind == "motion":
        check_motion(cfg)
    elif frames is not None:
        if kind != "video":
            raise ConfigError(f"'policy.num_frames' is for video models; '{cfg.model}' is a {family} ({kind}) model")
        from diffrl.pipelines.wan import check_frames

        try:
            check_frames(frames, "policy.num_frames")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    names = {name: f"rewards.{name}" for name in parse_mixture(cfg.rewards)} if cfg.rewards else {cfg.reward: "reward"}
    if cfg.data.eval_reward is not None:
        names.setdefault(cfg.data.eval_reward, "data.eval_reward")
    check_reward_arguments(cfg)
    for name, key in names.items():
        accepts = reward_accepts(name)
        if kind not in accepts:
            hint = f"; score each frame with per_frame (reward_kwargs: {{reward: {name}}})" if kind == "video" else ""
            raise ConfigError(f"'{key}' {name} scores {' / '.join(accepts)} samples but '{cfg.model}' makes {kind} samples{hint}")
