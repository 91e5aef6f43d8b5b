"""The built-in Alertmanager receiver, so the stack delivers somewhere out of the box, and
the history of what it received."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..deps import EngineDep, JsonBodyDep
from ..responses import ApiError, ORJSONResponse, responses

router = APIRouter(tags=["alertmanager"])
KEPT = ("status", "receiver", "groupLabels", "commonLabels", "commonAnnotations", "externalURL")
KEPT_PER_ALERT = ("status", "labels", "annotations", "startsAt", "endsAt", "fingerprint")


@router.post("/api/alertmanager/webhook", responses=responses(400, 403, 413, 503))
async def alertmanager_webhook(body: JsonBodyDep, engine: EngineDep) -> Response:
    """A receiver for Alertmanager's webhook (version 4 payloads)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("alerts"), list):
        raise ApiError(400, "expected an Alertmanager webhook payload with an 'alerts' list")
    keep: dict[str, Any] = {k: doc.get(k) for k in KEPT}
    alerts = [{k: a.get(k) for k in KEPT_PER_ALERT} for a in doc["alerts"] if isinstance(a, dict)]
    keep["alerts"] = alerts
    await run_in_threadpool(engine.store.add_notification, time.time(), keep)
    return ORJSONResponse({"stored": len(alerts)})


@router.get("/api/notifications", responses=responses(503))
def notifications(engine: EngineDep, limit: int = Query(100, ge=1, le=1000)) -> Response:
    """The notifications received, newest first."""
    return ORJSONResponse(engine.store.notifications(limit))
