"""The update loops never wait for the device per step: metrics stay device tensors until one read per update.

On a GPU each .item() / .tolist() / float(t) / bool(t) / .cpu() of a device tensor, a boolean-mask index and
torch.unique / nonzero (data-dependent sizes) makes the host wait for the device. These tests count such calls
during one update (the device-side checks, diffrl.runtime.check_on_device, take their CUDA path here: no host
read) and require the count not to grow with the number of timesteps or rows. Calls made by torch's optimizers
(AdamW's CPU step counters) are left out. A CPU run cannot see a plain host-to-device .to() copy; those go
through diffrl.runtime.to_device (pinned, non-blocking), and the CUDA-only test at the end counts every
synchronisation with torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from diffrl.config import load_config

SYNC_FUNCTIONS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__float__: "__float__",
                  torch.Tensor.__int__: "__int__", torch.Tensor.__bool__: "__bool__", torch.Tensor.cpu: "cpu",
                  torch.Tensor.numpy: "numpy", torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero",
                  torch.unique: "unique", torch.Tensor.unique: "unique"}
DISPATCH_FILES = ("/torch/_tensor.py", "/torch/overrides.py", "/torch/utils/_python_dispatch.py", __file__)
"""Frames of torch's dispatch to a function mode (and this counter's own): the caller is the first frame past them."""


class SyncCounter(TorchFunctionMode):
    """Counts host reads of tensors by call site, while active. A torch function mode sees every tensor method and
    torch function call without patching torch.Tensor (class patches of dunder methods leave the type's C slots
    changed for later tests)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def _record(self, what: str) -> None:
        caller = sys._getframe(1)
        while caller is not None and caller.f_code.co_filename.endswith(DISPATCH_FILES):
            caller = caller.f_back
        if caller is None or "/torch/optim/" in caller.f_code.co_filename:  # AdamW's CPU step counters: not device reads
            return
        self.calls[(what, caller.f_code.co_filename.rsplit("/", 1)[-1], caller.f_lineno)] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = SYNC_FUNCTIONS.get(func)
        if what is None and func is torch.Tensor.__getitem__:
            parts = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
                what = "bool-mask index"
        if what is not None:
            self._record(what)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def diffusion_trainer(tmp_path, steps: int, prompts: int, batch: int, *extra):
    from diffrl.trainers.loop import Trainer

    cfg = load_config(None, [
        "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", f"sampling.num_steps={steps}",
        "sampling.eval_num_steps=2", "data.num_eval_prompts=2", f"train.prompts_per_iteration={prompts}",
        "train.group_size=3", f"train.rollout_batch_size={3 * prompts}", f"train.train_batch_size={batch}",
        "logging.log_with=none", "logging.progress=false", f"output_dir={tmp_path}", *extra])
    return Trainer(cfg)


def reads_in_update(tmp_path, monkeypatch, steps, prompts, batch, *extra) -> SyncCounter:
    import diffrl.runtime

    trainer = diffusion_trainer(tmp_path, steps, prompts, batch, *extra)
    batch_ = trainer.rollout(0)
    trainer.advantages(batch_)
    monkeypatch.setattr(diffrl.runtime, "HOST_CHECK_DEVICES", ())  # device-side checks take their CUDA path
    with SyncCounter() as counter:
        trainer.algorithm.update(batch_, trainer.optimizer, torch.Generator().manual_seed(0))
    return counter


CASES = {
    "grpo-sd3-kl": ("model=tiny-sd3", "grpo.kl_beta=0.04", "grpo.kl_convention=exact", "grpo.timestep_fraction=1.0"),
    "grpo-sd-ddpo-skip-zero-adv": ("model=tiny-sd", "grpo.kl_beta=0", "grpo.timestep_fraction=1.0"),
    "nft": ("model=tiny-sd3", "algorithm=nft", "nft.timestep_fraction=1.0"),
    "crd": ("model=tiny-sd3", "algorithm=crd", "crd.timestep_fraction=1.0"),
    "prdp": ("model=tiny-sd", "algorithm=prdp"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_reads_the_device_as_often_whatever_the_timesteps_and_rows(tmp_path, monkeypatch, case):
    """Two optimiser steps each: N timesteps, 2N timesteps, and twice the rows per train batch. The number of host
    reads is the same for all three (before: GRPO read 5 metrics per timestep, 54 reads at N = 2, 90 at N = 4)."""
    extra = CASES[case]
    base = reads_in_update(tmp_path / "n", monkeypatch, 2, 2, 3, *extra)
    longer = reads_in_update(tmp_path / "2n", monkeypatch, 4, 2, 3, *extra)
    wider = reads_in_update(tmp_path / "rows", monkeypatch, 2, 4, 6, *extra)
    assert base.total == longer.total == wider.total, (base.calls, longer.calls, wider.calls)
    if case.startswith("grpo"):  # the guarded step's norm per optimiser step, and the one read of the metrics
        assert base.calls[("__float__", "optim.py", base_line(base, "optim.py"))] == 2
        assert base.calls[("tolist", "runtime.py", base_line(base, "runtime.py"))] == 1


def base_line(counter: SyncCounter, file: str) -> int:
    return next(line for (_, f, line) in counter.calls if f == file)


def test_lm_update_reads_the_device_as_often_whatever_the_micro_batches(tmp_path, monkeypatch):
    """The LM trainer: one micro-batch of 3 rows or three of 1 (same mini-batches, same optimiser steps). Not counted:
    transformers' causal-mask construction (masking_utils), which reads the attention mask once per forward to decide
    whether SDPA may skip it; that is the library's, one per model call."""
    from diffrl.lm.trainer import LMTrainer

    base = ["algorithm=lm_grpo", "model=toy-arith", "policy.lora_rank=4", "policy.lora_alpha=8", "train.prompts_per_iteration=3",
            "train.group_size=2", "train.rollout_batch_size=6", "train.train_batch_size=3", "lm.max_new_tokens=4",
            "lm.num_eval=4", "lm.kl_beta=0.04", "logging.log_with=none", "logging.progress=false"]
    totals = []
    for micro in (3, 1):
        trainer = LMTrainer(load_config(None, [*base, f"train.micro_batch_size={micro}", f"output_dir={tmp_path / str(micro)}"]))
        batch = trainer.rollout(0)
        with SyncCounter() as counter:
            trainer.update(batch, torch.Generator().manual_seed(0))
        totals.append(Counter({k: v for k, v in counter.calls.items() if k[1] != "masking_utils.py"}))
    assert sum(totals[0].values()) == sum(totals[1].values()), totals


def test_grpo_metrics_equal_an_independent_computation(tmp_path):
    """One train batch, every step trained, the weights held still (no optimiser step), stored log-probs perturbed so
    that ratios clip both ways, one non-finite reward: loss, policy_loss, kl, clip_frac, ratio_mean and ratio_max are
    the means (max) over every (row, step) of the formulas written out here (float64; the update sums per step, this
    over all at once: equal up to summation order)."""
    trainer = diffusion_trainer(tmp_path, 3, 2, 6, "model=tiny-sd3", "policy.dtype=float64", "grpo.kl_beta=0.04",
                                "grpo.timestep_fraction=1.0", "grpo.clip_range=0.02")
    policy, g = trainer.policy, trainer.cfg.grpo
    batch = trainer.rollout(0)
    trainer.advantages(batch)
    params = policy.trainable_parameters()
    with torch.no_grad():  # LoRA B starts at 0: move the policy off the reference so that the KL is not 0
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    gen = torch.Generator().manual_seed(3)
    B, N = batch.trajectory.log_probs.shape
    batch.trajectory.log_probs = batch.trajectory.log_probs + 0.03 * torch.randn(B, N, generator=gen, dtype=torch.float64)
    batch.advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.3, 0.0], dtype=torch.float64)
    batch.valid = torch.tensor([True, True, True, False, True, True])
    trainer.optimizer.step = lambda *a, **k: None  # the weights stay: every step's value is a function of the batch
    metrics = trainer.algorithm.update(batch, trainer.optimizer, torch.Generator().manual_seed(0))

    w = batch.valid.double()
    adv = batch.advantages.clamp(-g.adv_clip_max, g.adv_clip_max)
    per = {k: [] for k in ("loss", "policy_loss", "kl", "clip", "ratio")}
    cfg = trainer.cfg.sampling
    with torch.no_grad():
        for col in range(N):
            step = int(batch.trajectory.steps[col])
            x_t, x_prev = batch.trajectory.latents[:, step], batch.trajectory.latents[:, step + 1]
            t = batch.trajectory.schedule.timesteps[step].expand(B)
            sigmas = batch.trajectory.schedule.sigmas.double()  # [N + 1]
            sigma, sigma_next = sigmas[step], sigmas[step + 1]
            v = policy.predict(x_t, t, batch.cond, cfg.guidance_scale)
            with policy.reference():
                v_ref = policy.predict(x_t, t, batch.cond, cfg.guidance_scale)
            # Flow-GRPO's SDE step written out: its mean, its std, log N(x_prev; mean, std^2) averaged over elements
            s = sigma if sigma < 1 else sigmas[1]
            std_t = cfg.noise_level * torch.sqrt(sigma / (1 - s))
            dt = sigma_next - sigma

            def sde_mean(vel):
                return x_t * (1 + std_t**2 / (2 * sigma) * dt) + vel * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt

            mean, mean_ref = sde_mean(v), sde_mean(v_ref)
            step_std = std_t * torch.sqrt(-dt)
            logp = (-((x_prev - mean) ** 2) / (2 * step_std**2) - torch.log(step_std)
                    - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)  # [B]
            ratio = torch.exp(logp - batch.trajectory.log_probs[:, col])
            surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - g.clip_range, 1 + g.clip_range))
            kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std_t**2)  # Flow-GRPO's convention
            clipped = ((ratio > 1 + g.clip_range) & (adv > 0)) | ((ratio < 1 - g.clip_range) & (adv < 0))
            per["policy_loss"].append((surrogate * w).sum() / w.sum())
            per["loss"].append(((surrogate + g.kl_beta * kl) * w).sum() / w.sum())
            per["kl"].append(kl.mean())
            per["clip"].append(clipped.double().mean())
            per["ratio"].append(ratio)
    ratios = torch.stack(per["ratio"])  # [N, B]
    expected = {"loss": torch.stack(per["loss"]).mean(), "policy_loss": torch.stack(per["policy_loss"]).mean(),
                "kl": torch.stack(per["kl"]).mean(), "clip_frac": torch.stack(per["clip"]).mean(),
                "ratio_mean": ratios.mean(), "ratio_max": ratios.max()}
    assert 0 < expected["clip_frac"] < 1 and expected["kl"] > 0
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(float(value), rel=1e-10, abs=1e-13), key
    assert metrics["trained_frac"] == 1.0 and math.isfinite(metrics["grad_norm"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts the device synchronisations themselves")
@pytest.mark.parametrize("case", ["grpo-sd3-kl", "nft"])
def test_cuda_update_synchronises_as_often_whatever_the_timesteps(tmp_path, case):
    """torch.cuda.set_sync_debug_mode warns at every synchronising call (reads, pageable copies): their number does
    not grow with the timesteps."""
    counts = []
    for steps in (2, 4):
        trainer = diffusion_trainer(tmp_path / str(steps), steps, 2, 3, *CASES[case])
        batch = trainer.rollout(0)
        trainer.advantages(batch)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.algorithm.update(batch, trainer.optimizer, torch.Generator().manual_seed(0))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts
