"""RL guidance (RLG): steer a reward-fine-tuned model at inference by mixing it with its base model.

At denoising step i, with both models guided by classifier-free guidance at the same scale g:

    v_rl   = CFG_g(v_tuned),   v_ref = CFG_g(v_base)
    v      = v_ref + w_i (v_rl - v_ref)

w = 0 is the base model, w = 1 the fine-tuned one, 0 < w < 1 interpolates and w > 1 extrapolates
(sampling roughly p_ref^(1-w) p_theta^w, like training with KL coefficient beta / w), so alignment
strength is tuned after training without retraining. "tuned" is the denoiser with its LoRA adapter
on, "base" the same network with the adapter off (no second copy in memory), or a separate base
denoiser module.

Where the mixing happens: inside the denoiser call. CFG is affine in the model outputs, so per
branch (uncond, cond) `w CFG(tuned) + (1 - w) CFG(base) == CFG(w tuned + (1 - w) base)` exactly; mixing
each denoiser call's output therefore equals the formula above with any CFG the caller applies
afterwards (stock pipelines, `Policy.predict`, FLUX true CFG, SD3 skip-layer guidance), and the
tuned and base evaluations can share one batched forward: the call's rows are duplicated and peft's
mixed-adapter batch runs the first copy with the adapter and the second without. A step costs two
guided denoiser evaluations in one forward of twice the batch (two forwards with a separate base
denoiser, or when the adapter cannot be batched: several active adapters, DoRA, merged weights);
a step with w = 0 or w = 1 runs one evaluation (the base or the tuned model alone).

Two entry points share that denoiser-level mixing:

- `RLGuidedPolicy(policy, scale)`: a `Policy` with the same `predict` interface, for the rollout
  loop with any sampler (ODE, SDE, DDIM), `diffrl sample --rlg-scale` and `diffrl eval`.
- `rl_guidance(pipe, scale)`: on a stock diffusers pipeline (SD3, FLUX, SD, Wan) with a LoRA loaded by
  `pipe.load_lora_weights(dir)`; `with rl_guidance(pipe, scale=1.5): images = pipe(...).images`.

Nothing here depends on the latents' shape: video latents [B, C, F', h, w] are mixed like images'. On
Wan2.2 the mixing is on the experts that carry the LoRA (`transformer`, the high-noise expert, by default;
through a policy also `transformer_2` when both or only it train); a frozen expert's steps run it alone, both
the base and the tuned model there. On a stock pipeline only `transformer` is mixed.

`scale` is a float (constant w) or a `GuidanceSchedule` (linear ramp, base model for the first steps).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

SHARED_ARGUMENTS = frozenset({"txt_ids", "img_ids"})
"""Denoiser arguments shared by the whole batch and never duplicated, whatever their first dimension
(FLUX's per-token position ids [L, 3]). Every other tensor argument whose first dimension is the batch
size of the main input (dicts of them included) is duplicated for the batched tuned + base forward."""

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


# ---- the weight schedule ------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidanceSchedule:
    """The RL guidance weight w_i of step i of N (i counts denoising steps from the noisiest).

    Constant by default. With `start_scale` w ramps linearly from `start_scale` at the first guided
    step to `scale` at the last step. The first `skip_steps` steps run with w = `skip_scale`
    (RL guidance off; 0 = the base model alone, docs/algorithms.md, RL guidance: "the first steps may run without it").
    """

    scale: float = 1.0
    """w: 0 = base model, 1 = fine-tuned model, > 1 extrapolates (the final value of a ramp)."""
    start_scale: float | None = None
    """None: constant w; else w at the first guided step of a linear ramp up (or down) to `scale`."""
    skip_steps: int = 0
    """The first n denoising steps use `skip_scale` instead of the schedule."""
    skip_scale: float = 0.0
    """w during the skipped steps: 0 samples them with the base model, 1 with the fine-tuned one."""

    def __post_init__(self) -> None:
        values = {"scale": self.scale, "start_scale": self.start_scale, "skip_scale": self.skip_scale}
        bad = [f"{k}={v!r}" for k, v in values.items() if v is not None and not math.isfinite(v)]
        if bad:
            raise ValueError(f"GuidanceSchedule values must be finite, got {', '.join(bad)}")
        if self.skip_steps < 0:
            raise ValueError(f"GuidanceSchedule.skip_steps must be >= 0, got {self.skip_steps}")

    @property
    def constant(self) -> bool:
        """Whether w is the same at every step (no step index needed)."""
        return self.start_scale is None and self.skip_steps == 0

    def weight(self, step: int, num_steps: int) -> float:
        """w at step `step` (0-based) of `num_steps`."""
        if not 0 <= step < num_steps:
            raise ValueError(f"step {step} outside a {num_steps}-step schedule")
        if step < self.skip_steps:
            return float(self.skip_scale)
        if self.start_scale is None:
            return float(self.scale)
        span = num_steps - 1 - self.skip_steps  # steps from the first guided one to the last
        frac = (step - self.skip_steps) / span if span > 0 else 1.0
        return float(self.start_scale + (self.scale - self.start_scale) * frac)

    def weights(self, num_steps: int) -> list[float]:
        return [self.weight(i, num_steps) for i in range(num_steps)]


def as_schedule(scale: float | GuidanceSchedule) -> GuidanceSchedule:
    return scale if isinstance(scale, GuidanceSchedule) else GuidanceSchedule(scale=float(scale))


# ---- one guided denoiser call ---------------------------------------------------------------------
def _tuner_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def batchable_adapter(net: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """(the one active LoRA adapter, the LoRA layers) of `net` when tuned and base rows can share a peft
    mixed-adapter batch; None when they cannot (no LoRA, other peft tuners, several active adapters,
    DoRA, merged weights). Read at every call: adapters may be switched between pipeline calls."""
    from peft.tuners.lora import LoraLayer

    layers = _tuner_layers(net)
    if not layers or not all(isinstance(layer, LoraLayer) for layer in layers):
        return None
    active = {tuple(layer.active_adapters) for layer in layers}
    if len(active) != 1 or len(next(iter(active))) != 1:
        return None
    (name,) = next(iter(active))
    for layer in layers:
        if layer.merged or layer.disable_adapters or layer.use_dora.get(name, False):
            return None
    return name, layers


@contextlib.contextmanager
def _row_adapters(layers: list[nn.Module], names: list[str]) -> Iterator[None]:
    """Every LoRA layer runs row b of its input with adapter names[b] (peft's mixed-adapter batch)."""

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[None]:
    """The base network: every peft adapter layer of `net` off, then restored as it was (peft's toggle
    also flips the adapters' requires_grad, which is restored too)."""
    layers = _tuner_layers(net)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no peft adapter to disable: load a LoRA or pass a base denoiser")
    was_disabled = [layer.disable_adapters for layer in layers]
    grads = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, off in zip(layers, was_disabled):
            layer.enable_adapters(not off)
        for p, g in grads:
            p.requires_grad_(g)


def _map(fn: Callable, *outs):
    """Apply `fn` to corresponding tensors of denoiser outputs (a tensor, a tuple, or a diffusers BaseOutput)."""
    from diffusers.utils import BaseOutput

    first = outs[0]
    if isinstance(first, torch.Tensor):
        return fn(*outs)
    if isinstance(first, BaseOutput):
        return type(first)(**{k: _map(fn, *(o[k] for o in outs)) for k in first.keys()})
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *items) for items in zip(*outs))
    raise TypeError(f"cannot mix denoiser outputs of type {type(first).__name__}")


def mix(base, tuned, w: float):
    """v_base + w (v_tuned - v_base), computed in at least float32 and returned in the outputs' dtype."""

    def one(b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(b.dtype, torch.float32)
        return (b.to(wide) + w * (t.to(wide) - b.to(wide))).to(b.dtype)  # [N, ...]

    return _map(one, base, tuned)


def _duplicate_rows(value, n: int):
    """[n, ...] -> [2n, ...] (two copies stacked) for a batched tensor, recursing into dicts."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
        return torch.cat([value, value])  # [2n, ...]
    if isinstance(value, dict):
        return {k: _duplicate_rows(v, n) for k, v in value.items()}
    return value


class GuidedCall:
    """What one denoiser call computes under RL guidance: the tuned and the base output of the same
    inputs, mixed with weight w. `net` is the tuned denoiser (LoRA on) and `base` an optional separate
    base denoiser; without it the base is `net` with its adapter off."""

    def __init__(self, net: nn.Module, base: nn.Module | None = None, batched: bool = True):
        if base is None and not _tuner_layers(net):
            raise ValueError(
                f"RL guidance needs a fine-tuned and a base model: {type(net).__name__} has no LoRA adapter. "
                "Load one (pipe.load_lora_weights(dir) / policy.load_lora(dir)) or pass the base denoiser."
            )
        self.net, self.base, self.batched = net, base, batched
        self._signature = inspect.signature(type(net).forward)  # the class's, whatever wraps the instance

    def _bind(self, args, kwargs) -> inspect.BoundArguments:
        return self._signature.bind(self.net, *args, **kwargs)  # names positional arguments (self first)

    def __call__(self, forward: Callable, args: tuple, kwargs: dict, w: float):
        """`forward(*args, **kwargs)` is the tuned denoiser's own forward."""
        if w == 1.0:  # the tuned model alone
            return forward(*args, **kwargs)
        if self.base is not None:
            base = self.base(*args, **kwargs)
            return base if w == 0.0 else mix(base, forward(*args, **kwargs), w)
        batchable = batchable_adapter(self.net) if self.batched else None
        if batchable is None:  # two forwards: adapter off, then on
            with adapters_disabled(self.net):
                base = forward(*args, **kwargs)
            return base if w == 0.0 else mix(base, forward(*args, **kwargs), w)
        bound = self._bind(args, kwargs)
        params = list(bound.arguments)
        x = bound.arguments[params[1]]  # the main input (hidden_states / sample) [N, ...]
        n = x.shape[0]
        adapter, layers = batchable
        if w == 0.0:  # every row without the adapter: exactly the base network, one forward of N rows
            with _row_adapters(layers, [BASE_ADAPTER] * n):
                return forward(*args, **kwargs)
        for name in params[1:]:
            if name not in SHARED_ARGUMENTS:
                bound.arguments[name] = _duplicate_rows(bound.arguments[name], n)
        with _row_adapters(layers, [adapter] * n + [BASE_ADAPTER] * n):  # rows [tuned N, base N]
            out = forward(*bound.args[1:], **bound.kwargs)  # [2N, ...]
        tuned, base = _map(lambda t: t[:n], out), _map(lambda t: t[n:], out)  # [N, ...] each
        return mix(base, tuned, w)


@contextlib.contextmanager
def _method_replaced(obj, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """`obj.<name>` is `wrap(the method obj had)` until the context exits, then exactly as before (an
    instance attribute it had, e.g. an accelerate offload hook's forward, comes back too)."""
    had_own = name in obj.__dict__
    own = obj.__dict__.get(name)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, own)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _forward_replaced(net: nn.Module, guided: Callable[[Callable, tuple, dict], object]) -> Iterator[None]:
    """Calls of `net` (module call, any wrapper around it) run `guided(forward, args, kwargs)`, where
    `forward` is the forward `net` had, until the context exits."""
    if getattr(net, "_diffrl_rl_guidance", False):
        raise RuntimeError(f"RL guidance is already on for this {type(net).__name__}")
    net._diffrl_rl_guidance = True
    try:
        with _method_replaced(net, "forward", lambda inner: lambda *a, **k: guided(inner, a, k)):
            yield
    finally:
        del net._diffrl_rl_guidance


# ---- on a Policy (the rollout loop, diffrl sample / eval) ------------------------------------------
class RLGuidedPolicy:
    """A `Policy` whose `predict` is the RL-guided mix of the policy's tuned (LoRA on) and base
    (LoRA off, or `base_denoiser`) models, each with CFG at the caller's guidance scale.

    Everything else (encode_prompt, initial_noise, decode, ...) is the wrapped policy's. A
    non-constant schedule reads the step index by matching the timestep against the schedule last
    built by this wrapper's `schedule(n)`, which the rollout loop passes in exactly.
    """

    def __init__(self, policy, scale: float | GuidanceSchedule = 1.0, *, base_denoiser: nn.Module | None = None,
                 batched: bool = True):
        self.policy = policy
        self.guidance = as_schedule(scale)
        self.call = GuidedCall(policy.trainable_module(), base_denoiser, batched)
        self._timesteps: torch.Tensor | None = None  # [N] of the last schedule(n)

    def __getattr__(self, name):  # the rest of the Policy interface
        if name == "policy":
            raise AttributeError(name)
        return getattr(self.policy, name)

    def schedule(self, num_steps: int):
        sched = self.policy.schedule(num_steps)
        self._timesteps = sched.timesteps
        return sched

    def weight_at(self, timestep: torch.Tensor) -> float:
        """w for a batch at one step: timestep [B] (all equal) located in the last schedule."""
        if self.guidance.constant:
            return self.guidance.scale
        if self._timesteps is None:
            raise RuntimeError("a stepwise RL guidance schedule needs RLGuidedPolicy.schedule(n) before predict")
        t = timestep.reshape(-1)
        if not bool((t == t[0]).all()):
            raise ValueError("RL guidance schedules need one timestep per batch (got several)")
        hits = (self._timesteps.to(t.device) == t[0]).nonzero()
        if len(hits) != 1:
            raise ValueError(f"timestep {float(t[0])} is not a step of the last schedule({len(self._timesteps)})")
        return self.guidance.weight(int(hits[0, 0]), len(self._timesteps))

    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, cond, guidance_scale: float) -> torch.Tensor:
        """RL-guided model output [B, *S] at (x_t [B, *S], timestep [B]) with CFG applied to each model."""
        w = self.weight_at(timestep)
        with _forward_replaced(self.call.net, lambda fwd, a, k: self.call(fwd, a, k, w)):
            return self.policy.predict(x_t, timestep, cond, guidance_scale)  # [B, *S]


# ---- on a stock diffusers pipeline ------------------------------------------------------------------
DENOISER_COMPONENTS = ("transformer", "unet")


class RLGuidance:
    """RL guidance installed on a stock diffusers pipeline; built by `rl_guidance(pipe, scale)`.

    The pipeline's denoiser (its `transformer` or `unet`) computes the guided mix on every call; the
    scheduler's `set_timesteps` / `step` are followed to know the step index for `GuidanceSchedule`s.
    `remove()` (or leaving the `with` block) restores both. Assign `schedule` to change w between calls.
    """

    def __init__(self, pipe, scale: float | GuidanceSchedule = 1.0, *, base: nn.Module | None = None,
                 batched: bool = True):
        names = [n for n in DENOISER_COMPONENTS if isinstance(getattr(pipe, n, None), nn.Module)]
        if len(names) != 1:
            raise ValueError(f"{type(pipe).__name__} has no single denoiser among {DENOISER_COMPONENTS}")
        for name, module in pipe.components.items():
            if name == names[0] or not isinstance(module, nn.Module) or not _tuner_layers(module):
                continue
            why = ("its prompt embeddings would differ between the base and the tuned model" if name.startswith("text_encoder")
                   else f"only {names[0]} is mixed, so {name}'s steps would run the tuned model alone")  # Wan2.2's expert 2
            raise ValueError(f"RL guidance mixes denoiser outputs; {name} carries a LoRA too ({why}). "
                             "Load a denoiser-only LoRA.")
        self.pipe = pipe
        self.schedule = scale
        self.denoiser = getattr(pipe, names[0])
        self.call = GuidedCall(self.denoiser, base, batched)
        self.scheduler = pipe.scheduler
        self.step_index = 0  # denoising steps taken in the current pipeline call
        self.num_steps: int | None = None
        self._exits = contextlib.ExitStack()
        try:
            self._exits.enter_context(_forward_replaced(self.denoiser, self._guided))
            self._follow_scheduler()
        except BaseException:
            self._exits.close()
            raise

    @property
    def schedule(self) -> GuidanceSchedule:
        """The weight schedule; assign a float or a `GuidanceSchedule` to change it between calls."""
        return self._schedule

    @schedule.setter
    def schedule(self, value: float | GuidanceSchedule) -> None:
        self._schedule = as_schedule(value)

    def _follow_scheduler(self) -> None:
        """Count the scheduler's steps: set_timesteps starts a pipeline call, each step() ends a step."""
        sched = self.scheduler

        # functools.wraps keeps the signature: pipelines inspect set_timesteps' parameters
        def on_set_timesteps(inner):
            @functools.wraps(inner)
            def run(*args, **kwargs):
                out = inner(*args, **kwargs)
                self.step_index, self.num_steps = 0, len(sched.timesteps)
                return out
            return run

        def on_step(inner):
            @functools.wraps(inner)
            def run(*args, **kwargs):
                out = inner(*args, **kwargs)
                self.step_index += 1
                return out
            return run

        self._exits.enter_context(_method_replaced(sched, "set_timesteps", on_set_timesteps))
        self._exits.enter_context(_method_replaced(sched, "step", on_step))

    def weight(self) -> float:
        """w of the pipeline's current step."""
        schedule = self._schedule
        if schedule.constant:
            return schedule.scale
        if self.pipe.scheduler is not self.scheduler:
            raise RuntimeError("pipe.scheduler was replaced while RL guidance was on: set the scheduler first")
        if self.num_steps is None:
            raise RuntimeError("a stepwise RL guidance schedule needs the pipeline to call scheduler.set_timesteps")
        return schedule.weight(self.step_index, self.num_steps)

    def _guided(self, forward, args, kwargs):
        if getattr(self.pipe, "_guidance_rescale", 0.0) > 0:
            raise ValueError("RL guidance is exact only for affine CFG; guidance_rescale > 0 is not supported")
        return self.call(forward, args, kwargs, self.weight())

    def remove(self) -> None:
        """Turn RL guidance off: the pipeline's denoiser and scheduler are as before."""
        self._exits.close()

    def __enter__(self) -> "RLGuidance":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def rl_guidance(pipe, scale: float | GuidanceSchedule = 1.0, *, base: nn.Module | None = None,
                batched: bool = True) -> RLGuidance:
    """Turn RL guidance on for a stock diffusers pipeline (StableDiffusion3Pipeline, FluxPipeline,
    StableDiffusionPipeline, ...) whose denoiser carries a LoRA loaded with `pipe.load_lora_weights`:

        pipe.load_lora_weights("outputs/run/checkpoints/iter_000100/lora")
        with rl_guidance(pipe, scale=1.5):
            images = pipe(prompt, guidance_scale=4.5).images

    `scale`: w (0 base, 1 fine-tuned, > 1 extrapolates) or a `GuidanceSchedule`. `base`: a separate
    base denoiser called with the same arguments (the pipeline's then holds the fine-tuned weights).
    `batched=False` runs tuned and base as two forwards instead of one doubled batch. Without `with`,
    guidance stays on until `.remove()`.
    """
    return RLGuidance(pipe, scale, base=base, batched=batched)
