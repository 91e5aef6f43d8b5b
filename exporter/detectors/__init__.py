"""The per-record detectors beside the hourly baselines: drift, runaway loops, budgets.

They see every accepted batch after it is committed, are judged at the evaluator's event
time, and are rebuilt after a restart from what the store keeps (raw records for the
recent windows, daily cost for budgets). This module builds them from their settings
(validated with the rest of the configuration) and runs each one isolated: a failing detector is counted under its component name, keeps its
last verdict, and neither stops the others nor fails an ingest already committed.
`collectors.detectors` publishes the verdicts as gauges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..components import Components
from ..ingest.records import RecordColumns
from .budget import BudgetReport, BudgetSettings, BudgetTracker
from .drift import DriftDetector, DriftResult, DriftSettings
from .runaway import RunawayDetector, RunawayReport, RunawaySettings


@dataclass(slots=True)
class DetectorReports:
    drift: list[DriftResult]
    runaway: RunawayReport
    budget: BudgetReport


class Detectors:
    """Holds the three detectors of one engine."""

    def __init__(self, drift: DriftSettings, runaway: RunawaySettings, budgets: BudgetSettings,
                 components: Components | None = None, page_share: float = 1.0) -> None:
        self.drift = DriftDetector(drift, page_share)
        self.runaway = RunawayDetector(runaway)
        self.budget = BudgetTracker(budgets)
        self.components = components or Components()
        self.latest: DetectorReports | None = None

    def observe(self, cols: RecordColumns, budget: bool = True,
                daily: list[tuple[str, int, float]] | None = None) -> None:
        """`daily`: the batch's (app, local day, cost) rows when the caller has them already."""
        attempt = self.components.attempt
        attempt("drift", lambda: self.drift.observe(cols), None)
        attempt("runaway", lambda: self.runaway.observe(cols), None)
        if budget:
            if daily is None:
                attempt("budget", lambda: self.budget.observe(cols), None)
            else:
                attempt("budget", lambda: self.budget.add_daily(daily), None)

    def evaluate(self, now: float, errors_apart: frozenset[tuple[str, str, str]] = frozenset()) -> DetectorReports:
        """Every detector's verdict at `now`; one that fails keeps its previous verdict.
        `errors_apart`: see `DriftDetector.evaluate`."""
        prev = self.latest
        attempt = self.components.attempt
        self.latest = DetectorReports(
            attempt("drift", lambda: self.drift.evaluate(now, errors_apart), prev.drift if prev else []),
            attempt("runaway", lambda: self.runaway.evaluate(now), prev.runaway if prev else RunawayReport.empty()),
            attempt("budget", lambda: self.budget.evaluate(now),
                    prev.budget if prev else BudgetReport.empty(self.budget.settings.timezone, now)))
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
