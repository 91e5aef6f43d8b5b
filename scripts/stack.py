#!/usr/bin/env python3
"""Run the monitoring stack natively, without Docker: exporter, Prometheus, Alertmanager and
the blackbox exporter that probes the LLM backends.

Every process listens on 127.0.0.1. The configurations are the shipped ones
(`prometheus/prometheus.yml`, `prometheus/rules/*.yml`, `prometheus/backends.yml`,
`alertmanager/alertmanager.yml`, `blackbox/blackbox.yml`), copied into a working directory
and rewritten there:

* the compose host names (`exporter:9473`, `prometheus:9090`, `alertmanager:9093`,
  `blackbox-exporter:9115`, and their `localhost:` spellings) become `127.0.0.1:<port>` with
  the ports in use, in every string of the files (scrape targets, the prober's address, the
  Alertmanager address, webhook URLs);
* container paths (`/etc/prometheus/…`, `/etc/alertmanager/…`, `/etc/blackbox_exporter/…`)
  become the copies, and `/etc/alertmanager/secrets/…` and `/etc/blackbox_exporter/secrets/…`
  become `deploy/alertmanager-secrets/` and `deploy/blackbox-secrets/`, as docker-compose.yml
  mounts them;
* scrape jobs whose targets are services this runner does not start (Grafana, or the
  blackbox exporter when it is not started) are dropped.

The blackbox exporter is Debian's `prometheus-blackbox-exporter` (or upstream's
`blackbox_exporter`). By default it is started when the binary is installed and the
repository ships `blackbox/blackbox.yml`, and left out with a note otherwise; `--no-blackbox`
(`blackbox=False`) leaves it out, `blackbox=True` requires it. The backends it probes are
the shipped `prometheus/backends.yml`, or the target groups given as `backends=[...]`
(`write_backends()` changes them while the stack runs; Prometheus re-reads the file).

With `--fast` (`fast=True`) only timing changes, never an expression: the scrape and rule
evaluation intervals become 1s, and every `for:` / `keep_firing_for:` and rule group
`interval:` in the rule files, Prometheus' alert resend delay, and Alertmanager's
`group_wait`, `group_interval`, `repeat_interval` and `resolve_timeout` are divided by
`--time-scale` (default 60, so `for: 5m` becomes 5s and `repeat_interval: 4h` becomes 4m);
the exporter recomputes its gauges every second (`--evaluation-interval`, unless given).
Range selectors such as `[1h]` keep their length, so a rule still looks at the same amount of
data; feed it accordingly (for instance by backfilling history with the exporter).

Command line::

    python scripts/stack.py up [--fast] [--time-scale 60] [--free-ports]
                               [--ports exporter=9473,prometheus=9090,alertmanager=9093,blackbox=9115]
                               [--no-exporter] [--no-blackbox] [--workdir DIR] [-- EXPORTER-SERVE-ARGS...]
    python scripts/stack.py render --out DIR [--fast] [--ports ...]

`up` prints the URLs and runs until Ctrl-C, then stops everything. Arguments after `--`
go to `llm-usage-exporter serve` (for example `-- --demo`); unless they say otherwise, the
exporter's `--prometheus-url` is the stack's Prometheus (for `GET /api/backends`).

From Python (tests)::

    from stack import Stack
    with Stack(fast=True) as stack:          # free ports, starts and waits until ready
        stack.urls["prometheus"]             # http://127.0.0.1:<port>
        stack.wait_for(lambda: stack.am_alerts(alertname="Watchdog"), timeout=30)

Binaries: `prometheus`, `alertmanager` (or Debian's `prometheus-alertmanager`) and
`prometheus-blackbox-exporter` (or `blackbox_exporter`) from PATH, or the PROMETHEUS_BIN /
ALERTMANAGER_BIN / BLACKBOX_EXPORTER_BIN environment variables.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parent.parent
SERVICES: tuple[str, ...] = ("exporter", "blackbox", "alertmanager", "prometheus")  # start order
DEFAULT_PORTS: dict[str, int] = {"exporter": 9473, "prometheus": 9090, "alertmanager": 9093, "blackbox": 9115}
# Host names a shipped config may use for a service; the default port says which service.
HOST_ALIASES = ("exporter", "prometheus", "alertmanager", "blackbox-exporter", "localhost", "127.0.0.1")
_ADDR = re.compile(r"(?<![\w.-])(?:%s):(%s)(?![\d])" % (
    "|".join(re.escape(h) for h in HOST_ALIASES),
    "|".join(str(p) for p in sorted(set(DEFAULT_PORTS.values())))))
_SERVICE_BY_PORT = {str(p): s for s, p in DEFAULT_PORTS.items()}
# Container paths as docker-compose.yml mounts them -> the repository directory behind them
# (most specific first). prometheus/ and alertmanager/ are copied into the working
# directory and rewritten there; other sources (secrets) are used in place.
CONTAINER_PATHS: dict[str, str] = {
    "/etc/alertmanager/secrets/": "deploy/alertmanager-secrets",
    "/etc/alertmanager/": "alertmanager",
    "/etc/prometheus/": "prometheus",
    "/etc/blackbox_exporter/secrets/": "deploy/blackbox-secrets",
    "/etc/blackbox_exporter/": "blackbox",
}
COPIED = ("prometheus", "alertmanager", "blackbox")
BLACKBOX_CONFIG = Path("blackbox") / "blackbox.yml"
BACKENDS_FILE = Path("prometheus") / "backends.yml"     # the llm-backends job's file_sd list
_DURATION_PART = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
            "y": 31_536_000_000}


class StackError(RuntimeError):
    """The stack could not be started or did not become ready."""


def poll(predicate: Callable[[], Any], timeout: float, interval: float, message: str,
         check: Callable[[], None] = lambda: None, error: type[Exception] = StackError) -> Any:
    """Call `predicate` every `interval` seconds until it returns something truthy, and
    return that; `check` runs first each time (e.g. that every process is still alive).
    A predicate that fails to connect or reads a half-written answer counts as not yet;
    after `timeout` seconds, raise `error` naming `message` and the last such failure."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        check()
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last_error = e
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout}s waiting for {message}"
                        + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


# --------------------------------------------------------------------------- durations

def parse_duration_ms(text: str) -> int:
    """A Prometheus duration ('1h30m', '500ms', '0') in milliseconds."""
    s = str(text).strip()
    if s == "0":
        return 0
    pos, total = 0, 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return total


def format_duration_ms(ms: int) -> str:
    """Milliseconds as the shortest exact Prometheus duration ('5s', '1m30s', '500ms')."""
    if ms <= 0:
        return "0s"
    out = []
    for unit in ("h", "m", "s", "ms"):
        size = _UNIT_MS[unit]
        if ms >= size:
            out.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(out)


def scale_duration(text: str, factor: float, floor_ms: int = 0) -> str:
    """`text` divided by `factor`, never below `floor_ms` (unless it was zero)."""
    ms = parse_duration_ms(text)
    if ms == 0:
        return str(text)
    return format_duration_ms(max(floor_ms, int(round(ms / factor)), 1))


# --------------------------------------------------------------------------- rewriting

def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rewrite_addresses(text: str, ports: Mapping[str, int]) -> str:
    """Replace `exporter:9473`-style addresses with 127.0.0.1 and the chosen ports."""
    def sub(m: re.Match[str]) -> str:
        service = _SERVICE_BY_PORT[m.group(1)]
        return f"127.0.0.1:{ports[service]}"
    return _ADDR.sub(sub, text)


def _map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(node, str):
        return fn(node)
    if isinstance(node, list):
        return [_map_strings(v, fn) for v in node]
    if isinstance(node, dict):
        return {k: _map_strings(v, fn) for k, v in node.items()}
    return node


def _rewrite_paths(text: str, path_map: Mapping[str, Path]) -> str:
    for prefix, target in path_map.items():
        if text.startswith(prefix):
            return str(target / text[len(prefix):])
        if text == prefix.rstrip("/"):
            return str(target)
    return text


def _is_local(target: str) -> bool:
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return host in ("127.0.0.1", "localhost", "[::1]")


def render_prometheus(doc: dict[str, Any], ports: Mapping[str, int], path_map: Mapping[str, Path], *,
                      fast: bool, time_scale: float, interval: str = "1s",
                      absent: Iterable[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """The shipped prometheus.yml rewritten for 127.0.0.1; returns (doc, notes).

    Targets of services named in `absent` (not started, no port given) are dropped like
    those of services the native stack never runs.
    """
    notes: list[str] = []
    doc = _map_strings(copy.deepcopy(doc or {}), lambda s: _rewrite_paths(rewrite_addresses(s, ports), path_map))
    gone = {f"127.0.0.1:{ports[s]}" for s in absent}

    def local(t: str) -> bool:
        return _is_local(t) and t not in gone

    for am in (doc.get("alerting") or {}).get("alertmanagers") or []:
        for sc in am.get("static_configs") or []:
            sc["targets"] = [t for t in sc.get("targets") or [] if local(t)]
    glob_ = doc.setdefault("global", {}) or {}
    doc["global"] = glob_
    if fast:
        glob_["scrape_interval"] = interval
        glob_["evaluation_interval"] = interval
        glob_["scrape_timeout"] = interval
    jobs = []
    for job in doc.get("scrape_configs") or []:
        if fast:
            job.pop("scrape_interval", None)
            job.pop("scrape_timeout", None)
        via = [r.get("replacement") for r in job.get("relabel_configs") or []
               if r.get("target_label") == "__address__" and r.get("replacement") in gone]
        if via:
            notes.append(f"job {job.get('job_name')}: not scraping, its targets go through {via[0]} (not started)")
            continue
        statics = job.get("static_configs")
        if statics:
            kept = []
            for sc in statics:
                targets = [t for t in sc.get("targets") or [] if local(t)]
                dropped = [t for t in sc.get("targets") or [] if not local(t)]
                if dropped:
                    notes.append(f"job {job.get('job_name')}: not scraping {', '.join(dropped)} (not started natively)")
                if targets:
                    kept.append({**sc, "targets": targets})
            job["static_configs"] = kept
            other_sd = [k for k in job if k.endswith("_sd_configs")]
            if not kept and not other_sd:
                continue
        jobs.append(job)
    if "scrape_configs" in doc:
        doc["scrape_configs"] = jobs
    return doc, notes


def render_rules(doc: dict[str, Any], *, fast: bool, time_scale: float, floor: str = "1s") -> dict[str, Any]:
    """A rule file with its timing divided by time_scale (expressions untouched)."""
    if not fast or not isinstance(doc, dict):
        return doc
    doc = copy.deepcopy(doc)
    floor_ms = parse_duration_ms(floor)
    for group in doc.get("groups") or []:
        if group.get("interval"):
            group["interval"] = scale_duration(group["interval"], time_scale, floor_ms)
        for rule in group.get("rules") or []:
            for key in ("for", "keep_firing_for"):
                if rule.get(key):
                    rule[key] = scale_duration(rule[key], time_scale)
    return doc


def render_alertmanager(doc: dict[str, Any], ports: Mapping[str, int], path_map: Mapping[str, Path], *,
                        fast: bool, time_scale: float) -> dict[str, Any]:
    """The shipped alertmanager.yml rewritten for 127.0.0.1 (and scaled when fast)."""
    doc = _map_strings(copy.deepcopy(doc or {}), lambda s: _rewrite_paths(rewrite_addresses(s, ports), path_map))
    if not fast:
        return doc
    glob_ = doc.get("global") or {}
    if glob_.get("resolve_timeout"):
        glob_["resolve_timeout"] = scale_duration(glob_["resolve_timeout"], time_scale)

    def walk(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if route.get(key):
                route[key] = scale_duration(route[key], time_scale, 100)
        for child in route.get("routes") or []:
            walk(child)

    if isinstance(doc.get("route"), dict):
        route = doc["route"]
        # Alertmanager's own defaults (30s / 5m / 4h) are timing too: make them explicit first.
        route.setdefault("group_wait", "30s")
        route.setdefault("group_interval", "5m")
        route.setdefault("repeat_interval", "4h")
        walk(route)
    return doc


def _dump(doc: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10_000))


def find_binary(names: Sequence[str], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def prometheus_binary() -> str | None:
    return find_binary(["prometheus"], "PROMETHEUS_BIN")


def alertmanager_binary() -> str | None:
    return find_binary(["alertmanager", "prometheus-alertmanager"], "ALERTMANAGER_BIN")


def blackbox_binary() -> str | None:
    return find_binary(["blackbox_exporter", "prometheus-blackbox-exporter"], "BLACKBOX_EXPORTER_BIN")


def render_blackbox(doc: dict[str, Any], path_map: Mapping[str, Path]) -> dict[str, Any]:
    """The shipped blackbox.yml with container paths (the token files) made native."""
    return _map_strings(copy.deepcopy(doc or {}), lambda s: _rewrite_paths(s, path_map))


# --------------------------------------------------------------------------- HTTP

def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(url: str, timeout: float = 5.0, data: Any = None, method: str | None = None) -> Any:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


# --------------------------------------------------------------------------- the stack

class Stack:
    """Exporter + Prometheus + Alertmanager (+ the blackbox exporter) as child processes on
    127.0.0.1.

    Use as a context manager (start, wait_ready, stop on exit, also on errors) or call
    start() / wait_ready() / stop() yourself. Ports not given are chosen free. `blackbox`:
    None starts the prober when its binary and the repository's blackbox.yml are there,
    True requires it, False leaves it out. `backends`: file_sd target groups to probe
    instead of the shipped prometheus/backends.yml.
    """

    def __init__(self, *, exporter: bool = True, prometheus: bool = True, alertmanager: bool = True,
                 blackbox: bool | None = None, backends: Sequence[Mapping[str, Any]] | None = None,
                 fast: bool = False, time_scale: float = 60.0, interval: str = "1s",
                 ports: Mapping[str, int] | None = None, exporter_args: Sequence[str] = (),
                 exporter_cmd: Sequence[str] | None = None, workdir: str | Path | None = None,
                 keep_workdir: bool = False, repo: str | Path = REPO, ready_timeout: float = 60.0,
                 env: Mapping[str, str] | None = None) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.repo = Path(repo).resolve()
        self.notes: list[str] = []
        if blackbox is None:
            blackbox = bool(blackbox_binary()) and (self.repo / BLACKBOX_CONFIG).is_file()
            if not blackbox and (self.repo / BLACKBOX_CONFIG).is_file():
                self.notes.append("blackbox exporter not started: no binary (apt-get install "
                                  "prometheus-blackbox-exporter, or set BLACKBOX_EXPORTER_BIN); backends are not probed")
        self.enabled = {"exporter": exporter, "prometheus": prometheus, "alertmanager": alertmanager,
                        "blackbox": blackbox}
        self.backends = None if backends is None else [dict(g) for g in backends]
        self.fast = fast
        self.time_scale = time_scale if fast else 1.0
        self.interval = interval
        self.exporter_args = list(exporter_args)
        self.exporter_cmd = list(exporter_cmd) if exporter_cmd else None
        self.ready_timeout = ready_timeout
        self.env = dict(env or {})
        given = dict(ports or {})
        unknown = set(given) - set(DEFAULT_PORTS)
        if unknown:
            raise ValueError(f"unknown service(s) in ports: {sorted(unknown)}")
        # services neither started here nor given a port: the configs' references to them go
        self.absent = {s for s in ("prometheus", "alertmanager", "blackbox") if not self.enabled[s] and s not in given}
        missing = [s for s in DEFAULT_PORTS if s not in given]
        for s, p in zip(missing, free_ports(len(missing))):
            given[s] = p
        self.ports: dict[str, int] = given
        self.urls: dict[str, str] = {s: f"http://127.0.0.1:{p}" for s, p in self.ports.items()}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llm-stack-"))
        self.keep_workdir = keep_workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Any] = {}
        self._rendered = False
        self._atexit = False

    # -- configuration ------------------------------------------------------------

    def _path_map(self) -> dict[str, Path]:
        """Container path prefix -> where the native stack finds it."""
        return {prefix: (self.workdir / src if src in COPIED else self.repo / src)
                for prefix, src in CONTAINER_PATHS.items()}

    @property
    def prometheus_config(self) -> Path:
        return self.workdir / "prometheus" / "prometheus.yml"

    @property
    def alertmanager_config(self) -> Path:
        return self.workdir / "alertmanager" / "alertmanager.yml"

    @property
    def blackbox_config(self) -> Path:
        return self.workdir / BLACKBOX_CONFIG

    @property
    def backends_file(self) -> Path:
        """The list of backends Prometheus probes (the copy of prometheus/backends.yml)."""
        return self.workdir / BACKENDS_FILE

    def write_backends(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """Replace the backends to probe: file_sd target groups ({"targets": [...], "labels":
        {...}}). Written whole and renamed into place, so Prometheus never reads half a file."""
        tmp = self.backends_file.with_suffix(".tmp")
        _dump([dict(g) for g in groups], tmp)
        os.replace(tmp, self.backends_file)

    def _copy_config(self, folder: str, main_file: str) -> tuple[Path, Path]:
        """Copy a shipped configuration folder into the working directory, fresh each time."""
        src = self.repo / folder
        if not (src / main_file).is_file():
            raise StackError(f"{src / main_file} does not exist")
        dst = self.workdir / folder
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return src, dst

    def render(self) -> Path:
        """Write the rewritten configurations into the working directory."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path_map = self._path_map()
        if self.enabled["prometheus"]:
            src, dst = self._copy_config("prometheus", "prometheus.yml")
            doc, notes = render_prometheus(yaml.safe_load((src / "prometheus.yml").read_text()), self.ports,
                                           path_map, fast=self.fast, time_scale=self.time_scale,
                                           interval=self.interval, absent=self.absent)
            if "alertmanager" in self.absent:
                notes.append("alertmanager not started: alerts are evaluated but not delivered")
            self.notes.extend(notes)
            for pattern in doc.get("rule_files") or []:
                full = pattern if os.path.isabs(pattern) else str(dst / pattern)
                for rule_file in sorted(glob.glob(full)):
                    p = Path(rule_file)
                    rules = yaml.safe_load(p.read_text())
                    if self.fast:
                        _dump(render_rules(rules, fast=True, time_scale=self.time_scale, floor=self.interval), p)
            _dump(doc, self.prometheus_config)
            if self.backends is not None:
                self.write_backends(self.backends)
        if self.enabled["blackbox"]:
            src, dst = self._copy_config("blackbox", BLACKBOX_CONFIG.name)
            _dump(render_blackbox(yaml.safe_load((src / BLACKBOX_CONFIG.name).read_text()), path_map),
                  self.blackbox_config)
        if self.enabled["alertmanager"]:
            src, dst = self._copy_config("alertmanager", "alertmanager.yml")
            doc = render_alertmanager(yaml.safe_load((src / "alertmanager.yml").read_text()), self.ports,
                                      path_map, fast=self.fast, time_scale=self.time_scale)
            _dump(doc, self.alertmanager_config)
        self._rendered = True
        return self.workdir

    # -- processes ----------------------------------------------------------------

    def commands(self) -> dict[str, list[str]]:
        """The command line of each enabled service."""
        cmds: dict[str, list[str]] = {}
        if self.enabled["exporter"]:
            base = self.exporter_cmd or [sys.executable, "-c",
                                         "import sys; from exporter.cli import main; sys.exit(main())"]
            extra = list(self.exporter_args)
            if self.fast and not any(a.startswith("--evaluation-interval") for a in extra):
                extra.append(f"--evaluation-interval={self.interval}")
            if self.enabled["prometheus"] and not any(a.startswith("--prometheus-url") for a in extra):
                extra.append(f"--prometheus-url={self.urls['prometheus']}")
            cmds["exporter"] = [*base, "serve", "--host", "127.0.0.1", "--port", str(self.ports["exporter"]),
                                "--db", str(self.workdir / "exporter" / "usage.db"), *extra]
        if self.enabled["blackbox"]:
            bb = blackbox_binary()
            if not bb:
                raise StackError("no blackbox exporter binary (install prometheus-blackbox-exporter or set "
                                 "BLACKBOX_EXPORTER_BIN)")
            cmds["blackbox"] = [bb, f"--config.file={self.blackbox_config}",
                                f"--web.listen-address=127.0.0.1:{self.ports['blackbox']}"]
        if self.enabled["alertmanager"]:
            am = alertmanager_binary()
            if not am:
                raise StackError("no alertmanager binary (install prometheus-alertmanager or set ALERTMANAGER_BIN)")
            cmds["alertmanager"] = [
                am, f"--config.file={self.alertmanager_config}",
                f"--storage.path={self.workdir / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                f"--web.external-url={self.urls['alertmanager']}/",
                "--cluster.listen-address=",
            ]
        if self.enabled["prometheus"]:
            prom = prometheus_binary()
            if not prom:
                raise StackError("no prometheus binary (install prometheus or set PROMETHEUS_BIN)")
            resend = scale_duration("1m", self.time_scale, 1000) if self.fast else "1m"
            cmds["prometheus"] = [
                prom, f"--config.file={self.prometheus_config}",
                f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                "--storage.tsdb.retention.time=45d",
                f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
                f"--web.external-url={self.urls['prometheus']}/",
                "--web.enable-lifecycle", "--web.enable-admin-api",
                f"--rules.alert.resend-delay={resend}",
            ]
        return cmds

    def start(self) -> "Stack":
        """Render the configurations and start the processes (does not wait)."""
        if self.procs:
            raise StackError("already started")
        if not self._rendered:
            self.render()
        cmds = self.commands()
        for name in cmds:
            if name != "exporter" or not self.exporter_cmd:
                if not port_is_free(self.ports[name]):
                    raise StackError(f"{name}: port 127.0.0.1:{self.ports[name]} is in use")
        (self.workdir / "exporter").mkdir(exist_ok=True)
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.repo), env.get("PYTHONPATH", "")) if p)
        try:
            for name in SERVICES:
                if name not in cmds:
                    continue
                log = open(self.workdir / f"{name}.log", "wb")
                self._logs[name] = log
                self.procs[name] = subprocess.Popen(
                    cmds[name], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=self.workdir if name != "exporter" else self.repo, env=env, start_new_session=True)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self, name: str, tail: int | None = None) -> str:
        """The output of one service so far (the last `tail` lines if given)."""
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:] if tail else lines)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise StackError(f"{name} exited with status {code}:\n{self.log(name, 30)}")

    def ready_url(self, name: str) -> str:
        return self.urls[name] + {"exporter": "/readyz", "blackbox": "/-/healthy"}.get(name, "/-/ready")

    def wait_ready(self, timeout: float | None = None) -> "Stack":
        """Wait until every started service answers its readiness check, or raise."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        pending = [n for n in SERVICES if n in self.procs]
        while pending:
            self._check_alive()
            for name in list(pending):
                try:
                    status, _ = http_get(self.ready_url(name), timeout=2)
                except (OSError, urllib.error.URLError):
                    status = 0
                if status == 200:
                    pending.remove(name)
            if not pending:
                break
            if time.monotonic() > deadline:
                details = "\n".join(f"--- {n} ---\n{self.log(n, 20)}" for n in pending)
                raise StackError(f"not ready in time: {', '.join(pending)}\n{details}")
            time.sleep(0.2)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL after `timeout`) and clean up."""
        for name in reversed(SERVICES):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        if self._own_workdir and not self.keep_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._atexit:
            atexit.unregister(self.stop)
            self._atexit = False

    def __enter__(self) -> "Stack":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- helpers for tests ----------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.25,
                 message: str = "condition") -> Any:
        """Poll `predicate` until it returns something truthy; return it or raise StackError."""
        return poll(predicate, timeout, interval, message, check=self._check_alive)

    def prom_query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the `result` list."""
        q = {"query": expr}
        if at is not None:
            q["time"] = str(at)
        doc = http_json(f"{self.urls['prometheus']}/api/v1/query?{urllib.parse.urlencode(q)}")
        return doc["data"]["result"]

    def prom_rule_groups(self) -> list[dict[str, Any]]:
        return http_json(f"{self.urls['prometheus']}/api/v1/rules")["data"]["groups"]

    def prom_alerts(self) -> list[dict[str, Any]]:
        return http_json(f"{self.urls['prometheus']}/api/v1/alerts")["data"]["alerts"]

    def prom_targets(self) -> list[dict[str, Any]]:
        return http_json(f"{self.urls['prometheus']}/api/v1/targets")["data"]["activeTargets"]

    def reload_prometheus(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.urls['prometheus']}/-/reload", method="POST"),
                               timeout=10).read()

    def am_alerts(self, **labels: str) -> list[dict[str, Any]]:
        """Alerts held by Alertmanager (API v2), filtered by exact label values."""
        alerts = http_json(f"{self.urls['alertmanager']}/api/v2/alerts")
        return [a for a in alerts if all(a.get("labels", {}).get(k) == v for k, v in labels.items())]

    def post_records(self, records: Iterable[dict[str, Any]], token: str | None = None) -> Any:
        """POST usage records (a JSON array) to the exporter's /v1/records."""
        req = urllib.request.Request(
            f"{self.urls['exporter']}/v1/records", data=json.dumps(list(records)).encode(), method="POST",
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw else None


# --------------------------------------------------------------------------- CLI

def _parse_ports(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in DEFAULT_PORTS or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--ports wants service=port pairs ({', '.join(DEFAULT_PORTS)}), got {part!r}")
        out[name] = int(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("up", "render"):
        p = sub.add_parser(name, help="start the stack" if name == "up" else "only write the rewritten configs")
        p.add_argument("--fast", action="store_true",
                       help="1s scrape/evaluation and every for:/group_wait/... divided by --time-scale "
                            "(timing only; expressions unchanged)")
        p.add_argument("--time-scale", type=float, default=60.0, help="divisor for durations with --fast (default 60)")
        p.add_argument("--ports", default="", help="service=port pairs, e.g. exporter=19473,prometheus=19090")
        p.add_argument("--free-ports", action="store_true", help="pick free ports for services not in --ports")
        p.add_argument("--no-exporter", action="store_true",
                       help="do not start the exporter (Prometheus still scrapes 127.0.0.1:<exporter port>)")
        p.add_argument("--no-alertmanager", action="store_true")
        p.add_argument("--no-blackbox", action="store_true",
                       help="do not start the blackbox exporter (started by default when installed)")
        p.add_argument("--repo", default=str(REPO), help="checkout whose prometheus/ and alertmanager/ to use")
        p.add_argument("--exporter-args", default="",
                       help="extra arguments for `llm-usage-exporter serve` (or put them after --)")
        if name == "up":
            p.add_argument("--workdir", help="directory for configs, data and logs (default: a temporary one, removed)")
            p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
        else:
            p.add_argument("--out", required=True, help="directory to write the configs into")
    args = ap.parse_args(argv)
    ports = _parse_ports(args.ports)
    if not args.free_ports:
        ports = {**DEFAULT_PORTS, **ports}
    exporter_args = shlex.split(args.exporter_args) + passthrough
    kw: dict[str, Any] = dict(exporter=not args.no_exporter, alertmanager=not args.no_alertmanager,
                              blackbox=False if args.no_blackbox else None,
                              fast=args.fast, time_scale=args.time_scale, ports=ports, exporter_args=exporter_args,
                              repo=args.repo)
    if args.command == "render":
        stack = Stack(workdir=args.out, **kw)
        stack.render()
        print(f"configs written to {Path(args.out).resolve()}")
        for note in stack.notes:
            print(f"note: {note}")
        for name, cmd in stack.commands().items():
            print(f"{name}: {shlex.join(cmd)}")
        return 0

    stack = Stack(workdir=args.workdir, keep_workdir=bool(args.workdir), ready_timeout=args.timeout, **kw)
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        print(f"starting in {stack.workdir} ...", flush=True)
        stack.wait_ready()
        for note in stack.notes:
            print(f"note: {note}")
        for name in SERVICES:
            if name in stack.procs:
                print(f"{name:13s} {stack.urls[name]}   (log: {stack.workdir / (name + '.log')})")
        if stack.fast:
            print(f"fast mode: timing divided by {stack.time_scale:g}, intervals {stack.interval}")
        print("Ctrl-C stops everything.", flush=True)
        while True:
            stack._check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
