"""The usage API: totals and percentiles over a time range, recent records, a JSONL export."""

from __future__ import annotations

import math
from collections.abc import Iterator

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from ...ingest.records import MAX_TS, RecordError, parse_ts
from ...storage.usage_stats import DIMENSIONS, usage_statistics
from ..deps import EngineDep
from ..responses import ApiError, ORJSONResponse, responses

router = APIRouter(tags=["usage"])


def time_arg(name: str, v: str | None, default: float) -> float:
    """A `start` or `end` query argument: RFC 3339 or epoch seconds between 1970 and 9999."""
    if v is None or v == "":
        return default
    try:
        return parse_ts(v, default)
    except RecordError as e:
        raise ApiError(400, f"{name}: {e.message}") from None


@router.get("/v1/usage/stats", responses=responses(400, 503))
def usage_stats(engine: EngineDep, start: str | None = None, end: str | None = None,
                group_by: str = Query("provider,model", description="comma list of app, provider, model")) -> Response:
    """Totals and percentiles; `start` and `end` are RFC 3339 or epoch seconds between
    1970 and 9999 (default: the last 24 hours)."""
    now = engine.clock()
    t0, t1 = time_arg("start", start, now - 86400), time_arg("end", end, now)
    if t1 < t0:
        raise ApiError(400, f"end ({t1:g}) is before start ({t0:g})")
    dims = [d.strip() for d in group_by.split(",") if d.strip()]
    bad = [d for d in dims if d not in DIMENSIONS]
    if bad:
        raise ApiError(400, f"group_by: unknown dimension(s) {bad}; use app, provider, model")
    return ORJSONResponse(usage_statistics(engine.store, t0, t1, dims))


@router.get("/v1/usage/recent", responses=responses(503))
def usage_recent(engine: EngineDep, limit: int = Query(50, ge=1, le=1000)) -> Response:
    """The newest stored records (raw, as sent; no text)."""
    rows = list(engine.store.records(0, math.inf, limit=limit, newest_first=True))
    return ORJSONResponse({"records": rows})


@router.get("/v1/usage/export", response_class=StreamingResponse,
            responses={200: {"description": "JSONL, one record per line",
                             "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                       **responses(400, 503)})
def usage_export(engine: EngineDep, start: str | None = None, end: str | None = None) -> Response:
    """Stored records with start <= ts < end as JSONL, streamed."""
    now = engine.clock()
    t0, t1 = time_arg("start", start, 0.0), time_arg("end", end, min(now + 1, MAX_TS))

    def lines() -> Iterator[bytes]:
        for rec in engine.store.records(t0, t1):
            yield orjson.dumps(rec) + b"\n"
    return StreamingResponse(lines(), media_type="application/x-ndjson")
