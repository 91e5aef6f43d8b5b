"""The Alertmanager side: alertmanager.yml, its routes, inhibitions and templates.

`amtool` checks the configuration, resolves every alert of the rule files to its receiver
and renders the notification templates. A real Alertmanager then runs the shipped
configuration (only the delivery addresses and timings changed) to show that critical
alerts silence their warning twins, that a down exporter silences the alerts built on it,
and that the opt-in Slack and email channels deliver the templated messages.
"""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
AM_DIR = ROOT / "alertmanager"
AM_CONFIG = AM_DIR / "alertmanager.yml"
RULES_DIR = ROOT / "prometheus" / "rules"
EXPORTER_WEBHOOK = "http://exporter:9473/api/alertmanager/webhook"

AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason="amtool is not installed (Debian package prometheus-alertmanager)")
needs_alertmanager = pytest.mark.skipif(ALERTMANAGER is None, reason="alertmanager is not installed (Debian package prometheus-alertmanager)")


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert AMTOOL is not None
    return subprocess.run([AMTOOL, *args], cwd=AM_DIR, capture_output=True, text=True, timeout=60)


def routed_receivers(labels: dict[str, str]) -> list[str]:
    """The receivers `amtool config routes test` resolves for an alert with these labels."""
    result = amtool("config", "routes", "test", "--config.file=alertmanager.yml",
                    *(f"{k}={v}" for k, v in sorted(labels.items())))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().split(",")


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(r for r in group["rules"] if "alert" in r)
    return rules


def expected_receiver(alertname: str, severity: str) -> str:
    if alertname == "Watchdog":
        return "watchdog"
    return {"critical": "pager", "warning": "chat", "info": "ticket"}[severity]


ALERT_CASES = sorted({(r["alert"], r["labels"]["severity"]) for r in alert_rules()})


# --- amtool ---------------------------------------------------------------------------


@needs_amtool
def test_alertmanager_config_is_valid() -> None:
    result = amtool("check-config", "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 templates" in result.stdout and "SUCCESS" in result.stdout, result.stdout


def test_every_rule_file_alert_is_covered() -> None:
    assert len(ALERT_CASES) >= 20
    assert ("Watchdog", "info") in ALERT_CASES


@needs_amtool
@pytest.mark.parametrize(("alertname", "severity"), ALERT_CASES, ids=lambda v: str(v))
def test_every_alert_reaches_its_severity_receiver(alertname: str, severity: str) -> None:
    rule = next(r for r in alert_rules() if r["alert"] == alertname and r["labels"]["severity"] == severity)
    labels = {"alertname": alertname, **rule["labels"], "app": "chat", "provider": "openai", "model": "gpt-4o"}
    assert routed_receivers(labels) == [expected_receiver(alertname, severity)]


@needs_amtool
@pytest.mark.parametrize(("labels", "receivers"), [
    # opt-in channels add to the severity receiver, they never replace it
    ({"alertname": "LLMCostSpike", "severity": "critical", "notify_slack": "true"}, ["slack", "pager"]),
    ({"alertname": "LLMCostSpike", "severity": "warning", "notify_slack": "true"}, ["slack", "chat"]),
    ({"alertname": "LLMLabelOverflow", "severity": "info", "notify_slack": "true"}, ["ticket"]),
    ({"alertname": "LLMCostSpike", "severity": "critical", "notify_email": "true"}, ["email", "pager"]),
    ({"alertname": "LLMCostSpike", "severity": "warning", "notify_email": "true"}, ["chat"]),
    ({"alertname": "LLMLabelOverflow", "severity": "info", "notify_email": "true"}, ["email", "ticket"]),
    ({"alertname": "LLMExporterDown", "severity": "critical", "notify_slack": "true", "notify_email": "true"},
     ["slack", "email", "pager"]),
    ({"alertname": "LLMCostSpike", "severity": "critical", "notify_slack": "false"}, ["pager"]),
    # the Watchdog never reaches a person, whatever its labels
    ({"alertname": "Watchdog", "severity": "info", "notify_slack": "true", "notify_email": "true"}, ["watchdog"]),
    # anything else falls through to the default receiver
    ({"alertname": "SomethingElse"}, ["default"]),
    ({"alertname": "SomethingElse", "severity": "page"}, ["default"]),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_opt_in_channels_and_fallbacks(labels: dict[str, str], receivers: list[str]) -> None:
    assert routed_receivers(labels) == receivers


def test_every_receiver_posts_to_the_exporter_out_of_the_box() -> None:
    config = yaml.safe_load(AM_CONFIG.read_text())
    for receiver in config["receivers"]:
        if receiver["name"] in ("slack", "email"):
            continue
        urls = [w["url"] for w in receiver.get("webhook_configs") or []]
        assert urls == [EXPORTER_WEBHOOK], receiver["name"]


def test_no_secret_in_the_config() -> None:
    config = yaml.safe_load(AM_CONFIG.read_text())
    text = AM_CONFIG.read_text()
    assert "hooks.slack.com" not in text
    slack = next(r for r in config["receivers"] if r["name"] == "slack")["slack_configs"][0]
    assert "api_url" not in slack and slack["api_url_file"].startswith("/etc/alertmanager/secrets/")
    assert "smtp_auth_password" not in config["global"]
    assert config["global"]["smtp_auth_password_file"].startswith("/etc/alertmanager/secrets/")


# --- templates ------------------------------------------------------------------------

TEMPLATE_DATA = {
    "receiver": "slack", "status": "firing", "externalURL": "http://localhost:9093", "version": "4",
    "groupKey": "{}:{alertname=\"LLMCostSpike\"}", "truncatedAlerts": 0,
    "groupLabels": {"alertname": "LLMCostSpike", "app": "chat"},
    "commonLabels": {"alertname": "LLMCostSpike", "severity": "critical", "app": "chat", "scope": "app",
                     "signal": "cost_per_hour"},
    "commonAnnotations": {},
    "alerts": [{
        "status": "firing", "fingerprint": "0123456789abcdef",
        "labels": {"alertname": "LLMCostSpike", "severity": "critical", "app": "chat", "scope": "app",
                   "signal": "cost_per_hour"},
        "annotations": {
            "summary": "LLM spend is far above its usual level",
            "description": "Cost over the last hour for app chat is 5.0x its baseline: $10.00/h against a baseline of $2.00/h (robust z 4.0).",
            "runbook_url": "https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbook.md#llmcostspike"},
        "startsAt": "2026-01-05T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://localhost:9090/graph?g0.expr=llm_anomaly_ratio"}],
}


@pytest.fixture
def template_data(tmp_path: Path) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(TEMPLATE_DATA))
    return path


def render(template_data: Path, name: str, kind: str = "text") -> str:
    result = amtool("template", "render", "--template.glob=templates/*.tmpl", f"--template.data={template_data}",
                    f"--template.type={kind}", f'--template.text={{{{ template "{name}" . }}}}')
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_amtool
def test_title_template(template_data: Path) -> None:
    assert render(template_data, "llm.title").strip() == "[FIRING:1] LLMCostSpike (critical) app=chat"


@needs_amtool
def test_slack_templates(template_data: Path) -> None:
    text = render(template_data, "llm.slack.text")
    assert "*LLM spend is far above its usual level* (app chat [cost_per_hour])" in text
    assert "5.0x its baseline" in text
    assert "<https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbook.md#llmcostspike|Runbook>" in text
    assert render(template_data, "llm.slack.color").strip() == "danger"
    assert render(template_data, "llm.slack.title_link").strip().endswith("#llmcostspike")


@needs_amtool
def test_email_templates(template_data: Path) -> None:
    text = render(template_data, "llm.email.text")
    assert "Severity: critical. Since: 2026-01-05 10:00 UTC." in text
    assert "Runbook: https://github.com/" in text
    html = render(template_data, "llm.email.html", "html")
    assert "<strong>LLM spend is far above its usual level</strong>" in html
    assert 'href="https://github.com/llm-usage-exporter/llm-usage-exporter/blob/main/docs/runbook.md#llmcostspike"' in html


# --- a real Alertmanager ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Captured:
    """Notifications received by the fake endpoints: webhook/Slack posts and SMTP mails."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.mails: list[str] = []
        self.lock = threading.Lock()

    def webhook_alerts(self, receiver: str) -> list[dict[str, Any]]:
        with self.lock:
            return [a for path, body in self.posts if path == f"/{receiver}" for a in body.get("alerts", [])]

    def slack(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for path, body in self.posts if path == "/slack-api"]


def http_capture(captured: Captured) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with captured.lock:
                captured.posts.append((self.path, json.loads(body)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def smtp_capture(captured: Captured) -> socketserver.ThreadingTCPServer:
    """Just enough SMTP (no TLS, no AUTH advertised) to receive Alertmanager's mail."""
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"220 localhost ESMTP test\r\n")
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                cmd = line.decode(errors="replace").strip().upper()
                if cmd.startswith(("EHLO", "HELO")):
                    self.wfile.write(b"250-localhost\r\n250 8BITMIME\r\n")
                elif cmd == "DATA":
                    self.wfile.write(b"354 end with .\r\n")
                    data = []
                    while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                        data.append(chunk.decode(errors="replace"))
                    with captured.lock:
                        captured.mails.append("".join(data))
                    self.wfile.write(b"250 queued\r\n")
                elif cmd == "QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                else:
                    self.wfile.write(b"250 ok\r\n")

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def local_config(config: dict[str, Any], http_port: int, smtp_port: int, slack_url_file: Path) -> dict[str, Any]:
    """The shipped config with local delivery addresses and second-long timings, nothing else."""
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs") or []:
            assert hook["url"] == EXPORTER_WEBHOOK
            hook["url"] = f"http://127.0.0.1:{http_port}/{receiver['name']}"
        for slack in receiver.get("slack_configs") or []:
            slack["api_url_file"] = str(slack_url_file)
    config["global"]["smtp_smarthost"] = f"127.0.0.1:{smtp_port}"
    config["global"]["smtp_require_tls"] = False

    def fast(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            route[key] = "1s"
        for child in route.get("routes") or []:
            fast(child)
    fast(config["route"])
    return config


class RunningAlertmanager:
    def __init__(self, url: str, captured: Captured) -> None:
        self.url = url
        self.captured = captured

    def post(self, alerts: list[dict[str, Any]]) -> None:
        now = datetime.now(timezone.utc)
        body = [{"labels": a["labels"], "annotations": a.get("annotations", {}),
                 "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(),
                 "generatorURL": "http://localhost:9090/graph"} for a in alerts]
        req = urllib.request.Request(f"{self.url}/api/v2/alerts", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as r:
            return json.loads(r.read())

    def inhibited(self) -> dict[tuple[str, str], bool]:
        """(alertname, distinguishing label) -> whether Alertmanager marks it inhibited."""
        out = {}
        for a in self.alerts():
            lab = a["labels"]
            key = (lab["alertname"], lab.get("severity", "") + "|" + lab.get("app", lab.get("instance", "")))
            out[key] = bool(a["status"]["inhibitedBy"])
        return out


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[RunningAlertmanager]:
    captured = Captured()
    http_server = http_capture(captured)
    smtp_server = smtp_capture(captured)
    http_port, smtp_port = http_server.server_address[1], smtp_server.server_address[1]
    slack_url_file = tmp_path / "slack_webhook_url"
    slack_url_file.write_text(f"http://127.0.0.1:{http_port}/slack-api\n")
    workdir = tmp_path / "alertmanager"
    shutil.copytree(AM_DIR / "templates", workdir / "templates")
    config = local_config(yaml.safe_load(AM_CONFIG.read_text()), http_port, smtp_port, slack_url_file)
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("w")
    assert ALERTMANAGER is not None
    proc = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={workdir / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=debug"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError("alertmanager exited:\n" + (tmp_path / "alertmanager.log").read_text())
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False
    try:
        wait_for(ready, "alertmanager to start")
        yield RunningAlertmanager(url, captured)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        http_server.shutdown()
        smtp_server.shutdown()


def alert(alertname: str, severity: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": alertname, "severity": severity, **labels},
            "annotations": {"summary": f"{alertname} summary", "description": f"{alertname} {severity} description",
                            "runbook_url": f"https://example.org/runbook.md#{alertname.lower()}"}}


EXP = {"instance": "exporter:9473", "job": "llm-usage-exporter"}


@pytest.mark.e2e
@needs_alertmanager
def test_inhibitions_and_deliveries(alertmanager: RunningAlertmanager) -> None:
    am = alertmanager
    cost = {"scope": "app", "signal": "cost_per_hour", **EXP}
    am.post([
        alert("LLMCostSpike", "critical", app="chat", **cost),
        alert("LLMCostSpike", "warning", app="chat", **cost),            # twin of the critical one
        alert("LLMCostSpike", "warning", app="search", **cost),          # no critical twin
        alert("LLMIngestStalled", "warning", instance="exporter-b:9473", job="llm-usage-exporter"),
        alert("LLMRequestRateDrop", "warning", scope="global", signal="request_rate",
              instance="exporter-b:9473", job="llm-usage-exporter"),   # caused by the stall there
        alert("LLMRequestRateDrop", "warning", scope="global", signal="request_rate", **EXP),
        alert("LLMMonthlyBudgetNearlySpent", "info", app="chat", period="month", notify_email="true", **EXP),
        alert("LLMRunawaySessions", "critical", app="agent", reason="session_cost", notify_slack="true", **EXP),
        alert("Watchdog", "info"),
    ])
    cap = am.captured
    wait_for(lambda: len(cap.webhook_alerts("pager")) >= 2 and cap.webhook_alerts("chat") and cap.webhook_alerts("ticket")
             and cap.webhook_alerts("watchdog") and cap.slack() and cap.mails, "every receiver to be notified")
    time.sleep(2.5)  # a few more group intervals: anything wrongly delivered would show now

    assert am.inhibited() == {
        ("LLMCostSpike", "critical|chat"): False,
        ("LLMCostSpike", "warning|chat"): True,
        ("LLMCostSpike", "warning|search"): False,
        ("LLMIngestStalled", "warning|exporter-b:9473"): False,
        ("LLMRequestRateDrop", "warning|exporter-b:9473"): True,
        ("LLMRequestRateDrop", "warning|exporter:9473"): False,
        ("LLMMonthlyBudgetNearlySpent", "info|chat"): False,
        ("LLMRunawaySessions", "critical|agent"): False,
        ("Watchdog", "info|"): False,
    }

    def names(receiver: str) -> set[tuple[str, str]]:
        return {(a["labels"]["alertname"], a["labels"].get("app") or a["labels"].get("instance", ""))
                for a in cap.webhook_alerts(receiver)}
    assert names("pager") == {("LLMCostSpike", "chat"), ("LLMRunawaySessions", "agent")}
    assert names("chat") == {("LLMCostSpike", "search"), ("LLMIngestStalled", "exporter-b:9473"),
                             ("LLMRequestRateDrop", "exporter:9473")}
    assert names("ticket") == {("LLMMonthlyBudgetNearlySpent", "chat")}
    assert names("watchdog") == {("Watchdog", "")}
    assert names("default") == set()

    # Slack: only the opted-in alert, rendered with the shipped templates
    slack = cap.slack()
    assert len(slack) == 1
    attachment = slack[0]["attachments"][0]
    assert attachment["title"] == "[FIRING:1] LLMRunawaySessions (critical) app=agent"
    assert attachment["title_link"] == "https://example.org/runbook.md#llmrunawaysessions"
    assert attachment["color"] == "danger"
    assert "*LLMRunawaySessions summary* (app agent [session_cost])" in attachment["text"]
    assert "LLMRunawaySessions critical description" in attachment["text"]

    # email: only the opted-in alert, subject and body from the shipped templates
    assert len(cap.mails) == 1
    mail = cap.mails[0]
    assert "Subject: [FIRING:1] LLMMonthlyBudgetNearlySpent (info) app=chat" in mail
    assert "To: llm-oncall@example.com" in mail
    assert "LLMMonthlyBudgetNearlySpent info description" in mail


@pytest.mark.e2e
@needs_alertmanager
def test_exporter_down_silences_the_alerts_built_on_it(alertmanager: RunningAlertmanager) -> None:
    am = alertmanager
    job = {"job": EXP["job"]}
    am.post([
        alert("LLMExporterDown", "critical", **EXP),
        alert("LLMErrorRatioHigh", "warning", provider="openai", model="gpt-4o", **job),
        alert("LLMBudgetBurnRate", "critical", app="chat", **job),
        alert("LLMIngestStalled", "warning", **EXP),
        # another deployment of the exporter under the same Alertmanager: still watched
        alert("LLMBudgetBurnRate", "critical", app="search", job="staging"),
        alert("Watchdog", "info"),
    ])
    cap = am.captured
    wait_for(lambda: len(cap.webhook_alerts("pager")) >= 2 and bool(cap.webhook_alerts("watchdog")), "the pages")
    wait_for(lambda: am.inhibited().get(("LLMBudgetBurnRate", "critical|chat")) is True, "the inhibition")
    time.sleep(2.5)
    assert am.inhibited() == {
        ("LLMExporterDown", "critical|exporter:9473"): False,
        ("LLMErrorRatioHigh", "warning|"): True,
        ("LLMBudgetBurnRate", "critical|chat"): True,
        ("LLMIngestStalled", "warning|exporter:9473"): True,
        ("LLMBudgetBurnRate", "critical|search"): False,
        ("Watchdog", "info|"): False,
    }
    assert {(a["labels"]["alertname"], a["labels"].get("job", "")) for a in cap.webhook_alerts("pager")} == {
        ("LLMExporterDown", "llm-usage-exporter"), ("LLMBudgetBurnRate", "staging")}
    assert cap.webhook_alerts("chat") == []


@pytest.mark.e2e
@needs_alertmanager
def test_a_down_shard_leaves_the_other_shards_alerts_alone(alertmanager: RunningAlertmanager) -> None:
    """Shard b of a deployment (one job, an instance per shard) cannot be scraped: its own
    alerts and the deployment's alerts built on sums over the shards (no instance) are held
    back; shard a's anomaly and stalled-ingest alerts still arrive."""
    am = alertmanager
    job = {"job": EXP["job"]}
    cost = {"category": "anomaly", "scope": "app", "signal": "cost_per_hour"}
    am.post([
        alert("LLMExporterDown", "critical", instance="shard-b:9473", **job),
        alert("LLMCostSpike", "critical", app="chat", instance="shard-a:9473", **cost, **job),
        alert("LLMCostSpike", "critical", app="search", instance="shard-b:9473", **cost, **job),
        alert("LLMIngestStalled", "warning", instance="shard-a:9473", **job),
        alert("LLMIngestStalled", "warning", instance="shard-b:9473", **job),
        alert("LLMBudgetBurnRate", "critical", app="chat", **job),
    ])
    cap = am.captured
    wait_for(lambda: am.inhibited().get(("LLMBudgetBurnRate", "critical|chat")) is True, "the inhibition")
    wait_for(lambda: len(cap.webhook_alerts("pager")) >= 2, "the pages")
    time.sleep(2.5)
    held = {(a["labels"]["alertname"], a["labels"].get("instance", "")): bool(a["status"]["inhibitedBy"])
            for a in am.alerts()}
    assert held == {
        ("LLMExporterDown", "shard-b:9473"): False,
        ("LLMCostSpike", "shard-a:9473"): False,
        ("LLMCostSpike", "shard-b:9473"): True,
        ("LLMIngestStalled", "shard-a:9473"): False,
        ("LLMIngestStalled", "shard-b:9473"): True,
        ("LLMBudgetBurnRate", ""): True,
    }
    assert {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in cap.webhook_alerts("pager")} == {
        ("LLMExporterDown", "shard-b:9473"), ("LLMCostSpike", "shard-a:9473")}


@pytest.mark.e2e
@needs_alertmanager
def test_one_deployment_never_silences_another(alertmanager: RunningAlertmanager) -> None:
    """Two deployments of the exporter (jobs prod and staging) whose exporters are named
    alike (the HA layout's instance "exporter") see the same model and app: staging's page,
    critical anomaly and stalled ingest silence staging's own warnings, never prod's."""
    am = alertmanager
    model = {"provider": "openai", "model": "gpt-4o"}
    app = {"category": "anomaly", "scope": "app", "app": "chat", "instance": "exporter"}
    am.post([alert("LLMErrorRatioHigh", "critical", job="staging", **model)] + [
        a for job in ("staging", "prod") for a in (
            alert("LLMErrorRatioHigh", "warning", job=job, **model),
            alert("LLMTokenVelocitySpike", "warning", signal="token_velocity", job=job, **app),
            alert("LLMRequestRateDrop", "warning", category="anomaly", scope="global", signal="request_rate",
                  instance="exporter", job=job),
        )] + [
        alert("LLMCostSpike", "critical", signal="cost_per_hour", job="staging", **app),
        alert("LLMIngestStalled", "warning", instance="exporter", job="staging"),
    ])
    wait_for(lambda: any(a["status"]["inhibitedBy"] for a in am.alerts()), "the first inhibition")
    time.sleep(2.5)
    held = {(a["labels"]["alertname"], a["labels"]["severity"], a["labels"]["job"]): bool(a["status"]["inhibitedBy"])
            for a in am.alerts()}
    assert held == {
        ("LLMErrorRatioHigh", "critical", "staging"): False,
        ("LLMErrorRatioHigh", "warning", "staging"): True,
        ("LLMErrorRatioHigh", "warning", "prod"): False,
        ("LLMCostSpike", "critical", "staging"): False,
        ("LLMTokenVelocitySpike", "warning", "staging"): True,
        ("LLMTokenVelocitySpike", "warning", "prod"): False,
        ("LLMIngestStalled", "warning", "staging"): False,
        ("LLMRequestRateDrop", "warning", "staging"): True,
        ("LLMRequestRateDrop", "warning", "prod"): False,
    }


@pytest.mark.e2e
@needs_alertmanager
def test_each_deployment_gets_its_own_notifications(alertmanager: RunningAlertmanager) -> None:
    """Two deployments (jobs prod and staging, exporters named alike) see the same app and
    model at once. Each deployment's cost and token anomalies of the app arrive together, in
    a page of their own, and each deployment's latency warning of the model in its own chat
    message: no notification mixes the deployments."""
    am = alertmanager
    app = {"category": "anomaly", "scope": "app", "app": "chat", "instance": "exporter"}
    model = {"provider": "openai", "model": "gpt-4o"}
    am.post([a for job in ("prod", "staging") for a in (
        alert("LLMCostSpike", "critical", signal="cost_per_hour", job=job, **app),
        alert("LLMTokenVelocitySpike", "critical", signal="token_velocity", job=job, **app),
        shipped("LLMModelLatencyHigh", "warning", job=job, **model),
    )])
    cap = am.captured

    def notes(receiver: str) -> list[dict[str, Any]]:
        with cap.lock:
            return [body for path, body in cap.posts if path == f"/{receiver}"]
    wait_for(lambda: len({a["labels"]["job"] for n in notes("pager") for a in n["alerts"]}) == 2
             and len({a["labels"]["job"] for n in notes("chat") for a in n["alerts"]}) == 2, "both deployments' notifications")
    time.sleep(2.5)  # a few more group intervals: a late notification would show now

    pages = notes("pager")
    assert sorted((n["groupLabels"].get("job"), sorted(a["labels"]["alertname"] for a in n["alerts"])) for n in pages) == [
        ("prod", ["LLMCostSpike", "LLMTokenVelocitySpike"]), ("staging", ["LLMCostSpike", "LLMTokenVelocitySpike"])]
    for n in pages:
        assert n["groupLabels"] == {"category": "anomaly", "job": n["groupLabels"]["job"], "scope": "app", "app": "chat"}
        assert {a["labels"]["job"] for a in n["alerts"]} == {n["groupLabels"]["job"]}
    chats = notes("chat")
    assert sorted(str(n["groupLabels"].get("job")) for n in chats) == ["prod", "staging"]
    for n in chats:
        assert n["groupLabels"] == {"category": "anomaly", "job": n["groupLabels"]["job"], "scope": "model", **model}
        assert [a["labels"]["job"] for a in n["alerts"]] == [n["groupLabels"]["job"]]


def shipped(alertname: str, severity: str, **labels: str) -> dict[str, Any]:
    """An alert as the shipped rule of that name and severity raises it: the rule's static
    labels (category, scope) with the series labels given."""
    rule = next(r for r in alert_rules() if r["alert"] == alertname and r["labels"]["severity"] == severity)
    return alert(alertname, severity, **{k: v for k, v in rule["labels"].items() if k != "severity"}, **labels)


@pytest.mark.e2e
@needs_alertmanager
def test_a_scopes_detector_alerts_join_its_anomaly_notification(alertmanager: RunningAlertmanager) -> None:
    """An app's retry storm: its request-rate spike and error-rate anomaly (the exporter
    names the app: the model's other traffic did not fail), its invocation spike and its
    runaway sessions. A model's error storm: its error-rate anomaly, its quality drift and
    its fixed error ratio (LLMErrorRatioHigh), with its latency above the fixed threshold.
    Each scope's alerts, with their labels from the shipped rules (the anomaly alerts take
    `scope` from their series, the detectors' and performance rules set it), arrive in one
    page; the warnings of a scope with a critical anomaly wait."""
    am = alertmanager
    app = {"app": "support-chat", **EXP}
    model = {"provider": "anthropic", "model": "claude-3-5-haiku", **EXP}
    deployment_model = {k: v for k, v in model.items() if k != "instance"}
    am.post([
        shipped("LLMRequestRateSpike", "critical", signal="request_rate", scope="app", **app),
        shipped("LLMErrorRateSpike", "critical", signal="error_rate", scope="app", **app),
        shipped("LLMInvocationSpike", "warning", **app),
        shipped("LLMRunawaySessions", "critical", reason="session_cost", **app),
        shipped("LLMErrorRateSpike", "critical", signal="error_rate", scope="model", **model),
        shipped("LLMQualityDrift", "critical", **model),
        shipped("LLMQualityDrift", "warning", **model),
        # the fixed per-model alerts read sums over the deployment's exporters: no instance
        shipped("LLMErrorRatioHigh", "critical", **deployment_model),
        shipped("LLMModelLatencyHigh", "warning", **deployment_model),
    ])
    cap = am.captured

    def pages() -> list[dict[str, Any]]:
        with cap.lock:
            return [body for path, body in cap.posts if path == "/pager"]
    wait_for(lambda: {a["labels"]["alertname"] for n in pages() for a in n["alerts"]} >= {
        "LLMRequestRateSpike", "LLMErrorRateSpike", "LLMRunawaySessions", "LLMQualityDrift"}, "both scopes' pages")
    time.sleep(2.5)  # a few more group intervals: a split notification would show now

    by_group = {tuple(sorted(n["groupLabels"].items())): sorted(a["labels"]["alertname"] for a in n["alerts"])
                for n in pages()}
    assert by_group == {
        (("app", "support-chat"), ("category", "anomaly"), ("job", EXP["job"]), ("scope", "app")):
            ["LLMErrorRateSpike", "LLMRequestRateSpike", "LLMRunawaySessions"],
        (("category", "anomaly"), ("job", EXP["job"]), ("model", "claude-3-5-haiku"), ("provider", "anthropic"),
         ("scope", "model")): ["LLMErrorRateSpike", "LLMErrorRatioHigh", "LLMQualityDrift"],
    }
    # the warnings wait on their scope's page
    assert am.inhibited()[("LLMInvocationSpike", "warning|support-chat")]
    assert am.inhibited()[("LLMModelLatencyHigh", "warning|")]
    assert not cap.webhook_alerts("chat")


@pytest.mark.e2e
@needs_alertmanager
def test_a_cost_page_holds_the_budget_burn_it_explains(alertmanager: RunningAlertmanager) -> None:
    """An app's runaway spend pages as its cost anomaly; the burn-rate alerts of its own
    budget and of the overall budget wait on that page. Another app's burn, and another
    deployment's, still page."""
    am = alertmanager
    job = EXP["job"]
    am.post([
        shipped("LLMCostSpike", "critical", signal="cost_per_hour", scope="app", app="agent", **EXP),
        shipped("LLMBudgetBurnRate", "critical", app="agent", job=job),
        shipped("LLMBudgetBurnRate", "warning", app="agent", job=job),
        shipped("LLMBudgetBurnRate", "critical", job=job),
        shipped("LLMBudgetBurnRate", "critical", app="search", job=job),
        shipped("LLMBudgetBurnRate", "critical", job="staging"),
    ])
    wait_for(lambda: am.inhibited().get(("LLMBudgetBurnRate", "critical|")) is not None
             and any(a["status"]["inhibitedBy"] for a in am.alerts()), "the inhibitions")
    time.sleep(2.5)
    held = {(a["labels"]["alertname"], a["labels"]["severity"], a["labels"].get("app", ""), a["labels"]["job"]):
            bool(a["status"]["inhibitedBy"]) for a in am.alerts()}
    assert held == {
        ("LLMCostSpike", "critical", "agent", job): False,
        ("LLMBudgetBurnRate", "critical", "agent", job): True,
        ("LLMBudgetBurnRate", "warning", "agent", job): True,
        ("LLMBudgetBurnRate", "critical", "", job): True,
        ("LLMBudgetBurnRate", "critical", "search", job): False,
        ("LLMBudgetBurnRate", "critical", "", "staging"): False,
    }
    pages = {(a["labels"]["alertname"], a["labels"].get("app", ""), a["labels"]["job"])
             for a in am.captured.webhook_alerts("pager")}
    assert pages == {("LLMCostSpike", "agent", job), ("LLMBudgetBurnRate", "search", job),
                     ("LLMBudgetBurnRate", "", "staging")}


BACKEND = {"job": "llm-backends", "kind": "vllm"}


@pytest.mark.e2e
@needs_alertmanager
def test_a_down_backend_silences_what_it_explains(alertmanager: RunningAlertmanager) -> None:
    """LLMBackendDown holds back the request-rate and error alerts of its provider and model
    (the join on the labels of its entry in prometheus/backends.yml), and of every model of
    its provider when the entry names no model; nothing else. A host that does not answer
    ping holds back its other probes' alerts; the prober being down, the probes not running."""
    am = alertmanager
    vllm = {"provider": "hosted_vllm", "model": "llama-3.1-8b"}
    model_scope = {"scope": "model", **EXP}
    am.post([
        # the model's backend is down ...
        alert("LLMBackendDown", "critical", backend="vllm-a", module="http_health", instance="http://gpu-1:8000/health",
              **vllm, **BACKEND),
        # ... which explains its requests dropping, spiking (retries) and failing
        alert("LLMRequestRateDrop", "critical", signal="request_rate", **model_scope, **vllm),
        alert("LLMRequestRateSpike", "warning", signal="request_rate", **model_scope, **vllm),
        alert("LLMErrorRateSpike", "critical", signal="error_rate", **model_scope, **vllm),
        alert("LLMErrorRatioHigh", "critical", **vllm),
        # ... not its cost, nor another model's errors, nor all traffic (no provider/model)
        alert("LLMCostSpike", "critical", signal="cost_per_hour", **model_scope, **vllm),
        alert("LLMErrorRateSpike", "critical", signal="error_rate", **model_scope, provider="hosted_vllm",
              model="qwen-7b"),
        alert("LLMRequestRateDrop", "warning", signal="request_rate", scope="global", **EXP),
        # an Ollama server with many models: its entry names the provider only
        alert("LLMBackendDown", "critical", backend="ollama-gpu2", module="http_ollama",
              instance="http://gpu-2:11434/api/version", provider="ollama", job="llm-backends"),
        alert("LLMErrorRatioHigh", "warning", provider="ollama", model="llama3.1:8b"),
        alert("LLMErrorRateSpike", "warning", signal="error_rate", **model_scope, provider="ollama", model="qwen2:7b"),
        # a gateway without provider and model explains nothing about the traffic
        alert("LLMBackendDown", "critical", backend="gateway", module="http_openai_models",
              instance="https://gw/v1/models", job="llm-backends"),
        alert("LLMErrorRatioHigh", "warning", provider="openai", model="gpt-4o"),
        # gpu-3: its host does not answer ping, so its port and HTTP probes fail too
        alert("LLMBackendDown", "critical", backend="gpu-3", module="icmp", instance="gpu-3", job="llm-backends"),
        alert("LLMBackendDown", "critical", backend="gpu-3", module="tcp_connect", instance="gpu-3:8000",
              job="llm-backends"),
        alert("LLMBackendDown", "critical", backend="gpu-3", module="http_health", instance="http://gpu-3:8000/health",
              job="llm-backends"),
        # a down probe is not also flapping or slow ...
        alert("LLMBackendFlapping", "warning", backend="vllm-a", module="http_health",
              instance="http://gpu-1:8000/health", **vllm, **BACKEND),
        # ... but another backend's slowness is its own
        alert("LLMBackendProbeSlow", "warning", backend="tgi", module="http_health", instance="http://tgi/health",
              job="llm-backends"),
        # the prober down: the probes that cannot run are no news
        alert("LLMBackendProberDown", "critical", instance="blackbox-exporter:9115", job="blackbox-exporter"),
        alert("LLMBackendProbeScrapeFailing", "warning", backend="tgi", module="http_health",
              instance="http://tgi/health", job="llm-backends"),
    ])
    wait_for(lambda: any(a["status"]["inhibitedBy"] for a in am.alerts()), "the first inhibition")
    time.sleep(2.5)

    def key(a: dict[str, Any]) -> tuple[str, ...]:
        lab = a["labels"]
        return (lab["alertname"], lab.get("backend") or lab.get("signal") or "", lab.get("module") or lab.get("scope", ""),
                lab.get("model", ""))
    held = {key(a): bool(a["status"]["inhibitedBy"]) for a in am.alerts()}
    assert held == {
        ("LLMBackendDown", "vllm-a", "http_health", "llama-3.1-8b"): False,
        ("LLMRequestRateDrop", "request_rate", "model", "llama-3.1-8b"): True,
        ("LLMRequestRateSpike", "request_rate", "model", "llama-3.1-8b"): True,
        ("LLMErrorRateSpike", "error_rate", "model", "llama-3.1-8b"): True,
        ("LLMErrorRatioHigh", "", "", "llama-3.1-8b"): True,
        ("LLMCostSpike", "cost_per_hour", "model", "llama-3.1-8b"): False,
        ("LLMErrorRateSpike", "error_rate", "model", "qwen-7b"): False,
        ("LLMRequestRateDrop", "request_rate", "global", ""): False,
        ("LLMBackendDown", "ollama-gpu2", "http_ollama", ""): False,
        ("LLMErrorRatioHigh", "", "", "llama3.1:8b"): True,
        ("LLMErrorRateSpike", "error_rate", "model", "qwen2:7b"): True,
        ("LLMBackendDown", "gateway", "http_openai_models", ""): False,
        ("LLMErrorRatioHigh", "", "", "gpt-4o"): False,
        ("LLMBackendDown", "gpu-3", "icmp", ""): False,
        ("LLMBackendDown", "gpu-3", "tcp_connect", ""): True,
        ("LLMBackendDown", "gpu-3", "http_health", ""): True,
        ("LLMBackendFlapping", "vllm-a", "http_health", "llama-3.1-8b"): True,
        ("LLMBackendProbeSlow", "tgi", "http_health", ""): False,
        ("LLMBackendProberDown", "", "", ""): False,
        ("LLMBackendProbeScrapeFailing", "tgi", "http_health", ""): True,
    }
    # who holds what back: the backend, not the exporter, for the model's own alerts
    by_fp = {a["fingerprint"]: a["labels"] for a in am.alerts()}
    for a in am.alerts():
        lab = a["labels"]
        if lab.get("model") == "llama-3.1-8b" and a["status"]["inhibitedBy"] and lab["alertname"] != "LLMBackendFlapping":
            sources = {by_fp[f]["alertname"] for f in a["status"]["inhibitedBy"]}
            assert "LLMBackendDown" in sources, (lab, sources)


@pytest.mark.e2e
@needs_alertmanager
def test_the_exporter_down_leaves_the_backend_alerts_alone(alertmanager: RunningAlertmanager) -> None:
    """The probes do not go through the exporter: its outage silences the usage alerts only."""
    am = alertmanager
    am.post([
        alert("LLMExporterDown", "critical", **EXP),
        alert("LLMErrorRatioHigh", "warning", provider="openai", model="gpt-4o", job=EXP["job"]),
        alert("LLMBackendDown", "critical", backend="vllm-a", module="http_health", instance="http://gpu-1:8000/health",
              job="llm-backends"),
        alert("LLMBackendProberDown", "critical", instance="blackbox-exporter:9115", job="blackbox-exporter"),
    ])
    wait_for(lambda: am.inhibited().get(("LLMErrorRatioHigh", "warning|")) is True, "the inhibition")
    time.sleep(2.5)
    assert am.inhibited() == {
        ("LLMExporterDown", "critical|exporter:9473"): False,
        ("LLMErrorRatioHigh", "warning|"): True,
        ("LLMBackendDown", "critical|http://gpu-1:8000/health"): False,
        ("LLMBackendProberDown", "critical|blackbox-exporter:9115"): False,
    }
    wait_for(lambda: {a["labels"]["alertname"] for a in am.captured.webhook_alerts("pager")}
             == {"LLMExporterDown", "LLMBackendDown", "LLMBackendProberDown"}, "the three pages")
