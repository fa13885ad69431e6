"""What a training run leaves for a person to read: metrics.jsonl starting at the base model (iteration 0), every
evaluation set reported with its mean over tags, stderr and paired gain, readable panels, TensorBoard scalars
grouped as train/ eval/ time/ with the panels as images."""

import json
import statistics

import pytest
from PIL import Image

from diffrl.config import ConfigError, load_config
from diffrl.runloop import tracker_name
from diffrl.trainers.loop import Trainer

FAST = [
    "model=tiny-sd3", "reward=brightness", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "train.prompts_per_iteration=2", "train.group_size=2",
    "train.rollout_batch_size=4", "train.train_batch_size=4", "train.learning_rate=1e-2", "logging.progress=false",
    "data.prompts=builtin:toy_train", "data.eval_prompts=builtin:toy_eval", "data.num_eval_prompts=12",
    "data.eval_images_per_prompt=3", "data.eval_batch_size=7", "max_iterations=2", "logging.eval_every=1",
]


def test_run_reports_every_eval_set_from_iteration_zero(tmp_path):
    extra = ["data.eval_name=unseen", "data.eval_sets={train_prompts: {prompts: builtin:toy_train, num_prompts: 5}}",
             "logging.log_with=tensorboard", f"output_dir={tmp_path}"]
    Trainer(load_config(None, [*FAST, *extra])).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[0]["samples_seen"] == 0
    for r in rows:
        for key in ("eval_reward_mean", "eval_reward_stderr", "eval_mean_over_tags", "eval_mean_over_tags_stderr",
                    "eval_train_prompts_reward_mean"):
            assert key in r, key
    assert "eval_gain" not in rows[0] and "eval_gain" in rows[2] and "eval_train_prompts_gain" in rows[2]
    # the metrics agree with the per-image scores on disk (36 images: 12 prompts x 3; 15 train-prompt images)
    scores = [json.loads(line) for line in (tmp_path / "eval" / "iter_000002.jsonl").read_text().splitlines()]
    base = [json.loads(line) for line in (tmp_path / "eval" / "iter_000000.jsonl").read_text().splitlines()]
    unseen = [s for s in scores if s["set"] == "unseen"]
    assert len(unseen) == 36 and sum(s["set"] == "train_prompts" for s in scores) == 15
    assert rows[2]["eval_reward_mean"] == pytest.approx(statistics.fmean(s["score"] for s in unseen))
    by_tag = {}
    for s in unseen:
        by_tag.setdefault(s["tag"], []).append(s["score"])
    assert rows[2]["eval_mean_over_tags"] == pytest.approx(statistics.fmean(statistics.fmean(v) for v in by_tag.values()))
    gains = [a["score"] - b["score"] for a, b in zip(scores, base) if a["set"] == "unseen"]
    gain_by_tag = {}
    for s, g in zip(unseen, gains):
        gain_by_tag.setdefault(s["tag"], []).append(g)
    assert rows[2]["eval_gain"] == pytest.approx(statistics.fmean(statistics.fmean(v) for v in gain_by_tag.values()))
    # panels: 8 x 4 cells of the first prompts, at most ~2000 px on a side
    for name, cells in (("iter_000000.png", 32), ("iter_000002.png", 32), ("iter_000002_train_prompts.png", 15)):
        with Image.open(tmp_path / "images" / name) as panel:
            assert max(panel.size) <= 2000 and panel.size == (8 * 160, -(-cells // 8) * 204), panel.size
    # TensorBoard: grouped scalars, the base model at step 0, the panels as images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "diffrl"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"eval/reward_mean", "eval/mean_over_tags", "train/reward_mean", "train/loss", "time/rollout"} <= scalars
    assert [e.step for e in events.Scalars("eval/mean_over_tags")] == [0, 1, 2]
    assert {"eval/unseen", "eval/train_prompts"} <= set(events.Tags()["images"])


def test_tracker_names_are_grouped():
    assert [tracker_name(k) for k in ("eval_mean_over_tags", "reward_mean", "time_update", "seconds", "kl")] == [
        "eval/mean_over_tags", "train/reward_mean", "time/update", "time/seconds", "train/kl"]


@pytest.mark.parametrize("override, field", [
    ("data.eval_sets={bad name: builtin:toy_train}", "data.eval_sets.bad name"),
    ("data.eval_sets={x: {prompts: builtin:toy_train, num_prompts: 0}}", "data.eval_sets.x.num_prompts"),
    ("data.eval_sets={x: {prompt: builtin:toy_train}}", "data.eval_sets.x"),
    ("data.eval_name=not-a-name", "data.eval_name"),
    ("data.eval_batch_size=0", "data.eval_batch_size"),
])
def test_bad_eval_sets_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [*FAST, override])
