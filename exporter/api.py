"""The HTTP edge: FastAPI routes that turn engine results and errors into responses.

`create_app` builds a fresh engine and registry per app, so tests never share state
through the global prometheus registry. Background work (the evaluation loop, pruning,
tail followers) runs in `Background`, started and stopped with the app's lifespan.
Ingest runs on the ingest queue's worker thread (`ingest_queue`), never on the event
loop; tokens are checked by `auth`; bodies are read and decompressed by `body`; error
answers and their OpenAPI declarations live in `responses`.
"""

from __future__ import annotations

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
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from . import __version__, sketch
from .auth import AuthMiddleware, Tokens
from .body import (BadEncoding, BodyTooLarge, QueueFull, UnsupportedEncoding, check_encoding, declared_length,
                   decode_content, read_body)
from .buckets import FIELDS, SKETCHES, F, TOKEN_FIELDS
from .config import ConfigError, Settings
from .engine import Engine, IngestResult
from .price_api import add_price_routes, unpriced_html
from .ingest_queue import IngestQueue, IngestQueueCollector
from .records import MAX_TS, BodyError, RecordError, decode_body, parse_ts
from .responses import (INGEST_BODY, INGEST_RESPONSES, RETRY_AFTER_BUSY, TEXT, ORJSONResponse, error, refused_body,
                        responses, store_unavailable)
from .store import StoreError

log = logging.getLogger("llm_usage_exporter")
SEVERITY_ORDER = {"ok": 0, "warning": 1, "high": 2}


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
            store = self.engine.store
            try:    # a quiet exporter still folds its last batches into the buckets
                store.checkpoint()
                if not store.writable:      # nothing else may write while readiness fails: find out
                    store.probe()
            except StoreError as e:
                log.error("store: %s", e)
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


def ingest_body(engine: Engine, body: bytes, content_type: str, coding: str) -> IngestResult:
    """Decompress, decode and ingest one POST body (on the ingest worker)."""
    limit = engine.settings.max_body_bytes
    decoded = decode_body(decode_content(body, coding, limit), content_type, engine.settings.max_errors_listed)
    del body
    return engine.ingest(decoded.items, indices=decoded.indices, rejections=decoded.rejections)


def create_app(settings: Settings, engine: Engine | None = None, background: bool = True,
               extra_tasks: list[Callable[[threading.Event], None]] | None = None) -> FastAPI:
    """An app with its own engine (and so its own registry). `background=False` for tests
    that drive evaluation by hand."""
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

    @app.exception_handler(StoreError)
    async def store_failed(request: Request, e: StoreError) -> Response:
        log.error("%s %s: %s", request.method, request.url.path, e)
        return store_unavailable("the store could not be read or written; retry later", e.kind, str(e))

    # --- ingest -----------------------------------------------------------------------

    @app.post("/v1/records", responses=INGEST_RESPONSES, openapi_extra={"requestBody": INGEST_BODY})
    async def post_records(request: Request) -> Response:
        """Accept one JSON object, a JSON array, or NDJSON, optionally gzip- or
        deflate-encoded. Good records count even when others fail; a 503 or 429 means
        nothing was counted: send the same batch again after Retry-After."""
        limit = settings.max_body_bytes
        try:
            coding = check_encoding(request.headers.get("content-encoding", ""))
        except UnsupportedEncoding as e:
            return refused_body(415, str(e))
        declared = declared_length(request)
        if declared is not None and declared > limit:
            return refused_body(413, str(BodyTooLarge(limit, declared)))
        ticket = queue.admit(declared or 0)
        if ticket is None:
            return refused_body(429, "the ingest queue is full; send the same batch again after Retry-After",
                                RETRY_AFTER_BUSY)
        with ticket:
            try:
                body = await read_body(request, limit, ticket)
            except ClientDisconnect:        # gone, or closed by the body timeout: nothing to answer
                return error(408, "the body did not arrive")
            except BodyTooLarge as e:
                return refused_body(413, str(e))
            except QueueFull:
                queue.refused()
                return refused_body(429, "the ingest queue is full; send the same batch again after Retry-After",
                                    RETRY_AFTER_BUSY)
            try:
                result = await queue.run(ingest_body, engine, body, request.headers.get("content-type", ""), coding)
            except BodyError as e:
                return error(400, str(e), line=e.line, column=e.column, position=e.pos)
            except BadEncoding as e:
                return error(400, str(e))
            except BodyTooLarge as e:
                return error(413, str(e))
            except StoreError as e:
                log.error("ingest not stored: %s", e)
                return store_unavailable("records were not stored; send the same batch again after Retry-After "
                                         "(request_id keeps retries idempotent)", e.kind, str(e))
        status = 422 if result.rejected_total and not result.accepted and not result.duplicate else 200
        return ORJSONResponse(result.to_dict(), status_code=status)

    @app.post("/api/alertmanager/webhook", responses=responses(400, 403, 413, 503))
    async def alertmanager_webhook(request: Request) -> Response:
        """A receiver for Alertmanager's webhook, so the stack delivers somewhere out of the box."""
        try:
            body = await read_body(request, settings.max_body_bytes)
        except ClientDisconnect:
            return error(408, "the body did not arrive")
        except BodyTooLarge as e:
            return refused_body(413, str(e))
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return error(400, f"malformed JSON: {e}")
        if not isinstance(doc, dict) or not isinstance(doc.get("alerts"), list):
            return error(400, "expected an Alertmanager webhook payload with an 'alerts' list")
        keep = {k: doc.get(k) for k in ("status", "receiver", "groupLabels", "commonLabels", "commonAnnotations", "externalURL")}
        keep["alerts"] = [{k: a.get(k) for k in ("status", "labels", "annotations", "startsAt", "endsAt", "fingerprint")}
                          for a in doc["alerts"] if isinstance(a, dict)]
        await run_in_threadpool(engine.store.add_notification, time.time(), keep)
        return ORJSONResponse({"stored": len(keep["alerts"])})

    @app.get("/api/notifications", responses=responses(503))
    def notifications(limit: int = Query(100, ge=1, le=1000)) -> Response:
        return ORJSONResponse(engine.store.notifications(limit))

    # --- metrics and status ------------------------------------------------------------

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": TEXT}, **responses()})
    def metrics() -> Response:
        return Response(engine.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_class=PlainTextResponse, responses={200: {"content": TEXT}})
    async def healthz() -> Response:
        """Liveness: answered on the event loop, whatever ingest is doing."""
        return PlainTextResponse("ok\n")

    @app.get("/readyz", response_class=PlainTextResponse,
             responses={200: {"content": TEXT}, 503: {"description": "Not ready", "content": TEXT}})
    async def readyz() -> Response:
        """Ready once the first evaluation is done, and while the store can be written."""
        if engine.snapshot is None:
            return PlainTextResponse("not ready: no evaluation yet\n", status_code=503)
        if not engine.store.writable:
            return PlainTextResponse(f"not ready: the store cannot be written: {engine.store.last_error}\n",
                                     status_code=503)
        return PlainTextResponse("ready\n")

    @app.get("/api/anomalies", responses=responses(400, 503))
    def anomalies(scope: str | None = None, app_: str | None = Query(None, alias="app"), model: str | None = None,
                  provider: str | None = None, signal: str | None = None, severity: str | None = None) -> Response:
        snap = engine.snapshot
        if snap is None:
            return error(503, "no evaluation yet")
        if severity is not None and severity not in SEVERITY_ORDER:
            return error(400, f"severity must be one of {list(SEVERITY_ORDER)}")
        rows = [r for r in snap.rows()
                if (scope is None or r["scope"] == scope) and (app_ is None or r["app"] == app_)
                and (model is None or r["model"] == model) and (provider is None or r["provider"] == provider)
                and (signal is None or r["signal"] == signal)
                and (severity is None or SEVERITY_ORDER[r["severity"]] >= SEVERITY_ORDER[severity])]
        return ORJSONResponse({"evaluated_at": snap.t, "anomalies": rows})

    def detector_report(name: str) -> Response:
        rep = engine.detectors.latest
        if rep is None:
            return error(503, "no evaluation yet")
        value = getattr(rep, name)
        body = [r.to_dict() for r in value] if isinstance(value, list) else value.to_dict()
        return ORJSONResponse({"evaluated_at": engine.snapshot.t if engine.snapshot else None, name: body})

    @app.get("/api/drift", responses=responses(503))
    def drift(min_severity: int = Query(0, ge=0, le=2)) -> Response:
        """Per-model drift values, severity and the reasons behind it."""
        rep = engine.detectors.latest
        if rep is None:
            return error(503, "no evaluation yet")
        return ORJSONResponse({"drift": [r.to_dict() for r in rep.drift if r.severity >= min_severity]})

    @app.get("/api/runaways", responses=responses(503))
    def runaways(app_: str | None = Query(None, alias="app")) -> Response:
        """Flagged sessions (ids only here, never in labels), counts per app and reason, invocation spikes."""
        rep = engine.detectors.latest
        if rep is None:
            return error(503, "no evaluation yet")
        body = rep.runaway.to_dict()
        if app_ is not None:
            body["offenders"] = [o for o in body["offenders"] if o.get("app") == app_]
            body["sessions_by_app_reason"] = [r for r in body["sessions_by_app_reason"] if r["app"] == app_]
        return ORJSONResponse({"evaluated_at": rep.runaway and engine.snapshot.t if engine.snapshot else None,
                               "runaway": body})

    @app.get("/api/budgets", responses=responses(503))
    def budgets() -> Response:
        """Budgets, period-to-date spend and forecasts per app and overall."""
        return detector_report("budget")

    @app.get("/", response_class=HTMLResponse, responses=responses())
    def landing() -> Response:
        return HTMLResponse(landing_page(engine))

    add_price_routes(app, engine.prices)

    # --- usage API ---------------------------------------------------------------------

    def time_arg(name: str, v: str | None, default: float) -> float:
        if v is None or v == "":
            return default
        try:
            return parse_ts(v, default)
        except RecordError as e:
            raise ValueError(f"{name}: {e.message}") from None

    @app.get("/v1/usage/stats", responses=responses(400, 503))
    def usage_stats(start: str | None = None, end: str | None = None,
                    group_by: str = Query("provider,model", description="comma list of app, provider, model")) -> Response:
        """Totals and percentiles; `start` and `end` are RFC 3339 or epoch seconds between
        1970 and 9999 (default: the last 24 hours)."""
        now = engine.clock()
        try:
            t0, t1 = time_arg("start", start, now - 86400), time_arg("end", end, now)
        except ValueError as e:
            return error(400, str(e))
        if t1 < t0:
            return error(400, f"end ({t1:g}) is before start ({t0:g})")
        dims = [d.strip() for d in group_by.split(",") if d.strip()]
        bad = [d for d in dims if d not in ("app", "provider", "model")]
        if bad:
            return error(400, f"group_by: unknown dimension(s) {bad}; use app, provider, model")
        return ORJSONResponse(usage_statistics(engine, t0, t1, dims))

    @app.get("/v1/usage/recent", responses=responses(503))
    def usage_recent(limit: int = Query(50, ge=1, le=1000)) -> Response:
        rows = list(engine.store.records(0, math.inf, limit=limit, newest_first=True))
        return ORJSONResponse({"records": rows})

    @app.get("/v1/usage/export", response_class=StreamingResponse,
             responses={200: {"description": "JSONL, one record per line",
                              "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                        **responses(400, 503)})
    def usage_export(start: str | None = None, end: str | None = None) -> Response:
        now = engine.clock()
        try:
            t0, t1 = time_arg("start", start, 0.0), time_arg("end", end, min(now + 1, MAX_TS))
        except ValueError as e:
            return error(400, str(e))

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
