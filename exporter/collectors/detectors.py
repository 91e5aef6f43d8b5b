"""The detectors' verdicts as gauges: drift per model, runaway sessions per app and reason,
invocation spikes, budgets, spend to date and forecasts."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..detectors import Detectors


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
                               "Robust z of an app's last-5-minute call count against its own recent 5-minute counts, "
                               "on the square-root scale of the counts "
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
