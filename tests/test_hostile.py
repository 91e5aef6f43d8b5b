"""Hostile and odd input against a real server: junk and huge bodies cost bounded memory and
never stall the other endpoints; event times outside the accepted range, endless tool-call
lists and absurd query ranges get a precise 4xx; gzip bodies are accepted within the size
limit; a full ingest queue answers 429."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from faults import locked
from helpers import HOUR, T0, Server, engine_at, rec, sample_sum, settings_for, value

from exporter.web.app import create_app

MIB = 1024 * 1024
SERIES = {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class Prober:
    """GETs `path` over and over on its own connection while a slow request runs; records
    each answer's latency and whether it came while the slow request was still in flight."""

    def __init__(self, url: str, path: str) -> None:
        self.url, self.path = url, path
        self.latencies: list[float] = []
        self.during = 0
        self.slow_s = 0.0
        self.busy = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.done.is_set():
                t = time.perf_counter()
                assert c.get(self.path).status_code == 200
                self.latencies.append(time.perf_counter() - t)
                if self.busy.is_set():
                    self.during += 1
                time.sleep(0.01)

    def around(self, slow: Callable[[], Any]) -> Any:
        self.thread.start()
        time.sleep(0.1)
        self.busy.set()
        t = time.perf_counter()
        try:
            return slow()
        finally:
            self.slow_s = time.perf_counter() - t
            self.busy.clear()
            self.done.set()
            self.thread.join(timeout=60)

    def assert_not_held_up(self) -> None:
        """Answers came while the slow request ran, none waiting a large part of it (when
        ingest ran on the event loop, one probe waited for all of it). Relative, so that a
        loaded machine slowing both does not fail it."""
        assert self.during > 0, "no answer arrived while the slow request ran"
        assert max(self.latencies) < 0.5 * self.slow_s, (self.slow_s, sorted(self.latencies)[-5:])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("hostile")
    with Server(tmp, tmp / "u.db") as srv:
        yield srv


def test_sixteen_mib_of_junk_lines(server: Server) -> None:
    """`x\\n` x 8M: every line rejected and counted, the first 100 listed with their line, the
    answer a few kilobytes, the server's peak memory a small multiple of the body, and
    /healthz answering all the while (it used to freeze the server for a minute and peak
    at 5.7 GB)."""
    before = peak_rss_mb(server.proc.pid)
    body = b"x\n" * (8 * MIB - 1)
    probe = Prober(server.url, "/healthz")
    r = probe.around(lambda: server.client.post("/v1/records", content=body, timeout=300,
                                                headers={"Content-Type": "application/x-ndjson"}))
    assert r.status_code == 422
    got = r.json()
    assert got["rejected"] == 8 * MIB - 1 and got["accepted"] == 0
    assert len(got["errors"]) == 100 and got["errors_omitted"] == 8 * MIB - 1 - 100
    assert got["errors"][99] == {"index": 99, "field": "record",
                                 "reason": "malformed JSON on line 100 column 1: unexpected character, expected a JSON value"}
    assert len(r.content) < 20_000
    grew = peak_rss_mb(server.proc.pid) - max(before, 0)
    assert grew < 300, f"peak RSS grew by {grew:.0f} MB for a 16 MiB body"
    probe.assert_not_held_up()
    assert sample_sum(server.scrape(), "llm_exporter_records_total", result="rejected") >= 8 * MIB - 1


def test_sixteen_mib_of_empty_objects_and_of_numbers(server: Server) -> None:
    """Arrays of millions of items that are not records: counted, listed up to 100, bounded."""
    for body, field, reason in ((b"[" + b"{}," * (16 * MIB // 3 - 2) + b"{}]", "provider", "is required"),
                                (b"[" + b"1," * (8 * MIB - 2) + b"1]", "record", "must be a JSON object, got int")):
        r = server.client.post("/v1/records", content=body, timeout=300, headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        got = r.json()
        assert got["rejected"] == body.count(b",") + 1 and len(got["errors"]) == 100
        assert got["errors"][0] == {"index": 0, "field": field, "reason": reason}
    assert peak_rss_mb(server.proc.pid) < 1024


def test_a_valid_sixteen_mib_batch_does_not_block_the_other_endpoints(server: Server) -> None:
    """Ingest runs on the ingest worker: /healthz and /metrics answer while a 16 MiB batch
    is being ingested (they used to wait for all of it)."""
    t = time.time() - 100
    lines, size, i = [], 0, 0
    while size < 16 * MIB - 400:
        line = orjson.dumps(rec(t, request_id=f"valid-{i}", app=f"a{i % 5}", latency_s=0.5, session_id=f"s{i % 300}"))
        lines.append(line)
        size += len(line) + 1
        i += 1
    body = b"[" + b",".join(lines[:-1]) + b"]"
    assert 15 * MIB < len(body) <= 16 * MIB
    health, scrape = Prober(server.url, "/healthz"), Prober(server.url, "/metrics")
    scrape.thread.start()
    r = health.around(lambda: server.client.post("/v1/records", content=body, timeout=300,
                                                 headers={"Content-Type": "application/json"}))
    scrape.done.set()
    scrape.thread.join(timeout=60)
    assert r.status_code == 200 and r.json()["accepted"] == len(lines) - 1
    health.assert_not_held_up()
    assert len(scrape.latencies) > 0 and max(scrape.latencies) < health.slow_s, scrape.latencies


def test_gzip_and_deflate_bodies(server: Server) -> None:
    t = time.time() - 60
    batch = [rec(t, request_id=f"gz-{i}", app="gzip") for i in range(50)]
    raw = orjson.dumps(batch)
    r = server.client.post("/v1/records", content=gzip.compress(raw),
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == 50
    nd = b"\n".join(orjson.dumps(rec(t, request_id=f"df-{i}", app="gzip")) for i in range(20))
    r = server.client.post("/v1/records", content=zlib.compress(nd),
                           headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "deflate"})
    assert r.status_code == 200 and r.json()["accepted"] == 20
    bomb = gzip.compress(b"[" + b" " * (64 * MIB) + b"]")           # 64 MiB of spaces in about 64 KB
    assert len(bomb) < 100_000
    r = server.client.post("/v1/records", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "once decompressed" in r.json()["error"]
    r = server.client.post("/v1/records", content=raw[:100], headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    r = server.client.post("/v1/records", content=raw, headers={"Content-Encoding": "br"})
    assert r.status_code == 415 and "gzip" in r.json()["error"]
    assert sample_sum(server.scrape(), "llm_requests_total", app="gzip") == 70


def test_event_times_outside_the_accepted_range(tmp_path: Path) -> None:
    """Go's zero time, other pre-1970 times and extreme offsets: that record is rejected with
    a reason, the rest are kept, and counters do not go backwards after a restart."""
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0)
    bad = ["0001-01-01T00:00:00Z", "0001-01-01T00:00:00+05:00", "1969-12-31T23:59:59Z", -1,
           "2023-11-14T22:00:00+25:00", "9999-12-31T23:59:59-23:59", 1e300, "nan"]
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        body = [rec(T0 - 60, request_id="ok-1")] + [rec(ts, request_id=f"bad-{i}") for i, ts in enumerate(bad)] + \
               [rec(T0 - 30, request_id="ok-2")]
        r = client.post("/v1/records", json=body)
        assert r.status_code == 200
        got = r.json()
        assert got["accepted"] == 2 and got["rejected"] == len(bad)
        assert [e["index"] for e in got["errors"]] == list(range(1, len(bad) + 1))
        assert all(e["field"] == "ts" for e in got["errors"])
        assert "between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z" in got["errors"][0]["reason"]
        stats = client.get("/v1/usage/stats", params={"start": 0, "group_by": "app"}).json()
        assert stats["start"] == 0 and sum(g["requests"] for g in stats["groups"]) == 2
    before = value(engine, "llm_requests_total", **SERIES)
    engine.close()
    again, _ = engine_at(settings, T0)
    assert value(again, "llm_requests_total", **SERIES) == before == 2
    again.close()


def test_stats_and_export_ranges(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0)
    engine.ingest([rec(T0 - 60)])
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        for params in ({"start": 0, "end": "1e300"}, {"start": "-5"}, {"end": "0001-01-01T00:00:00Z"},
                       {"start": T0, "end": T0 - HOUR}, {"start": "inf"}):
            r = client.get("/v1/usage/stats", params=params)
            assert r.status_code == 400, (params, r.text)
        assert client.get("/v1/usage/export", params={"end": "1e300"}).status_code == 400
        assert client.get("/v1/usage/stats", params={"start": 0, "end": "9999-12-31T23:59:59Z"}).status_code == 200
    engine.close()


def test_tool_call_lists_are_bounded_per_record(tmp_path: Path) -> None:
    """1.2 million tool-call names: the count is kept, the names are capped, so the store,
    /v1/usage/recent and a restart stay small."""
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0)
    names = [f"t{i % 50}" for i in range(1_200_000)]
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        r = client.post("/v1/records", json=[rec(T0 - 10, tool_calls=names, request_id="tools", session_id="s"),
                                             rec(T0 - 9, tool_calls=["search", "x" * 500], request_id="two")])
        assert r.status_code == 200 and r.json()["accepted"] == 2
        two, many = client.get("/v1/usage/recent").json()["records"]
        assert many["tool_calls"] == 1_200_000                       # more calls than names kept: the count
        assert two["tool_calls"] == ["search", "x" * 64]            # names kept, each at most 64 characters
        assert len(orjson.dumps(many)) < 1000
    assert Path(settings.db).stat().st_size < 2 * MIB
    engine.close()


def test_a_full_ingest_queue_answers_429(tmp_path: Path) -> None:
    """The worker is stuck on a locked store; a second body finds no room: 429 with
    Retry-After, counted, nothing ingested; the first is answered 503 once the lock
    times out, and both succeed when sent again."""
    db = tmp_path / "u.db"
    with Server(tmp_path, db, "--ingest-queue-bytes", "2000", "--store-busy-timeout", "3") as srv:
        t = time.time() - 60
        first = orjson.dumps([rec(t, request_id=f"q1-{i}") for i in range(10)])
        second = orjson.dumps([rec(t, request_id=f"q2-{i}") for i in range(10)])
        assert 1000 < len(first) < 2000 and 1000 < len(second) < 2000
        results: dict[str, httpx.Response] = {}
        with locked(db):
            th = threading.Thread(target=lambda: results.update(
                first=httpx.post(srv.url + "/v1/records", content=first, timeout=30,
                                 headers={"Content-Type": "application/json"})))
            th.start()
            srv.wait_for(lambda: sample_sum(srv.scrape(), "llm_exporter_ingest_queue_bytes") > 0)
            r = srv.client.post("/v1/records", content=second, headers={"Content-Type": "application/json"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
            assert srv.client.get("/healthz").status_code == 200
            th.join(timeout=30)
        assert results["first"].status_code == 503
        samples = srv.scrape()
        assert sample_sum(samples, "llm_exporter_ingest_throttled_total") == 1
        assert sample_sum(samples, "llm_requests_total") == 0
        for body in (first, second):
            r = srv.client.post("/v1/records", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 200 and r.json()["accepted"] == 10
        assert sample_sum(srv.scrape(), "llm_requests_total") == 20
