"""How fast could anything have known? An oracle's delays on the benchmark's own traffic.

    python bench/detection/bound.py                  # clean weeks of seeds 7-12, instances of seed 7
    python bench/detection/bound.py --seeds 7,8 --kinds error_storm,rate_drop
    python bench/detection/bound.py --split 5        # over 5x the apps and model deployments

The exporter watches every signal of every scope without knowing what will go wrong. The
oracle here knows everything the exporter cannot: which series an anomaly kind hits,
what it looked like before (from the 14 history days) and exactly what it does (20 %
errors, 3 % of the traffic, answers a fifth as long, requests twice as large). It runs
Page's CUSUM of that change's log-likelihood ratio, on that one series only, which for a
known change before and after is the fastest detector at a given false-alarm rate
(Lorden 1971; Moustakides 1986). Its threshold is set on the clean weeks of several
seeds, so that it raises at most one alarm a week on them (a clean week's sessions, bursts
and busy days included), and its delay is then read on the same instances the detection
benchmark injects.

The oracle's false alarms are its own series' alone, where the exporter's target of one
a week is over all signals and scopes; its delays are therefore a floor the exporter
cannot be expected to reach. A target below the floor is not reachable on this traffic by
any detector at that false rate. The table also gives the false alarms a week the oracle
needs to meet the delay target: what the target costs in pages.

The LLR per unit (see `llr_*`):
- error storm: a request of the struck model fails with p1 instead of p0 (Bernoulli).
- rate drop: a minute's count is Poisson with 3 % of its usual mean instead of all of it;
  the usual mean is the hour of the day's median over the history days.
- length collapse, cost spike: an answer's (a request's) log2 length (tokens) comes from
  the app's history density shifted by the change, instead of that density itself
  (histograms of 1/4 octave with half a count added to every bin, so no bin has zero
  density).
The statistic S_n = max(0, S_(n-1) + l_n) is C_n - min(C_0..C_n) with C the running sum,
and an alarm is an upcrossing of the threshold (one per excursion, as an alert fires
once while its condition holds).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from inject import KIND_BY_NAME, KINDS, inject  # noqa: E402
from run import FULL, GRACE, TARGET_DELAY_MIN, Plan  # noqa: E402
from traffic import APPS, DAY, MODELS, Traffic, build_traffic  # noqa: E402

from exporter.anomaly.signals import SIGNAL_NAMES  # noqa: E402

BIN_OCTAVES = 0.25
N_BINS = 96                       # 0 .. 24 octaves of tokens
WEEK = 7 * DAY
THRESHOLDS = np.round(np.geomspace(1.0, 60.0, 240), 3)
SCOPES_PER_SPLIT = len({a.name for a in APPS}) + len(MODELS)   # apps and models; with the global scope, 8 unsplit


@dataclass(frozen=True)
class Series:
    """One oracle's units: event time and log-likelihood ratio of each unit."""

    t: np.ndarray
    llr: np.ndarray


# --- the log-likelihood ratio of each kind, on the traffic -------------------------------

def _history(tr: Traffic, plan: Plan) -> np.ndarray:
    return tr.ts < plan.scored_start


def parts(tr: Traffic, split: int, by_session: bool, seed: int = 13) -> np.ndarray:
    """Which of `split` copies each request goes to, as the benchmark's `--split` spreads
    them: an app's copies by session (a request without one on its own), a model's
    deployments request by request. All 0 without a split."""
    if split <= 1:
        return np.zeros(len(tr), dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = rng.integers(0, split, len(tr))
    if by_session:
        has = np.array([s is not None for s in tr.session], dtype=bool)
        names, inv = np.unique(tr.session[has].astype(str), return_inverse=True)
        out[has] = rng.integers(0, split, names.shape[0])[inv]
    return out


def _by_part(t: np.ndarray, llr: np.ndarray, part: np.ndarray) -> list[Series]:
    return [Series(t[part == k], llr[part == k]) for k in np.unique(part)]


def llr_error_storm(tr: Traffic, plan: Plan, split: int) -> list[Series]:
    """claude-3-5-haiku's requests, per deployment: failure at p1 (the injection's 20 % of
    the successes on top of the usual failures) against p0 (the history's failure share)."""
    on = tr.model == "claude-3-5-haiku"
    p0 = float(tr.error[on & _history(tr, plan)].mean())
    p1 = p0 + (1.0 - p0) * 0.2 / 0.99
    llr = np.where(tr.error[on], math.log(p1 / p0), math.log((1.0 - p1) / (1.0 - p0)))
    return _by_part(tr.ts[on], llr, parts(tr, split, False)[on])


def llr_rate_drop(tr: Traffic, plan: Plan, split: int) -> list[Series]:
    """Minute counts of all traffic (the global scope, which a split does not change):
    Poisson at 3 % of the usual mean against the usual mean (the median over the history
    days of that hour of the day, per minute)."""
    start = plan.scored_start - plan.history_days * DAY
    minute = np.floor((tr.ts - start) / 60.0).astype(np.int64)
    n_min = int(math.ceil((plan.scored_end - start) / 60.0))
    counts = np.bincount(minute[(minute >= 0) & (minute < n_min)], minlength=n_min).astype(np.float64)
    hours = counts[: plan.history_days * 1440].reshape(plan.history_days, 24, 60).sum(axis=2)
    usual = np.median(hours, axis=0) / 60.0                            # per minute, by hour of day
    lam0 = usual[(np.arange(n_min) // 60) % 24]
    k = 0.03
    return [Series(start + 60.0 * (np.arange(n_min) + 1), counts * math.log(k) + (1.0 - k) * lam0)]


def _shift_llr(x: np.ndarray, group: np.ndarray, ref: np.ndarray, shift: float) -> np.ndarray:
    """LLR of x (log2 sizes) under its group's reference density moved by `shift` octaves
    against the density itself; `ref` marks the reference units."""
    b = np.clip(np.floor(x / BIN_OCTAVES).astype(np.int64), 0, N_BINS - 1)
    moved = np.clip(np.floor((x - shift) / BIN_OCTAVES).astype(np.int64), 0, N_BINS - 1)
    out = np.zeros(x.shape[0])
    for g in np.unique(group):
        mine = group == g
        hist = np.bincount(b[mine & ref], minlength=N_BINS) + 0.5
        dens = np.log(hist / hist.sum())
        out[mine] = dens[moved[mine]] - dens[b[mine]]
    return out


def llr_length(tr: Traffic, plan: Plan, split: int) -> list[Series]:
    """claude-3-5-haiku's answers, per deployment: log2 length from the app's history
    density moved down by log2(5) against that density."""
    on = (tr.model == "claude-3-5-haiku") & ~tr.error & (tr.output_tokens > 0)
    x = np.log2(tr.output_tokens[on].astype(np.float64))
    llr = _shift_llr(x, tr.app[on], _history(tr, plan)[on], -math.log2(5.0))
    return _by_part(tr.ts[on], llr, parts(tr, split, False)[on])


def llr_cost(factor: float) -> Callable[[Traffic, Plan, int], list[Series]]:
    def llr(tr: Traffic, plan: Plan, split: int) -> list[Series]:
        """rag-search's requests, per copy of the app: log2 tokens from the app's history
        density moved up by log2(factor) against that density."""
        on = (tr.app == "rag-search") & ~tr.error
        x = np.log2(np.maximum(tr.input_tokens[on] + tr.output_tokens[on], 1).astype(np.float64))
        part = parts(tr, split, True)[on]
        return _by_part(tr.ts[on], _shift_llr(x, part, _history(tr, plan)[on], math.log2(factor)), part)
    return llr


ORACLES: dict[str, Callable[[Traffic, Plan, int], list[Series]]] = {
    "cost_spike_2x": llr_cost(2.0), "cost_spike_5x": llr_cost(5.0), "error_storm": llr_error_storm,
    "rate_drop": llr_rate_drop, "drift_length": llr_length,
}


# --- CUSUM -------------------------------------------------------------------------------

def cusum(llr: np.ndarray) -> np.ndarray:
    """Page's statistic after each unit, from 0: the running sum above its running minimum."""
    c = np.concatenate([[0.0], np.cumsum(llr)])
    return (c - np.minimum.accumulate(c))[1:]


def alarms_a_week(s: Series, lo: float, hi: float, thresholds: np.ndarray) -> np.ndarray:
    """Upcrossings of each threshold by the statistic within [lo, hi), a week's worth."""
    stat = cusum(s.llr)
    inside = (s.t >= lo) & (s.t < hi)
    prev = np.concatenate([[0.0], stat[:-1]])[inside]
    now = stat[inside]
    up = (prev[None, :] < thresholds[:, None]) & (now[None, :] >= thresholds[:, None])
    return up.sum(axis=1) / ((hi - lo) / WEEK)


def delays(s: Series, onsets: list[float], deadline: float, thresholds: np.ndarray) -> np.ndarray:
    """(thresholds, instances) minutes from each onset to the first unit at or past the
    threshold within the deadline; NaN where none is."""
    stat = cusum(s.llr)
    out = np.full((thresholds.shape[0], len(onsets)), np.nan)
    for j, t0 in enumerate(onsets):
        inside = (s.t >= t0) & (s.t < t0 + deadline)
        t, v = s.t[inside], stat[inside]
        if not t.size:
            continue
        hit = v[None, :] >= thresholds[:, None]
        first = np.argmax(hit, axis=1)
        out[:, j] = np.where(hit.any(axis=1), (t[first] - t0) / 60.0, np.nan)
    return out


def target_minutes(size: float) -> float:
    return next(m for s, m in TARGET_DELAY_MIN if size >= s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="7,8,9,10,11,12", help="clean weeks the threshold is set on")
    ap.add_argument("--kinds", default=",".join(ORACLES), help="comma-separated anomaly kinds")
    ap.add_argument("--split", type=int, default=1, metavar="N",
                    help="each app split into N apps by session and each model into N deployments, as the "
                         "benchmark's --split: the oracle watches every copy the kind hits")
    ap.add_argument("--false", type=float, default=1.0, help="oracle false alarms a week on the clean weeks")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in ORACLES]
    if unknown or not seeds or args.split < 1:
        raise SystemExit(f"bound: no oracle for {unknown} (known: {', '.join(ORACLES)})" if unknown
                         else "bound: --seeds names no seed" if not seeds else "bound: --split must be at least 1")
    plan, split = FULL, args.split
    days = plan.history_days + plan.scored_days + 1
    lo, hi = plan.scored_start, plan.scored_start + plan.scored_days * DAY
    clean = {seed: build_traffic(days, seed) for seed in seeds}
    judged = (1 + SCOPES_PER_SPLIT * split) * len(SIGNAL_NAMES)
    print(f"oracle CUSUM, split {split}: threshold for at most {args.false:g} false alarm a week on the clean weeks "
          f"of seeds {', '.join(map(str, seeds))}; instances of seed {seeds[0]}; the exporter judges {judged} "
          f"series (scopes x signals)\n")
    print("| kind | series watched | threshold | false / week (each seed) | recall | median delay (min) "
          "| delays (min) | target (min) | false / week for the target | median delay, the exporter's budget (min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in kinds:
        kind, llr = KIND_BY_NAME[name], ORACLES[name]
        per_seed = np.stack([sum(alarms_a_week(s, lo, hi, THRESHOLDS) for s in llr(tr, plan, split))
                             for tr in clean.values()])
        rate = per_seed.mean(axis=0)
        ok = np.flatnonzero(rate <= args.false)
        i = int(ok[0]) if ok.size else THRESHOLDS.shape[0] - 1
        onsets = plan.starts(kind)
        hit, _ = inject(clean[seeds[0]], kind, onsets, seed=seeds[0] * 1000 + KINDS.index(kind))
        watched = llr(hit, plan, split)
        d = np.fmin.reduce([delays(s, onsets, kind.duration + GRACE, THRESHOLDS) for s in watched])
        med = np.array([np.median(np.nan_to_num(row, nan=np.inf)) for row in d])
        target = target_minutes(kind.size)
        meets = np.flatnonzero(med <= target)
        need = f"{rate[meets[-1]]:.1f}" if meets.size else "none reaches it"
        found = np.isfinite(d[i])
        # Page's CUSUM: the time between false alarms grows as e^h, so sharing one false
        # alarm a week with the rest of the exporter's series asks for ln(their share) more
        shared = int(np.searchsorted(THRESHOLDS, THRESHOLDS[i] + math.log(judged / len(watched))))
        shared_med = f"{med[shared]:.1f}" if shared < THRESHOLDS.shape[0] else "–"
        print(f"| {name} | {len(watched)} | {THRESHOLDS[i]:.2f} | {rate[i]:.2f} "
              f"({', '.join(f'{x:.0f}' for x in per_seed[:, i])}) | {found.sum()}/{found.size} | {med[i]:.1f} "
              f"| {', '.join('–' if math.isnan(x) else f'{x:.0f}' for x in d[i])} | {target:g} | {need} "
              f"| {shared_med} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
