"""/metrics at 10,000 series: our collector against prometheus_client's own objects.

An engine on a temporary database receives records for 10,000 (app, provider, model)
series (100 apps x 4 providers x 25 models; label limits raised), with latency, TTFT,
throughput, three token types and a few errors, then runs one evaluation so the anomaly
gauges are there as in production. Timed, median of repeats:

* ours, usage families: `UsageMetrics.render()`, which is what GET /metrics writes for
  them (counters and histograms from numpy arrays, label strings cached per series), and
  `generate_latest` on a registry holding only that collector (the registry read path),
  timed alternately with:
* library: `generate_latest` on a plain registry with prometheus_client Counter and
  Histogram objects for the same families, label names, histogram buckets and series,
  fed the same records. Its `_created` samples are switched off so that both expose the
  same samples (the sample counts are printed to show it); the default, with `_created`,
  is timed once as well;
* ours, whole registry (once): everything GET /metrics serves (usage, anomaly gauges,
  detectors, own metrics);
* HTTP: a real `llm-usage-exporter serve` started on the same database (so it also
  restores 10,000 series at start-up), GET /metrics over a keep-alive connection; and
  single-record POSTs on a second connection while a GET /metrics is in flight (the
  longest of them shows whether a scrape holds up ingest).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import common


def build_records(apps: int, providers: int, models: int, now: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Two records per series, one streamed; one series in ten also gets an error."""
    recs = []
    n = 0
    for a in range(apps):
        for p in range(providers):
            for m in range(models):
                key = {"app": f"app-{a:03d}", "provider": f"provider-{p}", "model": f"model-{p}-{m:02d}"}
                for k in range(2):
                    lat = float(rng.lognormal(0.3, 0.6))
                    r = {**key, "ts": now - float(rng.uniform(0, 110)), "input_tokens": int(rng.integers(50, 4000)),
                         "output_tokens": int(rng.integers(10, 800)), "latency_s": round(lat, 4),
                         "cost_usd": round(float(rng.uniform(1e-4, 2e-2)), 6), "request_id": f"m{n}"}
                    if k == 0:
                        r["ttft_s"] = round(lat * 0.3, 4)
                        r["cache_read_tokens"] = int(rng.integers(10, 1000))
                    recs.append(r)
                    n += 1
                if (a + p + m) % 10 == 0:
                    recs.append({**key, "ts": now - 5, "status": "error", "error_type": "rate_limit",
                                 "latency_s": 0.2, "request_id": f"m{n}"})
                    n += 1
    return recs


def library_registry(records: list[dict[str, Any]]) -> Any:
    """prometheus_client objects for the same families, labels and buckets as exporter/collectors/usage.py."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from exporter.collectors.usage import HISTOGRAMS, SERIES_LABELS
    reg = CollectorRegistry()
    L = SERIES_LABELS
    req = Counter("llm_requests", "LLM requests.", L, registry=reg)
    err = Counter("llm_request_errors", "Failed LLM requests by error type.", L + ("error_type",), registry=reg)
    tok = Counter("llm_tokens", "Tokens processed, by token type.", L + ("token_type",), registry=reg)
    cost = Counter("llm_cost_usd", "Cost of LLM requests in US dollars (priced requests only).", L, registry=reg)
    unp = Counter("llm_unpriced_requests", "Requests whose cost is unknown.", L, registry=reg)
    hist = {name: Histogram(name, doc, L, buckets=[b for b in bounds if b != float("inf")], registry=reg)
            for name, (doc, bounds) in HISTOGRAMS.items()}
    dur, ttft, otps = (hist[n] for n in HISTOGRAMS)
    for r in records:
        k = (r["app"], r["provider"], r["model"])
        req.labels(*k).inc()
        unp.labels(*k)
        if r.get("status") == "error":
            err.labels(*k, r["error_type"]).inc()
        else:
            cost.labels(*k).inc(r["cost_usd"])
        for tt in ("input", "output", "cache_read"):
            if r.get(f"{tt}_tokens"):
                tok.labels(*k, tt).inc(r[f"{tt}_tokens"])
        dur.labels(*k).observe(r["latency_s"])
        if "ttft_s" in r:
            ttft.labels(*k).observe(r["ttft_s"])
        if r.get("output_tokens") and r.get("status") != "error":
            otps.labels(*k).observe(r["output_tokens"] / (r["latency_s"] - r.get("ttft_s", 0.0)))
    return reg


def ingest_during_scrape(server: common.Server, scrape: Any) -> dict[str, float]:
    """Single-record POSTs on a second connection while one GET /metrics is in flight: the
    longest wait shows whether a scrape holds up ingest."""
    import threading

    import orjson
    post = server.connection(timeout=300)
    n = [0]

    def one() -> float:
        n[0] += 1
        body = orjson.dumps({"ts": time.time(), "app": "app-000", "provider": "provider-0", "model": "model-0-00",
                             "input_tokens": 10, "output_tokens": 5, "latency_s": 0.5, "request_id": f"during-{n[0]}"})
        t = time.perf_counter()
        post.request("POST", "/v1/records", body=body, headers={"Content-Type": "application/json"})
        post.getresponse().read()
        return time.perf_counter() - t
    idle = [one() for _ in range(20)]
    th = threading.Thread(target=scrape)
    th.start()
    time.sleep(0.05)
    during = []
    while th.is_alive() and len(during) < 10_000:
        during.append(one())
    th.join()
    post.close()
    return {"idle_p50_ms": common.median(idle) * 1e3, "during_max_ms": max(during) * 1e3 if during else float("nan"),
            "during_posts": len(during)}


def samples(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import prometheus_client
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.engine import Engine

    apps = 10 if args.quick else 100
    providers, models = 4, 25
    n_series = apps * providers * models
    repeats = 3 if args.quick else 5
    budget = 10 if args.quick else 60          # seconds for the interleaved pair at most (at least 2 rounds)
    rng = np.random.default_rng(9)
    now = time.time()
    records = build_records(apps, providers, models, now, rng)
    limits = {"label_limit_app": max(apps * 2, 100), "label_limit_model": max(providers * models * 2, 200)}
    timings: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    lines: dict[str, int] = {}

    with common.scratch_dir("metrics") as d:
        db = Path(d) / "bench.db"
        engine = Engine(common.settings(db, **limits), clock=lambda: now)
        t = time.perf_counter()
        for i in range(0, len(records), 1000):
            res = engine.ingest(records[i:i + 1000], now=now)
            assert not res.rejected, res.to_dict()
        build_s = time.perf_counter() - t
        engine.evaluate(now)

        usage_only = CollectorRegistry(auto_describe=False)
        usage_only.register(engine.usage)
        lib = library_registry(records)

        def rendered() -> None:
            t = time.perf_counter()
            out = engine.usage.render().encode()
            timings.setdefault("ours_render", []).append(time.perf_counter() - t)
            sizes["ours_render"], lines["ours_render"] = len(out), samples(out)

        def once(key: str, registry: Any, created: bool = False) -> None:
            (prometheus_client.enable_created_metrics if created else prometheus_client.disable_created_metrics)()
            t = time.perf_counter()
            out = generate_latest(registry)
            timings.setdefault(key, []).append(time.perf_counter() - t)
            sizes[key], lines[key] = len(out), samples(out)

        # The pair the target compares runs interleaved, so drift on a shared machine hits both.
        start = time.perf_counter()
        for i in range(repeats):
            rendered()
            once("ours_usage", usage_only)
            once("library", lib)
            if i >= 1 and time.perf_counter() - start > budget:
                break
        once("library_with_created", lib, created=True)
        once("ours_full", engine.registry)
        prometheus_client.disable_created_metrics()
        engine.close()
        del lib

        with common.Server(db, flags=limits) as server:
            startup = server.startup_s
            conn = server.connection(timeout=300)

            def get() -> bytes:
                conn.request("GET", "/metrics")
                r = conn.getresponse()
                body = r.read()
                assert r.status == 200, r.status
                return body
            body = get()
            sizes["http"], lines["http"] = len(body), samples(body)
            timings["http"] = common.repeat(get, 1 if args.quick else 2, warmup=0)
            blocked = ingest_during_scrape(server, get)
            conn.close()

    med = {k: common.median(v) for k, v in timings.items()}
    ratio = med["ours_render"] / med["library"]
    figures = [
        common.figure("ours_render_s", f"ours as served: UsageMetrics.render, {n_series:,} series ({lines['ours_render']:,} samples)",
                      med["ours_render"] * 1e3, "ms", decimals=0),
        common.figure("ours_usage_s", f"generate_latest, usage families, {n_series:,} series ({lines['ours_usage']:,} samples)",
                      med["ours_usage"] * 1e3, "ms", decimals=0),
        common.figure("library_s", f"library Counter/Histogram, same series ({lines['library']:,} samples)",
                      med["library"] * 1e3, "ms", decimals=0),
        common.figure("ratio_ours_to_library", "ratio ours as served / library", ratio, "x", "<= 1", ratio <= 1.0, 2),
        common.figure("ratio_registry_to_library", "ratio ours through generate_latest / library",
                      med["ours_usage"] / med["library"], "x", decimals=2),
        common.figure("library_created_s", f"library with _created samples ({lines['library_with_created']:,} samples)",
                      med["library_with_created"] * 1e3, "ms", decimals=0),
        common.figure("ours_full_s", f"generate_latest(engine.registry), whole /metrics ({lines['ours_full']:,} samples)",
                      med["ours_full"] * 1e3, "ms", decimals=0),
        common.figure("http_s", f"HTTP GET /metrics ({sizes['http'] / 1e6:.1f} MB)", med["http"] * 1e3, "ms", decimals=0),
        common.figure("post_during_scrape_ms", f"single-record POST while a scrape runs: longest wait "
                      f"(idle p50 {blocked['idle_p50_ms']:.1f} ms)", blocked["during_max_ms"], "ms", decimals=0),
        common.figure("serve_startup_s", f"serve start-up until ready, restoring {n_series:,} series", startup, "s", decimals=1),
    ]
    return {"name": "metrics_scrape", "figures": figures,
            "detail": {"series": n_series, "records": len(records), "build_s": build_s, "timings_s": timings,
                       "bytes": sizes, "samples": lines, "ingest_during_scrape": blocked}}


if __name__ == "__main__":
    common.cli("metrics_scrape", run)
