"""Error answers of the HTTP API and how the OpenAPI document declares them.

Every refusal is JSON `{"error": ...}` with a status a client can act on: 4xx means fix the
request (and retrying it unchanged is pointless); 429 and 503 carry `Retry-After` and mean
send the same request again later (request ids keep a retried batch from counting twice).
Routes and their dependencies raise `ApiError`; one exception handler writes the answer.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

RETRY_AFTER_BUSY = 1         # seconds: the ingest queue was full
RETRY_AFTER_STORE = 5        # seconds: the store could not commit (locked, full, read-only)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> ORJSONResponse:
    return ORJSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class ApiError(HTTPException):
    """A refusal raised anywhere below a route (a dependency, the route itself); `extra`
    goes into the JSON body beside `error`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status, message, headers)
        self.message = message
        self.extra = extra

    @classmethod
    def before_body(cls, status: int, message: str, retry_after: int | None = None) -> ApiError:
        """A refusal sent before the request body was read: the connection is closed after
        it, so the client does not go on sending a body nobody reads."""
        headers = {"Connection": "close"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return cls(status, message, headers)

    @classmethod
    def store(cls, message: str, kind: str, detail: str) -> ApiError:
        """503: the store could not commit or read; retry later, nothing was counted."""
        return cls(503, message, {"Retry-After": str(RETRY_AFTER_STORE)}, reason=kind, detail=detail)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error(exc.status_code, exc.message, dict(exc.headers or {}), **exc.extra)


# --- OpenAPI ------------------------------------------------------------------------------

ERROR_SCHEMA = {"type": "object", "required": ["error"],
                "properties": {"error": {"type": "string"}, "reason": {"type": "string"}, "detail": {"type": "string"}},
                "additionalProperties": True}
_JSON_ERROR = {"application/json": {"schema": ERROR_SCHEMA}}
_RETRY = {"Retry-After": {"description": "seconds to wait before sending the same request again",
                          "schema": {"type": "integer"}}}
_AUTH = {"WWW-Authenticate": {"description": "the accepted schemes", "schema": {"type": "string"}}}

RESPONSES: dict[int, dict[str, Any]] = {
    400: {"description": "Malformed request: fix it before sending it again", "content": _JSON_ERROR},
    401: {"description": "A bearer token is configured and this one is missing or wrong", "content": _JSON_ERROR,
          "headers": _AUTH},
    403: {"description": "A read-only token on an endpoint that writes", "content": _JSON_ERROR},
    413: {"description": "The body, as sent or decompressed, exceeds max_body_bytes", "content": _JSON_ERROR},
    415: {"description": "A Content-Encoding other than gzip, deflate or identity", "content": _JSON_ERROR},
    422: {"description": "Every record of the batch was rejected, or a query parameter is invalid",
          "content": {"application/json": {"schema": {"type": "object"}}}},
    429: {"description": "The ingest queue is full: retry the same request after Retry-After", "content": _JSON_ERROR,
          "headers": _RETRY},
    503: {"description": "Not available now (the store could not commit, no evaluation yet, or a service the "
                         "answer is read from cannot be asked): retry after Retry-After", "content": _JSON_ERROR,
          "headers": _RETRY},
}


def responses(*codes: int, auth: bool = True) -> dict[int | str, dict[str, Any]]:
    """The declared error answers of a route (401 whenever tokens may be configured)."""
    wanted = sorted(set(codes) | ({401} if auth else set()))
    return {c: RESPONSES[c] for c in wanted}


INGEST_RESULT_SCHEMA = {
    "type": "object", "required": ["accepted", "duplicate", "rejected", "errors"],
    "properties": {
        "accepted": {"type": "integer"}, "duplicate": {"type": "integer"},
        "rejected": {"type": "integer", "description": "every rejected record"},
        "errors": {"type": "array", "description": "the first max_errors_listed rejected records, by index",
                   "items": {"type": "object", "required": ["index", "field", "reason"],
                             "properties": {"index": {"type": "integer"}, "field": {"type": "string"},
                                            "reason": {"type": "string"}}}},
        "errors_omitted": {"type": "integer", "description": "rejected records not listed in errors"},
    },
}

RECORD_SCHEMA = {"type": "object", "required": ["model"],
                 "description": "one usage record or a native SDK object (docs/records.md); the provider comes "
                                "from the record, the ?provider= parameter, the X-LLM-Provider header, the "
                                "object's shape or default_provider", "additionalProperties": True}

INGEST_BODY = {
    "required": True,
    "description": "one record, an array of records, or NDJSON (one record per line); "
                   "Content-Encoding gzip or deflate accepted",
    "content": {
        "application/json": {"schema": {"oneOf": [RECORD_SCHEMA, {"type": "array", "items": RECORD_SCHEMA}]}},
        "application/x-ndjson": {"schema": {"type": "string"}},
    },
}

INGEST_PARAMETERS = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200},
     "description": f"{what} of the records that name none (also the X-LLM-{name.title()} header)"}
    for name, what in (("app", "the calling application"), ("provider", "the provider"))
]

INGEST_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "At least one record was accepted or was a duplicate",
          "content": {"application/json": {"schema": INGEST_RESULT_SCHEMA}}},
    **responses(400, 403, 413, 415, 429, 503),
    422: {"description": "Every record of the batch was rejected",
          "content": {"application/json": {"schema": INGEST_RESULT_SCHEMA}}},
}

TEXT = {"text/plain": {"schema": {"type": "string"}}}
