"""Backend health for `GET /api/backends`: read from Prometheus, arranged per backend.

The blackbox exporter keeps no history (a probe is one scrape), and the exporter does not
probe or scrape anything itself: Prometheus holds every probe result, and the recording
rules of prometheus/rules/backends.yml derive from them what a status answer needs, the
failures in a row, the last success, the last failure with its reason, the probe
interval. This module asks Prometheus' HTTP API for those series (four instant queries)
and turns the answer into one entry per backend with its probes (`backend_status`, a pure
function of the query results). Without `prometheus_url`, or when Prometheus cannot be
asked, the route answers 503 with the reason (`PrometheusUnavailable`).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Series of the probes of prometheus/backends.yml: the relabelling gives each a `backend`.
_OURS = 'backend!=""'
CURRENT = ("up", "probe_success", "probe_duration_seconds", "probe_http_status_code",
           "probe_ssl_earliest_cert_expiry", "instance:probe_failures:consecutive",
           "instance:probe_interval_seconds:mean1h")
STATES = ("down", "unknown", "up")              # also the order of the answer
KEY = ("job", "instance", "module")             # one probe
DESCRIBED_BY = ("provider", "model", "kind")    # labels of the backend's entry


def queries(lookback: str) -> dict[str, str]:
    """The PromQL /api/backends runs (also what docs/backends.md shows for asking by hand)."""
    return {
        "current": f'{{__name__=~"{"|".join(CURRENT)}", {_OURS}}}',
        "last_success": f"last_over_time(instance:probe_success_timestamp_seconds:max1h{{{_OURS}}}[{lookback}])",
        "last_failure": "topk by (job, instance, module) (1, last_over_time("
                        f"instance:probe_failure_timestamp_seconds:by_reason{{{_OURS}}}[{lookback}]))",
        "alerts": f'ALERTS{{alertstate="firing", alertname=~"LLMBackend.+", {_OURS}}}',
    }


class PrometheusUnavailable(Exception):
    """Prometheus could not be asked: `reason` is not_configured, unreachable or error."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Prometheus:
    """Prometheus' query API at `url` (no trailing slash)."""

    url: str
    timeout: float
    token_file: Path | None = None

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """An instant query's result vector, or PrometheusUnavailable."""
        params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        req = urllib.request.Request(f"{self.url}/api/v1/query?{params}", headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = _error_text(e.read())
            raise PrometheusUnavailable("error", f"Prometheus at {self.url} answered HTTP {e.code}{detail}") from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise PrometheusUnavailable("unreachable", f"Prometheus at {self.url} cannot be reached: {why}") from None
        try:
            doc = json.loads(raw)
            if doc.get("status") != "success" or doc["data"]["resultType"] != "vector":
                raise ValueError(doc.get("error") or "not a vector")
            result: list[dict[str, Any]] = doc["data"]["result"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PrometheusUnavailable("error", f"Prometheus at {self.url} gave no query result: {e}") from None
        return result

    def _headers(self) -> dict[str, str]:
        if self.token_file is None:
            return {}
        try:
            token = self.token_file.read_text().strip()
        except OSError as e:
            raise PrometheusUnavailable("error", f"prometheus_token_file: cannot read {self.token_file}: "
                                                 f"{e.strerror}") from None
        return {"Authorization": f"Bearer {token}"}


def _error_text(body: bytes) -> str:
    try:
        return f": {json.loads(body)['error']}"
    except (ValueError, KeyError, TypeError):
        return ""


def read(prometheus: Prometheus, now: float, lookback_s: float) -> dict[str, Any]:
    """Ask Prometheus and arrange the answer (see `backend_status`)."""
    lookback = f"{max(1, int(lookback_s))}s"
    results = {name: prometheus.query(expr, now) for name, expr in queries(lookback).items()}
    return backend_status(results, now, lookback_s)


# --- arranging the answer (pure) -------------------------------------------------------------

def _number(sample: Mapping[str, Any]) -> float | None:
    try:
        v = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _after(t: float | None, interval: float | None) -> float | None:
    """The probe after one at `t`: when the state that followed it began."""
    if t is None:
        return None
    return t + interval if interval else t


def backend_status(results: Mapping[str, Sequence[Mapping[str, Any]]], now: float,
                   lookback_s: float) -> dict[str, Any]:
    """Per backend: its state (down when a probe fails, unknown when a probe did not run),
    since when (the first probe of the current state; null when that is before the
    lookback), the last error and when, and each probe with its own numbers.

    `results` are the vectors of `queries()` by name."""
    probes: dict[tuple[str, ...], dict[str, Any]] = {}
    labels: dict[tuple[str, ...], dict[str, str]] = {}

    def probe(metric: Mapping[str, str]) -> dict[str, Any]:
        key = tuple(metric.get(k, "") for k in KEY)
        if key not in probes:
            labels[key] = {k: v for k, v in metric.items() if k in ("backend", *DESCRIBED_BY)}
            probes[key] = {"target": key[1], "module": key[2], "job": key[0], "values": {}, "alerts": []}
        return probes[key]

    for s in results.get("current", ()):
        probe(s["metric"])["values"][s["metric"].get("__name__", "")] = _number(s)
    for s in results.get("last_success", ()):
        if tuple(s["metric"].get(k, "") for k in KEY) in probes:
            probe(s["metric"])["values"]["last_success"] = _number(s)
    for s in results.get("last_failure", ()):
        if tuple(s["metric"].get(k, "") for k in KEY) in probes:
            p = probe(s["metric"])
            p["values"]["last_failure"] = _number(s)
            p["last_failure_reason"] = s["metric"].get("reason")
    for s in results.get("alerts", ()):
        if tuple(s["metric"].get(k, "") for k in KEY) in probes:
            probe(s["metric"])["alerts"].append(s["metric"].get("alertname", ""))

    backends: dict[str, dict[str, Any]] = {}
    for key, p in probes.items():
        entry = _probe_entry(p)
        name = labels[key].get("backend") or key[1]
        b = backends.setdefault(name, {"backend": name, **{k: None for k in DESCRIBED_BY}, "probes": []})
        for k in DESCRIBED_BY:
            b[k] = b[k] or labels[key].get(k) or None
        b["probes"].append(entry)
    out = [_backend_entry(b) for b in backends.values()]
    out.sort(key=lambda b: (STATES.index(b["state"]), b["backend"]))
    counts = {state: sum(1 for b in out if b["state"] == state) for state in STATES}
    return {"queried_at": now, "lookback_seconds": lookback_s, **counts, "backends": out}


def _probe_entry(p: dict[str, Any]) -> dict[str, Any]:
    v = p["values"]
    success, up = v.get("probe_success"), v.get("up")
    state = "unknown" if success is None or up == 0 else ("up" if success == 1 else "down")
    interval = v.get("instance:probe_interval_seconds:mean1h")
    since = None
    if state == "down":
        since = _after(v.get("last_success"), interval)
    elif state == "up":
        since = _after(v.get("last_failure"), interval)
    failures = v.get("instance:probe_failures:consecutive")
    code = v.get("probe_http_status_code")
    return {
        "target": p["target"], "module": p["module"], "job": p["job"], "state": state, "since": since,
        "consecutive_failures": None if failures is None else int(failures),
        "last_success": v.get("last_success"), "last_failure": v.get("last_failure"),
        "last_failure_reason": p.get("last_failure_reason"),
        "error": ("the probe did not run (Prometheus could not scrape the blackbox exporter for it)"
                  if state == "unknown" else None),
        "probe_duration_seconds": v.get("probe_duration_seconds"),
        "http_status_code": None if code is None else int(code),
        "cert_expires": v.get("probe_ssl_earliest_cert_expiry"),
        "interval_seconds": interval,
        "alerts": sorted(set(p["alerts"])),
    }


def _backend_entry(b: dict[str, Any]) -> dict[str, Any]:
    probes = sorted(b["probes"], key=lambda p: (p["module"], p["target"]))
    states = {p["state"] for p in probes}
    state = next(s for s in STATES if s in states)
    here = [p for p in probes if p["state"] == state]
    sinces = [p["since"] for p in here]
    since = None
    if sinces and None not in sinces:
        # down: since its first probe failed; up: since its last probe came back
        since = min(sinces) if state == "down" else max(sinces)
    failed = [p for p in probes if p["last_failure"] is not None]
    last = max(failed, key=lambda p: p["last_failure"]) if failed else None
    return {
        "backend": b["backend"], "state": state, "since": since,
        **{k: b[k] for k in DESCRIBED_BY},
        "last_error": last["last_failure_reason"] if last else None,
        "last_error_at": last["last_failure"] if last else None,
        "alerts": sorted({a for p in probes for a in p["alerts"]}),
        "probes": probes,
    }
