"""The installable package holds exactly the project's modules: `pip install -e .` maps a fixed list of
top-level modules, so a new module missing from pyproject.toml would import in the tests (run from the
repository) and fail for every installed user."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 and newer

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_top_level_module_and_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(config["py-modules"]) == sorted(p.stem for p in REPO.glob("*.py"))
    packages = sorted(p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name != "tests")
    include = config["packages"]["find"]["include"]
    assert sorted(i.rstrip("*") for i in include) == packages


def test_console_scripts_name_the_cli_functions_and_run():
    import importlib
    import shutil
    import subprocess

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"forgetlab-train", "forgetlab-eval", "forgetlab-stream"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    exe = shutil.which("forgetlab-stream")
    if exe is None:
        pytest.skip("forgetlab is not pip-installed in this environment (its console scripts are absent)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--order" in out.stdout
