"""Static checks of docker-compose.ha.yml, the HA pair on VictoriaMetrics, and its configs.

No Docker engine is needed: the file is parsed and checked against the repository (pinned
images, loopback-only ports, host paths that exist, the services every flag names), and
vmagent checks its scrape configuration itself. tests/test_e2e_victoriametrics.py runs the
same layout natively, with the same scrape configuration and rule files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import REPO, load_stack  # noqa: E402

COMPOSE = REPO / "docker-compose.ha.yml"
SCRAPE = REPO / "deploy" / "vmagent" / "scrape.yml"
VM_IMAGES = ("victoriametrics/victoria-metrics", "victoriametrics/vmagent", "victoriametrics/vmalert")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _flags(service: dict[str, Any]) -> dict[str, str]:
    out = {}
    for arg in service.get("command") or []:
        name, _, value = str(arg).lstrip("-").partition("=")
        out[name] = value
    return out


def test_the_services_of_the_layout(services: dict[str, Any]) -> None:
    assert set(services) == {"exporter-a", "exporter-b", "victoria-metrics", "vmagent", "vmalert", "alertmanager",
                             "grafana", "blackbox-exporter"}


def test_images_are_pinned_and_the_victoriametrics_ones_are_the_tested_release(services: dict[str, Any]) -> None:
    main = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name, svc in services.items():
        image = svc["image"]
        if name.startswith("exporter"):
            assert image == main["exporter"]["image"] and svc["build"] == main["exporter"]["build"]
            continue
        repo, _, tag = image.rpartition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a release"
        if repo in VM_IMAGES:
            assert tag.startswith("v1.79."), f"{name}: the rules in prometheus/vmalert/ are made for vmalert 1.79"
        elif name in main:
            assert image == main[name]["image"], f"{name}: another image than docker-compose.yml's"


def test_ports_are_loopback_only_and_distinct(services: dict[str, Any]) -> None:
    host_ports = []
    for name, svc in services.items():
        for p in svc.get("ports") or []:
            assert str(p).startswith("127.0.0.1:"), f"{name}: {p}"
            host_ports.append(str(p).split(":")[1])
    assert len(host_ports) == len(set(host_ports))


def test_bind_mounts_exist(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for v in svc.get("volumes") or []:
            src = str(v).split(":")[0]
            if src.startswith("."):
                assert (REPO / src).exists(), f"{name}: {src} does not exist"


def test_the_replicas_keep_their_own_store_and_one_takes_the_webhooks(services: dict[str, Any]) -> None:
    a, b = services["exporter-a"], services["exporter-b"]
    data = [next(v for v in s["volumes"] if str(v).endswith(":/data")) for s in (a, b)]
    assert data[0] != data[1]
    assert a["command"] == b["command"] and "--db=/data/usage.db" in a["command"]
    # alertmanager.yml's receivers post to http://exporter:9473
    am = (REPO / "alertmanager" / "alertmanager.yml").read_text()
    assert "http://exporter:9473/api/alertmanager/webhook" in am
    assert "exporter" in a["networks"]["default"]["aliases"]


def test_vmalert_runs_the_generated_rules_against_victoriametrics(services: dict[str, Any]) -> None:
    vmalert = services["vmalert"]
    assert "./prometheus/vmalert:/etc/vmalert:ro" in vmalert["volumes"]
    flags = _flags(vmalert)
    assert flags["rule"] == "/etc/vmalert/*.yml"
    for key in ("datasource.url", "remoteWrite.url", "remoteRead.url"):
        assert flags[key] == "http://victoria-metrics:8428", key
    assert flags["notifier.url"] == "http://alertmanager:9093"
    agent = _flags(services["vmagent"])
    assert agent["remoteWrite.url"] == "http://victoria-metrics:8428/api/v1/write"
    assert "./deploy/vmagent/scrape.yml:/etc/vmagent/scrape.yml:ro" in services["vmagent"]["volumes"]


def test_the_scrape_configuration_makes_one_exporter_of_the_pair(services: dict[str, Any]) -> None:
    doc = yaml.safe_load(SCRAPE.read_text())
    job = next(j for j in doc["scrape_configs"] if j["job_name"] == "llm-usage-exporter")
    targets = {t: sc["labels"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"exporter-a:9473": {"instance": "exporter", "replica": "a"},
                       "exporter-b:9473": {"instance": "exporter", "replica": "b"}}
    hosts = {t.rsplit(":", 1)[0] for j in doc["scrape_configs"] for sc in j.get("static_configs", [])
             for t in sc["targets"]}
    assert hosts <= set(services), hosts - set(services)


def _rule_jobs() -> set[str]:
    """Every job the shipped rules select by name (`job="..."`)."""
    return {m for path in (REPO / "prometheus" / "rules").glob("*.yml")
            for m in re.findall(r'\bjob="([^"]+)"', path.read_text())}


def _vmagent_file(services: dict[str, Any], name: str) -> Path:
    """The repository file vmagent reads as `name` beside its scrape configuration (a bind mount)."""
    mounts = {dst: src for src, dst, *_ in (str(v).split(":") for v in services["vmagent"]["volumes"])}
    src = mounts.get(f"/etc/vmagent/{name}")
    assert src is not None, f"docker-compose.ha.yml does not mount {name} beside vmagent's scrape.yml"
    return REPO / src


def test_every_job_the_rules_need_is_scraped_as_prometheus_scrapes_it(services: dict[str, Any]) -> None:
    """The backend rules (and any other rule that names a job) have data in the HA layout too.

    vmalert loads every rule file; a job the rules read that vmagent never scrapes leaves its
    alerts without data (LLMBackendDown never fires) or, for `up{job=...} == 0`, silent. The
    probe job is the main Prometheus config's own: the same /probe path, relabelling and
    target list (prometheus/backends.yml, mounted beside scrape.yml), through a blackbox
    exporter the HA file runs with docker-compose.yml's image and modules.
    """
    doc = yaml.safe_load(SCRAPE.read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    needed = _rule_jobs()
    assert {"llm-backends", "blackbox-exporter"} <= needed
    assert needed <= set(jobs), f"rules read jobs vmagent does not scrape: {sorted(needed - set(jobs))}"
    assert any(re.fullmatch(_exporter_health_job(), j) for j in jobs), "vmagent scrapes no exporter job"

    prom = {j["job_name"]: j for j in yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    probe, prom_probe = jobs["llm-backends"], prom["llm-backends"]
    assert probe["metrics_path"] == prom_probe["metrics_path"] == "/probe"
    assert probe["relabel_configs"] == prom_probe["relabel_configs"]
    files = [f for sd in probe["file_sd_configs"] for f in sd["files"]]
    assert [_vmagent_file(services, f) for f in files] == [REPO / "prometheus" / "backends.yml"]

    # the prober the relabelling sends every probe to, and its own scrape
    prober = next(r["replacement"] for r in probe["relabel_configs"] if r.get("target_label") == "__address__")
    assert prober.rsplit(":", 1)[0] in services
    assert [t for sc in jobs["blackbox-exporter"]["static_configs"] for t in sc["targets"]] == [prober]
    main = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["blackbox-exporter"]
    box = services["blackbox-exporter"]
    assert box["image"] == main["image"] and box["command"] == main["command"]
    assert box["volumes"] == main["volumes"]


EXPORTER_HEALTH_ALERTS = ("LLMExporterDown", "LLMExporterReplicaDown", "LLMIngestStalled")


def _exporter_health_job() -> str:
    """The one job selector (`job=~"..."`, a regular expression) the exporter's own health
    alerts use."""
    doc = yaml.safe_load((REPO / "prometheus" / "rules" / "exporter.yml").read_text())
    exprs = [r["expr"] for g in doc["groups"] for r in g["rules"] if r.get("alert") in EXPORTER_HEALTH_ALERTS]
    assert len(exprs) == len(EXPORTER_HEALTH_ALERTS)
    assert not any(re.search(r'\bjob="', e) for e in exprs), "a health alert selects one job name only"
    names = {m for e in exprs for m in re.findall(r'\bjob=~"([^"]+)"', e)}
    assert len(names) == 1, names
    return names.pop()


def _shipped_scrape_configs() -> dict[str, list[dict[str, Any]]]:
    """Every scrape configuration the project ships, by where it comes from: the files the
    compose files mount (a mounted directory: its YAML files), the native stack's rewrite of
    prometheus.yml, and the YAML examples of the README and docs/."""
    out: dict[str, list[dict[str, Any]]] = {}
    for compose in sorted(REPO.glob("docker-compose*.yml")):
        for service in yaml.safe_load(compose.read_text())["services"].values():
            for volume in service.get("volumes") or []:
                src = REPO / str(volume).split(":")[0]
                if not str(volume).startswith("./") or not src.exists():
                    continue
                for path in sorted(src.glob("*.yml")) if src.is_dir() else [src]:
                    if path.suffix in (".yml", ".yaml"):
                        doc = yaml.safe_load(path.read_text())
                        if isinstance(doc, dict) and "scrape_configs" in doc:
                            out[str(path.relative_to(REPO))] = doc["scrape_configs"]
    ports = {"exporter": 9473, "prometheus": 9090, "alertmanager": 9093, "blackbox": 9115}
    rendered, _ = load_stack().render_prometheus(yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text()),
                                                 ports, {}, fast=True, time_scale=60)
    out["scripts/stack.py (native stack)"] = rendered["scrape_configs"]
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", md.read_text(), re.S)):
            if "job_name" in block:
                doc = yaml.safe_load(block)
                jobs = doc["scrape_configs"] if isinstance(doc, dict) else doc
                out[f"{md.relative_to(REPO)} (example {i + 1})"] = jobs
    return out


def test_every_shipped_scrape_config_names_the_exporter_job_as_the_health_alerts_do() -> None:
    """LLMExporterDown, LLMExporterReplicaDown and LLMIngestStalled select the exporter's
    scrape jobs by name, `llm-usage-exporter` or `llm-usage-exporter-<deployment>`: an
    exporter scraped under any other name would have no down, replica-down or stall alert.
    Every shipped scrape configuration (and example) that scrapes an exporter (a target on
    its port, 9473) does so under such a name, one job per deployment."""
    pattern = _exporter_health_job()
    assert re.fullmatch(pattern, "llm-usage-exporter") and re.fullmatch(pattern, "llm-usage-exporter-staging")
    assert not re.fullmatch(pattern, "llm-usage-exporterx") and not re.fullmatch(pattern, "node")
    configs = _shipped_scrape_configs()
    assert {"prometheus/prometheus.yml", "deploy/vmagent/scrape.yml", "scripts/stack.py (native stack)"} <= set(configs)
    assert any(k.startswith("docs/scaling.md") for k in configs), sorted(configs)
    for source, jobs in configs.items():
        exporter_jobs = [j["job_name"] for j in jobs
                         if any(str(t).rsplit(":", 1)[-1] == "9473"
                                for sc in j.get("static_configs") or [] for t in sc.get("targets") or [])]
        assert exporter_jobs and all(re.fullmatch(pattern, j) for j in exporter_jobs), \
            f"{source} scrapes the exporter as {exporter_jobs}, the health alerts need a job matching {pattern!r}"
        assert len(set(exporter_jobs)) == len(exporter_jobs), f"{source}: one job per deployment"


@pytest.mark.skipif(shutil.which("vmagent") is None, reason="vmagent is not installed (Debian package victoria-metrics)")
def test_vmagent_accepts_the_scrape_configuration(services: dict[str, Any], tmp_path: Path) -> None:
    """vmagent checks scrape.yml laid out as in its container: every file the compose file
    mounts into /etc/vmagent (the backend list among them) beside it."""
    for v in services["vmagent"]["volumes"]:
        src, dst, *_ = str(v).split(":")
        if dst.startswith("/etc/vmagent/"):
            shutil.copy(REPO / src, tmp_path / dst.removeprefix("/etc/vmagent/"))
    p = subprocess.run(["vmagent", f"-promscrape.config={tmp_path / 'scrape.yml'}", "-promscrape.config.dryRun",
                        "-promscrape.config.strictParse"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_grafana_reads_victoriametrics_under_the_dashboards_datasource_uid(services: dict[str, Any]) -> None:
    assert "./deploy/grafana-vm:/etc/grafana/provisioning/datasources:ro" in services["grafana"]["volumes"]
    doc = yaml.safe_load((REPO / "deploy" / "grafana-vm" / "datasources.yaml").read_text())
    ds = {d["uid"]: d for d in doc["datasources"]}
    assert ds["prometheus"]["url"] == "http://victoria-metrics:8428"
    assert ds["alertmanager"]["url"] == "http://alertmanager:9093"
