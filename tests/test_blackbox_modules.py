"""The shipped probe modules (blackbox/blackbox.yml) with the real blackbox exporter against
a model server on 127.0.0.1: each module succeeds on what its kind of server answers when it
can serve, and fails, with the metrics the rules read, when it cannot.

The exporter runs the shipped file as scripts/stack.py renders it (the token file's
container path made local); probes are asked for directly at /probe, as Prometheus does,
with a one-second scrape timeout so a silent server fails in half a second.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_server import ModelServer, self_signed_cert  # noqa: E402
from stack_util import REPO, blackbox_marks, icmp_allowed, load_stack  # noqa: E402

stack = load_stack()
pytestmark = blackbox_marks()
TOKEN = "sk-test-" + "x" * 16


class Prober:
    def __init__(self, url: str) -> None:
        self.url = url

    def probe(self, module: str, target: str) -> dict[str, float]:
        """One probe's metrics, `name{labels}` -> value."""
        q = urllib.parse.urlencode({"module": module, "target": target})
        req = urllib.request.Request(f"{self.url}/probe?{q}", headers={"X-Prometheus-Scrape-Timeout-Seconds": "1"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    cert = self_signed_cert(tmp_path_factory.mktemp("tls"), days=2)
    with ModelServer(tls=cert) as m:
        yield m


@pytest.fixture(scope="module")
def prober(tmp_path_factory: pytest.TempPathFactory, tls_server: ModelServer) -> Iterator[Prober]:
    work = tmp_path_factory.mktemp("blackbox")
    (work / "secrets").mkdir()
    (work / "secrets" / "openai_api_key").write_text(TOKEN + "\n")
    doc = stack.render_blackbox(yaml.safe_load((REPO / "blackbox" / "blackbox.yml").read_text()),
                                {"/etc/blackbox_exporter/secrets/": work / "secrets", "/etc/blackbox_exporter/": work})
    config = work / "blackbox.yml"
    config.write_text(yaml.safe_dump(doc))
    port = stack.free_ports(1)[0]
    assert tls_server.tls is not None
    env = {**os.environ, "SSL_CERT_FILE": str(tls_server.tls.cert)}     # Go reads its roots from here
    log = (work / "blackbox.log").open("wb")
    proc = subprocess.Popen([stack.blackbox_binary(), f"--config.file={config}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (work / "blackbox.log").read_text()
            try:
                if stack.http_get(url + "/-/healthy", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the blackbox exporter did not start"
            time.sleep(0.1)
        yield Prober(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer(token=TOKEN) as m:
        yield m


def test_the_shipped_config_passes_the_exporters_own_check(tmp_path: Path) -> None:
    r = subprocess.run([stack.blackbox_binary(), "--config.check", f"--config.file={REPO / 'blackbox' / 'blackbox.yml'}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    modules = set(yaml.safe_load((REPO / "blackbox" / "blackbox.yml").read_text())["modules"])
    assert modules == {"http_health", "http_ollama", "http_openai_models", "http_statuspage", "tcp_connect", "icmp"}


def test_http_health_up_error_and_silent(prober: Prober, server: ModelServer) -> None:
    ok = prober.probe("http_health", server.url + "/health")
    assert ok["probe_success"] == 1 and ok["probe_http_status_code"] == 200
    server.mode = "error"
    err = prober.probe("http_health", server.url + "/health")
    assert err["probe_success"] == 0 and err["probe_http_status_code"] == 503
    assert err["probe_failed_due_to_regex"] == 0
    server.mode = "silent"
    started = time.monotonic()
    silent = prober.probe("http_health", server.url + "/health")
    assert silent["probe_success"] == 0 and silent["probe_http_status_code"] == 0
    assert time.monotonic() - started < 3, "the probe must give up before the scrape times out"


def test_http_ollama_wants_its_version_answer(prober: Prober, server: ModelServer) -> None:
    assert prober.probe("http_ollama", server.url + "/api/version")["probe_success"] == 1
    # a 200 that is not Ollama's answer (a proxy's page in front of a stopped Ollama)
    other = prober.probe("http_ollama", server.url + "/health")
    assert other["probe_success"] == 0 and other["probe_failed_due_to_regex"] == 1


def test_http_openai_models_sends_the_token_from_the_file(prober: Prober, server: ModelServer) -> None:
    assert prober.probe("http_openai_models", server.url + "/v1/models")["probe_success"] == 1
    server.token = "another-token"          # the key was rotated on the server, not in the file
    refused = prober.probe("http_openai_models", server.url + "/v1/models")
    assert refused["probe_success"] == 0 and refused["probe_http_status_code"] == 401
    server.token = None
    wrong = prober.probe("http_openai_models", server.url + "/api/version")     # 200, but no model list
    assert wrong["probe_success"] == 0 and wrong["probe_failed_due_to_regex"] == 1


@pytest.mark.parametrize(("indicator", "success"), [("none", 1), ("minor", 1), ("major", 0), ("critical", 0)])
def test_http_statuspage_fails_on_a_major_incident(prober: Prober, server: ModelServer, indicator: str,
                                                   success: int) -> None:
    server.indicator = indicator
    result = prober.probe("http_statuspage", server.url + "/api/v2/status.json")
    assert result["probe_success"] == success
    assert result["probe_failed_due_to_regex"] == 1 - success


def test_tcp_connect_open_and_closed_port(prober: Prober, server: ModelServer) -> None:
    assert prober.probe("tcp_connect", f"127.0.0.1:{server.port}")["probe_success"] == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]          # bound, never listening: connections are refused
        result = prober.probe("tcp_connect", f"127.0.0.1:{closed}")
    assert result["probe_success"] == 0
    assert "probe_http_status_code" not in result and "probe_icmp_duration_seconds{phase=\"rtt\"}" not in result


def test_icmp_to_loopback(prober: Prober) -> None:
    allowed, why = icmp_allowed()
    if not allowed:
        pytest.skip(why)
    result = prober.probe("icmp", "127.0.0.1")
    assert result["probe_success"] == 1
    assert 'probe_icmp_duration_seconds{phase="rtt"}' in result


def test_tls_probe_reports_the_certificate_expiry(prober: Prober, tls_server: ModelServer) -> None:
    result = prober.probe("http_health", tls_server.url + "/health")
    assert result["probe_success"] == 1 and result["probe_http_ssl"] == 1
    days_left = (result["probe_ssl_earliest_cert_expiry"] - time.time()) / 86400
    assert 1.9 < days_left <= 2.0


