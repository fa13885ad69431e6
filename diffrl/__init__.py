"""diffrl: reward fine-tuning and inference-time steering for diffusion and flow-matching generators.

    import diffrl
    diffrl.train("configs/quickstart.yaml", "max_iterations=10")   # what `diffrl train` runs
    cfg = diffrl.load_config("configs/quickstart.yaml")            # a validated diffrl.RunConfig

The names below load on first use, so `import diffrl` stays light.
"""

__version__ = "0.1.0"

_LAZY = {"RunConfig": "diffrl.config", "load_config": "diffrl.config", "ConfigError": "diffrl.checks",
         "train": "diffrl.api", "build_trainer": "diffrl.api"}
__all__ = ["ConfigError", "RunConfig", "build_trainer", "load_config", "train", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffrl' has no attribute {name!r}")
