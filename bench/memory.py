"""Resident memory at 10,000 series with 14 days of hourly history, SQLite on disk.

Run in a fresh interpreter (run.py does that). The state of an exporter that has been up
for 14 days is put together in three parts, each the fastest way that leaves the process
as the running exporter would have it:

1. An engine on a fresh on-disk database; the 10,000 (app, provider, model) series
   (100 apps x 4 providers x 25 models) are registered through its store. (`--quick`:
   1,000 series, 1 day, 1 live hour — a smoke test, not the target's scale.)
2. 14 days of hourly buckets for every series are bulk-inserted into the same SQLite file
   by a forked child process (so none of that work stays in this process's heap), in the
   store's own encoding (`sketch.encode`); the engine's in-memory scope history gets the
   same 14 days through `ScopeHistory.add_hours`, fed by one series per app and model —
   the history keeps per-scope sums only, so its size does not depend on how many
   series fed it.
3. The last hours arrive live through `Engine.ingest`: one record per series per hour,
   in batches of 1,000 in time order, so counters, label guards, dedupe, caches, the
   window rings and the series-to-scope map hold what live traffic leaves there.

Reported: VmRSS after building, after one evaluation, and after one scrape of the whole
registry (and VmHWM, the peak). Then a second fresh process opens the same database, as
a restart would (`Engine(settings)` restores counters and 14 days of history); it runs
under a memory cap and a time limit, so a restore that does not fit is reported, not
suffered.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

TARGET_MB = 300.0
PROVIDERS, MODELS = 4, 25


def series_keys(apps: int) -> list[tuple[str, str, str]]:
    return [(f"app-{a:03d}", f"provider-{p}", f"model-{p}-{m:02d}")
            for a in range(apps) for p in range(PROVIDERS) for m in range(MODELS)]


def _bulk_hours(db: str, sids: list[int], hours: np.ndarray, seed: int) -> None:
    """Child process: hourly buckets for every series and hour, in the store's format."""
    from exporter import sketch
    from exporter.storage.buckets import FIELDS, SKETCHES
    cols = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(buckets)")]
    expected = ["res", "start", "series", "adds", *SKETCHES]
    if cols != expected:
        raise SystemExit(f"buckets table is {cols}, benchmark writes {expected}: update bench/memory.py")
    rng = np.random.default_rng(seed)
    centre = {"latency": 1.5, "ttft": 0.5, "otps": 70.0, "tpot": 20.0}
    pool = {k: [sketch.encode(sketch.histogram(centre[k] * rng.lognormal(0, 0.5, int(rng.integers(5, 60)))))
                for _ in range(64)] for k in SKETCHES}
    adds_pool = []
    for _ in range(64):
        a = np.zeros(len(FIELDS))
        a[0] = rng.integers(1, 60)
        a[2:4] = a[0] * rng.lognormal([6.8, 5.3], 0.2)
        a[7] = a[2] * 2e-6 + a[3] * 8e-6
        adds_pool.append(a.tobytes())
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")
    # The rows are generated inside SQLite (a join of hours x series x a pool of blobs),
    # so the insert runs at SQLite's speed rather than Python's.
    con.execute("CREATE TEMP TABLE pool (i INTEGER PRIMARY KEY, adds BLOB, latency BLOB, ttft BLOB, otps BLOB, tpot BLOB)")
    con.executemany("INSERT INTO temp.pool VALUES (?, ?, ?, ?, ?, ?)",
                    [(i, adds_pool[i], pool["latency"][i], pool["ttft"][(i * 7) % 64], pool["otps"][(i * 13) % 64],
                      pool["tpot"][(i * 17) % 64])
                     for i in range(64)])
    con.execute("CREATE TEMP TABLE sids (sid INTEGER PRIMARY KEY)")
    con.executemany("INSERT INTO temp.sids VALUES (?)", [(s,) for s in sids])
    for h0 in range(0, len(hours), 24):
        con.execute("BEGIN")
        for h in hours[h0:h0 + 24].tolist():
            con.execute("INSERT OR REPLACE INTO buckets SELECT 3600, ?, sid, adds, latency, ttft, otps, tpot "
                        "FROM temp.sids JOIN temp.pool ON temp.pool.i = (sid * 31 + ? / 3600) % 64", (h, h))
        con.execute("COMMIT")
    con.close()


def live_records(keys: list[tuple[str, str, str]], start: float, end: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One record per series per hour in [start, end), sorted by time."""
    out = []
    hours = np.arange(start, end, 3600)
    for h in hours:
        ts = h + rng.uniform(0, min(3600, end - h), len(keys))
        lat = rng.lognormal(0.3, 0.6, len(keys))
        tok = rng.integers(50, 4000, len(keys))
        for i, (a, p, m) in enumerate(keys):
            out.append({"ts": float(ts[i]), "app": a, "provider": p, "model": m, "input_tokens": int(tok[i]),
                        "output_tokens": int(tok[i] // 5), "latency_s": float(lat[i]), "ttft_s": float(lat[i] * 0.3),
                        "request_id": f"live-{int(h)}-{i}"})
    out.sort(key=lambda r: r["ts"])
    return out


def cache_bytes(engine: Any) -> tuple[int, int]:
    """Entries and bytes of the store's bucket cache, if it has one (diagnostic only)."""
    cache = getattr(engine.store, "_cache", None)
    if not isinstance(cache, dict):
        return 0, 0
    total = 0
    for b in cache.values():
        total += getattr(getattr(b, "adds", None), "nbytes", 0)
        sk = getattr(b, "sketches", ())
        total += sum(getattr(v, "nbytes", len(v) if isinstance(v, bytes) else 0)
                     for v in (sk.values() if isinstance(sk, dict) else sk))
    return len(cache), total


def build_and_measure(args: argparse.Namespace, db: Path) -> dict[str, Any]:
    from prometheus_client import generate_latest

    from exporter.engine import Engine
    from exporter.anomaly.evaluator import Evaluator  # noqa: F401  (imported as the running exporter has it)

    import evaluator as evalbench   # the synthetic hourly groups of bench/evaluator.py

    rss: dict[str, dict[str, float]] = {"imports": common.rss_mb()}
    apps, days, live_hours = args.apps, args.days, args.live_hours
    now = time.time()
    t_live = now - live_hours * 3600                          # live traffic from here to now
    s = common.settings(db, **limits(apps))
    engine = Engine(s, clock=lambda: now)
    keys = series_keys(apps)
    sids = engine.store.series_ids(keys)
    timing = {}

    t = time.perf_counter()
    last_hour = int(t_live // 3600) * 3600                  # the hour live traffic starts in is left to it
    hours = np.arange(last_hour - int(days * 24) * 3600, last_hour, 3600, dtype=np.int64)
    child = mp.get_context("fork").Process(target=_bulk_hours, args=(str(db), sids, hours, 1))
    child.start()
    try:
        # Meanwhile the in-memory history: one series per app and per model covers every scope.
        models = [(p, m) for p in range(PROVIDERS) for m in range(MODELS)]
        sid_of = dict(zip(keys, sids))
        cover = sorted({sid_of[(f"app-{i % apps:03d}", f"provider-{models[i % len(models)][0]}",
                                f"model-{models[i % len(models)][0]}-{models[i % len(models)][1]:02d}")]
                        for i in range(max(apps, len(models)))})
        series_map = engine.store.series()
        rng = np.random.default_rng(2)
        pool = evalbench.sketch_pool(rng, 64, 40)
        for c in range(0, len(hours), 12):
            engine.history.add_hours(evalbench.synthetic_groups(np.array(cover), hours[c:c + 12], rng, pool, 40.0),
                                     series_map)
        child.join()
    finally:
        if child.is_alive():
            child.terminate()
            child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"bulk insert of hourly buckets failed (exit {child.exitcode})")
    timing["history_s"] = time.perf_counter() - t

    t = time.perf_counter()
    recs = live_records(keys, t_live, now, rng)
    for i in range(0, len(recs), 1000):
        res = engine.ingest(recs[i:i + 1000], now=now)
        assert not res.rejected, res.to_dict()
    timing["live_ingest_s"] = time.perf_counter() - t
    n_live = len(recs)
    del recs
    gc.collect()
    rss["built"] = common.rss_mb()
    cache_entries, cache_b = cache_bytes(engine)

    t = time.perf_counter()
    engine.evaluate(now)
    timing["evaluate_s"] = time.perf_counter() - t
    gc.collect()
    rss["evaluated"] = common.rss_mb()
    t = time.perf_counter()
    body = generate_latest(engine.registry)
    timing["scrape_s"] = time.perf_counter() - t
    size = len(body)
    del body
    gc.collect()
    rss["scraped"] = common.rss_mb()
    stats = {"series": len(keys), "scopes": engine.history.size, "history_days": days, "live_hours": live_hours,
             "live_records": n_live, "hourly_rows_on_disk": len(hours) * len(keys), "scrape_bytes": size,
             "cache_entries": cache_entries, "cache_mb": cache_b / 1e6,
             "db_mb": sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 1e6}
    engine.close()
    return {"rss": rss, "timing": timing, "stats": stats}


def limits(apps: int) -> dict[str, int]:
    return {"label_limit_app": max(apps * 2, 100), "label_limit_model": PROVIDERS * MODELS * 2}


RESTORE_CODE = """
import gc, sys, time
sys.path.insert(0, {bench!r})
import common
from exporter.engine import Engine
t = time.perf_counter()
e = Engine(common.settings({db!r}, **{limits!r}))
dt = time.perf_counter() - t
gc.collect()
m = common.rss_mb()
print("RESTORED", dt, m["VmRSS"], m["VmHWM"], flush=True)
"""


def restart(db: Path, apps: int, cap_mb: float, limit_s: float) -> dict[str, Any]:
    """Open the database in a fresh process, as a restart does; stop it past cap_mb or limit_s."""
    code = RESTORE_CODE.format(bench=str(Path(__file__).parent), db=str(db), limits=limits(apps))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    t0 = time.perf_counter()
    peak, outcome = 0.0, "ok"
    while proc.poll() is None:
        try:
            peak = max(peak, common.rss_mb(proc.pid).get("VmRSS", 0.0))
        except (FileNotFoundError, ProcessLookupError):
            break
        if peak > cap_mb:
            outcome = f"stopped: RSS passed {cap_mb:,.0f} MB"
        elif time.perf_counter() - t0 > limit_s:
            outcome = f"stopped: still restoring after {limit_s:.0f} s"
        if outcome != "ok":
            proc.kill()
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {"outcome": outcome, "peak_rss_mb": peak, "elapsed_s": elapsed}
    for line in out.decode().splitlines():
        if line.startswith("RESTORED"):
            _, secs, rss, hwm = line.split()
            result.update(restore_s=float(secs), rss_mb=float(rss), peak_rss_mb=float(hwm))
    if outcome == "ok" and proc.returncode != 0:
        result["outcome"] = f"failed: {err.decode(errors='replace').strip().splitlines()[-1:]}"
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.apps is None:
        args.apps = 10 if args.quick else 100
    if args.days is None:
        args.days = 1 if args.quick else 14
    if args.live_hours is None:
        args.live_hours = 1 if args.quick else 3
    with common.scratch_dir("memory") as d:
        db = Path(d) / "bench.db"
        built = build_and_measure(args, db)
        gc.collect()
        rs = restart(db, args.apps, args.restart_cap_mb, 20 if args.quick else 120)
    rss, st = built["rss"], built["stats"]
    after = max(rss["evaluated"]["VmRSS"], rss["scraped"]["VmRSS"])
    label = f"{st['series']:,} series, {st['history_days']:g} day{'s' if st['history_days'] != 1 else ''}"
    figures = [
        common.figure("rss_imports_mb", "RSS after imports (python, numpy, exporter)", rss["imports"]["VmRSS"], "MB", decimals=0),
        common.figure("rss_built_mb", f"RSS after building ({label})", rss["built"]["VmRSS"], "MB",
                      f"<= {TARGET_MB:g} MB", rss["built"]["VmRSS"] <= TARGET_MB, 0),
        common.figure("cache_mb", f"  of which the store's bucket cache ({st['cache_entries']:,} buckets)",
                      st["cache_mb"], "MB", decimals=0),
        common.figure("rss_evaluated_mb", "RSS after one evaluation", rss["evaluated"]["VmRSS"], "MB", decimals=0),
        common.figure("rss_scraped_mb", "RSS after one scrape", rss["scraped"]["VmRSS"], "MB",
                      f"<= {TARGET_MB:g} MB", after <= TARGET_MB, 0),
        common.figure("hwm_mb", "peak RSS (VmHWM) over the run", rss["scraped"]["VmHWM"], "MB", decimals=0),
    ]
    restored = rs["outcome"] == "ok"
    if restored:
        figures += [
            common.figure("restart_rss_mb", f"restart on the same store: RSS after restore ({rs['restore_s']:.1f} s)",
                          rs["rss_mb"], "MB", f"<= {TARGET_MB:g} MB", rs["rss_mb"] <= TARGET_MB, 0),
            common.figure("restart_peak_mb", "restart: peak RSS during restore", rs["peak_rss_mb"], "MB",
                          f"<= {TARGET_MB:g} MB", rs["peak_rss_mb"] <= TARGET_MB, 0)]
    else:
        figures.append(common.figure("restart_peak_mb", f"restart on the same store: {rs['outcome']}",
                                     rs["peak_rss_mb"], "MB", f"<= {TARGET_MB:g} MB", False, 0))
    return {"name": "memory", "figures": figures, "detail": {**built, "restart": rs}}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--apps", type=int, default=None, help="apps; series = apps x 100 (default 100, quick 10)")
    p.add_argument("--days", type=float, default=None, help="days of hourly history (default 14, quick 1)")
    p.add_argument("--live-hours", type=int, default=None, help="hours of live traffic at the end (default 3, quick 1)")
    p.add_argument("--restart-cap-mb", type=float, default=2000, help="memory cap for the restart check (default 2000)")


if __name__ == "__main__":
    common.cli("memory", run, _args)
