"""The reward-backprop memory benchmark at its smallest setting: two measurements (each a fresh subprocess) on
tiny-sd3, the table, json and plot written, and the numbers positive."""

import json

from diffrl.benchmarks import memory


def test_memory_benchmark_writes_its_table(tmp_path):
    argv = ["--output-dir", str(tmp_path), "--steps", "2", "--methods", "easytune", "draft_all", "--model", "tiny-sd3",
            "--batch", "2", "--repeats", "1", "--threads", "1", "--devices", "cpu"]
    assert memory.main(argv) == 0
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(r["method"], r["steps"], r["device"]) for r in rows] == [("easytune", 2, "cpu"), ("draft_all", 2, "cpu")]
    assert all(r["memory_mb"] > 0 and len(r["times"]) == 1 and r["times"][0] > 0 for r in rows)
    assert rows[1]["kept_steps"] == 2 and rows[0]["optimizer_steps"] == 1  # DRaFT-all keeps both steps; window 1
    md = (tmp_path / "memory.md").read_text()
    assert "| cpu | EasyTune (last 20 % of steps) | 2 | 1 |" in md and "| cpu | DRaFT-all | 2 | 1 |" in md
    assert "glibc mallinfo2" in md
    assert (tmp_path / "memory.png").stat().st_size > 10_000
