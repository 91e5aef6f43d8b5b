"""scripts/stack.py, the native stack runner: config rewriting, and real Prometheus and
Alertmanager processes on free 127.0.0.1 ports (bounded in time, always cleaned up)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import REPO, load_stack  # noqa: E402

stack = load_stack()
Stack, StackError = stack.Stack, stack.StackError

HAVE_BINARIES = bool(stack.prometheus_binary() and stack.alertmanager_binary())
needs_binaries = pytest.mark.skipif(not HAVE_BINARIES, reason="prometheus / alertmanager binaries not installed")
SHIPPED_PROM = REPO / "prometheus" / "prometheus.yml"
SHIPPED_AM = REPO / "alertmanager" / "alertmanager.yml"
needs_shipped = pytest.mark.skipif(not (SHIPPED_PROM.is_file() and SHIPPED_AM.is_file()),
                                   reason="prometheus.yml / alertmanager.yml not in the repository yet")


def _shipped_rules() -> list[dict]:
    rules = []
    for f in sorted((REPO / "prometheus" / "rules").glob("*.yml")):
        for g in (yaml.safe_load(f.read_text()) or {}).get("groups", []) or []:
            rules.extend(g.get("rules", []) or [])
    return rules


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- pure functions

def test_durations():
    assert stack.parse_duration_ms("5m") == 300_000
    assert stack.parse_duration_ms("1h30m") == 5_400_000
    assert stack.parse_duration_ms("500ms") == 500
    assert stack.parse_duration_ms("0") == 0
    with pytest.raises(ValueError):
        stack.parse_duration_ms("5 minutes")
    assert stack.format_duration_ms(5_000) == "5s"
    assert stack.format_duration_ms(90_000) == "1m30s"
    assert stack.format_duration_ms(500) == "500ms"
    assert stack.scale_duration("5m", 60) == "5s"
    assert stack.scale_duration("4h", 60) == "4m"
    assert stack.scale_duration("30s", 60) == "500ms"
    assert stack.scale_duration("30s", 60, floor_ms=1000) == "1s"
    assert stack.scale_duration("0s", 60) == "0s"


def test_rewrite_addresses():
    ports = {"exporter": 1001, "prometheus": 1002, "alertmanager": 1003}
    assert stack.rewrite_addresses("http://exporter:9473/api/alertmanager/webhook", ports) == \
        "http://127.0.0.1:1001/api/alertmanager/webhook"
    assert stack.rewrite_addresses("alertmanager:9093", ports) == "127.0.0.1:1003"
    assert stack.rewrite_addresses("localhost:9090", ports) == "127.0.0.1:1002"
    # not a service address: left alone
    assert stack.rewrite_addresses("llm-usage-exporter:9473x", ports) == "llm-usage-exporter:9473x"
    assert stack.rewrite_addresses("grafana:3000", ports) == "grafana:3000"
    assert stack.rewrite_addresses("exporter:94730", ports) == "exporter:94730"
    assert stack.rewrite_addresses("blackbox-exporter:9115", {**ports, "blackbox": 1004}) == "127.0.0.1:1004"


SHIPPED_DOC = {
    "global": {"scrape_interval": "15s"},
    "scrape_configs": [
        {"job_name": "llm-backends", "metrics_path": "/probe", "file_sd_configs": [{"files": ["backends.yml"]}],
         "relabel_configs": [{"source_labels": ["__address__"], "target_label": "__param_target"},
                             {"target_label": "__address__", "replacement": "blackbox-exporter:9115"}]},
        {"job_name": "blackbox-exporter", "static_configs": [{"targets": ["blackbox-exporter:9115"]}]},
    ],
}


def test_render_prometheus_probes_through_the_native_prober():
    ports = {"exporter": 1, "prometheus": 2, "alertmanager": 3, "blackbox": 4}
    out, notes = stack.render_prometheus(SHIPPED_DOC, ports, {}, fast=False, time_scale=60)
    jobs = {j["job_name"]: j for j in out["scrape_configs"]}
    assert jobs["llm-backends"]["relabel_configs"][1]["replacement"] == "127.0.0.1:4"
    assert jobs["llm-backends"]["file_sd_configs"] == [{"files": ["backends.yml"]}]
    assert jobs["blackbox-exporter"]["static_configs"][0]["targets"] == ["127.0.0.1:4"]
    assert not notes
    # without the prober: both jobs go, with a note each
    out, notes = stack.render_prometheus(SHIPPED_DOC, ports, {}, fast=False, time_scale=60, absent=["blackbox"])
    assert out["scrape_configs"] == []
    assert len(notes) == 2 and any("llm-backends" in n and "127.0.0.1:4" in n for n in notes)


def test_render_blackbox_makes_the_token_path_native(tmp_path):
    doc = {"modules": {"m": {"prober": "http", "http": {"authorization": {
        "type": "Bearer", "credentials_file": "/etc/blackbox_exporter/secrets/openai_api_key"}}}}}
    out = stack.render_blackbox(doc, {"/etc/blackbox_exporter/secrets/": tmp_path / "s",
                                      "/etc/blackbox_exporter/": tmp_path / "bb"})
    assert out["modules"]["m"]["http"]["authorization"]["credentials_file"] == str(tmp_path / "s" / "openai_api_key")
    assert doc["modules"]["m"]["http"]["authorization"]["credentials_file"].startswith("/etc/"), "input unchanged"


@needs_shipped
@needs_binaries
def test_the_backends_to_probe_replace_the_shipped_list(tmp_path):
    groups = [{"targets": ["127.0.0.1:1"], "labels": {"backend": "closed", "module": "tcp_connect"}}]
    s = Stack(exporter=False, blackbox=True, backends=groups, workdir=tmp_path / "stack", keep_workdir=True)
    s.render()
    assert yaml.safe_load(s.backends_file.read_text()) == groups
    assert s.backends_file == s.workdir / "prometheus" / "backends.yml"
    bb = yaml.safe_load(s.blackbox_config.read_text())
    token = bb["modules"]["http_openai_models"]["http"]["authorization"]["credentials_file"]
    assert token == str(REPO / "deploy" / "blackbox-secrets" / "openai_api_key")
    s.write_backends([])
    assert yaml.safe_load(s.backends_file.read_text()) == []
    # the shipped list probes nothing until the user fills it
    shipped = Stack(exporter=False, blackbox=True, workdir=tmp_path / "shipped", keep_workdir=True)
    shipped.render()
    assert yaml.safe_load(shipped.backends_file.read_text()) == []
    # no prober: its jobs are not scraped, and the exporter's --prometheus-url is the stack's
    quiet = Stack(alertmanager=False, blackbox=False, workdir=tmp_path / "quiet", keep_workdir=True)
    quiet.render()
    jobs = {j["job_name"] for j in yaml.safe_load(quiet.prometheus_config.read_text())["scrape_configs"]}
    assert "llm-backends" not in jobs and "blackbox-exporter" not in jobs and "llm-usage-exporter" in jobs
    assert f"--prometheus-url={quiet.urls['prometheus']}" in quiet.commands()["exporter"]


def test_render_prometheus_fast(tmp_path):
    doc = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s", "scrape_timeout": "10s"},
        "rule_files": ["/etc/prometheus/rules/*.yml", "rules/*.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": ["alertmanager:9093"]}]}]},
        "scrape_configs": [
            {"job_name": "exporter", "scrape_interval": "30s", "static_configs": [{"targets": ["exporter:9473"]}]},
            {"job_name": "grafana", "static_configs": [{"targets": ["grafana:3000"]}]},
        ],
    }
    ports = {"exporter": 1, "prometheus": 2, "alertmanager": 3}
    out, notes = stack.render_prometheus(doc, ports, {"/etc/prometheus/": tmp_path}, fast=True, time_scale=60)
    assert out["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    assert out["rule_files"] == [str(tmp_path / "rules/*.yml"), "rules/*.yml"]
    assert out["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:3"]
    assert [j["job_name"] for j in out["scrape_configs"]] == ["exporter"]
    assert "scrape_interval" not in out["scrape_configs"][0]
    assert any("grafana:3000" in n for n in notes)
    assert doc["global"]["scrape_interval"] == "15s", "the input must not be modified"

    slow, _ = stack.render_prometheus(doc, ports, {}, fast=False, time_scale=60, absent=["alertmanager"])
    assert slow["global"]["scrape_interval"] == "15s"
    assert slow["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == []


def test_render_rules_changes_only_timing():
    doc = {"groups": [{"name": "g", "interval": "1m", "rules": [
        {"alert": "A", "expr": "rate(x[5m]) > 0", "for": "10m", "keep_firing_for": "5m", "labels": {"severity": "warning"}},
        {"record": "r:x:rate5m", "expr": "rate(x[5m])"},
        {"alert": "B", "expr": "vector(1)"},
    ]}]}
    out = stack.render_rules(doc, fast=True, time_scale=60)
    g = out["groups"][0]
    assert g["interval"] == "1s"
    assert g["rules"][0]["for"] == "10s" and g["rules"][0]["keep_firing_for"] == "5s"
    assert [r["expr"] for r in g["rules"]] == [r["expr"] for r in doc["groups"][0]["rules"]]
    assert "for" not in g["rules"][2]
    assert stack.render_rules(doc, fast=False, time_scale=60) is doc


def test_render_alertmanager(tmp_path):
    doc = {
        "global": {"resolve_timeout": "5m"},
        "templates": ["/etc/alertmanager/templates/*.tmpl"],
        "route": {"receiver": "hook", "group_wait": "30s", "routes": [{"receiver": "hook", "repeat_interval": "1h"}]},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": "http://exporter:9473/api/alertmanager/webhook"}],
                       "slack_configs": [{"api_url_file": "/etc/alertmanager/secrets/slack_webhook_url"}]}],
    }
    ports = {"exporter": 1, "prometheus": 2, "alertmanager": 3}
    path_map = {"/etc/alertmanager/secrets/": tmp_path / "secrets", "/etc/alertmanager/": tmp_path / "am"}
    out = stack.render_alertmanager(doc, ports, path_map, fast=True, time_scale=60)
    assert out["receivers"][0]["webhook_configs"][0]["url"] == "http://127.0.0.1:1/api/alertmanager/webhook"
    assert out["receivers"][0]["slack_configs"][0]["api_url_file"] == str(tmp_path / "secrets" / "slack_webhook_url")
    assert out["templates"] == [str(tmp_path / "am" / "templates/*.tmpl")]
    assert out["global"]["resolve_timeout"] == "5s"
    route = out["route"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == ("500ms", "5s", "4m")
    assert route["routes"][0]["repeat_interval"] == "1m"
    plain = stack.render_alertmanager(doc, ports, path_map, fast=False, time_scale=60)
    assert plain["route"]["group_wait"] == "30s" and "group_interval" not in plain["route"]


def test_ports_are_free_and_distinct():
    s = Stack(exporter=False)
    try:
        assert len(set(s.ports.values())) == len(stack.DEFAULT_PORTS) == 4
        assert all(u.startswith("http://127.0.0.1:") for u in s.urls.values())
    finally:
        s.stop()
    assert not s.workdir.exists()


# --------------------------------------------------------------------------- the shipped configs

@needs_shipped
@pytest.mark.parametrize("fast", [False, True])
def test_rendered_shipped_configs_pass_promtool_and_amtool(tmp_path, fast):
    import shutil as sh
    if not (sh.which("promtool") and sh.which("amtool")):
        pytest.skip("promtool / amtool not installed")
    s = Stack(fast=fast, workdir=tmp_path / "stack", keep_workdir=True)
    s.render()
    r = subprocess.run(["promtool", "check", "config", str(s.prometheus_config)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["amtool", "check-config", str(s.alertmanager_config)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rendered = (s.prometheus_config.read_text() + s.alertmanager_config.read_text())
    for name in ("exporter:9473", "alertmanager:9093", "localhost:9090", "blackbox-exporter:9115"):
        assert name not in rendered
    # timing only: every rule keeps its expression
    rendered_rules = []
    for f in sorted((s.workdir / "prometheus" / "rules").glob("*.yml")):
        for g in (yaml.safe_load(f.read_text()) or {}).get("groups", []) or []:
            rendered_rules.extend(g.get("rules", []) or [])
    shipped = _shipped_rules()
    assert [r["expr"] for r in rendered_rules] == [r["expr"] for r in shipped]
    if fast:
        for before, after in zip(shipped, rendered_rules):
            if before.get("for"):
                assert stack.parse_duration_ms(after["for"]) * 60 == pytest.approx(
                    stack.parse_duration_ms(before["for"]), abs=60)


@needs_binaries
@needs_shipped
@pytest.mark.e2e
def test_prometheus_and_alertmanager_with_shipped_configs():
    rules = _shipped_rules()
    watchdog = any(r.get("alert") == "Watchdog" for r in rules)
    pids = []
    with Stack(exporter=False, fast=True, ready_timeout=60) as s:
        pids = [p.pid for p in s.procs.values()]
        for name in ("prometheus", "alertmanager"):
            status, _ = stack.http_get(s.urls[name] + "/-/ready")
            assert status == 200, name
        if rules:
            groups = s.wait_for(s.prom_rule_groups, timeout=20, message="rules loaded")
            loaded = sum(len(g["rules"]) for g in groups)
            assert loaded == len(rules)
            # every rule evaluates without error
            def evaluated():
                gs = s.prom_rule_groups()
                return all(r.get("lastEvaluation", "").startswith("20") for g in gs for r in g["rules"]) and gs
            groups = s.wait_for(evaluated, timeout=20, message="every rule evaluated")
            errors = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
            assert not errors, errors
        if watchdog:
            found = s.wait_for(lambda: s.am_alerts(alertname="Watchdog"), timeout=45, message="Watchdog in Alertmanager")
            assert found[0]["status"]["state"] in ("active", "suppressed")
        workdir = s.workdir
    assert not workdir.exists()
    assert pids and not any(_pid_alive(p) for p in pids)


# --------------------------------------------------------------------------- the runner itself

def _mini_repo(root: Path) -> Path:
    (root / "prometheus" / "rules").mkdir(parents=True)
    (root / "alertmanager").mkdir()
    (root / "prometheus" / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["rules/*.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": ["alertmanager:9093"]}]}]},
        "scrape_configs": [{"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]}],
    }))
    (root / "prometheus" / "rules" / "meta.yml").write_text(yaml.safe_dump({"groups": [{"name": "meta", "rules": [
        {"alert": "Watchdog", "expr": "vector(1)", "labels": {"severity": "info"}},
        {"alert": "Slow", "expr": "vector(1)", "for": "4m", "labels": {"severity": "warning"}},
    ]}]}))
    (root / "alertmanager" / "alertmanager.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "null", "group_wait": "30s"}, "receivers": [{"name": "null"}]}))
    return root


@needs_binaries
@pytest.mark.e2e
def test_fast_mode_scales_for_durations(tmp_path):
    """`for: 4m` at time scale 60 fires after about 4 s, and reaches Alertmanager."""
    repo = _mini_repo(tmp_path / "repo")
    with Stack(exporter=False, fast=True, repo=repo, ready_timeout=60) as s:
        start = time.monotonic()
        s.wait_for(lambda: [a for a in s.prom_alerts() if a["labels"]["alertname"] == "Slow"
                            and a["state"] == "firing"], timeout=30, message="Slow firing")
        assert time.monotonic() - start < 25
        s.wait_for(lambda: s.am_alerts(alertname="Slow"), timeout=30, message="Slow in Alertmanager")


@needs_binaries
def test_port_in_use_is_reported_and_nothing_is_left_running(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = Stack(exporter=False, repo=repo, ports={"prometheus": port})
        with pytest.raises(StackError, match="in use"):
            with s:
                pass
        assert not s.procs


@needs_binaries
def test_a_process_that_dies_is_reported_with_its_log(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    (repo / "prometheus" / "rules" / "broken.yml").write_text("groups: [{name: b, rules: [{record: x, expr: 'sum('}]}]\n")
    s = Stack(exporter=False, repo=repo, ready_timeout=30)
    with pytest.raises(StackError, match="prometheus"):
        with s:
            pass
    assert not s.procs and not s.workdir.exists()


@needs_binaries
@pytest.mark.e2e
def test_cli_up_runs_until_interrupted(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "stack.py"), "up", "--fast", "--free-ports", "--no-exporter",
         "--repo", str(repo), "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "Ctrl-C" in out, out
        urls = [w for line in lines for w in line.split() if w.startswith("http://127.0.0.1:")]
        assert len(urls) == 2
        for u in urls:
            assert stack.http_get(u + "/-/ready")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        for u in urls:
            with pytest.raises(OSError):
                stack.http_get(u + "/-/ready", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_render(tmp_path):
    repo = _mini_repo(tmp_path / "repo")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "stack.py"), "render", "--out", str(out), "--fast",
                        "--repo", str(repo), "--ports", "exporter=1,prometheus=2,alertmanager=3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    prom = yaml.safe_load((out / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:2"]
    rules = yaml.safe_load((out / "prometheus" / "rules" / "meta.yml").read_text())
    assert rules["groups"][0]["rules"][1]["for"] == "4s"


@pytest.mark.e2e
@needs_binaries
def test_with_the_exporter(tmp_path):
    """The whole native stack: a record posted to the exporter shows up in Prometheus."""
    pytest.importorskip("exporter.cli")
    if not SHIPPED_PROM.is_file():
        pytest.skip("no prometheus.yml yet")
    with Stack(fast=True, alertmanager=SHIPPED_AM.is_file(), ready_timeout=60) as s:
        result = s.post_records([{"ts": time.time(), "provider": "openai", "model": "gpt-4o-mini", "app": "stack-test",
                                  "input_tokens": 100, "output_tokens": 20, "latency_s": 0.8}])
        assert result["accepted"] == 1
        series = s.wait_for(lambda: s.prom_query('llm_requests_total{app="stack-test"}'), timeout=30,
                            message="the record's counter in Prometheus")
        assert float(series[0]["value"][1]) == 1
        up = s.prom_query('up{job=~".*exporter.*"}')
        assert up and all(v["value"][1] == "1" for v in up)
