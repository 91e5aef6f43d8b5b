"""The fixed error-ratio alert (LLMErrorRatioHigh) on the benchmark's traffic.

    python bench/detection/error_ratio.py                     # clean weeks of seeds 7-12, storms of seed 7 and 8
    python bench/detection/error_ratio.py --rules OLD/prometheus/rules   # another checkout's rules
    python bench/detection/error_ratio.py --runs 7=r7.runs.pickle.gz --runs 8=r8.runs.pickle.gz
        # with the verdicts of `run.py --seed 7 --kinds retry_storm,error_storm --no-nab --out r7.json`

The detection benchmark scores the rules built on the exporter's verdicts (anomaly.yml,
detectors.yml). `LLMErrorRatioHigh` (performance.yml) is computed by Prometheus from the
request and error counters instead, so it is scored here, on the same traffic, as
Prometheus would evaluate it once a minute: per model, the failures and requests of the
last 5 minutes (counted when a record arrives: its start plus its latency), the levels,
minimum request count and confidence from `thresholds.yml`, the `for:`,
`keep_firing_for:` and the warning's hold on its page from `performance.yml`. A rule
whose expression does not name `ratio_lower_bound5m` compares the bare ratio (an older
checkout's rule). A rule that reads the exporter's `llm_anomaly_explained` (quiet while
the exporter finds the model's failures one app's) needs the exporter's verdicts on the
same traffic: a detection run's pickle of that seed (`--runs SEED=PICKLE`).

Printed: the alerts a clean week raises (warnings and pages, each seed), and for each
anomaly instance of the kinds that make calls fail, the alerts that start between its
onset and an hour after its end, as severity, model and minutes after the onset.
"""

from __future__ import annotations

import argparse
import gzip
import math
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from inject import KIND_BY_NAME, KINDS, inject  # noqa: E402
from run import FULL  # noqa: E402
from traffic import DAY, Traffic, build_traffic  # noqa: E402

RULES = HERE.parent.parent / "prometheus" / "rules"
WINDOW_MIN = 5                     # the recording rules' 5-minute window
ALERT = "LLMErrorRatioHigh"


@dataclass(frozen=True)
class Level:
    """One severity of the alert as its rule says."""

    severity: str
    ratio: float
    for_min: int
    keep_min: int
    bounded: bool                  # compares the lower end of the Wilson interval, not the ratio
    held: bool                     # a warning held while its page's condition holds or it fires
    apart: bool                    # quiet while the exporter finds the model's failures one app's


def _minutes(d: str) -> int:
    m = re.fullmatch(r"(\d+)([smh])", d.strip())
    if not m:
        raise SystemExit(f"error_ratio: cannot read the duration {d!r}")
    return math.ceil(int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)] / 60)


def _threshold(doc: dict, record: str, **labels: str) -> float | None:
    for g in doc["groups"]:
        for r in g["rules"]:
            if r.get("record") == record and (r.get("labels") or {}) == labels:
                m = re.fullmatch(r"vector\(([\d.]+)\)", str(r["expr"]).strip())
                return float(m.group(1)) if m else None
    return None


def load(rules: Path) -> tuple[dict[str, Level], float, float]:
    """The alert's levels, its minimum request count and its z (0: the bare ratio)."""
    th = yaml.safe_load((rules / "thresholds.yml").read_text())
    perf = yaml.safe_load((rules / "performance.yml").read_text())
    levels = {}
    for g in perf["groups"]:
        for r in g["rules"]:
            if r.get("alert") != ALERT:
                continue
            sev = r["labels"]["severity"]
            ratio = _threshold(th, "llm:error_threshold:ratio", severity=sev)
            if ratio is None:
                raise SystemExit(f"error_ratio: no llm:error_threshold:ratio for {sev} in {rules}")
            levels[sev] = Level(sev, ratio, _minutes(r["for"]), _minutes(r.get("keep_firing_for", "0s")),
                                "ratio_lower_bound5m" in r["expr"], 'severity="critical"}' in r["expr"]
                                and sev == "warning", "llm_anomaly_explained" in r["expr"])
    min_requests = _threshold(th, "llm:error_threshold:min_requests")
    z = _threshold(th, "llm:error_threshold:z") or 0.0
    return levels, float(min_requests or 0), z


def wilson_lower(errors: np.ndarray, requests: np.ndarray, z: float) -> np.ndarray:
    """The lower end of the Wilson score interval of errors / requests at z (as usage.yml)."""
    n = np.maximum(requests, 1e-12)
    p = np.clip(errors / n, 0.0, 1.0)
    return np.asarray((p + z * z / (2 * n) - z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n))


def window_counts(tr: Traffic, model: str, first_min: int, n_min: int) -> tuple[np.ndarray, np.ndarray]:
    """(requests, errors) of `model` over the 5 minutes up to each minute, by arrival."""
    sel = tr.model == model
    m = np.floor((tr.ts[sel] + tr.latency[sel]) / 60).astype(np.int64) - first_min
    ok = (m >= 0) & (m < n_min)
    req = np.bincount(m[ok], minlength=n_min).astype(np.float64)
    err = np.bincount(m[ok], weights=tr.error[sel][ok].astype(np.float64), minlength=n_min)
    k = np.ones(WINDOW_MIN)
    return np.convolve(req, k)[:n_min], np.convolve(err, k)[:n_min]


def condition(req: np.ndarray, err: np.ndarray, lvl: Level, min_requests: float, z: float) -> np.ndarray:
    value = wilson_lower(err, req, z) if lvl.bounded and z > 0 else err / np.maximum(req, 1e-12)
    return (req >= min_requests) & (value >= lvl.ratio)


def fire(cond: np.ndarray, for_min: int, keep_min: int, hold: np.ndarray | None = None) -> np.ndarray:
    """Per minute, whether the alert fires: pending from the first minute its condition
    holds, firing once it has held `for_min` minutes, on for `keep_min` minutes after the
    condition ends. `hold` (a warning's): minutes its page's condition holds or the page
    fires; there the warning's condition counts as false, unless the warning fires."""
    out = np.zeros(cond.shape[0], dtype=bool)
    since, last, firing = -1, -(10 ** 9), False
    for i, c in enumerate(cond):
        if hold is not None and hold[i] and not firing:
            c = False
        if c:
            last = i
            since = i if since < 0 else since
        else:
            since = -1
        if not firing and c and i - since >= for_min:
            firing = True
        elif firing and not c and i - last > keep_min:
            firing = False
        out[i] = firing
    return out


def apart_minutes(obs: Any, model: str, first_min: int, n_min: int) -> np.ndarray:
    """Per minute, whether the exporter's verdicts (a backtest's Observations) mark the
    model's error-rate anomaly as explained by an app: what `llm_anomaly_explained` says
    between two evaluations."""
    out = np.zeros(n_min, dtype=bool)
    keys = [i for i, k in enumerate(obs.keys) if k[0] == "model" and k[3] == model]
    if not keys or "error_rate" not in obs.explained:
        return out
    expl = obs.explained["error_rate"][:, keys[0]] & (obs.severity["error_rate"][:, keys[0]] >= 1)
    step = np.floor(obs.times / 60).astype(np.int64) - first_min
    nxt = np.append(step[1:], n_min)
    for s, e in zip(step[expl], nxt[expl]):
        out[max(s, 0):max(min(e, n_min), 0)] = True
    return out


def alerts(tr: Traffic, lo: float, hi: float, levels: dict[str, Level], min_requests: float,
           z: float, obs: Any = None) -> list[tuple[str, str, float]]:
    """(severity, model, start time) of every alert that starts in [lo, hi). `obs`: the
    backtest's verdicts of the same traffic, for a rule that reads the exporter's
    `llm_anomaly_explained` (without them, it is taken as never set)."""
    first = int(lo // 60) - 30
    n = int(hi // 60) - first
    out = []
    for model in np.unique(tr.model):
        req, err = window_counts(tr, str(model), first, n)
        apart = apart_minutes(obs, str(model), first, n) if obs is not None else np.zeros(n, dtype=bool)
        page_cond = condition(req, err, levels["critical"], min_requests, z)
        page_cond &= ~apart if levels["critical"].apart else True
        page = fire(page_cond, levels["critical"].for_min, levels["critical"].keep_min)
        warn_lvl = levels["warning"]
        warn_cond = condition(req, err, warn_lvl, min_requests, z)
        warn_cond &= ~apart if warn_lvl.apart else True
        warn = fire(warn_cond, warn_lvl.for_min, warn_lvl.keep_min, (page_cond | page) if warn_lvl.held else None)
        for sev, f in (("critical", page), ("warning", warn)):
            starts = np.flatnonzero(f & ~np.concatenate([[False], f[:-1]]))
            out += [(sev, str(model), (first + int(s)) * 60.0) for s in starts if lo <= (first + s) * 60 < hi]
    return sorted(out, key=lambda a: a[2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="7,8,9,10,11,12", help="clean weeks")
    ap.add_argument("--kinds", default="retry_storm,error_storm", help="anomaly kinds, on the first two seeds")
    ap.add_argument("--rules", type=Path, default=RULES, help="the prometheus/rules directory to read")
    ap.add_argument("--runs", action="append", default=[], metavar="SEED=PICKLE",
                    help="a detection run's verdicts of that seed (run.py --out X.json writes X.runs.pickle.gz), "
                         "for a rule that reads the exporter's llm_anomaly_explained")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    levels, min_requests, z = load(args.rules)
    verdicts = {}
    for item in args.runs:
        seed_s, _, path = item.partition("=")
        with gzip.open(path, "rb") as f:
            verdicts[int(seed_s)] = pickle.load(f)["runs"]
    plan = FULL
    days = plan.history_days + plan.scored_days + 1
    lo, hi = plan.scored_start, plan.scored_start + plan.scored_days * DAY
    weeks = plan.scored_days / 7
    print(f"{ALERT} from {args.rules}: levels "
          + ", ".join(f"{v.severity} {v.ratio:g} (for {v.for_min} min, keep {v.keep_min} min)" for v in levels.values())
          + f", at least {min_requests:g} requests, "
          + (f"lower end of the Wilson interval at z {z:g}" if z and levels["critical"].bounded else "the bare ratio")
          + (", the warning held by its page" if levels["warning"].held else "")
          + (", quiet while the exporter finds the failures one app's" if levels["critical"].apart else "") + "\n")
    clean = {seed: build_traffic(days, seed) for seed in seeds}
    print("| clean week (seed) | warnings a week | pages a week |\n|---|---|---|")
    totals = np.zeros(2)
    for seed, tr in clean.items():
        found = alerts(tr, lo, hi, levels, min_requests, z)
        w = sum(a[0] == "warning" for a in found) / weeks
        p = sum(a[0] == "critical" for a in found) / weeks
        totals += (w, p)
        print(f"| {seed} | {w:.1f} | {p:.1f} |")
    print(f"| **mean** | {totals[0] / len(clean):.2f} | {totals[1] / len(clean):.2f} |\n")
    print("| kind (seed) | alerts per instance: severity model @ minutes after the onset |\n|---|---|")
    for name in [k for k in args.kinds.split(",") if k]:
        kind = KIND_BY_NAME[name]
        onsets = plan.starts(kind)
        for seed in seeds[:2]:
            hit, anomalies = inject(clean[seed], kind, onsets, seed=seed * 1000 + KINDS.index(kind))
            obs = verdicts.get(seed, {}).get(name, (None, None))[0]
            if obs is None and any(lvl.apart for lvl in levels.values()):
                print(f"| {name} ({seed}) | no verdicts (--runs {seed}=...): the exporter's attribution not modelled |")
            found = alerts(hit, lo, hi, levels, min_requests, z, obs)
            cells = []
            for a in anomalies:
                near = [f"{sev[0].upper()} {model} @{(t - a.start) / 60:.0f}" for sev, model, t in found
                        if a.start <= t <= a.end + 3600]
                cells.append(", ".join(near) or "none")
            print(f"| {name} ({seed}) | {' · '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
