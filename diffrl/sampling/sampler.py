"""`Sampler`: picks the step function by name and reads its schedule values at a step index."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.sampling.ddim import PREDICTION_TYPES, ddim_step
from diffrl.sampling.flow import flow_dpm2_step, flow_ode_step, flow_sde_step
from diffrl.sampling.gaussian import StepOutput, check_reduction
from diffrl.sampling.schedule import Schedule

SAMPLERS = ("flow_sde", "flow_ode", "ddim", "flow_dpm2")
_SCHEDULE_KIND = {"flow_sde": "flow", "flow_ode": "flow", "ddim": "ddim", "flow_dpm2": "flow"}


@dataclass
class Sampler:
    """A named pure step function with its noise settings; no model calls."""

    kind: str
    """One of SAMPLERS: "flow_sde" (Flow-GRPO), "flow_ode" (Euler), "ddim" (DDPO, eta), "flow_dpm2" (DPM-Solver++(2M) ODE)."""
    noise_level: float = 0.7
    """Flow SDE noise level a in std_t = a sqrt(sigma / (1 - sigma)) (Flow-GRPO default 0.7)."""
    eta: float = 1.0
    """DDIM noise scale: std = eta * sigma_t; 1.0 = DDPM ancestral sampling (DDPO default)."""
    reduction: str = "mean"
    """Log-prob reduction over latent elements: "mean" (Flow-GRPO / DDPO) or "sum"."""
    window: tuple[int, int] | None = None
    """Steps [start, end) that draw noise when stepped with an int index; the others take the
    deterministic step (Euler / DDIM eta 0) and return no log-prob (MixGRPO, Flow-GRPO-Fast).
    None: every step. Per-sample tensor indices (re-scoring stored steps) are always stochastic."""

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; valid: {', '.join(SAMPLERS)}")
        check_reduction(self.reduction)
        if self.noise_level < 0:
            raise ValueError(f"Sampler.noise_level must be >= 0, got {self.noise_level}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"Sampler.eta must lie in [0, 1], got {self.eta}")
        if self.window is not None:
            start, end = self.window
            if not 0 <= start < end:
                raise ValueError(f"Sampler.window must be [start, end) with 0 <= start < end, got {self.window}")

    def in_window(self, index: int) -> bool:
        """Whether step `index` (an int) is stochastic under `window`."""
        return self.window is None or self.window[0] <= index < self.window[1]

    @property
    def stochastic(self) -> bool:
        """Whether steps draw noise (and return log-probs)."""
        if self.kind in ("flow_ode", "flow_dpm2"):
            return False
        if self.kind == "flow_sde":
            return self.noise_level > 0
        return self.eta > 0

    def step(
        self,
        schedule: Schedule,
        index: int | torch.Tensor,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        *,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prediction_type: str = "flow",
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> StepOutput:
        """Step i of `schedule` from `sample` [B, *S] given the model output [B, *S].

        `index`: an int (all samples at the same step) or LongTensor[B] (per-sample steps, e.g.
        when re-scoring random timesteps of stored trajectories). `prediction_type`: "flow"
        (velocity) for the flow samplers, "epsilon", "v_prediction" or "sample" (x0) for ddim. `history`: the previous
        step's (sample, model output), used by the multistep "flow_dpm2" (None at the first step) and
        ignored by the one-step samplers.
        """
        want = _SCHEDULE_KIND[self.kind]
        if schedule.kind != want:
            raise ValueError(f"sampler {self.kind!r} needs a {want!r} schedule, got {schedule.kind!r}")
        if isinstance(index, torch.Tensor):
            index = index.to(torch.long)
        elif not self.in_window(index):
            deterministic = Sampler("flow_ode" if want == "flow" else "ddim", eta=0.0, reduction=self.reduction)
            return deterministic.step(schedule, index, sample, model_output, prediction_type=prediction_type)
        if want == "flow":
            if prediction_type != "flow":
                raise ValueError(f"sampler {self.kind!r} needs prediction_type 'flow', got {prediction_type!r}")
            sigmas = schedule.sigmas
            if sigmas is None:
                raise ValueError("flow schedule has no sigmas")
            if isinstance(index, torch.Tensor):
                sigmas = sigmas.to(index.device)
            sigma, sigma_prev = sigmas[index], sigmas[index + 1]  # [] or [B]
            if self.kind == "flow_ode":
                return flow_ode_step(sample, model_output, sigma, sigma_prev)
            if self.kind == "flow_dpm2":
                last_sample, last_velocity = history if history is not None else (None, None)
                sigma_last = sigmas[index - 1] if history is not None else None  # [] or [B]
                return flow_dpm2_step(sample, model_output, sigma, sigma_prev, last_sample=last_sample,
                                      last_velocity=last_velocity, sigma_last=sigma_last)
            return flow_sde_step(
                sample, model_output, sigma, sigma_prev,
                noise_level=self.noise_level, sigma_max=sigmas[1], prev_sample=prev_sample,
                generator=generator, reduction=self.reduction,
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"sampler 'ddim' needs prediction_type in {PREDICTION_TYPES}, got {prediction_type!r}")
        alphas = schedule.alphas_cumprod
        if alphas is None:
            raise ValueError("ddim schedule has no alphas_cumprod")
        if isinstance(index, torch.Tensor):
            alphas = alphas.to(index.device)
        return ddim_step(
            sample, model_output, alphas[index], alphas[index + 1],  # [] or [B]
            eta=self.eta, prediction_type=prediction_type, prev_sample=prev_sample,
            generator=generator, reduction=self.reduction,
        )


def make_sampler(name: str, **kwargs) -> Sampler:
    """Build a Sampler by name (one of SAMPLERS); kwargs set noise_level / eta / reduction."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return Sampler(kind=name, **kwargs)
