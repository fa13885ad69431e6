"""Memory and time of one reward-backprop update against the number of sampling steps: EasyTune vs DRaFT-K.

    python -m diffrl.benchmarks.memory --output-dir outputs/memory             # steps 10, 20, 50
    python -m diffrl.benchmarks.memory --steps 10 20 --methods easytune draft_all --output-dir ...
    python -m diffrl.benchmarks.memory --model random-mdm --output-dir outputs/memory_motion   # motion, MDM size

An update of these trainers samples its chains with gradient (diffrl.trainers.reward_backprop), so its
memory is what the method keeps for backward: EasyTune one denoiser call at a time (flat in the number of
steps N), DRaFT-K the last K steps (with step checkpointing: each step's input latents, recomputing its
activations in backward; without: every kept step's activations). Setup: the shipped toy flow model
(toy-sd3, 32 px, LoRA r16), the differentiable proxy reward toy_proxy, one train batch of --batch chains
(flow ODE, CFG 4.5); motion models: MDM's denoiser size with random weights (random-mdm, 60 frames) or the toy
motion model, the weight-free physics reward motion_physics, deterministic DDIM with CFG 2.5. Each (device, method, N) runs in a fresh subprocess: model load, one warm-up update,
then --repeats measured updates; time is their median, memory the peak above the value just before them:
on the CPU the C heap in use (glibc mallinfo2, sampled every 2 ms; unlike the resident set size it does not
keep what the allocator cached, so it shows activation memory and nothing else), on a GPU
torch.cuda.max_memory_allocated minus the memory allocated before (weights, optimiser state excluded).

Outputs in --output-dir: memory.md (the table), memory.json, memory.png (memory and time against N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name -> (label, config overrides); "{k10}" is min(10, N)
    "easytune": ("EasyTune (last 20 % of steps)", ("algorithm=easytune",)),
    "draft_k1": ("DRaFT-1", ("algorithm=draft", "draft.k=1")),
    "draft_k10": ("DRaFT-10", ("algorithm=draft", "draft.k={k10}")),
    "draft_all": ("DRaFT-all", ("algorithm=draft", "draft.k=null")),
    "draft_all_no_ckpt": ("DRaFT-all, no step checkpointing", ("algorithm=draft", "draft.k=null", "draft.checkpoint_steps=false")),
}


SETUPS = {
    # sample kind -> what an update samples and scores
    "image": ("reward=toy_proxy", "data.prompts=builtin:toy_train", "policy.resolution=32", "sampling.sampler=flow_ode",
              "sampling.guidance_scale=4.5"),
    # motion: MotionRFT's setting, deterministic DDIM with CFG 2.5 (MDM's), the weight-free physics reward
    "motion": ("reward=motion_physics", "data.prompts=builtin:toy_motion_train", "sampling.sampler=ddim",
               "sampling.eta=0.0", "sampling.guidance_scale=2.5"),
}
"""Per sample kind: reward, prompts, sampler and guidance of the measured updates."""


def sample_kind_of(model: str) -> str:
    from diffrl.pipelines.registry import policy_class, resolve_family

    return policy_class(resolve_family(model)).sample_kind


def worker_overrides(method: str, steps: int, model: str, batch: int, out: str) -> list[str]:
    _, extra = METHODS[method]
    return [
        *(o.replace("{k10}", str(min(10, steps))) for o in extra), *SETUPS[sample_kind_of(model)],
        f"model={model}", f"output_dir={out}", "policy.lora_rank=16", "policy.lora_alpha=32",
        f"sampling.num_steps={steps}", "train.prompts_per_iteration=1", f"train.group_size={batch}",
        f"train.rollout_batch_size={batch}", f"train.train_batch_size={batch}", "logging.log_with=none",
        "logging.progress=false",
    ]


# ---- the worker (one subprocess per measurement) ---------------------------------------------------
def peak_memory_probe(device: str):
    """Peak memory of a stretch of work: start(), stop() -> MiB above the start; `kind` says what is measured."""
    import torch

    if device == "cuda":
        class Cuda:
            kind = "GPU torch.cuda.max_memory_allocated above the allocation before the updates"

            def start(self):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.baseline = torch.cuda.memory_allocated()

            def stop(self):
                torch.cuda.synchronize()
                return (torch.cuda.max_memory_allocated() - self.baseline) / 2**20

        return Cuda()
    from diffrl.benchmarks.lm_trl import PeakHeap

    return PeakHeap()


def run_worker(args) -> dict:
    import torch

    from diffrl.config import load_config
    from diffrl.runtime import derive_generator
    from diffrl.trainers.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(load_config(None, worker_overrides(args.method, args.steps[0], args.model, args.batch, out)))
        device = trainer.accelerator.device.type
        alg = trainer.algorithm
        alg.update(trainer.rollout(0), trainer.optimizer, derive_generator(0, 0))  # warm-up: lazy init, Adam state
        batches = [trainer.rollout(1 + r) for r in range(args.repeats)]
        probe = peak_memory_probe(device)
        times, metrics = [], {}
        probe.start()
        for r, batch in enumerate(batches):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            metrics = alg.update(batch, trainer.optimizer, derive_generator(0, 1 + r))
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        memory = probe.stop()
    return {"method": args.method, "steps": args.steps[0], "device": device, "times": times, "memory_mb": memory,
            "memory_kind": probe.kind, "optimizer_steps": metrics.get("optimizer_steps", 1.0),
            "kept_steps": metrics.get("kept_steps")}


# ---- the driver --------------------------------------------------------------------------------------
def measure(args, device: str, method: str, steps: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, "-m", "diffrl.benchmarks.memory", "--worker", "--method", method, "--steps", str(steps),
           "--model", args.model, "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--result", result]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
        raise RuntimeError(f"memory benchmark worker {method} N={steps} on {device} failed (exit {proc.returncode})")
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


def summary(rows: list[dict], device: str) -> list[str]:
    """How each method's memory changes from the fewest to the most steps."""
    lines = []
    for method, (label, _) in METHODS.items():
        mine = sorted((r for r in rows if r["method"] == method and r["device"] == device), key=lambda r: r["steps"])
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            lines.append(f"- {label}: {a['memory_mb']:.1f} MiB at {a['steps']} steps -> {b['memory_mb']:.1f} MiB at "
                         f"{b['steps']} steps (x{b['memory_mb'] / max(a['memory_mb'], 1e-9):.2f}); "
                         f"{statistics.median(a['times']):.2f} s -> {statistics.median(b['times']):.2f} s per update")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| device | method | sampling steps N | optimiser steps / update | peak memory (MiB) | time / update, median (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {METHODS[r['method']][0]} | {r['steps']} | {r['optimizer_steps']:.0f} "
                     f"| {r['memory_mb']:.1f} | {statistics.median(r['times']):.2f} |")
    return lines


def write_report(args, rows: list[dict], out: Path) -> None:
    import platform

    import torch

    devices = sorted({r["device"] for r in rows})
    lines = [
        "# Reward-backprop memory: EasyTune vs DRaFT-K against sampling steps", "",
        f"Model `{args.model}` (LoRA r16 / alpha 32, float32), one train batch of {args.batch} chains, "
        f"{' '.join(o for o in SETUPS[sample_kind_of(args.model)] if not o.startswith('data.'))}; one warm-up update, "
        f"then {args.repeats} measured; torch threads {args.threads}; torch {torch.__version__}, {platform.machine()}.", "",
        *(f"Memory on {d}: {next(r['memory_kind'] for r in rows if r['device'] == d)}." for d in devices), "",
        *table(rows), "",
    ]
    for d in devices:
        lines += [f"On {d}:", *summary(rows, d), ""]
    lines += ["![memory and time against sampling steps](memory.png)", "",
              f"Command: `python -m diffrl.benchmarks.memory --steps {' '.join(map(str, args.steps))} --methods "
              f"{' '.join(args.methods)} --model {args.model} --batch {args.batch} --repeats {args.repeats} "
              f"--threads {args.threads}`", ""]
    (out / "memory.md").write_text("\n".join(lines))
    (out / "memory.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
                                                 "rows": rows}, indent=1))
    plot(rows, out / "memory.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(len(devices), 2, figsize=(11, 4 * len(devices)), squeeze=False)
    for row_axes, device in zip(axes, devices):
        for method, (label, _) in METHODS.items():
            mine = sorted((r for r in rows if r["method"] == method and r["device"] == device), key=lambda r: r["steps"])
            if not mine:
                continue
            steps = [r["steps"] for r in mine]
            row_axes[0].plot(steps, [r["memory_mb"] for r in mine], marker="o", label=label)
            row_axes[1].plot(steps, [statistics.median(r["times"]) for r in mine], marker="o", label=label)
        for ax, what in zip(row_axes, ("peak memory above baseline (MiB)", "time per update (s)")):
            ax.set_xlabel("sampling steps N")
            ax.set_ylabel(what)
            ax.set_yscale("log")
            ax.set_title(device)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffrl.benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="outputs/memory")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50], help="sampling steps N; one measurement each")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                   help="default: cpu, and cuda when torch sees a GPU")
    p.add_argument("--model", default="toy-sd3",
                   help="toy-sd3 (images, 32 px), or a motion model: random-mdm (MDM's denoiser size), toy-motion")
    p.add_argument("--batch", type=int, default=8, help="chains per update (one train batch)")
    p.add_argument("--repeats", type=int, default=2, help="measured updates after the warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each worker")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        Path(args.result).write_text(json.dumps(run_worker(args)))
        return 0
    if args.batch < 1 or args.repeats < 1 or min(args.steps) < 1:
        raise SystemExit("memory: --batch, --repeats and --steps must be >= 1")
    if sample_kind_of(args.model) not in SETUPS:
        raise SystemExit(f"memory: --model {args.model} makes {sample_kind_of(args.model)} samples; this benchmark "
                         f"measures {' and '.join(SETUPS)} models")
    if args.devices is None:
        import torch

        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for device in args.devices:
        for method in args.methods:
            for steps in args.steps:
                rows.append(measure(args, device, method, steps))
                r = rows[-1]
                print(f"[memory] {device} {method} N={steps}: {r['memory_mb']:.1f} MiB, "
                      f"{statistics.median(r['times']):.2f} s", flush=True)
    write_report(args, rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
