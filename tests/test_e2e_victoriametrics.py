"""End to end on VictoriaMetrics, with an HA pair of exporters: records -> two exporter
replicas -> vmagent -> victoria-metrics -> vmalert (prometheus/vmalert/) -> Alertmanager
(the shipped alertmanager.yml) -> the webhook receiver of replica a.

The scenario of tests/test_e2e_alerts.py, on the layout of docker-compose.ha.yml
(tests/vm_stack.py runs it natively, timing divided by 60): `spike-app` gets 50 hours of
steady history and a live trickle, then a burst in its one-minute anomaly window. The
client (`exporter.client.Exporters`) sends every record to both replicas. vmagent scrapes
them as one `instance` with a `replica` label each, and the rules take the larger of the
two, so the pair raises each alert once.

Mid-scenario, while the cost alert is on its way, replica b is killed. The alert still
fires, once, and resolves once; losing b while a serves is LLMExporterReplicaDown, a
warning in chat, never LLMExporterDown at the pager. Every rule evaluates on
victoria-metrics without an error, and the recording rules count the pair's requests once.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import e2e_marks, epoch, runbook_anchors  # noqa: E402
from test_e2e_alerts import (RECEIVER, RUNBOOK, SPIKE_CALLS, SPIKE_SIZE, STEP_S, UNIT_COST,  # noqa: E402
                             WINDOW_S, _clear_of_the_hour_turn, _rec, spike_history)
from vm_stack import VMStack, vm_binaries  # noqa: E402

from exporter.client import Exporters  # noqa: E402

pytestmark = [*e2e_marks(),
              pytest.mark.skipif(not all(vm_binaries().values()),
                                 reason="victoria-metrics / vmagent / vmalert not installed (Debian package victoria-metrics)")]

COST = {"alertname": "LLMCostSpike", "signal": "cost_per_hour", "scope": "app", "app": "spike-app",
        "category": "anomaly", "severity": "critical"}


class Trickle(threading.Thread):
    """spike-app's history continued live, one call every STEP_S, sent to both replicas."""

    def __init__(self, client: Exporters, next_ts: float) -> None:
        super().__init__(daemon=True, name="ha-trickle")
        self.client, self.next_ts = client, next_ts
        self.halt = threading.Event()
        self.errors: list[str] = []
        self.missed: list[str] = []

    def run(self) -> None:
        while not self.halt.wait(max(0.0, self.next_ts - time.time())):
            try:
                self.missed += self.client.send([_rec(self.next_ts, "spike-app")]).missed
            except Exception as e:  # noqa: BLE001 - recorded, asserted by the tests
                self.errors.append(repr(e))
            self.next_ts += STEP_S

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=15)


class Scenario:
    def __init__(self, stack: VMStack, trickle: Trickle) -> None:
        self.stack, self.trickle = stack, trickle
        self.spike_at = self.killed_at = 0.0
        self.rates_before_kill: tuple[float, float, float] = (0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def ha() -> Iterator[Scenario]:
    _clear_of_the_hour_turn(margin_s=420.0)   # a minute more: the rate windows fill first
    with VMStack(webhook="exporter-a", exporter_args=["--window", f"{WINDOW_S}s"]) as s:
        assert s.exporters == ["exporter-a", "exporter-b"]
        assert s.labels("exporter-a") == {"instance": "exporter", "replica": "a"}
        assert s.labels("exporter-b") == {"instance": "exporter", "replica": "b"}
        # a short retry budget: a dead replica must not hold the trickle up
        client = Exporters([[s.urls["exporter-a"], s.urls["exporter-b"]]], attempts=2, backoff=0.2, timeout=10)
        history = spike_history(time.time())
        # the history is one batch of some 18,000 records: on a loaded machine its POST can
        # outlast the trickle's 10 s, and the retry is then answered "duplicate" (the first
        # attempt was stored), so it gets a client that waits for it
        result = Exporters([[s.urls["exporter-a"], s.urls["exporter-b"]]], timeout=120).send(history)
        assert [a["accepted"] for a in result.answers.values()] == [len(history)] * 2, result
        trickle = Trickle(client, history[-1]["ts"] + STEP_S)
        trickle.start()
        sc = Scenario(s, trickle)
        try:
            # the recording rules see both replicas' counters and count them once: the rate
            # vmalert recorded, against each replica's rate at the same evaluation time
            def rates() -> tuple[float, float, float] | None:
                rec = s.query('app_provider_model:llm_requests:rate5m{app="spike-app"}')
                if not rec:
                    return None
                at, value = rec[0]["value"]
                raw = s.query('sum by (replica) (rate(llm_requests_total{app="spike-app"}[5m]))', at=float(at))
                if len(raw) != 2:
                    return None
                # only once each replica's window spans a minute of scrapes (six calls): over a
                # few seconds, one call more or less, or a sample that reached the store after
                # the evaluation, moves a rate by half
                spans = s.query('min(count_over_time(llm_requests_total{app="spike-app"}[5m]))', at=float(at))
                if not spans or float(spans[0]["value"][1]) < 60:
                    return None
                each = sorted(float(r["value"][1]) for r in raw)
                return float(value), each[0], each[1]
            sc.rates_before_kill = s.wait_for(rates, timeout=120, message="the pair's request rate, recorded")
            sc.spike_at = time.time()
            spike = [_rec(sc.spike_at, "spike-app", input_tokens=500 * SPIKE_SIZE, output_tokens=100 * SPIKE_SIZE,
                          cost_usd=UNIT_COST * SPIKE_SIZE) for _ in range(SPIKE_CALLS)]
            assert not client.send(spike).missed
            # replica b dies while the cost alert is on its way
            s.wait_for(lambda: [a for a in s.vmalert_alerts()
                                if all(a["labels"].get(k) == v for k, v in COST.items())],
                       timeout=60, message="vmalert holding the critical LLMCostSpike (pending or firing)")
            s.kill("exporter-b")
            sc.killed_at = time.time()
            yield sc
        finally:
            trickle.stop()


def _timeline(ha: Scenario) -> str:
    """spike-app's notifications in the order they arrived, in seconds after the burst: what
    a failed assertion about their order needs to be read."""
    rows = sorted((n["received_at"], n["receiver"], a["status"], a["labels"].get("alertname", ""),
                   a["labels"].get("severity", ""), a.get("startsAt", ""), a.get("endsAt", ""))
                  for n, a in ha.stack.delivered(labels={"app": "spike-app"}))

    def after(stamp: str) -> str:
        return "-" if not stamp or stamp.startswith("0001") else f"{epoch(stamp) - ha.spike_at:+.2f}s"
    return "\n".join(f"{at - ha.spike_at:+8.2f}s {receiver} {status} {name} {severity} "
                     f"starts {after(starts)} ends {after(ends)}"
                     for at, receiver, status, name, severity, starts, ends in rows)


def _same(alert: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(alert.get("labels", {}).get(k) == v for k, v in labels.items())


def test_the_pair_is_counted_once(ha: Scenario) -> None:
    recorded, low, high = ha.rates_before_kill
    assert low > 0
    # about one replica's rate (a call every 10 s, so a few calls more or less in a 5-minute
    # window move it by a tenth or two), far from the two added
    assert 0.7 * high <= recorded <= 1.3 * high and recorded < 0.75 * (low + high), ha.rates_before_kill


def test_cost_spike_pages_once_through_victoriametrics(ha: Scenario) -> None:
    s = ha.stack
    hits = s.wait_for(lambda: s.delivered(receiver=RECEIVER["critical"], status="firing", labels=COST),
                      timeout=90, message="the critical LLMCostSpike of spike-app at the pager")
    note, alert = hits[0]
    # one alert for the pair: the logical instance, no replica label (vmalert adds alertgroup)
    assert alert["labels"] == {**COST, "instance": "exporter", "job": "llm-usage-exporter", "alertgroup": "llm-anomaly"}
    assert note["groupLabels"] == {"category": "anomaly", "scope": "app", "app": "spike-app", "job": "llm-usage-exporter"}
    ann = alert["annotations"]
    assert ann["runbook_url"] == RUNBOOK + "llmcostspike" and "llmcostspike" in runbook_anchors()
    desc = " ".join(ann["description"].split())
    m = re.search(r"Cost over the last hour for app spike-app is ([\d.]+)x its baseline: "
                  r"\$([\d.]+)/h against a baseline of \$([\d.]+)/h \(evidence z ([\d.]+)\)", desc)
    assert m, desc
    ratio, current, baseline, z = map(float, m.groups())
    assert 0.36 * 0.8 <= baseline <= 0.36 * 1.2, desc
    assert current >= SPIKE_CALLS * SPIKE_SIZE * UNIT_COST * 3600 / WINDOW_S and ratio >= 10 and z >= 5, desc


def test_losing_a_replica_is_a_warning_not_a_page(ha: Scenario) -> None:
    s = ha.stack
    down = {"alertname": "LLMExporterReplicaDown", "instance": "exporter", "replica": "b", "severity": "warning"}
    hits = s.wait_for(lambda: s.delivered(receiver=RECEIVER["warning"], status="firing", labels=down),
                      timeout=60, message="LLMExporterReplicaDown of replica b in chat")
    assert hits[0][1]["annotations"]["runbook_url"] == RUNBOOK + "llmexporterreplicadown"
    assert not s.delivered(labels={"alertname": "LLMExporterDown"})
    assert not [a for a in s.vmalert_alerts() if a["labels"].get("alertname") == "LLMExporterDown"]
    # the spike is one alert, without replica labels, while b is gone: its warning twin is
    # held by the page's own condition, not only by the ALERTS vmalert reads back late
    spike = [a for a in s.vmalert_alerts() if _same(a, {"alertname": "LLMCostSpike", "app": "spike-app"})]
    assert [a["labels"]["severity"] for a in spike] == ["critical"], spike
    assert not [a for a in s.vmalert_alerts() if "replica" in a["labels"] and a["labels"]["alertname"] != down["alertname"]]


def test_the_alert_fired_once_and_resolves_once(ha: Scenario) -> None:
    s = ha.stack
    hits = s.wait_for(lambda: s.delivered(receiver=RECEIVER["critical"], status="resolved", labels=COST),
                      timeout=WINDOW_S + 120, message="the resolved LLMCostSpike of spike-app at the pager")
    note, alert = hits[0]
    assert note["received_at"] >= ha.spike_at + WINDOW_S
    # every notification about it, before and after the kill, is about one alert that
    # started once: no second alert from the other replica, no resolve-and-fire-again
    firing = s.delivered(receiver=RECEIVER["critical"], status="firing", labels=COST)
    assert firing and {a["startsAt"] for _, a in firing} == {alert["startsAt"]}
    assert {a["fingerprint"] for _, a in firing + hits} == {alert["fingerprint"]}
    assert len({n["received_at"] for n, _ in hits}) == 1
    assert any(n["received_at"] > ha.killed_at for n, _ in firing + hits)
    # the token alert of the same burst arrived in the same page; the warning twins stayed
    # held back while the critical alerts fired (as the burst leaves the window, a verdict
    # can pass through warning on its way down, and that warning may then be sent)
    tokens = s.delivered(receiver=RECEIVER["critical"], labels={"alertname": "LLMTokenVelocitySpike",
                                                                 "app": "spike-app"})
    assert tokens
    critical_ended = min(epoch(a["endsAt"]) for _, a in s.delivered(receiver=RECEIVER["critical"], status="resolved",
                                                                    labels={"app": "spike-app"}))
    early = [a["labels"] for n, a in s.delivered(labels={"category": "anomaly", "severity": "warning"})
             if n["received_at"] < critical_ended]
    assert not early, _timeline(ha)
    # and they never fired, not even unseen beneath the page (where a page resolves while the
    # verdict decays through warning, a twin that fired would reach chat)
    span = f"{int(time.time() - ha.spike_at) + 60}s"
    twins = s.query(f'count_over_time(ALERTS{{app="spike-app", alertstate="firing", severity="warning", '
                    f'alertname=~"LLMCostSpike|LLMTokenVelocitySpike"}}[{span}])')
    assert not twins, [(t["metric"]["alertname"], t["value"][1]) for t in twins]
    # the client kept sending: replica a took everything, b's copies are reported missed
    assert not ha.trickle.errors, ha.trickle.errors
    assert set(ha.trickle.missed) <= {s.urls["exporter-b"]}


def test_every_rule_evaluates_on_victoriametrics(ha: Scenario) -> None:
    s = ha.stack
    groups = s.vmalert_groups()
    assert {g["name"] for g in groups} >= {"llm-anomaly", "llm-usage-rates", "llm-budget-burnrate", "llm-exporter",
                                           "llm-thresholds", "llm-performance", "llm-detectors"}
    errors = [f"{g['name']} / {r.get('name')}: {r['lastError']}" for g in groups for r in g.get("rules", [])
              if r.get("lastError")]
    assert not errors, "\n".join(errors)
    # recording rules written back into victoria-metrics and read by the next ones
    assert s.query("provider_model:llm_performance_threshold:latency_p95_seconds")
    watchdog = s.delivered(receiver="watchdog", labels={"alertname": "Watchdog"})
    assert watchdog, "the Watchdog never reached its own receiver"
    failures = [line for line in s.log("alertmanager").splitlines() if "level=error" in line or "level=warn" in line]
    assert not failures, "\n".join(failures[-10:])
