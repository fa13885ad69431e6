"""The KL reference pass: absent at a zero KL coefficient, and batched with the policy (grpo.kl_batched,
nft.kl_batched) it gives the two-pass loss, KL and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch

from diffrl.config import load_config
from diffrl.trainers.loop import Trainer

FAST = ["policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "sampling.num_steps=3",
        "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2", "train.group_size=3",
        "train.rollout_batch_size=6", "train.train_batch_size=3", "train.adam_weight_decay=0", "logging.log_with=none",
        "logging.progress=false"]


def make_trainer(tmp_path, *extra):
    return Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", *extra]))


def randomise_lora(trainer, seed: int = 1) -> None:
    """LoRA B starts at 0 (policy = reference, KL 0): give every LoRA tensor a seeded value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.policy.trainable_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


class ForwardCounter:
    """Denoiser calls in total and inside policy.reference()."""

    def __init__(self, trainer):
        self.total = self.reference = 0
        self.inside = False
        policy = trainer.policy
        original = policy.reference

        @contextlib.contextmanager
        def counted_reference():
            with original():
                self.inside = True
                try:
                    yield
                finally:
                    self.inside = False

        policy.reference = counted_reference
        policy.trainable_module().register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.total += 1
        self.reference += self.inside


def update(trainer, batch):
    return trainer.algorithm.update(batch, trainer.optimizer, torch.Generator().manual_seed(0))


KL_OFF = {
    "grpo": ("model=tiny-sd3", "grpo.kl_beta=0"),
    "grpo-ddpo": ("model=tiny-sd", "grpo.kl_beta=0"),
    "nft": ("model=tiny-sd3", "algorithm=nft", "nft.kl_coef=0"),
    "crd": ("model=tiny-sd3", "algorithm=crd", "crd.kl_beta=0"),
}
KL_ON = {"grpo": "grpo.kl_beta=0.04", "grpo-ddpo": "grpo.kl_beta=0.04", "nft": "nft.kl_coef=1e-4", "crd": "crd.kl_beta=0.1"}


@pytest.mark.parametrize("case", list(KL_OFF))
def test_no_reference_forward_at_a_zero_kl_coefficient(tmp_path, case):
    """At KL coefficient 0 the update runs no denoiser call under policy.reference(); with it on it runs some (the
    counter sees them). PRDP has no such setting: its loss is a log-ratio to the reference (beta > 0 always), whose
    log-probs it computes once per update, test_prdp_runs_its_reference_once_per_row_and_step."""
    counts = {}
    for kl, extra in (("off", ()), ("on", (KL_ON[case],))):
        trainer = make_trainer(tmp_path / kl, *KL_OFF[case], *extra)
        randomise_lora(trainer)
        batch = trainer.rollout(0)
        trainer.advantages(batch)
        counter = ForwardCounter(trainer)
        update(trainer, batch)
        counts[kl] = (counter.reference, counter.total)
    assert counts["off"][0] == 0 and counts["off"][1] > 0
    assert counts["on"][0] > 0


def test_prdp_runs_its_reference_once_per_row_and_step(tmp_path):
    trainer = make_trainer(tmp_path, "model=tiny-sd", "algorithm=prdp", "train.num_inner_epochs=2")
    batch = trainer.rollout(0)
    trainer.advantages(batch)
    counter = ForwardCounter(trainer)
    update(trainer, batch)
    B, T = batch.trajectory.log_probs.shape
    chunk = trainer.cfg.train.train_batch_size
    assert counter.reference == T * -(-B // chunk)  # one call per step and row chunk, for both inner epochs


BATCHED = {
    # name: (config, the flag); CFG > 1 everywhere (grpo's default 4.5; nft set to 4.5)
    "grpo-sd3": (("model=tiny-sd3", "grpo.kl_beta=0.04"), "grpo.kl_batched=true"),
    "grpo-sd3-exact-checkpointed": (("model=tiny-sd3", "grpo.kl_beta=0.04", "grpo.kl_convention=exact",
                                     "policy.gradient_checkpointing=full"), "grpo.kl_batched=true"),
    "grpo-sd": (("model=tiny-sd", "grpo.kl_beta=0.04"), "grpo.kl_batched=true"),
    "nft-sd3": (("model=tiny-sd3", "algorithm=nft", "nft.kl_coef=0.5", "sampling.guidance_scale=4.5"), "nft.kl_batched=true"),
    "nft-sd": (("model=tiny-sd", "algorithm=nft", "nft.kl_coef=0.5", "sampling.guidance_scale=4.5"), "nft.kl_batched=true"),
}


@pytest.mark.parametrize("case", list(BATCHED))
def test_batched_reference_gives_the_two_pass_loss_kl_and_gradients(tmp_path, case):
    """float64, classifier-free guidance 4.5 (predict builds [uncond; cond] batches of the doubled rows): two
    optimiser steps of one update with the reference in its own no-grad call and in the policy's call. Every
    gradient, the loss and the KL agree to 1e-12; no call runs under policy.reference() and there is one denoiser
    call per trained step instead of two."""
    config, flag = BATCHED[case]
    runs = {}
    for mode, extra in (("two_pass", ()), ("batched", (flag,))):
        trainer = make_trainer(tmp_path / mode, "policy.dtype=float64", "train.learning_rate=1e-3", *config, *extra)
        assert trainer.cfg.sampling.guidance_scale > 1
        randomise_lora(trainer)
        batch = trainer.rollout(0)
        trainer.advantages(batch)
        params = trainer.policy.trainable_parameters()
        grads, step = [], trainer.optimizer.step

        def record(*args, _params=params, _grads=grads, _step=step, **kwargs):
            _grads.append([p.grad.detach().clone() for p in _params])
            return _step(*args, **kwargs)

        trainer.optimizer.step = record
        counter = ForwardCounter(trainer)
        metrics = update(trainer, batch)
        runs[mode] = (metrics, grads, counter, [p.detach().clone() for p in params])
    (m2, g2, c2, p2), (m1, g1, c1, p1) = runs["two_pass"], runs["batched"]
    assert len(g1) == len(g2) == 2
    assert m2["kl"] > 0
    for key in ("loss", "kl", "policy_loss"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-12, abs=1e-12), key
    for step_a, step_b in zip(g1, g2):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in g1[0])
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert c1.reference == 0 < c2.reference
    forward_calls = c2.total - c2.reference  # the two-pass policy calls (NFT: with its old-snapshot calls)
    assert c1.total == forward_calls


def test_batched_reference_rows_run_the_base_model(tmp_path):
    """Policy.lora_off_rows: on a batch [x; x] with the second half off, the first half is the LoRA model's output and
    the second the reference's, bit for bit here (float64, CFG 4.5)."""
    trainer = make_trainer(tmp_path, "model=tiny-sd3", "policy.dtype=float64")
    randomise_lora(trainer)
    policy = trainer.policy
    batch = trainer.rollout(0)
    x, t = batch.trajectory.latents[:3, 1], batch.trajectory.schedule.timesteps[1].expand(3)
    cond = batch.cond.index(torch.arange(3))
    with torch.no_grad():
        lora = policy.predict(x, t, cond, 4.5)
        with policy.reference():
            base = policy.predict(x, t, cond, 4.5)
        with policy.lora_off_rows(torch.tensor([False] * 3 + [True] * 3)):
            both = policy.predict(torch.cat([x, x]), torch.cat([t, t]), batch.cond.index(torch.arange(3).repeat(2)), 4.5)
    assert not torch.allclose(lora, base)
    torch.testing.assert_close(both[:3], lora, rtol=0, atol=1e-13)
    torch.testing.assert_close(both[3:], base, rtol=0, atol=1e-13)
