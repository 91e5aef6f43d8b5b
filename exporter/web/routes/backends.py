"""Backend health: each LLM backend of prometheus/backends.yml, up or down, since when, and
its last error, as the blackbox exporter's probes in Prometheus say (`web/backends.py`)."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response

from ...durations import parse_duration
from ..backends import STATES, Prometheus, PrometheusUnavailable, read
from ..deps import EngineDep
from ..responses import RETRY_AFTER_STORE, ApiError, ORJSONResponse, responses

router = APIRouter(tags=["backends"])
MAX_LOOKBACK_S = 31 * 86400


@router.get("/api/backends", responses=responses(400, 503))
def backends(engine: EngineDep, backend: str | None = None, state: str | None = None, provider: str | None = None,
             model: str | None = None, lookback: str = "24h") -> Response:
    """Each probed backend: state (up / down / unknown), since when, the last error and when,
    and its probes. `lookback` bounds how far back "since" and the last error are looked for."""
    settings = engine.settings
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {list(STATES)}")
    try:
        lookback_s = parse_duration(lookback)
    except ValueError as e:
        raise ApiError(400, f"lookback: {e}") from None
    if not 60 <= lookback_s <= MAX_LOOKBACK_S:
        raise ApiError(400, "lookback must be between 1m and 31d")
    if settings.prometheus_url is None:
        raise ApiError(503, "no Prometheus to read the backend probes from: set prometheus_url "
                            "(--prometheus-url, LLM_EXPORTER_PROMETHEUS_URL) to the Prometheus that scrapes "
                            "the blackbox exporter", reason="not_configured")
    prometheus = Prometheus(settings.prometheus_url, settings.prometheus_timeout, settings.prometheus_token_file)
    try:
        body = read(prometheus, time.time(), lookback_s)
    except PrometheusUnavailable as e:
        raise ApiError(503, str(e), {"Retry-After": str(RETRY_AFTER_STORE)}, reason=e.reason) from None
    wanted = {"backend": backend, "state": state, "provider": provider, "model": model}
    body["backends"] = [b for b in body["backends"] if all(v is None or b[k] == v for k, v in wanted.items())]
    return ORJSONResponse({"prometheus": settings.prometheus_url, **body})
