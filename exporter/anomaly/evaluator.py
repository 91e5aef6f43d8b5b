"""The anomaly evaluator: every signal of every scope judged at one event time.

`evaluate(t)` reads the scope history, turns it into (current, hourly history) per signal,
and hands those arrays to `baseline.judge`. The result is an immutable `Snapshot`; the
`/metrics` collector and the HTTP API read the latest one, so a scrape never waits on an
evaluation, and the backtest calls the same `evaluate(t)` at historical times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .baseline import Stats, Verdict, baseline_stats, judge
from ..storage.buckets import F
from .history import ScopeHistory, ScopeKey, WindowValues, token_sum
from .signals import Severity, SignalSpec

SEVERITY_NAMES = {int(s): s.name.lower() for s in Severity}
# An hour's error ratio enters the baseline from this many requests. It is lower than the
# window's `min_requests` on purpose: the baseline is a median over many hours, so single
# hours may be noisier than the one a verdict rests on.
BASELINE_HOUR_MIN_REQUESTS = 20


@dataclass(slots=True)
class Snapshot:
    """The evaluator's output at event time `t`."""

    t: float
    keys: list[ScopeKey]
    specs: tuple[SignalSpec, ...]
    verdicts: dict[str, Verdict]
    active: np.ndarray                       # scopes with requests in the window or the baseline hours
    window_requests: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> Iterator[dict[str, Any]]:
        """One dict per (signal, scope), for the API and the backtest."""
        for spec in self.specs:
            v = self.verdicts[spec.name]
            for i in np.nonzero(self.active)[0]:
                scope, app, provider, model = self.keys[i]
                yield {
                    "signal": spec.name, "scope": scope, "app": app or None, "provider": provider or None,
                    "model": model or None, "unit": spec.unit, "direction": spec.direction,
                    "current": _num(v.current[i]), "baseline": _num(v.baseline[i]), "ratio": _num(v.ratio[i]),
                    "zscore": _num(v.zscore[i]), "change_zscore": _num(v.change_zscore[i]),
                    "band_lower": _num(v.band_lower[i]), "band_upper": _num(v.band_upper[i]),
                    "threshold": {"warning": spec.warning_ratio, "high": spec.high_ratio},
                    "baseline_hours": int(v.baseline_hours[i]),
                    "requests_in_window": int(self.window_requests[i]),
                    "severity": SEVERITY_NAMES[int(v.severity[i])],
                }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 6)


def signal_inputs(spec: SignalSpec, win: WindowValues, adds: np.ndarray, q: np.ndarray, before: np.ndarray,
                  window_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(current, hourly history, samples in window) for one signal, in the signal's unit."""
    w_req = win.adds[:, F["requests"]]
    h_req = adds[..., F["requests"]]
    name = spec.name
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "cost_per_hour":
            cur, hist, n = win.adds[:, F["cost"]] * 3600 / window_s, adds[..., F["cost"]], w_req
        elif name == "token_velocity":
            cur, hist, n = token_sum(win.adds) * 60 / window_s, token_sum(adds) / 60, w_req
        elif name == "request_rate":
            cur, hist, n = w_req * 60 / window_s, h_req / 60, w_req
        elif name == "error_rate":
            cur = np.where(w_req > 0, win.adds[:, F["errors"]] / w_req, np.nan)
            hist = np.where(h_req >= BASELINE_HOUR_MIN_REQUESTS, adds[..., F["errors"]] / h_req, np.nan)
            n = w_req
        elif name == "latency_p95":
            cur, hist, n = win.quantiles["latency"], q[..., 0], win.counts["latency"]
        elif name == "ttft_p95":
            cur, hist, n = win.quantiles["ttft"], q[..., 1], win.counts["ttft"]
        elif name == "output_tokens_per_second":
            cur, hist, n = win.quantiles["otps"], q[..., 2], win.counts["otps"]
        else:
            raise KeyError(f"no inputs defined for signal {name!r}")
    if before.any():
        hist = np.where(before, np.nan, hist)
    return cur.astype(np.float64), hist.astype(np.float64, copy=False), n


def current_value(spec: SignalSpec, win: WindowValues, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(current value, samples in window) of one signal, without its history."""
    empty = np.zeros((win.adds.shape[0], 0, win.adds.shape[1]))
    cur, _, n = signal_inputs(spec, win, empty, np.zeros(empty.shape[:2] + (3,)), np.zeros(empty.shape[:2], bool), window_s)
    return cur, n


class Evaluator:
    """Judges all signals over all scopes at a given event time."""

    def __init__(self, history: ScopeHistory, specs: tuple[SignalSpec, ...], baseline: float, seasonal: bool) -> None:
        self.history = history
        self.specs = specs
        self.baseline = baseline
        self.seasonal = seasonal
        self._stats: dict[str, Stats] = {}
        self._stats_key: tuple[int, int] | None = None

    def evaluate(self, t: float) -> Snapshot:
        h = self.history
        win = h.window_values(t)
        # Flat baselines depend only on the hours before the window: their statistics are
        # reused until the hour turns, a scope appears or one of those hours changes (late
        # data). Seasonal ones blend two hours by the window's position, so they are
        # recomputed each time (over a week's worth of points, which is cheap).
        end = math.floor((t - h.window) / 3600)
        h.refresh_open_hours(before_hour=end)
        flat = [spec for spec in self.specs if not (self.seasonal or spec.seasonal)]
        daily = [spec for spec in self.specs if self.seasonal or spec.seasonal]
        key = (end, h.size)
        if flat and (key != self._stats_key or h.changed_from_hour < end):
            adds, q, before, _ = h.hourly(t, self.baseline, False)
            for spec in flat:
                _, hist, _ = signal_inputs(spec, win, adds, q, before, h.window)
                self._stats[spec.name] = baseline_stats(spec, hist)
            self._stats_key = key
        if daily:
            adds, q, before, _ = h.hourly(t, self.baseline, True)
            for spec in daily:
                _, hist, _ = signal_inputs(spec, win, adds, q, before, h.window)
                self._stats[spec.name] = baseline_stats(spec, hist)
        h.changed_from_hour = np.iinfo(np.int64).max
        span = h.span(t, self.baseline)
        verdicts = {}
        for spec in self.specs:
            cur, n = current_value(spec, win, h.window)
            verdicts[spec.name] = judge(spec, cur, None, span, n, stats=self._stats[spec.name])
        w_req = win.adds[:, F["requests"]]
        active = (w_req > 0) | (h.baseline_requests(t, self.baseline) > 0)
        return Snapshot(t, list(h.keys[: h.size]), self.specs, verdicts, active, w_req)


GAUGES: tuple[tuple[str, str, str], ...] = (
    ("llm_anomaly_current", "current", "Current value of the signal over the evaluation window, in the signal's unit."),
    ("llm_anomaly_baseline", "baseline", "Rolling hourly baseline (median) of the signal, excluding the window under test."),
    ("llm_anomaly_ratio", "ratio", "Current value / baseline (NaN when the window has too few requests for a verdict)."),
    ("llm_anomaly_zscore", "zscore", "Robust z-score of the current value against the baseline (median/MAD)."),
    ("llm_anomaly_severity", "severity", "Exporter verdict: 0 ok, 1 warning, 2 high."),
    ("llm_anomaly_baseline_span_seconds", "baseline_span_seconds", "How much history the baseline rests on; verdicts wait for min_baseline_hours."),
    ("llm_anomaly_band_lower", "band_lower", "Lower IQR fence (Q1 - 1.5 IQR) of the baseline, in the signal's unit."),
    ("llm_anomaly_band_upper", "band_upper", "Upper IQR fence (Q3 + 1.5 IQR) of the baseline, in the signal's unit."),
)


def scope_labels(key: ScopeKey) -> dict[str, str]:
    scope, app, provider, model = key
    if scope == "app":
        return {"scope": scope, "app": app}
    if scope == "model":
        return {"scope": scope, "provider": provider, "model": model}
    return {"scope": scope}


class AnomalyCollector(Collector):
    """Yields the anomaly gauges from the latest snapshot (nothing before the first one)."""

    def __init__(self, source: Any) -> None:
        self._source = source   # anything with a `.snapshot` attribute

    def collect(self) -> Iterator[Metric]:
        snap: Snapshot | None = self._source.snapshot
        if snap is None:
            return
        idx = np.nonzero(snap.active)[0]
        labels = [scope_labels(snap.keys[i]) for i in idx]
        for name, attr, doc in GAUGES:
            fam = GaugeMetricFamily(name, doc)
            for spec in snap.specs:
                v = snap.verdicts[spec.name]
                arr = v.baseline_hours * 3600.0 if attr == "baseline_span_seconds" else getattr(v, attr)
                values = arr[idx].tolist()
                for lab, v in zip(labels, values):
                    fam.add_sample(name, {"signal": spec.name, **lab}, v)
            yield fam
