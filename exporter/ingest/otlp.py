"""OTLP trace exports (OTLP/HTTP, binary protobuf or JSON) as usage records.

An `ExportTraceServiceRequest` holds resources, each with scopes of spans. A span that
reports one model call by the GenAI semantic conventions becomes one record: its
attributes through `genai.record_fields`, its start time as `ts`, its duration as
`latency_s`, its resource's `service.name` as the app (the `service_name` source of the
app precedence, `ingest.attribution`), an error status as an error. Its
`gen_ai.response.id` is the request id; without one, the trace and span ids are (an
exporter that retries sends the same ids again). The trace id is the session when no
`gen_ai.conversation.id` names one, so an agent run's calls are one session for the loop
detector. Every other span (HTTP, database, agent and tool spans) is ignored and counted.

Protobuf is decoded with `opentelemetry-proto`'s messages, a run of at most `CHUNK` bytes
at a time (`protowire`): memory stays a small multiple of the body whatever it holds. Only
the attributes the mapping reads are turned into Python values; prompt and completion
attributes are never decoded. JSON follows OTLP's JSON encoding (lowerCamelCase keys, hex
trace and span ids, 64-bit integers as strings or numbers).

A body that is not such a request is a `BadTraces` (HTTP 400); a span that cannot be a
record is rejected under its number, and the others still count.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from . import genai
from .protowire import RUN, WireError, has_field, runs
from .rejections import DEFAULT_LIMIT, Rejected, Rejections

CHUNK = 1 << 19                 # bytes of protobuf parsed at once
STATUS_ERROR = 2                # Span.Status.code STATUS_CODE_ERROR
WANTED = genai.READ | {genai.SERVICE_NAME}
RESULTS = ("record", "ignored")     # what became of the spans received: `llm_exporter_otlp_spans_total{result}`
MAX_LISTED = 5                  # rejected spans named in a partial-success message


class BadTraces(ValueError):
    """The body is not an OTLP trace export request (HTTP 400)."""


@dataclass(slots=True)
class SpanView:
    """What a span tells about usage, whichever encoding it came in."""

    attrs: dict[str, Any] = field(default_factory=dict)
    trace_id: str | None = None         # lower-case hex
    span_id: str | None = None
    start_ns: int = 0
    end_ns: int = 0
    error: bool = False
    bad: str | None = None              # why the span cannot be read (JSON only)


@dataclass(slots=True)
class Traces:
    """A decoded request: a record item per model-call span, numbered by the span's
    position in the request, and the rest counted."""

    items: list[dict[str, Any]]
    indices: list[int]
    rejections: Rejections
    spans: int = 0
    ignored: int = 0
    names: dict[int, str] = field(default_factory=dict)      # spans rejected while decoding

    @property
    def records(self) -> int:
        """Spans that count as usage records (accepted, duplicate or rejected)."""
        return self.spans - self.ignored

    def add(self, app: str | None, view: SpanView) -> None:
        """Count one span: a record item, a rejection, or ignored."""
        number = self.spans
        self.spans += 1
        if view.bad is not None:
            self.rejections.add(Rejected(number, "span", view.bad))
            self.names[number] = _span_ref(view)
            return
        item = record_item(view, app)
        if item is None:
            self.ignored += 1
            return
        self.items.append(item)
        self.indices.append(number)

    def counts(self) -> dict[str, int]:
        return {"record": self.records, "ignored": self.ignored}

    def describe(self, number: int) -> str:
        """How a partial-success message names span `number`."""
        if number in self.names:
            return self.names[number]
        k = bisect_left(self.indices, number)
        if k < len(self.indices) and self.indices[k] == number:
            return _describe(self.items[k])
        return f"#{number}"


class SpanCounts:
    """Spans received over the exporter's life, by result. They are saved in the store's
    meta in the same transaction as the batch of records they came with (`pending`), and
    added here once it is committed (`add`), so they resume after a restart as the record
    counters do."""

    META_KEY = "otlp_spans_total"

    def __init__(self, saved: str | None = None) -> None:
        self.total = dict.fromkeys(RESULTS, 0.0)
        if saved:
            loaded = orjson.loads(saved)
            for k in RESULTS:
                self.total[k] = float(loaded.get(k, 0.0))

    def pending(self, counts: Mapping[str, int]) -> dict[str, str]:
        """The store meta that records `counts` added."""
        after = {k: v + counts.get(k, 0) for k, v in self.total.items()}
        return {self.META_KEY: orjson.dumps(after).decode()}

    def add(self, counts: Mapping[str, int]) -> None:
        for k, v in counts.items():
            self.total[k] += v


def decode_traces(body: bytes, protobuf: bool, max_errors: int = DEFAULT_LIMIT) -> Traces:
    """The records of an OTLP/HTTP trace export body (binary protobuf, or JSON)."""
    traces = Traces([], [], Rejections(max_errors))
    if protobuf:
        _protobuf_spans(body, traces)
    else:
        for app, view in _json_spans(body):
            traces.add(app, view)
    return traces


def record_item(view: SpanView, app: str | None) -> dict[str, Any] | None:
    """The record (our field names) of a model-call span; None for any other span."""
    attrs = view.attrs
    if not any(k.startswith("gen_ai.") for k in attrs) or not genai.is_model_call(attrs):
        return None
    item = genai.record_fields(attrs)
    if view.start_ns > 0:
        item["ts"] = view.start_ns / 1e9
        if view.end_ns > 0:
            item["latency_s"] = (view.end_ns - view.start_ns) / 1e9    # a negative one is refused, named
    if app is not None:
        item[genai.SERVICE_NAME] = app
    if "request_id" not in item and view.trace_id and view.span_id:
        item["request_id"] = f"{view.trace_id}-{view.span_id}"
    if "session_id" not in item and view.trace_id:
        item["session_id"] = view.trace_id
    if view.error and item.get("status") != "error":
        code = item.get("status")
        item["status"] = "error"
        item["error_type"] = genai.error_class("", code if isinstance(code, int) else None)
    return item


def partial_success_message(traces: Traces, rejections: Rejections) -> str:
    """Why spans were rejected, for ExportTracePartialSuccess.error_message."""
    listed = [f"span {traces.describe(r.index)}: {r.field}: {r.reason}" for r in rejections.kept[:MAX_LISTED]]
    more = rejections.total - len(listed)
    tail = f"; and {more} more" if more > 0 else ""
    return (f"{rejections.total} of {traces.records} GenAI spans rejected as usage records: "
            + "; ".join(listed) + tail)


def _describe(item: Mapping[str, Any]) -> str:
    return str(item.get("request_id") or "without ids")


def _span_ref(view: SpanView) -> str:
    if view.trace_id and view.span_id:
        return f"{view.trace_id}-{view.span_id}"
    return "without ids"


# --- binary protobuf ---------------------------------------------------------------------

def _protobuf_spans(body: bytes, traces: Traces) -> None:
    buf = body
    try:
        if body and not has_field(buf, 0, len(buf), 1):
            raise BadTraces("the body is not an OTLP ExportTraceServiceRequest: it holds no resource spans "
                            "(send binary protobuf as application/x-protobuf, JSON as application/json)")
        for number, a, b in runs(buf, 0, len(buf), CHUNK):
            if number == RUN:
                for rs in ExportTraceServiceRequest.FromString(buf[a:b]).resource_spans:
                    if not rs.scope_spans:
                        continue
                    app = _app(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        if ss.spans:
                            _scan(ss.spans, app, traces)
            elif number == 1:
                _large_resource_spans(buf, a, b, traces)
    except (DecodeError, WireError, RecursionError) as e:
        raise BadTraces(f"the body is not a valid OTLP protobuf ExportTraceServiceRequest: {e}") from None


def _large_resource_spans(buf: bytes, start: int, end: int, traces: Traces) -> None:
    """A ResourceSpans larger than CHUNK, a run of its fields at a time. Its resource may come
    anywhere among its spans, so the app is given to its records once all are read."""
    app = None
    first = len(traces.items)
    for number, a, b in runs(buf, start, end, CHUNK):
        if number == RUN:
            part = ResourceSpans.FromString(buf[a:b])
            if part.HasField("resource"):
                app = _app(part.resource.attributes) or app
            for ss in part.scope_spans:
                if ss.spans:
                    _scan(ss.spans, None, traces)
        elif number == 1:
            app = _resource_app(buf, a, b) or app
        elif number == 2:
            _large_scope_spans(buf, a, b, None, traces)
    if app is not None:
        for item in traces.items[first:]:
            item[genai.SERVICE_NAME] = app


def _resource_app(buf: bytes, start: int, end: int) -> str | None:
    app = None
    for number, a, b in runs(buf, start, end, CHUNK):
        if number == RUN:
            app = _app(Resource.FromString(buf[a:b]).attributes) or app
    return app          # an attribute larger than CHUNK on its own is no service name


def _large_scope_spans(buf: bytes, start: int, end: int, app: str | None, traces: Traces) -> None:
    for number, a, b in runs(buf, start, end, CHUNK):
        if number == RUN:
            _scan(ScopeSpans.FromString(buf[a:b]).spans, app, traces)
        elif number == 2:
            traces.add(app, _large_span(buf, a, b))


def _large_span(buf: bytes, start: int, end: int) -> SpanView:
    """A span larger than CHUNK (a prompt kept as an attribute, thousands of events), read a
    run of fields at a time; a field larger than CHUNK on its own is skipped."""
    view = SpanView()
    for number, a, b in runs(buf, start, end, CHUNK):
        if number == RUN:
            sp = Span.FromString(buf[a:b])
            view.attrs.update(_attrs(sp.attributes))
            _merge(view, sp)
    return view


def _scan(spans: Iterable[Span], app: str | None, traces: Traces) -> None:
    """Count the spans of one scope; only those with GenAI attributes are looked at further
    (this loop is what a body of a million spans costs)."""
    for sp in spans:
        attrs = _attrs(sp.attributes) if sp.attributes else None
        if not attrs:
            traces.spans += 1
            traces.ignored += 1
            continue
        view = SpanView(attrs)
        _merge(view, sp)
        traces.add(app, view)


def _attrs(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    """The attributes the mapping reads, as Python values."""
    out: dict[str, Any] = {}
    for kv in attributes:
        k = kv.key
        if k in WANTED:
            out[k] = _value(kv.value)
        elif k in genai.PRESENT:
            out[k] = True
    return out


def _merge(view: SpanView, sp: Span) -> None:
    """Add the ids, times and status of `sp` to `view` (a span read in runs: later fields win,
    as in protobuf)."""
    if sp.trace_id:
        view.trace_id = sp.trace_id.hex()
    if sp.span_id:
        view.span_id = sp.span_id.hex()
    if sp.start_time_unix_nano:
        view.start_ns = sp.start_time_unix_nano
    if sp.end_time_unix_nano:
        view.end_ns = sp.end_time_unix_nano
    if sp.status.code:
        view.error = sp.status.code == STATUS_ERROR


_SCALARS = frozenset({"string_value", "int_value", "double_value", "bool_value"})


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind in _SCALARS:
        return getattr(v, kind)
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return None             # key-value lists and bytes: no field of ours holds them


def _app(attributes: Sequence[KeyValue]) -> str | None:
    for kv in attributes:
        if kv.key == genai.SERVICE_NAME:
            return genai.service_app(_value(kv.value))
    return None


# --- JSON --------------------------------------------------------------------------------

def _json_spans(body: bytes) -> Iterator[tuple[str | None, SpanView]]:
    if not body.strip():        # unlike protobuf's, JSON's empty message is `{}`, not no bytes
        raise BadTraces('empty body: an OTLP/JSON export is a JSON object ({"resourceSpans": [...]}, or {})')
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadTraces(f"malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    if not isinstance(doc, dict):
        raise BadTraces(f"the body is a JSON {type(doc).__name__}, not an OTLP ExportTraceServiceRequest "
                        '({"resourceSpans": [...]}); usage records go to /v1/records')
    if doc and "resourceSpans" not in doc:
        hint = (" (OTLP/JSON keys are lowerCamelCase: resourceSpans)" if "resource_spans" in doc
                else "; usage records go to /v1/records")
        raise BadTraces(f"the JSON object has no resourceSpans: it is not an OTLP ExportTraceServiceRequest{hint}")
    for r, rs in enumerate(_list(doc, "resourceSpans", "")):
        where = f"resourceSpans[{r}]"
        if not isinstance(rs, dict):
            raise BadTraces(f"{where} must be an object")
        resource = rs.get("resource") or {}
        if not isinstance(resource, dict):
            raise BadTraces(f"{where}.resource must be an object")
        app = genai.service_app(_json_attrs(resource.get("attributes"), f"{where}.resource").get(genai.SERVICE_NAME))
        for s, ss in enumerate(_list(rs, "scopeSpans", where)):
            if not isinstance(ss, dict):
                raise BadTraces(f"{where}.scopeSpans[{s}] must be an object")
            for sp in _list(ss, "spans", f"{where}.scopeSpans[{s}]"):
                yield app, _json_view(sp)


def _list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    v = obj.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise BadTraces(f"{where + '.' if where else ''}{key} must be an array")
    return v


def _json_view(sp: Any) -> SpanView:
    view = SpanView()
    if not isinstance(sp, dict):
        view.bad = f"must be a JSON object, got {type(sp).__name__}"
        return view
    view.trace_id = _hex_id(sp.get("traceId"), 32)
    view.span_id = _hex_id(sp.get("spanId"), 16)
    try:
        view.attrs = _json_attrs(sp.get("attributes"), "span")
        view.start_ns = _nanos(sp.get("startTimeUnixNano"))
        view.end_ns = _nanos(sp.get("endTimeUnixNano"))
    except BadTraces as e:
        view.bad = str(e)
        return view
    status = sp.get("status")
    view.error = isinstance(status, dict) and status.get("code") == STATUS_ERROR
    return view


def _json_attrs(attributes: Any, where: str) -> dict[str, Any]:
    if attributes is None:
        return {}
    if not isinstance(attributes, list):
        raise BadTraces(f"{where}.attributes must be an array")
    out: dict[str, Any] = {}
    for kv in attributes:
        if not isinstance(kv, dict):
            raise BadTraces(f"{where}.attributes: an attribute must be an object with key and value")
        k = kv.get("key")
        if k in WANTED:
            out[k] = _json_value(kv.get("value"))
        elif k in genai.PRESENT:
            out[k] = True
    return out


def _json_value(v: Any) -> Any:
    if not isinstance(v, dict):
        return None
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        iv = v["intValue"]
        if isinstance(iv, str):
            try:
                return int(iv)
            except ValueError:
                return iv           # refused, by name, when it is read as a count
        return iv
    if "doubleValue" in v:
        dv = v["doubleValue"]
        if isinstance(dv, str):     # "NaN", "Infinity" in proto3 JSON
            try:
                return float(dv)
            except ValueError:
                return dv
        return dv
    if "boolValue" in v:
        return v["boolValue"]
    if "arrayValue" in v:
        arr = v["arrayValue"]
        values = arr.get("values") if isinstance(arr, dict) else None
        return [_json_value(x) for x in values] if isinstance(values, list) else None
    return None


def _hex_id(v: Any, length: int) -> str | None:
    if not isinstance(v, str) or len(v) != length:
        return None
    try:
        int(v, 16)
    except ValueError:
        return None
    h = v.lower()
    return None if h == "0" * length else h


def _nanos(v: Any) -> int:
    """A `...TimeUnixNano` value (a string or a number); 0 when absent."""
    if v is None or v == "":
        return 0
    if isinstance(v, bool):
        raise BadTraces(f"time must be nanoseconds since the epoch, got {v!r}")
    if isinstance(v, float) and math.isfinite(v) and v >= 0:
        return int(v)
    if isinstance(v, int) and v >= 0:
        return v
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    raise BadTraces(f"time must be nanoseconds since the epoch, got {v!r}")
