"""The OTLP trace receiver: GenAI spans over OTLP/HTTP into a real `llm-usage-exporter serve`.

* Spans: the realistic records of `common` made into spans by the OpenTelemetry SDK, as an
  instrumented application makes them: one TracerProvider per app (`service.name`), a
  `chat` client span per record with the GenAI attributes (usage with its cached part,
  time to first chunk, finish reasons, response id, `error.type` and an error status on
  failures), and for every three model calls one HTTP server span, which the receiver
  ignores. Encoded with the SDK's own OTLP encoder into requests of 1,000 spans.
* Over HTTP: a separate client process posts the requests as binary protobuf on 2
  keep-alive connections for a fixed time, gzip-compressed (as the Collector's otlphttp
  exporter sends) and plain (the SDK's default); each send swaps a batch number into the
  response ids, so every record is new. Records/s and spans/s come from the server's own
  `llm_exporter_otlp_spans_total`, with records per server CPU-second. Then the same
  records as JSON to `/v1/records` on the same server, for the ratio.
* In process: `decode_traces` alone, per span, on the same protobuf requests and on
  their OTLP/JSON form.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import multiprocessing as mp
import threading
import time
from typing import Any

import numpy as np
import orjson

import common

PLACEHOLDER = "QQQQQQQQ"
BATCH = 1000            # spans per request
PROVIDER_NAMES = {"google": "gcp.gemini"}       # our provider names as gen_ai.provider.name
ERROR_TYPES = {"rate_limit": "openai.RateLimitError", "timeout": "openai.APITimeoutError",
               "server_error": "openai.InternalServerError"}


def span_requests(n_requests: int, now: float, seed: int = 5) -> tuple[list[bytes], int]:
    """`n_requests` protobuf ExportTraceServiceRequests of BATCH spans, and the model-call
    spans in each."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, Status, StatusCode

    rng = np.random.default_rng(seed)
    kept = InMemorySpanExporter()
    tracers = {}
    for app in common.APPS:
        provider = TracerProvider(resource=Resource.create({"service.name": app}))
        provider.add_span_processor(SimpleSpanProcessor(kept))
        tracers[app] = provider.get_tracer("bench-app", "1.0")
    calls = BATCH * 3 // 4
    out = []
    for j in range(n_requests):
        kept.clear()
        records = common.realistic_records(calls, now, rng, f"r{j:03d}")
        for i, r in enumerate(records):
            tracer = tracers[r["app"]]
            start = int(r["ts"] * 1e9)
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": PROVIDER_NAMES.get(r["provider"], r["provider"]),
                "gen_ai.request.model": r["model"], "gen_ai.response.model": r["model"],
                "gen_ai.usage.input_tokens": r["input_tokens"] + r.get("cache_read_tokens", 0),
                "gen_ai.usage.output_tokens": r["output_tokens"],
                "server.address": "api.example.com", "server.port": 443,
            }
            if r.get("cache_read_tokens"):
                attrs["gen_ai.usage.cache_read.input_tokens"] = r["cache_read_tokens"]
            if r.get("stream"):
                attrs["gen_ai.request.stream"] = True
                attrs["gen_ai.response.time_to_first_chunk"] = r["ttft_s"]
            if r.get("status") == "error":
                attrs["error.type"] = ERROR_TYPES[r["error_type"]]
            else:
                attrs["gen_ai.response.id"] = f"chatcmpl-{PLACEHOLDER}{j:03d}{i:06d}x"
                attrs["gen_ai.response.finish_reasons"] = ["stop"]
            if i % 3 == 0:
                parent = tracer.start_span("POST /chat", kind=SpanKind.SERVER, start_time=start - 5_000_000,
                                           attributes={"http.request.method": "POST", "http.route": "/chat",
                                                       "http.response.status_code": 200})
                parent.end(end_time=start + int(r["latency_s"] * 1e9) + 5_000_000)
            span = tracer.start_span(f"chat {r['model']}", kind=SpanKind.CLIENT, start_time=start, attributes=attrs)
            if r.get("status") == "error":
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=start + int(r["latency_s"] * 1e9))
        spans = kept.get_finished_spans()
        out.append(encode_spans(spans).SerializeToString())
    return out, calls


def records_pool(n_requests: int, now: float, seed: int = 5) -> list[bytes]:
    """The same records as JSON batches for /v1/records (placeholder in the request ids)."""
    rng = np.random.default_rng(seed)
    return [orjson.dumps(common.realistic_records(BATCH * 3 // 4, now, rng, f"{PLACEHOLDER}r{j:03d}"))
            for j in range(n_requests)]


def _client(port: int, server_pid: int, pool: list[bytes], path: str, headers: dict[str, str], duration: float,
            connections: int, out: Any) -> None:
    """Runs in the client process: post the pool round and round for `duration` seconds."""
    seq = iter(range(10**9))
    conns = [common.http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(connections)]
    gz = headers.get("Content-Encoding") == "gzip"
    marker = PLACEHOLDER.encode()
    statuses: list[int] = []
    lock = threading.Lock()

    def send(conn: Any, n: int) -> int:
        body = pool[n % len(pool)].replace(marker, b"%08x" % n)
        conn.request("POST", path, body=gzip.compress(body, 1) if gz else body, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status

    send(conns[0], next(seq))           # warm-up

    def worker(conn: Any, deadline: float) -> None:
        while time.perf_counter() < deadline:
            st = send(conn, next(seq))
            with lock:
                statuses.append(st)

    _, elapsed, server_cpu = common.drive(conns, worker, duration, server_pid)
    out.send({"elapsed": elapsed, "server_cpu": server_cpu,
              "requests": len(statuses), "non_200": sum(1 for s in statuses if s != 200)})
    out.close()


def metric(server: common.Server, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    _, text = server.get("/metrics")
    total = 0.0
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def post_for(server: common.Server, pool: list[bytes], path: str, headers: dict[str, str], duration: float,
             connections: int, counter: tuple[str, dict[str, str]]) -> dict[str, Any]:
    before = metric(server, counter[0], **counter[1])
    here, there = mp.get_context("fork").Pipe(duplex=False)
    proc = mp.get_context("fork").Process(target=_client, args=(server.port, server.proc.pid, pool, path, headers,
                                                                duration, connections, there))
    proc.start()
    there.close()
    res = here.recv()
    proc.join(timeout=60)
    counted = metric(server, counter[0], **counter[1]) - before
    res["counted"] = counted
    res["per_s"] = counted / res["elapsed"]
    res["per_cpu_s"] = counted / max(res["server_cpu"], 1e-9)
    return res


def json_form(body: bytes) -> bytes:
    """The OTLP/JSON encoding of a protobuf request (hex ids, integers as strings)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    doc = MessageToDict(ExportTraceServiceRequest.FromString(body), use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in sp:
                        sp[key] = base64.b64decode(sp[key]).hex()
    return orjson.dumps(doc)


def decode_per_span(pool: list[bytes], protobuf: bool, repeats: int) -> float:
    """Median µs per span of decode_traces over the pool."""
    from exporter.ingest.otlp import decode_traces
    times = []
    for _ in range(repeats):
        for body in pool:
            t = time.perf_counter()
            traces = decode_traces(body, protobuf)
            times.append((time.perf_counter() - t) / traces.spans * 1e6)
    return common.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.duration or (3.0 if args.quick else 10.0)
    n_pool = 4 if args.quick else 16
    now = time.time()
    t = time.perf_counter()
    pool, calls = span_requests(n_pool, now)
    build_s = time.perf_counter() - t
    spans_per_request = BATCH * 3 // 4 + (BATCH * 3 // 4 + 2) // 3
    records = records_pool(n_pool, now)
    pb = {"Content-Type": "application/x-protobuf"}
    record_counter = ("llm_exporter_otlp_spans_total", {"result": "record"})
    with common.scratch_dir("otlp") as d:
        with common.Server(common.Path(d) / "bench.db") as server:
            gz = post_for(server, pool, "/v1/traces", {**pb, "Content-Encoding": "gzip"}, duration, args.connections,
                          record_counter)
            plain = post_for(server, pool, "/v1/traces", pb, duration, args.connections, record_counter)
            ours = post_for(server, records, "/v1/records", {"Content-Type": "application/json"}, duration,
                            args.connections, ("llm_exporter_records_total", {"result": "accepted"}))
    json_pool = [json_form(b) for b in pool[:4]]
    repeats = 2 if args.quick else 5
    decode_pb = decode_per_span(pool[:4], True, repeats)
    decode_json = decode_per_span(json_pool, False, repeats)
    span_share = spans_per_request / calls
    figures = [
        common.figure("records_per_s_gzip", f"GenAI spans as records/s, protobuf + gzip ({duration:g} s, "
                      f"{args.connections} connections, {spans_per_request} spans per request)", gz["per_s"], "rec/s", decimals=0),
        common.figure("spans_per_s_gzip", "  all spans/s (a quarter of them ignored HTTP spans)",
                      gz["per_s"] * span_share, "spans/s", decimals=0),
        common.figure("records_per_server_cpu_s_gzip", "  records per server CPU-second", gz["per_cpu_s"], "rec/CPU-s",
                      decimals=0),
        common.figure("records_per_s_plain", "GenAI spans as records/s, protobuf uncompressed", plain["per_s"], "rec/s",
                      decimals=0),
        common.figure("records_per_server_cpu_s_plain", "  records per server CPU-second", plain["per_cpu_s"],
                      "rec/CPU-s", decimals=0),
        common.figure("records_json_per_s", "the same records as JSON to /v1/records", ours["per_s"], "rec/s", decimals=0),
        common.figure("ratio_cpu", "  ratio: OTLP protobuf / own JSON, records per server CPU-second",
                      plain["per_cpu_s"] / max(ours["per_cpu_s"], 1e-9), "x", decimals=2),
        common.figure("decode_pb_us", "decode_traces, protobuf: per span (in process)", decode_pb, "µs", decimals=2),
        common.figure("decode_json_us", "decode_traces, OTLP/JSON: per span (in process)", decode_json, "µs", decimals=2),
    ]
    ok = gz["non_200"] == 0 and plain["non_200"] == 0 and ours["non_200"] == 0 and gz["counted"] > 0
    return {"name": "otlp", "figures": figures, "ok": ok,
            "detail": {"gzip": gz, "plain": plain, "records_json": ours, "build_pool_s": build_s,
                       "request_bytes": int(np.median([len(b) for b in pool])), "duration_s": duration}}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None, help="seconds of each HTTP run (default 10, quick 3)")
    p.add_argument("--connections", type=int, default=2, help="keep-alive connections of the client process")


if __name__ == "__main__":
    common.cli("otlp", run, _args)
