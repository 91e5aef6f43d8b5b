"""`GET /api/prices`: which price entry a model name resolves to, and why."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from ...ingest.price_names import candidates
from ...ingest.records import MAX_TEXT
from ..deps import EngineDep
from ..responses import ApiError, ORJSONResponse, responses

router = APIRouter(tags=["prices"])


NOT_PRICED: dict[int | str, dict[str, Any]] = {404: {"description": "No source has a price for this model: where it was looked up, and how to add one",
                    "content": {"application/json": {"schema": {"type": "object"}}}}}


@router.get("/api/prices", responses={**responses(400), **NOT_PRICED})
def price_of(engine: EngineDep, model: str | None = Query(None, description="model name as records send it"),
             provider: str = Query("", description="provider as records send it")) -> Response:
    """Which price entry a model name resolves to and its prices (USD per million tokens);
    without `model`, where prices come from and the unpriced names seen."""
    prices = engine.prices
    if model is None:
        return ORJSONResponse({**prices.describe(), "unpriced_seen": prices.unpriced_seen()})
    if not model.strip() or len(model) > MAX_TEXT or len(provider) > MAX_TEXT:
        raise ApiError(400, f"model (required) and provider must be 1 to {MAX_TEXT} characters")
    found = prices.resolve(provider.strip().lower(), model.strip().lower())
    body: dict[str, Any] = found.to_dict()
    if found.rates is None:
        body["looked_up"] = [key for key, _ in candidates(found.provider, found.model, prices.known_providers)]
        body["hint"] = "add it under prices: in the config file, or map it to a priced name under price_aliases:"
        return ORJSONResponse(body, status_code=404)
    return ORJSONResponse(body)
