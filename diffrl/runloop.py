"""The outer training loop both trainers share (diffusion `diffrl.trainers.loop.Trainer` and LM
`diffrl.lm.trainer.LMTrainer`): evaluate before training, iterate with a progress bar, log
metrics.jsonl (+ accelerate trackers), evaluate / plot / checkpoint on schedule, report before -> after.

A trainer subclasses TrainLoop, calls setup_run(cfg) and sets `iteration`, and implements train_iteration()
-> metrics row, evaluate(tag) -> {"eval_reward_mean": ...} and save(); eval_label() (how the eval metric is
named) and eval_line(row) (the figures of the before / after lines) have defaults. `train()` is the loop.

The before-training evaluation is row 0 of metrics.jsonl (iteration 0, samples_seen 0), so curves start
at the base model. Trackers get the scalars grouped as train/..., eval/..., time/... and the evaluation
panels as images.
"""

from __future__ import annotations

import abc
import contextlib
import json
import shutil
import threading
from pathlib import Path

from tqdm.auto import tqdm

from diffrl.optim import NonFiniteTrainingError, nonfinite_tensors, optimizer_tensors

TIME_KEYS = ("seconds", "time_rollout", "time_update", "peak_memory_mb")
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "curves.png", "eval", "images", "checkpoints", "diffrl")
"""What a run writes into its output_dir (diffrl/ holds the TensorBoard logs): what overwrite=true deletes."""


def save_config(cfg, path: str | Path) -> None:
    """A run's resolved config (a diffrl.config.RunConfig) as YAML, with the options the run reads
    (`RunConfig.in_use`): the config.yaml of an output folder, loadable by diffrl.load_config."""
    from omegaconf import OmegaConf

    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg.in_use())))


def flat_config(cfg) -> dict:
    """Dotted keys -> scalars (for tracker hyper-parameter tables)."""
    from omegaconf import OmegaConf

    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return out


@contextlib.contextmanager
def quiet_thread_oserrors():
    """No traceback from another thread's OSError (TensorBoard's event writer on a full disk): the main thread
    raises the same error at its next write, so a full disk reads as one error, not two interleaved tracebacks."""
    previous = threading.excepthook

    def hook(args):
        if not issubclass(args.exc_type, OSError):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def tracker_name(key: str) -> str:
    """The grouped tracker name of a metrics.jsonl key: eval_x -> eval/x, timings -> time/x, the rest train/x."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key in TIME_KEYS or key.startswith("time_"):
        return "time/" + key.removeprefix("time_")
    return "train/" + key


class TrainLoop(abc.ABC):
    """The outer loop: evaluate the base, iterate, log, evaluate / plot / checkpoint on schedule, report."""

    iteration: int
    """Iterations done (restored by a resume)."""
    samples_seen: int
    """Samples (or completions) drawn so far, all processes."""

    @abc.abstractmethod
    def train_iteration(self) -> dict:
        """One iteration (sample, score, update); increments `iteration` and returns its metrics row."""

    @abc.abstractmethod
    def evaluate(self, tag: str) -> dict[str, float]:
        """The evaluation of the current weights: at least {"eval_reward_mean": ...}; `tag` names its outputs."""

    @abc.abstractmethod
    def save(self) -> Path | None:
        """Write a checkpoint of the current state (main process); returns its folder."""

    def setup_run(self, cfg, accelerator=None) -> None:
        """cfg, out, accelerator (one CPU, one GPU or torchrun's processes), rank / world, the run seed,
        and on the main process the output folder, config.yaml and the trackers."""
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        from diffrl.distributed import make_accelerator

        import os

        from diffrl.sections import check_output_dir

        from diffrl.checkpoint import clear_stale_writes

        plan, notes = None, []
        if os.environ.get("RANK", "0") == "0":  # before any model loads; once (other ranks may start after rank 0 logs)
            notes = clear_stale_writes(Path(cfg.output_dir) / "checkpoints")  # before a resume picks a checkpoint
            plan = check_output_dir(cfg)  # a resume: its checkpoint verified and fitting this config, or ConfigError
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        log_with = None if cfg.logging.log_with == "none" else cfg.logging.log_with
        # without a GPU accelerate needs cpu=True, else it ignores torchrun's WORLD_SIZE; DDP would re-broadcast
        # module buffers, a collective, in forwards; the networks' buffers are constants (rotary tables, position
        # ids), and Wan2.2 calls a trained expert only on the steps of its noise levels, so processes make
        # different numbers of calls and that collective would wait forever
        self.accelerator = accelerator or make_accelerator(
            cfg.train.mixed_precision, log_with, str(self.out),
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        acc = self.accelerator
        set_seed(cfg.seed)  # LoRA initialisation; every later draw is seeded explicitly (derive_generator)
        self.rank, self.world = acc.process_index, acc.num_processes
        if self.world > 1 and acc.is_main_process:
            sharding = "FSDP2 (sharded weights and optimizer state)" if acc.distributed_type == "FSDP" else str(
                acc.distributed_type).removeprefix("DistributedType.")
            tqdm.write(f"[diffrl] {self.world} processes on {acc.device.type} ({acc.state.backend}): {sharding}, "
                       f"mixed precision {acc.mixed_precision}")
        self.resume_from: Path | None = plan.checkpoint if plan else None
        """The checkpoint to load (resolve_resume verified it), None to start at iteration 0."""
        if cfg.resume and self.world > 1:  # every process loads the checkpoint rank 0 verified
            from accelerate.utils import broadcast_object_list

            self.resume_from = broadcast_object_list([self.resume_from])[0]
        if acc.is_main_process:
            if notes:
                tqdm.write(f"[diffrl] {'; '.join(notes)}")
            for line in plan.notes if plan else []:
                tqdm.write(f"[diffrl] {line}")
            if cfg.overwrite:  # a run already here is replaced (config validation refused it otherwise)
                for name in RUN_OUTPUTS:
                    target = self.out / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is None:  # a resume writes it once its checkpoint loaded (finish_resume)
                save_config(cfg, self.out / "config.yaml")
            if log_with:
                acc.init_trackers("diffrl", config=flat_config(cfg))

    def eval_label(self) -> str:
        """The evaluation metric's name in the before / after lines."""
        return "eval reward"

    def eval_line(self, row: dict) -> str:
        """The evaluation figures of a metrics row, as the before / after lines print them."""
        return f"{row['eval_reward_mean']:.4f}"

    def model_card(self, reward: str, library: str, load: str, family: str | None = None) -> str:
        """README.md of a checkpoint's LoRA (or model) folder, as diffusers' training scripts write one: the base
        model (and its family, which Policy.load_lora checks), how it was trained (`reward`: the rewards as text),
        which library loads it and the line that does (`load`)."""
        cfg = self.cfg
        p = cfg.policy
        adapter = p.resolved_adapter()
        lora = {"lora": f"LoRA rank {p.lora_rank} alpha {p.lora_alpha}",
                "sara": f"SaRA threshold {p.sara_threshold}, nuclear-norm weight {p.sara_lambda_rank}, re-mask "
                        f"{'after step ' + str(p.sara_remask_step) if p.sara_remask_step else 'never'} (merge the sparse "
                        "values into the base model as below)",
                "full": "full fine-tune"}[adapter]
        return "\n".join([
            "---", f"base_model: {cfg.model}", *([f"family: {family}"] if family else []), f"library_name: {library}",
            "tags:", "- diffrl", f"- {cfg.algorithm}", "- full-finetune" if adapter == "full" else f"- {adapter}", "---", "",
            f"# {cfg.algorithm} fine-tune of {cfg.model}", "",
            f"Trained with diffrl: algorithm `{cfg.algorithm}`, reward {reward}, {self.iteration} iterations "
            f"({self.samples_seen} samples), seed {cfg.seed}, learning rate {cfg.train.learning_rate}, {lora}.", "",
            "The whole resolved config is `../../../config.yaml` of the run.", "", "```python", load, "```", ""])

    def prune(self) -> None:
        """logging.checkpoints_total_limit: keep the newest checkpoints only (main process)."""
        from diffrl.checkpoint import prune_checkpoints

        limit = self.cfg.logging.checkpoints_total_limit
        if limit and self.accelerator.is_main_process:
            prune_checkpoints(self.out / "checkpoints", limit)

    def last_good_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of this run (<output_dir>/checkpoints/iter_*), else the one it resumed
        from, else None. Every checkpoint is finite: save() refuses non-finite tensors."""
        from diffrl.checkpoint import latest_checkpoint

        for place in (self.out, self.resume_from):
            if place:
                try:
                    return latest_checkpoint(place)
                except FileNotFoundError:
                    pass
        return None

    def nonfinite_error(self, message: str) -> NonFiniteTrainingError:
        """NonFiniteTrainingError(message) followed by where to resume from (marked so train() adds it once)."""
        good = self.last_good_checkpoint()
        advice = (f"The last good checkpoint is {good}: resume from it with a lower learning rate "
                  f"(resume={good} train.learning_rate=<lower>)." if good is not None else
                  "No checkpoint was written yet: start again with a lower train.learning_rate.")
        err = NonFiniteTrainingError(f"{message}\n{advice}")
        err.names_checkpoint = True
        return err

    def check_finite_before_save(self, module, optimizer, extra: dict | None = None) -> None:
        """A checkpoint must never hold NaN/inf (a resume would train on them): raise NonFiniteTrainingError naming
        the last good checkpoint if a trainable tensor of `module`, the optimiser's state or an `extra` tensor does.
        Call it on every process (their weights are the same) before any file is written."""
        tensors = {**{f"trainable.{n}": p for n, p in module.named_parameters() if p.requires_grad},
                   **{f"optimizer.{n}": t for n, t in optimizer_tensors(optimizer).items()},
                   **{f"extra.{n}": t for n, t in (extra or {}).items()}}
        bad = nonfinite_tensors(tensors)
        if bad:
            raise self.nonfinite_error(f"refusing to write the checkpoint of iteration {self.iteration}: {len(bad)} of its "
                                       f"{len(tensors)} tensors hold NaN/inf (e.g. {', '.join(bad[:3])})")

    def finish_resume(self) -> None:
        """After a trainer loaded `resume_from`: the optimizer takes this config's hyper-parameters (a checkpoint's
        param_groups hold the old ones; resolve_resume listed the changes), and config.yaml is written (never before
        the resume succeeded)."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group.update(lr=t.learning_rate_at(self.iteration, self.cfg.max_iterations), betas=(t.adam_beta1, t.adam_beta2),
                         eps=t.adam_epsilon, weight_decay=t.adam_weight_decay)
        if self.accelerator.is_main_process:
            save_config(self.cfg, self.out / "config.yaml")

    def _truncate_metrics(self, iteration: int) -> None:
        """Keep the rows of metrics.jsonl up to `iteration` (a resumed run logs the later ones again; -1 keeps none,
        for a run started over); a row cut short by a kill is dropped. Replaced atomically: a kill here loses nothing."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last row of a killed run, half written
                continue
            if isinstance(row, dict) and isinstance(row.get("iteration"), int) and row["iteration"] <= iteration:
                kept.append(line + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)

    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.cfg.logging.log_with != "none":
            scalars = {tracker_name(k): v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))}
            self.accelerator.log(scalars, step=row["iteration"])

    def log_image(self, key: str, path: Path) -> None:
        """An image file (an evaluation panel) to every tracker, at the current iteration."""
        if self.cfg.logging.log_with == "none" or not self.accelerator.is_main_process:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({key: pixels[None]}, step=self.iteration, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({key: [pixels]}, step=self.iteration)

    def train(self) -> list[dict]:
        cfg, acc, lg = self.cfg, self.accelerator, self.cfg.logging
        rows = []
        if cfg.resume and acc.is_main_process:  # resumed: rows after the checkpoint are replayed, not repeated
            self._truncate_metrics(self.iteration if self.iteration > 0 else -1)  # started over: row 0 too
        if self.iteration == 0:  # the base model: row 0 of metrics.jsonl
            row = {"iteration": 0, "samples_seen": 0, **self.evaluate(f"iter_{0:06d}")}
            self.log(row)
            if acc.is_main_process:
                tqdm.write(f"[diffrl] {self.eval_label()} before training: {self.eval_line(row)}")
        bar = tqdm(total=cfg.max_iterations, initial=self.iteration, desc=f"{cfg.algorithm} {cfg.model}",
                   disable=not (lg.progress and acc.is_main_process), dynamic_ncols=True)
        try:
            self._iterate(rows, bar)
        except NonFiniteTrainingError as err:
            if err.names_checkpoint:
                raise
            raise self.nonfinite_error(str(err)) from err
        finally:
            bar.close()
        if acc.is_main_process and rows and "eval_reward_mean" in rows[-1]:
            tqdm.write(f"[diffrl] {self.eval_label()} after {self.iteration} iterations: {self.eval_line(rows[-1])}")
        acc.end_training()
        return rows

    def _iterate(self, rows: list[dict], bar) -> None:
        """The iterations left: train, log, evaluate / plot / checkpoint on schedule; appends each row to `rows`."""
        cfg, acc, lg = self.cfg, self.accelerator, self.cfg.logging
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
                self.prune()
