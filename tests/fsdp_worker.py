"""Run by test_fsdp.py under torchrun (or alone): GRPO on tiny-sd3 whose rollouts are those one process recorded.

    python fsdp_worker.py OUT RECORD {record|replay} [key=value ...]

record (one process): train, and save every iteration's rollout (latents, log-probs, rewards) to RECORD.
replay (any process count, FSDP2 when the environment asks): the same iterations, each process's rollout replaced
by its rows of the recorded one, so every layout trains on the same global batches. A checkpoint every iteration.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffrl.config import load_config
from diffrl.trainers.loop import Trainer

out, record, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
GLOBAL_PROMPTS = 4
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
cfg = load_config(None, [
    "model=tiny-sd3", f"output_dir={out}", "max_iterations=2", "policy.resolution=32", "policy.lora_rank=4",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "data.eval_images_per_prompt=1",
    f"train.prompts_per_iteration={GLOBAL_PROMPTS // world}", "train.group_size=3",
    f"train.rollout_batch_size={3 * GLOBAL_PROMPTS // world}", f"train.train_batch_size={3 * GLOBAL_PROMPTS // world}",
    "grpo.timestep_fraction=1", "train.learning_rate=1e-3", "logging.log_with=none", "logging.progress=false", "logging.save_every=1",
    *sys.argv[4:],
])
trainer = Trainer(cfg)
rollout = trainer.rollout


def recorded_rollout(iteration):
    batch = rollout(iteration)
    path = record / f"batch_{iteration}.safetensors"
    if mode == "record":
        record.mkdir(parents=True, exist_ok=True)
        save_file({"latents": batch.trajectory.latents.contiguous(), "log_probs": batch.trajectory.log_probs.contiguous(),
                   "rewards": batch.rewards.contiguous()}, path)
        return batch
    saved = load_file(path)
    B, rank = len(batch), trainer.rank
    rows = slice(rank * B, (rank + 1) * B)  # whole prompt groups: the same prompts this process drew
    batch.trajectory.latents = saved["latents"][rows].to(batch.trajectory.latents)
    batch.trajectory.log_probs = saved["log_probs"][rows].to(batch.trajectory.log_probs)
    batch.rewards = saved["rewards"][rows].to(batch.rewards)
    batch.valid = torch.isfinite(batch.rewards)
    return batch


trainer.rollout = recorded_rollout
trainer.train()  # the checkpoints hold the whole trainable tensors, gathered from the shards
