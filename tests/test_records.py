"""Record format: validation of every field, aliases, status codes, tool calls, and the
promise that prompt/completion text is never stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from helpers import T0, engine_at, settings_for

from exporter.web.app import create_app
from exporter.ingest.bodies import BodyError, decode_body
from exporter.ingest.records import MAX_TEXT, MAX_TOKENS, RecordError, parse_items, parse_record, parse_ts

BASE = {"provider": "openai", "model": "gpt-4o-mini"}
NOW = T0 + 123.0


def parse(**fields: Any):
    return parse_record({**BASE, **fields}, NOW)


def reject(raw: dict[str, Any]) -> RecordError:
    with pytest.raises(RecordError) as info:
        parse_record(raw, NOW)
    return info.value


# --- required fields and defaults ---------------------------------------------------------

def test_minimal_record_gets_defaults() -> None:
    r = parse_record({"provider": " OpenAI ", "model": " GPT-4o-Mini "}, NOW)
    assert (r.provider, r.model) == ("openai", "gpt-4o-mini")       # trimmed and lower-cased
    assert r.ts == NOW                                                # arrival time by default
    assert (r.app, r.operation, r.status, r.error_type) == ("unknown", "chat", "ok", None)
    assert (r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, r.reasoning_tokens) == (0, 0, 0, 0, 0)
    assert r.cost_usd is None and r.latency_s is None and r.ttft_s is None
    assert r.stream is False and r.tool_calls == 0 and r.tool_names == ()


@pytest.mark.parametrize("missing", ["provider", "model"])
@pytest.mark.parametrize("blank", [None, "", "   "])
def test_provider_and_model_are_required(missing: str, blank: Any) -> None:
    raw = dict(BASE)
    if blank is None:
        del raw[missing]
    else:
        raw[missing] = blank
    e = reject(raw)
    assert e.field == missing and e.message == "is required"


def test_app_keeps_its_case_but_is_trimmed() -> None:
    assert parse(app="  Support-Bot ").app == "Support-Bot"


# --- per-field validation: the error names the field and says why --------------------------

@pytest.mark.parametrize("field,bad,reason", [
    ("provider", ["openai"], "must be a string, got list"),
    ("model", {"name": "x"}, "must be a string, got dict"),
    ("app", True, "must be a string, got bool"),
    ("app", "x" * (MAX_TEXT + 1), f"is longer than {MAX_TEXT} characters"),
    ("session_id", "s" * (MAX_TEXT + 1), f"is longer than {MAX_TEXT} characters"),
    ("request_id", [1], "must be a string, got list"),
    ("operation", {"op": 1}, "must be a string, got dict"),
    ("input_tokens", "many", "must be a whole number, got 'many'"),
    ("input_tokens", 1.5, "must be a whole number, got 1.5"),
    ("output_tokens", -1, f"must be between 0 and {MAX_TOKENS}, got -1"),
    ("output_tokens", True, "must be a whole number, got a boolean"),
    ("cache_read_tokens", MAX_TOKENS + 1, f"must be between 0 and {MAX_TOKENS}, got {MAX_TOKENS + 1}"),
    ("cache_write_tokens", float("nan"), "must be a whole number, got nan"),
    ("reasoning_tokens", [3], "must be a whole number, got [3]"),
    ("cost_usd", -0.01, "must be between 0 and 1e+06, got -0.01"),
    ("cost_usd", "free", "must be a number, got 'free'"),
    ("cost_usd", False, "must be a number, got a boolean"),
    ("latency_s", float("inf"), "must be between 0 and 86400, got inf"),
    ("latency_s", 86401, "must be between 0 and 86400, got 86401"),
    ("ttft_s", "soon", "must be a number, got 'soon'"),
    ("stream", "maybe", "must be true or false, got 'maybe'"),
    ("batch", "sometimes", "must be true or false, got 'sometimes'"),
    ("service_tier", ["flex"], "must be a string, got list"),
    ("cache_write_1h_tokens", -1, f"must be between 0 and {MAX_TOKENS}, got -1"),
    ("cache_write_1h_tokens", 5, "(5) is part of cache_write_tokens (0) and cannot exceed it"),
    ("request_had_tools", 2, "must be true or false, got 2"),
    ("status", "exploded", "must be 'ok', 'error' or an HTTP status code, got 'exploded'"),
    ("status", True, "must be a string, got bool"),
    ("tool_calls", [1, 2], "must be a count or a list of tool names / call objects"),
    ("tool_calls", -2, f"must be between 0 and {MAX_TOKENS}, got -2"),
    ("ts", "yesterday", "is not RFC 3339 or epoch seconds: 'yesterday'"),
    ("ts", -5, "must be a non-negative epoch time, got -5"),
    ("ts", True, "must be RFC 3339 text or epoch seconds, got a boolean"),
    ("ts", [T0], "must be RFC 3339 text or epoch seconds, got list"),
])
def test_field_validation_names_field_and_reason(field: str, bad: Any, reason: str) -> None:
    e = reject({**BASE, field: bad})
    assert e.field == field
    assert e.message == reason
    assert str(e) == f"{field}: {reason}"


def test_ttft_may_not_exceed_latency() -> None:
    e = reject({**BASE, "latency_s": 1.0, "ttft_s": 2.0})
    assert e.field == "ttft_s" and "exceeds latency_s" in e.message
    assert parse(latency_s=1.0, ttft_s=1.0).ttft_s == 1.0           # equal is fine


def test_non_object_items_are_rejected() -> None:
    for item in (1, "text", None, [BASE]):
        e = reject(item)  # type: ignore[arg-type]
        assert e.field == "record" and e.message.startswith("must be a JSON object")


@pytest.mark.parametrize("given,expected", [
    (1_699_999_200, 1_699_999_200.0),
    ("1699999200.5", 1_699_999_200.5),
    (1_699_999_200_000, 1_699_999_200.0),                  # milliseconds
    ("2023-11-14T22:00:00Z", 1_699_999_200.0),
    ("2023-11-14T22:00:00z", 1_699_999_200.0),
    ("2023-11-14T23:00:00+01:00", 1_699_999_200.0),
    ("2023-11-14T22:00:00", 1_699_999_200.0),              # naive text is UTC
    ("2023-11-14T22:00:00.250Z", 1_699_999_200.25),
])
def test_timestamps(given: Any, expected: float) -> None:
    assert parse_ts(given, 0.0) == pytest.approx(expected)
    assert parse(ts=given).ts == pytest.approx(expected)


def test_numeric_strings_and_booleans_are_coerced() -> None:
    r = parse(input_tokens="1200", output_tokens=3e2, cost_usd="0.5", latency_s="2", stream="yes", request_had_tools=1)
    assert (r.input_tokens, r.output_tokens, r.cost_usd, r.latency_s) == (1200, 300, 0.5, 2.0)
    assert r.stream is True and r.request_had_tools is True
    assert parse(stream="false").stream is False
    assert parse(ttft_s=0.2, latency_s=1).stream is True        # a TTFT implies streaming


# --- aliases ------------------------------------------------------------------------------

def test_openai_usage_block() -> None:
    r = parse_record({"model": "gpt-4o", "custom_llm_provider": "openai", "id": "chatcmpl-1",
                      "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}}, NOW)
    assert (r.provider, r.model, r.input_tokens, r.output_tokens, r.request_id) == ("openai", "gpt-4o", 120, 30, "chatcmpl-1")


def test_anthropic_usage_block_with_cache_tokens() -> None:
    r = parse_record({"provider": "anthropic", "model": "claude-sonnet-4",
                      "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 700,
                                "cache_creation_input_tokens": 90}}, NOW)
    assert (r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens) == (10, 5, 700, 90)


def test_anthropic_cache_lifetimes_and_service_tier() -> None:
    """Anthropic reports one-hour cache writes in usage.cache_creation and the tier in usage.service_tier."""
    r = parse_record({"provider": "anthropic", "model": "claude-sonnet-4-5",
                      "usage": {"input_tokens": 10, "cache_creation_input_tokens": 90, "service_tier": "Priority",
                                "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 60}}}, NOW)
    assert (r.cache_write_tokens, r.cache_write_1h_tokens, r.service_tier, r.batch) == (90, 60, "priority", False)
    assert parse(service_tier="flex", batch=True).batch is True
    assert parse().service_tier is None


def test_otel_genai_attribute_names() -> None:
    r = parse_record({
        "gen_ai.provider.name": "AWS.Bedrock", "gen_ai.request.model": "Claude-3-5-Haiku",
        "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 7, "error.type": "timeout",
        "gen_ai.conversation.id": "conv-9", "gen_ai.operation.name": "Chat",
        "gen_ai.response.finish_reasons": ["length", "stop"],
    }, NOW)
    assert (r.provider, r.model, r.input_tokens, r.output_tokens) == ("aws.bedrock", "claude-3-5-haiku", 11, 7)
    assert (r.status, r.error_type, r.session_id, r.operation, r.stop_reason) == ("error", "timeout", "conv-9", "chat", "length")


def test_litellm_spend_log_names() -> None:
    r = parse_record({"custom_llm_provider": "azure", "model": "gpt-4o", "spend": 0.0123, "startTime": "2023-11-14T22:00:00Z",
                      "team": "search", "call_id": "abc"}, NOW)
    assert (r.provider, r.cost_usd, r.ts, r.app, r.request_id) == ("azure", 0.0123, T0, "search", "abc")


def test_milliseconds_fields() -> None:
    r = parse(latency_ms=1500, ttft_ms="250")
    assert r.latency_s == pytest.approx(1.5) and r.ttft_s == pytest.approx(0.25) and r.stream
    assert parse(duration_ms=800).latency_s == pytest.approx(0.8)
    e = reject({**BASE, "latency_ms": "slow"})
    assert e.field == "latency_ms" and e.message == "must be a number, got 'slow'"


def test_our_own_names_win_over_aliases() -> None:
    r = parse_record({**BASE, "input_tokens": 5, "prompt_tokens": 999, "cost_usd": 0.1, "cost": 9.0,
                      "latency_ms": 9000, "latency_s": 1.0, "usage": {"prompt_tokens": 777}}, NOW)
    assert (r.input_tokens, r.cost_usd, r.latency_s) == (5, 0.1, 1.0)


# --- status and error types ---------------------------------------------------------------

@pytest.mark.parametrize("status,error_type,expected", [
    (None, None, ("ok", None)),
    (200, None, ("ok", None)),
    (201, "timeout", ("ok", None)),             # a success status wins over a stray error_type
    (302, None, ("ok", None)),
    (429, None, ("error", "rate_limit")),
    ("429", None, ("error", "rate_limit")),
    (408, None, ("error", "timeout")),
    (504, None, ("error", "timeout")),
    (500, None, ("error", "server_error")),
    (503, None, ("error", "server_error")),
    (400, None, ("error", "client_error")),
    (404, None, ("error", "client_error")),
    (400, "content_filter", ("error", "content_filter")),   # an explicit type beats the code's
    ("error", None, ("error", "other")),
    ("FAILED", "Rate_Limited", ("error", "rate_limit")),
    ("success", None, ("ok", None)),
    (None, "throttled", ("error", "rate_limit")),
    (None, "overloaded", ("error", "server_error")),
    (None, "deadline_exceeded", ("error", "timeout")),
    (None, "safety", ("error", "content_filter")),
    (None, "something odd", ("error", "other")),
])
def test_status_codes_map_to_error_type(status: Any, error_type: Any, expected: tuple[str, str | None]) -> None:
    fields: dict[str, Any] = {}
    if status is not None:
        fields["status"] = status
    if error_type is not None:
        fields["error_type"] = error_type
    r = parse(**fields)
    assert (r.status, r.error_type) == expected
    assert r.is_error == (expected[0] == "error")


# --- tool calls ---------------------------------------------------------------------------

def test_tool_calls_list_keeps_names_only() -> None:
    r = parse(tool_calls=[
        {"id": "call_1", "type": "function", "function": {"name": "search_web", "arguments": '{"q": "my secret question"}'}},
        {"name": "read_file", "input": {"path": "/etc/passwd"}},
        "run_tests",
        {"type": "function", "function": {"arguments": "{}"}},
    ])
    assert r.tool_calls == 4
    assert r.tool_names == ("search_web", "read_file", "run_tests", "?")
    assert r.request_had_tools is True
    stored = orjson.dumps(r.to_dict())
    assert b"secret" not in stored and b"passwd" not in stored and b"arguments" not in stored


def test_tool_calls_count_and_long_names() -> None:
    assert parse(tool_calls=3).tool_calls == 3 and parse(tool_calls=3).tool_names == ()
    assert parse(tool_calls="2").tool_calls == 2
    assert parse(tool_calls=[]).tool_calls == 0 and parse(tool_calls=[]).request_had_tools is False
    assert parse(tool_calls=["x" * 500]).tool_names == ("x" * 64,)


# --- bodies -------------------------------------------------------------------------------

def test_decode_body_shapes() -> None:
    assert decode_body(orjson.dumps(BASE)).items == [BASE]
    assert decode_body(orjson.dumps([BASE, BASE])).items == [BASE, BASE]
    nd = b'{"provider":"a","model":"m"}\n\n{"provider":"b","model":"m"}\n'
    assert [d["provider"] for d in decode_body(nd, "application/x-ndjson").items] == ["a", "b"]
    assert [d["provider"] for d in decode_body(nd).items] == ["a", "b"]          # several lines, no type: NDJSON
    assert decode_body(nd).indices == [0, 1]                                        # blank lines are not numbered
    # a pretty-printed array is one JSON document, not NDJSON
    assert decode_body(orjson.dumps([BASE], option=orjson.OPT_INDENT_2)).items == [BASE]


def test_decode_body_errors() -> None:
    with pytest.raises(BodyError) as info:
        decode_body(b'[{"provider": "openai",\n  "model": }]', "application/json")
    assert (info.value.line, info.value.column) == (2, 12)
    assert "line 2 column 12" in str(info.value)
    with pytest.raises(BodyError, match="empty body"):
        decode_body(b"  \n ")
    decoded = decode_body(b'{"provider":"a","model":"m"}\n{oops\n', "application/x-ndjson")
    assert decoded.indices == [0] and decoded.rejections.total == 1
    (bad,) = decoded.rejections
    assert bad.index == 1 and "line 2" in bad.reason


def test_parse_items_reports_each_bad_index() -> None:
    items = [{**BASE}, {"model": "m"}, {**BASE, "input_tokens": "lots"}, 7, {**BASE, "ts": T0}]
    good, bad, idx = parse_items(items, NOW)
    assert idx == [0, 4] and len(good) == 2
    assert [(b.index, b.field) for b in bad] == [(1, "provider"), (2, "input_tokens"), (3, "record")]


# --- no text is ever stored ----------------------------------------------------------------

SECRETS = ("PROMPT-SECRET-7f3a", "COMPLETION-SECRET-91bc", "MESSAGE-SECRET-55de", "SYSTEM-SECRET-0c1e", "ARGS-SECRET-aa12")


def test_prompt_and_completion_text_is_never_stored(tmp_path: Path) -> None:
    """Post records carrying prompts, messages, completions and tool arguments, then look for
    that text in every byte of the SQLite files and in the export and recent endpoints."""
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0 + 600)
    record = {
        **BASE, "ts": T0 + 60, "app": "chat", "request_id": "no-text-1", "input_tokens": 12, "output_tokens": 4,
        "prompt": SECRETS[0], "completion": SECRETS[1],
        "messages": [{"role": "system", "content": SECRETS[3]}, {"role": "user", "content": SECRETS[2]}],
        "choices": [{"message": {"role": "assistant", "content": SECRETS[1]}}],
        "tool_calls": [{"id": "c1", "function": {"name": "lookup", "arguments": SECRETS[4]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "prompt": SECRETS[0]},
        "metadata": {"note": SECRETS[2]},
    }
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        r = client.post("/v1/records", json=[record, {**record, "request_id": "no-text-2", "ts": T0 + 120}])
        assert r.status_code == 200 and r.json()["accepted"] == 2
        export = client.get("/v1/usage/export", params={"start": T0, "end": T0 + 3600})
        recent = client.get("/v1/usage/recent")
        rows = [orjson.loads(line) for line in export.content.splitlines()]
        assert [row["request_id"] for row in rows] == ["no-text-1", "no-text-2"]   # the records are there...
        assert rows[0]["tool_calls"] == ["lookup"]     # names only, in the input format (replayable)
        assert len(recent.json()["records"]) == 2
        db_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("usage.db*"))   # db, -wal, -shm while open
        assert b"no-text-1" in db_bytes                                           # ...and stored
        for secret in SECRETS:
            assert secret.encode() not in export.content
            assert secret.encode() not in recent.content
            assert secret.encode() not in db_bytes
    after_close = b"".join(p.read_bytes() for p in tmp_path.glob("usage.db*"))
    assert b"no-text-2" in after_close
    for secret in SECRETS:
        assert secret.encode() not in after_close



def test_ndjson_numbering_across_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """NDJSON is decoded in slices; record numbers and line numbers run on across them, and
    only the first max_errors rejections are explained."""
    import exporter.ingest.bodies as bodies
    body = (b'{"provider":"a","model":"m"}\n\nbad line\n  \n{"x":\n5\n{"provider":"b","model":"m"}\r\n'
            b'  {"provider":"c","model":"m"}\nlast bad')
    whole = decode_body(body, "application/x-ndjson")
    monkeypatch.setattr(bodies, "NDJSON_SLICE", 16)
    sliced = decode_body(body, "application/x-ndjson")
    for d in (whole, sliced):
        assert d.indices == [0, 4, 5] and [x["provider"] for x in d.items] == ["a", "b", "c"]
        assert [(r.index, r.reason.split(":")[0]) for r in d.rejections] == [
            (1, "malformed JSON on line 3 column 1"), (2, "malformed JSON on line 5 column 6"),
            (3, "must be a JSON object, got int"), (6, "malformed JSON on line 9 column 1")]
    capped = decode_body(b"x\n" * 1000, "application/x-ndjson", max_errors=3)
    assert capped.rejections.total == 1000 and [r.index for r in capped.rejections] == [0, 1, 2]
    assert capped.rejections.omitted == 997
