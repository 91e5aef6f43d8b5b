"""Detection-quality benchmark: real traffic with known anomalies, replayed through the
backtest path, scored per signal and anomaly kind as verdicts and as the alerts the
shipped rules would raise from them.

    python bench/detection/run.py                  # full: 14 + 7 days, 1-minute steps, all NAB series
    python bench/detection/run.py --quick          # CI form: 7 + 1 days, 2 instances per kind, 5-minute steps
    python bench/detection/run.py --split 5        # clean traffic only, over 5x the apps and model deployments
    python bench/detection/run.py --seed 8 --kinds none --no-nab   # another week of clean traffic
    python bench/detection/run.py --compare before.json after.json [before-split.json after-split.json]
    python bench/detection/run.py --rescore bench/results/<run>.runs.pickle.gz --rules other/rules/

Prints markdown tables and writes JSON to bench/results/. See bench/detection/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from alerts import AlertRule, RulesError, load_rules, parse_duration, rules_dir  # noqa: E402
from inject import KIND_BY_NAME, KINDS, Anomaly, Kind, inject  # noqa: E402
from score import (  # noqa: E402
    AFTER, Collector, Observations, SignalScore, alerts_per_instance, false_figures, raise_alerts, score_kind, score_nab,
)
from traffic import (DAY, EPOCH, HOUR, MissingData, build_traffic, in_zone, nab_files, nab_traffic,  # noqa: E402
                     split_records, zone_shift)

from exporter.config import Settings, load_settings  # noqa: E402
try:                                       # the package by layer
    from exporter.anomaly.signals import SIGNAL_NAMES  # noqa: E402
    from exporter.sources.replay import backtest  # noqa: E402
except ImportError:                        # an older revision, for a before / after comparison
    from exporter.replay import backtest  # type: ignore[no-redef]  # noqa: E402
    from exporter.signals import SIGNAL_NAMES  # type: ignore[no-redef]  # noqa: E402

REPO = HERE.parents[1]
RESULTS = REPO / "bench" / "results"
GRACE = 15 * 60.0
NAB_STEP = 300.0             # NAB series come in 5-minute buckets (or coarser): finer steps add nothing
TARGET_RECALL = 0.9
TARGET_DELAY_MIN = ((4.0, 10.0), (2.0, 20.0))   # (size at least, median delay at most in minutes)
TARGET_WARNINGS_WEEK = 5.0   # false warnings a week, all signals and scopes
TARGET_PAGES_WEEK = 1.0      # false pages a week, all signals and scopes
TARGET_NAB_WINDOWS = 12      # of NAB's 15 labelled windows (of the series the full plan reads)
NAB_WINDOWS = 15
TARGET_ALERTS_PER_CAUSE = 1


@dataclass(frozen=True)
class Plan:
    """How much traffic and how many instances a run uses."""

    name: str
    history_days: int
    scored_days: int
    instance_slots: tuple[tuple[int, float], ...]     # (scored day, hour of day) per instance
    creep_slots: tuple[tuple[int, float], ...]
    nab: tuple[str, ...] | None                       # None: every labelled file
    step: float = 60.0                                # default evaluation step
    seed: int = 7
    volume: int = 1                                   # arrival copies per app, times the base
    weekend: float = 1.0                              # share of the sessions kept on weekends
    share: float = 1.0                                # share of the sessions kept on every day (--thin)
    zone: str = ""                                    # the users' time zone ("": the traffic is UTC's)
    shift: float = 0.0                                # whole weeks the timeline moved by, for the zone's clock change
    sessions: bool = True                             # False: the records carry no session id
    latency: float = 1.0                              # every request's duration and first token, times this
    fail_fast: float = 0.0                            # > 0: every failed request takes this long (seconds)

    @property
    def scored_start(self) -> float:
        return EPOCH + self.shift + self.history_days * DAY

    @property
    def scored_end(self) -> float:
        """End of the evaluated time (a one-day plan runs an hour on, for its last instance's grace)."""
        return self.scored_start + self.scored_days * DAY + (HOUR if self.scored_days == 1 else 0)

    def starts(self, kind: Kind) -> list[float]:
        slots = self.creep_slots if kind.duration >= DAY else self.instance_slots
        return [self.scored_start + d * DAY + h * HOUR for d, h in slots]


FULL = Plan("full", 14, 7,
            instance_slots=((0, 10), (1, 14), (2, 19), (3, 12), (4, 16), (5, 21), (6, 9)),
            creep_slots=((0, 6), (2, 6), (4, 6)), nab=None, step=60.0)
QUICK = Plan("quick", 7, 1, instance_slots=((0, 10), (0, 18)), creep_slots=((0, 0),),
             nab=("artificialWithAnomaly/art_daily_jumpsup.csv",), step=300.0)


# --- runs -----------------------------------------------------------------------------

_BASE: dict[tuple[int, int], Any] = {}


def base_traffic(plan: Plan) -> Any:
    key = (plan.history_days + plan.scored_days + 1, plan.seed, plan.volume, plan.weekend, plan.zone, plan.share)
    if key not in _BASE:
        tr = build_traffic(key[0], plan.seed, volume=plan.volume, weekend=plan.weekend, share=plan.share)
        _BASE[key] = in_zone(tr, plan.zone, plan.shift) if plan.zone else tr
    return _BASE[key]


def make_settings(sets: dict[str, Any], signals: dict[str, dict[str, float]]) -> Settings:
    return load_settings(flags={"db": ":memory:", **sets, "signals": signals or None}, environ={})


def run_scenario(plan: Plan, kind_name: str | None, sets: dict[str, Any], signals: dict[str, dict[str, float]],
                 step: float, split: int = 1) -> tuple[str, Observations, list[Anomaly], float]:
    """One backtest over the scored days of the base traffic, clean or with one kind injected."""
    t0 = time.perf_counter()
    base = base_traffic(plan)
    anomalies: list[Anomaly] = []
    if kind_name is None:
        traffic = base
    else:
        kind = KIND_BY_NAME[kind_name]
        traffic, anomalies = inject(base, kind, plan.starts(kind), seed=plan.seed * 1000 + KINDS.index(kind))
    records = split_records(traffic.to_records(), split)
    if not plan.sessions:                  # after the split, which places an app's copies by session
        records = [replace(r, session_id=None) for r in records]
    if plan.latency != 1.0:
        records = slower(records, plan.latency)
    if plan.fail_fast > 0:
        records = failing_fast(records, plan.fail_fast)
    col = Collector()
    backtest(make_settings(sets, signals), records, plan.scored_start, plan.scored_end, step, on_snapshot=col)
    return kind_name or "clean", col.result(), anomalies, time.perf_counter() - t0


def slower(records: list[Any], factor: float) -> list[Any]:
    """Every request `factor` times as long, its first token too: a site of reasoning models
    and agent steps, whose records reach the exporter minutes after their requests start."""
    def times(v: float | None) -> float | None:
        return None if v is None else v * factor
    return [replace(r, latency_s=times(r.latency_s), ttft_s=times(r.ttft_s)) for r in records]


def failing_fast(records: list[Any], seconds: float) -> list[Any]:
    """Every failed request back after `seconds` (and no first token): a rejected or
    throttled call fails at once while a success takes the model's full latency."""
    return [replace(r, latency_s=seconds, ttft_s=None) if r.status != "ok" else r for r in records]


def run_nab(file: str, sets: dict[str, Any], signals: dict[str, dict[str, float]], step: float
            ) -> tuple[str, Observations, list[tuple[float, float]], dict[str, Any], float]:
    t0 = time.perf_counter()
    traffic, windows = nab_traffic(file)
    col = Collector()
    step = max(step, NAB_STEP, traffic.meta["step"])    # an hourly series gains nothing from finer steps
    backtest(make_settings(sets, signals), traffic.to_records(), traffic.meta["start"], traffic.meta["end"], step,
             on_snapshot=col)
    return file, col.result(), windows, traffic.meta, time.perf_counter() - t0


def score_runs(runs: dict[str, tuple[Observations, list[Anomaly]]], kinds: list[Kind],
               rules: dict[str, tuple[AlertRule, ...]], lo: float, hi: float
               ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Scores of each kind's signals, alerts per instance, and the clean run's false
    warnings / alerts / pages, over the scored time [lo, hi)."""
    clean = runs["clean"][0]
    ff = false_figures(clean, raise_alerts(clean, rules), lo, hi)
    scores: list[SignalScore] = []
    cause: dict[str, list[dict[str, Any]]] = {}
    for k in kinds:
        obs, anomalies = runs[k.name]
        al = raise_alerts(obs, rules)
        scores.extend(score_kind(obs, al, k, anomalies, GRACE, lo, hi))
        cause[k.name] = alerts_per_instance(al, anomalies, GRACE)
    return [s.to_dict() for s in scores], cause, ff


# --- targets --------------------------------------------------------------------------

def delay_target_min(size: float) -> float | None:
    """The median delay a change of this size must be caught within (none below 2x)."""
    return next((limit for at_least, limit in TARGET_DELAY_MIN if size >= at_least), None)


def _check(s: dict[str, Any], alert: bool) -> list[str]:
    """What a primary signal misses of its targets, as verdicts or as alerts."""
    p = "alert_" if alert else ""
    bad = []
    if s["gated"]:
        if not (s[p + "recall"] or 0) >= TARGET_RECALL:
            bad.append("recall")
        limit = delay_target_min(s["size"])
        if limit is not None and not (s[p + "median_delay_min"] if s[p + "median_delay_min"] is not None
                                      else math.inf) <= limit:
            bad.append("delay")
    elif s["duration_s"] >= DAY:            # a creep: caught within its day
        if not (s[p + "within_duration"] or 0) >= TARGET_RECALL * s["instances"]:
            bad.append("within its day")
    return bad


def target_text(s: dict[str, Any]) -> str:
    """The targets of a primary signal's row and whether they are met, for verdicts and alerts."""
    if not s["primary"]:
        return ""
    if s["gated"]:
        limit = delay_target_min(s["size"])
        want = f"recall ≥ {TARGET_RECALL:g}" + (f", median ≤ {limit:g} min" if limit is not None else "")
    elif s["duration_s"] >= DAY:
        want = "caught within its day"
    else:
        return ""
    parts = []
    for alert, label in ((False, "verdict"), (True, "alert")):
        if alert and not s.get("alerted"):
            continue
        bad = _check(s, alert)
        parts.append(f"{label} " + ("met" if not bad else "MISSED " + "+".join(bad)))
    return f"{want}: " + ", ".join(parts)


# --- tables -----------------------------------------------------------------------------

def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _stat(values: list[int]) -> tuple[float, int] | None:
    return (float(np.median(values)), int(max(values))) if values else None


def kinds_table(scores: list[dict[str, Any]], cause: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| anomaly | size | signal | recall, verdict | recall, alert | delay median / p90, verdict (min) | "
             "delay median / p90, alert (min) | precision | alerts (scopes) per instance, median / max | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in scores:
        sig = f"**{s['signal']}**" if s["primary"] else s["signal"]
        alert_recall = f"{s['alert_detected']}/{s['instances']}" if s["alerted"] else "–"
        per = ""
        if s["primary"]:
            per = _per_instance(cause.get(s["kind"], []))
        lines.append(
            f"| {s['kind']} | {s['size']:g}x | {sig} | {s['detected']}/{s['instances']} | {alert_recall} | "
            f"{fmt(s['median_delay_min'], 0)} / {fmt(s['p90_delay_min'], 0)} | "
            f"{fmt(s['alert_median_delay_min'], 0)} / {fmt(s['alert_p90_delay_min'], 0)} | "
            f"{fmt(s['precision'])} ({s['true_episodes']}/{s['episodes']}) | {per} | {target_text(s)} |")
    return "\n".join(lines)


def _per_instance(rows: list[dict[str, Any]]) -> str:
    a, sc = _stat([r["alerts"] for r in rows]), _stat([r["scopes"] for r in rows])
    if a is None or sc is None:
        return "–"
    return f"{a[0]:g} / {a[1]} ({sc[0]:g} / {sc[1]})"


def cause_table(cause: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| anomaly | alerts per instance (list) | scopes alerting per instance | pages per instance | "
             f"alerts in the {AFTER / 3600:g} h after, median (total) | alerts raised, all instances |",
             "|---|---|---|---|---|---|"]
    for kind, rows in cause.items():
        names: dict[str, int] = {}
        for r in rows:
            for n in r["names"]:
                names[n] = names.get(n, 0) + 1
        top = ", ".join(f"{n} ×{c}" for n, c in sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))[:6])
        if len(names) > 6:
            top += f", … ({len(names)} distinct)"
        a = [r["alerts"] for r in rows]
        sc = [r["scopes"] for r in rows]
        pg = [r["pages"] for r in rows]
        tail = [r["after"] for r in rows if "after" in r]
        tail_text = f"{_med(tail)} ({sum(tail)})" if tail else "–"
        lines.append(f"| {kind} | median {_med(a)}, max {max(a, default=0)} ({', '.join(map(str, a))}) | "
                     f"median {_med(sc)}, max {max(sc, default=0)} | median {_med(pg)}, max {max(pg, default=0)} | "
                     f"{tail_text} | {top or '–'} |")
    return "\n".join(lines)


def _med(v: list[int]) -> str:
    return f"{float(np.median(v)):g}" if v else "–"


def false_table(ff: dict[str, Any], rules: dict[str, Any]) -> str:
    weeks = ff["weeks"]
    lines = ["| signal | warnings / week | alerts / week | pages / week | for: warning / critical | alerts where |",
             "|---|---|---|---|---|---|"]
    for sig, d in ff["signals"].items():
        fors = " / ".join(_for_text(rules.get(sig, []), sev) for sev in ("warning", "critical"))
        where = ", ".join(f"{k} {v}" for k, v in sorted(d["alerts_by_scope"].items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"| {sig} | {fmt(d['warnings_per_week'], 1)} ({d['warnings']}) | "
                     f"{fmt(d['alerts_per_week'], 1)} ({d['alerts']}) | {fmt(d['pages_per_week'], 1)} ({d['pages']}) | "
                     f"{fors} | {where or '–'} |")
    t = ff["total"]
    ok_w = "met" if t["warnings_per_week"] <= TARGET_WARNINGS_WEEK else "MISSED"
    ok_p = "met" if t["pages_per_week"] <= TARGET_PAGES_WEEK else "MISSED"
    lines.append(f"| **total** ({ff['scopes']} scopes, {weeks:.2f} weeks) | **{fmt(t['warnings_per_week'], 1)}** "
                 f"({t['warnings']}; target ≤ {TARGET_WARNINGS_WEEK:g}: {ok_w}) | **{fmt(t['alerts_per_week'], 1)}** "
                 f"({t['alerts']}) | **{fmt(t['pages_per_week'], 1)}** ({t['pages']}; target ≤ {TARGET_PAGES_WEEK:g}: "
                 f"{ok_p}) | | |")
    return "\n".join(lines)


def _for_text(rules: list[dict[str, Any]], severity: str) -> str:
    r = next((r for r in rules if r["severity"] == severity), None)
    return "–" if r is None else f"{r['for_s'] / 60:g}m"


def nab_total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tw = sum(r["windows"] for r in rows)
    td = sum(r["detected"] for r in rows)
    te = sum(r["episodes"] for r in rows)
    tt = sum(r["true_episodes"] for r in rows)
    wk = sum(r["weeks_scored"] for r in rows)
    return {"windows": tw, "detected": td, "episodes": te, "true_episodes": tt,
            "false_per_week": round((te - tt) / wk, 3) if wk else None}


def nab_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| NAB series | windows | detected | recall | precision | false / week | median delay (h) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['file']} | {r['windows']} | {r['detected']} | {fmt(r['recall'])} | "
                     f"{fmt(r['precision'])} ({r['true_episodes']}/{r['episodes']}) | {fmt(r['false_per_week'], 1)} | "
                     f"{fmt(r['median_delay_h'], 1)} |")
    t = nab_total(rows)
    ok = ("met" if t["detected"] >= TARGET_NAB_WINDOWS else "MISSED") if t["windows"] >= NAB_WINDOWS else ""
    target = f" (target ≥ {TARGET_NAB_WINDOWS} of {NAB_WINDOWS}: {ok})" if ok else ""
    lines.append(f"| **all**{target} | {t['windows']} | {t['detected']} | "
                 f"{fmt(t['detected'] / t['windows'] if t['windows'] else math.nan)} | "
                 f"{fmt(t['true_episodes'] / t['episodes'] if t['episodes'] else math.nan)} "
                 f"({t['true_episodes']}/{t['episodes']}) | {fmt(t['false_per_week'], 1)} | |")
    return "\n".join(lines)


# --- compare ----------------------------------------------------------------------------

def _arrow(before: str, after: str) -> str:
    return f"{before} → {after}"


def _load(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--compare: cannot read {path}: {e}") from None


def _label(doc: dict[str, Any]) -> str:
    return (f"exporter {doc['exporter_revision']}, {doc['plan']} plan, {doc['step_s'] / 60:g}-minute steps"
            + (f", split ×{doc['split']}" if doc.get("split", 1) > 1 else ""))


def compare_table(before: dict[str, Any], after: dict[str, Any], split: tuple[dict[str, Any], dict[str, Any]] | None,
                  all_signals: bool = False) -> str:
    """One markdown table, before → after in every cell."""
    def score_cells(s: dict[str, Any] | None, cause: list[dict[str, Any]] | None) -> list[str]:
        if s is None:
            return ["–"] * 5
        alerted = f"{s['alert_detected']}/{s['instances']}" if s["alerted"] else "–"
        rec = f"{s['detected']}/{s['instances']} · {alerted}"
        dv = f"{fmt(s['median_delay_min'], 0)} / {fmt(s['p90_delay_min'], 0)}"
        da = f"{fmt(s['alert_median_delay_min'], 0)} / {fmt(s['alert_p90_delay_min'], 0)}"
        per = _per_instance(cause) if s["primary"] and cause is not None else ""
        return [rec, dv, da, fmt(s["precision"]), per]

    def false_cell(d: dict[str, Any] | None) -> str:
        if d is None:
            return "–"
        return (f"{fmt(d['warnings_per_week'], 1)} · {fmt(d['alerts_per_week'], 1)} · "
                f"{fmt(d['pages_per_week'], 1)}")

    head = ["| row | recall, verdict · alert | delay median / p90, verdict (min) | delay median / p90, alert (min) | "
            "precision | alerts (scopes) per instance, median / max | false per week: warnings · alerts · pages | "
            "target: after |",
            "|---|---|---|---|---|---|---|---|"]
    lines = list(head)
    b_scores = {(s["kind"], s["signal"]): s for s in before.get("scores", [])}
    for s in after.get("scores", []):
        if not (s["primary"] or all_signals):
            continue
        b = b_scores.get((s["kind"], s["signal"]))
        bc = score_cells(b, before.get("one_cause", {}).get(s["kind"]))
        ac = score_cells(s, after.get("one_cause", {}).get(s["kind"]))
        name = f"{s['kind']} ({s['size']:g}x): {s['signal']}"
        lines.append(f"| {name} | " + " | ".join(_arrow(x, y) if (x or y) else "" for x, y in zip(bc, ac))
                     + f" | | {target_text(s)} |")
    bf, af = before.get("false", {}), after.get("false", {})
    sigs = list(af.get("signals", {})) + [x for x in bf.get("signals", {}) if x not in af.get("signals", {})]
    for sig in sigs:
        cell = _arrow(false_cell(bf.get("signals", {}).get(sig)), false_cell(af.get("signals", {}).get(sig)))
        lines.append(f"| clean traffic: {sig} | | | | | | {cell} | |")
    if af:
        t = af["total"]
        ok = ("met" if t["warnings_per_week"] <= TARGET_WARNINGS_WEEK and t["pages_per_week"] <= TARGET_PAGES_WEEK
              else "MISSED")
        lines.append(f"| **clean traffic: total** ({bf.get('scopes', '?')} → {af['scopes']} scopes) | | | | | | "
                     f"**{_arrow(false_cell(bf.get('total')), false_cell(t))}** | "
                     f"≤ {TARGET_WARNINGS_WEEK:g} warnings, ≤ {TARGET_PAGES_WEEK:g} page: {ok} |")
    if split is not None:
        sb, sa = split[0]["false"], split[1]["false"]
        grow = bool(af) and (
            sa["total"]["warnings_per_week"] <= max(TARGET_WARNINGS_WEEK, af["total"]["warnings_per_week"])
            and sa["total"]["pages_per_week"] <= max(TARGET_PAGES_WEEK, af["total"]["pages_per_week"]))
        lines.append(f"| **clean traffic split ×{split[1].get('split')}: total** ({sb['scopes']} → {sa['scopes']} "
                     f"scopes) | | | | | | **{_arrow(false_cell(sb['total']), false_cell(sa['total']))}** | "
                     f"no more than unsplit (or the targets): {'met' if grow else 'MISSED'} |")
    if split is not None:
        sb_sig, sa_sig = split[0]["false"]["signals"], split[1]["false"]["signals"]
        for sig in list(sa_sig) + [x for x in sb_sig if x not in sa_sig]:
            b, a = sb_sig.get(sig), sa_sig.get(sig)
            if any(d and d["warnings"] for d in (b, a)):
                lines.append(f"| clean traffic split ×{split[1].get('split')}: {sig} | | | | | | "
                             f"{_arrow(false_cell(b), false_cell(a))} | |")
    bn, an = before.get("nab_total"), after.get("nab_total")
    if an:
        bw = f"{bn['detected']}/{bn['windows']}" if bn else "–"
        bfp = fmt(bn["false_per_week"], 1) if bn else "–"
        ok = "met" if an["detected"] >= TARGET_NAB_WINDOWS else "MISSED"
        aw = f"{an['detected']}/{an['windows']}"
        lines.append(f"| NAB windows (request_rate, global) | {_arrow(bw, aw)} | "
                     f"| | | | {_arrow(bfp, fmt(an['false_per_week'], 1))} false warnings | "
                     f"{ok} |")
    intro = [f"Before: {_label(before)}. After: {_label(after)}."]
    if split is not None:
        intro.append(f"Split: {_label(split[0])} → {_label(split[1])}.")
    return "\n".join(intro + [""] + lines)


def compare(paths: list[str], all_signals: bool) -> int:
    if len(paths) not in (2, 4):
        raise SystemExit("--compare wants BEFORE AFTER [BEFORE_SPLIT AFTER_SPLIT] (2 or 4 JSON files)")
    docs = [_load(p) for p in paths]
    main = [d for d in docs if d.get("split", 1) <= 1]
    split = [d for d in docs if d.get("split", 1) > 1]
    if len(main) != 2 or len(split) not in (0, 2):
        raise SystemExit("--compare: give two unsplit results (before, after) and optionally two --split results")
    print(compare_table(main[0], main[1], (split[0], split[1]) if split else None, all_signals))
    return 0


# --- main -----------------------------------------------------------------------------

def exporter_revision() -> str:
    """The last commit that changed the exporter or its rules in the checkout under test
    (+dirty when either has local edits)."""
    import subprocess

    import exporter
    src = Path(exporter.__file__).resolve().parent
    paths = ["--", str(src), str(src.parent / "prometheus")]
    try:
        rev = subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h", *paths], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", *paths], capture_output=True,
                               text=True, check=True).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
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


def parse_step(text: str) -> float:
    try:
        s = parse_duration(text) if not re.fullmatch(r"\d+(\.\d+)?", text) else float(text)
    except RulesError as e:
        raise SystemExit(f"--step: {e}") from None
    if s <= 0:
        raise SystemExit("--step must be positive")
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced CI form (about 1 minute on 2 cores)")
    ap.add_argument("--step", default="", help="evaluation step, e.g. 1m or 5m (seconds if a bare number); "
                                               "default 1m for the full plan, 5m for --quick")
    ap.add_argument("--split", type=int, default=1, metavar="N",
                    help="clean traffic only, each app split into N apps (by session) and each model into N "
                         "deployments, same volume")
    ap.add_argument("--seed", type=int, default=None,
                    help="traffic seed: which real day each synthetic day replays, and the modelled sizes and "
                         "latencies (default 7); another seed is another week of clean traffic to count false "
                         "alerts on")
    ap.add_argument("--volume", type=int, default=1, metavar="N",
                    help="N times the requests: every app replays N times as many copies of the real days "
                         "(clean weeks at the volume of a busier site)")
    ap.add_argument("--history", type=int, default=None, metavar="DAYS",
                    help="days of history before the scored week (default 14): 7 scores a site's second week, "
                         "3 its first (from its fourth day), where the weekly pattern cannot be read yet")
    ap.add_argument("--weekend", type=float, default=1.0, metavar="SHARE",
                    help="keep this share of the sessions on Saturdays and Sundays, e.g. 0.3 for a site used "
                         "at work (default 1: every day alike)")
    ap.add_argument("--thin", type=float, default=1.0, metavar="SHARE",
                    help="keep this share of the sessions on every day, e.g. 0.2 for a quieter site of the same "
                         "apps (default 1)")
    ap.add_argument("--zone", default="", metavar="IANA",
                    help="the users live in this time zone, e.g. Europe/Berlin: their days follow its clocks, and "
                         "the days are moved on by whole weeks so that its first daylight saving change falls just "
                         "before the scored week (the exporter learns in UTC unless --set timezone=IANA)")
    ap.add_argument("--no-sessions", action="store_true",
                    help="records without session ids, as a site that sends none (the split still places an app's "
                         "copies by session)")
    ap.add_argument("--latency", type=float, default=1.0, metavar="FACTOR",
                    help="every request FACTOR times as long (its first token too), e.g. 20 for a site of "
                         "reasoning models whose records arrive minutes after their requests start (default 1)")
    ap.add_argument("--fail-fast", type=float, default=0.0, metavar="SECONDS",
                    help="every failed request, injected ones too, ends after SECONDS, whatever its latency "
                         "(with --latency: a slow model whose failures come back at once)")
    ap.add_argument("--kinds", default="", help="comma-separated anomaly kinds to run (default: all)")
    ap.add_argument("--no-nab", action="store_true", help="skip the NAB series")
    ap.add_argument("--nab", default="", help="comma-separated NAB files (default: the plan's)")
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help="exporter setting for every run, e.g. window=30m or "
                         "'runaway={\"tool_repeat_max\": 20}' (JSON for the mapping settings)")
    ap.add_argument("--signal", action="append", default=[], metavar="SIGNAL.KNOB=VALUE",
                    help="signal threshold override, e.g. cost_per_hour.warning_ratio=1.5")
    ap.add_argument("--rules", default="", metavar="DIR",
                    help="score with the alert rules (anomaly.yml, detectors.yml) in DIR instead of the "
                         "exporter checkout's prometheus/rules, e.g. to try other for: values")
    ap.add_argument("--rescore", default="", metavar="RUNS",
                    help="no backtests: score the verdicts a previous run kept (its .runs.pickle.gz) again, "
                         "e.g. with --rules")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel backtests")
    ap.add_argument("--out", default="", help="JSON output path (default bench/results/detection-<plan>[-split<N>]"
                                              "-<revision>.json; the verdicts go beside it as .runs.pickle.gz)")
    ap.add_argument("--compare", nargs="+", metavar="JSON",
                    help="print one before/after table from the JSON of two runs (and of two --split runs)")
    ap.add_argument("--all-signals", action="store_true", help="with --compare: every signal of each kind, not "
                                                               "only the one its targets are judged on")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args.compare, args.all_signals)
    try:
        rules = load_rules(Path(args.rules) if args.rules else None)
    except RulesError as e:
        raise SystemExit(f"detection benchmark: alert rules: {e}") from None
    if args.rescore:
        with gzip.open(args.rescore, "rb") as fh:
            state = pickle.load(fh)
        return report(state, rules, Path(args.rules) if args.rules else rules_dir(), args.out)

    plan = QUICK if args.quick else FULL
    if args.seed is not None:
        plan = replace(plan, seed=args.seed)
    if args.volume < 1:
        raise SystemExit("--volume: a whole number of times the requests, at least 1")
    if args.volume > 1:
        plan = replace(plan, volume=args.volume)
    if args.history is not None:
        if args.history < 3:
            raise SystemExit("--history: at least 3 days (the request rate's baseline needs 72 hours)")
        plan = replace(plan, history_days=args.history)
    if not 0.0 < args.weekend <= 1.0:
        raise SystemExit("--weekend: a share of the sessions, above 0 and at most 1")
    if args.weekend < 1.0:
        # a day more of history, so that the weekly pattern holds two whole weeks before the
        # first scored hour (the first history day starts at 04:00, a quarter day late)
        plan = replace(plan, weekend=args.weekend, history_days=plan.history_days + 1)
    if not 0.0 < args.thin <= 1.0:
        raise SystemExit("--thin: a share of the sessions, above 0 and at most 1")
    if args.thin < 1.0:
        plan = replace(plan, share=args.thin)
    if args.zone:
        try:
            plan = replace(plan, zone=args.zone, shift=zone_shift(args.zone, plan.scored_start))
        except ValueError as e:
            raise SystemExit(f"--zone: {e}") from None
    if args.no_sessions:
        plan = replace(plan, sessions=False)
    if args.latency <= 0:
        raise SystemExit("--latency: a factor above 0")
    if args.fail_fast < 0:
        raise SystemExit("--fail-fast: seconds, 0 or more")
    plan = replace(plan, latency=args.latency, fail_fast=args.fail_fast)
    step = parse_step(args.step) if args.step else plan.step
    split = max(1, args.split)
    sets = parse_sets(args.set)
    signals = parse_signals(args.signal)
    try:
        make_settings(sets, signals)
        base_traffic(plan)
        nab_list = [] if args.no_nab or split > 1 else (
            [f for f in args.nab.split(",") if f] or list(plan.nab or nab_files()))
    except MissingData as e:
        print(f"detection benchmark skipped: {e}")
        return 0
    kinds = [] if split > 1 else [k for k in KINDS if not args.kinds or k.name in args.kinds.split(",")]
    t_start = time.perf_counter()
    print(f"detection benchmark ({plan.name}): {plan.history_days} days history + {plan.scored_days} scored, "
          f"{len(kinds)} anomaly kinds, {len(nab_list)} NAB series, step {step / 60:g} min, split {split}, "
          f"settings {sets or 'default'} signals {signals or 'default'}", file=sys.stderr)

    runs: dict[str, tuple[Observations, list[Anomaly]]] = {}
    nab_rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futs = [pool.submit(run_scenario, plan, None, sets, signals, step, split)]
        futs += [pool.submit(run_scenario, plan, k.name, sets, signals, step) for k in kinds]
        nfuts = [pool.submit(run_nab, f, sets, signals, step) for f in nab_list]
        for f in futs:
            name, obs, anomalies, secs = f.result()
            runs[name] = (obs, anomalies)
            timings[name] = round(secs, 1)
            print(f"  {name}: {secs:.0f} s", file=sys.stderr)
        for nf in nfuts:
            file, nobs, windows, meta, secs = nf.result()
            timings["nab:" + file] = round(secs, 1)
            span = meta["end"] - meta["start"]
            lo = meta["start"] + max(0.15 * span, DAY)   # NAB's probationary period, and a day of baseline
            nab_rows.append(score_nab(nobs, file, windows, lo, meta["end"]).to_dict())
            print(f"  nab {file}: {secs:.0f} s", file=sys.stderr)
    revision = exporter_revision()
    state = {"plan": asdict(plan), "split": split, "step": step, "sets": sets, "signals": signals, "revision": revision,
             "kinds": [k.name for k in kinds], "runs": runs, "nab_rows": nab_rows, "timings": timings,
             "elapsed": time.perf_counter() - t_start, "jobs": args.jobs}
    path = Path(args.out) if args.out else default_path(plan, split, revision)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(runs_path(path), "wb") as fh:
        pickle.dump(state, fh)
    return report(state, rules, Path(args.rules) if args.rules else rules_dir(), str(path))


def default_path(plan: Plan, split: int, revision: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", revision)
    seed = f"-seed{plan.seed}" if plan.seed != FULL.seed else ""
    seed += f"-history{plan.history_days}" if plan.history_days not in (FULL.history_days, FULL.history_days + 1) else ""
    volume = f"-volume{plan.volume}" if plan.volume > 1 else ""
    weekend = f"-weekend{plan.weekend:g}" if plan.weekend < 1 else ""
    weekend += f"-thin{plan.share:g}" if plan.share < 1 else ""
    clock = "-" + re.sub(r"[^A-Za-z0-9]+", "-", plan.zone) if plan.zone else ""
    clock += "" if plan.sessions else "-nosessions"
    clock += f"-latency{plan.latency:g}" if plan.latency != 1.0 else ""
    clock += f"-failfast{plan.fail_fast:g}" if plan.fail_fast > 0 else ""
    return RESULTS / (f"detection-{plan.name}{f'-split{split}' if split > 1 else ''}{seed}{volume}{weekend}{clock}"
                      f"-{tag}.json")


def runs_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.name.removesuffix(".json") + ".runs.pickle.gz")


def report(state: dict[str, Any], rules: dict[str, tuple[AlertRule, ...]], rules_from: Path, out: str) -> int:
    """Score the runs' verdicts with the rules, print the tables and write the JSON."""
    plan, split, step, runs = Plan(**state["plan"]), state["split"], state["step"], state["runs"]
    kinds = [KIND_BY_NAME[k] for k in state["kinds"]]
    missing = sorted(s for s in runs["clean"][0].directions if s not in rules)
    if missing:
        print(f"WARNING: no alert rule routes {missing}: they raise no alerts here", file=sys.stderr)
    score_dicts, cause, ff = score_runs(runs, kinds, rules, plan.scored_start, plan.scored_end)
    rules_doc = {sig: [r.to_dict() for r in rs] for sig, rs in rules.items()}
    revision, nab_rows, sets, signals = state["revision"], state["nab_rows"], state["sets"], state["signals"]
    out_lines = [
        f"## Detection benchmark ({plan.name}{f', split ×{split}' if split > 1 else ''}, exporter {revision})", "",
        f"Traffic: RAGPulse arrivals and sessions ({plan.history_days + plan.scored_days + 1} days from its six "
        f"real days, seed {plan.seed}), Azure token sizes"
        + (f", each app split into {split} apps by session and each model into {split} deployments" if split > 1
           else "")
        + ("" if plan.sessions else ", every session id dropped")
        + (f", {plan.share:g} of the sessions kept" if plan.share < 1 else "")
        + f"; {plan.history_days} days of history, {plan.scored_days} scored day(s), evaluated every "
        f"{step / 60:g} min; alerts as the rules in {rules_from} raise them. Settings: {sets or 'defaults'}; "
        f"signal overrides: {signals or 'none'}.", ""]
    if score_dicts:
        out_lines += ["### Injected anomalies", "", kinds_table(score_dicts, cause), "",
                      "### One cause, how many alerts (all signals, all scopes, firing within the instance + "
                      f"{GRACE / 60:g} min)", "", cause_table(cause), ""]
    out_lines += ["### False warnings, alerts and pages on clean traffic", "", false_table(ff, rules_doc), ""]
    if nab_rows:
        out_lines += ["### NAB (request_rate, global scope)", "", nab_table(nab_rows), ""]
    out_lines.append(f"_backtests: {state['elapsed'] / 60:.1f} min on {state['jobs']} worker(s)_")
    print("\n".join(out_lines))

    path = Path(out) if out else default_path(plan, split, revision)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "plan": plan.name, "split": split, "exporter_revision": revision, "settings": sets, "signals": signals,
        "step_s": step, "grace_s": GRACE, "rules_from": str(rules_from), "rules": rules_doc,
        "targets": {"recall": TARGET_RECALL, "delay_min": TARGET_DELAY_MIN, "warnings_per_week": TARGET_WARNINGS_WEEK,
                    "pages_per_week": TARGET_PAGES_WEEK, "nab_windows": TARGET_NAB_WINDOWS,
                    "alerts_per_cause": TARGET_ALERTS_PER_CAUSE},
        "scores": score_dicts, "one_cause": cause,
        "anomalies": {name: [a.to_dict() for a in anomalies] for name, (_, anomalies) in runs.items()},
        "false": ff, "nab": nab_rows, "nab_total": nab_total(nab_rows) if nab_rows else None,
        "timings_s": state["timings"], "elapsed_s": round(state["elapsed"], 1), "jobs": state["jobs"],
    }
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
