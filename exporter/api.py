"""The HTTP edge: FastAPI routes that turn engine results and errors into responses.

`create_app` builds a fresh engine and registry per app, so tests never share state
through the global prometheus registry. Background work (the evaluation loop, pruning,
tail followers) runs in `Background`, started and stopped with the app's lifespan.
"""

from __future__ import annotations

import hmac
import html
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__, sketch
from .buckets import FIELDS, SKETCHES, F, TOKEN_FIELDS
from .config import Settings
from .engine import Engine
from .price_api import add_price_routes, unpriced_html
from .records import BodyError, RecordError, decode_body, parse_ts
from .store import StoreError

log = logging.getLogger("llm_usage_exporter")
SEVERITY_ORDER = {"ok": 0, "warning": 1, "high": 2}


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _error(status: int, message: str, **extra: Any) -> ORJSONResponse:
    return ORJSONResponse({"error": message, **extra}, status_code=status)


class Background:
    """Periodic evaluation, checkpoints and pruning, and the tail followers, on daemon threads."""

    def __init__(self, engine: Engine, extra: list[Callable[[threading.Event], None]] | None = None) -> None:
        self.engine = engine
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.extra = extra or []

    def start(self) -> None:
        self.engine.evaluate()
        for target in [self._evaluate_loop, *self.extra]:
            t = threading.Thread(target=target, args=(self.stop,), daemon=True)
            t.start()
            self.threads.append(t)

    def _evaluate_loop(self, stop: threading.Event) -> None:
        interval = self.engine.settings.evaluation_interval
        last_prune = 0.0
        while not stop.wait(interval):
            self.engine.evaluate()
            try:    # a quiet exporter still folds its last batches into the buckets
                self.engine.store.checkpoint()
            except StoreError:
                log.exception("checkpoint failed")
            if time.monotonic() - last_prune > 600:
                try:
                    self.engine.prune()
                except StoreError:
                    log.exception("pruning failed")
                last_prune = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)


def create_app(settings: Settings, engine: Engine | None = None, background: bool = True,
               extra_tasks: list[Callable[[threading.Event], None]] | None = None) -> FastAPI:
    """An app with its own engine (and so its own registry). `background=False` for tests
    that drive evaluation by hand."""
    engine = engine or Engine(settings)
    tokens = settings.tokens()

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
            engine.close()

    app = FastAPI(title="llm-usage-exporter", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.engine = engine

    def authorised(request: Request) -> bool:
        if not tokens:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), t) for t in tokens)

    def unauthorised() -> ORJSONResponse:
        return ORJSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                              headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes | ORJSONResponse:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return _error(413, f"body of {declared} bytes exceeds max_body_bytes ({limit})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, f"body exceeds max_body_bytes ({limit})")
            chunks.append(chunk)
        return b"".join(chunks)

    async def authorised_body(request: Request) -> bytes | Response:
        """The body of an authorised POST, or the response that refuses it (401 or 413)."""
        if not authorised(request):
            return unauthorised()
        return await read_body(request)

    # --- ingest -----------------------------------------------------------------------

    @app.post("/v1/records")
    async def post_records(request: Request) -> Response:
        """Accept one JSON object, a JSON array, or NDJSON. Good records count even when others fail."""
        body = await authorised_body(request)
        if isinstance(body, Response):
            return body
        try:
            items = decode_body(body, request.headers.get("content-type", ""))
        except BodyError as e:
            return _error(400, str(e), line=e.line, column=e.column, position=e.pos)
        try:
            result = engine.ingest(items)
        except StoreError as e:
            log.error("ingest not stored: %s", e)
            return _error(503, "records were not stored; retry the same batch (request_id keeps retries idempotent)",
                          detail=str(e))
        status = 422 if result.rejected and not result.accepted and not result.duplicate else 200
        return ORJSONResponse(result.to_dict(), status_code=status)

    @app.post("/api/alertmanager/webhook")
    async def alertmanager_webhook(request: Request) -> Response:
        """A receiver for Alertmanager's webhook, so the stack delivers somewhere out of the box."""
        body = await authorised_body(request)
        if isinstance(body, Response):
            return body
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return _error(400, f"malformed JSON: {e}")
        if not isinstance(doc, dict) or not isinstance(doc.get("alerts"), list):
            return _error(400, "expected an Alertmanager webhook payload with an 'alerts' list")
        keep = {k: doc.get(k) for k in ("status", "receiver", "groupLabels", "commonLabels", "commonAnnotations", "externalURL")}
        keep["alerts"] = [{k: a.get(k) for k in ("status", "labels", "annotations", "startsAt", "endsAt", "fingerprint")}
                          for a in doc["alerts"] if isinstance(a, dict)]
        engine.store.add_notification(time.time(), keep)
        return ORJSONResponse({"stored": len(keep["alerts"])})

    @app.get("/api/notifications")
    def notifications(limit: int = Query(100, ge=1, le=1000)) -> Response:
        return ORJSONResponse(engine.store.notifications(limit))

    # --- metrics and status ------------------------------------------------------------

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        if settings.protect_metrics and not authorised(request):
            return unauthorised()
        return Response(engine.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Response:
        return PlainTextResponse("ok\n")

    @app.get("/readyz")
    def readyz() -> Response:
        if engine.snapshot is None:
            return PlainTextResponse("not ready: no evaluation yet\n", status_code=503)
        return PlainTextResponse("ready\n")

    @app.get("/api/anomalies")
    def anomalies(scope: str | None = None, app_: str | None = Query(None, alias="app"), model: str | None = None,
                  provider: str | None = None, signal: str | None = None, severity: str | None = None) -> Response:
        snap = engine.snapshot
        if snap is None:
            return _error(503, "no evaluation yet")
        if severity is not None and severity not in SEVERITY_ORDER:
            return _error(400, f"severity must be one of {list(SEVERITY_ORDER)}")
        rows = [r for r in snap.rows()
                if (scope is None or r["scope"] == scope) and (app_ is None or r["app"] == app_)
                and (model is None or r["model"] == model) and (provider is None or r["provider"] == provider)
                and (signal is None or r["signal"] == signal)
                and (severity is None or SEVERITY_ORDER[r["severity"]] >= SEVERITY_ORDER[severity])]
        return ORJSONResponse({"evaluated_at": snap.t, "anomalies": rows})

    def detector_report(name: str) -> Response:
        rep = engine.detectors.latest
        if rep is None:
            return _error(503, "no evaluation yet")
        value = getattr(rep, name)
        body = [r.to_dict() for r in value] if isinstance(value, list) else value.to_dict()
        return ORJSONResponse({"evaluated_at": engine.snapshot.t if engine.snapshot else None, name: body})

    @app.get("/api/drift")
    def drift(min_severity: int = Query(0, ge=0, le=2)) -> Response:
        """Per-model drift values, severity and the reasons behind it."""
        rep = engine.detectors.latest
        if rep is None:
            return _error(503, "no evaluation yet")
        return ORJSONResponse({"drift": [r.to_dict() for r in rep.drift if r.severity >= min_severity]})

    @app.get("/api/runaways")
    def runaways(app_: str | None = Query(None, alias="app")) -> Response:
        """Flagged sessions (ids only here, never in labels), counts per app and reason, invocation spikes."""
        rep = engine.detectors.latest
        if rep is None:
            return _error(503, "no evaluation yet")
        body = rep.runaway.to_dict()
        if app_ is not None:
            body["offenders"] = [o for o in body["offenders"] if o.get("app") == app_]
            body["sessions_by_app_reason"] = [r for r in body["sessions_by_app_reason"] if r["app"] == app_]
        return ORJSONResponse({"evaluated_at": rep.runaway and engine.snapshot.t if engine.snapshot else None,
                               "runaway": body})

    @app.get("/api/budgets")
    def budgets() -> Response:
        """Budgets, period-to-date spend and forecasts per app and overall."""
        return detector_report("budget")

    @app.get("/", response_class=HTMLResponse)
    def landing() -> Response:
        return HTMLResponse(landing_page(engine))

    add_price_routes(app, engine.prices)

    # --- usage API ---------------------------------------------------------------------

    def time_arg(name: str, v: str | None, default: float) -> float:
        if v is None or v == "":
            return default
        try:
            return parse_ts(v, default)
        except RecordError:
            raise ValueError(f"{name}: not RFC 3339 or epoch seconds: {v!r}") from None

    @app.get("/v1/usage/stats")
    def usage_stats(start: str | None = None, end: str | None = None,
                    group_by: str = Query("provider,model", description="comma list of app, provider, model")) -> Response:
        now = engine.clock()
        try:
            t0, t1 = time_arg("start", start, now - 86400), time_arg("end", end, now)
        except ValueError as e:
            return _error(400, str(e))
        dims = [d.strip() for d in group_by.split(",") if d.strip()]
        bad = [d for d in dims if d not in ("app", "provider", "model")]
        if bad:
            return _error(400, f"group_by: unknown dimension(s) {bad}; use app, provider, model")
        return ORJSONResponse(usage_statistics(engine, t0, t1, dims))

    @app.get("/v1/usage/recent")
    def usage_recent(limit: int = Query(50, ge=1, le=1000)) -> Response:
        rows = list(engine.store.records(0, math.inf, limit=limit, newest_first=True))
        return ORJSONResponse({"records": rows})

    @app.get("/v1/usage/export")
    def usage_export(start: str | None = None, end: str | None = None) -> Response:
        now = engine.clock()
        try:
            t0, t1 = time_arg("start", start, 0.0), time_arg("end", end, now + 1)
        except ValueError as e:
            return _error(400, str(e))

        def lines() -> Iterator[bytes]:
            for rec in engine.store.records(t0, t1):
                yield orjson.dumps(rec) + b"\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def usage_statistics(engine: Engine, t0: float, t1: float, dims: list[str]) -> dict[str, Any]:
    """Totals and latency/TTFT percentiles from the hourly buckets (minute buckets for the
    partial first and last hours are not split: ranges are rounded out to whole hours).

    Buckets are read a page at a time as sparse groups and summed per output group with
    numpy, so two weeks of ten thousand series take one pass, not a decode per bucket
    (the output groups' sketches are dense: 3.8 KB each per kind)."""
    start_h, end_h = math.floor(t0 / 3600) * 3600, math.ceil(t1 / 3600) * 3600
    names = engine.store.series()
    if not names:
        return {"start": start_h, "end": end_h, "group_by": dims, "groups": []}
    label_of = {sid: tuple(dict(zip(("app", "provider", "model"), key))[d] for d in dims) for sid, key in names.items()}
    keys = sorted(set(label_of.values()))
    index = {k: i for i, k in enumerate(keys)}
    group_of = np.full(max(names) + 1, -1, dtype=np.int64)
    group_of[list(label_of)] = [index[k] for k in label_of.values()]
    n = len(keys)
    adds = np.zeros((n, len(FIELDS)))
    seen = np.zeros(n, dtype=bool)
    kinds = {"latency": SKETCHES.index("latency"), "ttft": SKETCHES.index("ttft")}
    counts = {kind: np.zeros(n * sketch.NBINS) for kind in kinds}     # one dense sketch per output group
    for g in engine.store.bucket_groups(3600, start_h, end_h):
        k = group_of[g.series]
        np.add.at(adds, k, g.adds)
        seen[k] = True
        for kind, j in kinds.items():
            gi, b, c = g.nonzero_bins()[j]
            counts[kind] += np.bincount(k[gi] * sketch.NBINS + b, weights=c, minlength=n * sketch.NBINS)
    pct = {(kind, q): sketch.quantile(counts[kind].reshape(n, sketch.NBINS), q)
           for kind in kinds for q in (0.5, 0.95, 0.99)}
    rows = []
    for i in np.flatnonzero(seen).tolist():
        a = adds[i]
        row: dict[str, Any] = dict(zip(dims, keys[i]))
        row.update({
            "requests": int(a[F["requests"]]), "errors": int(a[F["errors"]]),
            "error_rate": float(a[F["errors"]] / a[F["requests"]]) if a[F["requests"]] else None,
            "cost_usd": round(float(a[F["cost"]]), 6), "unpriced_requests": int(a[F["unpriced"]]),
            "tokens": {name.removesuffix("_tokens"): int(a[F[name]]) for name in TOKEN_FIELDS},
        })
        for kind in kinds:
            row[f"{kind}_s"] = {f"p{int(q * 100)}": _finite(pct[(kind, q)][i]) for q in (0.5, 0.95, 0.99)}
        rows.append(row)
    return {"start": start_h, "end": end_h, "group_by": dims, "groups": rows}


def _finite(x: Any) -> float | None:
    v = float(x)
    return round(v, 4) if math.isfinite(v) else None


def _series(r: dict[str, Any]) -> str:
    if r["app"]:
        return str(r["app"])
    return f"{r['provider']}/{r['model']}" if r["model"] else "all"


def landing_page(engine: Engine) -> str:
    """A status table like the Grafana one, with green/amber/red rows."""
    snap = engine.snapshot
    rows = list(snap.rows()) if snap else []
    bad = [r for r in rows if r["severity"] != "ok"]
    if snap is None:
        banner = '<div class="banner wait">Waiting for the first evaluation.</div>'
    elif bad:
        banner = f'<div class="banner alert">{len(bad)} anomalous signal(s).</div>'
    else:
        banner = '<div class="banner clear">All clear: no signal is anomalous.</div>'
    rows.sort(key=lambda r: (-SEVERITY_ORDER[r["severity"]], r["signal"], r["scope"]))

    def fmt(v: Any) -> str:
        return "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))
    body = "".join(
        f'<tr class="{r["severity"]}"><td>{html.escape(r["signal"])}</td><td>{html.escape(r["scope"])}</td>'
        f'<td>{html.escape(_series(r))}</td>'
        f'<td>{fmt(r["current"])}</td><td>{fmt(r["baseline"])}</td><td>{fmt(r["ratio"])}</td>'
        f'<td>{fmt(r["zscore"])}</td><td>{r["threshold"]["warning"]:g} / {r["threshold"]["high"]:g}</td>'
        f'<td>{r["baseline_hours"]}</td><td>{r["severity"]}</td></tr>' for r in rows)
    evaluated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.t)) if snap else "never"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>llm-usage-exporter</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}table{{border-collapse:collapse;width:100%}}
td,th{{padding:.3rem .6rem;border-bottom:1px solid #ddd;text-align:left}}tr.ok td{{background:#e8f5e9}}
tr.warning td{{background:#fff3cd}}tr.high td{{background:#f8d7da}}.banner{{padding:.8rem;margin:1rem 0;border-radius:4px;font-weight:600}}
.clear{{background:#c8e6c9}}.alert{{background:#f5c6cb}}.wait{{background:#eee}}</style></head><body>
<h1>llm-usage-exporter {__version__}</h1>{banner}<p>Evaluated at {evaluated}.</p>
<p><a href="/metrics">/metrics</a> · <a href="/api/anomalies">/api/anomalies</a> · <a href="/api/drift">/api/drift</a> ·
<a href="/api/runaways">/api/runaways</a> · <a href="/api/budgets">/api/budgets</a> · <a href="/v1/usage/stats">/v1/usage/stats</a> ·
<a href="/v1/usage/recent">/v1/usage/recent</a> · <a href="/api/notifications">/api/notifications</a> · <a href="/api/prices">/api/prices</a> · <a href="/docs">API docs</a></p>
<table id="status"><thead><tr><th>signal</th><th>scope</th><th>series</th><th>current</th><th>baseline</th><th>ratio</th>
<th>z</th><th>warning / high</th><th>baseline hours</th><th>severity</th></tr></thead><tbody>{body}</tbody></table>
{unpriced_html(engine.prices)}</body></html>"""
