"""The language-model section of a run (`lm:`, algorithms lm_grpo, lm_drgrpo, lm_dapo, lm_nft): its schema, each
method's presets, and its checks. Such a run reads model, policy.*, train.*, logging.* and this section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from diffrl.checks import ConfigError, one_of, positive

LM_ALGORITHMS: dict[str, dict[str, Any]] = {
    # what each language-model method's None options resolve to (apply_algorithm_defaults)
    "lm_grpo": {"std_scope": "group", "loss_aggregation": "seq_mean_token_mean", "clip_high": None, "kl_beta": 0.04,
                "dynamic_sampling": False},  # DeepSeekMath GRPO (Shao et al. 2024)
    "lm_drgrpo": {"std_scope": "none", "loss_aggregation": "seq_mean_token_sum_norm", "clip_high": None, "kl_beta": 0.0,
                  "dynamic_sampling": False},  # Dr.GRPO (Liu et al. 2025)
    "lm_dapo": {"std_scope": "group", "loss_aggregation": "token_mean", "clip_high": 0.28, "kl_beta": 0.0,
                "dynamic_sampling": True},  # DAPO (Yu et al. 2025)
    "lm_nft": {"std_scope": "group", "loss_aggregation": "seq_mean_token_sum_norm", "clip_high": None, "kl_beta": 0.0,
               "dynamic_sampling": True},  # NFT (Chen et al. 2025), its recipe's verl settings
}
"""Language-model RL methods (diffrl.lm): `algorithm` names that `diffrl train` runs on a causal LM."""


@dataclass
class LMConfig:
    """Language-model RL (algorithm lm_grpo, lm_drgrpo, lm_dapo or lm_nft on a causal LM `model`). These runs
    read model, policy.*, train.*, logging.* and this section; reward, rewards, sampling.*, data.* are diffusion-only."""

    train_data: str = "builtin:arith_train"
    """RL prompts: "builtin:<name>" (assets/lm/<name>.jsonl) or a .jsonl file with a "prompt" field; other fields are metadata for the rewards."""
    eval_data: str = "builtin:arith_eval"
    """Held-out prompts, greedy-decoded at every evaluation (same forms)."""
    num_eval: int = 500
    """Evaluation prompts: the first N of eval_data."""
    eval_reward: str = "exact_match"
    """Reward averaged over the greedy evaluation completions (eval_reward_mean)."""
    rewards: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    """Training rewards, name -> weight: a name registered in diffrl.lm.rewards or "module:function"."""
    reward_combine: str = "sum_then_normalize"
    """Several rewards -> advantages: "sum_then_normalize" (weighted sum, then group advantages) or "normalize_then_sum" (GDPO / MR-GRPO)."""
    max_new_tokens: int = 8
    """Completion budget in tokens."""
    temperature: float = 1.0
    """Rollout sampling temperature; log-probs are of softmax(logits / temperature) (DeepSeekMath, DAPO, TRL: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 is off (DAPO, TRL: 1.0)."""
    top_k: int = 0
    """Top-k sampling; 0 is off (TRL: 0; transformers' own default of 50 is never applied)."""
    std_scope: Optional[str] = None
    """Advantage std: "group" (GRPO, DAPO) or "none" (Dr.GRPO: mean-centring only); None: the algorithm's."""
    std_ddof: int = 1
    """0 population, 1 sample std (TRL's torch.std: 1)."""
    std_eps: float = 1e-4
    """Added to the std before dividing (TRL: 1e-4)."""
    adv_clip: Optional[float] = None
    """Clip advantages to [-adv_clip, adv_clip]; None: no clip (GRPO, DAPO)."""
    loss_aggregation: Optional[str] = None
    """Token losses -> scalar: seq_mean_token_mean (GRPO), seq_mean_token_sum_norm (Dr.GRPO, NFT), token_mean (DAPO), seq_mean_token_sum; None: the algorithm's."""
    norm_constant: Optional[float] = None
    """Constant divisor of token sums for seq_mean_token_sum_norm; None: max_new_tokens (Dr.GRPO: the generation budget)."""
    clip_low: float = 0.2
    """PPO clip eps_low of the token ratio (GRPO, DAPO: 0.2)."""
    clip_high: Optional[float] = None
    """eps_high; None: 0.28 for lm_dapo (clip-higher, DAPO), clip_low otherwise."""
    kl_beta: Optional[float] = None
    """KL coefficient against the reference (LoRA disabled, or a frozen copy for full fine-tunes); None: 0.04 for lm_grpo (DeepSeekMath), 0 for lm_drgrpo / lm_dapo / lm_nft (trained without it)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator: k1, k2 or k3 (Schulman 2020; GRPO: k3)."""
    dynamic_sampling: Optional[bool] = None
    """Drop groups whose rewards are all equal (all correct or all wrong) and sample more prompts to refill; None: on for lm_dapo (DAPO) and lm_nft (NFT's recipe), off otherwise."""
    dynamic_sampling_rounds: int = 10
    """Most sampling rounds per iteration while refilling; the update uses what was found (DAPO: max_num_gen_batches 10)."""
    nft_rhat_clamp: list[float] = field(default_factory=lambda: [0.02, 0.98])
    """NFT: the group accuracy rhat is clamped to [lo, hi] (NFT: [0.02, 0.98])."""
    nft_negative_clamp: float = 1.0
    """NFT: gradient-preserving lower clamp of the negative ratio (1 - rhat R) / (1 - rhat) (NFT's code: clamp_negative 1.0)."""
    nft_correct_threshold: float = 0.5
    """NFT: an answer counts as correct when its weighted reward is >= this (NFT: a 0/1 verifier)."""


def apply_lm_defaults(cfg) -> None:
    """Resolve the lm.* options left None to the algorithm's values (LM_ALGORITHMS)."""
    lm, preset = cfg.lm, LM_ALGORITHMS[cfg.algorithm]
    for key in ("std_scope", "loss_aggregation", "kl_beta", "dynamic_sampling"):
        if getattr(lm, key) is None:
            setattr(lm, key, preset[key])
    if lm.clip_high is None:
        lm.clip_high = preset["clip_high"] if preset["clip_high"] is not None else lm.clip_low
    if lm.norm_constant is None and lm.loss_aggregation == "seq_mean_token_sum_norm":
        lm.norm_constant = float(lm.max_new_tokens)


def validate_lm(cfg) -> None:
    """Language-model runs (diffrl.lm): the causal LM, its data and rewards, lm.*, train.*, logging.*."""
    from diffrl.core import AGGREGATIONS, KL_ESTIMATORS
    from diffrl.lm.policy import BUILTIN_LMS
    from diffrl.lm.rewards import resolve_lm_reward
    from diffrl.lm.tasks import resolve_lm_dataset

    lm, t, p, lg = cfg.lm, cfg.train, cfg.policy, cfg.logging
    if lm.std_scope is None:
        raise ConfigError("'lm.std_scope' is unset: build the config with load_config or call apply_algorithm_defaults")
    if cfg.model in ("tiny-sd", "tiny-sd3", "tiny-flux") or (Path(cfg.model) / "model_index.json").is_file():
        raise ConfigError(f"'model' {cfg.model!r} is a diffusion pipeline; {cfg.algorithm} trains a causal LM: use a built-in "
                          f"({', '.join(BUILTIN_LMS)}), a local transformers folder or a cached hub id")
    if Path(cfg.model).is_dir() and not (Path(cfg.model) / "config.json").is_file():
        raise ConfigError(f"'model' folder {cfg.model} has no config.json: not a transformers model folder")
    for key in ("train_data", "eval_data"):
        try:
            resolve_lm_dataset(getattr(lm, key))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"'lm.{key}': {exc}") from None
    if not lm.rewards:
        raise ConfigError("'lm.rewards' is empty: give at least one reward name -> weight (e.g. exact_match: 1.0)")
    if getattr(cfg, "rewards", None):
        raise ConfigError(f"'rewards' is the diffusion reward mixture; {cfg.algorithm} scores text with 'lm.rewards' "
                          "(name or module:function -> weight)")
    for name in [*lm.rewards, lm.eval_reward]:
        try:
            resolve_lm_reward(name)
        except ValueError as exc:  # UnknownNameError lists the registered names
            key = "lm.eval_reward" if name == lm.eval_reward and name not in lm.rewards else f"lm.rewards.{name}"
            raise ConfigError(f"'{key}': {exc}") from None
    one_of(lm.reward_combine, ("sum_then_normalize", "normalize_then_sum"), "lm.reward_combine")
    positive(lm.num_eval, "lm.num_eval")
    positive(lm.max_new_tokens, "lm.max_new_tokens")
    positive(lm.temperature, "lm.temperature")
    if not 0 < lm.top_p <= 1:
        raise ConfigError(f"'lm.top_p' must be in (0, 1], got {lm.top_p}")
    positive(lm.top_k, "lm.top_k", allow_zero=True)
    one_of(lm.std_scope, ("group", "none"), "lm.std_scope")
    if lm.std_ddof not in (0, 1):
        raise ConfigError(f"'lm.std_ddof' must be 0 or 1, got {lm.std_ddof}")
    positive(lm.std_eps, "lm.std_eps", allow_zero=True)
    if lm.adv_clip is not None:
        positive(lm.adv_clip, "lm.adv_clip")
    one_of(lm.loss_aggregation, AGGREGATIONS.names(), "lm.loss_aggregation")
    if lm.norm_constant is not None:
        positive(lm.norm_constant, "lm.norm_constant")
        if lm.loss_aggregation != "seq_mean_token_sum_norm":
            raise ConfigError(f"'lm.norm_constant' is only used by lm.loss_aggregation seq_mean_token_sum_norm, not {lm.loss_aggregation}")
    if not 0 <= lm.clip_low < 1:
        raise ConfigError(f"'lm.clip_low' must be in [0, 1), got {lm.clip_low}")
    positive(lm.clip_high, "lm.clip_high", allow_zero=True)
    positive(lm.kl_beta, "lm.kl_beta", allow_zero=True)
    one_of(lm.kl_estimator, KL_ESTIMATORS.names(), "lm.kl_estimator")
    positive(lm.dynamic_sampling_rounds, "lm.dynamic_sampling_rounds")
    lo_hi = list(lm.nft_rhat_clamp)
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] < 1:
        raise ConfigError(f"'lm.nft_rhat_clamp' must be [lo, hi] with 0 < lo <= hi < 1, got {lo_hi}")
    positive(lm.nft_negative_clamp, "lm.nft_negative_clamp")

    p.check("policy")
    if p.adapter == "sara":
        raise ConfigError(f"'policy.adapter' sara trains diffusion denoisers; {cfg.algorithm} trains a causal LM: use lora or full")
    if p.gradient_checkpointing == "selective":
        raise ConfigError(f"'policy.gradient_checkpointing' selective is for the diffusion denoisers; {cfg.algorithm} "
                          "checkpoints the LM with transformers' own (use full)")
    if p.compile:
        raise ConfigError(f"'policy.compile' compiles a diffusion denoiser's blocks; {cfg.algorithm} does not compile the LM")
    if p.lora_dtype != "float32":
        raise ConfigError(f"'policy.lora_dtype' {p.lora_dtype} is for the diffusion denoisers' LoRA; {cfg.algorithm} keeps it float32")
    if t.activation_offload:
        raise ConfigError(f"'train.activation_offload' offloads a diffusion update's activations; {cfg.algorithm} does not offload")
    if p.merge_lora_for_rollout:
        raise ConfigError(f"'policy.merge_lora_for_rollout' merges a diffusion denoiser's LoRA for its rollouts; {cfg.algorithm} "
                          "generates with the adapter unmerged")
    t.check("train", unit="completions")
    if t.group_size < 2:
        raise ConfigError(f"'train.group_size' must be >= 2 for {cfg.algorithm}: advantages are relative to the prompt's group")
    if t.ema:
        raise ConfigError(f"'train.ema' is not supported by {cfg.algorithm} (the LM trainer evaluates the trained weights)")
    lg.check("logging")
    positive(cfg.max_iterations, "max_iterations")
