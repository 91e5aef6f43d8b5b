#!/usr/bin/env python3
"""Generate the Grafana dashboards in grafana/dashboards/*.json.

The committed JSON is what Grafana provisions; this script is how it is written, so that
every panel gets the same conventions (datasource uid `prometheus`, a unit, the
`$app` / `$provider` / `$model` filters, `$__rate_interval` in rates). Edit this file,
then run

    python grafana/build_dashboards.py          # rewrite the JSON
    python grafana/build_dashboards.py --check  # fail if the JSON is out of date

Metric and label names follow the project's metric contract (the exporter's /metrics);
threshold lines come from the recording rules in prometheus/rules/thresholds.yml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

DS = {"type": "prometheus", "uid": "prometheus"}
SEL = 'app=~"$app", provider=~"$provider", model=~"$model"'
# Anomaly gauges carry only their scope's labels (global: none, app: app, model: provider
# and model). The trailing "|" lets a filter match series that lack the label, so picking
# an app narrows the app-scope series without hiding the global or model ones.
ASEL = 'app=~"$app|", provider=~"$provider|", model=~"$model|"'
DSEL = 'provider=~"$provider", model=~"$model"'
ALERTS_FIRING = 'ALERTS{alertstate="firing", alertname!="Watchdog"}'
THRESHOLD_RULE = "llm:anomaly_threshold:ratio"
THRESHOLD_RULE_LOW = "llm:anomaly_threshold:ratio_low"

# signal -> (title, unit, axis label, direction, description). Directions match
# exporter/anomaly/signals.py: "up" is anomalous when high, "down" when low, "both" either way.
SIGNALS: list[tuple[str, str, str, str, str, str]] = [
    ("cost_per_hour", "Cost per hour", "currencyUSD", "USD / hour", "up",
     "Spend over the last 60 minutes."),
    ("token_velocity", "Token velocity", "short", "tokens / min", "up",
     "Tokens per minute over the last 60 minutes, all token types."),
    ("request_rate", "Request rate", "short", "requests / min", "both",
     "Requests per minute over the last 60 minutes; anomalous when high or low."),
    ("error_rate", "Error rate", "percentunit", "errors / requests", "up",
     "Errors divided by requests over the last 60 minutes."),
    ("latency_p95", "Latency p95", "s", "seconds", "up",
     "p95 request duration over the last 60 minutes, from raw latencies (not histogram buckets)."),
    ("ttft_p95", "Time to first token p95", "s", "seconds", "up",
     "p95 time to first token of streamed requests over the last 60 minutes."),
    ("output_tokens_per_second", "Output tokens per second", "short", "tokens / s", "down",
     "Median output throughput over the last 60 minutes; anomalous when low."),
]

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
DRIFT_SIGNALS = [
    ("empty_response_rate", "Empty responses", "percentunit", "share of responses with no output"),
    ("length_collapse_ratio", "Output length (recent / usual)", "percentunit",
     "typical length of recent answers as a share of the same apps' answers over the last day; low means collapse"),
    ("tool_silence_rate", "Tool-call silence", "percentunit", "share of tool-enabled requests without a tool call"),
    ("stop_anomaly_rate", "Anomalous stop reasons", "percentunit", "share of responses with an unusual stop reason"),
    ("error_rate", "Error rate", "percentunit", "errors / requests in the drift window"),
]


def thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


GREEN = thresholds(("green", None))


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": DS, "refId": ref, "expr": expr, "editorMode": "code",
        "legendFormat": legend or "__auto", "range": not instant, "instant": instant,
    }
    if table:
        t["format"] = "table"
    return t


def targets(*specs: tuple[str, str] | tuple[str, str, dict[str, Any]], instant: bool = False,
            table: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, spec in enumerate(specs):
        expr, legend = spec[0], spec[1]
        out.append(target(expr, legend, chr(ord("A") + i), instant=instant, table=table))
    return out


def by_name(name: str, *props: tuple[str, Any]) -> dict[str, Any]:
    return {"matcher": {"id": "byName", "options": name}, "properties": [{"id": k, "value": v} for k, v in props]}


def by_regexp(regex: str, *props: tuple[str, Any]) -> dict[str, Any]:
    return {"matcher": {"id": "byRegexp", "options": regex}, "properties": [{"id": k, "value": v} for k, v in props]}


def color(c: str) -> dict[str, Any]:
    return {"mode": "fixed", "fixedColor": c}


DASHED = {"fill": "dash", "dash": [10, 10]}
DOTTED = {"fill": "dot", "dash": [0, 10]}


def threshold_line(name: str, c: str) -> dict[str, Any]:
    return by_name(name, ("color", color(c)), ("custom.lineStyle", DASHED), ("custom.fillOpacity", 0),
                   ("custom.lineWidth", 1))


def timeseries(title: str, tgts: list[dict[str, Any]], unit: str, description: str = "", *,
               stack: bool = False, fill: int = 10, axis: str = "", overrides: list[dict[str, Any]] | None = None,
               min_: float | None = None, max_: float | None = None, log: int | None = None,
               steps: dict[str, Any] | None = None, threshold_style: str = "off", mappings: list | None = None,
               interpolation: str = "linear", legend_calcs: Iterable[str] = ("mean", "max", "lastNotNull"),
               decimals: int | None = None) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line", "lineInterpolation": interpolation, "lineWidth": 1, "fillOpacity": fill,
        "gradientMode": "none", "showPoints": "never", "pointSize": 4, "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "axisPlacement": "auto", "axisLabel": axis, "axisSoftMin": 0 if min_ is None and not log else None,
        "scaleDistribution": {"type": "log", "log": log} if log else {"type": "linear"},
        "thresholdsStyle": {"mode": threshold_style},
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
    }
    custom = {k: v for k, v in custom.items() if v is not None}
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "palette-classic"}, "custom": custom,
                                "thresholds": steps or GREEN, "mappings": mappings or []}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"showLegend": True, "displayMode": "table", "placement": "bottom", "calcs": list(legend_calcs)},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": tgts,
    }


def _reduce(calc: str = "lastNotNull") -> dict[str, Any]:
    return {"calcs": [calc], "fields": "", "values": False}


def stat(title: str, tgts: list[dict[str, Any]], unit: str, description: str = "", *,
         steps: dict[str, Any] | None = None, mappings: list | None = None, graph: bool = False,
         decimals: int | None = None, text_mode: str = "auto", color_mode: str = "value") -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": steps or GREEN,
                                "mappings": mappings or []}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": _reduce(), "colorMode": color_mode, "graphMode": "area" if graph else "none",
                    "justifyMode": "auto", "orientation": "auto", "textMode": text_mode, "wideLayout": True,
                    "showPercentChange": False},
        "targets": tgts,
    }


def gauge(title: str, tgts: list[dict[str, Any]], unit: str, description: str = "", *,
          steps: dict[str, Any] | None = None, min_: float = 0, max_: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": steps or GREEN,
                                "mappings": [], "min": min_}
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "gauge", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": _reduce(), "orientation": "auto", "showThresholdLabels": False,
                    "showThresholdMarkers": True, "sizing": "auto", "minVizHeight": 75, "minVizWidth": 75},
        "targets": tgts,
    }


def bargauge(title: str, tgts: list[dict[str, Any]], unit: str, description: str = "", *,
             steps: dict[str, Any] | None = None, min_: float | None = 0, max_: float | None = None,
             no_value: str | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "continuous-GrYlRd"}, "thresholds": steps or GREEN,
                                "mappings": []}
    if no_value:
        defaults["noValue"] = no_value
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "bargauge", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": _reduce(), "orientation": "horizontal", "displayMode": "gradient",
                    "valueMode": "color", "namePlacement": "auto", "showUnfilled": True, "sizing": "auto",
                    "minVizHeight": 16, "minVizWidth": 8, "maxVizHeight": 300},
        "targets": tgts,
    }


def table(title: str, tgts: list[dict[str, Any]], unit: str, description: str = "", *,
          columns: dict[str, str] | None = None, overrides: list[dict[str, Any]] | None = None,
          hide: Iterable[str] = (), sort: tuple[str, bool] | None = None,
          mappings: list | None = None, steps: dict[str, Any] | None = None,
          no_value: str | None = None) -> dict[str, Any]:
    """Instant queries in table format, merged on their labels; `columns` renames `Value #X`."""
    exclude = {"Time": True, "__name__": True, "job": True, "instance": True}
    exclude.update({h: True for h in hide})
    transformations: list[dict[str, Any]] = []
    if len(tgts) > 1:
        transformations.append({"id": "merge", "options": {}})
    rename = dict(columns or {})
    if len(tgts) == 1 and rename:
        # a single query names its value column "Value"
        rename = {"Value": next(iter(rename.values()))}
    transformations.append({"id": "organize", "options": {"excludeByName": exclude, "indexByName": {},
                                                          "renameByName": rename}})
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": steps or GREEN,
                                "mappings": mappings or [],
                                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False,
                                           "filterable": True}}
    if no_value:
        defaults["noValue"] = no_value
    opts: dict[str, Any] = {"showHeader": True, "cellHeight": "sm",
                            "footer": {"show": False, "reducer": ["sum"], "fields": "", "countRows": False}}
    if sort:
        opts["sortBy"] = [{"displayName": sort[0], "desc": sort[1]}]
    return {
        "type": "table", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": opts,
        "transformations": transformations,
        "targets": tgts,
    }


def state_timeline(title: str, tgts: list[dict[str, Any]], description: str = "", *,
                   mappings: list | None = None, steps: dict[str, Any] | None = None) -> dict[str, Any]:
    """One bar per series, coloured by its value over time (up / down)."""
    return {
        "type": "state-timeline", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": "none", "color": {"mode": "thresholds"}, "thresholds": steps or GREEN,
                                     "mappings": mappings or [],
                                     "custom": {"fillOpacity": 80, "lineWidth": 0, "spanNulls": False}},
                        "overrides": []},
        "options": {"showValue": "never", "mergeValues": True, "alignValue": "left", "rowHeight": 0.8,
                    "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "single", "sort": "none"}},
        "targets": tgts,
    }


def severity_column(name: str, mapping: list[dict[str, Any]] = SEVERITY_MAPPING) -> dict[str, Any]:
    return by_name(name, ("mappings", mapping), ("unit", "short"),
                   ("custom.cellOptions", {"type": "color-background", "mode": "basic"}),
                   ("thresholds", thresholds(("green", None), ("orange", 1), ("red", 2))))


def unit_column(name: str, unit: str, decimals: int | None = None) -> dict[str, Any]:
    props: list[tuple[str, Any]] = [("unit", unit)]
    if decimals is not None:
        props.append(("decimals", decimals))
    return by_name(name, *props)


# --------------------------------------------------------------------------- layout

class Board:
    def __init__(self, uid: str, title: str, description: str, tags: list[str], *,
                 extra_vars: list[dict[str, Any]] | None = None, refresh: str = "30s", time_from: str = "now-24h"):
        self.uid, self.title, self.description = uid, title, description
        self.tags = ["llm", *tags]
        self.extra_vars = extra_vars or []
        self.refresh, self.time_from = refresh, time_from
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

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel = {"id": self.next_id, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}, **panel}
        self.next_id += 1
        self.panels.append(panel)
        self.x += w
        self.line_h = max(self.line_h, h)

    def to_json(self) -> dict[str, Any]:
        return {
            "annotations": {"list": [
                {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
                 "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                 "type": "dashboard"},
                {"datasource": DS, "enable": True, "hide": False, "iconColor": "red", "name": "Firing alerts",
                 "expr": ALERTS_FIRING, "step": "60s", "titleFormat": "{{alertname}}",
                 "textFormat": "severity {{severity}}", "tagKeys": "alertname,severity",
                 "useValueForTime": False},
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
            ],
            "liveNow": False,
            "panels": self.panels,
            "refresh": self.refresh,
            "schemaVersion": 39,
            "tags": self.tags,
            "templating": {"list": variables() + self.extra_vars},
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


def query_var(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query", "name": name, "label": label, "datasource": DS,
        "definition": query, "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2, "regex": "", "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0,
        "skipUrlSync": False,
    }


def variables() -> list[dict[str, Any]]:
    return [
        query_var("app", "App", "label_values(llm_requests_total, app)"),
        query_var("provider", "Provider", 'label_values(llm_requests_total{app=~"$app"}, provider)'),
        query_var("model", "Model", 'label_values(llm_requests_total{app=~"$app", provider=~"$provider"}, model)'),
    ]


def custom_var(name: str, label: str, values: list[str], default: str) -> dict[str, Any]:
    return {
        "type": "custom", "name": name, "label": label, "query": ",".join(values),
        "current": {"selected": True, "text": default, "value": default},
        "options": [{"selected": v == default, "text": v, "value": v} for v in values],
        "multi": False, "includeAll": False, "hide": 0, "skipUrlSync": False,
    }


def rate(metric: str, by: str | None = None, sel: str = SEL, window: str = "$__rate_interval") -> str:
    inner = f"rate({metric}{{{sel}}}[{window}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def increase(metric: str, by: str | None = None, sel: str = SEL, window: str = "$__range") -> str:
    inner = f"increase({metric}{{{sel}}}[{window}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantile(q: float, metric: str, by: str = "", sel: str = SEL, window: str = "$__rate_interval") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket{{{sel}}}[{window}])))"


# Seconds left in the current UTC month (PromQL's calendar functions are UTC).
MONTH_LEFT = "scalar((days_in_month() - day_of_month()) * 86400 + 86400 - time() % 86400)"


# --------------------------------------------------------------------------- overview

def overview() -> Board:
    b = Board("llm-overview", "LLM usage: overview",
              "Requests, tokens, cost and errors by app and model; spend against the budget.", ["overview"])
    b.row("At a glance (selected time range)")
    b.add(stat("Requests", targets((increase("llm_requests_total"), "requests"), instant=True), "short",
               "Requests in the selected time range."), 4, 4)
    b.add(stat("Tokens", targets((increase("llm_tokens_total"), "tokens"), instant=True), "short",
               "Tokens of every type in the selected time range."), 4, 4)
    b.add(stat("Cost", targets((increase("llm_cost_usd_total"), "cost"), instant=True), "currencyUSD",
               "Spend in the selected time range (priced requests only).", decimals=2), 4, 4)
    b.add(stat("Error ratio", targets(
        (f"{increase('llm_request_errors_total')} / {increase('llm_requests_total')}", "errors"), instant=True),
        "percentunit", "Errors divided by requests in the selected time range.",
        steps=thresholds(("green", None), ("orange", 0.02), ("red", 0.05)), decimals=2), 4, 4)
    b.add(stat("Spend today", targets(
        ('llm_cost_usd_period_to_date{period="day", app=""}', "spent"),
        ('llm_budget_usd{period="day", app=""}', "budget")), "currencyUSD",
        "All apps, since the start of the day (the exporter's budget timezone), and the daily budget if one is set.",
        text_mode="value_and_name", decimals=2), 4, 4)
    b.add(stat("Spend this month", targets(
        ('llm_cost_usd_period_to_date{period="month", app=""}', "spent"),
        ('llm_budget_usd{period="month", app=""}', "budget")), "currencyUSD",
        "All apps, since the start of the month, and the monthly budget if one is set.",
        text_mode="value_and_name", decimals=2), 4, 4)
    budget_steps = thresholds(("green", None), ("orange", 0.8), ("red", 1))
    b.add(gauge("Today against the daily budget", targets(
        ('llm_cost_usd_period_to_date{period="day", app=""} / llm_budget_usd{period="day", app=""}', "used"),
        instant=True), "percentunit", "Share of the daily budget spent so far (empty when no daily budget is set).",
        steps=budget_steps, max_=1.5), 6, 6)
    b.add(gauge("Month against the monthly budget", targets(
        ('llm_cost_usd_period_to_date{period="month", app=""} / llm_budget_usd{period="month", app=""}', "used"),
        instant=True), "percentunit", "Share of the monthly budget spent so far.", steps=budget_steps, max_=1.5), 6, 6)
    b.add(gauge("Month-end forecast against the budget", targets(
        ('llm_cost_usd_forecast{horizon="month_end", app=""} / ignoring (horizon, period) '
         'llm_budget_usd{period="month", app=""}', "forecast"),
        instant=True), "percentunit", "The exporter's month-end spend forecast as a share of the monthly budget.",
        steps=budget_steps, max_=1.5), 6, 6)
    b.add(table("Budgets by app", targets(
        ('sum by (app) (llm_cost_usd_period_to_date{period="day", app=~"$app", app!=""})', ""),
        ('sum by (app) (llm_budget_usd{period="day", app=~"$app", app!=""})', ""),
        ('sum by (app) (llm_cost_usd_period_to_date{period="month", app=~"$app", app!=""})', ""),
        ('sum by (app) (llm_budget_usd{period="month", app=~"$app", app!=""})', ""),
        ('sum by (app) (llm_cost_usd_period_to_date{period="month", app=~"$app", app!=""})'
         ' / sum by (app) (llm_budget_usd{period="month", app=~"$app", app!=""})', ""),
        instant=True, table=True), "currencyUSD", "Apps with spend or a budget of their own.",
        columns={"Value #A": "today", "Value #B": "day budget", "Value #C": "month to date",
                 "Value #D": "month budget", "Value #E": "month used"},
        overrides=[by_name("month used", ("unit", "percentunit"),
                           ("custom.cellOptions", {"type": "gauge", "mode": "basic", "valueDisplayMode": "text"}),
                           ("max", 1), ("min", 0), ("thresholds", budget_steps))],
        sort=("month to date", True)), 6, 6)

    b.row("Traffic")
    b.add(timeseries("Requests by app", targets((rate("llm_requests_total", "app"), "{{app}}")), "reqps",
                     "Requests per second.", stack=True), 12, 8)
    b.add(timeseries("Requests by model", targets((rate("llm_requests_total", "provider, model"),
                                                   "{{provider}}/{{model}}")), "reqps",
                     "Requests per second.", stack=True), 12, 8)
    b.add(timeseries("Tokens by type", targets((rate("llm_tokens_total", "token_type"), "{{token_type}}")), "short",
                     "Tokens per second by token type.", stack=True, axis="tokens / s"), 12, 8)
    b.add(timeseries("Tokens by model", targets((rate("llm_tokens_total", "provider, model"),
                                                 "{{provider}}/{{model}}")), "short",
                     "Tokens per second, all token types.", stack=True, axis="tokens / s"), 12, 8)

    b.row("Cost")
    b.add(timeseries("Cost per hour by app", targets((rate("llm_cost_usd_total", "app") + " * 3600", "{{app}}")),
                     "currencyUSD", "Spend rate, scaled to USD per hour.", stack=True, axis="USD / hour"), 12, 8)
    b.add(timeseries("Cost per hour by model", targets((rate("llm_cost_usd_total", "provider, model") + " * 3600",
                                                       "{{provider}}/{{model}}")),
                     "currencyUSD", "Spend rate, scaled to USD per hour.", stack=True, axis="USD / hour"), 12, 8)
    b.add(bargauge("Top models by cost", targets(
        (f"topk(10, {increase('llm_cost_usd_total', 'provider, model')})", "{{provider}}/{{model}}"), instant=True),
        "currencyUSD", "Spend in the selected time range, ten most expensive models."), 12, 8)
    b.add(timeseries("Unpriced requests", targets((rate("llm_unpriced_requests_total", "provider, model"),
                                                   "{{provider}}/{{model}}")), "reqps",
                     "Requests without a cost in the record and without a price for the model: their spend is "
                     "missing from every cost panel. Add the model to `prices` in the exporter config."), 12, 8)

    b.row("Errors")
    b.add(timeseries("Errors by app and type", targets((rate("llm_request_errors_total", "app, error_type"),
                                                        "{{app}} {{error_type}}")), "reqps",
                     "Failed requests per second.", stack=True), 12, 8)
    b.add(timeseries("Error ratio by model", targets(
        (f"{rate('llm_request_errors_total', 'provider, model')} / {rate('llm_requests_total', 'provider, model')}",
         "{{provider}}/{{model}}"),
        ('llm:error_threshold:ratio{severity="warning"}', "warning threshold"),
        ('llm:error_threshold:ratio{severity="critical"}', "critical threshold")), "percentunit",
        "Errors divided by requests. Dashed: the error-ratio alert thresholds (prometheus/rules/thresholds.yml).",
        min_=0, overrides=[threshold_line("warning threshold", "orange"), threshold_line("critical threshold", "red")]),
        12, 8)
    b.add(bargauge("Errors by type", targets(
        (increase("llm_request_errors_total", "error_type"), "{{error_type}}"), instant=True), "short",
        "Failed requests in the selected time range by error type."), 8, 8)
    b.add(table("Firing alerts", targets((ALERTS_FIRING, ""), instant=True, table=True), "short",
                "Alerts Prometheus is firing now (Watchdog excluded). Alertmanager routes and silences them.",
                hide=["Value", "alertstate"], sort=("severity", False), no_value="no alerts firing"), 16, 8)

    b.row("Exporter")
    b.add(timeseries("Records ingested", targets(
        ("sum by (result) (rate(llm_exporter_records_total[$__rate_interval]))", "{{result}}")), "short",
        "Usage records per second by outcome (accepted, duplicate, rejected).", stack=True, axis="records / s"), 8, 7)
    b.add(timeseries("Freshness", targets(
        ("time() - max(llm_exporter_last_record_timestamp_seconds)", "since last record"),
        ("time() - max(llm_exporter_last_evaluation_timestamp_seconds)", "since last evaluation")), "s",
        "Seconds since the newest record (event time) and since the evaluator last ran.", fill=0), 8, 7)
    b.add(timeseries("Evaluation duration", targets(
        ("histogram_quantile(0.5, sum by (le) (rate(llm_exporter_evaluation_duration_seconds_bucket[$__rate_interval])))",
         "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(llm_exporter_evaluation_duration_seconds_bucket[$__rate_interval])))",
         "p99")), "s", "How long one evaluation of every anomaly signal takes.", fill=0), 8, 7)
    b.add(timeseries("Exporter problems", targets(
        ("sum(rate(llm_exporter_evaluation_errors_total[$__rate_interval]))", "evaluation errors"),
        ("sum(rate(llm_exporter_store_errors_total[$__rate_interval]))", "store errors"),
        ("sum by (label) (rate(llm_exporter_label_overflow_total[$__rate_interval]))", "label overflow: {{label}}"),
        ("sum(rate(llm_exporter_sessions_overflow_total[$__rate_interval]))", "session tracking overflow")),
        "short", "Errors per second. Label overflow: a label hit its limit and new values map to `other`. Session "
        "tracking overflow: more open conversations than the runaway detector tracks.",
        axis="per second"), 24, 7)
    return b


# --------------------------------------------------------------------------- anomalies

def anomaly_sel(signal: str, scope: str = "$scope") -> str:
    return f'signal="{signal}", scope="{scope}", {ASEL}'


def with_target(expr: str) -> str:
    """Give every anomaly series a `target` label (global, the app, or provider/model) for legends."""
    return ('label_replace(label_replace(label_join('
            f'{expr}, "target", "/", "provider", "model"), '
            '"target", "$1", "app", "(.+)"), "target", "global", "scope", "global")')


def threshold_targets(signal: str, direction: str, first_ref: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Warning/critical threshold lines for the ratio panel, from the recording rules.

    `llm:anomaly_threshold:ratio` holds the ratio an "up" alert fires at;
    `llm:anomaly_threshold:ratio_low` (its reciprocal) the ratio a "down" alert fires at.
    """
    tgts, overrides = [], []
    sides = {"up": [(THRESHOLD_RULE, "")], "down": [(THRESHOLD_RULE_LOW, "")],
             "both": [(THRESHOLD_RULE, " (high side)"), (THRESHOLD_RULE_LOW, " (low side)")]}
    ref = first_ref
    for rule, suffix in sides[direction]:
        for sev, col in (("warning", "orange"), ("critical", "red")):
            name = f"{sev} threshold{suffix}"
            tgts.append(target(f'{rule}{{signal="{signal}", severity="{sev}"}}', name, chr(ord("A") + ref)))
            overrides.append(threshold_line(name, col))
            ref += 1
    return tgts, overrides


def anomalies() -> Board:
    scope = custom_var("scope", "Scope", ["global", "app", "model"], "global")
    b = Board("llm-anomalies", "LLM usage: anomalies",
              "Each signal against its rolling baseline, as computed by the exporter (llm_anomaly_* gauges). "
              "The scope picks which series the charts show: all traffic, per app, or per model.",
              ["anomalies"], extra_vars=[scope])
    b.row("Status")
    b.add(stat("Signals at warning", targets(("count(llm_anomaly_severity == 1) or vector(0)", "warning"),
                                             instant=True), "short",
               "Series (signal and scope) whose severity is warning now.",
               steps=thresholds(("green", None), ("orange", 1))), 4, 4)
    b.add(stat("Signals at high", targets(("count(llm_anomaly_severity == 2) or vector(0)", "high"),
                                          instant=True), "short",
               "Series (signal and scope) whose severity is high now.",
               steps=thresholds(("green", None), ("red", 1))), 4, 4)
    b.add(stat("Shortest baseline", targets(("min(llm_anomaly_baseline_span_seconds)", "history"), instant=True), "s",
               "History behind the thinnest baseline; a signal stays quiet until its baseline spans a day.",
               steps=thresholds(("orange", None), ("green", 86400))), 4, 4)
    b.add(table("Anomaly status", targets(
        (f"llm_anomaly_severity{{{ASEL}}}", ""), (f"llm_anomaly_ratio{{{ASEL}}}", ""),
        (f"llm_anomaly_zscore{{{ASEL}}}", ""), (f"llm_anomaly_baseline_span_seconds{{{ASEL}}}", ""),
        instant=True, table=True), "short",
        "Every signal and scope now: severity (ok / warning / high), current / baseline, robust z-score, and "
        "how much history the baseline rests on.",
        columns={"Value #A": "severity", "Value #B": "ratio", "Value #C": "z-score", "Value #D": "baseline history"},
        overrides=[severity_column("severity"), unit_column("ratio", "short", 2), unit_column("z-score", "short", 1),
                   unit_column("baseline history", "s", 0)],
        sort=("severity", True)), 12, 8)
    for signal, title, unit, axis, direction, desc in SIGNALS:
        b.row(title)
        sel = anomaly_sel(signal)
        lines = timeseries(
            f"{title}: current against baseline", [
                target(with_target(f"llm_anomaly_current{{{sel}}}"), "{{target}} current", "A"),
                target(with_target(f"llm_anomaly_baseline{{{sel}}}"), "{{target}} baseline", "B"),
                target(with_target(f"llm_anomaly_band_lower{{{sel}}}"), "{{target}} band lower", "C"),
                target(with_target(f"llm_anomaly_band_upper{{{sel}}}"), "{{target}} band upper", "D"),
            ], unit, f"{desc} The band is the normal range around the baseline; outside it the signal is unusual.",
            fill=0, axis=axis, legend_calcs=("lastNotNull",), overrides=[
                by_regexp(".* current$", ("custom.lineWidth", 2)),
                by_regexp(".* baseline$", ("custom.lineStyle", DASHED)),
                by_regexp(".* band (lower|upper)$", ("custom.lineStyle", DOTTED), ("color", color("#8AB8FF"))),
                by_name("global band upper", ("custom.fillBelowTo", "global band lower"), ("custom.fillOpacity", 15)),
            ])
        b.add(lines, 10, 8)
        thr, thr_overrides = threshold_targets(signal, direction, 1)
        ratio = timeseries(
            f"{title}: ratio to baseline",
            [target(with_target(f"llm_anomaly_ratio{{{sel}}}"), "{{target}}", "A"), *thr], "short",
            "Current divided by baseline (log scale). Dashed lines: the warning and critical ratios from "
            "prometheus/rules/thresholds.yml (critical is the exporter's \"high\")"
            + ("; a drop alerts at or below the low-side line." if direction != "up" else "."),
            fill=0, axis="× baseline", log=2, legend_calcs=("lastNotNull", "max"), overrides=thr_overrides)
        b.add(ratio, 8, 8)
        ssel = f'signal="{signal}", {ASEL}'
        b.add(table(f"{title}: status", targets(
            (f"llm_anomaly_severity{{{ssel}}}", ""), (f"llm_anomaly_ratio{{{ssel}}}", ""),
            (f"llm_anomaly_current{{{ssel}}}", ""), (f"llm_anomaly_baseline{{{ssel}}}", ""),
            instant=True, table=True), unit, f"Every scope of {signal} now.",
            columns={"Value #A": "severity", "Value #B": "ratio", "Value #C": "current", "Value #D": "baseline"},
            hide=["signal"], overrides=[severity_column("severity"), unit_column("ratio", "short", 2)],
            sort=("severity", True)), 6, 8)
    return b


# --------------------------------------------------------------------------- performance

def performance() -> Board:
    b = Board("llm-performance", "LLM usage: performance",
              "Latency, time to first token and output throughput over time and per model "
              "(from the exporter's histograms).", ["performance"])
    qs = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
    b.row("Request latency")
    b.add(timeseries("Request duration", targets(*[(quantile(q, "llm_request_duration_seconds"), n) for q, n in qs]),
                     "s", "Quantiles of the request duration across the selected apps and models.", fill=0), 12, 8)
    b.add(timeseries("Request duration p95 by model", targets(
        (quantile(0.95, "llm_request_duration_seconds", "provider, model"), "{{provider}}/{{model}}"),
        ('llm:performance_threshold:latency_p95_seconds{model=""}', "alert threshold (default)")), "s",
        "p95 request duration per model. Dashed: the default per-model latency alert threshold "
        "(models can have their own in prometheus/rules/thresholds.yml).", fill=0,
        overrides=[threshold_line("alert threshold (default)", "red")]), 12, 8)
    b.row("Time to first token")
    b.add(timeseries("Time to first token", targets(
        *[(quantile(q, "llm_time_to_first_token_seconds"), n) for q, n in qs]), "s",
        "Quantiles of the time to first token of streamed requests.", fill=0), 12, 8)
    b.add(timeseries("Time to first token p95 by model", targets(
        (quantile(0.95, "llm_time_to_first_token_seconds", "provider, model"), "{{provider}}/{{model}}")), "s",
        "p95 time to first token per model (streamed requests only).", fill=0), 12, 8)
    b.row("Output throughput")
    b.add(timeseries("Output tokens per second", targets(
        (quantile(0.5, "llm_output_tokens_per_second"), "median"),
        (quantile(0.1, "llm_output_tokens_per_second"), "p10 (slowest tenth)")), "short",
        "Output tokens per second of generation time; low is bad.", fill=0, axis="tokens / s"), 12, 8)
    b.add(timeseries("Median output tokens per second by model", targets(
        (quantile(0.5, "llm_output_tokens_per_second", "provider, model"), "{{provider}}/{{model}}"),
        ('llm:performance_threshold:output_tokens_per_second_p50{model=""}', "alert threshold (default)")),
        "short", "Median output throughput per model. Dashed: the default alert threshold (alerts when below).",
        fill=0, axis="tokens / s", overrides=[threshold_line("alert threshold (default)", "red")]), 12, 8)
    b.row("Per-model comparison (selected time range)")
    b.add(bargauge("Request duration p95", targets(
        (quantile(0.95, "llm_request_duration_seconds", "provider, model", window="$__range"),
         "{{provider}}/{{model}}"), instant=True), "s", "p95 over the whole selected range."), 8, 9)
    b.add(bargauge("Time to first token p95", targets(
        (quantile(0.95, "llm_time_to_first_token_seconds", "provider, model", window="$__range"),
         "{{provider}}/{{model}}"), instant=True), "s", "p95 over the whole selected range."), 8, 9)
    b.add(bargauge("Median output tokens per second", targets(
        (quantile(0.5, "llm_output_tokens_per_second", "provider, model", window="$__range"),
         "{{provider}}/{{model}}"), instant=True), "short", "Median over the whole selected range; higher is better."),
        8, 9)
    rng = "$__range"
    cols = {"Value #A": "requests", "Value #B": "latency p50", "Value #C": "latency p95", "Value #D": "latency p99",
            "Value #E": "p95 last hour (exporter)", "Value #F": "TTFT p95", "Value #G": "output tok/s p50",
            "Value #H": "error ratio"}
    b.add(table("Models side by side", targets(
        (increase("llm_requests_total", "provider, model"), ""),
        (quantile(0.5, "llm_request_duration_seconds", "provider, model", window=rng), ""),
        (quantile(0.95, "llm_request_duration_seconds", "provider, model", window=rng), ""),
        (quantile(0.99, "llm_request_duration_seconds", "provider, model", window=rng), ""),
        (f'max by (provider, model) (llm_anomaly_current{{signal="latency_p95", scope="model", {DSEL}}})', ""),
        (quantile(0.95, "llm_time_to_first_token_seconds", "provider, model", window=rng), ""),
        (quantile(0.5, "llm_output_tokens_per_second", "provider, model", window=rng), ""),
        (f"{increase('llm_request_errors_total', 'provider, model')} / "
         f"{increase('llm_requests_total', 'provider, model')}", ""),
        instant=True, table=True), "s",
        "Histogram quantiles over the selected range; \"p95 last hour (exporter)\" is the exporter's exact p95 "
        "from raw latencies over its 60-minute window.",
        columns=cols, overrides=[unit_column("requests", "short", 0), unit_column("output tok/s p50", "short", 1),
                                 unit_column("error ratio", "percentunit", 2)],
        sort=("requests", True)), 24, 9)
    return b


# --------------------------------------------------------------------------- budget

def budget() -> Board:
    b = Board("llm-budget", "LLM usage: budget and forecast",
              "Spend against the configured budgets, burn rates over several windows, and the month-end projection. "
              "Budgets and forecasts come from the exporter (llm_budget_usd, llm_cost_usd_period_to_date, "
              "llm_cost_usd_forecast).", ["budget"], time_from="now-7d")
    steps = thresholds(("green", None), ("orange", 0.8), ("red", 1))
    g = 'app=""'
    b.row("This month (all apps)")
    b.add(stat("Month to date", targets((f'llm_cost_usd_period_to_date{{period="month", {g}}}', "spent"),
                                        instant=True), "currencyUSD", "Spend since the start of the month.",
               decimals=2), 4, 5)
    b.add(stat("Monthly budget", targets((f'llm_budget_usd{{period="month", {g}}}', "budget"), instant=True),
               "currencyUSD", "The configured monthly budget for all apps together.", decimals=2), 4, 5)
    b.add(stat("Month-end forecast", targets((f'llm_cost_usd_forecast{{horizon="month_end", {g}}}', "forecast"),
                                             instant=True), "currencyUSD",
               "The exporter's forecast of the month's total spend.", decimals=2), 4, 5)
    b.add(gauge("Budget used", targets(
        (f'llm_cost_usd_period_to_date{{period="month", {g}}} / llm_budget_usd{{period="month", {g}}}', "used"),
        instant=True), "percentunit", "Month to date as a share of the monthly budget.", steps=steps, max_=1.5), 4, 5)
    b.add(gauge("Forecast against budget", targets(
        (f'llm_cost_usd_forecast{{horizon="month_end", {g}}} / ignoring (horizon, period) '
         f'llm_budget_usd{{period="month", {g}}}', "forecast"),
        instant=True), "percentunit", "Month-end forecast as a share of the monthly budget.", steps=steps,
        max_=1.5), 4, 5)
    b.add(stat("Spend today", targets((f'llm_cost_usd_period_to_date{{period="day", {g}}}', "spent"),
                                      (f'llm_budget_usd{{period="day", {g}}}', "budget"), instant=True),
               "currencyUSD", "Spend since the start of the day and the daily budget.", text_mode="value_and_name",
               decimals=2), 4, 5)
    mtd = f'llm_cost_usd_period_to_date{{period="month", {g}}}'
    b.add(timeseries("Month to date, budget and projection", targets(
        (mtd, "month to date"),
        (f'llm_budget_usd{{period="month", {g}}}', "budget"),
        (f'llm_cost_usd_forecast{{horizon="month_end", {g}}}', "forecast"),
        (f'llm_cost_usd_forecast_upper{{horizon="month_end", {g}}}', "forecast upper (95 %)"),
        (f'llm_cost_usd_forecast_lower{{horizon="month_end", {g}}}', "forecast lower (5 %)"),
        (f"{mtd} + scalar(sum(rate(llm_cost_usd_total[7d]))) * {MONTH_LEFT}", "straight line at last week's pace")),
        "currencyUSD",
        "Spend so far this month, the monthly budget, and the exporter's month-end forecast with its 90 % band "
        "(shaded). The dotted line projects the last week's average pace to the end of the month (PromQL calendar "
        "functions count in UTC).",
        fill=0, legend_calcs=("lastNotNull",), overrides=[
            by_name("month to date", ("custom.lineWidth", 2), ("custom.fillOpacity", 10)),
            threshold_line("budget", "red"),
            by_name("forecast", ("color", color("purple")), ("custom.lineWidth", 2)),
            by_name("forecast upper (95 %)", ("custom.fillBelowTo", "forecast lower (5 %)"),
                    ("custom.fillOpacity", 20), ("color", color("purple")), ("custom.lineWidth", 0)),
            by_name("forecast lower (5 %)", ("color", color("purple")), ("custom.lineWidth", 0)),
            by_name("straight line at last week's pace", ("custom.lineStyle", DOTTED), ("color", color("blue"))),
        ]), 16, 9)
    b.add(bargauge("Forecast by horizon", targets(
        (f'llm_cost_usd_forecast{{horizon="month_end", {g}}}', "month end"),
        (f'llm_cost_usd_forecast{{horizon="30d", {g}}}', "next 30 days"),
        (f'llm_cost_usd_forecast{{horizon="60d", {g}}}', "next 60 days"),
        (f'llm_cost_usd_forecast{{horizon="90d", {g}}}', "next 90 days"), instant=True), "currencyUSD",
        "The exporter's spend forecasts for all apps."), 8, 9)

    b.row("Burn rate")
    windows = ("5m", "1h", "6h", "1d", "3d")
    b.add(timeseries("Spend rate by window", targets(
        *[(f"{rate('llm_cost_usd_total', window=w)} * 86400", f"over {w}") for w in windows]), "currencyUSD",
        "Spend rate over several windows, as USD per day: short windows react, long ones smooth.",
        fill=0, axis="USD / day"), 12, 8)
    burn = timeseries("Budget burn rate", [
        *targets(*[(f"sum(rate(llm_cost_usd_total[{w}])) * 86400 * scalar(days_in_month()) / "
                    f'scalar(llm_budget_usd{{period="month", {g}}})', f"over {w}") for w in windows]),
        target("llm:budget_threshold:burnrate", "alert at {{long_window}} and {{short_window}} ({{severity}})",
               chr(ord("A") + len(windows)))], "short",
        "Spend rate as a multiple of the pace that would use exactly the monthly budget (1 = on budget). "
        "All apps; needs a monthly budget. Dashed: the multi-window burn-rate alert thresholds "
        "(both windows of a pair must burn faster for the alert to fire).", fill=0, axis="× budget pace",
        log=2, overrides=[
            by_regexp("^alert at .*\\(critical\\)$", ("color", color("red")), ("custom.lineStyle", DASHED)),
            by_regexp("^alert at .*\\(warning\\)$", ("color", color("orange")), ("custom.lineStyle", DASHED)),
        ])
    b.add(burn, 12, 8)
    b.add(timeseries("Budget burn rate by app (1h)", targets(
        ('sum by (app) (rate(llm_cost_usd_total{app=~"$app"}[1h])) * 86400 * scalar(days_in_month()) '
         '/ on (app) llm_budget_usd{period="month", app=~"$app", app!=""}', "{{app}}")), "short",
        "Per-app burn rate against each app's own monthly budget (apps with a budget only).", fill=0,
        axis="× budget pace", steps=thresholds(("green", None), ("red", 1)), threshold_style="line"), 12, 8)
    b.add(timeseries("Cost per hour by app", targets((rate("llm_cost_usd_total", "app") + " * 3600", "{{app}}")),
                     "currencyUSD", "Spend rate, scaled to USD per hour.", stack=True, axis="USD / hour"), 12, 8)

    b.row("By app")
    b.add(timeseries("Month to date by app", targets(
        ('llm_cost_usd_period_to_date{period="month", app=~"$app", app!=""}', "{{app}}")), "currencyUSD",
        "Spend since the start of the month per app.", fill=0), 12, 8)
    b.add(timeseries("Today by app", targets(
        ('llm_cost_usd_period_to_date{period="day", app=~"$app", app!=""}', "{{app}}")), "currencyUSD",
        "Spend since the start of the day per app.", fill=0), 12, 8)
    a = 'app=~"$app", app!=""'
    b.add(table("Budget and forecast by app", targets(
        (f'sum by (app) (llm_cost_usd_period_to_date{{period="month", {a}}})', ""),
        (f'sum by (app) (llm_budget_usd{{period="month", {a}}})', ""),
        (f'sum by (app) (llm_cost_usd_forecast{{horizon="month_end", {a}}})', ""),
        (f'sum by (app) (llm_cost_usd_forecast{{horizon="30d", {a}}})', ""),
        (f'sum by (app) (llm_cost_usd_forecast{{horizon="90d", {a}}})', ""),
        (f'sum by (app) (llm_cost_usd_forecast{{horizon="month_end", {a}}}) '
         f'/ sum by (app) (llm_budget_usd{{period="month", {a}}})', ""),
        instant=True, table=True), "currencyUSD", "Per app: spend so far, budget, and the exporter's forecasts.",
        columns={"Value #A": "month to date", "Value #B": "month budget", "Value #C": "forecast month end",
                 "Value #D": "forecast 30d", "Value #E": "forecast 90d", "Value #F": "forecast / budget"},
        overrides=[by_name("forecast / budget", ("unit", "percentunit"),
                           ("custom.cellOptions", {"type": "color-background", "mode": "basic"}),
                           ("thresholds", steps))],
        sort=("month to date", True)), 24, 8)
    return b


# --------------------------------------------------------------------------- quality & loops

def quality() -> Board:
    b = Board("llm-quality", "LLM usage: quality and runaway loops",
              "Provider drift (empty responses, output-length collapse, tool-call silence, odd stop reasons, errors) "
              "and runaway agent loops (long chains, token bursts, expensive sessions, repeated tools).",
              ["quality"])
    b.row("Drift")
    cols = {f"Value #{chr(ord('A') + i)}": name for i, (_, name, _, _) in enumerate(DRIFT_SIGNALS)}
    cols["Value #F"] = "drift"
    b.add(table("Drift by model", targets(
        *[(f'llm_drift_value{{signal="{s}", {DSEL}}}', "") for s, _, _, _ in DRIFT_SIGNALS],
        (f"llm_drift_severity{{{DSEL}}}", ""), instant=True, table=True), "percentunit",
        "Each provider and model now: the drift signals over the recent responses that decided the verdict "
        "(the last 200 when there is none) and the verdict (none / mild / severe).", columns=cols, hide=["signal"],
        overrides=[severity_column("drift", DRIFT_MAPPING)], sort=("drift", True)), 16, 8)
    b.add(stat("Models drifting", targets((f"count(llm_drift_severity{{{DSEL}}} >= 1) or vector(0)", "models"),
                                          instant=True), "short", "Models with mild or severe drift now.",
               steps=thresholds(("green", None), ("orange", 1))), 4, 4)
    b.add(stat("Models drifting severely", targets(
        (f"count(llm_drift_severity{{{DSEL}}} == 2) or vector(0)", "models"), instant=True), "short",
        "Models with severe drift now.", steps=thresholds(("green", None), ("red", 1))), 4, 4)
    b.add(timeseries("Drift severity", targets((f"llm_drift_severity{{{DSEL}}}", "{{provider}}/{{model}}")),
                     "short", "0 none, 1 mild, 2 severe.", fill=0, interpolation="stepAfter", min_=0, max_=2,
                     mappings=DRIFT_MAPPING, legend_calcs=("lastNotNull", "max"), decimals=0), 8, 4)
    for s, name, unit, desc in DRIFT_SIGNALS:
        b.add(timeseries(name, targets((f'llm_drift_value{{signal="{s}", {DSEL}}}', "{{provider}}/{{model}}")),
                         unit, desc.capitalize() + ", per provider and model.", fill=0, min_=0), 8, 7)
    b.row("Runaway loops")
    b.add(stat("Runaway sessions now", targets(('sum(llm_runaway_sessions{app=~"$app"}) or vector(0)', "sessions"),
                                               instant=True), "short",
               "Conversations flagged as runaway right now, all reasons.",
               steps=thresholds(("green", None), ("orange", 1), ("red", 5))), 4, 8)
    b.add(timeseries("Runaway sessions by reason", targets(
        ('sum by (reason) (llm_runaway_sessions{app=~"$app"})', "{{reason}}")), "short",
        "Flagged conversations: chain_length (too many calls), token_burst, session_cost, tool_repetition.",
        stack=True, interpolation="stepAfter", decimals=0), 10, 8)
    b.add(bargauge("Runaway sessions by app and reason", targets(
        ('sum by (app, reason) (llm_runaway_sessions{app=~"$app"}) > 0', "{{app}} {{reason}}"), instant=True),
        "short", "Apps with flagged conversations now.", no_value="no runaway sessions"), 10, 8)
    b.add(timeseries("Invocation spike z-score by app", targets(
        ('llm_runaway_invocation_zscore{app=~"$app"}', "{{app}}"),
        ("llm:runaway_threshold:invocation_zscore", "alert threshold")), "short",
        "How unusual each app's call rate over the last 5 minutes is against its recent history (robust z-score); "
        "above the threshold is a spike, the signature of an agent stuck in a loop or a retry storm.", fill=0,
        axis="z-score", overrides=[threshold_line("alert threshold", "red")]), 24, 8)
    return b


# --------------------------------------------------------------------------- backend health

UP_DOWN = [{"type": "value", "options": {
    "0": {"text": "down", "color": "red", "index": 0},
    "1": {"text": "up", "color": "green", "index": 1},
}}]
# Probe series carry the labels of their entry in prometheus/backends.yml; an entry without
# provider or model matches the All value (.*) of those filters.
BSEL = 'backend=~"$backend", provider=~"$provider", model=~"$model"'
BY_PROBE = "backend, module, instance"


def backends() -> Board:
    backend_var = query_var("backend", "Backend", 'label_values(probe_success{provider=~"$provider", '
                                                  'model=~"$model"}, backend)')
    b = Board("llm-backends", "LLM backends: health probes",
              "The LLM servers and gateways of prometheus/backends.yml as the blackbox exporter probes them: up or "
              "down over time, probe latency, failures in a row, the last failure and its reason, certificates. "
              "The alerts are in prometheus/rules/backends.yml.", ["backends"], extra_vars=[backend_var],
              time_from="now-6h")
    b.row("Backend health")
    b.add(stat("Backends down", targets((f"count(count by (backend) (probe_success{{{BSEL}}} == 0)) or vector(0)",
                                         "down"), instant=True), "short",
               "Backends with at least one failing probe now.", steps=thresholds(("green", None), ("red", 1))), 6, 4)
    b.add(stat("Backends up", targets((f"count(min by (backend) (probe_success{{{BSEL}}}) == 1) or vector(0)",
                                       "up"), instant=True), "short", "Backends whose every probe succeeds now."), 6, 4)
    b.add(stat("Probes not running", targets(
        (f'count(up{{job="llm-backends", {BSEL}}} == 0) or vector(0)', "probes"), instant=True), "short",
        "Probes Prometheus got no result for (an unknown module, or the prober unreachable).",
        steps=thresholds(("green", None), ("orange", 1))), 6, 4)
    b.add(stat("Prober", targets(('min(up{job="blackbox-exporter"})', "blackbox exporter"), instant=True), "none",
               "The blackbox exporter itself, as Prometheus scrapes it.", mappings=UP_DOWN,
               steps=thresholds(("red", None), ("green", 1))), 6, 4)
    b.add(state_timeline("Up / down by probe", targets((f"probe_success{{{BSEL}}}", "{{backend}} {{module}}")),
                         "Each probe's result over time: green up, red down.", mappings=UP_DOWN,
                         steps=thresholds(("red", None), ("green", 1))), 24, 8)
    b.add(timeseries("Probe duration", [
        *targets((f"probe_duration_seconds{{{BSEL}}}", "{{backend}} {{module}}")),
        target('backend:llm_backend_threshold:probe_duration_seconds{backend=~"$backend"}', "slow above ({{backend}})",
               "B")], "s",
        "How long each probe took (a failed probe: until it gave up). Dashed: the slow-probe threshold.", fill=0,
        overrides=[by_regexp("^slow above .*", ("color", color("orange")), ("custom.lineStyle", DASHED))]), 12, 8)
    b.add(timeseries("Failed probes in a row", [
        *targets((f"instance:probe_failures:consecutive{{{BSEL}}}", "{{backend}} {{module}}")),
        target('backend:llm_backend_threshold:down_probes{backend=~"$backend"}', "down at ({{backend}})", "B")],
        "short", "Consecutive failed probes; a backend is down (LLMBackendDown) from the dashed line.", fill=0,
        interpolation="stepAfter", decimals=0,
        overrides=[by_regexp("^down at .*", ("color", color("red")), ("custom.lineStyle", DASHED))]), 12, 8)
    b.add(table("Probes now", targets(
        (f"max by ({BY_PROBE}) (probe_success{{{BSEL}}})", ""),
        (f"max by ({BY_PROBE}) (instance:probe_failures:consecutive{{{BSEL}}})", ""),
        (f"max by ({BY_PROBE}) (probe_duration_seconds{{{BSEL}}})", ""),
        (f"max by ({BY_PROBE}) (probe_http_status_code{{{BSEL}}})", ""),
        instant=True, table=True), "short", "Every probe now: up or down, failures in a row, the last probe's "
        "duration and HTTP status (HTTP probes).",
        columns={"Value #A": "state", "Value #B": "failed in a row", "Value #C": "duration",
                 "Value #D": "HTTP status"},
        overrides=[by_name("state", ("mappings", UP_DOWN),
                           ("custom.cellOptions", {"type": "color-background", "mode": "basic"}),
                           ("thresholds", thresholds(("red", None), ("green", 1)))),
                   unit_column("duration", "s"), unit_column("HTTP status", "none", 0)],
        sort=("state", False)), 14, 8)
    b.add(table("Last failure and its reason", targets(
        (f"topk by (backend, module) (1, max by (backend, module, reason) (last_over_time("
         f"instance:probe_failure_timestamp_seconds:by_reason{{{BSEL}}}[$__range]))) * 1000", ""),
        instant=True, table=True), "dateTimeAsIso",
        "The latest failed probe of each probe kind within the time range, and why it failed: HTTP <status>, "
        "unexpected body, no response (refused, timed out, DNS or TLS), no echo reply (ICMP), connect failed (TCP).",
        columns={"Value #A": "last failure"}, sort=("last failure", True), no_value="no failure in the range"), 10, 8)
    b.add(bargauge("TLS certificates: days left", targets(
        (f"(probe_ssl_earliest_cert_expiry{{{BSEL}}} - time()) / 86400", "{{backend}} {{instance}}"), instant=True),
        "d", "Days until the earliest certificate of each TLS backend's chain expires (LLMBackendCertificateExpiring "
        "warns at 14, pages at 3).", steps=thresholds(("red", None), ("orange", 3), ("green", 14)), max_=90,
        no_value="no TLS backend"), 24, 6)
    return b


BOARDS = {"llm-overview": overview, "llm-anomalies": anomalies, "llm-performance": performance,
          "llm-budget": budget, "llm-quality": quality, "llm-backends": backends}


def render() -> dict[str, str]:
    return {f"{uid}.json": json.dumps(fn().to_json(), indent=2, ensure_ascii=False) + "\n" for uid, fn in BOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
