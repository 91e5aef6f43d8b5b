"""Shared test helpers: fixed event times, settings and engines on real SQLite files,
crafted traffic, metric reads, and a real `llm-usage-exporter serve` subprocess.

    from helpers import T0, HOUR, settings_for, engine_at, rec, steady_history, gauge, Server

Every test builds its own engine (and so its own registry) on a file under tmp_path and
reads values with `registry.get_sample_value`; nothing here touches the global registry.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Settings, load_settings
from exporter.engine import Engine

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
