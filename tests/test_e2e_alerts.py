"""End to end: record -> exporter -> Prometheus -> rule -> Alertmanager -> webhook receiver.

One native stack (scripts/stack.py) runs the real exporter, Prometheus and Alertmanager
with the shipped rule files and alertmanager.yml, timing divided by 60 (`for: 5m` is 5 s,
Alertmanager's group waits likewise). The exporter's anomaly window is one minute, so a
spike leaves the window, and its alert resolves, within the test.

Several independent situations are set up at once, each on its own app or model so that
none feeds another's alert:

- `spike-app` on openai/gpt-4o-mini: 50 hours of steady history (hourly cost varying a
  little, a call every 10 s), a live trickle continuing it at the same pace and price,
  then a burst in the current window (ten times the calls, each ten times as big):
  LLMCostSpike goes critical (pager), its warning twin is held, and the resolved
  notification follows once the burst has left the window. One cause, one page: the
  token alert of the same burst arrives in the same notification, and the model and
  global scopes, which see the same burst, page nothing;
- `latency-app` on openai/slow-model: requests of 100 s against the 30 s default p95
  threshold, above the minimum request count: LLMModelLatencyHigh (chat);
- `budget-app`, with a monthly budget of $0.05 in the exporter config, spends $0.09:
  LLMMonthlyBudgetExceeded (pager);
- `runaway-app`: one session making 25 calls with `runaway.chain_max_calls: 20`:
  LLMRunawaySessions (chat), whose notification must not carry the session id, which only
  /api/runaways lists.

The records of the last three are stamped two minutes in the past: the Prometheus-side
counters move at ingest whatever the event time, while the exporter's one-minute anomaly
window never sees them, so the global anomaly scope stays about the spike only.
"""

from __future__ import annotations

import json
import re
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
from stack_util import (REPO, delivered, e2e_marks, exporter_json, load_stack, rule_errors,  # noqa: E402
                        runbook_anchors)

stack_mod = load_stack()
Stack = stack_mod.Stack

pytestmark = e2e_marks()

WINDOW_S = 60                  # --window: the anomaly window
STEP_S = 10.0                  # one spike-app call every 10 s, in history and live
UNIT_COST = 0.001              # USD per call -> $0.36 an hour
HISTORY_HOURS = 50
SPIKE_CALLS = 60               # the burst: ten times the calls of a window ...
SPIKE_SIZE = 10                # ... each with ten times the tokens and cost
SESSION_ID = "sess-" + uuid.uuid4().hex    # must never show up in an alert
RUNAWAY_CALLS = 25
CHAIN_MAX_CALLS = 20
BUDGET_MONTH_USD = 0.05
BUDGET_SPEND = (0.03, 0.03, 0.03)
SLOW_LATENCY_S = 100.0
SLOW_REQUESTS = 10             # >= llm:performance_threshold:min_requests (5)
RUNBOOK = "https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbook.md#"

EXPORTER_CONFIG = {
    "budgets": {"timezone": "UTC", "apps": {"budget-app": {"month": BUDGET_MONTH_USD}}},
    "runaway": {"chain_max_calls": CHAIN_MAX_CALLS},
}


def _rec(ts: float, app: str, **fields: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"ts": round(ts, 3), "provider": "openai", "model": "gpt-4o-mini", "app": app,
                         "input_tokens": 500, "output_tokens": 100, "cost_usd": UNIT_COST, "latency_s": 1.0,
                         "status": "ok", "request_id": uuid.uuid4().hex}
    r.update(fields)
    return r


def spike_history(now: float) -> list[dict[str, Any]]:
    """A call every STEP_S up to `now`; each hour's price varies by up to +-20 %."""
    rng = np.random.default_rng(11)
    start = (now // STEP_S) * STEP_S - HISTORY_HOURS * 3600
    factors: dict[int, float] = {}
    out = []
    for ts in np.arange(start, now, STEP_S):
        hour = int(ts // 3600)
        f = factors.setdefault(hour, float(rng.uniform(0.8, 1.2)))
        out.append(_rec(float(ts), "spike-app", cost_usd=round(UNIT_COST * f, 6)))
    return out


class Trickle(threading.Thread):
    """Continues spike-app's history live: one call every STEP_S, stamped on schedule."""

    def __init__(self, stack: Any, next_ts: float) -> None:
        super().__init__(daemon=True, name="spike-app-trickle")
        self.stack, self.next_ts = stack, next_ts
        self.halt = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.wait(max(0.0, self.next_ts - time.time())):
            try:
                self.stack.post_records([_rec(self.next_ts, "spike-app")])
            except Exception as e:  # noqa: BLE001 - recorded, asserted by the tests
                if not self.halt.is_set():
                    self.errors.append(repr(e))
            self.next_ts += STEP_S

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


class Scenario:
    """The running stack and what was sent to it."""

    def __init__(self, stack: Any, trickle: Trickle) -> None:
        self.stack, self.trickle = stack, trickle
        self.spike_at = 0.0
        self.exporter_instance = stack.urls["exporter"].removeprefix("http://")

    def wait_delivered(self, timeout: float, message: str, **match: Any) -> list[tuple[dict, dict]]:
        return self.stack.wait_for(lambda: delivered(self.stack, **match), timeout=timeout, interval=0.5,
                                   message=message)


def _aside(now: float) -> float:
    """A time outside the anomaly window but (almost always) still today, UTC."""
    return now - 2 * WINDOW_S if now % 86400 > 3 * WINDOW_S else now


def _clear_of_the_hour_turn(margin_s: float = 360.0) -> None:
    """Start well inside an hour: the burst must stay out of the whole hours that the
    held-shift tests read, or the hour after it could warn of a (real) creep mid-test."""
    left = 3600.0 - time.time() % 3600.0
    if left < margin_s:
        time.sleep(left + 1.0)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    _clear_of_the_hour_turn()
    cfg = tmp_path_factory.mktemp("e2e-alerts") / "exporter.yaml"
    cfg.write_text(yaml.safe_dump(EXPORTER_CONFIG))
    with Stack(fast=True, time_scale=60, ready_timeout=60,
               exporter_args=["--config", str(cfg), "--window", f"{WINDOW_S}s"]) as s:
        now = time.time()
        history = spike_history(now)
        result = s.post_records(history)
        assert result["accepted"] == len(history), result
        trickle = Trickle(s, history[-1]["ts"] + STEP_S)
        trickle.start()
        sc = Scenario(s, trickle)
        try:
            aside = _aside(time.time())
            # runaway: one session, many calls with the same tool
            loop = [_rec(aside + i, "runaway-app", model="gpt-4o", cost_usd=0.0, session_id=SESSION_ID,
                         request_had_tools=True, tool_calls=["run_tests"], stop_reason="tool_calls")
                    for i in range(RUNAWAY_CALLS)]
            # budget: a tiny monthly budget, spent
            spend = [_rec(aside + i, "budget-app", model="gpt-4o", cost_usd=c) for i, c in enumerate(BUDGET_SPEND)]
            # latency: one slow request first, so the series exists in Prometheus before the
            # rest arrive (a counter's first sample carries no increase)
            slow = [_rec(aside + i, "latency-app", model="slow-model", cost_usd=0.0, latency_s=SLOW_LATENCY_S)
                    for i in range(SLOW_REQUESTS)]
            assert s.post_records(loop + spend + slow[:1])["accepted"] == len(loop + spend) + 1
            # the burst, in the current window
            sc.spike_at = time.time()
            spike = [_rec(sc.spike_at, "spike-app", input_tokens=500 * SPIKE_SIZE,
                          output_tokens=100 * SPIKE_SIZE, cost_usd=UNIT_COST * SPIKE_SIZE) for i in range(SPIKE_CALLS)]
            assert s.post_records(spike)["accepted"] == SPIKE_CALLS
            s.wait_for(lambda: s.prom_query('llm_request_duration_seconds_count{model="slow-model"}'),
                       timeout=30, message="the slow model's histogram in Prometheus")
            assert s.post_records(slow[1:])["accepted"] == SLOW_REQUESTS - 1
            yield sc
        finally:
            trickle.stop()
        assert not trickle.errors, trickle.errors


# --- helpers ------------------------------------------------------------------------------

def shipped_receivers() -> dict[str, str]:
    """severity -> receiver of the severity routes in the shipped alertmanager.yml."""
    doc = yaml.safe_load((REPO / "alertmanager" / "alertmanager.yml").read_text())
    out = {}
    for route in doc["route"]["routes"]:
        m = route.get("matchers") or []
        if len(m) == 1 and (hit := re.fullmatch(r'severity="(\w+)"', m[0])):
            out[hit.group(1)] = route["receiver"]
    return out


RECEIVER = shipped_receivers()


def test_shipped_routes_name_the_receivers_these_tests_expect() -> None:
    assert RECEIVER == {"critical": "pager", "warning": "chat", "info": "ticket"}


def _exporter_labels(sc: Scenario) -> dict[str, str]:
    return {"instance": sc.exporter_instance, "job": "llm-usage-exporter"}


def _check_annotations(alert: dict[str, Any], alertname: str) -> None:
    ann = alert["annotations"]
    assert ann["summary"] and "{{" not in ann["summary"]
    assert ann["description"] and "{{" not in ann["description"] and "<no value>" not in ann["description"]
    anchor = alertname.lower()
    assert ann["runbook_url"] == RUNBOOK + anchor
    assert anchor in runbook_anchors(), f"docs/runbook.md has no section for {alertname}"


# --- the tests ----------------------------------------------------------------------------

COST_APP_LABELS = {"alertname": "LLMCostSpike", "signal": "cost_per_hour", "scope": "app", "app": "spike-app",
                   "category": "anomaly"}


def test_cost_spike_pages_with_value_and_baseline(scenario: Scenario) -> None:
    sc = scenario
    hits = sc.wait_delivered(60, "the critical LLMCostSpike of spike-app at the pager",
                             receiver=RECEIVER["critical"], status="firing",
                             labels={**COST_APP_LABELS, "severity": "critical"})
    note, alert = hits[0]
    assert alert["labels"] == {**COST_APP_LABELS, "severity": "critical", **_exporter_labels(sc)}
    assert alert["status"] == "firing" and note["status"] == "firing"
    assert note["groupLabels"] == {"category": "anomaly", "scope": "app", "app": "spike-app", "job": "llm-usage-exporter"}
    assert alert["annotations"]["summary"] == "LLM spend is far above its usual level"
    _check_annotations(alert, "LLMCostSpike")
    desc = " ".join(alert["annotations"]["description"].split())
    m = re.search(r"Cost over the last hour for app spike-app is ([\d.]+)x its baseline: "
                  r"\$([\d.]+)/h against a baseline of \$([\d.]+)/h \(evidence z ([\d.]+)\)", desc)
    assert m, desc
    ratio, current, baseline, z = map(float, m.groups())
    # baseline: the usual hour of history, $0.36 +- 20 %; current: the trickle plus the burst
    assert 0.36 * 0.8 <= baseline <= 0.36 * 1.2, desc
    assert current >= SPIKE_CALLS * SPIKE_SIZE * UNIT_COST * 3600 / WINDOW_S, desc
    assert ratio >= 10 and z >= 5, desc
    assert abs(ratio - current / baseline) <= 0.1 * ratio, desc


def test_one_cause_pages_once(scenario: Scenario) -> None:
    """The burst moves cost and tokens at the app, its model and the global scope: six
    anomalies, one cause. The exporter marks the model and global ones as explained by the
    app, so they raise no alert; the app's cost and token alerts travel in one notification
    to the pager; their warning twins are held."""
    sc = scenario
    s = sc.stack
    app = {"category": "anomaly", "scope": "app", "app": "spike-app", "job": "llm-usage-exporter"}

    def both_in_one() -> Any:
        for note, _ in delivered(s, receiver=RECEIVER["critical"], status="firing", labels=app):
            names = {a["labels"]["alertname"] for a in note["alerts"] if a["status"] == "firing"}
            if {"LLMCostSpike", "LLMTokenVelocitySpike"} <= names:
                return note
        return None

    note = s.wait_for(both_in_one, timeout=60, interval=0.5, message="cost and token alerts of spike-app in one page")
    assert note["groupLabels"] == app
    assert {a["labels"]["severity"] for a in note["alerts"]} == {"critical"}
    # the wider scopes saw the same burst: the exporter says so, and they stay quiet
    explained = s.prom_query('llm_anomaly_explained{signal=~"cost_per_hour|token_velocity", scope=~"global|model"} == 1')
    assert {(x["metric"]["signal"], x["metric"]["scope"]) for x in explained} == {
        ("cost_per_hour", "global"), ("cost_per_hour", "model"), ("token_velocity", "global"), ("token_velocity", "model")}
    severe = s.prom_query('llm_anomaly_severity{signal="cost_per_hour", scope=~"global|model"} >= 1')
    assert len(severe) == 2, severe           # they are anomalous, yet no alert of theirs exists
    firing = [a["labels"] for a in s.prom_alerts() if a["labels"].get("category") == "anomaly" and "signal" in a["labels"]]
    assert firing and all(lab["scope"] == "app" and lab["app"] == "spike-app" for lab in firing), firing
    pages = [n for n, _ in delivered(s, receiver=RECEIVER["critical"], status="firing")
             if n["groupLabels"].get("category") == "anomaly"]
    assert {tuple(sorted(n["groupLabels"].items())) for n in pages} == {tuple(sorted(app.items()))}
    # no warning about the burst's app, model or all traffic (the runaway app's own warning
    # and slow-model's latency share the anomaly category, about other things)
    assert not [a for _, a in delivered(s, receiver=RECEIVER["warning"], labels={"category": "anomaly"})
                if a["labels"].get("app") == "spike-app" or a["labels"].get("model") == "gpt-4o-mini"
                or a["labels"].get("scope") == "global"]


def test_critical_cost_alert_holds_its_warning_twin(scenario: Scenario) -> None:
    """The verdict is past warning too, yet the warning twin never fires beneath its page.
    A twin firing unseen (inhibited) would resolve with the page, and Alertmanager would
    carry its "resolved" to chat in the next notification of the app's group, about an
    alert chat never saw. A twin that fired before its page keeps firing, inhibited: the
    generated promtool test's escalation case and test_alertmanager's inhibitions."""
    sc = scenario
    s = sc.stack
    twin = {**COST_APP_LABELS, "severity": "warning"}
    crit = s.wait_for(lambda: s.am_alerts(**COST_APP_LABELS, severity="critical"), timeout=60,
                      message="the critical LLMCostSpike of spike-app in Alertmanager")[0]
    assert crit["status"]["state"] == "active"
    # the twin's own condition holds, and has for far longer than its `for:` (1m, 1 s here)
    time.sleep(2 * 300 / s.time_scale)
    assert s.prom_query('llm_anomaly_severity{signal="cost_per_hour", scope="app", app="spike-app"} >= 1')
    states = {a["labels"]["severity"]: a["state"] for a in s.prom_alerts()
              if all(a["labels"].get(k) == v for k, v in COST_APP_LABELS.items())}
    assert states == {"critical": "firing"}, states
    assert not s.am_alerts(**twin)
    assert not delivered(s, labels=twin), "the warning twin was delivered"


def test_model_latency_above_threshold_reaches_chat(scenario: Scenario) -> None:
    sc = scenario
    labels = {"alertname": "LLMModelLatencyHigh", "provider": "openai", "model": "slow-model", "severity": "warning"}
    hits = sc.wait_delivered(60, "LLMModelLatencyHigh of slow-model in chat",
                             receiver=RECEIVER["warning"], status="firing", labels=labels)
    note, alert = hits[0]
    # the recording rules aggregate by provider and model, within the exporter's job: nothing else is left
    assert alert["labels"] == {**labels, "category": "anomaly", "scope": "model", "job": _exporter_labels(sc)["job"]}
    # it travels with the model's anomaly alerts, if any: one message per model
    assert note["groupLabels"] == {"category": "anomaly", "scope": "model", "provider": "openai", "model": "slow-model",
                                  "job": "llm-usage-exporter"}
    _check_annotations(alert, "LLMModelLatencyHigh")
    desc = " ".join(alert["annotations"]["description"].split())
    assert "p95 request duration of openai/slow-model over the last 5 minutes is" in desc
    assert "above its threshold of 30s" in desc, desc
    assert re.search(r"\((\d+) requests\)", desc) and int(re.search(r"\((\d+) requests\)", desc).group(1)) >= 5, desc
    p95 = sc.stack.prom_query('provider_model:llm_request_duration_seconds:p95_5m{model="slow-model"}')
    assert p95 and float(p95[0]["value"][1]) > 30


def test_monthly_budget_exceeded_pages(scenario: Scenario) -> None:
    sc = scenario
    labels = {"alertname": "LLMMonthlyBudgetExceeded", "app": "budget-app", "period": "month", "severity": "critical"}
    hits = sc.wait_delivered(60, "LLMMonthlyBudgetExceeded of budget-app at the pager",
                             receiver=RECEIVER["critical"], status="firing", labels=labels)
    _, alert = hits[0]
    # spend adds up over every exporter holding the app (shards), so no instance is named
    assert alert["labels"] == {**labels, "job": "llm-usage-exporter"}
    _check_annotations(alert, "LLMMonthlyBudgetExceeded")
    desc = " ".join(alert["annotations"]["description"].split())
    assert f"Spend of app budget-app this month is ${sum(BUDGET_SPEND):.2f}, over the monthly budget of " \
           f"${BUDGET_MONTH_USD:.2f}." in desc, desc


def test_runaway_session_alert_carries_no_session_id(scenario: Scenario) -> None:
    sc = scenario
    labels = {"alertname": "LLMRunawaySessions", "app": "runaway-app", "reason": "chain_length", "severity": "warning"}
    hits = sc.wait_delivered(60, "LLMRunawaySessions of runaway-app in chat",
                             receiver=RECEIVER["warning"], status="firing", labels=labels)
    _, alert = hits[0]
    assert alert["labels"] == {**labels, "category": "anomaly", "scope": "app", **_exporter_labels(sc)}
    _check_annotations(alert, "LLMRunawaySessions")
    desc = " ".join(alert["annotations"]["description"].split())
    assert "1 session(s) of app runaway-app are flagged for chain_length" in desc, desc
    # the session id is nowhere in what Alertmanager delivered (labels, annotations, group labels)
    everything = json.dumps(exporter_json(sc.stack, "/api/notifications?limit=1000"))
    assert SESSION_ID not in everything
    # ... nor in any label of any series Prometheus holds
    series = sc.stack.prom_query('{__name__=~".+"}')
    assert series and not [x["metric"] for x in series if SESSION_ID in json.dumps(x["metric"])]
    # it is listed where it belongs: the exporter's runaway report
    report = exporter_json(sc.stack, "/api/runaways")["runaway"]
    offenders = {o["session_id"]: o for o in report["offenders"]}
    assert SESSION_ID in offenders, report
    assert {"chain_length", "tool_repetition"} <= set(offenders[SESSION_ID]["reasons"])


def test_cost_spike_resolves_when_it_leaves_the_window(scenario: Scenario) -> None:
    sc = scenario
    labels = {**COST_APP_LABELS, "severity": "critical"}
    hits = sc.wait_delivered(WINDOW_S + 90, "the resolved LLMCostSpike of spike-app at the pager",
                             receiver=RECEIVER["critical"], status="resolved", labels=labels)
    note, alert = hits[0]
    assert alert["status"] == "resolved" and note["status"] == "resolved"
    assert alert["labels"] == {**labels, **_exporter_labels(sc)}
    # not before the spike had left the one-minute window
    assert note["received_at"] >= sc.spike_at + WINDOW_S
    ends = alert["endsAt"]
    assert ends and not ends.startswith("0001"), alert
    # the trickle kept going, so what resolved it is the window moving on, not silence
    ratio = sc.stack.prom_query('llm_anomaly_ratio{signal="cost_per_hour", scope="app", app="spike-app"}')
    assert ratio and 0.5 <= float(ratio[0]["value"][1]) < 2
    # its warning twin never reached a receiver: not while the critical alert fired (held
    # beneath it), nor after it resolved while the verdict decayed through warning as the
    # burst left the window (the warning rule stays quiet for 9 hours after its page); a
    # leaked twin would go out within a group interval (5m, 5 s here) of the page resolving
    time.sleep(3 * 300 / sc.stack.time_scale)
    leaked = delivered(sc.stack, labels={**COST_APP_LABELS, "severity": "warning"})
    assert not leaked, leaked
    # ... nor fired unseen at any time since the burst: such a twin resolves with its page, and
    # its "resolved" goes out whenever another alert of the app's group is next notified
    assert time.time() - sc.spike_at < 300
    twin = 'ALERTS{alertname="LLMCostSpike", app="spike-app", severity="warning", alertstate="firing"}'
    assert not sc.stack.prom_query(f"count_over_time({twin}[5m])")
    assert not sc.trickle.errors, sc.trickle.errors


def test_pipeline_ran_clean(scenario: Scenario) -> None:
    """Every rule evaluated without error, and every delivery Alertmanager attempted succeeded."""
    s = scenario.stack
    assert not rule_errors(s)
    # a failed attempt logs at warn even when a retry delivers it later
    failures = [line for line in s.log("alertmanager").splitlines() if "level=error" in line or "level=warn" in line]
    assert not failures, "\n".join(failures[-10:])
    failures = [line for line in s.log("prometheus").splitlines() if "level=error" in line]
    assert not failures, "\n".join(failures[-10:])
    watchdog = delivered(s, receiver="watchdog", labels={"alertname": "Watchdog"})
    assert watchdog, "the Watchdog never reached its own receiver"
