"""reward_async: a rollout chunk is scored in the background while the next chunk samples, with the same scores as
scoring in line. Overlap is shown by events, not timings: the first chunk's scoring waits until the second chunk's
first denoiser call has happened, which can only be while it runs beside the sampling."""

from __future__ import annotations

import threading

import torch

from diffrl.config import load_config
from diffrl.trainers.loop import Trainer

FAST = ["model=tiny-sd3", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8", "sampling.num_steps=2",
        "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2", "train.group_size=3",
        "train.rollout_batch_size=3", "train.train_batch_size=3", "logging.log_with=none", "logging.progress=false"]
WAIT_S = 30.0  # only reached when scoring does not overlap sampling (the failure this test detects)


class Brightness:
    """Mean pixel value, recording which thread scored each chunk; `wait_for` (an Event): the first call waits for
    it and records whether it came."""

    name = "brightness_probe"

    def __init__(self, wait_for: threading.Event | None = None):
        self.wait_for, self.threads, self.overlapped = wait_for, [], None

    def __call__(self, images, prompts, metadata=None):
        if self.wait_for is not None and not self.threads:
            self.overlapped = self.wait_for.wait(WAIT_S)
        self.threads.append(threading.current_thread().name)
        return images.flatten(1).mean(1)


def chunked_trainer(tmp_path, reward_async: bool, reward) -> tuple[Trainer, threading.Event]:
    trainer = Trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", f"reward_async={str(reward_async).lower()}"]))
    trainer.reward = reward
    second_chunk = threading.Event()
    steps = trainer.cfg.sampling.num_steps
    predict, calls = trainer.policy.predict, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] > steps:  # chunk 0 made `steps` calls: this is chunk 1 sampling
            second_chunk.set()
        return predict(*args, **kwargs)

    trainer.policy.predict = counted
    return trainer, second_chunk


def test_scoring_overlaps_the_next_chunk_and_gives_the_in_line_scores(tmp_path):
    """Two chunks of 3 samples. With reward_async the first chunk is scored on the background thread while the second
    chunk samples (its scoring saw chunk 1's denoiser calls start); the rewards equal the in-line scoring's exactly."""
    probe = Brightness()
    trainer, second_chunk = chunked_trainer(tmp_path / "async", True, probe)
    probe.wait_for = second_chunk
    overlapped = trainer.rollout(0)
    assert probe.overlapped is True
    assert len(probe.threads) == 2 and all(name.startswith("diffrl-reward") for name in probe.threads)

    in_line = Brightness()
    trainer_sync, _ = chunked_trainer(tmp_path / "sync", False, in_line)
    plain = trainer_sync.rollout(0)
    assert in_line.threads == [threading.main_thread().name] * 2
    assert torch.equal(overlapped.rewards, plain.rewards)
    torch.testing.assert_close(overlapped.rewards, plain.images.flatten(1).mean(1), rtol=0, atol=0)
