"""scripts/venv.sh refuses an interpreter it cannot use with one line that says what is needed,
before it makes or touches any environment. (Making and reusing .venv: test_stock_debian.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def project_copy(tmp_path: Path, requires: str | None = None) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "venv.sh", tmp_path / "scripts" / "venv.sh")
    text = (REPO / "pyproject.toml").read_text()
    if requires is not None:
        text, n = re.subn(r'(?m)^requires-python = ".*"$', f'requires-python = "{requires}"', text)
        assert n == 1
    (tmp_path / "pyproject.toml").write_text(text)
    return tmp_path


def run_venv_sh(root: Path, python: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": python, "VENV": ".venv"}
    return subprocess.run(["bash", str(root / "scripts" / "venv.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)


def test_an_interpreter_older_than_requires_python_gets_one_line(tmp_path: Path) -> None:
    root = project_copy(tmp_path, requires=">=3.99")
    r = run_venv_sh(root, sys.executable)
    version = "%d.%d.%d" % sys.version_info[:3]
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: llm-usage-exporter needs Python >= 3.99, but {sys.executable} is {version} "
        f"({os.path.realpath(sys.executable)}); install a newer one and pass it, e.g. make PYTHON=python3.12 run"]
    assert not (root / ".venv").exists()


def test_a_missing_interpreter_gets_one_line_with_the_version_pyproject_needs(tmp_path: Path) -> None:
    root = project_copy(tmp_path)
    need = re.search(r'(?m)^requires-python = ">=([0-9.]+)"', (root / "pyproject.toml").read_text())
    assert need
    missing = str(tmp_path / "no-such-python")
    r = run_venv_sh(root, missing)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"error: {missing} not found: llm-usage-exporter needs Python >= {need.group(1)} "
        "(choose one with: make PYTHON=python3.X ...)"]
    assert not (root / ".venv").exists()
