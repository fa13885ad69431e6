"""Training from Python, exactly as `diffrl train` does it (the command calls `train` too):

    import diffrl
    diffrl.train("configs/quickstart.yaml", "max_iterations=10")            # a recipe and key=value overrides
    diffrl.train(diffrl.RunConfig(model="tiny-sd3", reward="brightness"))  # a config built in Python
    diffrl.train("configs/image/tiny_sd3_jpeg.yaml", reward=my_reward, prompts=["a cat", "a dog"])

`reward`: a Reward instance or subclass, or a function (samples, prompts, metadata) -> one score per sample
(mark it `fn.differentiable = True` when it is built from torch ops). `prompts` / `eval_prompts`: a list of
strings or a diffrl.data.PromptSet (records with metadata, e.g. GenEval's). Whatever the source, the config is
merged onto the defaults, given the algorithm's defaults and validated before any model loads, so a Python run
and the same run from the command line are the same run, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffrl.config import RunConfig, build_config, config_layers, load_config, override_layers
from diffrl.data import PromptSet
from diffrl.lm.config import LM_ALGORITHMS


def resolve_config(config: RunConfig | str | Path | dict | None = None, *overrides: str, reward: Any = None) -> RunConfig:
    """A validated RunConfig from a RunConfig, a YAML recipe, a mapping of options or None (the defaults), then
    `key=value` overrides; `reward` (a Python object) replaces the config's reward."""
    from diffrl.rewards.registry import use_reward

    extra = [*overrides, *([f"reward={use_reward(reward)}"] if reward is not None else [])]
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, extra)
    base = config_layers(config) if isinstance(config, RunConfig) else dict(config)
    return build_config(base, *override_layers(extra))


def _prompt_set(prompts) -> PromptSet | None:
    if prompts is None or isinstance(prompts, PromptSet):
        return prompts
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings or a diffrl.data.PromptSet")
    return PromptSet(prompts, [{"prompt": p} for p in prompts])


def build_trainer(config=None, *overrides: str, reward=None, prompts=None, eval_prompts=None, accelerator=None):
    """The trainer of the run (diffrl.trainers.loop.Trainer, or diffrl.lm.trainer.LMTrainer for lm_* algorithms),
    models loaded, ready to `.train()`."""
    cfg = resolve_config(config, *overrides, reward=reward)
    if cfg.algorithm not in LM_ALGORITHMS:
        from diffrl.sections import check_reward_arguments

        check_reward_arguments(cfg, service=True)  # e.g. a remote reward's server, before any model loads
    if cfg.algorithm in LM_ALGORITHMS:  # language-model RL on the shared core (diffrl.lm)
        if prompts is not None or eval_prompts is not None:
            raise ValueError(f"{cfg.algorithm}: give the prompts as lm.train_data / lm.eval_data files")
        from diffrl.lm.trainer import LMTrainer

        return LMTrainer(cfg, accelerator)
    from diffrl.trainers.loop import Trainer

    return Trainer(cfg, accelerator, prompts=_prompt_set(prompts), eval_prompts=_prompt_set(eval_prompts))


def train(config=None, *overrides: str, reward=None, prompts=None, eval_prompts=None, accelerator=None) -> list[dict]:
    """Train the run (see the module docstring); returns the metrics rows of its iterations."""
    return build_trainer(config, *overrides, reward=reward, prompts=prompts, eval_prompts=eval_prompts,
                         accelerator=accelerator).train()
