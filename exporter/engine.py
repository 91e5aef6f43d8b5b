"""The engine: one object that owns the state and runs a batch from records to metrics.

Ingest is all or nothing per batch, by construction. A batch is first *planned*: validated,
deduplicated, guarded, priced, grouped, and its effect on every counter worked out, while
nothing in memory changes. The plan's `BatchWrite` is committed to SQLite in one
transaction; only then is the plan *applied* to memory (counters, histograms, dedupe
window, label guards, series, history, detectors, the exporter's own totals), and only
then is the batch acknowledged. A failed write raises StoreError before anything was
applied, so the caller answers 503, nothing was counted, and a retry counts once.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as _text
from prometheus_client.openmetrics.exposition import generate_latest as _openmetrics

from .anomaly.evaluator import AnomalyCollector, Evaluator, Snapshot
from .anomaly.history import ScopeHistory
from .anomaly.signals import signal_specs
from .codes import factorize, is_none
from .collectors.detectors import DetectorCollector
from .collectors.exporter import RESULTS, DurationHistogram, ExporterCollector
from .collectors.otlp import OtlpSpanCollector
from .collectors.usage import UsageMetrics
from .components import Components
from .config import Settings
from .detectors import Detectors
from .detectors.budget import daily_cost_rows
from .ingest.attribution import Attribution
from .ingest.batch import parse_batch, take
from .ingest.dedupe import DedupeIndex, hash_ids
from .ingest.labels import OTHER, SERIES, GuardPlan, LabelGuard, fold, is_folded
from .ingest.otlp import SpanCounts
from .ingest.prices import PriceTable
from .ingest.records import RecordColumns, UsageRecord, to_columns
from .ingest.rejections import Rejected, Rejections
from .storage.buckets import Groups, aggregate
from .storage.journal import stored_blob, stored_records
from .storage.store import BatchWrite, Store, StoreError

log = logging.getLogger("llm_usage_exporter")
Clock = Callable[[], float]
SeriesKey = tuple[str, str, str]
# prometheus-client's exposition writers (untyped there)
generate_latest: Callable[[CollectorRegistry], bytes] = _text
om_generate_latest: Callable[[CollectorRegistry], bytes] = _openmetrics
EVALUATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
DETECTORS = ("drift", "runaway", "budget")
MAX_FUTURE = 3600.0         # how far ahead of arrival a record may be dated (clock skew)
BURST_RESTORE = 6 * 3600.0  # minutes re-read at start-up for the burstiness of their hours


@dataclass(slots=True)
class IngestResult:
    accepted: int = 0
    duplicate: int = 0
    rejections: Rejections = field(default_factory=Rejections)
    duplicate_indices: list[int] = field(default_factory=list)

    @property
    def rejected(self) -> list[Rejected]:
        """The rejections kept with their reasons (the first ones by index)."""
        return self.rejections.kept

    @property
    def rejected_total(self) -> int:
        return self.rejections.total

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accepted": self.accepted, "duplicate": self.duplicate, "rejected": self.rejections.total,
                               "errors": [r.to_dict() for r in self.rejections]}
        if self.rejections.omitted:
            out["errors_omitted"] = self.rejections.omitted
        return out


@dataclass(slots=True)
class BatchPlan:
    """What one batch changes, worked out before anything changes (see the module docstring)."""

    result: IngestResult
    now: float
    write: BatchWrite
    counts: dict[str, int]                          # results_total additions
    overflow: dict[str, int]                        # overflow_total additions
    guards: dict[str, GuardPlan] = field(default_factory=dict)
    cols: RecordColumns | None = None               # the accepted records, guarded and priced
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))   # their request-id hashes
    series_ids: list[int] = field(default_factory=list)
    series_keys: list[SeriesKey] = field(default_factory=list)
    delta: np.ndarray | None = None                 # UsageMetrics.delta of the accepted records
    groups: Groups | None = None
    daily: list[tuple[str, int, float]] = field(default_factory=list)
    newest: float = 0.0
    wallclock: float = 0.0


class Engine:
    """Owns the store, instruments, history and evaluator of one exporter process."""

    def __init__(self, settings: Settings, clock: Clock = time.time, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.components = Components()
        self.store = Store(settings.db, keep_records=settings.record_retention > 0,
                           busy_timeout=settings.store_busy_timeout, synchronous=settings.sqlite_synchronous)
        self.prices = PriceTable(settings.prices, settings.price_aliases)
        self.attribution = settings.attribution()
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
        self.evaluator = Evaluator(self.history, self.specs, settings.baseline, settings.alert_budget, settings.timezone,
                                   settings.page_budget_share)
        self.detectors = Detectors(settings.drift, settings.runaway, settings.budgets, self.components,
                                   settings.page_budget_share)
        self.dedupe = DedupeIndex(settings.dedupe_window)
        self.snapshot: Snapshot | None = None
        self.lock = threading.RLock()
        self.results_total = dict.fromkeys(RESULTS, 0.0)
        self.overflow_total = dict.fromkeys([*self.guards, SERIES], 0.0)
        self.last_record_wallclock = 0.0
        self.newest_event_ts = 0.0
        self.evaluation_errors_total = 0.0
        self.last_evaluation = 0.0
        self._bursts_through = 0                # hours before it have their burstiness stored
        self._judged_stored = (0, 0, 0)         # the evaluator's judged_version, drift's taint_version and apart_version last stored
        self.queue_metrics: Any = None          # the HTTP edge's ingest queue collector, once an app has one
        self.otlp_spans = SpanCounts()          # spans received by the OTLP receiver, by result
        try:
            self._restore()
            self.otlp_spans = SpanCounts(self.store.get_meta(SpanCounts.META_KEY))
        except StoreError:
            self.store.close()
            raise
        except (ValueError, TypeError, KeyError, IndexError) as e:   # a page SQLite reads but we cannot
            self.store.close()
            raise StoreError(f"db: restoring from {settings.db} failed ({type(e).__name__}: {e}): the file holds data "
                             "this version cannot read; restore it from a backup, or move it aside to start empty",
                             "corrupt") from None
        # `registry` holds everything (tests read it with get_sample_value); `/metrics` writes
        # the usage families directly (UsageMetrics.render) and the rest from `scrape_registry`.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.scrape_registry = CollectorRegistry(auto_describe=True)
        self.evaluation_duration = DurationHistogram(EVALUATION_BUCKETS)
        self.registry.register(self.usage)
        for collector in (AnomalyCollector(self), DetectorCollector(self.detectors), ExporterCollector(self),
                          ProcessCollector(registry=None)):
            self.registry.register(collector)
            self.scrape_registry.register(collector)
        spans = OtlpSpanCollector(self.otlp_spans)
        self.registry.register(spans)
        self.scrape_registry.register(spans)

    # --- start-up ---------------------------------------------------------------------

    def _save_judged(self) -> None:
        """Store the hours the evaluator judged and the drift detector found drifting, and
        the failures the drift detector put on an app, when any marked new ones (a failed
        write is retried at the next evaluation)."""
        with self.lock:
            drift = self.detectors.drift
            version = (self.evaluator.judged_version, drift.taint_version, drift.apart_version)
            if version == self._judged_stored:
                return
            try:
                rows, tainted, apart = self.evaluator.judged_rows(), drift.tainted_rows(), drift.apart_rows()
                requests = self.evaluator.judged_request_rows()
            except Exception:   # a bug in either must not stop the evaluations; the marks stay in memory
                log.exception("listing judged hours failed")
                return
            try:
                self.store.write_judged(rows, tainted, apart, requests)
            except StoreError:
                log.exception("storing judged hours failed; retried at the next evaluation")
                return
            self._judged_stored = version

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
        self.detectors.drift.load_tainted(self.store.drift_tainted(int((newest - self.settings.horizon) // 3600)))
        self.detectors.drift.load_apart(self.store.drift_apart(int((newest - self.settings.horizon) // 3600)))
        now = max(self.clock(), newest)
        for groups in self.store.bucket_groups(3600, now - self.settings.horizon, now + 3600):
            self.history.add_hours(groups, keys)
        # The window needs slots finer than hours: the minute buckets of the last window, from
        # the start of a coarse slot. The minutes before it only tell how bursty their hours
        # were (what the coarse slots would have handed on had the process kept running).
        coarse = self.history.coarse
        cut = math.floor((newest - self.settings.window - 60) / coarse) * coarse
        self.history.load_bursts(self.store.bursts(int((now - self.settings.horizon) // 3600)))
        self.history.load_slot_sizes(self.store.slot_sizes(int((now - self.settings.horizon) // 3600)))
        self.history.load_burst_blocks(self.store.burst_blocks(int((now - self.settings.horizon) // 3600)))
        self._bursts_through = int(self.store.get_meta("bursts_through") or 0)
        since = max(cut - min(self.settings.minute_retention, BURST_RESTORE), self._bursts_through * 3600)
        self.history.add_bursts(list(self.store.bucket_groups(60, since, cut)), keys)
        for groups in self.store.bucket_groups(60, cut, newest + 60):
            self.history.add(groups, keys, hourly=False)
        self.evaluator.load_judged(self.store.judged(int((now - self.settings.horizon) // 3600)))
        self.evaluator.load_judged_requests(self.store.judged_requests(int((now - self.settings.horizon) // 3600)))
        _release_freed_heap()

    def _fold_journal(self) -> None:
        """Batches committed after the last checkpoint (the process died before it) are in
        the journal but not yet in the buckets: fold them in before the buckets are read."""
        for row_id, blob in self.store.unfolded():
            cols, _, _ = parse_batch(stored_records(blob), self.newest_event_ts)
            series = self._guard_now(cols)
            groups = aggregate(cols, series, cols.cost, res=60)
            self.store.fold(groups, row_id)
        self.store.checkpoint()

    def _guard_now(self, cols: RecordColumns) -> np.ndarray:
        """Guard stored records at start-up (in place) and return their series ids. What was
        committed maps as it did then; a value or series admitted only now (a limit was
        raised) is stored at once."""
        plans = self._plan_labels(cols)
        series, new_series, _ = self._plan_series(cols)
        admitted = [(name, v) for name, p in plans.items() for v in p.admitted]
        if admitted or new_series:
            self.store.write(BatchWrite(labels=admitted, series=new_series))
        for name, p in plans.items():
            self.guards[name].admit(p.admitted)
        return series

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
        series = self._guard_now(cols)
        self.detectors.observe(cols, budget=False)
        self.history.add_lags(series, cols.latency, cols.is_error, cols.ts, self.store.series_keys())

    # --- planning: pure functions of the batch and the current state --------------------

    def _plan_labels(self, cols: RecordColumns) -> dict[str, GuardPlan]:
        """Guard the label columns (in place on the batch's own columns); the plans say what
        the guards would admit and how many records overflowed."""
        plans = {name: g.plan(getattr(cols, name)) for name, g in self.guards.items()}
        cols.app, cols.provider, cols.model = plans["app"].mapped, plans["provider"].mapped, plans["model"].mapped
        return plans

    def _plan_series(self, cols: RecordColumns) -> tuple[np.ndarray, list[tuple[int, str, str, str]], int]:
        """The series id of every (guarded) record, the new series to store, and the number of
        records folded by the `max_series` cap (their provider and model become `other`, in
        place). New series get ids planned from the store's next id: ingest has one writer."""
        codes, labels = [], []
        for col in (cols.app, cols.provider, cols.model):
            uniq, inv = factorize(col)
            codes.append(inv)
            labels.append(uniq.tolist())
        combined = (codes[0] * len(labels[1]) + codes[1]) * len(labels[2]) + codes[2]
        present, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
        keys: list[SeriesKey] = []
        for c in present.tolist():
            rest, m = divmod(c, len(labels[2]))
            a, p = divmod(rest, len(labels[1]))
            keys.append((labels[0][a], labels[1][p], labels[2][m]))
        store = self.store
        room = self.settings.max_series - store.series_count
        first_new = store.next_series_id
        new: dict[SeriesKey, int] = {}

        def planned(key: SeriesKey) -> int:
            sid = store.known_series([key])[0]
            if sid is None:
                sid = new.setdefault(key, first_new + len(new))
            return sid

        target = np.empty(len(keys), dtype=np.int64)
        folded = np.zeros(len(keys), dtype=bool)
        for j, (key, sid) in enumerate(zip(keys, store.known_series(keys))):
            if sid is None and key not in new and len(new) >= room and not is_folded(key):
                folded[j] = True
                key = fold(key)
            target[j] = sid if sid is not None else planned(key)
        inverse = inverse.reshape(-1)
        if folded.any():
            moved = folded[inverse]
            cols.provider = np.where(moved, OTHER, cols.provider)
            cols.model = np.where(moved, OTHER, cols.model)
        return target[inverse], [(sid, *key) for key, sid in new.items()], int(counts[folded].sum())

    def _plan(self, cols: RecordColumns, indices: list[int], rejections: Rejections, now: float,
              meta: dict[str, str]) -> BatchPlan:
        """Everything the batch changes, as a BatchWrite and the in-memory additions; nothing
        in the engine changes here (the batch's own columns are guarded in place)."""
        result = IngestResult(rejections=rejections)
        keep, dup_idx, ids = self._dedupe(cols, indices, now)
        result.duplicate_indices = dup_idx
        result.duplicate = len(dup_idx)
        fresh = cols if keep is None else take(cols, keep)
        result.accepted = len(fresh)
        counts = {"accepted": len(fresh), "duplicate": len(dup_idx), "rejected": rejections.total}
        overflow = dict.fromkeys(self.overflow_total, 0)
        if not len(fresh):
            return BatchPlan(result, now, BatchWrite(meta={**meta, "exporter_totals": self._totals_json(counts, overflow)}),
                             counts, overflow)

        raw = {"app": fresh.app, "provider": fresh.provider, "model": fresh.model}
        plans = self._plan_labels(fresh)
        cost = self.prices.costs(fresh, raw["model"], raw["provider"])
        fresh.cost = cost
        series, new_series, folded = self._plan_series(fresh)
        for name, p in plans.items():
            overflow[name] = p.overflow
        overflow[SERIES] = folded

        sids, inverse = np.unique(series, return_inverse=True)
        known = self.store.series_keys()
        planned = {sid: (a, p, m) for sid, a, p, m in new_series}
        sid_list = sids.tolist()
        keys = [known[sid] if sid in known else planned[sid] for sid in sid_list]
        delta = self.usage.delta(inverse.reshape(-1), len(sid_list), fresh, cost)
        groups = aggregate(fresh, series, cost, res=self.history.fine, sessions=True)
        newest = max(self.newest_event_ts, float(fresh.ts.max()))
        wallclock = time.time()
        daily = daily_cost_rows(fresh.app, fresh.ts, cost, self.detectors.budget.tz)
        write = BatchWrite(
            dedupe=(now, ids.tobytes()) if ids.size else None,
            series=new_series,
            groups=groups if self.history.fine == 60 else groups.coarsen(60),
            totals=self.usage.totals(sid_list, delta),
            records=_records_blob(fresh, raw),   # also the journal the buckets are checkpointed from
            labels=[(name, v) for name, p in plans.items() for v in p.admitted],
            daily_cost=daily,
            meta={**meta, "newest_event_ts": repr(newest), "exporter_totals": self._totals_json(counts, overflow),
                  "last_ingest_wallclock": repr(wallclock)},
        )
        return BatchPlan(result, now, write, counts, overflow, plans, fresh, ids, sid_list, keys, delta, groups,
                         daily, newest, wallclock)

    def _dedupe(self, cols: RecordColumns, indices: list[int], now: float) -> tuple[np.ndarray | None, list[int], np.ndarray]:
        """Rows to keep (None: all), input indices of duplicates, and the hashes of new ids."""
        has = ~is_none(cols.request_id)
        if not has.any():
            return None, [], np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(has)
        hashes = hash_ids(cols.request_id[rows].tolist())
        dup = self.dedupe.seen(hashes, now)
        _, first = np.unique(hashes, return_index=True)       # within the batch the first one counts
        repeat = np.ones(rows.size, dtype=bool)
        repeat[first] = False
        dup |= repeat
        if not dup.any():
            return None, [], hashes
        drop = rows[dup]
        keep = np.setdiff1d(np.arange(len(cols)), drop)
        return keep, [indices[j] for j in drop.tolist()], hashes[~dup]

    def _totals_json(self, counts: dict[str, int], overflow: dict[str, int]) -> str:
        results = {k: v + counts.get(k, 0) for k, v in self.results_total.items()}
        over = {k: v + overflow.get(k, 0) for k, v in self.overflow_total.items()}
        return orjson.dumps({"results": results, "overflow": over}).decode()

    # --- ingest -----------------------------------------------------------------------

    def ingest(self, items: Sequence[Any], now: float | None = None, meta: dict[str, str] | None = None,
               indices: Sequence[int] | None = None, rejections: Rejections | None = None,
               attribution: Attribution | None = None) -> IngestResult:
        """Validate, dedupe, count and persist a batch of decoded items (`indices`: the record
        number of each item; `rejections`: records already refused while decoding;
        `attribution`: the app and provider precedence with one POST's header values)."""
        now = self.clock() if now is None else now
        rejections = rejections if rejections is not None else Rejections(self.settings.max_errors_listed)
        cols, rejections, numbers = parse_batch(items, now, indices, rejections, attribution or self.attribution)
        return self.ingest_columns(cols, numbers, rejections, now, meta)

    def ingest_records(self, records: list[UsageRecord], now: float | None = None,
                       meta: dict[str, str] | None = None) -> IngestResult:
        """Dedupe, count and persist already-validated records (replay, backtest)."""
        return self.ingest_columns(to_columns(records), list(range(len(records))), Rejections(), now, meta)

    def ingest_columns(self, cols: RecordColumns, indices: list[int], rejections: Rejections,
                       now: float | None = None, meta: dict[str, str] | None = None) -> IngestResult:
        """The common tail of every ingest path: plan, commit, apply.

        `meta` is written in the same transaction (a tail follower's file offset), so a crash
        can never store records without their offset or the other way round. A StoreError
        leaves the engine exactly as it was."""
        now = self.clock() if now is None else now
        cols, indices = _drop_future(cols, indices, rejections, now)
        with self.lock:
            plan = self._plan(cols, indices, rejections, now, meta or {})
            self.store.write(plan.write)
            self._apply(plan)
        return plan.result

    def _apply(self, plan: BatchPlan) -> None:
        """Bring memory up to a committed batch. Nothing here touches the store or can fail
        on the batch's content."""
        for name, p in plan.guards.items():
            self.guards[name].admit(p.admitted)
        for k, v in plan.overflow.items():
            self.overflow_total[k] += v
        for k, v in plan.counts.items():
            self.results_total[k] += v
        if plan.cols is None or plan.delta is None or plan.groups is None:
            return
        with self.counters_lock:
            self.usage.apply(plan.series_ids, plan.series_keys, plan.delta)
        self.dedupe.add(plan.ids, plan.now)
        self.newest_event_ts = plan.newest
        self.last_record_wallclock = plan.wallclock
        self.history.add(plan.groups, self.store.series_keys())
        self.detectors.observe(plan.cols, daily=plan.daily)

    # --- evaluation -------------------------------------------------------------------

    def evaluate(self, t: float | None = None) -> Snapshot | None:
        """Judge every signal at event time t (default: the clock). Errors are counted, not
        raised: the evaluator and each detector are isolated (`components`), and a failed
        part keeps its last verdict published while the others move on."""
        t = self.clock() if t is None else t
        start = time.perf_counter()
        failures = sum(self.components.errors[name] for name in ("evaluator", *DETECTORS))
        with self.lock:
            snap = self.components.attempt("evaluator", lambda: self.evaluator.evaluate(t), None)
            # a model's errors that the evaluator put on one app are no drift of the model's
            apart: frozenset[tuple[str, str, str]] = frozenset()
            if snap is not None:
                judged = snap
                apart = self.components.attempt("evaluator", lambda: judged.put_on_an_app("error_rate"), apart)
            reports = self.detectors.evaluate(t, apart)
        if sum(self.components.errors[name] for name in ("evaluator", *DETECTORS)) > failures:
            self.evaluation_errors_total += 1
        if snap is None:
            return self.snapshot
        snap.extra["detectors"] = reports
        self.evaluation_duration.observe(time.perf_counter() - start)
        self.snapshot = snap
        self.last_evaluation = time.time()
        self._save_bursts()
        self._save_judged()
        return snap

    def _save_bursts(self) -> None:
        """Store the burstiness of hours that became final since the last call (a failed
        write is retried the next time)."""
        with self.lock:
            final = self.history.bursts_final_before()
            if final <= self._bursts_through:
                return
            first = max(self._bursts_through, final - int(self.settings.horizon // 3600) - 2)
            try:
                self.store.write_bursts(self.history.burst_rows(first, final), final,
                                        self.history.slot_size_rows(first, final),
                                        self.history.burst_block_rows(first, final))
            except StoreError:
                log.exception("storing burstiness failed; retried at the next evaluation")
                return
            self._bursts_through = final

    def exposition(self, openmetrics: bool = False) -> bytes:
        """The full /metrics text, in the classic text format or OpenMetrics; a scrape never
        holds a lock while formatting."""
        if openmetrics:
            return self.usage.render(openmetrics=True).encode() + om_generate_latest(self.scrape_registry)
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


def _drop_future(cols: RecordColumns, indices: list[int], rejections: Rejections,
                 now: float) -> tuple[RecordColumns, list[int]]:
    """Refuse event times well ahead of arrival (a typo'd year, microseconds read as
    milliseconds): pruning and the restored window are measured from the newest event, so
    one such record would age out all real history."""
    ahead = cols.ts > now + MAX_FUTURE
    if not ahead.any():
        return cols, indices
    bad = np.flatnonzero(ahead)

    def explain(k: int) -> Rejected:
        j = int(bad[k])
        return Rejected(indices[j], "ts", f"is {(float(cols.ts[j]) - now) / 3600:.3g} h ahead of the exporter's clock "
                                          f"(at most {MAX_FUTURE / 3600:g} h): check the unit (seconds or milliseconds) "
                                          "and the time zone")
    rejections.add_many([indices[j] for j in bad.tolist()], explain)
    keep = np.flatnonzero(~ahead)
    return take(cols, keep), [indices[j] for j in keep.tolist()]


def _records_blob(cols: RecordColumns, raw: dict[str, np.ndarray]) -> tuple[float, float, bytes]:
    return float(cols.ts.min()), float(cols.ts.max()), stored_blob(cols, raw)
