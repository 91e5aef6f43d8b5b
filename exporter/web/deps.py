"""What routes take from the app through FastAPI's dependencies: the engine, and request
bodies read within their limits.

A dependency either gives the route what it needs or raises `ApiError`, so a route
never checks a sentinel: a body that is too large, a coding we do not decode or a full
ingest queue is refused before the route runs. Tokens are checked earlier still, by the
ASGI middleware in `auth`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from ..engine import Engine
from .body import BodyTooLarge, QueueFull, UnsupportedEncoding, check_encoding, declared_length, read_body
from .ingest_queue import IngestQueue
from .responses import RETRY_AFTER_BUSY, ApiError

QUEUE_FULL = "the ingest queue is full; send the same batch again after Retry-After"


# Async, so that resolving them costs no trip through the thread pool: the probes are async
# routes that must answer on the event loop whatever the pool is busy with.
async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def get_queue(request: Request) -> IngestQueue:
    queue: IngestQueue = request.app.state.ingest_queue
    return queue


EngineDep = Annotated[Engine, Depends(get_engine)]
QueueDep = Annotated[IngestQueue, Depends(get_queue)]


async def json_body(request: Request, engine: EngineDep) -> bytes:
    """A body of at most `max_body_bytes` (a small JSON document: the Alertmanager webhook)."""
    try:
        return await read_body(request, engine.settings.max_body_bytes)
    except ClientDisconnect:
        raise ApiError(408, "the body did not arrive") from None
    except BodyTooLarge as e:
        raise ApiError.before_body(413, str(e)) from None


@dataclass(frozen=True, slots=True)
class QueuedBody:
    """A POST body holding its room in the ingest queue, and how to decode it."""

    data: bytes
    coding: str
    content_type: str


async def queued_body(request: Request, engine: EngineDep, queue: QueueDep) -> AsyncIterator[QueuedBody]:
    """An ingest body: its coding checked (415), its size bounded as declared and as read
    (413), its room taken in the ingest queue (429) and given back once the route is done."""
    limit = engine.settings.max_body_bytes
    try:
        coding = check_encoding(request.headers.get("content-encoding", ""))
    except UnsupportedEncoding as e:
        raise ApiError.before_body(415, str(e)) from None
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise ApiError.before_body(413, str(BodyTooLarge(limit, declared)))
    ticket = queue.admit(declared or 0)
    if ticket is None:
        raise ApiError.before_body(429, QUEUE_FULL, RETRY_AFTER_BUSY)
    with ticket:
        try:
            data = await read_body(request, limit, ticket)
        except ClientDisconnect:        # gone, or closed by the body timeout: nothing to answer
            raise ApiError(408, "the body did not arrive") from None
        except BodyTooLarge as e:
            raise ApiError.before_body(413, str(e)) from None
        except QueueFull:
            queue.refused()
            raise ApiError.before_body(429, QUEUE_FULL, RETRY_AFTER_BUSY) from None
        yield QueuedBody(data, coding, request.headers.get("content-type", ""))


QueuedBodyDep = Annotated[QueuedBody, Depends(queued_body)]
JsonBodyDep = Annotated[bytes, Depends(json_body)]
