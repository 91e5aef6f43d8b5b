"""GET /api/backends: the backend probes' state as Prometheus holds it, per backend.

How query results become the answer (`backend_status`, pure: state, since when, last
error) on crafted results shaped like Prometheus' own; and how the route fails, against
real HTTP servers on 127.0.0.1: no Prometheus configured, one that cannot be reached, one
that answers an error or junk, and a bearer token read from a file. The answer from a real
Prometheus, blackbox exporter and backend is in tests/test_e2e_backends.py.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from helpers import T0, engine_at, settings_for

from exporter.config import ConfigError
from exporter.web.app import create_app
from exporter.web.backends import backend_status, queries

NOW = T0
VLLM = {"job": "llm-backends", "instance": "http://gpu-1:8000/health", "module": "http_health", "backend": "vllm-a",
        "provider": "hosted_vllm", "model": "llama-3.1-8b", "kind": "vllm"}
VLLM_TCP = {**VLLM, "instance": "gpu-1:8000", "module": "tcp_connect"}
OLLAMA = {"job": "llm-backends", "instance": "http://gpu-2:11434/api/version", "module": "http_ollama",
          "backend": "ollama", "provider": "ollama", "kind": "ollama"}
TYPO = {"job": "llm-backends", "instance": "http://gpu-3/health", "module": "http_healthz", "backend": "typo"}


def s(name: str, value: float, **labels: str) -> dict[str, Any]:
    return {"metric": {"__name__": name, **labels}, "value": [NOW, repr(value)]}


def probe(labels: dict[str, str], success: float, consecutive: float, interval: float = 15.0,
          **extra: float) -> list[dict[str, Any]]:
    out = [s("up", 1, **labels), s("probe_success", success, **labels),
           s("instance:probe_failures:consecutive", consecutive, **labels),
           s("instance:probe_interval_seconds:mean1h", interval, **labels)]
    return out + [s(name, v, **labels) for name, v in extra.items()]


def results() -> dict[str, list[dict[str, Any]]]:
    """vllm-a: its HTTP probe has failed 4 times (HTTP 503) since the success at NOW-60, its
    port answers; ollama: up again since the probe after a failure at NOW-300; typo: the
    probe does not run (an unknown module)."""
    return {
        "current": [*probe(VLLM, 0, 4, probe_duration_seconds=0.01, probe_http_status_code=503),
                    *probe(VLLM_TCP, 1, 0, probe_duration_seconds=0.001),
                    *probe(OLLAMA, 1, 0, probe_duration_seconds=0.2, probe_http_status_code=200,
                           probe_ssl_earliest_cert_expiry=NOW + 30 * 86400),
                    s("up", 0, **TYPO)],
        "last_success": [s("instance:probe_success_timestamp_seconds:max1h", NOW - 60, **VLLM),
                         s("instance:probe_success_timestamp_seconds:max1h", NOW, **VLLM_TCP),
                         s("instance:probe_success_timestamp_seconds:max1h", NOW, **OLLAMA)],
        "last_failure": [s("instance:probe_failure_timestamp_seconds:by_reason", NOW, reason="HTTP 503", **VLLM),
                         s("instance:probe_failure_timestamp_seconds:by_reason", NOW - 300, reason="no response",
                           **OLLAMA),
                         # a probe no longer listed: not in the answer
                         s("instance:probe_failure_timestamp_seconds:by_reason", NOW - 900, reason="no response",
                           **{**OLLAMA, "instance": "http://gone/api/version"})],
        "alerts": [{"metric": {"__name__": "ALERTS", "alertname": "LLMBackendDown", "alertstate": "firing",
                               "severity": "critical", **VLLM}, "value": [NOW, "1"]}],
    }


def test_each_backend_with_its_state_since_and_last_error() -> None:
    body = backend_status(results(), NOW, 86400)
    assert (body["down"], body["unknown"], body["up"]) == (1, 1, 1)
    assert [b["backend"] for b in body["backends"]] == ["vllm-a", "typo", "ollama"]   # down first
    vllm, typo, ollama = body["backends"]

    assert vllm["state"] == "down"
    assert vllm["since"] == NOW - 45          # the probe after the last success
    assert (vllm["provider"], vllm["model"], vllm["kind"]) == ("hosted_vllm", "llama-3.1-8b", "vllm")
    assert (vllm["last_error"], vllm["last_error_at"]) == ("HTTP 503", NOW)
    assert vllm["alerts"] == ["LLMBackendDown"]
    http, tcp = vllm["probes"]                # by module
    assert (http["module"], http["state"], http["consecutive_failures"], http["http_status_code"]) == \
        ("http_health", "down", 4, 503)
    assert http["last_success"] == NOW - 60 and http["last_failure_reason"] == "HTTP 503"
    assert (tcp["module"], tcp["state"], tcp["since"], tcp["last_failure"]) == ("tcp_connect", "up", None, None)

    assert ollama["state"] == "up" and ollama["since"] == NOW - 285
    assert (ollama["last_error"], ollama["last_error_at"]) == ("no response", NOW - 300)
    assert ollama["model"] is None and ollama["probes"][0]["cert_expires"] == NOW + 30 * 86400
    assert len(ollama["probes"]) == 1, "a probe no longer listed must not come back from its history"

    assert typo["state"] == "unknown" and typo["since"] is None
    assert "did not run" in typo["probes"][0]["error"]


def test_since_is_unknown_beyond_the_lookback_and_nan_is_no_number() -> None:
    """Down for longer than the lookback: no success to count from, so no `since`; a probe
    too new for a measured interval (NaN) has no failure count yet."""
    r = {"current": probe(VLLM, 0, float("nan"), interval=float("nan")), "last_success": [],
         "last_failure": [s("instance:probe_failure_timestamp_seconds:by_reason", NOW, reason="no response", **VLLM)],
         "alerts": []}
    (b,) = backend_status(r, NOW, 3600)["backends"]
    assert b["state"] == "down" and b["since"] is None
    assert b["probes"][0]["consecutive_failures"] is None and b["probes"][0]["interval_seconds"] is None
    assert json.dumps(b, allow_nan=False)


def test_an_up_backend_is_up_since_its_last_probe_came_back() -> None:
    """Two probes back at different times: the backend is fully up since the later one."""
    r = {"current": [*probe(VLLM, 1, 0), *probe(VLLM_TCP, 1, 0)], "last_success": [],
         "last_failure": [s("instance:probe_failure_timestamp_seconds:by_reason", NOW - 600, reason="HTTP 502", **VLLM),
                          s("instance:probe_failure_timestamp_seconds:by_reason", NOW - 120, reason="connect failed",
                            **VLLM_TCP)], "alerts": []}
    (b,) = backend_status(r, NOW, 3600)["backends"]
    assert b["state"] == "up" and b["since"] == NOW - 105
    assert (b["last_error"], b["last_error_at"]) == ("connect failed", NOW - 120)


def test_the_queries_read_only_the_listed_backends() -> None:
    q = queries("86400s")
    assert all('backend!=""' in expr for expr in q.values())
    assert "[86400s]" in q["last_failure"] and q["last_failure"].startswith("topk by (job, instance, module) (1,")


# --- the route, against real HTTP servers ----------------------------------------------------------

class FakeAnswer:
    """What the HTTP server on 127.0.0.1 answers (`status` and `body`, or `by_query`: the
    body for each PromQL query), and the requests it saw."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body
        self.by_query: dict[str, bytes] = {}
        self.seen: list[tuple[str, str | None]] = []

    def body_for(self, path: str) -> bytes:
        if not self.by_query:
            return self.body
        return self.by_query[urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["query"][0]]


@pytest.fixture
def server() -> Iterator[tuple[str, FakeAnswer]]:
    answer = FakeAnswer(200, b"")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            answer.seen.append((self.path, self.headers.get("Authorization")))
            body = answer.body_for(self.path)
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", answer
    finally:
        httpd.shutdown()
        httpd.server_close()


def client_for(tmp_path: Path, **flags: Any) -> TestClient:
    settings = settings_for(tmp_path, **flags)
    engine, _ = engine_at(settings, T0)
    return TestClient(create_app(settings, engine=engine, background=False))


EMPTY = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()


def test_without_prometheus_the_answer_is_503_naming_the_knob(tmp_path: Path) -> None:
    with client_for(tmp_path) as c:
        r = c.get("/api/backends")
    assert r.status_code == 503
    assert r.json()["reason"] == "not_configured"
    assert "prometheus_url" in r.json()["error"] and "--prometheus-url" in r.json()["error"]


def test_an_unreachable_prometheus_is_503_with_retry_after(tmp_path: Path) -> None:
    with socket.socket() as sock:          # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with client_for(tmp_path, prometheus_url=f"http://127.0.0.1:{port}", prometheus_timeout="2s") as c:
        r = c.get("/api/backends")
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json()["reason"] == "unreachable" and f"127.0.0.1:{port}" in r.json()["error"]


@pytest.mark.parametrize(("status", "body", "says"), [
    (400, json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}).encode(),
     "answered HTTP 400: parse error at char 3"),
    (503, b"Service Unavailable", "answered HTTP 503"),
    (200, b"<html>a login page</html>", "gave no query result"),
    (200, json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}).encode(),
     "gave no query result"),
])
def test_a_prometheus_that_answers_no_result_is_503(tmp_path: Path, server: tuple[str, FakeAnswer], status: int,
                                                    body: bytes, says: str) -> None:
    url, answer = server
    answer.status, answer.body = status, body
    with client_for(tmp_path, prometheus_url=url) as c:
        r = c.get("/api/backends")
    assert r.status_code == 503
    assert r.json()["reason"] == "error" and says in r.json()["error"], r.json()


def test_the_token_file_is_sent_as_bearer_and_read_at_each_request(tmp_path: Path,
                                                                   server: tuple[str, FakeAnswer]) -> None:
    url, answer = server
    answer.body = EMPTY
    token = tmp_path / "prometheus_token"
    token.write_text("first-token\n")
    with client_for(tmp_path, prometheus_url=url + "/", prometheus_token_file=str(token)) as c:
        r = c.get("/api/backends")
        assert r.status_code == 200, r.text
        assert r.json() == {"prometheus": url, "queried_at": r.json()["queried_at"], "lookback_seconds": 86400.0,
                            "down": 0, "unknown": 0, "up": 0, "backends": []}
        token.write_text("second-token\n")
        assert c.get("/api/backends?lookback=2h").status_code == 200
        token.unlink()
        gone = c.get("/api/backends")
    assert {auth for _, auth in answer.seen} == {"Bearer first-token", "Bearer second-token"}
    assert all(path.startswith("/api/v1/query?") for path, _ in answer.seen)
    assert sum("%5B7200s%5D" in path for path, _ in answer.seen) == 2   # lookback=2h: the range of two queries
    assert gone.status_code == 503 and "prometheus_token_file" in gone.json()["error"]


def test_the_answer_is_filtered_by_the_query(tmp_path: Path, server: tuple[str, FakeAnswer]) -> None:
    """The same filters as /api/anomalies, on a Prometheus answer with vllm-a, ollama, typo."""
    url, answer = server
    for name, expr in queries("86400s").items():
        answer.by_query[expr] = json.dumps({"status": "success", "data": {"resultType": "vector",
                                                                          "result": results()[name]}}).encode()
    with client_for(tmp_path, prometheus_url=url) as c:
        assert [b["backend"] for b in c.get("/api/backends").json()["backends"]] == ["vllm-a", "typo", "ollama"]
        assert [b["backend"] for b in c.get("/api/backends?state=down").json()["backends"]] == ["vllm-a"]
        assert [b["backend"] for b in c.get("/api/backends?provider=ollama").json()["backends"]] == ["ollama"]
        assert c.get("/api/backends?backend=nothing").json()["backends"] == []
        assert c.get("/api/backends?state=sideways").status_code == 400
        assert c.get("/api/backends?lookback=soon").status_code == 400
        assert c.get("/api/backends?lookback=10s").status_code == 400


def test_prometheus_url_must_be_an_http_url(tmp_path: Path) -> None:
    for bad in ("prometheus:9090", "ftp://prometheus", "http://p:9090/?x=1"):
        with pytest.raises(ConfigError, match="prometheus_url"):
            settings_for(tmp_path, prometheus_url=bad)
    assert settings_for(tmp_path, prometheus_url="https://p.example/prom/").prometheus_url == "https://p.example/prom"
