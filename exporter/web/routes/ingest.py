"""`POST /v1/records`: bodies go through the ingest queue to its worker thread, never run on
the event loop, and come back as a count of what was accepted, duplicated and rejected."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...engine import Engine, IngestResult
from ...ingest.attribution import Attribution
from ...ingest.bodies import BodyError, decode_body
from ...ingest.records import MAX_TEXT
from ...storage.store import StoreError
from ..body import BadEncoding, BodyTooLarge, decode_content
from ..deps import EngineDep, QueuedBodyDep, QueueDep
from ..responses import INGEST_BODY, INGEST_PARAMETERS, INGEST_RESPONSES, ApiError, ORJSONResponse

log = logging.getLogger("llm_usage_exporter")
router = APIRouter(tags=["ingest"])


def ingest_body(engine: Engine, body: bytes, content_type: str, coding: str,
                attribution: Attribution | None = None) -> IngestResult:
    """Decompress, decode and ingest one POST body (on the ingest worker)."""
    limit = engine.settings.max_body_bytes
    decoded = decode_body(decode_content(body, coding, limit), content_type, engine.settings.max_errors_listed)
    del body
    return engine.ingest(decoded.items, indices=decoded.indices, rejections=decoded.rejections,
                         attribution=attribution)


def request_attribution(engine: Engine, request: Request) -> Attribution:
    """The engine's precedence with this POST's app and provider: `?app=` / `?provider=`,
    else the `X-LLM-App` / `X-LLM-Provider` headers. They apply to the records that do
    not name their own (see `ingest.attribution`)."""
    values: dict[str, str | None] = {}
    for name in ("app", "provider"):
        v = request.query_params.get(name) or request.headers.get(f"x-llm-{name}")
        v = v.strip() if v is not None else None
        if v is not None and len(v) > MAX_TEXT:
            raise ApiError(400, f"{name} (query parameter or X-LLM-{name.title()} header) is longer than {MAX_TEXT} "
                                "characters")
        values[name] = v or None
    provider = values["provider"].lower() if values["provider"] else None
    return engine.attribution.for_request(values["app"], provider)


@router.post("/v1/records", responses=INGEST_RESPONSES,
             openapi_extra={"requestBody": INGEST_BODY, "parameters": INGEST_PARAMETERS})
async def post_records(request: Request, body: QueuedBodyDep, engine: EngineDep, queue: QueueDep) -> Response:
    """Accept one JSON object, a JSON array, or NDJSON, optionally gzip- or
    deflate-encoded: records in our format, or the native objects of OpenAI, Anthropic,
    Gemini, Bedrock and LiteLLM as their libraries produce them. Records that do not name
    their app or provider take `?app=` / `?provider=` or the `X-LLM-App` /
    `X-LLM-Provider` header. Good records count even when others fail; a 503 or 429 means
    nothing was counted: send the same batch again after Retry-After."""
    attribution = request_attribution(engine, request)
    try:
        result = await queue.run(ingest_body, engine, body.data, body.content_type, body.coding, attribution)
    except BodyError as e:
        raise ApiError(400, str(e), line=e.line, column=e.column, position=e.pos) from None
    except BadEncoding as e:
        raise ApiError(400, str(e)) from None
    except BodyTooLarge as e:
        raise ApiError(413, str(e)) from None
    except StoreError as e:
        log.error("ingest not stored: %s", e)
        raise ApiError.store("records were not stored; send the same batch again after Retry-After "
                             "(request_id keeps retries idempotent)", e.kind, str(e)) from None
    status = 422 if result.rejected_total and not result.accepted and not result.duplicate else 200
    return ORJSONResponse(result.to_dict(), status_code=status)
