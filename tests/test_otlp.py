"""The OTLP/HTTP trace receiver, end to end: the real OpenTelemetry SDK and its OTLP/HTTP
span exporter (protobuf, gzip) send GenAI spans to a real `llm-usage-exporter serve` on
127.0.0.1; an OTLP JSON body too. Checked on /metrics: tokens per type exactly as the GenAI
conventions define them, cost equal to the price table's, latency and TTFT, the app from
`service.name`, the error type from `error.type`, a retried export counted once, other spans
ignored and counted, rejected spans reported as OTLP partial success, junk refused with one
400, and the OTLP status codes and bodies for every refusal."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import orjson
import pytest
import yaml
from faults import locked
from google.rpc.status_pb2 import Status as RpcStatus
from helpers import Server, sample_sum
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from exporter.ingest import otlp
from exporter.ingest.attribution import Attribution
from exporter.ingest.batch import parse_batch
from exporter.ingest.genai import error_class, is_model_call, record_fields, service_app
from exporter.ingest.otlp import BadTraces, decode_traces

TOKEN = "otlp-ingest-token"
READ_TOKEN = "otlp-read-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROTOBUF = {"Content-Type": "application/x-protobuf", **AUTH}
JSON = {"Content-Type": "application/json", **AUTH}
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("otlp")
    with Server(tmp, tmp / "u.db", env={"LLM_EXPORTER_AUTH_TOKENS": TOKEN,
                                        "LLM_EXPORTER_READ_TOKENS": READ_TOKEN}) as srv:
        srv.client.headers.update(AUTH)
        yield srv


# --- spans as an instrumented application makes them ----------------------------------------

def model_call(tracer: Tracer, name: str, attrs: dict[str, Any], start_ns: int, seconds: float,
               error: str | None = None) -> None:
    """One GenAI client span, `seconds` long, as an instrumentation library ends it."""
    span = tracer.start_span(name, kind=SpanKind.CLIENT, start_time=start_ns, attributes=attrs)
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=start_ns + int(round(seconds * 1e9)))


def agent_run(tracer: Tracer, t0: int) -> None:
    """An agent run: an HTTP request, an agent span summing its model calls, two chat calls,
    a reasoning call at flex tier, a tool, and a rate-limited call."""
    s = 1_000_000_000
    with tracer.start_as_current_span("POST /chat", kind=SpanKind.SERVER, start_time=t0,
                                      attributes={"http.request.method": "POST", "http.route": "/chat"}):
        with tracer.start_as_current_span("invoke_agent support", start_time=t0 + s // 10, attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 215_100,
                "gen_ai.usage.output_tokens": 7_500}):
            model_call(tracer, "chat gpt-4o-mini", {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini",
                "gen_ai.request.stream": True, "gen_ai.response.time_to_first_chunk": 0.35,
                "gen_ai.usage.input_tokens": 12_000, "gen_ai.usage.cache_read.input_tokens": 8_000,
                "gen_ai.usage.output_tokens": 1_500, "gen_ai.response.finish_reasons": ["stop"],
                "gen_ai.response.id": "chatcmpl-Bq7xJ2kPz9R4mN8vT1wY6cE3aD5f",
                "gen_ai.input.messages": '[{"role": "user", "parts": [{"type": "text", "content": "secret"}]}]',
            }, t0 + s // 5, 2.5)
            model_call(tracer, "chat claude-sonnet-4-5", {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.input_tokens": 200_100,
                "gen_ai.usage.cache_read.input_tokens": 150_000, "gen_ai.usage.cache_creation.input_tokens": 50_000,
                "gen_ai.usage.output_tokens": 4_000, "gen_ai.usage.reasoning.output_tokens": 1_500,
                "gen_ai.response.finish_reasons": ["end_turn"], "gen_ai.response.id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            }, t0 + 3 * s, 12.0)
            model_call(tracer, "execute_tool lookup_order", {
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order"}, t0 + 16 * s, 0.2)
            model_call(tracer, "chat o4-mini", {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "o4-mini",
                "gen_ai.usage.input_tokens": 3_000, "gen_ai.usage.output_tokens": 2_000,
                "gen_ai.usage.reasoning.output_tokens": 1_200, "openai.response.service_tier": "flex",
                "gen_ai.response.id": "chatcmpl-Cz4Lq8Vn2Rt6Yp0Wx3Ks7Hd1Fg9J",
            }, t0 + 17 * s, 8.0)
            model_call(tracer, "chat gpt-4.1", {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4.1",
                "error.type": "openai.RateLimitError", "http.response.status_code": 429,
            }, t0 + 26 * s, 0.3, error="Error code: 429 - rate_limit_exceeded")


class Sdk:
    """A TracerProvider exporting with the OTLP/HTTP span exporter to the server, as an
    application would (`batch`: the SDK's batch processor); a copy of every span is kept to
    export by hand, again."""

    def __init__(self, srv: Server, service: str, compression: Compression = Compression.Gzip,
                 headers: dict[str, str] | None = None, timeout: float = 30, batch: bool = True) -> None:
        self.exporter = OTLPSpanExporter(endpoint=srv.url + "/v1/traces", headers=headers or AUTH,
                                         compression=compression, timeout=timeout)
        self.kept = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if batch:
            self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.provider.add_span_processor(SimpleSpanProcessor(self.kept))
        self.tracer = self.provider.get_tracer("llm-app", "1.0")

    def flush(self) -> None:
        assert self.provider.force_flush(timeout_millis=60_000)

    @property
    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.kept.get_finished_spans()

    def close(self) -> None:
        self.provider.shutdown()


def prices(srv: Server, provider: str, model: str, tier: str = "standard") -> dict[str, float]:
    """USD per token of each type, from the exporter's price table."""
    r = srv.client.get("/api/prices", params={"model": model, "provider": provider})
    assert r.status_code == 200, r.text
    return {k: v / 1e6 for k, v in r.json()["usd_per_million_tokens"][tier].items()}


def series(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sample_sum(samples, name, **labels)


# --- the SDK's exporter --------------------------------------------------------------------

def test_sdk_exports_genai_spans_as_usage_records(server: Server) -> None:
    before = server.scrape()
    sdk = Sdk(server, "support-bot")
    agent_run(sdk.tracer, time.time_ns() - 60 * 1_000_000_000)
    sdk.flush()
    got = server.scrape()
    app = {"app": "support-bot"}

    expected_tokens = {
        ("openai", "gpt-4o-mini"): {"input": 4_000, "cache_read": 8_000, "output": 1_500},
        ("anthropic", "claude-sonnet-4-5"): {"input": 100, "cache_read": 150_000, "cache_write": 50_000,
                                             "output": 2_500, "reasoning": 1_500},
        ("openai", "o4-mini"): {"input": 3_000, "output": 800, "reasoning": 1_200},
        ("openai", "gpt-4.1"): {},
    }
    for (provider, model), tokens in expected_tokens.items():
        labels = {**app, "provider": provider, "model": model}
        assert series(got, "llm_requests_total", **labels) == 1, (provider, model)
        for token_type in ("input", "output", "cache_read", "cache_write", "reasoning"):
            assert series(got, "llm_tokens_total", token_type=token_type, **labels) == tokens.get(token_type, 0), \
                (model, token_type)
        if tokens:
            tier = "flex" if model == "o4-mini" else "standard"
            price = prices(server, provider, model, tier)
            cost = sum(n * price[t] for t, n in tokens.items())
            assert series(got, "llm_cost_usd_total", **labels) == pytest.approx(cost, rel=1e-9), model
            assert round(series(got, "llm_cost_usd_total", **labels), 2) == round(cost, 2)
    # billed as the conventions count them: cached input at the cache prices, not as input
    claude = prices(server, "anthropic", "claude-sonnet-4-5")
    assert series(got, "llm_cost_usd_total", model="claude-sonnet-4-5") < 200_100 * claude["input"] / 2

    # latency from the span's duration, TTFT from time_to_first_chunk
    for model, seconds in (("gpt-4o-mini", 2.5), ("claude-sonnet-4-5", 12.0), ("o4-mini", 8.0), ("gpt-4.1", 0.3)):
        assert series(got, "llm_request_duration_seconds_count", model=model) == 1
        assert series(got, "llm_request_duration_seconds_sum", model=model) == pytest.approx(seconds, abs=1e-6)
    assert series(got, "llm_time_to_first_token_seconds_sum", model="gpt-4o-mini") == pytest.approx(0.35)
    assert series(got, "llm_time_to_first_token_seconds_count", model="claude-sonnet-4-5") == 0

    # the rate-limited call: an error of the right type; nothing else failed
    assert series(got, "llm_request_errors_total", model="gpt-4.1", error_type="rate_limit") == 1
    assert series(got, "llm_request_errors_total", **app) == 1
    # every series under the service's name; the agent, tool and HTTP spans are no records
    assert series(got, "llm_requests_total") - series(before, "llm_requests_total") == 4
    assert series(got, "llm_requests_total", **app) == 4
    assert series(got, "llm_requests_total", model="gpt-4o-mini") == 1      # not the agent span's
    spans = {r: series(got, "llm_exporter_otlp_spans_total", result=r)
             - series(before, "llm_exporter_otlp_spans_total", result=r) for r in ("record", "ignored")}
    assert spans == {"record": 4, "ignored": 3}
    assert series(got, "llm_exporter_records_total", result="accepted") \
        - series(before, "llm_exporter_records_total", result="accepted") == 4

    # the export sent again (what the exporter does after a lost answer): counted once
    assert sdk.exporter.export(sdk.spans) == SpanExportResult.SUCCESS
    again = server.scrape()
    assert series(again, "llm_requests_total", **app) == 4
    assert series(again, "llm_cost_usd_total", **app) == series(got, "llm_cost_usd_total", **app)
    assert series(again, "llm_exporter_records_total", result="duplicate") \
        - series(got, "llm_exporter_records_total", result="duplicate") == 4
    sdk.close()

    # the records as stored: ids and sessions, and no prompt text
    recent = server.client.get("/v1/usage/recent", params={"limit": 50}).json()["records"]
    mine = [r for r in recent if r["app"] == "support-bot"]
    assert len(mine) == 4
    ids = {r["model"]: r["request_id"] for r in mine}
    assert ids["gpt-4o-mini"] == "chatcmpl-Bq7xJ2kPz9R4mN8vT1wY6cE3aD5f"
    rate_limited = next(s for s in sdk.spans if s.name == "chat gpt-4.1")
    assert ids["gpt-4.1"] == f"{rate_limited.context.trace_id:032x}-{rate_limited.context.span_id:016x}"
    assert len({r["session_id"] for r in mine}) == 1           # one trace: one agent run
    assert {r["stop_reason"] for r in mine} == {"stop", "end_turn", None}
    assert "secret" not in orjson.dumps(recent).decode()


def test_the_official_openai_instrumentation_exported_to_the_receiver(server: Server) -> None:
    """The openai SDK on a mock transport, instrumented by opentelemetry-instrumentation-openai-v2,
    exported by the SDK's OTLP/HTTP exporter: its spans count as the conventions read them."""
    openai = pytest.importorskip("openai")
    openai_v2 = pytest.importorskip("opentelemetry.instrumentation.openai_v2")
    answers = iter([
        httpx.Response(200, json=_completion("chatcmpl-InstrA1b2C3d4E5f6G7h8", 2_400, 1_000, 180, 60)),
        httpx.Response(200, json=_completion("chatcmpl-InstrI9j8K7l6M5n4O3p2", 900, 0, 40, 0)),
        httpx.Response(429, json={"error": {"message": "Rate limit reached", "type": "requests",
                                            "code": "rate_limit_exceeded"}}),
    ])
    client = openai.OpenAI(api_key="sk-test", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(lambda request: next(answers))))
    sdk = Sdk(server, "instrumented-app")
    instrumentor = openai_v2.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=sdk.provider)
    try:
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    finally:
        instrumentor.uninstrument()
    sdk.flush()
    got = server.scrape()
    spans = [s for s in sdk.spans if s.attributes.get("gen_ai.operation.name") == "chat"]
    assert len(spans) == 3
    app = {"app": "instrumented-app"}
    assert series(got, "llm_requests_total", **app) == 3
    assert series(got, "llm_request_errors_total", error_type="rate_limit", **app) == 1
    # tokens as the spans report them, read by the conventions (cached and reasoning parts,
    # where the instrumentation reports them, split off the totals they are part of)
    ok = [s.attributes for s in spans if "gen_ai.usage.input_tokens" in s.attributes]
    cached = sum(a.get("gen_ai.usage.cache_read.input_tokens", 0) for a in ok)
    reasoning = sum(a.get("gen_ai.usage.reasoning.output_tokens", 0) for a in ok)
    assert series(got, "llm_tokens_total", token_type="input", **app) == 3_300 - cached
    assert series(got, "llm_tokens_total", token_type="cache_read", **app) == cached
    assert series(got, "llm_tokens_total", token_type="output", **app) == 220 - reasoning
    assert series(got, "llm_tokens_total", token_type="reasoning", **app) == reasoning
    model = ok[0]["gen_ai.response.model"]
    price = prices(server, "openai", model)
    cost = (3_300 - cached) * price["input"] + cached * price["cache_read"] + (220 - reasoning) * price["output"] \
        + reasoning * price["reasoning"]
    assert series(got, "llm_cost_usd_total", model=model, **app) == pytest.approx(cost, rel=1e-9)
    durations = sum((s.end_time - s.start_time) / 1e9 for s in spans)
    assert series(got, "llm_request_duration_seconds_sum", **app) == pytest.approx(durations, abs=1e-6)
    sdk.close()


def _completion(rid: str, prompt: int, cached: int, completion: int, reasoning: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": 1_760_000_000, "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "prompt_tokens_details": {"cached_tokens": cached},
                      "completion_tokens_details": {"reasoning_tokens": reasoning}}}


def test_an_export_the_store_refused_is_retried_by_the_sdk_and_counted_once(tmp_path: Path) -> None:
    """The store is locked: the first attempt gets 503 with Retry-After, the SDK's exporter
    waits and sends the same spans again, they count once; the span counts survive a restart."""
    db = tmp_path / "u.db"
    with Server(tmp_path, db, "--store-busy-timeout", "1") as srv:
        sdk = Sdk(srv, "retrying-app", compression=Compression.NoCompression, headers={}, batch=False)
        model_call(sdk.tracer, "chat gpt-4o-mini", {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20,
            "gen_ai.response.id": "chatcmpl-RetryRetryRetry0001"}, time.time_ns() - 10**10, 1.0)
        results: list[SpanExportResult] = []
        with locked(db):
            th = threading.Thread(target=lambda: results.append(sdk.exporter.export(sdk.spans)))
            th.start()
            srv.wait_for(lambda: sample_sum(srv.scrape(), "llm_exporter_store_errors_total") >= 1)
        th.join(timeout=60)
        assert results == [SpanExportResult.SUCCESS]
        assert sdk.exporter.export(sdk.spans) == SpanExportResult.SUCCESS
        samples = srv.scrape()
        assert sample_sum(samples, "llm_requests_total", app="retrying-app") == 1
        assert sample_sum(samples, "llm_exporter_records_total", result="duplicate") == 1
        assert sample_sum(samples, "llm_exporter_otlp_spans_total", result="record") == 2
        sdk.close()
    with Server(tmp_path, db) as srv:
        samples = srv.scrape()
        assert sample_sum(samples, "llm_exporter_otlp_spans_total", result="record") == 2
        assert sample_sum(samples, "llm_requests_total", app="retrying-app") == 1


# --- the documentation's snippets and the Collector configuration ---------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
COLLECTOR = Path(__file__).resolve().parent.parent / "deploy" / "otel-collector.yaml"


def doc_block(language: str, containing: str) -> str:
    """The one fenced `language` block of the OpenTelemetry section that contains `containing`."""
    section = DOC.read_text().split("## OpenTelemetry", 1)[1]
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", section, re.S) if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} {language} blocks with {containing!r}"
    return blocks[0]


def test_the_documented_setup_and_span_reach_the_exporter(server: Server, tmp_path: Path) -> None:
    """The two Python snippets, run as written (only the address, the token and the service
    name replaced) in a fresh interpreter, with an openai client on a mock transport."""
    setup = doc_block("python", "OTLPSpanExporter(endpoint=")
    call = doc_block("python", "client.chat.completions.create")
    for name, value in (("EXPORTER", server.url), ("TOKEN", TOKEN)):
        line = next(ln for ln in setup.splitlines() if ln.startswith(f"{name} = "))
        setup = setup.replace(line, f"{name} = {value!r}")
    setup = setup.replace('"service.name": "support-bot"', '"service.name": "docs-snippet"')
    completion = _completion("chatcmpl-DocsSnippet0123456789", 5_000, 4_000, 300, 100)
    script = "\n".join([
        "import httpx, json, openai",
        f"ANSWER = json.loads({orjson.dumps(completion).decode()!r})",
        "client = openai.OpenAI(api_key='sk-test', http_client=httpx.Client(",
        "    transport=httpx.MockTransport(lambda request: httpx.Response(200, json=ANSWER))))",
        "messages = [{'role': 'user', 'content': 'where is my order?'}]",
        setup, call, "assert provider.force_flush(30_000)",
    ])
    (tmp_path / "snippet.py").write_text(script)
    run = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = server.scrape()
    labels = {"app": "docs-snippet", "provider": "openai", "model": "gpt-4o-mini-2024-07-18"}
    assert series(got, "llm_requests_total", **labels) == 1
    tokens = {t: series(got, "llm_tokens_total", token_type=t, **labels) for t in ("input", "cache_read", "output", "reasoning")}
    assert tokens == {"input": 1_000, "cache_read": 4_000, "output": 200, "reasoning": 100}
    sh = doc_block("sh", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    assert "http://127.0.0.1:9473/v1/traces" in sh and "http/protobuf" in sh


def test_the_collector_configuration_sends_traces_to_the_receiver() -> None:
    """deploy/otel-collector.yaml: one traces pipeline from the OTLP receiver through
    memory_limiter and batch to an otlphttp exporter posting protobuf to /v1/traces, every
    component it names defined, batches well under the exporter's body limit."""
    cfg = yaml.safe_load(COLLECTOR.read_text())
    pipeline = cfg["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["processors"] == ["memory_limiter", "batch"]
    for kind in ("receivers", "processors", "exporters"):
        for name in pipeline[kind]:
            assert name in cfg[kind], f"{kind}: {name} is used but not defined"
    assert set(cfg["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    (exporter,) = pipeline["exporters"]
    assert exporter.split("/")[0] == "otlphttp"
    out = cfg["exporters"][exporter]
    assert out["traces_endpoint"] == "${env:LLM_EXPORTER_TRACES_ENDPOINT}"
    assert "/v1/traces" in COLLECTOR.read_text().split("docker run", 1)[1].split("\n")[1]
    assert out["encoding"] == "proto" and out["compression"] == "gzip"
    assert out["headers"]["Authorization"] == "Bearer ${env:LLM_EXPORTER_TOKEN}"
    assert out["retry_on_failure"]["enabled"] is True
    assert cfg["processors"]["batch"]["send_batch_max_size"] <= 4096


# --- bodies posted by hand: JSON, partial success, refusals ---------------------------------

def otlp_json(spans: list[Any], service: str = "json-app") -> dict[str, Any]:
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "manual"}, "spans": spans}]}]}


def json_span(span_id: str, attrs: dict[str, Any], start_ns: int, seconds: float, **extra: Any) -> dict[str, Any]:
    def value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        if isinstance(v, list):
            return {"arrayValue": {"values": [value(x) for x in v]}}
        return {"stringValue": v}
    return {"traceId": "5B8EFFF798038103D269B633813FC60C", "spanId": span_id, "name": "chat", "kind": 3,
            "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(start_ns + int(seconds * 1e9)),
            "attributes": [{"key": k, "value": value(v)} for k, v in attrs.items()], **extra}


def test_an_otlp_json_body_with_one_bad_span_gets_a_partial_success(server: Server) -> None:
    t0 = time.time_ns() - 30 * 10**9
    good = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.input_tokens": 5_300,
            "gen_ai.usage.cache_read.input_tokens": 5_000, "gen_ai.usage.output_tokens": 700,
            "gen_ai.response.time_to_first_chunk": 0.8, "gen_ai.response.id": "msg_01JsonJsonJsonJsonJson01"}
    bad = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
           "gen_ai.request.model": "claude-sonnet-4-5", "gen_ai.usage.output_tokens": -5}
    body = otlp_json([json_span("EEE19B7EC3C1B174", good, t0, 4.0),
                      json_span("EEE19B7EC3C1B175", bad, t0, 1.0),
                      json_span("EEE19B7EC3C1B176", {"db.system.name": "postgresql"}, t0, 0.01),
                      json_span("EEE19B7EC3C1B177", good, t0, 4.0, status={"code": 2, "message": "stream broke"})])
    r = server.client.post("/v1/traces", content=orjson.dumps(body), headers=JSON)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    partial = r.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1"
    assert partial["errorMessage"] == ("1 of 3 GenAI spans rejected as usage records: span "
                                       "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b175: output_tokens: must be "
                                       "between 0 and 1000000000, got -5")
    got = server.scrape()
    labels = {"app": "json-app", "model": "claude-sonnet-4-5"}
    assert series(got, "llm_requests_total", **labels) == 1          # the fourth repeats the first's response id
    assert series(got, "llm_tokens_total", token_type="input", **labels) == 300
    assert series(got, "llm_tokens_total", token_type="cache_read", **labels) == 5_000
    assert series(got, "llm_time_to_first_token_seconds_sum", **labels) == pytest.approx(0.8)
    assert series(got, "llm_request_duration_seconds_sum", **labels) == pytest.approx(4.0)

    # a fully accepted JSON export answers an empty response object
    r = server.client.post("/v1/traces", content=orjson.dumps(otlp_json([])), headers=JSON)
    assert r.status_code == 200 and r.json() == {}


def test_a_protobuf_export_with_rejected_spans_gets_a_protobuf_partial_success(server: Server) -> None:
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "pb-app"}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("llm-app")
    t0 = time.time_ns() - 10**10
    model_call(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                                "gen_ai.usage.input_tokens": 10}, t0, 1.0)             # no provider
    model_call(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 10,
                                "gen_ai.response.time_to_first_chunk": 9.0}, t0, 1.0)  # TTFT after the end
    model_call(tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 10}, t0, 1.0)
    provider.shutdown()
    body = gzip.compress(encode_spans(kept.get_finished_spans()).SerializeToString())
    r = server.client.post("/v1/traces", content=body, headers={**PROTOBUF, "Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    answer = ExportTraceServiceResponse.FromString(r.content)
    assert answer.HasField("partial_success") and answer.partial_success.rejected_spans == 2
    msg = answer.partial_success.error_message
    assert msg.startswith("2 of 3 GenAI spans rejected as usage records: span ")
    assert "provider: is required" in msg and "ttft_s: (9) exceeds latency_s (1)" in msg
    assert series(server.scrape(), "llm_requests_total", app="pb-app") == 1

    # a full success leaves partial_success unset
    r = server.client.post("/v1/traces", content=b"", headers=PROTOBUF)
    assert r.status_code == 200 and not ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")


def test_junk_gets_one_400_in_the_requests_encoding(server: Server) -> None:
    """Not N rejected records: one refusal, a google.rpc.Status, nothing counted."""
    before = server.scrape()
    for body, headers, says in (
        (b"\xff\xfe this is not protobuf" * 100, PROTOBUF, "not a valid OTLP protobuf"),
        (b"hello world", PROTOBUF, "not a valid OTLP protobuf"),
        (orjson.dumps({"resourceSpans": []}), PROTOBUF, "not a valid OTLP protobuf"),    # JSON sent as protobuf
        (b"x" * 10_000, JSON, "malformed JSON"),
        (b"", JSON, "empty body"), (b"\r\n ", JSON, "empty body"),       # protobuf's empty message, not JSON's
        (orjson.dumps([{"provider": "openai", "model": "gpt-4o"}]), JSON, "usage records go to /v1/records"),
        (orjson.dumps({"resource_spans": []}), JSON, "lowerCamelCase"),
        (orjson.dumps({"resourceSpans": {"not": "a list"}}), JSON, "resourceSpans must be an array"),
    ):
        r = server.client.post("/v1/traces", content=body, headers=headers)
        assert r.status_code == 400, (body[:40], r.text)
        if headers is PROTOBUF:
            assert r.headers["content-type"] == "application/x-protobuf"
            status = RpcStatus.FromString(r.content)
            assert status.code == 3 and says in status.message, status.message
        else:
            assert r.headers["content-type"] == "application/json"
            assert r.json()["code"] == 3 and says in r.json()["message"], r.json()
    after = server.scrape()
    for result in ("accepted", "duplicate", "rejected"):
        assert series(after, "llm_exporter_records_total", result=result) == \
            series(before, "llm_exporter_records_total", result=result)


def test_refusals_follow_otlp_http(server: Server) -> None:
    body = orjson.dumps(otlp_json([]))
    r = server.client.post("/v1/traces", content=body, headers={"Content-Type": "text/plain", **AUTH})
    assert r.status_code == 415 and "application/x-protobuf" in r.json()["message"]
    r = server.client.post("/v1/traces", content=body, headers={**JSON, "Content-Encoding": "br"})
    assert r.status_code == 415 and r.json()["code"] == 3
    r = server.client.post("/v1/traces", content=b"\x1f\x8b not gzip", headers={**PROTOBUF, "Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in RpcStatus.FromString(r.content).message
    # the same tokens as the record endpoints: none or a wrong one 401, a read-only one 403
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                            ({"Authorization": f"Bearer {READ_TOKEN}"}, 403)):
        r = httpx.post(server.url + "/v1/traces", content=b"", timeout=10,
                       headers={"Content-Type": "application/x-protobuf", **headers})
        assert r.status_code == status and r.headers["content-type"] == "application/x-protobuf"
        assert RpcStatus.FromString(r.content).message
    r = httpx.post(server.url + "/v1/traces", content=b"{}", timeout=10, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["code"] == 16
    # the SDK's exporter without the token: a failure it does not retry
    sdk = Sdk(server, "no-token", headers={"Authorization": "Bearer wrong"}, timeout=5, batch=False)
    model_call(sdk.tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                    "gen_ai.request.model": "gpt-4o-mini"}, time.time_ns() - 10**9, 0.5)
    t = time.monotonic()
    assert sdk.exporter.export(sdk.spans) == SpanExportResult.FAILURE
    assert time.monotonic() - t < 4
    sdk.close()


def test_a_body_over_the_limit_is_refused_with_413(tmp_path: Path) -> None:
    with Server(tmp_path, tmp_path / "u.db", "--max-body-bytes", "4096") as srv:
        r = srv.client.post("/v1/traces", content=b"\x0a\x00" * 4000, headers={"Content-Type": "application/x-protobuf"})
        assert r.status_code == 413 and "max_body_bytes" in RpcStatus.FromString(r.content).message
        bomb = gzip.compress(b"\x0a\x00" * 100_000)
        assert len(bomb) < 4096
        r = srv.client.post("/v1/traces", content=bomb,
                            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})
        assert r.status_code == 413 and "decompressed" in RpcStatus.FromString(r.content).message


# --- GenAI attributes posted as a record ------------------------------------------------------

def test_genai_attributes_posted_as_records_keep_cache_reasoning_ids_and_ttft(server: Server) -> None:
    """Span attributes serialised flat to JSON and posted to /v1/records: the same mapping as
    the receiver (cache and reasoning split, response id for dedupe, TTFT, service.name)."""
    t = time.time() - 120
    record = {"ts": t, "service.name": "flat-app", "gen_ai.operation.name": "chat",
              "gen_ai.provider.name": "openai", "gen_ai.request.model": "o4-mini",
              "gen_ai.usage.input_tokens": 9_000, "gen_ai.usage.cache_read.input_tokens": 6_000,
              "gen_ai.usage.output_tokens": 2_500, "gen_ai.usage.reasoning.output_tokens": 2_000,
              "gen_ai.response.time_to_first_chunk": 1.5, "latency_ms": 6_000,
              "gen_ai.response.id": "chatcmpl-FlatFlatFlatFlat0001", "gen_ai.response.finish_reasons": ["length"]}
    failed = {"ts": t, "service.name": "flat-app", "gen_ai.provider.name": "anthropic",
              "gen_ai.request.model": "claude-sonnet-4-5", "error.type": "overloaded_error"}
    for attempt in range(2):        # the client retries the whole batch
        r = server.client.post("/v1/records", json=[record, failed])
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == (2 if attempt == 0 else 1) and r.json()["duplicate"] == (0 if attempt == 0 else 1)
    got = server.scrape()
    labels = {"app": "flat-app", "model": "o4-mini"}
    assert series(got, "llm_requests_total", **labels) == 1
    tokens = {t: series(got, "llm_tokens_total", token_type=t, **labels)
              for t in ("input", "cache_read", "output", "reasoning", "cache_write")}
    assert tokens == {"input": 3_000, "cache_read": 6_000, "output": 500, "reasoning": 2_000, "cache_write": 0}
    price = prices(server, "openai", "o4-mini")
    cost = 3_000 * price["input"] + 6_000 * price["cache_read"] + 500 * price["output"] + 2_000 * price["reasoning"]
    assert series(got, "llm_cost_usd_total", **labels) == pytest.approx(cost, rel=1e-9)
    assert series(got, "llm_time_to_first_token_seconds_sum", **labels) == pytest.approx(1.5)
    # the error carries no response id, so its retry counted again; its type is right
    assert series(got, "llm_request_errors_total", app="flat-app", error_type="server_error") == 2


# --- hostile bodies ---------------------------------------------------------------------------

def test_sixteen_mib_of_empty_spans_costs_bounded_memory(server: Server) -> None:
    """8 million empty spans in one scope (two bytes each; parsed at once they take 1.4 GB):
    all counted as ignored, the server's peak memory a small multiple of the body, /healthz
    answering all the while. Then 5.6 million as JSON."""
    from test_hostile import Prober, peak_rss_mb

    def ld(tag: int, payload: bytes) -> bytes:
        n, head = len(payload), bytearray([tag])
        while n >= 0x80:
            head.append(n & 0x7F | 0x80)
            n >>= 7
        head.append(n)
        return bytes(head) + payload
    spans = (16 * MIB - 32) // 2
    body = ld(0x0A, ld(0x12, b"\x12\x00" * spans))
    before_rss = peak_rss_mb(server.proc.pid)
    before = server.scrape()
    probe = Prober(server.url, "/healthz")
    r = probe.around(lambda: server.client.post("/v1/traces", content=body, headers=PROTOBUF, timeout=300))
    assert r.status_code == 200 and r.content == b""
    grew = peak_rss_mb(server.proc.pid) - before_rss
    assert grew < 300, f"peak RSS grew by {grew:.0f} MB for a 16 MiB body"
    probe.assert_not_held_up()
    after = server.scrape()
    assert series(after, "llm_exporter_otlp_spans_total", result="ignored") \
        - series(before, "llm_exporter_otlp_spans_total", result="ignored") == spans
    # the same as OTLP/JSON: the decoded JSON document is the cost (as on /v1/records)
    n = (16 * MIB - 64) // 3
    body = b'{"resourceSpans":[{"scopeSpans":[{"spans":[' + b"{}," * (n - 1) + b"{}]}]}]}"
    r = server.client.post("/v1/traces", content=body, headers=JSON, timeout=300)
    assert r.status_code == 200 and r.json() == {}
    assert peak_rss_mb(server.proc.pid) < 1024
    assert series(server.scrape(), "llm_exporter_otlp_spans_total", result="ignored") \
        - series(after, "llm_exporter_otlp_spans_total", result="ignored") == n



# --- the mapping and the decoder, in process ------------------------------------------------

@pytest.mark.parametrize("error_type, status, expected", [
    ("openai.RateLimitError", None, "rate_limit"),
    ("<class 'openai.RateLimitError'>", None, "rate_limit"),
    ("<class 'openai.APIConnectionError'>", 502, "server_error"),
    ("anthropic.RateLimitError", 429, "rate_limit"),
    ("rate_limit_exceeded", None, "rate_limit"),
    ("insufficient_quota", None, "rate_limit"),
    ("RESOURCE_EXHAUSTED", None, "rate_limit"),
    ("overloaded_error", None, "server_error"),
    ("anthropic.InternalServerError", None, "server_error"),
    ("api_error", None, "server_error"),
    ("openai.APITimeoutError", None, "timeout"),
    ("httpx.ReadTimeout", None, "timeout"),
    ("TimeoutError", None, "timeout"),
    ("openai.BadRequestError", 400, "client_error"),
    ("context_length_exceeded", None, "client_error"),
    ("openai.AuthenticationError", None, "client_error"),
    ("content_filter", 400, "content_filter"),
    ("500", None, "server_error"),
    ("429", None, "rate_limit"),
    ("_OTHER", None, "other"),
    ("_OTHER", 503, "server_error"),                 # an unknown type never hides a known status
    ("openai.APIConnectionError", None, "server_error"),   # the provider could not be reached
    ("SomethingNew", 504, "timeout"),
])
def test_error_type_classification(error_type: str, status: int | None, expected: str) -> None:
    assert error_class(error_type, status) == expected


def test_token_counts_follow_the_conventions() -> None:
    base = {"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5"}
    # input includes cache reads and writes, output includes reasoning: both subtracted
    got = record_fields({**base, "gen_ai.usage.input_tokens": 1_100, "gen_ai.usage.cache_read.input_tokens": 800,
                         "gen_ai.usage.cache_creation.input_tokens": 200, "gen_ai.usage.output_tokens": 90,
                         "gen_ai.usage.reasoning.output_tokens": 60})
    assert (got["input_tokens"], got["cache_read_tokens"], got["cache_write_tokens"]) == (100, 800, 200)
    assert (got["output_tokens"], got["reasoning_tokens"]) == (30, 60)
    # an input smaller than its cached part cannot include it (Anthropic's own counting)
    got = record_fields({**base, "gen_ai.usage.input_tokens": 12, "gen_ai.usage.cache_read.input_tokens": 5_000})
    assert (got["input_tokens"], got["cache_read_tokens"]) == (12, 5_000)
    # the older attribute names
    got = record_fields({"gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
                         "gen_ai.usage.prompt_tokens": 50, "gen_ai.usage.completion_tokens": 7,
                         "gen_ai.usage.cache_read_input_tokens": 20})
    assert (got["provider"], got["input_tokens"], got["output_tokens"], got["cache_read_tokens"]) == ("openai", 30, 7, 20)
    # the model that answered is priced, not the alias asked for
    assert record_fields({"gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06"})["model"] \
        == "gpt-4o-2024-08-06"
    # a response id too short to be unique is no idempotency key (a local server's chatcmpl-123)
    assert "request_id" not in record_fields({"gen_ai.response.id": "chatcmpl-123"})
    assert record_fields({"gen_ai.response.id": "chatcmpl-B9xY2kPz9R4mN8vT"})["request_id"] == "chatcmpl-B9xY2kPz9R4mN8vT"


def test_which_spans_are_model_calls() -> None:
    assert is_model_call({"gen_ai.operation.name": "chat"})
    assert is_model_call({"gen_ai.operation.name": "embeddings", "gen_ai.request.model": "text-embedding-3-small"})
    assert is_model_call({"gen_ai.request.model": "gpt-4o"})                     # no operation named
    assert is_model_call({"gen_ai.operation.name": "realtime_turn", "gen_ai.request.model": "gpt-4o-realtime"})
    for op in ("invoke_agent", "create_agent", "invoke_workflow", "execute_tool", "retrieval"):
        assert not is_model_call({"gen_ai.operation.name": op, "gen_ai.request.model": "gpt-4o"}), op
    assert not is_model_call({"gen_ai.conversation.id": "conv-1"})
    assert service_app("unknown_service:python") is None and service_app("billing-agent") == "billing-agent"


def _request_bytes(n_spans: int, content: int = 0, resource_last: bool = False) -> bytes:
    """A protobuf ExportTraceServiceRequest of GenAI spans (each with `content` bytes of prompt
    text); with `resource_last`, the resource is encoded after its spans."""

    def kv(k: str, v: Any) -> KeyValue:
        if isinstance(v, int):
            return KeyValue(key=k, value=AnyValue(int_value=v))
        return KeyValue(key=k, value=AnyValue(string_value=v))
    t0 = time.time_ns() - 3600 * 10**9
    spans = [Span(trace_id=bytes([1] * 16), span_id=(i + 1).to_bytes(8, "big"), name="chat",
                  start_time_unix_nano=t0 + i * 10**9, end_time_unix_nano=t0 + i * 10**9 + 2 * 10**9,
                  attributes=[kv("gen_ai.operation.name", "chat"), kv("gen_ai.provider.name", "openai"),
                              kv("gen_ai.request.model", "gpt-4o-mini"), kv("gen_ai.usage.input_tokens", 100 + i),
                              kv("gen_ai.input.messages", "p" * content), kv("gen_ai.usage.output_tokens", 7)])
             for i in range(n_spans)]
    rs = ResourceSpans()
    rs.resource.attributes.append(kv("service.name", "chunked"))
    ss = rs.scope_spans.add()
    ss.spans.extend(spans)
    if not resource_last:
        return ExportTraceServiceRequest(resource_spans=[rs]).SerializeToString()
    resource_field = ResourceSpans(resource=rs.resource).SerializeToString()
    scopes_field = ResourceSpans(scope_spans=rs.scope_spans).SerializeToString()
    inner = scopes_field + resource_field           # fields may come in any order on the wire
    return b"\x0a" + _varint(len(inner)) + inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.mark.parametrize("chunk", [64, 300, 5_000])
@pytest.mark.parametrize("content, resource_last", [(0, False), (2_000, False), (0, True)])
def test_a_body_read_in_runs_decodes_as_a_whole(monkeypatch: pytest.MonkeyPatch, chunk: int, content: int,
                                                resource_last: bool) -> None:
    """Decoding a run of at most CHUNK bytes at a time (spans cut apart, a span larger than
    CHUNK read field by field, its prompt skipped, the resource after its spans) gives the
    same records as decoding the body at once."""
    body = _request_bytes(40, content, resource_last)
    whole = otlp.decode_traces(body, protobuf=True)
    assert len(whole.items) == 40 and whole.items[3]["input_tokens"] == 103 and whole.items[3]["service.name"] == "chunked"
    monkeypatch.setattr(otlp, "CHUNK", chunk)
    cut = otlp.decode_traces(body, protobuf=True)
    assert cut.items == whole.items and cut.indices == whole.indices
    assert (cut.spans, cut.ignored) == (40, 0)


def test_service_name_is_an_app_source_of_its_own() -> None:
    """`service.name` is the `service_name` source of the app precedence, on both ingest paths:
    spans decoded by the receiver (our own field names, the columnar path) and GenAI
    attributes posted flat (the per-record path) take their app by the same order."""
    now = time.time()
    items = otlp.decode_traces(_request_bytes(2), protobuf=True).items
    flat = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini", "service.name": "chunked"}
    cases = [
        (Attribution(), "chunked"),                                      # the default: before the header
        (Attribution().for_request("hdr", None), "chunked"),
        (Attribution(("header", "service_name")).for_request("hdr", None), "hdr"),
        (Attribution(("app", "header")).for_request("hdr", None), "hdr"),
        (Attribution(("app", "key_alias")), "unknown"),                 # not in the precedence: not used
    ]
    for attribution, expected in cases:
        cols, rejections, _ = parse_batch(items, now, attribution=attribution)
        assert rejections.total == 0 and list(cols.app) == [expected] * 2, attribution
        slow = [items[0], {**items[1], "latency_ms": 2_000}]            # an alias: the per-record path
        assert list(parse_batch(slow, now, attribution=attribution)[0].app) == [expected] * 2, attribution
        assert list(parse_batch([flat], now, attribution=attribution)[0].app) == [expected], attribution
    # the record's own app comes first by default; the SDK's default service name names nothing
    own = parse_batch([{**items[0], "app": "mine"}, {**flat, "app": "mine"}], now)[0]
    assert list(own.app) == ["mine", "mine"]
    unnamed = [{**items[0], "service.name": "unknown_service:python"},
               {**flat, "service.name": "unknown_service"}]
    assert list(parse_batch(unnamed, now, attribution=Attribution().for_request("hdr", None))[0].app) == ["hdr"] * 2


@pytest.mark.parametrize("body", [b"\x0a\x05\x12\x03\x12\x01", b"\x0a\xff\xff\xff\xff\x7f", b"\x0f", b"\x0a\x02\x12"])
def test_truncated_or_malformed_protobuf_is_bad_traces(body: bytes) -> None:
    with pytest.raises(BadTraces):
        decode_traces(body, protobuf=True)
