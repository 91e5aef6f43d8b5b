"""What real LLM stacks emit, posted unmodified to a real exporter on 127.0.0.1.

Each source runs its real client library offline through the library's own mock facility
(openai on httpx.MockTransport, anthropic on httpx2.MockTransport, boto3 with botocore's
Stubber, litellm with mock_response or an OpenAI client on a mock transport) and the
snippets of docs/integrations.md post what it returns. For each: the tokens of every type
exactly, the cost equal to the price map to the cent (worked out here from the map's
per-token prices, not through the exporter's price table), latency and TTFT observed where
the source has them, the app and the error type, and a retry counted once. No prompt or
completion text reaches the store.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")   # litellm's bundled map: no network

import anthropic  # noqa: E402
import boto3  # noqa: E402
import httpx  # noqa: E402
import httpx2  # noqa: E402
import litellm  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402
from botocore.stub import Stubber  # noqa: E402
from helpers import Server, free_port, sample_sum  # noqa: E402

from exporter.integrations.litellm_logger import UsageExporterLogger  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
MAP = json.loads((Path(__file__).resolve().parent.parent / "exporter" / "data" / "litellm_prices.json").read_text())["models"]
SECRET = "SECRET-PROMPT-TEXT"


def map_cost(model: str, input: int = 0, output: int = 0, cache_read: int = 0, cache_write: int = 0,
             cache_write_1h: int = 0, reasoning: int = 0) -> float:
    """USD from the price map's per-token prices, with the documented fallbacks."""
    e = MAP[model]
    inp, out = e["input_cost_per_token"], e["output_cost_per_token"]
    write = e.get("cache_creation_input_token_cost", inp)
    return (input * inp + output * out + cache_read * e.get("cache_read_input_token_cost", inp)
            + (cache_write - cache_write_1h) * write + cache_write_1h * e.get("cache_creation_input_token_cost_above_1hr", write)
            + reasoning * e.get("output_cost_per_reasoning_token", out))


def snippet(marker: str, **replace: str) -> str:
    """The python block of docs/integrations.md that contains `marker`, with `NAME = ...`
    lines replaced (the exporter's URL, a client on a mock transport)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{marker!r} is in {len(found)} python blocks of {DOC.name}"
    code = found[0]
    for name, value in replace.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.M)
        assert n == 1, f"no line `{name} = ...` in the snippet with {marker!r}"
    return code


def run(code: str, **namespace: Any) -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": "snippet", **namespace}
    exec(compile(code, str(DOC), "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("integrations")
    with Server(tmp, tmp / "u.db") as srv:
        yield srv


class Metrics:
    """One scrape, read by labels."""

    def __init__(self, srv: Server) -> None:
        self.samples = srv.scrape()

    def __call__(self, name: str, **labels: str) -> float:
        return sample_sum(self.samples, name, **labels)

    def tokens(self, **labels: str) -> dict[str, int]:
        return {t: int(self("llm_tokens_total", token_type=t, **labels))
                for t in ("input", "output", "cache_read", "cache_write", "reasoning")}


def exporter_url(srv: Server) -> str:
    return repr(srv.url)


# --- OpenAI ------------------------------------------------------------------------------------

def chat_completion(**over: Any) -> dict[str, Any]:
    d = {"id": "chatcmpl-abc", "object": "chat.completion", "created": int(time.time()), "model": "gpt-4o",
         "service_tier": "default", "system_fingerprint": "fp_1",
         "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                      "message": {"role": "assistant", "content": f"{SECRET} answer", "refusal": None}}],
         "usage": {"prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300,
                   "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 0},
                   "completion_tokens_details": {"reasoning_tokens": 100, "audio_tokens": 0,
                                                 "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}}
    d.update(over)
    return d


def openai_client(handler: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url="https://api.openai.test/v1",
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_openai_chat_completion(server: Server) -> None:
    """Cached input is priced as cached and reasoning as reasoning: the cost is the map's to
    the cent (it was 39 % higher with the cached tokens billed as input)."""
    client = openai_client(lambda req: httpx.Response(200, json=chat_completion()))
    code = snippet("client.chat.completions.create(\n    model=\"gpt-4o\"", EXPORTER=exporter_url(server), client="CLIENT")
    run(code, CLIENT=client)
    m = Metrics(server)
    labels = {"app": "support-bot", "provider": "openai", "model": "gpt-4o"}
    assert m.tokens(**labels) == {"input": 464, "output": 200, "cache_read": 1536, "cache_write": 0, "reasoning": 100}
    expected = map_cost("gpt-4o", input=464, output=200, cache_read=1536, reasoning=100)
    assert m("llm_cost_usd_total", **labels) == pytest.approx(expected, abs=1e-9)
    naive = map_cost("gpt-4o", input=2000, output=300)
    assert naive > expected * 1.3         # what counting prompt_tokens as input used to cost
    assert m("llm_request_duration_seconds_count", **labels) == 1
    run(code, CLIENT=client)              # a retry of the same completion: same id, counted once
    assert Metrics(server)("llm_requests_total", **labels) == 1


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_openai_stream_last_chunk(server: Server) -> None:
    base = {"id": "chatcmpl-stream-1", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "gpt-4o-mini"}
    body = sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": SECRET}, "finish_reason": None}]},
               {**base, "choices": [{"index": 0, "delta": {"content": " more"}, "finish_reason": "stop"}]},
               {**base, "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70,
                                                 "prompt_tokens_details": {"cached_tokens": 0}}})

    def handler(req: httpx.Request) -> httpx.Response:
        assert json.loads(req.content)["stream_options"] == {"include_usage": True}
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    run(snippet("stream_options", EXPORTER=exporter_url(server), client="CLIENT"), CLIENT=openai_client(handler))
    m = Metrics(server)
    labels = {"app": "chat-ui", "model": "gpt-4o-mini"}
    assert m.tokens(**labels) == {"input": 50, "output": 20, "cache_read": 0, "cache_write": 0, "reasoning": 0}
    assert m("llm_time_to_first_token_seconds_count", **labels) == 1
    assert m("llm_request_duration_seconds_count", **labels) == 1
    assert m("llm_cost_usd_total", **labels) == pytest.approx(map_cost("gpt-4o-mini", input=50, output=20), abs=1e-12)
    # the chunks before the last carry no usage: refused with the reason, not counted as empty requests
    r = server.client.post("/v1/records", json={**base, "id": "chatcmpl-stream-2",
                                                "choices": [{"index": 0, "delta": {"content": "x"}}]},
                           params={"app": "chat-ui"})
    assert r.status_code == 422 and "include_usage" in r.json()["errors"][0]["reason"]


def response_object(status: str = "completed", **over: Any) -> dict[str, Any]:
    now = time.time()
    d: dict[str, Any] = {
        "id": f"resp_{status}", "object": "response", "created_at": now - 3, "completed_at": now - 0.5,
        "status": status, "model": "o3-mini", "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": SECRET, "annotations": []}]}],
        "usage": {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 0},
                  "output_tokens": 900, "output_tokens_details": {"reasoning_tokens": 640}, "total_tokens": 2100},
        "error": None, "incomplete_details": None}
    d.update(over)
    return d


def test_openai_responses_every_status(server: Server) -> None:
    answers = {"completed": response_object()}
    client = openai_client(lambda req: httpx.Response(200, json=answers["completed"]))
    run(snippet("client.responses.create", EXPORTER=exporter_url(server), client="CLIENT"), CLIENT=client)
    m = Metrics(server)
    labels = {"app": "planner", "model": "o3-mini"}
    assert m.tokens(**labels) == {"input": 176, "output": 260, "cache_read": 1024, "cache_write": 0, "reasoning": 640}
    assert m("llm_cost_usd_total", **labels) == pytest.approx(
        map_cost("o3-mini", input=176, output=260, cache_read=1024, reasoning=640), abs=1e-12)
    assert m("llm_request_duration_seconds_sum", **labels) == pytest.approx(2.5, abs=0.01)   # completed_at - created_at

    def sdk(obj: dict[str, Any]) -> dict[str, Any]:       # the SDK's own object, dumped
        return openai.types.responses.Response.model_validate(obj).model_dump()
    incomplete = sdk(response_object("incomplete", incomplete_details={"reason": "max_output_tokens"}))
    failed = sdk(response_object("failed", usage=None, error={"code": "rate_limit_exceeded", "message": SECRET}))
    pending = sdk(response_object("in_progress", usage=None))
    event = {"type": "response.completed", "sequence_number": 9, "response": sdk(response_object(id="resp_event"))}
    r = server.client.post("/v1/records", json=[incomplete, failed, pending, event], params={"app": "statuses"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["accepted"] == 3 and got["errors"][0]["index"] == 2 and got["errors"][0]["field"] == "status"
    m = Metrics(server)
    assert m("llm_request_errors_total", app="statuses", error_type="rate_limit") == 1
    assert m("llm_requests_total", app="statuses") == 3
    recent = server.client.get("/v1/usage/recent", params={"limit": 50}).json()
    rows = recent if isinstance(recent, list) else recent.get("records", recent)
    stops = {d["request_id"]: d["stop_reason"] for d in rows if d.get("app") == "statuses"}
    assert stops["resp_incomplete"] == "length" and stops["resp_event"] == "stop"


def test_openai_embeddings(server: Server) -> None:
    data = {"object": "list", "model": "text-embedding-3-small", "data": [{"object": "embedding", "index": 0,
                                                                           "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 812, "total_tokens": 812}}
    client = openai_client(lambda req: httpx.Response(200, json=data))
    result = client.embeddings.create(model="text-embedding-3-small", input=SECRET)
    r = server.client.post("/v1/records", json={"app": "rag-index", "request_id": "emb-1", **result.model_dump()})
    assert r.json()["accepted"] == 1
    m = Metrics(server)
    assert m.tokens(app="rag-index")["input"] == 812
    assert m("llm_cost_usd_total", app="rag-index") == pytest.approx(map_cost("text-embedding-3-small", input=812), abs=1e-12)


# --- Anthropic ---------------------------------------------------------------------------------

def test_anthropic_message(server: Server) -> None:
    message = {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
               "content": [{"type": "text", "text": SECRET},
                           {"type": "tool_use", "id": "tu_1", "name": "get_diff", "input": {"path": SECRET}}],
               "stop_reason": "tool_use", "stop_sequence": None,
               "usage": {"input_tokens": 40, "output_tokens": 700, "cache_read_input_tokens": 9000,
                         "cache_creation_input_tokens": 3000,
                         "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                         "output_tokens_details": {"thinking_tokens": 250}, "service_tier": "standard"}}
    client = anthropic.Anthropic(api_key="sk-ant-test", http_client=httpx2.Client(
        transport=httpx2.MockTransport(lambda req: httpx2.Response(200, json=message))))
    code = snippet("client.messages.create", EXPORTER=exporter_url(server), client="CLIENT")
    run(code, CLIENT=client)
    m = Metrics(server)
    labels = {"app": "code-review", "provider": "anthropic", "model": "claude-sonnet-4-5"}
    assert m.tokens(**labels) == {"input": 40, "output": 450, "cache_read": 9000, "cache_write": 3000, "reasoning": 250}
    expected = map_cost("claude-sonnet-4-5", input=40, output=450, cache_read=9000, cache_write=3000,
                        cache_write_1h=2000, reasoning=250)
    assert m("llm_cost_usd_total", **labels) == pytest.approx(expected, abs=1e-9)
    assert m("llm_request_duration_seconds_count", **labels) == 1
    run(code, CLIENT=client)
    assert Metrics(server)("llm_requests_total", **labels) == 1


# --- Gemini and Bedrock ------------------------------------------------------------------------

def test_gemini_rest_and_sdk_spellings(server: Server) -> None:
    rest = {"candidates": [{"content": {"role": "model", "parts": [{"text": SECRET}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5000, "cachedContentTokenCount": 4096, "candidatesTokenCount": 120,
                              "thoughtsTokenCount": 300, "totalTokenCount": 5420},
            "modelVersion": "gemini-2.5-flash", "responseId": "gem-1"}
    run(snippet("generateContent", EXPORTER=exporter_url(server)), response=rest)
    snake = {"candidates": [{"content": {"role": "model", "parts": [{"text": SECRET}]}, "finish_reason": "STOP"}],
             "usage_metadata": {"prompt_token_count": 5000, "cached_content_token_count": 4096,
                                "candidates_token_count": 120, "thoughts_token_count": 300, "total_token_count": 5420},
             "model_version": "gemini-2.5-flash", "response_id": "gem-2"}
    assert server.client.post("/v1/records", json=snake, params={"app": "search"}).json()["accepted"] == 1
    m = Metrics(server)
    labels = {"app": "search", "provider": "gemini", "model": "gemini-2.5-flash"}
    assert m.tokens(**labels) == {"input": 2 * 904, "output": 2 * 120, "cache_read": 2 * 4096, "cache_write": 0,
                                  "reasoning": 2 * 300}
    assert m("llm_cost_usd_total", **labels) == pytest.approx(
        2 * map_cost("gemini-2.5-flash", input=904, output=120, cache_read=4096, reasoning=300), abs=1e-12)


def test_bedrock_converse(server: Server) -> None:
    bedrock = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    answer = {"output": {"message": {"role": "assistant", "content": [{"text": SECRET}]}}, "stopReason": "end_turn",
              "usage": {"inputTokens": 60, "outputTokens": 400, "totalTokens": 2960, "cacheReadInputTokens": 2000,
                        "cacheWriteInputTokens": 500},
              "metrics": {"latencyMs": 1830}}
    with Stubber(bedrock) as stub:
        stub.add_response("converse", answer)
        run(snippet("bedrock.converse", EXPORTER=exporter_url(server), bedrock="BEDROCK"), BEDROCK=bedrock)
    m = Metrics(server)
    labels = {"app": "assistant", "provider": "bedrock"}
    assert m.tokens(**labels) == {"input": 60, "output": 400, "cache_read": 2000, "cache_write": 500, "reasoning": 0}
    assert m("llm_cost_usd_total", **labels) == pytest.approx(
        map_cost("anthropic.claude-3-5-sonnet-20240620-v1:0", input=60, output=400, cache_read=2000, cache_write=500),
        abs=1e-12)
    assert m("llm_request_duration_seconds_sum", **labels) == pytest.approx(1.83)


# --- LiteLLM -----------------------------------------------------------------------------------

# litellm copies each entry of `litellm.callbacks` into these lists on the next call and keeps it
# there when `litellm.callbacks` is replaced; a logger left behind by one test (the generic API
# logger batches on a timer) would send the next test's calls to the module's exporter first,
# and that test's own copies would then count as retries
CALLBACK_LISTS = ("callbacks", "input_callback", "success_callback", "failure_callback",
                  "_async_success_callback", "_async_failure_callback")


@pytest.fixture
def callbacks() -> Iterator[None]:
    saved = {name: list(getattr(litellm, name)) for name in CALLBACK_LISTS}
    yield
    for name, entries in saved.items():
        setattr(litellm, name, entries)


def test_litellm_logger_sdk(server: Server, callbacks: None) -> None:
    """The SDK snippet, then what the logger sends for a streamed call (TTFT), a call whose
    usage has cached and reasoning tokens (an OpenAI client on a mock transport), a tagged
    call and a rate-limited one."""
    code = snippet("UsageExporterLogger(EXPORTER)", EXPORTER=exporter_url(server))
    ns = run(code.replace('"Hello"}]', '"Hello"}], mock_response="hi"'))      # offline
    logger: UsageExporterLogger = ns["logger"]
    try:
        client = openai_client(lambda req: httpx.Response(200, json=chat_completion(id="chatcmpl-litellm")))
        litellm.completion(model="gpt-4o", messages=[{"role": "user", "content": SECRET}], client=client,
                           metadata={"tags": ["team:x", "app:cached-calls"]})
        for _ in litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": SECRET}],
                                    mock_response="streamed words here", stream=True, metadata={"app": "streamer"}):
            pass
        with pytest.raises(litellm.RateLimitError):
            litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": SECRET}],
                               metadata={"app": "throttled"}, mock_response=litellm.RateLimitError(
                                   message="slow down", llm_provider="openai", model="gpt-4o-mini"))
        assert logger.flush(30), logger.stats()
    finally:
        logger.close()
    stats = logger.stats()
    assert stats["accepted"] == 4 and stats["dropped"] == 0 and stats["callback_errors"] == 0, stats
    m = Metrics(server)
    assert m("llm_requests_total", app="newsletter", provider="openai", model="gpt-4o-mini") == 1
    assert m("llm_request_duration_seconds_count", app="newsletter") == 1
    labels = {"app": "cached-calls", "provider": "openai", "model": "gpt-4o"}
    assert m.tokens(**labels) == {"input": 464, "output": 200, "cache_read": 1536, "cache_write": 0, "reasoning": 100}
    assert m("llm_cost_usd_total", **labels) == pytest.approx(
        map_cost("gpt-4o", input=464, output=200, cache_read=1536, reasoning=100), abs=1e-9)
    assert m("llm_time_to_first_token_seconds_count", app="streamer") == 1
    assert m("llm_request_errors_total", app="throttled", error_type="rate_limit") == 1
    export = server.client.get("/v1/usage/export").text
    assert SECRET not in export and "slow down" not in export


def test_litellm_logger_while_the_exporter_is_down(tmp_path: Path, callbacks: None) -> None:
    """Calls go on while nothing listens: no call waits or fails, the queue stays bounded and
    counts what it drops, and once the exporter is up the batch in flight is delivered with
    its ids, so a second delivery of it counts as duplicates."""
    port = free_port()
    logger = UsageExporterLogger(f"http://127.0.0.1:{port}", batch_size=2, flush_interval=0.05, max_queue=3,
                                 max_backoff=0.2, timeout=2)
    litellm.callbacks = [logger]
    try:
        for i in range(8):
            litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                               mock_response=f"answer {i}", metadata={"app": "offline"})
            time.sleep(0.05)
        # litellm runs its callbacks on a worker thread: wait until all 8 are in and a send failed
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (logger.stats()["retries"] == 0
                                               or logger.stats()["dropped"] + logger.stats()["waiting"] < 8):
            time.sleep(0.05)
        stats = logger.stats()
        kept = stats["waiting"]
        # at most the queue (3) and one batch in flight (2) are kept; every other record is counted as dropped
        assert stats["retries"] > 0 and stats["dropped"] + kept == 8 and 3 <= kept <= 5, stats
        with Server(tmp_path, tmp_path / "u.db", port=port) as srv:
            assert logger.flush(30), logger.stats()
            stats = logger.stats()
            assert stats["accepted"] == kept and stats["duplicate"] == 0, stats
            assert srv.scrape() and Metrics(srv)("llm_requests_total", app="offline") == kept
            # the same payloads again (a retry after a lost answer): counted once
            rows = srv.client.get("/v1/usage/export").text.splitlines()
            ids = [json.loads(r)["request_id"] for r in rows]
            assert len(set(ids)) == kept
    finally:
        logger.close(1)


def test_an_exporter_that_never_answers_does_not_hold_the_call(callbacks: None) -> None:
    """The exporter accepts the connection and never answers (a hung process): the sender
    waits on its 60 s timeout, the calls do not wait with it."""
    import socket
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)                               # connections complete in the backlog, nothing reads them
        logger = UsageExporterLogger(f"http://127.0.0.1:{hung.getsockname()[1]}", flush_interval=0.01, timeout=60)
        litellm.callbacks = [logger]
        try:
            for i in range(3):
                started = time.monotonic()
                litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                   mock_response=f"answer {i}")
                assert time.monotonic() - started < 30, "a call waited for the exporter"
                time.sleep(0.2)
            assert logger.stats()["waiting"] == 3 and logger.stats()["accepted"] == 0
        finally:
            logger._close_deadline = 0.0
            logger._closed = True                     # let the sender give up when its request times out


def test_logger_loads_from_a_proxy_config(callbacks: None) -> None:
    """`callbacks: exporter.integrations.litellm_logger.usage_logger` in config.yaml: the
    proxy resolves the name with the same function it uses for every custom callback."""
    from litellm.proxy.types_utils.utils import get_instance_fn
    instance = get_instance_fn("exporter.integrations.litellm_logger.usage_logger")
    assert isinstance(instance, UsageExporterLogger) and instance.url.endswith("/v1/records")


def test_litellm_generic_api(server: Server, callbacks: None) -> None:
    code = snippet("GenericAPILogger(endpoint=", EXPORTER=exporter_url(server))
    code = code.replace('"Hello"}]', '"Hello"}], mock_response="hi"')      # offline
    run(code)
    m = Metrics(server)
    assert m("llm_requests_total", app="batch-jobs", provider="openai", model="gpt-4o-mini") == 1
    assert m("llm_request_duration_seconds_count", app="batch-jobs") == 1


def spend_log_row(p: dict[str, Any], team_alias: str | None = None, key_alias: str | None = None) -> dict[str, Any]:
    """A `LiteLLM_SpendLogs` row as the proxy writes it for a StandardLoggingPayload (the
    columns of litellm.proxy._types.SpendLogsPayload; metadata and tags as JSON text)."""
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).isoformat()
    meta = {"user_api_key_alias": key_alias, "user_api_key_team_alias": team_alias, "status": p["status"],
            "usage_object": p["metadata"]["usage_object"], "error_information": p.get("error_information")}
    return {"request_id": p["id"], "call_type": p["call_type"], "api_key": "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b",
            "spend": p["response_cost"], "total_tokens": p["total_tokens"], "prompt_tokens": p["prompt_tokens"],
            "completion_tokens": p["completion_tokens"], "startTime": iso(p["startTime"]), "endTime": iso(p["endTime"]),
            "completionStartTime": iso(p["completionStartTime"]), "model": p["model"], "model_id": "", "model_group": "",
            "api_base": "", "user": "", "metadata": json.dumps(meta), "cache_hit": "False", "cache_key": "",
            "request_tags": json.dumps(p["request_tags"]), "team_id": "", "end_user": "",
            "custom_llm_provider": p["custom_llm_provider"], "messages": p["messages"], "response": p["response"],
            "session_id": None, "status": p["status"],
            "request_duration_ms": int((p["endTime"] - p["startTime"]) * 1000)}


def test_litellm_spend_log_rows(server: Server, callbacks: None) -> None:
    payloads: list[dict[str, Any]] = []

    class Capture(litellm.integrations.custom_logger.CustomLogger):  # type: ignore[misc]
        def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
            payloads.append(kwargs["standard_logging_object"])
    litellm.callbacks = [Capture()]
    client = openai_client(lambda req: httpx.Response(200, json=chat_completion(id="chatcmpl-spend")))
    litellm.completion(model="gpt-4o", messages=[{"role": "user", "content": SECRET}], client=client)
    litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": SECRET}], mock_response=SECRET)
    deadline = time.monotonic() + 30
    while len(payloads) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # litellm logs from a worker thread: the two payloads may arrive in either order
    first, second = sorted(payloads, key=lambda p: p["model"] != "gpt-4o")
    assert (first["model"], second["model"]) == ("gpt-4o", "gpt-4o-mini")
    rows = [spend_log_row(first, team_alias="search-team", key_alias="k1"), spend_log_row(second, key_alias="k2")]
    seen = {json.loads(line)["request_id"] for line in server.client.get("/v1/usage/export").text.splitlines()}
    assert not seen & {r["request_id"] for r in rows}, "a logger left by another test already sent these calls"
    run(snippet("spend-log rows", EXPORTER=exporter_url(server)), rows=rows)
    m = Metrics(server)
    labels = {"app": "search-team", "model": "gpt-4o"}
    assert m.tokens(**labels) == {"input": 464, "output": 200, "cache_read": 1536, "cache_write": 0, "reasoning": 100}
    assert m("llm_cost_usd_total", **labels) == pytest.approx(
        map_cost("gpt-4o", input=464, output=200, cache_read=1536, reasoning=100), abs=1e-9)
    assert m("llm_request_duration_seconds_count", **labels) == 1
    assert m("llm_requests_total", app="k2", model="gpt-4o-mini") == 1
    assert server.client.post("/v1/records", json=rows).json()["duplicate"] == 2


# --- provider and app, bad bodies --------------------------------------------------------------

def test_provider_from_the_request_or_the_setting(server: Server, tmp_path: Path) -> None:
    record = {"model": "gpt-4o-mini", "input_tokens": 10, "app": "no-provider"}
    r = server.client.post("/v1/records", json=record)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "provider"
    assert server.client.post("/v1/records", json=record, params={"provider": "OpenAI"}).json()["accepted"] == 1
    assert server.client.post("/v1/records", json={**record, "model": "llama-3.1-8b-instant"},
                              headers={"X-LLM-Provider": "groq", "X-LLM-App": "ignored"}).json()["accepted"] == 1
    # the header names the backend of an OpenAI-shaped object; the header app comes after the record's
    r = server.client.post("/v1/records", json=chat_completion(id="chatcmpl-groq", model="llama-3.1-8b-instant"),
                           headers={"X-LLM-Provider": "groq", "X-LLM-App": "groq-app"})
    assert r.json()["accepted"] == 1
    m = Metrics(server)
    assert m("llm_requests_total", app="no-provider", provider="openai") == 1
    assert m("llm_requests_total", app="no-provider", provider="groq") == 1
    assert m("llm_requests_total", app="groq-app", provider="groq", model="llama-3.1-8b-instant") == 1
    with Server(tmp_path, tmp_path / "d.db", "--default-provider", "vllm", "--app-precedence", "header,app") as srv:
        assert srv.client.post("/v1/records", json=record, params={"app": "first"}).json()["accepted"] == 1
        assert Metrics(srv)("llm_requests_total", app="first", provider="vllm") == 1


def test_a_body_that_is_neither_json_nor_ndjson_is_one_400(server: Server) -> None:
    protobuf = bytes.fromhex("0a8c010a2a0a0c736572766963652e6e616d65121a0a18") + b"\n\x12\x08gen_ai\n" * 60
    for headers in ({"Content-Type": "application/x-protobuf"}, {}, {"Content-Type": "application/x-ndjson"}):
        r = server.client.post("/v1/records", content=protobuf, headers=headers)
        assert r.status_code == 400, (headers, r.text)
        assert "neither JSON nor NDJSON" in r.json()["error"] or "/v1/traces" in r.json()["error"]
    r = server.client.post("/v1/records", content=b"hello\nworld\n", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400
    # NDJSON with one bad line still counts the good ones
    good = json.dumps({"provider": "openai", "model": "gpt-4o-mini", "app": "ndjson-mixed"})
    r = server.client.post("/v1/records", content=f"{good}\nnot json\n{good}\n".encode())
    assert r.status_code == 200 and r.json()["accepted"] == 2 and r.json()["rejected"] == 1


def test_snippets_do_not_block_an_event_loop() -> None:
    """The logger's hooks are plain appends: awaiting one returns at once even with no server."""
    logger = UsageExporterLogger(f"http://127.0.0.1:{free_port()}", flush_interval=10)
    payload = {"standard_logging_object": {"id": "x", "status": "success", "model": "m", "messages": SECRET}}
    started = time.monotonic()
    asyncio.run(logger.async_log_success_event(payload, None, None, None))
    logger.log_failure_event({"not": "a payload"}, None, None, None)
    logger.log_success_event(None, None, None, None)
    assert time.monotonic() - started < 0.5
    assert logger.stats()["waiting"] == 1 and logger.stats()["callback_errors"] == 0
    assert SECRET not in json.dumps(list(logger._queue))
    logger.close(0.2)


def test_closing_while_the_exporter_is_down_gives_up_in_time() -> None:
    logger = UsageExporterLogger(f"http://127.0.0.1:{free_port()}", batch_size=2, flush_interval=0.05,
                                 max_backoff=0.1, timeout=0.5)
    for i in range(7):
        logger.log_success_event({"standard_logging_object": {"id": f"c{i}", "status": "success", "model": "m"}},
                                 None, None, None)
    started = time.monotonic()
    assert logger.close(0.5) is False
    assert time.monotonic() - started < 5
    stats = logger.stats()
    assert stats["dropped"] == 7 and stats["waiting"] == 0, stats
