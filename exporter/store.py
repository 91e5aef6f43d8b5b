"""The embedded store: SQLite (WAL) holding everything that must survive a restart.

What lives here: minute and hourly buckets per (app, provider, model) with latency, TTFT
and throughput sketches; the running counter totals (so counters never go backwards
across a restart); the dedupe window of request ids; admitted label values; daily cost
per app (for budgets and forecasts); raw records for a limited retention (without any
text); Alertmanager notifications; and small bits of state such as tail offsets.

Every ingest batch is one transaction, committed before the HTTP answer is sent: an
acknowledged record survives `kill -9` (WAL with synchronous=NORMAL is durable against a
process crash; set synchronous=FULL through the environment for power-loss durability).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import orjson

from . import sketch
from .buckets import FIELDS, SKETCHES, Groups

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
  id INTEGER PRIMARY KEY, app TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
  UNIQUE (app, provider, model));
CREATE TABLE IF NOT EXISTS buckets (
  res INTEGER NOT NULL, start INTEGER NOT NULL, series INTEGER NOT NULL,
  adds BLOB NOT NULL, latency BLOB, ttft BLOB, otps BLOB,
  PRIMARY KEY (res, start, series)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (series INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dedupe (request_id TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_seen ON dedupe (seen);
CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, ts REAL NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts);
CREATE TABLE IF NOT EXISTS label_values (label TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (label, value));
CREATE TABLE IF NOT EXISTS daily_cost (app TEXT NOT NULL, day INTEGER NOT NULL, cost REAL NOT NULL, PRIMARY KEY (app, day));
CREATE TABLE IF NOT EXISTS notifications (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, body BLOB NOT NULL);
"""
SCHEMA_VERSION = "1"
RESOLUTIONS = (60, 3600)


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says which file and why."""


@dataclass(slots=True)
class Bucket:
    adds: np.ndarray
    sketches: dict[str, np.ndarray]


@dataclass(slots=True)
class BatchWrite:
    """Everything one ingest batch changes, written in one transaction."""

    request_ids: list[tuple[str, float]] = field(default_factory=list)
    groups: Groups | None = None
    totals: dict[int, bytes] = field(default_factory=dict)
    records: list[tuple[float, bytes]] = field(default_factory=list)
    labels: list[tuple[str, str]] = field(default_factory=list)
    daily_cost: list[tuple[str, int, float]] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


class Store:
    """One SQLite file. Writes go through `write()`; reads may come from any thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={os.environ.get('LLM_EXPORTER_SQLITE_SYNCHRONOUS', 'NORMAL')}")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"db: cannot open {self.path}: {e}") from None
        self._lock = threading.RLock()
        self._series: dict[tuple[str, str, str], int] = {
            (a, p, m): i for i, a, p, m in self._db.execute("SELECT id, app, provider, model FROM series")}
        self._cache: dict[tuple[int, int, int], Bucket] = {}
        self.errors_total = 0
        if self.get_meta("schema_version") is None:
            self.set_meta("schema_version", SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- series ----------------------------------------------------------------------

    def series_ids(self, keys: Sequence[tuple[str, str, str]]) -> list[int]:
        """Ids for (app, provider, model) keys, creating the new ones."""
        out = []
        with self._lock:
            for k in keys:
                sid = self._series.get(k)
                if sid is None:
                    cur = self._db.execute("INSERT INTO series (app, provider, model) VALUES (?, ?, ?)", k)
                    sid = int(cur.lastrowid)  # type: ignore[arg-type]
                    self._series[k] = sid
                out.append(sid)
        return out

    def series(self) -> dict[int, tuple[str, str, str]]:
        with self._lock:
            return {i: k for k, i in self._series.items()}

    # --- dedupe ----------------------------------------------------------------------

    def seen(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these request ids are already in the dedupe window."""
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(request_ids), 900):
                chunk = request_ids[i:i + 900]
                q = f"SELECT request_id FROM dedupe WHERE request_id IN ({','.join('?' * len(chunk))})"
                found.update(r[0] for r in self._db.execute(q, chunk))
        return found

    # --- buckets ---------------------------------------------------------------------

    def _bucket(self, res: int, start: int, sid: int) -> Bucket:
        key = (res, start, sid)
        b = self._cache.get(key)
        if b is None:
            row = self._db.execute(
                "SELECT adds, latency, ttft, otps FROM buckets WHERE res=? AND start=? AND series=?", key).fetchone()
            if row is None:
                b = Bucket(np.zeros(len(FIELDS)), {k: np.zeros(sketch.NBINS, dtype=np.int64) for k in SKETCHES})
            else:
                b = Bucket(np.frombuffer(row[0], dtype=np.float64).copy(),
                           {k: sketch.decode(row[i + 1]) for i, k in enumerate(SKETCHES)})
            self._cache[key] = b
        return b

    def _write_groups(self, groups: Groups) -> None:
        rows = []
        for res in RESOLUTIONS:
            g = groups if res == 60 else groups.coarsen(res)
            for j in range(len(g)):
                b = self._bucket(res, int(g.start[j]), int(g.series[j]))
                b.adds += g.adds[j]
                for k in SKETCHES:
                    b.sketches[k] += g.sketches[k][j]
                rows.append((res, int(g.start[j]), int(g.series[j]), b.adds.tobytes(),
                             *(sketch.encode(b.sketches[k]) for k in SKETCHES)))
            newest = int(g.start.max()) if len(g) else 0
            self._evict(res, newest - 2 * res)
        self._db.executemany("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def _evict(self, res: int, before: int) -> None:
        if len(self._cache) < 4096:
            return
        for key in [k for k in self._cache if k[0] == res and k[1] < before]:
            del self._cache[key]

    # --- the batch transaction -----------------------------------------------------

    def write(self, batch: BatchWrite) -> None:
        """Apply one batch atomically; on failure nothing of it is kept."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if batch.request_ids:
                    self._db.executemany("INSERT OR REPLACE INTO dedupe VALUES (?, ?)", batch.request_ids)
                if batch.groups is not None and len(batch.groups):
                    self._write_groups(batch.groups)
                if batch.totals:
                    self._db.executemany("INSERT OR REPLACE INTO totals VALUES (?, ?)", batch.totals.items())
                if batch.records:
                    self._db.executemany("INSERT INTO records (ts, data) VALUES (?, ?)", batch.records)
                if batch.labels:
                    self._db.executemany("INSERT OR IGNORE INTO label_values VALUES (?, ?)", batch.labels)
                if batch.daily_cost:
                    self._db.executemany(
                        "INSERT INTO daily_cost VALUES (?, ?, ?) ON CONFLICT (app, day) DO UPDATE SET cost = cost + excluded.cost",
                        batch.daily_cost)
                for k, v in batch.meta.items():
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                self._cache.clear()  # cached buckets may hold the rolled-back additions
                self.errors_total += 1
                raise StoreError(f"db: write to {self.path} failed: {e}") from None

    # --- reads for start-up ----------------------------------------------------------

    def totals(self) -> dict[int, bytes]:
        with self._lock:
            return dict(self._db.execute("SELECT series, data FROM totals"))

    def label_values(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self._lock:
            for label, value in self._db.execute("SELECT label, value FROM label_values ORDER BY rowid"):
                out.setdefault(label, []).append(value)
        return out

    def buckets(self, res: int, start: float, end: float, series: Iterable[int] | None = None) -> Iterator[tuple[int, int, np.ndarray, dict[str, np.ndarray]]]:
        """(start, series, adds, sketches) of buckets with start in [start, end)."""
        q = "SELECT start, series, adds, latency, ttft, otps FROM buckets WHERE res=? AND start>=? AND start<?"
        args: list[Any] = [res, int(start), int(end)]
        if series is not None:
            ids = list(series)
            q += f" AND series IN ({','.join('?' * len(ids))})"
            args += ids
        with self._lock:
            rows = self._db.execute(q + " ORDER BY start", args).fetchall()
        for st, sid, adds, *sk in rows:
            yield int(st), int(sid), np.frombuffer(adds, dtype=np.float64), {k: sketch.decode(sk[i]) for i, k in enumerate(SKETCHES)}

    def daily_costs(self) -> list[tuple[str, int, float]]:
        with self._lock:
            return self._db.execute("SELECT app, day, cost FROM daily_cost ORDER BY day").fetchall()

    def records(self, start: float, end: float, limit: int | None = None, newest_first: bool = False) -> Iterator[dict[str, Any]]:
        order = "DESC" if newest_first else "ASC"
        q = f"SELECT data FROM records WHERE ts >= ? AND ts < ? ORDER BY ts {order}, id {order}"
        args: list[Any] = [start, end]
        if limit is not None:
            q += " LIMIT ?"
            args.append(limit)
        with self._lock:
            cur = self._db.execute(q, args)
            while True:
                rows = cur.fetchmany(1000)
                if not rows:
                    break
                for (data,) in rows:
                    yield orjson.loads(data)

    # --- meta, notifications, pruning ------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def add_notification(self, received_at: float, body: dict[str, Any], keep: int = 1000) -> None:
        with self._lock:
            self._db.execute("INSERT INTO notifications (received_at, body) VALUES (?, ?)", (received_at, orjson.dumps(body)))
            self._db.execute("DELETE FROM notifications WHERE id <= (SELECT MAX(id) FROM notifications) - ?", (keep,))

    def notifications(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT received_at, body FROM notifications ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"received_at": r, **orjson.loads(b)} for r, b in rows]

    def prune(self, now: float, minute_retention: float, horizon: float, dedupe_window: float, record_retention: float) -> None:
        """Drop what has aged out. Daily costs are kept for 400 days (forecasts, month-to-date)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM buckets WHERE res=60 AND start < ?", (int(now - minute_retention),))
                self._db.execute("DELETE FROM buckets WHERE res=3600 AND start < ?", (int(now - horizon),))
                self._db.execute("DELETE FROM dedupe WHERE seen < ?", (now - dedupe_window,))
                self._db.execute("DELETE FROM records WHERE ts < ?", (now - record_retention,))
                self._db.execute("DELETE FROM daily_cost WHERE day < ?", (int(now // 86400) - 400,))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                self.errors_total += 1
                raise StoreError(f"db: pruning {self.path} failed: {e}") from None
            self._cache = {k: v for k, v in self._cache.items()
                           if k[1] >= now - (minute_retention if k[0] == 60 else horizon)}
