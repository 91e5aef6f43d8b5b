"""Evaluator: one full evaluation of 1,000 scopes with 14 days of hourly history.

The scope history is built directly (no HTTP, no SQLite) the way the engine restores it at
start-up: `ScopeHistory.add_hours` with hourly `buckets.Groups` for 14 days, then
`ScopeHistory.add(..., hourly=False)` with minute groups for the window. 500 series
(app_i, provider, model_{i mod 499}) give 1 global + 500 app + 499 model scopes = 1,000
scopes. Sketches are drawn from a pool of pre-built log-normal sketches. The build time is
reported too: it is the same work the engine does when it restores history at start-up.

`--quick` stores 1 day of history instead of 14, so building takes seconds instead of
minutes. The evaluator still reads fixed (scopes x baseline hours) arrays, NaN where an
hour is empty, but what those arrays hold changes the cost of sorting them, so quick
figures are a smoke test, not the 14-day case.

Also timed, the start-up restore of the per-hour statistics that are derived from
sub-hour slots the store does not keep for the whole baseline: the burstiness sums
(`bursts` table) and the statistics of coarse-slot mean sizes (`slot_sizes` table), one
row per scope and hour. Every hour the history holds gets such a row for every scope
(synthetic values), written to a real SQLite file with `Store.write_bursts` as the engine
writes them; then, median of repeats, the store's query (`Store.bursts` /
`Store.slot_sizes`) and `ScopeHistory.load_bursts` / `load_slot_sizes`, into the history
whose hours are already claimed (as at start-up, where `add_hours` runs first). The loaded
arrays are checked against the written ones.

Timed: `Evaluator.evaluate(t)` with the default settings (7-day baseline, so 14 days of
hours read with the seasonal days before it) and with a 14-day baseline, median of
repeats, each in two states:

- steady: the baseline statistics cached by the previous call, as for every evaluation
  within an hour;
- first after the hour turns: before each call (untimed), the state the hour before the
  turn leaves: the evaluator holds the previous hour's baseline, the window's slow-request
  counts were made against that baseline's thresholds, and the hour that now joins the
  baseline has received records since its quantiles were last taken. The timed call then
  does all an hour turn brings: that hour's quantiles, the baseline statistics for the new
  hour, and the slow-request counts of the scopes whose thresholds moved. This is the
  slowest evaluation; the target applies to it too.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

import common

TARGET_MS = 100.0


def sketch_pool(rng: np.random.Generator, size: int, samples: int) -> dict[str, np.ndarray]:
    from exporter import sketch
    from exporter.storage.buckets import SKETCHES
    centre = {"latency": 1.5, "ttft": 0.5, "otps": 70.0, "tpot": 20.0}
    pool = {}
    for kind in SKETCHES:
        scale = centre[kind] * rng.lognormal(0, 0.4, size)
        vals = scale[:, None] * rng.lognormal(0, 0.5, (size, samples))
        pool[kind] = np.stack([sketch.histogram(v) for v in vals])
    return pool


def synthetic_groups(series: np.ndarray, starts: np.ndarray, rng: np.random.Generator,
                     pool: dict[str, np.ndarray], per_group: float) -> Any:
    """Groups for every (series, start) pair: request counts with a daily cycle, tokens, cost."""
    from exporter.storage.buckets import FIELDS, Groups
    s = np.repeat(series, len(starts))
    st = np.tile(starts, len(series))
    g = len(s)
    hour = (st % 86400) / 3600
    lam = per_group * (0.6 + 0.4 * np.sin((hour - 10) / 24 * 2 * np.pi)) * (1 + (s % 7) / 7)
    req = rng.poisson(lam).astype(np.float64) + 1
    adds = np.zeros((g, len(FIELDS)))
    col = {name: i for i, name in enumerate(FIELDS)}
    adds[:, col["requests"]] = req
    adds[:, col["errors"]] = rng.binomial(req.astype(np.int64), 0.01)
    adds[:, col["input_tokens"]] = req * rng.lognormal(6.8, 0.2, g)
    adds[:, col["output_tokens"]] = req * rng.lognormal(5.3, 0.2, g)
    adds[:, col["cache_read_tokens"]] = adds[:, col["input_tokens"]] * 0.2
    adds[:, col["cost"]] = adds[:, col["input_tokens"]] * 2e-6 + adds[:, col["output_tokens"]] * 8e-6
    ok = req - adds[:, col["errors"]]
    per_request = (adds[:, col["input_tokens"]] + adds[:, col["output_tokens"]] + adds[:, col["cache_read_tokens"]]) / req
    for n, s1, s2, size in (("sized_requests", "log_tokens", "log_tokens_sq", per_request),
                            ("costed_requests", "log_cost", "log_cost_sq", adds[:, col["cost"]] / req)):
        logs = np.log(size) + rng.normal(0, 0.5 / np.sqrt(np.maximum(ok, 1)), g)   # the mean of ok requests' logs
        adds[:, col[n]] = ok
        adds[:, col[s1]] = ok * logs
        adds[:, col[s2]] = ok * (logs * logs + 0.25)                               # a log spread of 0.5
    ids = rng.integers(0, len(next(iter(pool.values()))), g)
    return Groups(s.astype(np.int64), st.astype(np.int64), adds, {k: v[ids] for k, v in pool.items()})


def build_history(n_scopes: int, days: float, t: float, window: float, horizon: float,
                  rng: np.random.Generator) -> tuple[Any, dict[int, tuple[str, str, str]], float]:
    """A ScopeHistory of `n_scopes` scopes (1 global, n/2 apps, the rest models)."""
    from exporter.anomaly.history import ScopeHistory
    n_apps = n_scopes // 2
    n_models = n_scopes - 1 - n_apps
    keys = {}
    for i in range(max(n_apps, n_models)):
        j = i % n_models
        keys[i + 1] = (f"app-{i % n_apps:04d}", f"prov{j % 4}", f"model-{j:04d}")
    series = np.array(sorted(keys), dtype=np.int64)
    hist = ScopeHistory(window, horizon)
    t0 = time.perf_counter()
    hour_now = int(t // 3600)
    hours = np.arange(hour_now - int(days * 24), hour_now + 1) * 3600
    hour_pool = sketch_pool(rng, 64, 40)
    for c in range(0, len(hours), 6):                     # whole hours per call, as at start-up
        hist.add_hours(synthetic_groups(series, hours[c:c + 6], rng, hour_pool, 40.0), keys)
    minute_pool = sketch_pool(rng, 64, 3)
    minutes = np.arange(int((t - window) // 60) + 1, int(t // 60) + 1) * 60
    for c in range(0, len(minutes), 10):
        hist.add(synthetic_groups(series, minutes[c:c + 10], rng, minute_pool, 0.7), keys, hourly=False)
    return hist, keys, time.perf_counter() - t0


def restore_timings(hist: Any, rng: np.random.Generator, repeats: int) -> tuple[int, dict[str, list[float]]]:
    """Fill every hour the history holds with burstiness and slot size statistics for every
    scope, store them in a real SQLite file, and time reading them back (ms per step)."""
    from exporter.storage.store import Store
    n = hist.size
    held = np.flatnonzero(hist.hours.tag >= 0)
    shape = hist.hour_slots.shape[2:]
    slots = rng.lognormal(0, 1, (n, held.size) + shape)
    slots[..., 0] = rng.integers(1, 13, (n, held.size) + shape[:-1])   # coarse slots with sized requests
    hist.hour_slots[:n, held] = slots
    hist.hour_burst[:n, held] = rng.lognormal(3, 1, (n, held.size, 2))
    first, end = int(hist.hours.tag[held].min()), int(hist.hours.tag[held].max()) + 1
    want_slots, want_burst = hist.hour_slots[:n].copy(), hist.hour_burst[:n].copy()
    timings: dict[str, list[float]] = {k: [] for k in ("bursts: query", "bursts: load", "slot sizes: query",
                                                        "slot sizes: load")}
    with common.scratch_dir("restore") as tmp:
        store = Store(f"{tmp}/usage.db")
        store.write_bursts(hist.burst_rows(first, end), end, hist.slot_size_rows(first, end))
        rows = 0

        def once() -> None:
            nonlocal rows
            hist.hour_slots[:n] = 0.0
            hist.hour_burst[:n] = 0.0
            for name, query, load in (("bursts", store.bursts, hist.load_bursts),
                                      ("slot sizes", store.slot_sizes, hist.load_slot_sizes)):
                t0 = time.perf_counter()
                got = query(first)
                t1 = time.perf_counter()
                load(got)
                t2 = time.perf_counter()
                timings[f"{name}: query"].append((t1 - t0) * 1e3)
                timings[f"{name}: load"].append((t2 - t1) * 1e3)
                rows = len(got)
            assert np.array_equal(hist.hour_slots[:n], want_slots) and np.array_equal(hist.hour_burst[:n], want_burst)

        common.repeat(once, repeats, warmup=1, max_seconds=60)
        store.close()
    return rows, timings


def run(args: argparse.Namespace) -> dict[str, Any]:
    from exporter.config import load_settings
    from exporter.anomaly.evaluator import Evaluator
    from exporter.anomaly.signals import signal_specs

    repeats = 10 if args.quick else 30
    days = 1 if args.quick else 14
    s = load_settings(flags={"db": ":memory:"}, environ={})
    rng = np.random.default_rng(5)
    t = (time.time() // 3600) * 3600 + 1800
    hist, keys, build_s = build_history(args.scopes, days, t, s.window, s.horizon, rng)
    specs = signal_specs(s.signals)
    variants = {
        "default (7-day baseline)": Evaluator(hist, specs, s.baseline, s.alert_budget),
        "14-day baseline": Evaluator(hist, specs, 14 * 86400, s.alert_budget),
    }
    timings: dict[str, list[float]] = {}
    active = 0

    end = math.floor((t - hist.window) / 3600)          # the baseline's end at t

    def before_the_turn(ev: Evaluator) -> None:
        """What evaluations in the hour before the turn leave behind."""
        before = ev._baseline_at(end - 1)
        hist.recent_exceedances(t, max(ev.coarse_slots), before.threshold_bins, version=before.end)
        hist._dirty_open.add(int(np.flatnonzero(hist.open.tag == end - 1)[0]))     # records came in that hour

    for name, ev in list(variants.items()):
        timings[name] = [x * 1e3 for x in common.repeat(lambda ev=ev: ev.evaluate(t), repeats, warmup=2, max_seconds=30)]
        timings[f"{name}, first after the hour turns"] = [
            x * 1e3 for x in common.repeat(lambda ev=ev: ev.evaluate(t), repeats, warmup=1, max_seconds=30,
                                           setup=lambda ev=ev: before_the_turn(ev))]
        active = int(ev.evaluate(t).active.sum())
    restore_rows, restore = restore_timings(hist, rng, 5 if args.quick else 9)
    figures = [common.figure("build_s", f"build: add_hours of {days} day{'s' if days != 1 else ''} x {len(keys)} series (start-up restore work)",
                             build_s, "s", decimals=1)]
    for name, ms in restore.items():
        figures.append(common.figure(f"restore_ms[{name}]", f"start-up restore of {restore_rows:,} scope-hours, {name}",
                                     common.median(ms), "ms", decimals=1))
    for name, ms in timings.items():
        med = common.median(ms)
        target = f"< {TARGET_MS:g} ms"
        name = name if "first after" in name else f"{name}, steady (baseline statistics cached)"
        figures.append(common.figure(f"evaluate_ms[{name}]", f"evaluate {hist.size:,} scopes, {name}", med, "ms",
                                     target, (med < TARGET_MS) if target else None, 1))
    return {"name": "evaluator", "figures": figures,
            "detail": {"scopes": hist.size, "series": len(keys), "active_scopes": active, "history_days": days,
                       "build_s": build_s, "repeats": repeats, "timings_ms": timings,
                       "restore_rows": restore_rows, "restore_ms": restore}}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scopes", type=int, default=1000, help="scopes to build (default 1000)")


if __name__ == "__main__":
    common.cli("evaluator", run, _args)
