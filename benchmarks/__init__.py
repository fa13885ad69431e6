"""Evaluation harness and speed / memory benchmarks (installed as `diffrl.benchmarks`)."""
