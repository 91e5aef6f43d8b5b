"""Connection hygiene with real sockets against a real server: connections that never finish
their headers or their body are closed, idle ones are reclaimed when connections run
short, oversized headers are refused, and 600 idle sockets under a 256-descriptor limit
no longer starve ingest."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import CLEAN_ENV, Server, exporter_command, rec, sample_sum

FAST = ("--header-timeout", "1", "--body-timeout", "1", "--keep-alive-timeout", "1", "--max-header-bytes", "4096")


def connect(srv: Server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return s


def until_closed(s: socket.socket, limit: float = 10.0) -> tuple[float, bytes]:
    """Seconds until the server closed the socket, and what it sent before."""
    t = time.monotonic()
    data = b""
    s.settimeout(limit)
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    s.close()
    return time.monotonic() - t, data


def closed_now(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except (BlockingIOError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("conn")
    with Server(tmp, tmp / "u.db", *FAST) as s:
        yield s


def test_a_connection_that_sends_nothing_is_closed(srv: Server) -> None:
    waited, data = until_closed(connect(srv))
    assert 0.8 < waited < 5 and data == b""


def test_half_sent_headers_get_408(srv: Server) -> None:
    s = connect(srv)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    waited, data = until_closed(s)
    assert 0.8 < waited < 5 and data.startswith(b"HTTP/1.1 408 ")


def test_headers_dribbled_past_the_timeout_get_408(srv: Server) -> None:
    """The header timeout counts from the first byte, not from the last one."""
    s = connect(srv)
    start = time.monotonic()
    s.sendall(b"GET /healthz HTTP/1.1\r\n")
    for i in range(20):
        try:
            s.sendall(b"X-%d: y\r\n" % i)
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.2)
        if closed_now(s):
            break
    assert time.monotonic() - start < 3


def test_a_stalled_body_is_dropped_and_nothing_counted(srv: Server) -> None:
    before = sample_sum(srv.scrape(), "llm_requests_total")
    body = orjson.dumps([rec(time.time() - 60, request_id="stalled")])
    s = connect(srv)
    s.sendall(b"POST /v1/records HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body[:-5])
    waited, data = until_closed(s)
    assert 0.8 < waited < 5 and data.startswith(b"HTTP/1.1 408 ")
    assert sample_sum(srv.scrape(), "llm_requests_total") == before
    assert srv.client.get("/healthz").status_code == 200


def test_a_slow_but_steady_body_is_accepted(srv: Server) -> None:
    """The body timeout is the longest pause between reads, not a deadline for the body."""
    body = orjson.dumps([rec(time.time() - 60, request_id=f"steady-{i}") for i in range(5)])
    s = connect(srv)
    s.sendall(b"POST /v1/records HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    step = len(body) // 6 + 1
    for i in range(0, len(body), step):
        s.sendall(body[i:i + step])
        time.sleep(0.4)                   # 2.4 s in all, each pause under the 1 s body timeout
    _, data = until_closed(s)
    assert data.startswith(b"HTTP/1.1 200 ") and b'"accepted":5' in data


def test_oversized_headers_get_431(srv: Server) -> None:
    s = connect(srv)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000)
    _, data = until_closed(s)
    assert data.startswith(b"HTTP/1.1 431 ")


def test_idle_keep_alive_connections_are_closed(srv: Server) -> None:
    s = connect(srv)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    waited, data = until_closed(s)
    assert data.startswith(b"HTTP/1.1 200 ") and 0.8 < waited < 5


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_six_hundred_idle_connections_under_a_256_descriptor_limit(tmp_path: Path) -> None:
    """The cap stays below the descriptor limit and reclaims the longest-idle connections:
    ingest and /healthz keep working while 600 sockets sit idle (they used to hold their
    descriptors until ingest got connection resets)."""
    with Server(tmp_path, tmp_path / "u.db", "--header-timeout", "60", prefix=["prlimit", "--nofile=256:256", "--"]) as srv:
        socks = [connect(srv) for _ in range(600)]
        try:
            time.sleep(0.5)
            t = time.time() - 60
            for i in range(5):
                with httpx.Client(base_url=srv.url, timeout=10) as c:
                    r = c.post("/v1/records", json=[rec(t, request_id=f"fd-{i}-{j}") for j in range(10)])
                    assert r.status_code == 200 and r.json()["accepted"] == 10
                    assert c.get("/healthz").status_code == 200
            closed = sum(closed_now(s) for s in socks)
            assert closed >= 600 - 256, closed
            assert sample_sum(srv.scrape(), "llm_requests_total") == 50
        finally:
            for s in socks:
                s.close()
        assert "max_connections lowered" in srv.log_path.read_text()


def test_half_sent_connections_cannot_hold_the_server(tmp_path: Path) -> None:
    """Connections stuck in their headers are not idle, so the cap refuses newcomers (503)
    until the header timeout frees them; then ingest works again by itself."""
    with Server(tmp_path, tmp_path / "u.db", "--max-connections", "50", "--header-timeout", "1") as srv:
        socks = [connect(srv) for _ in range(60)]
        for s in socks:
            s.sendall(b"POST /v1/records HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline and not ok:
            try:
                ok = httpx.get(srv.url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ok
        for s in socks:
            s.close()


def test_limit_concurrency_answers_503(tmp_path: Path) -> None:
    with Server(tmp_path, tmp_path / "u.db", "--limit-concurrency", "4") as srv:
        socks = [connect(srv) for _ in range(6)]
        time.sleep(0.2)
        r = httpx.get(srv.url + "/healthz", timeout=5)
        assert r.status_code == 503
        for s in socks:
            s.close()
        srv.wait_for(lambda: httpx.get(srv.url + "/healthz", timeout=5).status_code == 200)


def test_help_documents_the_connection_knobs() -> None:
    out = subprocess.run(exporter_command() + ["serve", "--help"], capture_output=True, text=True, env=CLEAN_ENV,
                         timeout=60).stdout
    for knob in ("keep_alive_timeout", "header_timeout", "body_timeout", "max_header_bytes", "max_connections",
                 "limit_concurrency", "ingest_queue_bytes", "max_series", "max_errors_listed", "store_busy_timeout",
                 "read_token_file"):
        assert knob in out and f"LLM_EXPORTER_{knob.upper()}" in out, knob
    for flag in ("--keep-alive-timeout", "--header-timeout", "--body-timeout", "--max-connections", "--limit-concurrency"):
        assert flag in out
