"""Typed run configuration: YAML recipe + `key=value` overrides -> validated dataclasses.

Every field is declared once with a one-line docstring (read back by `diffrl train --help`) that
says what it does and where its default comes from. Everything is validated here, before any model
loads: unknown keys (with the closest valid name), wrong types, and invalid combinations.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An invalid run configuration; the message names the offending field."""


@dataclass
class PolicyConfig:
    family: Optional[str] = None
    """Model family ("sd", "sd3", "flux"); None detects it from the model folder's model_index.json."""
    resolution: int = 512
    """Image height and width in pixels (Flow-GRPO: 512)."""
    dtype: str = "float32"
    """Dtype of the frozen base weights: float32, bfloat16, float16 or float64 (LoRA weights stay float32)."""
    lora_rank: int = 32
    """LoRA rank on the denoiser's attention projections; 0 trains the full denoiser (Flow-GRPO: 32)."""
    lora_alpha: float = 64.0
    """LoRA alpha (Flow-GRPO: 64)."""
    lora_targets: Optional[list[str]] = None
    """Module names LoRA attaches to; None uses the family's attention projections."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, 10-25 % more time (ENVIRONMENT.md)."""
    attention_backend: str = "sdpa"
    """"sdpa" (PyTorch scaled_dot_product_attention), "xformers" (CUDA), or a diffusers dispatcher backend."""


@dataclass
class SamplingConfig:
    num_steps: int = 10
    """Denoising steps per training rollout (Flow-GRPO: 10)."""
    eval_num_steps: int = 40
    """Denoising steps for evaluation images (Flow-GRPO: 40)."""
    guidance_scale: Optional[float] = None
    """CFG scale of rollouts, training and evaluation (FLUX: embedded guidance); None: the algorithm's, 4.5 for grpo, easytune and draft (Flow-GRPO SD3.5), 1.0 CFG-free for nft/crd (DiffusionNFT, CRD)."""
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
    mixed_precision: str = "no"
    """accelerate mixed precision: "no", "bf16" or "fp16"."""
    ema: bool = False
    """Keep an EMA of the trainable weights for evaluation (Flow-GRPO: on for SD3)."""
    ema_decay: float = 0.9
    """EMA decay per update (Flow-GRPO: 0.9)."""


@dataclass
class GRPOConfig:
    clip_range: float = 1e-4
    """PPO clip on the per-step ratio, low side (Flow-GRPO: 1e-4)."""
    clip_range_high: Optional[float] = None
    """High-side clip (DAPO clip-higher); None uses clip_range."""
    kl_beta: float = 0.04
    """KL coefficient against the reference model (Flow-GRPO: 0.04; 0.01 for PickScore)."""
    kl_convention: str = "flow_grpo"
    """"flow_grpo": mean_elems((mu - mu_ref)^2) / (2 std_t^2) as Flow-GRPO's code; "exact": the step Gaussian KL."""
    timestep_fraction: float = 0.99
    """Fraction of the sampling steps trained per sample (Flow-GRPO: 0.99)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO: 5)."""
    std_scope: str = "global"
    """Advantage std: "global" over the batch (Flow-GRPO), "group" per prompt, "none" (Dr.GRPO)."""
    std_ddof: int = 0
    """Degrees of freedom of that std: 0 population (Flow-GRPO's numpy std), 1 sample."""
    std_eps: float = 1e-4
    """Added to the std before dividing (Flow-GRPO: 1e-4)."""


@dataclass
class ForwardProcessConfig:
    """Shared by the forward-process trainers (nft, crd): how final samples are noised for training."""

    timestep_source: str = "schedule"
    """Training noise levels: "schedule" (the rollout schedule's steps, DiffusionNFT), "uniform" or "logit_normal" t in (0, 1)."""
    timestep_fraction: float = 0.99
    """Noise levels trained per sample and inner epoch: max(1, int(fraction * sampling.num_steps)), fresh noise each (DiffusionNFT: 0.99)."""
    logit_normal_mean: float = 0.0
    """Mean of the logit-normal timestep density t = sigmoid(m + s z) (SD3, Esser et al. 2024: 0)."""
    logit_normal_std: float = 1.0
    """Std of the logit-normal timestep density (SD3, Esser et al. 2024: 1)."""
    adv_clip_max: float = 5.0
    """A_max: advantages are clipped to +-A_max and mapped to r = 0.5 + 0.5 A / A_max in [0, 1] (DiffusionNFT, CRD: 5)."""


@dataclass
class NFTConfig(ForwardProcessConfig):
    beta: float = 1.0
    """Implicit-policy strength: v+- = sg(v_old) +- beta (v_theta - sg(v_old)) (DiffusionNFT: 1; 0.1 for OCR)."""
    kl_coef: float = 1e-4
    """Weight of mean((v_theta - v_ref)^2) against the reference (adapter disabled) (DiffusionNFT: 1e-4)."""
    old_decay: list[float] = field(default_factory=lambda: [0, 0.0, 0.001, 0.5])
    """EMA decay of the old (sampling) adapter after each iteration, [start_step, start_value, slope, max]: min(0.001 step, 0.5) (DiffusionNFT decay_type 1)."""


@dataclass
class CRDConfig(ForwardProcessConfig):
    beta: float = 1.0
    """Implicit-reward scale: the loss matches beta (r_theta - mean_g r_theta) to a - mean_g a (CRD: 1, Flow-Factory crd_beta)."""
    loss: str = "mse"
    """Reward matching: "mse" (A_max / beta) (beta R_c - A_c)^2 (CRD) or "bce" BCE(beta R_c, sigmoid(A_c)) (the authors' variant)."""
    kl_beta: float = 0.1
    """KL strength against the CFG-guided reference (adapter disabled): kl_beta (m + a (1 - m)) mean((v_theta - v_ref)^2) (CRD: 0.1)."""
    kl_floor: float = 1e-4
    """KL coefficient at a = 0, m = kl_floor / kl_beta, when reward_adaptive_kl (CRD: 1e-4)."""
    reward_adaptive_kl: bool = True
    """Scale each sample's KL by m + a (1 - m), weaker for low-reward samples (CRD: on)."""
    ref_guidance_scale: float = 4.5
    """CFG scale of the KL reference, the pretrained model as used at inference (CRD: 4.5)."""
    old_decay: list[float] = field(default_factory=lambda: [0, 0.25, 0.005, 0.999])
    """EMA decay of the old adapter (v_old of the implicit reward), [start_step, start_value, slope, max]: min(0.25 + 0.005 step, 0.999) (CRD)."""
    sampling_decay: list[float] = field(default_factory=lambda: [75, 0.0, 0.0075, 0.999])
    """EMA decay of the sampling adapter (rollouts): 0 before step 75, then min(0.0075 (step - 75), 0.999) (CRD)."""


@dataclass
class PRDPConfig:
    beta: float = 10.0
    """KL strength: implicit reward differences regress onto reward differences / beta (ALGORITHMS.md: 10 for aesthetic-scale rewards; toy sweep, RESULTS.md "PRDP sweep": 25.2 % vs 24.3 % held-out at beta 1, base 23.0 %)."""
    clip_range: Optional[float] = 1e-4
    """eps: each step's log-ratio is clipped to within eps of the sampling snapshot's, loss max(l, l_clipped) (ALGORITHMS.md: 1e-4; toy sweep: 25.2 % vs 24.3 % at 1e-3, where it never binds); None: no clip (plain RDP)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps back-propagated per gradient step, scaled by 1 / fraction (unbiased); the loss always sums every step (PRDP: all steps, 1.0)."""


@dataclass
class EasyTuneConfig:
    window_fraction: float = 0.2
    """Trained steps per chain: the last max(1, round(fraction N)) of the N sampling steps (EasyTune: the last 10 of 50)."""
    score_on: str = "x0"
    """What a trained step scores: "x0", its decoded one-step x0 prediction (EasyTune), or "x_prev", the decoded x_{t-1} (EasyTune's noise-aware-reward variant)."""
    curriculum_fraction: float = 0.0
    """Fraction of training over which the window slides from the first (high-noise) steps to the last; 0: off (EasyTune's curriculum: 0.03)."""
    reward_scale: float = 1.0
    """lambda in loss = -lambda mean(R) (ALGORITHMS.md gives none: 1 keeps the reward's scale; the learning rate sets the step)."""


@dataclass
class DraftConfig:
    mode: str = "draft_k"
    """"draft_k" (DRaFT-K, Clark et al. 2024), "refl" (ReFL, Xu et al. 2023) or "alignprop" (Prabhudesai et al. 2023)."""
    k: Optional[int] = 1
    """draft_k: the reward gradient flows through the last K sampling steps; None: all of them (DRaFT: K = 1, its best setting)."""
    refl_range: list[float] = field(default_factory=lambda: [0.75, 1.0])
    """refl: [lo, hi], the trained step is drawn uniformly from steps floor(lo N) .. ceil(hi N) - 1 (ImageReward's ReFL: 30 .. 39 of 40)."""
    keep_prob: float = 0.2
    """alignprop: each step before the last keeps its gradient with this probability, the last always; 1 is the full chain, 0 DRaFT-1 (AlignProp's code keeps about 10 of 50 steps; 0.2 keeps 10.8 on average)."""
    reward_scale: float = 1.0
    """Loss = -scale mean(R) (AlignProp: loss_coeff 1)."""
    checkpoint_steps: bool = True
    """Run every denoiser call with gradient under torch.utils.checkpoint: a kept step costs a few latents of memory and one more forward (AlignProp: grad_checkpoint on)."""


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


@dataclass
class LoggingConfig:
    log_with: str = "tensorboard"
    """Experiment tracker through accelerate: "tensorboard", "wandb" or "none"."""
    eval_every: int = 10
    """Evaluate (reward on fixed-seed eval prompts + image grid) every N iterations; 0 only at start and end."""
    save_every: int = 10
    """Write a checkpoint every N iterations (and always at the end); 0 only at the end."""
    progress: bool = True
    """Show progress bars."""


@dataclass
class RunConfig:
    algorithm: str = "grpo"
    """Training method, looked up in diffrl.trainers.ALGORITHMS; lm_grpo, lm_drgrpo, lm_dapo, lm_nft train a causal LM (diffrl.lm, lm: section)."""
    model: str = "tiny-sd3"
    """A built-in tiny model ("tiny-sd", "tiny-sd3", "tiny-flux"; "toy-arith" causal LM), a local diffusers (or transformers, for lm_*) folder, or a cached hub id."""
    reward: str = "jpeg_compressibility"
    """Reward name, looked up in diffrl.rewards."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the reward's constructor."""
    rewards: dict[str, Any] = field(default_factory=dict)
    """A weighted reward mixture, name -> weight or {weight: w, kwargs: {...}}, e.g. {pickscore: 1.0, ocr: 0.7}; when set it replaces reward / reward_kwargs, and each part is logged (reward_<name>_mean)."""
    reward_combine: str = "sum_then_normalize"
    """How a mixture becomes advantages: "sum_then_normalize" (group-normalise the weighted sum; Flow-GRPO) or "normalize_then_sum" (group-normalise each reward, weighted sum, batch-normalise; GDPO / MR-GRPO)."""
    reward_source_weights: dict[str, Any] = field(default_factory=dict)
    """Mixture weights per prompt source, {source: {reward: weight}}, for samples whose .jsonl metadata "source" names it (rewards left out weigh 0 there)."""
    reward_async: bool = False
    """Score each rollout chunk in a background thread while the next chunk samples (worth it with the remote reward server)."""
    output_dir: str = "outputs/run"
    """Where config.yaml, metrics.jsonl, logs, image grids and checkpoints go."""
    max_iterations: int = 100
    """Training iterations (one iteration = sample, score, update)."""
    seed: int = 0
    """Seeds every random draw (prompts, noise, timestep order), per process and iteration."""
    resume: Optional[str] = None
    """A checkpoint folder (or an output_dir: its latest checkpoint) to continue from."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    crd: CRDConfig = field(default_factory=CRDConfig)
    prdp: PRDPConfig = field(default_factory=PRDPConfig)
    easytune: EasyTuneConfig = field(default_factory=EasyTuneConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)




def _section_types(cls) -> dict[str, type]:
    hints = {f.name: f for f in dataclasses.fields(cls)}
    return {
        name: f.default_factory
        for name, f in hints.items()
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
    }


# ---- field docstrings ------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """The one-line docstring written under each field of a config dataclass (and of its dataclass bases)."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe_options(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every leaf option, in declaration order."""
    docs = field_docs(cls)
    sections = _section_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in sections:
            rows += describe_options(sections[f.name], prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((prefix + f.name, type_name, repr(default), docs.get(f.name, "")))
    return rows


# ---- loading and validation ------------------------------------------------------------------
def _check_keys(data: Any, cls, prefix: str = "") -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of options, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    sections = _section_types(cls)
    for key, value in data.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        if key in sections:
            _check_keys(value, sections[key], f"{prefix}{key}.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply `key=value` overrides, type-check and validate. Loads no model."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.to_container(OmegaConf.load(path)) or {})
        except Exception as exc:  # yaml syntax errors
            raise ConfigError(f"cannot parse {path}: {exc}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.learning_rate=1e-4)")
        try:
            layers.append(OmegaConf.to_container(OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse override '{item}': {exc}") from None
    for layer in layers:
        _check_keys(layer, RunConfig)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"invalid value for '{key}': {msg}") from None
    if cfg.train.mixed_precision == "False":  # YAML 1.1 reads a bare `no` (accelerate's spelling) as false
        cfg.train.mixed_precision = "no"
    apply_algorithm_defaults(cfg)
    validate(cfg)
    return cfg


def apply_algorithm_defaults(cfg: RunConfig) -> None:
    """Fill the options whose default depends on the algorithm (sampling.guidance_scale), in place, so the
    saved config.yaml and every consumer see the value used."""
    from diffrl.trainers import ALGORITHMS

    if cfg.algorithm in LM_ALGORITHMS:
        _apply_lm_defaults(cfg)
        return
    if cfg.sampling.guidance_scale is None and cfg.algorithm in ALGORITHMS.names():
        cfg.sampling.guidance_scale = ALGORITHMS.get(cfg.algorithm).default_guidance_scale


def _one_of(value, allowed, key):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"'{key}' is {value!r}; choose one of {', '.join(map(str, allowed))}{hint}")


def _positive(value, key, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Field ranges and cross-field rules; names, not models, are checked against the registries."""
    from diffrl.pipelines.registry import resolve_family
    from diffrl.rewards import list_rewards
    from diffrl.trainers import ALGORITHMS

    if cfg.algorithm in LM_ALGORITHMS:
        _validate_lm(cfg)
        return
    _one_of(cfg.algorithm, ALGORITHMS.names() + list(LM_ALGORITHMS), "algorithm")
    _one_of(cfg.reward, list_rewards(), "reward")
    if cfg.data.eval_reward is not None:
        _one_of(cfg.data.eval_reward, list_rewards(), "data.eval_reward")
    eval_set_specs(cfg.data)
    _validate_mixture(cfg)
    try:
        family = cfg.policy.family or resolve_family(cfg.model)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"'model': {exc}") from None
    _one_of(family, ("sd", "sd3", "flux"), "policy.family")

    p, s, t, g, lg = cfg.policy, cfg.sampling, cfg.train, cfg.grpo, cfg.logging
    _one_of(p.dtype, ("float32", "bfloat16", "float16", "float64"), "policy.dtype")
    _one_of(p.attention_backend, ("sdpa", "xformers", "native", "flash", "_native_flash", "_native_math", "_native_efficient"), "policy.attention_backend")
    _positive(p.resolution, "policy.resolution")
    if p.resolution % 16:
        raise ConfigError(f"'policy.resolution' must be a multiple of 16 (VAE and patch size), got {p.resolution}")
    _positive(p.lora_rank, "policy.lora_rank", allow_zero=True)
    if s.guidance_scale is None:
        raise ConfigError("'sampling.guidance_scale' is unset: build the config with load_config or call apply_algorithm_defaults")
    _positive(s.guidance_scale, "sampling.guidance_scale", allow_zero=True)
    _positive(s.num_steps, "sampling.num_steps")
    _positive(s.eval_num_steps, "sampling.eval_num_steps")
    _one_of(s.logprob_reduction, ("mean", "sum"), "sampling.logprob_reduction")
    flow = family in ("sd3", "flux")
    sampler = resolve_sampler(cfg, flow)
    _one_of(sampler, ("flow_sde", "flow_ode", "flow_dpm2", "ddim"), "sampling.sampler")
    if flow and sampler == "ddim":
        raise ConfigError(f"'sampling.sampler' ddim needs a UNet (sd) model; '{cfg.model}' is a flow model ({family}): "
                          "use flow_sde, flow_ode or flow_dpm2")
    if not flow and sampler.startswith("flow"):
        raise ConfigError(f"'sampling.sampler' {sampler} needs a flow model; '{cfg.model}' is a UNet (sd) model: use ddim")
    for key in ("prompts_per_iteration", "group_size", "rollout_batch_size", "train_batch_size", "num_inner_epochs"):
        _positive(getattr(t, key), f"train.{key}")
    _positive(t.learning_rate, "train.learning_rate")
    _one_of(t.mixed_precision, ("no", "bf16", "fp16"), "train.mixed_precision")
    samples = t.prompts_per_iteration * t.group_size
    if samples % t.train_batch_size:
        raise ConfigError(
            f"'train.train_batch_size' ({t.train_batch_size}) must divide train.prompts_per_iteration * "
            f"train.group_size ({samples} samples per process per iteration)"
        )
    if t.micro_batch_size is not None:
        _positive(t.micro_batch_size, "train.micro_batch_size")
        if t.train_batch_size % t.micro_batch_size:
            raise ConfigError(f"'train.micro_batch_size' ({t.micro_batch_size}) must divide train.train_batch_size ({t.train_batch_size})")
        if cfg.algorithm == "grpo" and t.micro_batch_size != t.train_batch_size:
            raise ConfigError("'train.micro_batch_size' is used by nft, crd and prdp; grpo runs each train batch in one pass: leave it unset")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"'train.ema_decay' must be in [0, 1), got {t.ema_decay}")
    _one_of(lg.log_with, ("tensorboard", "wandb", "none"), "logging.log_with")
    import importlib.util

    if lg.log_with != "none" and importlib.util.find_spec(lg.log_with) is None:
        extra = ' (pip install "diffrl[wandb]")' if lg.log_with == "wandb" else ""
        raise ConfigError(f"'logging.log_with' is {lg.log_with!r} but that package is not installed{extra}; or use 'none'")
    _positive(lg.eval_every, "logging.eval_every", allow_zero=True)
    _positive(lg.save_every, "logging.save_every", allow_zero=True)
    _positive(cfg.max_iterations, "max_iterations")

    if cfg.algorithm == "grpo":
        _positive(g.clip_range, "grpo.clip_range")
        _positive(g.kl_beta, "grpo.kl_beta", allow_zero=True)
        _one_of(g.kl_convention, ("flow_grpo", "exact"), "grpo.kl_convention")
        _one_of(g.std_scope, ("global", "group", "none"), "grpo.std_scope")
        if not 0 < g.timestep_fraction <= 1:
            raise ConfigError(f"'grpo.timestep_fraction' must be in (0, 1], got {g.timestep_fraction}")
        if g.std_ddof not in (0, 1):
            raise ConfigError(f"'grpo.std_ddof' must be 0 or 1, got {g.std_ddof}")
        if sampler in ("flow_ode", "flow_dpm2") or (sampler == "ddim" and s.eta == 0):
            raise ConfigError(
                f"grpo needs a stochastic sampler for its log-probabilities: 'sampling.sampler' {sampler} "
                "(like ddim with 'sampling.eta' 0) gives none"
            )
        if flow and s.noise_level <= 0:
            raise ConfigError("'sampling.noise_level' must be > 0 for grpo: the flow SDE needs noise for log-probs")
        if g.kl_beta > 0 and p.lora_rank == 0:
            raise ConfigError(
                "'grpo.kl_beta' > 0 needs a frozen reference, which diffrl takes as the base model with the LoRA "
                "adapter disabled; with 'policy.lora_rank' 0 there is none. Set policy.lora_rank > 0 or grpo.kl_beta=0"
            )
    if s.sde_window_size < 0 or s.sde_window_size > s.num_steps:
        raise ConfigError(f"'sampling.sde_window_size' must be in 0..sampling.num_steps ({s.num_steps}), got {s.sde_window_size}")
    if s.sde_window_size and (sampler in ("flow_ode", "flow_dpm2") or (sampler == "ddim" and s.eta == 0)):
        raise ConfigError(f"'sampling.sde_window_size' needs a stochastic sampler; 'sampling.sampler' {sampler} draws no noise")
    if s.sde_window_range is not None:
        lo_hi = list(s.sde_window_range)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= s.num_steps:
            raise ConfigError(f"'sampling.sde_window_range' must be [lo, hi) with 0 <= lo < hi <= num_steps ({s.num_steps}), got {lo_hi}")
        if s.sde_window_size == 0:
            raise ConfigError("'sampling.sde_window_range' is set but 'sampling.sde_window_size' is 0 (every step stochastic): set a window size")
        if lo_hi[1] - lo_hi[0] < s.sde_window_size:
            raise ConfigError(f"'sampling.sde_window_range' {lo_hi} is shorter than 'sampling.sde_window_size' {s.sde_window_size}")
    if cfg.algorithm in ("nft", "crd"):
        _validate_forward_process(cfg)
    if cfg.algorithm == "prdp":
        _validate_prdp(cfg, sampler, flow)
    if ALGORITHMS.get(cfg.algorithm).needs_differentiable_reward:
        _validate_reward_backprop(cfg)


def eval_set_specs(data: DataConfig) -> dict[str, tuple[str | None, int]]:
    """The evaluation sets, headline first: name -> (prompt spec, how many of its first prompts); a spec of
    None is the training prompts. Raises ConfigError naming the field of a malformed entry."""
    _positive(data.num_eval_prompts, "data.num_eval_prompts")
    _positive(data.eval_images_per_prompt, "data.eval_images_per_prompt")
    if data.eval_batch_size is not None:
        _positive(data.eval_batch_size, "data.eval_batch_size")
    if not data.eval_name.isidentifier():
        raise ConfigError(f"'data.eval_name' must be a plain name (letters, digits, _), got {data.eval_name!r}")
    specs = {data.eval_name: (data.eval_prompts, data.num_eval_prompts)}
    for name, entry in data.eval_sets.items():
        key = f"data.eval_sets.{name}"
        if not str(name).isidentifier() or name in specs:
            raise ConfigError(f"'{key}': a set needs a plain name (letters, digits, _) other than {sorted(specs)}")
        if isinstance(entry, str):
            entry = {"prompts": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("prompts"), str) or set(entry) - {"prompts", "num_prompts"}:
            raise ConfigError(f"'{key}' must be a prompt spec or {{prompts: SPEC, num_prompts: N}}, got {entry!r}")
        n = entry.get("num_prompts", data.num_eval_prompts)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"'{key}.num_prompts' must be an integer >= 1, got {n!r}")
        specs[name] = (entry["prompts"], n)
    return specs


def _validate_mixture(cfg: RunConfig) -> None:
    """rewards / reward_combine / reward_source_weights (a reward mixture)."""
    from diffrl.rewards import list_rewards
    from diffrl.rewards.mixture import parse_mixture

    _one_of(cfg.reward_combine, ("sum_then_normalize", "normalize_then_sum"), "reward_combine")
    if not cfg.rewards:
        if cfg.reward_source_weights:
            raise ConfigError("'reward_source_weights' needs a mixture in 'rewards' (e.g. rewards: {pickscore: 1.0, ocr: 0.7})")
        return
    if cfg.reward_kwargs:
        raise ConfigError("'reward_kwargs' belongs to 'reward'; with a mixture in 'rewards' give each reward's "
                          "kwargs as rewards.NAME: {weight: w, kwargs: {...}}")
    for name in cfg.rewards:
        _one_of(name, list_rewards(), f"rewards.{name}")
    try:
        parse_mixture(cfg.rewards)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for source, table in cfg.reward_source_weights.items():
        if not isinstance(table, dict):
            raise ConfigError(f"'reward_source_weights.{source}' must map reward names to weights, got {table!r}")
        for name, weight in table.items():
            if name not in cfg.rewards:
                raise ConfigError(f"'reward_source_weights.{source}.{name}' is not a reward of the mixture "
                                  f"({', '.join(cfg.rewards)})")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"'reward_source_weights.{source}.{name}' must be a number, got {weight!r}")


def resolve_sampler(cfg: RunConfig, flow: bool) -> str:
    """The rollout sampler's name: sampling.sampler, else the algorithm's default on flow models, ddim on UNets."""
    from diffrl.trainers import ALGORITHMS

    if cfg.sampling.sampler:
        return cfg.sampling.sampler
    return ALGORITHMS.get(cfg.algorithm).default_flow_sampler if flow else "ddim"


def _check_decay(schedule, key: str) -> None:
    if len(schedule) != 4:
        raise ConfigError(f"'{key}' must be [start_step, start_value, slope, max], got {list(schedule)}")
    start_step, start_value, slope, max_value = schedule
    if start_step < 0 or slope < 0 or not 0 <= start_value <= 1 or not 0 <= max_value <= 1:
        raise ConfigError(
            f"'{key}' {list(schedule)}: start_step and slope must be >= 0 and start_value, max in [0, 1] "
            "(a decay of 1 freezes the snapshot, 0 copies the trained weights)"
        )


def _validate_forward_process(cfg: RunConfig) -> None:
    """nft / crd: LoRA snapshots, timestep draws, and (crd) batches of whole prompt groups."""
    name = cfg.algorithm
    f, t = getattr(cfg, name), cfg.train
    if cfg.policy.lora_rank == 0:
        raise ConfigError(
            f"'policy.lora_rank' must be > 0 for {name}: its snapshots of the trained weights are extra LoRA adapters on "
            "the same network and its reference is that network with the adapters disabled; a full fine-tune "
            "(lora_rank 0) would need extra copies of the whole model in memory"
        )
    _one_of(f.timestep_source, ("schedule", "uniform", "logit_normal"), f"{name}.timestep_source")
    if not 0 < f.timestep_fraction <= 1:
        raise ConfigError(f"'{name}.timestep_fraction' must be in (0, 1], got {f.timestep_fraction}")
    _positive(f.logit_normal_std, f"{name}.logit_normal_std")
    _positive(f.adv_clip_max, f"{name}.adv_clip_max")
    _positive(f.beta, f"{name}.beta")
    _check_decay(f.old_decay, f"{name}.old_decay")
    if name == "nft":
        _positive(f.kl_coef, "nft.kl_coef", allow_zero=True)
        return
    _one_of(f.loss, ("mse", "bce"), "crd.loss")
    _positive(f.kl_beta, "crd.kl_beta", allow_zero=True)
    _positive(f.kl_floor, "crd.kl_floor", allow_zero=True)
    if f.reward_adaptive_kl and f.kl_beta > 0 and f.kl_floor > f.kl_beta:
        raise ConfigError(f"'crd.kl_floor' ({f.kl_floor}) must not exceed crd.kl_beta ({f.kl_beta}): it is the KL weight at a = 0")
    _positive(f.ref_guidance_scale, "crd.ref_guidance_scale")
    _check_decay(f.sampling_decay, "crd.sampling_decay")
    K = t.group_size
    if K < 2:
        raise ConfigError("'train.group_size' must be >= 2 for crd: rewards are centred within a prompt group, so a group of one carries no signal")
    # a process draws whole groups (the loop never splits a prompt across processes); its batches must too
    for key in ("train_batch_size", "micro_batch_size"):
        size = getattr(t, key)
        if size is not None and size % K:
            raise ConfigError(
                f"'train.{key}' ({size}) must be a multiple of train.group_size ({K}) for crd: it centres rewards "
                "within a prompt group, so every batch must hold whole groups"
            )


def _validate_prdp(cfg: RunConfig, sampler: str, flow: bool) -> None:
    """prdp: stochastic rollouts, a LoRA reference, and train batches of whole prompt groups (pairs within a group)."""
    c, t, s = cfg.prdp, cfg.train, cfg.sampling
    _positive(c.beta, "prdp.beta")
    if c.clip_range is not None:
        _positive(c.clip_range, "prdp.clip_range")
    if not 0 < c.timestep_fraction <= 1:
        raise ConfigError(f"'prdp.timestep_fraction' must be in (0, 1], got {c.timestep_fraction}")
    if sampler in ("flow_ode", "flow_dpm2") or (sampler == "ddim" and s.eta == 0) or (flow and s.noise_level <= 0):
        raise ConfigError(f"prdp needs a stochastic sampler for its log-probabilities: 'sampling.sampler' {sampler} "
                          f"(eta {s.eta}, noise_level {s.noise_level}) draws no noise; use ddim with eta 1 (DDPM) or flow_sde")
    if cfg.policy.lora_rank == 0:
        raise ConfigError("'policy.lora_rank' must be > 0 for prdp: its implicit reward is a log-ratio to the reference, "
                          "the base model with the LoRA adapter disabled")
    if t.group_size < 2:
        raise ConfigError("'train.group_size' must be >= 2 for prdp: it regresses reward differences of same-prompt pairs")
    if t.train_batch_size % t.group_size:
        raise ConfigError(f"'train.train_batch_size' ({t.train_batch_size}) must be a multiple of train.group_size "
                          f"({t.group_size}) for prdp: a gradient step pairs the samples of whole prompt groups")


def _validate_reward_backprop(cfg: RunConfig) -> None:
    """easytune / draft: a differentiable training reward (read without loading it) and their options."""
    from diffrl.rewards.mixture import parse_mixture
    from diffrl.rewards.registry import declares_differentiable, differentiable_rewards

    name, t, n = cfg.algorithm, cfg.train, cfg.sampling.num_steps
    parts = {k: (f"rewards.{k}", kw) for k, (_, kw) in parse_mixture(cfg.rewards).items()} if cfg.rewards else \
        {cfg.reward: ("reward", cfg.reward_kwargs)}
    for reward, (key, kwargs) in parts.items():
        if not declares_differentiable(reward, kwargs):
            raise ConfigError(
                f"'{key}' {reward} is not differentiable; {name} back-propagates the reward into the model. Use one of "
                f"{', '.join(differentiable_rewards())} (CLIP-family rewards with kwargs differentiable: true)")
    if t.micro_batch_size is not None:
        raise ConfigError(f"'train.micro_batch_size' is not used by {name}: a train batch is one batch of sampling chains; leave it unset")
    if t.num_inner_epochs != 1:
        raise ConfigError(f"'train.num_inner_epochs' must be 1 for {name}: it samples anew for every optimiser step")
    if name == "easytune":
        e = cfg.easytune
        if not 0 < e.window_fraction <= 1:
            raise ConfigError(f"'easytune.window_fraction' must be in (0, 1], got {e.window_fraction}")
        _one_of(e.score_on, ("x0", "x_prev"), "easytune.score_on")
        if not 0 <= e.curriculum_fraction <= 1:
            raise ConfigError(f"'easytune.curriculum_fraction' must be in [0, 1], got {e.curriculum_fraction}")
        _positive(e.reward_scale, "easytune.reward_scale")
        return
    d = cfg.draft
    _one_of(d.mode, ("draft_k", "refl", "alignprop"), "draft.mode")
    if d.k is not None and not 1 <= d.k <= n:
        raise ConfigError(f"'draft.k' must be in 1..sampling.num_steps ({n}), or null for all steps; got {d.k}")
    lo_hi = list(d.refl_range)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
        raise ConfigError(f"'draft.refl_range' must be [lo, hi] fractions of the steps with 0 <= lo < hi <= 1, got {lo_hi}")
    if not 0 <= d.keep_prob <= 1:
        raise ConfigError(f"'draft.keep_prob' must be in [0, 1], got {d.keep_prob}")
    _positive(d.reward_scale, "draft.reward_scale")


def _apply_lm_defaults(cfg: RunConfig) -> None:
    """Resolve the lm.* options left None to the algorithm's values (LM_ALGORITHMS)."""
    lm, preset = cfg.lm, LM_ALGORITHMS[cfg.algorithm]
    for key in ("std_scope", "loss_aggregation", "kl_beta", "dynamic_sampling"):
        if getattr(lm, key) is None:
            setattr(lm, key, preset[key])
    if lm.clip_high is None:
        lm.clip_high = preset["clip_high"] if preset["clip_high"] is not None else lm.clip_low
    if lm.norm_constant is None and lm.loss_aggregation == "seq_mean_token_sum_norm":
        lm.norm_constant = float(lm.max_new_tokens)


def _validate_lm(cfg: RunConfig) -> None:
    """Language-model runs (diffrl.lm): the causal LM, its data and rewards, lm.*, train.*, logging.*."""
    import importlib.util

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
    _one_of(lm.reward_combine, ("sum_then_normalize", "normalize_then_sum"), "lm.reward_combine")
    _positive(lm.num_eval, "lm.num_eval")
    _positive(lm.max_new_tokens, "lm.max_new_tokens")
    _positive(lm.temperature, "lm.temperature")
    if not 0 < lm.top_p <= 1:
        raise ConfigError(f"'lm.top_p' must be in (0, 1], got {lm.top_p}")
    _positive(lm.top_k, "lm.top_k", allow_zero=True)
    _one_of(lm.std_scope, ("group", "none"), "lm.std_scope")
    if lm.std_ddof not in (0, 1):
        raise ConfigError(f"'lm.std_ddof' must be 0 or 1, got {lm.std_ddof}")
    _positive(lm.std_eps, "lm.std_eps", allow_zero=True)
    if lm.adv_clip is not None:
        _positive(lm.adv_clip, "lm.adv_clip")
    _one_of(lm.loss_aggregation, AGGREGATIONS.names(), "lm.loss_aggregation")
    if lm.norm_constant is not None:
        _positive(lm.norm_constant, "lm.norm_constant")
        if lm.loss_aggregation != "seq_mean_token_sum_norm":
            raise ConfigError(f"'lm.norm_constant' is only used by lm.loss_aggregation seq_mean_token_sum_norm, not {lm.loss_aggregation}")
    if not 0 <= lm.clip_low < 1:
        raise ConfigError(f"'lm.clip_low' must be in [0, 1), got {lm.clip_low}")
    _positive(lm.clip_high, "lm.clip_high", allow_zero=True)
    _positive(lm.kl_beta, "lm.kl_beta", allow_zero=True)
    _one_of(lm.kl_estimator, KL_ESTIMATORS.names(), "lm.kl_estimator")
    _positive(lm.dynamic_sampling_rounds, "lm.dynamic_sampling_rounds")
    lo_hi = list(lm.nft_rhat_clamp)
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] < 1:
        raise ConfigError(f"'lm.nft_rhat_clamp' must be [lo, hi] with 0 < lo <= hi < 1, got {lo_hi}")
    _positive(lm.nft_negative_clamp, "lm.nft_negative_clamp")

    _one_of(p.dtype, ("float32", "bfloat16", "float16", "float64"), "policy.dtype")
    _positive(p.lora_rank, "policy.lora_rank", allow_zero=True)
    for key in ("prompts_per_iteration", "group_size", "rollout_batch_size", "train_batch_size", "num_inner_epochs"):
        _positive(getattr(t, key), f"train.{key}")
    if t.group_size < 2:
        raise ConfigError(f"'train.group_size' must be >= 2 for {cfg.algorithm}: advantages are relative to the prompt's group")
    _positive(t.learning_rate, "train.learning_rate")
    _one_of(t.mixed_precision, ("no", "bf16", "fp16"), "train.mixed_precision")
    samples = t.prompts_per_iteration * t.group_size
    if samples % t.train_batch_size:
        raise ConfigError(f"'train.train_batch_size' ({t.train_batch_size}) must divide train.prompts_per_iteration * "
                          f"train.group_size ({samples} completions per process per iteration)")
    if t.micro_batch_size is not None:
        _positive(t.micro_batch_size, "train.micro_batch_size")
        if t.train_batch_size % t.micro_batch_size:
            raise ConfigError(f"'train.micro_batch_size' ({t.micro_batch_size}) must divide train.train_batch_size ({t.train_batch_size})")
    if t.ema:
        raise ConfigError(f"'train.ema' is not supported by {cfg.algorithm} (the LM trainer evaluates the trained weights)")
    _one_of(lg.log_with, ("tensorboard", "wandb", "none"), "logging.log_with")
    if lg.log_with != "none" and importlib.util.find_spec(lg.log_with) is None:
        raise ConfigError(f"'logging.log_with' is {lg.log_with!r} but that package is not installed; or use 'none'")
    _positive(lg.eval_every, "logging.eval_every", allow_zero=True)
    _positive(lg.save_every, "logging.save_every", allow_zero=True)
    _positive(cfg.max_iterations, "max_iterations")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def to_flat_dict(cfg: RunConfig) -> dict[str, Any]:
    """Dotted keys -> scalars (for tracker hyper-parameter tables)."""
    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return out
