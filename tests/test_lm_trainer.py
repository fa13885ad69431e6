"""The LM RL loop on the shipped toy LM: what two iterations change, exact resume, DAPO's dynamic
filter, LoRA export to peft, full fine-tuning with a frozen reference copy."""

from __future__ import annotations

import json

import pytest
import torch

from diffrl.config import load_config
from diffrl.lm.trainer import LMTrainer

FAST = [
    "model=toy-arith", "policy.lora_rank=4", "policy.lora_alpha=8",
    "train.prompts_per_iteration=3", "train.group_size=4", "train.rollout_batch_size=6",
    "train.train_batch_size=6", "train.micro_batch_size=3", "train.learning_rate=1e-2", "train.adam_weight_decay=0",
    "lm.max_new_tokens=4", "lm.num_eval=16", "logging.log_with=none", "logging.progress=false",
]


def make_trainer(tmp_path, *extra, algorithm="lm_grpo"):
    return LMTrainer(load_config(None, [*FAST, f"algorithm={algorithm}", f"output_dir={tmp_path}", *extra]))


def without_timing(row):
    return {k: v for k, v in row.items() if not k.startswith("time") and k not in ("seconds", "peak_memory_mb")}


def test_two_iterations_change_every_lora_tensor_and_nothing_frozen(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from diffrl.lm.policy import builtin_lm_path

    trainer = make_trainer(tmp_path, "max_iterations=2")  # lm_grpo: k3 KL (0.04) against the LoRA-disabled model
    net = trainer.policy.unwrapped
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    for n, p in net.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"LoRA tensor {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen tensor {n} changed"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[-1]["samples_seen"] == 24
    for key in ("reward_mean", "reward_std", "reward_exact_match", "loss", "policy_loss", "kl", "clip_frac", "ratio_mean",
                "ratio_max", "entropy", "grad_norm", "zero_std_frac", "completion_length", "eval_reward_mean",
                "time_rollout", "time_update", "peak_memory_mb"):
        assert key in rows[-1], key
    assert rows[-1]["kl"] > 0 and rows[1]["ratio_mean"] != 1.0  # the 2nd mini-batch is off-policy: old log-probs
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert len((tmp_path / "eval" / "iter_000002.jsonl").read_text().splitlines()) == 16
    # the LoRA result loads with peft's own loader and reproduces the trained model
    lora = tmp_path / "checkpoints" / "iter_000002" / "lora"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_lm_path("toy-arith")), lora).eval()
    batch = trainer.policy.tokenizer(["12+7=19", "5-3=2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, net(**batch).logits, rtol=0, atol=1e-6)
        with net.disable_adapter():
            assert (loaded(**batch).logits - net(**batch).logits).abs().max() > 1e-3


def test_one_step_iterations_are_exactly_on_policy(tmp_path):
    """With one optimiser step an iteration the old log-probs are the current ones: every ratio is 1."""
    trainer = make_trainer(tmp_path, "max_iterations=1", "train.train_batch_size=12", "lm.kl_beta=0")
    (row,) = trainer.train()
    assert row["ratio_mean"] == row["ratio_max"] == row["ratio_min"] == 1.0 and row["clip_frac"] == 0.0
    assert row["grad_norm"] > 0


@pytest.mark.parametrize("algorithm, extra", [
    ("lm_grpo", ["train.num_inner_epochs=2"]),  # old log-probs, 4 optimiser steps an iteration, KL
    ("lm_dapo", ["lm.dynamic_sampling_rounds=3"]),  # several prompt draws per iteration
    ("lm_nft", ["train.train_batch_size=12"]),
])
def test_resume_is_exact(tmp_path, algorithm, extra):
    full = make_trainer(tmp_path / "a", "max_iterations=2", "logging.save_every=1", *extra, algorithm=algorithm)
    rows = full.train()
    resumed = make_trainer(tmp_path / "b", "max_iterations=2", f"resume={tmp_path / 'a' / 'checkpoints' / 'iter_000001'}",
                           *extra, algorithm=algorithm)
    assert resumed.iteration == 1
    rows_b = resumed.train()
    assert without_timing(rows_b[-1]) == without_timing(rows[-1])
    a, b = full.policy.named_trainable_parameters(), resumed.policy.named_trainable_parameters()
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"])


def test_dynamic_sampling_keeps_exactly_the_groups_with_unequal_rewards(tmp_path):
    extra = ["train.prompts_per_iteration=6", "train.rollout_batch_size=24", "train.train_batch_size=24",
             "lm.dynamic_sampling_rounds=4"]
    batch = make_trainer(tmp_path / "a", *extra, algorithm="lm_dapo").rollout(0)
    raw = make_trainer(tmp_path / "b", *extra, algorithm="lm_dapo")  # the same draws, round by round
    P, K = 6, 4
    expected, constant = [], 0
    for r in range(int(batch.stats["sampling_rounds"])):
        rb = raw.sample_groups(0, r)
        for g in range(P):
            rows = range(g * K, (g + 1) * K)
            rewards = {rb.total[i].item() for i in rows}
            if len(rewards) == 1:
                constant += 1
            elif len(expected) < P * K:
                expected += [(rb.rollout.prompts[i], rb.rollout.completions[i], int(rb.group_ids[i])) for i in rows]
    got = list(zip(batch.rollout.prompts, batch.rollout.completions, batch.group_ids.tolist()))
    assert constant > 0 and got == expected  # order kept, whole groups, constant groups gone
    assert batch.stats["kept_groups"] == len(expected) // K
    assert batch.stats["sampling_rounds"] > 1  # the refill path ran (deterministic for these seeds)
    for g in set(batch.group_ids.tolist()):
        assert len(set(batch.total[batch.group_ids == g].tolist())) > 1


def test_full_fine_tune_with_a_frozen_reference_copy(tmp_path):
    trainer = make_trainer(tmp_path, "max_iterations=2", "policy.lora_rank=0", "train.learning_rate=1e-3")
    net, ref = trainer.policy.unwrapped, trainer.policy.reference_model
    assert ref is not None and all(not p.requires_grad for p in ref.parameters())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    trainer.train()
    for n, p in net.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    for n, p in ref.named_parameters():
        assert torch.equal(p, ref_before[n]), f"reference {n} changed"
    assert (tmp_path / "checkpoints" / "iter_000002" / "model" / "config.json").is_file()


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    runs = []
    for gc in ("false", "true"):
        trainer = make_trainer(tmp_path / gc, "max_iterations=1", "train.train_batch_size=12", f"policy.gradient_checkpointing={gc}")
        assert trainer.policy.unwrapped.base_model.model.model.gradient_checkpointing == (gc == "true")
        trainer.train()
        runs.append(trainer.policy.named_trainable_parameters())
    for n in runs[0]:
        torch.testing.assert_close(runs[0][n], runs[1][n], rtol=0, atol=1e-6)
