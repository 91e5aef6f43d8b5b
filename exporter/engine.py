"""The engine: one object that owns the state and runs a batch from records to metrics.

Ingest order matters for the promises we make. A batch is validated and deduplicated,
folded into the counters, and written to SQLite in one transaction; only after the commit
does it reach the in-memory history and detectors, and only then is it acknowledged. If
the write fails, the counters are put back as they were and the caller gets an error, so
a retry cannot double-count.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .buckets import aggregate
from .codes import factorize
from .config import Settings
from .dedupe import DedupeIndex, hash_ids
from .detectors import DetectorCollector, Detectors
from .budget import daily_cost_rows
from .evaluator import AnomalyCollector, Evaluator, Snapshot
from .history import ScopeHistory
from .instruments import UsageMetrics
from .labels import LabelGuard
from .prices import PriceTable
from .batch import parse_batch, stored_blob, stored_records, take
from .records import RecordColumns, Rejected, UsageRecord, to_columns
from .signals import signal_specs
from .store import BatchWrite, Store, StoreError

log = logging.getLogger("llm_usage_exporter")
disable_created_metrics()   # the metric contract: no `_created` series (process-wide switch)
Clock = Callable[[], float]
RESULTS = ("accepted", "duplicate", "rejected")
MAX_FUTURE = 3600.0         # how far ahead of arrival a record may be dated (clock skew)


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
        self.store = Store(settings.db, keep_records=settings.record_retention > 0)
        self.prices = PriceTable(settings.prices, settings.price_aliases)
        self.specs = signal_specs(settings.signals)
        saved = self.store.label_values()
        self.guards = {
            "app": LabelGuard("app", settings.label_limit_app, saved.get("app", ())),
            "provider": LabelGuard("provider", settings.label_limit_provider, saved.get("provider", ())),
            "model": LabelGuard("model", settings.label_limit_model, saved.get("model", ())),
        }
        self.counters_lock = threading.Lock()   # held briefly: counter updates and a scrape's copy
        self.usage = UsageMetrics(self.counters_lock)
        self.history = ScopeHistory(settings.window, settings.horizon)
        self.evaluator = Evaluator(self.history, self.specs, settings.baseline, settings.seasonal)
        self.detectors = Detectors(settings.drift, settings.runaway, settings.budgets)
        self.dedupe = DedupeIndex(settings.dedupe_window)
        self.snapshot: Snapshot | None = None
        self.lock = threading.RLock()
        self.results_total = dict.fromkeys(RESULTS, 0.0)
        self.overflow_total = dict.fromkeys(self.guards, 0.0)
        self.last_record_wallclock = 0.0
        self.newest_event_ts = 0.0
        self.evaluation_errors_total = 0.0
        self.last_evaluation = 0.0
        self._restore()
        # `registry` holds everything (tests read it with get_sample_value); `/metrics` writes
        # the usage families directly (UsageMetrics.render) and the rest from `scrape_registry`.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.scrape_registry = CollectorRegistry(auto_describe=True)
        self.evaluation_duration = Histogram(
            "llm_exporter_evaluation_duration_seconds", "Time one evaluation of all signals takes.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=None)
        self.registry.register(self.usage)
        for collector in (self.evaluation_duration, AnomalyCollector(self), DetectorCollector(self.detectors),
                          _SelfCollector(self), ProcessCollector(registry=None)):
            self.registry.register(collector)
            self.scrape_registry.register(collector)

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
        self.last_record_wallclock = float(self.store.get_meta("last_ingest_wallclock") or 0.0)
        for seen, hashes in self.store.dedupe_hashes(self.clock() - self.settings.dedupe_window):
            self.dedupe.add(hashes, seen)
        self.detectors.restore_budget(self.store.daily_costs())
        self._fold_journal()
        keys = self.store.series()
        if not keys:
            return
        self._restore_detectors(newest)
        now = max(self.clock(), newest)
        for groups in self.store.bucket_groups(3600, now - self.settings.horizon, now + 3600):
            self.history.add_hours(groups, keys)
        # The window needs slots finer than hours: the minute buckets of the last window.
        for groups in self.store.bucket_groups(60, newest - self.settings.window - 60, newest + 60):
            self.history.add(groups, keys, hourly=False)
        _release_freed_heap()

    def _fold_journal(self) -> None:
        """Batches committed after the last checkpoint (the process died before it) are in
        the journal but not yet in the buckets: fold them in before the buckets are read."""
        for row_id, blob in self.store.unfolded():
            cols, _, _ = parse_batch(stored_records(blob), self.newest_event_ts)
            self._guard(cols)
            groups = aggregate(cols, self._series_of(cols), cols.cost, res=60)
            self.store.fold(groups, row_id)
        self.store.checkpoint()

    def _series_of(self, cols: RecordColumns) -> np.ndarray:
        """The series id of every (guarded) record, creating new series in the store."""
        codes, labels = [], []
        for col in (cols.app, cols.provider, cols.model):
            uniq, inv = factorize(col)
            codes.append(inv)
            labels.append(uniq.tolist())
        combined = (codes[0] * len(labels[1]) + codes[1]) * len(labels[2]) + codes[2]
        present, inverse = np.unique(combined, return_inverse=True)
        keys = []
        for c in present.tolist():
            rest, m = divmod(c, len(labels[2]))
            a, p = divmod(rest, len(labels[1]))
            keys.append((labels[0][a], labels[1][p], labels[2][m]))
        sids = np.asarray(self.store.series_ids(keys), dtype=np.int64)
        return sids[inverse.reshape(-1)]

    def _restore_detectors(self, newest: float) -> None:
        """Drift and runaway windows from the raw records of the last day (budget excluded:
        it was restored from daily cost)."""
        chunk: list[dict[str, Any]] = []
        for d in self.store.records(newest - 86400, newest + 1):
            chunk.append(d)
            if len(chunk) >= 5000:
                self._observe_restored(chunk)
                chunk = []
        self._observe_restored(chunk)

    def _observe_restored(self, stored: list[dict[str, Any]]) -> None:
        if not stored:
            return
        cols, _, _ = parse_batch(stored, self.newest_event_ts)
        self._guard(cols)
        self.detectors.observe(cols, budget=False)

    def _guard(self, cols: RecordColumns) -> dict[str, np.ndarray]:
        """Apply the label guards in place; returns the label columns as they were sent."""
        raw = {"app": cols.app, "provider": cols.provider, "model": cols.model}
        cols.app = self.guards["app"].guard(cols.app)
        cols.provider = self.guards["provider"].guard(cols.provider)
        cols.model = self.guards["model"].guard(cols.model)
        return raw

    # --- ingest -----------------------------------------------------------------------

    def ingest(self, items: Sequence[Any], now: float | None = None, meta: dict[str, str] | None = None) -> IngestResult:
        """Validate, dedupe, count and persist a batch of decoded items."""
        now = self.clock() if now is None else now
        cols, rejected, indices = parse_batch(items, now)
        return self.ingest_columns(cols, indices, rejected, now, meta)

    def ingest_records(self, records: list[UsageRecord], now: float | None = None,
                       meta: dict[str, str] | None = None) -> IngestResult:
        """Dedupe, count and persist already-validated records (replay, backtest)."""
        return self.ingest_columns(to_columns(records), list(range(len(records))), [], now, meta)

    def ingest_columns(self, cols: RecordColumns, indices: list[int], rejected: list[Rejected],
                       now: float | None = None, meta: dict[str, str] | None = None) -> IngestResult:
        """The common tail of every ingest path.

        `meta` is written in the same transaction (a tail follower's file offset), so a crash
        can never store records without their offset or the other way round."""
        now = self.clock() if now is None else now
        cols, indices, rejected = _drop_future(cols, indices, rejected, now)
        with self.lock:
            result = IngestResult(rejected=rejected)
            keep, dup_idx, ids = self._dedupe(cols, indices, now)
            result.duplicate_indices = dup_idx
            result.duplicate = len(dup_idx)
            fresh = cols if keep is None else take(cols, keep)
            pending = {"accepted": len(fresh), "duplicate": len(dup_idx), "rejected": len(rejected)}
            if len(fresh):
                self._apply(fresh, ids, now, pending, meta or {})
            else:
                self.store.write(BatchWrite(meta={**(meta or {}), "exporter_totals": self._totals_json(pending)}))
            for k, v in pending.items():
                self.results_total[k] += v
            result.accepted = len(fresh)
        return result

    def _dedupe(self, cols: RecordColumns, indices: list[int], now: float) -> tuple[np.ndarray | None, list[int], np.ndarray]:
        """Rows to keep (None: all), input indices of duplicates, and the hashes of new ids."""
        has = np.not_equal(cols.request_id, None)
        if not has.any():
            return None, [], np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(has)
        hashes = hash_ids(cols.request_id[rows].tolist())
        self.dedupe.expire(now)
        dup = self.dedupe.seen(hashes)
        _, first = np.unique(hashes, return_index=True)       # within the batch the first one counts
        repeat = np.ones(rows.size, dtype=bool)
        repeat[first] = False
        dup |= repeat
        if not dup.any():
            return None, [], hashes
        drop = rows[dup]
        keep = np.setdiff1d(np.arange(len(cols)), drop)
        return keep, [indices[j] for j in drop.tolist()], hashes[~dup]

    def _apply(self, cols: RecordColumns, ids: np.ndarray, now: float, pending: dict[str, int],
               meta: dict[str, str]) -> None:
        overflow_before = {k: g.overflow_total for k, g in self.guards.items()}
        raw = self._guard(cols)
        cost = self.prices.costs(cols, raw["model"], raw["provider"])
        cols.cost = cost

        series = self._series_of(cols)
        sids, inverse = np.unique(series, return_inverse=True)
        names = self.store.series_keys()
        keys = [names[sid] for sid in sids.tolist()]
        with self.counters_lock:
            rows = self.usage.rows(sids.tolist(), keys)
        touched = np.unique(rows)
        before = {int(r): self.usage.dump(int(r)) for r in touched}
        with self.counters_lock:
            self.usage.add(rows[inverse.reshape(-1)], cols, cost)

        groups = aggregate(cols, series, cost, res=self.history.fine)
        newest = max(self.newest_event_ts, float(cols.ts.max()))
        new_labels = [(name, v) for name, g in self.guards.items() for v in g.take_new()]
        for name, g in self.guards.items():
            self.overflow_total[name] += g.overflow_total - overflow_before[name]
        wallclock = time.time()
        daily = daily_cost_rows(cols.app, cols.ts, cost, self.detectors.budget.tz)
        write = BatchWrite(
            dedupe=(now, ids.tobytes()) if ids.size else None,
            groups=groups if self.history.fine == 60 else groups.coarsen(60),
            totals={self.usage.sids[int(r)]: self.usage.dump(int(r)) for r in touched},
            records=_records_blob(cols, raw),   # also the journal the buckets are checkpointed from
            labels=new_labels,
            daily_cost=daily,
            meta={**meta, "newest_event_ts": repr(newest), "exporter_totals": self._totals_json(pending),
                  "last_ingest_wallclock": repr(wallclock)},
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
        self.dedupe.add(ids, now)
        self.newest_event_ts = newest
        self.last_record_wallclock = wallclock
        self.history.add(groups, self.store.series_keys())
        self.detectors.observe(cols, daily=daily)

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

    def exposition(self) -> bytes:
        """The full /metrics text; a scrape never holds a lock while formatting."""
        return self.usage.render().encode() + generate_latest(self.scrape_registry)

    def prune(self) -> None:
        s = self.settings
        now = max(self.clock(), self.newest_event_ts)
        self.store.prune(now, s.minute_retention, s.horizon, s.dedupe_window, s.record_retention)

    def close(self) -> None:
        self.store.close()


def _release_freed_heap() -> None:
    """Give the memory the restore freed back to the system, where the C library allows.

    Reading the history allocates and frees many arrays of a few MB. Once glibc has seen
    such blocks freed it serves blocks of that size from its heap instead of fresh
    mappings, and keeps the freed heap memory (about 30 MB after two weeks of 10,000
    series), which later allocations only partly reuse. `malloc_trim` returns it; with
    another C library this does nothing."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):   # not glibc, or no C library to ask (Windows)
        return
    trim(0)


def _drop_future(cols: RecordColumns, indices: list[int], rejected: list[Rejected],
                 now: float) -> tuple[RecordColumns, list[int], list[Rejected]]:
    """Refuse event times well ahead of arrival (a typo'd year, microseconds read as
    milliseconds): pruning and the restored window are measured from the newest event, so
    one such record would age out all real history."""
    ahead = cols.ts > now + MAX_FUTURE
    if not ahead.any():
        return cols, indices, rejected
    bad = [Rejected(indices[j], "ts", f"is {(float(cols.ts[j]) - now) / 3600:.3g} h ahead of the exporter's clock "
                                      f"(at most {MAX_FUTURE / 3600:g} h): check the unit (seconds or milliseconds) "
                                      "and the time zone") for j in np.flatnonzero(ahead).tolist()]
    keep = np.flatnonzero(~ahead)
    return take(cols, keep), [indices[j] for j in keep.tolist()], sorted(rejected + bad, key=lambda r: r.index)


def _records_blob(cols: RecordColumns, raw: dict[str, np.ndarray]) -> tuple[float, float, bytes]:
    return float(cols.ts.min()), float(cols.ts.max()), stored_blob(cols, raw)


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
