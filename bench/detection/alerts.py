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

An anomaly warning that its critical twin holds (the rule reads the twin's `ALERTS`) is
held as the rule says, for the range its expression names: in the shipped rules, while
the twin fires and for 9 hours after, unless the warning fired first, in which case it
fires on while its condition holds; in older rules, only for the hour after the twin
resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

RUNAWAY_REASONS = ("chain_length", "token_burst", "session_cost", "tool_repetition")
HOLD_UNLESS_FIRST = "unless_first"   # held while the twin fires and after, unless the warning fired first
HOLD_AFTER = "after"                 # held only after the twin resolved (it fires beneath the page)
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
    hold_s: float = 0.0  # a warning held by its critical twin: for this long after the twin fired ...
    hold: str = ""       # ... HOLD_UNLESS_FIRST (also while the twin fires) or HOLD_AFTER (only once it resolved)
    keep_s: float = 0.0  # its `keep_firing_for:`
    hold_cond: bool = False   # held too while the twin's own condition holds (pending or firing), unless it fired first

    @property
    def pages(self) -> bool:
        return self.severity == PAGING

    def to_dict(self) -> dict[str, Any]:
        return {"alert": self.alert, "severity": self.severity, "level": self.level, "for_s": self.for_s,
                "explainable": self.explainable, "hold_s": self.hold_s, "hold": self.hold, "keep_s": self.keep_s,
                "hold_cond": self.hold_cond}


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
        hold_s, hold, hold_cond = _hold(expr) if sev != PAGING else (0.0, "", False)
        out.append(AlertRule(str(r["alert"]), m.group(1), sev, level, parse_duration(r.get("for", "0s")),
                             explainable="llm_anomaly_explained" in expr, hold_s=hold_s, hold=hold,
                             keep_s=parse_duration(r.get("keep_firing_for", "0s")), hold_cond=hold_cond))
    return out


def _hold(expr: str) -> tuple[float, str, bool]:
    """How a warning's expression lets its critical twin hold it: `max_over_time` of the
    twin's firing ALERTS over a range, excepted where the warning's own firing ALERTS are
    (HOLD_UNLESS_FIRST) or where the twin still fires (HOLD_AFTER), and whether the twin's
    own condition (`... or <the verdict at the critical level>`) holds it too; (0, "",
    False) for none."""
    m = re.search(r'max_over_time\(ALERTS\{[^}]*severity="critical"[^}]*\}\[(\w+)\]\)', expr)
    if not m:
        return 0.0, "", False
    mode = HOLD_UNLESS_FIRST if 'severity="warning"' in expr[m.end():] else HOLD_AFTER
    cond = re.match(r"\s*or\s+max without \(replica\) \(\s*llm_(anomaly_ratio|drift_severity)", expr[m.end():]) is not None
    return parse_duration(m.group(1)), mode, cond


def detector_rules(path: Path) -> list[AlertRule]:
    """Drift (`llm_drift_severity >= N`), runaway sessions (per reason, by the rule's
    `reason` matcher) and the invocation spike."""
    out = []
    for r in _rules(path):
        expr = str(r.get("expr", ""))
        sev = str((r.get("labels") or {}).get("severity", "warning"))
        for_s = parse_duration(r.get("for", "0s"))
        keep_s = parse_duration(r.get("keep_firing_for", "0s"))
        name = str(r["alert"])
        if "llm_drift_severity" in expr:
            # `llm_drift_severity >= N`, or `max without (replica) (llm_drift_severity) >= N`
            # (the first; a warning's hold names its page's condition after it)
            lv = re.search(r"llm_drift_severity(?:\{[^}]*\})?\)?\s*>=\s*(\d+)", expr)
            hold_s, hold, hold_cond = _hold(expr) if sev != PAGING else (0.0, "", False)
            out.append(AlertRule(name, "drift", sev, int(lv.group(1)) if lv else 1, for_s, False, hold_s=hold_s,
                                 hold=hold, keep_s=keep_s, hold_cond=hold_cond))
        elif "llm_runaway_sessions" in expr:
            m = re.search(r'reason\s*(=~|!~|=|!=)\s*"([^"]*)"', expr)
            reasons: tuple[str, ...] = RUNAWAY_REASONS
            if m:
                listed = set(m.group(2).split("|"))
                keep = m.group(1) in ("=~", "=")
                reasons = tuple(x for x in RUNAWAY_REASONS if (x in listed) == keep)
            out.extend(AlertRule(name, f"runaway.{x}", sev, 1, for_s, False, keep_s=keep_s) for x in reasons)
        elif "llm_runaway_invocation_zscore" in expr:
            out.append(AlertRule(name, "runaway.invocation", sev, 1, for_s, False, keep_s=keep_s))
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


def firing(times: np.ndarray, cond: np.ndarray, for_s: float, keep_s: float = 0.0) -> np.ndarray:
    """(S, K) bool: where an alert with this condition, `for:` and `keep_firing_for:` is
    firing. As Prometheus keeps it: a firing alert whose condition stops holding fires on
    while less than `keep_s` has passed since the first step without it, and, where the
    condition comes back meanwhile, fires on through it with no new `for:`; a pending
    alert is dropped at once."""
    if cond.size == 0:
        return cond.copy()
    rs = run_start(cond)
    held = times[:, None] - times[np.maximum(rs, 0)]
    return kept_firing(times, cond, cond & (held >= for_s - 1e-6), keep_s)


def kept_firing(times: np.ndarray, cond: np.ndarray, fired: np.ndarray, keep_s: float) -> np.ndarray:
    """`fired` (where the rule's expression fires an alert, each run of it ending with its
    run of `cond`) with `keep_firing_for: keep_s` applied (see `firing`)."""
    if keep_s <= 0.0 or not fired.any():
        return fired
    out = fired.copy()
    n = cond.shape[0]
    for k in np.flatnonzero(fired.any(axis=0)).tolist():
        spans = runs(cond[:, k:k + 1])
        active = False                      # firing as the run begins (kept through the gap before it)
        for i, (_, a, b) in enumerate(spans):
            if active:
                out[a:b + 1, k] = True
            elif not fired[a:b + 1, k].any():
                continue
            gap = b + 1                     # the first step without the condition
            end = spans[i + 1][1] if i + 1 < len(spans) else n
            kept = gap + int(np.searchsorted(times[gap:end], times[gap] + keep_s - 1e-6)) if gap < n else gap
            out[gap:kept, k] = True
            active = gap < n and kept >= end and end < n
    return out


def fired_within(times: np.ndarray, fired: np.ndarray, span_s: float) -> np.ndarray:
    """(S, K) bool: where `fired` held at some step of the last `span_s` seconds, this step
    included (`max_over_time(...[span])` at each step)."""
    c = np.vstack([np.zeros((1,) + fired.shape[1:], np.int64), np.cumsum(fired, axis=0)])
    lo = np.searchsorted(times, times - span_s, side="right")
    return (c[1:] - c[lo]) > 0


def held_firing(times: np.ndarray, cond: np.ndarray, for_s: float, page: np.ndarray, hold_s: float,
                hold: str, keep_s: float = 0.0, page_cond: np.ndarray | None = None) -> np.ndarray:
    """(S, K) bool: where a warning fires that its critical twin (firing where `page`)
    holds as `hold` says. A warning not yet firing is held; under HOLD_UNLESS_FIRST one
    already firing fires on while `cond` holds, the twin's page or not. `page_cond`: where
    the twin's own condition holds, which holds a warning not yet firing too (its pending
    time starts over, as the page's begins)."""
    recent = fired_within(times, page, hold_s)
    if hold == HOLD_AFTER:
        return firing(times, cond & ~(recent & ~page), for_s, keep_s)
    if page_cond is not None:
        recent = recent | page_cond
    first = firing(times, cond & ~recent, for_s)
    idx = np.arange(cond.shape[0])[:, None]
    last_fired = np.maximum.accumulate(np.where(first, idx, -1), axis=0)
    # a firing warning is not held (its own ALERTS series excepts it), so what keeps it
    # firing through a gap also keeps it firing as the condition returns
    return kept_firing(times, cond, cond & (last_fired >= run_start(cond)), keep_s)


def runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(column, first step, last step) of every run of True steps, by column then time."""
    out: list[tuple[int, int, int]] = []
    for k in np.flatnonzero(mask.any(axis=0)).tolist():
        edges = np.diff(np.r_[0, mask[:, k].astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
        out.extend((k, a, b) for a, b in zip(starts.tolist(), ends.tolist()))
    return out
