"""The code passes ruff (pyflakes, pycodestyle, bugbear, import order in the package) and
mypy --strict on the package, with the settings in pyproject.toml; `make test` runs this."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTED = ("exporter", "tests", "bench", "scripts", "grafana", "prometheus")


def _tool(name: str) -> list[str]:
    """The tool as a module of this interpreter (so the test extra's version runs), or on PATH."""
    probe = subprocess.run([sys.executable, "-m", name, "--version"], capture_output=True, text=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", name]
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return [exe]


def test_ruff() -> None:
    p = subprocess.run([*_tool("ruff"), "check", "--no-cache", *LINTED], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy_strict(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.mktemp("mypy-cache")
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    p = subprocess.run([*_tool("mypy"), "--cache-dir", str(cache)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Success: no issues found" in p.stdout
