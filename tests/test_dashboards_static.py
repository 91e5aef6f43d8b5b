"""Static checks of the Grafana provisioning and dashboards (no Grafana needed).

Every dashboard loads and carries the shared conventions (datasource and job variables,
filters applied uniformly, units, a grid without holes); every PromQL expression parses
(promtool checks them as recording rules) and reads a metric the exporter publishes or a
recording rule the shipped rules define; no panel evaluates a range over a day at every
step; every alert's dashboard_url opens a board with a panel for the metric it judges, the
board annotates its alerts and links their runbook sections; every colour and threshold
line stands for an alert threshold (tests/test_dashboards_live.py checks the numbers
against a real Prometheus); the anomaly rows follow the signal specs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from board_facts import (alert_rules, colour_steps, colour_thresholds, duration_seconds, is_threshold,  # noqa: E402
                         metrics_of, panels_of_metric, recording_rules, selectors_of, static_value, threshold_lines,
                         url_variables, window_rules)
from stack_util import (DASHBOARD_DIR, PROVISIONING_DIR, REPO, DashboardQuery,  # noqa: E402
                        iter_dashboard_queries, iter_panels, load_dashboards, promtool)

EXPECTED_UIDS = {"llm-overview", "llm-anomalies", "llm-performance", "llm-budget", "llm-quality", "llm-backends"}
DS_VAR = "${datasource}"
# Boards of the probe series (blackbox exporter), not of the exporter's: they have no $app,
# and their $job (the exporter deployment, carried along by links) filters nothing there,
# since a probe's job is the scrape job of the probes.
PROBE_BOARDS = {"llm-backends"}
NO_DATA_TYPES = {"row", "text", "news", "dashlist"}
FILTERS = ("job", "scope", "app", "provider", "model")

# The metric contract's names (histograms by base name, counters without _total); used when
# the exporter's sources are not there to ask.
CONTRACT_METRICS = {
    "llm_requests", "llm_request_errors", "llm_tokens", "llm_cost_usd", "llm_unpriced_requests",
    "llm_request_duration_seconds", "llm_time_to_first_token_seconds", "llm_output_tokens_per_second",
    "llm_anomaly_current", "llm_anomaly_baseline", "llm_anomaly_ratio", "llm_anomaly_zscore",
    "llm_anomaly_severity", "llm_anomaly_explained", "llm_anomaly_baseline_span_seconds", "llm_anomaly_band_lower",
    "llm_anomaly_band_upper", "llm_drift_value", "llm_drift_severity", "llm_runaway_sessions",
    "llm_runaway_invocation_zscore", "llm_budget_usd", "llm_cost_usd_period_to_date", "llm_cost_usd_forecast",
    "llm_cost_usd_forecast_lower", "llm_cost_usd_forecast_upper",
    "llm_exporter_build_info", "llm_exporter_records", "llm_exporter_label_overflow",
    "llm_exporter_evaluation_duration_seconds", "llm_exporter_last_record_timestamp_seconds",
    "llm_exporter_store_errors", "llm_exporter_evaluation_errors", "llm_exporter_last_evaluation_timestamp_seconds",
    "llm_exporter_sessions_overflow", "llm_exporter_ingest_queue_bytes", "llm_exporter_ingest_throttled",
    "llm_exporter_component_errors", "llm_exporter_component_last_success_timestamp_seconds",
}
PROMETHEUS_BUILTIN = {"ALERTS", "ALERTS_FOR_STATE", "up"}
# What the blackbox exporter publishes for each probe (the backend health board).
BLACKBOX = {"probe_success", "probe_duration_seconds", "probe_http_status_code", "probe_ssl_earliest_cert_expiry"}

# The labels each family carries besides job and instance (docs/metrics.md): a board filter
# on one of them must select it wherever the series has it.
USAGE = {"app", "provider", "model"}
# probe series: the labels of their backends.yml entry and the target (prometheus.yml, job llm-backends)
PROBE_LABELS = {"backend", "module", "provider", "model", "kind", "instance"}
LABELS_BY_PREFIX = [
    ("llm_anomaly_", {"signal", "scope", "app", "provider", "model"}),
    ("llm_drift_", {"provider", "model", "signal"}),
    ("llm_runaway_", {"app", "reason"}),
    ("llm_budget_usd", {"app", "period"}),
    ("llm_cost_usd_period_to_date", {"app", "period"}),
    ("llm_cost_usd_forecast", {"app", "horizon"}),
    ("llm_exporter_", set()),
    ("probe_", PROBE_LABELS),
    ("instance:probe_", PROBE_LABELS | {"reason"}),
    ("backend:", {"backend"}),
    ("up", set()),
    ("app_provider_model", USAGE),
    ("provider_model", {"provider", "model"}),
    ("app:", {"app"}),
    ("global:", set()),
    ("llm_", USAGE),
]
# Panels that do not narrow by a board filter, and why (keep short).
UNFILTERED: dict[tuple[str, str], tuple[set[str], str]] = {
    ("llm-overview", "Cost today"): ({"provider", "model"}, "budgets and their period totals exist per app only"),
    ("llm-overview", "Cost this month"): ({"provider", "model"}, "budgets and their period totals exist per app only"),
}


def labels_of_metric(metric: str) -> set[str]:
    for prefix, labels in LABELS_BY_PREFIX:
        if metric.startswith(prefix):
            return labels | {"job"}
    raise AssertionError(f"no label set known for {metric}")


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    found = load_dashboards()
    assert found, f"no dashboards in {DASHBOARD_DIR}"
    return found


def boards() -> dict[str, dict[str, Any]]:
    return {d["uid"]: d for d in load_dashboards().values()}


def data_panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in iter_panels(d) if p["type"] not in NO_DATA_TYPES)


def variable_names(d: dict[str, Any]) -> set[str]:
    return {v["name"] for v in d["templating"]["list"]}


def test_uids_and_files(dashboards):
    uids = {d["uid"] for d in dashboards.values()}
    assert uids == EXPECTED_UIDS
    for name, d in dashboards.items():
        assert name == f"{d['uid']}.json"
        assert d["title"] and d["schemaVersion"] >= 36
        assert d.get("id") is None, "provisioned dashboards must not pin a database id"


def test_generated_json_is_current():
    """The committed JSON is what build_dashboards.py writes from the rules and signal specs."""
    r = subprocess.run([sys.executable, str(REPO / "grafana" / "build_dashboards.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_variables(dashboards):
    for name, d in dashboards.items():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        ds = variables.get("datasource")
        assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", f"{name}: no $datasource"
        assert ds["current"]["value"] == "prometheus", f"{name}: $datasource must default to the provisioned one"
        job = variables.get("job")
        assert job and job["type"] == "query" and "label_values(llm_exporter_build_info, job)" in job["definition"]
        assert job["includeAll"] and "allValue" not in job, \
            f"{name}: $job's All must list the exporter jobs (`up` of other jobs stays out)"
        assert "app" in variables or d["uid"] in PROBE_BOARDS, f"{name}: no $app variable"
        for var in set(variables) & {"app", "provider", "model", "scope"}:
            v = variables[var]
            assert v["multi"] and v["includeAll"], f"{name}: ${var} must be multi-value with All"
            assert v["allValue"] == ".*", f"{name}: ${var} All must be .* (series without the label still match)"
        for v in variables.values():
            if v["type"] == "query":
                assert v["datasource"]["uid"] == DS_VAR, f"{name}: ${v['name']} does not use $datasource"


def test_every_query_uses_the_datasource_variable(dashboards):
    for name, d in dashboards.items():
        panels = list(data_panels(d))
        assert panels, f"{name}: no panels"
        ids = [p["id"] for p in iter_panels(d)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels:
            where = f"{name} / {p['title']}"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert p.get("description"), f"{where}: no description"
            assert p["datasource"]["uid"] == DS_VAR, f"{where}: datasource {p['datasource']}"
            assert p["targets"], f"{where}: no queries"
            for t in p["targets"]:
                assert t["datasource"]["uid"] == DS_VAR, f"{where}: target datasource"
                assert t.get("expr"), f"{where}: empty query"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), f"{where}: duplicate refIds"
        for a in d["annotations"]["list"]:
            if a.get("expr"):
                assert a["datasource"]["uid"] == DS_VAR, f"{name}: annotation {a['name']}"


def test_layout_fits_the_grid(dashboards):
    for name, d in dashboards.items():
        occupied: set[tuple[int, int]] = set()
        for p in iter_panels(d):
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{name} / {p['title']}: outside the 24-column grid"
            cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & occupied, f"{name} / {p['title']}: overlaps another panel"
            occupied |= cells


def test_layout_has_no_holes(dashboards):
    """Every line of panels fills the 24 columns down to its tallest panel (a panel repeated
    per value of a variable fills its line with its copies)."""
    for name, d in dashboards.items():
        panels = [p for p in d["panels"] if p["type"] != "row"]
        lines: dict[int, list[dict[str, Any]]] = {}
        for p in panels:
            lines.setdefault(p["gridPos"]["y"], []).append(p)
        for y, line in lines.items():
            if any(p.get("repeat") for p in line):
                continue
            width = sum(p["gridPos"]["w"] for p in line)
            assert width == 24, f"{name}: the line at y={y} ({[p['title'] for p in line]}) fills {width} of 24 columns"
            heights = {p["gridPos"]["h"] for p in line}
            assert len(heights) == 1, f"{name}: the line at y={y} has panels of heights {sorted(heights)}"


def test_names_and_units_are_consistent(dashboards):
    """One name for one thing: cost (not spend), latency (not request duration), error ratio
    (not error rate); rates of requests and tokens per minute, money per hour."""
    for name, d in dashboards.items():
        for p in iter_panels(d):
            title = p["title"]
            for word, use in (("spend", "cost"), ("request duration", "latency"), ("error rate", "error ratio"),
                              ("requests per second", "per minute"), ("errors per second", "per minute"),
                              ("usd/day", "USD / hour")):
                assert word not in title.lower(), f"{name} / {title}: say {use!r}, not {word!r}"
            axis = p.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("axisLabel", "")
            assert not re.search(r"(requests|errors|records) / s\b", axis), f"{name} / {title}: {axis} per second"
            assert "USD / day" not in axis, f"{name} / {title}: {axis}"


def _target_exprs(d: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for p in data_panels(d):
        for t in p["targets"]:
            yield p, t


# how a board keeps the alerts of jobs that are no exporter's (backend probes, Prometheus):
# the exporter's jobs are those with llm_exporter_build_info
OTHER_JOBS = "unless on(job) group by (job) (llm_exporter_build_info"


def test_filters_apply_uniformly(dashboards):
    """A board filter selects every series that has its label, and every panel narrows by
    every filter of its board (a series without the label through the selected traffic)."""
    problems = []
    for name, d in dashboards.items():
        variables = variable_names(d) & set(FILTERS)
        if d["uid"] in PROBE_BOARDS:
            variables -= {"job"}
        for p, t in _target_exprs(d):
            expr, where = t["expr"], f"{name} / {p['title']} [{t['refId']}]"
            # $target holds the label matchers of one series of the selection ($scope, $app, ...)
            expr = expr.replace("${target:raw}", 'scope=~"$scope", app=~"$app|", provider=~"$provider|", '
                                                 'model=~"$model|"')
            metrics = [m for m in metrics_of(expr) if not is_threshold(m)]
            if not metrics:
                continue                            # a threshold line: one number for every series
            for metric, matchers in selectors_of(expr):
                if is_threshold(metric):
                    continue
                carried = set(FILTERS) if metric == "ALERTS" else labels_of_metric(metric)
                if metric == "ALERTS" and OTHER_JOBS in expr:
                    carried -= {"job"}              # alerts of the jobs that are no exporter's: $job names none
                for var in variables & carried:
                    if not re.search(rf'\b{var}=~"\${var}\|?"', matchers):
                        problems.append(f"{where}: {metric}{{{matchers}}} is not filtered by ${var}")
            if all(m.startswith(("llm_exporter_", "up")) for m in metrics):
                needed = {"job"} & variables        # the exporter's own health has no app or model
            else:
                needed = variables - UNFILTERED.get((d["uid"], p["title"]), (set(), ""))[0]
            for var in sorted(needed):
                if f"${var}" not in expr and f"${{{var}" not in expr:
                    problems.append(f"{where}: ignores ${var}")
    assert not problems, "\n".join(problems)


def test_unfiltered_list_is_short_and_current(dashboards):
    titles = {(d["uid"], p["title"]) for d in dashboards.values() for p in iter_panels(d)}
    assert set(UNFILTERED) <= titles and len(UNFILTERED) <= 3


def test_no_panel_evaluates_a_long_range_at_every_step(dashboards):
    """Range queries (charts) are evaluated at every step: none reads more than a day of
    samples per step or a range that grows with the dashboard's ($__range), and none
    recomputes over an hour or more what a recording rule already keeps."""
    served = window_rules()
    problems = []
    for name, d in dashboards.items():
        for p, t in _target_exprs(d):
            if not t.get("range", True):
                continue
            expr, where = t["expr"], f"{name} / {p['title']}"
            if "$__range" in expr:
                problems.append(f"{where}: a range query over $__range evaluates the whole dashboard range per step")
            for window in re.findall(r"\[([0-9a-z]+)(?::[0-9a-z]*)?\]", expr):
                if duration_seconds(window) > 86400:
                    problems.append(f"{where}: [{window}] at every step")
            for metric, window in re.findall(r"(?:rate|increase)\(\s*([\w:]+)(?:\{[^}]*\})?\[([0-9a-z]+)\]", expr):
                if duration_seconds(window) >= 3600 and (metric, window) in served:
                    problems.append(f"{where}: {metric}[{window}] is kept by the rule {served[(metric, window)]}")
    assert not problems, "\n".join(problems)


def test_raw_rates_follow_the_scrape_interval(dashboards):
    """A chart's own rate or quantile uses $__rate_interval; fixed windows come from the
    recording rules (the alerts' windows)."""
    fixed = re.compile(r"\b(?:rate|increase)\([^()]*\[(?!\$__rate_interval\]|\$__range\])([^\]]+)\]")
    for name, d in dashboards.items():
        for p, t in _target_exprs(d):
            found = fixed.findall(t["expr"])
            assert not found, f"{name} / {p['title']}: rate over a fixed {found} instead of a recording rule"


def test_timestamps_are_not_plotted_before_they_exist(dashboards):
    """`time() - <timestamp>` of a timestamp still 0 would plot 1.7e9 s: such queries keep
    only timestamps above 0."""
    for name, d in dashboards.items():
        for p, t in _target_exprs(d):
            for m in re.finditer(r"time\(\)\s*-\s*(\(?[^()]*_timestamp_seconds[^()]*\)?\)?)", t["expr"]):
                assert "> 0" in t["expr"][m.start():m.end() + 10], f"{name} / {p['title']}: {t['expr']}"


def test_every_colour_stands_for_an_alert_threshold(dashboards):
    """Each colour step equals the threshold of the alert it stands for (read here from the
    rule files; the live test reads the same numbers from Prometheus)."""
    spec = colour_thresholds()
    seen = set()
    for d in dashboards.values():
        for p in iter_panels(d):
            for field, values in colour_steps(p).items():
                key = (d["uid"], p["title"], field)
                assert key in spec, f"{key}: colour steps {values} stand for no alert threshold"
                expected = [static_value(s) for s in spec[key]]
                assert values == pytest.approx(expected), f"{key}: steps {values}, thresholds {expected}"
                seen.add(key)
    assert not set(spec) - seen, f"described but not found: {sorted(set(spec) - seen)}"


def test_threshold_lines_are_what_the_alerts_compare_with(dashboards):
    """A dashed line is a series an alert compares with, in a panel that shows what that
    alert compares (the anomaly ratio lines: the ratios thresholds.yml publishes for that
    signal, in its ratio panel)."""
    alerts = alert_rules()
    checked = 0
    for name, d in dashboards.items():
        for p in data_panels(d):
            if p["type"] != "timeseries":
                continue
            lines = threshold_lines(p)
            data = [t for t in p["targets"] if t not in lines]
            shown = {m for t in data for m in metrics_of(t["expr"])}
            for t in lines:
                where = f"{name} / {p['title']} / {t['legendFormat']}"
                drawn = metrics_of(t["expr"])
                assert drawn, where
                if drawn[0].startswith("llm:anomaly_threshold:"):
                    signal = re.search(r'signal="(\w+)"', t["expr"]).group(1)
                    assert any(f'llm_anomaly_ratio{{signal="{signal}"' in d_["expr"] for d_ in data), where
                    checked += 1
                    continue
                users = [a for a in alerts if drawn[0] in metrics_of(a.expr)]
                assert users, f"{where}: no alert compares with {drawn[0]}"
                assert any(shown & (set(metrics_of(a.expr)) - set(drawn)) for a in users), \
                    f"{where}: the panel shows nothing {', '.join(sorted({a.name for a in users}))} compares"
                checked += 1
    assert checked >= 20


def test_every_alert_opens_a_board_with_a_panel_of_what_it_judges(dashboards):
    """dashboard_url names a board that exists, sets only variables that board has, and the
    board has a panel reading the metric the alert judges (or a recording rule of it)."""
    by_uid = {d["uid"]: d for d in dashboards.values()}
    problems = []
    for alert in alert_rules():
        if alert.name == "Watchdog":
            continue
        where = f"{alert.file}: {alert.name} ({alert.severity})"
        board = by_uid.get(alert.board or "")
        if board is None:
            problems.append(f"{where}: dashboard_url opens no shipped board: {alert.dashboard_url}")
            continue
        missing = alert.variables - variable_names(board)
        if missing:
            problems.append(f"{where}: {alert.board} has no variable {sorted(missing)}")
        if not panels_of_metric(board, alert.primary or "", alert.expr):
            problems.append(f"{where}: {alert.board} has no panel reading {alert.primary}")
    assert not problems, "\n".join(problems)


def test_each_board_annotates_its_own_alerts(dashboards):
    """The firing-alerts annotation of a board shows the alerts whose dashboard_url opens it
    (the overview: all), narrowed by the board's filters."""
    all_alerts = {a.name for a in alert_rules()} - {"Watchdog"}
    for name, d in dashboards.items():
        anns = [a for a in d["annotations"]["list"] if a.get("expr")]
        assert len(anns) == 1, f"{name}: {len(anns)} alert annotations"
        expr = anns[0]["expr"]
        m = re.search(r'alertname=~"([^"]+)"', expr)
        assert m and 'alertstate="firing"' in expr, f"{name}: {expr}"
        shown = set(m.group(1).split("|"))
        own = {a.name for a in alert_rules() if a.board == d["uid"]}
        assert shown == (all_alerts if d["uid"] == "llm-overview" else own), name
        filters = {"backend", "provider", "model"} if d["uid"] in PROBE_BOARDS else {"job", "app", "provider", "model"}
        for var in variable_names(d) & filters:
            assert f'{var}=~"${var}|"' in expr, f"{name}: the annotation ignores ${var}"


def test_every_alert_links_its_runbook_on_its_board(dashboards):
    by_uid = {d["uid"]: d for d in dashboards.values()}
    for alert in alert_rules():
        if alert.board is None:
            continue
        links = [lk["url"] for p in iter_panels(by_uid[alert.board]) for lk in p.get("links", [])]
        anchor = f"#{alert.name.lower()}"
        assert any(u.endswith(anchor) for u in links), f"{alert.board}: no runbook link to {alert.name}"


def _links(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for p in iter_panels(d):
        for lk in p.get("links", []) or []:
            yield p["title"], lk["url"]
        fc = p.get("fieldConfig", {})
        for lk in fc.get("defaults", {}).get("links", []) or []:
            yield p["title"], lk["url"]
        for o in fc.get("overrides", []):
            for pr in o["properties"]:
                if pr["id"] == "links":
                    for lk in pr["value"]:
                        yield p["title"], lk["url"]


def test_links_open_existing_boards_with_their_variables(dashboards):
    """Every link into a board names one that exists and variables it has, and carries the
    time range, datasource and job along."""
    by_uid = {d["uid"]: d for d in dashboards.values()}
    checked = 0
    for name, d in dashboards.items():
        for title, url in _links(d):
            m = re.match(r"^/d/([\w-]+|\$\{__value\.text\})\?", url)
            if not m:
                assert url.startswith("https://"), f"{name} / {title}: {url}"
                continue
            uids = [m.group(1)] if m.group(1) in by_uid else sorted(by_uid)
            assert m.group(1) in by_uid or m.group(1) == "${__value.text}", f"{name} / {title}: {url}"
            for uid in uids:
                names = variable_names(by_uid[uid])
                for var in url_variables(url.replace("${", "{")):
                    assert var in names or m.group(1) not in by_uid, f"{name} / {title}: {uid} has no ${var}"
            assert "${__url_time_range}" in url and "${datasource:queryparam}" in url and "${job:queryparam}" in url, \
                f"{name} / {title}: {url}"
            checked += 1
    assert checked >= 30


def test_board_to_board_links_lead_where_the_issue_asks(dashboards):
    """Models lead to performance, apps to budget, status rows to their own series."""
    by_uid = {d["uid"]: d for d in dashboards.values()}
    urls = [u for d in dashboards.values() for _, u in _links(d)]
    assert any(u.startswith("/d/llm-performance?") and "var-model=${__field.labels.model}" in u for u in urls)
    assert any(u.startswith("/d/llm-budget?") and "var-app=${__field.labels.app}" in u for u in urls)
    status = [p for p in iter_panels(by_uid["llm-anomalies"]) if p["type"] == "table"]
    assert len(status) == 8
    for p in status:
        row = [lk["url"] for lk in p["fieldConfig"]["defaults"].get("links", [])]
        assert any("var-scope=${__data.fields.scope}" in u and "var-app=${__data.fields.link_app}" in u for u in row), \
            p["title"]


def exporter_metric_names() -> set[str]:
    """Metric names the exporter's sources define (string literals), else the contract's."""
    names: set[str] = set()
    for f in (REPO / "exporter").rglob("*.py"):
        names.update(re.findall(r"[\"'](llm_[a-z0-9_]+)[\"']", f.read_text()))
    return names or CONTRACT_METRICS


def test_metric_names_are_known():
    """Every metric a panel reads is defined by the exporter or by a shipped recording rule."""
    known = exporter_metric_names()
    recorded = set(recording_rules())
    rule_names: list[tuple[str, DashboardQuery]] = []
    for q in iter_dashboard_queries():
        for name in metrics_of(q.expr):
            if name in PROMETHEUS_BUILTIN or name in BLACKBOX:
                continue
            if ":" in name:
                rule_names.append((name, q))
                continue
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert base in known or name in known, f"{q.dashboard} / {q.panel}: the exporter defines no {name}"
    for name, q in rule_names:
        assert name in recorded, f"{q.dashboard} / {q.panel}: recording rule {name} is not defined"


def test_anomaly_rows_follow_the_signal_specs(dashboards):
    """One row per signal spec, titled by its SignalText, with the ratio against the
    thresholds, a status table and the band chart repeated for every series; every
    anomaly gauge the alerts and the runbook refer to is drawn."""
    from exporter.anomaly.signals import DEFAULT_SIGNALS

    d = dashboards["llm-anomalies.json"]
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Status", *[s.text.title for s in DEFAULT_SIGNALS if s.text]]
    panels = {p["title"]: p for p in iter_panels(d)}
    for s in DEFAULT_SIGNALS:
        assert s.text is not None
        ratio = panels[f"{s.text.title}: ratio to baseline"]
        assert f'llm_anomaly_ratio{{signal="{s.name}"' in ratio["targets"][0]["expr"]
        band = panels[f"{s.text.title}: ${{target:text}}"]
        assert band["repeat"] == "target" and band["fieldConfig"]["defaults"]["unit"] == s.text.grafana_unit
        exprs = " ".join(t["expr"] for t in band["targets"])
        for metric in ("llm_anomaly_current", "llm_anomaly_baseline", "llm_anomaly_band_lower", "llm_anomaly_band_upper"):
            assert f'{metric}{{signal="{s.name}"' in exprs, (s.name, metric)
        fill = [o for o in band["fieldConfig"]["overrides"]
                if any(pr["id"] == "custom.fillBelowTo" for pr in o["properties"])]
        assert fill and fill[0]["matcher"]["options"] == "band upper", "the band is shaded for every series"
        status = panels[f"{s.text.title}: status"]
        exprs = " ".join(t["expr"] for t in status["targets"])
        for metric in ("llm_anomaly_severity", "llm_anomaly_explained", "llm_anomaly_ratio", "llm_anomaly_current",
                       "llm_anomaly_baseline"):
            assert metric in exprs and f'signal="{s.name}"' in exprs, (s.name, metric)
        runbooks = {lk["title"] for lk in ratio.get("links", [])}
        assert runbooks == {f"Runbook: {name}" for name, _ in s.text.alerts.values()}
    for t in (p for p in iter_panels(d) if p["type"] == "table"):
        sev = [o for o in t["fieldConfig"]["overrides"] if o["matcher"]["options"] == "severity"]
        mapping = next(pr["value"] for pr in sev[0]["properties"] if pr["id"] == "mappings")[0]["options"]
        assert {k: v["text"] for k, v in mapping.items()} == {"0": "ok", "1": "warning", "2": "high"}


@pytest.mark.skipif(promtool() is None, reason="promtool not installed")
def test_every_query_parses(tmp_path: Path):
    queries = list(iter_dashboard_queries())
    assert len(queries) > 50
    rules = [{"record": f"dashboard_query_{i}", "expr": q.expr} for i, q in enumerate(queries)]
    f = tmp_path / "dashboard_queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False, width=10_000))
    r = subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        bad = [f"{q.dashboard} / {q.panel}: {q.expr}" for i, q in enumerate(queries)
               if f"\"dashboard_query_{i}\"" in r.stderr]
        pytest.fail(f"promtool rejected dashboard queries:\n{r.stderr}\n" + "\n".join(bad))


def test_provisioning():
    ds_files = list((PROVISIONING_DIR / "datasources").glob("*.yaml"))
    assert ds_files
    datasources = [d for f in ds_files for d in yaml.safe_load(f.read_text())["datasources"]]
    by_uid = {d["uid"]: d for d in datasources}
    assert by_uid["prometheus"]["type"] == "prometheus" and by_uid["prometheus"]["url"] == "http://prometheus:9090"
    am = by_uid["alertmanager"]
    assert am["type"] == "alertmanager" and am["jsonData"]["implementation"] == "prometheus"
    assert am["url"] == "http://alertmanager:9093"
    assert sum(1 for d in datasources if d.get("isDefault")) == 1

    providers = [p for f in (PROVISIONING_DIR / "dashboards").glob("*.yaml")
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers and all(p["type"] == "file" and p["options"]["path"] for p in providers)

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"] if ":" in v}
    for p in providers:
        host = mounts.get(p["options"]["path"])
        assert host, f"dashboards provider path {p['options']['path']} is not mounted in docker-compose.yml"
        assert (REPO / host).resolve() == DASHBOARD_DIR.resolve()
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.endswith("/llm-overview.json") and home.startswith(providers[0]["options"]["path"])


def test_dashboards_are_plain_json():
    for f in DASHBOARD_DIR.glob("*.json"):
        text = f.read_text()
        assert json.loads(text)
        assert "${DS_" not in text, f"{f.name}: uses an import-time datasource input instead of $datasource"


def test_every_query_counts_the_replicas_of_an_exporter_once() -> None:
    """An HA pair's replicas publish the same series (docs/scaling.md): every rate of an
    exporter counter and every exporter gauge is read through `max without (replica)`."""
    bare = []
    for q in iter_dashboard_queries():
        for m in re.finditer(r"(?<![\w:])(?:rate|increase)\(llm_|(?<![\w:(])llm_(?:anomaly|drift|runaway|budget|cost_usd_period|"
                             r"cost_usd_forecast)[a-z_]*", q.expr):
            before = q.expr[:m.start()]
            if not re.search(r"(max without \((?:instance, )?replica\) \()$", before):
                bare.append(f"{q.dashboard} / {q.panel}: {q.expr}")
    assert not bare, "\n".join(bare[:10])
