"""What the dashboard tests need to know about the rules: the alerts, the metrics an
expression reads, the recording rules and the threshold numbers.

    for alert in alert_rules(): alert.name, alert.expr, alert.board, alert.variables
    metrics_of('rate(llm_requests_total{app="x"}[5m]) > on() llm:foo')   # ['llm_requests_total', 'llm:foo']
    raw_reads("provider_model:llm_requests:rate5m")                      # {'llm_requests_total'}
    threshold_value("llm:error_threshold:ratio", severity="warning")     # 0.05
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RULES_DIR = REPO / "prometheus" / "rules"

_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)?\{([^{}]*)\}")
_NAME_MATCHER = re.compile(r'__name__\s*=~?\s*"([^"]+)"')
_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "histogram_quantile", "vector",
    "scalar", "time", "label_replace", "label_join", "abs", "absent", "clamp", "clamp_min", "clamp_max", "round",
    "days_in_month", "day_of_month", "sum_over_time", "max_over_time", "min_over_time", "avg_over_time",
    "last_over_time", "count_over_time", "timestamp", "sort", "sort_desc", "inf", "nan", "le", "query_result",
}
BUILTIN = {"ALERTS", "ALERTS_FOR_STATE", "up"}


def metrics_of(expr: str) -> list[str]:
    """The metric names an expression selects, in order of appearance (a `__name__` regex
    of alternatives counts each), without repeats."""
    found: list[tuple[int, str]] = []
    for m in _SELECTOR.finditer(expr):
        if not m.group(1):
            found += [(m.start(), name) for alt in _NAME_MATCHER.findall(m.group(2)) for name in alt.split("|")]
    # blank what is not a metric name, keeping every position
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: " " * len(m.group(0)), expr)      # string literals
    text = re.sub(r"\{[^{}]*\}", lambda m: " " * len(m.group(0)), text)                # matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)(\s*\([^()]*\))",
                  lambda m: m.group(1) + " " * len(m.group(2)), text)                 # label lists
    text = re.sub(r"\[[^\]]*\]", lambda m: " " * len(m.group(0)), text)                # ranges, subqueries
    for m in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)", text):
        if m.group(1) not in _KEYWORDS and not text[m.end():].lstrip().startswith("("):
            found.append((m.start(), m.group(1)))
    out: list[str] = []
    for _, name in sorted(found):
        if name not in out:
            out.append(name)
    return out


def selectors_of(expr: str) -> list[tuple[str, str]]:
    """(metric name, matcher text) of every `name{...}` selector."""
    return [(m.group(1), m.group(2)) for m in _SELECTOR.finditer(expr) if m.group(1)]


def is_threshold(metric: str) -> bool:
    """A threshold series of thresholds.yml (`llm:*_threshold:*`, or one resolved per model or
    per backend: `provider_model:llm_performance_threshold:*`, `backend:llm_backend_threshold:*`)."""
    return bool(re.match(r"^\w*:llm_\w+_threshold:|^llm:\w+_threshold:", metric))


@lru_cache(maxsize=None)
def _rule_docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    out = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []) or []:
            for rule in group.get("rules", []) or []:
                out.append((path.name, rule))
    return tuple(out)


@dataclass(frozen=True)
class Alert:
    file: str
    name: str
    severity: str
    expr: str
    dashboard_url: str

    @property
    def board(self) -> str | None:
        m = re.search(r"/d/([\w-]+)\?", self.dashboard_url)
        return m.group(1) if m else None

    @property
    def variables(self) -> set[str]:
        """The dashboard variables the link always sets (var-<name>=...); those inside a
        `{{ with $labels.x }}` only when the alert has the label (the live test renders them)."""
        always = re.sub(r"\{\{\s*with\b.*?\{\{\s*end\s*\}\}", "", self.dashboard_url)
        return set(re.findall(r"[?&]var-([\w]+)=", always))

    @property
    def primary(self) -> str | None:
        """The first metric the expression reads that is not a threshold: what it judges."""
        return next((m for m in metrics_of(self.expr) if not is_threshold(m)), None)


def alert_rules() -> list[Alert]:
    return [Alert(f, r["alert"], (r.get("labels") or {}).get("severity", ""), r["expr"],
                  str((r.get("annotations") or {}).get("dashboard_url", "")))
            for f, r in _rule_docs() if "alert" in r]


@lru_cache(maxsize=None)
def recording_rules() -> dict[str, str]:
    """Recording rule name -> its expression (the names repeat for threshold rules: joined)."""
    out: dict[str, str] = {}
    for _, r in _rule_docs():
        if "record" in r:
            out[r["record"]] = (out.get(r["record"], "") + " or " + str(r["expr"])).strip(" or")
    return out


def raw_reads(name: str, _seen: frozenset[str] = frozenset()) -> set[str]:
    """The exporter metrics (base names, `_bucket`/`_count` kept) a recording rule reads."""
    rules = recording_rules()
    if name not in rules:
        return {name}
    out: set[str] = set()
    for m in metrics_of(rules[name]):
        if m not in _seen:
            out |= raw_reads(m, _seen | {name})
    return out


def window_rules() -> dict[tuple[str, str], str]:
    """(raw metric, window) -> a recording rule computing rate/increase of it over that window."""
    out: dict[tuple[str, str], str] = {}
    for name, expr in recording_rules().items():
        for metric, window in re.findall(r"(?:rate|increase)\(\s*([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\[(\w+)\]\)", expr):
            out.setdefault((metric, window), name)
    return out


_CONSTANT = re.compile(r"^\s*vector\(\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)\s*\)\s*$", re.I)


@lru_cache(maxsize=None)
def threshold_values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(record, sorted labels) -> the number of every constant threshold rule."""
    out = {}
    for _, r in _rule_docs():
        m = _CONSTANT.match(str(r.get("expr", "")))
        if "record" in r and m:
            out[(r["record"], tuple(sorted((r.get("labels") or {}).items())))] = float(m.group(1))
    return out


def threshold_value(record: str, **labels: str) -> float:
    return threshold_values()[(record, tuple(sorted(labels.items())))]


def duration_seconds(text: str) -> float:
    """A Prometheus duration ("90s", "1h30m", "7d") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def url_variables(url: str) -> dict[str, list[str]]:
    """The `var-<name>` parameters of a dashboard URL."""
    query = urllib.parse.urlparse(url).query
    out: dict[str, list[str]] = {}
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if k.startswith("var-"):
            out.setdefault(k[4:], []).append(v)
    return out


# --- what each colour of the dashboards stands for -------------------------------------------
#
# (board uid, panel title, field name or None for the panel's default) -> the thresholds its
# colour steps stand for, in the order of the steps after the base colour. A source is PromQL
# that gives the number (a threshold series of thresholds.yml, or a constant with the reason
# beside it), or ("alert", name, severity, metric): the number that alert compares `metric`
# with in its expression.

# an alert on a count that fires above 0 colours from the first one
FIRST = "vector(1)"
# a share of a budget that an alert compares with the budget itself ("spent > budget")
WHOLE = "vector(1)"


def colour_thresholds() -> dict[tuple[str, str, str | None], list[Any]]:
    from exporter.anomaly.signals import DEFAULT_SIGNALS

    anomaly_severity = [("alert", "LLMCostSpike", "warning", "llm_anomaly_severity"),
                        ("alert", "LLMCostSpike", "critical", "llm_anomaly_severity")]
    drift = [("alert", "LLMQualityDrift", "warning", "llm_drift_severity"),
             ("alert", "LLMQualityDrift", "critical", "llm_drift_severity")]
    spent = ["llm:budget_threshold:spent_fraction", WHOLE]        # LLMMonthlyBudgetNearlySpent, ...Exceeded
    out: dict[tuple[str, str, str | None], list[Any]] = {
        ("llm-overview", "Cost today", "of daily budget"): [WHOLE],          # LLMDailyBudgetExceeded: today > budget
        ("llm-overview", "Cost this month", "of monthly budget"): spent,
        ("llm-overview", "Cost this month", "forecast / budget"): ["llm:budget_threshold:forecast_factor"],
        ("llm-overview", "Error ratio", None): ['llm:error_threshold:ratio{severity="warning"}',
                                                'llm:error_threshold:ratio{severity="critical"}'],
        ("llm-overview", "Latency p95", None): ['llm:performance_threshold:latency_p95_seconds{model=""}'],
        ("llm-overview", "Alerts firing", "critical"): [FIRST],
        ("llm-overview", "Alerts firing", "warning"): [FIRST],
        ("llm-overview", "Exporter", None): [("alert", "LLMExporterDown", "critical", "up")],
        ("llm-overview", "Exporter", "last record"): ["llm:ingest_threshold:stall_seconds"],
        ("llm-budget", "Budget used", None): spent,
        ("llm-budget", "Forecast against budget", None): ["llm:budget_threshold:forecast_factor"],
        ("llm-budget", "Cost today", "of daily budget"): [WHOLE],
        ("llm-budget", "Burn-rate alert pairs", "slower / factor"): [WHOLE],   # both windows above the factor
        ("llm-budget", "Budget and forecast by app", "month used"): spent,
        ("llm-budget", "Budget and forecast by app", "forecast / budget"): ["llm:budget_threshold:forecast_factor"],
        ("llm-quality", "Drift by model", "drift"): drift,
        ("llm-quality", "Models drifting", "mild or severe"): [FIRST],
        ("llm-quality", "Models drifting", "severe"): [FIRST],
        ("llm-quality", "Runaway sessions now", "burning tokens or money"): [FIRST],
        ("llm-quality", "Runaway sessions now", "loop-shaped"): [FIRST],
        ("llm-anomalies", "Anomalies now", "high"): [FIRST],
        ("llm-anomalies", "Anomalies now", "warning"): [FIRST],
        ("llm-anomalies", "Anomaly status", "severity"): anomaly_severity,
        ("llm-backends", "Backends down", None): [FIRST],                  # LLMBackendDown, per backend
        ("llm-backends", "Probes not running", None): [FIRST],             # LLMBackendProbeScrapeFailing
        ("llm-backends", "Prober", None): [("alert", "LLMBackendProberDown", "critical", "up")],
        ("llm-backends", "TLS certificates: days left", None): [
            'llm:backend_threshold:cert_expiry_days{severity="critical"}',
            'llm:backend_threshold:cert_expiry_days{severity="warning"}'],
    }
    for spec in DEFAULT_SIGNALS:
        assert spec.text is not None
        title = spec.text.title
        out[("llm-anomalies", f"{title}: status", "severity")] = anomaly_severity
        ratio: list[Any] = []
        if "down" in spec.directions:
            ratio += [f'llm:anomaly_threshold:ratio_low{{signal="{spec.name}", severity="critical"}}',
                      f'llm:anomaly_threshold:ratio_low{{signal="{spec.name}", severity="warning"}}']
        if "up" in spec.directions:
            ratio += [f'llm:anomaly_threshold:ratio{{signal="{spec.name}", severity="warning"}}',
                      f'llm:anomaly_threshold:ratio{{signal="{spec.name}", severity="critical"}}']
        out[("llm-anomalies", f"{title}: status", "ratio")] = ratio
    return out


def alert_constant(alert: str, severity: str, metric: str) -> float:
    """The number alert `alert` (of `severity`) compares `metric` with in its expression."""
    for a in alert_rules():
        if a.name == alert and a.severity == severity:
            # the metric, maybe inside an aggregation (`max without (replica) (up{...}) == 0`)
            m = re.search(re.escape(metric) + r"(?:\{[^}]*\})?\)*\s*(?:>=|<=|==|>|<)\s*(-?[0-9.]+)", a.expr)
            if m:
                value = float(m.group(1))
                # `up == 0` alerts at 0: the colour turns good from the next whole value
                return value + 1 if re.search(re.escape(metric) + r"(?:\{[^}]*\})?\)*\s*==\s*0\b", a.expr) else value
    raise KeyError(f"{alert} ({severity}) compares {metric} with no number")


def static_value(source: Any) -> float:
    """A colour source's number from the rule files (without Prometheus)."""
    if isinstance(source, tuple):
        return alert_constant(*source[1:])
    m = _CONSTANT.match(source)
    if m:
        return float(m.group(1))
    m = re.fullmatch(r"([\w:]+)(?:\{(.*)\})?", source)
    assert m, source
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
    return threshold_value(m.group(1), **{k: v for k, v in labels.items() if v})


def colour_steps(panel: dict[str, Any]) -> dict[str | None, list[float]]:
    """The colour steps of a panel beyond the base colour: by field (None: the default)."""
    out: dict[str | None, list[float]] = {}
    fc = panel.get("fieldConfig", {})
    base = fc.get("defaults", {}).get("thresholds", {}).get("steps", [])
    if len(base) > 1:
        out[None] = [s["value"] for s in base[1:]]
    for o in fc.get("overrides", []):
        for p in o["properties"]:
            if p["id"] == "thresholds" and len(p["value"]["steps"]) > 1:
                out[o["matcher"]["options"]] = [s["value"] for s in p["value"]["steps"][1:]]
    return out


# --- dashboards ---------------------------------------------------------------------------------

def threshold_lines(panel: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets a time series panel draws as dashed threshold lines."""
    dashed = []
    for o in panel["fieldConfig"]["overrides"]:
        # long dashes: the style the generator keeps for alert thresholds
        if any(pr["id"] == "custom.lineStyle" and pr["value"] == {"fill": "dash", "dash": [10, 10]}
               for pr in o["properties"]):
            dashed.append(o["matcher"])
    out = []
    for t in panel["targets"]:
        legend = t.get("legendFormat", "")
        for m in dashed:
            if (m["id"] == "byName" and legend == m["options"]) or \
                    (m["id"] == "byRegexp" and re.search(m["options"], re.sub(r"\{\{\s*(\w+)\s*\}\}", r"x", legend))):
                out.append(t)
    return out


def panels_of_metric(board: dict[str, Any], metric: str, alert_expr: str = "") -> list[dict[str, Any]]:
    """Panels that read `metric` (or a recording rule of it), with the same value of every
    label the alert selects it by exactly (signal, period, horizon, ...)."""
    wanted = {}
    for name, matchers in selectors_of(alert_expr):
        if name == metric:
            wanted.update(dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers)))
    wanted.pop("job", None)
    rules = recording_rules()
    out = []
    for p in (p for p in board.get("panels", []) if p.get("targets")):
        for t in p["targets"]:
            names = metrics_of(t["expr"])
            direct = metric in names
            derived = metric not in rules and any(n in rules and metric in raw_reads(n) for n in names)
            if not (direct or derived):
                continue
            if direct and wanted:
                sels = [m for n, m in selectors_of(t["expr"]) if n == metric]
                if not any(all(re.search(rf'\b{k}\s*=\s*"{re.escape(v)}"', s) or not re.search(rf"\b{k}\s*=", s)
                               for k, v in wanted.items()) for s in sels):
                    continue
            out.append(p)
            break
    return out
