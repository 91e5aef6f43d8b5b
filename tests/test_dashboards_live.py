"""Every panel query of every shipped dashboard against a real Prometheus with real data.

The native stack (scripts/stack.py, fast timing) runs the exporter with a budget
configuration like deploy/exporter.yaml, fed with a week of demo history
(`exporter.demo.backfill`) and then live demo traffic for long enough that Prometheus,
scraping every second, has several samples inside every short rate window. The live
traffic carries what some panels need to show anything at all, by construction:

- a cost spike (the demo's own anomaly), streamed requests with time to first token;
- a failed request in every batch (errors by app and type, error ratios);
- a request of a model without a price (unpriced requests);
- a request from a provider beyond `--label-limit-provider` (label overflow);
- one agent session calling the same tool over and over with `runaway.chain_max_calls`
  low (runaway panels, and LLMRunawaySessions firing for the firing-alerts table and
  the dashboards' alert annotations);
- the blackbox exporter probing three backends (the backend health board): a model server
  that answers, one over HTTPS with a certificate that expires in 30 days (the prober
  trusts it through SSL_CERT_FILE), and a port that refuses connections (a failure with
  its reason);
- a model with its own latency threshold (o3) that fails half its requests
  (LLMErrorRatioHigh, a per-model threshold line) and reads most of its prompt from the
  cache (cache-hit panels);
- an app whose daily budget a few live requests spend (LLMDailyBudgetExceeded fires on any
  day of the month, for the budget board's alert annotation).

Then every query (`iter_dashboard_queries` with a 30 s `$__rate_interval`) runs as an
instant query and as a one-minute range query; each must be accepted by Prometheus and
return data: at least one finite value (NaN draws nothing). Prometheus holds about a
minute of samples here, so a comparison with an earlier period (`offset`) looks 15 s back.
A panel that can only be empty for a good reason goes in EMPTY_ALLOWED with that reason;
the list must stay short and every entry must still exist.

On the same data: every table panel is built the way Grafana builds it
(tests/grafana_frames.py) and must show one row per series with the columns its
overrides and links name; every colour step and threshold line must equal the number
Prometheus holds for the alert threshold it stands for; and every firing alert's
dashboard_url must open a board whose panel for the alert's metric shows that alert's
series, with the link's variables.
"""

from __future__ import annotations

import json
import math
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from board_facts import (alert_constant, alert_rules, colour_steps, colour_thresholds, metrics_of,  # noqa: E402
                         panels_of_metric, threshold_lines, threshold_values, url_variables)
from grafana_frames import table_view  # noqa: E402
from model_server import ModelServer, self_signed_cert  # noqa: E402
from stack_util import (blackbox_marks, exporter_json, iter_dashboard_queries, iter_panels,  # noqa: E402
                        load_dashboards, load_stack, prom_api, rule_errors, substitute, variable_values)

from exporter.sources import demo  # noqa: E402

stack_mod = load_stack()
Stack = stack_mod.Stack

pytestmark = blackbox_marks()

RATE_INTERVAL = "30s"
HISTORY_DAYS = 7       # the seasonal request-rate baseline needs six earlier days
LIVE_MIN_S = 35.0          # live traffic before the queries: one rate window plus slack
LOOP_SESSION = "agent-loop-" + uuid.uuid4().hex[:8]

EXPORTER_CONFIG = {
    "budgets": {"timezone": "UTC", "day_usd": 30, "month_usd": 800,
                "apps": {"support-bot": {"day": 15, "month": 400}, "code-assistant": {"day": 0.05, "month": 300}}},
    "runaway": {"chain_max_calls": 15},
}

# (dashboard uid, panel title) -> why it may be empty with this data. Keep it short.
EMPTY_ALLOWED: dict[tuple[str, str], str] = {
    ("llm-quality", "Invocation spike z-score by app"):
        "the z is NaN by design while an app has fewer than spike_min_count (30) calls in its last five minutes "
        "of event time; whether a demo app reaches that depends on how many traffic ticks a loaded machine got in",
}
MAX_EMPTY_ALLOWED = 3


class LiveTraffic(threading.Thread):
    """Demo traffic compressed in time: every tick posts a minute of demo records (event
    times within the last minute), plus an error, an unpriced request, an overflowing
    provider and one more call of the looping session."""

    def __init__(self, stack: Any, tick_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="live-demo-traffic")
        self.stack, self.tick_s = stack, tick_s
        self.rng = np.random.default_rng(23)
        now = time.time()
        self.anomaly = demo.Anomaly("cost_spike", now - 120, now + 3600)
        self.halt = threading.Event()
        self.errors: list[str] = []
        self.posted = 0
        self.ticks = 0

    def batch(self, now: float) -> list[dict[str, Any]]:
        records = demo.minute(now - 60, self.rng, anomaly=self.anomaly)
        k = self.ticks
        extra = [
            {"ts": now, "provider": "openai", "model": "gpt-4o-mini", "app": "support-bot", "input_tokens": 800,
             "output_tokens": 0, "latency_s": 30.0, "status": "error",
             "error_type": ("rate_limit", "timeout", "server_error")[k % 3], "request_id": uuid.uuid4().hex},
            {"ts": now, "provider": "openai", "model": "in-house-finetune", "app": "nightly-summaries",
             "input_tokens": 1500, "output_tokens": 300, "latency_s": 3.0, "ttft_s": 0.5, "stream": True,
             "request_id": uuid.uuid4().hex},
            {"ts": now, "provider": "acme-ai", "model": "acme-large", "app": "support-bot", "input_tokens": 400,
             "output_tokens": 100, "cost_usd": 0.002, "latency_s": 1.5, "request_id": uuid.uuid4().hex},
            {"ts": now, "provider": "openai", "model": "gpt-4o", "app": "code-assistant",
             "input_tokens": 12000 + 400 * k, "output_tokens": 150, "latency_s": 2.5, "stop_reason": "tool_calls",
             "request_had_tools": True, "tool_calls": ["run_tests"], "session_id": LOOP_SESSION,
             "request_id": uuid.uuid4().hex},
            {"ts": now, "provider": "openai", "model": "o3", "app": "code-assistant", "input_tokens": 1500,
             "cache_read_tokens": 6000, "output_tokens": 400, "latency_s": 20.0, "ttft_s": 4.0, "stream": True,
             "request_id": uuid.uuid4().hex},
            {"ts": now, "provider": "openai", "model": "o3", "app": "code-assistant", "input_tokens": 1500,
             "output_tokens": 0, "latency_s": 40.0, "status": "error", "error_type": "server_error",
             "request_id": uuid.uuid4().hex},
        ]
        return records + extra

    def run(self) -> None:
        while not self.halt.is_set():
            started = time.time()
            try:
                recs = self.batch(started)
                self.posted += self.stack.post_records(recs)["accepted"]
            except Exception as e:  # noqa: BLE001 - recorded, asserted by the test
                if not self.halt.is_set():
                    self.errors.append(repr(e))
            self.ticks += 1
            self.halt.wait(max(0.0, self.tick_s - (time.time() - started)))

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cfg = tmp_path_factory.mktemp("dashboards-live") / "exporter.yaml"
    cfg.write_text(yaml.safe_dump(EXPORTER_CONFIG))
    # demo traffic uses two providers; the third distinct one overflows into "other"
    args = ["--config", str(cfg), "--label-limit-provider", "2"]
    cert = self_signed_cert(tmp_path_factory.mktemp("tls"), days=30)
    with ModelServer() as plain, ModelServer(tls=cert) as secure, socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))           # bound, not listening: connections are refused
        backends = [
            {"targets": [plain.url + "/health"],
             "labels": {"backend": "vllm-demo", "kind": "vllm", "provider": "openai", "model": "gpt-4o-mini"}},
            {"targets": [secure.url + "/health"], "labels": {"backend": "tgi-demo", "kind": "tgi"}},
            {"targets": [f"127.0.0.1:{refusing.getsockname()[1]}"],
             "labels": {"backend": "retired-box", "module": "tcp_connect"}},
        ]
        with Stack(fast=True, time_scale=60, ready_timeout=60, exporter_args=args, blackbox=True, backends=backends,
                   env={"SSL_CERT_FILE": str(cert.cert)}) as s:
            yield from _loaded(s)


def _loaded(s: Any) -> Iterator[Any]:
    """A week of demo history, then live traffic until the panels have data; yields the stack."""
    now = time.time()
    batch: list[dict[str, Any]] = []
    for hour in demo.backfill(now - HISTORY_DAYS * 86400, now - 60):
        batch.extend(hour)
        if len(batch) >= 5000:
            assert s.post_records(batch)["rejected"] == 0
            batch = []
    if batch:
        assert s.post_records(batch)["rejected"] == 0
    live = LiveTraffic(s)
    live.start()
    try:
        started = time.time()
        # something besides the Watchdog fires on every board (firing-alerts tables and annotations)
        for alert in ("LLMRunawaySessions", "LLMErrorRatioHigh", "LLMDailyBudgetExceeded"):
            s.wait_for(lambda a=alert: s.prom_query(f'ALERTS{{alertstate="firing", alertname="{a}"}}'),
                       timeout=90, message=f"{alert} firing")
        # every rate window holds a full window of live samples
        time.sleep(max(0.0, LIVE_MIN_S - (time.time() - started)))
        yield s
    finally:
        live.stop()
    assert not live.errors, live.errors[:3]


def _has_data(doc: dict[str, Any]) -> bool:
    """At least one finite number: NaN (histogram_quantile of nothing, 0/0) draws nothing."""
    data = doc.get("data") or {}
    result = data.get("result")
    kind = data.get("resultType")
    if kind == "scalar":
        values = [result[1]] if result else []
    elif kind == "vector":
        values = [r["value"][1] for r in result or []]
    elif kind == "matrix":
        values = [v[1] for r in result or [] for v in r.get("values") or []]
    else:
        return False
    return any(math.isfinite(float(v)) for v in values)


def recent(expr: str) -> str:
    """`expr` with its comparisons against an earlier period looking 15 s back: this
    Prometheus holds about a minute of samples."""
    return re.sub(r"\boffset\s+[0-9a-z]+", "offset 15s", expr)


def test_every_dashboard_query_returns_data_live(loaded: Any) -> None:
    s = loaded
    queries = [q._replace(expr=recent(q.expr)) for q in iter_dashboard_queries(rate_interval=RATE_INTERVAL,
                                                                                interval="15s")]
    assert len(queries) > 100
    assert len({q.dashboard for q in queries}) == 6
    end = time.time()
    failed, empty_instant, empty_range = [], set(), set()
    for q in queries:
        inst = prom_api(s, "query", {"query": q.expr, "time": f"{end:.3f}"})
        if inst.get("status") != "success":
            failed.append(f"{q.dashboard} / {q.panel}: {inst.get('errorType')}: {inst.get('error')}\n    {q.expr}")
            continue
        rng = prom_api(s, "query_range", {"query": q.expr, "start": f"{end - 60:.3f}", "end": f"{end:.3f}",
                                          "step": "5"})
        if rng.get("status") != "success":
            failed.append(f"{q.dashboard} / {q.panel} (range): {rng.get('errorType')}: {rng.get('error')}\n"
                          f"    {q.expr}")
            continue
        if not _has_data(inst):
            empty_instant.add((q.dashboard, q.panel, q.expr))
        if not _has_data(rng):
            empty_range.add((q.dashboard, q.panel, q.expr))
    assert not failed, "queries Prometheus refused:\n" + "\n".join(failed)
    unexpected = sorted(e for e in empty_instant | empty_range if (e[0], e[1]) not in EMPTY_ALLOWED)
    assert not unexpected, "queries without data:\n" + "\n".join(f"{d} / {p}:\n    {x}" for d, p, x in unexpected)


def query_result_options(s: Any, var: dict[str, Any], variables: dict[str, str]) -> list[tuple[str, str]]:
    """(value, text) of a `query_result(expr)` variable as Grafana makes them: each series
    of the instant answer written `{label="value",...} <value> <time in ms>`, then the
    variable's regex with its `value` and `text` groups."""
    text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", text, re.S)
    assert m, text
    doc = prom_api(s, "query", {"query": substitute(m.group(1), variables)})
    assert doc.get("status") == "success", doc
    regex = re.fullmatch(r"/(.*)/", var["regex"]).group(1).replace("(?<", "(?P<")
    out = []
    for r in doc["data"]["result"]:
        metric = {k: v for k, v in r["metric"].items() if k != "__name__"}
        line = "{" + ",".join(f'{k}="{v}"' for k, v in metric.items()) + "}" + f" {r['value'][1]} {int(r['value'][0] * 1000)}"
        found = re.search(regex, line)
        if found:
            out.append((found.group("value"), found.group("text")))
    return out


def test_every_template_variable_has_values_live(loaded: Any) -> None:
    """`label_values(selector, label)` of each dashboard variable, asked of Prometheus the way
    Grafana does (the series API with the other variables at All); a `query_result`
    variable's options select data."""
    s = loaded
    checked = 0
    for name, dash in load_dashboards().items():
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            if text.startswith("query_result("):
                options = query_result_options(s, var, variable_values(dash))
                assert options, f"{name}: variable {var['name']} has no options"
                for value, label in options:
                    assert label and s.prom_query(f"llm_anomaly_current{{{value}}}"), (name, value, label)
                checked += 1
                continue
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", text or "")
            assert m, f"{name}: variable {var['name']}: not a label_values() query: {text!r}"
            selector = re.sub(r"\$\{?\w+\}?", ".*", m.group(1))
            doc = prom_api(s, f"label/{m.group(2)}/values", {"match[]": selector})
            assert doc.get("status") == "success", (name, var["name"], doc)
            assert doc["data"], f"{name}: variable {var['name']} ({text}) has no values"
            checked += 1
    assert checked >= 15


def test_empty_allow_list_stays_small_and_current() -> None:
    assert len(EMPTY_ALLOWED) <= MAX_EMPTY_ALLOWED
    panels = {(q.dashboard, q.panel) for q in iter_dashboard_queries()}
    assert set(EMPTY_ALLOWED) <= panels, sorted(set(EMPTY_ALLOWED) - panels)
    assert all(reason.strip() for reason in EMPTY_ALLOWED.values())


def test_the_live_data_behind_the_panels(loaded: Any) -> None:
    """What the construction promises is really there (so a green run means something)."""
    s = loaded
    runaways = exporter_json(s, "/api/runaways")["runaway"]
    assert LOOP_SESSION in {o["session_id"] for o in runaways["offenders"]}
    budgets = exporter_json(s, "/api/budgets")["budget"]
    assert budgets["rows"][0]["app"] is None and budgets["rows"][0]["budget_usd"]["month"] == 800
    assert s.prom_query('llm_cost_usd_forecast{horizon="month_end", app=""} > 0')
    assert s.prom_query('sum(rate(llm_request_errors_total[30s])) > 0')
    assert s.prom_query('sum(rate(llm_unpriced_requests_total[30s])) > 0')
    assert s.prom_query('sum(rate(llm_exporter_label_overflow_total{label="provider"}[30s])) > 0')
    assert s.prom_query('min(llm_anomaly_baseline_span_seconds{scope="global"}) >= 24 * 3600')
    assert s.prom_query('count(llm_drift_value) > 0')
    assert s.prom_query('sum(rate(llm_time_to_first_token_seconds_count[30s])) > 0')
    # the backends: one up, one over TLS with its certificate, one refusing with a reason
    assert s.prom_query('probe_success{backend="vllm-demo"} == 1')
    assert s.prom_query('(probe_ssl_earliest_cert_expiry{backend="tgi-demo"} - time()) / 86400 > 29')
    assert s.prom_query('instance:probe_failure_timestamp_seconds:by_reason{backend="retired-box", '
                        'reason="connect failed"}')
    # and the recording rules the panels read evaluated cleanly on it
    assert not rule_errors(s)


# --- what the panels show, built as Grafana builds it -------------------------------------------

def panel_query(dash: dict[str, Any], expr: str, overrides: dict[str, str] | None = None) -> str:
    """A panel's PromQL as Grafana sends it with the dashboard's variables (or `overrides`)."""
    return recent(substitute(expr, variable_values(dash, overrides), rate_interval=RATE_INTERVAL, interval="15s"))


def instant(s: Any, expr: str, at: float) -> list[tuple[dict[str, str], str]]:
    doc = prom_api(s, "query", {"query": expr, "time": f"{at:.3f}"})
    assert doc.get("status") == "success", (expr, doc)
    data = doc["data"]
    if data["resultType"] == "scalar":
        return [({}, data["result"][1])]
    return [(r["metric"], r["value"][1]) for r in data["result"]]


def _field_refs(panel: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Field names a table's overrides match by name, and those its data links read."""
    fc = panel["fieldConfig"]
    named = {o["matcher"]["options"] for o in fc["overrides"] if o["matcher"]["id"] == "byName"}
    text = json.dumps([fc["defaults"].get("links", []), fc["overrides"]])
    return named, set(re.findall(r"\$\{__data\.fields\.(\w+)\}", text))


def test_table_panels_show_one_row_per_series_live(loaded: Any) -> None:
    """Every table panel, from the answers of a real Prometheus through Grafana's frames and
    the panel's transformations: one row per series of its first query (no row split across
    queries, no two rows a reader cannot tell apart), each with its first value, every value
    column named, and the fields its overrides and data links name present."""
    s = loaded
    at = time.time()
    checked = []
    for dash in load_dashboards().values():
        for panel in iter_panels(dash):
            if panel["type"] != "table":
                continue
            where = f"{dash['uid']} / {panel['title']}"
            answers = [(t["refId"], instant(s, panel_query(dash, t["expr"]), at)) for t in panel["targets"]]
            view = table_view(panel, answers, int(at * 1000))
            rows = view.rows()
            assert rows, f"{where}: no rows"
            series = {tuple(sorted((k, v) for k, v in m.items() if k != "__name__")) for m, _ in answers[0][1]}
            assert len(rows) == len(series), f"{where}: {len(rows)} rows for {len(series)} series\n{rows[:4]}"
            seen = [view.labels_of(r) for r in rows]
            assert len(set(seen)) == len(seen), f"{where}: rows a reader cannot tell apart: {seen}"
            visible = view.columns
            assert not [c for c in visible if c == "Value" or c.startswith("Value #")], f"{where}: {visible}"
            named, linked = _field_refs(panel)
            names = set(view.frame.names())
            assert named <= names, f"{where}: overrides name missing fields {sorted(named - names)}"
            assert linked <= names, f"{where}: links read missing fields {sorted(linked - names)}"
            if len(panel["targets"]) > 1:
                first = panel["transformations"][-1]["options"]["renameByName"]["Value #A"]
                assert all(r[first] is not None for r in rows), f"{where}: rows without {first!r}: a split"
            checked.append(where)
    assert len(checked) >= 13, checked


def _rule_value(record: str, labels: dict[str, str]) -> float | None:
    """The number thresholds.yml gives the threshold series `record` with `labels`."""
    values = threshold_values()
    own = {k: v for k, v in labels.items() if k not in ("__name__", "job", "instance")}
    if record.startswith("provider_model:llm_performance_threshold:"):
        base = "llm:performance_threshold:" + record.split(":")[-1]
        override = values.get((base, (("model", own["model"]),)))
        return override if override is not None else values.get((base, ()))
    if record.startswith("backend:llm_backend_threshold:"):
        base = "llm:backend_threshold:" + record.split(":")[-1]
        override = values.get((base, (("backend", own["backend"]),)))
        return override if override is not None else values.get((base, ()))
    return values.get((record, tuple(sorted(own.items()))))


def test_threshold_lines_and_colours_equal_the_alert_thresholds_live(loaded: Any) -> None:
    """Every colour step equals what Prometheus holds for the alert threshold it stands for;
    every dashed threshold line draws the numbers of thresholds.yml (per model: the model's
    own where it has one, as o3 does)."""
    s = loaded
    at = time.time()
    boards = {d["uid"]: d for d in load_dashboards().values()}
    colours = 0
    for (uid, title, field), sources in colour_thresholds().items():
        panel = next(p for p in iter_panels(boards[uid]) if p["title"] == title)
        expected = []
        for source in sources:
            if isinstance(source, tuple):
                expected.append(alert_constant(*source[1:]))
                continue
            answer = instant(s, source, at)
            assert len(answer) == 1, (source, answer)
            expected.append(float(answer[0][1]))
        assert colour_steps(panel)[field] == pytest.approx(expected), (uid, title, field)
        colours += 1
    lines, per_model = 0, set()
    for dash in boards.values():
        for panel in iter_panels(dash):
            for t in (threshold_lines(panel) if panel["type"] == "timeseries" else []):
                record = metrics_of(t["expr"])[0]
                answer = instant(s, panel_query(dash, t["expr"]), at)
                assert answer, f"{dash['uid']} / {panel['title']}: threshold {t['legendFormat']} draws nothing"
                for metric, value in answer:
                    want = None if record.startswith("llm_budget_usd") else _rule_value(record, metric)
                    if record.startswith("llm_budget_usd"):
                        continue                    # the budget line is the budget itself
                    assert want is not None, (record, metric)
                    assert float(value) == pytest.approx(want), (dash["uid"], panel["title"], metric, value, want)
                    if "model" in metric:
                        per_model.add((metric["model"], float(value)))
                    lines += 1
    assert colours >= 30 and lines >= 25, (colours, lines)
    assert ("o3", 90.0) in per_model and ("gpt-4o", 30.0) in per_model, sorted(per_model)


def _grafana_value(value: str) -> str:
    """A single selected value in a regex matcher, escaped as Grafana escapes it."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\1", value)


def test_firing_alerts_open_a_board_showing_them_live(loaded: Any) -> None:
    """Every firing alert's dashboard_url (as Prometheus renders it) opens a shipped board
    with the variables it sets, and that board's panel for the alert's metric, with those
    variables, shows the alert's series."""
    s = loaded
    boards = {d["uid"]: d for d in load_dashboards().values()}
    rules = {(a.name, a.severity): a for a in alert_rules()}
    firing = [a for a in prom_api(s, "alerts", {})["data"]["alerts"]
              if a["state"] == "firing" and a["labels"]["alertname"] != "Watchdog"]
    at = time.time()
    checked: set[str] = set()
    for alert in firing:
        labels, url = alert["labels"], alert["annotations"].get("dashboard_url", "")
        where = f"{labels['alertname']} {labels}"
        m = re.search(r"/d/([\w-]+)\?orgId=1", url)
        assert m and m.group(1) in boards, f"{where}: {url}"
        board = boards[m.group(1)]
        variables = url_variables(url)
        names = {v["name"] for v in board["templating"]["list"]}
        assert set(variables) <= names, f"{where}: {m.group(1)} has no variable {sorted(set(variables) - names)}"
        rule = rules[(labels["alertname"], labels["severity"])]
        panels = panels_of_metric(board, rule.primary or "", rule.expr)
        assert panels, f"{where}: {m.group(1)} has no panel for {rule.primary}"
        overrides = {k: _grafana_value(v[0]) for k, v in variables.items()}
        shown = False
        for panel in panels:
            for t in panel["targets"]:
                for metric, _ in instant(s, panel_query(board, t["expr"], overrides), at):
                    if all(metric.get(k, labels[k]) == labels[k] for k in ("app", "provider", "model", "signal",
                                                                             "scope", "reason", "period")
                           if k in labels):
                        shown = True
        assert shown, f"{where}: {[p['title'] for p in panels]} on {m.group(1)} with {overrides} do not show it"
        checked.add(labels["alertname"])
    assert len(checked) >= 6, checked


def test_overview_lists_the_alerts_of_every_job_live(loaded: Any) -> None:
    """The overview's firing alerts are those of the chosen exporter job and of jobs that are
    no exporter's: a backend probe's alert (job llm-backends) shows whichever deployment of
    the exporter `$job` picks, while the exporter's own alerts follow `$job`."""
    s = loaded
    s.wait_for(lambda: s.prom_query('ALERTS{alertstate="firing", alertname="LLMBackendDown"}'), timeout=120,
               message="LLMBackendDown firing for the refusing backend")
    board = next(d for d in load_dashboards().values() if d["uid"] == "llm-overview")
    table = next(p for p in iter_panels(board) if p.get("title") == "Firing alerts")
    counts = next(p for p in iter_panels(board) if p.get("title") == "Alerts firing")
    at = time.time()

    def rows(job: str) -> list[dict[str, str]]:
        return [m for m, _ in instant(s, panel_query(board, table["targets"][0]["expr"], {"job": job}), at)]

    def total(job: str) -> float:
        return sum(float(v) for t in counts["targets"] if t["legendFormat"] in ("critical", "warning")
                   for _, v in instant(s, panel_query(board, t["expr"], {"job": job}), at))

    for job in ("llm-usage-exporter", "another-deployment"):
        listed = [r for r in rows(job) if r.get("severity") in ("critical", "warning")]
        assert total(job) == len(listed), (job, listed)      # the count and the table agree
    mine = {r["alertname"] for r in rows("llm-usage-exporter")}
    other = {r["alertname"] for r in rows("another-deployment")}
    assert {"LLMBackendDown", "LLMRunawaySessions"} <= mine, mine
    assert "LLMBackendDown" in other and "LLMRunawaySessions" not in other, other


def test_zero_errors_show_zero_live(loaded: Any) -> None:
    """A model without a single failed request (or cache read) has an error ratio (cache-hit
    ratio) of 0 on the overview, not "No data"."""
    s = loaded
    overview = next(d for d in load_dashboards().values() if d["uid"] == "llm-overview")
    at = time.time()
    for title in ("Error ratio", "Cache-hit ratio"):
        panel = next(p for p in iter_panels(overview) if p["title"] == title)
        answer = instant(s, panel_query(overview, panel["targets"][0]["expr"], {"model": "in-house-finetune"}), at)
        assert [float(v) for _, v in answer] == [0.0], (title, answer)


# --- an HA pair counts once -----------------------------------------------------------------

PAIR_JOB, SINGLE_JOB = "dedup-pair", "dedup-single"
# Queries a pair may answer differently for a reason: `up` is drawn per replica (one down
# while its twin serves is LLMExporterReplicaDown), and the alerts of two jobs that started
# at the same moment need not be at the same point of their `for:`.
PER_REPLICA = re.compile(r"(?<![\w:])up\{|\bALERTS\b")
# Changes against the period before ("vs previous period") are differences of two nearly
# equal numbers whose terms the same panel's first query shows: the jitter between two
# scrapes is all they would compare.
CHANGE = re.compile(r"^vs ")


def _answers(s: Any, dash: dict[str, Any], expr: str, job: str, at: float) -> dict[tuple[tuple[str, str], ...], float]:
    """A panel query with `$job` set to `job`, by its series' labels (job aside): finite values only."""
    out = {}
    for metric, value in instant(s, panel_query(dash, expr, {"job": job}), at):
        v = float(value)
        if math.isfinite(v):
            out[tuple(sorted((k, x) for k, x in metric.items() if k not in ("job", "__name__")))] = v
    return out


def _compare_jobs(s: Any, at: float) -> tuple[int, list[str], list[str]]:
    """Every panel query of every board at `at`, with `$job` the single exporter and then the
    pair: (values compared, values the pair doubles, other differences)."""
    compared, doubled, differ = 0, [], []
    for dash in load_dashboards().values():
        for panel in iter_panels(dash):
            for t in panel.get("targets", []):
                if PER_REPLICA.search(t["expr"]) or CHANGE.match(t.get("legendFormat", "")):
                    continue
                single = _answers(s, dash, t["expr"], SINGLE_JOB, at)
                pair = _answers(s, dash, t["expr"], PAIR_JOB, at)
                where = f"{dash['uid']} / {panel['title']} / {t['refId']}"
                # an age (`time() - last record`) is read at each target's last scrape, up
                # to a scrape interval and a traffic tick apart
                slack = 2.0 if "time() -" in t["expr"] else 1e-9
                if set(pair) != set(single):
                    differ.append(f"{where}: series {sorted(set(pair) ^ set(single))[:3]}")
                    continue
                if "histogram_quantile" in t["expr"]:
                    # a quantile of doubled buckets is the same quantile: its value cannot show
                    # a doubling, only which requests each job's first scrape already held
                    # (a p99 of a few requests moves by a factor of two with one of them)
                    continue
                for key, v in single.items():
                    w = pair[key]
                    compared += 1
                    if abs(w - v) > 0.25 * max(abs(v), abs(w)) + slack:
                        (doubled if v and 1.6 < w / v < 2.5 else differ).append(f"{where} {dict(key)}: {v} -> {w}")
    return compared, doubled, differ


def test_an_ha_pair_doubles_no_panel_value_live(loaded: Any) -> None:
    """The same exporter scraped as a single exporter (job dedup-single) and, from the same
    moment, as an HA pair (job dedup-pair: two targets sharing `instance`, a `replica` label
    each, as docs/scaling.md scrapes a pair). Every panel query of every board, with `$job`
    set to one job and then the other, gives the same series (no `replica` label left) and
    the same values within the jitter of scrapes a fraction of a second apart: a count read
    without deduplication would be twice the single exporter's."""
    s = loaded
    original = s.prometheus_config.read_text()
    doc = yaml.safe_load(original)
    exporter_job = next(j for j in doc["scrape_configs"] if j["job_name"] == "llm-usage-exporter")
    target = exporter_job["static_configs"][0]["targets"][0]
    doc["scrape_configs"] += [
        {"job_name": SINGLE_JOB, "static_configs": [{"targets": [target]}]},
        {"job_name": PAIR_JOB, "static_configs": [{"targets": [target], "labels": {"replica": r}} for r in "ab"]},
    ]
    s.prometheus_config.write_text(yaml.safe_dump(doc, sort_keys=False))
    s.reload_prometheus()
    try:
        s.wait_for(lambda: len(s.prom_query(f'up{{job=~"{PAIR_JOB}|{SINGLE_JOB}"}} == 1')) == 3, timeout=30,
                   message="the pair and the single exporter scraped")
        assert {r["metric"].get("instance") for r in s.prom_query(f'up{{job="{PAIR_JOB}"}}')} == {target}
        time.sleep(LIVE_MIN_S)            # a full rate window of both, recorded by the rules
        # A doubled value shows at every instant, so at every look. A value the exporter
        # re-judges every few seconds can change between two scrapes a fraction of a second
        # apart (a verdict at its threshold flips; a live ratio of a few streamed requests
        # moves, even by a factor near two): any difference is looked at again a few
        # seconds later, and only one that stays fails.
        for _ in range(3):
            compared, doubled, differ = _compare_jobs(s, time.time())
            if not doubled and not differ:
                break
            time.sleep(7)
        assert not doubled, "the pair doubles:\n" + "\n".join(doubled[:20])
        assert not differ, "the pair differs:\n" + "\n".join(differ[:20])
        assert compared >= 300, compared
    finally:
        s.prometheus_config.write_text(original)
        s.reload_prometheus()
