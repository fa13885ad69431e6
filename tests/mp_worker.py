"""Run by test_multiprocess.py under torchrun: two iterations (GRPO, or the algorithm given in the extra
`key=value` arguments after the output folder), then dump what each rank holds."""

import json
import sys

from safetensors.torch import save_file

from diffrl.config import load_config
from diffrl.trainers.loop import Trainer

out = sys.argv[1]
cfg = load_config(None, [
    "model=tiny-sd3", f"output_dir={out}", "max_iterations=2", "policy.resolution=32", "policy.lora_rank=4",
    "sampling.num_steps=3", "sampling.eval_num_steps=2", "data.num_eval_prompts=2", "train.prompts_per_iteration=2",
    "train.group_size=3", "train.rollout_batch_size=6", "train.train_batch_size=3", "train.learning_rate=1e-3",
    "logging.log_with=none", "logging.progress=false", "logging.save_every=0", *sys.argv[2:],
])
trainer = Trainer(cfg)
acc = trainer.accelerator
batch = trainer.rollout(0)
trainer.train()
rank = acc.process_index
tensors = {f"param.{i}": p.detach().contiguous() for i, p in enumerate(trainer.policy.trainable_parameters())}
for name in {a for net in trainer.policy.trained_networks().values() for a in getattr(net, "peft_config", {})}:  # every LoRA adapter, snapshots included
    tensors.update({f"adapter.{name}.{i}": p.detach().clone() for i, p in enumerate(trainer.policy.adapter_parameters(name))})
tensors["noise"] = batch.trajectory.latents[:, 0].contiguous()
tensors["group_ids"] = batch.group_ids
save_file(tensors, f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"world": acc.num_processes, "rank": rank, "prompts": batch.prompts, "type": str(acc.distributed_type)}, f)
