"""`llm-usage-exporter tune`: thresholds fitted to a team's own history.

The backtest replays the history through the live evaluator on event time. Every verdict
of every signal and scope carries the largest effect its evidence supported (a rise, a
fall, a shift held for hours: `evaluator.Effects`), so the history is graded once and then
re-graded at any ratio without running it again. For each signal, tune picks the smallest
warning ratio at which the history would have raised no more alerts than the signal's
share of the target (alerts as the shipped rules raise them: a verdict held for the
rules' `for:`), not below the ratio in effect unless asked (`--lower`), and writes
the result as a thresholds file: a `signals:` section that the exporter reads
(`thresholds_file`) and that `llm-usage-exporter rules` turns into the alert thresholds.

The history should be an ordinary stretch of traffic: an incident in it counts as a false
alert and pushes the proposed ratios up. Cut known incidents out of the file first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..anomaly.evaluator import Snapshot
from ..anomaly.rules import FOR
from ..anomaly.signals import SignalSpec, signal_specs
from ..config import Settings
from ..ingest.records import UsageRecord

CANDIDATES = (1.1, 1.2, 1.25, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0)
WEEK = 7 * 86400.0
EFFECTS = ("rise", "fall", "held_rise", "held_fall")


class Effects:
    """Effects of every (signal, scope) at every step of a backtest, as (steps, scopes) arrays."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.keys: list[tuple[str, str, str, str]] = []
        self._index: dict[tuple[str, str, str, str], int] = {}
        self._rows: dict[tuple[str, str], list[tuple[int, np.ndarray, np.ndarray]]] = {}

    def __call__(self, snap: Snapshot) -> None:
        step = len(self.times)
        self.times.append(snap.t)
        idx = np.array([self._key(k) for k in snap.keys], dtype=np.int64)
        for spec in snap.specs:
            v = snap.verdicts[spec.name]
            if v.effects is None:
                continue
            for name in EFFECTS:
                values = np.asarray(getattr(v.effects, name), dtype=np.float64)
                self._rows.setdefault((spec.name, name), []).append((step, idx, values))

    def _key(self, key: tuple[str, str, str, str]) -> int:
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.keys)
            self.keys.append(key)
        return i

    def array(self, signal: str, effect: str) -> np.ndarray:
        out = np.zeros((len(self.times), len(self.keys)))
        for step, idx, values in self._rows.get((signal, effect), []):
            out[step, idx] = values
        return out


def alerts(on: np.ndarray, times: np.ndarray, hold_s: float) -> int:
    """Episodes of `on` (steps, scopes) that last at least `hold_s` (an alert's `for:`),
    counted over all scopes. Each step stands for the time until the next one."""
    if not on.any():
        return 0
    step = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    need = max(1, int(math.ceil(hold_s / step)) + 1) if step > 0 else 1
    n = 0
    for col in np.flatnonzero(on.any(axis=0)).tolist():
        edges = np.diff(np.r_[0, on[:, col].astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        n += int(np.sum(ends - starts >= need))
    return n


def _seconds(duration: str) -> float:
    return float(duration.rstrip("m")) * 60.0


@dataclass
class Proposal:
    signal: str
    knob: str
    default: float
    proposed: float
    alerts_per_week_default: float
    alerts_per_week_proposed: float


def propose(effects: Effects, specs: tuple[SignalSpec, ...], target_per_week: float,
            lower: bool = False) -> list[Proposal]:
    """Per signal and knob, the smallest ratio that keeps alerts within its share (not below
    the one in effect unless `lower`)."""
    times = np.array(effects.times)
    weeks = max((times[-1] - times[0]) / WEEK, 1e-9) if len(times) > 1 else 1e-9
    knobs = []
    for spec in specs:
        if "up" in spec.directions:
            knobs.append((spec, "warning_ratio", "rise"))
        if "down" in spec.directions:
            knobs.append((spec, "drop_warning_ratio" if spec.direction == "both" else "warning_ratio", "fall"))
        if spec.sustained_ratio > 0:
            knobs.append((spec, "sustained_ratio", "held_rise" if spec.direction != "both" else "held"))
    share = target_per_week / max(len(knobs), 1)
    out = []
    hold = _seconds(FOR["warning"])
    for spec, knob, effect in knobs:
        if effect == "held":
            arr = np.fmax(effects.array(spec.name, "held_rise"), effects.array(spec.name, "held_fall"))
        else:
            arr = effects.array(spec.name, effect)
        default = float(getattr(spec, knob))
        rates = {r: alerts(arr >= r, times, hold) / weeks for r in (*CANDIDATES, default)}
        options = sorted({*CANDIDATES, default})
        if not lower:
            options = [r for r in options if r >= default]
        chosen = next((r for r in options if rates[r] <= share), options[-1])
        out.append(Proposal(spec.name, knob, default, chosen, rates[default], rates[chosen]))
    return out


def thresholds_yaml(proposals: list[Proposal], specs: tuple[SignalSpec, ...], meta: dict[str, Any]) -> str:
    """The thresholds file: a `signals:` section with every proposed ratio (high ratios kept
    at twice the warning ratio, or the default's, whichever is larger)."""
    by_spec: dict[str, dict[str, float]] = {}
    for p in proposals:
        by_spec.setdefault(p.signal, {})[p.knob] = p.proposed
    lines = ["# Anomaly thresholds fitted by `llm-usage-exporter tune` to a history of this deployment.",
             "# Read by the exporter (thresholds_file) and by `llm-usage-exporter rules`, which writes",
             "# prometheus/rules/thresholds.yml and anomaly.yml from them.",
             *(f"# {k}: {v}" for k, v in meta.items()),
             "signals:"]
    for spec in specs:
        knobs = by_spec.get(spec.name)
        if not knobs:
            continue
        if "warning_ratio" in knobs:
            knobs["high_ratio"] = max(spec.high_ratio, 2 * knobs["warning_ratio"])
        if "drop_warning_ratio" in knobs:
            knobs["drop_high_ratio"] = max(spec.drop_high_ratio, 2 * knobs["drop_warning_ratio"])
        body = ", ".join(f"{k}: {v:g}" for k, v in knobs.items())
        lines.append(f"  {spec.name}: {{{body}}}")
    return "\n".join(lines) + "\n"


def tune(settings: Settings, records: list[UsageRecord], step: float, target_per_week: float,
         lower: bool = False, progress: bool = False) -> tuple[list[Proposal], Effects]:
    from .replay import backtest

    effects = Effects()
    backtest(settings, records, None, None, step, progress=progress, on_snapshot=effects)
    return propose(effects, signal_specs(settings.signals), target_per_week, lower), effects
