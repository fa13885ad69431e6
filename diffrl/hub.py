"""Finding weights on this machine: a local path, or a Hugging Face hub id already in the local cache. Never
downloads. The model policies (diffrl.pipelines) and the model rewards (diffrl.rewards) both resolve through
here and word their own errors (what was looked for, where, and the `hf download` that fixes it)."""

from __future__ import annotations

from pathlib import Path


def hub_cache_dir() -> str:
    """Where the hub cache is ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def looks_like_hub_id(spec: str) -> bool:
    """"owner/name", not a path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~", "/")) and "\\" not in spec


def cached_snapshot(repo_id: str) -> Path:
    """The folder of `repo_id`'s snapshot in the local cache; raises (huggingface_hub's error) when absent."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_files_only=True))


def cached_file(repo_id: str, filename: str) -> Path:
    """One file of `repo_id` in the local cache; raises (huggingface_hub's error) when absent."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, local_files_only=True))
