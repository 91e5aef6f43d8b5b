"""The rules agree with the exporter: the anomaly alerts, their promtool test and the
anomaly thresholds are generated from the signal specs and are current; the runaway
detector's alert thresholds equal its defaults.

The exporter judges every anomaly itself (`llm_anomaly_severity`) with
`exporter.anomaly.signals.DEFAULT_SIGNALS` (plus the config's `signals:`), and the alerts route that
verdict; thresholds.yml publishes the numbers for dashboards. The rules' `critical` is the
exporter's "high".
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from exporter import cli
from exporter.anomaly.rules import generate
from exporter.anomaly.signals import DEFAULT_SIGNALS, SignalSpec

THRESHOLDS = Path(__file__).resolve().parent.parent / "prometheus" / "rules" / "thresholds.yml"
CONSTANT = re.compile(r"^\s*vector\(\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)\s*\)\s*$", re.I)


def threshold_values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(record name, sorted labels) -> the constant of every `vector(N)` recording rule."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for group in yaml.safe_load(THRESHOLDS.read_text())["groups"]:
        for rule in group["rules"]:
            m = CONSTANT.match(str(rule.get("expr", "")))
            if "record" not in rule or not m:
                continue
            key = (rule["record"], tuple(sorted((rule.get("labels") or {}).items())))
            assert key not in out, f"thresholds.yml defines {key} twice"
            out[key] = float(m.group(1))
    return out


def rule_value(record: str, **labels: str) -> float:
    key = (record, tuple(sorted(labels.items())))
    values = threshold_values()
    assert key in values, f"thresholds.yml has no `{record}` with labels {labels}"
    return values[key]


@pytest.mark.parametrize("spec", DEFAULT_SIGNALS, ids=lambda s: s.name)
def test_anomaly_thresholds_equal_the_exporter_defaults(spec: SignalSpec) -> None:
    if "up" in spec.directions:
        assert rule_value("llm:anomaly_threshold:ratio", signal=spec.name, severity="warning") == spec.warning_ratio
        assert rule_value("llm:anomaly_threshold:ratio", signal=spec.name, severity="critical") == spec.high_ratio
    if "down" in spec.directions:
        drop = (spec.drop_warning_ratio, spec.drop_high_ratio) if spec.direction == "both" else (spec.warning_ratio, spec.high_ratio)
        assert rule_value("llm:anomaly_threshold:ratio_low", signal=spec.name, severity="warning") == pytest.approx(1 / drop[0])
        assert rule_value("llm:anomaly_threshold:ratio_low", signal=spec.name, severity="critical") == pytest.approx(1 / drop[1])
    assert rule_value("llm:anomaly_threshold:sustained_ratio", signal=spec.name) == spec.sustained_ratio
    assert rule_value("llm:anomaly_threshold:min_current", signal=spec.name) == spec.min_current
    assert rule_value("llm:anomaly_threshold:min_baseline_hours", signal=spec.name) == spec.min_baseline_hours


def test_generated_rules_and_tests_are_current(tmp_path: Path) -> None:
    """anomaly.yml, its promtool test and the anomaly block of thresholds.yml are what
    `llm-usage-exporter rules` writes from the specs; a hand edit (or a spec changed
    without generating again) fails here. The command refuses to write with --check."""
    rules_dir = THRESHOLDS.parent
    assert generate(rules_dir, DEFAULT_SIGNALS, check=True) == []
    assert cli.main(["rules", "--out", str(rules_dir), "--check"]) == 0
    # a copy with one number changed is reported, then repaired by writing
    copy = tmp_path / "prometheus"
    shutil.copytree(rules_dir.parent, copy)
    text = (copy / "rules" / "thresholds.yml").read_text()
    (copy / "rules" / "thresholds.yml").write_text(text.replace(
        'vector(1.5)", labels: {signal: cost_per_hour, severity: warning}', 'vector(9)", labels: {signal: cost_per_hour, severity: warning}'))
    assert cli.main(["rules", "--out", str(copy / "rules"), "--check"]) == 1
    assert cli.main(["rules", "--out", str(copy / "rules")]) == 0
    assert generate(copy / "rules", DEFAULT_SIGNALS, check=True) == []


def test_rules_follow_the_configured_signals(tmp_path: Path) -> None:
    """A team's `signals:` overrides flow into the rules it generates."""
    copy = tmp_path / "prometheus"
    shutil.copytree(THRESHOLDS.parent.parent, copy)
    cfg = tmp_path / "exporter.yaml"
    cfg.write_text("signals:\n  cost_per_hour: {warning_ratio: 2.5, high_ratio: 5}\n")
    assert cli.main(["rules", "--out", str(copy / "rules"), "--config", str(cfg)]) == 0
    text = (copy / "rules" / "thresholds.yml").read_text()
    assert 'expr: "vector(2.5)", labels: {signal: cost_per_hour, severity: warning}' in text
    assert 'expr: "vector(5)", labels: {signal: cost_per_hour, severity: critical}' in text


def test_every_direction_of_every_signal_has_its_alert_pair() -> None:
    doc = yaml.safe_load((THRESHOLDS.parent / "anomaly.yml").read_text())
    alerts = [(r["alert"], r["labels"]["severity"], r["expr"]) for g in doc["groups"] for r in g["rules"]]
    for spec in DEFAULT_SIGNALS:
        assert spec.text is not None
        for direction in spec.directions:
            name, _ = spec.text.alerts[direction]
            mine = [(sev, expr) for a, sev, expr in alerts if a == name]
            assert sorted(sev for sev, _ in mine) == ["critical", "warning"], name
            for _, expr in mine:
                assert f'llm_anomaly_severity{{signal="{spec.name}"}}' in expr
                assert f'unless llm_anomaly_explained{{signal="{spec.name}"}} == 1' in expr
                if spec.direction == "both":
                    assert ("zscore" in expr) and ((">" in expr) if direction == "up" else ("<" in expr))


def test_invocation_spike_thresholds_equal_the_runaway_detector_defaults() -> None:
    """The exporter flags spikes (/api/runaways) with the numbers the alert uses."""
    from exporter.detectors.runaway import RunawaySettings

    defaults = RunawaySettings()
    assert rule_value("llm:runaway_threshold:invocation_zscore") == defaults.spike_z
    assert rule_value("llm:runaway_threshold:invocation_min_count") == defaults.spike_min_count
