"""A plain (non-editable) wheel install exposes diffrl.pipelines / rewards / benchmarks / assets."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_imports_namespaced_packages(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("diffrl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    code = (
        "import diffrl, diffrl.pipelines, diffrl.rewards, diffrl.benchmarks, diffrl.core, diffrl.sampling, diffrl.motion.skeleton;"
        "from diffrl.pipelines.tiny import tokenizer_path;"
        "from diffrl.data import load_prompts;"
        "print(diffrl.pipelines.__file__); print(diffrl.rewards.__file__); print(tokenizer_path('clip'));"
        "print(len(load_prompts('builtin:animals')));"
        "print(len(load_prompts('builtin:toy_eval')));"
        "from diffrl.rewards import build_reward; build_reward('toy_proxy'); print('proxy-ok')"
    )
    # the target dir first on the path, run from elsewhere: the editable checkout must not be what is imported
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(site / "diffrl" / "pipelines" / "__init__.py")
    assert lines[1] == str(site / "diffrl" / "rewards" / "__init__.py")
    assert lines[2].startswith(str(site / "diffrl" / "assets" / "tokenizers"))
    assert (Path(lines[2]) / "tokenizer_config.json").is_file() or any(Path(lines[2]).iterdir())
    assert int(lines[3]) == 52
    assert int(lines[4]) == 300  # jsonl prompt sets ship in the wheel
    assert lines[5] == "proxy-ok"  # and the proxy reward's weights


def test_every_subpackage_is_listed_for_setuptools():
    """pyproject.toml lists packages by hand: a new diffrl/ subpackage missing there is left out of the wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffrl").rglob("__init__.py")}
    assert found <= listed, f"subpackages missing from [tool.setuptools] packages: {sorted(found - listed)}"
