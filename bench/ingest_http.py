"""Ingest over HTTP: a real `llm-usage-exporter serve` process on a fresh database, fed by a
separate client process over persistent keep-alive connections.

* Batches: 1,000 realistic records per POST /v1/records for a fixed time. The client
  pre-serialises a pool of batches with orjson before the clock starts; each send only
  swaps an 8-character batch number into the request ids (`bytes.replace`), so every
  record id is unique and the client costs next to nothing. Reported: records/s over the
  whole timed window, the median of its one-second windows, and records per CPU-second of
  the server (less sensitive to a noisy neighbour than wall time).
* Single records: one record per POST, sequentially on one connection: p50 / p99 latency.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import threading
import time
from typing import Any

import numpy as np
import orjson

import common

PLACEHOLDER = b"QQQQQQQQ"
BATCH = 1000
TARGET_RPS = 50_000


def _client(port: int, server_pid: int, duration: float, connections: int, warmup_batches: int,
            pool_size: int, max_batches: int, out: Any) -> None:
    """Runs in the client process: build the payload pool, warm up, then send for `duration`."""
    rng = np.random.default_rng(7)
    now = time.time()
    pool = [orjson.dumps(common.realistic_records(BATCH, now, rng, f"b{j:03d}{PLACEHOLDER.decode()}"))
            for j in range(pool_size)]
    seq = itertools.count()
    conns = [common.http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(connections)]
    headers = {"Content-Type": "application/json"}

    def send(conn: Any, n: int) -> tuple[int, dict[str, Any]]:
        body = pool[n % pool_size].replace(PLACEHOLDER, b"%08x" % n)
        conn.request("POST", "/v1/records", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, orjson.loads(r.read())

    for _ in range(warmup_batches):
        send(conns[0], next(seq))

    log: list[tuple[float, float, int, int]] = []   # (done, round trip, accepted, status)
    lock = threading.Lock()

    def worker(conn: Any, deadline: float) -> None:
        while time.perf_counter() < deadline:
            n = next(seq)
            if n >= max_batches:
                return
            t = time.perf_counter()
            status, doc = send(conn, n)
            done = time.perf_counter()
            with lock:
                log.append((done, done - t, int(doc.get("accepted", 0)), status))

    wall0, elapsed, server_cpu = common.drive(conns, worker, duration, server_pid)
    for c in conns:
        c.close()
    out.send({"log": [(d - wall0, rtt, acc, st) for d, rtt, acc, st in log], "elapsed": elapsed,
              "server_cpu": server_cpu, "client_cpu": time.process_time()})
    out.close()


def throughput(server: common.Server, duration: float, connections: int) -> dict[str, Any]:
    here, there = mp.get_context("fork").Pipe(duplex=False)
    proc = mp.get_context("fork").Process(
        target=_client, args=(server.port, server.proc.pid, duration, connections, 3, 64,
                              int(duration * 200), there))
    proc.start()
    there.close()
    res = here.recv()
    proc.join(timeout=60)
    log, elapsed = res["log"], res["elapsed"]
    accepted = sum(a for _, _, a, _ in log)
    bad = sum(1 for *_, st in log if st != 200)
    per_second = np.zeros(int(elapsed) + 1)
    for done, _, acc, _ in log:
        per_second[int(done)] += acc
    full = per_second[: int(elapsed)]          # whole seconds only
    return {
        "batches": len(log), "records": accepted, "elapsed_s": elapsed, "non_200": bad,
        "records_per_s": accepted / elapsed, "median_1s_records_per_s": common.median(full.tolist()),
        "server_cpu_s": res["server_cpu"], "records_per_server_cpu_s": accepted / max(res["server_cpu"], 1e-9),
        "server_cpu_share": res["server_cpu"] / elapsed,
        "batch_rtt_p50_ms": common.percentile([r for _, r, _, _ in log], 50) * 1e3,
        "batch_rtt_p99_ms": common.percentile([r for _, r, _, _ in log], 99) * 1e3,
        "client_cpu_s": res["client_cpu"],
    }


def single_latency(server: common.Server, n: int, warmup: int = 50) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    bodies = [orjson.dumps(r) for r in common.realistic_records(n + warmup, time.time(), rng, "single")]
    conn = server.connection()
    headers = {"Content-Type": "application/json"}
    times, bad = [], 0
    for i, body in enumerate(bodies):
        t = time.perf_counter()
        conn.request("POST", "/v1/records", body=body, headers=headers)
        r = conn.getresponse()
        doc = orjson.loads(r.read())
        dt = time.perf_counter() - t
        if r.status != 200 or doc.get("accepted") != 1:
            bad += 1
        if i >= warmup:
            times.append(dt)
    conn.close()
    ms = [t * 1e3 for t in times]
    return {"requests": len(ms), "failed": bad, "p50_ms": common.percentile(ms, 50),
            "p99_ms": common.percentile(ms, 99), "mean_ms": float(np.mean(ms))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.duration or (4.0 if args.quick else 15.0)
    singles = args.singles or (300 if args.quick else 2000)
    with common.scratch_dir("http") as d:
        with common.Server(common.Path(d) / "bench.db") as server:
            lat = single_latency(server, singles)
            tput = throughput(server, duration, args.connections)
            startup = server.startup_s
    rps = tput["records_per_s"]
    figures = [
        common.figure("records_per_s", f"batches of {BATCH}: records/s ({duration:g} s, {args.connections} connections)",
                      rps, "rec/s", f">= {TARGET_RPS:,}", rps >= TARGET_RPS, 0),
        common.figure("median_1s_records_per_s", "batches: median of 1-s windows", tput["median_1s_records_per_s"], "rec/s", decimals=0),
        common.figure("records_per_server_cpu_s", "batches: records per server CPU-second",
                      tput["records_per_server_cpu_s"], "rec/CPU-s", decimals=0),
        common.figure("batch_rtt_p50_ms", "batches: round trip p50", tput["batch_rtt_p50_ms"], "ms"),
        common.figure("single_p50_ms", f"single-record POST p50 ({lat['requests']} requests)", lat["p50_ms"], "ms", decimals=2),
        common.figure("single_p99_ms", "single-record POST p99", lat["p99_ms"], "ms", decimals=2),
    ]
    ok = tput["non_200"] == 0 and lat["failed"] == 0
    return {"name": "ingest_http", "figures": figures, "ok": ok,
            "detail": {"throughput": tput, "single": lat, "server_startup_s": startup,
                       "duration_s": duration, "connections": args.connections}}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None, help="seconds of batch ingest (default 15, quick 4)")
    p.add_argument("--singles", type=int, default=None, help="single-record requests (default 2000, quick 300)")
    p.add_argument("--connections", type=int, default=2, help="keep-alive connections of the client process")


if __name__ == "__main__":
    common.cli("ingest_http", run, _args)
