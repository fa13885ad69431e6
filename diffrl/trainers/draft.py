"""Direct reward backpropagation through the sampling chain: DRaFT-K, ReFL and AlignProp.

Every train batch samples its chains from the rollout's initial noise with the current weights, scores
the result with a differentiable reward, `loss = -scale mean(R)`, and takes one optimiser step:
  * draft_k (DRaFT-K, Clark et al. ICLR 2024): the reward gradient flows through the last K sampling
    steps; the first N - K run without gradient and x_{N-K} is a constant. K = 1 is DRaFT-1, K = N the
    full chain (AlignProp without truncation).
  * refl (ReFL, ImageReward, Xu et al. NeurIPS 2023): no-gradient sampling down to a random late step j,
    one denoiser call with gradient, the one-step x0 prediction scored; the chain then finishes without
    gradient, for the logged sample only.
  * alignprop (AlignProp, Prabhudesai et al. 2023, randomised truncation): every step before the last
    keeps its gradient with probability p, the last always; a dropped step's model output is detached
    (as AlignProp's code does), while the latent chain stays connected, so gradients still reach kept
    steps before it. p = 1 is the full chain, p = 0 is DRaFT-1.
With `checkpoint_steps` each denoiser call with gradient runs under torch.utils.checkpoint, so the chain
keeps only each step's input and recomputes its activations in backward: memory grows with the number
of steps by a few latents per step, not by a network's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from diffrl.checks import ConfigError, check_fields, fraction, positive
from diffrl.trainers.reward_backprop import Chain, RewardBackprop, optimizer_step, reward_loss, reward_of

MODES = ("draft_k", "refl", "alignprop")


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

    def check(self, key: str = "draft") -> None:
        check_fields(self, key, {"mode": MODES, "k": positive, "reward_scale": positive})
        fraction(self.keep_prob, f"{key}.keep_prob", allow_zero=True)
        lo_hi = list(self.refl_range)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            raise ConfigError(f"'{key}.refl_range' must be [lo, hi] fractions of the steps with 0 <= lo < hi <= 1, got {lo_hi}")


def keep_mask(num_steps: int, mode: str, k: int | None, keep_prob: float, generator: torch.Generator) -> torch.Tensor:
    """[N] bool: the steps whose denoiser call carries the reward gradient (draft_k, alignprop)."""
    if mode == "draft_k":
        first = 0 if k is None else max(0, num_steps - k)
        return torch.arange(num_steps) >= first
    keep = torch.rand(num_steps, generator=generator) < keep_prob  # [N]
    keep[-1] = True  # the last step always: the reward needs one path to the weights
    return keep


def refl_steps(num_steps: int, lo: float, hi: float) -> tuple[int, int]:
    """[first, last] step ReFL draws from: floor(lo N) .. ceil(hi N) - 1 (ImageReward: 30 .. 39 of 40)."""
    first = min(int(lo * num_steps), num_steps - 1)
    return first, max(first, min(num_steps, math.ceil(hi * num_steps)) - 1)


class Draft(RewardBackprop):
    name = "draft"
    config_class = DraftConfig

    @classmethod
    def validate(cls, cfg, ctx) -> None:
        super().validate(cfg, ctx)
        n, k = cfg.sampling.num_steps, cfg.draft.k
        if k is not None and not 1 <= k <= n:
            raise ConfigError(f"'draft.k' must be in 1..sampling.num_steps ({n}), or null for all steps; got {k}")

    def train_chain(self, chain: Chain, noise, prompts, metadata, optimizer):
        d = self.cfg.draft
        if d.mode == "refl":
            r, x, samples, extra = self.refl_chain(chain, noise, prompts, metadata)
        else:
            r, x, samples, extra = self.backprop_chain(chain, noise, prompts, metadata)
        loss = reward_loss(r, d.reward_scale)
        grad_norm = optimizer_step(loss, optimizer, self.policy, self.accelerator, self.step_guard)
        return x, samples, {"loss": loss.detach(), "reward_grad_mean": r.detach().nanmean(), "grad_norm": grad_norm, **extra}

    def backprop_chain(self, chain: Chain, noise, prompts, metadata):
        """DRaFT-K / AlignProp: the whole chain, gradients through the kept steps' denoiser calls."""
        d = self.cfg.draft
        keep = keep_mask(len(chain.schedule), d.mode, d.k, d.keep_prob, chain.generator)  # [N]
        x, history = noise, None  # [b, *S]; requires grad from the first kept step on
        for i in range(len(chain.schedule)):
            out = chain.predict(i, x, grad=bool(keep[i]), checkpointed=d.checkpoint_steps)  # [b, *S]
            step = chain.step(i, x, out, history)
            history = (x, out)
            x = step.prev_sample
        r, samples = reward_of(self.policy, self.reward, x, prompts, metadata)  # [b]
        return r, x, samples, {"kept_steps": float(keep.sum())}

    def refl_chain(self, chain: Chain, noise, prompts, metadata):
        """ReFL: one denoiser call with gradient at a random late step j, its x0 prediction scored."""
        d = self.cfg.draft
        first, last = refl_steps(len(chain.schedule), *d.refl_range)
        j = int(torch.randint(first, last + 1, (1,), generator=chain.generator))
        x, history, r = noise, None, None
        for i in range(len(chain.schedule)):
            out = chain.predict(i, x, grad=i == j)  # [b, *S]
            if i == j:
                r, _ = reward_of(self.policy, self.reward, chain.x0(i, x, out), prompts, metadata)  # [b]
                out = out.detach()  # the rest of the chain only makes the logged sample
            with torch.no_grad():
                x_next = chain.step(i, x, out, history).prev_sample
            history = (x, out)
            x = x_next
        with torch.no_grad():
            samples = self.policy.decode(x)
        return r, x, samples, {"refl_step": float(j)}
