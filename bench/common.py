"""Shared pieces of the benchmarks: synthetic records, statistics, RSS, and a server process.

Every benchmark module is also a script (`python bench/inprocess.py --quick`) that prints
its own figures; `bench/run.py` runs each one in a fresh interpreter and collects the JSON
they print, so one benchmark's memory or registry never leaks into the next.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "BENCH-RESULT "

# A few apps on a few priced models (names from the shipped price table), with a typical
# first-token time per model; tokens and latencies are log-normal around these.
APPS = ("support-bot", "code-assistant", "nightly-summaries", "search-rerank", "sales-copilot")
APP_WEIGHTS = (0.35, 0.25, 0.1, 0.2, 0.1)
MODELS = (("openai", "gpt-4o-mini", 0.35), ("openai", "gpt-4o", 0.8), ("openai", "o4-mini", 1.5),
          ("anthropic", "claude-3-5-haiku", 0.6), ("anthropic", "claude-sonnet-4", 1.2),
          ("google", "gemini-2.0-flash", 0.4))
MODEL_WEIGHTS = (0.35, 0.15, 0.05, 0.2, 0.15, 0.1)
ERRORS = ("rate_limit", "timeout", "server_error")


# --- synthetic records -----------------------------------------------------------------

def realistic_records(n: int, now: float, rng: np.random.Generator, id_prefix: str,
                      spread_s: float = 300.0) -> list[dict[str, Any]]:
    """`n` decoded JSON records as a client would post them: unique request ids, timestamps
    spread over the `spread_s` seconds before `now`, varied tokens and latencies, ~1 % errors."""
    app = rng.choice(len(APPS), n, p=APP_WEIGHTS)
    model = rng.choice(len(MODELS), n, p=MODEL_WEIGHTS)
    ts = now - rng.uniform(0, spread_s, n)
    inp = np.round(rng.lognormal(6.8, 0.9, n)).astype(np.int64)
    out = np.round(rng.lognormal(5.3, 0.8, n)).astype(np.int64)
    cached = np.where(rng.random(n) < 0.3, (inp * rng.uniform(0.2, 0.9, n)).astype(np.int64), 0)
    base = np.array([m[2] for m in MODELS])[model]
    ttft = base * rng.lognormal(0, 0.3, n)
    latency = ttft + out / rng.uniform(40, 120, n)
    stream = rng.random(n) < 0.6
    err = rng.random(n) < 0.01
    err_kind = rng.integers(0, len(ERRORS), n)
    session = rng.integers(0, max(n // 8, 1), n)
    tools = rng.random(n) < 0.15
    recs: list[dict[str, Any]] = []
    for i in range(n):
        p, m, _ = MODELS[model[i]]
        r: dict[str, Any] = {
            "ts": round(float(ts[i]), 3), "app": APPS[app[i]], "provider": p, "model": m,
            "input_tokens": int(inp[i]), "output_tokens": 0 if err[i] else int(out[i]),
            "latency_s": round(float(latency[i]), 4),
            "request_id": f"{id_prefix}-{i:06d}", "session_id": f"{id_prefix}-s{session[i]}",
        }
        if cached[i]:
            r["cache_read_tokens"] = int(cached[i])
        if stream[i]:
            r["stream"] = True
            r["ttft_s"] = round(float(ttft[i]), 4)
        if err[i]:
            r["status"] = "error"
            r["error_type"] = ERRORS[err_kind[i]]
        if tools[i]:
            r["tool_calls"] = ["search", "fetch"][: 1 + int(i % 2)]
        recs.append(r)
    return recs


# --- statistics ------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else math.nan


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1, max_seconds: float | None = None,
           setup: Callable[[], Any] | None = None) -> list[float]:
    """Wall times (s) of `repeats` calls after `warmup` untimed ones; stops early past `max_seconds`
    (always keeping at least three timings) so a slow machine cannot stretch a run without bound.
    `setup`, when given, runs untimed before every call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return times


def drive(conns: Sequence[Any], worker: Callable[[Any, float], None], duration: float,
          server_pid: int) -> tuple[float, float, float]:
    """Run `worker(conn, deadline)` on one thread per connection until `duration` seconds
    have passed; (start, wall seconds, server CPU seconds) of the run, for throughput and
    CPU per request measured the same way by every HTTP benchmark."""
    cpu0, wall0 = cpu_seconds(server_pid), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c, wall0 + duration)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wall0, time.perf_counter() - wall0, cpu_seconds(server_pid) - cpu0


def rss_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MB (10^6 bytes)."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value, _unit = line.split()
                out[key.rstrip(":")] = int(value) * 1024 / 1e6
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- engine and server helpers ---------------------------------------------------------

def settings(db: Path | str, **flags: Any) -> Any:
    from exporter.config import load_settings
    return load_settings(flags={"db": str(db), **flags}, environ={})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command() -> list[str]:
    return [sys.executable, "-c", "import sys; from exporter.cli import main; sys.exit(main())"]


@dataclass
class Server:
    """A real `llm-usage-exporter serve` child process on 127.0.0.1."""

    db: Path
    flags: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    startup_s: float = math.nan

    def start(self, timeout: float = 120.0) -> "Server":
        self.port = self.port or free_port()
        cmd = serve_command() + ["serve", "--port", str(self.port), "--db", str(self.db), "--log-level", "warning"]
        for k, v in self.flags.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_EXPORTER_")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"exporter exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                status, _ = self.get("/readyz", timeout=2)
                if status == 200:
                    self.startup_s = time.perf_counter() - t0
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"exporter on port {self.port} not ready after {timeout:.0f} s")

    def connection(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        c = self.connection(timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"llm-bench-{prefix}-")


# --- results ---------------------------------------------------------------------------

def figure(key: str, label: str, value: float, unit: str, target: str | None = None,
           met: bool | None = None, decimals: int = 1) -> dict[str, Any]:
    """One reported number; `met` is None when the figure has no target."""
    return {"key": key, "label": label, "value": value, "unit": unit, "target": target, "met": met,
            "decimals": decimals}


def cli(name: str, run: Callable[[argparse.Namespace], dict[str, Any]],
        extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Entry point shared by the benchmark scripts: `--quick`, `--json` (for run.py)."""
    p = argparse.ArgumentParser(description=f"benchmark: {name}")
    p.add_argument("--quick", action="store_true", help="reduced sizes for CI (well under a minute)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (used by run.py)")
    if extra:
        extra(p)
    args = p.parse_args()
    t0 = time.perf_counter()
    result = run(args)
    result.setdefault("name", name)
    result["quick"] = bool(args.quick)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(RESULT_MARK + json.dumps(result, default=_jsonable), flush=True)
    else:
        print(markdown([result]))


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def fmt(value: float, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{decimals}f}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | figure | value | target | |", "| --- | --- | ---: | --- | --- |"]
    for res in results:
        if res.get("error"):
            lines.append(f"| {res['name']} | failed: {res['error']} | | | |")
            continue
        for f in res["figures"]:
            status = "" if f["met"] is None else ("met" if f["met"] else "**missed**")
            lines.append(f"| {res['name']} | {f['label']} | {fmt(f['value'], f['decimals'])} {f['unit']} "
                         f"| {f['target'] or ''} | {status} |")
    return "\n".join(lines)
