"""Reward mixtures: combined advantages against float64 references, per-source weights, config
validation, and the training loop logging each component (synchronous and asynchronous scoring)."""

import json
import math

import numpy as np
import pytest
import torch

from diffrl.config import ConfigError, load_config
from diffrl.core import PerPromptStatTracker, combine_rewards
from diffrl.rewards import Reward, build_reward
from diffrl.rewards.mixture import RewardMixture, RolloutScorer, parse_mixture, prompt_group_ids

EPS = 1e-4


def _ref_group_adv(r, groups, std_scope="global", ddof=0, eps=EPS):
    """numpy float64: (r - mean over the group) / (std + eps); the std over the batch ("global"), the group,
    or none (Dr.GRPO: centring only)."""
    r, groups = np.asarray(r, dtype=np.float64), np.asarray(groups)
    out = np.zeros_like(r)
    for g in np.unique(groups):
        m = groups == g
        if np.all(r[m] == r[m][0]):
            continue  # constant group: 0
        if std_scope == "none":
            out[m] = r[m] - r[m].mean()
            continue
        std = np.std(r, ddof=ddof) if std_scope == "global" else np.std(r[m], ddof=ddof)
        out[m] = (r[m] - r[m].mean()) / (std + eps)
    return out


def _mixture(weights, combine, source_weights=None):
    return RewardMixture({k: build_reward("brightness") for k in weights}, weights, combine, source_weights)


def mixture_advantages(mix, components, prompts, metadata, std_scope="global"):
    """What the loop does with a mixture: its per-sample weights into diffrl.core.combine_rewards."""
    weights = mix.sample_weights(metadata, len(prompts))
    return combine_rewards({k: v.double() for k, v in components.items()}, weights, prompt_group_ids(prompts),
                           mode=mix.combine, std_scope=std_scope, ddof=0, eps=EPS)


PROMPTS = ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4
R1 = torch.tensor([0.1, 0.5, 0.3, 0.9, 2.0, 2.0, 2.0, 2.0, -1.0, 0.0, 1.0, 3.0])
R2 = torch.tensor([5.0, 1.0, 2.0, 7.0, 0.0, 1.0, 0.5, 0.2, 3.0, 3.5, 2.0, 9.0])


@pytest.mark.parametrize("std_scope", ["global", "group"])
def test_sum_then_normalize_is_group_advantage_of_the_weighted_sum(std_scope):
    mix = _mixture({"a": 1.0, "b": 0.7}, "sum_then_normalize")
    adv = mixture_advantages(mix, {"a": R1, "b": R2}, PROMPTS, None, std_scope=std_scope)
    ref = _ref_group_adv(R1.double().numpy() + 0.7 * R2.double().numpy(), PROMPTS, std_scope)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-12, atol=1e-12)
    # the single-reward path of the loop (PerPromptStatTracker on the weighted sum) gives the same
    tracker = PerPromptStatTracker(std_scope=std_scope, eps=EPS)
    np.testing.assert_allclose(tracker.update(PROMPTS, (R1.double() + 0.7 * R2.double())).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("std_scope", ["global", "group", "none"])
def test_normalize_then_sum_matches_gdpo_reference(std_scope):
    mix = _mixture({"a": 1.0, "b": 0.7}, "normalize_then_sum")
    adv = mixture_advantages(mix, {"a": R1, "b": R2}, PROMPTS, None, std_scope=std_scope)
    a1, a2 = _ref_group_adv(R1, PROMPTS, std_scope), _ref_group_adv(R2, PROMPTS, std_scope)
    s = a1 + 0.7 * a2
    ref = (s - s.mean()) / (np.std(s) + EPS)
    np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_per_source_weights_and_missing_zero_weight_rewards():
    """Source "ocr" weighs ocr 1 and pick 0.2; source "art" only pick (ocr is NaN there: no quoted text)."""
    meta = [{"source": "ocr"}] * 4 + [{"source": "art"}] * 4 + [{}] * 4  # the last group: default weights
    ocr = torch.tensor([0.1, 0.5, 0.3, 0.9, *[math.nan] * 4, 0.2, 0.4, 0.4, 0.9])
    pick = R2
    defaults = {"ocr": 0.5, "pick": 1.0}
    table = {"ocr": {"ocr": 1.0, "pick": 0.2}, "art": {"pick": 1.0}}
    for combine in ("sum_then_normalize", "normalize_then_sum"):
        mix = RewardMixture({"ocr": build_reward("brightness"), "pick": build_reward("brightness")}, defaults,
                            combine, table)
        w = mix.sample_weights(meta, 12)
        assert w["ocr"].tolist() == [1.0] * 4 + [0.0] * 4 + [0.5] * 4
        assert w["pick"].tolist() == [0.2] * 4 + [1.0] * 4 + [1.0] * 4
        total = mix.total({"ocr": ocr, "pick": pick}, meta)  # NaN only where its weight is 0: left out
        expected = np.where(w["ocr"].numpy() != 0, w["ocr"].numpy() * np.nan_to_num(ocr.double().numpy()), 0) \
            + w["pick"].numpy() * pick.double().numpy()
        np.testing.assert_allclose(total.numpy(), expected, rtol=1e-6)
        adv = mixture_advantages(mix, {"ocr": ocr, "pick": pick}, PROMPTS, meta)
        if combine == "sum_then_normalize":
            ref = _ref_group_adv(expected, PROMPTS)
        else:
            active = w["ocr"].numpy() != 0  # ocr's statistics over the samples where it counts
            a_ocr = np.zeros(12)
            a_ocr[active] = _ref_group_adv(ocr.double().numpy()[active], np.array(PROMPTS)[active])
            s = w["ocr"].numpy() * a_ocr + w["pick"].numpy() * _ref_group_adv(pick, PROMPTS)
            ref = (s - s.mean()) / (np.std(s) + EPS)
        np.testing.assert_allclose(adv.numpy(), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="non-finite"):
        mixture_advantages(mix, {"ocr": ocr, "pick": pick}, PROMPTS, None)  # default weights: ocr counts where NaN


def test_groups_are_prompt_strings_and_score_is_the_weighted_sum():
    assert prompt_group_ids(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]
    mix = RewardMixture({"brightness": build_reward("brightness"), "colorfulness": build_reward("colorfulness")},
                        {"brightness": 2.0, "colorfulness": 0.01})
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    assert mix.differentiable and mix.accepts == ("image", "video")
    out = mix(x, ["a"] * 3)
    expected = 2.0 * build_reward("brightness")(x, ["a"] * 3) + 0.01 * build_reward("colorfulness")(x, ["a"] * 3)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert not RewardMixture({"j": build_reward("jpeg_compressibility"), "b": build_reward("brightness")},
                             {"j": 1.0, "b": 1.0}).differentiable


def test_parse_mixture_and_config_validation(tmp_path):
    assert parse_mixture({"pickscore": 1, "ocr": {"weight": 0.7, "kwargs": {"model": "tiny"}}}) == {
        "pickscore": (1.0, {}), "ocr": (0.7, {"model": "tiny"})}
    for bad in ({"ocr": "heavy"}, {"ocr": {"kwargs": {}}}, {"ocr": {"weight": 1, "extra": 2}}, {"ocr": float("nan")}):
        with pytest.raises(ValueError):
            parse_mixture(bad)
    base = ["policy.resolution=32", f"output_dir={tmp_path}", "logging.log_with=none"]
    cfg = load_config(None, [*base, "rewards={pickscore: 1.0, ocr: {weight: 0.7, kwargs: {model: tiny}}}",
                             "reward_combine=normalize_then_sum", "reward_source_weights={ocr_set: {ocr: 1.0}}"])
    assert cfg.rewards["ocr"]["weight"] == 0.7 and cfg.reward_combine == "normalize_then_sum"
    errors = {
        "rewards={pickscor: 1.0}": "pickscore",  # suggests the closest name
        "rewards={pickscore: high}": "finite number",
        "reward_combine=mean": "reward_combine",
        "reward_source_weights={s: {clipscore: 1.0}}": "needs a mixture",
    }
    for override, match in errors.items():
        with pytest.raises(ConfigError, match=match):
            load_config(None, [*base, override])
    with pytest.raises(ConfigError, match="reward_kwargs"):
        load_config(None, [*base, "rewards={pickscore: 1.0}", "reward_kwargs={quality: 50}"])
    with pytest.raises(ConfigError, match="not a reward of the mixture"):
        load_config(None, [*base, "rewards={pickscore: 1.0}", "reward_source_weights={s: {ocr: 1.0}}"])


class _SlowCount(Reward):
    """Brightness, after a pause, counting calls (checks chunking and the background thread)."""

    name = "slow_count"

    def __init__(self):
        self.calls = []

    def score(self, samples, prompts, metadata):
        import threading
        import time

        time.sleep(0.05)
        self.calls.append((len(prompts), threading.current_thread().name))
        return samples.flatten(1).mean(1)


def test_rollout_scorer_scores_chunks_in_the_background_in_order():
    from concurrent.futures import ThreadPoolExecutor

    x = torch.rand(7, 3, 4, 4)
    prompts = [str(i) for i in range(7)]
    for pool in (None, ThreadPoolExecutor(1, thread_name_prefix="bg")):
        reward = _SlowCount()
        scorer = RolloutScorer(reward, pool)
        for start in range(0, 7, 3):
            scorer.submit(x[start:start + 3], prompts[start:start + 3], None)
        rewards, parts = scorer.collect()
        torch.testing.assert_close(rewards, x.flatten(1).mean(1))
        assert parts is None and [n for n, _ in reward.calls] == [3, 3, 1]
        assert all(t.startswith("bg") for _, t in reward.calls) == (pool is not None)


FAST = ["model=tiny-sd3", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "sampling.num_steps=2",
        "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2", "train.group_size=3",
        "train.rollout_batch_size=4", "train.train_batch_size=3", "logging.log_with=none", "logging.progress=false",
        "logging.eval_every=0", "logging.save_every=0", "max_iterations=1"]


def test_training_loop_uses_mixture_advantages_and_logs_each_component(tmp_path):
    from diffrl.trainers.loop import Trainer

    mixture = "rewards={brightness: 1.0, colorfulness: {weight: 0.01, kwargs: {pixel_scale: 255.0}}}"
    runs = {}
    for mode in ("sync", "async"):
        cfg = load_config(None, [*FAST, f"output_dir={tmp_path / mode}", mixture, "reward_combine=normalize_then_sum",
                                 f"reward_async={mode == 'async'}"])
        trainer = Trainer(cfg)
        batch = trainer.rollout(0)
        row = trainer.advantages(batch)
        runs[mode] = batch
        comps = batch.reward_components
        assert set(comps) == {"brightness", "colorfulness"} and comps["brightness"].shape == (6,)
        np.testing.assert_allclose(batch.rewards.double().numpy(),
                                   comps["brightness"].double().numpy() + 0.01 * comps["colorfulness"].double().numpy(),
                                   rtol=1e-6)
        a1 = _ref_group_adv(comps["brightness"], batch.prompts)
        a2 = _ref_group_adv(comps["colorfulness"], batch.prompts)
        s = a1 + 0.01 * a2
        np.testing.assert_allclose(batch.advantages.double().numpy(), (s - s.mean()) / (np.std(s) + EPS), atol=1e-5)
        assert row["reward_colorfulness_mean"] == pytest.approx(comps["colorfulness"].mean().item(), rel=1e-6)
    assert torch.equal(runs["sync"].rewards, runs["async"].rewards)  # background scoring changes nothing
    trainer.train()  # one iteration end to end: components land in metrics.jsonl
    row = json.loads((tmp_path / "async" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward_brightness_mean", "reward_brightness_std", "reward_colorfulness_mean", "reward_mean"} <= set(row)
