"""What a GRPO iteration on a Wan video model costs against the clip length: seconds for sampling, decoding, the
reward and the update, and peak memory.

    python -m diffrl.benchmarks.video_cost --output-dir outputs/video_cost               # CPU: tiny-wan, 32 px
    python -m diffrl.benchmarks.video_cost --frames 1 5 9 17 33 --repeats 3 --results-md benchmarks/RESULTS.md
    python -m diffrl.benchmarks.video_cost --gpu --output-dir outputs/video_cost_gpu     # Wan2.1-1.3B architecture

CPU mode: the loop's own `Trainer.train_iteration` of GRPO (flow SDE, 10 steps, CFG 4.5, KL 0.04, LoRA r16, 2 prompts
x 4 clips) on each --models at each --frames, with a first-frame reward, `per_frame(brightness, max_frames=1)`, in two
variants of one run (same seeds, so the same clips and the same rewards):

    needed  the rollout decodes frame 0 alone (Reward.frames_needed -> WanPolicy.decode(num_frames=1))
    all     the reference: every frame decoded, what the loop did before frames_needed

Why this comparison: decoding is the part of a video iteration that grows with the clip and that a reward reading few
frames need not pay for; both variants must give identical rewards (the causal VAE decodes a prefix exactly), and the
report says whether they did. Times: decode is spent inside policy.decode, reward inside reward.score, sampling the
rest of the rollout (denoiser steps), update the advantages and the GRPO update (re-scoring forward, reference forward,
backward, optimiser). Memory on the CPU: the peak C heap above its value before the iteration (benchmarks.memory's
probe) and the worker's peak RSS (getrusage; it includes the model and torch). Each (model, variant, frames) runs in
a fresh process: build, one warm-up iteration, then --repeats measured ones; median and min-max over them.

GPU mode (--gpu): the full-size Wan2.1-T2V-1.3B transformer (WAN21_T2V_1_3B) with random weights and the recipe's
LoRA (r32), 33 x 240 x 416 clips, bf16, one GRPO training step: the guided forward with gradient (CFG batch [uncond,
cond]), the reference forward (KL), the step log-prob, the clipped surrogate and backward, on a train batch of
--batch clips; gradient checkpointing on and off (the reference) in the same run; torch.cuda.max_memory_allocated.
A CUDA out-of-memory is recorded as such. --layers / --height / --width / --dtype / --device shrink it (a test runs
one layer on the CPU).

Outputs in --output-dir: video_cost.md (the table), video_cost.json, video_cost.png (GPU mode: video_cost_gpu.*);
--results-md PATH inserts the dated section at the top of PATH (benchmarks/RESULTS.md is newest first).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

FIRST_FRAME_REWARD = "{reward: brightness, max_frames: 1}"
"""per_frame's kwargs of the CPU mode: an image reward on the first frame of each clip."""
VARIANTS = {"needed": "decode the frames the reward reads", "all": "decode every frame (reference)"}
WAN21_T2V_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                      qk_norm="rms_norm_across_heads", eps=1e-6)
"""WanTransformer3DModel of Wan2.1-T2V-1.3B as diffusers' scripts/convert_wan_to_diffusers.py ("Wan-T2V-1.3B") builds
it: dim 12 x 128 = 1536, 30 layers, ffn 8960, UMT5 text 4096."""
TEXT_TOKENS = 226
"""Prompt embeddings per clip in the GPU mode (WanPolicy's text length)."""


# ---- CPU mode: the training loop ---------------------------------------------------------------
def cpu_overrides(model: str, frames: int, args, out: str) -> list[str]:
    return [
        f"model={model}", "algorithm=grpo", "reward=per_frame", f"reward_kwargs={FIRST_FRAME_REWARD}",
        f"policy.resolution={args.resolution}", f"policy.num_frames={frames}", "policy.lora_rank=16",
        "policy.lora_alpha=32", f"sampling.num_steps={args.steps}", "sampling.guidance_scale=4.5",
        "grpo.kl_beta=0.04", f"train.prompts_per_iteration={args.prompts}", f"train.group_size={args.group}",
        f"train.rollout_batch_size={args.prompts * args.group}", f"train.train_batch_size={args.prompts * args.group}",
        "logging.log_with=none", "logging.progress=false", f"output_dir={out}",
    ]


class PhaseClock:
    """Seconds spent inside chosen methods, summed per phase: while `timing` is open, an instance attribute shadows
    the method with a timed call."""

    def __init__(self, cuda: bool = False):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = cuda

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def timing(self, obj, method: str, phase: str):
        bound = getattr(obj, method)

        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return bound(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[phase] += time.perf_counter() - start

        setattr(obj, method, timed)
        try:
            yield
        finally:
            delattr(obj, method)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def timed_iteration(trainer, probe) -> dict:
    """One `train_iteration` split into phases (seconds) with the peak memory above its start (MiB)."""
    clock = PhaseClock(cuda=trainer.accelerator.device.type == "cuda")
    probe.start()
    with clock.timing(trainer.policy, "decode", "decode"), clock.timing(trainer.reward, "score", "reward"):
        row = trainer.train_iteration()
    memory = probe.stop()
    decode, reward = clock.seconds["decode"], clock.seconds["reward"]
    return {"sampling": row["time_rollout"] - decode - reward, "decode": decode, "reward": reward,
            "update": row["time_update"], "iteration": row["seconds"], "memory_mb": memory,
            "reward_mean": row["reward_mean"]}


def run_cpu_worker(args) -> dict:
    from diffrl.benchmarks.memory import peak_memory_probe
    from diffrl.config import load_config
    from diffrl.trainers.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(load_config(None, cpu_overrides(args.model, args.frame, args, out)))
        if args.variant == "all":
            trainer.decode_kwargs = {}  # the reference: decode whole clips whatever the reward reads
        decoded = trainer.decode_kwargs.get("num_frames", args.frame)
        device = trainer.accelerator.device.type
        trainer.train_iteration()  # warm-up: lazy initialisation, optimiser state
        runs = [timed_iteration(trainer, peak_memory_probe(device)) for _ in range(args.repeats)]
        kind = peak_memory_probe(device).kind
    return {"mode": "cpu", "model": args.model, "variant": args.variant, "frames": args.frame, "decoded_frames": decoded,
            "device": device, "memory_kind": kind, "peak_rss_mb": peak_rss_mb(),
            **{key: [r[key] for r in runs] for key in runs[0]}}


# ---- GPU mode: one training step of the full-size transformer ---------------------------------
def full_size_wan(layers: int, frames: int, height: int, width: int, dtype, device: str):
    """A WanPolicy whose transformer has Wan2.1-T2V-1.3B's architecture (first `layers` blocks) with random weights;
    the tiny model's tokenizer, text encoder and VAE fill the pipeline (this step uses none of them)."""
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel

    from diffrl.pipelines.registry import freeze_for_sampling
    from diffrl.pipelines.tiny import tiny_wan_pipeline
    from diffrl.pipelines.wan import WanPolicy

    torch.manual_seed(0)
    with torch.device(device):  # random init where it runs: 1.3B parameters are slow to initialise on a CPU
        net = WanTransformer3DModel(**{**WAN21_T2V_1_3B, "num_layers": layers}).to(dtype)
    pipe = freeze_for_sampling(WanPipeline(**{**tiny_wan_pipeline().components, "transformer": net}))
    return WanPolicy(pipe, height=height, width=width, num_frames=frames)


@dataclass
class StepInputs:
    """What a GRPO training step re-scores: one stored SDE transition x_t -> x_prev of a rollout."""

    cond: object  # Condition: random prompt embeddings [B, 226, 4096], cond and uncond
    sampler: object
    schedule: object
    index: int  # the transition's step in the schedule
    x_t: object  # [B, C, F', h, w]
    x_prev: object  # [B, C, F', h, w]
    log_prob: object  # [B]: under the rollout's (here: the same) weights


def grpo_step_inputs(policy, batch: int, index: int, generator, autocast) -> StepInputs:
    """Random prompt embeddings and one SDE transition at step `index` of 20 with its log-prob, drawn without
    gradient as a rollout does."""
    import torch

    from diffrl.pipelines.base import Condition
    from diffrl.sampling import make_sampler

    dim = policy.denoiser.config.text_dim
    embed = lambda: torch.randn(batch, TEXT_TOKENS, dim, generator=generator).to(policy.device, policy.dtype)  # noqa: E731
    cond = Condition(cond={"encoder_hidden_states": embed()}, uncond={"encoder_hidden_states": embed()})
    sampler, schedule = make_sampler("flow_sde", noise_level=0.7), policy.schedule(20)
    x_t = torch.randn(batch, *policy.latent_shape(), generator=generator).to(policy.device)  # [B, C, F', h, w]
    with torch.no_grad(), autocast:
        v = policy.predict(x_t, schedule.timesteps[index].expand(batch), cond, 4.5)
        step = sampler.step(schedule, index, x_t, v.float(), generator=generator)
    return StepInputs(cond, sampler, schedule, index, x_t, step.prev_sample, step.log_prob)


def grpo_step(policy, inputs: StepInputs, autocast, advantages) -> float:
    """Guided forward with gradient, reference forward (LoRA off), clipped surrogate + KL as GRPO's update
    computes them, backward; returns the loss."""
    import torch

    from diffrl.core import clipped_surrogate, flow_grpo_kl

    x_t, t = inputs.x_t, inputs.schedule.timesteps[inputs.index].expand(len(inputs.x_t))
    with autocast:
        v = policy.predict(x_t, t, inputs.cond, 4.5)
        with torch.no_grad(), policy.reference():
            v_ref = policy.predict(x_t, t, inputs.cond, 4.5)
    step = lambda out: inputs.sampler.step(inputs.schedule, inputs.index, x_t, out.float(), prev_sample=inputs.x_prev)  # noqa: E731
    new, ref = step(v), step(v_ref)
    surrogate, _ = clipped_surrogate(new.log_prob, inputs.log_prob, advantages, clip_low=1e-3)  # Flow-GRPO Wan: 1e-3
    loss = (surrogate + 0.04 * flow_grpo_kl(new.mean, ref.mean.detach(), new.sde_std)).mean()  # the recipe's KL 0.04
    loss.backward()
    return loss.item()


def run_gpu_worker(args) -> dict:
    import torch

    from diffrl.benchmarks.memory import peak_memory_probe
    from diffrl.runtime import DTYPES

    dtype, device = DTYPES[args.dtype], args.device
    policy = full_size_wan(args.layers, args.frame, args.height, args.width, dtype, device)
    params = sum(p.numel() for p in policy.denoiser.parameters())
    policy.add_lora(32, 64)  # the Wan recipe's LoRA
    policy.enable_gradient_checkpointing(args.checkpointing == "on")
    policy.denoiser.train()
    # mixed precision as accelerate's bf16 mode runs the recipe: low-precision matmuls, float32 LoRA weights
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(0)
    inputs = grpo_step_inputs(policy, args.batch, 10, generator, autocast)
    advantages = torch.randn(args.batch, generator=generator).to(device)
    probe_device = "cuda" if device.startswith("cuda") else "cpu"
    times, memory, error = [], [], None
    try:
        for r in range(1 + args.repeats):  # the first is a warm-up
            probe = peak_memory_probe(probe_device)
            probe.start()
            start = time.perf_counter()
            grpo_step(policy, inputs, autocast, advantages)
            if probe_device == "cuda":
                torch.cuda.synchronize()
            elapsed, peak = time.perf_counter() - start, probe.stop()
            policy.denoiser.zero_grad(set_to_none=True)
            if r:
                times.append(elapsed)
                memory.append(peak)
    except torch.cuda.OutOfMemoryError as exc:
        error = f"CUDA out of memory: {str(exc).splitlines()[0]}"
    allocated = torch.cuda.max_memory_allocated() / 2**20 if probe_device == "cuda" else None  # since the last step's start
    return {"mode": "gpu", "frames": args.frame, "height": args.height, "width": args.width, "layers": args.layers,
            "batch": args.batch, "dtype": args.dtype, "checkpointing": args.checkpointing, "device": device,
            "parameters": params, "step": times, "memory_mb": memory, "cuda_allocated_peak_mb": allocated,
            "memory_kind": peak_memory_probe(probe_device).kind, "error": error}


# ---- the driver ------------------------------------------------------------------------------------
def worker_command(args, **point) -> list[str]:
    cmd = [sys.executable, "-m", "diffrl.benchmarks.video_cost", "--worker"]
    shared = {"repeats": args.repeats, "threads": args.threads, "resolution": args.resolution, "steps": args.steps,
              "prompts": args.prompts, "group": args.group, "layers": args.layers, "height": args.height,
              "width": args.width, "batch": args.batch, "dtype": args.dtype, "device": args.device}
    for key, value in {**shared, **point}.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd + (["--gpu"] if args.gpu else [])


def measure(args, **point) -> dict:
    """One point in a fresh process (its own peak RSS, no allocator state from another point), or in this one with
    --in-process (quicker: the tests; the peak RSS is then this process's so far)."""
    if args.in_process:
        return worker_row(build_parser().parse_args(worker_command(args, **point)[3:]))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if not args.gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode measures the CPU even on a GPU machine
    proc = subprocess.run([*worker_command(args, **point), "--result", str(result)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
        raise RuntimeError(f"video_cost worker {point} failed (exit {proc.returncode})")
    row = json.loads(result.read_text())
    result.unlink()
    return row


def spread(values: list[float], fmt: str = ".3f") -> str:
    """median (min-max) of repeated measurements; the median alone for one."""
    med = format(statistics.median(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


CPU_COLUMNS = ["model", "frames", "variant", "decoded frames", "sampling (s)", "decode (s)", "reward (s)", "update (s)",
               "iteration (s)", "peak heap above start (MiB)", "peak RSS (MiB)"]
GPU_COLUMNS = ["frames x H x W", "layers", "batch", "dtype", "gradient checkpointing", "step forward+backward (s)",
               "peak memory above start (MiB)", "peak allocated (MiB)"]


def cpu_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(CPU_COLUMNS) + " |", "|---|---:|---|---:|" + "---:|" * 7]
    for r in rows:
        cells = [r["model"], r["frames"], r["variant"], r["decoded_frames"], *(spread(r[k]) for k in
                 ("sampling", "decode", "reward", "update", "iteration")), spread(r["memory_mb"], ".1f"),
                 f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def gpu_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(GPU_COLUMNS) + " |", "|---|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        allocated = r["cuda_allocated_peak_mb"]
        measured = [r["error"], "", ""] if r["error"] else [
            spread(r["step"]), spread(r["memory_mb"], ".0f"), "–" if allocated is None else f"{allocated:.0f}"]
        cells = [f"{r['frames']} x {r['height']} x {r['width']}", r["layers"], r["batch"], r["dtype"], r["checkpointing"],
                 *measured]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def reward_check(rows: list[dict]) -> list[str]:
    """Whether the two variants of each point scored the same clips the same (the prefix decode is exact)."""
    lines = []
    by_point = defaultdict(dict)
    for r in rows:
        by_point[(r["model"], r["frames"])][r["variant"]] = r["reward_mean"]
    for (model, frames), got in by_point.items():
        if len(got) == 2:
            diff = max(abs(a - b) for a, b in zip(got["needed"], got["all"]))
            lines.append(f"- {model}, frames {frames}: largest difference of the mean reward between the variants {diff:.1e}")
    return lines


def machine_line(args) -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if args.gpu and torch.cuda.is_available() else ""
    load = " / ".join(f"{a:.1f}" for a in args.load)
    return (f"{platform.machine()} CPU with {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
            f"{args.threads} torch thread(s) per worker; 1-minute load average {load} at the start / end")


def plot(rows: list[dict], path: Path) -> Path:
    """CPU mode: decode seconds, iteration seconds and peak heap against frames, one line per model and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("decode", "decode seconds / iteration"), ("iteration", "seconds / iteration"),
              ("memory_mb", "peak heap above start (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, label) in zip(axes, panels):
        for model in dict.fromkeys(r["model"] for r in rows):
            for variant in VARIANTS:
                mine = sorted((r for r in rows if r["model"] == model and r["variant"] == variant), key=lambda r: r["frames"])
                if not mine:
                    continue
                med = [statistics.median(r[key]) for r in mine]
                err = [[m - min(r[key]) for m, r in zip(med, mine)], [max(r[key]) - m for m, r in zip(med, mine)]]
                ax.errorbar([r["frames"] for r in mine], med, yerr=err, marker="o", capsize=3,
                            label=f"{model}: {VARIANTS[variant]}")
        ax.set_xlabel("frames per clip")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(args, rows: list[dict], out: Path) -> list[str]:
    """The table (and the CPU plot) in `out`; returns the markdown section."""
    stem = "video_cost_gpu" if args.gpu else "video_cost"
    today = datetime.date.today().isoformat()
    memory = rows[0]["memory_kind"]
    if args.gpu:
        title = f"## Video cost: one GRPO step of the Wan2.1-1.3B transformer ({today})"
        setup = (f"Random weights of the full-size architecture (first {args.layers} of 30 blocks), LoRA r32, "
                 f"{args.dtype}, {args.batch} clips per train batch (CFG doubles it), 226 text tokens; forward with "
                 "gradient + reference forward + backward; one warm-up step, then the median (min-max) of "
                 f"{args.repeats}.")
        table = gpu_table(rows)
    else:
        title = f"## Video cost: GRPO iteration against frames, CPU ({today})"
        setup = (f"`Trainer.train_iteration` of GRPO on {', '.join(dict.fromkeys(r['model'] for r in rows))} at "
                 f"{args.resolution} x {args.resolution} px: {args.prompts} prompts x {args.group} clips, flow SDE "
                 f"{args.steps} steps, CFG 4.5, KL 0.04, LoRA r16; reward per_frame(brightness, max_frames=1) (the first "
                 "frame). Variants of the same run: `needed` decodes the frames the reward reads, `all` every frame "
                 f"(the reference). One warm-up iteration, then the median (min-max) of {args.repeats}.")
        table = cpu_table(rows)
    lines = [title, "", f"Machine: {machine_line(args)}.{(' ' + args.note) if args.note else ''}", "", setup,
             f"Memory: {memory}.", "", *table, ""]
    if not args.gpu:
        lines += ["Same clips, same rewards:", *reward_check(rows), "", f"![video cost]({stem}.png)", ""]
        plot(rows, out / f"{stem}.png")
    lines += [f"Command: `python -m diffrl.benchmarks.video_cost {shlex.join(args.argv)}`", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps({"argv": args.argv, "date": today, "rows": rows}, indent=1))
    return [line.replace(f"]({stem}.png)", f"](results/{stem}.png)") for line in lines]  # as RESULTS.md links it


def insert_section(path: Path, section: list[str]) -> None:
    """Put `section` above the first '## ' heading of `path` (newest first)."""
    text = path.read_text()
    at = text.find("\n## ") + 1 if "\n## " in text else len(text)
    path.write_text(text[:at] + "\n".join(section) + "\n" + text[at:])


def default_models() -> list[str]:
    """tiny-wan, and the shipped toy video model when this install has one."""
    from diffrl.pipelines.registry import SHIPPED_MODELS, shipped_model_dir

    models = ["tiny-wan"]
    for name, family in SHIPPED_MODELS.items():
        if family == "wan":
            with contextlib.suppress(FileNotFoundError):
                shipped_model_dir(name)
                models.append(name)
    return models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffrl.benchmarks.video_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="outputs/video_cost")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="clip lengths, 4k + 1 (CPU: 1 5 9 17 33; GPU: 33)")
    p.add_argument("--repeats", type=int, default=3, help="measured iterations per point, after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each worker")
    p.add_argument("--results-md", default=None, help="insert the dated section at the top of this file (RESULTS.md)")
    p.add_argument("--note", default="", help="a sentence for the section (e.g. what else ran on the machine)")
    p.add_argument("--in-process", action="store_true", help="measure in this process, not one process per point "
                   "(quicker; the peak RSS column is then this process's so far)")
    cpu = p.add_argument_group("CPU mode")
    cpu.add_argument("--models", nargs="+", default=None, help="Wan models (default: tiny-wan, and a shipped toy one)")
    cpu.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    cpu.add_argument("--resolution", type=int, default=32)
    cpu.add_argument("--steps", type=int, default=10, help="sampling steps")
    cpu.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    cpu.add_argument("--group", type=int, default=4, help="clips per prompt")
    gpu = p.add_argument_group("GPU mode")
    gpu.add_argument("--gpu", action="store_true", help="one GRPO step of the full-size Wan2.1-1.3B transformer")
    gpu.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    gpu.add_argument("--layers", type=int, default=30, help="transformer blocks (30: the full model)")
    gpu.add_argument("--height", type=int, default=240)
    gpu.add_argument("--width", type=int, default=416)
    gpu.add_argument("--batch", type=int, default=8, help="clips per train batch (the Wan recipe's train_batch_size)")
    gpu.add_argument("--dtype", default="bfloat16")
    gpu.add_argument("--device", default="cuda")
    for name in ("--model", "--variant", "--result"):
        p.add_argument(name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--frame", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def worker_row(args) -> dict:
    """The measurement of one point (a worker's arguments)."""
    if args.gpu:
        args.checkpointing = args.checkpointing[0]
        return run_gpu_worker(args)
    return run_cpu_worker(args)


def run_worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    Path(args.result).write_text(json.dumps(worker_row(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args)
    args.argv = argv
    frames = args.frames or ([33] if args.gpu else [1, 5, 9, 17, 33])
    from diffrl.pipelines.wan import check_frames

    for f in frames:
        check_frames(f, "--frames")
    if args.repeats < 1:
        raise SystemExit("video_cost: --repeats must be >= 1")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, args.load = [], [os.getloadavg()[0]]  # other work on the machine is the main source of noise
    if args.gpu:
        points = [{"frame": f, "checkpointing": c} for f in frames for c in args.checkpointing]
    else:
        points = [{"model": m, "variant": v, "frame": f} for m in (args.models or default_models())
                  for f in frames for v in args.variants]
    for point in points:
        rows.append(measure(args, **point))
        r = rows[-1]
        done = r.get("error") or f"{statistics.median(r['iteration' if not args.gpu else 'step']):.3f} s"
        print(f"[video_cost] {point}: {done}", flush=True)
    args.load.append(os.getloadavg()[0])
    section = write_report(args, rows, out)
    if args.results_md:
        insert_section(Path(args.results_md), section)
    print("\n".join(section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
