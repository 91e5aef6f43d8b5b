"""The shipped rules and routing on VictoriaMetrics, natively: exporter replicas, vmagent,
victoria-metrics, vmalert and Alertmanager as child processes on 127.0.0.1.

The layout of docker-compose.ha.yml without Docker, for the end-to-end tests:

* the exporter processes are the targets of deploy/vmagent/scrape.yml's job
  llm-usage-exporter, named as there (`exporter-a`, `exporter-b`: an HA pair sharing an
  `instance`, a `replica` label each);
* vmagent scrapes them with that job, its labels unchanged, and remote-writes to
  victoria-metrics;
* vmalert evaluates prometheus/vmalert/*.yml against victoria-metrics, writes recording
  rules and alert state back to it, and notifies Alertmanager;
* Alertmanager runs the shipped alertmanager.yml, its webhooks pointed at the exporter
  named `webhook`.

Timing only is scaled as in scripts/stack.py (`fast`): 1 s scrapes and evaluations, every
`for:`, group interval and Alertmanager wait divided by `time_scale`.

    with VMStack(webhook="exporter-a") as s:
        s.urls["vm"], s.urls["vmalert"], s.urls["exporter-a"]
        s.kill("exporter-b")                          # SIGKILL one process
        s.query('up{job="llm-usage-exporter"}')       # instant query on victoria-metrics
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import REPO, load_stack, matching_alerts  # noqa: E402

stack_mod = load_stack()
JOB = "llm-usage-exporter"


def vm_binaries() -> dict[str, str | None]:
    return {name: shutil.which(name) for name in ("victoria-metrics", "vmagent", "vmalert")}


class VMStackError(RuntimeError):
    pass


class VMStack:
    def __init__(self, *, webhook: str, exporter_args: Sequence[str] = (), fast: bool = True,
                 time_scale: float = 60.0, ready_timeout: float = 90.0) -> None:
        self.job = shipped_job()
        self.exporters = [t.rsplit(":", 1)[0] for sc in self.job["static_configs"] for t in sc["targets"]]
        self.webhook = webhook
        self.exporter_args = list(exporter_args)
        self.fast, self.time_scale = fast, time_scale
        self.ready_timeout = ready_timeout
        names = [*self.exporters, "vm", "vmagent", "vmalert", "alertmanager"]
        self.ports = dict(zip(names, stack_mod.free_ports(len(names))))
        self.urls = {n: f"http://127.0.0.1:{p}" for n, p in self.ports.items()}
        self.workdir = Path(tempfile.mkdtemp(prefix="llm-vmstack-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Any] = {}
        self.killed: set[str] = set()

    # -- configuration ------------------------------------------------------------

    def scrape_config(self) -> dict[str, Any]:
        """deploy/vmagent/scrape.yml's exporter job, its targets the processes started here."""
        statics = [{**sc, "targets": [f"127.0.0.1:{self.ports[t.rsplit(':', 1)[0]]}" for t in sc["targets"]]}
                   for sc in self.job["static_configs"]]
        interval = "1s" if self.fast else "15s"
        return {"global": {"scrape_interval": interval, "scrape_timeout": interval},
                "scrape_configs": [{**self.job, "static_configs": statics}]}

    def labels(self, name: str) -> dict[str, str]:
        """The target labels the shipped scrape configuration gives exporter `name`."""
        return next(dict(sc.get("labels") or {}) for sc in self.job["static_configs"]
                    if any(t.rsplit(":", 1)[0] == name for t in sc["targets"]))

    def render(self) -> None:
        rules = self.workdir / "rules"
        rules.mkdir(parents=True)
        for path in sorted((REPO / "prometheus" / "vmalert").glob("*.yml")):
            doc = yaml.safe_load(path.read_text())
            doc = stack_mod.render_rules(doc, fast=self.fast, time_scale=self.time_scale, floor="1s")
            (rules / path.name).write_text(yaml.safe_dump(doc, sort_keys=False, width=10_000))
        (self.workdir / "scrape.yml").write_text(yaml.safe_dump(self.scrape_config(), sort_keys=False))
        am_dir = self.workdir / "alertmanager"
        shutil.copytree(REPO / "alertmanager", am_dir)
        ports = {"exporter": self.ports[self.webhook], "prometheus": self.ports["vm"],
                 "alertmanager": self.ports["alertmanager"]}
        path_map = {"/etc/alertmanager/secrets/": REPO / "deploy" / "alertmanager-secrets",
                    "/etc/alertmanager/": am_dir}
        doc = stack_mod.render_alertmanager(yaml.safe_load((REPO / "alertmanager" / "alertmanager.yml").read_text()),
                                            ports, path_map, fast=self.fast, time_scale=self.time_scale)
        (am_dir / "alertmanager.yml").write_text(yaml.safe_dump(doc, sort_keys=False, width=10_000))

    def commands(self) -> dict[str, list[str]]:
        bins = vm_binaries()
        missing = [n for n, b in bins.items() if not b]
        am = stack_mod.alertmanager_binary()
        if missing or not am:
            raise VMStackError(f"missing binaries: {missing + ([] if am else ['alertmanager'])}")
        interval = "1s" if self.fast else "15s"
        cmds: dict[str, list[str]] = {
            "vm": [bins["victoria-metrics"] or "", f"-storageDataPath={self.workdir / 'vm-data'}",
                   f"-httpListenAddr=127.0.0.1:{self.ports['vm']}", "-retentionPeriod=1y",
                   # fast mode: recent samples are queryable at once, nothing is cached
                   *(["-search.latencyOffset=0s", "-search.disableCache"] if self.fast else []),
                   "-loggerLevel=WARN"],
            "alertmanager": [am, f"--config.file={self.workdir / 'alertmanager' / 'alertmanager.yml'}",
                             f"--storage.path={self.workdir / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                             f"--web.external-url={self.urls['alertmanager']}/", "--cluster.listen-address="],
        }
        for name in self.exporters:
            cmds[name] = [sys.executable, "-c", "import sys; from exporter.cli import main; sys.exit(main())",
                          "serve", "--host", "127.0.0.1", "--port", str(self.ports[name]),
                          "--db", str(self.workdir / f"{name}.db"),
                          *([f"--evaluation-interval={interval}"] if self.fast else []), *self.exporter_args]
        cmds["vmagent"] = [bins["vmagent"] or "", f"-promscrape.config={self.workdir / 'scrape.yml'}",
                           f"-remoteWrite.url={self.urls['vm']}/api/v1/write",
                           f"-remoteWrite.tmpDataPath={self.workdir / 'vmagent-data'}",
                           f"-remoteWrite.flushInterval={interval}",
                           f"-httpListenAddr=127.0.0.1:{self.ports['vmagent']}", "-loggerLevel=WARN"]
        cmds["vmalert"] = [bins["vmalert"] or "", f"-rule={self.workdir / 'rules'}/*.yml",
                           f"-datasource.url={self.urls['vm']}", f"-remoteWrite.url={self.urls['vm']}",
                           f"-remoteRead.url={self.urls['vm']}", f"-notifier.url={self.urls['alertmanager']}",
                           f"-evaluationInterval={interval}", f"-remoteWrite.flushInterval={interval}",
                           # fast mode: a firing alert is resent every 5 s, and Alertmanager holds it
                           # for 20 s (vmalert 1.79: 4 x max(interval, resend delay)). With the default
                           # delay (none) it held it for 4 s: vmalert stopped for 6 s resolved a page
                           # that was still firing, and lifted its inhibition of the warning twin
                           *(["-datasource.queryStep=5s", "-rule.resendDelay=5s"] if self.fast else []),
                           f"-external.url={self.urls['vmalert']}",
                           f"-httpListenAddr=127.0.0.1:{self.ports['vmalert']}", "-loggerLevel=WARN"]
        return cmds

    # -- processes ----------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        log = open(self.workdir / f"{name}.log", "wb")
        self._logs[name] = log
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=REPO if name in self.exporters else self.workdir, env=env,
                                            start_new_session=True)

    def start(self) -> "VMStack":
        """Everything but vmalert, then vmalert once victoria-metrics holds a sample of every
        exporter: a ruler started on an empty store would see no exporter at all and page
        LLMExporterDown (as Prometheus would, started without its scrape targets)."""
        self.render()
        cmds = self.commands()
        for name in ("vm", "alertmanager", *self.exporters, "vmagent"):
            self._spawn(name, cmds[name])
        self.wait_ready()
        self.wait_for(lambda: len(self.query(f'up{{job="{JOB}"}} == 1')) == len(self.exporters),
                      timeout=self.ready_timeout, message="every exporter scraped into victoria-metrics")
        self._spawn("vmalert", cmds["vmalert"])
        return self

    def ready_url(self, name: str) -> str:
        if name in self.exporters:
            return self.urls[name] + "/readyz"
        return self.urls[name] + ("/-/ready" if name == "alertmanager" else "/health")

    def wait_ready(self) -> "VMStack":
        deadline = time.monotonic() + self.ready_timeout
        pending = list(self.procs)
        while pending:
            self.check_alive()
            for name in list(pending):
                try:
                    status, _ = stack_mod.http_get(self.ready_url(name), timeout=2)
                except OSError:
                    status = 0
                if status == 200:
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise VMStackError(f"not ready: {pending}\n" + "\n".join(self.log(n, 20) for n in pending))
            time.sleep(0.2)
        return self

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.killed and proc.poll() is not None:
                raise VMStackError(f"{name} exited with status {proc.returncode}:\n{self.log(name, 30)}")

    def kill(self, name: str) -> None:
        """SIGKILL one process (a replica dying without a goodbye)."""
        self.killed.add(name)
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def log(self, name: str, tail: int | None = None) -> str:
        path = self.workdir / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-tail:] if tail else lines)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()
        for log in self._logs.values():
            log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "VMStack":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- reading it -----------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.5,
                 message: str = "condition") -> Any:
        return stack_mod.poll(predicate, timeout, interval, message, check=self.check_alive, error=VMStackError)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query on victoria-metrics (its Prometheus API), now or at time `at`."""
        params = {"query": expr, **({"time": str(at)} if at is not None else {})}
        doc = stack_mod.http_json(f"{self.urls['vm']}/api/v1/query?{urllib.parse.urlencode(params)}")
        return doc["data"]["result"]

    def vmalert_alerts(self) -> list[dict[str, Any]]:
        return stack_mod.http_json(f"{self.urls['vmalert']}/api/v1/alerts")["data"]["alerts"]

    def vmalert_groups(self) -> list[dict[str, Any]]:
        return stack_mod.http_json(f"{self.urls['vmalert']}/api/v1/rules")["data"]["groups"]

    def am_alerts(self, **labels: str) -> list[dict[str, Any]]:
        alerts = stack_mod.http_json(f"{self.urls['alertmanager']}/api/v2/alerts")
        return [a for a in alerts if all(a.get("labels", {}).get(k) == v for k, v in labels.items())]

    def notifications(self, limit: int = 1000) -> list[dict[str, Any]]:
        """What the webhook exporter received from Alertmanager, newest first."""
        return stack_mod.http_json(f"{self.urls[self.webhook]}/api/notifications?limit={limit}")

    def delivered(self, *, receiver: str | None = None, status: str | None = None,
                  labels: Mapping[str, str] | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return matching_alerts(self.notifications(), receiver, status, labels)


def shipped_job() -> dict[str, Any]:
    """The exporter job of deploy/vmagent/scrape.yml."""
    doc = yaml.safe_load((REPO / "deploy" / "vmagent" / "scrape.yml").read_text())
    return next(j for j in doc["scrape_configs"] if j["job_name"] == JOB)
