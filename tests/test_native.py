"""Native objects read as records (exporter/ingest/native.py) and the app and provider
precedence (exporter/ingest/attribution.py), record by record: each shape's token split, its
outcome and timing, what a poster adds around an object, and what is refused and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import T0, rec, settings_for

from exporter.config import ConfigError, load_settings
from exporter.engine import Engine
from exporter.ingest.attribution import Attribution
from exporter.ingest.batch import parse_batch
from exporter.ingest.native import translate, usage_tokens
from exporter.ingest.records import RecordError, parse_record


def chat(**over: object) -> dict[str, object]:
    d: dict[str, object] = {"id": "chatcmpl-1", "object": "chat.completion", "created": T0 - 5, "model": "gpt-4o",
                            "choices": [{"index": 0, "finish_reason": "tool_calls",
                                         "message": {"role": "assistant", "content": "text",
                                                     "tool_calls": [{"id": "c1", "type": "function",
                                                                     "function": {"name": "search", "arguments": "{}"}}]}}],
                            "usage": {"prompt_tokens": 100, "completion_tokens": 50,
                                      "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 10},
                                      "completion_tokens_details": {"reasoning_tokens": 20}}}
    d.update(over)
    return d


def test_openai_chat_split_and_fields() -> None:
    r = parse_record(chat(), T0)
    assert (r.provider, r.model, r.request_id, r.ts) == ("openai", "gpt-4o", "chatcmpl-1", T0 - 5)
    assert (r.input_tokens, r.cache_read_tokens, r.cache_write_tokens, r.output_tokens, r.reasoning_tokens) == (30, 60, 10, 30, 20)
    assert (r.stop_reason, r.tool_calls, r.tool_names, r.request_had_tools) == ("tool_calls", 1, ("search",), True)


def test_azure_is_told_by_its_content_filter_fields() -> None:
    r = parse_record(chat(prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {}}]), T0)
    assert r.provider == "azure"


def test_wrapper_fields_win_and_ms_fields_convert() -> None:
    r = parse_record({**chat(), "app": "bot", "provider": "groq", "latency_ms": 1500, "ttft_ms": 200,
                      "session_id": "s1"}, T0)
    assert (r.app, r.provider, r.latency_s, r.ttft_s, r.stream, r.session_id) == ("bot", "groq", 1.5, 0.2, True, "s1")


def test_inconsistent_usage_is_refused_with_its_field() -> None:
    with pytest.raises(RecordError) as e:
        parse_record(chat(usage={"prompt_tokens": 10, "completion_tokens": 1,
                                 "prompt_tokens_details": {"cached_tokens": 20}}), T0)
    assert e.value.field == "usage.prompt_tokens" and "less than" in e.value.message
    with pytest.raises(RecordError) as e:
        parse_record(chat(usage={"prompt_tokens": "many", "completion_tokens": 1}), T0)
    assert e.value.field == "usage.prompt_tokens"


def test_responses_statuses() -> None:
    base = {"id": "resp_1", "object": "response", "created_at": T0 - 10, "completed_at": T0 - 7.5, "model": "gpt-5",
            "output": [{"type": "function_call", "name": "lookup", "arguments": "{}", "call_id": "x"}],
            "tools": [{"type": "function", "name": "lookup"}],
            "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4},
                      "output_tokens": 8, "output_tokens_details": {"reasoning_tokens": 3}}}
    ok = parse_record({**base, "status": "completed"}, T0)
    assert (ok.status, ok.stop_reason, ok.latency_s, ok.tool_names, ok.request_had_tools) == (
        "ok", "tool_calls", 2.5, ("lookup",), True)
    assert (ok.input_tokens, ok.cache_read_tokens, ok.output_tokens, ok.reasoning_tokens) == (6, 4, 5, 3)
    cut = parse_record({**base, "status": "incomplete", "incomplete_details": {"reason": "content_filter"}}, T0)
    assert (cut.status, cut.stop_reason) == ("ok", "content_filter")
    failed = parse_record({**base, "status": "failed", "usage": None,
                           "error": {"code": "server_error", "message": "boom"}}, T0)
    assert (failed.status, failed.error_type, failed.input_tokens) == ("error", "server_error", 0)
    assert parse_record({**base, "status": "cancelled"}, T0).stop_reason == "cancelled"
    for status in ("queued", "in_progress"):
        with pytest.raises(RecordError) as e:
            parse_record({**base, "status": status}, T0)
        assert e.value.field == "status"


def test_anthropic_bedrock_gemini_usage_semantics() -> None:
    assert usage_tokens({"input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 100,
                         "cache_creation_input_tokens": 30, "cache_creation": {"ephemeral_1h_input_tokens": 12},
                         "output_tokens_details": {"thinking_tokens": 4}}) == {
        "input_tokens": 5, "cache_read_tokens": 100, "cache_write_tokens": 30, "cache_write_1h_tokens": 12,
        "output_tokens": 5, "reasoning_tokens": 4}
    assert usage_tokens({"inputTokens": 7, "outputTokens": 3, "cacheReadInputTokens": 50, "cacheWriteInputTokens": 20,
                         "cacheDetails": [{"ttl": "1h", "inputTokens": 15}, {"ttl": "5m", "inputTokens": 5}]}) == {
        "input_tokens": 7, "cache_read_tokens": 50, "cache_write_tokens": 20, "cache_write_1h_tokens": 15,
        "output_tokens": 3}
    exclusive = {"promptTokenCount": 100, "cachedContentTokenCount": 40, "candidatesTokenCount": 10,
                 "thoughtsTokenCount": 5, "toolUsePromptTokenCount": 2, "totalTokenCount": 117}
    assert usage_tokens(exclusive) == {"input_tokens": 62, "cache_read_tokens": 40, "output_tokens": 10,
                                       "reasoning_tokens": 5}
    inclusive = {**exclusive, "candidatesTokenCount": 15, "totalTokenCount": 117}   # thoughts inside candidates
    assert usage_tokens(inclusive)["output_tokens"] == 10


def test_gemini_and_bedrock_objects() -> None:
    g = parse_record({"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]},
                                      "finishReason": "SAFETY"}],
                      "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
                      "modelVersion": "gemini-2.5-pro", "responseId": "g1"}, T0)
    assert (g.provider, g.model, g.stop_reason, g.tool_names, g.request_id) == ("gemini", "gemini-2.5-pro", "safety", ("f",), "g1")
    b = parse_record({"model": "amazon.nova-pro-v1:0", "stopReason": "guardrail_intervened",
                      "usage": {"inputTokens": 1, "outputTokens": 2}, "metrics": {"latencyMs": 250},
                      "ResponseMetadata": {"RequestId": "rq", "HTTPStatusCode": 200}}, T0)
    assert (b.provider, b.latency_s, b.request_id, b.stop_reason) == ("bedrock", 0.25, "rq", "guardrail_intervened")
    with pytest.raises(RecordError) as e:            # Converse does not name its model
        parse_record({"usage": {"inputTokens": 1, "outputTokens": 2}, "stopReason": "end_turn"}, T0)
    assert e.value.field == "model"


def payload(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "id": "chatcmpl-9", "call_type": "acompletion", "stream": True, "status": "success",
        "custom_llm_provider": "bedrock", "model": "bedrock/us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "startTime": T0 - 10.0, "endTime": T0 - 7.0, "completionStartTime": T0 - 9.5, "response_cost": 0.0123,
        "prompt_tokens": 1100, "completion_tokens": 50, "request_tags": ["env:prod", "app:tagged"],
        "metadata": {"user_api_key_alias": "key-a", "user_api_key_team_alias": "team-a",
                     "requester_metadata": {"app": "from-request"},
                     "usage_object": {"prompt_tokens": 1100, "completion_tokens": 50,
                                      "prompt_tokens_details": {"cached_tokens": 1000},
                                      "cache_creation_input_tokens": 60, "cache_read_input_tokens": 1000}},
        "messages": [{"role": "user", "content": "secret"}], "error_information": None}
    d.update(over)
    return d


def test_litellm_payload() -> None:
    r = parse_record(payload(), T0)
    assert (r.provider, r.model, r.app, r.ts, r.latency_s, r.ttft_s, r.cost_usd, r.request_id) == (
        "bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "from-request", T0 - 10, 3.0, 0.5, 0.0123, "chatcmpl-9")
    assert (r.input_tokens, r.cache_read_tokens, r.cache_write_tokens, r.output_tokens) == (40, 1000, 60, 50)
    # not streamed: LiteLLM's first-token time is the end time, which is no TTFT
    r = parse_record(payload(stream=None, completionStartTime=T0 - 7.0), T0)
    assert r.ttft_s is None and r.latency_s == 3.0
    # LiteLLM could not price it: the exporter prices it instead of counting it free
    assert parse_record(payload(response_cost=0.0, zero_cost_diagnostic={"reason": "missing_pricing_key"}), T0).cost_usd is None
    failed = parse_record(payload(status="failure", response_cost=0.0, metadata={"usage_object": {}}, prompt_tokens=0,
                                  error_information={"error_code": "429", "error_class": "RateLimitError",
                                                     "error_message": "slow down"}), T0)
    assert (failed.status, failed.error_type, failed.input_tokens) == ("error", "rate_limit", 0)
    unknown = parse_record(payload(status="failure", error_information={"error_code": "503", "error_class": "Odd"}), T0)
    assert unknown.error_type == "server_error"         # an unknown class never hides the status


@pytest.mark.parametrize("order,expected", [
    (("app", "requester_metadata", "tag", "team_alias", "key_alias", "header"), "from-request"),
    (("tag", "requester_metadata"), "tagged"),
    (("team_alias", "tag"), "team-a"),
    (("key_alias",), "key-a"),
    (("header", "tag"), "hdr"),
])
def test_app_precedence(order: tuple[str, ...], expected: str) -> None:
    attribution = Attribution(order).for_request("hdr", None)
    assert parse_record(payload(), T0, attribution).app == expected


def test_litellm_spend_log_row_with_json_text() -> None:
    row = {"request_id": "req-7", "call_type": "acompletion", "spend": 0.5, "prompt_tokens": 10, "completion_tokens": 5,
           "startTime": "2023-11-14T21:00:00.000+00:00", "endTime": "2023-11-14T21:00:02.500+00:00",
           "completionStartTime": "2023-11-14T21:00:02.500+00:00", "request_duration_ms": 2500,
           "model": "gpt-4o", "custom_llm_provider": "openai", "status": "failure",
           "metadata": json.dumps({"user_api_key_team_alias": "ops", "status": "failure",
                                   "error_information": {"error_code": "400",
                                                         "error_class": "ContentPolicyViolationError"}}),
           "request_tags": "[]", "messages": "secret", "response": "secret"}
    r = parse_record(row, T0)
    assert (r.app, r.status, r.error_type, r.latency_s, r.ttft_s, r.cost_usd, r.request_id) == (
        "ops", "error", "content_filter", 2.5, None, 0.5, "req-7")
    assert (r.input_tokens, r.output_tokens) == (10, 5)


def test_no_text_survives() -> None:
    obj = {**chat(), "choices": [{"message": {"content": "TOPSECRET"}, "finish_reason": "stop"}]}
    r = parse_record(obj, T0)
    assert "TOPSECRET" not in json.dumps(r.to_dict())
    assert translate({"provider": "p", "model": "m"}) is None


def test_provider_fallbacks_in_both_paths() -> None:
    own = [{"model": "m1", "input_tokens": 3}, {"model": "m2", "provider": "Mine"}]
    cols, rej, _ = parse_batch(own, T0)
    assert len(cols) == 1 and rej.total == 1 and rej.kept[0].field == "provider"
    cols, rej, _ = parse_batch(own, T0, attribution=Attribution(default_provider="vllm"))
    assert list(cols.provider) == ["vllm", "mine"] and rej.total == 0
    cols, _, _ = parse_batch(own, T0, attribution=Attribution(default_provider="vllm").for_request("hdr", "groq"))
    assert list(cols.provider) == ["groq", "mine"] and list(cols.app) == ["hdr", "hdr"]
    # the slow path (an alias in the batch) agrees with the fast one
    cols, _, _ = parse_batch([{**own[0], "latency_ms": 5}, own[1]], T0,
                             attribution=Attribution(default_provider="vllm").for_request("hdr", "groq"))
    assert list(cols.provider) == ["groq", "mine"] and list(cols.app) == ["hdr", "hdr"]
    cols, _, _ = parse_batch([rec(app="own")], T0, attribution=Attribution(("header", "app")).for_request("hdr", None))
    assert list(cols.app) == ["hdr"]


def test_settings(tmp_path: Path) -> None:
    s = settings_for(tmp_path, default_provider=" OpenAI ", app_precedence="tag, header")
    assert s.default_provider == "openai" and s.app_precedence == ["tag", "header"]
    assert s.attribution().app_precedence == ("tag", "header")
    with pytest.raises(ConfigError) as e:
        load_settings(flags={"db": str(tmp_path / "x.db"), "app_precedence": "app,user_id"}, environ={})
    assert "app_precedence" in str(e.value) and "user_id" in str(e.value)
    s = load_settings(flags={"db": str(tmp_path / "y.db")}, environ={"LLM_EXPORTER_APP_PRECEDENCE": "key_alias,app"})
    assert s.app_precedence == ["key_alias", "app"]


def test_engine_uses_the_configured_default(tmp_path: Path) -> None:
    e = Engine(settings_for(tmp_path, default_provider="ollama"), clock=lambda: T0)
    try:
        res = e.ingest([{"model": "llama3", "input_tokens": 5}], now=T0)
        assert res.accepted == 1
        assert e.registry.get_sample_value("llm_requests_total", {"app": "unknown", "provider": "ollama",
                                                                  "model": "llama3"}) == 1
    finally:
        e.close()


def test_times_instead_of_durations() -> None:
    r = parse_record({"provider": "p", "model": "m", "start_time": "2023-11-14T21:00:00Z",
                      "end_time": "2023-11-14T21:00:03.5Z", "first_token_time": "2023-11-14T21:00:00.25Z"}, T0)
    assert (r.latency_s, r.ttft_s, r.stream) == (3.5, 0.25, True)
    r = parse_record({"provider": "p", "model": "m", "startTime": T0 - 4, "endTime": T0 - 1,
                      "completionStartTime": T0 - 1, "latency_s": 2.0}, T0)
    assert (r.latency_s, r.ttft_s) == (2.0, None)        # own duration wins; first token at the end is no TTFT
