"""In-process cost of one record: Engine.ingest on batches of 1,000 decoded records (parse,
validate, dedupe, label guards, pricing, counters, SQLite transaction, scope history),
against a bare prometheus_client Counter `.labels(app, provider, model).inc()` per record.

Each repeat ingests fresh batches (new request ids) into one engine on a temporary
on-disk database with the default settings; the figure is the median over batches of
µs per record. A second series of batches runs with the engine's stages wrapped in
timers (store.write, history.add, usage.add) to show where the time goes.
`--profile` prints the functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

BATCH = 1000


def run(args: argparse.Namespace) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, Counter

    from exporter.engine import Engine

    n_batches = 15 if args.quick else 60
    rng = np.random.default_rng(3)
    now = time.time()
    batches = [common.realistic_records(BATCH, now, rng, f"ip{j:04d}") for j in range(n_batches + 3)]
    staged_batches = [common.realistic_records(BATCH, now, rng, f"pp{j:04d}") for j in range(n_batches)]

    with common.scratch_dir("inprocess") as d:
        engine = Engine(common.settings(Path(d) / "bench.db"), clock=lambda: now)
        for b in batches[:3]:                      # warm-up: series, caches, first transaction
            engine.ingest(b, now=now)
        per_record: list[float] = []
        for b in batches[3:]:
            t = time.perf_counter()
            res = engine.ingest(b, now=now)
            per_record.append((time.perf_counter() - t) / BATCH * 1e6)
            assert res.accepted == BATCH, res.to_dict()

        # Where the time goes: wrap the engine's own stages (those it has) with timers
        # for a second series of batches; the rest is parsing, dedupe, guards and pricing.
        stages = {"store.write": (engine.store, "write"), "history.add": (engine.history, "add"),
                  "usage (delta, apply)": (engine.usage, "delta")}
        spent = {k: 0.0 for k in stages}
        for key, (obj, attr) in stages.items():
            if hasattr(obj, attr):
                setattr(obj, attr, _timed(getattr(obj, attr), spent, key))
        staged_total = 0.0
        for b in staged_batches:
            t = time.perf_counter()
            engine.ingest(b, now=now)
            staged_total += time.perf_counter() - t
        for obj, attr in stages.values():
            obj.__dict__.pop(attr, None)
        n_staged = len(staged_batches) * BATCH
        split = {k: v / n_staged * 1e6 for k, v in spent.items()}
        split["rest (parse, validate, dedupe, guards, pricing, grouping)"] = (staged_total - sum(spent.values())) / n_staged * 1e6

        profile_text = None
        if args.profile:
            extra = [common.realistic_records(BATCH, now, rng, f"pf{j:04d}") for j in range(10)]
            prof = cProfile.Profile()
            prof.enable()
            for b in extra:
                engine.ingest(b, now=now)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            profile_text = buf.getvalue()
        engine.close()

    # The reference: one library counter with the same three labels, one call per record.
    reg = CollectorRegistry()
    counter = Counter("bench_requests", "Requests.", ("app", "provider", "model"), registry=reg)
    triples = [(r["app"], r["provider"], r["model"]) for b in batches[:n_batches] for r in b]

    def counter_batch(part: list[tuple[str, str, str]]) -> None:
        for a, p, m in part:
            counter.labels(a, p, m).inc()
    counter_us = []
    counter_batch(triples[:BATCH])
    for j in range(n_batches):
        part = triples[j * BATCH:(j + 1) * BATCH]
        t = time.perf_counter()
        counter_batch(part)
        counter_us.append((time.perf_counter() - t) / BATCH * 1e6)

    ours, lib = common.median(per_record), common.median(counter_us)
    ratio = ours / lib
    figures = [
        common.figure("us_per_record", f"Engine.ingest, batches of {BATCH}: per record", ours, "µs", decimals=2),
        *[common.figure(f"stage_{k.split(' ')[0]}_us", f"  stage: {k} (mean)", v, "µs", decimals=2) for k, v in split.items()],
        common.figure("counter_us_per_record", "prometheus_client Counter.labels(a, p, m).inc()", lib, "µs", decimals=3),
        common.figure("ratio_to_counter", "ratio: Engine.ingest / Counter.labels().inc()", ratio, "x"),
        common.figure("records_per_s_one_core", "implied ceiling on one core", 1e6 / ours, "rec/s", decimals=0),
    ]
    if profile_text:
        print(profile_text)
    return {"name": "inprocess", "figures": figures,
            "detail": {"batches": n_batches, "ingest_us": per_record, "stages_us": split,
                       "counter_us": counter_us, "profile": profile_text}}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", action="store_true", help="print a cProfile of 10 more batches (own time)")


def _timed(fn: Any, spent: dict[str, float], key: str) -> Any:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[key] += time.perf_counter() - t
    return wrapper


if __name__ == "__main__":
    common.cli("inprocess", run, _args)
