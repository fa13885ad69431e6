"""Spies for test_easytune.py and test_draft.py: the denoiser calls made with gradient, and what each optimiser
step saw; plus the trainer settings both use (tiny models, a differentiable reward with no metadata)."""

from __future__ import annotations

import torch

from diffrl.config import load_config
from diffrl.rewards.color import colorfulness
from diffrl.trainers.loop import Trainer

FAST = [
    "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "reward=colorfulness",
    "sampling.num_steps=4", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
    "train.prompts_per_iteration=1", "train.group_size=2", "train.rollout_batch_size=2", "train.train_batch_size=2",
    "train.adam_weight_decay=0", "train.learning_rate=1e-2", "logging.log_with=none", "logging.progress=false",
]
EXACT = ["policy.dtype=float64", "train.max_grad_norm=0"]  # float64, and the optimiser sees the raw gradient


def make_trainer(tmp_path, algorithm, *extra, model="tiny-sd3"):
    return Trainer(load_config(None, [*FAST, f"algorithm={algorithm}", f"model={model}", f"output_dir={tmp_path}", *extra]))


def spy_predict(policy) -> tuple[list[dict], object]:
    """Record every policy.predict call whose output carries a gradient; returns (calls, the original predict)."""
    calls, original = [], policy.predict

    def predict(x, t, cond, g):
        out = original(x, t, cond, g)
        if out.requires_grad:
            calls.append({"x": x.detach().clone(), "x_requires_grad": x.requires_grad, "t": t.clone(), "cond": cond})
        return out

    policy.predict = predict
    return calls, original


def record_steps(trainer) -> list[dict]:
    """Each optimiser step's gradients and the weights it started from."""
    steps, real = [], trainer.optimizer.step
    params = trainer.policy.trainable_parameters()

    def step(*args, **kwargs):
        steps.append({"grads": [p.grad.detach().clone() for p in params], "params": [p.detach().clone() for p in params]})
        return real(*args, **kwargs)

    trainer.optimizer.step = step
    return steps


def set_params(trainer, values) -> None:
    with torch.no_grad():
        for p, v in zip(trainer.policy.trainable_parameters(), values):
            p.copy_(v)


def randomize_lora(trainer, scale: float = 0.05, seed: int = 1) -> None:
    """LoRA B starts at zero, which leaves A without gradient: give every LoRA tensor a random value."""
    gen = torch.Generator().manual_seed(seed)
    set_params(trainer, [scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in trainer.policy.trainable_parameters()])


def colorfulness_loss(policy, latents) -> torch.Tensor:
    """-mean colourfulness of the decoded latents, the loss every test recomputes by hand."""
    return -colorfulness(policy.decode(latents)).mean()


def update_once(trainer, seed: int = 0) -> dict:
    batch = trainer.rollout(0)
    trainer.policy.denoiser.train()
    return trainer.algorithm.update(batch, trainer.optimizer, torch.Generator().manual_seed(seed))
