"""The anomaly thresholds in prometheus/rules/thresholds.yml equal the exporter's defaults.

The exporter judges every signal itself (`/api/anomalies`, `llm_anomaly_severity`) with
`exporter.signals.DEFAULT_SIGNALS`; the alert rules judge the same gauges with the numbers
in thresholds.yml. If one is tuned without the other, the landing page and the alerts
disagree, so this test fails the build. The rules' `critical` is the exporter's "high".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

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
    assert rule_value("llm:anomaly_threshold:ratio", signal=spec.name, severity="warning") == spec.warning_ratio
    assert rule_value("llm:anomaly_threshold:ratio", signal=spec.name, severity="critical") == spec.high_ratio
    assert rule_value("llm:anomaly_threshold:min_zscore", signal=spec.name) == spec.min_zscore
    assert rule_value("llm:anomaly_threshold:min_current", signal=spec.name) == spec.min_current
    assert rule_value("llm:anomaly_threshold:min_baseline_hours", signal=spec.name) == spec.min_baseline_hours


def test_thresholds_yml_has_no_signal_the_exporter_does_not_know() -> None:
    known = {s.name for s in DEFAULT_SIGNALS}
    in_rules = {dict(labels)["signal"] for (record, labels) in threshold_values()
                if record.startswith("llm:anomaly_threshold:")}
    assert in_rules == known


def test_every_down_signal_has_an_alert_for_its_direction() -> None:
    """A signal judged downwards by the exporter needs a rule comparing with ratio_low."""
    rules_text = (THRESHOLDS.parent / "anomaly.yml").read_text()
    for spec in DEFAULT_SIGNALS:
        if spec.direction in ("down", "both"):
            assert re.search(
                rf'llm_anomaly_ratio\{{signal="{spec.name}"\}}\s*<= on\(signal\) group_left\(\) llm:anomaly_threshold:ratio_low',
                rules_text), f"no down-direction alert for {spec.name}"
        if spec.direction in ("up", "both"):
            assert re.search(
                rf'llm_anomaly_ratio\{{signal="{spec.name}"\}}\s*>= on\(signal\) group_left\(\) llm:anomaly_threshold:ratio\{{',
                rules_text), f"no up-direction alert for {spec.name}"


def test_invocation_spike_thresholds_equal_the_runaway_detector_defaults() -> None:
    """The exporter flags spikes (/api/runaways) with the numbers the alert uses."""
    from exporter.detectors.runaway import RunawaySettings

    defaults = RunawaySettings()
    assert rule_value("llm:runaway_threshold:invocation_zscore") == defaults.spike_z
    assert rule_value("llm:runaway_threshold:invocation_min_count") == defaults.spike_min_count
