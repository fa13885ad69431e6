"""One LM GRPO iteration, diffrl vs TRL's GRPOTrainer: time and peak memory on the same model and batch.

    pip install -e ".[bench]"                    # TRL is a benchmark-only dependency
    python -m diffrl.benchmarks.lm_trl           # -> benchmarks/results/lm_trl.md (+ .json)

Both sides run the same work per iteration: P prompts x K completions sampled with `model.generate`
(temperature 1, no top-k / top-p, at most --max-new-tokens tokens), exact-match rewards, group-
normalised advantages, the reference log-probs (LoRA adapter disabled, beta 0.04 k3 KL), one forward +
backward over the whole batch and one AdamW step (GRPO loss, per-sequence mean, clip 0.2), LoRA rank 16
on every linear layer of the shipped toy LM (assets/lm/toy_arith). Each framework runs in its own
subprocess of this one invocation, so their memory does not mix: after --warmup iterations, --steps
timed iterations; the table reports the median and the spread. Peak memory is
torch.cuda.max_memory_allocated on a GPU; on a CPU the peak of the C heap in use (glibc mallinfo2), sampled
every 2 ms during the timed iterations, above its value just before them (model, optimiser and imports
excluded). Activation checkpointing is set explicitly on both sides (TRL's GRPOConfig turns it on by
default, diffrl leaves it off); --gradient-checkpointing off on runs both.

What the numbers are not: a tiny model makes both sides overhead-bound (Python, `generate`'s per-token
loop), so this measures framework overhead on small batches, not kernel throughput on large models.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# ---- memory -------------------------------------------------------------------------------------
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakHeap:
    """Peak bytes the C allocator has handed out (glibc mallinfo2: in-use arena chunks + mmapped chunks) between
    start() and stop(), above the value at start(), sampled by a thread. Unlike the resident set size this does not
    depend on what the allocator kept cached from earlier iterations. Falls back to RSS without mallinfo2."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        try:
            fn = ctypes.CDLL(None).mallinfo2
            fn.restype = _MallInfo2
            self._mallinfo, self.kind = fn, "CPU heap in use (glibc mallinfo2), peak above the pre-iteration value"
        except (AttributeError, OSError):
            self._mallinfo, self.kind = None, "CPU peak RSS above the pre-iteration baseline"
        self._page = os.sysconf("SC_PAGE_SIZE")

    def used(self) -> int:
        if self._mallinfo is not None:
            info = self._mallinfo()
            return info.uordblks + info.hblkhd
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.every)

    def start(self) -> None:
        self.baseline = self.peak = self.used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())
        return (self.peak - self.baseline) / 2**20


def _memory_probe():
    import torch

    if torch.cuda.is_available():
        class Cuda:
            def start(self):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

            def stop(self):
                torch.cuda.synchronize()
                return torch.cuda.max_memory_allocated() / 2**20

        return Cuda(), "GPU max_memory_allocated"
    probe = PeakHeap()
    return probe, probe.kind


# ---- workers (one per subprocess) ---------------------------------------------------------------
def run_diffrl(args) -> dict:
    import torch

    from diffrl.config import load_config
    from diffrl.lm.trainer import LMTrainer

    n = args.prompts * args.group_size
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            "algorithm=lm_grpo", "model=toy-arith", f"output_dir={out}", f"seed={args.seed}",
            "policy.lora_rank=16", "policy.lora_alpha=32", f"train.prompts_per_iteration={args.prompts}",
            f"train.group_size={args.group_size}", f"train.rollout_batch_size={n}", f"train.train_batch_size={n}",
            f"train.learning_rate={args.lr}", "train.adam_weight_decay=0", f"lm.max_new_tokens={args.max_new_tokens}",
            "lm.kl_beta=0.04", "lm.std_ddof=1", "logging.log_with=none", "logging.progress=false",
            f"policy.gradient_checkpointing={args.gradient_checkpointing == 'on'}",
        ])
        trainer = LMTrainer(cfg)
        for _ in range(args.warmup):
            trainer.train_iteration()
        probe, memory_kind = _memory_probe()
        times, rewards = [], []
        probe.start()
        for _ in range(args.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            row = trainer.train_iteration()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            rewards.append(row["reward_mean"])
        memory = probe.stop()
    return {"times": times, "memory_mb": memory, "memory_kind": memory_kind, "reward_mean": statistics.mean(rewards)}


def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from diffrl.lm.policy import resolve_lm_path
    from diffrl.lm.rewards import exact_match
    from diffrl.lm.tasks import load_lm_dataset

    data = load_lm_dataset("builtin:arith_train")
    dataset = Dataset.from_list([{"prompt": p, "answer": m["answer"]} for p, m in zip(data.prompts, data.metadata)])

    def reward(prompts, completions, answer, **_):
        return exact_match(prompts, completions, [{"answer": a} for a in answer])

    path = resolve_lm_path("toy-arith")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    probe, memory_kind = _memory_probe()

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                probe.start()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > args.warmup:  # global_step was incremented before this call
                self.times.append(time.perf_counter() - self.t0)

    n = args.prompts * args.group_size
    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=args.group_size,
            steps_per_generation=1, num_iterations=1, max_completion_length=args.max_new_tokens, temperature=1.0,
            top_k=0, top_p=1.0, beta=0.04, loss_type="grpo", scale_rewards="group", epsilon=0.2,
            learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0,
            max_steps=args.warmup + args.steps, logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_dropout=True, dataloader_num_workers=0,
            gradient_checkpointing=args.gradient_checkpointing == "on",  # TRL's default is on; set explicitly on both sides
        )
        timer = Timer()
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        trainer.train()
        memory = probe.stop()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h][args.warmup:]
    return {"times": timer.times, "memory_mb": memory, "memory_kind": memory_kind,
            "reward_mean": statistics.mean(rewards) if rewards else float("nan"), "trl_version": trl.__version__}


# ---- driver ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffrl.benchmarks.lm_trl", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 64], help="prompts per iteration (P); several: one row each")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--steps", type=int, default=20, help="timed iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each worker")
    p.add_argument("--gradient-checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="activation checkpointing on both sides (TRL's GRPOConfig defaults to on, diffrl to off)")
    p.add_argument("--output", default=str(RESULTS / "lm_trl.md"))
    p.add_argument("--worker", choices=["diffrl", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def _env() -> dict:
    import platform

    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        args.prompts, args.gradient_checkpointing = args.prompts[0], args.gradient_checkpointing[0]
        result = (run_diffrl if args.worker == "diffrl" else run_trl)(args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print('lm_trl: TRL is not installed; pip install -e ".[bench]"', file=sys.stderr)
        return 2
    results = {}
    common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("prompts", "gradient_checkpointing", "output", "worker", "result")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    for gc in args.gradient_checkpointing:
        for prompts in args.prompts:
            for worker in ("diffrl", "trl"):
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                    result_path = f.name
                cmd = [sys.executable, "-m", "diffrl.benchmarks.lm_trl", *common, "--prompts", str(prompts),
                       "--gradient-checkpointing", gc, "--worker", worker, "--result", result_path]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
                    raise SystemExit(f"lm_trl: the {worker} worker failed (exit {proc.returncode})")
                results[f"{worker} P={prompts} gc={gc}"] = {"framework": worker, "prompts": prompts, "gradient_checkpointing": gc,
                                                            **json.loads(Path(result_path).read_text())}
                os.unlink(result_path)
    write_report(args, results)
    return 0


def write_report(args, results: dict) -> None:
    env = _env()
    medians = {k: statistics.median(r["times"]) for k, r in results.items()}
    trl_version = next(r["trl_version"] for r in results.values() if "trl_version" in r)
    memory_kind = next(iter(results.values()))["memory_kind"]
    prompts = " or ".join(str(p) for p in args.prompts)
    lines = [
        "# One LM GRPO iteration: diffrl vs TRL GRPOTrainer",
        "",
        f"Model: the shipped toy LM (assets/lm/toy_arith, 0.49 M params, Llama), LoRA r16 / alpha 32 on every linear "
        f"layer, float32. Batch: P = {prompts} prompts x {args.group_size} completions, <= {args.max_new_tokens} new "
        f"tokens, temperature 1; GRPO loss (per-sequence mean, clip 0.2), k3 KL beta 0.04 against the LoRA-disabled "
        f"model, one AdamW step per iteration. {args.warmup} warm-up iterations, then {args.steps} timed; "
        f"torch threads {args.threads}.",
        "",
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"TRL {trl_version}. Memory: {memory_kind}.",
        "",
        "| framework | batch (P x K) | gradient checkpointing | time / iteration, median (s) | min .. max (s) "
        "| diffrl / TRL time | peak memory (MiB) | mean train reward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        t = sorted(r["times"])
        ratio = medians[key] / medians[f"trl P={r['prompts']} gc={r['gradient_checkpointing']}"]
        lines.append(f"| {r['framework']} | {r['prompts']} x {args.group_size} | {r['gradient_checkpointing']} | {medians[key]:.3f} "
                     f"| {t[0]:.3f} .. {t[-1]:.3f} "
                     f"| {ratio:.2f} | {r['memory_mb']:.1f} | {r['reward_mean']:.3f} |")
    lines += ["",
              f"Command: `python -m diffrl.benchmarks.lm_trl --prompts {' '.join(map(str, args.prompts))} --group-size {args.group_size} "
              f"--max-new-tokens {args.max_new_tokens} --gradient-checkpointing {' '.join(args.gradient_checkpointing)} --warmup {args.warmup} --steps {args.steps} --threads {args.threads}`", ""]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
                                                    "env": env, "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
