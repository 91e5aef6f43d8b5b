"""Shared helpers for tests of the shipped stack: the dashboards' queries and the native runner.

    from stack_util import iter_dashboard_queries, load_stack

    for q in iter_dashboard_queries():           # every PromQL expression of every dashboard
        q.dashboard, q.panel, q.expr             # uid, panel title, expr with Grafana variables filled in

    Stack = load_stack().Stack                   # scripts/stack.py, importable without a package
    with Stack(fast=True) as stack: ...
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, NamedTuple

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
