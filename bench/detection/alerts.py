"""The shipped alert rules, applied to backtest verdicts as Prometheus would apply them.

A verdict is not yet an alert: the rules in `prometheus/rules/anomaly.yml` and
`detectors.yml` turn it into one only after it has held for the rule's `for:`, and the
anomaly rules stay quiet for a verdict that a narrower scope explains. This module reads,
per signal, the rules that route it (the severity label they carry, the verdict level
their expression needs, their `for:`) from the rule files of the checkout the exporter
under test comes from, so an older revision is scored with its own rules; and it turns a
(steps x scopes) matrix of "the rule's condition holds" into firing alerts.

Firing follows Prometheus' `for:` for a rule evaluated at every backtest step: a series
is pending from the first step its condition holds and fires at the first step at which
the condition has held at every step since a step at least `for:` earlier; it resolves at
the first step the condition no longer holds. With one-minute steps that is within a
minute of what the real rule evaluation (every 15-30 s) would do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

RUNAWAY_REASONS = ("chain_length", "token_burst", "session_cost", "tool_repetition")
LEVEL_OF_SEVERITY = {"warning": 1, "critical": 2}     # the exporter's severity a rule of that label routes
PAGING = "critical"                                    # Alertmanager sends these to the pager


class RulesError(RuntimeError):
    """The rule files are missing or say something this benchmark cannot model."""


@dataclass(frozen=True)
class AlertRule:
    """One alert rule as it applies to one signal."""

    alert: str           # alert name
    signal: str          # benchmark signal name (evaluator signal, `drift`, `runaway.<reason>`, ...)
    severity: str        # the rule's severity label
    level: int           # the verdict severity its condition needs (>=)
    for_s: float         # its `for:`
    explainable: bool    # the rule stays quiet while `explained` is set (anomaly rules)

    @property
    def pages(self) -> bool:
        return self.severity == PAGING

    def to_dict(self) -> dict[str, Any]:
        return {"alert": self.alert, "severity": self.severity, "level": self.level, "for_s": self.for_s,
                "explainable": self.explainable}


def parse_duration(text: str | int | float) -> float:
    """Prometheus duration ("5m", "1h30m", "90s") in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text.strip())
    if not parts or "".join(a + b for a, b in parts) != text.strip():
        raise RulesError(f"cannot read the duration {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def _rules(path: Path) -> Iterable[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text()) or {}
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            if "alert" in rule:
                yield rule


def anomaly_rules(path: Path) -> list[AlertRule]:
    """The anomaly alerts: each names its signal in its expression (`signal="..."`). The
    level is read from `llm_anomaly_severity{...} >= N` when the expression judges the
    exporter's verdict, else from the severity label (older rules judged the ratio and
    z-score against the thresholds of the exporter's own warning / high verdicts)."""
    out = []
    for r in _rules(path):
        expr = str(r.get("expr", ""))
        m = re.search(r'signal="([^"]+)"', expr)
        if not m:
            continue
        sev = str((r.get("labels") or {}).get("severity", "warning"))
        lv = re.search(r"llm_anomaly_severity\{[^}]*\}\s*>=\s*(\d+)", expr)
        level = int(lv.group(1)) if lv else LEVEL_OF_SEVERITY.get(sev, 1)
        out.append(AlertRule(str(r["alert"]), m.group(1), sev, level, parse_duration(r.get("for", "0s")),
                             explainable="llm_anomaly_explained" in expr))
    return out


def detector_rules(path: Path) -> list[AlertRule]:
    """Drift (`llm_drift_severity >= N`), runaway sessions (per reason, by the rule's
    `reason` matcher) and the invocation spike."""
    out = []
    for r in _rules(path):
        expr = str(r.get("expr", ""))
        sev = str((r.get("labels") or {}).get("severity", "warning"))
        for_s = parse_duration(r.get("for", "0s"))
        name = str(r["alert"])
        if "llm_drift_severity" in expr:
            # `llm_drift_severity >= N`, or `max without (replica) (llm_drift_severity) >= N`
            lv = re.search(r"llm_drift_severity(?:\{[^}]*\})?\)?\s*>=\s*(\d+)", expr)
            out.append(AlertRule(name, "drift", sev, int(lv.group(1)) if lv else 1, for_s, False))
        elif "llm_runaway_sessions" in expr:
            m = re.search(r'reason\s*(=~|!~|=|!=)\s*"([^"]*)"', expr)
            reasons: tuple[str, ...] = RUNAWAY_REASONS
            if m:
                listed = set(m.group(2).split("|"))
                keep = m.group(1) in ("=~", "=")
                reasons = tuple(x for x in RUNAWAY_REASONS if (x in listed) == keep)
            out.extend(AlertRule(name, f"runaway.{x}", sev, 1, for_s, False) for x in reasons)
        elif "llm_runaway_invocation_zscore" in expr:
            out.append(AlertRule(name, "runaway.invocation", sev, 1, for_s, False))
    return out


def rules_dir() -> Path:
    """prometheus/rules of the checkout the imported exporter package comes from."""
    import exporter
    return Path(exporter.__file__).resolve().parents[1] / "prometheus" / "rules"


def load_rules(directory: Path | None = None) -> dict[str, tuple[AlertRule, ...]]:
    """Signal -> its alert rules, one per severity label (a signal alerted in both
    directions has the same `for:` for both; the longer one is kept if they differ)."""
    d = directory or rules_dir()
    found: list[AlertRule] = []
    anomaly, detectors = d / "anomaly.yml", d / "detectors.yml"
    if anomaly.exists():
        found += anomaly_rules(anomaly)
    else:
        try:
            from exporter.anomaly.rules import FOR        # the generator's `for:` values
        except ImportError:
            raise RulesError(f"no {anomaly} and no exporter.anomaly.rules to take the anomaly alerts' for: from") from None
        try:
            from exporter.anomaly.signals import DEFAULT_SIGNALS
        except ImportError:
            from exporter.signals import DEFAULT_SIGNALS  # type: ignore[no-redef]
        for spec in DEFAULT_SIGNALS:
            for sev, dur in FOR.items():
                found.append(AlertRule(spec.name, spec.name, sev, LEVEL_OF_SEVERITY[sev], parse_duration(dur), True))
    if not detectors.exists():
        raise RulesError(f"{detectors} not found")
    found += detector_rules(detectors)
    by: dict[tuple[str, str], AlertRule] = {}
    for r in found:
        old = by.get((r.signal, r.severity))
        if old is None or r.for_s > old.for_s:
            by[(r.signal, r.severity)] = r
    out: dict[str, list[AlertRule]] = {}
    for (sig, _), r in sorted(by.items(), key=lambda kv: (_order(kv[0][0]), kv[1].level)):
        out.setdefault(sig, []).append(r)
    return {k: tuple(v) for k, v in out.items()}


def _order(signal: str) -> tuple[int, int, str]:
    """The evaluator's signals in their own order, then drift, then the runaway detectors."""
    try:
        from exporter.anomaly.signals import SIGNAL_NAMES
    except ImportError:
        from exporter.signals import SIGNAL_NAMES  # type: ignore[no-redef]
    if signal in SIGNAL_NAMES:
        return (0, SIGNAL_NAMES.index(signal), "")
    return (1, 0 if signal == "drift" else 1 if signal == "runaway.invocation" else 2, signal)


# --- firing -----------------------------------------------------------------------------

def run_start(cond: np.ndarray) -> np.ndarray:
    """(S, K): for each step where `cond` holds, the index of the first step of its run of
    consecutive True steps in that column; -1 where it does not hold."""
    s = cond.shape[0]
    idx = np.arange(s)[:, None]
    prev = np.vstack([np.zeros((1,) + cond.shape[1:], dtype=bool), cond[:-1]])
    marks = np.where(cond & ~prev, idx, -1)
    return np.where(cond, np.maximum.accumulate(marks, axis=0), -1)


def firing(times: np.ndarray, cond: np.ndarray, for_s: float) -> np.ndarray:
    """(S, K) bool: where an alert with this condition and `for:` is firing."""
    if cond.size == 0:
        return cond.copy()
    rs = run_start(cond)
    held = times[:, None] - times[np.maximum(rs, 0)]
    return cond & (held >= for_s - 1e-6)


def runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(column, first step, last step) of every run of True steps, by column then time."""
    out: list[tuple[int, int, int]] = []
    for k in np.flatnonzero(mask.any(axis=0)).tolist():
        edges = np.diff(np.r_[0, mask[:, k].astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
        out.extend((k, a, b) for a, b in zip(starts.tolist(), ends.tolist()))
    return out
