"""The SQLite store: batch transactions, failure atomicity, ranges, pruning and metadata.

Failures are real SQLite failures: a second connection installs a trigger that aborts
inserts, as a full disk or a locked file would abort the batch's transaction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from faults import break_table, mend
from helpers import T0, bucket_rows, engine_at, rec, settings_for, value

from exporter.web.app import create_app
from exporter.ingest.dedupe import hash_ids
from exporter.storage.store import SCHEMA_VERSION, BatchWrite, Store, StoreError

SERIES = {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}


def test_fresh_store_schema_and_meta(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "dir" / "s.db"
    s = Store(db)
    assert s.get_meta("schema_version") == SCHEMA_VERSION
    assert s.get_meta("nothing") is None
    s.set_meta("k", "v1")
    s.set_meta("k", "v2")
    assert s.get_meta("k") == "v2"
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    assert Store(db).get_meta("k") == "v2"


def test_a_file_from_before_the_tpot_sketch_gains_its_column(tmp_path: Path) -> None:
    """A store written by version 2 (three sketch columns) opens: it gains the tpot column,
    its old rows read that sketch as empty, and new records fill it."""
    import sqlite3

    from exporter import sketch
    db = tmp_path / "old.db"
    old = sqlite3.connect(db)
    old.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE series (id INTEGER PRIMARY KEY, app TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
          UNIQUE (app, provider, model));
        CREATE TABLE buckets (res INTEGER NOT NULL, start INTEGER NOT NULL, series INTEGER NOT NULL,
          adds BLOB NOT NULL, latency BLOB, ttft BLOB, otps BLOB, PRIMARY KEY (res, start, series)) WITHOUT ROWID;
        INSERT INTO meta VALUES ('schema_version', '2');
        INSERT INTO series VALUES (1, 'chat', 'openai', 'gpt-4o-mini');""")
    hour = int(T0 // 3600 * 3600) - 7200
    lat = sketch.encode(sketch.histogram(np.array([0.5, 2.0])))
    old.execute("INSERT INTO buckets VALUES (3600, ?, 1, ?, ?, NULL, NULL)", (hour, np.ones(4).tobytes(), lat))
    old.commit()
    old.close()

    engine, _ = engine_at(settings_for(tmp_path, name="old.db"))
    st = engine.store
    assert st.get_meta("schema_version") == SCHEMA_VERSION
    # a 2 s request with 100 output tokens and no TTFT: 20 ms per output token; a streamed one is left out
    engine.ingest([rec(T0 - 60, request_id="a", latency_s=2.0, output_tokens=100, **SERIES),
                   rec(T0 - 60, request_id="b", latency_s=2.0, ttft_s=0.5, stream=True, output_tokens=100, **SERIES)])
    rows = {start: sk for start, _, _, sk in bucket_rows(st, 3600, 0, T0 + 3600)}
    assert rows[hour]["tpot"].sum() == 0 and rows[hour]["latency"].sum() == 2
    new = rows[int((T0 - 60) // 3600 * 3600)]
    assert new["tpot"].sum() == 1 and sketch.MIDPOINTS[new["tpot"].argmax()] == pytest.approx(20.0, rel=0.03)
    engine.close()


def test_unopenable_store_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(StoreError, match="db: .*a-directory.db is a directory"):
        Store(tmp_path / "a-directory.db")


def test_series_ids_are_stable_across_reopen(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    ids = s.series_ids([("a", "p", "m1"), ("a", "p", "m2"), ("a", "p", "m1")])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    s.close()
    s = Store(tmp_path / "s.db")
    assert s.series_ids([("a", "p", "m2"), ("a", "p", "m1")]) == [ids[1], ids[0]]
    assert s.series() == {ids[0]: ("a", "p", "m1"), ids[1]: ("a", "p", "m2")}


def remembered(s: Store, since: float = 0.0) -> set[int]:
    return {int(h) for _, hashes in s.dedupe_hashes(since) for h in hashes}


def test_write_is_atomic(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    h1, h2 = hash_ids(["r1"]), hash_ids(["r2"])
    s.write(BatchWrite(dedupe=(T0, h1.tobytes()), labels=[("model", "a")], daily_cost=[("chat", 1, 1.0)], meta={"m": "1"}))
    c = break_table(tmp_path / "s.db", "label_values")
    with pytest.raises(StoreError, match="db: write to .*s.db failed: disk says no"):
        s.write(BatchWrite(dedupe=(T0, h2.tobytes()), labels=[("model", "x")], daily_cost=[("chat", 1, 2.0)],
                           meta={"m": "2"}))
    assert s.errors_total == 1
    assert remembered(s) == {int(h1[0])}                       # nothing of the failed batch was kept
    assert s.get_meta("m") == "1" and s.label_values() == {"model": ["a"]}
    assert s.daily_costs() == [("chat", 1, 1.0)]
    mend(c, "label_values")
    s.write(BatchWrite(dedupe=(T0 + 1, h2.tobytes()), labels=[("model", "x")], daily_cost=[("chat", 1, 2.0)], meta={"m": "2"}))
    assert remembered(s) == {int(h1[0]), int(h2[0])}
    assert remembered(s, since=T0 + 0.5) == {int(h2[0])}
    assert s.label_values() == {"model": ["a", "x"]} and s.daily_costs() == [("chat", 1, 3.0)]


def test_request_ids_are_remembered_as_stable_hashes(tmp_path: Path) -> None:
    ids = [f"id-{i}" for i in range(2500)]
    h = hash_ids(ids)
    assert len(set(h.tolist())) == 2500
    assert hash_ids(["id-7"])[0] == h[7]                         # the same in every process
    s = Store(tmp_path / "s.db")
    s.write(BatchWrite(dedupe=(T0, h[::2].tobytes())))
    s.close()
    assert remembered(Store(tmp_path / "s.db")) == set(h[::2].tolist())


def test_records_range_order_and_limit(tmp_path: Path) -> None:
    """Raw records come back in arrival order, filtered to start <= ts < end."""
    engine, _ = engine_at(settings_for(tmp_path))
    for batch in ((5, 1), (3,), (2, 4)):
        engine.ingest([rec(T0 + k, request_id=f"k{k}") for k in batch])
    st = engine.store
    assert [r["request_id"] for r in st.records(T0 + 2, T0 + 4)] == ["k3", "k2"]
    assert [r["request_id"] for r in st.records(0, T0 + 100, limit=2, newest_first=True)] == ["k4", "k2"]
    assert [r["request_id"] for r in st.records(0, T0 + 100)] == ["k5", "k1", "k3", "k2", "k4"]
    assert [r["request_id"] for r in st.records(T0 + 6, T0 + 100)] == []
    engine.close()


def test_prune_drops_what_aged_out(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, minute_retention="2h", record_retention="1h", dedupe_window="3h",
                            baseline="1d", horizon="2d")
    engine, clock = engine_at(settings, T0)
    engine.ingest([rec(T0 - 5 * 3600, request_id="old", cost_usd=1.0)], now=T0 - 3600)
    engine.ingest([rec(T0 - 600, request_id="new", cost_usd=1.0)], now=T0)
    st = engine.store
    st.write_judged([("global\x1f\x1f\x1f", int(T0 // 3600) - 5), ("global\x1f\x1f\x1f", int(T0 // 3600) - 5)])
    assert st.judged(0) == [("global\x1f\x1f\x1f", int(T0 // 3600) - 5)]    # a mark stored twice is one
    st.write_judged([], requests=[("app\x1fchat\x1f\x1f", int(T0 // 3600) - 4)])
    assert st.judged_requests(0) == [("app\x1fchat\x1f\x1f", int(T0 // 3600) - 4)]   # marks of their own
    assert st.judged(0) == [("global\x1f\x1f\x1f", int(T0 // 3600) - 5)]
    h = int(T0 // 3600) - 5
    st.write_judged([], [], [("openai", "gpt-4o", "retry", h, h * 3600.0 + 600, h * 3600.0 + 900)])
    st.write_judged([], [], [("openai", "gpt-4o", "retry", h, h * 3600.0 + 300, h * 3600.0 + 700)])
    assert st.drift_apart(0) == [("openai", "gpt-4o", "retry", h, h * 3600.0 + 300, h * 3600.0 + 900)]   # a span grows
    mins = lambda: sorted({b[0] for b in bucket_rows(st, 60, 0, T0 + 10**6)})      # noqa: E731
    hours = lambda: sorted({b[0] for b in bucket_rows(st, 3600, 0, T0 + 10**6)})   # noqa: E731
    assert mins() == [T0 - 5 * 3600, T0 - 600] and len(hours()) == 2
    engine.prune()
    assert mins() == [T0 - 600]                                  # minute buckets: 2 h
    assert len(hours()) == 2                                      # hourly buckets: 2 d
    assert [r["request_id"] for r in st.records(0, T0 + 10)] == ["new"]   # raw records: 1 h
    assert remembered(st) == set(hash_ids(["old", "new"]).tolist())       # ingested 1 h and 0 h ago: within 3 h
    clock.t = T0 + 2.5 * 3600
    engine.prune()
    assert remembered(st) == set(hash_ids(["new"]).tolist())
    clock.t = T0 + 3 * 86400
    engine.prune()
    assert mins() == [] and hours() == [] and remembered(st) == set() and st.judged(0) == []   # judged hours: 2 d
    assert st.judged_requests(0) == []
    assert st.drift_apart(0) == []
    assert sum(c for _, _, c in st.daily_costs()) == pytest.approx(2.0)   # daily costs stay for forecasts
    engine.close()


def test_notifications_keep_the_newest(tmp_path: Path) -> None:
    s = Store(tmp_path / "s.db")
    for i in range(7):
        s.add_notification(T0 + i, {"status": "firing", "n": i}, keep=5)
    got = s.notifications(limit=10)
    assert [n["n"] for n in got] == [6, 5, 4, 3, 2]
    assert got[0]["received_at"] == T0 + 6


def test_buckets_roundtrip_minute_and_hour(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings)
    engine.ingest([rec(T0 - 3600 + 30, latency_s=1.0, cost_usd=0.5), rec(T0 - 3600 + 90, latency_s=2.0, cost_usd=0.25),
                   rec(T0 - 3600 + 100, latency_s=3.0, cost_usd=0.25, status=500)])
    from exporter.storage.buckets import F
    minute = list(bucket_rows(engine.store, 60, 0, T0))
    assert [(b[0], b[2][F["requests"]]) for b in minute] == [(T0 - 3600, 1.0), (T0 - 3540, 2.0)]
    (start, _, adds, sk), = bucket_rows(engine.store, 3600, 0, T0)
    assert start == T0 - 3600
    assert (adds[F["requests"]], adds[F["errors"]], adds[F["cost"]], adds[F["input_tokens"]]) == (3, 1, 1.0, 3000)
    assert int(sk["latency"].sum()) == 3 and np.count_nonzero(sk["latency"]) == 3
    engine.close()


# --- a failed write never double counts ---------------------------------------------------------

def test_failed_batch_is_not_counted_and_retry_counts_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings)
    engine.ingest([rec(T0 - 100, request_id="a", cost_usd=1.0)])
    c = break_table(settings.db, "dedupe")
    batch = [rec(T0 - 90, request_id="b", cost_usd=2.0, latency_s=1.0)]
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        r = client.post("/v1/records", json=batch)
        assert r.status_code == 503 and "send the same batch again" in r.json()["error"]
        assert value(engine, "llm_requests_total", **SERIES) == 1
        assert value(engine, "llm_cost_usd_total", **SERIES) == 1.0
        assert value(engine, "llm_request_duration_seconds_count", **SERIES) is None
        assert value(engine, "llm_exporter_store_errors_total") == 1
        assert value(engine, "llm_exporter_records_total", result="accepted") == 1
        mend(c, "dedupe")
        assert client.post("/v1/records", json=batch).json()["accepted"] == 1
        assert client.post("/v1/records", json=batch).json()["duplicate"] == 1
        assert value(engine, "llm_requests_total", **SERIES) == 2
        assert value(engine, "llm_cost_usd_total", **SERIES) == 3.0
        assert value(engine, "llm_request_duration_seconds_count", **SERIES) == 1


def test_failed_batch_does_not_count_label_overflow_twice(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, label_limit_model=1)
    engine, _ = engine_at(settings)
    engine.ingest([rec(T0 - 100, model="m1")])
    c = break_table(settings.db, "records")
    from exporter.storage.store import StoreError as SE
    with pytest.raises(SE):
        engine.ingest([rec(T0 - 90, model="m2", request_id="o1")])
    mend(c, "records")
    engine.ingest([rec(T0 - 90, model="m2", request_id="o1")])
    assert value(engine, "llm_requests_total", app="chat", provider="openai", model="other") == 1
    assert value(engine, "llm_exporter_label_overflow_total", label="model") == 1
    engine.close()


def test_a_failed_checkpoint_keeps_the_batches_for_the_next_one(tmp_path: Path) -> None:
    """Folding into the buckets fails (the batch itself was committed and acknowledged): the
    groups stay queued, the failure is counted, and the next checkpoint folds them."""
    engine, _ = engine_at(settings_for(tmp_path))
    c = break_table(Path(engine.store.path), "buckets")
    assert engine.ingest([rec(T0 - 600, request_id="a")]).accepted == 1
    with pytest.raises(StoreError, match="checkpoint"):
        engine.store.checkpoint()
    assert engine.store.errors_total == 1
    mend(c, "buckets")
    assert engine.ingest([rec(T0 - 500, request_id="b")]).accepted == 1
    from exporter.storage.buckets import F
    assert sum(b[2][F["requests"]] for b in bucket_rows(engine.store, 60, 0, T0)) == 2
    engine.close()


def test_hashes_of_another_hash_function_are_dropped(tmp_path: Path) -> None:
    """A store written with a different request-id hash: its window cannot be compared, so
    it is emptied (and the store says which hash it now holds)."""
    s = Store(tmp_path / "s.db")
    s.write(BatchWrite(dedupe=(T0, hash_ids(["a", "b"]).tobytes())))
    s.set_meta("dedupe_hash", "blake2b-64")
    s.close()
    again = Store(tmp_path / "s.db")
    assert remembered(again) == set()
    assert again.get_meta("dedupe_hash") != "blake2b-64"
    again.write(BatchWrite(dedupe=(T0, hash_ids(["c"]).tobytes())))
    again.close()
    assert remembered(Store(tmp_path / "s.db")) == set(hash_ids(["c"]).tolist())   # its own hashes stay
