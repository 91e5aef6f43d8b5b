"""OTLP/HTTP answers: an `ExportTraceServiceResponse` on success, a `google.rpc.Status` on
failure, each in the encoding of the request (binary protobuf or JSON), as the OTLP
specification requires of a receiver. The token middleware (`auth`), the app's error
handler and the `/v1/traces` route all answer OTLP clients through here."""

from __future__ import annotations

import orjson
from fastapi.responses import Response
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

PATHS = frozenset({"/v1/traces"})
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
PROTOBUF_TYPES = frozenset({PROTOBUF, "application/protobuf"})
# gRPC codes for Status.code (the specification does not use it; clients may log it)
GRPC_CODES = {400: 3, 401: 16, 403: 7, 408: 4, 413: 3, 415: 3, 429: 8, 503: 14}


def encoding(content_type: str) -> str | None:
    """PROTOBUF or JSON for a request's Content-Type; None when it is neither."""
    ct = content_type.split(";")[0].strip().lower()
    if ct in PROTOBUF_TYPES:
        return PROTOBUF
    if ct == JSON:
        return JSON
    return None


def export_response(fmt: str, rejected: int = 0, message: str = "") -> Response:
    """200 with an ExportTraceServiceResponse; `partial_success` only when spans were rejected."""
    if fmt == PROTOBUF:
        answer = ExportTraceServiceResponse()
        if rejected:
            answer.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
        return Response(answer.SerializeToString(), media_type=PROTOBUF)
    doc = {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}} if rejected else {}
    return Response(orjson.dumps(doc), media_type=JSON)


def status_body(status: int, message: str, content_type: str) -> tuple[bytes, str]:
    """A Status body and its content type: protobuf when the request was protobuf, else JSON."""
    code = GRPC_CODES.get(status, 2)
    if encoding(content_type) == PROTOBUF:
        return Status(code=code, message=message).SerializeToString(), PROTOBUF
    return orjson.dumps({"code": code, "message": message}), JSON


def status_response(status: int, message: str, content_type: str, headers: dict[str, str] | None = None) -> Response:
    body, media = status_body(status, message, content_type)
    return Response(body, status_code=status, media_type=media, headers=headers)
