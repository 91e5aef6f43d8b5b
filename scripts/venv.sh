#!/usr/bin/env bash
# Makes the project's virtual environment (.venv) and installs the package into it, editable,
# with the extras named as arguments:
#
#   scripts/venv.sh              # what `make run` needs
#   scripts/venv.sh test         # plus the test extras (`make test`)
#   PYTHON=python3.12 scripts/venv.sh test
#
# Why a virtual environment: Debian 12, Ubuntu 23.04 and later, Fedora and Homebrew mark their
# Python "externally managed" (PEP 668), and its pip refuses to install outside one.
#
# A second run is fast: the environment is kept while it was made from the same interpreter
# (PYTHON, default python3), and pip runs only when pyproject.toml or the extras asked for
# changed (the stamp file .venv/.installed records both). Where the interpreter lacks the venv
# module (Debian's and Ubuntu's python3 without python3-venv), the Debian package is installed
# with apt-get, as root or through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.installed"

say() { printf 'venv: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "installing Debian packages needs root: run as root or install sudo"; fi
}

apt_install() {
  say "installing Debian packages: $*"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The lowest Python version pyproject.toml accepts ("requires-python = ">=3.11"" -> 3.11).
need="$(sed -n 's/^requires-python *= *"[^0-9]*\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)"
[ -n "$need" ] || die "pyproject.toml: no requires-python"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  if [ "$PYTHON" = python3 ] && command -v apt-get >/dev/null 2>&1; then
    apt_install python3 python3-venv
  else
    die "$PYTHON not found: llm-usage-exporter needs Python >= $need (choose one with: make PYTHON=python3.X ...)"
  fi
fi

# Interpreter facts in one start-up: version, major.minor, and the real path of its binary.
# Written so that even Python 2 prints them, for the version message below.
read -r have_version have_mm have_exe < <("$PYTHON" -c '
import os, sys
v = sys.version_info
print("%d.%d.%d %d.%d %s" % (v[0], v[1], v[2], v[0], v[1], os.path.realpath(sys.executable)))') \
  || die "$PYTHON does not run"
if ! "$PYTHON" -c "import sys; sys.exit(0 if sys.version_info[:2] >= tuple(map(int, '$need'.split('.'))) else 1)"; then
  die "llm-usage-exporter needs Python >= $need, but $PYTHON is $have_version ($have_exe); install a newer one and pass it, e.g. make PYTHON=python3.12 run"
fi

# Keep an existing environment that runs and was made from this interpreter (same binary and
# major.minor); otherwise make it anew.
venv_id=""
if [ -x "$VENV/bin/python" ]; then
  venv_id="$("$VENV/bin/python" -c '
import os, sys
b = getattr(sys, "_base_executable", sys.executable)
print("%s (Python %d.%d)" % (os.path.realpath(b), sys.version_info[0], sys.version_info[1]))' 2>/dev/null || true)"
fi
if [ "$venv_id" != "$have_exe (Python $have_mm)" ]; then
  if [ -n "$venv_id" ]; then
    say "$VENV was made by $venv_id; making it anew with $have_exe"
    rm -rf "$VENV"
  elif [ -e "$VENV" ]; then
    say "$VENV is incomplete or its interpreter no longer runs; making it anew"
    rm -rf "$VENV"
  fi
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 \
        && dpkg -S "$have_exe" >/dev/null 2>&1; then
      # Debian and Ubuntu ship venv's ensurepip apart from the interpreter.
      apt_install "python$have_mm-venv"
    else
      die "$PYTHON ($have_exe) has no venv/ensurepip module: install your system's venv package for Python $have_mm, or pass another interpreter with make PYTHON=..."
    fi
  fi
  say "making $VENV with $have_exe (Python $have_version)"
  if ! "$PYTHON" -m venv "$VENV"; then
    rm -rf "$VENV"
    die "$PYTHON -m venv $VENV failed (see above)"
  fi
fi

# Install when pyproject.toml changed, or an extra is asked for that is not installed yet. The
# extras installed before are kept (`make test` then `make run` installs nothing).
key="$(sha256sum pyproject.toml | cut -d' ' -f1)"
old_key=""; old_extras=""
if [ -f "$STAMP" ]; then
  { read -r old_key || true; read -r old_extras || true; } < "$STAMP"
fi
extras="$(printf '%s\n' ${old_extras//,/ } "$@" | sed '/^$/d' | sort -u | paste -sd, -)"
if [ "$key" = "$old_key" ] && [ "$extras" = "$old_extras" ]; then
  exit 0
fi
spec="."; [ -z "$extras" ] || spec=".[$extras]"
say "installing llm-usage-exporter${extras:+ with [$extras]} into $VENV (pip; a minute or two the first time)"
rm -f "$STAMP"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
printf '%s\n%s\n' "$key" "$extras" > "$STAMP"
