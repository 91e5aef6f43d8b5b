"""End to end: backend probe -> Prometheus -> rule -> Alertmanager -> webhook receiver, and
/api/backends, with the real binaries.

One native stack (scripts/stack.py: exporter, Prometheus, Alertmanager and Debian's
blackbox exporter on 127.0.0.1, the shipped rule files and alertmanager.yml, timing divided
by 60: probes and rules every second, `keep_firing_for: 1m` one second) probes:

- `vllm-e2e`: a model server answering /health with 200, then 503, then nothing (it accepts
  the connection and never answers), then 200 again. LLMBackendDown reaches the pager
  with the reason of the last failure, holds back the error-ratio alert of the backend's
  provider and model meanwhile, and resolves when the server is back; /api/backends
  follows each step;
- `retired-box`: a TCP port that refuses connections: down from the start;
- `loopback`: ICMP to 127.0.0.1, up where this process may open raw (or unprivileged
  ICMP) sockets, skipped with the reason elsewhere;
- `gateway-tls`: an HTTPS server whose certificate expires in two days:
  LLMBackendCertificateExpiring pages.
"""

from __future__ import annotations

import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_server import ModelServer, self_signed_cert  # noqa: E402
from stack_util import (blackbox_marks, delivered, exporter_json, icmp_allowed, load_stack,  # noqa: E402
                        rule_errors, runbook_anchors)

Stack = load_stack().Stack
pytestmark = blackbox_marks()

RUNBOOK = "https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbook.md#"
VLLM = {"backend": "vllm-e2e", "kind": "vllm", "provider": "hosted_vllm", "model": "llama-e2e"}
ICMP_OK, ICMP_WHY = icmp_allowed()


class Scenario:
    def __init__(self, stack: Any, server: ModelServer, refused_port: int) -> None:
        self.stack, self.server, self.refused_port = stack, server, refused_port
        self.health = server.url + "/health"

    def wait(self, predicate: Any, message: str, timeout: float = 60.0) -> Any:
        return self.stack.wait_for(predicate, timeout=timeout, interval=0.25, message=message)

    def backend(self, name: str) -> dict[str, Any] | None:
        body = exporter_json(self.stack, f"/api/backends?backend={name}")
        return body["backends"][0] if body["backends"] else None

    def pages(self, status: str, **labels: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return delivered(self.stack, receiver="pager", status=status, labels=labels)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    cert = self_signed_cert(tmp_path_factory.mktemp("tls"), days=2)
    with ModelServer() as server, ModelServer(tls=cert) as secure, socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))           # bound, never listening: connections are refused
        port = refusing.getsockname()[1]
        backends = [
            {"targets": [server.url + "/health"], "labels": VLLM},
            {"targets": [f"127.0.0.1:{port}"], "labels": {"backend": "retired-box", "module": "tcp_connect"}},
            {"targets": [secure.url + "/health"], "labels": {"backend": "gateway-tls", "kind": "gateway"}},
        ]
        if ICMP_OK:
            backends.append({"targets": ["127.0.0.1"], "labels": {"backend": "loopback", "module": "icmp"}})
        with Stack(fast=True, time_scale=60, ready_timeout=60, blackbox=True, backends=backends,
                   env={"SSL_CERT_FILE": str(cert.cert)}) as s:
            yield Scenario(s, server, port)


def _check_annotations(alert: dict[str, Any], alertname: str) -> str:
    ann = alert["annotations"]
    assert ann["summary"] and "{{" not in ann["summary"]
    assert ann["description"] and "<no value>" not in ann["description"]
    assert ann["runbook_url"] == RUNBOOK + alertname.lower() and alertname.lower() in runbook_anchors()
    assert ann["dashboard_url"].startswith("http://localhost:3000/d/llm-backends?orgId=1&var-backend=")
    return " ".join(ann["description"].split())


def _record(**fields: Any) -> dict[str, Any]:
    return {"ts": time.time(), "provider": VLLM["provider"], "model": VLLM["model"], "app": "e2e-chat",
            "input_tokens": 100, "output_tokens": 10, "latency_s": 0.5, "request_id": uuid.uuid4().hex, **fields}


def test_a_backend_that_fails_pages_holds_back_its_errors_and_resolves(scenario: Scenario) -> None:
    sc, s, server = scenario, scenario.stack, scenario.server
    labels = {"alertname": "LLMBackendDown", "severity": "critical", **VLLM}

    # 200: up, and no alert
    sc.wait(lambda: s.prom_query('probe_success{backend="vllm-e2e"} == 1'), "the first successful probe")
    up = sc.wait(lambda: (b := sc.backend("vllm-e2e")) and b["state"] == "up" and b, "vllm-e2e up in /api/backends")
    assert (up["provider"], up["model"], up["kind"], up["last_error"]) == ("hosted_vllm", "llama-e2e", "vllm", None)
    assert up["probes"][0]["target"] == sc.health and up["probes"][0]["http_status_code"] == 200
    # the model's traffic: a request and an error first, so the counters exist before the storm
    # (a counter's first sample carries no increase)
    assert s.post_records([_record(), _record(status="error", error_type="server_error")])["accepted"] == 2
    sc.wait(lambda: s.prom_query(f'llm_request_errors_total{{model="{VLLM["model"]}"}}'), "the model's counters")
    assert not [a for a in s.prom_alerts() if a["labels"].get("backend") == "vllm-e2e"]

    # 503: down after three probes in a row, paged with the reason
    failing_from = time.time()
    server.mode = "error"
    hits = sc.wait(lambda: sc.pages("firing", **labels), "LLMBackendDown of vllm-e2e at the pager")
    note, alert = hits[0]
    assert alert["labels"] == {**labels, "job": "llm-backends", "instance": sc.health, "module": "http_health"}
    assert note["groupLabels"] == {"alertname": "LLMBackendDown", "provider": "hosted_vllm", "model": "llama-e2e",
                                  "job": "llm-backends"}
    desc = _check_annotations(alert, "LLMBackendDown")
    m = re.fullmatch(r"Backend vllm-e2e \(vllm\) failed its last (\d+) http_health probes of " + re.escape(sc.health)
                     + r" \(down after 3\); last failure: HTTP 503\.", desc)
    assert m and int(m.group(1)) >= 3, desc
    assert note["received_at"] - failing_from < 20
    down = sc.wait(lambda: (b := sc.backend("vllm-e2e")) and b["state"] == "down" and b, "vllm-e2e down in the API")
    assert down["last_error"] == "HTTP 503" and down["alerts"] == ["LLMBackendDown"]
    assert failing_from - 2 <= down["since"] <= failing_from + 3, (down["since"], failing_from)
    assert down["probes"][0]["consecutive_failures"] >= 3 and down["probes"][0]["http_status_code"] == 503

    # the outage explains the model's error storm: Prometheus fires it, Alertmanager holds it back
    assert s.post_records([_record(status="error", error_type="server_error", output_tokens=0)
                           for _ in range(20)])["accepted"] == 20
    backend_alert = s.am_alerts(**labels)[0]

    def held_back() -> Any:
        errors = s.am_alerts(alertname="LLMErrorRatioHigh", provider="hosted_vllm", model="llama-e2e",
                             severity="critical")
        return errors if errors and errors[0]["status"]["state"] == "suppressed" else None
    errors = sc.wait(held_back, "LLMErrorRatioHigh of the model held back")
    assert backend_alert["fingerprint"] in errors[0]["status"]["inhibitedBy"]
    assert not delivered(s, labels={"alertname": "LLMErrorRatioHigh", "model": "llama-e2e"})

    # nothing: the probe times out; the alert stays, the reason changes
    server.mode = "silent"
    sc.wait(lambda: (b := sc.backend("vllm-e2e")) and b["last_error"] == "no response", "the reason: no response")
    assert s.prom_query('ALERTS{alertname="LLMBackendDown", backend="vllm-e2e", alertstate="firing"}')
    assert not sc.pages("resolved", **labels)

    # 200 again: resolved at the pager, up in the API with the last error kept
    back_at = time.time()
    server.mode = "ok"
    hits = sc.wait(lambda: sc.pages("resolved", **labels), "the resolved LLMBackendDown of vllm-e2e")
    note, alert = hits[0]
    assert alert["status"] == "resolved" and note["received_at"] >= back_at
    assert not alert["endsAt"].startswith("0001")
    b = sc.wait(lambda: (b := sc.backend("vllm-e2e")) and b["state"] == "up" and not b["alerts"] and b,
                "vllm-e2e up again in the API")
    assert b["last_error"] == "no response" and back_at - 2 <= b["since"] <= back_at + 3, (b, back_at)
    assert b["last_error_at"] < b["since"]


def test_a_closed_port_is_down_with_its_reason(scenario: Scenario) -> None:
    sc = scenario
    labels = {"alertname": "LLMBackendDown", "severity": "critical", "backend": "retired-box"}
    _, alert = sc.wait(lambda: sc.pages("firing", **labels), "LLMBackendDown of the closed port")[0]
    target = f"127.0.0.1:{sc.refused_port}"
    assert alert["labels"] == {**labels, "job": "llm-backends", "instance": target, "module": "tcp_connect"}
    desc = _check_annotations(alert, "LLMBackendDown")
    assert re.fullmatch(rf"Backend retired-box failed its last \d+ tcp_connect probes of {re.escape(target)} "
                        r"\(down after 3\); last failure: connect failed\.", desc), desc
    b = sc.backend("retired-box")
    assert b and b["state"] == "down" and b["last_error"] == "connect failed"
    assert b["since"] is None, "no success within the lookback: since when is not known"
    assert b["probes"][0]["last_success"] is None


@pytest.mark.skipif(not ICMP_OK, reason=ICMP_WHY)
def test_icmp_to_loopback_succeeds(scenario: Scenario) -> None:
    sc = scenario
    sc.wait(lambda: sc.stack.prom_query('probe_success{backend="loopback", module="icmp"} == 1'), "a ping answered")
    rtt = sc.stack.prom_query('probe_icmp_duration_seconds{backend="loopback", phase="rtt"}')
    assert rtt and 0 < float(rtt[0]["value"][1]) < 1
    b = sc.wait(lambda: sc.backend("loopback"), "loopback in the API")
    assert b["state"] == "up" and b["probes"][0]["module"] == "icmp"


def test_a_certificate_about_to_expire_pages(scenario: Scenario) -> None:
    sc = scenario
    labels = {"alertname": "LLMBackendCertificateExpiring", "severity": "critical", "backend": "gateway-tls"}
    _, alert = sc.wait(lambda: sc.pages("firing", **labels), "the critical certificate alert")[0]
    desc = _check_annotations(alert, "LLMBackendCertificateExpiring")
    assert re.fullmatch(r"The TLS certificate chain of https://127\.0\.0\.1:\d+/health \(backend gateway-tls\) "
                        r"expires in (1\.9|2\.0) days, on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC\.", desc), desc
    # its warning twin fires in Prometheus and is held back in Alertmanager
    twin = sc.wait(lambda: [a for a in sc.stack.am_alerts(alertname="LLMBackendCertificateExpiring", severity="warning")
                            if a["status"]["state"] == "suppressed"], "the warning twin held back")
    assert twin[0]["labels"]["backend"] == "gateway-tls"
    b = sc.backend("gateway-tls")
    assert b and b["state"] == "up" and 1.9 * 86400 < b["probes"][0]["cert_expires"] - time.time() <= 2 * 86400


def test_pipeline_ran_clean(scenario: Scenario) -> None:
    s = scenario.stack
    assert not rule_errors(s)
    for name in ("prometheus", "blackbox"):
        errors = [line for line in s.log(name).splitlines() if "level=error" in line]
        assert not errors, "\n".join(errors[-10:])
    failures = [line for line in s.log("alertmanager").splitlines() if "level=error" in line or "level=warn" in line]
    assert not failures, "\n".join(failures[-10:])
