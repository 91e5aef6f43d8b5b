"""Runaway loops and retry storms, judged per session without session ids in labels.

An agent stuck in a loop, a retry storm or a conversation that keeps feeding itself is
invisible in per-model rates until the invoice arrives: each single request looks
normal. The shape shows only per session (conversation, trace), and session ids must
never become label values. So this module tracks sessions in memory, judges each one,
and publishes only counts per (app, reason); the offending session ids go to the API.

Per tracked session (records without a session id take no part):

- `chain_length`: calls within the last `chain_window_s` (default 30 min) reach
  `chain_max_calls` (default 50).
- `token_burst`: tokens within the last `burst_window_s` (default 5 min) reach
  `burst_max_tokens` (default 200k). Cache reads are left out by default: a long
  agent session re-reads its whole cached context on every turn, which is cheap and
  healthy, and counting it would flag every such session.
- `tool_repetition`: the same tool signature (the names of the tools called) comes back
  `tool_repeat_max` (default 20) times in a row. A response without tool calls, or with
  a different set of tools, ends the run.
- `session_cost`: the session has cost more than max(k × the app's median cost of
  recently completed sessions, a floor), once the app has enough completed sessions;
  before that, more than a fixed cold-start limit.

`chain_length` and `token_burst` describe the recent window and clear themselves when
the session calms down; `tool_repetition` and `session_cost` hold until the session
expires (idle for `session_idle_s`), so that a loop that stopped an hour ago is still
listed for whoever answers the alert.

Per app, `invocation_zscore` compares the number of calls in the last 5 minutes with
the app's own 5-minute counts over the previous 24 hours (median and MAD, on the square
root scale of the counts): the retry storm signal, which needs no session id at all.

Memory is bounded: at most `max_sessions` tracked sessions (new sessions beyond it are
counted in `overflow_total` and ignored), an event log of at most `max_events` recent
calls, a ring of completed-session costs per app, and a 24-hour ring of per-minute
counts per app.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..codes import factorize
from ..durations import Duration
from ..floats import finite_or_none
from ..ingest.records import RecordColumns

_CHAIN, _BURST, _COST, _REPEAT = 1, 2, 4, 8
# The reasons a session is flagged (`llm_runaway_sessions{reason}`), each with its bit in a session's flags.
_REASON_BITS: tuple[tuple[str, int], ...] = (
    ("chain_length", _CHAIN), ("token_burst", _BURST), ("session_cost", _COST), ("tool_repetition", _REPEAT))
REASONS: tuple[str, ...] = tuple(reason for reason, _ in _REASON_BITS)
# Thresholds an app may override (e.g. an agent app that legitimately chains 200 calls).
APP_OVERRIDABLE: tuple[str, ...] = (
    "chain_max_calls", "burst_max_tokens", "tool_repeat_max", "session_cost_k",
    "session_cost_floor_usd", "session_cost_cold_usd")
_MAD_TO_SIGMA = 1.4826


class RunawaySettings(BaseModel):
    """Thresholds and bounds of the runaway detector.

    Session signals (defaults aim at chat, RAG and light agent traffic; an app that
    runs long autonomous agents should get its own numbers in `app_overrides`):
    `chain_window_s`, `chain_max_calls`: 50 calls in 30 minutes is one call every 36 s
    for half an hour, which no person typing produces and a loop reaches in minutes.
    `burst_window_s`, `burst_max_tokens`: 200k fresh tokens in 5 minutes is several full
    context windows, i.e. a session resending its whole context in a tight loop.
    `burst_count_cache_reads`: count cache-read tokens in the burst (off: see module doc).
    `tool_repeat_max`: identical consecutive tool signatures that make a loop; a loop
    repeats without end so it crosses any limit quickly, while 10 leaves room for
    legitimate runs such as reading a handful of files.
    `session_cost_k`, `session_cost_floor_usd`: a session is expensive above
    max(k × the app's median completed-session cost, floor). Session costs are skewed
    (the 99th percentile is often 5-8× the median), so k = 10 picks out outliers, not
    the ordinary heavy tail; the floor keeps $0.02 sessions from paging at $0.21.
    `session_cost_cold_usd`: the limit while an app has fewer than
    `baseline_min_sessions` completed sessions.
    `baseline_sessions`: completed-session costs kept per app (most recent).
    `session_idle_s`: a session with no call for this long is complete: it leaves the
    tracker and its cost joins the app's baseline. Must be at least the longer window.
    `max_sessions`: tracked sessions at most; beyond it new sessions are counted in
    `overflow_total` and not tracked (existing ones keep being tracked).
    `max_events`: recent calls kept for the windows (24 bytes each).

    Invocation spikes: `spike_window_s` (5 min) against the app's own counts over
    `spike_history_s` (24 h); robust z (median and MAD) on the square-root scale of the
    counts, where Poisson noise has unit variance (`robust_z`).
    Flagged at `spike_z` with at least `spike_min_count` calls; z is NaN until
    `spike_min_history` buckets of history exist. An app is judged on 2,016 five-minute
    periods a week: at z 3 about 0.2 % of the ordinary periods of calls that come in
    conversations pass (four a week per app, which only the call floor kept quiet), at 4
    about one in 5,000 (under one every two weeks per app).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    chain_window_s: Duration = Field(1800.0, description="window of the chain-length count")
    chain_max_calls: int = Field(50, description="calls of one session within chain_window_s that flag it")
    burst_window_s: Duration = Field(300.0, description="window of the token-burst count")
    burst_max_tokens: int = Field(200_000, description="tokens of one session within burst_window_s that flag it")
    burst_count_cache_reads: bool = Field(False, description="count cache-read tokens in the burst")
    tool_repeat_max: int = Field(20, description="identical consecutive tool signatures that flag a loop")
    session_cost_k: float = Field(10.0, description="flag a session above k x its app's median session cost")
    session_cost_floor_usd: float = Field(5.0, description="never flag a session below this cost")
    session_cost_cold_usd: float = Field(50.0, description="the cost limit until an app has baseline_min_sessions")
    baseline_min_sessions: int = Field(30, description="completed sessions before an app's median cost is used")
    baseline_sessions: int = Field(500, description="completed-session costs kept per app")
    session_idle_s: Duration = Field(3600.0, description="a session idle this long is complete")
    max_sessions: int = Field(50_000, description="sessions tracked at most (new ones beyond are counted, not tracked)")
    max_events: int = Field(2_000_000, description="recent calls kept for the windows (24 bytes each)")
    max_offenders: int = Field(100, description="flagged sessions listed by /api/runaways")
    spike_window_s: Duration = Field(300.0, description="window of an app's invocation count (whole minutes)")
    spike_history_s: Duration = Field(86_400.0, description="history the invocation count is judged against")
    spike_z: float = Field(4.0, description="robust z of the invocation count that flags a spike")
    spike_min_count: int = Field(30, description="calls in the window below which no spike is flagged")
    spike_min_history: int = Field(24, description="history buckets needed before z is computed")
    app_overrides: dict[str, dict[str, float]] = Field(
        default_factory=dict, description=f"per-app thresholds, app -> {{name: value}}; names: {', '.join(APP_OVERRIDABLE)}")

    @field_validator("*", mode="after")
    @classmethod
    def _positive(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not v > 0:
            raise ValueError(f"runaway.{info.field_name} must be positive, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunawaySettings:
        if self.session_idle_s < max(self.chain_window_s, self.burst_window_s):
            raise ValueError("runaway.session_idle_s must be at least chain_window_s and burst_window_s")
        if self.spike_window_s % 60 or self.spike_history_s % self.spike_window_s:
            raise ValueError("runaway.spike_window_s must be whole minutes and divide spike_history_s")
        for app, over in self.app_overrides.items():
            unknown = set(over) - set(APP_OVERRIDABLE)
            if unknown:
                raise ValueError(f"runaway.app_overrides[{app!r}]: unknown key(s) {sorted(unknown)}; known: {list(APP_OVERRIDABLE)}")
            for name, v in over.items():
                if not v > 0:
                    raise ValueError(f"runaway.app_overrides[{app!r}].{name} must be positive, got {v!r}")
        return self

    def for_app(self, app: str, name: str) -> float:
        """One threshold as it applies to `app`."""
        return float(self.app_overrides.get(app, {}).get(name, getattr(self, name)))


@dataclass(slots=True)
class RunawayReport:
    """What the evaluator publishes.

    `sessions_by_app_reason`: (app, reason) -> tracked sessions currently flagged for
    that reason; every app seen in the last 24 h has all four reasons, zero included,
    so gauges fall back to 0 instead of freezing at their last value.
    `offenders`: flagged sessions, most expensive first, at most `max_offenders`.
    `invocation_zscore`: app -> robust z of its last-5-minute call count (NaN without
    enough history); `invocation_count`: that count; `invocation_flagged`: apps at or
    above `spike_z` with at least `spike_min_count` calls.
    `overflow_total`: sessions never tracked because of `max_sessions` (cumulative).
    `tracked_sessions`: sessions in memory now.
    """

    sessions_by_app_reason: dict[tuple[str, str], int]
    offenders: list[dict[str, Any]]
    invocation_zscore: dict[str, float]
    invocation_count: dict[str, int]
    invocation_flagged: list[str]
    overflow_total: int
    tracked_sessions: int

    @classmethod
    def empty(cls) -> RunawayReport:
        """The report before any verdict (a detector that failed its first evaluation)."""
        return cls({}, [], {}, {}, [], 0, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (tuple keys become rows, NaN becomes None)."""
        return {
            "sessions_by_app_reason": [
                {"app": a, "reason": r, "sessions": n} for (a, r), n in sorted(self.sessions_by_app_reason.items())],
            "offenders": [dict(o) for o in self.offenders],
            "invocation_zscore": {a: finite_or_none(z) for a, z in sorted(self.invocation_zscore.items())},
            "invocation_count": dict(sorted(self.invocation_count.items())),
            "invocation_flagged": list(self.invocation_flagged),
            "overflow_total": self.overflow_total,
            "tracked_sessions": self.tracked_sessions,
        }


# --- pure functions -------------------------------------------------------------------

def robust_z(current: np.ndarray, history: np.ndarray) -> np.ndarray:
    """Robust z of counts against rows of history (NaN = no data), one row per series, on
    the square-root scale of the counts.

    Counts of calls that come in conversations and agent runs are skewed: a busy five
    minutes lies much further above the median than a quiet one lies below it, so a
    median and MAD of the raw counts read ordinary busy periods as z 4 and more. The
    Anscombe transform 2·sqrt(n + 3/8) makes a count's spread nearly symmetric and, for
    independent calls, of unit variance whatever its mean; scale = max(1.4826·MAD, 1) on
    that scale, the floor of 1 being the Poisson noise of a count, without which a
    perfectly steady history (MAD 0) would make any extra call infinite."""
    out = np.full(current.shape[0], np.nan)
    ok = np.isfinite(history).any(axis=1)
    if not ok.any():
        return out
    h = anscombe(history[ok])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(h, axis=1)
        mad = np.nanmedian(np.abs(h - med[:, None]), axis=1)
    scale = np.maximum(_MAD_TO_SIGMA * mad, 1.0)
    out[ok] = (anscombe(current[ok]) - med) / scale
    return out


def anscombe(counts: np.ndarray) -> np.ndarray:
    """2·sqrt(n + 3/8): counts on a scale where Poisson noise has unit variance."""
    out: np.ndarray = 2.0 * np.sqrt(np.maximum(counts, 0.0) + 0.375)
    return out


def tool_runs(group: np.ndarray, sig_code: np.ndarray, valid: np.ndarray,
              prev_code: np.ndarray, prev_len: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive runs of identical tool signatures, continued from the previous batch.

    Inputs are per record, sorted by (group, time): `group` the session (0..G-1, every
    group present), `sig_code` an integer per signature, `valid` False where no tool
    was called; `prev_code` / `prev_len` the run each group ended its last batch with.
    Returns per group: longest run in this batch (including the carried-over part), and
    the code, length and validity of the run it ends with now.
    """
    n = group.shape[0]
    start = np.ones(n, dtype=bool)
    start[1:] = (group[1:] != group[:-1]) | (sig_code[1:] != sig_code[:-1]) | (valid[1:] != valid[:-1])
    first = np.flatnonzero(start)
    run_len = np.diff(np.r_[first, n]).astype(np.int64)
    run_group = group[first]
    run_code = sig_code[first]
    run_valid = valid[first]
    g_first = np.ones(first.shape[0], dtype=bool)
    g_first[1:] = run_group[1:] != run_group[:-1]
    carry = g_first & run_valid & (run_code == prev_code[run_group]) & (prev_len[run_group] > 0)
    run_len = run_len + np.where(carry, prev_len[run_group], 0)
    run_len = np.where(run_valid, run_len, 0)
    g_starts = np.flatnonzero(g_first)
    longest = np.maximum.reduceat(run_len, g_starts)
    g_last = np.r_[g_starts[1:] - 1, first.shape[0] - 1]
    return longest, run_code[g_last], run_len[g_last], run_valid[g_last]


# --- storage --------------------------------------------------------------------------

class _EventLog:
    """Recent calls (session slot, event time, tokens) for the windowed counts."""

    def __init__(self, max_events: int) -> None:
        self.max = max_events
        cap = min(1024, max_events)
        self.slot = np.zeros(cap, dtype=np.int32)
        self.ts = np.zeros(cap, dtype=np.float64)
        self.tok = np.zeros(cap, dtype=np.int64)
        self.n = 0

    def prune(self, cutoff: float) -> None:
        """Drop calls older than `cutoff` (event time)."""
        keep = np.flatnonzero(self.ts[: self.n] >= cutoff)
        k = keep.shape[0]
        if k == self.n:
            return
        self.slot[:k], self.ts[:k], self.tok[:k] = self.slot[keep], self.ts[keep], self.tok[keep]
        self.n = k

    def append(self, slot: np.ndarray, ts: np.ndarray, tok: np.ndarray, cutoff: float) -> None:
        k = ts.shape[0]
        if k > self.max:  # a batch larger than the log: keep its newest calls
            newest = np.argsort(ts, kind="stable")[-self.max:]
            slot, ts, tok, k = slot[newest], ts[newest], tok[newest], self.max
        if self.n + k > self.max:
            self.prune(cutoff)
        if self.n + k > self.max:  # still full: drop the oldest calls
            keep = np.sort(np.argsort(self.ts[: self.n], kind="stable")[self.n + k - self.max:])
            m = keep.shape[0]
            self.slot[:m], self.ts[:m], self.tok[:m] = self.slot[keep], self.ts[keep], self.tok[keep]
            self.n = m
        if self.n + k > self.ts.shape[0]:
            cap = min(self.max, max(2 * self.ts.shape[0], self.n + k))
            self.slot = np.resize(self.slot, cap)
            self.ts = np.resize(self.ts, cap)
            self.tok = np.resize(self.tok, cap)
        self.slot[self.n: self.n + k] = slot
        self.ts[self.n: self.n + k] = ts
        self.tok[self.n: self.n + k] = tok
        self.n += k


class _Sessions:
    """Struct of arrays for tracked sessions, indexed by slot; free slots are reused."""

    # one array per field, all of length `cap` (see `_alloc`)
    sid: np.ndarray
    app: np.ndarray
    active: np.ndarray
    first_ts: np.ndarray
    last_ts: np.ndarray
    calls: np.ndarray
    tokens: np.ndarray
    cost: np.ndarray
    last_sig: np.ndarray
    run_len: np.ndarray
    max_run: np.ndarray

    def __init__(self, max_sessions: int) -> None:
        self.max = max_sessions
        self.slot_of: dict[str, int] = {}
        self.free: list[int] = []
        self.used = 0  # high-water slot count
        self._alloc(min(1024, max_sessions))

    def _alloc(self, cap: int) -> None:
        def grow(name: str, dtype: Any, fill: Any) -> None:
            old = getattr(self, name, None)
            new = np.full(cap, fill, dtype=dtype)
            if old is not None:
                new[: old.shape[0]] = old
            setattr(self, name, new)
        grow("sid", object, None)
        grow("app", np.int32, -1)
        grow("active", bool, False)
        grow("first_ts", np.float64, np.inf)
        grow("last_ts", np.float64, -np.inf)
        grow("calls", np.int64, 0)
        grow("tokens", np.int64, 0)
        grow("cost", np.float64, 0.0)
        grow("last_sig", object, "")
        grow("run_len", np.int64, 0)
        grow("max_run", np.int64, 0)
        self.cap = cap

    def __len__(self) -> int:
        return len(self.slot_of)

    def add(self, sid: str, app: int) -> int:
        """A slot for a new session, or -1 when the tracker is full."""
        if len(self.slot_of) >= self.max:
            return -1
        if self.free:
            slot = self.free.pop()
        else:
            if self.used >= self.cap:
                self._alloc(min(self.max, 2 * self.cap))
            slot = self.used
            self.used += 1
        self.slot_of[sid] = slot
        self.sid[slot], self.app[slot], self.active[slot] = sid, app, True
        self.first_ts[slot], self.last_ts[slot] = np.inf, -np.inf
        self.calls[slot] = self.tokens[slot] = self.run_len[slot] = self.max_run[slot] = 0
        self.cost[slot] = 0.0
        self.last_sig[slot] = ""
        return slot

    def remove(self, slots: np.ndarray) -> None:
        for s in slots.tolist():  # one iteration per expiring session
            del self.slot_of[self.sid[s]]
            self.free.append(s)
        self.active[slots] = False
        self.sid[slots] = None


class _MinuteCounts:
    """Calls per app per minute over a ring covering the spike history."""

    def __init__(self, minutes: int) -> None:
        self.R = minutes
        self.counts = np.zeros((0, minutes), dtype=np.int64)
        self.minute = np.full((0, minutes), -1, dtype=np.int64)
        self.first_min = np.zeros(0, dtype=np.int64)
        self.last_min = np.zeros(0, dtype=np.int64)

    def ensure_rows(self, rows: int) -> None:
        have = self.counts.shape[0]
        if rows <= have:
            return
        add = rows - have
        self.counts = np.vstack([self.counts, np.zeros((add, self.R), dtype=np.int64)])
        self.minute = np.vstack([self.minute, np.full((add, self.R), -1, dtype=np.int64)])
        self.first_min = np.r_[self.first_min, np.full(add, np.iinfo(np.int64).max)]
        self.last_min = np.r_[self.last_min, np.full(add, np.iinfo(np.int64).min)]

    def add(self, rows: np.ndarray, ts: np.ndarray) -> None:
        minute = np.floor(ts / 60.0).astype(np.int64)
        keep = minute > minute.max() - self.R  # a batch spanning more than the ring keeps its newest part
        rows, minute = rows[keep].astype(np.int64), minute[keep]
        key, cnt = np.unique(rows * (1 << 32) + minute, return_counts=True)
        r, m = key >> 32, key & ((1 << 32) - 1)
        slot = m % self.R
        newer = m > self.minute[r, slot]
        self.counts[r[newer], slot[newer]] = 0
        self.minute[r[newer], slot[newer]] = m[newer]
        same = self.minute[r, slot] == m  # older than the ring's content: dropped
        self.counts[r[same], slot[same]] += cnt[same]
        np.minimum.at(self.first_min, r, m)
        np.maximum.at(self.last_min, r, m)

    def window(self, first_minute: int, length: int) -> np.ndarray:
        """Counts of every app for minutes first_minute .. first_minute+length-1."""
        mins = first_minute + np.arange(length)
        slot = mins % self.R
        return np.where(self.minute[:, slot] == mins[None, :], self.counts[:, slot], 0)


# --- the detector ---------------------------------------------------------------------

class RunawayDetector:
    """Per-session loop signals and per-app invocation spikes; `observe` on every ingest
    batch, `evaluate` on the evaluator's clock.

    `observe` groups the batch by session with np.unique and touches Python only once per
    distinct session in the batch (the id -> slot dictionary); all per-record work is
    numpy. The clock inside `observe` is the newest event time seen, used only to
    expire idle sessions when the tracker is full.
    """

    def __init__(self, settings: RunawaySettings) -> None:
        self.settings = s = settings
        self._sessions = _Sessions(s.max_sessions)
        self._events = _EventLog(s.max_events)
        self._log_window = max(s.chain_window_s, s.burst_window_s)
        self._win_min = int(s.spike_window_s // 60)
        self._hist_blocks = int(s.spike_history_s // s.spike_window_s)
        self._minutes = _MinuteCounts(self._win_min * (self._hist_blocks + 1) + 60)
        self._apps: list[str] = []
        self._app_code: dict[str, int] = {}
        self._completed: list[np.ndarray] = []  # per app: ring of completed-session costs
        self._completed_n: list[int] = []
        self._overflow_total = 0
        self._overflowed: dict[str, None] = {}  # recently refused ids, so one session counts once
        self._clock = -math.inf

    # -- ingest ------------------------------------------------------------------------

    def _app_codes(self, app: np.ndarray) -> np.ndarray:
        uniq, inv = factorize(app)
        codes = np.empty(uniq.shape[0], dtype=np.int32)
        for j, a in enumerate(uniq.tolist()):  # one iteration per distinct app
            c = self._app_code.get(a)
            if c is None:
                c = self._app_code[a] = len(self._apps)
                self._apps.append(a)
                self._completed.append(np.zeros(self.settings.baseline_sessions))
                self._completed_n.append(0)
            codes[j] = c
        self._minutes.ensure_rows(len(self._apps))
        mapped: np.ndarray = codes[inv]
        return mapped

    def observe(self, cols: RecordColumns) -> None:
        """Add a batch: per-app minute counts for all records, session state for those
        with a session id."""
        n = len(cols)
        if n == 0:
            return
        s = self.settings
        ts = cols.ts
        self._clock = max(self._clock, float(ts.max()))
        app = self._app_codes(cols.app)
        self._minutes.add(app, ts)

        has = np.flatnonzero(cols.session_id != None)  # noqa: E711 (elementwise)
        if has.shape[0] == 0:
            return
        uniq, inv = factorize(cols.session_id[has])
        first_idx = np.unique(inv, return_index=True)[1]
        slots_u = np.empty(uniq.shape[0], dtype=np.int64)
        first_app = app[has][first_idx]
        sess = self._sessions
        keys = uniq.tolist()
        n_new = sum(1 for key in keys if key not in sess.slot_of)  # one check per distinct session
        if len(sess) + n_new > s.max_sessions:
            self._expire(self._clock)  # make room from idle sessions before refusing any
        for j, key in enumerate(keys):  # one iteration per distinct session
            slot = sess.slot_of.get(key)
            if slot is None:
                slot = sess.add(key, int(first_app[j]))
                if slot < 0:
                    self._refuse(key)
            slots_u[j] = slot
        tracked = slots_u[inv] >= 0
        if not tracked.any():
            return
        rec = has[tracked]
        grp = inv[tracked]
        order = np.lexsort((ts[rec], grp))
        rec, grp = rec[order], grp[order]
        # Renumber groups 0..G-1 so the per-group results line up with `slots`.
        g_u, g = np.unique(grp, return_inverse=True)
        slots = slots_u[g_u]

        tokens = cols.total_tokens[rec]
        burst_tok = tokens if s.burst_count_cache_reads else tokens - cols.cache_read_tokens[rec]
        cost = np.nan_to_num(cols.cost[rec], nan=0.0)
        t = ts[rec]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        ends = np.r_[starts[1:], g.shape[0]] - 1
        sess.calls[slots] += np.bincount(g, minlength=slots.shape[0])
        sess.tokens[slots] += np.bincount(g, weights=tokens, minlength=slots.shape[0]).astype(np.int64)
        sess.cost[slots] += np.bincount(g, weights=cost, minlength=slots.shape[0])
        sess.first_ts[slots] = np.minimum(sess.first_ts[slots], t[starts])
        sess.last_ts[slots] = np.maximum(sess.last_ts[slots], t[ends])

        sig = cols.tool_signature[rec]
        valid = sig != None  # noqa: E711
        sig_s = np.where(valid, sig, "")
        _, codes = factorize(np.concatenate([sig_s, sess.last_sig[slots]]))
        longest, _, last_len, last_valid = tool_runs(
            g, codes[: g.shape[0]], valid, codes[g.shape[0]:], sess.run_len[slots])
        sess.max_run[slots] = np.maximum(sess.max_run[slots], longest)
        # The record that ends each group carries the signature its run continues with.
        sess.last_sig[slots] = np.where(last_valid, sig_s[ends], "")
        sess.run_len[slots] = np.where(last_valid, last_len, 0)

        self._events.append(slots[g].astype(np.int32), t, burst_tok.astype(np.int64),
                            self._clock - self._log_window)

    def _refuse(self, key: str) -> None:
        """Count a session the full tracker cannot take, once while it is remembered."""
        if key in self._overflowed:
            return
        self._overflow_total += 1
        self._overflowed[key] = None
        if len(self._overflowed) > max(1000, self.settings.max_sessions // 10):
            self._overflowed.pop(next(iter(self._overflowed)))

    def _expire(self, clock: float) -> None:
        """Sessions idle since before clock - session_idle_s are complete: their cost
        joins the app baseline and their slot is freed. The event log is pruned first
        with the same clock, so no call of a freed slot can be counted for its next
        owner (the log window is shorter than the idle time)."""
        s = self.settings
        sess = self._sessions
        self._events.prune(clock - self._log_window)
        used = sess.used
        idle = np.flatnonzero(sess.active[:used] & (sess.last_ts[:used] < clock - s.session_idle_s))
        if idle.shape[0] == 0:
            return
        apps = sess.app[idle]
        for a in np.unique(apps).tolist():  # one iteration per app with completed sessions
            costs = sess.cost[idle[apps == a]]
            ring = self._completed[a]
            k = costs.shape[0]
            if k >= ring.shape[0]:
                ring[:] = costs[-ring.shape[0]:]
            else:
                pos = (self._completed_n[a] + np.arange(k)) % ring.shape[0]
                ring[pos] = costs
            self._completed_n[a] += k
        sess.remove(idle)

    # -- evaluation --------------------------------------------------------------------

    def app_cost_threshold(self, app: str) -> float:
        """The session cost above which a session of `app` is flagged right now."""
        s = self.settings
        code = self._app_code.get(app)
        n = 0 if code is None else min(self._completed_n[code], s.baseline_sessions)
        floor = s.for_app(app, "session_cost_floor_usd")
        if code is None or n < s.baseline_min_sessions:
            return max(s.for_app(app, "session_cost_cold_usd"), floor)
        med = float(np.median(self._completed[code][:n]))
        return max(s.for_app(app, "session_cost_k") * med, floor)

    def evaluate(self, now: float) -> RunawayReport:
        """Expire idle sessions, judge the rest at `now`, and compute invocation z."""
        s = self.settings
        self._expire(now)
        sess = self._sessions
        used = sess.used
        ev = self._events
        ev_slot, ev_ts, ev_tok = ev.slot[: ev.n], ev.ts[: ev.n], ev.tok[: ev.n]
        in_chain = ev_ts >= now - s.chain_window_s
        in_burst = ev_ts >= now - s.burst_window_s
        chain = np.bincount(ev_slot[in_chain], minlength=used)[:used]
        burst = np.bincount(ev_slot[in_burst], weights=ev_tok[in_burst], minlength=used)[:used]

        n_apps = len(self._apps)
        th = {name: np.array([s.for_app(a, name) for a in self._apps] or [0.0]) for name in
              ("chain_max_calls", "burst_max_tokens", "tool_repeat_max")}
        cost_th = np.array([self.app_cost_threshold(a) for a in self._apps] or [0.0])
        app = np.maximum(sess.app[:used], 0)
        active = sess.active[:used]
        bits = (
            (chain >= th["chain_max_calls"][app]) * _CHAIN
            | (burst >= th["burst_max_tokens"][app]) * _BURST
            | (sess.cost[:used] > cost_th[app]) * _COST
            | (sess.max_run[:used] >= th["tool_repeat_max"][app]) * _REPEAT
        ) * active

        # Invocation spikes, for all apps at once.
        m_now = int(math.floor(now / 60.0))
        W, H = self._win_min, self._hist_blocks
        m0 = m_now - W * (H + 1)
        mc = self._minutes
        blocks = mc.window(m0, W * (H + 1))[:n_apps].reshape(n_apps, H + 1, W).sum(axis=2)
        current = blocks[:, -1].astype(np.float64)
        hist = blocks[:, :-1].astype(np.float64)
        block_start = m0 + W * np.arange(H)
        valid = block_start[None, :] >= mc.first_min[:n_apps, None]
        hist[~valid] = np.nan
        z = robust_z(current, hist)
        z[valid.sum(axis=1) < s.spike_min_history] = np.nan
        seen = (mc.last_min[:n_apps] >= m0) | (np.bincount(app[active], minlength=n_apps)[:n_apps] > 0)

        by_reason: dict[tuple[str, str], int] = {}
        for reason, bit in _REASON_BITS:
            per_app = np.bincount(app[(bits & bit) != 0], minlength=n_apps)[:n_apps]
            for a in np.flatnonzero(seen).tolist():
                by_reason[(self._apps[a], reason)] = int(per_app[a])

        flagged = np.flatnonzero(bits)
        top = flagged[np.argsort(-sess.cost[flagged], kind="stable")][: s.max_offenders]
        offenders = [{
            "session_id": sess.sid[i],
            "app": self._apps[sess.app[i]],
            "reasons": [r for r, b in _REASON_BITS if bits[i] & b],
            "calls": int(sess.calls[i]),
            "tokens": int(sess.tokens[i]),
            "cost_usd": float(sess.cost[i]),
            "first_ts": float(sess.first_ts[i]),
            "last_ts": float(sess.last_ts[i]),
            "calls_in_chain_window": int(chain[i]),
            "tokens_in_burst_window": int(burst[i]),
            "longest_tool_repeat": int(sess.max_run[i]),
        } for i in top.tolist()]

        idx = np.flatnonzero(seen).tolist()
        zs = {self._apps[a]: float(z[a]) for a in idx}
        counts = {self._apps[a]: int(current[a]) for a in idx}
        spikes = [self._apps[a] for a in idx
                  if z[a] >= s.spike_z and current[a] >= s.spike_min_count]
        return RunawayReport(by_reason, offenders, zs, counts, spikes, self._overflow_total, len(sess))
