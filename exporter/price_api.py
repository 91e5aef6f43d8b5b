"""The price table at the HTTP edge: `GET /api/prices` and the status page's unpriced list."""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response

from .price_names import candidates
from .prices import PriceTable
from .records import MAX_TEXT
from .responses import responses


def add_price_routes(app: FastAPI, prices: PriceTable) -> None:
    @app.get("/api/prices", responses={**responses(400), 404: {
        "description": "No price for that name: the names looked up, and how to add one",
        "content": {"application/json": {"schema": {"type": "object"}}}}})
    def price_of(model: str | None = Query(None, description="model name as records send it"),
                 provider: str = Query("", description="provider as records send it")) -> Response:
        """Which price entry a model name resolves to and its prices (USD per million tokens);
        without `model`, where prices come from and the unpriced names seen."""
        if model is None:
            return JSONResponse({**prices.describe(), "unpriced_seen": prices.unpriced_seen()})
        if not model.strip() or len(model) > MAX_TEXT or len(provider) > MAX_TEXT:
            return JSONResponse({"error": f"model (required) and provider must be 1 to {MAX_TEXT} characters"},
                                status_code=400)
        found = prices.resolve(provider.strip().lower(), model.strip().lower())
        body: dict[str, Any] = found.to_dict()
        if found.rates is None:
            body["looked_up"] = [key for key, _ in candidates(found.provider, found.model, prices.known_providers)]
            body["hint"] = "add it under prices: in the config file, or map it to a priced name under price_aliases:"
            return JSONResponse(body, status_code=404)
        return JSONResponse(body)


def unpriced_html(prices: PriceTable) -> str:
    """A short table of the model names the exporter could not price since start-up."""
    seen = prices.unpriced_seen()
    if not seen["models"]:
        return ""
    rows = "".join(f"<tr><td>{html.escape(u['provider'])}</td><td>{html.escape(u['model'])}</td>"
                   f"<td>{html.escape(u['reason'])}</td><td>{u['requests']}</td></tr>" for u in seen["models"])
    more = (f"<p>…and {seen['requests_of_names_not_listed']} request(s) of other names.</p>"
            if seen["requests_of_names_not_listed"] else "")
    return (f'<h2>Unpriced models</h2><p>Requests without <code>cost_usd</code> whose model has no price: they count in '
            f'<code>llm_unpriced_requests_total</code>, never as free. See <a href="/api/prices">/api/prices</a>.</p>'
            f'<table id="unpriced"><thead><tr><th>provider</th><th>model</th><th>why</th><th>requests</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>{more}')
