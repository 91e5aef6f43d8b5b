"""Static checks of the Grafana provisioning and dashboards (no Grafana needed).

Every dashboard loads and carries the shared conventions; every PromQL expression parses
(promtool checks them as recording rules); every metric a dashboard reads is one the
exporter publishes or a recording rule the shipped rules define.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import (DASHBOARD_DIR, PROVISIONING_DIR, REPO, DashboardQuery,  # noqa: E402
                        iter_dashboard_queries, iter_panels, load_dashboards, promtool)

EXPECTED_UIDS = {"llm-overview", "llm-anomalies", "llm-performance", "llm-budget", "llm-quality", "llm-backends"}
DATASOURCE_UIDS = {"prometheus", "alertmanager"}
NO_DATA_TYPES = {"row", "text", "news", "dashlist"}

# The metric contract's names (histograms by base name, counters without _total); used when
# the exporter's sources are not there to ask.
CONTRACT_METRICS = {
    "llm_requests", "llm_request_errors", "llm_tokens", "llm_cost_usd", "llm_unpriced_requests",
    "llm_request_duration_seconds", "llm_time_to_first_token_seconds", "llm_output_tokens_per_second",
    "llm_anomaly_current", "llm_anomaly_baseline", "llm_anomaly_ratio", "llm_anomaly_zscore",
    "llm_anomaly_severity", "llm_anomaly_baseline_span_seconds", "llm_anomaly_band_lower", "llm_anomaly_band_upper",
    "llm_drift_value", "llm_drift_severity", "llm_runaway_sessions", "llm_runaway_invocation_zscore",
    "llm_budget_usd", "llm_cost_usd_period_to_date", "llm_cost_usd_forecast", "llm_cost_usd_forecast_lower",
    "llm_cost_usd_forecast_upper",
    "llm_exporter_build_info", "llm_exporter_records", "llm_exporter_label_overflow",
    "llm_exporter_evaluation_duration_seconds", "llm_exporter_last_record_timestamp_seconds",
    "llm_exporter_store_errors", "llm_exporter_evaluation_errors", "llm_exporter_last_evaluation_timestamp_seconds",
    "llm_exporter_sessions_overflow", "llm_exporter_ingest_queue_bytes", "llm_exporter_ingest_throttled",
}


def exporter_metric_names() -> set[str]:
    """Metric names the exporter's sources define (string literals), else the contract's."""
    names: set[str] = set()
    for f in (REPO / "exporter").rglob("*.py"):
        names.update(re.findall(r"[\"'](llm_[a-z0-9_]+)[\"']", f.read_text()))
    return names or CONTRACT_METRICS


PROMETHEUS_BUILTIN = {"ALERTS", "ALERTS_FOR_STATE", "up"}
# What the blackbox exporter publishes for each probe (the backend health board).
BLACKBOX = {"probe_success", "probe_duration_seconds", "probe_http_status_code", "probe_ssl_earliest_cert_expiry"}
_METRIC = re.compile(r"(?<![\w:\"'])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[)")


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    found = load_dashboards()
    assert found, f"no dashboards in {DASHBOARD_DIR}"
    return found


def test_uids_and_files(dashboards):
    uids = {d["uid"] for d in dashboards.values()}
    assert uids == EXPECTED_UIDS
    for name, d in dashboards.items():
        assert name == f"{d['uid']}.json"
        assert d["title"] and d["schemaVersion"] >= 36
        assert d.get("id") is None, "provisioned dashboards must not pin a database id"


def test_generated_json_is_current():
    """The committed JSON is what build_dashboards.py writes."""
    r = subprocess.run([sys.executable, str(REPO / "grafana" / "build_dashboards.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_variables(dashboards):
    for name, d in dashboards.items():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        for var in ("app", "provider", "model"):
            assert var in variables, f"{name}: no ${var} variable"
            v = variables[var]
            assert v["type"] == "query" and v["datasource"]["uid"] == "prometheus"
            assert v["multi"] and v["includeAll"], f"{name}: ${var} must be multi-value with All"
            assert v["allValue"] == ".*", f"{name}: ${var} All must be .* (series without the label still match)"
            assert "label_values(" in v["definition"]


def test_firing_alerts_annotation(dashboards):
    for name, d in dashboards.items():
        anns = [a for a in d["annotations"]["list"] if a.get("expr")]
        assert any('ALERTS{alertstate="firing"' in a["expr"] and a["datasource"]["uid"] == "prometheus"
                   for a in anns), f"{name}: no firing-alerts annotation"


def test_panels_have_units_and_datasources(dashboards):
    for name, d in dashboards.items():
        panels = [p for p in iter_panels(d) if p["type"] not in NO_DATA_TYPES]
        assert panels, f"{name}: no panels"
        ids = [p["id"] for p in iter_panels(d)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels:
            where = f"{name} / {p['title']}"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert p["datasource"]["uid"] in DATASOURCE_UIDS, f"{where}: datasource {p['datasource']}"
            assert p["targets"], f"{where}: no queries"
            for t in p["targets"]:
                assert t["datasource"]["uid"] in DATASOURCE_UIDS, f"{where}: target datasource"
                assert t.get("expr"), f"{where}: empty query"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), f"{where}: duplicate refIds"


def test_layout_fits_the_grid(dashboards):
    for name, d in dashboards.items():
        occupied: set[tuple[int, int]] = set()
        for p in iter_panels(d):
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{name} / {p['title']}: outside the 24-column grid"
            cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & occupied, f"{name} / {p['title']}: overlaps another panel"
            occupied |= cells


def test_rate_queries_use_rate_interval(dashboards):
    fixed = re.compile(r"\b(?:rate|increase)\([^()]*\[(?!\$__rate_interval\]|\$__range\])([^\]]+)\]")
    for name, d in dashboards.items():
        for p in iter_panels(d):
            for t in p.get("targets", []):
                for window in fixed.findall(t.get("expr", "")):
                    # Fixed windows are deliberate only where the window is the point (burn-rate windows).
                    assert p["title"] in {"Spend rate by window", "Budget burn rate", "Budget burn rate by app (1h)",
                                          "Month to date, budget and projection"}, \
                        f"{name} / {p['title']}: rate over a fixed [{window}] instead of $__rate_interval"


def test_anomaly_rows_cover_every_signal(dashboards):
    d = dashboards["llm-anomalies.json"]
    rows = {p["title"] for p in iter_panels(d) if p["type"] == "row"}
    exprs = " ".join(t["expr"] for p in iter_panels(d) for t in p.get("targets", []))
    signals = ["cost_per_hour", "token_velocity", "request_rate", "error_rate", "latency_p95", "ttft_p95",
               "output_tokens_per_second"]
    try:
        from exporter.anomaly.signals import SIGNAL_NAMES
        signals = list(SIGNAL_NAMES)
    except ImportError:
        pass
    for s in signals:
        for metric in ("llm_anomaly_current", "llm_anomaly_baseline", "llm_anomaly_band_lower",
                       "llm_anomaly_band_upper", "llm_anomaly_ratio", "llm_anomaly_severity"):
            assert f'{metric}{{signal="{s}"' in exprs, f"no {metric} panel for {s}"
    assert len(rows) >= len(signals) + 1
    # severity tables map 0/1/2 to ok/warning/high
    tables = [p for p in iter_panels(d) if p["type"] == "table"]
    for t in tables:
        sev = [o for o in t["fieldConfig"]["overrides"] if o["matcher"]["options"] == "severity"]
        assert sev, f"{t['title']}: no severity column"
        mapping = next(pr["value"] for pr in sev[0]["properties"] if pr["id"] == "mappings")[0]["options"]
        assert {k: v["text"] for k, v in mapping.items()} == {"0": "ok", "1": "warning", "2": "high"}
        assert {k: v["color"] for k, v in mapping.items()} == {"0": "green", "1": "orange", "2": "red"}


def _defined_recording_rules() -> set[str]:
    names: set[str] = set()
    for f in sorted((REPO / "prometheus" / "rules").glob("*.y*ml")):
        for g in (yaml.safe_load(f.read_text()) or {}).get("groups", []) or []:
            for r in g.get("rules", []) or []:
                if r.get("record"):
                    names.add(r["record"])
    return names


def test_metric_names_are_known():
    """Every metric a panel reads is defined by the exporter or by a shipped recording rule."""
    known = exporter_metric_names()
    recorded = _defined_recording_rules()
    rule_names: list[tuple[str, DashboardQuery]] = []
    for q in iter_dashboard_queries():
        for name in _METRIC.findall(q.expr):
            if name in PROMETHEUS_BUILTIN or name in BLACKBOX:
                continue
            if ":" in name:
                rule_names.append((name, q))
                continue
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert base in known or name in known, f"{q.dashboard} / {q.panel}: the exporter defines no {name}"
    if not recorded:
        pytest.skip("prometheus/rules/ defines no recording rules yet")
    for name, q in rule_names:
        assert name in recorded, f"{q.dashboard} / {q.panel}: recording rule {name} is not defined"


@pytest.mark.skipif(promtool() is None, reason="promtool not installed")
def test_every_query_parses(tmp_path: Path):
    queries = list(iter_dashboard_queries())
    assert len(queries) > 50
    rules = [{"record": f"dashboard_query_{i}", "expr": q.expr} for i, q in enumerate(queries)]
    f = tmp_path / "dashboard_queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False, width=10_000))
    r = subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        # name the panels whose expression failed
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
        assert "${DS_" not in text, f"{f.name}: uses an import-time datasource input instead of the fixed uid"
