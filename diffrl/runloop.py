"""The outer training loop both trainers share (diffusion `diffrl.trainers.loop.Trainer` and LM
`diffrl.lm.trainer.LMTrainer`): evaluate before training, iterate with a progress bar, log
metrics.jsonl (+ accelerate trackers), evaluate / plot / checkpoint on schedule, report before -> after.

A trainer mixing this in provides: cfg, accelerator, out (Path), iteration, train_iteration() -> row,
evaluate(tag) -> {"eval_reward_mean": ...}, save(), and eval_label() (how the eval metric is named).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm


class TrainLoop:
    def setup_run(self, cfg, accelerator=None) -> None:
        """cfg, out, accelerator (one CPU, one GPU or torchrun's processes), rank / world, the run seed,
        and on the main process the output folder, config.yaml and the trackers."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from diffrl.config import save_config, to_flat_dict

        self.cfg, self.out = cfg, Path(cfg.output_dir)
        log_with = None if cfg.logging.log_with == "none" else cfg.logging.log_with
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision, log_with=log_with, project_dir=str(self.out),
            # without cpu=True accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        set_seed(cfg.seed)  # LoRA initialisation; every later draw is seeded explicitly (derive_generator)
        self.rank, self.world = acc.process_index, acc.num_processes
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            if log_with:
                acc.init_trackers("diffrl", config=to_flat_dict(cfg))

    def eval_label(self) -> str:
        """The evaluation metric's name in the before / after lines."""
        return "eval reward"

    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.cfg.logging.log_with != "none":
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["iteration"])

    def train(self) -> list[dict]:
        cfg, acc, lg = self.cfg, self.accelerator, self.cfg.logging
        rows = []
        if self.iteration == 0:
            self.initial_eval = self.evaluate(f"iter_{0:06d}")["eval_reward_mean"]
            if acc.is_main_process:
                tqdm.write(f"[diffrl] {self.eval_label()} before training: {self.initial_eval:.4f}")
        bar = tqdm(total=cfg.max_iterations, initial=self.iteration, desc=f"{cfg.algorithm} {cfg.model}",
                   disable=not (lg.progress and acc.is_main_process), dynamic_ncols=True)
        while self.iteration < cfg.max_iterations:
            row = self.train_iteration()
            last = self.iteration == cfg.max_iterations
            if last or (lg.eval_every and self.iteration % lg.eval_every == 0):
                row.update(self.evaluate(f"iter_{self.iteration:06d}"))
            self.log(row)
            rows.append(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.2e}",
                            **({"eval": f"{row['eval_reward_mean']:.3f}"} if "eval_reward_mean" in row else {}))
            bar.update(1)
            if "eval_reward_mean" in row and acc.is_main_process:
                from diffrl.visual import plot_metrics

                plot_metrics(self.out / "metrics.jsonl", self.out / "curves.png")
            if last or (lg.save_every and self.iteration % lg.save_every == 0):
                self.save()
        bar.close()
        if acc.is_main_process and rows and "eval_reward_mean" in rows[-1]:
            # a resumed run did not evaluate the base: its before is in the first run's output
            before = f" (before: {self.initial_eval:.4f})" if hasattr(self, "initial_eval") else ""
            tqdm.write(f"[diffrl] {self.eval_label()} after {self.iteration} iterations: "
                       f"{rows[-1]['eval_reward_mean']:.4f}{before}")
        acc.end_training()
        return rows
