"""Pure sampler steps with exact log-probabilities (Flow-GRPO flow SDE, Euler and DPM-Solver++(2M) ODEs, DDPO DDIM)
and the forward (noising) process used by the forward-process trainers."""

from diffrl.sampling.ddim import ddim_step
from diffrl.sampling.flow import flow_dpm2_step, flow_ode_step, flow_sde_step
from diffrl.sampling.forward import add_noise, predict_x0, training_target
from diffrl.sampling.gaussian import StepOutput, gaussian_log_prob
from diffrl.sampling.sampler import SAMPLERS, Sampler, make_sampler
from diffrl.sampling.schedule import Schedule

__all__ = [
    "SAMPLERS",
    "Sampler",
    "Schedule",
    "StepOutput",
    "add_noise",
    "ddim_step",
    "flow_dpm2_step",
    "flow_ode_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "make_sampler",
    "predict_x0",
    "training_target",
]
