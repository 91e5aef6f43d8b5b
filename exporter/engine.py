"""The engine: one object that owns the state and runs a batch from records to metrics.

Ingest order matters for the promises we make. A batch is validated and deduplicated,
folded into the counters, and written to SQLite in one transaction; only after the commit
does it reach the in-memory history and detectors, and only then is it acknowledged. If
the write fails, the counters are put back as they were and the caller gets an error, so
a retry cannot double-count.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .buckets import Groups, aggregate
from .config import Settings
from .detectors import DetectorCollector, Detectors
from .budget import local_day_index
from .evaluator import AnomalyCollector, Evaluator, Snapshot
from .history import ScopeHistory
from .instruments import UsageMetrics
from .labels import LabelGuard
from .prices import PriceTable
from .records import Rejected, UsageRecord, parse_items, to_columns
from .records import RecordColumns
from .signals import signal_specs
from .store import BatchWrite, Store, StoreError

log = logging.getLogger("llm_usage_exporter")
Clock = Callable[[], float]
RESULTS = ("accepted", "duplicate", "rejected")


@dataclass(slots=True)
class IngestResult:
    accepted: int = 0
    duplicate: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    duplicate_indices: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicate": self.duplicate, "rejected": len(self.rejected),
                "errors": [r.to_dict() for r in self.rejected]}


class Engine:
    """Owns the store, instruments, history and evaluator of one exporter process."""

    def __init__(self, settings: Settings, clock: Clock = time.time, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.store = Store(settings.db)
        self.prices = PriceTable(settings.prices)
        self.specs = signal_specs(settings.signals)
        saved = self.store.label_values()
        self.guards = {
            "app": LabelGuard("app", settings.label_limit_app, saved.get("app", ())),
            "provider": LabelGuard("provider", settings.label_limit_provider, saved.get("provider", ())),
            "model": LabelGuard("model", settings.label_limit_model, saved.get("model", ())),
        }
        self.usage = UsageMetrics()
        self.history = ScopeHistory(settings.window, settings.horizon)
        self.evaluator = Evaluator(self.history, self.specs, settings.baseline, settings.seasonal)
        self.detectors = Detectors(settings.drift, settings.runaway, settings.budgets)
        self.snapshot: Snapshot | None = None
        self.lock = threading.RLock()
        self.counters_lock = threading.Lock()   # held briefly: counter updates and scrapes
        self.results_total = dict.fromkeys(RESULTS, 0.0)
        self.overflow_total = dict.fromkeys(self.guards, 0.0)
        self.last_record_wallclock = 0.0
        self.newest_event_ts = 0.0
        self.evaluation_errors_total = 0.0
        self.last_evaluation = 0.0
        self._restore()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.evaluation_duration = Histogram(
            "llm_exporter_evaluation_duration_seconds", "Time one evaluation of all signals takes.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=self.registry)
        self.registry.register(self.usage)
        self.registry.register(AnomalyCollector(self))
        self.registry.register(DetectorCollector(self.detectors))
        self.registry.register(_SelfCollector(self))

    # --- start-up ---------------------------------------------------------------------

    def _restore(self) -> None:
        """Counters from their totals, the history from the buckets, our own counters from meta."""
        keys = self.store.series()
        for sid, blob in self.store.totals().items():
            self.usage.load(sid, keys[sid], blob)
        saved = self.store.get_meta("exporter_totals")
        if saved:
            d = orjson.loads(saved)
            self.results_total.update(d.get("results", {}))
            self.overflow_total.update(d.get("overflow", {}))
        newest = float(self.store.get_meta("newest_event_ts") or 0.0)
        self.newest_event_ts = newest
        self.detectors.restore_budget(self.store.daily_costs())
        if not keys:
            return
        self._restore_detectors(newest)
        now = max(self.clock(), newest)
        hourly = list(self.store.buckets(3600, now - self.settings.horizon, now + 3600))
        if hourly:
            self.history.add_hours(_groups(hourly), keys)
        # The window needs slots finer than hours: the minute buckets of the last window.
        recent = list(self.store.buckets(60, newest - self.settings.window - 60, newest + 60))
        if recent:
            self.history.add(_groups(recent), keys, hourly=False)

    def _restore_detectors(self, newest: float) -> None:
        """Drift and runaway windows from the raw records of the last day (budget excluded:
        it was restored from daily cost)."""
        recent: list[UsageRecord] = []
        for d in self.store.records(newest - 86400, newest + 1):
            d["tool_names"] = tuple(d.get("tool_names") or ())
            recent.append(UsageRecord(**d))
            if len(recent) >= 5000:
                self._observe_restored(recent)
                recent = []
        self._observe_restored(recent)

    def _observe_restored(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        cols = to_columns(records)
        self._guard(cols)
        self.detectors.observe(cols, budget=False)

    def _guard(self, cols: RecordColumns) -> np.ndarray:
        """Apply the label guards in place; returns the raw model names (for prices)."""
        raw_model = cols.model
        cols.app = self.guards["app"].guard(cols.app)
        cols.provider = self.guards["provider"].guard(cols.provider)
        cols.model = self.guards["model"].guard(cols.model)
        return raw_model

    # --- ingest -----------------------------------------------------------------------

    def ingest(self, items: Sequence[Any], now: float | None = None, meta: dict[str, str] | None = None) -> IngestResult:
        """Validate, dedupe, count and persist a batch of decoded items."""
        now = self.clock() if now is None else now
        records, rejected, indices = parse_items(items, now)
        return self.ingest_records(records, indices, rejected, now, meta)

    def ingest_records(self, records: list[UsageRecord], indices: list[int] | None = None,
                       rejected: list[Rejected] | None = None, now: float | None = None,
                       meta: dict[str, str] | None = None) -> IngestResult:
        """Dedupe, count and persist already-validated records (replay, backtest, tail).

        `meta` is written in the same transaction (a tail follower's file offset), so a crash
        can never store records without their offset or the other way round."""
        now = self.clock() if now is None else now
        indices = list(range(len(records))) if indices is None else indices
        rejected = rejected or []
        with self.lock:
            result = IngestResult(rejected=rejected)
            fresh, dup_idx, ids = self._dedupe(records, indices)
            result.duplicate_indices = dup_idx
            result.duplicate = len(dup_idx)
            pending = {"accepted": len(fresh), "duplicate": len(dup_idx), "rejected": len(rejected)}
            if fresh:
                self._apply(fresh, ids, now, pending, meta or {})
            else:
                self.store.write(BatchWrite(meta={**(meta or {}), "exporter_totals": self._totals_json(pending)}))
            for k, v in pending.items():
                self.results_total[k] += v
            result.accepted = len(fresh)
        return result

    def _dedupe(self, records: list[UsageRecord], indices: list[int]) -> tuple[list[UsageRecord], list[int], list[str]]:
        ids = [r.request_id for r in records if r.request_id]
        seen = self.store.seen(ids) if ids else set()
        fresh: list[UsageRecord] = []
        dup: list[int] = []
        batch_ids: set[str] = set()
        for r, i in zip(records, indices):
            rid = r.request_id
            if rid is not None and (rid in seen or rid in batch_ids):
                dup.append(i)
                continue
            if rid is not None:
                batch_ids.add(rid)
            fresh.append(r)
        return fresh, dup, list(batch_ids)

    def _apply(self, records: list[UsageRecord], ids: list[str], now: float, pending: dict[str, int],
               meta: dict[str, str]) -> None:
        cols = to_columns(records)
        overflow_before = {k: g.overflow_total for k, g in self.guards.items()}
        raw_model = self._guard(cols)
        cost = self.prices.costs(cols, raw_model)
        cols.cost = cost

        triples = np.char.add(np.char.add(cols.app.astype(str), "\x1f"), np.char.add(np.char.add(cols.provider.astype(str), "\x1f"), cols.model.astype(str)))
        uniq, inverse = np.unique(triples, return_inverse=True)
        keys = [tuple(u.split("\x1f")) for u in uniq.tolist()]
        sids = self.store.series_ids(keys)  # type: ignore[arg-type]
        with self.counters_lock:
            rows = self.usage.rows(sids, keys)  # type: ignore[arg-type]
        series = np.asarray(sids, dtype=np.int64)[inverse]
        touched = np.unique(rows)
        before = {int(r): self.usage.dump(int(r)) for r in touched}
        with self.counters_lock:
            self.usage.add(rows[inverse], cols, cost)

        groups = aggregate(cols, series, cost, res=self.history.fine)
        newest = max(self.newest_event_ts, float(cols.ts.max()))
        new_labels = [(name, v) for name, g in self.guards.items() for v in g.take_new()]
        for name, g in self.guards.items():
            self.overflow_total[name] += g.overflow_total - overflow_before[name]
        write = BatchWrite(
            request_ids=[(rid, now) for rid in ids],
            groups=groups if self.history.fine == 60 else groups.coarsen(60),
            totals={self.usage.sids[int(r)]: self.usage.dump(int(r)) for r in touched},
            records=self._raw(records, cost) if self.settings.record_retention > 0 else [],
            labels=new_labels,
            daily_cost=_daily_cost(cols.app, local_day_index(cols.ts, self.detectors.budget.tz), cost),
            meta={**meta, "newest_event_ts": repr(newest), "exporter_totals": self._totals_json(pending)},
        )
        try:
            self.store.write(write)
        except StoreError:
            with self.counters_lock:
                for r, blob in before.items():
                    self.usage.load(self.usage.sids[r], self.usage.keys[r], blob)
            for name, v in new_labels:   # persist them with the next batch that succeeds
                self.guards[name].newly_admitted.append(v)
            for name, g in self.guards.items():   # not counted, so its overflow is not either
                self.overflow_total[name] -= g.overflow_total - overflow_before[name]
            raise
        self.newest_event_ts = newest
        self.last_record_wallclock = time.time()
        self.history.add(groups, self.store.series())
        self.detectors.observe(cols)

    def _raw(self, records: list[UsageRecord], cost: np.ndarray) -> list[tuple[float, bytes]]:
        out = []
        for r, c in zip(records, cost.tolist()):
            d = r.to_dict()
            d["cost_usd"] = None if c != c else c
            out.append((r.ts, orjson.dumps(d)))
        return out

    def _totals_json(self, pending: dict[str, int]) -> str:
        results = {k: v + pending.get(k, 0) for k, v in self.results_total.items()}
        return orjson.dumps({"results": results, "overflow": self.overflow_total}).decode()

    # --- evaluation -------------------------------------------------------------------

    def evaluate(self, t: float | None = None) -> Snapshot | None:
        """Judge every signal at event time t (default: the clock). Errors are counted, not raised."""
        t = self.clock() if t is None else t
        start = time.perf_counter()
        try:
            with self.lock:
                snap = self.evaluator.evaluate(t)
                snap.extra["detectors"] = self.detectors.evaluate(t)
        except Exception:  # one failing part must not break the scrape: count it and keep the last snapshot
            log.exception("evaluation at %s failed", t)
            self.evaluation_errors_total += 1
            return self.snapshot
        self.evaluation_duration.observe(time.perf_counter() - start)
        self.snapshot = snap
        self.last_evaluation = time.time()
        return snap

    def prune(self) -> None:
        s = self.settings
        now = max(self.clock(), self.newest_event_ts)
        self.store.prune(now, s.minute_retention, s.horizon, s.dedupe_window, s.record_retention)

    def close(self) -> None:
        self.store.close()


def _groups(rows: list[tuple[int, int, np.ndarray, dict[str, np.ndarray]]]) -> Groups:
    start = np.array([r[0] for r in rows], dtype=np.int64)
    series = np.array([r[1] for r in rows], dtype=np.int64)
    adds = np.stack([r[2] for r in rows])
    sketches = {k: np.stack([r[3][k] for r in rows]) for k in rows[0][3]}
    return Groups(series, start, adds, sketches)


def _daily_cost(app: np.ndarray, day: np.ndarray, cost: np.ndarray) -> list[tuple[str, int, float]]:
    """Cost per (app, local day) of a batch, for budgets and forecasts."""
    c = np.nan_to_num(cost, nan=0.0)
    key = np.char.add(np.char.add(app.astype(str), "\x1f"), day.astype(str))
    uniq, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=c)
    out = []
    for k, s in zip(uniq.tolist(), sums.tolist()):
        a, d = k.rsplit("\x1f", 1)
        out.append((a, int(d), float(s)))
    return out


class _SelfCollector(Collector):
    """The exporter's own metrics; values live on the engine so they persist with it."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine

    def collect(self) -> Iterator[Metric]:
        e = self.e
        info = GaugeMetricFamily("llm_exporter_build_info", "Build information; always 1.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        res = CounterMetricFamily("llm_exporter_records", "Records received, by result.", labels=["result"])
        for k in RESULTS:
            res.add_metric([k], e.results_total[k])
        yield res
        ovf = CounterMetricFamily("llm_exporter_label_overflow", "Records whose label value was mapped to 'other' by a label guard.", labels=["label"])
        for k, v in e.overflow_total.items():
            ovf.add_metric([k], v)
        yield ovf
        yield GaugeMetricFamily("llm_exporter_last_record_timestamp_seconds",
                                "Wall-clock time of the last accepted ingest (0 before any).", value=e.last_record_wallclock)
        yield CounterMetricFamily("llm_exporter_store_errors", "Failed writes to the store.", value=e.store.errors_total)
        yield CounterMetricFamily("llm_exporter_evaluation_errors", "Evaluations that failed (the last good snapshot stays published).",
                                  value=e.evaluation_errors_total)
        yield GaugeMetricFamily("llm_exporter_last_evaluation_timestamp_seconds",
                                "Wall-clock time of the last successful evaluation.", value=e.last_evaluation)
