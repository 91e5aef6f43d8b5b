"""Scope history: what the evaluator needs, in memory, for every global/app/model scope.

Three time rings share one layout (scope rows × time slots), with one tag per slot saying
which absolute slot it holds, so a slot is recycled for all scopes at once as event time
moves on:

- hourly sums (and hourly p95/p50 from sketches) over the horizon, for the baseline;
- fine sums (1/60 of the window) and coarse sketches (1/12 of the window) for the window
  under test; the fine sums and the timing samples beyond each scope's threshold are also
  kept per session bucket (from batches of records only), so that a rise one session
  carries can be left out.

Everything is fed from `buckets.Groups` (already summed per series and fine slot), so the
cost of an update scales with the distinct (series, slot) pairs of a batch. The layout is
rebuilt from the store's buckets at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from .. import sketch
from ..storage.buckets import FIELDS, SESSION_BUCKETS, SESSION_FIELDS, SKETCHES, TOKEN_FIELDS, Bins, F, Groups
from . import arrival
from .baseline import BLOCK_SLOTS, block_stats

SCOPES = ("global", "app", "model")
ScopeKey = tuple[str, str, str, str]   # (scope, app, provider, model); unused parts are ""
QUANTILES = {"latency": 0.95, "ttft": 0.95, "otps": 0.5, "tpot": 0.95}
OPEN_HOURS = 3
MIN_SKETCH_COUNT = 5
_DIVISORS_OF_60 = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60)
# per coarse slot, for each kind of request size: how many requests were sized and the sums
# of their log sizes and squared log sizes (tokens, then cost), in this order
SLOT_SIZE_FIELDS = ("sized_requests", "log_tokens", "log_tokens_sq", "costed_requests", "log_cost", "log_cost_sq")
SIZE_KINDS = ("tokens", "cost")
# Window lengths, in coarse slots, at which mean sizes are measured below the hour: the
# coarse slot itself, whose sums are final when it is handed on whatever the batches.
WINDOW_SLOTS = (1,)
SESSION_HOURS = 10          # whole hours split by session bucket: the evaluator's longest held window, and more
BURST_HOURS = 3             # hours whose slot counts are kept while their slots are handed on
N_WINDOW_STATS = 6          # baseline.WINDOW_STATS


def fine_resolution(window: float) -> int:
    """The largest divisor of 60 s not above window/60, so fine slots nest in minutes."""
    target = window / 60.0
    return max(d for d in _DIVISORS_OF_60 if d <= max(target, 1))


class Ring:
    """Slots of `res` seconds, `n` of them, tagged with the absolute slot they hold."""

    def __init__(self, res: int, n: int) -> None:
        self.res, self.n = res, n
        self.tag = np.full(n, -1, dtype=np.int64)

    def claim(self, absolute: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Slot per absolute index, a mask of those still in range, and slots to clear."""
        slot = absolute % self.n
        cleared: list[int] = []
        for a in np.unique(absolute):
            s = int(a % self.n)
            if self.tag[s] < a:
                cleared.append(s)
                self.tag[s] = a
        return slot, self.tag[slot] == absolute, cleared

    def slots_for(self, absolute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot = absolute % self.n
        return slot, self.tag[slot] == absolute


@dataclass(slots=True)
class WindowValues:
    """Per-scope sums and quantiles over the window under test."""

    adds: np.ndarray                  # (S, len(FIELDS))
    quantiles: dict[str, np.ndarray]  # sketch kind -> (S,)
    counts: dict[str, np.ndarray]


@dataclass(slots=True)
class BaselineHours:
    """The hourly values of a run of baseline hours (S scopes, H hours), as the baseline
    statistics read them. An hour is unknown to a scope when the ring no longer holds it or
    it comes before the scope's first hour: its sums and slot statistics read as zero and
    its quantiles as NaN."""

    unknown: np.ndarray       # (S, H)
    adds: np.ndarray          # (S, H, F) sums, each field stored contiguously (`_take_planes`)
    quantiles: np.ndarray     # (S, H, K) hourly quantiles, each kind contiguous
    bursts: np.ndarray        # (S, H, 2) burstiness sums as held (zero where the ring has none)
    blocks: np.ndarray        # (S, H, 1 + BLOCK_SLOTS) the requests in the hour's blocks, and their spread per length
    slots: np.ndarray         # (S, H, WINDOW_SLOTS, SIZE_KINDS, N_WINDOW_STATS), each statistic contiguous


class _GatheredHours:
    """The baseline hours read last, kept so that the next read, an hour later, gathers the
    one new hour instead of all of them (gathering is most of the cost of a baseline's
    statistics that is not sorting).

    Each array is stored field by field, as `_take_planes` lays it out, over `capacity`
    columns: column c holds absolute hour `base + c` when `hour[c]` says so. A read is a
    view of consecutive columns, so a later hour moves the view one column on and the
    columns are moved back only when it runs off the end: once a day, a copy of them all
    (about 10 ms for 1,000 scopes and 7 days, in that hour's first evaluation). A few more
    columns would make that rarer, at the cost of memory held all day: the columns take
    about 50 MB for 1,000 scopes and 7 days, 10 MB for 200."""

    SLACK = 24           # spare columns after the view: how many hours it moves on before the columns move back
    LEAD = 2             # spare columns before it: a read of an hour earlier stays a view too

    def __init__(self, rows: int, widths: tuple[int, ...], hours: int, base: int) -> None:
        self.rows, self.capacity = rows, hours + self.LEAD + self.SLACK
        self.planes = [np.empty((w, rows, self.capacity)) for w in widths]
        self.hour = np.full(self.capacity, -1, dtype=np.int64)
        self.base = base - self.LEAD

    def place(self, first: int, count: int) -> np.ndarray:
        """Columns for hours first .. first + count - 1, moving the held columns back to the
        start (those that stay in range) when the view would run off either end."""
        lo = first - self.base
        if lo < 0 or lo + count > self.capacity:
            base = first - self.LEAD
            shift = base - self.base                 # columns move this many to the left
            held = np.flatnonzero(self.hour >= 0)
            a = max(int(held[0]) if held.size else 0, shift, 0)                      # the held columns ...
            b = min(int(held[-1]) + 1 if held.size else 0, self.capacity + shift, self.capacity)
            hour = np.full(self.capacity, -1, dtype=np.int64)
            if a < b:                                # ... that stay in range: one slice per plane
                for p in self.planes:
                    p[:, :, a - shift:b - shift] = p[:, :, a:b]
                hour[a - shift:b - shift] = self.hour[a:b]
            self.hour, self.base = hour, base
            lo = first - base
        return np.arange(lo, lo + count)

    def forget_from(self, hour: int) -> None:
        """Columns of `hour` and later are stale (the ring changed them)."""
        self.hour[self.hour >= hour] = -1

    def view(self, k: int, cols: np.ndarray) -> np.ndarray:
        """(rows, len(cols), width) read-only view of plane `k`: a consumer that wrote into
        it would change the next hour's baseline."""
        out = self.planes[k][:, :, cols[0]:cols[-1] + 1].transpose(1, 2, 0)
        out.flags.writeable = False
        return out


class ScopeHistory:
    """Per-scope rings for the evaluator; see the module docstring."""

    def __init__(self, window: float, horizon: float) -> None:
        self.window = float(window)
        self.fine = fine_resolution(window)
        coarse_slots = max(1, round(window / 12 / self.fine))
        self.coarse = self.fine * coarse_slots
        self.horizon_hours = int(math.ceil(horizon / 3600))     # the whole hours kept; the ring holds two more
        self.hours = Ring(3600, self.horizon_hours + 2)
        self.open = Ring(3600, OPEN_HOURS)
        self.fine_ring = Ring(self.fine, int(math.ceil(window / self.fine)) + 4)
        # one coarse slot beyond the window: an hour's slots leave the ring (and hand on their
        # burstiness) by the time the hour joins the baseline, whenever the evaluation runs
        self.coarse_ring = Ring(self.coarse, int(math.ceil(window / self.coarse)) + 1)
        self.keys: list[ScopeKey] = []
        self._index: dict[ScopeKey, int] = {}
        self._series_rows: dict[int, tuple[int, int, int]] = {}
        self._sids = np.zeros(0, dtype=np.int64)             # the ids of _series_rows, sorted ...
        self._sid_rows = np.zeros((0, 3), dtype=np.int64)    # ... and their scope rows
        self._cap = 0
        nf, nk, nb = len(FIELDS), len(SKETCHES), sketch.NBINS
        self.hour_add = np.zeros((0, self.hours.n, nf))
        self.hour_q = np.full((0, self.hours.n, nk), np.nan)
        self.open_sk = np.zeros((0, self.open.n, nk, nb), dtype=np.int32)
        self.fine_add = np.zeros((0, self.fine_ring.n, nf))
        # the fine slots' size sums split by session bucket (`buckets.SESSION_FIELDS`), flat
        # per slot; only batches of records carry them, so slots re-read from the store at
        # start-up hold zeros (their requests are in no bucket)
        self.fine_sessions = np.zeros((0, self.fine_ring.n, SESSION_BUCKETS * len(SESSION_FIELDS)))
        # the same for the last few whole hours, which a shift held for hours is judged on
        # (`recent_hour_sessions`); batches only, so hours restored at start-up hold zeros
        self.session_hours = Ring(3600, SESSION_HOURS)
        self.hour_sessions = np.zeros((0, SESSION_HOURS, SESSION_BUCKETS * len(SESSION_FIELDS)))
        # the fine slots' timing samples split by session bucket: per bucket and sketch kind,
        # all samples and those at or above the scope's threshold bin in force when they
        # came (`recent_slow`); batches only, like `fine_sessions`
        self.fine_slow = np.zeros((0, self.fine_ring.n, SESSION_BUCKETS * len(SKETCHES) * 2), dtype=np.float32)
        self._slow_thr = np.zeros((0, len(SKETCHES)), dtype=np.int64)   # the thresholds last read (`recent_exceedances`)
        # per scope and hour of the last day: its requests per arrival-lag bin (`arrival`),
        # successes and failures apart; from batches, and at start-up from the raw records
        # of the last day
        self.lag_hours = Ring(3600, arrival.LAG_HOURS)
        self.hour_lags = np.zeros((0, arrival.LAG_HOURS, arrival.LAG_CELLS))
        self.coarse_sk = np.zeros((0, self.coarse_ring.n, nk, nb), dtype=np.int32)
        self.coarse_req = np.zeros((0, self.coarse_ring.n))    # requests per coarse slot
        self.hour_burst = np.zeros((0, self.hours.n, 2))       # per hour: sum and sum of squares of its coarse slots' requests
        # per hour: the requests its blocks of BLOCK_SLOTS coarse slots hold, and for each
        # length the squares of the blocks' counts about their mean (`block_stats`); from the
        # slot counts of the last BURST_HOURS hours, kept while their slots are handed on
        self.hour_blocks = np.zeros((0, self.hours.n, 1 + len(BLOCK_SLOTS)))
        self.slots_per_hour = int(math.ceil(3600 / self.coarse))
        self.burst_hours = Ring(3600, BURST_HOURS)
        self.slot_counts = np.zeros((0, BURST_HOURS, self.slots_per_hour))
        # slot counts a batch moved whose blocks are not measured again yet (`_measure_blocks`):
        # slot of burst_hours -> (hour, its slot of the hour ring, the scope rows it moved)
        self._unmeasured: dict[int, tuple[int, int, np.ndarray]] = {}
        self.coarse_size = np.zeros((0, self.coarse_ring.n, len(SLOT_SIZE_FIELDS)))   # sized requests and log sums per coarse slot
        # per hour: statistics of the mean log sizes of its coarse slots, per kind (see `_fold_slot_sizes`)
        self.hour_slots = np.zeros((0, self.hours.n, len(WINDOW_SLOTS), len(SIZE_KINDS), N_WINDOW_STATS))
        self.coarse_dirty: set[int] = set()                    # coarse slots changed since the evaluator last read them
        self.first_hour = np.zeros(0, dtype=np.int64)
        self.late_sketch_groups = 0
        self._dirty_open: set[int] = set()              # open slots with sketches newer than their quantiles
        self.changed_from_hour = np.iinfo(np.int64).max  # oldest hour changed since the evaluator last looked
        self._gathered: _GatheredHours | None = None     # the baseline hours last read (`baseline_hours`) ...
        self._gathered_stale_from = np.iinfo(np.int64).max   # ... and the oldest hour changed since
        self._exc_above = np.zeros((0, self.coarse_ring.n, nk))     # per coarse slot: samples beyond thresholds ...
        self._exc_total = np.zeros((0, self.coarse_ring.n, nk))     # ... and all samples (see recent_exceedances)
        self._exc_tag = np.full(self.coarse_ring.n, -1, dtype=np.int64)
        self._exc_thr = np.zeros((self.coarse_ring.n, 0, nk), dtype=np.int64)   # the thresholds each slot's rows were counted against ...
        self._exc_version = np.full(self.coarse_ring.n, -1, dtype=np.int64)     # ... of this version
        self._exc_size = 0
        self._grow(16)

    # --- scopes -----------------------------------------------------------------------

    def _grow(self, cap: int) -> None:
        def g(a: np.ndarray, fill: float = 0) -> np.ndarray:
            out = np.full((cap,) + a.shape[1:], fill, dtype=a.dtype)
            out[: a.shape[0]] = a
            return out
        self.hour_add, self.fine_add, self.fine_sessions = g(self.hour_add), g(self.fine_add), g(self.fine_sessions)
        self.hour_sessions, self.fine_slow = g(self.hour_sessions), g(self.fine_slow)
        self.hour_lags = g(self.hour_lags)
        self.hour_q = g(self.hour_q, np.nan)
        self.open_sk, self.coarse_sk = g(self.open_sk), g(self.coarse_sk)
        self.coarse_req, self.hour_burst = g(self.coarse_req), g(self.hour_burst)
        self.hour_blocks, self.slot_counts = g(self.hour_blocks), g(self.slot_counts)
        self.coarse_size, self.hour_slots = g(self.coarse_size), g(self.hour_slots)
        self.first_hour = g(self.first_hour, np.iinfo(np.int64).max)
        self._cap = cap

    def _scope(self, key: ScopeKey) -> int:
        i = self._index.get(key)
        if i is None:
            i = len(self.keys)
            if i >= self._cap:
                self._grow(self._cap * 2)
            self._index[key] = i
            self.keys.append(key)
        return i

    def scope_rows(self, series: np.ndarray, series_keys: dict[int, tuple[str, str, str]]) -> np.ndarray:
        """(G, 3) scope rows (global, app, model) for each series id.

        Series seen before are looked up all at once in a sorted table of their ids; only new
        ones go through `_scope`, in the order they first appear, so scopes are numbered
        exactly as a pass over the groups one by one would number them."""
        series = np.asarray(series, dtype=np.int64)
        pos, known = self._lookup(series)
        if not known.all():
            new = list(dict.fromkeys(series[~known].tolist()))
            for sid in new:
                app, provider, model = series_keys[sid]
                self._series_rows[sid] = (self._scope(("global", "", "", "")), self._scope(("app", app, "", "")),
                                          self._scope(("model", "", provider, model)))
            order = np.argsort(np.array(new, dtype=np.int64))
            ids = np.array(new, dtype=np.int64)[order]
            rows = np.array([self._series_rows[sid] for sid in new], dtype=np.int64)[order]
            at = np.searchsorted(self._sids, ids)
            self._sids, self._sid_rows = np.insert(self._sids, at, ids), np.insert(self._sid_rows, at, rows, axis=0)
            pos, known = self._lookup(series)
        return self._sid_rows[pos]

    def _lookup(self, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Position of each series id in the sorted table, and whether it is there."""
        if not self._sids.size:
            return np.zeros(series.shape, dtype=np.int64), np.zeros(series.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(self._sids, series), self._sids.size - 1)
        return pos, self._sids[pos] == series

    @property
    def size(self) -> int:
        return len(self.keys)

    # --- updates ----------------------------------------------------------------------

    def add(self, groups: Groups, series_keys: dict[int, tuple[str, str, str]], hourly: bool = True) -> None:
        """Fold groups aligned to the fine resolution into every ring (`hourly=False`: the
        window rings only, for minute buckets re-read at start-up whose hours are restored
        separately by `add_hours`)."""
        if not len(groups):
            return
        if (groups.start % self.fine).any():
            raise ValueError("history.add: groups must be aligned to the fine resolution")
        rows, rep = self._expand(groups, series_keys)
        if hourly:
            self._add_hourly(rows, rep, groups)
            self._add_open(rows, rep, groups)
        adds = groups.adds[rep]
        slot, ok = self._claim(self.fine_ring, np.repeat(groups.start // self.fine, 3), self.fine_add, 0.0,
                               self.fine_sessions, self.fine_slow)
        _add_at_cells(self.fine_add, rows[ok], slot[ok], adds[ok])
        if groups.lags is not None:
            self._add_lags(rows, rep, groups)
        if groups.session_bins is not None:
            self._add_slow(rows.reshape(-1, 3), slot.reshape(-1, 3)[:, 0], ok.reshape(-1, 3)[:, 0], groups.session_bins)
        if groups.sessions is not None:
            split = groups.sessions.reshape(len(groups), -1)[rep]
            _add_at_cells(self.fine_sessions, rows[ok], slot[ok], split[ok])
            if hourly:
                hslot, hok = self._claim(self.session_hours, np.repeat(groups.start // 3600, 3), self.hour_sessions, 0.0)
                _add_at_cells(self.hour_sessions, rows[hok], hslot[hok], split[hok])
        absolute = np.repeat(groups.start // self.coarse, 3)
        requests = groups.adds[rep, F["requests"]]
        sizes = groups.adds[rep][:, _SLOT_COLUMNS]
        self._hand_on_bursts(rows, absolute, requests, sizes)
        slot, ok = self._claim_coarse(absolute)
        _scatter(self.coarse_sk, rows, slot, ok, groups.nonzero_bins())
        np.add.at(self.coarse_req, (rows[ok], slot[ok]), requests[ok])
        _add_at_cells(self.coarse_size, rows[ok], slot[ok], sizes[ok])
        self.coarse_dirty.update(np.unique(slot[ok]).tolist())

    def add_hours(self, groups: Groups, series_keys: dict[int, tuple[str, str, str]]) -> None:
        """Fold hourly groups (the store's hourly buckets, at start-up).

        The groups' sketches are summed per (hour, scope) first (`_sum_sketches`: a few
        bincounts over all their bins, no per-scope copies of them); those sums give the
        hours' quantiles and are what the open-hour slots receive. The hourly and open-hour
        state left is the one `add` leaves for the same groups, plus the quantiles of every
        hour they cover."""
        if not len(groups):
            return
        rows, rep = self._expand(groups, series_keys)
        self._add_hourly(rows, rep, groups)
        hour = groups.start // 3600
        first = int(hour.min())
        hours, hour_code = _codes(hour - first, int(hour.max()) - first + 1)
        # One key per (hour, scope), hour-major, so the keys of an hour are a run.
        n = self.size
        key, entry = _codes(hour_code[:, None] * n + rows.reshape(-1, 3), len(hours) * n)
        key_hour, key_row = first + hours[key // n], key % n
        # Every series is in one app, so an hour's global sketch is the sum of the hour's app
        # sketches: adding those few rows saves counting every bin a third time.
        sums = [_sum_sketches(entry[:, 1:], bins, len(key)) for bins in groups.nonzero_bins()]
        _sum_into_parents(sums, entry[:, 1], entry[:, 0])
        runs = np.searchsorted(key // n, np.arange(len(hours) + 1)).tolist()
        entries = (3 * np.bincount(hour_code, minlength=len(hours))).tolist()
        self._add_open_sums((first + hours).tolist(), runs, entries, key_row, sums)
        slot, ok = self.hours.slots_for(key_hour)
        for k, kind in enumerate(SKETCHES):
            self.hour_q[key_row[ok], slot[ok], k] = _quantiles(sums[k][ok], QUANTILES[kind])

    def _add_open_sums(self, hours: list[int], runs: list[int], entries: list[int], key_row: np.ndarray,
                       sums: list[np.ndarray]) -> None:
        """`_add_open` for sketches already summed per (hour, scope): the same claims,
        finalised hours and late counts, hour by hour in order. The keys of hours[j] are
        runs[j]:runs[j + 1] of `key_row` and `sums`; `entries` counts its (group, scope) pairs."""
        for j, hour in enumerate(hours):
            held = self.open.tag.copy()          # claim() re-tags the slots it clears
            slot, ok, cleared = self.open.claim(np.array([hour]))
            for s in cleared:
                self._finalise_open(s, int(held[s]))
                self.open_sk[:, s] = 0
            if not ok[0]:
                self.late_sketch_groups += entries[j]
                continue
            lo, hi, s = runs[j], runs[j + 1], int(slot[0])
            for k, summed in enumerate(sums):
                self.open_sk[key_row[lo:hi], s, k] += summed[lo:hi].astype(np.int64)
            self._dirty_open.add(s)

    def _expand(self, groups: Groups, series_keys: dict[int, tuple[str, str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """Each group once per scope it belongs to: flat scope rows and the group of each."""
        rows = self.scope_rows(groups.series, series_keys).reshape(-1)
        return rows, np.repeat(np.arange(len(groups)), 3)

    def _claim(self, ring: Ring, absolute: np.ndarray, data: np.ndarray, fill: float,
               *more: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Claim slots of `ring`; a recycled slot is cleared in `data` and in `more`."""
        slot, ok, cleared = ring.claim(absolute)
        for s in cleared:
            data[:, s] = fill
            for other in more:
                other[:, s] = fill
        return slot, ok

    def _hand_on_bursts(self, rows: np.ndarray, absolute: np.ndarray, requests: np.ndarray,
                        sizes: np.ndarray) -> None:
        """Before a batch claims coarse slots: every coarse slot that this batch completes
        (the ring moves past it) hands its request count per scope, the ring's part plus the
        batch's, to the burstiness sums of its hour. Slots the ring holds on, and late
        records for slots it has already handed on, are left alone (an hour with a late
        record no longer adds up and is left out of the burstiness). So a day in one batch
        and the same day a minute at a time leave the same sums. The slot's request sizes
        (`sizes`, SLOT_SIZE_FIELDS per entry) are handed on the same way, to the hour's
        statistics of slot means (`_fold_slot_sizes`)."""
        ring = self.coarse_ring
        held = ring.tag.copy()
        after = held.copy()
        uniq = np.unique(absolute)
        np.maximum.at(after, uniq % ring.n, uniq)
        recycled = np.flatnonzero((held >= 0) & (after > held))
        s_of = absolute % ring.n
        done = (absolute < after[s_of]) & (absolute >= held[s_of])      # completed by this batch (not late)
        if not recycled.size and not done.any():
            return
        n = self.size
        totals: dict[int, np.ndarray] = {}                   # absolute slot -> (S, 1 + SLOT_SIZE_FIELDS)
        for s in recycled.tolist():
            totals[int(held[s])] = np.concatenate([self.coarse_req[:n, s, None], self.coarse_size[:n, s]], axis=1)
            self.coarse_req[:, s] = 0.0                                # handed on: the claim clears the rest
            self.coarse_size[:, s] = 0.0
        values = np.concatenate([requests[:, None], sizes], axis=1)
        for a in np.unique(absolute[done]).tolist():
            sel = done & (absolute == a)
            part = np.zeros((n, values.shape[1]))
            np.add.at(part, rows[sel], values[sel])
            totals[a] = totals[a] + part if a in totals else part
        for a, counts in totals.items():
            self._fold_burst(a, counts)
        self._measure_blocks()

    def _claim_coarse(self, absolute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Claim coarse slots (their counts were handed on by `_hand_on_bursts`)."""
        slot, ok, cleared = self.coarse_ring.claim(absolute)
        for s in cleared:
            self.coarse_sk[:, s] = 0
            self.coarse_req[:, s] = 0.0
            self.coarse_size[:, s] = 0.0
            self.coarse_dirty.add(s)
        return slot, ok

    def _fold_burst(self, coarse_abs: int, values: np.ndarray) -> None:
        """Fold one finished coarse slot, (S, 1 + SLOT_SIZE_FIELDS) requests and sizes per
        scope, into its hour."""
        hour = coarse_abs * self.coarse // 3600
        hslot = hour % self.hours.n
        if self.hours.tag[hslot] == hour:
            n = values.shape[0]
            counts = values[:, 0]
            self.hour_burst[:n, hslot, 0] += counts
            self.hour_burst[:n, hslot, 1] += counts * counts
            self._fold_slot_sizes(np.arange(n), np.full(n, hslot), values[:, None, 1:])
            self._count_slots(np.arange(n), hour, hslot, (coarse_abs * self.coarse - hour * 3600) // self.coarse,
                              counts)
            self._changed(hour)

    def _count_slots(self, rows: np.ndarray, hour: int, hslot: int, index: int | np.ndarray,
                     counts: np.ndarray) -> None:
        """Add finished coarse slots' request counts (scope `rows`, the slot's `index` in
        `hour`) to the hour's slot counts; the caller then measures the hour's blocks again
        (`_measure_blocks`), once for all the slots it handed on: a batch of two days at a
        one-minute window finishes some 18,000 slots, and measuring the hour at each of
        them took about 60 % of its ingest. An hour older than the last BURST_HOURS is left
        as it is: its blocks then hold fewer requests than its slots, and
        `baseline.window_dispersion` leaves it out."""
        bslot, ok, cleared = self.burst_hours.claim(np.array([hour]))
        for c in cleared:
            self._measure_blocks(c)                 # the hour leaving the slot counts, as it stands
            self.slot_counts[:, c] = 0.0
        if not ok[0]:
            return
        b = int(bslot[0])
        np.add.at(self.slot_counts[:, b], (rows, np.broadcast_to(np.asarray(index), rows.shape)), counts)
        moved = self._unmeasured.get(b)
        touched = np.unique(rows) if moved is None else np.union1d(moved[2], rows)
        self._unmeasured[b] = (hour, hslot, touched)

    def _measure_blocks(self, slot: int | None = None) -> None:
        """Measure the blocks (`baseline.block_stats`) of the hours whose slot counts moved
        since they were last measured: all of them, or the one in `slot` of burst_hours."""
        for b in list(self._unmeasured) if slot is None else [slot]:
            got = self._unmeasured.pop(b, None)
            if got is None:
                continue
            hour, hslot, rows = got
            if self.hours.tag[hslot] == hour:
                self.hour_blocks[rows, hslot] = block_stats(self.slot_counts[rows, b])

    def _fold_slot_sizes(self, rows: np.ndarray, hslots: np.ndarray, sums: np.ndarray) -> None:
        """Add finished windows (one set per entry: scope row, hour slot, (WINDOW_SLOTS,
        SLOT_SIZE_FIELDS) sums) to their hours' statistics of window mean log sizes
        (`baseline.window_stats`): per length and kind, the number of windows with sized
        requests, the sums of their means and squared means, of the squares of their log
        sizes about their means, of their requests less one and of one over their requests."""
        sized = sums.reshape(len(rows), len(WINDOW_SLOTS), len(SIZE_KINDS), 3)
        cnt, tot, sq = sized[..., 0], sized[..., 1], sized[..., 2]
        has = cnt > 0
        keep = has.reshape(len(rows), -1).any(axis=1)
        if not keep.any():
            return
        rows, hslots, cnt, tot, sq, has = rows[keep], hslots[keep], cnt[keep], tot[keep], sq[keep], has[keep]
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(has, tot / cnt, 0.0)
            inv = np.where(has, 1.0 / cnt, 0.0)
        within = np.where(has, np.maximum(sq - tot * m, 0.0), 0.0)     # squares about the window's mean
        dof = np.where(has, cnt - 1.0, 0.0)
        add = np.stack([has.astype(np.float64), m, m * m, within, dof, inv], axis=-1)
        np.add.at(self.hour_slots, (rows, hslots), add)

    def bursts_final_before(self) -> int:
        """The first hour whose burstiness sums may still change: every coarse slot of the
        hours before it has left the ring."""
        held = self.coarse_ring.tag[self.coarse_ring.tag >= 0]
        if not held.size:
            return -(2 ** 62)
        return int(held.min()) * self.coarse // 3600

    def burst_rows(self, first: int, end: int) -> list[tuple[str, int, float, float]]:
        """(scope key, hour, sum, sum of squares) of the hours [first, end) the ring holds,
        for scopes that had requests in them."""
        out = []
        hours = np.arange(first, end)
        slot, ok = self.hours.slots_for(hours)
        n = self.size
        for h, s in zip(hours[ok].tolist(), slot[ok].tolist()):
            rows = np.flatnonzero(self.hour_burst[:n, s, 0] > 0)
            for r in rows.tolist():
                out.append((scope_text(self.keys[r]), h, float(self.hour_burst[r, s, 0]), float(self.hour_burst[r, s, 1])))
        return out

    def burst_block_rows(self, first: int, end: int) -> list[tuple[str, int, bytes]]:
        """(scope key, hour, its block statistics as float64 bytes, 1 + BLOCK_SLOTS) of the
        hours [first, end) the ring holds, for scopes that had requests in them."""
        return self._cell_rows(self.hour_blocks, first, end)

    def load_burst_blocks(self, rows: list[tuple[str, int, bytes]]) -> None:
        """Block statistics stored by `burst_block_rows`, for the hours the ring holds (at
        start-up), as `load_slot_sizes`; a row of another shape (another version) is skipped,
        and its hour's blocks then read as unknown."""
        self._load_cells("hour_blocks", rows)

    def slot_size_rows(self, first: int, end: int) -> list[tuple[str, int, bytes]]:
        """(scope key, hour, statistics of its windows' mean sizes as float64 bytes,
        WINDOW_SLOTS x SIZE_KINDS x baseline.WINDOW_STATS) of the hours [first, end) the ring
        holds, for scopes that had sized requests in them."""
        return self._cell_rows(self.hour_slots, first, end)

    def load_slot_sizes(self, rows: list[tuple[str, int, bytes]]) -> None:
        """Slot size statistics stored by `slot_size_rows`, for the hours the ring holds (at
        start-up); a row of another shape (another version) is skipped. All rows at once
        (a row per scope and hour: 337,000 for 1,000 scopes and 14 days), into the array
        by index; scopes new to the history are numbered in the order their rows come."""
        self._load_cells("hour_slots", rows)

    def _cell_rows(self, array: np.ndarray, first: int, end: int) -> list[tuple[str, int, bytes]]:
        """(scope key, hour, the scope's cell of the hourly `array` as float64 bytes) of the
        hours [first, end) the ring holds, for the scopes whose cell counted something (the
        statistics' first entries, counts, sum above 0)."""
        out = []
        hours = np.arange(first, end)
        slot, ok = self.hours.slots_for(hours)
        n = self.size
        for h, s in zip(hours[ok].tolist(), slot[ok].tolist()):
            rows = np.flatnonzero(array[:n, s, ..., 0].reshape(n, -1).sum(axis=1) > 0)
            for r in rows.tolist():
                out.append((scope_text(self.keys[r]), h, array[r, s].astype("<f8").tobytes()))
        return out

    def _load_cells(self, name: str, rows: list[tuple[str, int, bytes]]) -> None:
        """Stored cells (`_cell_rows`) into the hourly array `name`, all rows at once, by
        index; a row of another size is skipped. By name: a scope new to the history grows
        (reallocates) every array."""
        width = math.prod(getattr(self, name).shape[2:])
        blobs = list(map(itemgetter(2), rows))
        fits = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)) == 8 * width
        cell, take = self._restored_cells(rows, fits)
        if take.size:
            data = np.frombuffer(b"".join([blobs[i] for i in take.tolist()]), dtype="<f8").reshape(-1, width)
            getattr(self, name).reshape(-1, width)[cell] = data     # a view: the hourly arrays are contiguous
            self._gathered = None

    def _restored_cells(self, rows: Sequence[tuple[Any, ...]], fits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For stored rows (scope key, hour, ...): the (scope row x hour slot) cell of each
        one that counts, as an index into the two flattened leading axes of an hour array,
        and which row it is. A row counts when it `fits` and the ring holds its hour; of two
        rows for one cell, the later, as when rows are read one by one. Scopes new to the
        history are numbered in the order their rows come."""
        hours = np.fromiter(map(itemgetter(1), rows), dtype=np.int64, count=len(rows))
        slot, held = self.hours.slots_for(hours)
        idx = np.flatnonzero(held & fits)
        if not idx.size:
            return idx, idx
        texts = [rows[i][0] for i in idx.tolist()]
        scope = {text: self._scope(scope_key(text)) for text in dict.fromkeys(texts)}
        cell = np.fromiter(map(scope.__getitem__, texts), dtype=np.int64, count=len(texts)) * self.hours.n + slot[idx]
        _, last = np.unique(cell[::-1], return_index=True)
        last = len(cell) - 1 - last
        return cell[last], idx[last]

    def take_slot_sizes(self, hours: np.ndarray) -> np.ndarray:
        """Window size statistics (S, H, WINDOW_SLOTS, SIZE_KINDS, WINDOW_STATS) of the given
        absolute hours (zero where the ring has none)."""
        slot, ok = self.hours.slots_for(hours)
        out = np.take(self.hour_slots[: self.size], slot, axis=1)
        out[:, ~ok] = 0.0
        return out

    def load_bursts(self, rows: list[tuple[str, int, float, float]]) -> None:
        """Burstiness sums stored by `burst_rows`, for the hours the ring holds (at start-up);
        all rows at once, as `load_slot_sizes`."""
        cell, take = self._restored_cells(rows, np.ones(len(rows), dtype=bool))
        if take.size:
            sums = np.stack([np.fromiter(map(itemgetter(k), rows), dtype=np.float64, count=len(rows))
                             for k in (2, 3)], axis=1)[take]
            self.hour_burst.reshape(-1, 2)[cell] = sums         # a view: hour_burst is contiguous
            self._gathered = None

    def add_bursts(self, chunks: list[Groups], series_keys: dict[int, tuple[str, str, str]]) -> None:
        """Burstiness sums of the hours minute buckets cover (at start-up, for minutes before
        those the window rings are fed), as `add` leaves them once the coarse slots recycle.
        All chunks at once: a coarse slot's minutes may fall in two chunks."""
        chunks = [g for g in chunks if len(g)]
        if not chunks:
            return
        groups = Groups(np.concatenate([g.series for g in chunks]), np.concatenate([g.start for g in chunks]),
                        np.concatenate([g.adds for g in chunks]), None, [])
        rows, rep = self._expand(groups, series_keys)
        key, inv = np.unique(rows * (1 << 40) + np.repeat(groups.start // self.coarse, 3), return_inverse=True)
        inv = inv.reshape(-1)
        counts = np.bincount(inv, weights=groups.adds[rep, F["requests"]], minlength=key.shape[0])
        sizes = np.stack([np.bincount(inv, weights=groups.adds[rep, c], minlength=key.shape[0]) for c in _SLOT_COLUMNS],
                         axis=1)
        row, coarse_abs = key >> 40, key & ((1 << 40) - 1)
        hour = coarse_abs * self.coarse // 3600
        slot, ok = self.hours.slots_for(hour)
        np.add.at(self.hour_burst, (row[ok], slot[ok], 0), counts[ok])
        np.add.at(self.hour_burst, (row[ok], slot[ok], 1), counts[ok] ** 2)
        self._fold_slot_sizes(row[ok], slot[ok], sizes[ok][:, None, :])
        index = (coarse_abs * self.coarse - hour * 3600) // self.coarse
        for h in np.unique(hour[ok]).tolist():          # oldest first: the newest stay in the slot counts
            sel = ok & (hour == h)
            self._count_slots(row[sel], h, int(self.hours.slots_for(np.array([h]))[0][0]), index[sel], counts[sel])
        self._measure_blocks()
        self._gathered = None

    def _add_hourly(self, rows: np.ndarray, rep: np.ndarray, groups: Groups) -> None:
        hour = groups.start // 3600
        self._changed(int(hour.min()))
        np.minimum.at(self.first_hour, rows, np.repeat(hour, 3))
        held = self.hours.tag.copy()                    # claim() re-tags the slots it clears
        slot, ok, cleared = self.hours.claim(hour)      # per group, then per (group, scope)
        evicted = [int(held[s]) for s in cleared if held[s] >= 0]
        if evicted:     # an hour left the ring: statistics that included it are stale
            self._changed(min(evicted))
        for s in cleared:
            self.hour_add[:, s] = 0.0
            self.hour_q[:, s] = np.nan
            self.hour_burst[:, s] = 0.0
            self.hour_blocks[:, s] = 0.0
            self.hour_slots[:, s] = 0.0
        slot, ok = np.repeat(slot, 3), np.repeat(ok, 3)
        _add_at_cells(self.hour_add, rows[ok], slot[ok], groups.adds[rep][ok])

    def _changed(self, hour: int) -> None:
        """Note that the hourly ring's `hour` changed: statistics over it are stale."""
        self.changed_from_hour = min(self.changed_from_hour, hour)
        self._gathered_stale_from = min(self._gathered_stale_from, hour)

    def _add_open(self, rows: np.ndarray, rep: np.ndarray, groups: Groups) -> None:
        """Sketches of the newest hours, whose quantiles are still changing.

        Hours are taken in order so that a replay batch spanning many hours finalises each
        hour's quantiles before its slot is reused (a loop over hours, not records)."""
        hour_abs = np.repeat(groups.start // 3600, 3)
        bins = groups.nonzero_bins()
        slot_all = np.zeros(hour_abs.shape[0], dtype=np.int64)
        for hour in np.unique(hour_abs):
            sel = hour_abs == hour
            held = self.open.tag.copy()          # claim() re-tags the slots it clears
            slot, ok, cleared = self.open.claim(hour_abs[sel])
            for s in cleared:
                self._finalise_open(s, int(held[s]))
                self.open_sk[:, s] = 0
            if not ok[0]:
                self.late_sketch_groups += int(sel.sum())
                continue
            slot_all[sel] = slot
            _scatter(self.open_sk, rows, slot_all, sel, bins)
            self._dirty_open.add(int(slot[0]))

    def _finalise_open(self, open_slot: int, hour: int | None = None) -> None:
        """Quantiles of the hour an open slot holds (`hour`: the one it held before a claim)."""
        hour = int(self.open.tag[open_slot]) if hour is None else hour
        self._dirty_open.discard(open_slot)
        if hour < 0:
            return
        self._changed(hour)
        hslot = hour % self.hours.n
        if self.hours.tag[hslot] != hour:
            return
        n = self.size
        sk = self.open_sk[:n, open_slot]
        total = sk.sum(axis=-1)
        qs = _window_quantiles(sk, total)           # `_quantiles` of every kind, in one pass
        for k, kind in enumerate(SKETCHES):
            self.hour_q[:n, hslot, k] = np.where(total[:, k] >= MIN_SKETCH_COUNT, qs[kind], np.nan)

    def refresh_open_hours(self, before_hour: int | None = None) -> None:
        """Recompute the quantiles of open hours that received data (those before
        `before_hour` only: later ones are not in any baseline yet)."""
        for s in sorted(self._dirty_open):
            if before_hour is None or self.open.tag[s] < before_hour:
                self._finalise_open(s)

    # --- reads ------------------------------------------------------------------------

    def window_values(self, t: float) -> WindowValues:
        """Sums and quantiles over the window (t - window, t]."""
        n = self.size
        lo = math.floor((t - self.window) / self.fine) + 1
        fine_abs = np.arange(lo, math.floor(t / self.fine) + 1)
        slot, ok = self.fine_ring.slots_for(fine_abs)
        adds = _sum_in_order(self.fine_add[:n], slot[ok])
        lo = math.floor((t - self.window) / self.coarse) + 1
        coarse_abs = np.arange(lo, math.floor(t / self.coarse) + 1)
        slot, ok = self.coarse_ring.slots_for(coarse_abs)
        sk = _sum_slots(self.coarse_sk[:n], slot[ok])    # a window's counts fit in 32 bits
        total = sk.sum(axis=-1)
        counts = {kind: total[:, k] for k, kind in enumerate(SKETCHES)}
        return WindowValues(adds, _window_quantiles(sk, total), counts)

    def take_bursts(self, hours: np.ndarray) -> np.ndarray:
        """Burstiness sums (S, H, 2) of the given absolute hours (zero where the ring has none)."""
        slot, ok = self.hours.slots_for(hours)
        out = np.take(self.hour_burst[: self.size], slot, axis=1)
        out[:, ~ok] = 0.0
        return out

    def baseline_hours(self, hours: np.ndarray) -> BaselineHours:
        """Everything the baseline statistics read of the given consecutive absolute hours
        (see `BaselineHours`), as read-only views of the hours gathered so far
        (`_GatheredHours`): only hours not gathered yet, or changed since (`_changed`), are
        gathered from the rings. The values are those the rings hold, whichever hours were
        gathered when.

        The ring zeroes (NaNs) the hours it no longer holds for every scope at once, so the
        only other unknown hours are those before a young scope's first hour: only those
        cells are masked, where masking whole (S, H, F) arrays would cost more than
        gathering them."""
        n, count = self.size, len(hours)
        first = int(hours[0]) if count else 0
        if count == 0 or not np.array_equal(hours, np.arange(first, first + count)):
            raise ValueError("baseline_hours: hours must be consecutive and ascending")
        rings = (self.hour_add, self.hour_q, self.hour_burst, self.hour_slots, self.hour_blocks)
        widths = tuple(math.prod(r.shape[2:]) for r in rings)
        g = self._gathered
        if g is None or g.rows != n or g.capacity < count + g.LEAD + g.SLACK:
            g = self._gathered = _GatheredHours(n, widths, count, first)
        g.forget_from(self._gathered_stale_from)
        self._gathered_stale_from = np.iinfo(np.int64).max
        cols = g.place(first, count)
        missing = np.flatnonzero(g.hour[cols] != hours)
        if missing.size:
            self._gather_into(g, cols[missing], hours[missing], rings)
        slot, ok = self.hours.slots_for(hours)
        early = hours[None, :] < self.first_hour[:n, None]
        adds, q, bursts, slots, blocks = (g.view(k, cols) for k in range(len(rings)))
        return BaselineHours(~ok[None, :] | early, adds, q, bursts, blocks,
                             slots.reshape((n, count) + self.hour_slots.shape[2:]))

    def _gather_into(self, g: _GatheredHours, cols: np.ndarray, hours: np.ndarray,
                     rings: tuple[np.ndarray, ...]) -> None:
        """Copy the given absolute hours of every scope from the hourly rings into columns
        `cols` of `g`: zero (NaN for quantiles) where the ring no longer holds an hour, and
        in the hours before a scope's first (its bursts and blocks as held: `burstiness` and
        `window_dispersion` read an hour without requests as not seen whole)."""
        n = g.rows
        slot, ok = self.hours.slots_for(hours)
        early = hours[None, :] < self.first_hour[:n, None]
        for ring, plane in zip(rings, g.planes):
            fill = np.nan if ring is self.hour_q else 0.0
            flat = ring[:n].reshape(n, self.hours.n, plane.shape[0])
            block = max(1, (4 << 20) // max(1, len(slot) * flat.shape[2] * 8))
            for a in range(0, n, block):          # a block of scopes at a time, transposed in cache
                part = np.take(flat[a:a + block], slot, axis=1)
                part[:, ~ok] = fill
                if ring is not self.hour_burst and ring is not self.hour_blocks:
                    part[early[a:a + block]] = fill
                plane[:, a:a + block, cols] = part.transpose(2, 0, 1)
        g.hour[cols] = hours

    def held_hours(self, hours: np.ndarray) -> np.ndarray:
        """Which of the given absolute hours the hourly ring holds."""
        return self.hours.slots_for(hours)[1]

    def _add_lags(self, rows: np.ndarray, rep: np.ndarray, groups: Groups) -> None:
        """A batch's requests per arrival-lag bin, into the hours they started in."""
        assert groups.lags is not None
        hslot, hok = self._claim(self.lag_hours, np.repeat(groups.start // 3600, 3), self.hour_lags, 0.0)
        _add_at_cells(self.hour_lags, rows[hok], hslot[hok], groups.lags[rep][hok])

    def add_lags(self, series: np.ndarray, latency: np.ndarray, is_error: np.ndarray, ts: np.ndarray,
                 series_keys: dict[int, tuple[str, str, str]]) -> None:
        """Learn arrival lags from records re-read at start-up (the raw records of the last
        day): the hours they fill are those the process held."""
        bins = arrival.lag_cells(latency, is_error)
        keep = bins >= 0
        if not keep.any():
            return
        rows = self.scope_rows(series[keep], series_keys)                # (n, 3)
        hslot, hok = self._claim(self.lag_hours, np.repeat(np.floor(ts[keep] / 3600).astype(np.int64), 3),
                                 self.hour_lags, 0.0)
        np.add.at(self.hour_lags, (rows.reshape(-1)[hok], hslot[hok], np.repeat(bins[keep], 3)[hok]), 1.0)

    def outcome_shares(self, t: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(all, successes, failures), each (S, k): the share of each of the last k fine
        slots' records (the slot holding t first) that has arrived by t, from each scope's
        latencies over the hours of the last day, weighed by age (`arrival`); and the same
        for each outcome apart, from its own latencies (a scope with few failures borrows
        the shape of all traffic's failures)."""
        hist = self._lag_hist(t)
        n_bins = arrival.N_LAG_BINS
        ok, failed = hist[:, :n_bins], hist[:, n_bins:]
        return self._shares(ok + failed, t, k), self._shares(ok, t, k), self._shares(failed, t, k)

    def _lag_hist(self, t: float) -> np.ndarray:
        """(S, LAG_CELLS) each scope's lag counts over the hours of the last day up to t,
        weighed by age."""
        hour = math.floor(t / 3600)
        slot, ok = self.lag_hours.slots_for(np.arange(hour - arrival.LAG_HOURS + 1, hour + 1))
        weight = np.where(ok, arrival.hour_weights(), 0.0)                  # oldest first
        out: np.ndarray = np.einsum("shb,h->sb", self.hour_lags[:self.size][:, slot], weight)
        return out

    def _shares(self, hist: np.ndarray, t: float, k: int) -> np.ndarray:
        """(S, k) the shares of the last k fine slots in by t, for lag histograms (S, N_LAG_BINS)."""
        g = self._index.get(("global", "", "", ""))
        total = float(hist[g].sum()) if g is not None else 0.0
        cdf = arrival.lag_cdf(hist, hist[g] / total if g is not None and total > 0 else None)
        t_end = math.floor(t / self.fine) * self.fine + self.fine        # the end of the slot holding t
        i = np.arange(k)
        return arrival.arrived_share(cdf, t - (t_end - (i + 1) * self.fine), t - (t_end - i * self.fine), self.fine)

    def recent_slots(self, t: float, k: int, field: int) -> np.ndarray:
        """(S, k) one field of each of the last k fine slots, the slot holding t first."""
        hi = math.floor(t / self.fine)
        slot, ok = self.fine_ring.slots_for(np.arange(hi - k + 1, hi + 1))
        out: np.ndarray = np.where(ok, self.fine_add[:self.size][:, slot, field], 0.0)[:, ::-1]
        return out

    def recent_sums(self, t: float, slot_counts: list[int]) -> np.ndarray:
        """(S, W, F) sums over the last k fine slots up to the one holding t, for each k of
        `slot_counts` (the newest slot is still filling)."""
        n, k_max = self.size, max(slot_counts)
        hi = math.floor(t / self.fine)
        slot, ok = self.fine_ring.slots_for(np.arange(hi - k_max + 1, hi + 1))
        return _sums_from_newest(self.fine_add[:n], slot, ok, slot_counts)

    def recent_sessions(self, t: float, slot_counts: list[int], rows: np.ndarray) -> np.ndarray:
        """(len(rows), W, SESSION_BUCKETS, len(SESSION_FIELDS)): `recent_sums` of the given
        scope rows split by session bucket (read for the few scopes whose evidence passed)."""
        k_max = max(slot_counts)
        hi = math.floor(t / self.fine)
        slot, ok = self.fine_ring.slots_for(np.arange(hi - k_max + 1, hi + 1))
        data = self.fine_sessions[rows][:, slot]
        data[:, ~ok] = 0.0
        back = np.cumsum(data[:, ::-1], axis=1)[:, np.asarray(slot_counts) - 1]
        return back.reshape(len(rows), len(slot_counts), SESSION_BUCKETS, len(SESSION_FIELDS))

    def _add_slow(self, rows: np.ndarray, slot: np.ndarray, ok: np.ndarray, bins: Bins) -> None:
        """Count a batch's timing samples that name a session into `fine_slow`: per scope
        row (`rows` (G, 3) per group, `slot` and `ok` its fine slot), session bucket and
        kind, all samples and those at or above the scope's threshold bin (few: the bins
        are summed per group and bucket first, and only those beyond a threshold kept)."""
        n_thr, nk = self._slow_thr.shape[0], len(SKETCHES)
        table = np.vstack([self._slow_thr, np.full((1, nk), -1, dtype=np.int64)])   # scopes newer than it: none
        width, n_groups = self.fine_slow.shape[2], rows.shape[0]
        base = (rows * self.fine_ring.n + slot[:, None]) * width                    # (G, 3) each row's slot
        cells, values = [], []
        for k, (cell, b, count) in enumerate(bins):
            keep = ok[cell // SESSION_BUCKETS]
            cell, b, count = cell[keep], b[keep], count[keep]
            samples = np.bincount(cell, weights=count, minlength=n_groups * SESSION_BUCKETS)
            at = np.flatnonzero(samples)
            g, bucket = at // SESSION_BUCKETS, at % SESSION_BUCKETS
            cells.append((base[g] + ((bucket * nk + k) * 2)[:, None]).reshape(-1))
            values.append(np.repeat(samples[at], 3))
            g, bucket = cell // SESSION_BUCKETS, cell % SESSION_BUCKETS
            thr = table[np.minimum(rows[g], n_thr), k]                              # (E, 3)
            e, j = np.nonzero((thr >= 0) & (b[:, None] >= thr))
            cells.append(base[g[e], j] + (bucket[e] * nk + k) * 2 + 1)
            values.append(count[e].astype(np.float64))
        np.add.at(self.fine_slow.reshape(-1), np.concatenate(cells), np.concatenate(values).astype(np.float32))

    def recent_slow(self, t: float, slot_counts: list[int], rows: np.ndarray, kind: int) -> np.ndarray:
        """(len(rows), W, SESSION_BUCKETS, 2): the windows' timing samples of one sketch kind
        (its index in SKETCHES) of the given scope rows per session bucket, all and those at
        or above the threshold bin in force when they came (read for the few scopes whose
        evidence passed). Only that kind's cells are summed: the evaluation reads one kind
        at a time, and summing all of them cost a quarter of a steady evaluation."""
        k_max = max(slot_counts)
        hi = math.floor(t / self.fine)
        slot, ok = self.fine_ring.slots_for(np.arange(hi - k_max + 1, hi + 1))
        cells = self.fine_slow[rows[:, None], slot[None, :]].reshape(len(rows), k_max, SESSION_BUCKETS, len(SKETCHES), 2)
        data = cells[:, :, :, kind].astype(np.float64)
        data[:, ~ok] = 0.0
        return np.cumsum(data[:, ::-1], axis=1)[:, np.asarray(slot_counts) - 1]

    def recent_hour_sessions(self, end: int, k: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows), SESSION_BUCKETS, len(SESSION_FIELDS)): the sums of the k whole hours up
        to `end` (hours end+1-k .. end) of the given scope rows split by session bucket; zeros
        for hours the ring no longer (or never) held, whose requests are in no bucket."""
        slot, ok = self.session_hours.slots_for(np.arange(end + 1 - k, end + 1))
        data = self.hour_sessions[rows][:, slot]
        data[:, ~ok] = 0.0
        return data.sum(axis=1).reshape(len(rows), SESSION_BUCKETS, len(SESSION_FIELDS))

    def recent_exceedances(self, t: float, n_slots: int, thresholds: np.ndarray,
                           version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per coarse slot of the last `n_slots` (oldest first): samples at or above each
        kind's threshold bin (S, n_slots, kinds), all samples (same shape), and the slots'
        absolute indices. `thresholds` (S, kinds) holds a bin per scope and kind (-1: none).

        A slot's counts are kept until it changes, and a scope's until its thresholds do: so
        each evaluation counts only the slots that received records since the last, and the
        first after the hour turns (a new baseline, a new `version` of the thresholds) only
        the scopes whose threshold bins moved."""
        n, nk, nb = self.size, len(SKETCHES), sketch.NBINS
        if self._exc_above.shape[0] < self._cap:
            self._exc_above = np.zeros((self._cap, self.coarse_ring.n, nk))
            self._exc_total = np.zeros((self._cap, self.coarse_ring.n, nk))
            self._exc_thr = np.zeros((self.coarse_ring.n, self._cap, nk), dtype=np.int64)
            self._exc_tag = np.full(self.coarse_ring.n, -1, dtype=np.int64)
            self._exc_size = 0
        hi = math.floor(t / self.coarse)
        absolute = np.arange(hi - n_slots + 1, hi + 1)
        slot, ok = self.coarse_ring.slots_for(absolute)
        thr = np.clip(thresholds[:n], -1, nb)
        self._slow_thr = thr.copy()
        for s in sorted({int(s) for s, o in zip(slot.tolist(), ok.tolist()) if o}):
            if self._exc_size != n or self._exc_tag[s] != self.coarse_ring.tag[s] or s in self.coarse_dirty:
                # new scopes, or the slot changed: count all of it
                self._exc_above[:n, s], self._exc_total[:n, s] = _exceedances(self.coarse_sk[:n, s], thr)
                self._exc_thr[s, :n] = thr
            elif self._exc_version[s] != version:
                for k in range(nk):         # the totals stand; the samples beyond moved thresholds do not
                    rows = np.flatnonzero(self._exc_thr[s, :n, k] != thr[:, k])
                    above, _ = _exceedances(self.coarse_sk[rows, s, k][:, None], thr[rows, k][:, None])
                    self._exc_above[rows, s, k] = above[:, 0]
                    self._exc_thr[s, rows, k] = thr[rows, k]
            else:
                continue
            self._exc_tag[s], self._exc_version[s] = self.coarse_ring.tag[s], version
            self.coarse_dirty.discard(s)
        self._exc_size = n
        above = np.take(self._exc_above[:n], slot, axis=1)
        total = np.take(self._exc_total[:n], slot, axis=1)
        above[:, ~ok] = 0.0
        total[:, ~ok] = 0.0
        return above, total, absolute

    def coarse_sketches(self, rows: np.ndarray, absolute: np.ndarray, kind: int) -> np.ndarray:
        """(len(rows), len(absolute), NBINS) sketches of one kind of the given scope rows in
        the given coarse slots (zero where the ring does not hold a slot)."""
        slot, ok = self.coarse_ring.slots_for(np.asarray(absolute))
        out = self.coarse_sk[rows[:, None], slot[None, :], kind].astype(np.int64)
        out[:, ~ok] = 0
        return out

    def app_model_pairs(self) -> np.ndarray:
        """(P, 2) scope rows of every (app, model) pair that shares a series."""
        if not self._sid_rows.shape[0]:
            return np.zeros((0, 2), dtype=np.int64)
        return np.unique(self._sid_rows[:, 1:], axis=0)

    def _take_hours(self, hours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sums (S, H, F) and quantiles (S, H, K) of the given absolute hours (zero / NaN where
        the ring has none), each field stored contiguously (see `_take_planes`)."""
        n = self.size
        slot, ok = self.hours.slots_for(hours)
        adds = _take_planes(self.hour_add[:n], slot)
        q = _take_planes(self.hour_q[:n], slot)
        if not ok.all():                                 # hours the ring no longer holds
            np.copyto(adds, 0.0, where=~ok[None, :, None])
            np.copyto(q, np.nan, where=~ok[None, :, None])
        return adds, q

    def volume_hours(self, hours: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Requests, cost and tokens, each (S, H), of the given absolute hours; NaN where
        unknown (hours the ring no longer holds, or before a scope's first hour). Only these
        fields are gathered: the weekly pattern reads two weeks of them, once an hour, where
        the baseline holds one."""
        n = self.size
        slot, ok = self.hours.slots_for(hours)
        cols = np.array([F["requests"], F["cost"], *(F[t] for t in TOKEN_FIELDS)])
        sums = self.hour_add[:n][:, slot[:, None], cols[None, :]]          # (S, H, fields)
        unknown = ~ok[None, :] | (hours[None, :] < self.first_hour[:n, None])
        tokens = sums[..., 2].copy()
        for k in range(3, cols.size):                                      # in field order, as token_sum
            tokens += sums[..., k]
        return tuple(np.where(unknown, np.nan, a) for a in (sums[..., 0], sums[..., 1], tokens))  # type: ignore[return-value]

    def span(self, t: float, baseline: float) -> np.ndarray:
        """Hours of history each scope has before the window, up to the baseline's length."""
        end = math.floor((t - self.window) / 3600)
        count = int(round(baseline / 3600))
        return np.clip(end - np.maximum(self.first_hour[: self.size], end - count), 0, count)


    def baseline_requests(self, t: float, baseline: float) -> np.ndarray:
        """Requests per scope over all baseline hours (seasonal or not): a scope with none
        there and none in the window has nothing to say and leaves /metrics."""
        n = self.size
        end = math.floor((t - self.window) / 3600)
        hours = np.arange(end - int(round(baseline / 3600)), end)
        g = self._gathered
        if g is not None and g.rows == n and len(hours) and self._gathered_stale_from > hours[-1]:
            cols = hours - g.base
            if cols[0] >= 0 and cols[-1] < g.capacity and np.array_equal(g.hour[cols], hours):
                # the evaluator has just gathered these hours (`baseline_hours`), unchanged
                # since; zero where the ring does not hold an hour, and request counts are
                # whole numbers, so they add up to the same sum in any order
                return g.planes[0][F["requests"], :, cols[0]:cols[-1] + 1].sum(axis=1)
        slot, ok = self.hours.slots_for(hours)
        return np.take(self.hour_add[:n, :, F["requests"]], slot[ok], axis=1).sum(axis=1)


_SLOT_COLUMNS = [F[name] for name in SLOT_SIZE_FIELDS]


def scope_text(key: ScopeKey) -> str:
    return "\x1f".join(key)


def scope_key(text: str) -> ScopeKey:
    scope, app, provider, model = text.split("\x1f")
    return scope, app, provider, model


def _scatter(target: np.ndarray, rows: np.ndarray, slot: np.ndarray, ok: np.ndarray,
             bins: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Add group sketches into target[row, slot, kind, bin] for each of a group's three
    scope entries (entries 3g, 3g+1, 3g+2 of `rows`/`slot`/`ok`)."""
    _, n_slots, n_kinds, n_bins = target.shape
    flat = target.reshape(-1)
    for k, (g, b, c) in enumerate(bins):
        if g.size == 0:
            continue
        e = (g[:, None] * 3 + np.arange(3)).reshape(-1)
        keep = ok[e]
        idx = ((rows[e] * n_slots + slot[e]) * n_kinds + k) * n_bins + np.repeat(b, 3)
        np.add.at(flat, idx[keep], np.repeat(c, 3)[keep].astype(flat.dtype))


def _sum_sketches(entry: np.ndarray, bins: tuple[np.ndarray, np.ndarray, np.ndarray], n: int) -> np.ndarray:
    """Sparse group sketches summed per key: (n, NBINS) counts, where group g adds its bins to
    each of the keys entry[g] (one per scope it belongs to).

    One bincount per column of `entry` over all the groups' bins: the bins are never
    repeated per scope, and nothing dense is larger than the result. Float64 counts are
    exact (integers far below 2**53), so the quantiles are those of integer sums."""
    g, b, c = bins
    weights = c.astype(np.float64)
    out = np.zeros(n * sketch.NBINS)
    for col in (entry * sketch.NBINS).T:
        flat = col[g]
        flat += b
        out += np.bincount(flat, weights=weights, minlength=n * sketch.NBINS)
    return out.reshape(n, sketch.NBINS)


def _sum_into_parents(sums: list[np.ndarray], child: np.ndarray, parent: np.ndarray) -> None:
    """In each array of `sums` (one row per key), set each parent key's row, still zero, to
    the sum of its children's rows. Group g has child key child[g] and parent key
    parent[g]; a child has one parent, and the children of a parent are numbered
    consecutively (as an hour's app keys are, under the hour's global key). The rows hold
    integer counts, so the sums are exact in any order."""
    of = np.full(sums[0].shape[0], -1, dtype=np.int64)
    of[child] = parent
    children = np.flatnonzero(of >= 0)
    parents = of[children]
    starts = np.flatnonzero(np.diff(parents, prepend=-1))
    for s in sums:
        s[parents[starts]] = np.add.reduceat(s[children], starts, axis=0)


def _codes(values: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(values, return_inverse=True)` for integers in [0, bound), the inverse in the
    shape of `values`. When the bound is not far above the number of values (scopes x hours
    of a chunk), a table of the values present takes the place of a sort."""
    if bound > 4 * values.size:
        uniq, inverse = np.unique(values, return_inverse=True)
        return uniq, inverse.reshape(values.shape)
    present = np.zeros(bound, dtype=bool)
    present[values] = True
    return np.flatnonzero(present), (np.cumsum(present) - 1)[values]


def _add_at_cells(ring: np.ndarray, rows: np.ndarray, slots: np.ndarray, values: np.ndarray) -> None:
    """`np.add.at(ring, (rows, slots), values)` for a (scopes, slots, fields) ring: the same
    additions in the same order, so bit-identical sums, made through the flat view of a
    contiguous ring, where add.at has a fast path several times quicker than with a pair of
    indices and a row of fields each."""
    if not ring.flags.c_contiguous:
        np.add.at(ring, (rows, slots), values)
        return
    n_slots, width = ring.shape[1:]
    cells = ((rows * n_slots + slots)[:, None] * width + np.arange(width)).reshape(-1)
    np.add.at(ring.reshape(-1), cells, values.reshape(-1))


def _take_planes(ring: np.ndarray, slots: np.ndarray, block_bytes: int = 4 << 20) -> np.ndarray:
    """`ring[:, slots]` of a (scopes, slots, fields) ring, as an (S, H, F) view of memory laid
    out field by field, (F, S, H), when that is large.

    The evaluator reads one field at a time over every scope and hour. In the ring's own
    layout the fields of an hour sit side by side, so reading one field walks the whole
    array and costs about as much as reading all of them. Here the ring is read once, a
    block of scopes at a time (`block_bytes` of gathered values), and each block is
    transposed while it is still in cache. A gather no larger than one block stays in
    cache anyway and keeps the ring's layout.
    """
    n, _, f = ring.shape
    row_bytes = max(1, len(slots) * f * ring.itemsize)
    if n * row_bytes <= block_bytes:
        return np.take(ring, slots, axis=1)
    block = max(1, block_bytes // row_bytes)
    out = np.empty((f, n, len(slots)), dtype=ring.dtype)
    for a in range(0, n, block):
        out[:, a:a + block] = np.take(ring[a:a + block], slots, axis=1).transpose(2, 0, 1)
    return out.transpose(1, 2, 0)


def _sum_in_order(ring: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """`ring[:, slots].sum(axis=1)` of a (scopes, slots, fields) ring, one slot at a time in
    the order given: numpy adds the gathered slots in that same order (the fields, not the
    slots, are its inner loop), so the sums are the same, without gathering them first."""
    if not len(slots):
        return np.zeros((ring.shape[0],) + ring.shape[2:])
    out = ring[:, slots[0]].copy()
    for s in slots[1:].tolist():
        out += ring[:, s]
    return out


def _sums_from_newest(ring: np.ndarray, slots: np.ndarray, ok: np.ndarray, counts: list[int]) -> np.ndarray:
    """(scopes, len(counts), fields): for each k of `counts`, the sum of the last k of
    `slots` (ring slots, oldest first; zero where `ok` is False), added newest first one
    slot at a time. These are the values of numpy's cumulative sum along the reversed slots
    (the same additions in the same order), without gathering the (scopes, slots, fields)
    array it runs along."""
    want: dict[int, list[int]] = {}
    for j, k in enumerate(counts):
        want.setdefault(k - 1, []).append(j)
    out = np.zeros((ring.shape[0], len(counts)) + ring.shape[2:])
    acc = np.zeros((ring.shape[0],) + ring.shape[2:])
    for i, (s, held) in enumerate(zip(slots[::-1].tolist(), ok[::-1].tolist())):
        if i == 0:
            acc = ring[:, s].copy() if held else acc
        else:
            acc += ring[:, s] if held else 0.0
        for j in want.get(i, []):
            out[:, j] = acc
    return out


def _sum_slots(ring: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """`ring[:, slots].sum(axis=1)` in int32 for a ring of (scopes, slots, kinds, bins).

    The window's slots are neighbours in the ring but for one wrap-around, so the sum is
    taken over at most two slices: each streams its part of the ring once, where adding
    slot by slot (or gathering the slots first) walks the whole array once per slot.
    Integer sums, so the order of the slots does not change the result.
    """
    parts = [ring[:, a:b].sum(axis=1, dtype=np.int32) for a, b in _runs(slots)]
    if not parts:
        return np.zeros((ring.shape[0],) + ring.shape[2:], dtype=np.int32)
    out = parts[0]
    for p in parts[1:]:
        out += p
    return out


def _exceedances(sk: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples at or above each scope's threshold bin, and all samples, of one coarse
    slot's (S, kinds, bins) sketches; `thr` (S, kinds) holds a bin in [-1, bins] (-1: none).

    One cumulative count over the bins, in int32 (a coarse slot's counts fit), read twice:
    the total is its last entry, and the samples at or above bin b are the total less the
    count below b. Integer counts, so this is exactly what summing the bins from b up gives.
    """
    cum = np.cumsum(sk, axis=-1, dtype=np.int32)
    total = cum[..., -1]
    below = np.take_along_axis(cum, np.clip(thr - 1, 0, sk.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    above = total - np.where(thr > 0, below, 0)
    return np.where(thr >= 0, above, 0), total


def _runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """Distinct slot indices as [start, stop) runs of consecutive slots."""
    s = np.unique(slots)
    breaks = np.flatnonzero(np.diff(s) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(s, breaks)] if s.size else []


def _window_quantiles(sk: np.ndarray, total: np.ndarray) -> dict[str, np.ndarray]:
    """`sketch.quantile` of each kind of (S, kinds, bins) sketches (a window's, an open
    hour's), given their totals: one cumulative sum for all kinds, in int32 when the totals
    fit (numpy's default int64 accumulator costs several times more), compared with the
    same float targets."""
    cum = np.cumsum(sk, axis=-1, dtype=np.int32 if total.max(initial=0) < 2**31 else np.int64)
    out = {}
    for k, kind in enumerate(SKETCHES):
        target = np.ceil(QUANTILES[kind] * total[:, k])[:, None]
        pos = np.argmax(cum[:, k] >= np.maximum(target, 1), axis=-1)
        out[kind] = np.where(total[:, k] > 0, sketch.MIDPOINTS[pos], np.nan)
    return out


def _quantiles(counts: np.ndarray, q: float) -> np.ndarray:
    total = counts.sum(axis=-1)
    out = sketch.quantile(counts, q)
    return np.where(total >= MIN_SKETCH_COUNT, out, np.nan)


def token_sum(adds: np.ndarray) -> np.ndarray:
    """All token fields added, in field order, into one array (no temporary per field)."""
    out = np.zeros(adds.shape[:-1])
    for name in TOKEN_FIELDS:
        out += adds[..., F[name]]
    return out
