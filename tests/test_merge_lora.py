"""policy.merge_lora_for_rollout: the LoRA merged into the base weights for no-grad sampling gives the unmerged
rollout's samples and log-probs, and the base weights come back bit for bit, cycle after cycle."""

from __future__ import annotations

import contextlib

import pytest
import torch

from diffrl.checks import ConfigError
from diffrl.config import load_config
from diffrl.trainers.loop import Trainer

FAST = ["policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "sampling.num_steps=3",
        "sampling.eval_num_steps=3", "data.num_eval_prompts=2", "data.eval_images_per_prompt=2",
        "train.prompts_per_iteration=2", "train.group_size=3", "train.rollout_batch_size=4", "train.train_batch_size=3",
        "logging.log_with=none", "logging.progress=false"]


def make_trainer(tmp_path, *extra):
    return Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", *extra]))


def randomise_adapters(trainer, seed: int = 1) -> None:
    """Every LoRA tensor of every adapter ("default", NFT's "old" snapshot) a seeded value: a real delta to merge."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.policy.trainable_module().named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def lora_calls(trainer) -> list[int]:
    """A counter of LoRA-branch forwards (peft's lora_A modules), which a merged layer does not run."""
    from peft.tuners.lora import LoraLayer

    calls = [0]
    for layer in trainer.policy.trainable_module().modules():
        if isinstance(layer, LoraLayer):
            for module in layer.lora_A.values():
                module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def base_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in trainer.policy.trainable_module().state_dict().items() if "lora_" not in n}


CASES = {
    # name: (config, tolerance on latents and log-probs)
    "grpo-sd3-float64": (("model=tiny-sd3", "policy.dtype=float64"), 1e-10),
    "grpo-sd-ddpo-float64": (("model=tiny-sd", "policy.dtype=float64"), 1e-10),
    # the snapshot adapter is float32 even in a float64 run (Policy.add_adapter_copy): unmerged, its LoRA branch
    # computes in float32 (peft casts the input to the adapter's dtype), merged, its delta joins the float64 weight
    "nft-sd3-old-adapter-float64": (("model=tiny-sd3", "algorithm=nft", "policy.dtype=float64"), 1e-7),
    "grpo-sd3-float32": (("model=tiny-sd3", "policy.dtype=float32"), 2e-5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_rollout_equals_the_unmerged_rollout(tmp_path, case):
    """The same iteration's rollout with the LoRA unmerged and merged (NFT: its "old" snapshot adapter, the one the
    rollout samples with): every latent, log-prob and reward agree (float64 1e-10; float32 2e-5: x (W + BA) and
    x W + (x A) B round differently, and 3 steps carry it), the merged rollout ran no LoRA branch, and the base
    weights are bit-identical afterwards. The evaluation samples (deterministic ODE / DDIM) agree too."""
    config, tol = CASES[case]
    trainer = make_trainer(tmp_path, *config)
    randomise_adapters(trainer)
    before = base_weights(trainer)
    calls = lora_calls(trainer)
    plain = trainer.rollout(0)
    plain_calls = calls[0]
    trainer.cfg.policy.merge_lora_for_rollout = True
    merged = trainer.rollout(0)
    assert plain_calls > 0 and calls[0] == plain_calls  # the merged rollout ran no LoRA branch
    torch.testing.assert_close(merged.trajectory.latents, plain.trajectory.latents, rtol=0, atol=tol)
    if plain.trajectory.log_probs is not None:
        torch.testing.assert_close(merged.trajectory.log_probs, plain.trajectory.log_probs, rtol=0, atol=tol)
    torch.testing.assert_close(merged.rewards, plain.rewards, rtol=0, atol=max(tol, 1e-6))
    after = base_weights(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)
    eval_set = next(iter(trainer.eval_sets.values()))
    images_merged, _ = trainer._sample_eval_set(eval_set, 2, torch.Generator().manual_seed(5))
    trainer.cfg.policy.merge_lora_for_rollout = False
    images_plain, _ = trainer._sample_eval_set(eval_set, 2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(images_merged, images_plain, rtol=0, atol=max(tol, 1e-6))


def test_the_merge_changes_what_a_forward_computes(tmp_path):
    """Inside merged_lora a forward gives the LoRA model's output (not the base model's) from the base layers alone,
    and the extra memory it reports is one copy of the LoRA-targeted base weights."""
    trainer = make_trainer(tmp_path, "model=tiny-sd3", "policy.dtype=float64")
    randomise_adapters(trainer)
    policy = trainer.policy
    batch = trainer.rollout(0)
    x, t, cond = batch.trajectory.latents[:2, 1], batch.trajectory.schedule.timesteps[1].expand(2), batch.cond.index(slice(0, 2))
    with torch.no_grad():
        lora = policy.predict(x, t, cond, 4.5)
        with policy.reference():
            base = policy.predict(x, t, cond, 4.5)
        with policy.merged_lora() as extra:  # a merged layer computes base_layer(x) alone: its weight is W + BA
            merged = policy.predict(x, t, cond, 4.5)
    assert not torch.allclose(lora, base, atol=1e-6)
    torch.testing.assert_close(merged, lora, rtol=0, atol=1e-12)
    from peft.tuners.lora import LoraLayer

    targeted = sum(layer.get_base_layer().weight.numel() * layer.get_base_layer().weight.element_size()
                   for layer in policy.trainable_module().modules() if isinstance(layer, LoraLayer))
    assert extra == targeted  # the extra memory while merged: one copy of the LoRA-targeted base weights


def test_merged_lora_under_compiled_blocks():
    """policy.compile's regional compilation (aot_eager backend here): merged and unmerged calls alternate, each
    equal to the eager LoRA output (the merged layers take another traced branch; the swapped weights are inputs)."""
    from diffrl.pipelines.sd3 import SD3Policy

    policy = SD3Policy.tiny(dtype=torch.float64)
    policy.add_lora(4, 8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = policy.initial_noise(2, generator=torch.Generator().manual_seed(1))
    cond = policy.encode_prompt(["a red cube", "a blue ball"])
    t = policy.schedule(3).timesteps[1].expand(2)
    with torch.no_grad():
        eager = policy.predict(x, t, cond, 4.5)
        policy.compile_networks(backend="aot_eager")
        for merged in (False, True, False, True):
            with policy.merged_lora() if merged else contextlib.nullcontext():
                out = policy.predict(x, t, cond, 4.5)
            torch.testing.assert_close(out, eager, rtol=0, atol=1e-12)


@pytest.mark.parametrize("restore", ["merged_lora", "peft_unmerge"])
def test_base_weights_bit_identical_after_merge_cycles_in_bf16(restore):
    """20 merge / sample / restore cycles on a bf16 base: merged_lora gives back the very base tensors, bit for bit.
    peft's unmerge (W + BA rounded to bf16, minus BA rounded to bf16) does not: the drift this option avoids."""
    from peft.tuners.lora import LoraLayer

    from diffrl.pipelines.sd3 import SD3Policy

    policy = SD3Policy.tiny(dtype=torch.bfloat16)
    policy.add_lora(4, 8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    net = policy.trainable_module()
    before = {n: t.detach().clone() for n, t in net.state_dict().items()}
    x = policy.initial_noise(2, generator=torch.Generator().manual_seed(1))
    cond = policy.encode_prompt(["a red cube", "a blue ball"])
    t = policy.schedule(3).timesteps[1].expand(2)
    layers = [m for m in net.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for _ in range(20):
            if restore == "merged_lora":
                with policy.merged_lora():
                    policy.predict(x, t, cond, 4.5)
            else:
                for layer in layers:
                    layer.merge()
                policy.predict(x, t, cond, 4.5)
                for layer in layers:
                    layer.unmerge()
    after = net.state_dict()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if restore == "merged_lora":
        assert changed == [] and not any(layer.merged for layer in layers)
    else:
        assert changed and all("lora_" not in n for n in changed)  # base weights drifted


def test_merge_lora_for_rollout_is_refused_where_it_cannot_work(tmp_path, monkeypatch):
    """Without a LoRA (SaRA, a full fine-tune), in LM runs, with bf16 for log-prob methods, and under FSDP (sharded base
    weights)."""
    from diffrl.distributed import check_launch

    for extra in (["policy.adapter=sara"], ["policy.lora_rank=0"]):
        with pytest.raises(ConfigError, match="policy.merge_lora_for_rollout"):
            load_config(None, [*FAST, "model=tiny-sd3", "grpo.kl_beta=0", "policy.merge_lora_for_rollout=true", *extra])
    with pytest.raises(ConfigError, match="policy.merge_lora_for_rollout"):
        load_config(None, ["model=toy-arith", "algorithm=lm_grpo", "policy.merge_lora_for_rollout=true"])
    # bf16 weights or autocast: the rollout's log-probs (kept by grpo / prdp as the old policy's) would come from
    # W + BA rounded to bf16; nft and crd keep none
    for extra in (["policy.dtype=bfloat16"], ["train.mixed_precision=bf16"]):
        with pytest.raises(ConfigError, match="policy.merge_lora_for_rollout"):
            load_config(None, [*FAST, "model=tiny-sd3", "policy.merge_lora_for_rollout=true", *extra])
    load_config(None, [*FAST, "model=tiny-sd3", "algorithm=nft", "policy.merge_lora_for_rollout=true", "policy.dtype=bfloat16"])
    cfg = load_config(None, [*FAST, "model=tiny-sd3", "policy.merge_lora_for_rollout=true"])
    check_launch(cfg)  # plain data parallelism: allowed
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ConfigError, match="policy.merge_lora_for_rollout.*FSDP"):
        check_launch(cfg)
