"""Stress: ingest saturated by 8 client processes while Prometheus scrapes and a probe checks
liveness. A real `llm-usage-exporter serve` on a fresh database with 1,000 (app, provider,
model) series.

* 8 client processes, each with one keep-alive connection, post batches of 500 records as
  fast as the server answers (bodies pre-serialised; each send swaps a batch number into
  the request ids, so every record is new). Records cover the 1,000 series evenly.
* A scraper process GETs /metrics once a second; a probe process GETs /healthz every 50 ms.
* Reported: records/s, p50/p99 of the POSTs, /healthz and /metrics latency as the clients
  see them, and any answer other than 200 (429 would mean the ingest queue filled).

Targets: /healthz p99 under 100 ms and a scrape under 500 ms while ingest is saturated.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import orjson

import common

PLACEHOLDER = b"QQQQQQQQ"
BATCH = 500
CLIENTS = 8
APPS, PROVIDERS, MODELS = 10, 4, 25        # 1,000 series
HEALTH_TARGET_MS = 100.0
SCRAPE_TARGET_MS = 500.0


def batch_records(n: int, now: float, rng: np.random.Generator, tag: str) -> list[dict[str, Any]]:
    """`n` records cycling through the 1,000 series, with unique ids carrying `tag`."""
    out = []
    for i in range(n):
        s = i % (APPS * PROVIDERS * MODELS)
        a, rest = divmod(s, PROVIDERS * MODELS)
        p, m = divmod(rest, MODELS)
        latency = float(rng.lognormal(0.3, 0.6))
        r: dict[str, Any] = {"ts": round(now - float(rng.uniform(0, 300)), 3), "app": f"app-{a:02d}",
                             "provider": f"provider-{p}", "model": f"model-{p}-{m:02d}",
                             "input_tokens": int(rng.integers(50, 4000)), "output_tokens": int(rng.integers(10, 800)),
                             "latency_s": round(latency, 4), "cost_usd": round(float(rng.uniform(1e-4, 2e-2)), 6),
                             "request_id": f"{tag}-{i:05d}", "session_id": f"{tag}-s{i % 40}"}
        if i % 3 == 0:
            r["ttft_s"] = round(latency * 0.3, 4)
        if i % 97 == 0:
            r["status"] = 429
        out.append(r)
    return out


def _poster(port: int, k: int, start_at: float, stop_at: float, out: Any) -> None:
    rng = np.random.default_rng(100 + k)
    now = time.time()
    pool = [orjson.dumps(batch_records(BATCH, now, rng, f"c{k}b{j:02d}{PLACEHOLDER.decode()}")) for j in range(8)]
    conn = common.http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    log: list[tuple[float, float, int, int]] = []
    n = 0
    while time.time() < start_at:
        time.sleep(0.005)
    while time.time() < stop_at:
        body = pool[n % len(pool)].replace(PLACEHOLDER, b"%08x" % n)
        n += 1
        t = time.perf_counter()
        conn.request("POST", "/v1/records", body=body, headers=headers)
        r = conn.getresponse()
        doc = r.read()
        dt = time.perf_counter() - t
        accepted = orjson.loads(doc).get("accepted", 0) if r.status == 200 else 0
        log.append((time.time(), dt, int(accepted), r.status))
    conn.close()
    out.send(log)
    out.close()


def _getter(port: int, path: str, every: float, start_at: float, stop_at: float, out: Any) -> None:
    conn = common.http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    log: list[tuple[float, int, int]] = []
    while time.time() < start_at:
        time.sleep(0.005)
    next_at = start_at
    while time.time() < stop_at:
        t = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        log.append((time.perf_counter() - t, r.status, len(body)))
        next_at += every
        time.sleep(max(0.0, next_at - time.time()))
    conn.close()
    out.send(log)
    out.close()


def warm_up(server: common.Server) -> None:
    """Every series exists before the clock starts (the scrape is measured at 1,000 series)."""
    rng = np.random.default_rng(1)
    conn = server.connection()
    for j in range(2):
        body = orjson.dumps(batch_records(APPS * PROVIDERS * MODELS, time.time(), rng, f"warm{j}"))
        conn.request("POST", "/v1/records", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
    conn.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    duration = args.duration or (5.0 if args.quick else 20.0)
    ctx = mp.get_context("fork")
    with common.scratch_dir("stress") as d:
        with common.Server(common.Path(d) / "bench.db") as server:
            warm_up(server)
            start_at = time.time() + 1.5           # time for the clients to build their payloads
            stop_at = start_at + duration
            pipes, procs = [], []
            jobs = [(_poster, (server.port, k, start_at, stop_at)) for k in range(CLIENTS)]
            jobs += [(_getter, (server.port, "/metrics", 1.0, start_at, stop_at)),
                     (_getter, (server.port, "/healthz", 0.05, start_at, stop_at))]
            for fn, a in jobs:
                here, there = ctx.Pipe(duplex=False)
                p = ctx.Process(target=fn, args=(*a, there))
                p.start()
                there.close()
                pipes.append(here)
                procs.append(p)
            cpu0 = None
            while time.time() < start_at:
                time.sleep(0.01)
            cpu0 = common.cpu_seconds(server.proc.pid)
            results = [pipe.recv() for pipe in pipes]
            cpu1 = common.cpu_seconds(server.proc.pid)
            for p in procs:
                p.join(timeout=60)
            series = sum(1 for line in server.get("/metrics")[1].splitlines() if line.startswith(b"llm_requests_total{"))
    posts = [e for log in results[:CLIENTS] for e in log]
    scrapes, health = results[CLIENTS], results[CLIENTS + 1]
    elapsed = duration
    accepted = sum(e[2] for e in posts)
    post_ms = [e[1] * 1e3 for e in posts]
    scrape_ms = [e[0] * 1e3 for e in scrapes]
    health_ms = [e[0] * 1e3 for e in health]
    refused = sum(1 for e in posts if e[3] != 200) + sum(1 for e in scrapes + health if e[1] != 200)
    h99, s99 = common.percentile(health_ms, 99), common.percentile(scrape_ms, 99)
    figures = [
        common.figure("records_per_s", f"{CLIENTS} clients, batches of {BATCH}: records/s ({duration:g} s)",
                      accepted / elapsed, "rec/s", decimals=0),
        common.figure("records_per_server_cpu_s", "records per server CPU-second", accepted / max(cpu1 - cpu0, 1e-9),
                      "rec/CPU-s", decimals=0),
        common.figure("post_p50_ms", "POST p50", common.percentile(post_ms, 50), "ms"),
        common.figure("post_p99_ms", "POST p99", common.percentile(post_ms, 99), "ms"),
        common.figure("healthz_p50_ms", f"/healthz p50 ({len(health_ms)} probes)", common.percentile(health_ms, 50), "ms"),
        common.figure("healthz_p99_ms", "/healthz p99 while ingest is saturated", h99, "ms",
                      f"< {HEALTH_TARGET_MS:g} ms", h99 < HEALTH_TARGET_MS),
        common.figure("scrape_p50_ms", f"/metrics p50 ({len(scrape_ms)} scrapes, {series:,} series, "
                      f"{scrapes[-1][2] / 1e6 if scrapes else 0:.1f} MB)", common.percentile(scrape_ms, 50), "ms", decimals=0),
        common.figure("scrape_p99_ms", "/metrics p99 while ingest is saturated", s99, "ms",
                      f"< {SCRAPE_TARGET_MS:g} ms", s99 < SCRAPE_TARGET_MS, 0),
        common.figure("non_200", "answers other than 200", refused, "", decimals=0),
    ]
    return {"name": "stress", "figures": figures, "ok": refused == 0,
            "detail": {"duration_s": duration, "clients": CLIENTS, "batch": BATCH, "series": series,
                       "posts": len(posts), "post_ms": post_ms, "health_ms": health_ms, "scrape_ms": scrape_ms,
                       "server_cpu_s": cpu1 - cpu0}}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=None, help="seconds of saturated ingest (default 20, quick 5)")


if __name__ == "__main__":
    common.cli("stress", run, _args)
