"""Training methods, one file each, behind the `ALGORITHMS` registry; the loop is shared (loop.py)."""

from diffrl.core.registry import Registry

ALGORITHMS = Registry("algorithm")


def _register_builtin() -> None:
    from diffrl.trainers.grpo import GRPO

    ALGORITHMS.register("grpo")(GRPO)


_register_builtin()
