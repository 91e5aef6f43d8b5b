"""Detection-quality benchmark: real traffic with known anomalies, replayed through the
backtest path, scored per signal and anomaly kind.

    python bench/detection/run.py               # full: 14 days history + 7 scored days, all NAB series
    python bench/detection/run.py --quick       # CI form: 7 + 1 days, two instances per kind, one NAB series
    python bench/detection/run.py --thresholds  # also print the threshold sweep tables
    python bench/detection/run.py --set seasonal=true --signal cost_per_hour.warning_ratio=1.5

Prints markdown tables and writes JSON to bench/results/. See bench/detection/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from inject import KIND_BY_NAME, KINDS, Anomaly, Kind, inject  # noqa: E402
from score import (  # noqa: E402
    Collector, Observations, SignalScore, episodes, false_warnings, rejudge, rejudge_drift, score_kind, score_nab,
)
from traffic import DAY, EPOCH, HOUR, MissingData, build_traffic, nab_files, nab_traffic  # noqa: E402

from exporter.config import Settings, load_settings  # noqa: E402
from exporter.sources.replay import backtest  # noqa: E402
from exporter.anomaly.signals import SIGNAL_NAMES  # noqa: E402

REPO = HERE.parents[1]
RESULTS = REPO / "bench" / "results"
STEP = 300.0
GRACE = 15 * 60.0
DETECTOR_SIGNALS = ("drift", "drift.length_collapse_ratio", "drift.empty_response_rate", "drift.error_rate",
                    "drift.tool_silence_rate", "drift.stop_anomaly_rate", "runaway", "runaway.invocation", "runaway.chain_length", "runaway.token_burst",
                    "runaway.session_cost", "runaway.tool_repetition")
TARGET_RECALL = 0.9
TARGET_DELAY_MIN = 15.0
TARGET_FP_WEEK = 1.0
ALERT_FOR_S = 600.0          # the shipped warning rules wait `for: 10m`


@dataclass(frozen=True)
class Plan:
    """How much traffic and how many instances a run uses."""

    name: str
    history_days: int
    scored_days: int
    instance_slots: tuple[tuple[int, float], ...]     # (scored day, hour of day) per instance
    creep_slots: tuple[tuple[int, float], ...]
    nab: tuple[str, ...] | None                       # None: every labelled file
    seed: int = 7

    @property
    def scored_start(self) -> float:
        return EPOCH + self.history_days * DAY

    @property
    def scored_end(self) -> float:
        return self.scored_start + self.scored_days * DAY

    def starts(self, kind: Kind) -> list[float]:
        slots = self.creep_slots if kind.duration >= DAY else self.instance_slots
        return [self.scored_start + d * DAY + h * HOUR for d, h in slots]


FULL = Plan("full", 14, 7,
            instance_slots=((0, 10), (1, 14), (2, 19), (3, 12), (4, 16), (5, 21), (6, 9)),
            creep_slots=((0, 6), (2, 6), (4, 6)), nab=None)
QUICK = Plan("quick", 7, 1, instance_slots=((0, 10), (0, 18)), creep_slots=((0, 0),),
             nab=("artificialWithAnomaly/art_daily_jumpsup.csv",))


# --- runs -----------------------------------------------------------------------------

_BASE: dict[tuple[int, int], Any] = {}


def base_traffic(plan: Plan) -> Any:
    key = (plan.history_days + plan.scored_days + 1, plan.seed)
    if key not in _BASE:
        _BASE[key] = build_traffic(key[0], plan.seed)
    return _BASE[key]


def make_settings(sets: dict[str, Any], signals: dict[str, dict[str, float]]) -> Settings:
    return load_settings(flags={"db": ":memory:", **sets, "signals": signals or None}, environ={})


def run_scenario(plan: Plan, kind_name: str | None, sets: dict[str, Any], signals: dict[str, dict[str, float]],
                 keep_values: bool = True) -> tuple[str, Observations, list[Anomaly], float]:
    """One backtest over the scored days of the base traffic, clean or with one kind injected."""
    t0 = time.perf_counter()
    base = base_traffic(plan)
    anomalies: list[Anomaly] = []
    if kind_name is None:
        traffic = base
    else:
        kind = KIND_BY_NAME[kind_name]
        traffic, anomalies = inject(base, kind, plan.starts(kind), seed=plan.seed * 1000 + KINDS.index(kind))
    records = traffic.to_records()
    col = Collector(keep_values=keep_values)
    end = plan.scored_end + (HOUR if plan.scored_days == 1 else 0)
    backtest(make_settings(sets, signals), records, plan.scored_start, end, STEP, on_snapshot=col)
    return kind_name or "clean", col.result(), anomalies, time.perf_counter() - t0


def run_nab(file: str, sets: dict[str, Any], signals: dict[str, dict[str, float]]
            ) -> tuple[str, Observations, list[tuple[float, float]], dict[str, Any], float]:
    t0 = time.perf_counter()
    traffic, windows = nab_traffic(file)
    col = Collector(keep_values=False)
    step = max(STEP, traffic.meta["step"])    # an hourly series gains nothing from 5-minute steps
    backtest(make_settings(sets, signals), traffic.to_records(), traffic.meta["start"], traffic.meta["end"], step,
             on_snapshot=col)
    return file, col.result(), windows, traffic.meta, time.perf_counter() - t0


# --- scoring and tables ---------------------------------------------------------------

def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def verdict_for(s: SignalScore) -> str:
    """Target check for a primary signal: recall (>= 2x kinds), delay (hour-long spikes)."""
    if not s.primary or not s.gated:
        return ""
    bad = []
    if not s.recall >= TARGET_RECALL:
        bad.append("recall")
    if s.hour_long_spike and not s.median_delay_min <= TARGET_DELAY_MIN:
        bad.append("delay")
    return "met" if not bad else "MISSED " + "+".join(bad)


def kinds_table(scores: list[SignalScore]) -> str:
    lines = ["| anomaly | size | signal | detected | recall | median delay (min) | precision | target |",
             "|---|---|---|---|---|---|---|---|"]
    for s in scores:
        sig = f"**{s.signal}**" if s.primary else s.signal
        lines.append(f"| {s.kind} | {s.size:g}x | {sig} | {s.detected}/{s.instances} | {fmt(s.recall)} | "
                     f"{fmt(s.median_delay_min, 0)} | {fmt(s.precision)} ({s.true_episodes}/{s.episodes}) | "
                     f"{verdict_for(s)} |")
    return "\n".join(lines)


def fp_table(fp: dict[str, dict[str, Any]], weeks: float) -> str:
    lines = [f"| signal | false warnings / week ({weeks:.2f} weeks of clean traffic) | as alerts (for: 10m) | where "
             f"| target ≤ {TARGET_FP_WEEK:g} |", "|---|---|---|---|---|"]
    for sig, d in fp.items():
        where = ", ".join(f"{k} {v}" for k, v in sorted(d["by_scope"].items(), key=lambda kv: -kv[1])[:4])
        ok = "met" if d["per_week"] <= TARGET_FP_WEEK else "MISSED"
        alerts = sum(1 for e in d["list"] if e["end"] - e["start"] >= ALERT_FOR_S)
        lines.append(f"| {sig} | {fmt(d['per_week'], 1)} ({d['episodes']}) | {fmt(alerts / weeks, 1)} | "
                     f"{where or '–'} | {ok} |")
    return "\n".join(lines)


def nab_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| NAB series | windows | detected | recall | precision | false / week | median delay (h) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['file']} | {r['windows']} | {r['detected']} | {fmt(r['recall'])} | "
                     f"{fmt(r['precision'])} ({r['true_episodes']}/{r['episodes']}) | {fmt(r['false_per_week'], 1)} | "
                     f"{fmt(r['median_delay_h'], 1)} |")
    tw = sum(r["windows"] for r in rows)
    td = sum(r["detected"] for r in rows)
    te = sum(r["episodes"] for r in rows)
    tt = sum(r["true_episodes"] for r in rows)
    wk = sum(r["weeks_scored"] for r in rows)
    lines.append(f"| **all** | {tw} | {td} | {fmt(td / tw if tw else math.nan)} | "
                 f"{fmt(tt / te if te else math.nan)} ({tt}/{te}) | {fmt((te - tt) / wk if wk else math.nan, 1)} | |")
    return "\n".join(lines)


# Knob values tried per signal (every combination); defaults are always among them.
SWEEP_GRID: dict[str, dict[str, tuple[float, ...]]] = {
    "cost_per_hour": {"warning_ratio": (1.5, 2.0, 2.5, 3.0), "min_zscore": (1.5, 2.0, 2.5, 3.0, 4.0)},
    "token_velocity": {"warning_ratio": (2.0, 3.0), "min_zscore": (2.0, 3.0)},
    "request_rate": {"warning_ratio": (2.0, 3.0, 4.0), "min_zscore": (2.0, 3.0, 4.0)},
    "error_rate": {"warning_ratio": (2.5,), "min_zscore": (3.0,), "min_current": (0.05, 0.1, 0.15),
                   "min_requests": (20, 50, 100, 200)},
    "latency_p95": {"warning_ratio": (2.0, 2.5, 3.0), "min_zscore": (2.0, 3.0, 4.0), "min_requests": (20, 50, 100)},
    "ttft_p95": {"warning_ratio": (1.5, 2.0, 2.5), "min_zscore": (2.0, 3.0)},
    "output_tokens_per_second": {"warning_ratio": (1.5, 1.75, 2.0), "min_zscore": (2.0, 3.0)},
}
DRIFT_GRID: dict[str, tuple[float, ...]] = {
    "length_collapse_ratio": (0.5, 0.4, 0.35, 0.3, 0.25),
    "empty_response_rate": (0.03, 0.05, 0.08, 0.1),
    "error_rate": (0.04, 0.08, 0.12),
}


def check_rejudge(obs: Observations, drift_preset: str = "normal") -> list[str]:
    """The sweep's severity rules must reproduce the live severities at the defaults."""
    from exporter.detectors.drift import PRESETS
    bad = []
    for sig in obs.values:
        live = obs.severity.get(sig)
        if live is None:
            continue
        if not np.array_equal(live, rejudge(obs, sig)[:, : live.shape[1]]):
            bad.append(sig)
    for dsig in DRIFT_GRID:
        live = obs.severity.get("drift." + dsig, np.zeros((obs.times.shape[0], len(obs.keys)), np.int8))
        if obs.drift_values and not np.array_equal(live >= 1, rejudge_drift(obs, dsig, PRESETS[drift_preset][dsig].mild) >= 1):
            bad.append("drift." + dsig)
    return bad


def _combos(grid: dict[str, tuple[float, ...]]) -> list[dict[str, float]]:
    out: list[dict[str, float]] = [{}]
    for knob, values in grid.items():
        out = [{**c, knob: v} for c in out for v in values]
    return out


def sweep(clean: Observations, runs: dict[str, tuple[Observations, list[Anomaly]]], plan: Plan, lo: float,
          hi: float) -> dict[str, list[dict[str, Any]]]:
    """Recall / delay per kind and false warnings per week on clean traffic, per knob combination."""
    weeks = (hi - lo) / (7 * DAY)
    out: dict[str, list[dict[str, Any]]] = {}
    for sig, grid in SWEEP_GRID.items():
        if sig not in clean.values:
            continue
        kinds = [k for k in KINDS if sig in k.signals and k.name in runs]
        rows = []
        for over in _combos(grid):
            if "warning_ratio" in over:
                over["high_ratio"] = over["warning_ratio"] * 2
            try:
                sev = rejudge(clean, sig, **over)
            except ValueError:       # e.g. a min_requests below the live one: not recoverable
                continue
            eps = episodes(clean, sig, sev, lo, hi)
            row: dict[str, Any] = {"knobs": {k: v for k, v in over.items() if k != "high_ratio"},
                                   "fp_per_week": len(eps) / weeks, "alerts_per_week": _alerts(eps) / weeks}
            for k in kinds:
                obs, anomalies = runs[k.name]
                s = score_kind(obs, k, anomalies, GRACE, lo, hi, [sig], {sig: rejudge(obs, sig, **over)})[0]
                row[k.name] = {"recall": _r(s.recall), "delay_min": _r(s.median_delay_min)}
            rows.append(row)
        out[sig] = rows
    for dsig, limits in DRIFT_GRID.items():
        name = "drift." + dsig
        kinds = [k for k in KINDS if k.name in runs and name in k.signals]
        rows = []
        for mild in limits:
            eps = episodes(clean, name, rejudge_drift(clean, dsig, mild), lo, hi)
            row = {"knobs": {"mild": mild}, "fp_per_week": len(eps) / weeks, "alerts_per_week": _alerts(eps) / weeks}
            for k in kinds:
                obs, anomalies = runs[k.name]
                s = score_kind(obs, k, anomalies, GRACE, lo, hi, [name], {name: rejudge_drift(obs, dsig, mild)})[0]
                row[k.name] = {"recall": _r(s.recall), "delay_min": _r(s.median_delay_min)}
            rows.append(row)
        out[name] = rows
    return out


def _alerts(eps: list[Any]) -> int:
    """Episodes that a Prometheus rule with `for: 10m` would turn into an alert."""
    return sum(1 for e in eps if e.end - e.start >= ALERT_FOR_S)


def _r(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 3)


def sweep_tables(sw: dict[str, list[dict[str, Any]]], defaults: dict[str, dict[str, float]]) -> str:
    parts = []
    for sig, rows in sw.items():
        if not rows:
            continue
        knobs = list(rows[0]["knobs"])
        kinds = [k for k in rows[0] if k not in ("knobs", "fp_per_week", "alerts_per_week")]
        d = defaults.get(sig, {})
        title = ", ".join(f"{k} {d[k]:g}" for k in knobs if k in d)
        head = "| " + " | ".join(knobs) + " | false/week (alerts) | " + " | ".join(f"{k} recall (delay)" for k in kinds) + " |"
        lines = [f"**{sig}** (default: {title})", "", head, "|" + "---|" * (len(knobs) + 1 + len(kinds))]
        for r in rows:
            mark = " ◀" if all(d.get(k) == v for k, v in r["knobs"].items()) else ""
            cells = [f"{fmt(r[k]['recall'])} ({fmt(r[k]['delay_min'], 0)})" for k in kinds]
            lines.append("| " + " | ".join(f"{v:g}" for v in r["knobs"].values()) + f"{mark} | "
                         f"{fmt(r['fp_per_week'], 1)} ({fmt(r['alerts_per_week'], 1)}) | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def sweep_defaults(settings: Settings) -> dict[str, dict[str, float]]:
    from exporter.detectors.drift import PRESETS
    from exporter.anomaly.signals import signal_specs
    out: dict[str, dict[str, float]] = {
        s.name: {"warning_ratio": s.warning_ratio, "min_zscore": s.min_zscore, "min_current": s.min_current,
                 "min_requests": s.min_requests} for s in signal_specs(settings.signals)}
    preset = PRESETS[settings.drift.preset]
    for dsig in DRIFT_GRID:
        out["drift." + dsig] = {"mild": preset[dsig].mild}
    return out


# --- main -----------------------------------------------------------------------------

def exporter_revision() -> str:
    """The commit the exporter code under test comes from (+dirty when exporter/ has local edits)."""
    import subprocess

    import exporter
    src = Path(exporter.__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({src})"


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, _, v = it.partition("=")
        if not _:
            raise SystemExit(f"--set wants key=value, got {it!r}")
        v = v.strip()
        out[k.strip()] = json.loads(v) if v[:1] in "{[" else v
    return out


def parse_signals(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for it in items:
        k, _, v = it.partition("=")
        sig, _, knob = k.partition(".")
        if not _ or sig not in SIGNAL_NAMES:
            raise SystemExit(f"--signal wants signal.knob=value with a known signal, got {it!r}")
        out.setdefault(sig, {})[knob] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced CI form (about 1 minute on 2 cores)")
    ap.add_argument("--thresholds", action="store_true", help="print the threshold sweep tables too")
    ap.add_argument("--kinds", default="", help="comma-separated anomaly kinds to run (default: all)")
    ap.add_argument("--no-nab", action="store_true", help="skip the NAB series")
    ap.add_argument("--nab", default="", help="comma-separated NAB files (default: the plan's)")
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help="exporter setting for every run, e.g. seasonal=true, window=30m or "
                         "'runaway={\"tool_repeat_max\": 20}' (JSON for the mapping settings)")
    ap.add_argument("--signal", action="append", default=[], metavar="SIGNAL.KNOB=VALUE",
                    help="signal threshold override, e.g. cost_per_hour.warning_ratio=1.5")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel backtests")
    ap.add_argument("--out", default="", help="JSON output path (default bench/results/detection-<plan>.json)")
    args = ap.parse_args(argv)

    plan = QUICK if args.quick else FULL
    sets = parse_sets(args.set)
    signals = parse_signals(args.signal)
    try:
        settings = make_settings(sets, signals)
        base_traffic(plan)
        nab_list = ([f for f in args.nab.split(",") if f] or list(plan.nab or nab_files())) if not args.no_nab else []
    except MissingData as e:
        print(f"detection benchmark skipped: {e}")
        return 0
    kinds = [k for k in KINDS if not args.kinds or k.name in args.kinds.split(",")]
    t_start = time.perf_counter()
    print(f"detection benchmark ({plan.name}): {plan.history_days} days history + {plan.scored_days} scored, "
          f"{len(kinds)} anomaly kinds, {len(nab_list)} NAB series, step {STEP / 60:g} min, "
          f"settings {sets or 'default'} signals {signals or 'default'}", file=sys.stderr)

    runs: dict[str, tuple[Observations, list[Anomaly]]] = {}
    nab_rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futs = [pool.submit(run_scenario, plan, None, sets, signals)]
        futs += [pool.submit(run_scenario, plan, k.name, sets, signals) for k in kinds]
        nfuts = [pool.submit(run_nab, f, sets, signals) for f in nab_list]
        for f in futs:
            name, obs, anomalies, secs = f.result()
            runs[name] = (obs, anomalies)
            timings[name] = round(secs, 1)
            print(f"  {name}: {secs:.0f} s", file=sys.stderr)
        for f in nfuts:
            file, obs, windows, meta, secs = f.result()
            timings["nab:" + file] = round(secs, 1)
            span = meta["end"] - meta["start"]
            lo = meta["start"] + max(0.15 * span, DAY)   # NAB's probationary period, and a day of baseline
            nab_rows.append(score_nab(obs, file, windows, lo, meta["end"]).to_dict())
            print(f"  nab {file}: {secs:.0f} s", file=sys.stderr)

    clean = runs["clean"][0]
    lo, hi = plan.scored_start, plan.scored_end + (HOUR if plan.scored_days == 1 else 0)
    weeks = (hi - lo) / (7 * DAY)
    fp = false_warnings(clean, lo, hi, list(SIGNAL_NAMES) + list(DETECTOR_SIGNALS))
    scores: list[SignalScore] = []
    for k in kinds:
        obs, anomalies = runs[k.name]
        scores.extend(score_kind(obs, k, anomalies, GRACE, lo, hi))
    mismatch = check_rejudge(clean, settings.drift.preset)
    sw = sweep(clean, runs, plan, lo, hi)
    defaults = sweep_defaults(settings)

    revision = exporter_revision()
    out = [f"## Detection benchmark ({plan.name}, exporter {revision})", "",
           f"Traffic: RAGPulse arrivals and sessions ({plan.history_days + plan.scored_days + 1} days from its six "
           f"real days), Azure token sizes; {plan.history_days} days of history, {plan.scored_days} scored "
           f"day(s), evaluated every {STEP / 60:g} min. Settings: {sets or 'defaults'}; "
           f"signal overrides: {signals or 'none'}.", "",
           "### Injected anomalies", "", kinds_table(scores), "",
           "### False warnings on clean traffic", "", fp_table(fp, weeks), ""]
    if nab_rows:
        out += ["### NAB (request_rate, global scope)", "", nab_table(nab_rows), ""]
    if args.thresholds:
        out += ["### Threshold sweep (re-judged from the same runs)", "", sweep_tables(sw, defaults), ""]
    if mismatch:
        out += [f"WARNING: the sweep's severity rule disagrees with the live severities for {mismatch}", ""]
    elapsed = time.perf_counter() - t_start
    out.append(f"_{elapsed / 60:.1f} min on {args.jobs} worker(s)_")
    print("\n".join(out))

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"detection-{plan.name}.json"
    doc = {
        "plan": plan.name, "exporter_revision": revision, "settings": sets, "signals": signals, "step_s": STEP, "grace_s": GRACE,
        "targets": {"recall": TARGET_RECALL, "delay_min": TARGET_DELAY_MIN, "false_per_week": TARGET_FP_WEEK},
        "scores": [s.to_dict() for s in scores],
        "anomalies": {name: [a.to_dict() for a in anomalies] for name, (_, anomalies) in runs.items()},
        "false_warnings": fp, "nab": nab_rows, "sweep": sw, "sweep_check_mismatch": mismatch,
        "timings_s": timings, "elapsed_s": round(elapsed, 1),
    }
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
