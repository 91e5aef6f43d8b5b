"""Static checks of docker-compose.yml, the Dockerfile and the compose-side configs.

No Docker engine is needed: the file is parsed with pyyaml and checked against the
repository (pinned images, health checks, host paths that exist, loopback-only ports).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import REPO, load_stack  # noqa: E402

COMPOSE = REPO / "docker-compose.yml"
ONE_SHOT = {"demo"}  # the traffic generator has no endpoint to check


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of every bind mount; named volumes are skipped."""
    out = []
    for v in service.get("volumes", []) or []:
        if isinstance(v, dict):
            if v.get("type") == "bind":
                out.append((v["source"], v["target"]))
            continue
        parts = v.split(":")
        if parts[0].startswith((".", "/")):
            out.append((parts[0], parts[1]))
    return out


def test_expected_services(services):
    assert {"exporter", "prometheus", "alertmanager", "grafana", "demo", "blackbox-exporter"} <= set(services)


def test_images_are_pinned(services):
    for name, svc in services.items():
        image = svc.get("image")
        if "build" in svc:
            continue  # built from this repository
        assert image, f"{name}: neither image nor build"
        assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{name}: image {image} has no tag"
        tag = image.rsplit(":", 1)[-1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: image {image} is not pinned to a version"


def test_healthchecks(services):
    for name, svc in services.items():
        if name in ONE_SHOT:
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no health check"
        assert hc.get("interval") and hc.get("timeout") and hc.get("retries")


def test_ports_bound_to_loopback(services):
    for name, svc in services.items():
        for p in svc.get("ports", []) or []:
            if isinstance(p, dict):
                assert p.get("host_ip") == "127.0.0.1", f"{name}: port {p} not bound to 127.0.0.1"
            else:
                assert str(p).startswith("127.0.0.1:"), f"{name}: port {p} not bound to 127.0.0.1"


def test_default_ports(services):
    assert "127.0.0.1:9473:9473" in services["exporter"]["ports"]
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    assert "127.0.0.1:9093:9093" in services["alertmanager"]["ports"]
    assert "127.0.0.1:3000:3000" in services["grafana"]["ports"]
    assert "127.0.0.1:9115:9115" in services["blackbox-exporter"]["ports"]


def test_host_paths_exist(services):
    for name, svc in services.items():
        for host, _ in _bind_mounts(svc):
            assert (REPO / host).exists(), f"{name}: mounted host path {host} does not exist"


def test_named_volumes_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []) or []:
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src and not src.startswith((".", "/")):
                assert src in declared, f"{name}: volume {src} is not declared"


def test_exporter_build(services):
    for name in ("exporter", "demo"):
        build = services[name]["build"]
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        assert (context / dockerfile).is_file(), f"{name}: no {dockerfile} in the build context"
    cmd = services["exporter"]["command"]
    assert cmd[0] == "serve"
    joined = " ".join(cmd)
    for flag in ("--host=0.0.0.0", "--port=9473", "--db=/data/usage.db",
                 "--config=/etc/llm-usage-exporter/config.yaml", "--allow-unauthenticated"):
        assert flag in joined
    mounts = dict((c, h) for h, c in _bind_mounts(services["exporter"]))
    assert mounts["/etc/llm-usage-exporter/config.yaml"] == "./deploy/exporter.yaml"


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "pip wheel" in text or "pip install" in text
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "the image must not run as root"
    assert re.search(r"^EXPOSE 9473$", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text and "urllib" in text
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        if src != ".":
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!exporter/", "!deploy/exporter.yaml", "!README.md"):
        assert needed in ignore, f".dockerignore must let {needed[1:]} into the build context"


def test_demo_profile(services):
    demo = services["demo"]
    assert demo.get("profiles") == ["demo"]
    assert demo["command"][:3] == ["demo", "--target", "http://exporter:9473"]
    assert demo["depends_on"]["exporter"]["condition"] == "service_healthy"
    # the image's HEALTHCHECK probes the exporter on 127.0.0.1, which the demo container is not
    assert (demo.get("healthcheck") or {}).get("disable") is True
    assert demo.get("init") is True, "the demo needs an init as PID 1 to stop on SIGTERM"
    for name, svc in services.items():
        if name != "demo":
            assert not svc.get("profiles"), f"{name} must start without a profile"


def test_readme_names_every_image():
    """The README says which images the stack runs; it must name the ones the files pin."""
    sys.path.insert(0, str(REPO / "scripts"))
    import compose_sandbox

    readme = (REPO / "README.md").read_text()
    for image in compose_sandbox.pinned_images(COMPOSE):
        assert f"`{image}`" in readme, f"README.md does not name the image {image}"


def test_prometheus_service(services):
    prom = services["prometheus"]
    cmd = prom["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in cmd
    assert "--storage.tsdb.retention.time=45d" in cmd
    assert "--web.enable-lifecycle" in cmd
    assert ("./prometheus", "/etc/prometheus") in _bind_mounts(prom)
    assert (REPO / "prometheus" / "prometheus.yml").is_file()


def test_alertmanager_service(services):
    am = services["alertmanager"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in am["command"]
    mounts = dict((c, h) for h, c in _bind_mounts(am))
    assert mounts["/etc/alertmanager/alertmanager.yml"] == "./alertmanager/alertmanager.yml"


def test_grafana_service(services):
    g = services["grafana"]
    env = g["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Admin"
    mounts = dict((c, h) for h, c in _bind_mounts(g))
    for sub in ("datasources", "dashboards"):
        host = mounts[f"/etc/grafana/provisioning/{sub}"]
        assert (REPO / host).is_dir() and list((REPO / host).glob("*.yaml")), f"no {sub} provisioning in {host}"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    host_dir = mounts[str(Path(home).parent)]
    assert (REPO / host_dir / Path(home).name).is_file(), f"home dashboard {home} is not a shipped file"


def test_service_addresses_match_the_configs(services):
    """The host names the shipped configs use are the compose service names and ports."""
    prom = (REPO / "prometheus" / "prometheus.yml").read_text()
    assert "exporter:9473" in prom and "alertmanager:9093" in prom and "blackbox-exporter:9115" in prom
    ds = (REPO / "grafana" / "provisioning" / "datasources").glob("*.yaml")
    urls = {d["url"] for f in ds for d in yaml.safe_load(f.read_text())["datasources"]}
    assert urls == {"http://prometheus:9090", "http://alertmanager:9093"}
    assert {"exporter", "prometheus", "alertmanager", "blackbox-exporter"} <= set(services)


def test_native_runner_maps_the_same_mounts(services):
    """scripts/stack.py resolves container paths to the directories compose mounts there."""
    stack = load_stack()
    prefixes = sorted(stack.CONTAINER_PATHS, key=len, reverse=True)
    for name in ("prometheus", "alertmanager", "blackbox-exporter"):
        for host, container in _bind_mounts(services[name]):
            path = container.rstrip("/") + "/"
            prefix = next((p for p in prefixes if path.startswith(p)), None)
            assert prefix, f"{name}: {container} is mounted in compose but unknown to scripts/stack.py"
            native = REPO / stack.CONTAINER_PATHS[prefix] / path[len(prefix):]
            assert native.resolve() == (REPO / host).resolve(), \
                f"{name}: compose mounts {host} at {container}, the native runner uses {native}"


def test_exporter_config_is_valid():
    """deploy/exporter.yaml loads with the exporter's own settings model."""
    config = pytest.importorskip("exporter.config")
    settings = config.load_settings(REPO / "deploy" / "exporter.yaml", environ={})
    assert settings.budgets.month_usd
    try:
        from exporter.detectors.budget import BudgetSettings
    except ImportError:
        return
    BudgetSettings.model_validate(settings.budgets.model_dump())


def test_blackbox_exporter_service(services):
    """The prober reads the shipped modules and the token files, and Prometheus (which
    probes through it) and the exporter (whose /api/backends reads Prometheus) know it."""
    bb = services["blackbox-exporter"]
    assert bb["command"] == ["--config.file=/etc/blackbox_exporter/blackbox.yml"]
    mounts = dict((c, h) for h, c in _bind_mounts(bb))
    assert mounts["/etc/blackbox_exporter/blackbox.yml"] == "./blackbox/blackbox.yml"
    assert mounts["/etc/blackbox_exporter/secrets"] == "./deploy/blackbox-secrets"
    modules = yaml.safe_load((REPO / "blackbox" / "blackbox.yml").read_text())["modules"]
    token = modules["http_openai_models"]["http"]["authorization"]["credentials_file"]
    assert token.startswith("/etc/blackbox_exporter/secrets/")
    assert "blackbox-exporter" in services["prometheus"]["depends_on"]
    assert "--prometheus-url=http://prometheus:9090" in services["exporter"]["command"]
    job = next(j for j in yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
               if j["job_name"] == "llm-backends")
    assert {"target_label": "__address__", "replacement": "blackbox-exporter:9115"} in job["relabel_configs"]


def test_secrets_are_not_committed():
    ignore = (REPO / "deploy" / "alertmanager-secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignore and "!README" in ignore
    assert (REPO / "deploy" / "alertmanager-secrets" / "README").is_file()
    ignore = (REPO / "deploy" / "blackbox-secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignore and "!README" in ignore
    assert (REPO / "deploy" / "blackbox-secrets" / "README").is_file()
