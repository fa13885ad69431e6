"""`diffrl train` on an lm_* recipe, LM config validation, `diffrl pretrain-toy-lm`, the shipped toy LM
and its data, and LM rewards (registry, "module:function", weights)."""

from __future__ import annotations

import json

import pytest
import torch

from diffrl.cli import main
from diffrl.config import ConfigError, load_config


def half_reward(prompts, completions, metadata):
    """A reward defined outside diffrl, used as "test_lm_cli:half_reward"."""
    return [0.5] * len(completions)


def test_diffrl_train_dispatches_lm_recipes(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "configs/lm/quickstart.yaml", f"output_dir={out}", "max_iterations=1", "lm.num_eval=8",
               "train.prompts_per_iteration=2", "train.rollout_batch_size=16", "train.train_batch_size=16",
               "logging.progress=false"])
    assert rc == 0
    base, row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert base["iteration"] == 0 and row["iteration"] == 1 and "eval_reward_mean" in base and "eval_reward_mean" in row
    saved = load_config(out / "config.yaml")
    assert saved.algorithm == "lm_dapo" and saved.lm.clip_high == 0.28 and saved.lm.dynamic_sampling is True
    assert (out / "checkpoints" / "iter_000001" / "lora" / "adapter_config.json").is_file()
    assert "eval exact_match (greedy, 8 held-out prompts) before training" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["lm.rewards={nope: 1.0}"], "'lm.rewards.nope': Unknown LM reward 'nope'"),
    (["lm.eval_reward=exact_matc"], "Did you mean 'exact_match'"),
    (["model=tiny-sd3"], "'model' 'tiny-sd3' is a diffusion pipeline"),
    (["lm.loss_aggregation=token_sum"], "'lm.loss_aggregation'"),
    (["lm.std_scope=global"], "'lm.std_scope'"),
    (["train.group_size=1", "train.train_batch_size=1"], "'train.group_size' must be >= 2"),
    (["lm.train_data=builtin:nothing"], "'lm.train_data': no built-in LM dataset 'nothing'"),
    (["lm.norm_constant=8", "algorithm=lm_dapo"], "'lm.norm_constant' is only used by"),
    (["lm.nft_rhat_clamp=[0.0,0.9]"], "'lm.nft_rhat_clamp'"),
    (["lm.rewards={\"os:nothing_here\": 1.0}"], "has no attribute 'nothing_here'"),
    (["algorithm=lm_grp"], "did you mean 'lm_grpo'"),
    (["rewards={exact_match: 1.0}"], "'rewards' is the diffusion reward mixture"),
])
def test_lm_config_errors_name_the_field(overrides, message):
    base = ["algorithm=lm_grpo", "model=toy-arith", "logging.log_with=none"]
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [*base, *overrides])
    assert message in str(info.value), str(info.value)


def test_module_function_rewards_from_yaml(tmp_path):
    from diffrl.lm.rewards import WeightedRewards

    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: lm_nft\nmodel: toy-arith\nlogging: {log_with: none}\n"
                      "lm:\n  rewards: {'test_lm_cli:half_reward': 0.5, exact_match: 1.0, integer_format: 0.25}\n")
    cfg = load_config(recipe)
    rewards = WeightedRewards(cfg.lm.rewards)
    per, total = rewards.scores(["1+1=", "2+2=", "3+3="], ["2", "5", "x"], [{"answer": "2"}, {"answer": "4"}, {"answer": "6"}])
    assert per["test_lm_cli:half_reward"].tolist() == [0.5] * 3
    assert per["exact_match"].tolist() == [1.0, 0.0, 0.0] and per["integer_format"].tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([0.25 + 1 + 0.25, 0.25 + 0.25, 0.25]))


def test_pretrain_toy_lm_cli_writes_a_loadable_model_and_disjoint_data(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    rc = main(["pretrain-toy-lm", "--output-dir", str(model_dir), "--data-dir", str(data_dir), "--max-steps", "20",
               "--eval-every", "10", "--min-steps", "0", "--hidden", "32", "--layers", "1", "--num-examples", "300",
               "--rl-problems", "200", "--eval-problems", "40"])
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("12+7=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6 and tok.decode(ids[1:]) == "12+7="
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    summary = json.loads((model_dir / "toy_pretrain.json").read_text())
    assert summary["step"] == 20 and [h["step"] for h in summary["history"]] == [10, 20]
    train = [json.loads(line) for line in (data_dir / "arith_train.jsonl").read_text().splitlines()]
    evaluation = [json.loads(line) for line in (data_dir / "arith_eval.jsonl").read_text().splitlines()]
    assert len(train) == 200 and len(evaluation) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}


def test_shipped_toy_lm_is_small_imperfect_and_held_out():
    from diffrl.lm.policy import LMPolicy, builtin_lm_path
    from diffrl.lm.pretrain import greedy_accuracy
    from diffrl.lm.tasks import load_lm_dataset, split_arithmetic

    folder = builtin_lm_path("toy-arith")
    assert sum(f.stat().st_size for f in folder.iterdir()) < 3 * 2**20
    summary = json.loads((folder / "toy_pretrain.json").read_text())
    evaluation = load_lm_dataset("builtin:arith_eval")
    acc = greedy_accuracy(LMPolicy.from_pretrained("toy-arith"), evaluation)
    assert 0.2 <= acc <= 0.6 and acc == pytest.approx(summary["eval_accuracy"], abs=1e-9)
    args = summary["args"]
    pool, rl, held_out = split_arithmetic(seed=args["seed"], n_eval=args["eval_problems"], n_rl=args["rl_problems"])
    assert [r["prompt"] for r in held_out] == evaluation.prompts
    assert [r["prompt"] for r in rl] == load_lm_dataset("builtin:arith_train").prompts
    pretrain_prompts = {r["prompt"] for r in pool[: args["num_examples"]]}
    assert not pretrain_prompts & set(evaluation.prompts)
    assert all(m["answer"] == str(eval(p[:-1])) for p, m in zip(evaluation.prompts, evaluation.metadata))


def test_unknown_reward_lists_the_registered_names():
    from diffrl.lm.rewards import resolve_lm_reward

    with pytest.raises(KeyError) as info:
        resolve_lm_reward("exact")
    assert "exact_match" in str(info.value) and "integer_format" in str(info.value)
