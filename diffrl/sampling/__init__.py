"""Pure sampler steps with exact log-probabilities (Flow-GRPO flow SDE, Euler ODE, DDPO DDIM)."""

from diffrl.sampling.ddim import ddim_step
from diffrl.sampling.flow import flow_ode_step, flow_sde_step
from diffrl.sampling.gaussian import StepOutput, gaussian_log_prob
from diffrl.sampling.sampler import SAMPLERS, Sampler, make_sampler
from diffrl.sampling.schedule import Schedule

__all__ = [
    "SAMPLERS",
    "Sampler",
    "Schedule",
    "StepOutput",
    "ddim_step",
    "flow_ode_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "make_sampler",
]
