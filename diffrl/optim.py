"""The optimiser step every trainer takes (diffusion and LM): clip, then step only on a finite gradient.

A NaN or inf anywhere (a poisoned weight, a reward that overflowed, a bad batch) reaches the gradient norm;
stepping on it would write NaN into every weight and the optimiser's moments, and every later step and
checkpoint would carry them. `GuardedStep` skips such a step instead (weights and optimiser state untouched),
counts it, and stops the run with `NonFiniteTrainingError` after `train.max_nonfinite_steps` in a row.
Imports only torch: diffrl.trainers and diffrl.lm use it; diffrl.core and diffrl.sampling do not.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite numbers it cannot step past: too many non-finite gradient norms in a row,
    or non-finite trainable tensors about to be checkpointed."""

    names_checkpoint: bool = False
    """True once the message names the last good checkpoint (diffrl.runloop.TrainLoop.nonfinite_error)."""


class GuardedStep:
    """Clip (accelerator.clip_grad_norm_; max_grad_norm None or 0: no clipping), then optimizer.step() if the
    gradient norm is finite, else skip the step; zero the gradients either way. Call it after the backward(s)
    of one step: `grad_norm = guard(optimizer)`.

    Counts `skipped` (steps skipped since start_iteration) and `consecutive` (skipped in a row, across
    iterations); the `max_nonfinite_steps`-th skip in a row raises NonFiniteTrainingError."""

    def __init__(self, accelerator, max_grad_norm: float | None, max_nonfinite_steps: int):
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm or math.inf
        self.max_nonfinite_steps = max_nonfinite_steps
        self.iteration: int | None = None
        """The iteration being trained, as metrics.jsonl numbers it (1 for the first); set by start_iteration."""
        self.skipped = 0
        self.consecutive = 0
        self.stepped = False
        """Whether the last call stepped the optimiser."""
        self.before_step: Callable[[], None] | None = None
        """Called after clipping, right before a step is taken (SaRA adds its nuclear-norm gradient there)."""
        self.after_step: Callable[[torch.optim.Optimizer], object] | None = None
        """Called with the optimizer after a step was taken (SaRA counts steps and re-masks there)."""

    @classmethod
    def from_config(cls, accelerator, train) -> "GuardedStep":
        """From a diffrl.sections.TrainConfig (train.max_grad_norm, train.max_nonfinite_steps)."""
        return cls(accelerator, train.max_grad_norm, train.max_nonfinite_steps)

    def start_iteration(self, iteration: int) -> None:
        """A new iteration (numbered as metrics.jsonl does): resets `skipped`, keeps the run of skips in a row."""
        self.iteration, self.skipped = iteration, 0

    def __call__(self, optimizer: torch.optim.Optimizer) -> float:
        """One optimiser step on the accumulated gradients of the optimizer's parameters; returns the gradient norm
        before clipping."""
        # The decision reads only the norm accelerate returns. Under DDP the gradients are all-reduced before it
        # is computed (a NaN loss on one process makes every process's gradient NaN), so every process computes
        # the same norm and takes the same decision: the weights stay identical across processes.
        # the optimizer's own parameters: under FSDP2 a module's parameter attributes are gathered views between a
        # forward and the next backward, and the gradients live on the sharded parameters the optimizer holds
        params = [p for group in optimizer.param_groups for p in group["params"]]
        reported = self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        grad_norm = math.nan if reported is None else float(reported)
        # DeepSpeed clips and skips overflowing steps itself and may report no norm: then the step is its business
        self.stepped = reported is None or math.isfinite(grad_norm)
        if self.stepped:
            if self.before_step is not None:
                self.before_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if self.after_step is not None:
                self.after_step(optimizer)
            self.consecutive = 0
            return grad_norm
        scaler = getattr(self.accelerator, "scaler", None)
        scale_may_be_the_cause = scaler is not None and scaler.get_scale() > 1
        if scaler is not None:
            # fp16 loss scaling: clip_grad_norm_ unscaled the gradients and the scaler recorded the overflow; its
            # update() lowers the scale (without it the next unscale would fail) and never touches the weights
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        # a scaled fp16 gradient may overflow because the loss scale is too large: the scaler halves it and the
        # next step retries, so only overflows at a scale <= 1 count towards the limit
        if not scale_may_be_the_cause:
            self.consecutive += 1
        if self.consecutive >= self.max_nonfinite_steps:
            where = f" (the last in iteration {self.iteration})" if self.iteration is not None else ""
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimiser steps in a row had a non-finite gradient norm (NaN/inf){where}; each was "
                f"skipped, and train.max_nonfinite_steps is {self.max_nonfinite_steps}. A NaN/inf loss, reward or weight "
                "reaches the gradient: check the loss and reward columns of metrics.jsonl")
        return grad_norm


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf."""
    return [name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's state tensors (AdamW's moments and steps), named "<param index>.<key>" as its state_dict
    numbers the parameters (diffrl.checkpoint writes them under these names)."""
    return {f"{idx}.{key}": value for idx, state in optimizer.state_dict()["state"].items()
            for key, value in state.items() if torch.is_tensor(value)}
