"""Shared test helpers: fixed event times, settings and engines on real SQLite files,
crafted traffic, metric reads, and a real `llm-usage-exporter serve` subprocess.

    from helpers import T0, HOUR, settings_for, engine_at, rec, steady_history, gauge, Server

Every test builds its own engine (and so its own registry) on a file under tmp_path and
reads values with `registry.get_sample_value`; nothing here touches the global registry.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.storage.buckets import aggregate
from exporter.config import Settings, load_settings
from exporter.engine import Engine
from exporter.anomaly.evaluator import Baseline, Evaluator, Snapshot
from exporter.anomaly.history import ScopeHistory
from exporter.ingest.records import RecordColumns
from exporter.anomaly.signals import SignalSpec, signal_specs
from exporter.zones import utc_offsets

HOUR = 3600.0
DAY = 86400.0
T0 = 1_699_999_200.0          # 2023-11-14T22:00:00Z, hour-aligned: the start of "the test hour"
assert T0 % HOUR == 0

# Environment variables that would leak the developer's configuration into a test.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("LLM_EXPORTER_")}


# --- settings and engines ---------------------------------------------------------------

def settings_for(tmp_path: Path, name: str = "usage.db", **flags: Any) -> Settings:
    """Settings with defaults, a db under tmp_path and the given flag values; no env, no YAML."""
    return load_settings(flags={"db": str(tmp_path / name), **flags}, environ={})


class Clock:
    """A settable clock for `Engine(settings, clock=...)`."""

    def __init__(self, t: float = T0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


def engine_at(settings: Settings, t: float = T0) -> tuple[Engine, Clock]:
    clock = Clock(t)
    return Engine(settings, clock=clock), clock


def value(engine: Engine, name: str, **labels: str) -> float | None:
    """One sample of the engine's own registry (None when absent)."""
    return engine.registry.get_sample_value(name, labels)


def gauge(engine: Engine, name: str, signal: str, scope: str = "global", **labels: str) -> float | None:
    """An anomaly gauge of one signal and scope, e.g. gauge(e, "llm_anomaly_severity", "cost_per_hour")."""
    return engine.registry.get_sample_value(name, {"signal": signal, "scope": scope, **labels})


def severity(engine: Engine, signal: str, scope: str = "global", **labels: str) -> float | None:
    return gauge(engine, "llm_anomaly_severity", signal, scope, **labels)


# --- records ------------------------------------------------------------------------------

def rec(ts: float = T0, **fields: Any) -> dict[str, Any]:
    """A plausible record at `ts`; keyword fields override or add."""
    d: dict[str, Any] = {"ts": ts, "provider": "openai", "model": "gpt-4o-mini", "app": "chat",
                         "input_tokens": 1000, "output_tokens": 200}
    d.update(fields)
    return d


def spread(hour_start: float, n: int, slots: int = 12) -> np.ndarray:
    """n event times spread through one hour, clear of its edges, on `slots` evenly spaced
    minutes (every five minutes by default: fewer minute buckets keep the tests quick)."""
    minute = np.arange(n) % slots * (60 // slots) * 60.0
    second = 5.0 + 50.0 * (np.arange(n) // slots) / max(1, (n - 1) // slots)
    return np.sort(hour_start + minute + second)


def hourly_traffic(start: float, hours: int, make: Callable[[float, int, np.random.Generator], Iterable[dict[str, Any]]],
                   seed: int = 1) -> list[dict[str, Any]]:
    """Records for `hours` consecutive hours from `start`; `make(hour_start, hour_index, rng)`
    returns one hour's records."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for h in range(hours):
        out.extend(make(start + h * HOUR, h, rng))
    return out


def steady_hour(hour_start: float, rng: np.random.Generator, n: int = 40, *, cost: float = 1.0,
                tokens: tuple[int, int] = (1000, 200), latency: float = 1.0, ttft: float | None = 0.3,
                error_rate: float = 0.0, model: str = "gpt-4o-mini", provider: str = "openai", app: str = "chat",
                noise: float = 0.08, id_prefix: str = "") -> list[dict[str, Any]]:
    """One hour of traffic with mild multiplicative noise: `n` requests costing `cost` USD in
    all, `error_rate` of them failing (an exact share, spread through the hour)."""
    k = max(1, int(round(n * (1 + noise * rng.uniform(-1, 1)))))
    ts = spread(hour_start, k)
    per_cost = cost * (1 + noise * rng.uniform(-1, 1)) / k
    n_err = int(round(error_rate * k))
    err_at = set(np.linspace(0, k - 1, n_err).round().astype(int).tolist()) if n_err else set()
    out = []
    for i in range(k):
        lat = latency * float(rng.lognormal(0, noise))
        d: dict[str, Any] = {
            "ts": float(ts[i]), "provider": provider, "model": model, "app": app,
            "input_tokens": int(tokens[0] * (1 + noise * rng.uniform(-1, 1))),
            "output_tokens": int(tokens[1] * (1 + noise * rng.uniform(-1, 1))),
            "cost_usd": per_cost, "latency_s": lat,
        }
        if ttft is not None:
            d["ttft_s"] = min(ttft * float(rng.lognormal(0, noise)), lat * 0.9)
        if i in err_at:
            d["status"] = 500
        if id_prefix:
            d["request_id"] = f"{id_prefix}-{hour_start:.0f}-{i}"
        out.append(d)
    return out


def steady_history(end: float = T0, days: float = 8, **hour_kwargs: Any) -> list[dict[str, Any]]:
    """`days` of steady hourly traffic ending at `end` (exclusive)."""
    hours = int(days * 24)
    return hourly_traffic(end - hours * HOUR, hours, lambda hs, h, rng: steady_hour(hs, rng, **hour_kwargs))


def ingest_by_day(engine: Engine, items: Sequence[dict[str, Any]], now: float = T0) -> None:
    """Ingest in day-sized batches, as a live exporter would see them over time."""
    items = sorted(items, key=lambda d: d["ts"])
    day = None
    batch: list[dict[str, Any]] = []
    for d in items:
        k = math.floor(d["ts"] / DAY)
        if day is not None and k != day:
            res = engine.ingest(batch, now=now)
            assert not res.rejected, res.rejected[:3]
            batch = []
        day = k
        batch.append(d)
    if batch:
        res = engine.ingest(batch, now=now)
        assert not res.rejected, res.rejected[:3]


# --- realistic traffic: Poisson arrivals in sessions, log-normal sizes, a daily cycle ---------
#
# `steady_hour` above spreads requests evenly with mild noise: fine for plumbing, but a
# detector judged on it never meets the noise it must live with. The generator below makes
# traffic with the shape real services have: arrivals that are Poisson within the minute
# and bursty across minutes (conversations and agent runs send several calls in a row), a
# daily cycle, busy and quiet days, heavy-tailed token counts, and latency built from a
# time to first token plus output tokens at a per-request speed.

def weekday(t: np.ndarray) -> np.ndarray:
    """Day of the week of event times `t` (UTC): 0 Monday .. 6 Sunday (1970-01-01 was a Thursday)."""
    return (np.floor(np.asarray(t, dtype=np.float64) / DAY).astype(np.int64) + 3) % 7


def daily_cycle(t: np.ndarray | float, night: float = 0.3, peak_hour: float = 15.0) -> np.ndarray:
    """Share of the peak rate at event times `t` (UTC): 1 at `peak_hour`, `night` twelve
    hours later, a cosine in between (1 everywhere for night=1: no cycle)."""
    phase = 2 * np.pi * ((np.asarray(t, dtype=np.float64) % DAY) / HOUR - peak_hour) / 24
    return night + (1 - night) * (1 + np.cos(phase)) / 2


@dataclass(frozen=True)
class Stream:
    """One app's requests to one model.

    `rate` is requests per hour at the daily peak; `session` the mean number of calls a
    conversation or agent run sends (geometric, about `gap` seconds apart), so requests
    come in bursts; the level of each day and each hour varies log-normally by `day_sd`
    and `hour_sd` on top of the daily cycle. Token counts are log-normal around `tokens`
    (input, output) with log sd `size_sd`; cost is priced per token at `price` (USD per
    input, output token) unless `cost_per_request` fixes it; latency is a log-normal time to
    first token (`ttft`, median seconds; None: not streamed) plus the output tokens at a
    log-normal speed around `otps` tokens per second."""

    app: str
    model: str
    provider: str = "openai"
    rate: float = 300.0
    night: float = 0.3
    peak_hour: float = 15.0
    session: float = 1.0
    gap: float = 30.0
    day_sd: float = 0.1
    hour_sd: float = 0.05
    tokens: tuple[float, float] = (1000.0, 200.0)
    size_sd: float = 0.5
    price: tuple[float, float] = (2.5e-6, 1e-5)
    ttft: float | None = 0.3
    ttft_sd: float = 0.3
    otps: float = 60.0
    otps_sd: float = 0.2
    error_rate: float = 0.01
    start: float | None = None               # no requests before (a new app or model)
    weekend: float = 1.0                     # share of the rate on Saturdays and Sundays (UTC)
    zone: str | None = None                  # the users' time zone: their day and week follow its clocks


@dataclass
class Traffic:
    """Requests as columns, sorted by time; `columns()` gives what `parse_batch` would."""

    ts: np.ndarray
    app: np.ndarray
    provider: np.ndarray
    model: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    cost: np.ndarray
    latency: np.ndarray
    ttft: np.ndarray
    is_error: np.ndarray
    session: np.ndarray | None = None     # object: session ids (None: requests without one)

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def sessions(self) -> np.ndarray:
        return self.session if self.session is not None else np.full(len(self), None, dtype=object)

    def take(self, sel: np.ndarray) -> "Traffic":
        """The requests selected by a mask or index array (a copy)."""
        return Traffic(*(getattr(self, f.name)[sel].copy() for f in fields(self) if f.name != "session"),
                       session=self.sessions()[sel].copy())

    def between(self, start: float, end: float) -> "Traffic":
        return self.take((self.ts >= start) & (self.ts < end))

    def where(self, start: float = -math.inf, end: float = math.inf, app: str | None = None,
              model: str | None = None) -> np.ndarray:
        """Mask of the requests in [start, end) of the given app and model."""
        m = (self.ts >= start) & (self.ts < end)
        if app is not None:
            m &= self.app == app
        if model is not None:
            m &= self.model == model
        return m

    def changed(self, sel: np.ndarray, **columns: Any) -> "Traffic":
        """A copy with columns changed where `sel`: each keyword is a column name and a
        function of the selected values (or a value) giving their new values."""
        out = self.take(slice(None))
        for name, new in columns.items():
            col = getattr(out, name)
            col[sel] = new(col[sel]) if callable(new) else new
        return out

    @staticmethod
    def concat(parts: Sequence["Traffic"]) -> "Traffic":
        joined = Traffic(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Traffic)
                           if f.name != "session"), session=np.concatenate([p.sessions() for p in parts]))
        return joined.take(np.argsort(joined.ts, kind="stable"))

    def columns(self) -> RecordColumns:
        n = len(self)
        none = np.full(n, None, dtype=object)
        zero = np.zeros(n, dtype=np.int64)
        tools = np.empty(n, dtype=object)
        tools[:] = [()] * n
        return RecordColumns(
            ts=self.ts.astype(np.float64), app=self.app.astype(object), provider=self.provider.astype(object),
            model=self.model.astype(object), session_id=self.sessions().copy(),
            input_tokens=self.input_tokens.astype(np.int64), output_tokens=self.output_tokens.astype(np.int64),
            cache_read_tokens=zero.copy(), cache_write_tokens=zero.copy(), reasoning_tokens=zero.copy(),
            cost=self.cost.astype(np.float64), latency=self.latency.astype(np.float64),
            ttft=self.ttft.astype(np.float64), is_error=self.is_error.astype(bool), error_type=none.copy(),
            stop_reason=none.copy(), request_had_tools=np.zeros(n, dtype=bool), tool_calls=zero.copy(),
            tool_signature=none.copy(), request_id=none.copy(), operation=np.full(n, "chat", dtype=object),
            stream=~np.isnan(self.ttft), tool_names=tools, cache_write_1h_tokens=zero.copy(),
            service_tier=none.copy(), batch=np.zeros(n, dtype=bool))

    def records(self) -> list[dict[str, Any]]:
        """The requests as records for `Engine.ingest` or the HTTP API."""
        out = []
        for i in range(len(self)):
            d: dict[str, Any] = {"ts": float(self.ts[i]), "provider": str(self.provider[i]), "model": str(self.model[i]),
                                 "app": str(self.app[i]), "input_tokens": int(self.input_tokens[i]),
                                 "output_tokens": int(self.output_tokens[i]), "cost_usd": float(self.cost[i]),
                                 "latency_s": float(self.latency[i])}
            if not math.isnan(self.ttft[i]):
                d["ttft_s"] = float(self.ttft[i])
            if self.is_error[i]:
                d["status"] = 500
            if self.session is not None and self.session[i] is not None:
                d["session_id"] = str(self.session[i])
            out.append(d)
        return out


def generate(streams: Sequence[Stream], start: float, end: float, seed: int = 1) -> Traffic:
    """Requests of every stream in [start, end); deterministic for a seed."""
    parts = []
    for k, s in enumerate(streams):
        rng = np.random.default_rng([seed, k])
        lo = max(start, s.start if s.start is not None else start)
        minutes = np.arange(math.floor(start / 60), math.ceil(end / 60)) * 60.0
        first_day, first_hour = math.floor(start / DAY), math.floor(start / HOUR)
        day_level = np.exp(s.day_sd * rng.standard_normal(math.ceil(end / DAY) - first_day + 1))
        hour_level = np.exp(s.hour_sd * rng.standard_normal(math.ceil(end / HOUR) - first_hour + 1))
        local = minutes + (utc_offsets(minutes, s.zone) if s.zone else 0.0)   # the users' clock
        level = (s.rate / 60 * daily_cycle(local + 30, s.night, s.peak_hour)
                 * day_level[(minutes // DAY).astype(np.int64) - first_day]
                 * hour_level[(minutes // HOUR).astype(np.int64) - first_hour]
                 * np.where(weekday(local) >= 5, s.weekend, 1.0))
        sessions = rng.poisson(level / s.session)
        t0 = np.repeat(minutes, sessions) + rng.uniform(0, 60, int(sessions.sum()))
        calls = rng.geometric(1 / s.session, t0.size) if s.session > 1 else np.ones(t0.size, dtype=np.int64)
        owner = np.repeat(np.arange(t0.size), calls)
        step = rng.exponential(s.gap, owner.size)
        step[np.r_[0, np.cumsum(calls)[:-1]]] = 0.0                 # a session's first call at its start
        cum = np.cumsum(step)
        ts_all = t0[owner] + cum - cum[np.r_[0, np.cumsum(calls)[:-1]]][owner]
        kept = (ts_all >= lo) & (ts_all < end)
        order = np.argsort(ts_all[kept], kind="stable")
        ts, owner = ts_all[kept][order], owner[kept][order]
        n = ts.size
        inp = np.maximum(1, np.round(s.tokens[0] * rng.lognormal(0, s.size_sd, n))).astype(np.int64)
        out = np.maximum(1, np.round(s.tokens[1] * rng.lognormal(0, s.size_sd, n))).astype(np.int64)
        ttft = (s.ttft * rng.lognormal(0, s.ttft_sd, n)) if s.ttft is not None else np.full(n, np.nan)
        speed = s.otps * rng.lognormal(0, s.otps_sd, n)
        latency = np.nan_to_num(ttft, nan=0.2) + out / speed
        session = np.array([f"{s.app}-{k}-{i}" for i in owner.tolist()], dtype=object)
        parts.append(Traffic(ts, np.full(n, s.app, dtype=object), np.full(n, s.provider, dtype=object),
                             np.full(n, s.model, dtype=object), inp, out, inp * s.price[0] + out * s.price[1],
                             latency, ttft, rng.random(n) < s.error_rate, session))
    return Traffic.concat(parts)


class Harness:
    """The real ScopeHistory and Evaluator, fed as `Engine._apply` feeds them (records
    aggregated per series at the history's fine resolution, in batches of at most an hour,
    as live ingest sends them), without the SQLite store and the counters: weeks of
    traffic build in a second, and `copy()` gives each test its own history in
    milliseconds. `evaluate(t)` is the evaluator the engine runs."""

    def __init__(self, window: float = HOUR, baseline: float = 7 * DAY, horizon: float = 14 * DAY,
                 signals: dict[str, dict[str, float]] | None = None, alert_budget: float = 1.0,
                 timezone: str = "UTC", page_share: float = 1.0) -> None:
        self.history = ScopeHistory(window, horizon)
        self.baseline = baseline
        self.timezone = timezone
        self.specs: tuple[SignalSpec, ...] = signal_specs(signals)
        self.alert_budget = alert_budget
        self.page_share = page_share
        self.series: dict[tuple[str, str, str], int] = {}
        self.series_keys: dict[int, tuple[str, str, str]] = {}
        self._evaluator: Evaluator | None = None

    def feed(self, traffic: Traffic, batch: float = HOUR) -> "Harness":
        """Add the requests in time order, one batch of `batch` seconds at a time."""
        if not len(traffic):
            return self
        keys = list(zip(traffic.app.tolist(), traffic.provider.tolist(), traffic.model.tolist()))
        for key in dict.fromkeys(keys):
            if key not in self.series:
                self.series[key] = len(self.series) + 1
                self.series_keys[self.series[key]] = key
        sids = np.array([self.series[k] for k in keys], dtype=np.int64)
        part = np.floor(traffic.ts / batch)
        cuts = np.flatnonzero(np.diff(part)) + 1
        cols = traffic.columns()
        for idx in np.split(np.arange(len(traffic)), cuts):
            sub = _take_columns(cols, idx)
            self.history.add(aggregate(sub, sids[idx], sub.cost, res=self.history.fine, sessions=True), self.series_keys)
        return self

    def copy(self, signals: dict[str, dict[str, float]] | None = None, alert_budget: float | None = None,
             page_share: float | None = None) -> "Harness":
        """An independent copy (its own evaluator), optionally judged with other settings."""
        evaluator, self._evaluator = self._evaluator, None
        try:
            out = copy.deepcopy(self)
        finally:
            self._evaluator = evaluator
        if signals is not None:
            out.specs = signal_specs(signals)
        if alert_budget is not None:
            out.alert_budget = alert_budget
        if page_share is not None:
            out.page_share = page_share
        return out

    def evaluate(self, t: float) -> Snapshot:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.history, self.specs, self.baseline, self.alert_budget, self.timezone,
                                        self.page_share)
        return self._evaluator.evaluate(t)

    def baseline_stats(self) -> Baseline:
        """The statistics of the baseline the last evaluation judged against."""
        assert self._evaluator is not None and self._evaluator._baseline is not None, "evaluate first"
        return self._evaluator._baseline

    def run(self, traffic: Traffic, times: Sequence[float], on_arrival: bool = False) -> list[Snapshot]:
        """Live operation: feed the requests up to each time, then evaluate there
        (`on_arrival`: a request only once it has ended, as a live exporter gets it)."""
        snaps, fed = [], -math.inf
        came = traffic.ts + np.nan_to_num(traffic.latency) if on_arrival else traffic.ts
        for t in times:
            self.feed(traffic.take((came > fed) & (came <= t)))
            fed = t
            snaps.append(self.evaluate(t))
        return snaps


def every(start: float, last_minute: float, step: float = 5, first_minute: float | None = None,
          offset: float = 30.0) -> list[float]:
    """Evaluation times every `step` minutes after `start` up to `last_minute`, `offset`
    seconds into the minute (live evaluation runs at any second of a minute)."""
    first = step if first_minute is None else first_minute
    return [start + 60.0 * m + offset for m in np.arange(first, last_minute + 1e-9, step)]


def _take_columns(cols: RecordColumns, idx: np.ndarray) -> RecordColumns:
    return RecordColumns(*(getattr(cols, f.name)[idx] for f in fields(RecordColumns)))


def row(snap: Snapshot, signal: str, scope: str = "global", name: str | None = None) -> dict[str, Any]:
    """The verdict row of one signal and scope (`name`: the app, or the model's name)."""
    for r in snap.rows():
        if r["signal"] == signal and r["scope"] == scope and (
                name is None or r["app"] == name or r["model"] == name):
            return r
    raise KeyError(f"no row for {signal} {scope} {name}")


SEVERITIES = {"ok": 0, "warning": 1, "high": 2}


def first_flagged(snaps: Sequence[Snapshot], signal: str, scope: str = "global", name: str | None = None,
                  level: str = "warning") -> float | None:
    """Event time of the first snapshot whose verdict reaches `level` (None: never)."""
    for s in snaps:
        if SEVERITIES[row(s, signal, scope, name)["severity"]] >= SEVERITIES[level]:
            return s.t
    return None


# --- scraping -------------------------------------------------------------------------------

def bucket_rows(store: Any, res: int, start: float, end: float) -> list[tuple[int, int, np.ndarray, dict[str, np.ndarray]]]:
    """(start, series, sums, dense sketch per kind) of each stored bucket with start in
    [start, end), in key order, read through `Store.bucket_groups` (which checkpoints first)."""
    from exporter import sketch
    from exporter.storage.buckets import SKETCHES
    out = []
    for g in store.bucket_groups(res, start, end):
        dense = {kind: np.zeros((len(g), sketch.NBINS), dtype=np.int64) for kind in SKETCHES}
        for kind, (gi, b, c) in zip(SKETCHES, g.nonzero_bins()):
            dense[kind][gi, b] = c
        out.extend((int(g.start[i]), int(g.series[i]), g.adds[i], {kind: dense[kind][i] for kind in SKETCHES})
                   for i in range(len(g)))
    return out


def parse_scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a text exposition keyed by (name, sorted labels)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for (n, labs), v in samples.items():
        d = dict(labs)
        if n == name and all(d.get(k) == val for k, val in labels.items()):
            total += v
    return total


def close_to(expected: Any, rel: float = 1e-9, abs: float = 1e-12) -> Any:
    """`pytest.approx` for a number and the value itself for anything else (a severity name,
    None): pytest 9.2 and later refuse approx with a tolerance on values that are not numbers."""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return pytest.approx(expected, rel=rel, abs=abs)
    return expected


# --- a real server ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exporter_command() -> list[str]:
    """The console script installed beside the running interpreter (under `make test`, the
    project's .venv), so a test never starts another install that happens to be on PATH."""
    script = Path(sys.executable).with_name("llm-usage-exporter")
    return [str(script)] if script.exists() else [sys.executable, "-m", "exporter.cli"]


class Server:
    """`llm-usage-exporter serve` in a subprocess on a free loopback port.

        with Server(tmp_path, db) as srv:
            srv.client.post("/v1/records", json=[...])
    """

    def __init__(self, tmp_path: Path, db: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, evaluation_interval: str = "0.2", prefix: Sequence[str] = ()) -> None:
        self.prefix = list(prefix)     # e.g. prlimit or setpriv before the command
        self.tmp_path = tmp_path
        self.db = db
        self.port = port or free_port()
        self.args = list(args)
        self.env = {**CLEAN_ENV, **(env or {})}
        self.evaluation_interval = evaluation_interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self._log = None

    def start(self, timeout: float = 60.0) -> "Server":
        log_path = self.tmp_path / f"server-{self.port}-{time.monotonic_ns()}.log"
        self._log = open(log_path, "wb")
        cmd = self.prefix + exporter_command() + ["serve", "--db", str(self.db), "--port", str(self.port),
                                    "--evaluation-interval", self.evaluation_interval, "--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        self.log_path = log_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                if self.client.get("/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not become ready within {timeout}s:\n{log_path.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log:
            self._log.close()
            self._log = None

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = self.client.get("/metrics")
        r.raise_for_status()
        return parse_scrape(r.text)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"condition not met within {timeout}s; server log:\n{self.log_path.read_text()}")

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.client.close()
