"""What the evaluator and the detectors concluded at the last evaluation: anomalies per
signal and scope, drift per model, runaway sessions, budgets and forecasts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from ...detectors import DetectorReports
from ...engine import Engine
from ..deps import EngineDep
from ..responses import ApiError, ORJSONResponse, responses

router = APIRouter(tags=["anomalies"])
SEVERITY_ORDER = {"ok": 0, "warning": 1, "high": 2}


@router.get("/api/anomalies", responses=responses(400, 503))
def anomalies(engine: EngineDep, scope: str | None = None, app: str | None = None, model: str | None = None,
              provider: str | None = None, signal: str | None = None, severity: str | None = None) -> Response:
    """Current value, baseline, ratio, z-score, threshold and severity per signal and scope."""
    snap = engine.snapshot
    if snap is None:
        raise ApiError(503, "no evaluation yet")
    if severity is not None and severity not in SEVERITY_ORDER:
        raise ApiError(400, f"severity must be one of {list(SEVERITY_ORDER)}")
    wanted = {"scope": scope, "app": app, "model": model, "provider": provider, "signal": signal}
    floor = SEVERITY_ORDER[severity] if severity is not None else 0
    rows = [r for r in snap.rows()
            if all(v is None or r[k] == v for k, v in wanted.items()) and SEVERITY_ORDER[r["severity"]] >= floor]
    return ORJSONResponse({"evaluated_at": snap.t, "anomalies": rows})


def _reports(engine: Engine) -> DetectorReports:
    rep = engine.detectors.latest
    if rep is None:
        raise ApiError(503, "no evaluation yet")
    return rep


def _report(engine: Engine, name: str, body: Any) -> Response:
    return ORJSONResponse({"evaluated_at": engine.snapshot.t if engine.snapshot else None, name: body})


@router.get("/api/drift", responses=responses(503))
def drift(engine: EngineDep, min_severity: int = Query(0, ge=0, le=2)) -> Response:
    """Per-model drift values, severity and the reasons behind it."""
    return _report(engine, "drift", [r.to_dict() for r in _reports(engine).drift if r.severity >= min_severity])


@router.get("/api/runaways", responses=responses(503))
def runaways(engine: EngineDep, app: str | None = None) -> Response:
    """Flagged sessions (ids only here, never in labels), counts per app and reason, invocation spikes."""
    body = _reports(engine).runaway.to_dict()
    if app is not None:
        body["offenders"] = [o for o in body["offenders"] if o.get("app") == app]
        body["sessions_by_app_reason"] = [r for r in body["sessions_by_app_reason"] if r["app"] == app]
    return _report(engine, "runaway", body)


@router.get("/api/budgets", responses=responses(503))
def budgets(engine: EngineDep) -> Response:
    """Budgets, period-to-date spend and forecasts per app and overall."""
    return _report(engine, "budget", _reports(engine).budget.to_dict())
