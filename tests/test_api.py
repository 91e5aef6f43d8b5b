"""The HTTP API (FastAPI TestClient on an engine with a frozen clock): partial batches and
body errors, usage statistics/recent/export, health, anomalies filters, the Alertmanager
webhook and notifications."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from helpers import DAY, HOUR, T0, engine_at, ingest_by_day, rec, settings_for, steady_hour, value

from exporter.storage.usage_stats import usage_statistics
from exporter.web.app import create_app
from exporter.engine import Engine

SERIES = {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Engine]]:
    settings = settings_for(tmp_path, max_body_bytes=20_000)
    engine, _ = engine_at(settings, T0)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        yield client, engine


# --- ingest: partial batches and body errors ------------------------------------------------

def test_partial_array_counts_the_good_and_lists_the_bad(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    body = [rec(T0 - 50, request_id="g1"), {"provider": "openai"}, rec(T0 - 40, input_tokens=-3),
            rec(T0 - 30, request_id="g2"), "not an object", rec(ts="noon"), rec(T0 - 10, request_id="g1")]
    r = client.post("/v1/records", json=body)
    assert r.status_code == 200
    assert r.json() == {
        "accepted": 2, "duplicate": 1, "rejected": 4,
        "errors": [
            {"index": 1, "field": "model", "reason": "is required"},
            {"index": 2, "field": "input_tokens", "reason": "must be between 0 and 1000000000, got -3"},
            {"index": 4, "field": "record", "reason": "must be a JSON object, got str"},
            {"index": 5, "field": "ts", "reason": "is not RFC 3339 or epoch seconds: 'noon'"},
        ],
    }
    assert value(engine, "llm_requests_total", **SERIES) == 2
    assert value(engine, "llm_exporter_records_total", result="rejected") == 4
    assert value(engine, "llm_exporter_records_total", result="duplicate") == 1


def test_partial_ndjson(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    lines = [orjson.dumps(rec(T0 - 30)), b"", b'{"provider": "openai", "model": ', orjson.dumps(rec(T0 - 20, status="boom")),
             orjson.dumps(rec(T0 - 10, latency_ms=250))]
    r = client.post("/v1/records", content=b"\n".join(lines) + b"\n", headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 200
    got = r.json()
    assert (got["accepted"], got["rejected"]) == (2, 2)
    assert [(e["index"], e["field"]) for e in got["errors"]] == [(1, "record"), (2, "status")]   # blank lines skipped
    assert got["errors"][0]["reason"].startswith("malformed JSON on line 3 column")
    assert value(engine, "llm_requests_total", **SERIES) == 2
    assert value(engine, "llm_request_duration_seconds_sum", **SERIES) == pytest.approx(0.25)


def test_single_object(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    r = client.post("/v1/records", json=rec(T0 - 5))
    assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicate": 0, "rejected": 0, "errors": []}


def test_malformed_json_is_400_with_position(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    r = client.post("/v1/records", content=b'[\n  {"provider": "openai", "model": "x"},\n  {"provider": oops}\n]',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    body = r.json()
    assert (body["line"], body["column"]) == (3, 16)
    assert "line 3 column 16" in body["error"]
    assert value(engine, "llm_requests_total", **SERIES) is None
    assert client.post("/v1/records", content=b"   ").status_code == 400


def test_all_bad_batch_is_422(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    r = client.post("/v1/records", json=[{"model": "x"}, {"provider": "p", "model": "m", "cost_usd": "lots"}])
    assert r.status_code == 422
    assert r.json()["accepted"] == 0 and [e["index"] for e in r.json()["errors"]] == [0, 1]
    # all duplicates is not an error: the records are known
    assert client.post("/v1/records", json=[rec(T0 - 1, request_id="d")]).status_code == 200
    r = client.post("/v1/records", json=[rec(T0 - 1, request_id="d")])
    assert r.status_code == 200 and r.json()["duplicate"] == 1


def test_body_over_limit_is_413(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    big = orjson.dumps([rec(T0 - 1, app="a" * 150, request_id=f"big-{i}") for i in range(100)])
    assert len(big) > 20_000
    r = client.post("/v1/records", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes (20000)" in r.json()["error"]

    def chunks() -> Iterator[bytes]:             # no Content-Length: the limit applies while reading
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]
    r = client.post("/v1/records", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert value(engine, "llm_exporter_records_total", result="accepted") == 0
    small = orjson.dumps([rec(T0 - 1)])
    assert client.post("/v1/records", content=small, headers={"Content-Type": "application/json"}).status_code == 200


# --- health ------------------------------------------------------------------------------------

def test_healthz_and_readyz(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and "no evaluation yet" in r.text
    assert client.get("/api/anomalies").status_code == 503
    engine.evaluate()
    assert client.get("/readyz").status_code == 200


# --- usage API ---------------------------------------------------------------------------------

def test_usage_stats_totals_and_percentiles(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0)
    rng = np.random.default_rng(11)
    lat = {"gpt-4o-mini": rng.lognormal(np.log(0.8), 0.4, 600), "claude-3-5-haiku": rng.lognormal(np.log(2.0), 0.3, 400)}
    provider = {"gpt-4o-mini": "openai", "claude-3-5-haiku": "anthropic"}
    items = []
    for model, values in lat.items():
        ts = T0 - 3 * HOUR + np.linspace(0, 3 * HOUR - 10, len(values))
        for i, (t, v) in enumerate(zip(ts, values)):
            items.append(rec(float(t), provider=provider[model], model=model, app=("a", "b")[i % 2], input_tokens=100,
                             output_tokens=20, cost_usd=0.001, latency_s=float(v), ttft_s=float(v) / 4,
                             status=500 if i % 50 == 0 else 200))
    items.append(rec(T0 - 30 * HOUR, model="gpt-4o-mini", cost_usd=5.0))      # outside the default last 24 h
    engine.ingest(items)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        r = client.get("/v1/usage/stats")
        assert r.status_code == 200
        body = r.json()
        assert body["group_by"] == ["provider", "model"] and body["end"] == T0 and body["start"] == T0 - 24 * HOUR
        groups = {g["model"]: g for g in body["groups"]}
        assert set(groups) == {"gpt-4o-mini", "claude-3-5-haiku"}
        for model, values in lat.items():
            g = groups[model]
            assert g["provider"] == provider[model]
            assert g["requests"] == len(values)
            assert g["errors"] == len(values) // 50
            assert g["error_rate"] == pytest.approx(g["errors"] / len(values))
            assert g["cost_usd"] == pytest.approx(0.001 * len(values))
            assert g["tokens"]["input"] == 100 * len(values) and g["tokens"]["output"] == 20 * len(values)
            for q in (50, 95, 99):
                exact = float(np.percentile(values, q, method="inverted_cdf"))
                assert g["latency_s"][f"p{q}"] == pytest.approx(exact, rel=0.03), (model, q)
                assert g["ttft_s"][f"p{q}"] == pytest.approx(exact / 4, rel=0.03), (model, q)
        # a wider range takes the old record in; grouping by app
        r = client.get("/v1/usage/stats", params={"start": T0 - 31 * HOUR, "end": "2023-11-14T22:00:00Z", "group_by": "app"})
        groups = {g["app"]: g for g in r.json()["groups"]}
        assert groups["chat"]["requests"] == 1 and groups["chat"]["cost_usd"] == 5.0
        assert groups["a"]["requests"] + groups["b"]["requests"] == 1000
        assert client.get("/v1/usage/stats", params={"group_by": "user"}).status_code == 400
        assert client.get("/v1/usage/stats", params={"start": "last tuesday"}).status_code == 400
    engine.close()


def test_usage_stats_are_the_same_whatever_the_page_size(tmp_path: Path) -> None:
    """Stats sum pages of sparse buckets; small pages (many partial sums) give the same answer."""
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings)
    rng = np.random.default_rng(5)
    result = engine.ingest([rec(T0 - 20 * HOUR + 37 * i, app=f"app{i % 7}", model=("gpt-4o-mini", "gpt-4o")[i % 2],
                                latency_s=0.2 + float(rng.lognormal(0, 1)), ttft_s=0.1, request_id=f"p{i}")
                            for i in range(1500)])
    assert result.accepted == 1500, result.to_dict()["errors"][:3]
    whole = usage_statistics(engine.store, T0 - DAY, T0, ["app", "model"])
    paged = engine.store.bucket_groups
    engine.store.bucket_groups = functools.partial(paged, rows_per_chunk=3)   # type: ignore[method-assign]
    assert usage_statistics(engine.store, T0 - DAY, T0, ["app", "model"]) == whole
    assert len(whole["groups"]) == 14 and sum(g["requests"] for g in whole["groups"]) == 1500
    engine.close()


def test_usage_recent_and_export(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0)
    engine.ingest([rec(T0 - 600 + 60 * i, request_id=f"r{i}", cost_usd=0.01 * i) for i in range(10)])
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        recent = client.get("/v1/usage/recent", params={"limit": 3}).json()["records"]
        assert [r["request_id"] for r in recent] == ["r9", "r8", "r7"]
        assert client.get("/v1/usage/recent", params={"limit": 0}).status_code == 422
        r = client.get("/v1/usage/export", params={"start": T0 - 480, "end": "2023-11-14T21:55:00Z"})   # [T0-480, T0-300)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        rows = [orjson.loads(line) for line in r.content.splitlines()]
        assert [row["request_id"] for row in rows] == ["r2", "r3", "r4"]
        assert rows[0]["ts"] == T0 - 480 and rows[0]["cost_usd"] == pytest.approx(0.02)
        assert set(rows[0]) >= {"ts", "provider", "model", "app", "input_tokens", "output_tokens", "cost_usd", "request_id"}
        everything = client.get("/v1/usage/export").content.splitlines()
        assert len(everything) == 10
        assert client.get("/v1/usage/export", params={"start": "soon"}).status_code == 400
    engine.close()


def test_record_retention_zero_keeps_no_raw_records(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, record_retention=0)
    engine, _ = engine_at(settings, T0)
    engine.ingest([rec(T0 - 10, request_id="x")])
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        assert client.get("/v1/usage/recent").json()["records"] == []
        assert client.get("/v1/usage/export").content == b""
        assert value(engine, "llm_requests_total", **SERIES) == 1


# --- anomalies ---------------------------------------------------------------------------------

def test_anomalies_filters(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    t = T0 + HOUR - 1
    engine, _ = engine_at(settings, t)

    def traffic(hs: float, rng: np.random.Generator, factor: float = 1.0) -> list[dict[str, Any]]:
        return (steady_hour(hs, rng, app="search", cost=1.0 * factor) +
                steady_hour(hs, rng, app="chat", model="claude-3-5-haiku", provider="anthropic", cost=1.0))
    rng = np.random.default_rng(8)
    history = [d for h in range(8 * 24) for d in traffic(T0 - (8 * 24 - h) * HOUR, rng)]
    ingest_by_day(engine, history + traffic(T0, np.random.default_rng(9), factor=5.0), now=t)
    engine.evaluate(t)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        everything = client.get("/api/anomalies").json()
        assert everything["evaluated_at"] == t
        assert len(everything["anomalies"]) == 7 * (1 + 2 + 2)           # signals x (global, 2 apps, 2 models)
        bad = client.get("/api/anomalies", params={"severity": "warning"}).json()["anomalies"]
        assert {(r["signal"], r["scope"], r["app"], r["model"]) for r in bad} == {
            ("cost_per_hour", "app", "search", None), ("cost_per_hour", "model", None, "gpt-4o-mini"),
            ("cost_per_hour", "global", None, None)}
        high = client.get("/api/anomalies", params={"severity": "high"}).json()["anomalies"]
        assert {(r["scope"], r["severity"]) for r in high} == {("app", "high"), ("model", "high")}
        rows = client.get("/api/anomalies", params={"scope": "app", "app": "search", "signal": "cost_per_hour"}).json()["anomalies"]
        assert len(rows) == 1
        row = rows[0]
        assert row["severity"] == "high" and row["ratio"] == pytest.approx(5.0, rel=0.1)
        assert row["threshold"] == {"warning": 1.5, "high": 3.0} and row["unit"] == "USD" and row["baseline_hours"] == 168
        assert row["explained_by"] is None
        # the model and global rows are the same cause, seen from wider scopes: they say so
        echoes = {(r["scope"], r["explained_by"]) for r in bad if r["scope"] != "app"}
        assert echoes == {("model", "app=search"), ("global", "app=search")}
        rows = client.get("/api/anomalies", params={"model": "claude-3-5-haiku"}).json()["anomalies"]
        assert len(rows) == 7 and {r["severity"] for r in rows} == {"ok"} and {r["provider"] for r in rows} == {"anthropic"}
        assert client.get("/api/anomalies", params={"scope": "model", "provider": "openai"}).json()["anomalies"][0]["model"] == "gpt-4o-mini"
        assert client.get("/api/anomalies", params={"severity": "critical"}).status_code == 400
    engine.close()


# --- webhook and notifications -------------------------------------------------------------------

ALERTMANAGER_PAYLOAD = {
    "version": "4", "status": "firing", "receiver": "exporter", "groupKey": "{}:{alertname=\"LLMCostSpike\"}",
    "groupLabels": {"alertname": "LLMCostSpike"}, "commonLabels": {"alertname": "LLMCostSpike", "severity": "critical"},
    "commonAnnotations": {"summary": "LLM cost spike"}, "externalURL": "http://alertmanager:9093",
    "alerts": [
        {"status": "firing", "labels": {"alertname": "LLMCostSpike", "app": "search", "severity": "critical"},
         "annotations": {"summary": "LLM cost spike", "description": "cost $5.00/h vs $1.00/h"},
         "startsAt": "2023-11-14T22:30:00Z", "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "abc123",
         "generatorURL": "http://prometheus/graph"},
        {"status": "resolved", "labels": {"alertname": "LLMCostSpike", "app": "chat"}, "annotations": {},
         "startsAt": "2023-11-14T20:00:00Z", "endsAt": "2023-11-14T21:00:00Z", "fingerprint": "def456"},
    ],
}


def test_alertmanager_webhook_then_notifications(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    assert client.get("/api/notifications").json() == []
    r = client.post("/api/alertmanager/webhook", json=ALERTMANAGER_PAYLOAD)
    assert r.status_code == 200 and r.json() == {"stored": 2}
    client.post("/api/alertmanager/webhook", json={**ALERTMANAGER_PAYLOAD, "status": "resolved", "alerts": []})
    got = client.get("/api/notifications").json()
    assert [n["status"] for n in got] == ["resolved", "firing"]            # newest first
    first = got[1]
    assert first["receiver"] == "exporter" and first["commonLabels"]["alertname"] == "LLMCostSpike"
    assert [a["fingerprint"] for a in first["alerts"]] == ["abc123", "def456"]
    assert first["alerts"][0]["annotations"]["description"] == "cost $5.00/h vs $1.00/h"
    assert "generatorURL" not in first["alerts"][0] and isinstance(first["received_at"], float)
    assert len(client.get("/api/notifications", params={"limit": 1}).json()) == 1
    assert client.post("/api/alertmanager/webhook", content=b"{nope").status_code == 400
    assert client.post("/api/alertmanager/webhook", json={"status": "firing"}).status_code == 400


def test_pretty_printed_object_without_json_content_type(api: tuple[TestClient, Engine]) -> None:
    """`curl -d @record.json` sends a form content type; a pretty-printed object is still one
    JSON document, not NDJSON (which never parses as a single document)."""
    client, engine = api
    body = orjson.dumps(rec(T0 - 5, request_id="pretty"), option=orjson.OPT_INDENT_2)
    assert body.count(b"\n") > 3
    r = client.post("/v1/records", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    nd = orjson.dumps(rec(T0 - 4)) + b"\n" + orjson.dumps(rec(T0 - 3)) + b"\n"
    assert client.post("/v1/records", content=nd).json()["accepted"] == 2     # real NDJSON still NDJSON
    assert value(engine, "llm_requests_total", **SERIES) == 3


def test_future_dated_records_are_rejected_by_index(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    r = client.post("/v1/records", json=[rec(T0 - 5), rec(T0 + 3 * HOUR), rec(1_699_999_200_000_000)])
    assert r.status_code == 200
    errors = r.json()["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "ts"), (2, "ts")]
    assert errors[0]["reason"].startswith("is 3 h ahead of the exporter's clock")
    assert value(engine, "llm_requests_total", **SERIES) == 1
