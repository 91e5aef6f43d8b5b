"""`POST /v1/traces`: the OTLP/HTTP trace receiver.

OpenTelemetry SDKs and Collectors send spans here as they would to any OTLP backend
(binary protobuf or JSON, gzip or not). Spans of GenAI model calls become usage records
through the same ingest as `/v1/records` (the ingest queue, dedupe, store, metrics); the
others are counted and dropped. The answer follows OTLP/HTTP: 200 with an
`ExportTraceServiceResponse` whose `partial_success` counts and explains the rejected
spans, or a `google.rpc.Status` with a status code the client knows whether to retry
(429 and 503 with Retry-After: retry; any other 4xx: do not).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...engine import Engine, IngestResult
from ...ingest.otlp import BadTraces, Traces, decode_traces, partial_success_message
from ...storage.store import StoreError
from ..body import BadEncoding, BodyTooLarge, decode_content
from ..deps import EngineDep, QueuedBodyDep, QueueDep
from ..otlp import JSON, PROTOBUF, encoding, export_response
from ..responses import RETRY_AFTER_STORE, ApiError

log = logging.getLogger("llm_usage_exporter")
router = APIRouter(tags=["ingest"])


async def otlp_encoding(request: Request) -> str:
    """The request's OTLP encoding, or 415 before its body is read."""
    ct = request.headers.get("content-type", "")
    fmt = encoding(ct)
    if fmt is None:
        raise ApiError.before_body(415, f"Content-Type {ct!r} is not an OTLP encoding: send binary protobuf as "
                                        f"{PROTOBUF} or JSON as {JSON}")
    return fmt


# Declared before the body, so that FastAPI checks the Content-Type before reading it.
EncodingDep = Annotated[str, Depends(otlp_encoding)]


def ingest_traces(engine: Engine, body: bytes, coding: str, fmt: str) -> tuple[Traces, IngestResult]:
    """Decompress, decode and ingest one OTLP body (on the ingest worker). The span counts
    are stored with the batch and counted once it is committed."""
    limit = engine.settings.max_body_bytes
    traces = decode_traces(decode_content(body, coding, limit), fmt == PROTOBUF, engine.settings.max_errors_listed)
    counts = traces.counts()
    result = engine.ingest(traces.items, indices=traces.indices, rejections=traces.rejections,
                           meta=engine.otlp_spans.pending(counts))
    engine.otlp_spans.add(counts)
    return traces, result


# --- OpenAPI ------------------------------------------------------------------------------

_BINARY = {"type": "string", "format": "binary"}
_STATUS_JSON = {"type": "object", "properties": {"code": {"type": "integer"}, "message": {"type": "string"}}}
_STATUS = {PROTOBUF: {"schema": _BINARY}, JSON: {"schema": _STATUS_JSON}}
_RETRY = {"Retry-After": {"description": "seconds to wait before sending the same request again",
                          "schema": {"type": "integer"}}}
_ANSWER_JSON = {"type": "object", "properties": {"partialSuccess": {
    "type": "object", "properties": {"rejectedSpans": {"type": "string"}, "errorMessage": {"type": "string"}}}}}


def _refusal(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description + " (a google.rpc.Status in the request's encoding)",
                           "content": _STATUS}
    if retry:
        out["headers"] = _RETRY
    return out


TRACES_BODY = {
    "required": True,
    "description": "an OTLP ExportTraceServiceRequest; Content-Encoding gzip or deflate accepted",
    "content": {PROTOBUF: {"schema": _BINARY},
                JSON: {"schema": {"type": "object", "properties": {"resourceSpans": {"type": ["array", "null"]}}}}},
}
TRACES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "An ExportTraceServiceResponse, in the request's encoding; partial_success counts and "
                         "explains the rejected spans",
          "content": {PROTOBUF: {"schema": _BINARY}, JSON: {"schema": _ANSWER_JSON}}},
    400: _refusal("Not an OTLP trace export request, or not valid data of its Content-Encoding: do not retry"),
    401: _refusal("A bearer token is configured and this one is missing or wrong"),
    403: _refusal("A read-only token"),
    413: _refusal("The body, as sent or decompressed, exceeds max_body_bytes"),
    415: _refusal("A Content-Type other than application/x-protobuf or application/json, or an unknown "
                  "Content-Encoding"),
    429: _refusal("The ingest queue is full: retry after Retry-After", retry=True),
    503: _refusal("The store could not commit: retry the same request after Retry-After", retry=True),
}


@router.post("/v1/traces", responses=TRACES_RESPONSES, openapi_extra={"requestBody": TRACES_BODY})
async def post_traces(fmt: EncodingDep, body: QueuedBodyDep, engine: EngineDep, queue: QueueDep) -> Response:
    """Receive OTLP/HTTP trace exports (binary protobuf or JSON, optionally gzip- or
    deflate-encoded). GenAI model-call spans count as usage records; rejected ones are
    counted and explained in `partial_success`."""
    try:
        traces, result = await queue.run(ingest_traces, engine, body.data, body.coding, fmt)
    except (BadTraces, BadEncoding) as e:
        raise ApiError(400, str(e)) from None
    except BodyTooLarge as e:
        raise ApiError(413, str(e)) from None
    except StoreError as e:
        log.error("spans not stored: %s", e)
        raise ApiError(503, "spans were not stored; send the same request again after Retry-After "
                            f"({e.kind}: {e})", {"Retry-After": str(RETRY_AFTER_STORE)}) from None
    rejected = result.rejected_total
    return export_response(fmt, rejected, partial_success_message(traces, result.rejections) if rejected else "")
