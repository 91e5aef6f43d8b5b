"""The alerts' runbook and dashboard links come from one setting (prometheus/links.yml):
every link in the rule files and in their promtool tests is what prometheus/build_links.py
derives from it, and changing the setting keeps rules and tests in agreement."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "prometheus"))
import build_links  # noqa: E402

PROMTOOL = shutil.which("promtool")
ELSEWHERE = {"runbook": "https://wiki.example.com/llm/runbook", "grafana": "https://grafana.example.com/sub"}


def test_every_link_agrees_with_the_setting() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "prometheus" / "build_links.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_every_link_line_is_derived_from_the_setting() -> None:
    """No link escapes the generator: with other bases, no file keeps the shipped ones."""
    setting = build_links.links()
    covered = build_links.files()
    assert {p.name for p in covered} >= {"budget.yml", "performance.yml", "exporter.yml", "detectors.yml",
                                         "budget_test.yml", "performance_test.yml", "exporter_test.yml",
                                         "detectors_test.yml"}
    changed = 0
    for path in covered:
        text = path.read_text()
        moved = build_links.rewrite(text, ELSEWHERE)
        assert setting["runbook"] not in moved and setting["grafana"] + "/d/" not in moved, path.name
        changed += sum(a != b for a, b in zip(text.splitlines(), moved.splitlines()))
        assert build_links.rewrite(moved, setting) == text          # and back, byte for byte
    assert changed >= 100


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_rules_and_their_tests_agree_under_another_setting(tmp_path: Path) -> None:
    copy = tmp_path / "prometheus"
    shutil.copytree(ROOT / "prometheus", copy)
    for path in sorted((copy / "rules").glob("*.yml")) + sorted((copy / "tests").glob("*.yml")):
        if path.name not in build_links.EXCLUDED:
            path.write_text(build_links.rewrite(path.read_text(), ELSEWHERE))
    assert "https://grafana.example.com/sub/d/llm-budget?orgId=1" in (copy / "rules" / "budget.yml").read_text()
    for test_file in sorted((copy / "tests").glob("*_test.yml")):
        if test_file.name in build_links.EXCLUDED:
            continue
        p = subprocess.run([PROMTOOL, "test", "rules", test_file.name], cwd=copy / "tests",
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{test_file.name}: {p.stdout}{p.stderr}"
