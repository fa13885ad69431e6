"""Training methods, one file each, behind the `ALGORITHMS` registry; the loop is shared (loop.py)."""

from diffrl.core.registry import Registry

ALGORITHMS = Registry("algorithm")


def _register_builtin() -> None:
    from diffrl.trainers.crd import CRD
    from diffrl.trainers.draft import Draft
    from diffrl.trainers.easytune import EasyTune
    from diffrl.trainers.grpo import GRPO
    from diffrl.trainers.nft import DiffusionNFT
    from diffrl.trainers.prdp import PRDP

    ALGORITHMS.register("grpo")(GRPO)
    ALGORITHMS.register("nft")(DiffusionNFT)
    ALGORITHMS.register("crd")(CRD)
    ALGORITHMS.register("prdp")(PRDP)
    ALGORITHMS.register("easytune")(EasyTune)
    ALGORITHMS.register("draft")(Draft)


_register_builtin()
