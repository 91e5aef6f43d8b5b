"""The parts of scripts/compose_sandbox.py and the compose test that need no Docker: which
images get stand-ins, what a stand-in's Dockerfile says, and what the test's override changes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import compose_sandbox as sandbox  # noqa: E402


@pytest.mark.parametrize("image, expected", [
    ("prom/prometheus:v2.53.1", ("prom/prometheus", "v2.53.1")),
    ("docker.io/prom/alertmanager:v0.27.0", ("prom/alertmanager", "v0.27.0")),
    ("python:3.11-slim-bookworm", ("python", "3.11-slim-bookworm")),
    ("docker.io/library/python:3.11", ("python", "3.11")),
    ("localhost:5000/tool", ("localhost:5000/tool", "latest")),
])
def test_split_image(image, expected):
    assert sandbox.split_image(image) == expected


def test_pinned_images_are_the_compose_files_and_the_dockerfiles():
    assert sandbox.pinned_images(REPO / "docker-compose.yml") == [
        "python:3.11-slim-bookworm", "prom/prometheus:v2.53.1", "prom/alertmanager:v0.27.0",
        "prom/blackbox-exporter:v0.25.0", "grafana/grafana:11.2.0"]


def test_dockerfile_bases_skip_stage_names(tmp_path):
    df = tmp_path / "Dockerfile"
    df.write_text("FROM python:3.11-slim AS build\nRUN true\nFROM --platform=linux/amd64 build AS again\n"
                  "FROM debian:bookworm\nCOPY --from=build /x /x\n")
    assert sandbox.dockerfile_bases(df) == ["python:3.11-slim", "debian:bookworm"]


def test_every_image_but_grafana_has_a_stand_in():
    missing = [i for i in sandbox.pinned_images() if not sandbox.standin_for(i)]
    assert missing == ["grafana/grafana:11.2.0"]


@pytest.mark.parametrize("image", ["python:3.12-slim-bookworm", "prom/prometheus:v3.0.0", "prom/alertmanager:latest",
                                   "prom/blackbox-exporter:master"])
def test_no_stand_in_where_debian_has_another_release(image):
    assert sandbox.standin_for(image) is None


@pytest.mark.parametrize("image, user, entrypoint, volume", [
    ("prom/prometheus:v2.53.1", "nobody", "/bin/prometheus", "/prometheus"),
    ("prom/alertmanager:v0.27.0", "nobody", "/bin/alertmanager", "/alertmanager"),
])
def test_stand_ins_have_the_upstream_user_entrypoint_and_volume(image, user, entrypoint, volume):
    text = sandbox.standin_for(image).dockerfile(image)
    assert text.startswith(f"FROM {sandbox.BASE_IMAGE}\n")
    assert f"\nUSER {user}\n" in text
    assert f'ENTRYPOINT ["{entrypoint}"]' in text
    assert f'VOLUME ["{volume}"]' in text and "chown -R nobody:nogroup" in text
    assert f'{sandbox.STANDIN_LABEL}="{image}"' in text
    # the compose file's health checks call wget, as busybox has it upstream
    assert "wget" in sandbox.standin_for(image).packages


def test_blackbox_exporter_stand_in_runs_as_root_like_upstream():
    """Upstream's image sets no user (ICMP probes need raw sockets) and has no data volume;
    its default configuration is /etc/blackbox_exporter/config.yml."""
    image = "prom/blackbox-exporter:v0.25.0"
    standin = sandbox.standin_for(image)
    assert standin is not None and "prometheus-blackbox-exporter" in standin.packages and "wget" in standin.packages
    text = standin.dockerfile(image)
    assert "\nUSER " not in text and "VOLUME" not in text and "chown" not in text
    assert "ln -s prometheus-blackbox-exporter /usr/bin/blackbox_exporter" in text
    assert "cp /etc/prometheus/blackbox.yml /etc/blackbox_exporter/config.yml" in text
    assert "\nEXPOSE 9115\n" in text
    assert text.rstrip().endswith('ENTRYPOINT ["/bin/blackbox_exporter"]\n'
                                  'CMD ["--config.file=/etc/blackbox_exporter/config.yml"]')


def test_override_only_switches_networking_and_maps_names():
    config = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    override = sandbox.host_network_override(config)["services"]
    assert set(override) == set(config["services"])
    names = sorted(f"{n}:127.0.0.1" for n in config["services"])
    for name, svc in override.items():
        assert svc.pop("network_mode") == "host"
        assert sorted(svc.pop("extra_hosts")) == names
        if "build" in config["services"][name]:
            assert svc.pop("build") == {"network": "host"}
        assert svc == {}, f"{name}: the override changes more than networking: {svc}"


@pytest.mark.parametrize("tag", ["hity3z7_", "_abc1234", "ab__cd12", "abcdefgh"])
def test_containerd_namespaces_are_valid_for_every_temporary_name(tag):
    """containerd refuses a namespace outside this pattern, and mkdtemp's names use `_`."""
    pattern = re.compile(r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$")
    namespace = sandbox.containerd_namespace(tag)
    assert pattern.match(namespace) and pattern.match(namespace + "-plugins"), namespace
    assert sandbox.containerd_namespace(tag) != sandbox.containerd_namespace("zzzzzzzz")
