"""The Prometheus side: prometheus.yml, the rule files and their promtool unit tests.

Runs the real `promtool` (check config, check rules, test rules) and checks the
conventions every alert must follow: a severity, a static summary, a templated
description, a runbook link whose anchor exists in docs/runbook.md, a promtool test that
fires it and one that keeps it quiet.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "prometheus"
RULES_DIR = PROM_DIR / "rules"
TESTS_DIR = PROM_DIR / "tests"
RUNBOOK = ROOT / "docs" / "runbook.md"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
sys.path.insert(0, str(PROM_DIR))
import build_links  # noqa: E402

LINKS = build_links.links()      # the one setting every runbook_url and dashboard_url derives from
RUNBOOK_URL = LINKS["runbook"] + "#"
SEVERITIES = {"critical", "warning", "info"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")

RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
TEST_FILES = sorted(TESTS_DIR.glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool from prometheus/, where prometheus.yml's relative paths resolve."""
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=600)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@lru_cache(maxsize=None)
def alert_rules() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(rule file name, rule) for every alerting rule."""
    out = []
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out.append((path.name, rule))
    return tuple(out)


def alert_names() -> list[str]:
    return sorted({rule["alert"] for _, rule in alert_rules()})


@lru_cache(maxsize=None)
def unit_test_alert_cases() -> tuple[tuple[str, str, tuple[dict[str, str], ...]], ...]:
    """(test file, alertname, expected alerts' labels) for every alert_rule_test case."""
    out = []
    for path in TEST_FILES:
        for test in load(path).get("tests") or []:
            for case in test.get("alert_rule_test") or []:
                labels = tuple(a.get("exp_labels") or {} for a in case.get("exp_alerts") or [])
                out.append((path.name, case["alertname"], labels))
    return tuple(out)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    text = RUNBOOK.read_text()
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


# --- promtool -------------------------------------------------------------------------


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_is_valid(rule_file: Path) -> None:
    result = promtool("check", "rules", str(rule_file.relative_to(PROM_DIR)))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    result = promtool("test", "rules", str(test_file.relative_to(PROM_DIR)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_loads_every_rule_file_and_reaches_the_stack() -> None:
    config = load(PROM_DIR / "prometheus.yml")
    assert config["rule_files"] == ["rules/*.yml"]
    targets = {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
               for job in config["scrape_configs"]}
    assert targets["llm-usage-exporter"] == ["exporter:9473"]
    assert targets["blackbox-exporter"] == ["blackbox-exporter:9115"]
    assert "alertmanager:9093" in targets["alertmanager"]
    assert "prometheus" in targets
    am = [t for a in config["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]]
    assert am == ["alertmanager:9093"]
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"


# --- conventions ----------------------------------------------------------------------


def test_there_are_rule_and_test_files() -> None:
    assert RULE_FILES and TEST_FILES
    assert len(alert_rules()) >= 20


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_every_rule_file_has_a_test_file_that_loads_it(rule_file: Path) -> None:
    test_file = TESTS_DIR / f"{rule_file.stem}_test.yml"
    assert test_file.is_file(), f"{rule_file.name} has no promtool test file {test_file.relative_to(ROOT)}"
    loaded = [Path(p).name for p in load(test_file)["rule_files"]]
    assert rule_file.name in loaded, f"{test_file.name} does not load {rule_file.name}"


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_test_files_fix_the_group_evaluation_order(test_file: Path) -> None:
    """promtool evaluates groups in random order unless told; alerts read recording rules."""
    doc = load(test_file)
    groups = set()
    for rel in doc["rule_files"]:
        groups.update(g["name"] for g in load((TESTS_DIR / rel).resolve())["groups"])
    assert set(doc.get("group_eval_order") or []) == groups


def test_alert_rules_follow_the_conventions() -> None:
    problems = []
    for file, rule in alert_rules():
        name = rule["alert"]
        where = f"{file}: {name}"
        labels = rule.get("labels") or {}
        ann = rule.get("annotations") or {}
        if not (re.fullmatch(r"LLM[A-Z][A-Za-z0-9]+", name) or name == "Watchdog"):
            problems.append(f"{where}: name is not LLM… in CamelCase")
        if labels.get("severity") not in SEVERITIES:
            problems.append(f"{where}: severity {labels.get('severity')!r} not in {sorted(SEVERITIES)}")
        for key in ("summary", "description", "runbook_url"):
            if not str(ann.get(key, "")).strip():
                problems.append(f"{where}: no {key} annotation")
        if "{{" in str(ann.get("summary", "")):
            problems.append(f"{where}: summary must be static")
        if name != "Watchdog" and "{{" not in str(ann.get("description", "")):
            problems.append(f"{where}: description is not templated")
        if name != "Watchdog":
            m = re.match(re.escape(LINKS["grafana"]) + r"/d/([\w-]+)\?orgId=1", str(ann.get("dashboard_url", "")))
            if not m:
                problems.append(f"{where}: no dashboard_url into Grafana")
            elif not any(json.loads(p.read_text()).get("uid") == m.group(1) for p in DASHBOARDS):
                problems.append(f"{where}: dashboard_url names dashboard {m.group(1)!r}, which grafana/dashboards lacks")
        if ann.get("runbook_url") != RUNBOOK_URL + name.lower():
            problems.append(f"{where}: runbook_url {ann.get('runbook_url')!r} is not {RUNBOOK_URL + name.lower()!r}")
    assert not problems, "\n".join(problems)


def test_every_runbook_anchor_exists() -> None:
    anchors = runbook_anchors()
    missing = sorted({rule["annotations"]["runbook_url"].split("#", 1)[1] for _, rule in alert_rules()} - anchors)
    assert not missing, f"docs/runbook.md has no section for: {missing}"


def test_twin_alerts_differ_only_in_severity() -> None:
    """Alerts sharing a name are warning/critical twins, for Alertmanager's inhibition."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for _, rule in alert_rules():
        by_name.setdefault(rule["alert"], []).append(rule)
    for name, rules in by_name.items():
        severities = [r["labels"]["severity"] for r in rules]
        assert len(severities) == len(set(severities)), f"{name}: two rules with one severity"
        if len(rules) > 1:
            assert set(severities) == {"warning", "critical"}, name
            others = [{k: v for k, v in r["labels"].items() if k != "severity"} for r in rules]
            assert all(o == others[0] for o in others), f"{name}: twins carry different static labels"


def test_every_alert_and_severity_fires_in_a_unit_test() -> None:
    fired = {(name, labels.get("severity")) for _, name, exp in unit_test_alert_cases() for labels in exp}
    missing = sorted({(rule["alert"], rule["labels"]["severity"]) for _, rule in alert_rules()} - fired)
    assert not missing, f"no promtool test expects these (alert, severity) to fire: {missing}"


def test_every_alert_has_a_quiet_case_in_a_unit_test() -> None:
    quiet = {name for _, name, exp in unit_test_alert_cases() if not exp}
    missing = sorted(set(alert_names()) - quiet - {"Watchdog"})
    assert not missing, f"no promtool test expects these alerts to stay quiet: {missing}"


def test_recording_rule_names_follow_level_metric_operations() -> None:
    bad = []
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                if "record" in rule and not re.fullmatch(r"[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+", rule["record"]):
                    bad.append(f"{path.name}: {rule['record']}")
    assert not bad, bad


def test_thresholds_live_only_in_thresholds_yml() -> None:
    """Every llm:*threshold* series an expression reads is defined in thresholds.yml."""
    defined = set()
    for group in load(RULES_DIR / "thresholds.yml")["groups"]:
        defined.update(r["record"] for r in group["rules"] if "record" in r)
    used = set()
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                if "record" in rule and path.name != "thresholds.yml":
                    assert "threshold" not in rule["record"], f"{path.name}: {rule['record']} belongs in thresholds.yml"
                used.update(re.findall(r"[a-z_]+:[a-z_]*threshold[a-z_]*:[a-z0-9_]+", rule["expr"]))
    assert used, "no alert reads a threshold series"
    assert not used - defined, f"read but not defined in thresholds.yml: {sorted(used - defined)}"


def test_rules_read_only_metrics_of_the_contract() -> None:
    """Every exporter metric an expression or description reads is in docs/metrics.md."""
    contract = (ROOT / "docs" / "metrics.md").read_text()
    recorded = set()
    texts = []
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                recorded.add(rule.get("record"))
                texts.append(rule["expr"])
                texts.extend(str(v) for v in (rule.get("annotations") or {}).values())
    read = set(re.findall(r"(?<![:\w])llm_[a-z0-9_]+", "\n".join(texts))) - recorded
    assert read, "no exporter metric found in the rules"

    def documented(name: str) -> bool:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        return re.search(rf"`{re.escape(name)}[`{{]", contract) is not None or \
            re.search(rf"`{re.escape(base)}[`{{]", contract) is not None
    missing = sorted(n for n in read if not documented(n))
    assert not missing, f"the rules read metrics docs/metrics.md does not define: {missing}"

    # ... and that the exporter publishes (metric family names as string literals)
    source = "\n".join(p.read_text() for p in (ROOT / "exporter").rglob("*.py"))

    def published(name: str) -> bool:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        return f'"{name}"' in source or f'"{base}"' in source
    unpublished = sorted(n for n in read if not published(n))
    assert not unpublished, f"the rules read metrics the exporter does not publish: {unpublished}"
