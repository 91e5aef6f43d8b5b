"""Tokens guard every data endpoint once configured; probes stay open; read-only tokens read;
odd Authorization headers are a 401, never a 500; loopback is judged on addresses."""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from helpers import T0, Server, engine_at, rec, settings_for

from exporter.web.app import create_app
from exporter.config import ConfigError, is_loopback

READS = ["/", "/api/anomalies", "/api/drift", "/api/runaways", "/api/budgets", "/api/notifications",
         "/v1/usage/stats", "/v1/usage/recent", "/v1/usage/export", "/docs", "/openapi.json", "/nowhere"]
WRITES = ["/v1/records", "/api/alertmanager/webhook"]


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[TestClient, Any]]:
    (tmp_path / "ingest").write_text("ingest-token\n")
    (tmp_path / "read").write_text("# readers\nread-token\n")
    settings = settings_for(tmp_path, auth_token_file=str(tmp_path / "ingest"), read_token_file=str(tmp_path / "read"))
    engine, _ = engine_at(settings, T0)
    engine.ingest([rec(T0 - 60, request_id="secret-request", session_id="secret-session")])
    engine.evaluate(T0)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        yield client, engine


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_data_endpoint_needs_a_token(guarded: tuple[TestClient, Any]) -> None:
    client, _ = guarded
    for path in READS:
        r = client.get(path)
        assert r.status_code == 401, path
        assert "secret" not in r.text
        assert r.headers.get_list("www-authenticate") == ['Bearer realm="llm-usage-exporter"',
                                                          'Basic realm="llm-usage-exporter"']
    for path in WRITES:
        assert client.post(path, json=[rec(T0)]).status_code == 401, path
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200           # open unless protect_metrics


def test_read_only_token_reads_but_cannot_write(guarded: tuple[TestClient, Any]) -> None:
    client, engine = guarded
    for path in READS[:-1]:
        assert client.get(path, headers=bearer("read-token")).status_code == 200, path
    assert "secret-request" in client.get("/v1/usage/export", headers=bearer("read-token")).text
    r = client.post("/v1/records", json=[rec(T0 - 5)], headers=bearer("read-token"))
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    assert client.post("/api/alertmanager/webhook", json={"alerts": []}, headers=bearer("read-token")).status_code == 403
    assert engine.results_total["accepted"] == 1


def test_ingest_token_does_everything(guarded: tuple[TestClient, Any]) -> None:
    client, _ = guarded
    assert client.post("/v1/records", json=[rec(T0 - 5)], headers=bearer("ingest-token")).status_code == 200
    for path in READS[:-1]:
        assert client.get(path, headers=bearer("ingest-token")).status_code == 200, path
    basic = base64.b64encode(b"anyone:ingest-token").decode()       # a browser's login prompt
    assert client.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200


@pytest.mark.parametrize("header", [b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff\xfe", b"Bearer", b"Bearer ",
                                    b"Basic !!!", b"Basic " + base64.b64encode(b"no-colon"), b"Token ingest-token",
                                    b"bearer  ingest-tokenx", b"\x00"])
def test_odd_authorization_headers_are_401(guarded: tuple[TestClient, Any], header: bytes) -> None:
    client, _ = guarded
    r = client.get("/v1/usage/recent", headers=[(b"Authorization", header)])
    assert r.status_code == 401


def test_non_ascii_token_over_a_real_socket(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("t0ken\n")
    with Server(tmp_path, tmp_path / "u.db", env={"LLM_EXPORTER_AUTH_TOKEN_FILE": str(tmp_path / "tokens")}) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/records HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\xc3\xb6ken\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n[]")
        assert s.recv(100).startswith(b"HTTP/1.1 401 ")
        s.close()


def test_protect_metrics_takes_either_kind_of_token(tmp_path: Path) -> None:
    (tmp_path / "ingest").write_text("i\n")
    (tmp_path / "read").write_text("r\n")
    settings = settings_for(tmp_path, auth_token_file=str(tmp_path / "ingest"), read_token_file=str(tmp_path / "read"),
                            protect_metrics=True)
    engine, _ = engine_at(settings, T0)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("r")).status_code == 200
        assert client.get("/metrics", headers=bearer("i")).status_code == 200


def test_read_tokens_alone_are_refused(tmp_path: Path) -> None:
    (tmp_path / "read").write_text("r\n")
    settings = settings_for(tmp_path, read_token_file=str(tmp_path / "read"))
    engine, _ = engine_at(settings, T0)
    with pytest.raises(ConfigError, match="read-only tokens need ingest tokens"):
        create_app(settings, engine=engine, background=False)
    engine.close()


def test_loopback_is_judged_on_resolved_addresses(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.10") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("::")
    with pytest.raises(ConfigError, match="host"):         # a name (.example never resolves), not an address
        settings_for(tmp_path, host="127.attacker.example").check_binding()
    settings_for(tmp_path, host="localhost").check_binding()
    settings_for(tmp_path, host="127.0.0.2").check_binding()
