"""Test-wide settings: offline hub, and one intra-op thread (tiny models run 10-50x faster single-threaded
on a shared 2-core machine, as measured on the build machines)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
