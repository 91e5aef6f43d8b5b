"""The HTTP app: a FastAPI application per engine, its routers, and its lifespan.

`create_app` gives each app its own engine and registry, so tests never share state
through the global prometheus registry. Routes are grouped by resource in `routes/`;
they get the engine and request bodies from `deps`, and refuse by raising `ApiError`
(`responses`). Tokens are checked by the ASGI middleware in `auth`, before any route or
body, so FastAPI's own `/docs` and `/openapi.json` are covered and an unauthenticated
upload is refused before its body is read. Ingest runs on the ingest queue's worker
thread (`ingest_queue`), never on the event loop; the evaluation loop and tail followers
run in `Background`, started and stopped with the app's lifespan.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .. import __version__
from ..collectors.ingest_queue import IngestQueueCollector
from ..config import ConfigError, Settings
from ..engine import Engine
from ..storage.store import StoreError
from .auth import AuthMiddleware, Tokens
from .background import Background, NamedTask
from .ingest_queue import IngestQueue
from .otlp import PATHS as OTLP_PATHS
from .otlp import status_response
from .responses import RETRY_AFTER_STORE, ApiError, api_error_handler, error
from .routes import alertmanager, anomalies, backends, ingest, otlp, prices, status, usage

log = logging.getLogger("llm_usage_exporter")


def create_app(settings: Settings, engine: Engine | None = None, background: bool = True,
               extra_tasks: Sequence[NamedTask] = ()) -> FastAPI:
    """An app with its own engine (and so its own registry). `background=False` for tests
    that drive evaluation by hand; `extra_tasks` are (component, task) pairs run beside the
    evaluation loop."""
    engine = engine or Engine(settings)
    tokens = Tokens(settings.tokens(), settings.read_only_tokens(), settings.protect_metrics)
    if tokens.enabled and not settings.tokens():
        raise ConfigError("read_token_file: read-only tokens need ingest tokens too (auth_token_file or "
                          "LLM_EXPORTER_AUTH_TOKENS); without them nothing could send records")
    queue = IngestQueue(settings.ingest_queue_bytes)
    if engine.queue_metrics is None:        # registered once per engine, even if it gets a second app
        engine.queue_metrics = IngestQueueCollector(queue)
        engine.registry.register(engine.queue_metrics)
        engine.scrape_registry.register(engine.queue_metrics)
    engine.queue_metrics.q = queue

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bg = Background(engine, extra_tasks) if background else None
        if bg:
            bg.start()
        try:
            yield
        finally:
            if bg:
                bg.close()
            queue.close()
            engine.close()

    app = FastAPI(title="llm-usage-exporter", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.ingest_queue = queue
    if tokens.enabled:
        app.add_middleware(AuthMiddleware, tokens=tokens)
    app.add_exception_handler(ApiError, refused)
    app.add_exception_handler(StoreError, store_failed)
    for module in (ingest, otlp, alertmanager, status, anomalies, backends, prices, usage):
        app.include_router(module.router)
    return app


async def refused(request: Request, e: Exception) -> Response:
    """An ApiError: JSON, or a google.rpc.Status to an OTLP client."""
    assert isinstance(e, ApiError)
    if request.url.path in OTLP_PATHS:
        return status_response(e.status_code, e.message, request.headers.get("content-type", ""),
                               dict(e.headers or {}))
    return await api_error_handler(request, e)


async def store_failed(request: Request, e: Exception) -> Response:
    """A read the store could not serve: 503, retry later."""
    assert isinstance(e, StoreError)
    log.error("%s %s: %s", request.method, request.url.path, e)
    return error(503, "the store could not be read or written; retry later", {"Retry-After": str(RETRY_AFTER_STORE)},
                 reason=e.kind, detail=str(e))
