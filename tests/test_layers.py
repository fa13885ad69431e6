"""The layer order of the package: a module imports only modules of its own layer or below, counting every import
statement, at module level or inside a function. The table is the one docs/design.md draws."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (pyproject.toml's package-dir mapping)
PACKAGES = {"diffrl": "diffrl", "pipelines": "diffrl.pipelines", "rewards": "diffrl.rewards",
            "benchmarks": "diffrl.benchmarks", "assets": "diffrl.assets"}

LAYERS: list[tuple[str, list[str]]] = [  # bottom to top; the most specific pattern of a module decides
    ("foundation", ["diffrl", "diffrl.runtime", "diffrl.optim", "diffrl.distributed", "diffrl.checks", "diffrl.stats", "diffrl.hub", "diffrl.core*",
                    "diffrl.data", "diffrl.visual", "diffrl.assets*", "diffrl.toyworld", "diffrl.toyworld.world",
                    "diffrl.toyworld.prompts", "diffrl.toyworld.scorer", "diffrl.toyworld.clips", "diffrl.motion*"]),
    ("sampling", ["diffrl.sampling*", "diffrl.rollout"]),
    ("models and rewards", ["diffrl.pipelines*", "diffrl.rewards*", "diffrl.toyworld.proxy", "diffrl.checkpoint",
                            "diffrl.guidance"]),
    ("algorithms", ["diffrl.trainers", "diffrl.trainers.*", "diffrl.lm", "diffrl.lm.losses", "diffrl.lm.policy",
                    "diffrl.lm.rewards", "diffrl.lm.tasks"]),
    ("loop", ["diffrl.sections", "diffrl.runloop", "diffrl.trainers.loop", "diffrl.lm.config", "diffrl.lm.trainer"]),
    ("entry points", ["diffrl.config", "diffrl.api", "diffrl.cli", "diffrl.benchmarks*", "diffrl.toyworld.pretrain", "diffrl.toyworld.pretrain_clips",
                      "diffrl.motion.pretrain",
                      "diffrl.lm.pretrain"]),
]


def layer_of(module: str) -> int | None:
    """Index of the layer whose most specific (longest) pattern matches `module`; None when none does."""
    best, best_len = None, -1
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch.fnmatchcase(module, pattern) and len(pattern) > best_len:
                best, best_len = index, len(pattern)
    return best


def package_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every .py file of the package."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """The diffrl modules `module` imports anywhere in its file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {name for name in found if name == "diffrl" or name.startswith("diffrl.")}


def violations(graph: dict[str, set[str]], known: set[str]) -> list[str]:
    """Every import of a module from a higher layer, as 'importer (layer) -> imported (layer)'."""
    out = []
    for importer, imported in sorted(graph.items()):
        low = layer_of(importer)
        for name in sorted(imported):
            if name not in known:  # `from diffrl.x import function`: the module is diffrl.x, checked on its own
                continue
            high = layer_of(name)
            if high is not None and low is not None and high > low:
                out.append(f"{importer} ({LAYERS[low][0]}) -> {name} ({LAYERS[high][0]})")
    return out


def test_every_module_has_a_layer():
    assert [m for m in package_modules() if layer_of(m) is None] == []


def test_no_module_imports_a_higher_layer():
    modules = package_modules()
    graph = {name: imports_of(name, path) for name, path in modules.items()}
    assert violations(graph, set(modules)) == []


def test_the_check_catches_an_upward_import():
    """A pure-maths module importing the command line, or the loop's sections importing config loading, is caught;
    an import of a lower layer is not."""
    known = {"diffrl.core.kl", "diffrl.cli", "diffrl.sections", "diffrl.config", "diffrl.runtime"}
    graph = {"diffrl.core.kl": {"diffrl.cli"}, "diffrl.sections": {"diffrl.config", "diffrl.runtime"}}
    assert violations(graph, known) == ["diffrl.core.kl (foundation) -> diffrl.cli (entry points)",
                                        "diffrl.sections (loop) -> diffrl.config (entry points)"]
    # and on the real files: a lazy import inside a function counts
    source = ROOT / "diffrl" / "core" / "kl.py"
    fake = source.parent / "_layer_probe.py"
    fake.write_text("def f():\n    from diffrl.trainers.loop import Trainer\n")
    try:
        assert imports_of("diffrl.core._layer_probe", fake) >= {"diffrl.trainers.loop"}
        assert violations({"diffrl.core._layer_probe": imports_of("diffrl.core._layer_probe", fake)},
                          {"diffrl.trainers.loop"}) == ["diffrl.core._layer_probe (foundation) -> diffrl.trainers.loop (loop)"]
    finally:
        fake.unlink()
