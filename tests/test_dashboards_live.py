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
  its reason).

Then every query (`iter_dashboard_queries` with a 30 s `$__rate_interval`) runs as an
instant query and as a one-minute range query; each must be accepted by Prometheus and
return data: at least one finite value (NaN draws nothing). A panel that can only be
empty for a good reason goes in EMPTY_ALLOWED with that reason; the list must stay short
and every entry must still exist.
"""

from __future__ import annotations

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
from model_server import ModelServer, self_signed_cert  # noqa: E402
from stack_util import (blackbox_marks, exporter_json, iter_dashboard_queries, load_dashboards,  # noqa: E402
                        load_stack, prom_api, rule_errors)

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
                "apps": {"support-bot": {"day": 15, "month": 400}, "code-assistant": {"day": 10, "month": 300}}},
    "runaway": {"chain_max_calls": 15},
}

# (dashboard uid, panel title) -> why it may be empty with this data. Keep it short.
EMPTY_ALLOWED: dict[tuple[str, str], str] = {}
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
        # something besides the Watchdog fires (firing-alerts tables and annotations)
        s.wait_for(lambda: s.prom_query('ALERTS{alertstate="firing", alertname="LLMRunawaySessions"}'),
                   timeout=90, message="LLMRunawaySessions firing")
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


def test_every_dashboard_query_returns_data_live(loaded: Any) -> None:
    s = loaded
    queries = list(iter_dashboard_queries(rate_interval=RATE_INTERVAL, interval="15s"))
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


def test_every_template_variable_has_values_live(loaded: Any) -> None:
    """`label_values(selector, label)` of each dashboard variable, asked of Prometheus the way
    Grafana does (the series API with the other variables at All)."""
    s = loaded
    checked = 0
    for name, dash in load_dashboards().items():
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var.get("query")
            text = query.get("query") if isinstance(query, dict) else query
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
