"""The embedded store: SQLite (WAL) holding everything that must survive a restart.

What lives here: minute and hourly buckets per (app, provider, model) with latency, TTFT
and throughput sketches; the running counter totals (so counters never go backwards
across a restart); the dedupe window (each batch's request-id hashes as one blob); admitted
label values; daily cost per app (for budgets and forecasts); raw records for a limited
retention, without any text, one JSONL blob per batch (one row per record costs ten times
more to insert); Alertmanager notifications; and small bits of state such as tail offsets.

Every ingest batch is one transaction, committed before the HTTP answer is sent: an
acknowledged record survives `kill -9` (WAL with synchronous=NORMAL is durable against a
process crash; the `sqlite_synchronous` setting FULL makes it durable against power loss).

The batch's raw records are its journal entry. Buckets are a view of the journal that is
brought up to date at checkpoints: the groups of the last few batches wait in memory and
are folded into the bucket rows together, because a read-modify-write of every touched
minute and hour per batch was most of the cost of a write. `folded_through` (in meta)
names the last journal row the buckets include; after a crash the engine folds the rows
after it again (`unfolded`, `fold`), so no acknowledged record is missing from them.
Readers of buckets checkpoint first and so always see every committed batch.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np
import orjson

from .. import sketch
from ..ingest.dedupe import HASH_NAME
from .buckets import FIELDS, SKETCHES, Groups, StoredRows, merge, sparse, widen_adds
from .journal import stored_records

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
  id INTEGER PRIMARY KEY, app TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
  UNIQUE (app, provider, model));
CREATE TABLE IF NOT EXISTS buckets (
  res INTEGER NOT NULL, start INTEGER NOT NULL, series INTEGER NOT NULL,
  adds BLOB NOT NULL, latency BLOB, ttft BLOB, otps BLOB, tpot BLOB,
  PRIMARY KEY (res, start, series)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (series INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dedupe (id INTEGER PRIMARY KEY, seen REAL NOT NULL, hashes BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS dedupe_seen ON dedupe (seen);
CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY, ts_min REAL NOT NULL, ts_max REAL NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts_max);
CREATE TABLE IF NOT EXISTS label_values (label TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (label, value));
CREATE TABLE IF NOT EXISTS daily_cost (app TEXT NOT NULL, day INTEGER NOT NULL, cost REAL NOT NULL, PRIMARY KEY (app, day));
CREATE TABLE IF NOT EXISTS notifications (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bursts (scope TEXT NOT NULL, hour INTEGER NOT NULL, total REAL NOT NULL, squares REAL NOT NULL,
  PRIMARY KEY (scope, hour)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slot_sizes (scope TEXT NOT NULL, hour INTEGER NOT NULL, data BLOB NOT NULL,
  PRIMARY KEY (scope, hour)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS burst_blocks (scope TEXT NOT NULL, hour INTEGER NOT NULL, data BLOB NOT NULL,
  PRIMARY KEY (scope, hour)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS judged (scope TEXT NOT NULL, hour INTEGER NOT NULL, PRIMARY KEY (scope, hour)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS judged_requests (scope TEXT NOT NULL, hour INTEGER NOT NULL,
  PRIMARY KEY (scope, hour)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drift_tainted (provider TEXT NOT NULL, model TEXT NOT NULL, hour INTEGER NOT NULL,
  signal TEXT NOT NULL, PRIMARY KEY (provider, model, hour, signal)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drift_apart (provider TEXT NOT NULL, model TEXT NOT NULL, app TEXT NOT NULL,
  hour INTEGER NOT NULL, first REAL NOT NULL, last REAL NOT NULL, PRIMARY KEY (provider, model, app, hour)) WITHOUT ROWID;
"""
SCHEMA_VERSION = "3"     # 3: the tpot sketch column (added in place to older files)
RESOLUTIONS = (60, 3600)
MAX_CACHED_BUCKETS = 100_000
CHECKPOINT_BATCHES = 16      # pending batches that trigger a checkpoint (a few hundred KB held)
log = logging.getLogger("llm_usage_exporter")
PAGE_ROWS = 1_000            # bucket rows per read: small enough to be turned into columns while in cache
# A bucket row's columns as `StoredRows.from_rows` takes them: a missing sketch is an empty blob.
_SKETCH_COLUMNS = "adds, " + ", ".join(f"ifnull({k}, x'')" for k in SKETCHES)
_INSERT_BUCKET = (f"INSERT OR REPLACE INTO buckets (res, start, series, adds, {', '.join(SKETCHES)}) "
                  f"VALUES ({', '.join('?' * (4 + len(SKETCHES)))})")
_BEFORE_ANY_SERIES = -(2**63)
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class StoreError(RuntimeError):
    """The store cannot be opened, read or written; the message names the file, says why and
    what to do. `kind` sorts the cause for the HTTP edge and the logs: locked, full,
    readonly, corrupt, io or other."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


# SQLite's primary result codes, by what an operator does about them.
_KINDS = {"SQLITE_BUSY": "locked", "SQLITE_LOCKED": "locked", "SQLITE_FULL": "full", "SQLITE_READONLY": "readonly",
          "SQLITE_PERM": "readonly", "SQLITE_CANTOPEN": "readonly", "SQLITE_CORRUPT": "corrupt", "SQLITE_NOTADB": "corrupt",
          "SQLITE_IOERR": "io"}


def error_kind(e: sqlite3.Error) -> str:
    """The kind of a SQLite error from its primary result code (SQLITE_IOERR_WRITE -> io)."""
    name = getattr(e, "sqlite_errorname", None) or ""
    primary = "_".join(name.split("_")[:2])
    if primary in _KINDS:
        return _KINDS[primary]
    text = str(e).lower()     # errors raised before a result code is known (closed database, ...)
    if "locked" in text:
        return "locked"
    if "malformed" in text or "not a database" in text:
        return "corrupt"
    return "other"


def describe(e: sqlite3.Error, path: str, action: str) -> StoreError:
    """A StoreError naming the file, the failed action, SQLite's reason and what to do."""
    kind = error_kind(e)
    hint = {
        "locked": "another process holds a write lock on it (a second exporter on the same file?); "
                  "stop that process or give this one its own --db",
        "full": "the disk (or the database's size limit) is full; free space and the exporter resumes by itself",
        "readonly": "this process cannot write it; make the file, its -wal and -shm files and its directory "
                    "writable by the exporter's user, or point --db elsewhere",
        "corrupt": "the file is damaged; restore it from a backup, or move it aside to start empty "
                   "(`sqlite3 FILE .recover | sqlite3 NEW.db` salvages what is readable)",
        "io": "the operating system reported an I/O error; check the disk and the file system",
    }.get(kind)
    return StoreError(f"db: {action} {path} failed: {e}" + (f": {hint}" if hint else ""), kind)


@dataclass(slots=True)
class Bucket:
    """A cached bucket row: sums, and sketches kept encoded (sparse) so that tens of
    thousands of open buckets cost kilobytes, not the 11 KB each a dense copy would."""

    adds: np.ndarray
    sketches: list[bytes]


@dataclass(slots=True)
class BatchWrite:
    """Everything one ingest batch changes, written in one transaction."""

    dedupe: tuple[float, bytes] | None = None
    series: list[tuple[int, str, str, str]] = field(default_factory=list)   # new (id, app, provider, model)
    records: tuple[float, float, bytes] | None = None
    groups: Groups | None = None
    totals: dict[int, bytes] = field(default_factory=dict)
    labels: list[tuple[str, str]] = field(default_factory=list)
    daily_cost: list[tuple[str, int, float]] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


class Store:
    """One SQLite file. Writes go through `write()`; reads may come from any thread.

    `keep_records=False` (record retention 0) keeps raw records only as the journal:
    they are deleted once folded into the buckets and never served."""

    def __init__(self, path: Path | str, keep_records: bool = True, checkpoint_batches: int = CHECKPOINT_BATCHES,
                 busy_timeout: float = 5.0, synchronous: str = "normal") -> None:
        self.path = str(path)
        self.keep_records = keep_records
        self.checkpoint_batches = checkpoint_batches
        self._lock = threading.RLock()
        self.errors_total = 0
        self.writable = True                   # the last write committed (readiness)
        self.last_error: str | None = None
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous: one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        self._open(busy_timeout, synchronous.upper())
        self._cache: dict[tuple[int, int, int], Bucket] = {}
        self._newest: dict[int, int] = {}
        self._writes = 0
        self._pending: list[Groups] = []       # sparse minute groups of committed, unfolded batches
        self._pending_through = 0              # the journal row of the newest of them

    def _open(self, busy_timeout: float, synchronous: str) -> None:
        """Open the file and prove it writable, or raise one StoreError that says what to do."""
        if self.path != ":memory:":
            p = Path(self.path)
            if p.is_dir():
                raise StoreError(f"db: {self.path} is a directory; point --db at a file (it is created if missing)")
            blocker = next((a for a in p.parents if a.exists()), None)
            if blocker is not None and not blocker.is_dir():
                raise StoreError(f"db: cannot create {self.path}: {blocker} is a file, not a directory; "
                                 "point --db elsewhere", "readonly")
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"db: cannot create the directory {p.parent} for {self.path}: {e.strerror}; "
                                 "create it, writable by the exporter's user, or point --db elsewhere", "readonly") from None
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout)
        except sqlite3.Error as e:
            raise describe(e, self.path, "opening") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")     # one of SYNCHRONOUS, checked above
            self._db.executescript(SCHEMA)
            self._add_sketch_columns()
            self.probe()           # a real commit: a read-only, locked or full file fails here, at start-up
            self._series: dict[tuple[str, str, str], int] = {
                (a, p, m): i for i, a, p, m in self._db.execute("SELECT id, app, provider, model FROM series")}
            self._keys = {i: k for k, i in self._series.items()}
            version = self.get_meta("schema_version")
            if version is None or (version.isdigit() and int(version) < int(SCHEMA_VERSION)):
                self.set_meta("schema_version", SCHEMA_VERSION)
            if self.get_meta("dedupe_hash") != HASH_NAME:
                self._forget_foreign_hashes()
            folded = self.get_meta("folded_through")
            if folded is None:   # a new file, or one written before checkpoints: its buckets are complete
                (last,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()
                self.set_meta("folded_through", str(last))
                folded = str(last)
            self.folded_through = int(folded)
        except sqlite3.Error as e:
            self._db.close()
            raise describe(e, self.path, "opening") from None
        except StoreError:
            self._db.close()
            raise

    def _add_sketch_columns(self) -> None:
        """Give a file written by an older version the sketch columns it lacks; its rows
        read the new kinds as empty sketches."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(buckets)")}
        missing = [k for k in SKETCHES if k not in have]
        for kind in missing:
            self._db.execute(f"ALTER TABLE buckets ADD COLUMN {kind} BLOB")

    def _forget_foreign_hashes(self) -> None:
        """Request-id hashes written with another hash function cannot match new ones."""
        (n,) = self._db.execute("SELECT COUNT(*) FROM dedupe").fetchone()
        if n:
            log.warning("db %s: the dedupe window was stored with an older request-id hash; it starts empty, "
                        "so a retry of a batch sent before this upgrade may count twice", self.path)
            self._db.execute("DELETE FROM dedupe")
        self.set_meta("dedupe_hash", HASH_NAME)

    def close(self) -> None:
        with self._lock:
            try:
                self.checkpoint()
            except StoreError:
                log.exception("final checkpoint failed; the journal is folded at the next start")
            self._db.close()

    # --- errors and transactions ------------------------------------------------------

    def _failed(self, e: sqlite3.Error, action: str) -> NoReturn:
        """Roll back whatever is open (SQLite may have done it already: a failed BEGIN, or
        a full disk), count the failure, and raise it as a StoreError."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("db %s: rollback after a failed %s failed too", self.path, action)
        self.errors_total += 1
        err = describe(e, self.path, action)
        self.writable = False
        self.last_error = str(err)
        raise err from None

    def _committed(self) -> None:
        self.writable = True
        self.last_error = None

    @contextmanager
    def _reading(self, action: str) -> Iterator[None]:
        """Turn a SQLite error of a read into a counted StoreError (a damaged page, an I/O error)."""
        try:
            yield
        except sqlite3.Error as e:
            self.errors_total += 1
            raise describe(e, self.path, action) from None

    def probe(self) -> None:
        """Commit one small write: proves the file writable (start-up, and readiness after a failure)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('last_write_probe', ?)", (repr(time.time()),))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e, "writing to")
            self._committed()

    # --- series ----------------------------------------------------------------------

    def series_ids(self, keys: Sequence[tuple[str, str, str]]) -> list[int]:
        """Ids for (app, provider, model) keys, creating the new ones in one transaction
        (start-up and tools; ingest plans new series into its batch's own transaction)."""
        with self._lock:
            known = self.known_series(keys)
            new: dict[tuple[str, str, str], int] = {}
            for k, sid in zip(keys, known):
                if sid is None and k not in new:
                    new[k] = self.next_series_id + len(new)
            if new:
                self.write(BatchWrite(series=[(i, *k) for k, i in new.items()]))
            return [self._series[k] for k in keys]

    def known_series(self, keys: Sequence[tuple[str, str, str]]) -> list[int | None]:
        """The id of each key, None for keys never stored."""
        get = self._series.get
        return [get(k) for k in keys]

    @property
    def next_series_id(self) -> int:
        """The id the next new series gets (ingest has one writer: ids are planned before the commit)."""
        return max(self._keys, default=0) + 1

    @property
    def series_count(self) -> int:
        return len(self._keys)

    def series(self) -> dict[int, tuple[str, str, str]]:
        """A copy of id -> (app, provider, model), safe to iterate while ingest goes on."""
        with self._lock:
            return dict(self._keys)

    def series_keys(self) -> dict[int, tuple[str, str, str]]:
        """The live id -> key mapping, for lookups by the (single) writer without a copy."""
        return self._keys

    # --- buckets ---------------------------------------------------------------------

    def _bucket(self, res: int, start: int, sid: int) -> Bucket:
        key = (res, start, sid)
        b = self._cache.get(key)
        if b is None:
            row = self._db.execute(
                f"SELECT adds, {', '.join(SKETCHES)} FROM buckets WHERE res=? AND start=? AND series=?", key).fetchone()
            if row is None:
                b = Bucket(np.zeros(len(FIELDS)), [b""] * len(SKETCHES))
            else:
                b = Bucket(widen_adds(np.frombuffer(row[0], dtype=np.float64).copy()), [bytes(x or b"") for x in row[1:]])
            self._cache[key] = b
        return b

    def _write_groups(self, groups: Groups) -> None:
        """Read-modify-write of each touched minute and hour bucket (one row each per checkpoint)."""
        rows = []
        for res in RESOLUTIONS:
            g = groups if res == 60 else groups.coarsen(res)
            if not len(g):
                continue
            starts, series = g.start.tolist(), g.series.tolist()
            cached = [self._bucket(res, st, sid) for st, sid in zip(starts, series)]
            adds = np.stack([b.adds for b in cached]) + g.adds
            assert g.sketches is not None           # merge() and coarsen() give dense sketches
            encoded = [sketch.encode_many(sketch.decode_many([b.sketches[k] for b in cached]) + g.sketches[kind])
                       for k, kind in enumerate(SKETCHES)]
            for j, b in enumerate(cached):
                b.adds = adds[j]
                b.sketches = [e[j] for e in encoded]
                rows.append((res, starts[j], series[j], adds[j].tobytes(), *b.sketches))
            self._newest[res] = max(self._newest.get(res, 0), max(starts))
        self._db.executemany(_INSERT_BUCKET, rows)
        self._writes += 1
        if self._writes % 16 == 0 or len(self._cache) > MAX_CACHED_BUCKETS:
            self._evict()

    def _evict(self) -> None:
        """Drop cached buckets that are two buckets behind the newest (a late record for
        them is read back from the table)."""
        keep_after = {res: newest - 2 * res for res, newest in self._newest.items()}
        self._cache = {k: v for k, v in self._cache.items() if k[1] >= keep_after.get(k[0], 0)}

    # --- the batch transaction -----------------------------------------------------

    def write(self, batch: BatchWrite) -> None:
        """Apply one batch atomically; on failure nothing of it is kept."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if batch.series:
                    self._db.executemany("INSERT INTO series (id, app, provider, model) VALUES (?, ?, ?, ?)", batch.series)
                if batch.dedupe is not None:
                    self._db.execute("INSERT INTO dedupe (seen, hashes) VALUES (?, ?)", batch.dedupe)
                if batch.totals:
                    self._db.executemany("INSERT OR REPLACE INTO totals VALUES (?, ?)", batch.totals.items())
                row_id = None
                if batch.records is not None:
                    row_id = self._db.execute("INSERT INTO records (ts_min, ts_max, data) VALUES (?, ?, ?)",
                                              batch.records).lastrowid
                if batch.labels:
                    self._db.executemany("INSERT OR IGNORE INTO label_values VALUES (?, ?)", batch.labels)
                if batch.daily_cost:
                    self._db.executemany(
                        "INSERT INTO daily_cost VALUES (?, ?, ?) ON CONFLICT (app, day) DO UPDATE SET cost = cost + excluded.cost",
                        batch.daily_cost)
                if batch.meta:
                    self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", batch.meta.items())
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e, "write to")
            self._committed()
            for sid, app, provider, model in batch.series:
                self._series[(app, provider, model)] = sid
                self._keys[sid] = (app, provider, model)
            if batch.groups is not None and len(batch.groups):
                if row_id is None:
                    raise ValueError("a batch with groups needs its records: they are the journal the buckets are rebuilt from")
                self.fold(batch.groups, int(row_id))

    def fold(self, groups: Groups, through: int) -> None:
        """Queue the minute groups of journal row `through` (and those before it) for the next
        checkpoint; checkpoint when enough are waiting. A failed checkpoint leaves them queued:
        the batch itself is already committed."""
        with self._lock:
            self._pending.append(sparse(groups))
            self._pending_through = max(self._pending_through, through)
            if len(self._pending) >= self.checkpoint_batches:
                try:
                    self.checkpoint()
                except StoreError:
                    log.exception("checkpoint failed; retrying with the next batch")

    def checkpoint(self) -> None:
        """Fold the pending batches into the minute and hour buckets in one transaction."""
        with self._lock:
            if not self._pending:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._write_groups(merge(self._pending))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('folded_through', ?)", (str(self._pending_through),))
                if not self.keep_records:
                    self._db.execute("DELETE FROM records WHERE id <= ?", (self._pending_through,))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._cache.clear()  # cached buckets may hold the rolled-back additions
                self._failed(e, "checkpoint of")
            self._committed()
            self.folded_through = self._pending_through
            self._pending.clear()

    def unfolded(self) -> Iterator[tuple[int, bytes]]:
        """(row id, blob) of journal rows written after the last checkpoint (after a crash)."""
        with self._lock, self._reading("reading the journal of"):
            rows = self._db.execute("SELECT id, data FROM records WHERE id > ? ORDER BY id",
                                    (self.folded_through,)).fetchall()
        yield from rows

    def _checkpoint_for_read(self) -> None:
        try:
            self.checkpoint()
        except StoreError:
            log.exception("checkpoint before a read failed; the read misses the newest batches")

    # --- reads for start-up ----------------------------------------------------------

    def totals(self) -> dict[int, bytes]:
        with self._lock, self._reading("reading counter totals from"):
            return dict(self._db.execute("SELECT series, data FROM totals"))

    def label_values(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self._lock, self._reading("reading label values from"):
            for label, value in self._db.execute("SELECT label, value FROM label_values ORDER BY rowid"):
                out.setdefault(label, []).append(value)
        return out

    def bucket_groups(self, res: int, start: float, end: float, rows_per_chunk: int = 20_000) -> Iterator[Groups]:
        """Buckets with start in [start, end) as sparse Groups, a few buckets' starts at a time
        (whole starts per chunk, about `rows_per_chunk` rows, more if one start has more), so
        reading weeks of history never holds it all at once.

        Rows come start by start in pages (`_bucket_pages`), are held as columns, and are
        joined into a chunk once it holds enough rows and the next page begins a new start."""
        held: list[StoredRows] = []
        count = 0
        for page in self._bucket_pages(res, start, end, min(rows_per_chunk, PAGE_ROWS)):
            if count >= rows_per_chunk and page.start[0] != held[-1].start[0]:
                chunk = StoredRows.concat(held).groups()
                held, count = [], 0            # the pages are copied: let them go before the chunk is used
                yield chunk
            held.append(page)
            count += len(page)
        if held:
            chunk = StoredRows.concat(held).groups()
            held = []
            yield chunk

    def _bucket_pages(self, res: int, start: float, end: float, page_rows: int) -> Iterator[StoredRows]:
        """Bucket rows with start in [start, end) in key order, one start at a time, at most
        `page_rows` per page, each page as columns. Each query is short (an index seek for the
        next start, or one page), so the lock is never held for the whole read, and every row
        is read once. Pages are small so that each is turned into columns while in cache."""
        next_start = "SELECT start FROM buckets WHERE res=? AND start>=? AND start<? ORDER BY start LIMIT 1"
        page = (f"SELECT series, {_SKETCH_COLUMNS} FROM buckets WHERE res=? AND start=? AND series>? "
                "ORDER BY series LIMIT ?")
        at = int(start)
        self._checkpoint_for_read()
        while True:
            with self._lock, self._reading("reading buckets from"):
                found = self._db.execute(next_start, (res, at, int(end))).fetchone()
            if found is None:
                return
            at, after = int(found[0]), _BEFORE_ANY_SERIES
            while True:
                with self._lock, self._reading("reading buckets from"):
                    rows = self._db.execute(page, (res, at, after, page_rows)).fetchall()
                if rows:
                    yield StoredRows.from_rows(at, rows)
                if len(rows) < page_rows:
                    break
                after = rows[-1][0]
            at += 1

    def daily_costs(self) -> list[tuple[str, int, float]]:
        with self._lock, self._reading("reading daily cost from"):
            return self._db.execute("SELECT app, day, cost FROM daily_cost ORDER BY day").fetchall()

    def dedupe_hashes(self, since: float) -> Iterator[tuple[float, np.ndarray]]:
        """(seen, hashes) of every batch remembered since `since`."""
        with self._lock, self._reading("reading the dedupe window from"):
            rows = self._db.execute("SELECT seen, hashes FROM dedupe WHERE seen >= ? ORDER BY id", (since,)).fetchall()
        for seen, blob in rows:
            yield seen, np.frombuffer(blob, dtype=np.int64)

    def records(self, start: float, end: float, limit: int | None = None, newest_first: bool = False) -> Iterator[dict[str, Any]]:
        """Stored records with start <= ts < end, in arrival order (newest first if asked)."""
        if not self.keep_records:
            return
        order = "DESC" if newest_first else "ASC"
        q = f"SELECT id, data FROM records WHERE ts_max >= ? AND ts_min < ? ORDER BY id {order}"
        left = math.inf if limit is None else limit
        last_id = None
        while left > 0:
            with self._lock, self._reading("reading records from"):   # page through: a long export never holds the lock
                page = self._db.execute(
                    q.replace("ORDER BY", "AND id " + ("<" if newest_first else ">") + " ? ORDER BY") + " LIMIT 64",
                    (start, end, last_id if last_id is not None else (math.inf if newest_first else -1))).fetchall()
            if not page:
                return
            for rid, data in page:
                last_id = rid
                try:
                    batch = stored_records(data)
                except (ValueError, KeyError, TypeError) as e:   # SQLite read the page, but it holds garbage
                    self.errors_total += 1
                    raise StoreError(f"db: reading records from {self.path} failed: batch {rid} cannot be decoded "
                                     f"({e}): the file is damaged; restore it from a backup", "corrupt") from None
                for rec in (reversed(batch) if newest_first else batch):
                    if start <= rec["ts"] < end:
                        yield rec
                        left -= 1
                        if left <= 0:
                            return

    # --- meta, notifications, pruning ------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock, self._reading("reading meta from"):
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.write(BatchWrite(meta={key: value}))

    def add_notification(self, received_at: float, body: dict[str, Any], keep: int = 1000) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO notifications (received_at, body) VALUES (?, ?)", (received_at, orjson.dumps(body)))
                self._db.execute("DELETE FROM notifications WHERE id <= (SELECT MAX(id) FROM notifications) - ?", (keep,))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e, "storing a notification in")
            self._committed()

    def write_bursts(self, rows: Sequence[tuple[str, int, float, float]], through: int,
                     sizes: Sequence[tuple[str, int, bytes]] = (),
                     blocks: Sequence[tuple[str, int, bytes]] = ()) -> None:
        """Store how bursty finished hours were, per scope (scope key, hour, sum and sum of
        squares of its five-minute request counts), how their counts over longer blocks
        spread (`blocks`: scope key, hour, the history's block statistics as bytes), and how
        their five-minute mean request sizes spread (`sizes`: likewise): derived from minute
        buckets that the store keeps only for hours, so a restart can measure them over the
        whole baseline. `through`: the hour after the last one written (kept in meta)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO bursts VALUES (?, ?, ?, ?)", rows)
                self._db.executemany("INSERT OR REPLACE INTO slot_sizes VALUES (?, ?, ?)", sizes)
                self._db.executemany("INSERT OR REPLACE INTO burst_blocks VALUES (?, ?, ?)", blocks)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('bursts_through', ?)", (str(through),))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e, "storing burstiness in")
            self._committed()

    def write_judged(self, rows: Sequence[tuple[str, int]], tainted: Sequence[tuple[str, str, int, str]] = (),
                     apart: Sequence[tuple[str, str, str, int, float, float]] = (),
                     requests: Sequence[tuple[str, int]] = ()) -> None:
        """Store the (scope key, hour) pairs whose cost or tokens a verdict judged anomalous
        (the evaluator leaves those hours out of its size statistics), those whose request
        rate a verdict of the evaluation windows judged (left out of the held windows), the (provider,
        model, hour, signal) cells the drift detector found drifting (left out of that
        signal's reference), and the spans of a model's failures put on one of its apps
        (left out of the model's error rate), so that a restart does not take a spike or a
        lasting fault back into its baseline, nor an app's storm back into its model's
        errors. Rows already stored are kept as they are; a span only grows."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR IGNORE INTO judged VALUES (?, ?)", rows)
                self._db.executemany("INSERT OR IGNORE INTO judged_requests VALUES (?, ?)", requests)
                self._db.executemany("INSERT OR IGNORE INTO drift_tainted VALUES (?, ?, ?, ?)", tainted)
                self._db.executemany("INSERT INTO drift_apart VALUES (?, ?, ?, ?, ?, ?) "
                                     "ON CONFLICT (provider, model, app, hour) DO UPDATE SET "
                                     "first = min(first, excluded.first), last = max(last, excluded.last)", apart)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e, "storing judged hours in")
            self._committed()

    def judged(self, since_hour: int) -> list[tuple[str, int]]:
        with self._lock, self._reading("reading judged hours from"):
            return self._db.execute("SELECT scope, hour FROM judged WHERE hour >= ?", (since_hour,)).fetchall()

    def judged_requests(self, since_hour: int) -> list[tuple[str, int]]:
        with self._lock, self._reading("reading judged hours from"):
            return self._db.execute("SELECT scope, hour FROM judged_requests WHERE hour >= ?", (since_hour,)).fetchall()

    def drift_tainted(self, since_hour: int) -> list[tuple[str, str, int, str]]:
        with self._lock, self._reading("reading drifting hours from"):
            return self._db.execute("SELECT provider, model, hour, signal FROM drift_tainted WHERE hour >= ?",
                                    (since_hour,)).fetchall()

    def drift_apart(self, since_hour: int) -> list[tuple[str, str, str, int, float, float]]:
        with self._lock, self._reading("reading failures put on an app from"):
            return self._db.execute("SELECT provider, model, app, hour, first, last FROM drift_apart WHERE hour >= ?",
                                    (since_hour,)).fetchall()

    def bursts(self, since_hour: int) -> list[tuple[str, int, float, float]]:
        with self._lock, self._reading("reading burstiness from"):
            return self._db.execute("SELECT scope, hour, total, squares FROM bursts WHERE hour >= ?", (since_hour,)).fetchall()

    def burst_blocks(self, since_hour: int) -> list[tuple[str, int, bytes]]:
        with self._lock, self._reading("reading burstiness from"):
            return self._db.execute("SELECT scope, hour, data FROM burst_blocks WHERE hour >= ?", (since_hour,)).fetchall()

    def slot_sizes(self, since_hour: int) -> list[tuple[str, int, bytes]]:
        with self._lock, self._reading("reading request size spreads from"):
            return self._db.execute("SELECT scope, hour, data FROM slot_sizes WHERE hour >= ?", (since_hour,)).fetchall()

    def notifications(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock, self._reading("reading notifications from"):
            rows = self._db.execute("SELECT received_at, body FROM notifications ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"received_at": r, **orjson.loads(b)} for r, b in rows]

    def prune(self, now: float, minute_retention: float, horizon: float, dedupe_window: float, record_retention: float) -> None:
        """Drop what has aged out. Daily costs are kept for 400 days (forecasts, month-to-date)."""
        self.checkpoint()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM buckets WHERE res=60 AND start < ?", (int(now - minute_retention),))
                self._db.execute("DELETE FROM buckets WHERE res=3600 AND start < ?", (int(now - horizon),))
                self._db.execute("DELETE FROM dedupe WHERE seen < ?", (now - dedupe_window,))
                self._db.execute("DELETE FROM records WHERE ts_max < ? AND id <= ?", (now - record_retention, self.folded_through))
                self._db.execute("DELETE FROM daily_cost WHERE day < ?", (int(now // 86400) - 400,))
                self._db.execute("DELETE FROM bursts WHERE hour < ?", (int((now - horizon) // 3600),))
                self._db.execute("DELETE FROM slot_sizes WHERE hour < ?", (int((now - horizon) // 3600),))
                self._db.execute("DELETE FROM burst_blocks WHERE hour < ?", (int((now - horizon) // 3600),))
                self._db.execute("DELETE FROM judged WHERE hour < ?", (int((now - horizon) // 3600),))
                self._db.execute("DELETE FROM judged_requests WHERE hour < ?", (int((now - horizon) // 3600),))
                self._db.execute("DELETE FROM drift_tainted WHERE hour < ?", (int((now - horizon) // 3600),))
                self._db.execute("DELETE FROM drift_apart WHERE hour < ?", (int((now - horizon) // 3600),))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._failed(e, "pruning")
            self._committed()
            self._cache = {k: v for k, v in self._cache.items()
                           if k[1] >= now - (minute_retention if k[0] == 60 else horizon)}
