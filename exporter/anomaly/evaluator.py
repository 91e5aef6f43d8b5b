"""The anomaly evaluator: every signal of every scope judged at one event time.

`evaluate(t)` reads the scope history and judges each signal on several windows ending
at t at once: from a twelfth of the configured window (5 minutes of an hour) up to the
whole window, and for cost and tokens over 2, 4 and 8 hours too. A short window catches
a big change within minutes; the longer ones catch smaller changes that need more
requests to tell from noise. On each window a signal needs both an effect (its estimated
ratio to the baseline passes the spec's ratio) and evidence (a count-aware z-score,
`evidence.py`, passes a threshold set by the false-alarm budget). See `signals.py` for the
thresholds and docs/tuning.md for the reasoning and the measurements behind them.

What each signal's evidence is:
- request_rate: the window's request count against the same time of day on earlier days.
- cost_per_hour, token_velocity: requests got bigger (mean log tokens per request, the
  least noisy view of a prompt change or a growing context; for cost also the mean log
  cost per request, on the scopes one model serves), or more requests came (the
  hour's count), or the hour's total is out of line with the time of day (a few huge
  requests); and, for a creep, a smaller size rise held for hours.
- error_rate: the window's errors against the usual error ratio (binomial).
- latency_p95, ttft_p95, output_tokens_per_second: how many of the window's requests are
  slower than the baseline's p95 (or slower-generating than its median) against the 5 %
  (50 %) expected. Latency's evidence is a slower first token, slower tokens, and, for
  requests without a TTFT, more time per output token: they explain a longer request
  without longer answers, or a shift of the scope's traffic towards a slower app,
  confusing the test. The whole duration counts as evidence only where none of them is
  known; elsewhere its p95 measures the effect where its tail and another kind agree.

After the verdicts, an anomaly that another scope explains (the global echo of one app's
spike, the app echo of one model's slowdown, the apps and models that fell with an outage
of all traffic) is marked `explained`; the alert rules stay quiet for it, so one cause
pages once.

The result is an immutable `Snapshot`; the `/metrics` collector and the HTTP API read the
latest one, so a scrape never waits on an evaluation, and the backtest calls the same
`evaluate(t)` at historical times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import sketch
from ..evidence import (
    APART_EVIDENCE,
    apart_log_odds,
    binomial_z,
    count_z,
    mean_z,
    page_evidence,
    quasi_poisson_z,
    z_threshold,
)
from ..storage.buckets import SESSION_BUCKETS, SESSION_FIELDS, F
from ..zones import local_hours
from .arrival import failure_share
from .baseline import (
    BLOCK_SLOTS,
    TAIL_SCALE_DF_PER_VALUE,
    WEEK_HOURS,
    ErrorStats,
    SizeStats,
    against_last_week,
    burstiness,
    daily_profile,
    error_stats,
    held_spreads,
    level_spread,
    nan_median,
    on_local_hours,
    size_stats,
    sum_spread,
    weekly_profile,
    window_dispersion,
    window_spread,
)
from .history import (
    QUANTILES,
    SIZE_KINDS,
    WINDOW_SLOTS,
    ScopeHistory,
    ScopeKey,
    WindowValues,
    scope_text,
    token_sum,
)
from .signals import Severity, SignalSpec

SEVERITY_NAMES = {int(s): s.name.lower() for s in Severity}
WINDOW_FRACTIONS = (1 / 12, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 1.0)   # of the configured window
SUSTAINED_HOURS = (2, 4, 8)                                     # cost and token creep
JUDGED_BY_SIZE = ("cost_per_hour", "token_velocity")             # whose verdicts leave hours out of the size statistics
TAIL = {"latency": 0.05, "ttft": 0.05, "otps": 0.5, "tpot": 0.05}   # share beyond the baseline quantile when normal
KINDS = tuple(QUANTILES)                                        # latency, ttft, otps, tpot
MIN_SAMPLES = 5
POOLED = ("ttft", "tpot")       # disjoint requests (streamed, not streamed) timed against tails of one share
MIN_QUANTILE_HOURS = 24       # baseline hours with a quantile before a sketch kind counts as evidence
SIZE_FIELDS = {"tokens": ("sized_requests", "log_tokens", "log_tokens_sq"),
               "cost": ("costed_requests", "log_cost", "log_cost_sq")}
ERROR_RATIO_FLOOR = 0.01
LOG_FLOOR = {"cost_per_hour": 0.01, "token_velocity": 1.0}     # keeps log ratios of near-zero totals finite
# the requests that spend, per usage signal: those that carried cost (records priced or
# carrying their own cost, tokens or not) and those that carried tokens
SPENDING = {"cost_per_hour": "costed_requests", "token_velocity": "sized_requests"}


# events, trials (each per scope and window, or per scope), usual ratio and overdispersion per scope
Counts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(slots=True)
class Verdict:
    """One signal judged over all scopes; every field is an array with one entry per scope.

    `current`, `baseline` and `ratio` are over the configured window, in the signal's unit.
    `zscore` is the strongest evidence found (signed: negative for a drop), `window` the
    length in seconds of the window it was found on (0 when none passed). `explained`
    holds the index of the scope whose anomaly explains this one, or -1. `excess` (S, W)
    is the amount above the expectation on each evaluation window, in the signal's
    natural count (requests, errors, slow requests, USD, tokens), and for the signals that
    judge a shift held for hours (cost, tokens, request rate) then on each of those
    SUSTAINED_HOURS windows. `held_hours` is, where only such a held shift reached its
    ratio, the length in hours of the window it passed furthest on (0 elsewhere): `explain`
    compares excesses there. `counts` is kept for a
    ratio of counts (the error rate): events and trials, each (S, W), and the usual ratio
    and overdispersion per scope. It lets `explain` ask whether a model's other traffic
    moved as one app's did. `size_excess`, kept for cost and tokens, is the excess of a
    rise in request size in tokens, with `excess`'s columns (`size_baseline` the tokens
    an hour usually holds), and `by_size` marks the (scope, window) whose evidence was the
    size's: `explain` weighs a scope's anomaly on the excess of the evidence that found it."""

    current: np.ndarray
    baseline: np.ndarray
    ratio: np.ndarray
    zscore: np.ndarray
    band_lower: np.ndarray
    band_upper: np.ndarray
    baseline_hours: np.ndarray
    severity: np.ndarray
    window: np.ndarray
    excess: np.ndarray
    effects: "Effects | None" = None
    explained: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    held_hours: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    counts: Counts | None = None
    size_excess: np.ndarray | None = None
    size_baseline: np.ndarray | None = None
    by_size: np.ndarray | None = None


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
                by = int(v.explained[i]) if v.explained.size else -1
                yield {
                    "signal": spec.name, "scope": scope, "app": app or None, "provider": provider or None,
                    "model": model or None, "unit": spec.unit, "direction": spec.direction,
                    "current": _num(v.current[i]), "baseline": _num(v.baseline[i]), "ratio": _num(v.ratio[i]),
                    "zscore": _num(v.zscore[i]), "evidence_window_seconds": _num(v.window[i]),
                    "band_lower": _num(v.band_lower[i]), "band_upper": _num(v.band_upper[i]),
                    "threshold": {"warning": spec.warning_ratio, "high": spec.high_ratio},
                    "baseline_hours": int(v.baseline_hours[i]),
                    "requests_in_window": int(self.window_requests[i]),
                    "severity": SEVERITY_NAMES[int(v.severity[i])],
                    "explained_by": scope_name(self.keys[by]) if by >= 0 else None,
                }

    def put_on_an_app(self, signal: str) -> frozenset[tuple[str, str, str]]:
        """The (provider, model, app)s where the model's anomaly of `signal` is explained
        by that app's (for the error rate: the app's requests fail, the model's others do not)."""
        v = self.verdicts.get(signal)
        if v is None or not v.explained.size:
            return frozenset()
        rows = np.flatnonzero((v.severity >= 1) & (v.explained >= 0))
        return frozenset((self.keys[i][2], self.keys[i][3], self.keys[int(v.explained[i])][1]) for i in rows.tolist()
                         if self.keys[i][0] == "model" and self.keys[int(v.explained[i])][0] == "app")


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 6)


def scope_name(key: ScopeKey) -> str:
    scope, app, provider, model = key
    return f"app={app}" if scope == "app" else f"model={provider}/{model}" if scope == "model" else "global"


# --- what the evaluator knows about "normal", rebuilt when the hour turns ---------------

@dataclass(slots=True)
class Seasonal:
    """An hourly quantity (requests, cost, tokens) against the same time of day, and of the
    week where two weeks agree on a weekly pattern (`weekly_profile`)."""

    profile: np.ndarray       # (S, 168) expected value of each hour of the week, by absolute hour % 168 (NaN: too little history)
    level_sd: np.ndarray      # (S,) how far an hour strays from its expectation beyond sampling noise (log)
    level_df: np.ndarray      # (S,) degrees of freedom of that spread: 0.6 per hour it was read from


@dataclass(slots=True)
class Baseline:
    end: int                                  # first hour not in the baseline (the window's first hour)
    requests: Seasonal
    request_falls: Seasonal                   # what a fall of the request rate is judged against (`against_last_week`)
    cost: Seasonal
    tokens: Seasonal
    burstiness: np.ndarray                    # (S,) dispersion of request counts within an hour
    window_burstiness: np.ndarray             # (S, W) that of each window's count (`window_dispersion`)
    size_spread: dict[str, np.ndarray]        # signal -> (S,) 1 + CV^2 of its request sizes: a sum of n varies this much more than n
    costs: SizeStats                          # log cost per request, as `sizes` is for log tokens
    sizes: SizeStats
    errors: ErrorStats
    spending_share: dict[str, np.ndarray]     # field -> (S,) share of the requests that carried tokens (sized) or cost (costed)
    quantile: dict[str, np.ndarray]           # kind -> (S,) median of the hourly quantiles
    threshold_bins: np.ndarray                # (S, kinds) sketch bin of each kind's exceedance threshold
    sustained: dict[int, "Sustained"]          # hours -> the baseline of a shift held that long


@dataclass(slots=True)
class Sustained:
    """For a request-rate shift held over the last k whole hours (the k hours up to
    `Baseline.end`): the spread of k-hour request counts around their expectation, from the
    baseline hours before those k."""

    count_sd: np.ndarray


class Evaluator:
    """Judges all signals over all scopes at a given event time."""

    def __init__(self, history: ScopeHistory, specs: tuple[SignalSpec, ...], baseline: float,
                 alert_budget: float = 1.0, timezone: str = "UTC", page_share: float = 1.0) -> None:
        self.history = history
        self.specs = specs
        self.baseline_s = baseline
        self.alert_budget = alert_budget
        self.page_share = page_share          # of the budget, for the evidence a high verdict needs
        self.timezone = timezone
        self._baseline: Baseline | None = None
        self._key: tuple[int, int] | None = None
        # signal -> (scopes,) event time each scope last named an anomaly (flagged, not explained);
        # scope rows of the history never move, so the arrays only grow
        self._named: dict[str, np.ndarray] = {}
        # signal -> (scopes,) event time each app last took a flagged model's anomaly (`_remember_apart`)
        self._apart: dict[str, np.ndarray] = {}
        # signal -> (scopes,) event time each scope's own verdict of a count signal was last
        # raised, and since when it has been raised without a gap (`_raised_since`)
        self._raised: dict[str, np.ndarray] = {}
        self._since: dict[str, np.ndarray] = {}
        # absolute hour -> (scopes,) whose cost or tokens a verdict judged anomalous in it
        self._judged: dict[int, np.ndarray] = {}
        # absolute hour -> (scopes,) whose request rate a short window's verdict judged anomalous in it
        self._judged_requests: dict[int, np.ndarray] = {}
        self.judged_version = 0                   # bumped when a mark is added: the engine stores them then
        h = history
        self.fine_slots = [max(1, round(f * h.window / h.fine)) for f in WINDOW_FRACTIONS]
        self.coarse_slots = [max(1, round(f * h.window / h.coarse)) for f in WINDOW_FRACTIONS]
        self.window_s = np.array([k * h.fine for k in self.fine_slots], dtype=np.float64)
        # the window lengths (seconds) at which the history measures mean sizes, the hour last
        self.size_lengths = np.array([k * h.coarse for k in WINDOW_SLOTS] + [h.window], dtype=np.float64)

    def local(self, hours: np.ndarray) -> np.ndarray:
        """Absolute UTC hours as the site's local hour numbers (`zones.local_hours`): the
        baseline's hours of the day and of the week are its users' hours, which a daylight
        saving change does not move."""
        return local_hours(hours, self.timezone)

    # --- baseline ---------------------------------------------------------------------

    def _baseline_at(self, end: int) -> Baseline:
        """Statistics of the hours before `end`, recomputed when the hour turns, a scope
        appears or an hour before `end` changes (late data)."""
        h = self.history
        key = (end, h.size)
        if self._baseline is not None and key == self._key and h.changed_from_hour >= end:
            return self._baseline
        count = int(round(self.baseline_s / 3600))
        hours = np.arange(end - count, end)
        held = h.baseline_hours(hours)                # zero (NaN) where unknown
        unknown, adds = held.unknown, held.adds
        req, cost, tokens = (np.where(unknown, np.nan, a) for a in
                             (adds[..., F["requests"]], adds[..., F["cost"]], token_sum(adds)))
        req0 = np.nan_to_num(req)
        disp = burstiness(req0, held.bursts, round(3600 / h.coarse))
        judged = self._judged_hours(hours, adds[..., F["sized_requests"]])
        sizes, costs = (self._size_stats(adds, held.slots, kind, judged) for kind in ("tokens", "cost"))
        local = self.local(hours)
        how = local % WEEK_HOURS
        # two weeks of totals for the weekly pattern: the baseline's own hours, and the ring's
        # for those before them
        weeks = np.arange(end - 2 * WEEK_HOURS, end)
        local_weeks = self.local(weeks)
        older = weeks[weeks < hours[0]] if hours.size else weeks
        recent = weeks.size - older.size
        gathered = h.volume_hours(older) if older.size else (np.zeros((h.size, 0)),) * 3
        week_values = {name: np.concatenate([g, v[:, v.shape[1] - recent:]], axis=1)
                       for name, g, v in zip(("requests", "cost", "tokens"), gathered, (req, cost, tokens))}

        def profile_of(values: np.ndarray, name: str, floor: float, per_request: np.ndarray | float) -> np.ndarray:
            return weekly_profile(daily_profile(*on_local_hours(values, local)),
                                  *on_local_hours(week_values[name], local_weeks), floor, np.asarray(per_request) * disp)

        req_profile = profile_of(req, "requests", 0.5, 1.0)
        expected_req = req_profile[:, how]

        def seasonal(values: np.ndarray, name: str, floor: float, per_request: np.ndarray | float) -> Seasonal:
            """per_request: how much a total's relative variance exceeds its count's (1 + CV^2
            of the request sizes summed; 1 for the count itself)."""
            profile = req_profile if values is req else profile_of(values, name, floor, per_request)
            with np.errstate(invalid="ignore", divide="ignore"):
                sampling = np.asarray(per_request)[..., None] * disp[:, None] / np.maximum(expected_req, 0.5)
            expected = expected_req if values is req else profile[:, how]
            hours_read = np.sum(np.isfinite(values) & np.isfinite(expected), axis=1)
            return Seasonal(profile, level_spread(values, expected, sampling, floor),
                            TAIL_SCALE_DF_PER_VALUE * hours_read)

        quantile = {kind: nan_median(held.quantiles[..., k], axis=1) for k, kind in enumerate(KINDS)}
        bins = np.stack([self._threshold_bin(quantile[kind], kind) for kind in KINDS], axis=1)
        # a tail judged against the p95 of a few hours would count far more than 5 % of
        # ordinary requests as slow on some days: a kind is evidence once it has a day of hours
        bins = np.where(np.isfinite(held.quantiles).sum(axis=1) >= MIN_QUANTILE_HOURS, bins, -1)
        expected0 = np.nan_to_num(expected_req)
        sustained = {k: Sustained(sd) for k, sd in held_spreads(req0, expected0, SUSTAINED_HOURS).items()}
        requests = seasonal(req, "requests", 0.5, 1.0)
        by_length = window_dispersion(disp, req0, expected_req, requests.level_sd, held.blocks, h.slots_per_hour,
                                      BLOCK_SLOTS)
        of_window = np.searchsorted(BLOCK_SLOTS, self.coarse_slots, side="right") - 1    # the longest length within it
        # the hours the windows and the held windows judge, and which of them are less than
        # two weeks after the scope's first hour (all, where the horizon cannot hold two weeks)
        judged = np.arange(end - max(SUSTAINED_HOURS), end + 3)
        young = h.first_hour[: h.size, None] > judged[None, :] - 2 * WEEK_HOURS
        if h.horizon_hours < 2 * WEEK_HOURS:
            young[:] = True
        falls = against_last_week(req_profile, young, week_values["requests"], local_weeks, self.local(judged))
        b = Baseline(
            end=end, sustained=sustained, requests=requests,
            request_falls=requests if falls is req_profile else Seasonal(falls, requests.level_sd, requests.level_df),
            cost=seasonal(cost, "cost", LOG_FLOOR["cost_per_hour"], sum_spread(costs)),
            tokens=seasonal(tokens, "tokens", LOG_FLOOR["token_velocity"] * 60, sum_spread(sizes)),
            burstiness=disp, window_burstiness=by_length[:, of_window], size_spread={"cost_per_hour": sum_spread(costs), "token_velocity": sum_spread(sizes)},
            sizes=sizes, costs=costs,
            errors=error_stats(adds[..., F["requests"]], adds[..., F["errors"]]),
            spending_share={f: spending_share(adds, f) for f in SPENDING.values()}, quantile=quantile, threshold_bins=bins)
        self._baseline, self._key = b, key
        h.changed_from_hour = np.iinfo(np.int64).max
        return b

    @staticmethod
    def _threshold_bin(q: np.ndarray, kind: str) -> np.ndarray:
        """The sketch bin a sample must reach (latency, TTFT: above the bin holding the
        baseline's p95) or stay below (throughput: below the bin holding its median) to count
        as slow; -1 where there is no baseline. Bins straddling the quantile are left out, so
        the expected share beyond it is at most TAIL[kind]."""
        b = sketch.bin_index(np.nan_to_num(q, nan=-1.0))
        if kind == "otps":
            return np.where(b >= 0, b, -1)                # count bins < b
        return np.where(b >= 0, b + 1, -1)                # count bins >= b + 1

    @staticmethod
    def _size_stats(adds: np.ndarray, slots: np.ndarray, kind: str = "tokens",
                    leave_out: np.ndarray | None = None) -> SizeStats:
        """Size statistics of the baseline hours, without the (scope, hour) cells of
        `leave_out` (hours judged anomalous, `_judged_hours`)."""
        n, s1, s2 = SIZE_FIELDS[kind]
        count, total, total_sq = adds[..., F[n]], adds[..., F[s1]], adds[..., F[s2]]
        windows = slots[..., SIZE_KINDS.index(kind), :]
        if leave_out is not None:
            count, total, total_sq = (np.where(leave_out, 0.0, a) for a in (count, total, total_sq))
            windows = np.where(leave_out[..., None, None], 0.0, windows)
        return size_stats(count, total, total_sq, windows)

    def _judged_hours(self, hours: np.ndarray, sized: np.ndarray) -> np.ndarray | None:
        """(S, H) the baseline hours in which a scope's cost or tokens were judged anomalous
        (`_remember_judged`), None where there are none. A scope keeps its hours while they
        are under a quarter of its hours with sized requests: a level that lasts longer is
        its new one, and the baseline learns it."""
        out = self._marked(self._judged, hours, sized.shape[0])
        if not out.any():
            return None
        brief = out.sum(axis=1) < 0.25 * np.sum(sized > 0, axis=1)
        out &= brief[:, None]
        return out if out.any() else None

    def _remember_judged(self, verdicts: dict[str, Verdict], t: float) -> None:
        """Mark the hours a cost or token verdict (warning or above, explained or not) rests
        on, from its deciding window's start to `t`, for the scopes it flags.

        A spike of the last days is in the baseline hours. The centre, the spread of
        requests and the dispersion of the sizes are medians and upper quantiles, which a few
        such hours cannot move; but the variances of window means are means of squares, and
        the level the scope's hours reached before is their second-highest: two earlier
        spikes would make the next one (the same fault coming back) read as noise, and as a
        level the scope has reached before. An hour that a verdict judged is therefore left
        out of the size statistics, as the drift detector leaves its drifting hours out of
        its reference. Judged on event time, so a backtest marks the hours live evaluation
        would; the engine stores the marks (`judged_rows`), so a restart keeps them.

        A request-rate verdict of the evaluation windows (not one that a shift held for
        hours carries alone) marks its hours too, in marks of their own that the request
        rate's held windows leave out (`judged_request_hours`, `judged_request_rows`)."""
        self._mark(self._judged, [verdicts[name] for name in JUDGED_BY_SIZE if name in verdicts], t)
        rate = verdicts.get("request_rate")
        if rate is not None:
            self._mark(self._judged_requests, [rate], t, short_only=True)

    def _mark(self, marks: dict[int, np.ndarray], flags: list[Verdict], t: float, short_only: bool = False) -> None:
        """Mark in `marks` the hours from each flagged scope's deciding window's start to t
        (`short_only`: of the verdicts the evaluation windows carry, not a held shift alone)."""
        if not flags:
            return
        n = flags[0].severity.shape[0]
        hit = np.zeros(n, dtype=bool)
        start = np.full(n, t)
        for v in flags:
            on = v.severity >= 1
            if short_only and v.held_hours.size:
                on &= v.held_hours == 0
            hit |= on
            start = np.where(on, np.fmin(start, t - np.nan_to_num(v.window, nan=0.0)), start)
        if not hit.any():
            return
        first, last = np.floor(start / 3600.0).astype(np.int64), math.floor(t / 3600.0)
        for h in range(int(first[hit].min()), last + 1):
            mark = hit & (first <= h)
            got = self._marks(h, n, marks)
            if (mark & ~got).any():
                got |= mark
                self.judged_version += 1

    def judged_request_hours(self, hours: np.ndarray, n: int) -> np.ndarray:
        """(n, len(hours)) the given hours' request-rate marks (`_remember_judged`)."""
        return self._marked(self._judged_requests, hours, n)

    @staticmethod
    def _marked(marks: dict[int, np.ndarray], hours: np.ndarray, n: int) -> np.ndarray:
        """(n, len(hours)) the marks of the given hours; marks older than the first of them
        are dropped (no reader looks further back)."""
        for h in [h for h in marks if h < int(hours[0])]:
            del marks[h]
        out = np.zeros((n, hours.shape[0]), dtype=bool)
        for j, h in enumerate(hours.tolist()):
            got = marks.get(h)
            if got is not None:
                m = min(n, got.shape[0])
                out[:m, j] = got[:m]
        return out

    def judged_rows(self) -> list[tuple[str, int]]:
        """Every (scope key, hour) mark of the size statistics held, for the store."""
        return self._rows(self._judged)

    def judged_request_rows(self) -> list[tuple[str, int]]:
        """Every (scope key, hour) mark of the request rate's held windows held, for the store."""
        return self._rows(self._judged_requests)

    def _rows(self, marks: dict[int, np.ndarray]) -> list[tuple[str, int]]:
        keys = self.history.keys
        return [(scope_text(keys[i]), h) for h, got in marks.items() for i in np.flatnonzero(got).tolist()]

    def load_judged(self, rows: Sequence[tuple[str, int]]) -> None:
        """Marks stored from `judged_rows` (at start-up), for the scopes the history holds."""
        self._load(rows, self._judged)

    def load_judged_requests(self, rows: Sequence[tuple[str, int]]) -> None:
        """Marks stored from `judged_request_rows` (at start-up)."""
        self._load(rows, self._judged_requests)

    def _load(self, rows: Sequence[tuple[str, int]], marks: dict[int, np.ndarray]) -> None:
        index = {scope_text(key): i for i, key in enumerate(self.history.keys)}
        n = len(self.history.keys)
        for text, h in rows:
            i = index.get(text)
            if i is not None:
                self._marks(h, n, marks)[i] = True

    def _marks(self, h: int, n: int, marks: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """The (scopes,) marks of hour h (in `marks`, the size marks by default), grown to n
        scopes (empty if it had none)."""
        marks = self._judged if marks is None else marks
        got = marks.get(h)
        if got is None or got.shape[0] < n:
            grown = np.zeros(n, dtype=bool)
            if got is not None:
                grown[: got.shape[0]] = got
            got = marks[h] = grown
        return got

    # --- evaluation -------------------------------------------------------------------

    def evaluate(self, t: float) -> Snapshot:
        h = self.history
        n = h.size
        end = math.floor((t - h.window) / 3600)
        h.refresh_open_hours(before_hour=end)
        base = self._baseline_at(end)
        win = h.window_values(t)
        span = h.span(t, self.baseline_s)
        w_req = win.adds[:, F["requests"]]
        active = (w_req > 0) | (h.baseline_requests(t, self.baseline_s) > 0)
        tests = max(int(active.sum()), 1) * len(self.specs)
        n_windows = len(WINDOW_FRACTIONS) + len(SUSTAINED_HOURS)
        zc = np.array([z_threshold(w, tests, self.alert_budget, n_windows) for w in self.window_s])
        zc_long = np.array([z_threshold(3600.0 * k, tests, self.alert_budget, n_windows) for k in SUSTAINED_HOURS])
        ctx = _Context(self, t, base, win, span, zc, zc_long, n)
        verdicts = {spec.name: JUDGES[spec.name](spec, ctx) for spec in self.specs}
        keys, pairs = h.keys[:n], h.app_model_pairs()
        if self.page_share < 1.0:
            zc_page = np.array([z_threshold(w, tests, self.alert_budget * self.page_share, n_windows)
                                for w in self.window_s])
        for spec in self.specs:
            v = verdicts[spec.name]
            if self.page_share < 1.0:
                # a page needs its evidence past the page budget's threshold, on the window it was strongest on
                at = np.clip(np.searchsorted(self.window_s, v.window), 0, len(self.window_s) - 1)
                v.severity = page_evidence(v.severity, v.zscore, zc_page[at])
            samples = self._event_samples(spec.name, v, pairs, t) if v.counts is not None else None
            v.explained = explain(spec, v, keys, pairs, self.window_s, self._incumbents(spec.name, n, t),
                                  self._incumbents(spec.name, n, t, self._apart), samples)
            lifted = lift_to_roots(v.severity, v.explained, keys)
            window, sign = _echo_reading(v)
            from_none = (lifted > v.severity) & (v.severity == 0)
            v.window = np.where(from_none, window, v.window)
            v.zscore = np.where(from_none & (sign != 0), sign * np.abs(v.zscore), v.zscore)
            v.severity = lifted
            self._remember_named(spec.name, v, t)
            if v.counts is not None:
                self._remember_apart(spec.name, v, keys, t)
        self._remember_judged(verdicts, t)
        return Snapshot(t, list(h.keys[:n]), self.specs, verdicts, active, w_req)

    def _incumbents(self, signal: str, n: int, t: float, named: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Scopes that named an anomaly of `signal` (in `named`: that took it from a model,
        `_remember_apart`) within the shortest evaluation window before t (one
        evaluation's dip below the thresholds does not end an event)."""
        last = (self._named if named is None else named).get(signal)
        out = np.zeros(n, dtype=bool)
        if last is not None:
            m = min(n, last.shape[0])
            out[:m] = (last[:m] >= t - float(self.window_s[0])) & (last[:m] < t)
        return out

    def _raised_since(self, signal: str, raised: np.ndarray, t: float) -> np.ndarray:
        """(scopes,) since when each scope's own verdict of `signal` has been raised, as of
        t (-inf where it is not raised now). A dip shorter than the shortest evaluation
        window does not end an event, as for `_incumbents`."""
        n = raised.shape[0]
        for stamps in (self._raised, self._since):
            self._stamp(stamps, signal, np.zeros(n, dtype=bool), t)     # grown to n scopes
        last, since = self._raised[signal][:n], self._since[signal][:n]
        ongoing = raised & (last >= t - float(self.window_s[0])) & (last <= t)
        since[raised & ~ongoing] = t
        last[raised] = t
        return np.where(raised, since, -np.inf)

    def _event_samples(self, signal: str, v: Verdict, pairs: np.ndarray,
                       t: float) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """For each (app, model) pair whose own verdicts of a count signal are both raised:
        every scope's events and trials since the earlier of the two was raised, where that
        is less than the configured window ago (`_failures_are_the_apps` reads these).

        The window holds up to an hour before the event, when the app and the rest of the
        model's traffic both failed at their usual rates: early in an event that dilutes
        the app's failures, so the test's alternative (both failing alike) sits close to
        the usual rate and its evidence grows slowly. An app's own retry storm at a fifth
        of its requests was named at its model for 10 minutes before the hour window put
        it back on the app (5 on this sample). From the first verdict on, the sample holds
        the event alone, and grows with it: an accumulating sample with a start fixed
        before its data is read, as Wald's bound asks. The start is a verdict's, not a
        guess of when the event began: an earlier start would take in minutes in which
        the model's other traffic had not failed yet, and a model's fault would lean
        towards its app."""
        raised = v.severity >= 1
        since = self._raised_since(signal, raised, t)
        h = self.history
        a, m = (pairs[:, 0], pairs[:, 1]) if pairs.size else (np.zeros(0, dtype=np.int64),) * 2
        both = (a < raised.shape[0]) & (m < raised.shape[0])
        a, m = a[both], m[both]
        both = raised[a] & raised[m]
        a, m = a[both], m[both]
        if not a.size:
            return {}
        start = np.floor(np.minimum(since[a], since[m]) / h.fine).astype(np.int64)
        k = math.floor(t / h.fine) - start + 1                   # fine slots since the first verdict
        young = k < self.fine_slots[-1]
        if not young.any():
            return {}
        ks = np.unique(k[young])
        sums = h.recent_sums(t, ks.tolist())
        e, n = sums[..., F["errors"]], sums[..., F["requests"]]
        col = np.searchsorted(ks, k[young])
        return {(int(x), int(y)): (e[:, j], n[:, j]) for x, y, j in zip(a[young], m[young], col.tolist())}

    def _remember_named(self, signal: str, v: Verdict, t: float) -> None:
        self._stamp(self._named, signal, (v.severity >= 1) & (v.explained < 0), t)

    def _remember_apart(self, signal: str, v: Verdict, keys: list[ScopeKey], t: float) -> None:
        """Stamp the apps that a flagged model's anomaly of a performance signal is put on
        (the model explained by the app: `_failures_are_the_apps` decided it), so that
        `explain` keeps the decision while the event lasts."""
        n = v.severity.shape[0]
        models = np.flatnonzero((v.explained >= 0) & np.array([k[0] == "model" for k in keys[:n]], dtype=bool))
        apps = v.explained[models]
        apps = apps[np.array([keys[a][0] == "app" for a in apps.tolist()], dtype=bool)] if apps.size else apps
        if apps.size or signal in self._apart:
            hit = np.zeros(n, dtype=bool)
            hit[apps] = True
            self._stamp(self._apart, signal, hit, t)

    @staticmethod
    def _stamp(stamps: dict[str, np.ndarray], signal: str, hit: np.ndarray, t: float) -> None:
        """Set t as the time of the scopes `hit` in `stamps[signal]`, grown to their number."""
        n = hit.shape[0]
        last = stamps.get(signal)
        if last is None or last.shape[0] < n:
            grown = np.full(n, -np.inf)
            if last is not None:
                grown[: last.shape[0]] = last
            last = stamps[signal] = grown
        last[:n][hit] = t


class _Context:
    """Everything one evaluation's judges read: the windows' sums and slow-request counts,
    the baseline, and the evidence thresholds. Sketch sums for a window's quantile are
    taken only for the scopes whose evidence already passed."""

    def __init__(self, ev: Evaluator, t: float, base: Baseline, win: WindowValues, span: np.ndarray,
                 zc: np.ndarray, zc_long: np.ndarray, n: int) -> None:
        h = ev.history
        self.ev, self.h, self.t, self.base, self.win, self.span, self.zc, self.zc_long, self.n = (
            ev, h, t, base, win, span, zc, zc_long, n)
        self.sums = h.recent_sums(t, ev.fine_slots)                # (S, W, F)
        self.window_min = ev.window_s / 60.0
        self.hour_s = h.window
        above, total, self._coarse_abs = h.recent_exceedances(t, max(ev.coarse_slots), base.threshold_bins,
                                                              version=base.end)
        # cumulative from the newest slot back: the last k slots of each window
        ca, ct = np.cumsum(above[:, ::-1], axis=1), np.cumsum(total[:, ::-1], axis=1)
        idx = np.array(ev.coarse_slots) - 1
        self.above, self.samples = ca[:, idx], ct[:, idx]          # (S, W, kinds)
        self._expected: np.ndarray | None = None
        self._expected_falls: np.ndarray | None = None
        self._shares: tuple[np.ndarray, ...] | None = None         # `ScopeHistory.outcome_shares`
        self._hours: np.ndarray | None = None
        self._whole: dict[int, np.ndarray] = {}
        self._whole_slots: dict[int, np.ndarray] = {}

    def expected_requests(self) -> np.ndarray:
        """(S, W) requests the time of day leads to expect in each window: the seasonal hourly
        expectation, interpolated between hour centres minute by minute."""
        if self._expected is None:
            self._expected = self.expected(self.base.requests, np.maximum(self.ev.fine_slots, 1))
        return self._expected

    def expected_request_falls(self) -> np.ndarray:
        """(S, W) the requests a fall is judged against (`Baseline.request_falls`): the same
        as `expected_requests` but for scopes without two weeks of history."""
        if self.base.request_falls is self.base.requests:
            return self.expected_requests()
        if self._expected_falls is None:
            self._expected_falls = self.expected(self.base.request_falls, np.maximum(self.ev.fine_slots, 1))
        return self._expected_falls

    def expected(self, seasonal: Seasonal, slots: list[int] | np.ndarray) -> np.ndarray:
        """(S, len(slots)) expected totals of the windows of the last `slots` fine slots.
        Each slot is expected to hold only the share of its records that has arrived by `t`
        (`arrival`): the current slot has run for part of its length, and the newest slots'
        slower requests are still running or on their way. Counting them whole would read
        every window as short of its usual level (10 % on a 5-minute window for the current
        slot alone, on average), a bias towards drops."""
        h = self.h
        out = np.zeros((self.n, len(slots)))
        t_end = math.floor(self.t / h.fine) * h.fine + h.fine          # windows end with the current slot
        weight = self._arrivals(max(int(np.max(slots)), 1))[0]
        for j, k in enumerate(slots):
            mids = t_end - (np.arange(k) + 0.5) * h.fine                 # slot centres
            pos = mids / 3600.0 - 0.5                                    # in hours, from the first hour's centre
            h0 = np.floor(pos).astype(np.int64)
            frac = pos - h0
            v0 = seasonal.profile[:, self.ev.local(h0) % WEEK_HOURS]
            v1 = seasonal.profile[:, self.ev.local(h0 + 1) % WEEK_HOURS]
            per_hour = (1 - frac) * v0 + frac * v1                      # (S, k) expected per hour at each slot
            out[:, j] = (per_hour * weight[:, :k]).sum(axis=1) * h.fine / 3600.0
        return out

    def _arrivals(self, k: int) -> tuple[np.ndarray, ...]:
        """`ScopeHistory.outcome_shares` for at least the last k fine slots (and the
        configured windows'), read once per evaluation."""
        k_max = max(k, *self.ev.fine_slots)
        if self._shares is None or self._shares[0].shape[1] < k_max:
            self._shares = self.h.outcome_shares(self.t, k_max)
        return self._shares

    def expected_failure_share(self, usual: np.ndarray) -> np.ndarray:
        """(S, W) the share of failures expected among each window's requests that have
        arrived, when `usual` (S,) of requests fail. A slot's failures and successes arrive
        as their own latencies let them (`arrival.failure_share`): where failures come back
        at once and successes take minutes, the newest slots hold more failures than
        `usual`, and judging them against `usual` would read every evaluation as a rise."""
        k_max = max(self.ev.fine_slots)
        _, ok, failed = self._arrivals(k_max)
        ok, failed = ok[:, :k_max], failed[:, :k_max]
        q = failure_share(usual, ok, failed)
        n = self.h.recent_slots(self.t, k_max, F["requests"])           # (S, k) arrived, newest first
        idx = np.asarray(self.ev.fine_slots) - 1
        in_n, in_q = np.cumsum(n, axis=1)[:, idx], np.cumsum(n * q, axis=1)[:, idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            out: np.ndarray = np.where(in_n > 0, in_q / in_n, np.asarray(usual, dtype=np.float64)[:, None])
        return out

    def window_quantiles(self, kind: str, rows: np.ndarray, q: float) -> np.ndarray:
        """(len(rows), W) q-quantile of `kind` over each window, for the given scope rows."""
        sk = self.h.coarse_sketches(rows, self._coarse_abs[::-1], KINDS.index(kind))   # newest slot first
        # the newest k slots' sum for each window's k, added one slot at a time: the same
        # integers as a cumulative sum over all slots, at a fraction of its memory traffic
        ends = np.array(self.ev.coarse_slots)
        cum = np.empty((sk.shape[0], ends.size, sk.shape[2]), dtype=sk.dtype)
        acc = np.zeros((sk.shape[0], sk.shape[2]), dtype=sk.dtype)
        for i in range(int(ends.max())):
            acc += sk[:, i]
            cum[:, ends == i + 1] = acc[:, None]
        return sketch.quantile(cum, q)

    def sessions(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), W, buckets, len(SESSION_FIELDS)) the windows' sums per session bucket."""
        return self.h.recent_sessions(self.t, self.ev.fine_slots, rows)

    def hour_sessions(self, k: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows), buckets, len(SESSION_FIELDS)) `whole_hours(k)` per session bucket."""
        return self.h.recent_hour_sessions(self.base.end, k, rows)

    def hours(self, k: int) -> np.ndarray:
        """(S, k, F) the sums of each of the k whole hours up to the baseline's end (hours
        end+1-k .. end), oldest first; the longest held window's hours are read once."""
        if self._hours is None:
            last = max(SUSTAINED_HOURS)
            self._hours, _ = self.h._take_hours(np.arange(self.base.end + 1 - last, self.base.end + 1))
        return self._hours[:, self._hours.shape[1] - k:]

    def whole_hours(self, k: int) -> np.ndarray:
        """(S, F) sums over the k whole hours up to the baseline's end (hours end+1-k .. end)."""
        if k not in self._whole:
            self._whole[k] = self.hours(k).sum(axis=1)
        return self._whole[k]

    def whole_hours_expected(self, seasonal: Seasonal, k: int) -> np.ndarray:
        """(S,) the seasonal expectation of the same k whole hours' total."""
        return seasonal.profile[:, self._week_slots(k)].sum(axis=1)

    def hours_expected(self, seasonal: Seasonal, k: int, keep: np.ndarray) -> np.ndarray:
        """(S,) the seasonal expectation of the total of those of the k whole hours that
        `keep` (S, k) keeps."""
        return np.einsum("sk,sk->s", seasonal.profile[:, self._week_slots(k)], keep)

    def _week_slots(self, k: int) -> np.ndarray:
        """The hours of the week of the k whole hours up to the baseline's end."""
        if k not in self._whole_slots:
            end = self.base.end
            self._whole_slots[k] = self.ev.local(np.arange(end + 1 - k, end + 1)) % WEEK_HOURS
        return self._whole_slots[k]

    def ready(self, spec: SignalSpec) -> np.ndarray:
        return self.span >= spec.min_baseline_hours

    def one_model(self) -> np.ndarray:
        """(S,) scopes whose requests all go to one model: every model scope, an app that
        sends to one model, the global scope of a site with one model."""
        kind = np.array([k[0] for k in self.h.keys[:self.n]], dtype=object)
        pairs = self.h.app_model_pairs()
        per_app = np.bincount(pairs[:, 0], minlength=self.n) if pairs.size else np.zeros(self.n, dtype=np.int64)
        return np.where(kind == "model", True,
                        np.where(kind == "app", per_app[:self.n] <= 1, int(np.sum(kind == "model")) <= 1))


# --- the judges: one per signal -------------------------------------------------------
#
# A judge measures; it does not decide. For every scope it reports the largest effect
# (ratio to the baseline, or its inverse for a fall) among the windows whose evidence
# passed, and the same for a shift held for hours. `grade` turns those effects into a
# severity with the spec's ratios, so the thresholds are applied in one place, and
# `llm-usage-exporter tune` can re-grade a backtest at other ratios without re-running it.

Judge = Callable[[SignalSpec, "_Context"], Verdict]


@dataclass(slots=True)
class Effects:
    """Per scope: the strongest significant rise (ratio >= 1) and fall (1 / ratio), over
    the windows judged, and over the 2 to 8 hour windows of a held shift; 0 where none."""

    rise: np.ndarray
    fall: np.ndarray
    held_rise: np.ndarray
    held_fall: np.ndarray

    @classmethod
    def none(cls, n: int) -> "Effects":
        z = np.zeros(n)
        return cls(z, z.copy(), z.copy(), z.copy())


def spending_share(adds: np.ndarray, field: str) -> np.ndarray:
    """(S,) share of a baseline's requests (adds: (S, H, F)) counted in `field` (those that
    carried tokens, or cost); 1 where it has none, so a new scope expects every request to
    spend."""
    n, spent = adds[..., F["requests"]].sum(axis=1), adds[..., F[field]].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, spent / n, 1.0)


def _largest(effect: np.ndarray, passed: np.ndarray) -> np.ndarray:
    """(S, W) effects where the evidence passed, to the largest per scope (0 where none)."""
    with np.errstate(invalid="ignore"):
        return np.where(passed & np.isfinite(effect), effect, 0.0).max(axis=1, initial=0.0)


def grade(spec: SignalSpec, e: Effects) -> tuple[np.ndarray, np.ndarray]:
    """Severity (0 ok, 1 warning, 2 high) and direction (+1 rose, -1 fell, 0) of each scope,
    from its effects and the spec's ratios."""
    up = "up" in spec.directions
    down = "down" in spec.directions
    drop_w, drop_h = ((spec.drop_warning_ratio, spec.drop_high_ratio) if spec.direction == "both"
                      else (spec.warning_ratio, spec.high_ratio))

    def reach(effect: np.ndarray, ratio: float, allowed: bool) -> np.ndarray:
        return (effect >= ratio) & (ratio > 0) & allowed

    warn_up, high_up = reach(e.rise, spec.warning_ratio, up), reach(e.rise, spec.high_ratio, up)
    warn_down, high_down = reach(e.fall, drop_w, down), reach(e.fall, drop_h, down)
    held_up = reach(e.held_rise, spec.sustained_ratio, up)
    held_down = reach(e.held_fall, spec.sustained_ratio, down)
    sev = np.where(high_up | high_down, int(Severity.HIGH),
                   np.where(warn_up | warn_down | held_up | held_down, int(Severity.WARNING), 0))
    rising = warn_up | held_up
    direction = np.where(rising, 1, np.where(warn_down | held_down, -1, 0))
    return sev.astype(np.int64), direction


def _strongest(z: np.ndarray, zc: np.ndarray, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scope, the z of the window where it comes closest to (or furthest past) its
    threshold, that window's length, and |z| / threshold there (-1 where no window has a z)."""
    with np.errstate(invalid="ignore"):
        rel = np.nan_to_num(np.abs(z) / zc, nan=-1.0)
    j = np.argmax(rel, axis=1)
    rows = np.arange(z.shape[0])
    return z[rows, j], windows[j], rel[rows, j]


def _band(baseline: np.ndarray, sd: np.ndarray, zc: float) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", over="ignore"):
        return baseline * np.exp(-zc * sd), baseline * np.exp(zc * sd)


def judge_request_rate(spec: SignalSpec, c: _Context) -> Verdict:
    b = c.base
    n = c.sums[..., F["requests"]]
    expected = c.expected_requests()
    args = (b.requests.level_sd[:, None], b.window_burstiness, b.requests.level_df[:, None])
    z = count_z(n, expected, *args)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (n + 0.5) / (expected + 0.5)
        z, ratio = _count_without_top_session(c, "requests", n, expected, z, ratio, z >= c.zc, args)
        rate, usual = n / c.window_min, expected / c.window_min
    # a fall against what the scope's week leads to expect (`Baseline.request_falls`; the
    # same expectation where two weeks of history are known)
    expected_fall = c.expected_request_falls()
    z_fall = z if expected_fall is expected else count_z(n, expected_fall, *args)
    ok = c.ready(spec)[:, None] & np.isfinite(expected)
    ok_fall = c.ready(spec)[:, None] & np.isfinite(expected_fall)
    rising = ok & (z >= c.zc) & (rate >= spec.min_current)
    with np.errstate(invalid="ignore", divide="ignore"):
        falling = ok_fall & (z_fall <= -c.zc) & (expected_fall / c.window_min >= spec.min_current)
    held_rise, held_fall, held_hours, held_excess = _held_requests(spec, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = Effects(_largest(ratio, rising), _largest((expected_fall + 0.5) / (n + 0.5), falling), held_rise, held_fall)
        shown = np.where(z < 0, np.where(ok_fall, z_fall, np.nan), np.where(ok, z, np.nan))
    zs, win, _ = _strongest(shown, c.zc, c.ev.window_s)
    current, baseline = rate[:, -1], usual[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        band_sd = np.sqrt(b.requests.level_sd ** 2 + b.window_burstiness[:, -1] / np.maximum(expected[:, -1], 0.5))
    lo, hi = _band(baseline, band_sd, c.zc[-1])
    v = _verdict(c, spec, current, baseline, zs, lo, hi, e, win, excess=np.hstack([n - expected, held_excess]))
    v.held_hours = _held_only(spec, e, held_hours)
    return v


def _held_requests(spec: SignalSpec, c: _Context) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A shift of the request rate held over the last 2, 4 or 8 whole hours: against the sum
    of those hours' seasonal expectations, judged by how much k-hour sums strayed from
    theirs in the baseline (and by sampling noise, for quiet scopes). (rise, fall) effects,
    the hours of the window a shift passed furthest on (0 where none), and the excess of
    requests on each of those windows (S, K).

    The hours in which a verdict of the evaluation windows judged the scope's request rate
    (`Evaluator.judged_request_hours`) are left out, with their expectation: a burst or an
    outage of an hour is theirs to judge, and stayed in the held windows for up to 8 hours
    after it ended, at a ratio their sustained ratio passes (a retry storm's all traffic
    warned 90 minutes after it, an outage's app two hours after). A shift that only the
    held windows find has no such hour, so it is judged as before: the level shifts of
    NAB's series that a window read without its top hour found late or not at all. A
    window with fewer hours left is read with a wider spread, sqrt(k / kept) times its
    k-hour one (independent hours: the widest), and one with less than two hours left,
    not at all (an hour is the evaluation windows')."""
    b = c.base
    rise, fall = np.zeros(c.n), np.zeros(c.n)
    hours, best = np.zeros(c.n, dtype=np.int64), np.zeros(c.n)
    excess = np.zeros((c.n, len(SUSTAINED_HOURS)))
    ready = c.ready(spec)

    def held_z(n: np.ndarray, expected: np.ndarray, k: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = (n + 0.5) / (expected + 0.5)
            z_level = np.log(ratio) / (b.sustained[k].count_sd * np.sqrt(k / np.maximum(kept, 1)))
            z_sampling = quasi_poisson_z(n, expected, b.burstiness)
            z = np.sign(z_level) * np.fmin(np.abs(z_level), np.abs(z_sampling))
        return np.where(kept >= 2, z, 0.0), ratio

    last = max(SUSTAINED_HOURS)
    judged = c.ev.judged_request_hours(np.arange(b.end + 1 - last, b.end + 1), c.n)     # (S, last)
    for j, k in enumerate(SUSTAINED_HOURS):
        keep = ~judged[:, last - k:]
        kept = keep.sum(axis=1)
        n = np.einsum("sk,sk->s", c.hours(k)[..., F["requests"]], keep)
        expected = c.hours_expected(b.requests, k, keep)
        excess[:, j] = n - expected
        z, ratio = held_z(n, expected, k, kept)
        # a fall against the scope's week, as on the short windows (`Baseline.request_falls`)
        expected_fall = (expected if b.request_falls is b.requests
                         else c.hours_expected(b.request_falls, k, keep))
        z_fall, ratio_fall = (z, ratio) if expected_fall is expected else held_z(n, expected_fall, k, kept)
        with np.errstate(invalid="ignore", divide="ignore"):
            up = ready & np.isfinite(expected) & (z >= c.zc_long[j]) & (n / (60.0 * k) >= spec.min_current)
            down = (ready & np.isfinite(expected_fall) & (z_fall <= -c.zc_long[j])
                    & (expected_fall / (60.0 * k) >= spec.min_current))
            rise = np.fmax(rise, np.where(up, ratio, 0.0))
            fall = np.fmax(fall, np.where(down, 1.0 / ratio_fall, 0.0))
            rel = np.where(up, z / c.zc_long[j], np.where(down, -z_fall / c.zc_long[j], 0.0))
        hours, best = np.where(rel > best, k, hours), np.fmax(rel, best)
    return rise, fall, hours, excess


def _held_only(spec: SignalSpec, e: Effects, hours: np.ndarray) -> np.ndarray:
    """(S,) the held window's hours for the verdicts that only a held shift carries (its
    short windows' effect stayed below the warning ratio), 0 elsewhere. Such a verdict's
    evidence is the held window's, and so is the excess `explain` must weigh: a shift of a
    quarter is no larger than a short window's noise, so comparing it there would name one
    scope or another by chance."""
    drop = spec.drop_warning_ratio if spec.direction == "both" else spec.warning_ratio
    short = (e.rise >= spec.warning_ratio) | (e.fall >= drop)
    held = (e.held_rise >= spec.sustained_ratio) | (e.held_fall >= spec.sustained_ratio)
    return np.where(held & ~short & (spec.sustained_ratio > 0), hours, 0)


def _size_evidence(c: _Context, st: SizeStats, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, rise, ratio) per window of the mean log size of one kind against the baseline
    (z: see `size_z`).

    A window whose mean the scope's hours reached at least twice in the baseline is not a
    rise (its z is kept, its ratio is 0): requests come in sessions that share a model and
    a prompt, so a small scope's size swings with whichever sessions are running, and a
    level it reached on two other hours of the last weeks is part of its usual traffic,
    however rare among its hours. A rise must also survive leaving out the window's
    session that carries most of it (`without_top_session`). `ratio` is the size ratio itself."""
    n, s1, _ = SIZE_FIELDS[kind]
    m, total = c.sums[..., F[n]], c.sums[..., F[s1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / m
    z = size_z(st, mean, m, c.ev.window_s, c.ev.size_lengths)
    ratio = np.exp(np.nan_to_num(mean - st.centre[:, None], nan=0.0))
    m_rest, mean_rest, carried = m.copy(), mean.copy(), np.zeros(m.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        rows = np.flatnonzero((z >= c.zc).any(axis=1))      # only a rise that passed can fall short
    if rows.size:
        sessions = c.sessions(rows)
        m_rest[rows], mean_rest[rows], carried[rows] = without_top_session(
            m[rows], total[rows], sessions[..., SESSION_FIELDS.index(n)], sessions[..., SESSION_FIELDS.index(s1)],
            st.centre[rows])
    z_rest = size_z(st, mean_rest, m_rest, c.ev.window_s, c.ev.size_lengths)
    with np.errstate(invalid="ignore"):
        # a rise one session carries is what the rest of the window shows (none at all when
        # that session made every request); a fall, or a rise shared out, is left as it was
        carried &= z > 0
        z = np.where(carried, np.fmax(np.fmin(z, np.where(m_rest > 0, z_rest, 0.0)), 0.0), z)
        mean_rise = np.where(carried & (m_rest > 0), np.fmin(mean, mean_rest), mean)
        rise_ratio = np.exp(np.nan_to_num(mean_rise - st.centre[:, None], nan=0.0))
        return z, np.where(mean_rise > st.seen[:, None], rise_ratio, 0.0), ratio


def without_top_session(n: np.ndarray, total: np.ndarray, n_by: np.ndarray, total_by: np.ndarray,
                        centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, mean, carried) of each window (S, W) without its session bucket (S, W, B) of the
    largest excess over the scope's centre, and whether that bucket carries most of the
    window's excess. The requests of one session are one piece of evidence whatever their
    number, so a rise that one session (a long agent run on a dearer model) carries is not
    the scope's, however many requests it makes (the runaway detector judges sessions);
    a rise that moves every session leaves each bucket a share of it. Requests in no bucket
    (without a session id, or in slots restored at start-up) stay in."""
    c = centre[:, None]
    excess = total_by - n_by * c[..., None]
    top = np.argmax(excess, axis=-1)[..., None]
    n_rest = n - np.take_along_axis(n_by, top, axis=-1)[..., 0]
    total_rest = total - np.take_along_axis(total_by, top, axis=-1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        carried = np.take_along_axis(excess, top, axis=-1)[..., 0] > 0.5 * (total - n * c)
        return n_rest, np.where(n_rest > 0.5, total_rest / n_rest, np.nan), carried


def size_z(st: SizeStats, mean: np.ndarray, n: np.ndarray, windows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(S, W) z of windows' mean log sizes (`mean` over `n` requests, windows of `windows`
    seconds) against the baseline `st`; `lengths` (seconds) are those the baseline measured
    window means at, the hour last.

    Requests come in sessions that share a model and a prompt, so a scope's size swings
    with whichever sessions are running, beyond what independent requests would give, and
    the more so the shorter the window: a 5-minute window often holds one session, an hour
    mixes several. So the z is the smaller of two readings, each of which a real change
    passes: against sampling (the window's requests, with the hourly means' dispersion),
    and against the variance window means of this length have, tau^2 + var_w / n
    (`baseline.window_stats`, `window_spread`), whose tau^2 does not shrink as a long
    session adds requests. The hour's tau^2 is measured on whole hours, whose request
    counts are known: between + sessions / n (`baseline.excess_by_count`), so a busy hour
    of many sessions is not asked to stray as far as a quiet hour of one or two."""
    centre = st.centre[:, None]
    z = mean_z(mean, n, centre, st.var[:, None], st.dispersion[:, None])
    tau2 = window_spread(st, windows, lengths)
    hour = np.asarray(windows) >= lengths[-1]        # measured hour by hour with its count: between + sessions / n
    if hour.any() and st.between.shape[0] == tau2.shape[0]:
        by_count = st.between[:, None] + st.sessions[:, None] / np.maximum(n, 1.0)
        tau2 = np.where(hour[None, :] & np.isfinite(by_count), by_count, tau2)
    var = tau2 + st.within[:, None] / np.maximum(n, 1.0)   # tau^2 + var_w / n
    with np.errstate(invalid="ignore", divide="ignore"):
        z_windows = np.where(n > 0, (mean - centre) / np.sqrt(var), np.nan)
    return np.where(np.isfinite(z_windows), np.sign(z) * np.fmin(np.abs(z), np.abs(z_windows)), z)


def _held_size_z(c: _Context, st: SizeStats, kind: str, k: int, sums: np.ndarray,
                 zc: float) -> tuple[np.ndarray, np.ndarray]:
    """(z, mean) of the mean log size of one kind over the k whole hours of `sums` against
    the baseline; a rise that passed `zc` must survive leaving out the hours' session
    bucket that carries most of it, as on the evaluation windows (`without_top_session`).
    A runaway session's burst stays in the held windows for hours after it ended; it is
    the runaway detector's to judge, and a creep moves every session alike. The z and the
    mean are at most those of the other hours without the one whose requests grew most
    (`top_hour`): a spike of an hour is the hour's windows' to judge, not a size held for
    hours."""
    n, s1, _ = SIZE_FIELDS[kind]
    m, total = sums[:, F[n]], sums[:, F[s1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / m
    z = mean_z(mean, m, st.centre, st.var, st.dispersion)
    hours = c.hours(k)
    m_h, total_h = hours[..., F[n]], hours[..., F[s1]]
    top, found = top_hour(total_h - m_h * st.centre[:, None])
    m_rest = m - np.take_along_axis(m_h, top[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rest = np.where(m_rest > 0, (total - np.take_along_axis(total_h, top[:, None], axis=1)[:, 0]) / m_rest,
                             st.centre)
    z_rest = mean_z(mean_rest, m_rest, st.centre, st.var, st.dispersion)
    z, mean = np.where(found, np.fmin(z, z_rest), z), np.where(found, np.fmin(mean, mean_rest), mean)
    rows = np.flatnonzero(z >= zc)
    if rows.size:
        by = c.hour_sessions(k, rows)[:, None]                      # (R, 1, buckets, fields)
        m_rest, mean_rest, carried = (a[:, 0] for a in without_top_session(
            m[rows, None], total[rows, None], by[..., SESSION_FIELDS.index(n)], by[..., SESSION_FIELDS.index(s1)],
            st.centre[rows]))
        z_rest = mean_z(mean_rest, m_rest, st.centre[rows], st.var[rows], np.asarray(st.dispersion)[rows])
        with np.errstate(invalid="ignore"):
            z[rows] = np.where(carried, np.fmax(np.fmin(z[rows], np.where(m_rest > 0, z_rest, 0.0)), 0.0), z[rows])
            mean[rows] = np.where(carried & (m_rest > 0), np.fmin(mean[rows], mean_rest), mean[rows])
    return z, mean


def top_hour(excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, found) of the hour of a held window (`excess`, (S, k): each hour's excess
    over its expectation) that moved most, and where one did. A held window of request
    sizes is read without that hour too, its evidence and its level, and judged on the
    lesser rise: a size held for hours moves every hour alike, and loses little with one
    hour left out (a steady creep's window reads half an hour's growth lower), while an
    event of an hour is the hour's own windows' to judge, at the short windows' ratios.
    Left in, it kept the held windows, whose ratio is lower, warning for hours after it
    ended (a 2x hour reads 1.5x on the two hours it is part of and 1.25x on four). The
    request rate's held windows are not read so: read without the top hour, level shifts
    of NAB's series that only they find were found later or not at all (11 of 15 windows
    to 9). They leave out the hours the evaluation windows judged instead
    (`_held_requests`)."""
    dev = np.where(np.isfinite(excess), excess, -np.inf)
    top = np.argmax(dev, axis=1)
    top_excess = np.take_along_axis(dev, top[:, None], axis=1)[:, 0]
    return top, (excess.shape[1] > 1) & (top_excess > 0.0)


def usual_bucket_share(n_by: np.ndarray, n: np.ndarray) -> np.ndarray:
    """(...) the share of a window's requests one session bucket (of `n_by` (..., buckets),
    the window's requests per bucket; `n` all of them) usually holds, leaving out the
    bucket with the most: an eighth of the share of requests that name a session, as the
    other buckets show it. The hash spreads sessions evenly over the buckets, so with many
    sessions each holds about that; with a few, a bucket holds more, and a window judged
    without its top bucket against the rest of its expectation asks for more."""
    top = n_by.max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        named = np.clip((n_by.sum(axis=-1) - top) / np.maximum(n - top, 1.0), 0.0, 1.0)
    return named / SESSION_BUCKETS


def _count_without_top_session(c: _Context, field: str, n: np.ndarray, expected: np.ndarray, z: np.ndarray,
                               ratio: np.ndarray, passed: np.ndarray, args: tuple[np.ndarray, ...],
                               hour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(z, ratio) of request counts (S, W) that must survive leaving out the window's
    session bucket with the most requests, where that bucket holds most of the window's
    excess over its usual share (`usual_bucket_share`) of the expectation: a session's
    requests are one piece of evidence however many it makes (one agent loop's calls are
    the runaway detector's to judge: its invocation spike and chain length). The rest is
    judged against the rest of the expectation. Requests in no bucket (without a session
    id, or in slots restored at start-up) stay in. Read for the scopes whose rise `passed`
    only (`hour`: the counts are the hour window's alone)."""
    rows = np.flatnonzero(passed.any(axis=1))
    if not rows.size:
        return z, ratio
    by = c.sessions(rows)[..., SESSION_FIELDS.index(field)]             # (R, W, buckets)
    if hour:
        by = by[:, -1:]
    top = by.max(axis=-1)
    n_r, e_r = n[rows], np.nan_to_num(expected[rows])
    share = e_r * usual_bucket_share(by, n_r)
    carried = passed[rows] & (top - share > 0.5 * (n_r - e_r)) & (top > 0)
    rest, e_rest = n_r - top, e_r - share
    z_rest = count_z(rest, e_rest, *(a[rows] for a in args))
    z, ratio = z.copy(), ratio.copy()
    z[rows] = np.where(carried, np.fmin(z[rows], z_rest), z[rows])
    ratio[rows] = np.where(carried, np.fmin(ratio[rows], (rest + 0.5) / (e_rest + 0.5)), ratio[rows])
    return z, ratio


def _total_without_top_session(c: _Context, field: str, value: np.ndarray, expected: np.ndarray,
                                n: np.ndarray, passed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hour's total without the session bucket that spent most beyond its usual share
    (`usual_bucket_share`), and what the rest was expected to spend (the rest of the
    expectation), where that bucket carries most of the hour's excess: a few huge
    requests of one session, or a loop of many, are that session's, for the runaway
    detector to judge, not the scope's. Read for the scopes that `passed` only; elsewhere
    the total as it is."""
    rest, kept = value.copy(), np.ones_like(value)
    rows = np.flatnonzero(passed)
    if rows.size:
        hour = c.sessions(rows)[:, -1]                              # (R, buckets, fields)
        n_by, total_by = hour[..., SESSION_FIELDS.index("requests")], hour[..., SESSION_FIELDS.index(field)]
        share = usual_bucket_share(n_by, n[rows])
        with np.errstate(invalid="ignore", divide="ignore"):
            top = np.argmax(total_by, axis=1)[:, None]
            total_top = np.take_along_axis(total_by, top, axis=1)[:, 0]
            carried = total_top - np.nan_to_num(expected[rows]) * share > 0.5 * (value[rows] - expected[rows])
            rows = rows[carried]
            rest[rows] = np.maximum(value[rows] - total_top[carried], 0.0)
            kept[rows] = 1.0 - share[carried]
    return rest, expected * kept


def _judge_usage(spec: SignalSpec, c: _Context, seasonal: Seasonal, value: np.ndarray, per: float,
                 kinds: tuple[str, ...]) -> Verdict:
    """cost_per_hour and token_velocity: size, count, total and creep evidence. `kinds` are
    the request sizes that count as evidence: tokens for both, cost per request too for
    cost (a switch to a pricier model, or records that carry their cost)."""
    b = c.base
    stats = {"tokens": b.sizes, "cost": b.costs}
    # 1. requests got bigger: mean log size per request on every window. Cost per request
    # only where one model serves the scope: elsewhere it moves with the share of requests
    # each model gets, which a few sessions on a dearer model decide (the models' own
    # scopes show a price change, the tokens and the totals a bigger spend)
    sized = {k: _size_evidence(c, stats[k], k) for k in kinds}
    one = c.one_model()
    if "cost" in sized:
        z, rise, ratio = sized["cost"]
        sized["cost"] = (np.where(one[:, None], z, np.nan), np.where(one[:, None], rise, 0.0), ratio)
    z_size, _, size_ratio = sized["tokens"]
    # 2. the hour's total against the time of day (a few huge requests), and
    # 3. the hour's count of requests that spent (more requests of the usual size): calls
    # that failed or carried no tokens (no cost) spend nothing, so a retry storm is no rise.
    # Its effect is the count's, less where the requests got smaller; bigger requests are
    # the size's and the total's evidence, each of which must hold without the session
    # that carries it (one session's huge requests lifted other traffic's busy hour to a page)
    expected = c.expected(seasonal, [c.ev.fine_slots[-1]])[:, 0]
    floor = LOG_FLOOR[spec.name] * (60.0 if spec.name == "token_velocity" else 1.0)
    spent = SPENDING[spec.name]
    n_req, exp_req = c.sums[:, -1, F[spent]], c.expected_requests()[:, -1] * b.spending_share[spent]
    with np.errstate(invalid="ignore", divide="ignore"):
        total_sd = np.sqrt(seasonal.level_sd ** 2
                           + b.size_spread[spec.name] * b.window_burstiness[:, -1] / np.maximum(exp_req, 0.5))
        z_total = np.log((value + floor) / (expected + floor)) / total_sd
        rest, expected_rest = _total_without_top_session(c, "cost" if spec.name == "cost_per_hour" else "tokens",
                                                         value, expected, c.sums[:, -1, F["requests"]],
                                                         z_total >= c.zc[-1])
        z_total = np.fmin(z_total, np.log((rest + floor) / (expected_rest + floor)) / total_sd)
        total_ratio = np.fmin(value / expected, rest / expected_rest)
        count_ratio = (n_req + 0.5) / (exp_req + 0.5)
    args = (b.requests.level_sd[:, None], b.window_burstiness[:, -1:], b.requests.level_df[:, None])
    z_count = count_z(n_req, exp_req, b.requests.level_sd, b.window_burstiness[:, -1], b.requests.level_df)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_c, ratio_c = _count_without_top_session(c, spent, n_req[:, None], exp_req[:, None], z_count[:, None],
                                                  count_ratio[:, None], (z_count >= c.zc[-1])[:, None], args, hour=True)
        z_count, count_ratio = z_c[:, 0], ratio_c[:, 0] * np.fmin(size_ratio[:, -1], 1.0)
    current, base_value = value * per, expected * per
    ok = c.ready(spec) & (current >= spec.min_current)
    hour_ok = ok & np.isfinite(expected)
    rise = np.zeros(c.n)
    for z, ratio, _ in sized.values():
        with np.errstate(invalid="ignore"):
            rise = np.fmax(rise, _largest(ratio, ok[:, None] & (z >= c.zc)))
    with np.errstate(invalid="ignore"):
        rise = np.fmax(rise, np.fmax(np.where(hour_ok & (z_total >= c.zc[-1]), total_ratio, 0.0),
                                     np.where(hour_ok & (z_count >= c.zc[-1]), count_ratio, 0.0)))
    # 4. a creep: a smaller size rise held for hours (the baseline's median holds the first
    # of those hours too, which moves it little). Its excess is the size's: the hours' total
    # less their requests at the hours' usual amount per request (the count's own ups and
    # downs, larger than a creep's step, are not the creep's); all traffic's is its apps'
    # summed, each at its own usual amount (more requests from a dearer app is no bigger
    # request)
    held = np.zeros(c.n)
    held_hours, held_rel = np.zeros(c.n, dtype=np.int64), np.zeros(c.n)
    held_excess = np.zeros((c.n, len(SUSTAINED_HOURS)))
    for j, k in enumerate(SUSTAINED_HOURS):
        sums = c.whole_hours(k)
        total_k = sums[:, F["cost"]] if spec.name == "cost_per_hour" else token_sum(sums)
        usual_req_k = c.whole_hours_expected(b.requests, k) * b.spending_share[spent]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_request = c.whole_hours_expected(seasonal, k) / usual_req_k
        held_excess[:, j] = np.nan_to_num(total_k - sums[:, F[spent]] * per_request)
        for kind in kinds:
            st_k = stats[kind]
            zk, mean_k = _held_size_z(c, st_k, kind, k, sums, c.zc_long[j])
            counts = ok & one if kind == "cost" else ok          # cost per request: one model only
            with np.errstate(invalid="ignore"):
                passed = counts & (zk >= c.zc_long[j])
                held = np.fmax(held, np.where(passed, np.exp(np.nan_to_num(mean_k - st_k.centre)), 0.0))
                rel = np.where(passed, zk / c.zc_long[j], 0.0)
            held_hours, held_rel = np.where(rel > held_rel, k, held_hours), np.fmax(rel, held_rel)
    scope = np.array([k[0] for k in c.h.keys[:c.n]], dtype=object)
    if (scope == "app").any():
        held_excess[scope == "global"] = held_excess[scope == "app"].sum(axis=0)
    e = Effects(rise, np.zeros(c.n), held, np.zeros(c.n))
    z_best = np.fmax.reduce([np.where(ok[:, None], z, np.nan) for z, _, _ in sized.values()])
    zs, win, rel = _strongest(z_best, c.zc, c.ev.window_s)
    with np.errstate(invalid="ignore"):
        use_total = ok & (np.nan_to_num(np.abs(z_total) / c.zc[-1], nan=-1.0) > rel)
    zs = np.where(use_total, z_total, zs)
    win = np.where(use_total, c.ev.window_s[-1], win)
    lo, hi = _band(base_value, total_sd, c.zc[-1])
    per_window = c.sums[..., F["cost"]] if spec.name == "cost_per_hour" else token_sum(c.sums)
    expected_w = c.expected(seasonal, c.ev.fine_slots)
    excess = per_window - expected_w
    excess[:, -1] = value - expected                 # the hour's own total, as judged above
    # where bigger requests are the evidence, `explain` weighs the size's excess in tokens
    # (`size_excess`), for cost too: an app's usual price per token is the mix of its
    # models', so in USD its rise reads small beside a dear model's and large beside a
    # cheap one's. All traffic's is its apps' summed, as the held shift's is (the size
    # ratio of the mix of every app's requests does not add up over them)
    by_size = ok[:, None] & (z_size >= c.zc)
    by_size[:, -1] &= ~use_total                     # the hour's total decided: its total
    usual_tokens = c.expected(b.tokens, c.ev.fine_slots)
    grown = size_excess(c.sums[..., F["sized_requests"]], usual_tokens,
                        c.expected_requests() * b.spending_share["sized_requests"][:, None], size_ratio)
    if (scope == "app").any():
        grown[scope == "global"] = grown[scope == "app"].sum(axis=0)
    v = _verdict(c, spec, current, base_value, zs, lo, hi, e, win, excess=np.hstack([excess, held_excess]))
    v.size_excess = np.hstack([grown, np.zeros(held_excess.shape)])
    v.size_baseline = usual_tokens[:, -1]
    v.by_size = np.hstack([by_size, np.zeros(held_excess.shape, dtype=bool)])
    v.held_hours = _held_only(spec, e, held_hours)
    return v


def size_excess(spent: np.ndarray, expected: np.ndarray, expected_spent: np.ndarray,
                ratio: np.ndarray) -> np.ndarray:
    """(S, W) the tokens a rise in request size added to each window: its requests that
    carried tokens at the scope's usual tokens each (`expected` / `expected_spent`), times
    the rise (`ratio` - 1, the size's ratio); 0 where the usual size is unknown.

    A window's total is the wrong measure of a size rise for `explain`: over a few minutes
    an app's total moves with how many requests came and with which of its models served
    them (a cheap model's requests cost a fraction of a dear one's), by as much as the
    rise itself. A 5x rise of one app's tokens was read as its model's anomaly because the
    app's requests in those minutes went to its cheap model and its total stayed at its
    usual level; its tokens per request, compared per request, do not depend on the mix."""
    with np.errstate(invalid="ignore", divide="ignore"):
        usual = expected / expected_spent
        out = spent * usual * (ratio - 1.0)
    return np.where(np.isfinite(out) & (expected_spent > 0), out, 0.0)


def judge_cost(spec: SignalSpec, c: _Context) -> Verdict:
    return _judge_usage(spec, c, c.base.cost, c.win.adds[:, F["cost"]], 3600.0 / c.hour_s, ("tokens", "cost"))


def judge_tokens(spec: SignalSpec, c: _Context) -> Verdict:
    return _judge_usage(spec, c, c.base.tokens, token_sum(c.win.adds), 60.0 / c.hour_s, ("tokens",))


def judge_error_rate(spec: SignalSpec, c: _Context) -> Verdict:
    e, n = c.sums[..., F["errors"]], c.sums[..., F["requests"]]
    st = c.base.errors
    usual = c.expected_failure_share(st.ratio)                       # (S, W) among what has arrived
    z = binomial_z(e, n, usual, st.dispersion[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(n > 0, e / n, np.nan)
        ratio = share / np.maximum(usual, ERROR_RATIO_FLOOR)
        passed = c.ready(spec)[:, None] & (z >= c.zc) & (share >= spec.min_current)
    effects = Effects(_largest(ratio, passed), np.zeros(c.n), np.zeros(c.n), np.zeros(c.n))
    zs, win, _ = _strongest(np.where(c.ready(spec)[:, None], z, np.nan), c.zc, c.ev.window_s)
    baseline = st.ratio
    sd = np.sqrt(st.dispersion * baseline * (1 - baseline) / np.maximum(n[:, -1], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        lo, hi = np.maximum(baseline - c.zc[-1] * sd, 0), baseline + c.zc[-1] * sd
    v = _verdict(c, spec, share[:, -1], baseline, zs, lo, hi, effects, win, excess=e - usual * n)
    v.counts = (e, n, st.ratio, st.dispersion)
    return v


def _slow_evidence(c: _Context, kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, slow count, samples) per window of one sketch kind, or of several kinds that
    share a tail and time disjoint requests, pooled: samples beyond the baseline's
    quantile against the share expected there. A kind counts only where its baseline
    knows its quantile."""
    tail = TAIL[kinds[0]]
    slow, total = np.zeros((c.n, len(c.zc))), np.zeros((c.n, len(c.zc)))
    for kind in kinds:
        k = KINDS.index(kind)
        has = (c.base.threshold_bins[:, k] >= 0)[:, None]
        above, samples = c.above[..., k], c.samples[..., k]
        slow += np.where(has, samples - above if kind == "otps" else above, 0.0)
        total += np.where(has, samples, 0.0)
    z = binomial_z(slow, total, tail)
    z = np.where(total >= MIN_SAMPLES, z, np.nan)
    with np.errstate(invalid="ignore"):
        z = _slow_without_top_session(c, kinds, z, slow, total, z >= c.zc)
    return z, slow, total


def _slow_without_top_session(c: _Context, kinds: tuple[str, ...], z: np.ndarray, slow: np.ndarray,
                              total: np.ndarray, passed: np.ndarray) -> np.ndarray:
    """z of slow requests (S, W) that must survive leaving out the window's session bucket
    with the most slow requests beyond its share, where that bucket holds most of the
    window's excess of them: one session's requests are one piece of evidence (an agent
    loop re-sending a huge context is slow on every call, and is the runaway detector's
    and the size's to judge). A fault of the scope slows every session, so its rest is as
    slow as the whole. The buckets count against the thresholds in force when the requests
    came, the window against the current ones: the rest is clipped to what the window
    holds. Read for the scopes whose evidence `passed` only."""
    rows = np.flatnonzero(passed.any(axis=1))
    if not rows.size:
        return z
    tail = TAIL[kinds[0]]
    reads = []
    for kind in kinds:
        k = KINDS.index(kind)
        has = (c.base.threshold_bins[rows, k] >= 0)[:, None, None]
        by = np.where(has[..., None], c.h.recent_slow(c.t, c.ev.fine_slots, rows, k), 0.0)   # (R, W, buckets, 2)
        reads.append(np.stack([by[..., 0], by[..., 0] - by[..., 1] if kind == "otps" else by[..., 1]]))
    samples, slow_by = np.sum(reads, axis=0)
    excess_by = slow_by - tail * samples
    top = np.argmax(excess_by, axis=-1)[..., None]
    top_excess = np.take_along_axis(excess_by, top, axis=-1)[..., 0]
    slow_r, total_r = slow[rows], total[rows]
    carried = passed[rows] & (top_excess > 0) & (top_excess > 0.5 * (slow_r - tail * total_r))
    rest = np.maximum(total_r - np.take_along_axis(samples, top, axis=-1)[..., 0], 0.0)
    rest_slow = np.clip(slow_r - np.take_along_axis(slow_by, top, axis=-1)[..., 0], 0.0, rest)
    z_rest = np.where(rest >= MIN_SAMPLES, binomial_z(rest_slow, rest, tail), 0.0)
    z = z.copy()
    z[rows] = np.where(carried, np.fmin(z[rows], z_rest), z[rows])
    return z


def _quantile_effect(c: _Context, kind: str, passed: np.ndarray) -> np.ndarray:
    """(S, W) effect of one kind where its evidence passed: the window's quantile over the
    baseline's (its inverse for throughput, where slower is lower); 0 elsewhere. The
    windows' sketches are summed only for those scopes."""
    out = np.zeros(passed.shape)
    rows = np.flatnonzero(passed.any(axis=1))
    if not rows.size:
        return out
    qw = c.window_quantiles(kind, rows, QUANTILES[kind])
    with np.errstate(invalid="ignore", divide="ignore"):
        r = qw / c.base.quantile[kind][rows, None]
        effect = np.nan_to_num(1.0 / r if kind == "otps" else r, nan=0.0, posinf=0.0)
    out[rows] = np.where(passed[rows], effect, 0.0)
    return out


def _judge_quantile(spec: SignalSpec, c: _Context, kinds: tuple[str, ...], shown: str) -> Verdict:
    """latency_p95 (TTFT, token speed and time per output token as evidence), ttft_p95,
    throughput. Effects are rises for latency and TTFT, falls for throughput.

    Latency's whole duration is evidence of its own only where a scope knows none of the
    other kinds. Its tail moves with the mix of a scope's traffic (a model shared by a
    streamed chat app and a code app that sends long requests has more requests past its
    pooled p95 whenever the code app's share grows), while each other kind compares like
    with like. Its p95 still measures the effect on the windows where both its own tail
    and another kind's evidence passed.

    A model that slows serves its streamed requests late to the first token and its other
    requests late per output token. Those two kinds time disjoint requests against tails
    of the same share, so their slow requests are also counted together (`POOLED`): a
    model shared by a streamed app and one that does not stream then gathers the evidence
    of all its requests, not of each half apart. The pooled test is one more reading of
    the same requests, not an independent test, so it takes no share of the budget; its
    effect is the larger p95 ratio of its kinds that have samples enough to read one."""
    ready = c.ready(spec)[:, None]
    effect = np.zeros(c.n)
    best = np.full((c.n, len(c.zc)), np.nan)
    parts: list[tuple[str, ...]] = [(k,) for k in kinds if k != shown]
    if all(k in kinds for k in POOLED):
        parts.append(POOLED)
    known = np.zeros(c.n, dtype=bool)            # scopes with another kind's baseline tail
    part_passed = np.zeros((c.n, len(c.zc)), dtype=bool)
    parts_excess = np.full((c.n, len(c.zc)), -np.inf)
    for group in parts:
        for kind in group:
            known |= c.base.threshold_bins[:, KINDS.index(kind)] >= 0
        z, slow_g, total_g = _slow_evidence(c, group)
        parts_excess = np.fmax(parts_excess, slow_g - TAIL[group[0]] * total_g)
        with np.errstate(invalid="ignore"):
            passed = ready & (z >= c.zc)
        part_passed |= passed
        for kind in group:
            read = passed & (c.samples[..., KINDS.index(kind)] >= MIN_SAMPLES) if len(group) > 1 else passed
            effect = np.fmax(effect, _largest(_quantile_effect(c, kind, read), read))
        best = np.fmax(best, np.where(ready, z, np.nan))
    z, slow, total = _slow_evidence(c, (shown,))
    own = ready & ~known[:, None]                # where the whole duration is evidence
    with np.errstate(invalid="ignore"):
        passed = ready & (z >= c.zc) & (~known[:, None] | part_passed)
    effect = np.fmax(effect, _largest(_quantile_effect(c, shown, passed), passed))
    best = np.fmax(best, np.where(own, z, np.nan))
    zs, win, _ = _strongest(best, c.zc, c.ev.window_s)
    current, baseline = c.win.quantiles[shown], c.base.quantile[shown]
    zero = np.zeros(c.n)
    if shown == "otps":
        current = np.where(c.win.counts[shown] >= MIN_SAMPLES, current, np.nan)
        zs = -zs                                   # slower tokens: a drop in throughput
        e = Effects(zero, effect, zero, zero.copy())
    else:
        e = Effects(effect, zero, zero, zero.copy())
    lo, hi = baseline / spec.warning_ratio, baseline * spec.warning_ratio
    # `explain` weighs the scopes by the slow requests of the readings that find a slower
    # model, where a scope knows them: the most that any of them shows beyond its usual
    # share (a later first token and a later token per output are the pooled reading's,
    # a slower stream the token speed's). The whole duration's tail moves with the mix of
    # a scope's traffic: a global scope flagged on the timings often had fewer requests
    # past its own p95 than usual, and was read as no model's echo
    excess = slow - TAIL[shown] * total
    if parts:
        excess = np.where(known[:, None] & np.isfinite(parts_excess), parts_excess, excess)
    return _verdict(c, spec, current, baseline, zs, lo, hi, e, win, excess=excess)


def judge_latency(spec: SignalSpec, c: _Context) -> Verdict:
    return _judge_quantile(spec, c, ("latency", "ttft", "otps", "tpot"), "latency")


def judge_ttft(spec: SignalSpec, c: _Context) -> Verdict:
    return _judge_quantile(spec, c, ("ttft",), "ttft")


def judge_throughput(spec: SignalSpec, c: _Context) -> Verdict:
    return _judge_quantile(spec, c, ("otps",), "otps")


def _verdict(c: _Context, spec: SignalSpec, current: np.ndarray, baseline: np.ndarray, z: np.ndarray,
             lo: np.ndarray, hi: np.ndarray, effects: Effects, window: np.ndarray, excess: np.ndarray) -> Verdict:
    sev, direction = grade(spec, effects)
    # the sign of the published z says which way the verdict went (the alerts split on it)
    z = np.where(direction > 0, np.abs(z), np.where(direction < 0, -np.abs(z), z))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(baseline > 0, current / baseline, np.nan)
    return Verdict(current.astype(np.float64), baseline.astype(np.float64), ratio, z.astype(np.float64),
                   lo, hi, c.span.astype(np.float64), sev, np.where(sev > 0, window, 0.0).astype(np.float64),
                   excess.astype(np.float64), effects=effects)


JUDGES: dict[str, Judge] = {
    "cost_per_hour": judge_cost,
    "token_velocity": judge_tokens,
    "request_rate": judge_request_rate,
    "error_rate": judge_error_rate,
    "latency_p95": judge_latency,
    "ttft_p95": judge_ttft,
    "output_tokens_per_second": judge_throughput,
}


# --- one cause, one alert ---------------------------------------------------------------

EXPLAINS_SHARE = 0.5     # a narrower anomaly that holds at least this share of the excess explains it;
                         # for usage signals: the rest moved by less than this share of the part's change


def explain(spec: SignalSpec, v: Verdict, keys: list[ScopeKey], pairs: np.ndarray,
            windows: np.ndarray, incumbent: np.ndarray | None = None,
            apart: np.ndarray | None = None,
            samples: Mapping[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """For each scope, the index of an anomalous narrower scope that explains its anomaly
    (of this signal), or -1.

    The global scope is explained by an anomalous app or model holding at least half of its
    excess (the amount above the baseline). For usage signals, whose excesses and baselines
    add up over the apps, the test is instead whether the rest of the traffic, without the
    part, moved by less than half as much as the part did, each against its own usual level
    (`_rest_moved_less`): one app's spike leaves the rest where it was, while an event of
    all traffic moves every app alike, and its biggest app holds half of its excess merely
    as its share of the traffic. An app and a model that share traffic and are
    both anomalous are one event when each holds at least half of the other's excess; the
    alert then names the app for usage signals (an app sends the requests) and the model for
    performance signals (a model serves them). When only one holds half of the other's, the
    other is its echo. For usage signals, a flagged model is also the echo of an app that
    holds half of its excess before the app's own evidence passes; the app then carries
    the model's severity (`lift_to_roots`) and its direction (`_echo_reading`). For the
    other performance signals than the error rate, the other way round: a flagged app is
    the echo of a model that holds half of its excess before the model's own passes.
    `pairs` lists the (app scope, model scope) rows that share a series.
    A model's fault shows on every app that sends to it: where a performance signal kept as
    counts (the error rate, `Verdict.counts`) shows that the model's other traffic went on
    at its usual rate while the app's moved (`_failures_are_the_apps`), the app is named
    instead (its requests fail, not the model's: a retry storm, a bad request, its own
    quota). For an app that sends to several models, its share of the model's counts is
    bounded (see there). `apart` marks the apps that took a model's anomaly so at the
    last evaluations: they keep it until the model's other traffic shows the fault as
    strongly (see there too). `samples` holds, per (app, model) pair, every scope's
    events and trials since the pair's first verdict, which the test reads first, the
    configured window deciding where they reach neither boundary
    (`Evaluator._event_samples`).
    The other way round, for usage signals, where the global scope is anomalous and no
    narrower scope explains it, its flagged apps and models that moved the same way are
    parts of one event of all traffic, named at the global scope (at the severity of its
    most severe part: `lift_to_roots`). So are they where the global scope's own evidence
    passed the same way below its warning ratio, as at the end of such an event, when no
    part holds its move. A shift held for hours is all traffic's already before the global
    scope's own evidence passes, when no app and no model holds it (`_no_part_holds`).

    `incumbent` marks the scopes that named this anomaly at the last evaluations. The scope
    the family points to keeps the name while it is incumbent, even where for a moment only
    the other holds half of its excess: latency excesses are counted against each scope's
    own p95, so which of the two holds more can swap from one evaluation to the next, and
    every swap would end one alert's `for:` and start the other's. The name can still move
    once, to the family's scope, when that scope comes to hold half of the other's excess.

    Excesses are compared on the window the explained scope's evidence came from
    (`windows` are the evaluation windows' lengths): early in a spike only the last minutes
    hold it, and an hour's excess would still be mostly the ordinary ups and downs of the
    minutes before. A verdict that only a held shift carries is compared on its held
    window (`Verdict.held_hours`), whose excess follows the evaluation windows' in
    `Verdict.excess`. And they are compared in the measure of the evidence that found the
    explained scope's anomaly: where that was bigger requests, every scope is read by its
    size's excess (`Verdict.size_excess`), else by its total's."""
    sev = v.severity
    col = np.minimum(np.searchsorted(windows, v.window), len(windows) - 1)
    ex2 = v.excess if v.excess.ndim == 2 else v.excess[:, None]
    col = np.minimum(col, ex2.shape[1] - 1)
    if v.held_hours.size and ex2.shape[1] == len(windows) + len(SUSTAINED_HOURS):
        for j, k in enumerate(SUSTAINED_HOURS):
            col = np.where(v.held_hours == k, len(windows) + j, col)
    out = np.full(sev.shape[0], -1, dtype=np.int64)
    flagged = np.flatnonzero(sev >= 1)
    if flagged.size < (1 if spec.family == "usage" or v.counts is None else 2):
        return out
    kind = np.array([k[0] for k in keys], dtype=object)

    def table(b: int) -> np.ndarray:          # the excesses b's anomaly is weighed on
        if v.size_excess is None or v.by_size is None or not v.by_size[b, col[b]]:
            return ex2
        return v.size_excess

    def covers(a: int, b: int) -> bool:       # a's excess explains at least EXPLAINS_SHARE of b's
        t = table(b)
        ea, eb = t[a, col[b]], t[b, col[b]]
        return bool(ea * eb > 0 and abs(ea) >= EXPLAINS_SHARE * abs(eb))

    apps = [i for i in flagged.tolist() if kind[i] == "app"]
    models = [i for i in flagged.tolist() if kind[i] == "model"]
    shared = {(int(a), int(m)) for a, m in pairs.tolist()} if pairs.size else set()
    models_of: dict[int, list[int]] = {}
    for a_, m_ in shared:
        models_of.setdefault(a_, []).append(m_)
    for a in apps:
        for m in models:
            if (a, m) not in shared:
                continue
            a_m, m_a = covers(a, m), covers(m, a)
            preferred, other = (a, m) if spec.family == "usage" else (m, a)
            if a_m and m_a:
                others = [x for x in models_of.get(a, ()) if x != m]
                named = apart is not None and bool(apart[a])
                if preferred == m and v.counts is not None:
                    event = None
                    if samples is not None and (a, m) in samples:
                        event = (*samples[(a, m)], v.counts[2], v.counts[3])
                    if _failures_are_the_apps(v.counts, a, m, others, named, event):
                        preferred, other = a, m
                echo, root = other, preferred
            elif a_m:
                echo, root = m, a
            elif m_a:
                echo, root = a, m
            else:
                continue
            if root == other and incumbent is not None and incumbent[preferred]:
                echo, root = other, preferred
            if out[echo] < 0:
                out[echo] = root
    # a usage anomaly of a model that one of its apps holds is the app's, though the app's
    # own evidence has not passed yet: the model's window holds the app's excess over less
    # noise than the app's own (the other apps' ups and downs partly cancel), so it often
    # passes a few minutes before it, and a page at the model then an alert at the app
    # would name one cause twice. The app takes the name, and the model's severity with it
    # (`lift_to_roots`). The other way round for performance signals, which name the
    # model: an app's slowdown that its model holds is the model's, though the model's own
    # evidence has not passed yet (the app's requests slow first where they are the
    # model's slowest: its longest answers, its streamed ones). Not the error rate: there
    # the model's other traffic decides (`_failures_are_the_apps`).
    def adopt(echoes: list[int], partners: dict[int, list[int]], roots: list[int]) -> None:
        for e in echoes:
            if out[e] >= 0:
                continue
            holders = [r for r in partners.get(e, ()) if sev[r] < 1 and covers(r, e)]
            if holders:
                r = max(holders, key=lambda i: abs(table(e)[i, col[e]]))
                out[e] = r
                col[r] = col[e]               # the root is read on the echo's window, which it holds
                if r not in roots:
                    roots.append(r)

    if spec.family == "usage":
        apps_of: dict[int, list[int]] = {}
        for a_, m_ in shared:
            apps_of.setdefault(m_, []).append(a_)
        adopt(models, apps_of, apps)
    elif v.counts is None:
        adopt(apps, models_of, models)
    roots = [i for i in apps + models if out[i] < 0]
    for g in flagged.tolist():
        if kind[g] != "global":
            continue
        t = table(g)
        best = max(roots, key=lambda i: abs(t[i, col[g]]), default=None)
        if best is None:
            continue
        if spec.family == "usage":
            base = v.size_baseline if t is v.size_excess and v.size_baseline is not None else v.baseline
            alone = _rest_moved_less(t[g, col[g]], t[best, col[g]], base[g], base[best])
        else:
            alone = covers(best, g)
        if alone:
            out[g] = best
    # an event of all traffic that no app or model explains (an outage upstream, a creep of
    # every app's spend) is the global scope's: the apps and models flagged the same way are
    # its parts (and `lift_to_roots` gives it the severity of its most severe part: its page
    # must not wait on a warning, and must not come twice). Usage signals only: their
    # excesses add up over the apps, while a latency excess is counted against each scope's
    # own p95, so a share of the global one means little.
    # Where the global scope's own evidence has not passed yet, a shift held for hours in a
    # part is still all traffic's when, over the same hours, no app and no model holds it
    # (flagged or not: the rest of the traffic without the app, and without the model,
    # that moved most moved by at least half as much as it did, the converse of
    # `_rest_moved_less`). An app's request sizes vary less than the mix of all apps' does,
    # so in a creep of every app's spend the apps' evidence passes hours before the global
    # scope's, each app alerting on its own meanwhile. Both partitions are asked: a model's
    # rest holds the app's requests to its other models, so one app's spike over two models
    # moves a model's rest with it. Held shifts only: over a short window the rest of the
    # traffic moves by half of a 2x spike by chance alone.
    # The same holds where the global scope's own evidence passed the same way below its
    # warning ratio and the rest of the traffic without the part moved with it on the
    # part's window (`_rest_moved_alike`): at the end of an event of all traffic, its ratio
    # falls under the threshold a minute or two before some of its parts' do, and those
    # parts would each alert on its own while the event's alert resolves
    held = v.held_hours if v.held_hours.size else np.zeros(sev.shape[0], dtype=np.int64)
    e = v.effects
    for g in np.flatnonzero(kind == "global").tolist():
        if spec.family != "usage" or out[g] >= 0:
            continue
        for i in roots:
            t = table(i)
            if out[i] >= 0 or not t[i, col[i]] * t[g, col[i]] > 0:
                continue
            moved = e is not None and bool(e.rise[g] > 0 if t[i, col[i]] > 0 else e.fall[g] > 0)
            if moved:
                base = v.size_baseline if t is v.size_excess and v.size_baseline is not None else v.baseline
                moved = _rest_moved_alike(t[g, col[i]], t[i, col[i]], base[g], base[i])
            if sev[g] >= 1 or moved or (held[i] > 0 and _no_part_holds(ex2[:, col[i]], v.baseline, kind, g)):
                out[i] = g
    return out


def _no_part_holds(excess: np.ndarray, baseline: np.ndarray, kind: np.ndarray, g: int) -> bool:
    """Whether global scope g's excess (on one window) is all traffic's: for the apps and
    for the models alike, the rest of the traffic without the one that moved most moved
    with it (`_rest_moved_alike`)."""
    sign = np.sign(excess[g])
    if not sign:
        return False
    for part in ("app", "model"):
        rows = np.flatnonzero(kind == part)
        if not rows.size:
            continue
        top = int(rows[np.argmax(np.nan_to_num(excess[rows] * sign, nan=-np.inf))])
        if not _rest_moved_alike(excess[g], excess[top], baseline[g], baseline[top]):
            return False
    return True


def lift_to_roots(severity: np.ndarray, explained: np.ndarray, keys: list[ScopeKey]) -> np.ndarray:
    """Severity per scope, where a scope names an anomaly that a scope it explains is
    flagged higher for: the anomaly's severity is the highest of the scopes it shows on,
    and it is named once. An outage reaches a tenth of the usual rate in one app or model a
    few minutes before the global evidence says so (the global scope names it, and its
    parts are explained); a model's page can come before the app that explains it warns.
    Without the lift, the page would be kept quiet as an echo and only a warning would
    come. The apps' and models' roots are lifted first, so a global event gets the
    severity its parts were lifted to."""
    out = severity.copy()
    parts = np.flatnonzero(explained >= 0)
    for last in (False, True):
        for i in parts.tolist():
            g = int(explained[i])
            if (keys[g][0] == "global") == last:
                out[g] = max(out[g], out[i])
    return out


def _echo_reading(v: Verdict) -> tuple[np.ndarray, np.ndarray]:
    """Per scope, the deciding window and the direction (the sign of the z: the alerts
    split on it) of its most severe echo, 0 where it explains none: a scope lifted from
    no verdict of its own (`lift_to_roots`) rests on its echo's, and its own z, under the
    threshold, can point either way."""
    n = v.severity.shape[0]
    window, sign, best = np.zeros(n), np.zeros(n), np.full(n, -1)
    for e in np.flatnonzero(v.explained >= 0).tolist():
        r = int(v.explained[e])
        if v.severity[e] > best[r]:
            best[r] = v.severity[e]
            window[r] = float(np.nan_to_num(v.window[e], nan=0.0))
            sign[r] = float(np.sign(v.zscore[e]))
    return window, sign


def _failures_are_the_apps(counts: Counts, a: int, m: int, others: Sequence[int] = (), named: bool = False,
                           event: Counts | None = None) -> bool:
    """Whether the requests to model m other than app a's failed at the model's usual rate
    while app a's failed more, strongly enough (`evidence.APART_EVIDENCE`): then the
    failures are app a's, not the model's. `counts` holds events and trials per (scope,
    window), and the usual ratio and overdispersion per scope.

    Where app a already took the anomaly from the model so (`named`: it did at the last
    evaluations), it keeps it until the evidence points the other way as strongly (the
    log odds down to -APART_EVIDENCE), as a sequential test's decision stands until the
    other boundary is reached. As an app's burst of failures leaves the window, the
    window's share of them shrinks towards the few failures the model's other traffic had
    by chance, the evidence for the app falls under the threshold before the app's own
    evidence ends, and the model, named for the last minutes of the event, paged for an
    event that was the app's and was over (two retry storms of seven, a minute each, 58
    minutes after the storm). An app named only because its own evidence passed first
    (the model not flagged yet) decided nothing: kept on it, a model's fault stayed its
    busiest app's for 25 minutes, and the drift detector left the model's errors out.

    Judged first on the requests since the app's or the model's verdict was first raised
    (`event`, `Evaluator._event_samples`, while that is less than the configured window
    ago): one sample that grows with the event, for which Wald's bound on wrongly reaching
    the evidence holds. Where it reaches either boundary it decides: the rest of the model
    failed as usual, or as the app did. Where it reaches neither (the model's other
    traffic sent too little since), the configured window decides as it did alone: it
    holds the hour before the event too, whose requests of the rest failed at the usual
    rate under either cause, so it leans towards the app where the rest is quiet during
    the event, and the event's own sample, once it speaks, overrules it. (Every shorter
    evaluation window at every evaluation would be a test of its own: a model's fault
    would be put on one of its apps far more often than the bound says.)

    The history keeps an app's counts over all its models, not per model. For an app that
    also sends to `others`, its share of m's counts is bounded instead: the rest of m has
    at most m's failures less the app's failures not on the other models, and at least
    m's successes less all of the app's. Both bounds lean towards the model's fault; for
    an app of one model they are its exact counts."""
    if event is not None:
        odds = _apart_odds(event, a, m, others)
        if abs(odds) >= APART_EVIDENCE:
            return odds > 0
    odds = _apart_odds(counts, a, m, others)
    return odds > -APART_EVIDENCE if named else odds >= APART_EVIDENCE


def _apart_odds(counts: Counts, a: int, m: int, others: Sequence[int]) -> float:
    """`evidence.apart_log_odds` of app a against the rest of model m, on the last window
    of `counts` (see `_failures_are_the_apps` for the bounds where a sends to `others`)."""
    e, n, usual, disp = (x[..., -1] if x.ndim == 2 else x for x in counts)
    e_other = float(sum(e[o] for o in others))
    e_r = min(e[m], max(e[m] - e[a] + e_other, 0.0))
    n_r = e_r + max((n[m] - e[m]) - (n[a] - e[a]), 0.0)
    return float(apart_log_odds(e[m] - e_r, n[m] - n_r, e_r, n_r, usual[m], disp[m]))


def _rest_moved_less(excess_g: float, excess_p: float, baseline_g: float, baseline_p: float) -> bool:
    """Whether the traffic outside one part (a usage signal's global excess and baseline
    less the part's: both add up over apps and over models) moved by less than
    EXPLAINS_SHARE of the part's own change, each against its own usual level: then the
    event is the part's, not all traffic's. A part that moved the other way explains
    nothing; a part that is all the traffic explains it.
    The excesses are on one evaluation window and the baselines on the configured one;
    the window's expectations are the baselines times one factor, which cancels."""
    rest_base = baseline_g - baseline_p
    if not (np.isfinite(excess_p) and excess_p * excess_g > 0.0 and baseline_p > 0.0):
        return False
    if rest_base <= 0.0:
        return True
    return bool((excess_g - excess_p) * baseline_p / (excess_p * rest_base) < EXPLAINS_SHARE)


def _rest_moved_alike(excess_g: float, excess_p: float, baseline_g: float, baseline_p: float) -> bool:
    """Whether the traffic outside one part moved the same way as the part, by at least
    EXPLAINS_SHARE of its change (each against its own usual level): `_rest_moved_less`'s
    converse where both sides are known, False where they are not."""
    known = np.isfinite([excess_g, excess_p, baseline_g, baseline_p]).all() and baseline_g - baseline_p > 0.0
    return bool(known and not _rest_moved_less(excess_g, excess_p, baseline_g, baseline_p))


# --- exposition ---------------------------------------------------------------------------

GAUGES: tuple[tuple[str, str, str], ...] = (
    ("llm_anomaly_current", "current", "Current value of the signal over the evaluation window, in the signal's unit."),
    ("llm_anomaly_baseline", "baseline", "Baseline of the signal for the same window: the time of day's usual level for counts and totals, the usual value otherwise."),
    ("llm_anomaly_ratio", "ratio", "Current value / baseline."),
    ("llm_anomaly_zscore", "zscore", "Strongest evidence of a change over the windows judged, as a z-score (negative for a drop)."),
    ("llm_anomaly_severity", "severity", "Exporter verdict: 0 ok, 1 warning, 2 high."),
    ("llm_anomaly_explained", "explained", "1 when another scope's anomaly of the same signal explains this one (a narrower scope's, or all traffic's): its alert stays quiet."),
    ("llm_anomaly_baseline_span_seconds", "baseline_span_seconds", "How much history the baseline rests on; verdicts wait for min_baseline_hours."),
    ("llm_anomaly_band_lower", "band_lower", "Lower edge of the normal range over the evaluation window, in the signal's unit."),
    ("llm_anomaly_band_upper", "band_upper", "Upper edge of the normal range over the evaluation window, in the signal's unit."),
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
                if attr == "baseline_span_seconds":
                    arr = v.baseline_hours * 3600.0
                elif attr == "explained":
                    arr = (v.explained >= 0).astype(np.float64) if v.explained.size else np.zeros(len(snap.keys))
                else:
                    arr = getattr(v, attr)
                values = arr[idx].tolist()
                for lab, x in zip(labels, values):
                    fam.add_sample(name, {"signal": spec.name, **lab}, x)
            yield fam
