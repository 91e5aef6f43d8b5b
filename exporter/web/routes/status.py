"""The status page, the probes, and `/metrics` with content negotiation.

`/metrics` keeps the fast renderer (the usage families written directly, the rest by
prometheus-client) and negotiates like the client library's own handler: OpenMetrics when
the scraper asks for it (Prometheus does), the classic text format otherwise, and gzip when
the scraper accepts it.
"""

from __future__ import annotations

import gzip

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from prometheus_client.exposition import choose_encoder, gzip_accepted

from ..deps import EngineDep
from ..responses import TEXT, responses
from ..status_page import status_page

router = APIRouter(tags=["status"])
OPENMETRICS = "application/openmetrics-text"
GZIP_LEVEL = 1      # a 6 MB scrape compresses about 8x at level 1 in a few tens of ms; level 9 takes ten times longer


@router.get("/", response_class=HTMLResponse, responses=responses())
def landing(engine: EngineDep) -> Response:
    """The status page."""
    return HTMLResponse(status_page(engine))


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {**TEXT, OPENMETRICS: {"schema": {"type": "string"}}}}, **responses()})
def metrics(request: Request, engine: EngineDep) -> Response:
    """Prometheus exposition: OpenMetrics or text by `Accept`, gzip by `Accept-Encoding`."""
    _, content_type = choose_encoder(request.headers.get("accept", ""))
    body = engine.exposition(openmetrics=content_type.startswith(OPENMETRICS))
    headers = {"Vary": "Accept, Accept-Encoding"}
    if gzip_accepted(request.headers.get("accept-encoding", "")):
        body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=content_type, headers=headers)


@router.get("/healthz", response_class=PlainTextResponse, responses={200: {"content": TEXT}})
async def healthz() -> Response:
    """Liveness: answered on the event loop, whatever ingest is doing."""
    return PlainTextResponse("ok\n")


@router.get("/readyz", response_class=PlainTextResponse,
            responses={200: {"content": TEXT}, 503: {"description": "Not ready", "content": TEXT}})
async def readyz(engine: EngineDep) -> Response:
    """Ready once the first evaluation is done, and while the store can be written."""
    if engine.snapshot is None:
        return PlainTextResponse("not ready: no evaluation yet\n", status_code=503)
    if not engine.store.writable:
        return PlainTextResponse(f"not ready: the store cannot be written: {engine.store.last_error}\n",
                                 status_code=503)
    return PlainTextResponse("ready\n")
