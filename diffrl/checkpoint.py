"""Checkpoints: safetensors only (never pickle), written atomically and durably, verified before a resume loads a
model, restoring a run exactly.

Layout of one checkpoint folder:
    lora/pytorch_lora_weights.safetensors   stock diffusers LoRA (pipe.load_lora_weights(dir/lora))
    sara/sara_weights.safetensors           SaRA runs: the trained values and their indices (merged into a diffusers
                                            folder by `python -m diffrl.pipelines.sara merge dir out`)
    denoiser/ (model/ for a language model)  full fine-tunes only: a diffusers (transformers) model folder
    trainable.safetensors                   every trainable tensor, by parameter name (exact resume)
    optimizer.safetensors + optimizer.json  optimizer tensors / hyper-parameters and step counts
    rng.safetensors                         torch CPU (and CUDA) generator states
    extra.safetensors                       algorithm tensors (EMA, snapshots), optional
    state.json                              iteration, samples seen, stat-tracker history, the run's config, and
                                            "files": the size and sha256 of every other file (written last)

Writing: every file and folder is fsynced before the temporary folder `.iter_N.tmp-PID` is renamed into place, and
the parent after it, so a kill or a power cut leaves either the old checkpoint or the new one, never half of one.
Folders of writers that died (`.iter_N.tmp-PID`, `.iter_N.old-PID`) are removed when a run starts or resumes
(`clear_stale_writes`).

Resuming: `resolve_resume` runs during config validation, before any model loads: it picks the newest intact
checkpoint of a run (`verify_checkpoint`: state.json parses, every file has its recorded size and checksum, the
safetensors headers parse, every tensor of a file without a checksum is finite), says which newer ones it skipped and why, checks that the
checkpoint was made by the same kind of run (model, LoRA, algorithm, seed, ...) and lists the settings that change
only the future (learning rate, max_iterations, logging, ...), which the resumed run applies.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from diffrl.checks import ConfigError
from diffrl.optim import nonfinite_tensors, optimizer_tensors

STATE_FILE = "state.json"
REQUIRED_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors")
"""Files every checkpoint has (extra.safetensors and the LoRA / model folder are recorded in state.json's "files")."""
FINITE_FILES = ("trainable.safetensors", "optimizer.safetensors", "extra.safetensors")
"""Files whose floating-point tensors must all be finite (rng.safetensors holds bytes)."""
CHECKPOINT_NAME = re.compile(r"^iter_(\d+)$")
STALE_NAME = re.compile(r"^\.(iter_\d+)\.(tmp|old)-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, damaged or of another run; the message names the file."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a quota, ...); its temporary folder is removed and the checkpoints
    written before are untouched. The message names the checkpoint, the cause and the newest intact checkpoint."""


# ---- the tensors of a checkpoint ---------------------------------------------------------------------
def _named_trainable(policy) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in policy.trainable_module().named_parameters() if p.requires_grad}


def trainable_tensors(policy) -> dict[str, torch.Tensor]:
    """Parameter name -> every trainable tensor of a single-process policy (save_checkpoint copies them to the CPU)."""
    return {n: p.detach() for n, p in _named_trainable(policy).items()}


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as ({"<param index>.<key>": tensor}, {"param_groups": ..., "scalars": ...}): what
    save_checkpoint writes to optimizer.safetensors and optimizer.json."""
    sd = optimizer.state_dict()
    scalars = {f"{idx}.{key}": value for idx, state in sd["state"].items() for key, value in state.items()
               if not torch.is_tensor(value)}
    return optimizer_tensors(optimizer), {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def policy_export(policy) -> Callable[[Path], Path]:
    """The writer of a policy's stock-library folder (lora/, or the full model's folder) inside a checkpoint."""

    def export(folder: Path) -> Path:
        if policy.has_lora:
            policy.save_lora(folder / "lora")
            return folder / "lora"
        if getattr(policy, "sara", None) is not None:  # the values and their indices only (diffrl.pipelines.sara merges them)
            policy.sara.save(folder / "sara", {"family": policy.family})
            return folder / "sara"
        policy.trainable_module().save_pretrained(folder / policy.full_model_folder, safe_serialization=True)
        return folder / policy.full_model_folder

    return export


# ---- writing -----------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder (deepest first), of `folder`."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest(folder: Path) -> dict[str, dict]:
    """Relative path -> {"size", "sha256"} of every file under `folder` but state.json. Hashing reads the files
    back (from the page cache, just written): about 1 s per GB, a minute for the ~70 GB of a 12B full fine-tune
    with its Adam moments, seconds for a LoRA."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / STATE_FILE}


def save_checkpoint(
    path: str | Path,
    trainable: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor],
    optimizer_meta: dict,
    state: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    export: Callable[[Path], Path] | None = None,
    card: str | None = None,
) -> Path:
    """Write a checkpoint to `path` atomically and durably: a temporary folder, every file fsynced, renamed into
    place, the parent fsynced. The tensors come in as plain dicts, so a distributed caller passes tensors it
    gathered from shards: `trainable` (parameter name -> tensor), `optimizer_tensors` / `optimizer_meta` (as
    flatten_optimizer makes them), `extra_tensors` (algorithm state). `export(folder)` writes the stock-library
    folder (LoRA or full model, policy_export) and returns it; `card` (a model card, Markdown) goes into it as
    README.md, as diffusers' scripts do. state.json, written last, records the size and sha256 of every other file.
    On an OSError (a full disk) the temporary folder is removed, the older checkpoints are untouched, and
    CheckpointWriteError names the checkpoint and the newest intact one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if export is not None:
            folder = export(tmp)
            if card is not None:
                (folder / "README.md").write_text(card)
        save_file({n: t.detach().contiguous().cpu() for n, t in trainable.items()}, tmp / "trainable.safetensors")
        save_file({n: t.detach().contiguous().cpu() for n, t in optimizer_tensors.items()}, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(optimizer_meta))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / "rng.safetensors")
        if extra_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, tmp / "extra.safetensors")
        _fsync_tree(tmp)
        files = _manifest(tmp)
        with open(tmp / STATE_FILE, "w") as f:
            f.write(json.dumps({**state, "files": files}, indent=1))
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            try:
                tmp.rename(path)
            except OSError:
                old.rename(path)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        _fsync(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        intact = sorted((p for p in path.parent.glob("iter_*") if (p / STATE_FILE).is_file()), key=_iteration_of)
        kept = f"the newest checkpoint before it, {intact[-1]}, is intact" if intact else "no earlier checkpoint exists"
        raise CheckpointWriteError(exc.errno or errno.EIO, f"cannot write checkpoint {path}: "
                                   f"{exc.strerror or exc} ({exc.filename or path}); {kept}") from exc
    return path


def save_policy_checkpoint(path: str | Path, policy, optimizer: torch.optim.Optimizer, state: dict,
                           extra_tensors: dict[str, torch.Tensor] | None = None, card: str | None = None) -> Path:
    """save_checkpoint for a single-process policy and its optimizer (every tensor on this process)."""
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    return save_checkpoint(path, trainable_tensors(policy), opt_tensors, opt_meta, state, extra_tensors,
                           export=policy_export(policy), card=card)


def prune_checkpoints(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (iter_*) in `folder`; returns the deleted ones."""
    done = checkpoint_folders(folder)
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old)
    return done[: max(0, len(done) - keep)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_writes(folder: str | Path) -> list[str]:
    """Remove what writers that died left in a checkpoints folder: `.iter_N.tmp-PID` (an unfinished checkpoint) and
    `.iter_N.old-PID` (the checkpoint it replaced; renamed back to iter_N when a kill came between the two renames).
    Folders of a live process are left alone. Returns one line per folder, for the log."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    notes = []
    for stale in sorted(folder.iterdir()):
        match = STALE_NAME.match(stale.name)
        if not match or not stale.is_dir() or _pid_alive(int(match.group(3))):
            continue
        target = folder / match.group(1)
        if match.group(2) == "old" and not target.exists():
            stale.rename(target)
            notes.append(f"restored {target} from {stale.name} (its writer died between two renames)")
        else:
            shutil.rmtree(stale)
            notes.append(f"removed {stale} (left by a checkpoint write that was killed)")
    return notes


# ---- verifying ---------------------------------------------------------------------------------------
def _iteration_of(path: Path) -> int:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoint_folders(folder: str | Path) -> list[Path]:
    """The iter_N folders of a checkpoints folder, oldest first (complete or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir()), key=_iteration_of)


def _check_safetensors(file: Path) -> None:
    """The header of a safetensors file parses and its tensors fill the file exactly (a truncated file fails)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if n < 0 or 8 + n > size:
            raise CheckpointError(f"{file}: not a safetensors file (truncated header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{file}: its safetensors header does not parse") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            if isinstance(entry, dict) and "data_offsets" in entry]
    if 8 + n + max(ends, default=0) != size:
        raise CheckpointError(f"{file}: {size} bytes, its header describes {8 + n + max(ends, default=0)} (truncated?)")


def _load_finite(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each floating-point one checked to be finite (CheckpointError naming the
    file and tensor). Reads the whole file: a few MB on a LoRA run, ~70 GB with the optimizer on a full fine-tune
    of a 12B model (a minute or two); a NaN weight would otherwise train on silently."""
    try:
        tensors = load_file(file)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{file}: cannot be read ({exc})") from None
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{file}: tensor '{bad[0]}' holds NaN or inf")
    return tensors


def verify_checkpoint(path: str | Path, check_finite: bool = True) -> dict:
    """Check one checkpoint folder without loading a model; returns its state.json. Raises CheckpointError naming
    the file: state.json missing or not a JSON object with an iteration, a file missing or of another size or
    sha256 than state.json records, a safetensors header that does not parse or a truncated file, optimizer.json
    not JSON, and (check_finite) a NaN / inf tensor in a file state.json holds no checksum of (an older
    checkpoint, or one whose "files" were removed): a checksummed file is the finite one save() wrote."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing (the checkpoint is incomplete)")
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_file} does not parse as JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise CheckpointError(f"{state_file} holds no iteration")
    files = state.get("files") or {}  # checkpoints of diffrl before the checksums have none: checked below only
    for name in sorted(set(REQUIRED_FILES) | set(files)):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if name in files:
            size = file.stat().st_size
            if size != files[name]["size"]:
                raise CheckpointError(f"{file}: {size} bytes, state.json records {files[name]['size']} (truncated or replaced)")
            if _sha256(file) != files[name]["sha256"]:
                raise CheckpointError(f"{file}: its sha256 differs from the one state.json records (the file changed "
                                      "after it was written)")
    for file in sorted(path.glob("*.safetensors")):
        _check_safetensors(file)
    try:
        meta = json.loads((path / "optimizer.json").read_text())
        assert isinstance(meta, dict) and "param_groups" in meta and "scalars" in meta
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"{path / 'optimizer.json'} does not parse as the optimizer's settings") from None
    if check_finite:  # a file with a checksum was finite when written (save() refuses NaN / inf) and is unchanged
        for name in FINITE_FILES:
            if (path / name).is_file() and name not in files:
                _load_finite(path / name)
    return state


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest checkpoint under path/checkpoints with a state.json
    (written last, so the checkpoint is complete; verify_checkpoint checks it)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = [p for p in checkpoint_folders(path / "checkpoints") if (p / STATE_FILE).is_file()]
    if not found:
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected {path / STATE_FILE} or {path / 'checkpoints'}/iter_*/{STATE_FILE}"
        )
    return found[-1]


# ---- choosing the checkpoint of a resume ---------------------------------------------------------------
@dataclass
class ResumePlan:
    """What a resume continues from: a verified checkpoint, or (None) the beginning of a run stopped before its
    first checkpoint; `notes` are the lines to print (checkpoints skipped, settings applied)."""

    checkpoint: Path | None
    state: dict | None = None
    notes: list[str] = field(default_factory=list)


def _is_checkpoint_folder(path: Path) -> bool:
    return (path / STATE_FILE).exists() or (CHECKPOINT_NAME.match(path.name) is not None
                                            and any((path / name).exists() for name in REQUIRED_FILES))


def find_resume_checkpoint(resume: str | Path) -> ResumePlan:
    """The checkpoint a `resume=` path names, verified. A checkpoint folder: that checkpoint (damaged: an error that
    names the file and the newest intact checkpoint beside it). A run folder (an output_dir): its newest intact
    checkpoint, with a note per newer damaged one; none yet but the run's config.yaml or metrics.jsonl: start
    from the beginning. Raises CheckpointError otherwise (nothing there, a file, every checkpoint damaged)."""
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"resume path {path} is a file; give a run's output_dir or one of its checkpoints "
                              "(<output_dir>/checkpoints/iter_N)")
    if _is_checkpoint_folder(path):
        try:
            return ResumePlan(path, verify_checkpoint(path))
        except CheckpointError as exc:
            others = [p for p in checkpoint_folders(path.parent) if p != path]
            for other in reversed(others):
                try:
                    verify_checkpoint(other)
                except CheckpointError:
                    continue
                raise CheckpointError(f"{exc}; the newest intact checkpoint beside it is {other} (resume={other})") from None
            raise
    candidates = checkpoint_folders(path / "checkpoints")
    if not candidates:
        if (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file():
            return ResumePlan(None, notes=[f"resume: {path} holds no checkpoint yet (the run stopped before its first "
                                           "save): starting from iteration 0, its metrics.jsonl rows replaced"])
        raise CheckpointError(f"resume path {path} is neither a checkpoint (no {STATE_FILE}) nor a run's output_dir "
                              "(no checkpoints/iter_N, no config.yaml)")
    notes, damaged = [], []
    for candidate in reversed(candidates):
        try:
            state = verify_checkpoint(candidate)
        except CheckpointError as exc:
            damaged.append(str(exc))
            notes.append(f"resume: skipping {candidate.name}: {exc}")
            continue
        if damaged:
            notes.append(f"resume: falling back to {candidate}, the newest intact checkpoint")
        return ResumePlan(candidate, state, notes)
    raise CheckpointError(f"no intact checkpoint in {path / 'checkpoints'}: " + "; ".join(damaged))


# ---- does the checkpoint fit the run? -------------------------------------------------------------------
RUN_IDENTITY = ("model", "algorithm", "seed", "reward", "reward_kwargs", "rewards", "reward_combine",
                "reward_source_weights", "policy", "sampling", "data.prompts", "train.group_size",
                "train.prompts_per_iteration", "train.ema", "lm.train_data", "lm.rewards", "lm.reward_combine")
"""Settings (or sections) that say what a run is: a resume that changes one is refused (start a new output_dir)."""
FUTURE_ONLY = ("policy.gradient_checkpointing", "policy.attention_backend", "policy.compile", "policy.compile_mode",
               "policy.lora_dtype",
               "policy.vae_slicing", "policy.vae_tiling", "policy.vae_tile_size", "policy.vae_tile_stride",
               "sampling.eval_num_steps")
"""Exceptions inside RUN_IDENTITY's sections: memory / speed switches and evaluation settings."""
ADDED_SETTINGS = {"policy.adapter": "lora", "policy.sara_threshold": 2e-3, "policy.sara_lambda_rank": 5e-4,
                  "policy.sara_remask_step": None}
"""Settings of RUN_IDENTITY added after checkpoints were written, with the value every run before them had: a saved
config without one had that value (a LoRA run resumes; one that sets policy.adapter sara is another run)."""
NOT_SETTINGS = ("output_dir", "resume", "overwrite")
"""Where the run goes and how it starts: expected to differ, never listed."""


WHOLE_VALUES = ("reward_kwargs", "rewards", "reward_source_weights", "data.eval_sets", "lm.rewards")
"""Mappings of user data, compared (and listed) as one value."""


def _flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and prefix + key not in WHOLE_VALUES:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


PER_PROCESS = "train.prompts_per_iteration"
"""Prompts per iteration on each process: the run is the same when its product with the process count (the global
batch) is, so a resume may change the process count (whole tensors in checkpoints; every draw keyed globally)."""


def compare_settings(saved: dict, new: dict, processes: tuple[int, int] = (1, 1)) -> tuple[list[str], list[str]]:
    """(applied, refused): the settings that differ between a checkpoint's run config and the resuming one (both
    RunConfig.in_use() mappings), as "key old -> new"; refused ones change what the run is (RUN_IDENTITY).
    `processes`: the process counts of the saved and the resuming run (PER_PROCESS compares global batches)."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    applied, refused = [], []
    if PER_PROCESS in old_flat and PER_PROCESS in new_flat:
        (old_world, new_world), old, value = processes, old_flat.pop(PER_PROCESS), new_flat.pop(PER_PROCESS)
        if old * old_world != value * new_world:
            refused.append(f"{PER_PROCESS} x processes {old} x {old_world} -> {value} x {new_world}")
    for key in sorted(set(old_flat) | set(new_flat), key=lambda k: (k.count("."), k)):
        old, value = old_flat.get(key, ADDED_SETTINGS.get(key, "(unset)")), new_flat.get(key, "(unset)")
        if old == value or _matches(key, NOT_SETTINGS):
            continue
        line = f"{key} {old} -> {value}"
        (refused if _matches(key, RUN_IDENTITY) and not _matches(key, FUTURE_ONLY) else applied).append(line)
    return applied, refused


def _saved_config(checkpoint: Path, state: dict) -> dict | None:
    """The config of the run that wrote a checkpoint: state.json's (since the checksums), else the run's config.yaml."""
    if isinstance(state.get("config"), dict):
        return state["config"]
    run_config = checkpoint.parent.parent / "config.yaml"
    if checkpoint.parent.name == "checkpoints" and run_config.is_file():
        import yaml

        try:
            loaded = yaml.safe_load(run_config.read_text())
        except yaml.YAMLError:
            return None
        return loaded if isinstance(loaded, dict) else None
    return None


def resolve_resume(cfg) -> ResumePlan:
    """The checkpoint `cfg.resume` (a diffrl.config.RunConfig's) continues from, verified and fitting the run, before
    any model loads; ConfigError naming the path or file, or the settings that differ, otherwise."""
    try:
        plan = find_resume_checkpoint(cfg.resume)
    except CheckpointError as exc:
        raise ConfigError(f"'resume': {exc}") from None
    if plan.checkpoint is None:
        return plan
    saved = _saved_config(plan.checkpoint, plan.state)
    if saved is None:
        plan.notes.append(f"resume: {plan.checkpoint} records no config: its settings cannot be compared with this run's")
        return plan
    processes = (int(plan.state.get("world_size", 1)), int(os.environ.get("WORLD_SIZE", "1")))  # torchrun / accelerate
    applied, refused = compare_settings(saved, cfg.in_use(), processes)
    if refused:
        raise ConfigError(f"'resume': {plan.checkpoint} was made by a run with other settings ({'; '.join(refused)}): "
                          "these change what the run is; resume with the run's settings, or start a new run in another "
                          "output_dir")
    if applied:
        plan.notes.append(f"resume: applying changed settings: {', '.join(applied)}")
    if processes[0] != processes[1]:
        plan.notes.append(f"resume: {processes[0]} process(es) wrote {plan.checkpoint}, {processes[1]} continue it "
                          "(the same global batch)")
    done = plan.state["iteration"]
    if done >= cfg.max_iterations:
        plan.notes.append(f"resume: {plan.checkpoint} is at iteration {done} and max_iterations is {cfg.max_iterations}: "
                          "nothing left to train (raise max_iterations to continue)")
    return plan


# ---- loading -------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, policy, optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore trainable weights, optimizer and RNG in place; return (state, extra_tensors). `path`: a checkpoint
    folder (resolve_resume chose and verified it), or a run folder (its newest checkpoint). Every tensor is checked
    for NaN / inf as it loads (CheckpointError naming the file and tensor)."""
    path = latest_checkpoint(path)
    params = _named_trainable(policy)
    saved = _load_finite(path / "trainable.safetensors")
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {len(missing)} trainable tensors missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it made with "
            "the same model and LoRA settings?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    meta = json.loads((path / "optimizer.json").read_text())
    opt_tensors = _load_finite(path / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    extra = _load_finite(path / "extra.safetensors") if (path / "extra.safetensors").is_file() else {}
    return json.loads((path / STATE_FILE).read_text()), extra
