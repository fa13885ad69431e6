"""Kill -9 a tiny training run (configs/image/tiny_sd3_jpeg.yaml, 4 iterations, a checkpoint after each) at named
points and after seeded random delays, resume it with resume=<output_dir> (killed again during the resume, in some
cases), and get the uninterrupted reference run's weights, optimizer state, metrics rows (all but the timings),
evaluation scores and panels bit for bit, one metrics row per iteration and no leftover folders; and fill a real
(tmpfs) disk while checkpointing. Issue 17's fault-injection suite; tests/test_checkpoint_faults.py damages the
files of a finished run instead.

How the kills are made. The reference run is `python -m diffrl.cli train` in a fresh interpreter. The runs that
are killed and resumed are forked from one "zygote" interpreter that has already imported diffrl, torch and
diffusers (a fresh interpreter spends ~15 s of a 20 s tiny run importing), each calling diffrl.cli.main(argv) with
its output in log files: a real process, killed by a real SIGKILL from this test. Where a kill lands is decided
outside the run, by polling its output_dir every 2 ms (a file appearing, metrics.jsonl reaching a row count) or by a
delay drawn from a seeded RNG; two points that polling cannot hit reliably (a few ms inside a checkpoint write) are
reached by the forked child stopping itself (SIGSTOP) at a given call, wrapped in the child only, before the test
kills it. Nothing in diffrl knows about any of this.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/image/tiny_sd3_jpeg.yaml"
TINY = ["max_iterations=4", "logging.save_every=1", "logging.eval_every=2", "logging.progress=false",
        "logging.log_with=none", "policy.resolution=32", "policy.lora_rank=4", "policy.lora_alpha=8",
        "sampling.num_steps=2", "sampling.eval_num_steps=2", "data.num_eval_prompts=2",
        "train.prompts_per_iteration=1", "train.group_size=2", "train.rollout_batch_size=2",
        "train.train_batch_size=2", "train.ema=true"]
"""The recipe made tiny: 4 iterations, a checkpoint after each (with EMA: extra.safetensors too), evaluations at 0, 2
and 4 (the last one plotted to curves.png)."""
ITERATIONS = 4
TIMING_KEYS = ("seconds", "peak_memory_mb")
"""Metrics keys that measure the machine, not the run (and time_*)."""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}  # a killed run's log holds every line it printed
POLL_S = 0.002
RUN_TIMEOUT_S = 300


def train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", RECIPE, *TINY, f"output_dir={out}", *extra]


# ---- the zygote: forks runs of diffrl.cli.main with everything imported ---------------------------------------
ZYGOTE = r"""
import fnmatch, json, os, pathlib, signal, sys, traceback
recipe, overrides = sys.argv[1], json.loads(sys.argv[2])
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import diffrl.cli, diffrl.api, diffrl.checkpoint, diffrl.trainers.loop, diffrl.visual
from diffrl.config import load_config
load_config(recipe, overrides)  # imports what validating the recipe imports (the pipelines, the reward)
from diffrl.pipelines.registry import load_policy  # and what building the tiny model imports
import diffusers, transformers

def stop_at(kind, pattern):
    # the child stops itself (SIGSTOP) at one call, for the test to SIGKILL it there
    def stop():
        os.kill(os.getpid(), signal.SIGSTOP)
    if kind == "after_save":  # after a safetensors file matching `pattern` is written
        real_save = diffrl.checkpoint.save_file
        def save_file(tensors, file, *args, **kwargs):
            real_save(tensors, file, *args, **kwargs)
            if fnmatch.fnmatch(str(file), pattern):
                stop()
        diffrl.checkpoint.save_file = save_file
    elif kind in ("before_rename", "after_rename"):  # before a path matching `pattern` is renamed / after a
        real_rename = pathlib.Path.rename               # rename to a matching path
        def rename(self, target):
            if kind == "before_rename" and fnmatch.fnmatch(str(self), pattern):
                stop()
            renamed = real_rename(self, target)
            if kind == "after_rename" and fnmatch.fnmatch(str(target), pattern):
                stop()
            return renamed
        pathlib.Path.rename = rename

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if "wait" in command:
        _, status = os.waitpid(command["wait"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(command[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            if command.get("pause"):
                stop_at(*command["pause"])
            code = diffrl.cli.main(command["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


def process_state(pid: int) -> str:
    """The state letter of a process (R, S, D, T stopped, t traced, Z exited and not yet reaped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@dataclass
class Outcome:
    code: int | None
    """Exit code; -9 when this test killed it."""
    stdout: str
    stderr: str
    seconds: float


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, RECIPE, json.dumps(TINY)], cwd=REPO, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.started = False

    def _ask(self, command: dict) -> dict:
        if not self.started:  # the imports end with {"ready": true}
            assert json.loads(self.proc.stdout.readline()) == {"ready": True}, "the zygote failed to start"
            self.started = True
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the zygote died (exit {self.proc.poll()})"
        return json.loads(answer)

    def run(self, argv: list[str], logs: Path, kill_when: Callable[[float], bool] | None = None,
            pause: tuple[str, str] | None = None) -> Outcome:
        """Run `diffrl <argv>` in a forked child to its end, or SIGKILL it once kill_when(seconds since the fork)
        holds or once it stopped itself at `pause`. Logs go to logs.stdout / logs.stderr."""
        stdout, stderr = logs.with_suffix(".stdout"), logs.with_suffix(".stderr")
        start = time.perf_counter()
        pid = self._ask({"argv": argv, "stdout": str(stdout), "stderr": str(stderr), "pause": pause})["pid"]
        while True:
            state, elapsed = process_state(pid), time.perf_counter() - start
            if state == "Z":
                break
            if (pause and state in "Tt") or (kill_when and kill_when(elapsed)) or elapsed > RUN_TIMEOUT_S:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(POLL_S)
        code = self._ask({"wait": pid})["code"]  # reaped: a dead writer's pid is no longer alive
        assert elapsed <= RUN_TIMEOUT_S, f"{argv} ran over {RUN_TIMEOUT_S} s; its stderr:\n{stderr.read_text()}"
        return Outcome(code, stdout.read_text(), stderr.read_text(), elapsed)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()  # imports while the reference run (started after it) trains
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory) -> Path:
    """The uninterrupted run: `python -m diffrl.cli train` in a fresh interpreter."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run([sys.executable, "-m", "diffrl.cli", *train_argv(out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return out


# ---- where to kill -----------------------------------------------------------------------------------------
def metrics_rows(out: Path) -> int:
    """Complete rows of metrics.jsonl."""
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def appears(out: Path, pattern: str) -> Callable[[float], bool]:
    return lambda elapsed: next(out.glob(pattern), None) is not None


def rows_reach(out: Path, n: int) -> Callable[[float], bool]:
    return lambda elapsed: metrics_rows(out) >= n


@dataclass
class Point:
    """A kill point: polled from outside (`when(out)` -> condition), or the child stopping itself (`pause`)."""

    name: str
    when: Callable[[Path], Callable[[float], bool]] | None = None
    pause: Callable[[Path], tuple[str, str]] | None = None


POINTS = {p.name: p for p in [
    Point("config_written", when=lambda out: appears(out, "config.yaml")),  # before the model loads
    Point("base_evaluated", when=lambda out: rows_reach(out, 1)),  # row 0 logged, no checkpoint yet
    Point("checkpoint_1_written", when=lambda out: appears(out, "checkpoints/iter_000001")),
    Point("eval_2_written_row_2_not", when=lambda out: appears(out, "eval/iter_000002.jsonl")),
    Point("row_3_logged", when=lambda out: rows_reach(out, 4)),  # before its checkpoint
    Point("checkpoint_3_tmp_seen", when=lambda out: appears(out, "checkpoints/.iter_000003.tmp-*")),
    Point("inside_checkpoint_2_write", pause=lambda out: (
        "after_save", str(out / "checkpoints" / ".iter_000002.tmp-*" / "trainable.safetensors"))),
    Point("checkpoint_2_complete_not_renamed", pause=lambda out: (
        "before_rename", str(out / "checkpoints" / ".iter_000002.tmp-*"))),
    Point("last_checkpoint_renamed", pause=lambda out: (  # nothing left to train
        "after_rename", str(out / "checkpoints" / f"iter_{ITERATIONS:06d}"))),
]}


def describe(out: Path) -> str:
    """What a killed run left: metrics rows, checkpoints, writers' folders."""
    folder = out / "checkpoints"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    leftovers = [n for n in names if n.startswith(".")]
    done = [n.removeprefix("iter_0000").lstrip("0") for n in names if n.startswith("iter_")]
    return (f"{metrics_rows(out)} rows, checkpoints [{' '.join(done)}]"
            + (f", left {' '.join(leftovers)}" if leftovers else "") + ("" if (out / "config.yaml").exists()
                                                                       else ", no config.yaml"))


# ---- the comparison ----------------------------------------------------------------------------------------
def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS and not k.startswith("time_")}


LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_contents(file: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a stock LoRA file, its PEFT config's target_modules as a sorted list. Its bytes differ
    from process to process: safetensors writes the metadata's keys in a Rust HashMap's random order, and PEFT's
    target_modules is a set, listed in the order of Python's per-process string hashes."""
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    adapter = json.loads(metadata.pop("lora_adapter_metadata"))
    adapter = {k: sorted(v) if k.endswith("target_modules") else v for k, v in adapter.items()}
    return tensors, {**metadata, "lora_adapter_metadata": adapter}


def assert_same_run(out: Path, reference: Path) -> None:
    """`out` ended as the reference did: every file there, bit for bit, but the timings of metrics.jsonl, the
    `output_dir` and `resume` settings (of config.yaml and state.json's config) and the LoRA file's layout (lora_contents: its tensors
    and metadata equal); one row per iteration; no writer's leftovers."""
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob(".*"))
    assert not leftovers, f"leftovers: {leftovers}"
    files = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS + 1))
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [without_timings(r) for r in rows] == [without_timings(r) for r in expected]
    for name in files:
        mine, theirs = out / name, reference / name
        if name == "metrics.jsonl":
            continue
        if name == "config.yaml" or name.endswith("state.json"):
            a, b = yaml.safe_load(mine.read_text()), yaml.safe_load(theirs.read_text())
            for config in (a, b):
                for where in ("resume", "output_dir"):
                    (config.get("config") or config).pop(where)
                config.get("files", {}).get(f"lora/{LORA_FILE}", {}).pop("sha256", None)
            assert a == b, name
        elif name.endswith(LORA_FILE):
            (a, a_meta), (b, b_meta) = lora_contents(mine), lora_contents(theirs)
            assert a_meta == b_meta and a.keys() == b.keys(), name
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: its tensors differ from the reference run's"
        else:
            assert mine.read_bytes() == theirs.read_bytes(), f"{name} differs from the reference run's"


def resume_to_end(zygote: Zygote, out: Path, logs: Path, kills: list[Point | float]) -> list[str]:
    """Run into `out`, killing it at each of `kills` in turn (the first kill in the first run, the next during its
    resume, ...), then resume to the end. Returns a line per kill: where it landed."""
    landed = []
    for number, kill in enumerate([*kills, None]):
        started = (out / "config.yaml").exists()
        argv = train_argv(out, f"resume={out}") if number and started else train_argv(out)
        had_checkpoint = any((out / "checkpoints").glob("iter_*"))
        dead_writers = list((out / "checkpoints").glob(".iter_*"))
        if isinstance(kill, Point):
            outcome = zygote.run(argv, logs.with_name(f"{logs.name}-{number}"), pause=kill.pause and kill.pause(out),
                                 kill_when=kill.when and kill.when(out))
        else:
            outcome = zygote.run(argv, logs.with_name(f"{logs.name}-{number}"),
                                 kill_when=None if kill is None else (lambda elapsed, at=kill: elapsed >= at))
        if number and started and not had_checkpoint and outcome.code == 0:  # killed before its first checkpoint:
            assert "holds no checkpoint yet" in outcome.stdout, outcome.stdout  # starts over (if not killed first)
        for folder in dead_writers:  # cleared, and said so
            assert folder.exists() or f"removed {folder} (left by a checkpoint write that was killed)" in outcome.stdout
        if kill is None:
            assert outcome.code == 0, outcome.stderr
            return landed
        name = kill.name if isinstance(kill, Point) else f"after {kill:.2f} s"
        if isinstance(kill, Point):
            assert outcome.code == -signal.SIGKILL, f"{name} was never reached: {outcome.stderr}"
        if outcome.code != -signal.SIGKILL:  # a random delay past the end of the run
            assert outcome.code == 0, outcome.stderr
            landed.append(f"{name}: the run ended first")
        else:
            landed.append(f"{name}: {describe(out)}")
    raise AssertionError("unreachable")


def check_kills(zygote, reference, tmp_path, kills: list[Point | float]) -> None:
    out = tmp_path / "run"
    start = time.perf_counter()
    landed = resume_to_end(zygote, out, tmp_path / "log", kills)
    assert_same_run(out, reference)
    print(f"\n[kill-resume] {'; then '.join(landed)} -> identical to the reference ({time.perf_counter() - start:.1f} s)")


# ---- the default suite: three kills sharing one reference run ---------------------------------------------------
def test_a_run_killed_inside_a_checkpoint_write_and_again_during_its_resume_ends_as_the_reference(
        zygote, reference, tmp_path):
    """Killed while writing checkpoint 2 (its trainable.safetensors written, state.json not): the resume clears the
    dead writer's folder and continues from checkpoint 1; killed again after logging row 3 (checkpoint 3 not yet
    written): the second resume replays iteration 3, its row logged once."""
    check_kills(zygote, reference, tmp_path, [POINTS["inside_checkpoint_2_write"], POINTS["row_3_logged"]])


def test_a_run_killed_before_its_first_checkpoint_starts_over_and_ends_as_the_reference(zygote, reference, tmp_path):
    check_kills(zygote, reference, tmp_path, [POINTS["base_evaluated"]])


# ---- slow: every named point, kills during the resume, seeded random delays -----------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in POINTS if n not in ("base_evaluated", "inside_checkpoint_2_write")])
def test_a_run_killed_at_a_named_point_ends_as_the_reference(zygote, reference, tmp_path, name):
    check_kills(zygote, reference, tmp_path, [POINTS[name]])


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("config_written", "checkpoint_2_complete_not_renamed"),
                                           ("checkpoint_1_written", "inside_checkpoint_2_write"),
                                           ("eval_2_written_row_2_not", "last_checkpoint_renamed")])
def test_a_run_killed_twice_ends_as_the_reference(zygote, reference, tmp_path, first, second):
    check_kills(zygote, reference, tmp_path, [POINTS[first], POINTS[second]])


RANDOM_KILLS = 10


@pytest.fixture(scope="module")
def forked_run(zygote, tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted run forked from the zygote and how long it took from its fork to its end (the span the random
    delays are drawn from)."""
    folder = tmp_path_factory.mktemp("forked")
    outcome = zygote.run(train_argv(folder / "run"), folder / "log")
    assert outcome.code == 0, outcome.stderr
    return folder / "run", outcome.seconds


@pytest.mark.slow
@pytest.mark.parametrize("case", range(RANDOM_KILLS))
def test_a_run_killed_twice_after_random_delays_ends_as_the_reference(zygote, reference, forked_run, tmp_path, case):
    """Two kills, each after a delay drawn uniformly from the length of a whole run: the first in the run, the second
    in its resume (a delay past the run's end leaves it finished)."""
    rng, run_seconds = random.Random(1700 + case), forked_run[1]
    check_kills(zygote, reference, tmp_path, [rng.uniform(0, run_seconds), rng.uniform(0, run_seconds)])


def test_a_forked_run_ends_as_the_reference_of_a_fresh_interpreter(reference, forked_run):
    """The kill tests' runs are forked from the zygote: uninterrupted, one equals `python -m diffrl.cli train`'s."""
    assert_same_run(forked_run[0], reference)
    print(f"\n[kill-resume] an uninterrupted forked run took {forked_run[1]:.1f} s")


# ---- a real full disk --------------------------------------------------------------------------------------------
PAGE = 4096


def pages(files) -> int:
    """Bytes a tmpfs charges for `files`: whole pages."""
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in files)


@pytest.fixture
def small_disk(reference, tmp_path):
    """A tmpfs that holds the run up to its second checkpoint, half of the third one and nothing more (sizes taken
    from the reference run's files); unmounted afterwards. Needs root and a kernel that lets this process mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    written = [f for f in reference.rglob("*") if f.is_file()
               and not any(part in f.name or part in f.parent.name for part in ("000003", "000004"))]
    checkpoint = [f for f in (reference / "checkpoints" / "iter_000003").rglob("*") if f.is_file()]
    size_kib = (pages(written) + pages(checkpoint) // 2) // 1024
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs: {(mount.stderr or mount.stdout).strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_its_checkpoints_resume_elsewhere(zygote, reference, small_disk,
                                                                                 tmp_path):
    """The tmpfs fills while checkpoint 3 is written: `diffrl train` exits 1 with one line naming it and the intact
    checkpoint 2, leaves checkpoints 1 and 2 verified and no half-written folder; the run copied to a disk with room
    resumes to the reference's end."""
    from diffrl.checkpoint import verify_checkpoint

    out = small_disk / "run"
    failed = zygote.run(train_argv(out), tmp_path / "full")
    errors = [line for line in failed.stderr.splitlines() if line.startswith("diffrl:") or "Traceback" in line]
    checkpoints = out / "checkpoints"
    assert failed.code == 1 and len(errors) == 1, failed.stderr
    assert errors[0].startswith(f"diffrl: cannot write checkpoint {checkpoints / 'iter_000003'}: No space left on "
                                "device (") and errors[0].endswith(
        f"); the newest checkpoint before it, {checkpoints / 'iter_000002'}, is intact"), errors[0]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_000001", "iter_000002"]
    for name in ("iter_000001", "iter_000002"):
        verify_checkpoint(checkpoints / name)
    copy = Path(shutil.copytree(out, tmp_path / "run"))
    resumed = zygote.run(train_argv(copy, f"resume={copy}"), tmp_path / "resume")
    assert resumed.code == 0, resumed.stderr
    assert_same_run(copy, reference)
    print(f"\n[kill-resume] full tmpfs: {errors[0]}")
