"""The rule files on VictoriaMetrics' vmalert: prometheus/vmalert/ is generated from
prometheus/rules/ by prometheus/build_vmalert.py, stays current, differs from the rules only
in the fields vmalert 1.79 does not know, and every file of it loads in the real vmalert
(`-dryRun`, which parses every expression and every annotation template)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "prometheus"
sys.path.insert(0, str(PROM_DIR))
import build_vmalert  # noqa: E402

VMALERT = shutil.which("vmalert")
needs_vmalert = pytest.mark.skipif(VMALERT is None, reason="vmalert is not installed (Debian package victoria-metrics)")
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))


def dry_run(*rule_files: Path) -> subprocess.CompletedProcess[str]:
    assert VMALERT is not None
    return subprocess.run([VMALERT, "-dryRun", *[f"-rule={p}" for p in rule_files]],
                          capture_output=True, text=True, timeout=120)


def without(node: Any, fields: tuple[str, ...]) -> Any:
    """The rule file's data with `fields` removed from every rule."""
    for group in node.get("groups") or []:
        for rule in group.get("rules") or []:
            for f in fields:
                rule.pop(f, None)
    return node


def test_every_anomaly_warning_on_vmalert_is_held_by_its_pages_condition() -> None:
    """vmalert reads a page's ALERTS back from its store late, so the warning twin must also
    be held by the page's own expression, which it evaluates on the same data in the same
    evaluation: the copy's hold names the critical rule's condition as that rule has it."""
    vm = yaml.safe_load((PROM_DIR / "vmalert" / "anomaly.yml").read_text())
    rules = [r for g in vm["groups"] for r in g["rules"] if r.get("alert")]
    pages = {r["alert"]: " ".join(r["expr"].split()) for r in rules if r["labels"]["severity"] == "critical"}
    warnings = [r for r in rules if r["labels"]["severity"] == "warning"]
    assert len(warnings) == len(pages) >= 8
    for rule in warnings:
        page = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", pages[rule["alert"]]))
        hold = " ".join(rule["expr"].split()).split(" unless on(", 1)[1]
        assert re.search(r"\[\w+\]\) or " + re.escape(page) + r"\)", hold), rule["alert"]


def test_the_vmalert_copies_are_current() -> None:
    p = subprocess.run([sys.executable, str(PROM_DIR / "build_vmalert.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_every_rule_file_has_a_copy_that_differs_only_in_the_unknown_fields() -> None:
    copies = sorted((PROM_DIR / "vmalert").glob("*.yml"))
    assert [p.name for p in copies] == [p.name for p in RULE_FILES]
    dropped = 0
    for rules, copy in zip(RULE_FILES, copies):
        shipped, vm = yaml.safe_load(rules.read_text()), yaml.safe_load(copy.read_text())
        assert vm == without(shipped, build_vmalert.UNKNOWN_FIELDS), copy.name
        # the fields, not a comment that names one
        field = re.compile(r"^\s+(?:%s):" % "|".join(build_vmalert.UNKNOWN_FIELDS), re.M)
        dropped += len(field.findall(rules.read_text())) - len(field.findall(copy.read_text()))
        assert not field.search(copy.read_text()), copy.name
        assert copy.read_text().startswith(f"# Generated from ../rules/{rules.name} ")
    assert dropped >= 3          # the performance alerts' cooldowns, the backend outage's hold


def test_the_check_notices_an_edit_a_new_file_and_a_removed_one(tmp_path: Path) -> None:
    rules, out = tmp_path / "rules", tmp_path / "vmalert"
    shutil.copytree(PROM_DIR / "rules", rules)
    build_vmalert.write(rules, out)
    assert build_vmalert.stale(rules, out) == []
    (rules / "usage.yml").write_text((rules / "usage.yml").read_text().replace("[5m]", "[10m]"))
    (rules / "blackbox.yml").write_text("groups: []\n")
    (rules / "budget.yml").unlink()
    assert build_vmalert.stale(rules, out) == ["blackbox.yml", "budget.yml", "usage.yml"]
    assert sorted(build_vmalert.write(rules, out)) == ["blackbox.yml", "budget.yml", "usage.yml"]
    assert not (out / "budget.yml").exists() and "[10m]" in (out / "usage.yml").read_text()
    assert build_vmalert.stale(rules, out) == []


@needs_vmalert
@pytest.mark.parametrize("copy", sorted((PROM_DIR / "vmalert").glob("*.yml")), ids=lambda p: p.name)
def test_every_copy_loads_in_vmalert(copy: Path) -> None:
    p = dry_run(copy)
    assert p.returncode == 0, p.stdout + p.stderr


@needs_vmalert
def test_all_copies_load_together_in_vmalert() -> None:
    """Group names are unique across the files, as vmalert requires."""
    p = dry_run(*sorted((PROM_DIR / "vmalert").glob("*.yml")))
    assert p.returncode == 0, p.stdout + p.stderr


@needs_vmalert
def test_the_shipped_files_load_as_they_are_except_for_the_unknown_fields() -> None:
    """A rule file without keep_firing_for needs no copy at all; one with it is refused by
    vmalert 1.79, which is why the copies exist (a later vmalert may read them all)."""
    for path in RULE_FILES:
        p = dry_run(path)
        has_unknown = any(f"{f}:" in path.read_text() for f in build_vmalert.UNKNOWN_FIELDS)
        if not has_unknown:
            assert p.returncode == 0, f"{path.name}: {p.stdout}{p.stderr}"
        elif p.returncode != 0:
            assert "keep_firing_for" in p.stdout + p.stderr, p.stdout + p.stderr


@needs_vmalert
def test_vmalert_checks_the_templates_it_loads(tmp_path: Path) -> None:
    """The dry run is a real check: a template calling an unknown function is refused."""
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"alert": "A", "expr": "vector(1)", "annotations": {"description": "{{ $value | nosuchfunction }}"}}]}]}))
    p = dry_run(bad)
    assert p.returncode != 0 and "nosuchfunction" in p.stdout + p.stderr
