"""The run configuration: one RunConfig from the sections their owners declare, read from a YAML recipe plus
`key=value` overrides, and validated before any model loads.

Sections and their owners: policy, sampling, data, train, advantages, logging (the loop, diffrl.sections);
grpo, nft, crd, prdp, easytune, draft (each algorithm, diffrl/trainers/<name>.py); lm (diffrl.lm.config). Each
checks its own fields; the algorithm of the run adds its cross-section rules (Algorithm.validate). Errors are
ConfigError naming the field, with the closest valid name for a misspelt key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrl.checks import ConfigError, one_of
from diffrl.core.registry import suggest
from diffrl.runloop import save_config
from diffrl.lm.config import LM_ALGORITHMS, LMConfig, apply_lm_defaults, validate_lm
from diffrl.sections import (AdvantageConfig, DataConfig, LoggingConfig, PolicyConfig, SamplingConfig, TrainConfig,
                             check_output_path, check_run)
from diffrl.trainers import ALGORITHMS
from diffrl.trainers.crd import CRDConfig
from diffrl.trainers.draft import DraftConfig
from diffrl.trainers.easytune import EasyTuneConfig
from diffrl.trainers.grpo import GRPOConfig
from diffrl.trainers.nft import NFTConfig
from diffrl.trainers.prdp import PRDPConfig

__all__ = ["ConfigError", "RunConfig", "build_config", "config_layers", "describe_options", "field_docs", "load_config",
           "override_layers", "save_config"]

FLUX_GUIDANCE = 3.5
"""sampling.guidance_scale left unset on a FLUX model: FLUX.1-dev's embedded guidance (not true CFG)."""

MOVED = {"grpo.std_scope": "advantages.std_scope", "grpo.std_ddof": "advantages.std_ddof", "grpo.std_eps": "advantages.std_eps"}
"""Keys that moved: an old recipe using one fails naming the new place."""


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
    overwrite: bool = False
    """Train into an output_dir that already holds a run: its metrics, evaluations and checkpoints are deleted first (without it such a run is refused)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    crd: CRDConfig = field(default_factory=CRDConfig)
    prdp: PRDPConfig = field(default_factory=PRDPConfig)
    easytune: EasyTuneConfig = field(default_factory=EasyTuneConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def in_use(self) -> dict:
        """The options this run reads, as a mapping (what config.yaml records): the sections of other algorithms
        are left out, and an lm_* run keeps only model, policy, train, lm and logging of the diffusion options."""
        data = OmegaConf.to_container(OmegaConf.structured(self))
        if self.algorithm in LM_ALGORITHMS:
            unused = ["reward", "reward_kwargs", "rewards", "reward_combine", "reward_source_weights", "reward_async",
                      "sampling", "data", "advantages", *ALGORITHM_SECTIONS]
        else:
            unused = ["lm", *(name for name in ALGORITHM_SECTIONS if name != self.algorithm)]
        return {k: v for k, v in data.items() if k not in unused}


ALGORITHM_SECTIONS = ("grpo", "nft", "crd", "prdp", "easytune", "draft")
"""The sections the algorithms own, named as the algorithms."""


DIFFUSION_SECTIONS = ("policy", "sampling", "data", "train", "advantages", *ALGORITHM_SECTIONS, "logging")
"""The sections a diffusion run checks, each by its own `check`, whatever the algorithm (lm runs check theirs)."""


def _section_types(cls) -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(cls)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}


# ---- help: field docstrings ----------------------------------------------------------------------
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


# ---- loading ---------------------------------------------------------------------------------------
def _check_keys(data: Any, cls, prefix: str = "") -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of options, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    sections = _section_types(cls)
    for key, value in data.items():
        if f"{prefix}{key}" in MOVED:
            raise ConfigError(f"'{prefix}{key}' moved to '{MOVED[prefix + key]}' (it applies to every algorithm)")
        if key not in valid:
            hint = suggest(key, valid).replace(" Did you mean '", f"; did you mean '{prefix}") or f"; valid keys here: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        if key in sections:
            _check_keys(value, sections[key], f"{prefix}{key}.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply `key=value` overrides, type-check and validate. Loads no model."""
    layers = recipe_layers(Path(path)) if path is not None else []
    return build_config(*layers, *override_layers(overrides or []))


def recipe_layers(path: Path, _seen: tuple[Path, ...] = ()) -> list[dict]:
    """A recipe's option mappings, its base recipes' first: `base: other.yaml` (a path relative to the recipe's
    folder) makes a recipe the base's options with its own on top, so a variant changes one line."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {_seen[-1]})" if _seen else ""))
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path} is its own base: {' -> '.join(map(str, _seen))} -> {path}")
    try:
        # the top level's type first: OmegaConf reads a bare word as a mapping {word: None}
        top = yaml.safe_load(path.read_text())
        data = OmegaConf.to_container(OmegaConf.load(path)) if isinstance(top, dict) else top
    except Exception as exc:  # yaml syntax errors: one line, as every config error
        raise ConfigError(f"cannot parse {path}: {' '.join(str(exc).split())}") from None
    if data is None:
        raise ConfigError(f"recipe {path} is empty: write the options to change (e.g. model: tiny-sd3), or leave "
                          "the recipe out to train with every default")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of options, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return [data]
    if not isinstance(base, str):
        raise ConfigError(f"'base' in {path} must be the path of another recipe, got {base!r}")
    return [*recipe_layers(path.parent / base, (*_seen, path.resolve())), data]


def override_layers(overrides: list[str]) -> list[dict]:
    """`key=value` items (dotted keys for sections) as option mappings, one per item."""
    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.learning_rate=1e-4)")
        try:
            layers.append(OmegaConf.to_container(OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse override '{item}': {exc}") from None
    return layers


def build_config(*layers: dict) -> RunConfig:
    """Merge option mappings (later ones win) onto the defaults, type-check, fill the algorithm's defaults and
    validate: what load_config does after reading the recipe and the overrides."""
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


def config_layers(cfg: RunConfig) -> dict:
    """A RunConfig as a mapping of options (the layer build_config merges), e.g. to re-validate one built in Python."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def apply_algorithm_defaults(cfg: RunConfig) -> None:
    """Fill the options whose default depends on the algorithm (sampling.guidance_scale; the lm.* presets), in
    place, so the saved config.yaml and every consumer see the value used."""
    if cfg.algorithm in LM_ALGORITHMS:
        apply_lm_defaults(cfg)
    elif cfg.sampling.guidance_scale is None and cfg.algorithm in ALGORITHMS:
        from diffrl.pipelines.registry import resolve_family

        try:
            family = resolve_family(cfg.model, cfg.policy.family)  # no weights read; errors are validation's
        except (ValueError, FileNotFoundError):
            family = None
        cfg.sampling.guidance_scale = FLUX_GUIDANCE if family == "flux" else ALGORITHMS.get(cfg.algorithm).default_guidance_scale


def validate(cfg: RunConfig) -> None:
    """Every section's own checks, the run-wide ones, then the algorithm's; ConfigError naming the field."""
    from diffrl.distributed import check_launch
    from diffrl.rewards.mixture import check_mixture

    check_launch(cfg, lm=cfg.algorithm in LM_ALGORITHMS)
    check_output_path(cfg)
    if cfg.algorithm in LM_ALGORITHMS:
        validate_lm(cfg)
        return
    one_of(cfg.algorithm, ALGORITHMS.names() + list(LM_ALGORITHMS), "algorithm")
    check_mixture(cfg)
    for name in DIFFUSION_SECTIONS:
        getattr(cfg, name).check(name)
    algorithm = ALGORITHMS.get(cfg.algorithm)
    ctx = check_run(cfg, algorithm.default_flow_sampler)
    if not algorithm.samples_in_update and cfg.train.group_size < 2:  # learns from group-relative advantages
        raise ConfigError(f"'train.group_size' must be >= 2 for {cfg.algorithm}: its advantages are rewards minus their "
                          "prompt's group mean, all 0 with one sample a prompt (nothing would be learned)")
    algorithm.validate(cfg, ctx)
    low = {cfg.policy.dtype, cfg.train.mixed_precision} & {"bfloat16", "float16", "bf16", "fp16"}
    if cfg.policy.merge_lora_for_rollout and algorithm.record_trajectory and low:
        raise ConfigError(f"'policy.merge_lora_for_rollout' in {sorted(low)[0]}: W + BA is rounded to it, so the rollout's "
                          f"log-probs, which {cfg.algorithm} keeps as the old policy's, are not the trained model's (tiny-sd3 "
                          "bf16: |log ratio| up to 7e-4 at the first step, against grpo's clip range of 1e-4); merge with "
                          "float32 weights, or for nft / crd, which keep no log-probs")
    cfg.sampling.sampler = ctx.sampler  # config.yaml records the sampler the run uses
