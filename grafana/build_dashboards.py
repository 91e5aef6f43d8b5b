#!/usr/bin/env python3
"""Generate the Grafana dashboards in grafana/dashboards/*.json.

The committed JSON is what Grafana provisions; this script is how it is written, so every
panel follows the same conventions:

- the datasource is the `$datasource` variable (the provisioned Prometheus by default), and
  every board has a `$job` variable for the exporter deployment;
- a filter applies everywhere on its board: a series with the filtered label is selected by
  it, and a series without it (a model's drift, an app's runaway sessions) is narrowed to
  the apps and models the selected traffic uses;
- panels beside an alert read the recording rules the alert reads, and its threshold lines
  are the threshold series from prometheus/rules/thresholds.yml; colours that stand for an
  alert threshold are that threshold's number, read from thresholds.yml when this runs;
- the anomaly rows are generated from the signal specs (exporter/anomaly/signals.py), and
  each board's "firing alerts" annotation and runbook links from the alert rules;
- tables are instant queries in table format merged on their labels (Grafana's `merge`
  transform keys rows on the fields every query has: so the queries aggregate the metric
  name away and share one label set, and each series makes one row).

Edit this file, then run

    python grafana/build_dashboards.py          # rewrite the JSON
    python grafana/build_dashboards.py --check  # fail if the JSON is out of date

Run it again after changing thresholds.yml (or `llm-usage-exporter rules`), the alert
rules, or prometheus/links.yml: the colours, annotations and runbook links follow them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "dashboards"
RULES = REPO / "prometheus" / "rules"
sys.path.insert(0, str(REPO))

from exporter.anomaly.rules import SEVERITY_AT  # noqa: E402
from exporter.anomaly.signals import DEFAULT_SIGNALS, SignalSpec  # noqa: E402

DS = {"type": "prometheus", "uid": "${datasource}"}

# Selectors. `$job` is the exporter deployment; usage series carry app, provider and model.
J = 'job=~"$job"'
U = f'{J}, app=~"$app", provider=~"$provider", model=~"$model"'
UM = f'{J}, provider=~"$provider", model=~"$model"'
UA = f'{J}, app=~"$app"'
# Anomaly gauges carry only their scope's labels (global: none, app: app, model: provider
# and model). The trailing "|" lets a filter match series that lack the label, so picking
# an app narrows the app-scope series without hiding the global or model ones.
A = f'{J}, scope=~"$scope", app=~"$app|", provider=~"$provider|", model=~"$model|"'
def firing_alerts(extra: str = "", offset: str = "") -> str:
    """The alerts firing for the selection: those of the chosen exporter job, and those of
    jobs that are no exporter's (the backend probes, Prometheus, Alertmanager), which
    `$job` (a deployment of the exporter) does not name. Each carries whichever of app,
    provider and model its expression kept, so a filter also matches their absence.
    `extra`: more matchers."""
    more = f", {extra}" if extra else ""
    off = f" offset {offset}" if offset else ""
    sel = f'alertstate="firing", alertname!="Watchdog", app=~"$app|", provider=~"$provider|", model=~"$model|"{more}'
    return (f'(ALERTS{{{sel}, job=~"$job|"}}{off} or (ALERTS{{{sel}}}{off} '
            f'unless on(job) group by (job) (llm_exporter_build_info{off})))')
# The traffic of the selection: narrows series that lack app (or provider and model).
TRAFFIC = f"app_provider_model:llm_requests:rate5m{{{U}}}"


def of_traffic(expr: str, on: str) -> str:
    """`expr` restricted to the (job, `on`) groups the selected traffic has."""
    return f"({expr}) and on (job, {on}) group by (job, {on}) ({TRAFFIC})"


def off(offset: str) -> str:
    return f" offset {offset}" if offset else ""


# --------------------------------------------------------------------------- thresholds and alerts

_CONSTANT = re.compile(r"^\s*vector\(\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)\s*\)\s*$", re.I)


def _thresholds() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for group in yaml.safe_load((RULES / "thresholds.yml").read_text())["groups"]:
        for rule in group["rules"]:
            m = _CONSTANT.match(str(rule.get("expr", "")))
            if "record" in rule and m:
                out[(rule["record"], tuple(sorted((rule.get("labels") or {}).items())))] = float(m.group(1))
    return out


THRESHOLDS = _thresholds()


def threshold(record: str, **labels: str) -> float:
    """The number of a threshold recording rule in thresholds.yml."""
    key = (record, tuple(sorted(labels.items())))
    if key not in THRESHOLDS:
        raise KeyError(f"prometheus/rules/thresholds.yml has no {record} with labels {labels}")
    return THRESHOLDS[key]


def _alerts() -> list[dict[str, Any]]:
    """Every alert rule (name, labels, expr, annotations) of prometheus/rules/."""
    out = []
    for path in sorted(RULES.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []) or []:
            out.extend(r for r in group.get("rules", []) or [] if "alert" in r)
    return out


ALERTS = _alerts()


def alerts_of(uid: str) -> list[str]:
    """The alerts whose dashboard_url opens board `uid`, in rule order."""
    names: list[str] = []
    for rule in ALERTS:
        if f"/d/{uid}?" in str((rule.get("annotations") or {}).get("dashboard_url", "")) and rule["alert"] not in names:
            names.append(rule["alert"])
    return names


def board_of(alert: str) -> str:
    for rule in ALERTS:
        m = re.search(r"/d/([\w-]+)\?", str((rule.get("annotations") or {}).get("dashboard_url", "")))
        if rule["alert"] == alert and m:
            return m.group(1)
    return "llm-overview"


RUNBOOK = str(yaml.safe_load((REPO / "prometheus" / "links.yml").read_text())["runbook"]).rstrip("/")


def runbook(*alerts: str) -> list[dict[str, Any]]:
    """Panel links to the runbook sections of `alerts`."""
    return [{"title": f"Runbook: {a}", "url": f"{RUNBOOK}#{a.lower()}", "targetBlank": True} for a in alerts]


# --------------------------------------------------------------------------- data links

KEEP = "${__url_time_range}&${datasource:queryparam}&${job:queryparam}"


def link(title: str, uid: str, **variables: str) -> dict[str, Any]:
    """A data link to board `uid` with the time range, datasource, job and `variables`
    (values such as `${__field.labels.app}` or `${__data.fields.model}`)."""
    params = "".join(f"&var-{k}={v}" for k, v in variables.items())
    return {"title": title, "url": f"/d/{uid}?{KEEP}{params}"}


def series_links(*labels: str) -> list[dict[str, Any]]:
    """Data links of a time series panel whose series carry `labels`."""
    out = []
    if "app" in labels:
        out.append(link("Budget of ${__field.labels.app}", "llm-budget", app="${__field.labels.app}"))
    if "model" in labels:
        out.append(link("Performance of ${__field.labels.provider}/${__field.labels.model}", "llm-performance",
                        provider="${__field.labels.provider}", model="${__field.labels.model}"))
    return out


def row_links(*labels: str) -> list[dict[str, Any]]:
    """Data links of a table whose rows carry `labels` as fields."""
    out = []
    if "app" in labels:
        out.append(link("Budget of ${__data.fields.app}", "llm-budget", app="${__data.fields.app}"))
    if "model" in labels:
        out.append(link("Performance of ${__data.fields.provider}/${__data.fields.model}", "llm-performance",
                        provider="${__data.fields.provider}", model="${__data.fields.model}"))
    return out


def with_link_labels(expr: str, labels: Iterable[str]) -> str:
    """`expr` with a `link_<label>` copy of each label for data links: the label's value, or
    Grafana's `$__all` where the series has none (so a link selects All, not nothing)."""
    for label in labels:
        expr = f'label_replace(label_replace({expr}, "link_{label}", "$1", "{label}", "(.+)"), ' \
               f'"link_{label}", "$$__all", "{label}", "")'
    return expr


# --------------------------------------------------------------------------- panels

def steps(*pairs: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


GREEN = steps(("green", None))
TEXT = steps(("text", None))


# Several exporters (docs/scaling.md): the replicas of an HA pair share `instance` and differ
# in `replica`, and count the same records; shards by app count different ones. Every
# query reads the exporter's series through `deduplicated`, as the rules do: a counter's
# rate per replica and the larger kept, a gauge the larger of the replicas, spend summed
# over shards, and a budget (the same configuration on every exporter) once.
# A selector may carry an offset (`... offset 1d`, `... offset $__range`), which must stay
# next to it, inside the aggregation.
# A selector's matchers may hold a variable in braces (`${target:raw}`).
_OFFSET = r"(?:\s+offset\s+-?[\w$]+)?"
_MATCHERS = r"\{(?:[^{}$]|\$\{[\w:]+\}|\$(?!\{))*\}"
_COUNTER = re.compile(r"\b(rate|increase)\((llm_[a-z_]+(?:" + _MATCHERS + r")?\[[^\]]+\]" + _OFFSET + r")\)")
_GAUGE = re.compile(r"(?<![\w:])(llm_(?:anomaly|drift|runaway|budget|cost_usd_period|cost_usd_forecast)[a-z_]*)"
                    r"(" + _MATCHERS + r")?" + _OFFSET + r"(?![\w\[{(])")


def deduplicated(expr: str) -> str:
    def gauge(m: re.Match[str]) -> str:
        series = m.group(0)
        if m.group(1) == "llm_budget_usd":
            return f"max without (instance, replica) ({series})"
        if m.group(1).startswith(("llm_cost_usd_period", "llm_cost_usd_forecast")):
            return f"sum without (instance) (max without (replica) ({series}))"
        return f"max without (replica) ({series})"

    expr = _COUNTER.sub(lambda m: f"max without (replica) ({m.group(1)}({m.group(2)}))", expr)
    return _GAUGE.sub(gauge, expr)


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, table: bool = False) -> dict[str, Any]:
    expr = deduplicated(expr)
    t: dict[str, Any] = {
        "datasource": DS, "refId": ref, "expr": expr, "editorMode": "code",
        "legendFormat": legend or "__auto", "range": not instant, "instant": instant,
    }
    if table:
        t["format"] = "table"
    return t


def targets(*specs: tuple[str, str], instant: bool = False, table: bool = False) -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i), instant=instant, table=table) for i, (expr, legend) in enumerate(specs)]


def by_name(name: str, *props: tuple[str, Any]) -> dict[str, Any]:
    return {"matcher": {"id": "byName", "options": name}, "properties": [{"id": k, "value": v} for k, v in props]}


def by_regexp(regex: str, *props: tuple[str, Any]) -> dict[str, Any]:
    return {"matcher": {"id": "byRegexp", "options": regex}, "properties": [{"id": k, "value": v} for k, v in props]}


def color(c: str) -> dict[str, Any]:
    return {"mode": "fixed", "fixedColor": c}


# long dashes are reserved for alert thresholds (tests find them by this style)
DASHED = {"fill": "dash", "dash": [10, 10]}
SHORT_DASHED = {"fill": "dash", "dash": [4, 6]}
DOTTED = {"fill": "dot", "dash": [0, 10]}


def threshold_line(matcher: dict[str, Any], c: str, *, legend: bool = True) -> dict[str, Any]:
    """Overrides that draw the matched series as a dashed alert threshold."""
    props = [{"id": "color", "value": color(c)}, {"id": "custom.lineStyle", "value": DASHED},
             {"id": "custom.fillOpacity", "value": 0}, {"id": "custom.lineWidth", "value": 1}]
    if not legend:
        props.append({"id": "custom.hideFrom", "value": {"legend": True, "tooltip": False, "viz": False}})
    return {"matcher": matcher, "properties": props}


def panel(kind: str, title: str, description: str, tgts: list[dict[str, Any]], defaults: dict[str, Any],
          options: dict[str, Any], overrides: list[dict[str, Any]] | None, links: list[dict[str, Any]] | None,
          data_links: list[dict[str, Any]] | None) -> dict[str, Any]:
    if data_links:
        defaults["links"] = data_links
    p: dict[str, Any] = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options, "targets": tgts,
    }
    if links:
        p["links"] = links
    return p


def timeseries(title: str, tgts: list[dict[str, Any]], unit: str, description: str, *,
               stack: bool = False, fill: int = 10, axis: str = "", overrides: list[dict[str, Any]] | None = None,
               min_: float | None = None, max_: float | None = None, log: int | None = None,
               mappings: list[Any] | None = None, interpolation: str = "linear",
               legend_calcs: Iterable[str] = ("mean", "max", "lastNotNull"), decimals: int | None = None,
               links: list[dict[str, Any]] | None = None, data_links: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line", "lineInterpolation": interpolation, "lineWidth": 1, "fillOpacity": fill,
        "gradientMode": "none", "showPoints": "never", "pointSize": 4, "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "axisPlacement": "auto", "axisLabel": axis, "axisSoftMin": 0 if min_ is None and not log else None,
        "scaleDistribution": {"type": "log", "log": log} if log else {"type": "linear"},
        "thresholdsStyle": {"mode": "off"},
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
    }
    custom = {k: v for k, v in custom.items() if v is not None}
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "palette-classic"}, "custom": custom,
                                "thresholds": GREEN, "mappings": mappings or []}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {"legend": {"showLegend": True, "displayMode": "table", "placement": "bottom", "calcs": list(legend_calcs)},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel("timeseries", title, description, tgts, defaults, options, overrides, links, data_links)


def _reduce(calc: str = "lastNotNull") -> dict[str, Any]:
    return {"calcs": [calc], "fields": "", "values": False}


def stat(title: str, tgts: list[dict[str, Any]], unit: str, description: str, *,
         colors: dict[str, Any] | None = None, mappings: list[Any] | None = None, decimals: int | None = None,
         overrides: list[dict[str, Any]] | None = None, no_value: str | None = None,
         links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stat of instant values; more than one query shows each value with its name."""
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": colors or TEXT,
                                "mappings": mappings or []}
    if decimals is not None:
        defaults["decimals"] = decimals
    if no_value:
        defaults["noValue"] = no_value
    options = {"reduceOptions": _reduce(), "colorMode": "value", "graphMode": "none", "justifyMode": "auto",
               "orientation": "auto", "textMode": "value_and_name" if len(tgts) > 1 else "auto",
               "wideLayout": True, "showPercentChange": False}
    return panel("stat", title, description, tgts, defaults, options, overrides, links, None)


def gauge(title: str, tgts: list[dict[str, Any]], unit: str, description: str, *,
          colors: dict[str, Any], max_: float, links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": colors,
                                "mappings": [], "min": 0, "max": max_}
    options = {"reduceOptions": _reduce(), "orientation": "auto", "showThresholdLabels": False,
               "showThresholdMarkers": True, "sizing": "auto", "minVizHeight": 75, "minVizWidth": 75}
    return panel("gauge", title, description, tgts, defaults, options, None, links, None)


def bargauge(title: str, tgts: list[dict[str, Any]], unit: str, description: str, *,
             no_value: str | None = None, data_links: list[dict[str, Any]] | None = None,
             colors: dict[str, Any] | None = None, max_: float | None = None,
             links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Horizontal bars; `colors` (alert thresholds) colour them, else a gradient."""
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds" if colors else "continuous-BlPu"},
                                "thresholds": colors or GREEN, "mappings": [], "min": 0}
    if max_ is not None:
        defaults["max"] = max_
    if no_value:
        defaults["noValue"] = no_value
    options = {"reduceOptions": _reduce(), "orientation": "horizontal", "displayMode": "gradient",
               "valueMode": "color", "namePlacement": "auto", "showUnfilled": True, "sizing": "auto",
               "minVizHeight": 16, "minVizWidth": 8, "maxVizHeight": 300}
    return panel("bargauge", title, description, tgts, defaults, options, None, links, data_links)


def state_timeline(title: str, tgts: list[dict[str, Any]], description: str, *, mappings: list[Any],
                   links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One bar per series, coloured by its value mapping over time (up / down)."""
    defaults: dict[str, Any] = {"unit": "none", "color": {"mode": "thresholds"}, "thresholds": GREEN,
                                "mappings": mappings, "custom": {"fillOpacity": 80, "lineWidth": 0, "spanNulls": False}}
    options = {"showValue": "never", "mergeValues": True, "alignValue": "left", "rowHeight": 0.8,
               "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
               "tooltip": {"mode": "single", "sort": "none"}}
    return panel("state-timeline", title, description, tgts, defaults, options, None, links, None)


def table(title: str, tgts: list[dict[str, Any]], unit: str, description: str, *,
          columns: dict[str, str], overrides: list[dict[str, Any]] | None = None,
          hide: Iterable[str] = (), order: Iterable[str] = (), sort: tuple[str, bool] | None = None,
          no_value: str | None = None, links: list[dict[str, Any]] | None = None,
          data_links: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Instant queries in table format, merged into one row per series.

    `columns` names each query's value column (refId -> name). Grafana calls it `Value #<refId>`
    when a panel has several queries and `Value` when it has one. `hide` drops label columns;
    `labels` shows label columns under another name (`instance` is hidden unless named here);
    `order` puts these columns first, in this order."""
    exclude = {"Time": True, "__name__": True, "instance": True}
    exclude.update({h: True for h in hide})
    for label in labels or {}:
        exclude.pop(label, None)
    transformations: list[dict[str, Any]] = []
    if len(tgts) > 1:
        transformations.append({"id": "merge", "options": {}})
        rename = {f"Value #{ref}": name for ref, name in columns.items()}
    else:
        rename = {"Value": next(iter(columns.values()))} if columns else {}
    rename.update(labels or {})
    # organize orders and excludes by the fields' names before it renames them
    original = {new: old for old, new in rename.items()}
    index = {original.get(name, name): i for i, name in enumerate(order)}
    transformations.append({"id": "organize", "options": {"excludeByName": exclude, "fieldOrder": "manual",
                                                          "indexByName": index, "renameByName": rename}})
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": TEXT, "mappings": [],
                                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False,
                                           "filterable": True}}
    if no_value:
        defaults["noValue"] = no_value
    options: dict[str, Any] = {"showHeader": True, "cellHeight": "sm",
                               "footer": {"show": False, "reducer": ["sum"], "fields": "", "countRows": False}}
    if sort:
        options["sortBy"] = [{"displayName": sort[0], "desc": sort[1]}]
    p = panel("table", title, description, tgts, defaults, options, overrides, links, data_links)
    p["transformations"] = transformations
    return p


SEVERITY_MAPPING = [{"type": "value", "options": {
    "0": {"text": "ok", "color": "green", "index": 0},
    "1": {"text": "warning", "color": "orange", "index": 1},
    "2": {"text": "high", "color": "red", "index": 2},
}}]
DRIFT_MAPPING = [{"type": "value", "options": {
    "0": {"text": "none", "color": "green", "index": 0},
    "1": {"text": "mild", "color": "orange", "index": 1},
    "2": {"text": "severe", "color": "red", "index": 2},
}}]
EXPLAINED_MAPPING = [{"type": "value", "options": {
    "0": {"text": "no", "color": "text", "index": 0},
    "1": {"text": "yes (quiet)", "color": "blue", "index": 1},
}}]
# the verdicts the anomaly alerts fire on: warning at severity 1, critical at 2
SEVERITY_COLORS = steps(("green", None), ("orange", SEVERITY_AT["warning"]), ("red", SEVERITY_AT["critical"]))
# the drift verdicts LLMQualityDrift fires on: warning at 1 (mild), critical at 2 (severe)
DRIFT_COLORS = steps(("green", None), ("orange", 1), ("red", 2))


def severity_column(name: str, mapping: list[Any] = SEVERITY_MAPPING,
                    colors: dict[str, Any] = SEVERITY_COLORS) -> dict[str, Any]:
    return by_name(name, ("mappings", mapping), ("unit", "short"), ("decimals", 0),
                   ("custom.cellOptions", {"type": "color-background", "mode": "basic"}), ("thresholds", colors))


def colored(name: str, unit: str, colors: dict[str, Any], decimals: int | None = None, *,
            cell: bool = True) -> dict[str, Any]:
    """A field coloured by `colors` (a table cell's text, or a stat's value with `cell=False`)."""
    props: list[tuple[str, Any]] = [("unit", unit), ("thresholds", colors)]
    if cell:
        props.append(("custom.cellOptions", {"type": "color-text"}))
    if decimals is not None:
        props.append(("decimals", decimals))
    return by_name(name, *props)


def stat_colored(name: str, unit: str, colors: dict[str, Any], decimals: int | None = None) -> dict[str, Any]:
    return colored(name, unit, colors, decimals, cell=False)


def unit_column(name: str, unit: str, decimals: int | None = None) -> dict[str, Any]:
    props: list[tuple[str, Any]] = [("unit", unit)]
    if decimals is not None:
        props.append(("decimals", decimals))
    return by_name(name, *props)


def hidden(*names: str) -> list[dict[str, Any]]:
    """Fields kept in the frame (data links read them) but not shown as columns."""
    return [by_name(n, ("custom.hidden", True)) for n in names]


def change(name: str, unit: str = "percentunit") -> dict[str, Any]:
    """A stat's "change against the previous period" value: plain text, signed."""
    return by_name(name, ("unit", unit), ("decimals", 1), ("color", color("text")),
                   ("thresholds", TEXT))


# --------------------------------------------------------------------------- layout

class Board:
    """One dashboard: panels placed left to right in lines of 24 columns under rows."""

    def __init__(self, uid: str, title: str, description: str, tags: list[str], variables: list[dict[str, Any]], *,
                 time_from: str = "now-24h", alert_filters: tuple[str, ...] = ("job", "app", "provider", "model"),
                 alert_text: str = "{{app}}{{provider}} {{model}} {{signal}} {{scope}}"):
        self.uid, self.title, self.description = uid, title, description
        self.tags = ["llm", *tags]
        self.variables = variables
        self.time_from = time_from
        self.alert_filters, self.alert_text = alert_filters, alert_text
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.line_h = 0
        self.next_id = 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.line_h
        self.x = self.line_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": self.next_id,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1

    def add(self, p: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        p = {"id": self.next_id, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}, **p}
        self.next_id += 1
        self.panels.append(p)
        self.x += w
        self.line_h = max(self.line_h, h)

    def annotation(self) -> dict[str, Any]:
        """This board's alerts (those whose dashboard_url opens it), narrowed by its filters."""
        names = alerts_of(self.uid) if self.uid != "llm-overview" else [a["alert"] for a in ALERTS]
        names = [n for n in dict.fromkeys(names) if n != "Watchdog"]
        has = {v["name"] for v in self.variables}
        sel = ", ".join(f'{k}=~"${k}|"' for k in self.alert_filters if k in has)
        expr = f'ALERTS{{alertstate="firing", alertname=~"{"|".join(names)}", {sel}}}'
        return {"datasource": DS, "enable": True, "hide": False, "iconColor": "red", "name": "Firing alerts",
                "expr": expr, "step": "60s", "titleFormat": "{{alertname}} ({{severity}})",
                "textFormat": self.alert_text,
                "tagKeys": "alertname,severity", "useValueForTime": False}

    def to_json(self) -> dict[str, Any]:
        return {
            "annotations": {"list": [
                {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
                 "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                 "type": "dashboard"},
                self.annotation(),
            ]},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [
                {"type": "dashboards", "title": "LLM dashboards", "tags": ["llm"], "asDropdown": False,
                 "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
                 "tooltip": "", "url": ""},
                {"type": "link", "title": "Runbook", "url": RUNBOOK, "icon": "doc", "targetBlank": True,
                 "asDropdown": False, "includeVars": False, "keepTime": False, "tags": [], "tooltip":
                 "What each alert means and what to do"},
            ],
            "liveNow": False,
            "panels": self.panels,
            "refresh": "1m",
            "schemaVersion": 39,
            "tags": self.tags,
            "templating": {"list": self.variables},
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


# --------------------------------------------------------------------------- variables

def datasource_var() -> dict[str, Any]:
    return {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
            "current": {"selected": True, "text": "Prometheus", "value": "prometheus"}, "regex": "",
            "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "skipUrlSync": False}


def query_var(name: str, label: str, query: str, *, all_value: str | None = ".*", regex: str = "",
              hide: int = 0) -> dict[str, Any]:
    v: dict[str, Any] = {
        "type": "query", "name": name, "label": label, "datasource": DS,
        "definition": query, "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2, "regex": regex, "sort": 1, "multi": True, "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": hide,
        "skipUrlSync": False,
    }
    if all_value is not None:
        v["allValue"] = all_value
    return v


def job_var() -> dict[str, Any]:
    # All is the alternation of the exporter jobs found (no allValue): `up` of other jobs stays out
    return query_var("job", "Job", "label_values(llm_exporter_build_info, job)", all_value=None)


def usage_vars(app: bool = True, model: bool = True) -> list[dict[str, Any]]:
    out = [datasource_var(), job_var()]
    if app:
        out.append(query_var("app", "App", 'label_values(llm_requests_total{job=~"$job"}, app)'))
    if model:
        out.append(query_var("provider", "Provider", 'label_values(llm_requests_total{job=~"$job", app=~"$app"}, provider)'))
        out.append(query_var("model", "Model",
                             'label_values(llm_requests_total{job=~"$job", app=~"$app", provider=~"$provider"}, model)'))
    return out


def custom_var(name: str, label: str, values: list[str], default: str) -> dict[str, Any]:
    return {
        "type": "custom", "name": name, "label": label, "query": ",".join(values),
        "current": {"selected": True, "text": [default], "value": [default]},
        "options": [{"selected": v == default, "text": v, "value": v} for v in values],
        "multi": True, "includeAll": True, "allValue": ".*", "hide": 0, "skipUrlSync": False,
    }


# --------------------------------------------------------------------------- queries

def rate_rule(metric: str, by: str, sel: str = U, scale: str = "") -> str:
    """Per-second rate from the 5-minute app_provider_model recording rule, summed `by`."""
    rule = f"app_provider_model:{metric}:rate5m"
    if metric == "llm_tokens" and "token_type" in by:
        rule = "app_provider_model_token_type:llm_tokens:rate5m"
    if metric == "llm_request_errors" and "error_type" in by:
        rule = "app_provider_model_error_type:llm_request_errors:rate5m"
    return f"sum by ({by}) ({rule}{{{sel}}}){scale}"


def increase(metric: str, by: str = "", sel: str = U, offset: str = "") -> str:
    """Increase over the selected time range (instant queries only)."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (increase({metric}{{{sel}}}[$__range]{off(offset)}))"


def quantile(q: float, metric: str, by: str = "", sel: str = U, window: str = "$__rate_interval", offset: str = "",
             fn: str = "rate") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({fn}({metric}_bucket{{{sel}}}[{window}]{off(offset)})))"


def relative_change(now: str, before: str) -> str:
    return f"({now}) / ({before} > 0) - 1"


def budget_scoped(metric: str, matchers: str, offset: str = "") -> str:
    """A budget figure of the selection: the overall one (the series without `app`) when
    every app is selected, else the sum over the selected apps."""
    return (f'(sum({metric}{{{J}, {matchers}, app=~"$app", app=""}}{off(offset)}) '
            f'or on () sum({metric}{{{J}, {matchers}, app=~"$app", app!=""}}{off(offset)}))')


def burn_scoped(window: str) -> str:
    """The burn rates LLMBudgetBurnRate judges over `window`: the global recording rule when
    every app is selected (the overall budget), else each selected app's own."""
    return (f'(global:llm_cost_usd:burnrate{window}{{{J}, app=~"$app"}} '
            f'or on (job) app:llm_cost_usd:burnrate{window}{{{UA}}})')


def cost_rate_scoped(window: str) -> str:
    """USD per second of the selection over `window`, from the recording rules."""
    return (f'(sum by (job) (global:llm_cost_usd:rate{window}{{{J}, app=~"$app"}}) '
            f'or on (job) sum by (job) (app:llm_cost_usd:rate{window}{{{UA}}}))')


MONTH_LEFT = "scalar((days_in_month() - day_of_month()) * 86400 + 86400 - time() % 86400)"


# --------------------------------------------------------------------------- overview

def overview() -> Board:
    b = Board("llm-overview", "LLM usage: overview",
              "What a team looks at first: cost against the budget, cost per request, errors, latency and cache "
              "hits, each against the period before; traffic, cost and errors by app and model; firing alerts; "
              "the exporter's health.", ["overview"], usage_vars())
    err_warn = threshold("llm:error_threshold:ratio", severity="warning")
    err_crit = threshold("llm:error_threshold:ratio", severity="critical")
    latency_default = threshold("llm:performance_threshold:latency_p95_seconds")
    spent_fraction = threshold("llm:budget_threshold:spent_fraction")
    forecast_factor = threshold("llm:budget_threshold:forecast_factor")

    b.row("At a glance")
    day = budget_scoped("llm_cost_usd_period_to_date", 'period="day"')
    day_budget = budget_scoped("llm_budget_usd", 'period="day"')
    b.add(stat("Cost today", targets(
        (day, "today"),
        (f"{day} / {day_budget}", "of daily budget"),
        (relative_change(day, budget_scoped("llm_cost_usd_period_to_date", 'period="day"', "1d")), "vs yesterday by now"),
        instant=True), "currencyUSD",
        "Cost since the start of the day (the exporter's budget time zone) of the selected apps (all apps: the "
        "overall figure), the share of the daily budget it uses (red: LLMDailyBudgetExceeded's line), and the "
        "change against yesterday at the same time. Budgets are per app: the provider and model filters do not "
        "apply here.", decimals=2,
        overrides=[stat_colored("of daily budget", "percentunit", steps(("text", None), ("red", 1)), 0),
                   change("vs yesterday by now")], links=runbook("LLMDailyBudgetExceeded")), 4, 5)
    month = budget_scoped("llm_cost_usd_period_to_date", 'period="month"')
    month_budget = budget_scoped("llm_budget_usd", 'period="month"')
    month_forecast = budget_scoped("llm_cost_usd_forecast", 'horizon="month_end"')
    b.add(stat("Cost this month", targets(
        (month, "month to date"),
        (f"{month} / {month_budget}", "of monthly budget"),
        (f"{month_forecast} / {month_budget}", "forecast / budget"),
        instant=True), "currencyUSD",
        "Cost since the start of the month of the selected apps, the share of the monthly budget it uses (orange: "
        "LLMMonthlyBudgetNearlySpent, red: LLMMonthlyBudgetExceeded), and the exporter's month-end forecast "
        "against the budget (red: LLMBudgetForecastOverrun). The forecast is the comparison that matters for a "
        "month: months differ in length, so the previous month's figure at the same day is not on record.",
        decimals=2, overrides=[
            stat_colored("of monthly budget", "percentunit", steps(("text", None), ("orange", spent_fraction), ("red", 1)), 0),
            stat_colored("forecast / budget", "percentunit", steps(("text", None), ("red", forecast_factor)), 0)],
        links=runbook("LLMMonthlyBudgetNearlySpent", "LLMBudgetForecastOverrun")), 4, 5)

    def cost_per_request(o: str = "") -> str:
        priced = (f"(sum(increase(llm_requests_total{{{U}}}[$__range]{off(o)})) - "
                  f"(sum(increase(llm_unpriced_requests_total{{{U}}}[$__range]{off(o)})) or vector(0)))")
        return f"{increase('llm_cost_usd_total', offset=o)} / ({priced} > 0)"

    b.add(stat("Cost per request", targets(
        (cost_per_request(), "in period"),
        (relative_change(cost_per_request(), cost_per_request("$__range")), "vs previous period"),
        instant=True), "currencyUSD",
        "Cost divided by the priced requests in the selected time range, and its change against the period of "
        "the same length before it.", decimals=4, overrides=[change("vs previous period")]), 4, 5)

    def error_ratio(o: str = "") -> str:
        return f"({increase('llm_request_errors_total', offset=o)} or vector(0)) / {increase('llm_requests_total', offset=o)}"

    b.add(stat("Error ratio", targets(
        (error_ratio(), "in period"),
        (f"{error_ratio()} - ({error_ratio('$__range')})", "vs previous period"),
        instant=True), "percentunit",
        "Failed requests divided by requests in the selected time range (0 when none failed), coloured at "
        "LLMErrorRatioHigh's warning and critical ratios; and the difference from the period before, in "
        "percentage points. The alert judges each model over 5 minutes (performance dashboard).",
        colors=steps(("green", None), ("orange", err_warn), ("red", err_crit)), decimals=2,
        overrides=[change("vs previous period")], links=runbook("LLMErrorRatioHigh")), 4, 5)

    def p95(o: str = "") -> str:
        return quantile(0.95, "llm_request_duration_seconds", window="$__range", offset=o, fn="increase")

    b.add(stat("Latency p95", targets(
        (p95(), "in period"), (relative_change(p95(), p95("$__range")), "vs previous period"), instant=True), "s",
        "95th percentile request duration in the selected time range (from the histogram), red above the "
        "default per-model threshold of LLMModelLatencyHigh; and its change against the period before.",
        colors=steps(("green", None), ("red", latency_default)), overrides=[change("vs previous period")],
        links=runbook("LLMModelLatencyHigh")), 4, 5)

    def cache_hit(o: str = "") -> str:
        hits = increase("llm_tokens_total", sel=f'{U}, token_type="cache_read"', offset=o)
        prompt = increase("llm_tokens_total", sel=f'{U}, token_type=~"input|cache_read|cache_write"', offset=o)
        return f"({hits} or vector(0)) / {prompt}"

    b.add(stat("Cache-hit ratio", targets(
        (cache_hit(), "in period"), (f"{cache_hit()} - ({cache_hit('$__range')})", "vs previous period"),
        instant=True), "percentunit",
        "Prompt tokens read from the provider's cache, as a share of all prompt tokens (uncached input, cache "
        "reads and cache writes) in the selected time range; and the difference from the period before, in "
        "percentage points. Cache reads are billed at a fraction of the input price.", decimals=1,
        overrides=[change("vs previous period")]), 4, 5)

    for title, metric, unit, desc in (
            ("Requests", "llm_requests_total", "short", "Requests"),
            ("Tokens", "llm_tokens_total", "short", "Tokens of every type"),
            ("Cost", "llm_cost_usd_total", "currencyUSD", "Cost of the priced requests")):
        b.add(stat(title, targets(
            (increase(metric), "in period"),
            (relative_change(increase(metric), increase(metric, offset="$__range")), "vs previous period"),
            instant=True), unit, f"{desc} in the selected time range, and the change against the period before.",
            decimals=2 if unit == "currencyUSD" else None, overrides=[change("vs previous period")]), 4, 4)
    critical, warning = firing_alerts('severity="critical"'), firing_alerts('severity="warning"')
    b.add(stat("Alerts firing", targets(
        (f"count({critical}) or vector(0)", "critical"),
        (f"count({warning}) or vector(0)", "warning"),
        (f"(count({firing_alerts()}) or vector(0)) - (count({firing_alerts(offset='$__range')}) or vector(0))",
         "vs one period ago"), instant=True), "short",
        "Alerts firing now for the selected apps, providers and models (Watchdog excluded), and the change in "
        "their number against one period ago. The table below lists them with their runbooks.", decimals=0,
        overrides=[stat_colored("critical", "short", steps(("green", None), ("red", 1)), 0),
                   stat_colored("warning", "short", steps(("green", None), ("orange", 1)), 0),
                   change("vs one period ago", "short")]), 6, 4)
    b.add(stat("Exporter", targets(
        (f"min(max without (replica) (up{{{J}}}))", "scrape"),
        (f"time() - (max(llm_exporter_last_record_timestamp_seconds{{{J}}}) > 0)", "last record"),
        instant=True), "short",
        "Whether Prometheus scrapes the exporter, any replica of it (LLMExporterDown fires when it cannot), and how long ago the "
        "exporter accepted its last record (wall-clock time; orange after LLMIngestStalled's quiet time, which "
        "alerts when traffic was expected).",
        mappings=[{"type": "value", "options": {"0": {"text": "down", "color": "red", "index": 0},
                                                "1": {"text": "up", "color": "green", "index": 1}}}],
        colors=steps(("red", None), ("green", 1)), no_value="not scraped",
        overrides=[by_name("last record", ("unit", "dtdurations"), ("mappings", []),
                           ("thresholds", steps(("text", None),
                                                ("orange", threshold("llm:ingest_threshold:stall_seconds")))))],
        links=runbook("LLMExporterDown", "LLMIngestStalled")), 6, 4)

    b.row("Traffic")
    b.add(timeseries("Requests per minute by app", targets((rate_rule("llm_requests", "app", scale=" * 60"), "{{app}}")),
                     "short", "Requests per minute over 5-minute windows.", stack=True, axis="requests / min",
                     data_links=series_links("app")), 12, 8)
    b.add(timeseries("Requests per minute by model", targets(
        (rate_rule("llm_requests", "provider, model", scale=" * 60"), "{{provider}}/{{model}}")),
        "short", "Requests per minute over 5-minute windows.", stack=True, axis="requests / min",
        data_links=series_links("provider", "model")), 12, 8)
    b.add(timeseries("Tokens per minute by type", targets(
        (rate_rule("llm_tokens", "token_type", scale=" * 60"), "{{token_type}}")), "short",
        "Tokens per minute by type: uncached input, output, cache reads and writes, reasoning.", stack=True,
        axis="tokens / min"), 8, 8)
    b.add(timeseries("Tokens per request by model", targets(
        (f'{rate_rule("llm_tokens", "provider, model")} / {rate_rule("llm_requests", "provider, model")}',
         "{{provider}}/{{model}}")), "short",
        "Tokens of every type per request, over 5-minute windows: prompts that grow, answers that lengthen.",
        fill=0, axis="tokens / request", data_links=series_links("provider", "model")), 8, 8)
    b.add(timeseries("Unpriced requests per minute by model", targets(
        (rate_rule("llm_unpriced_requests", "provider, model", scale=" * 60"), "{{provider}}/{{model}}")), "short",
        "Requests without a cost in the record and without a price for the model: their cost is missing from "
        "every cost panel (LLMUnpricedRequests). Add the model to `prices` in the exporter config.",
        axis="requests / min", links=runbook("LLMUnpricedRequests"), data_links=series_links("provider", "model")), 8, 8)

    b.row("Cost")
    b.add(timeseries("Cost per hour by app", targets((rate_rule("llm_cost_usd", "app", scale=" * 3600"), "{{app}}")),
                     "currencyUSD", "Cost rate over 5-minute windows, as USD per hour.", stack=True, axis="USD / hour",
                     data_links=series_links("app")), 12, 8)
    b.add(timeseries("Cost per hour by model", targets(
        (rate_rule("llm_cost_usd", "provider, model", scale=" * 3600"), "{{provider}}/{{model}}")),
        "currencyUSD", "Cost rate over 5-minute windows, as USD per hour.", stack=True, axis="USD / hour",
        data_links=series_links("provider", "model")), 12, 8)
    b.add(bargauge("Top apps by cost", targets(
        (f"topk(10, {increase('llm_cost_usd_total', 'app')})", "{{app}}"), instant=True), "currencyUSD",
        "Cost in the selected time range, the ten most expensive apps.", data_links=series_links("app")), 6, 8)
    b.add(bargauge("Top models by cost", targets(
        (f"topk(10, {increase('llm_cost_usd_total', 'provider, model')})", "{{provider}}/{{model}}"), instant=True),
        "currencyUSD", "Cost in the selected time range, the ten most expensive models.",
        data_links=series_links("provider", "model")), 6, 8)
    priced = (f"({rate_rule('llm_requests', 'provider, model')} - "
              f"({rate_rule('llm_unpriced_requests', 'provider, model')} or {rate_rule('llm_requests', 'provider, model')} * 0))")
    b.add(timeseries("Cost per request by model", targets(
        (f"{rate_rule('llm_cost_usd', 'provider, model')} / ({priced} > 0)", "{{provider}}/{{model}}")), "currencyUSD",
        "Cost divided by priced requests over 5-minute windows.", fill=0, axis="USD / request", decimals=4,
        data_links=series_links("provider", "model")), 6, 8)
    cache_by = "provider, model"
    hits = rate_rule("llm_tokens", f"{cache_by}, token_type", sel=f'{U}, token_type="cache_read"')
    prompt = rate_rule("llm_tokens", f"{cache_by}, token_type", sel=f'{U}, token_type=~"input|cache_read|cache_write"')
    b.add(timeseries("Cache-hit ratio by model", targets(
        (f"(sum by ({cache_by}) ({hits}) or sum by ({cache_by}) ({prompt}) * 0) / sum by ({cache_by}) ({prompt})",
         "{{provider}}/{{model}}")), "percentunit",
        "Prompt tokens read from the cache as a share of all prompt tokens, over 5-minute windows.", fill=0,
        min_=0, max_=1, data_links=series_links("provider", "model")), 6, 8)

    b.row("Errors")
    b.add(timeseries("Errors per minute by app and type", targets(
        (rate_rule("llm_request_errors", "app, error_type", scale=" * 60"), "{{app}} {{error_type}}")), "short",
        "Failed requests per minute over 5-minute windows.", stack=True, axis="errors / min",
        data_links=series_links("app")), 12, 8)
    b.add(timeseries("Error ratio by app", targets(
        (f"({rate_rule('llm_request_errors', 'app')} or {rate_rule('llm_requests', 'app')} * 0) / "
         f"{rate_rule('llm_requests', 'app')}", "{{app}}")), "percentunit",
        "Failed requests divided by requests over 5-minute windows. The static error alert judges models (the "
        "performance dashboard draws it); an app's error rate against its own baseline is an anomaly signal.",
        fill=0, min_=0, data_links=series_links("app"),
        links=[{"title": "Error ratio by model (performance)", "url": f"/d/llm-performance?{KEEP}"}]), 12, 8)

    b.row("Alerts")
    alert_names = sorted({a["alert"] for a in ALERTS if a["alert"] != "Watchdog"})
    expr = with_link_labels(
        f'label_replace(label_replace({firing_alerts()}, '
        f'"runbook", "$1", "alertname", "(.*)"), "dashboard", "$1", "alertname", "(.*)")',
        ("app", "provider", "model", "scope"))
    runbook_map = [{"type": "value", "options": {n: {"text": n.lower(), "index": i} for i, n in enumerate(alert_names)}}]
    board_map = [{"type": "value", "options": {n: {"text": board_of(n), "index": i} for i, n in enumerate(alert_names)}}]
    go = {"app": "${__data.fields.link_app}", "provider": "${__data.fields.link_provider}",
          "model": "${__data.fields.link_model}", "scope": "${__data.fields.link_scope}"}
    b.add(table("Firing alerts", [target(expr, "", "A", instant=True, table=True)], "short",
                "Alerts Prometheus fires now for the selected apps, providers and models (Watchdog excluded); "
                "Alertmanager routes and silences them. The runbook column opens the alert's section of the "
                "runbook, the dashboard column the dashboard that shows it, filtered to it.",
                columns={}, hide=["Value", "alertstate", "job", "category"],
                order=["severity", "alertname", "app", "provider", "model", "scope", "signal", "runbook", "dashboard"],
                sort=("severity", False), no_value="no alerts firing", overrides=[
                    by_name("runbook", ("mappings", runbook_map),
                            ("links", [{"title": "Runbook: ${__data.fields.alertname}",
                                        "url": f"{RUNBOOK}#${{__value.text}}", "targetBlank": True}])),
                    by_name("dashboard", ("mappings", board_map),
                            ("links", [{"title": "Open the dashboard of ${__data.fields.alertname}",
                                        "url": "/d/${__value.text}?" + KEEP + "".join(
                                            f"&var-{k}={v}" for k, v in go.items())}])),
                    *hidden("link_app", "link_provider", "link_model", "link_scope")]), 24, 8)

    b.row("Exporter")
    b.add(timeseries("Scrape status", targets((f"up{{{J}}}", "{{instance}} {{replica}}")), "short",
                     "1 while Prometheus scrapes the exporter, 0 when a scrape fails (LLMExporterDown after 2 "
                     "minutes). The replicas of an HA pair are drawn apart: one down while its twin serves is "
                     "LLMExporterReplicaDown, a warning.", fill=0, interpolation="stepAfter", min_=0, max_=1, decimals=0,
                     mappings=[{"type": "value", "options": {"0": {"text": "down", "color": "red", "index": 0},
                                                             "1": {"text": "up", "color": "green", "index": 1}}}],
                     legend_calcs=("lastNotNull", "min"), links=runbook("LLMExporterDown", "LLMExporterReplicaDown")), 6, 7)
    b.add(timeseries("Records ingested per minute", targets(
        (f"sum by (result) (rate(llm_exporter_records_total{{{J}}}[$__rate_interval])) * 60", "{{result}}")), "short",
        "Usage records per minute by outcome (accepted, duplicate, rejected: LLMRecordsRejected).", stack=True,
        axis="records / min", links=runbook("LLMRecordsRejected")), 6, 7)
    b.add(timeseries("Freshness", targets(
        (f"time() - (max by (instance) (llm_exporter_last_record_timestamp_seconds{{{J}}}) > 0)",
         "since the last accepted record {{instance}}"),
        (f"time() - (max by (instance) (llm_exporter_last_evaluation_timestamp_seconds{{{J}}}) > 0)",
         "since the last evaluation {{instance}}"),
        ("llm:ingest_threshold:stall_seconds", "ingest stall threshold"),
        ("llm:exporter_threshold:evaluation_stale_seconds", "evaluation stale threshold")), "s",
        "Wall-clock seconds since the exporter last accepted a record and since its evaluator last finished "
        "(nothing is drawn before the first). Dashed: LLMIngestStalled's quiet time (it also needs expected "
        "traffic) and LLMExporterEvaluationStale's.", fill=0, overrides=[
            threshold_line({"id": "byName", "options": "ingest stall threshold"}, "orange"),
            threshold_line({"id": "byName", "options": "evaluation stale threshold"}, "red")],
        links=runbook("LLMIngestStalled", "LLMExporterEvaluationStale")), 6, 7)
    b.add(timeseries("Evaluation duration", targets(
        (f"histogram_quantile(0.5, sum by (le) (rate(llm_exporter_evaluation_duration_seconds_bucket{{{J}}}"
         "[$__rate_interval])))", "p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(llm_exporter_evaluation_duration_seconds_bucket{{{J}}}"
         "[$__rate_interval])))", "p99")), "s", "How long one evaluation of every signal and detector takes.",
        fill=0), 6, 7)
    b.add(timeseries("Exporter problems per minute", targets(
        (f"sum(rate(llm_exporter_evaluation_errors_total{{{J}}}[$__rate_interval])) * 60", "evaluation errors"),
        (f"sum(rate(llm_exporter_store_errors_total{{{J}}}[$__rate_interval])) * 60", "store errors"),
        (f"sum by (component) (rate(llm_exporter_component_errors_total{{{J}}}[$__rate_interval])) * 60",
         "component errors: {{component}}"),
        (f"sum by (label) (rate(llm_exporter_label_overflow_total{{{J}}}[$__rate_interval])) * 60",
         "label overflow: {{label}}"),
        (f"sum(rate(llm_exporter_sessions_overflow_total{{{J}}}[$__rate_interval])) * 60",
         "session tracking overflow")), "short",
        "Failures per minute: evaluations, store writes, and each isolated component (evaluator, detectors, "
        "checkpoints, pruning, tail). Label overflow: a label reached its limit and new values count as `other`. "
        "Session tracking overflow: more open conversations than the runaway detector tracks.",
        axis="per minute", links=runbook("LLMExporterEvaluationErrors", "LLMExporterStoreErrors",
                                         "LLMExporterComponentFailing", "LLMLabelOverflow")), 24, 7)
    return b


# --------------------------------------------------------------------------- anomalies

def with_target(expr: str) -> str:
    """Give every anomaly series a `target` label (global, the app, or provider/model) for legends."""
    return ('label_replace(label_replace(label_join('
            f'{expr}, "target", "/", "provider", "model"), '
            '"target", "$1", "app", "(.+)"), "target", "global", "scope", "global")')


def ratio_colors(spec: SignalSpec) -> dict[str, Any]:
    """Colours of a signal's ratio: the warning and critical ratios of thresholds.yml."""
    pairs: list[tuple[str, float | None]] = []
    if "down" in spec.directions:
        pairs += [("red", None), ("orange", threshold("llm:anomaly_threshold:ratio_low", signal=spec.name, severity="critical")),
                  ("green", threshold("llm:anomaly_threshold:ratio_low", signal=spec.name, severity="warning"))]
    else:
        pairs.append(("green", None))
    if "up" in spec.directions:
        pairs += [("orange", threshold("llm:anomaly_threshold:ratio", signal=spec.name, severity="warning")),
                  ("red", threshold("llm:anomaly_threshold:ratio", signal=spec.name, severity="critical"))]
    return steps(*pairs)


def threshold_targets(spec: SignalSpec, first_ref: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ratio panel's threshold lines: the recording rules of thresholds.yml."""
    tgts, overrides = [], []
    sides = {"up": [("llm:anomaly_threshold:ratio", "")], "down": [("llm:anomaly_threshold:ratio_low", "")],
             "both": [("llm:anomaly_threshold:ratio", " (rise)"), ("llm:anomaly_threshold:ratio_low", " (drop)")]}
    ref = first_ref
    for rule, suffix in sides[spec.direction]:
        for sev, col in (("warning", "orange"), ("critical", "red")):
            name = f"{sev} threshold{suffix}"
            tgts.append(target(f'{rule}{{signal="{spec.name}", severity="{sev}"}}', name, chr(ord("A") + ref)))
            overrides.append(threshold_line({"id": "byName", "options": name}, col))
            ref += 1
    if threshold("llm:anomaly_threshold:sustained_ratio", signal=spec.name) > 0:
        name = "held for hours threshold"
        tgts.append(target(f'llm:anomaly_threshold:sustained_ratio{{signal="{spec.name}"}}', name, chr(ord("A") + ref)))
        overrides.append(threshold_line({"id": "byName", "options": name}, "yellow"))
    return tgts, overrides


SCOPE_LINK = {"scope": "${__data.fields.scope}", "app": "${__data.fields.link_app}",
              "provider": "${__data.fields.link_provider}", "model": "${__data.fields.link_model}"}
ANOMALY_KEY = "signal, scope, app, provider, model"


def anomaly_status(sel: str, queries: list[tuple[str, str]], first_link: bool = True) -> list[dict[str, Any]]:
    """Instant table queries of anomaly gauges, one per (metric, column), aggregated to the
    series' identity so that Grafana's merge puts a series' values on one row."""
    out = []
    for i, (metric, _) in enumerate(queries):
        expr = f"max by ({ANOMALY_KEY}) ({metric}{{{sel}}})"
        if i == 0 and first_link:
            expr = with_link_labels(expr, ("app", "provider", "model"))
        out.append(target(expr, "", chr(ord("A") + i), instant=True, table=True))
    return out


def anomalies() -> Board:
    scope = custom_var("scope", "Scope", ["global", "app", "model"], "global")
    # one option per series of the selection: the value is its label matchers (for the
    # repeated charts' selectors), the text its name
    tq = (f'query_result(max by (scope, app, provider, model, target) ({with_target(f"llm_anomaly_severity{{{A}}}")}))')
    target_var = query_var("target", "Series", tq, all_value='scope!=""',
                           regex=r'/\{(?<value>[^}]*?),?target="(?<text>[^"]*)"\}/', hide=2)
    b = Board("llm-anomalies", "LLM usage: anomalies",
              "Each signal against its rolling baseline as the exporter judges it (llm_anomaly_* gauges): the "
              "verdicts the anomaly alerts fire on, the ratio against the alert thresholds, and current value "
              "against the baseline band for every series of the selected scope.",
              ["anomalies"], [datasource_var(), job_var(), scope, *usage_vars()[2:], target_var])
    b.row("Status")
    loud = f"llm_anomaly_severity{{{A}}} unless llm_anomaly_explained{{{A}}} == 1"
    b.add(stat("Anomalies now", targets(
        (f"count(({loud}) == {SEVERITY_AT['critical']}) or vector(0)", "high"),
        (f"count(({loud}) == {SEVERITY_AT['warning']}) or vector(0)", "warning"),
        (f"count(llm_anomaly_severity{{{A}}} >= 1 and llm_anomaly_explained{{{A}}} == 1) or vector(0)",
         "explained (quiet)"),
        (f"count(llm_anomaly_baseline_span_seconds{{{A}}} < on (signal) group_left () "
         "(llm:anomaly_threshold:min_baseline_hours * 3600)) or vector(0)", "warming up"),
        instant=True), "short",
        "Series (signal and scope) of the selection whose verdict is high or warning and not explained by a "
        "narrower scope: what the anomaly alerts fire on. Explained: anomalies a narrower scope's alert covers. "
        "Warming up: baselines still shorter than their signal's min_baseline_hours, which judge nothing yet.",
        decimals=0, overrides=[stat_colored("high", "short", steps(("green", None), ("red", 1)), 0),
                               stat_colored("warning", "short", steps(("green", None), ("orange", 1)), 0),
                               by_name("explained (quiet)", ("color", color("blue"))),
                               by_name("warming up", ("color", color("text")))]), 6, 8)
    cols = [("llm_anomaly_severity", "severity"), ("llm_anomaly_explained", "explained"),
            ("llm_anomaly_ratio", "ratio"), ("llm_anomaly_zscore", "evidence z"),
            ("llm_anomaly_baseline_span_seconds", "baseline history")]
    b.add(table("Anomaly status", anomaly_status(A, cols), "short",
                "Every signal and series of the selection now: the verdict (ok / warning / high), whether a "
                "narrower scope explains it (its alert stays quiet), the last hour's ratio to the baseline, the "
                "strongest evidence (z) over the windows judged, and the history the baseline rests on. A row opens "
                "its own series.", columns={chr(ord("A") + i): name for i, (_, name) in enumerate(cols)},
                order=["signal", "scope", "app", "provider", "model", *[n for _, n in cols]],
                overrides=[severity_column("severity"), by_name("explained", ("mappings", EXPLAINED_MAPPING)),
                           unit_column("ratio", "short", 2), unit_column("evidence z", "short", 1),
                           unit_column("baseline history", "dtdurations"),
                           *hidden("link_app", "link_provider", "link_model")],
                data_links=[link("Open ${__data.fields.signal} of this series", "llm-anomalies", **SCOPE_LINK)],
                sort=("severity", True)), 18, 8)

    for spec in DEFAULT_SIGNALS:
        assert spec.text is not None
        t = spec.text
        names = [a for a, _ in t.alerts.values()]
        b.row(t.title)
        sel = f'signal="{spec.name}", {A}'
        thr, thr_overrides = threshold_targets(spec, 1)
        drop = "; a drop alerts at or below the drop lines" if spec.direction != "up" else ""
        b.add(timeseries(f"{t.title}: ratio to baseline", [
            target(with_target(f"llm_anomaly_ratio{{{sel}}}"), "{{target}}", "A"), *thr], "short",
            f"The last hour's value divided by its baseline, for every series of the selection (log scale). "
            f"Dashed: the warning and critical ratios of thresholds.yml, which a verdict needs together with "
            f"evidence{drop}. A verdict can come before the hour's ratio gets there: shorter windows are judged too.",
            fill=0, axis="× baseline", log=2, legend_calcs=("lastNotNull", "max"), overrides=thr_overrides,
            links=runbook(*names)), 12, 8)
        scols = [("llm_anomaly_severity", "severity"), ("llm_anomaly_explained", "explained"),
                 ("llm_anomaly_ratio", "ratio"), ("llm_anomaly_current", "current"),
                 ("llm_anomaly_baseline", "baseline"), ("llm_anomaly_zscore", "evidence z")]
        b.add(table(f"{t.title}: status", anomaly_status(sel, scols), t.grafana_unit,
                    f"Every series of the selection now ({t.axis}): verdict, explained, the hour's ratio coloured at "
                    "the warning and critical ratios, current value, baseline and evidence. A row opens its series.",
                    columns={chr(ord("A") + i): name for i, (_, name) in enumerate(scols)}, hide=["signal"],
                    order=["scope", "app", "provider", "model", *[n for _, n in scols]],
                    overrides=[severity_column("severity"), by_name("explained", ("mappings", EXPLAINED_MAPPING)),
                               colored("ratio", "short", ratio_colors(spec), 2), unit_column("evidence z", "short", 1),
                               *hidden("link_app", "link_provider", "link_model")],
                    data_links=[link("Open this series", "llm-anomalies", **SCOPE_LINK)],
                    sort=("severity", True), links=runbook(*names)), 12, 8)
        one = f'signal="{spec.name}", {J}, ${{target:raw}}'
        band = timeseries(f"{t.title}: ${{target:text}}", [
            target(f"llm_anomaly_current{{{one}}}", "current", "A"),
            target(f"llm_anomaly_baseline{{{one}}}", "baseline", "B"),
            target(f"llm_anomaly_band_lower{{{one}}}", "band lower", "C"),
            target(f"llm_anomaly_band_upper{{{one}}}", "band upper", "D"),
        ], t.grafana_unit,
            f"{spec.help.capitalize()} ({t.axis}), against its baseline; shaded: the band the value is expected in. "
            "One chart per series of the selection.", fill=0, axis=t.axis, legend_calcs=("lastNotNull",),
            overrides=[
                by_name("current", ("custom.lineWidth", 2)),
                by_name("baseline", ("custom.lineStyle", SHORT_DASHED), ("color", color("blue"))),
                by_name("band lower", ("custom.lineStyle", DOTTED), ("color", color("#8AB8FF"))),
                by_name("band upper", ("custom.lineStyle", DOTTED), ("color", color("#8AB8FF")),
                        ("custom.fillBelowTo", "band lower"), ("custom.fillOpacity", 15)),
            ])
        band.update({"repeat": "target", "repeatDirection": "h", "maxPerRow": 3})
        b.add(band, 8, 7)
    return b


# --------------------------------------------------------------------------- performance

def per_model(rule: str, count_rule: str, min_rule: str) -> str:
    """A per-model recording rule of an alert, where the alert judges it (enough requests),
    for the models the selected apps use."""
    return of_traffic(f"{rule}{{{UM}}} and on (job, provider, model) "
                      f"({count_rule}{{{UM}}} >= on () group_left () {min_rule})", "provider, model")


def performance() -> Board:
    b = Board("llm-performance", "LLM usage: performance",
              "Latency, time to first token, output throughput and errors over time and per model. The per-model "
              "charts read the recording rules the alerts read, with the alerts' thresholds.",
              ["performance"], usage_vars())
    qs = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
    min_req = "llm:performance_threshold:min_requests"
    thr_hidden = {"id": "byRegexp", "options": "^threshold .*"}

    b.row("Latency")
    b.add(timeseries("Latency p50, p95, p99", targets(*[(quantile(q, "llm_request_duration_seconds"), n) for q, n in qs]),
                     "s", "Request duration quantiles of the selected traffic (from the histogram).", fill=0), 12, 8)
    b.add(timeseries("Latency p95 by model", targets(
        (per_model("provider_model:llm_request_duration_seconds:p95_5m",
                   "provider_model:llm_request_duration_seconds_count:increase5m", min_req), "{{provider}}/{{model}}"),
        (of_traffic(f"provider_model:llm_performance_threshold:latency_p95_seconds{{{UM}}}", "provider, model"),
         "threshold {{provider}}/{{model}}")), "s",
        "p95 request duration of each model over 5 minutes, as LLMModelLatencyHigh judges it (all of the model's "
        "traffic; gaps where it had too few requests to judge). Dashed: each model's threshold (its own where "
        "thresholds.yml sets one, else the default). The app filter narrows the models to those its apps use.",
        fill=0, overrides=[threshold_line(thr_hidden, "red", legend=False)],
        links=runbook("LLMModelLatencyHigh"), data_links=series_links("provider", "model")), 12, 8)

    b.row("Time to first token")
    b.add(timeseries("Time to first token p50, p95, p99", targets(
        *[(quantile(q, "llm_time_to_first_token_seconds"), n) for q, n in qs]), "s",
        "Time to first token quantiles of the selected streamed requests.", fill=0), 12, 8)
    b.add(timeseries("Time to first token p95 by model", targets(
        (of_traffic(f"provider_model:llm_time_to_first_token_seconds:p95_5m{{{UM}}}", "provider, model"),
         "{{provider}}/{{model}}")), "s",
        "p95 time to first token of each model over 5 minutes (streamed requests). No fixed threshold: the "
        "anomaly dashboard judges it against each model's own baseline.", fill=0,
        data_links=series_links("provider", "model"),
        links=[{"title": "Time to first token anomalies by model",
                "url": f"/d/llm-anomalies?{KEEP}&var-scope=model"}]), 12, 8)

    b.row("Output throughput")
    b.add(timeseries("Output tokens per second", targets(
        (quantile(0.5, "llm_output_tokens_per_second"), "median"),
        (quantile(0.1, "llm_output_tokens_per_second"), "p10 (slowest tenth)")), "short",
        "Output tokens per second of generation time (latency minus time to first token, so streamed "
        "requests only) of the selected traffic; low is bad.", fill=0,
        axis="tokens / s"), 12, 8)
    b.add(timeseries("Median output tokens per second by model", targets(
        (per_model("provider_model:llm_output_tokens_per_second:p50_5m",
                   "provider_model:llm_output_tokens_per_second_count:increase5m", min_req), "{{provider}}/{{model}}"),
        (of_traffic(f"provider_model:llm_performance_threshold:output_tokens_per_second_p50{{{UM}}}", "provider, model"),
         "threshold {{provider}}/{{model}}")), "short",
        "Median output throughput of each model over 5 minutes, as LLMModelThroughputLow judges it (gaps: too "
        "few requests). Dashed: each model's threshold; it alerts below.", fill=0, axis="tokens / s",
        overrides=[threshold_line(thr_hidden, "red", legend=False)], links=runbook("LLMModelThroughputLow"),
        data_links=series_links("provider", "model")), 12, 8)

    b.row("Errors")
    b.add(timeseries("Error ratio by model", [
        target(of_traffic(f"provider_model:llm_request_errors:ratio_rate5m{{{UM}}} and on (job, provider, model) "
                          f"(provider_model:llm_requests:increase5m{{{UM}}} >= on () group_left () "
                          "llm:error_threshold:min_requests)", "provider, model"), "{{provider}}/{{model}}", "A"),
        target('llm:error_threshold:ratio{severity="warning"}', "warning threshold", "B"),
        target('llm:error_threshold:ratio{severity="critical"}', "critical threshold", "C"),
        target(of_traffic(f"provider_model:llm_request_errors:ratio_lower_bound5m{{{UM}}} and on (job, provider, model) "
                          f"(provider_model:llm_requests:increase5m{{{UM}}} >= on () group_left () "
                          "llm:error_threshold:min_requests)", "provider, model"), "at least {{provider}}/{{model}}",
               "D")], "percentunit",
        "Failed requests divided by requests of each model over 5 minutes (gaps: too few requests), and how "
        "high that ratio is at least, at 95 % confidence (\"at least\"): LLMErrorRatioHigh fires where the "
        "latter reaches a dashed line, its warning and critical ratios, so a few requests of a quiet model "
        "need a higher ratio.", fill=0, min_=0, overrides=[
            threshold_line({"id": "byName", "options": "warning threshold"}, "orange"),
            threshold_line({"id": "byName", "options": "critical threshold"}, "red")],
        links=runbook("LLMErrorRatioHigh"), data_links=series_links("provider", "model")), 12, 8)
    b.add(timeseries("Errors per minute by type", targets(
        (rate_rule("llm_request_errors", "error_type", scale=" * 60"), "{{error_type}}")), "short",
        "Failed requests per minute of the selected traffic by error type, over 5-minute windows.", stack=True,
        axis="errors / min"), 12, 8)

    b.row("Models side by side (selected time range)")
    rng, by = "$__range", "provider, model"
    cols = ["requests", "latency p50", "latency p95", "latency p99", "latency p95 last hour (exporter)",
            "time to first token p95", "output tokens/s p50", "error ratio", "cost per request", "tokens per request"]
    exprs = [
        increase("llm_requests_total", by),
        quantile(0.5, "llm_request_duration_seconds", by, window=rng, fn="increase"),
        quantile(0.95, "llm_request_duration_seconds", by, window=rng, fn="increase"),
        quantile(0.99, "llm_request_duration_seconds", by, window=rng, fn="increase"),
        of_traffic(f'max by (job, {by}) (llm_anomaly_current{{signal="latency_p95", scope="model", app=~"$app|", '
                   f'{UM}}})', by),
        quantile(0.95, "llm_time_to_first_token_seconds", by, window=rng, fn="increase"),
        quantile(0.5, "llm_output_tokens_per_second", by, window=rng, fn="increase"),
        f"({increase('llm_request_errors_total', by)} or {increase('llm_requests_total', by)} * 0) / "
        f"{increase('llm_requests_total', by)}",
        f"{increase('llm_cost_usd_total', by)} / (({increase('llm_requests_total', by)} - "
        f"({increase('llm_unpriced_requests_total', by)} or {increase('llm_requests_total', by)} * 0)) > 0)",
        f"{increase('llm_tokens_total', by)} / {increase('llm_requests_total', by)}",
    ]
    # one label set for every query: the exporter's p95 keeps job, the others do not
    exprs[4] = f"max by ({by}) ({exprs[4]})"
    b.add(table("Models side by side", [target(e, "", chr(ord("A") + i), instant=True, table=True)
                                        for i, e in enumerate(exprs)], "s",
                "Per model over the selected time range: requests, latency quantiles (from the histograms), the "
                "exporter's exact p95 over its last hour, time to first token, throughput, error ratio, cost and "
                "tokens per request (cost: of the priced requests). A row opens the model's performance or anomalies.",
                columns={chr(ord("A") + i): c for i, c in enumerate(cols)}, order=["provider", "model", *cols],
                overrides=[unit_column("requests", "short", 0), unit_column("output tokens/s p50", "short", 1),
                           unit_column("error ratio", "percentunit", 2), unit_column("cost per request", "currencyUSD", 4),
                           unit_column("tokens per request", "short", 0)],
                data_links=[*row_links("model"),
                            link("Anomalies of ${__data.fields.provider}/${__data.fields.model}", "llm-anomalies",
                                 scope="model", provider="${__data.fields.provider}", model="${__data.fields.model}")],
                sort=("requests", True)), 24, 9)
    return b


# --------------------------------------------------------------------------- budget

BURN_PAIRS = (("1h", "5m"), ("6h", "30m"), ("1d", "2h"), ("3d", "6h"))


def budget() -> Board:
    b = Board("llm-budget", "LLM usage: budget and forecast",
              "Cost against the configured budgets, the burn rates the budget alerts judge, and the month-end "
              "projection, for all apps together or the selected apps. Budgets and forecasts come from the exporter "
              "(llm_budget_usd, llm_cost_usd_period_to_date, llm_cost_usd_forecast).",
              ["budget"], usage_vars(model=False), time_from="now-7d")
    spent_fraction = threshold("llm:budget_threshold:spent_fraction")
    forecast_factor = threshold("llm:budget_threshold:forecast_factor")
    used_colors = steps(("green", None), ("orange", spent_fraction), ("red", 1))
    month = budget_scoped("llm_cost_usd_period_to_date", 'period="month"')
    month_budget = budget_scoped("llm_budget_usd", 'period="month"')
    forecast = budget_scoped("llm_cost_usd_forecast", 'horizon="month_end"')

    b.row("This month")
    b.add(stat("Month to date", targets((month, "spent"), instant=True), "currencyUSD",
               "Cost since the start of the month (the exporter's budget time zone) of the selection: all apps "
               "together, or the sum of the selected apps.", decimals=2), 4, 5)
    b.add(stat("Monthly budget", targets((month_budget, "budget"), instant=True), "currencyUSD",
               "The monthly budget of the selection (the overall one, or the sum of the selected apps' own).",
               decimals=2, no_value="no budget"), 4, 5)
    b.add(stat("Month-end forecast", targets((forecast, "forecast"), instant=True), "currencyUSD",
               "The exporter's forecast of the month's total cost.", decimals=2), 4, 5)
    b.add(gauge("Budget used", targets((f"{month} / {month_budget}", "used"), instant=True), "percentunit",
                "Month to date as a share of the monthly budget: orange from LLMMonthlyBudgetNearlySpent's share, "
                "red once LLMMonthlyBudgetExceeded fires.", colors=used_colors, max_=1.5,
                links=runbook("LLMMonthlyBudgetNearlySpent", "LLMMonthlyBudgetExceeded")), 4, 5)
    b.add(gauge("Forecast against budget", targets((f"{forecast} / {month_budget}", "forecast"), instant=True),
                "percentunit", "Month-end forecast as a share of the monthly budget: red where "
                "LLMBudgetForecastOverrun fires.", colors=steps(("green", None), ("red", forecast_factor)), max_=1.5,
                links=runbook("LLMBudgetForecastOverrun")), 4, 5)
    day = budget_scoped("llm_cost_usd_period_to_date", 'period="day"')
    day_budget = budget_scoped("llm_budget_usd", 'period="day"')
    b.add(stat("Cost today", targets(
        (day, "today"), (f"{day} / {day_budget}", "of daily budget"), instant=True), "currencyUSD",
        "Cost since the start of the day and the share of the daily budget it uses (red: LLMDailyBudgetExceeded).",
        decimals=2, overrides=[stat_colored("of daily budget", "percentunit", steps(("text", None), ("red", 1)), 0)],
        links=runbook("LLMDailyBudgetExceeded")), 4, 5)
    b.add(timeseries("Month to date, budget and projection", targets(
        (month, "month to date"),
        (month_budget, "budget"),
        (forecast, "forecast"),
        (budget_scoped("llm_cost_usd_forecast_upper", 'horizon="month_end"'), "forecast upper (95 %)"),
        (budget_scoped("llm_cost_usd_forecast_lower", 'horizon="month_end"'), "forecast lower (5 %)"),
        (f"{month} + scalar(sum({cost_rate_scoped('3d')})) * {MONTH_LEFT}", "straight line at the last 3 days' pace")),
        "currencyUSD",
        "Cost so far this month, the monthly budget, and the exporter's month-end forecast with its 90 % band "
        "(shaded). The dotted line projects the last three days' average pace (the 3-day cost-rate rule) to the "
        "end of the month; PromQL's calendar counts in UTC.",
        fill=0, legend_calcs=("lastNotNull",), overrides=[
            by_name("month to date", ("custom.lineWidth", 2), ("custom.fillOpacity", 10)),
            threshold_line({"id": "byName", "options": "budget"}, "red"),
            by_name("forecast", ("color", color("purple")), ("custom.lineWidth", 2)),
            by_name("forecast upper (95 %)", ("custom.fillBelowTo", "forecast lower (5 %)"),
                    ("custom.fillOpacity", 20), ("color", color("purple")), ("custom.lineWidth", 0)),
            by_name("forecast lower (5 %)", ("color", color("purple")), ("custom.lineWidth", 0)),
            by_name("straight line at the last 3 days' pace", ("custom.lineStyle", DOTTED), ("color", color("blue"))),
        ]), 16, 9)
    b.add(bargauge("Forecast by horizon", targets(
        *[(budget_scoped("llm_cost_usd_forecast", f'horizon="{h}"'), name)
          for h, name in (("month_end", "month end"), ("30d", "next 30 days"), ("60d", "next 60 days"),
                          ("90d", "next 90 days"))], instant=True), "currencyUSD",
        "The exporter's cost forecasts of the selection."), 8, 9)

    b.row("Burn rate")
    windows = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
    b.add(timeseries("Burn rate by window", [
        *targets(*[(burn_scoped(w), f"over {w} {{{{app}}}}") for w in windows]),
        target("llm:budget_threshold:burnrate", "{{long_window}} and {{short_window}} ({{severity}})",
               chr(ord("A") + len(windows)))], "short",
        "Cost rate as a multiple of the pace that spends exactly the monthly budget over the month (1 = on "
        "budget), over every window of LLMBudgetBurnRate's pairs, from the recording rules it reads: all apps "
        "against the overall budget, or each selected app against its own. Dashed: each pair's factor; a pair "
        "fires when both its windows burn faster. Needs a monthly budget.", fill=0,
        axis="× budget pace", log=2, overrides=[
            threshold_line({"id": "byRegexp", "options": r"^.* \(critical\)$"}, "red"),
            threshold_line({"id": "byRegexp", "options": r"^.* \(warning\)$"}, "orange")],
        links=runbook("LLMBudgetBurnRate")), 16, 9)

    def pair(expr: str, long: str) -> str:
        """`expr` (a series per app, or the global one) labelled with the window pair of `long`."""
        return (f"({expr}) + on () group_left (long_window, short_window, severity) "
                f'(0 * llm:budget_threshold:burnrate{{long_window="{long}"}})')

    long_q = " or ".join(pair(burn_scoped(lw), lw) for lw, _ in BURN_PAIRS)
    short_q = " or ".join(pair(burn_scoped(sw), lw) for lw, sw in BURN_PAIRS)
    margin_q = " or ".join(
        f"(({burn_scoped(lw)} < {burn_scoped(sw)}) or {burn_scoped(sw)}) / on () group_left (long_window, "
        f'short_window, severity) llm:budget_threshold:burnrate{{long_window="{lw}"}}' for lw, sw in BURN_PAIRS)
    b.add(table("Burn-rate alert pairs", [
        target(with_link_labels(long_q, ("app",)), "", "A", instant=True, table=True),
        target(short_q, "", "B", instant=True, table=True),
        target("llm:budget_threshold:burnrate + 0", "", "C", instant=True, table=True),
        target(margin_q, "", "D", instant=True, table=True)], "short",
        "Each window pair of LLMBudgetBurnRate now, for all apps together or each selected app: the burn rate "
        "over its long and short window, the factor both must pass, and the slower of the two as a multiple of "
        "it: from 1 (red) the pair fires.",
        columns={"A": "long window", "B": "short window", "C": "factor", "D": "slower / factor"},
        hide=["job"], order=["app", "severity", "long_window", "short_window", "long window", "short window", "factor",
                             "slower / factor"],
        overrides=[unit_column("long window", "short", 2), unit_column("short window", "short", 2),
                   colored("slower / factor", "percentunit", steps(("green", None), ("red", 1)), 0),
                   *hidden("link_app")],
        no_value="no monthly budget", links=runbook("LLMBudgetBurnRate"),
        data_links=[link("Budget of this row's app", "llm-budget", app="${__data.fields.link_app}")]), 8, 9)
    b.add(timeseries("Burn rate by app (1h)", targets(
        (f"app:llm_cost_usd:burnrate1h{{{UA}}}", "{{app}}"),
        ('llm:budget_threshold:burnrate{long_window="1h"}', "1h and 5m pair threshold")), "short",
        "Each app's cost rate over the last hour against its own monthly budget (apps with a budget), the long "
        "window of the fastest alert pair. Dashed: that pair's factor.", fill=0, axis="× budget pace", log=2,
        overrides=[threshold_line({"id": "byName", "options": "1h and 5m pair threshold"}, "red")],
        links=runbook("LLMBudgetBurnRate"), data_links=series_links("app")), 12, 8)
    b.add(timeseries("Cost per hour by window", targets(
        *[(f"{cost_rate_scoped(w)} * 3600", f"over {w}") for w in windows]), "currencyUSD",
        "The selection's cost rate over the burn-rate windows, as USD per hour, from the recording rules: short "
        "windows react, long ones smooth.", fill=0, axis="USD / hour"), 12, 8)

    b.row("By app")
    a = f'{UA}, app!=""'
    b.add(timeseries("Month to date by app", targets(
        (f'llm_cost_usd_period_to_date{{period="month", {a}}}', "{{app}}")), "currencyUSD",
        "Cost since the start of the month per app.", fill=0, data_links=series_links("app")), 12, 8)
    b.add(timeseries("Today by app", targets(
        (f'llm_cost_usd_period_to_date{{period="day", {a}}}', "{{app}}")), "currencyUSD",
        "Cost since the start of the day per app.", fill=0, data_links=series_links("app")), 12, 8)
    cols = {"A": "today", "B": "day budget", "C": "month to date", "D": "month budget", "E": "month used",
            "F": "forecast month end", "G": "forecast / budget", "H": "forecast 30d", "I": "forecast 90d"}
    per_app = [
        f'sum by (app) (llm_cost_usd_period_to_date{{period="day", {a}}})',
        f'sum by (app) (llm_budget_usd{{period="day", {a}}})',
        f'sum by (app) (llm_cost_usd_period_to_date{{period="month", {a}}})',
        f'sum by (app) (llm_budget_usd{{period="month", {a}}})',
        f'sum by (app) (llm_cost_usd_period_to_date{{period="month", {a}}}) / sum by (app) (llm_budget_usd{{period="month", {a}}})',
        f'sum by (app) (llm_cost_usd_forecast{{horizon="month_end", {a}}})',
        f'sum by (app) (llm_cost_usd_forecast{{horizon="month_end", {a}}}) / sum by (app) (llm_budget_usd{{period="month", {a}}})',
        f'sum by (app) (llm_cost_usd_forecast{{horizon="30d", {a}}})',
        f'sum by (app) (llm_cost_usd_forecast{{horizon="90d", {a}}})',
    ]
    b.add(table("Budget and forecast by app", [target(e, "", chr(ord("A") + i), instant=True, table=True)
                                               for i, e in enumerate(per_app)], "currencyUSD",
                "Per app with cost or a budget of its own: cost today and this month against the budgets, and the "
                "exporter's forecasts. A row opens the app.", columns=cols, order=["app", *cols.values()],
                overrides=[colored("month used", "percentunit", used_colors, 0),
                           colored("forecast / budget", "percentunit", steps(("green", None), ("red", forecast_factor)), 0)],
                data_links=[link("Budget of ${__data.fields.app}", "llm-budget", app="${__data.fields.app}"),
                            link("Overview of ${__data.fields.app}", "llm-overview", app="${__data.fields.app}")],
                sort=("month to date", True)), 24, 8)
    return b


# --------------------------------------------------------------------------- quality & loops

DRIFT_SIGNALS = [
    ("empty_response_rate", "empty responses"),
    ("length_collapse_ratio", "output length (recent / usual)"),
    ("tool_silence_rate", "tool-call silence"),
    ("stop_anomaly_rate", "odd stop reasons"),
    ("error_rate", "error ratio"),
]


def quality() -> Board:
    b = Board("llm-quality", "LLM usage: quality and runaway loops",
              "Provider drift (empty responses, output-length collapse, tool-call silence, odd stop reasons, errors) "
              "and runaway agent loops (long chains, token bursts, expensive sessions, repeated tools).",
              ["quality"], usage_vars())
    b.row("Drift")
    drift = f"llm_drift_severity{{{UM}}}"
    tgts = [target(of_traffic(f'max by (job, provider, model) (llm_drift_value{{signal="{s}", {UM}}})',
                              "provider, model"), "", chr(ord("A") + i), instant=True, table=True)
            for i, (s, _) in enumerate(DRIFT_SIGNALS)]
    tgts.append(target(of_traffic(f"max by (job, provider, model) ({drift})", "provider, model"), "",
                       chr(ord("A") + len(DRIFT_SIGNALS)), instant=True, table=True))
    cols = {chr(ord("A") + i): name for i, (_, name) in enumerate(DRIFT_SIGNALS)}
    cols[chr(ord("A") + len(DRIFT_SIGNALS))] = "drift"
    b.add(table("Drift by model", tgts, "percentunit",
                "Each provider and model used by the selection now: the drift signals over the recent responses "
                "that decided the verdict (the last 200 when there is none) and the verdict (none / mild / severe; "
                "LLMQualityDrift warns at mild and pages at severe). A row opens the model's performance.",
                columns=cols, hide=["job"], order=["provider", "model", "drift", *[n for _, n in DRIFT_SIGNALS]],
                overrides=[severity_column("drift", DRIFT_MAPPING, DRIFT_COLORS)], sort=("drift", True),
                links=runbook("LLMQualityDrift"), data_links=row_links("model")), 16, 8)
    b.add(stat("Models drifting", targets(
        (f"count({of_traffic(drift, 'provider, model')} >= 1) or vector(0)", "mild or severe"),
        (f"count({of_traffic(drift, 'provider, model')} >= 2) or vector(0)", "severe"), instant=True), "short",
        "Models of the selection with drift now: mild or worse (LLMQualityDrift warns), severe (it pages).",
        decimals=0, overrides=[stat_colored("mild or severe", "short", steps(("green", None), ("orange", 1)), 0),
                               stat_colored("severe", "short", steps(("green", None), ("red", 1)), 0)],
        links=runbook("LLMQualityDrift")), 8, 8)
    b.add(timeseries("Drift severity", targets((of_traffic(drift, "provider, model"), "{{provider}}/{{model}}")),
                     "short", "0 none, 1 mild, 2 severe.", fill=0, interpolation="stepAfter", min_=0, max_=2,
                     mappings=DRIFT_MAPPING, legend_calcs=("lastNotNull", "max"), decimals=0,
                     data_links=series_links("provider", "model")), 12, 7)
    b.add(timeseries("Drift signals", targets(
        (of_traffic(f"llm_drift_value{{{UM}}}", "provider, model"), "{{provider}}/{{model}} {{signal}}")),
        "percentunit", "The drift signals of each model over time (pick a model to read them apart).", fill=0,
        min_=0, data_links=series_links("provider", "model")), 12, 7)

    b.row("Runaway loops")
    runaway = of_traffic(f"llm_runaway_sessions{{{UA}}}", "app")
    spending = of_traffic(f'llm_runaway_sessions{{{UA}, reason=~"session_cost|token_burst"}}', "app")
    shape = of_traffic(f'llm_runaway_sessions{{{UA}, reason!~"session_cost|token_burst"}}', "app")
    b.add(stat("Runaway sessions now", targets(
        (f"sum({spending}) or vector(0)", "burning tokens or money"),
        (f"sum({shape}) or vector(0)", "loop-shaped"), instant=True), "short",
        "Conversations of the selection flagged as runaway now: for cost or token bursts (LLMRunawaySessions "
        "pages), for chain length or repeated tools (it warns). Their ids are at the exporter's /api/runaways.",
        decimals=0, overrides=[stat_colored("burning tokens or money", "short", steps(("green", None), ("red", 1)), 0),
                               stat_colored("loop-shaped", "short", steps(("green", None), ("orange", 1)), 0)],
        links=runbook("LLMRunawaySessions")), 6, 8)
    b.add(timeseries("Runaway sessions by reason", targets((f"sum by (reason) ({runaway})", "{{reason}}")), "short",
                     "Flagged conversations: chain_length (too many calls), token_burst, session_cost, "
                     "tool_repetition.", stack=True, interpolation="stepAfter", decimals=0), 9, 8)
    b.add(bargauge("Runaway sessions by app and reason", targets(
        (f"sum by (app, reason) ({runaway}) > 0", "{{app}} {{reason}}"), instant=True), "short",
        "Apps with flagged conversations now.", no_value="no runaway sessions", data_links=series_links("app")), 9, 8)
    b.add(timeseries("Invocation spike z-score by app", targets(
        (of_traffic(f"llm_runaway_invocation_zscore{{{UA}}}", "app"), "{{app}}"),
        ("llm:runaway_threshold:invocation_zscore", "alert threshold")), "short",
        "How unusual each app's call count over the last 5 minutes is against its recent history (robust z; "
        "empty below the minimum call count). Dashed: LLMInvocationSpike's threshold; above it is the signature "
        "of an agent stuck in a loop or a retry storm.", fill=0, axis="z-score",
        overrides=[threshold_line({"id": "byName", "options": "alert threshold"}, "red")],
        links=runbook("LLMInvocationSpike"), data_links=series_links("app")), 24, 8)
    return b


# --------------------------------------------------------------------------- backend health

UP_DOWN = [{"type": "value", "options": {
    "0": {"text": "down", "color": "red", "index": 0},
    "1": {"text": "up", "color": "green", "index": 1},
}}]
# Probe series carry the labels of their entry in prometheus/backends.yml (backend, module,
# provider, model, kind) and the scrape job of the probes, not an exporter's: `$job` does not
# apply to them. An entry without provider or model matches the All value (.*) of those filters.
BSEL = 'backend=~"$backend", provider=~"$provider", model=~"$model"'
BY_PROBE = "backend, module, instance"


def backend_vars() -> list[dict[str, Any]]:
    # $job is kept (hidden) so links to the other boards carry the exporter deployment along
    job = {**job_var(), "hide": 2}
    return [datasource_var(), job,
            query_var("provider", "Provider", "label_values(probe_success, provider)"),
            query_var("model", "Model", 'label_values(probe_success{provider=~"$provider"}, model)'),
            query_var("backend", "Backend",
                      'label_values(probe_success{provider=~"$provider", model=~"$model"}, backend)')]


def backends() -> Board:
    cert_warn = threshold("llm:backend_threshold:cert_expiry_days", severity="warning")
    cert_crit = threshold("llm:backend_threshold:cert_expiry_days", severity="critical")
    b = Board("llm-backends", "LLM backends: health probes",
              "The LLM servers and gateways of prometheus/backends.yml as the blackbox exporter probes them: up or "
              "down over time, probe latency, failures in a row, the last failure and its reason, certificates. "
              "The alerts are in prometheus/rules/backends.yml, their thresholds in thresholds.yml.", ["backends"],
              backend_vars(), time_from="now-6h", alert_filters=("backend", "provider", "model"),
              alert_text="{{backend}} {{module}} {{instance}}")
    b.row("Backend health")
    # what LLMBackendDown judges
    down = (f"instance:probe_failures:consecutive{{{BSEL}}} "
            f">= on (backend) group_left () backend:llm_backend_threshold:down_probes")
    b.add(stat("Backends down", targets((f"count(count by (backend) ({down})) or vector(0)", "down"), instant=True),
               "short", "Backends with a probe that failed as many times in a row as LLMBackendDown's threshold "
               "(per backend, thresholds.yml).", colors=steps(("green", None), ("red", 1)), decimals=0,
               links=runbook("LLMBackendDown")), 6, 4)
    b.add(stat("Backends up", targets((f"count(min by (backend) (probe_success{{{BSEL}}}) == 1) or vector(0)", "up"),
                                      instant=True), "short", "Backends whose every probe succeeds now.",
               decimals=0), 6, 4)
    b.add(stat("Probes not running", targets(
        (f'count(up{{job="llm-backends", {BSEL}}} == 0) or vector(0)', "probes"), instant=True), "short",
        "Probes Prometheus got no result for (an unknown module, or the prober unreachable); "
        "LLMBackendProbeScrapeFailing warns after 2 minutes.", colors=steps(("green", None), ("orange", 1)),
        decimals=0, links=runbook("LLMBackendProbeScrapeFailing")), 6, 4)
    b.add(stat("Prober", targets(('min(up{job="blackbox-exporter"})', "blackbox exporter"), instant=True), "none",
               "The blackbox exporter itself, as Prometheus scrapes it (LLMBackendProberDown pages when it is down: "
               "then no probe runs).", mappings=UP_DOWN, colors=steps(("red", None), ("green", 1)),
               links=runbook("LLMBackendProberDown")), 6, 4)
    b.add(state_timeline("Up / down by probe", targets((f"probe_success{{{BSEL}}}", "{{backend}} {{module}}")),
                         "Each probe's result over time: green up, red down.", mappings=UP_DOWN,
                         links=runbook("LLMBackendDown", "LLMBackendFlapping")), 24, 8)
    b.add(timeseries("Probe duration", [
        *targets((f"probe_duration_seconds{{{BSEL}}}", "{{backend}} {{module}}")),
        target('backend:llm_backend_threshold:probe_duration_seconds{backend=~"$backend"}',
               "slow above ({{backend}})", "B")], "s",
        "How long each probe took (a failed probe: until it gave up). Dashed: LLMBackendProbeSlow's threshold "
        "for each backend, which the median probe of 5 minutes must pass.", fill=0,
        overrides=[threshold_line({"id": "byRegexp", "options": "^slow above .*"}, "orange")],
        links=runbook("LLMBackendProbeSlow")), 12, 8)
    b.add(timeseries("Failed probes in a row", [
        *targets((f"instance:probe_failures:consecutive{{{BSEL}}}", "{{backend}} {{module}}")),
        target('backend:llm_backend_threshold:down_probes{backend=~"$backend"}', "down at ({{backend}})", "B")],
        "short", "Consecutive failed probes; a backend is down (LLMBackendDown) from its dashed line.", fill=0,
        interpolation="stepAfter", decimals=0,
        overrides=[threshold_line({"id": "byRegexp", "options": "^down at .*"}, "red")],
        links=runbook("LLMBackendDown")), 12, 8)
    b.add(table("Probes now", targets(
        (f"max by ({BY_PROBE}) (probe_success{{{BSEL}}})", ""),
        (f"max by ({BY_PROBE}) (instance:probe_failures:consecutive{{{BSEL}}})", ""),
        (f"max by ({BY_PROBE}) (changes(probe_success{{{BSEL}}}[15m]))", ""),
        (f"max by ({BY_PROBE}) (probe_duration_seconds{{{BSEL}}})", ""),
        (f"max by ({BY_PROBE}) (probe_http_status_code{{{BSEL}}})", ""),
        instant=True, table=True), "short", "Every probe now: up or down, failures in a row, changes between up "
        "and down in 15 minutes (LLMBackendFlapping counts them), the last probe's duration and HTTP status "
        "(HTTP probes).",
        columns={"A": "state", "B": "failed in a row", "C": "changes (15m)", "D": "duration", "E": "HTTP status"},
        labels={"instance": "target"},
        order=["backend", "module", "target", "state", "failed in a row", "changes (15m)", "duration", "HTTP status"],
        overrides=[by_name("state", ("mappings", UP_DOWN),
                           ("custom.cellOptions", {"type": "color-background", "mode": "basic"})),
                   unit_column("failed in a row", "short", 0), unit_column("changes (15m)", "short", 0),
                   unit_column("duration", "s"), unit_column("HTTP status", "none", 0)],
        sort=("state", False), links=runbook("LLMBackendDown", "LLMBackendFlapping")), 14, 8)
    b.add(table("Last failure and its reason", targets(
        (f"topk by (backend, module) (1, max by (backend, module, reason) (last_over_time("
         f"instance:probe_failure_timestamp_seconds:by_reason{{{BSEL}}}[$__range]))) * 1000", ""),
        instant=True, table=True), "dateTimeAsIso",
        "The latest failed probe of each probe kind within the time range, and why it failed: HTTP <status>, "
        "unexpected body, no response (refused, timed out, DNS or TLS), no echo reply (ICMP), connect failed (TCP).",
        columns={"A": "last failure"}, order=["backend", "module", "reason", "last failure"],
        sort=("last failure", True), no_value="no failure in the range"), 10, 8)
    b.add(bargauge("TLS certificates: days left", targets(
        (f"(probe_ssl_earliest_cert_expiry{{{BSEL}}} - time()) / 86400", "{{backend}} {{instance}}"), instant=True),
        "d", f"Days until the earliest certificate of each TLS backend's chain expires "
        f"(LLMBackendCertificateExpiring warns below {cert_warn:g}, pages below {cert_crit:g}).",
        colors=steps(("red", None), ("orange", cert_crit), ("green", cert_warn)), max_=90,
        no_value="no TLS backend", links=runbook("LLMBackendCertificateExpiring")), 24, 6)
    return b


BOARDS = {"llm-overview": overview, "llm-anomalies": anomalies, "llm-performance": performance,
          "llm-budget": budget, "llm-quality": quality, "llm-backends": backends}


def render() -> dict[str, str]:
    return {f"{uid}.json": json.dumps(fn().to_json(), indent=2, ensure_ascii=False) + "\n" for uid, fn in BOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if grafana/dashboards/*.json differs from the output")
    args = ap.parse_args(argv)
    files = render()
    if args.check:
        stale = [n for n, text in files.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)} (run python grafana/build_dashboards.py)", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
