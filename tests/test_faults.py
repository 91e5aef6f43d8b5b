"""A store write that fails changes nothing, says 503, is counted, and ingest resumes by
itself; start-up faults give one clear line and exit 2.

Faults are real: a second SQLite connection holding `BEGIN EXCLUSIVE`, a tmpfs that fills
up (or SQLite's max_page_count where no tmpfs can be mounted), triggers that abort an
insert into one table (a statement failing half-way through the batch's transaction), a
read-only file, and damaged pages."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from faults import break_table, locked, memory_state, mend, small_disk, unprivileged
from helpers import CLEAN_ENV, HOUR, T0, Server, engine_at, exporter_command, rec, sample_sum, settings_for, value

from exporter.web.app import create_app
from exporter.storage.store import StoreError

SERIES = {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}
TABLES = ("series", "dedupe", "totals", "records", "label_values", "daily_cost", "meta")


def varied(t: float, n: int, prefix: str) -> list[dict[str, Any]]:
    """Records that touch every part of the state: new apps and models (one beyond the model
    limit), errors, latencies, TTFT, tools, sessions, and a rejected record."""
    out = [rec(t + i, app=("chat", f"new-{prefix}")[i % 2], model=("gpt-4o-mini", f"m-{prefix}-{i % 3}")[i % 2],
               latency_s=0.5 + i / 10, ttft_s=0.1, status=(200, 500)[i % 5 == 0], session_id=f"s-{prefix}-{i % 2}",
               tool_calls=["search"] if i % 3 == 0 else None, request_id=f"{prefix}-{i}") for i in range(n)]
    return out + [{"provider": "openai"}]


@pytest.mark.parametrize("table", TABLES)
def test_a_failed_write_changes_nothing_in_memory(tmp_path: Path, table: str) -> None:
    """Whichever statement of the batch's transaction fails, the engine's memory is exactly
    as before: counters, histograms, dedupe window, label guards, series, history,
    detectors and the exporter's own totals. The same batch then counts once."""
    settings = settings_for(tmp_path, label_limit_model=4, label_limit_app=3)
    engine, _ = engine_at(settings, T0)
    engine.ingest(varied(T0 - 2 * HOUR, 12, "a"))
    engine.evaluate(T0)
    before = memory_state(engine)
    batch = varied(T0 - HOUR, 12, "b")
    c = break_table(settings.db, table)
    with pytest.raises(StoreError, match="disk says no"):
        engine.ingest(batch)
    assert memory_state(engine) == before
    assert engine.store.errors_total == 1 and not engine.store.writable
    mend(c, table)
    assert engine.ingest(batch).accepted == 12
    assert engine.store.writable
    assert engine.ingest(batch).duplicate == 12
    assert value(engine, "llm_exporter_records_total", result="accepted") == 24
    engine.close()


def test_locked_store_answers_503_and_resumes(tmp_path: Path) -> None:
    """Another process holds the write lock: 503 with Retry-After and a JSON reason after the
    busy timeout, counted, nothing changed; when the lock goes the same batch counts once."""
    settings = settings_for(tmp_path, store_busy_timeout="0.2")
    engine, _ = engine_at(settings, T0)
    engine.ingest([rec(T0 - 60, request_id="first")])
    batch = [rec(T0 - 30, request_id="second", latency_s=2.0)]
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        before = memory_state(engine)
        with locked(settings.db):
            r = client.post("/v1/records", json=batch)
            assert r.status_code == 503
            assert r.headers["retry-after"].isdigit()
            body = r.json()
            assert body["reason"] == "locked" and "send the same batch again" in body["error"]
            assert str(settings.db) in body["detail"] and "database is locked" in body["detail"]
            assert memory_state(engine) == before
            assert value(engine, "llm_exporter_store_errors_total") == 1
            assert client.get("/v1/usage/recent").status_code == 200      # reads go on under the lock (WAL)
        r = client.post("/v1/records", json=batch)
        assert r.status_code == 200 and r.json()["accepted"] == 1
        assert client.post("/v1/records", json=batch).json()["duplicate"] == 1
    assert value(engine, "llm_requests_total", **SERIES) == 2
    assert value(engine, "llm_request_duration_seconds_count", **SERIES) == 1


def fill(engine: Any, start: int, until_refused: bool, limit: int = 2000) -> tuple[list[int], list[int]]:
    """Post batches of 50 until the store refuses one (or `limit` batches); returns the
    acknowledged and the refused batch numbers."""
    acked, refused = [], []
    for b in range(start, start + limit):
        try:
            engine.ingest(batch_of(b))
            acked.append(b)
        except StoreError as e:
            assert e.kind == "full", e
            refused.append(b)
            if until_refused and len(refused) >= 3:
                break
    return acked, refused


def batch_of(b: int) -> list[dict[str, Any]]:
    return [rec(T0 - 600 + (b % 500), app=f"app-{b % 4}", input_tokens=100 + i, request_id=f"full-{b}-{i}",
                session_id=f"s{b % 9}", latency_s=0.3) for i in range(50)]


def test_full_disk_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    """The disk fills while batches arrive: every acknowledged batch is counted once, the
    refused ones not at all; once there is room again ingest resumes by itself, and
    re-sending the refused batches with the same ids makes the counters equal the number
    of distinct records. On a real tmpfs where the test may mount one, else with SQLite's
    page limit."""
    with small_disk(3) as disk:
        where = disk.path if disk else tmp_path
        settings = settings_for(where, record_retention="1h")
        engine, _ = engine_at(settings, T0)
        engine.store.checkpoint_batches = 1
        if disk is None:
            pages = engine.store._db.execute("PRAGMA page_count").fetchone()[0]
            engine.store._db.execute(f"PRAGMA max_page_count={pages + 60}")
        acked, refused = fill(engine, 0, until_refused=True)
        assert refused, "the disk never filled"
        counted = value(engine, "llm_requests_total", app="app-0", provider="openai", model="gpt-4o-mini") or 0
        total = sum(value(engine, "llm_requests_total", app=f"app-{a}", provider="openai", model="gpt-4o-mini") or 0
                    for a in range(4))
        assert total == 50 * len(acked) and counted > 0
        assert value(engine, "llm_exporter_records_total", result="accepted") == 50 * len(acked)
        assert engine.store.errors_total >= len(refused)
        if disk is not None:
            disk.grow(64)
        else:
            engine.store._db.execute("PRAGMA max_page_count=1073741823")
        for b in refused:                                   # the client retries what was refused
            assert engine.ingest(batch_of(b)).accepted == 50
        for b in acked[-3:]:                                # and what it is unsure of: duplicates
            assert engine.ingest(batch_of(b)).duplicate == 50
        distinct = 50 * (len(acked) + len(refused))
        total = sum(value(engine, "llm_requests_total", app=f"app-{a}", provider="openai", model="gpt-4o-mini") or 0
                    for a in range(4))
        assert total == distinct
        engine.close()
        again, _ = engine_at(settings, T0)                  # and the store agrees after a restart
        total = sum(value(again, "llm_requests_total", app=f"app-{a}", provider="openai", model="gpt-4o-mini") or 0
                    for a in range(4))
        assert total == distinct
        assert value(again, "llm_exporter_records_total", result="accepted") == distinct
        again.close()


def test_server_with_a_locked_store_is_not_ready_until_it_can_write(tmp_path: Path) -> None:
    """A real server: a locked store answers 503 (Retry-After, counted), /readyz fails while
    the store cannot be written, and both recover by themselves when the lock goes."""
    db = tmp_path / "u.db"
    with Server(tmp_path, db, "--store-busy-timeout", "0.3") as srv:
        batch = [rec(time.time() - 60, request_id="x1"), rec(time.time() - 50, request_id="x2")]
        with locked(db):
            r = srv.client.post("/v1/records", json=batch)
            assert r.status_code == 503 and r.json()["reason"] == "locked" and int(r.headers["retry-after"]) > 0
            ready = srv.client.get("/readyz")
            assert ready.status_code == 503 and "cannot be written" in ready.text
            assert srv.client.get("/healthz").status_code == 200
            assert sample_sum(srv.scrape(), "llm_exporter_store_errors_total") >= 1
            assert sample_sum(srv.scrape(), "llm_requests_total") == 0
        srv.wait_for(lambda: srv.client.get("/readyz").status_code == 200)   # the evaluation loop probes the store
        assert srv.client.post("/v1/records", json=batch).json()["accepted"] == 2
        assert srv.client.post("/v1/records", json=batch).json()["duplicate"] == 2
        assert sample_sum(srv.scrape(), "llm_requests_total") == 2


# --- start-up ---------------------------------------------------------------------------------

def start(db: Path, *extra: str, prefix: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`serve` that is expected to refuse to start."""
    cmd = (prefix or []) + exporter_command() + ["serve", "--db", str(db), "--port", "1", "--log-level", "warning", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV)


def assert_one_clear_line(p: subprocess.CompletedProcess[str], path: Path | str, *words: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and str(path) in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


def a_store(tmp_path: Path, name: str = "u.db") -> Path:
    """A store with a few hours of history in it, closed."""
    settings = settings_for(tmp_path, name=name)
    engine, _ = engine_at(settings, T0)
    for b in range(40):
        engine.ingest([rec(T0 - 5 * HOUR + 300 * b + i, app=f"a{i % 7}", model=f"m{i % 5}", request_id=f"r{b}-{i}")
                       for i in range(200)])
    engine.close()
    return settings.db


def test_read_only_store_refuses_to_start(tmp_path: Path) -> None:
    prefix = unprivileged()
    db = a_store(tmp_path)
    tmp_path.chmod(0o755)
    db.chmod(0o444)
    try:
        p = start(db, prefix=prefix)
    finally:
        db.chmod(0o644)
    assert_one_clear_line(p, db, "readonly", "writable")


def test_missing_directory_that_cannot_be_created(tmp_path: Path) -> None:
    prefix = unprivileged()
    parent = tmp_path / "locked-dir"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        p = start(parent / "sub" / "u.db", prefix=prefix)
    finally:
        parent.chmod(0o755)
    assert_one_clear_line(p, parent / "sub", "cannot create the directory", "Permission denied")
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a directory")
    p = start(a_file / "u.db")
    assert_one_clear_line(p, a_file, "not a directory")


def test_damaged_pages_refuse_to_start(tmp_path: Path) -> None:
    """Pages overwritten in the middle of the file, and a file that is no database at all."""
    db = a_store(tmp_path)
    size = db.stat().st_size
    rng = random.Random(4)
    with open(db, "r+b") as fh:
        for page in range(size // 4096 // 3, size // 4096 * 2 // 3, 7):
            fh.seek(page * 4096)
            fh.write(bytes(rng.getrandbits(8) for _ in range(4096)))
    p = start(db)
    assert_one_clear_line(p, db, "damaged", "backup")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is no sqlite file " * 500)
    p = start(junk)
    assert_one_clear_line(p, junk, "damaged")


def test_locked_store_refuses_to_start(tmp_path: Path) -> None:
    db = a_store(tmp_path)
    with locked(db):
        p = start(db, "--store-busy-timeout", "0.5")
    assert_one_clear_line(p, db, "locked", "another process")
    assert "database is locked" in p.stderr


def test_runtime_read_of_a_damaged_page_is_503(tmp_path: Path) -> None:
    """Damaged pages the start-up does not read (raw records three weeks old): reading them
    later answers 503 naming the damage, counted, and the rest of the API goes on."""
    settings = settings_for(tmp_path, record_retention="30d")
    engine, _ = engine_at(settings, T0)
    for b in range(20):
        engine.ingest([rec(T0 - 20 * 86400 + 60 * b + i, request_id=f"old-{b}-{i}", app=f"a{i % 3}") for i in range(300)])
    engine.ingest([rec(T0 - 60 + i, request_id=f"new-{i}") for i in range(5)])
    engine.close()
    conn = sqlite3.connect(settings.db)
    pages = [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name='records' AND pagetype='overflow'")]
    conn.close()
    assert pages, "the old batches should spill into overflow pages"
    with open(settings.db, "r+b") as fh:
        for n in pages:
            fh.seek((n - 1) * 4096)
            fh.write(b"\xfe" * 4096)
    engine, _ = engine_at(settings, T0)                 # restores from the last day: the new batch only
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        r = client.get("/v1/usage/recent", params={"limit": 1000})
        assert r.status_code == 503 and r.json()["reason"] == "corrupt" and "Retry-After" in r.headers
        assert str(settings.db) in r.json()["detail"]
        assert client.get("/healthz").status_code == 200 and client.get("/v1/usage/stats").status_code == 200
    assert engine.store.errors_total >= 1


def test_store_errors_counter_and_kinds(tmp_path: Path) -> None:
    """A failed BEGIN (locked) used to raise from the ROLLBACK and hide the StoreError."""
    settings = settings_for(tmp_path, store_busy_timeout="0")
    engine, _ = engine_at(settings, T0)
    with locked(settings.db):
        for i in range(3):
            with pytest.raises(StoreError) as info:
                engine.ingest([rec(T0 - 5, request_id=f"l{i}")])
            assert info.value.kind == "locked" and "another process holds a write lock" in str(info.value)
    assert engine.store.errors_total == 3
    assert not engine.store._db.in_transaction
    assert engine.ingest([rec(T0 - 5, request_id="l0")]).accepted == 1
    engine.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_over_http(tmp_path: Path) -> None:
    """A real server on a full tmpfs: 503 with reason 'full', acknowledged batches counted
    once, the refused ones counted after a retry once space is back."""
    with small_disk(2) as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here")
        db = disk.path / "u.db"
        with Server(tmp_path, db) as srv:
            t = time.time() - 300
            acked, refused = [], []
            for b in range(3000):
                body = [rec(t, request_id=f"h-{b}-{i}", input_tokens=100 + i, app=f"a{b % 3}") for i in range(40)]
                r = srv.client.post("/v1/records", json=body)
                if r.status_code == 200:
                    acked.append(body)
                else:
                    assert r.status_code == 503 and r.json()["reason"] == "full", r.text
                    assert "Retry-After" in r.headers
                    refused.append(body)
                    if len(refused) >= 3:
                        break
            assert refused, "the disk never filled"
            assert sample_sum(srv.scrape(), "llm_requests_total") == 40 * len(acked)
            disk.grow(64)
            for body in refused:
                assert srv.client.post("/v1/records", json=body).json()["accepted"] == 40
            assert sample_sum(srv.scrape(), "llm_requests_total") == 40 * (len(acked) + len(refused))
