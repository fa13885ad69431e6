"""The policy seam: one small interface over a diffusers denoiser, whatever the model family.

Trainers, the evaluator and guidance see only `Policy`. An adapter (one file per family) wraps the
diffusers components and fills in encoding, the guided prediction, the schedule, noise and decoding.
The LoRA / SaRA / full fine-tune, reference and memory switches are the same for every family and live here.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import nn

from diffrl.sampling import Schedule

ATTENTION_BACKENDS = ("sdpa", "auto", "xformers", "native", "flash", "_native_flash", "_native_math", "_native_efficient")
CFG_GRADIENTS = ("both", "cond")  # Policy.cfg_gradient: the CFG branches a guided prediction back-propagates through


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it is float64: a float64 run stays float64 end to end."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def ddim_schedule(scheduler, num_steps: int) -> Schedule:
    """The N-step DDIM schedule of a DDIM-family scheduler (SD's DDIMScheduler, MDM's DDPMScheduler): timesteps as
    `set_timesteps(n)` gives them, alpha_cumprod at t and at the step's prev_timestep t - T // n, and once that is
    negative the final alpha the scheduler's own step uses: a DDIMScheduler's `set_alpha_to_one` (SD: False, so
    alpha_cumprod[0]), 1 for a DDPMScheduler, whose last step lands on the clean sample whatever its config says.
    Reads a copy: the scheduler's state is left alone."""
    from diffusers import DDIMScheduler, DDPMScheduler

    extra = {"set_alpha_to_one": True} if isinstance(scheduler, DDPMScheduler) else {}
    sched = DDIMScheduler.from_config(scheduler.config, **extra)
    sched.set_timesteps(num_steps)
    timesteps = sched.timesteps.clone()  # [N] int64
    prev = timesteps - sched.config.num_train_timesteps // num_steps  # [N]
    a_t = sched.alphas_cumprod[timesteps]  # [N]
    a_prev = torch.where(prev >= 0, sched.alphas_cumprod[prev.clamp(min=0)], sched.final_alpha_cumprod)  # [N]
    alphas = torch.cat([a_t[:1], a_prev])  # [N + 1]
    if not torch.equal(alphas[1:-1], a_t[1:]):
        raise ValueError(f"{type(scheduler).__name__} with timestep_spacing={sched.config.timestep_spacing!r} and "
                         f"{num_steps} steps does not chain (t_i - T // n != t_(i+1)); the Schedule cannot represent it")
    return Schedule(kind="ddim", timesteps=timesteps, alphas_cumprod=alphas)


@dataclass
class Condition:
    """Prompt conditioning for a batch: the adapter's keyword tensors, conditional and unconditional.

    Every tensor has the batch as its first dimension. `uncond` holds the negative-prompt
    embeddings used by classifier-free guidance (None for guidance-distilled models).
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    extra: dict[str, object] = field(default_factory=dict)  # non-batched settings (e.g. FLUX text ids)

    def __len__(self) -> int:
        return int(next(iter(self.cond.values())).shape[0])

    def index(self, idx: torch.Tensor | slice | list[int]) -> "Condition":
        pick = lambda d: None if d is None else {k: v[idx] for k, v in d.items()}  # noqa: E731
        return Condition(pick(self.cond), pick(self.uncond), dict(self.extra))

    def repeat_interleave(self, k: int) -> "Condition":
        rep = lambda d: None if d is None else {n: v.repeat_interleave(k, dim=0) for n, v in d.items()}  # noqa: E731
        return Condition(rep(self.cond), rep(self.uncond), dict(self.extra))

    def to(self, device) -> "Condition":
        mv = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Condition(mv(self.cond), mv(self.uncond), dict(self.extra))


class Policy(abc.ABC):
    """A denoiser with its text encoders, VAE and scheduler, behind the interface every trainer uses.

    Subclasses set `family`, `prediction_type` and implement the abstract methods. `denoiser` is the
    trainable network (UNet or transformer); trainers may replace it with an accelerate-wrapped
    module, so adapters must call `self.denoiser(...)` rather than a cached reference.
    """

    family: ClassVar[str]
    lora_component: ClassVar[str] = "transformer"  # the pipeline's name for the denoiser ("unet" for SD)
    sample_kind: ClassVar[str] = "image"  # what decode returns: "image" [B, 3, H, W] or "video" [B, F, 3, H, W]
    full_model_folder: ClassVar[str] = "denoiser"  # where a checkpoint of a full fine-tune puts the model folder
    prediction_type: str  # "flow" | "epsilon" | "v_prediction" | "sample" (x0-prediction)
    denoiser: nn.Module

    # ---- what each family implements -------------------------------------------------------
    @abc.abstractmethod
    def encode_prompt(self, prompts: list[str], negative_prompt: str = "") -> Condition:
        """Text-encode prompts (and the negative prompt for CFG) with no gradient."""

    @abc.abstractmethod
    def schedule(self, num_steps: int) -> Schedule:
        """The N-step schedule exactly as the family's diffusers pipeline would set it."""

    @abc.abstractmethod
    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial latents [B, *S] (unpacked), drawn like the diffusers pipeline draws them."""

    @abc.abstractmethod
    def predict(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Condition, guidance_scale: float) -> torch.Tensor:
        """Model output at (x_t [B, *S], timestep [B]) with classifier-free guidance folded in."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *S] -> samples in [0, 1] of `sample_kind` (images [B, 3, H, W], videos [B, F, 3, H, W]),
        float32 (float64 for a float64 policy)."""

    # ---- construction shared by every family ------------------------------------------------
    pipeline_class: ClassVar[type]  # the stock diffusers pipeline this adapter wraps

    @classmethod
    def from_pretrained(cls, path_or_hub_id, torch_dtype: torch.dtype = torch.float32, device="cpu",
                        height: int | None = None, width: int | None = None, **init_kwargs):
        """A local diffusers folder or a hub id already in the local HF cache (offline; never downloads).
        `init_kwargs` go to the adapter's constructor."""
        from diffrl.pipelines.registry import load_pipeline

        pipe = load_pipeline(cls.pipeline_class, str(path_or_hub_id), torch_dtype=torch_dtype, device=device)
        return cls(pipe, height=height, width=width, **init_kwargs)

    def pipeline(self):
        """The stock diffusers pipeline built from this policy's own components (no copies), holding the
        unwrapped denoiser (training may have replaced `self.denoiser` with a DDP/FSDP wrapper)."""
        for name, net in self.trained_networks().items():
            setattr(self.pipe, name, net)
        return self.pipe

    # ---- shared by every family -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.trainable_module().parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.trainable_module().parameters()).dtype

    def trainable_module(self) -> nn.Module:
        """The denoiser network itself (UNet / transformer, with its LoRA adapters), any DDP / DeepSpeed /
        torch.compile wrapper that accelerate.prepare put around `denoiser` removed: what is trained, saved and
        inspected."""
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(self.denoiser)

    def trained_networks(self) -> dict[str, nn.Module]:
        """The pipeline components that are trained (and carry the LoRA), by pipeline attribute name: the one
        denoiser, or Wan2.2's experts when both train (their `trainable_module()` is a module holding the two)."""
        return {self.lora_component: self.trainable_module()}

    def networks(self) -> list[nn.Module]:
        """Every denoiser network the model runs, trained or frozen (Wan2.2: both experts)."""
        return list(self.trained_networks().values())

    def add_lora(self, rank: int, alpha: float, target_modules: list[str] | None = None, dropout: float = 0.0,
                 compute_dtype: torch.dtype | None = None) -> None:
        """Attach a peft LoRA adapter named "default" to the denoiser (each of `trained_networks()`); base weights are
        frozen. `compute_dtype` torch.bfloat16 (on a bf16 base): the adapters compute in bf16, their float32
        parameters the master copy (diffrl.pipelines.performance.compute_lora_in); None: in float32, as stored."""
        from peft import LoraConfig

        for net in self.trained_networks().values():
            net.requires_grad_(False)
            config = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=dropout,
                init_lora_weights="gaussian",
                target_modules=target_modules or self.default_lora_targets(),
            )
            net.add_adapter(config)
        # trainable LoRA weights in float32 whatever the base dtype: optimizer updates at lr * 1e-3
        # scale vanish in bf16; peft casts activations to the adapter dtype and back
        for param in self.trainable_parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        if compute_dtype is not None and compute_dtype != torch.float32:
            if self.dtype != compute_dtype:
                raise ValueError(f"LoRA computing in {compute_dtype} needs a base model in it too; this one is {self.dtype}")
            self.lora_compute_dtype = compute_dtype
            self._compute_lora_in_its_dtype()

    def _compute_lora_in_its_dtype(self) -> None:
        """Re-apply the LoRA compute dtype to LoRA layers peft created since (a loaded LoRA, adapter copies)."""
        from diffrl.pipelines.performance import compute_lora_in

        if getattr(self, "lora_compute_dtype", None) is not None:
            for net in self.trained_networks().values():
                compute_lora_in(net, self.lora_compute_dtype)

    def default_lora_targets(self) -> list[str]:
        return ["to_q", "to_k", "to_v", "to_out.0"]

    def save_lora(self, directory) -> None:
        """Write the LoRA adapter as diffusers LoRA weights: `pipe.load_lora_weights(directory)` loads it.

        The adapter's peft config goes along as metadata; without it diffusers drops `lora_alpha`
        when alpha != rank and the reloaded model differs.
        """
        if not self.has_lora:
            raise RuntimeError(f"{type(self).__name__}.save_lora() needs a LoRA adapter; call add_lora() first")
        for component, net in self.trained_networks().items():
            self._write_lora(net, self.lora_folder(Path(directory), component))

    def lora_folder(self, directory: Path, component: str) -> Path:
        """Where `save_lora(directory)` writes the LoRA of pipeline component `component`: `directory` itself."""
        return directory

    def _write_lora(self, net: nn.Module, folder: Path) -> None:
        """`net`'s "default" adapter as a diffusers LoRA file in `folder`, keys under `lora_component`."""
        from peft.utils import get_peft_model_state_dict

        c = self.lora_component  # "unet" | "transformer"
        metadata = net.peft_config["default"].to_dict()
        if isinstance(metadata.get("target_modules"), (set, list)):  # a set: its order follows Python's string hashing
            metadata["target_modules"] = sorted(metadata["target_modules"])
        type(self.pipe).save_lora_weights(
            str(folder), **{f"{c}_lora_layers": get_peft_model_state_dict(net), f"{c}_lora_adapter_metadata": metadata})

    def lora_usage(self, folder: str = "path/to/this/folder") -> str:
        """The diffusers code that loads what `save_lora` wrote into `folder` (a model card's usage line)."""
        return f'pipe.load_lora_weights("{folder}")'

    def load_lora(self, directory) -> None:
        """Load LoRA weights saved by `save_lora` (or any diffusers LoRA for this family) as the
        trainable "default" adapter, replacing an existing one; base weights stay frozen."""
        directory = Path(directory)
        self._check_lora_card(directory)
        self._drop_lora()
        self._read_lora(directory, self.trainable_module())
        self._train_lora_only()
        self._compute_lora_in_its_dtype()

    @staticmethod
    def _require_lora_file(directory: Path) -> Path:
        weights = directory / "pytorch_lora_weights.safetensors"
        if not weights.is_file():
            nested = directory / "lora" / weights.name
            hint = f"; {directory} is a checkpoint folder: its LoRA is {directory / 'lora'}" if nested.is_file() else ""
            raise FileNotFoundError(f"no LoRA in {directory}: expected {weights.name} (a diffusers LoRA folder){hint}")
        return weights

    def _check_lora_card(self, directory: Path) -> None:
        """A LoRA trained by diffrl names its base model's family in README.md: refuse another family's."""
        card = directory / "README.md"  # written by diffrl training: the base model and its family
        if card.is_file() and card.read_text().startswith("---"):
            import yaml

            meta = yaml.safe_load(card.read_text().split("---")[1]) or {}
            if meta.get("family") not in (None, self.family):
                raise ValueError(f"the LoRA in {directory} was trained on {meta.get('base_model')} (a {meta['family']} "
                                 f"model); this is a {self.family} model")

    def _drop_lora(self) -> None:
        """Delete the "default" adapter wherever it is, so that a loaded LoRA replaces it instead of stacking."""
        for net in self.trained_networks().values():
            if getattr(net, "_hf_peft_config_loaded", False) and "default" in net.peft_config:
                net.delete_adapters("default")

    def _read_lora(self, directory: Path, net: nn.Module, **load_kwargs) -> None:
        """The diffusers LoRA file in `directory` into `net` (one of `trained_networks()`) as adapter "default",
        through the stock pipeline's `load_lora_weights(directory, **load_kwargs)`; ValueError unless every LoRA
        layer of the file found its module."""
        from safetensors import safe_open

        with safe_open(str(self._require_lora_file(directory)), "pt") as f:
            in_file = sum(k.startswith(f"{self.lora_component}.") and (".lora_A." in k or ".lora_down." in k) for k in f.keys())
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # a denoiser-only LoRA warns once per text encoder it lacks
        try:
            self.pipeline().load_lora_weights(str(directory), adapter_name="default", **load_kwargs)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        loaded = sum(".lora_A.default." in name for name, _ in net.named_parameters())
        if loaded == 0 or loaded < in_file:
            raise ValueError(f"the LoRA in {directory} does not fit this {self.family} model's {self.lora_component}: "
                             f"{loaded} of its {in_file} LoRA layers loaded (a LoRA of another model or family?)")

    def _train_lora_only(self) -> None:
        """Base weights frozen, every LoRA tensor of the trained networks trainable."""
        for net in self.trained_networks().values():
            net.requires_grad_(False)
            for name, p in net.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    p.requires_grad_(True)

    @property
    def has_lora(self) -> bool:
        return all(getattr(net, "_hf_peft_config_loaded", False) for net in self.trained_networks().values())

    # ---- SaRA and the full fine-tune: the other two ways to train ---------------------------------
    sara = None
    """The SaRA adapter (diffrl.pipelines.sara.SaraAdapter) once add_sara() ran, else None."""

    @property
    def adapter(self) -> str:
        """What trains: "lora", "sara" or "full" (every weight of the trained networks)."""
        return "sara" if self.sara is not None else "lora" if self.has_lora else "full"

    def add_sara(self, threshold: float = 2e-3, lambda_rank: float = 5e-4, remask_step: int | None = None,
                 seed: int = 0):
        """SaRA on the trained networks (diffrl.pipelines.sara): their entries with |P| < threshold train as sparse
        vectors, everything else is frozen. Returns the SaraAdapter (also `self.sara`)."""
        from diffrl.pipelines.sara import SaraAdapter

        if self.has_lora or self.sara is not None:
            raise RuntimeError(f"{type(self).__name__} already trains a {'LoRA' if self.has_lora else 'SaRA'} adapter")
        self.sara = SaraAdapter(self.trained_networks(), threshold, lambda_rank, remask_step, seed)
        return self.sara

    def train_full(self, keep_reference: bool = False) -> None:
        """Every weight of the trained networks trainable. `keep_reference`: keep a copy of them as the frozen
        reference (one more copy of the denoiser's weights in memory), for algorithms with a KL to the base."""
        self.trainable_module().requires_grad_(True)
        if keep_reference:
            self._weight_copies()["reference"] = [p.detach().clone() for p in self.trainable_parameters()]

    def _weight_copies(self) -> dict[str, list[torch.Tensor]]:
        """A full fine-tune's whole-weight copies by name (the reference, EMA snapshots), in trainable_parameters order."""
        return self.__dict__.setdefault("_full_weight_copies", {})

    @contextlib.contextmanager
    def _swapped(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """A full fine-tune run with `tensors` as its weights: each parameter's storage swapped (`.data`, no copy of the
        same dtype, no version bump), and swapped back on exit, before any backward of a graph made outside."""
        params = self.trainable_parameters()
        saved = [p.data for p in params]
        for p, t in zip(params, tensors, strict=True):
            p.data = t if t.dtype == p.dtype else t.to(p.dtype)
        try:
            yield
        finally:
            for p, s in zip(params, saved):
                p.data = s

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trainable_module().parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The frozen base model with no second copy: the LoRA adapter disabled, or SaRA's trained entries back at their
        originals; a full fine-tune swaps in the copy train_full(keep_reference=True) kept."""
        if self.sara is not None:
            with self.sara.reference():
                yield
            return
        if not self.has_lora and "reference" in self._weight_copies():
            with self._swapped(self._weight_copies()["reference"]):
                yield
            return
        if not self.has_lora:
            raise RuntimeError(
                f"{type(self).__name__}.reference() needs a LoRA or SaRA adapter: a full fine-tune has no frozen reference "
                "in memory unless it keeps a copy (train_full(keep_reference=True)). Add LoRA (policy.lora_rank > 0), "
                "train SaRA (policy.adapter=sara) or set the KL coefficient to 0."
            )
        nets = list(self.trained_networks().values())
        for net in nets:
            net.disable_adapters()
        try:
            yield
        finally:
            for net in nets:
                net.enable_adapters()

    # ---- extra LoRA adapters on the same network (EMA snapshots of the trained weights) -------
    def add_adapter_copy(self, name: str) -> None:
        """Another peft LoRA adapter `name` on the same network, with the "default" adapter's config and a
        float32 copy of its current weights, frozen; "default" stays the active, trainable adapter. The
        base weights are shared: a snapshot costs one more set of LoRA tensors, never a model copy.
        SaRA: a copy of its sparse vectors; a full fine-tune: a float32 copy of every trained weight."""
        import copy
        import warnings

        if self.sara is not None:
            self.sara.add_snapshot(name)
            return
        if not self.has_lora:
            if not self.trainable_parameters():
                raise RuntimeError(f"{type(self).__name__}.add_adapter_copy() needs trained weights: call add_lora(), "
                                   "add_sara() or train_full() first")
            if name in self._weight_copies():
                raise ValueError(f"weight copy {name!r} already exists")
            self._weight_copies()[name] = [at_least_float32(p.detach()).clone() for p in self.trainable_parameters()]
            return
        for component, net in self.trained_networks().items():
            if name in net.peft_config:
                raise ValueError(f"adapter {name!r} already exists on the {component}")
            with warnings.catch_warnings():  # peft warns whenever a second adapter joins a model
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                net.add_adapter(copy.deepcopy(net.peft_config["default"]), adapter_name=name)
            net.set_adapter("default")  # add_adapter activates the new one; peft also moves requires_grad back
        with torch.no_grad():
            for src, dst in zip(self.adapter_parameters("default"), self.adapter_parameters(name), strict=True):
                dst.data = src.detach().float().clone()

    def adapter_parameters(self, name: str = "default") -> list[nn.Parameter]:
        """The LoRA tensors of adapter `name`, in the same (module) order for every adapter. SaRA: the sparse vectors
        of snapshot `name` ("default": the trained values); a full fine-tune: the weights or the copy `name`."""
        if self.sara is not None:
            return self.sara.current() if name == "default" else self.sara.snapshot(name)
        if not self.has_lora:
            if name == "default":
                return self.trainable_parameters()
            if name not in self._weight_copies():
                raise KeyError(f"no weight copy named {name!r} (add_adapter_copy first)")
            return self._weight_copies()[name]
        net = self.trainable_module()
        marks = (f".lora_A.{name}.", f".lora_B.{name}.")
        params = [p for n, p in net.named_parameters() if any(m in n for m in marks)]
        if not params:
            raise KeyError(f"no LoRA adapter named {name!r} on the {self.lora_component}")
        return params

    @contextlib.contextmanager
    def use_adapter(self, name: str) -> Iterator[None]:
        """Run the network with LoRA adapter `name` instead of "default" (use under torch.no_grad(): peft
        marks the active adapter trainable until "default" is restored on exit). SaRA and a full fine-tune: with
        snapshot `name` written over the trained values, which are back on exit."""
        if self.sara is not None:
            with self.sara.use(name):
                yield
            return
        if not self.has_lora:
            with self._swapped(self.adapter_parameters(name)):
                yield
            return
        nets = list(self.trained_networks().values())
        for net in nets:
            net.set_adapter(name)
        try:
            yield
        finally:
            for net in nets:
                net.set_adapter("default")

    _cfg_gradient: str = "both"  # set within cfg_gradient()

    def classifier_free_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """uncond + g (cond - uncond) of a predict's two branches ([B, *S] each). Under cfg_gradient("cond") the
        unconditional branch is detached: the same value, a gradient through g * cond only."""
        if self._cfg_gradient == "cond":
            uncond = uncond.detach()
        return uncond + guidance_scale * (cond - uncond)

    @contextlib.contextmanager
    def cfg_gradient(self, mode: str) -> Iterator[None]:
        """Within: the classifier-free guidance of predict() back-propagates through "both" branches (the default:
        (1 - g) d uncond + g d cond, as DDPO's code) or through the "cond" branch only, the unconditional prediction
        detached (g d cond, as Flow-GRPO's train_sd3.py in its July 2025 revision). Values are unchanged either way."""
        if mode not in CFG_GRADIENTS:
            raise ValueError(f"cfg_gradient must be one of {CFG_GRADIENTS}, got {mode!r}")
        previous, self._cfg_gradient = self._cfg_gradient, mode
        try:
            yield
        finally:
            self._cfg_gradient = previous

    @contextlib.contextmanager
    def lora_off_rows(self, off: torch.Tensor) -> Iterator[None]:
        """Within: the rows of a predict() batch where `off` ([M] bool, on the model's device) is True run the frozen
        base model, as under reference(), while the other rows keep the LoRA: each LoRA layer's contribution (peft's
        lora_B output) is multiplied by 0 on those rows and by 1 on the others, so a row's output is exactly
        base(x) + 0 or base(x) + lora(x). Lets one denoiser call compute the policy and its reference side by side.
        A denoiser call of k * M rows (classifier-free guidance's [uncond; cond], built inside predict) repeats the
        pattern k times. Keep it open through backward: gradient checkpointing recomputes the forward there."""
        from peft.tuners.lora import LoraLayer

        if self.sara is not None or not self.has_lora:
            raise RuntimeError(f"{type(self).__name__}.lora_off_rows() needs a LoRA adapter (policy.adapter lora)")
        keep = (~off.bool()).reshape(-1)  # [M]
        patterns: dict[tuple, torch.Tensor] = {}

        def mask_rows(module, args, output):  # output: [k * M, ...] of one lora_B
            rows = output.shape[0]
            if rows % keep.shape[0]:
                raise RuntimeError(f"a LoRA layer saw {rows} rows, not a multiple of the {keep.shape[0]} rows of "
                                   "lora_off_rows: this model's predict splits its batch (e.g. Wan2.2 with rows on both "
                                   "experts), so the policy and reference rows cannot share one call")
            key = (rows, output.dtype, output.device)
            if key not in patterns:  # [k * M, 1, ...]
                patterns[key] = keep.to(device=output.device, dtype=output.dtype).repeat(rows // keep.shape[0])
            return output * patterns[key].view(rows, *([1] * (output.ndim - 1)))

        handles = [layer.lora_B[name].register_forward_hook(mask_rows)
                   for net in self.trained_networks().values() for layer in net.modules() if isinstance(layer, LoraLayer)
                   for name in layer.active_adapters if name in layer.lora_B]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def merged_lora(self) -> Iterator[int]:
        """Within: the active LoRA adapters merged into the base weights (peft's safe merge: each merged weight is a new
        tensor W + delta, checked finite), so a forward costs the base model's matrix multiplies alone. For no-grad
        sampling: the LoRA parameters get no gradient while merged. Yields the extra bytes held meanwhile: the
        original weights, kept as they are. On exit every base weight is that very tensor again (restored by
        reference, bit for bit; subtracting the delta, as peft's unmerge does, would leave a rounding error each
        cycle, visible in bf16 within a few). Merging changes the arithmetic: x (W + delta) against x W + x delta,
        and in a bf16 base W + delta is rounded to bf16 (docs/performance.md)."""
        from peft.tuners.lora import LoraLayer

        if self.sara is not None or not self.has_lora:
            raise RuntimeError(f"{type(self).__name__}.merged_lora() needs a LoRA adapter (policy.adapter lora)")
        saved = []  # (layer, its base layer, original weight, original bias)
        try:
            # the delta B A in the LoRA's own dtype, whatever autocast the caller runs the sampling under
            with torch.autocast(self.device.type, enabled=False):
                for net in self.trained_networks().values():
                    for layer in net.modules():
                        if not isinstance(layer, LoraLayer) or layer.merged:
                            continue
                        base = layer.get_base_layer()
                        bias = getattr(base, "bias", None)
                        saved.append((layer, base, base.weight.data, None if bias is None else bias.data))
                        layer.merge(safe_merge=True)  # the active adapters; base.weight.data is now a new tensor
            yield sum(w.numel() * w.element_size() for _, _, w, _ in saved)
        finally:
            for layer, base, weight, bias in reversed(saved):
                base.weight.data = weight
                if bias is not None:
                    base.bias.data = bias
                layer.merged_adapters.clear()

    def enable_gradient_checkpointing(self, enabled: bool | str = True) -> None:
        """Recompute activations in backward, block by block: "full" (True: keep each block's inputs only),
        "selective" (keep its attention and convolution outputs, recompute the rest) or "none" (False)."""
        from diffrl.pipelines.performance import checkpoint_function, checkpointing_mode

        mode = checkpointing_mode(enabled)
        for net in self.trained_networks().values():  # a frozen network keeps no activations for backward
            if mode == "none":
                net.disable_gradient_checkpointing()
            else:
                net.enable_gradient_checkpointing(checkpoint_function(mode, self.attention_context))

    def set_attention_backend(self, backend: str = "sdpa", compute_dtype: torch.dtype | None = None) -> None:
        """"sdpa" (PyTorch scaled_dot_product_attention, the default), "auto" (PyTorch's kernels ordered for this GPU
        and dtype: diffrl.pipelines.performance.attention_plan), "xformers" (CUDA only), or a diffusers
        attention-dispatcher backend name ("flash", "_native_flash", ...). `compute_dtype`: the dtype attention runs
        in (autocast's under mixed precision); None: the weights'."""
        import importlib.util

        from diffrl.pipelines.performance import attention_plan

        device = self.device
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        xformers = importlib.util.find_spec("xformers") is not None
        self.apply_attention_plan(attention_plan(backend, capability, compute_dtype or self.dtype, xformers))

    def apply_attention_plan(self, plan) -> None:
        """Run every network's attention as `plan` (a diffrl.pipelines.performance.AttentionPlan) says: its SDPA
        kernels are entered around each forward of each network, and around each recomputation of a checkpointed
        block (the attention processors call torch's scaled_dot_product_attention: the UNet's and SD3's directly,
        FLUX's and Wan's through diffusers' dispatcher)."""
        from diffrl.pipelines.performance import run_forward_in

        for handle in getattr(self, "_attention_hooks", []):
            handle.remove()
        self.attention, self._attention_hooks = plan, []
        for net in self.networks():
            if plan.kind == "xformers":
                net.enable_xformers_memory_efficient_attention()
            elif plan.kind == "dispatcher":
                if not hasattr(net, "set_attention_backend"):
                    raise RuntimeError(f"this diffusers version has no attention-backend API; cannot use {plan.name!r}")
                net.set_attention_backend(plan.name)
            elif hasattr(net, "reset_attention_backend"):
                net.reset_attention_backend()
            if plan.kernels:
                self._attention_hooks += run_forward_in(net, self.attention_context)

    def compile_networks(self, mode: str = "default", backend: str = "inductor") -> None:
        """torch.compile every network's repeated blocks in place (diffrl.pipelines.performance.compile_blocks), for
        rollouts and training alike; LoRA, checkpointing and the attention plan stay as they are."""
        from diffrl.pipelines.performance import compile_blocks

        for net in self.networks():
            compile_blocks(net, mode, backend)

    def attention_context(self):
        """The SDPA kernel restriction of the attention plan (a no-op context without one)."""
        from diffrl.pipelines.performance import sdpa_context

        plan = getattr(self, "attention", None)
        return sdpa_context(plan.kernels if plan is not None else ())
