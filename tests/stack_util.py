"""Shared helpers for tests of the shipped stack: the dashboards' queries and the native runner.

    from stack_util import iter_dashboard_queries, load_stack

    for q in iter_dashboard_queries():           # every PromQL expression of every dashboard
        q.dashboard, q.panel, q.expr             # uid, panel title, expr with Grafana variables filled in

    Stack = load_stack().Stack                   # scripts/stack.py, importable without a package
    with Stack(fast=True) as stack:
        delivered(stack, receiver="pager", status="firing", labels={"alertname": "LLMCostSpike"})
        exporter_json(stack, "/api/runaways"); prom_api(stack, "query_range", {...}); rule_errors(stack)
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
PROVISIONING_DIR = REPO / "grafana" / "provisioning"

_VAR = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")


class DashboardQuery(NamedTuple):
    dashboard: str   # dashboard uid
    panel: str       # panel title ("annotation: <name>" for annotation queries)
    expr: str        # the PromQL with Grafana variables substituted


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows; rows themselves too."""
    for panel in dashboard.get("panels", []):
        yield panel
        for inner in panel.get("panels", []) or []:
            yield inner


def variable_values(dashboard: dict[str, Any], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """What each template variable stands for: the All value (a regex) or the current value."""
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        current = var.get("current", {}).get("value")
        if isinstance(current, list):
            current = current[0] if current else ""
        if var.get("includeAll") and (current in (None, "", "$__all")):
            values[name] = var.get("allValue") or ".*"
        else:
            values[name] = str(current if current is not None else "")
    values.update(overrides or {})
    return values


def substitute(expr: str, variables: dict[str, str], *, rate_interval: str = "5m", range_: str = "1d",
               interval: str = "1m") -> str:
    """Replace Grafana variables ($app, ${model}, $__rate_interval, ...) so the PromQL stands alone."""
    builtins = {"__rate_interval": rate_interval, "__range": range_, "__interval": interval,
                "__range_s": str(_seconds(range_)), "__interval_ms": str(_seconds(interval) * 1000)}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in builtins:
            return builtins[name]
        if name in variables:
            return variables[name]
        return m.group(0)  # not a variable (e.g. "$1" in label_replace)

    return _VAR.sub(repl, expr)


def _seconds(d: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return int(d[:-1]) * units[d[-1]]


def iter_dashboard_queries(*, rate_interval: str = "5m", range_: str = "1d", interval: str = "1m",
                           variables: dict[str, str] | None = None, annotations: bool = True,
                           directory: Path = DASHBOARD_DIR) -> Iterator[DashboardQuery]:
    """(dashboard uid, panel title, PromQL) for every Prometheus query in the shipped dashboards.

    `variables` overrides template variables (e.g. {"app": "chatbot"}); by default every
    multi-value variable takes its All value (`.*`) and custom ones their current value.
    """
    for dash in load_dashboards(directory).values():
        values = variable_values(dash, variables)
        uid = dash.get("uid", "")
        if annotations:
            for ann in dash.get("annotations", {}).get("list", []):
                if ann.get("expr"):
                    yield DashboardQuery(uid, f"annotation: {ann.get('name')}",
                                         substitute(ann["expr"], values, rate_interval=rate_interval,
                                                    range_=range_, interval=interval))
        for panel in iter_panels(dash):
            for t in panel.get("targets", []) or []:
                if t.get("expr"):
                    yield DashboardQuery(uid, panel.get("title", ""),
                                         substitute(t["expr"], values, rate_interval=rate_interval,
                                                    range_=range_, interval=interval))


def load_stack() -> ModuleType:
    """scripts/stack.py as a module (it is a script, not part of the package)."""
    name = "llm_stack_runner"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "stack.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def promtool() -> str | None:
    return shutil.which("promtool")


# --- reading a running stack (tests/test_e2e_alerts.py, tests/test_dashboards_live.py) ------

def exporter_json(stack: Any, path: str, timeout: float = 10.0) -> Any:
    """GET a JSON document from the stack's exporter, e.g. "/api/runaways"."""
    return load_stack().http_json(stack.urls["exporter"] + path, timeout=timeout)


def delivered(stack: Any, *, receiver: str | None = None, status: str | None = None,
              labels: dict[str, str] | None = None, limit: int = 1000) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(notification, alert) pairs the exporter's webhook receiver got from Alertmanager.

    Newest first. `receiver` is the Alertmanager receiver name, `status` the alert's own
    status (firing / resolved), `labels` exact values the alert must carry (others may
    be there too)."""
    return matching_alerts(exporter_json(stack, f"/api/notifications?limit={limit}"), receiver, status, labels)


def matching_alerts(notes: Iterable[dict[str, Any]], receiver: str | None = None, status: str | None = None,
                    labels: Mapping[str, str] | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(notification, alert) pairs of webhook notifications that match: see `delivered`."""
    out = []
    for note in notes:
        if receiver is not None and note.get("receiver") != receiver:
            continue
        for alert in note.get("alerts") or []:
            if status is not None and alert.get("status") != status:
                continue
            if all((alert.get("labels") or {}).get(k) == v for k, v in (labels or {}).items()):
                out.append((note, alert))
    return out


def epoch(rfc3339: str) -> float:
    """An Alertmanager timestamp ("2026-10-05T10:00:00.123456789Z") in epoch seconds."""
    m = re.fullmatch(r"([\d-]+T[\d:]+)(?:\.(\d+))?(Z|[+-][\d:]+)", rfc3339)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {rfc3339!r}")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{(m.group(2) or '0')[:6]}{zone}").timestamp()


def prom_api(stack: Any, endpoint: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """A Prometheus HTTP API answer (e.g. "query_range") as a dict, errors included.

    Unlike `Stack.prom_query` an HTTP 400/422 (a query that does not parse or evaluate)
    is returned, not raised, so the caller can report Prometheus' own error message."""
    url = f"{stack.urls['prometheus']}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "errorType": str(e.code), "error": body.decode(errors="replace")}


def runbook_anchors(path: Path = REPO / "docs" / "runbook.md") -> set[str]:
    """GitHub's anchors for the headings of docs/runbook.md ("### LLMCostSpike" -> "llmcostspike")."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*\S)\s*$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def rule_errors(stack: Any) -> list[str]:
    """Rules whose last evaluation in the stack's Prometheus failed ("group / rule: error")."""
    return [f"{g['name']} / {r.get('name')}: {r.get('lastError')}"
            for g in stack.prom_rule_groups() for r in g.get("rules", [])
            if r.get("health") == "err" or r.get("lastError")]


def e2e_marks() -> list[Any]:
    """`pytestmark` of the tests that run the real stack: marked e2e, skipped with a clear
    reason where the Prometheus / Alertmanager binaries are not installed."""
    stack = load_stack()
    return [pytest.mark.e2e,
            pytest.mark.skipif(not (stack.prometheus_binary() and stack.alertmanager_binary()),
                               reason="prometheus / alertmanager binaries not installed")]


def icmp_allowed() -> tuple[bool, str]:
    """Whether this process (and so a prober it starts) may send ICMP echo requests: raw
    sockets (root or CAP_NET_RAW), or unprivileged ICMP sockets (net.ipv4.ping_group_range).
    The reason says what was tried when it may not."""
    import socket
    last = ""
    for kind, name in ((socket.SOCK_RAW, "raw ICMP socket"), (socket.SOCK_DGRAM, "unprivileged ICMP socket")):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return True, name
        except OSError as e:
            last = f"{name}: {e.strerror}"
    return False, f"this process may not send ICMP echo requests (no CAP_NET_RAW; {last}; " \
                  "net.ipv4.ping_group_range excludes its group)"


def blackbox_marks() -> list[Any]:
    """`pytestmark` of tests that also need the blackbox exporter binary."""
    stack = load_stack()
    return [*e2e_marks(),
            pytest.mark.skipif(not stack.blackbox_binary(),
                               reason="blackbox exporter not installed (Debian package prometheus-blackbox-exporter)")]
