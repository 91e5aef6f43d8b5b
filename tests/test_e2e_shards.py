"""Sharding by app against one exporter, on the same records: the same alerts fire.

Four real exporters: `single` gets every record; `shard-0` to `shard-2` get the records of
the apps they own, routed by the client (`exporter.client.Exporters`, the documented hash
`exporter.sharding.shard_of`). Two real Prometheus servers run the shipped rules (timing
divided by 60): one scrapes `single`, the other the three shards (each its own
`instance`). Each shard is given a third of the false-alarm budget (`--alert-budget`), so
its evidence thresholds match the single exporter's (docs/scaling.md).

Six apps, two per shard, send to openai/gpt-4o-mini and openai/gpt-4o; 50 hours of history,
then in the one-minute anomaly window:

- app `etl` (shard 1) bursts: ten times the calls, each ten times as big. Its own scope
  holds all of it, on its own shard, as in the single exporter: cost and token alerts for
  app etl; the model and global scopes that see it are explained by the app;
- openai/gpt-4o slows down for every app (15 s against about 1.5 s), so the model's
  traffic spans all three shards. Each shard judges its slice of the model, and each slice
  is slow: latency and throughput alerts for model openai/gpt-4o, one per shard that
  carries the model, which Alertmanager's grouping by scope delivers as one notification;
  the per-model thresholds on the summed histograms (LLMModelThroughputLow) fire once, as
  they read counters that add up over shards.

The firing alerts of both Prometheus servers, without their `instance`, are the same set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import REPO, e2e_marks, load_stack, rule_errors  # noqa: E402

from exporter.client import Exporters  # noqa: E402
from exporter.sharding import shard_of  # noqa: E402

stack_mod = load_stack()
pytestmark = e2e_marks()

SHARDS = 3
APPS = ("chat", "search", "etl", "reports", "agent", "triage")     # two per shard
SPIKE_APP = "etl"
SLOW_MODEL = "gpt-4o"
WINDOW_S = 60
STEP_S = 20.0
HISTORY_HOURS = 50
IGNORED = {"Watchdog"}


def history(now: float) -> list[dict[str, Any]]:
    """Every app calls each model every 2 * STEP_S, alternating; log-normal latency around 1.5 s."""
    rng = np.random.default_rng(5)
    start = (now // STEP_S) * STEP_S - HISTORY_HOURS * 3600
    out = []
    for i, ts in enumerate(np.arange(start, now, STEP_S)):
        model = "gpt-4o-mini" if i % 2 == 0 else SLOW_MODEL
        lat = 1.5 * rng.lognormal(0.0, 0.3, len(APPS))
        for app, latency in zip(APPS, lat.tolist()):
            out.append(record(float(ts), app, model, latency_s=round(latency, 3)))
    return out


def record(ts: float, app: str, model: str, **fields: Any) -> dict[str, Any]:
    """A streamed call (its TTFT, 0.3 s, leaves the generation time that throughput is measured on)."""
    r = {"ts": round(ts, 3), "provider": "openai", "model": model, "app": app, "input_tokens": 400,
         "output_tokens": 100, "cost_usd": 0.001, "latency_s": 1.5, "ttft_s": 0.3, "status": "ok",
         "request_id": uuid.uuid4().hex}
    r.update(fields)
    return r


def anomalies(now: float) -> list[dict[str, Any]]:
    burst = [record(now, SPIKE_APP, "gpt-4o-mini", input_tokens=4000, output_tokens=1000, cost_usd=0.01)
             for _ in range(60)]
    slow = [record(now - 1 - k, app, SLOW_MODEL, latency_s=15.0) for app in APPS for k in range(15)]
    return burst + slow


class Exporter:
    def __init__(self, name: str, workdir: Path, port: int, args: list[str]) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = open(workdir / f"{name}.log", "wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from exporter.cli import main; sys.exit(main())", "serve",
             "--host", "127.0.0.1", "--port", str(port), "--db", str(workdir / f"{name}.db"),
             "--window", f"{WINDOW_S}s", "--evaluation-interval", "1s", *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.log.close()


def prometheus_scraping(targets: dict[str, int]) -> Any:
    """A Prometheus with the shipped configuration and rules (fast), scraping `targets`
    (instance name -> port) as the job llm-usage-exporter; no Alertmanager."""
    s = stack_mod.Stack(exporter=False, alertmanager=False, fast=True, time_scale=60,
                        ports={"exporter": next(iter(targets.values()))})
    s.render()
    doc = yaml.safe_load(s.prometheus_config.read_text())
    for job in doc["scrape_configs"]:
        if job["job_name"] == "llm-usage-exporter":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": {"instance": name}}
                                     for name, port in targets.items()]
    s.prometheus_config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return s


def firing(prom: Any) -> set[tuple[tuple[str, str], ...]]:
    """The firing alerts, each as its labels without `instance`."""
    return {tuple(sorted((k, v) for k, v in a["labels"].items() if k != "instance"))
            for a in prom.prom_alerts()
            if a["state"] == "firing" and a["labels"].get("alertname") not in IGNORED}


class Layouts:
    def __init__(self, single: Any, sharded: Any) -> None:
        self.single, self.sharded = single, sharded
        self.alerts: tuple[set[Any], set[Any]] = (set(), set())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Layouts]:
    assert sorted(shard_of(a, SHARDS) for a in APPS) == [0, 0, 1, 1, 2, 2]
    workdir = tmp_path_factory.mktemp("shards")
    ports = stack_mod.free_ports(SHARDS + 1)
    exporters = [Exporter("single", workdir, ports[0], [])]
    exporters += [Exporter(f"shard-{i}", workdir, ports[i + 1], ["--alert-budget", f"{1 / SHARDS:.6f}"])
                  for i in range(SHARDS)]
    proms: list[Any] = []
    try:
        for e in exporters:
            deadline = time.monotonic() + 60
            while not _healthy(e.url):
                assert e.proc.poll() is None and time.monotonic() < deadline, f"{e.name} did not start"
                time.sleep(0.2)
        single = Exporters([exporters[0].url])
        sharded = Exporters([[e.url] for e in exporters[1:]])
        proms = [prometheus_scraping({"single": ports[0]}),
                 prometheus_scraping({f"shard-{i}": ports[i + 1] for i in range(SHARDS)})]
        for p in proms:
            p.start()
            p.wait_ready()
        now = time.time()
        past = history(now)
        for client in (single, sharded):
            result = client.send(past)
            assert sum(a["accepted"] for a in result.answers.values()) == len(past)
        # the exporters scraped before the anomaly (a counter's first sample carries no increase)
        for p in proms:
            p.wait_for(lambda p=p: len(p.prom_query('llm_requests_total{model="gpt-4o"}')) == len(APPS), timeout=30,
                       message="every app's series in Prometheus")
        live = anomalies(time.time())
        for client in (single, sharded):
            client.send(live)
        yield Layouts(*proms)
    finally:
        for p in proms:
            p.stop()
        for e in exporters:
            e.stop()


def _healthy(url: str) -> bool:
    try:
        return stack_mod.http_get(url + "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


EXPECTED = {("LLMCostSpike", "app"), ("LLMTokenVelocitySpike", "app"), ("LLMLatencySpike", "model"),
            ("LLMThroughputDrop", "model"), ("LLMModelThroughputLow", "model")}


def test_the_same_alerts_fire_on_shards_as_on_one_exporter(layouts: Layouts) -> None:
    def settled() -> Any:
        one, many = firing(layouts.single), firing(layouts.sharded)
        names = {(dict(a)["alertname"], dict(a).get("scope")) for a in one}
        return (one, many) if EXPECTED <= names and one == many else None

    try:
        layouts.single.wait_for(settled, timeout=90, interval=1, message="the same alerts on both layouts")
    except stack_mod.StackError:
        one, many = firing(layouts.single), firing(layouts.sharded)
        pytest.fail(f"one exporter only: {sorted(one - many)}\nshards only: {sorted(many - one)}")
    one = firing(layouts.single)
    as_dicts = [dict(a) for a in one]
    # the app's anomaly at its scope, the model's at the model's: no echo alerts at other scopes
    assert {(a["alertname"], a.get("scope"), a.get("app"), a.get("model")) for a in as_dicts
            if a.get("category") == "anomaly" and "signal" in a} == {
        ("LLMCostSpike", "app", SPIKE_APP, None), ("LLMTokenVelocitySpike", "app", SPIKE_APP, None),
        ("LLMLatencySpike", "model", None, SLOW_MODEL), ("LLMThroughputDrop", "model", None, SLOW_MODEL)}


def test_a_models_alert_comes_from_every_shard_it_spans_and_an_apps_from_its_own(layouts: Layouts) -> None:
    alerts = [a["labels"] for a in layouts.sharded.prom_alerts() if a["state"] == "firing"]
    slow = {a["instance"] for a in alerts if a["alertname"] == "LLMLatencySpike" and a["severity"] == "critical"}
    assert slow == {f"shard-{i}" for i in range(SHARDS)}
    spike = {a["instance"] for a in alerts if a["alertname"] == "LLMCostSpike"}
    assert spike == {f"shard-{shard_of(SPIKE_APP, SHARDS)}"}
    # summed over shards, the recording rules match the single exporter's. The two
    # Prometheus servers scrape at their own phases, and a rate over a window that a burst
    # of records has just entered is extrapolated from each series' own samples, so the
    # sums agree once both have scraped the burst a few times: wait for that, not longer.
    exprs = ('sum(provider_model:llm_requests:increase5m{model="gpt-4o"})', 'sum(app:llm_requests:rate5m)')

    def values() -> list[tuple[str, float, float]]:
        return [(expr, float(layouts.single.prom_query(expr)[0]["value"][1]),
                 float(layouts.sharded.prom_query(expr)[0]["value"][1])) for expr in exprs]

    def agree() -> bool:
        return all(a > 0 and abs(a - b) <= 0.1 * a for _, a, b in values())

    try:
        layouts.single.wait_for(agree, timeout=30, interval=1, message="the shards' sums match the single exporter's")
    except stack_mod.StackError:
        pytest.fail(f"the recording rules summed over shards differ from one exporter's: {values()}")
    assert not rule_errors(layouts.single) and not rule_errors(layouts.sharded)
