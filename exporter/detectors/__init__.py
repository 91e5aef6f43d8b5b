"""The per-record detectors beside the hourly baselines: drift, runaway loops, budgets.

They see every accepted batch after it is committed, are judged at the evaluator's event
time, and are rebuilt after a restart from what the store keeps (raw records for the
recent windows, daily cost for budgets). This module builds them from configuration and
publishes their verdicts as gauges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .budget import BudgetReport, BudgetSettings, BudgetTracker
from ..config import ConfigError
from .drift import DriftDetector, DriftResult, DriftSettings
from ..ingest.records import RecordColumns
from .runaway import RunawayDetector, RunawayReport, RunawaySettings

RUNAWAY_REASONS = ("chain_length", "token_burst", "session_cost", "tool_repetition")


def _build(kind: type, section: str, values: dict[str, Any]) -> Any:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown setting(s) {unknown}; known: {sorted(known)}")
    try:
        return kind(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from None


@dataclass(slots=True)
class DetectorReports:
    drift: list[DriftResult]
    runaway: RunawayReport
    budget: BudgetReport


class Detectors:
    """Holds the three detectors of one engine."""

    def __init__(self, drift: dict[str, Any], runaway: dict[str, Any], budgets: dict[str, Any]) -> None:
        self.drift = DriftDetector(_build(DriftSettings, "drift", drift))
        self.runaway = RunawayDetector(_build(RunawaySettings, "runaway", runaway))
        self.budget = BudgetTracker(_build(BudgetSettings, "budgets", budgets))
        self.latest: DetectorReports | None = None

    def observe(self, cols: RecordColumns, budget: bool = True,
                daily: list[tuple[str, int, float]] | None = None) -> None:
        """`daily`: the batch's (app, local day, cost) rows when the caller has them already."""
        self.drift.observe(cols)
        self.runaway.observe(cols)
        if budget:
            if daily is None:
                self.budget.observe(cols)
            else:
                self.budget.add_daily(daily)

    def evaluate(self, now: float) -> DetectorReports:
        self.latest = DetectorReports(self.drift.evaluate(now), self.runaway.evaluate(now), self.budget.evaluate(now))
        return self.latest

    def restore_budget(self, rows: list[tuple[str, int, float]]) -> None:
        """Daily cost rows (app, local day, cost) from the store; the overall series is their sum."""
        if not rows:
            return
        apps = np.array([r[0] for r in rows], dtype=object)
        days = np.array([r[1] for r in rows], dtype=np.int64)
        cost = np.array([r[2] for r in rows], dtype=np.float64)
        for app in np.unique(apps.astype(str)).tolist():
            sel = apps == app
            self.budget.load_daily(app, days[sel], cost[sel])
        d_u, d_i = np.unique(days, return_inverse=True)
        self.budget.load_daily(None, d_u, np.bincount(d_i, weights=cost))


def _v(x: float | None) -> float:
    return math.nan if x is None else float(x)


class DetectorCollector(Collector):
    """Gauges from the latest detector reports (nothing before the first evaluation)."""

    def __init__(self, detectors: Detectors) -> None:
        self.d = detectors

    def collect(self) -> Iterator[Metric]:
        rep = self.d.latest
        if rep is None:
            return
        dv = GaugeMetricFamily("llm_drift_value", "Drift signal over the recent responses of a model.",
                               labels=["provider", "model", "signal"])
        ds = GaugeMetricFamily("llm_drift_severity", "Drift verdict per model: 0 none, 1 mild, 2 severe.",
                               labels=["provider", "model"])
        for r in rep.drift:
            for sig, val in r.values.items():
                dv.add_metric([r.provider, r.model, sig], val)
            ds.add_metric([r.provider, r.model], r.severity)
        yield dv
        yield ds
        rs = GaugeMetricFamily("llm_runaway_sessions", "Sessions currently flagged as runaway, by reason.",
                               labels=["app", "reason"])
        for (app, reason), n in sorted(rep.runaway.sessions_by_app_reason.items()):
            rs.add_metric([app, reason], n)
        yield rs
        iz = GaugeMetricFamily("llm_runaway_invocation_zscore",
                               "Robust z of an app's last-5-minute call count against its own recent 5-minute counts "
                               "(NaN below the minimum call count, where z is noise).", labels=["app"])
        min_count = self.d.runaway.settings.spike_min_count
        for app, z in sorted(rep.runaway.invocation_zscore.items()):
            enough = rep.runaway.invocation_count.get(app, 0) >= min_count
            iz.add_metric([app], z if enough else math.nan)
        yield iz
        yield CounterMetricFamily("llm_exporter_sessions_overflow",
                                  "Sessions not tracked by the runaway detector because max_sessions was reached.",
                                  value=rep.runaway.overflow_total)
        bud = GaugeMetricFamily("llm_budget_usd", "Configured spend budget per period.")
        ptd = GaugeMetricFamily("llm_cost_usd_period_to_date", "Spend since the start of the current period (budget time zone).")
        fc = GaugeMetricFamily("llm_cost_usd_forecast", "Forecast spend: month_end is the month's expected total; 30d/60d/90d the next days' total.")
        lo = GaugeMetricFamily("llm_cost_usd_forecast_lower", "Lower bound (5 %) of the spend forecast.")
        hi = GaugeMetricFamily("llm_cost_usd_forecast_upper", "Upper bound (95 %) of the spend forecast.")
        for row in rep.budget.rows:
            base = {} if row.app is None else {"app": row.app}
            for period, value in row.budget_usd.items():
                if value is not None:
                    bud.add_sample("llm_budget_usd", {**base, "period": period}, value)
            for period, value in row.period_to_date.items():
                ptd.add_sample("llm_cost_usd_period_to_date", {**base, "period": period}, value)
            for horizon, f in row.forecast.items():
                labels = {**base, "horizon": horizon}
                fc.add_sample("llm_cost_usd_forecast", labels, _v(f.value))
                lo.add_sample("llm_cost_usd_forecast_lower", labels, _v(f.lower))
                hi.add_sample("llm_cost_usd_forecast_upper", labels, _v(f.upper))
        yield from (bud, ptd, fc, lo, hi)
