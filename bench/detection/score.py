"""From backtest snapshots to scores: what each signal said at each step, its warning
episodes, and recall / precision / delay / false warnings against the injected truth.

Signals scored:
- the evaluator's signals (`cost_per_hour`, ... from `snap.verdicts`), per scope key;
- `drift` (a model's drift severity) and `drift.<signal>` (that signal among the
  reasons), per model scope;
- `runaway.<reason>` (an app has sessions flagged for that reason), `runaway` (any
  reason) and `runaway.invocation` (the app's invocation spike flag), per app scope.

"Warning" means severity >= 1 (warning or high; mild or severe for drift). An episode is
a run of consecutive steps at warning on one (signal, scope) series; each episode is one
detection, as an alert on that series would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from inject import Anomaly

ScopeKey = tuple[str, str, str, str]
# Signals whose sample count is the window's request count. latency_p95 counts requests
# with a latency, which in this benchmark's traffic is every request.
REQUEST_COUNTED = ("cost_per_hour", "token_velocity", "request_rate", "error_rate", "latency_p95")
SWEEP_FIELDS = ("current", "baseline", "ratio", "zscore", "baseline_hours")
RUNAWAY_REASONS = ("chain_length", "token_burst", "session_cost", "tool_repetition")
WEEK = 7 * 86400.0


def key_name(key: ScopeKey) -> str:
    scope, app, provider, model = key
    return f"app={app}" if scope == "app" else f"model={provider}/{model}" if scope == "model" else "global"


class Collector:
    """The `on_snapshot` callback: keeps severities (all signals) and, for the evaluator's
    signals, the verdict values the threshold sweep re-judges."""

    def __init__(self, keep_values: bool = True) -> None:
        self.times: list[float] = []
        self.keys: list[ScopeKey] = []
        self._index: dict[ScopeKey, int] = {}
        self.flags: dict[str, list[tuple[int, int, int]]] = {}   # signal -> (step, key index, severity)
        self.values: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
        self.specs: dict[str, Any] = {}
        self.requests: list[tuple[np.ndarray, np.ndarray]] = []
        self.drift_values: list[tuple[int, int, dict[str, float], int]] = []
        self.keep_values = keep_values

    def _key(self, key: ScopeKey) -> int:
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.keys)
            self.keys.append(key)
        return i

    def _flag(self, signal: str, step: int, key: ScopeKey, sev: int) -> None:
        self.flags.setdefault(signal, []).append((step, self._key(key), sev))

    def __call__(self, snap: Any) -> None:
        step = len(self.times)
        self.times.append(float(snap.t))
        idx = np.array([self._key(tuple(k)) for k in snap.keys], dtype=np.int64)
        if self.keep_values:
            self.requests.append((idx, np.asarray(snap.window_requests, dtype=np.float64).copy()))
        for spec in snap.specs:
            v = snap.verdicts[spec.name]
            self.specs[spec.name] = spec
            sev = np.asarray(v.severity)
            for j in np.flatnonzero(sev >= 1).tolist():
                self.flags.setdefault(spec.name, []).append((step, int(idx[j]), int(sev[j])))
            self.flags.setdefault(spec.name, [])
            if self.keep_values:
                self.values.setdefault(spec.name, []).append(
                    (idx, {f: np.asarray(getattr(v, f), dtype=np.float64).copy() for f in SWEEP_FIELDS}))
        rep = snap.extra.get("detectors")
        if rep is None:
            return
        for r in rep.drift:
            key = ("model", "", r.provider, r.model)
            if self.keep_values:
                self.drift_values.append((step, self._key(key), dict(r.values), int(r.fill)))
            if r.severity >= 1:
                self._flag("drift", step, key, int(r.severity))
                for reason in r.reasons:
                    self._flag("drift." + reason.split(" ", 1)[0], step, key, 1)
        rw = rep.runaway
        any_app: dict[str, int] = {}
        for (app, reason), n in rw.sessions_by_app_reason.items():
            if n > 0:
                self._flag("runaway." + reason, step, ("app", app, "", ""), 1)
                any_app[app] = 1
        for app in any_app:
            self._flag("runaway", step, ("app", app, "", ""), 1)
        for app in rw.invocation_flagged:
            self._flag("runaway.invocation", step, ("app", app, "", ""), 1)

    def result(self) -> "Observations":
        t = np.array(self.times)
        K = len(self.keys)
        sev: dict[str, np.ndarray] = {}
        for name, rows in self.flags.items():
            m = np.zeros((t.shape[0], K), dtype=np.int8)
            if rows:
                a = np.array(rows, dtype=np.int64)
                m[a[:, 0], a[:, 1]] = a[:, 2]
            sev[name] = m
        for name in ("drift", "runaway", "runaway.invocation", *(f"runaway.{r}" for r in RUNAWAY_REASONS)):
            sev.setdefault(name, np.zeros((t.shape[0], K), dtype=np.int8))
        vals: dict[str, dict[str, np.ndarray]] = {}
        for name, steps in self.values.items():
            out = {f: np.full((t.shape[0], K), np.nan) for f in SWEEP_FIELDS}
            for s, (idx, v) in enumerate(steps):
                for f in SWEEP_FIELDS:
                    out[f][s, idx] = v[f]
            vals[name] = out
        req = np.full((t.shape[0], K), np.nan)
        for s, (idx, v) in enumerate(self.requests):
            req[s, idx] = v
        drift: dict[str, np.ndarray] = {}
        for s, k, values, fill in self.drift_values:
            for name, v in list(values.items()) + [("fill", float(fill))]:
                drift.setdefault(name, np.full((t.shape[0], K), np.nan))[s, k] = v
        return Observations(t, list(self.keys), sev, vals, dict(self.specs), req, drift)


@dataclass
class Observations:
    times: np.ndarray                       # (S,) step times
    keys: list[ScopeKey]                    # (K,)
    severity: dict[str, np.ndarray]         # signal -> (S, K) int8
    values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # sweep inputs
    specs: dict[str, Any] = field(default_factory=dict)
    window_requests: np.ndarray | None = None                                  # (S, K)
    drift_values: dict[str, np.ndarray] = field(default_factory=dict)          # drift signal -> (S, K)

    def key_index(self, keys: Iterable[ScopeKey]) -> list[int]:
        pos = {k: i for i, k in enumerate(self.keys)}
        return [pos[k] for k in keys if k in pos]


# --- episodes -------------------------------------------------------------------------

@dataclass
class Episode:
    signal: str
    key: ScopeKey
    start: float            # first step at warning
    end: float              # last step at warning
    peak: int

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "scope": key_name(self.key), "start": self.start, "end": self.end,
                "peak": self.peak}


def episodes(obs: Observations, signal: str, sev: np.ndarray | None = None,
             lo: float = -math.inf, hi: float = math.inf) -> list[Episode]:
    """Runs of consecutive steps at warning, per scope, among steps with lo <= t < hi."""
    m = obs.severity.get(signal) if sev is None else sev
    if m is None:
        return []
    keep = (obs.times >= lo) & (obs.times < hi)
    t = obs.times[keep]
    m = m[keep]
    out: list[Episode] = []
    for k in np.flatnonzero((m >= 1).any(axis=0)).tolist():
        on = m[:, k] >= 1
        edges = np.diff(np.r_[0, on.astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
        for a, b in zip(starts.tolist(), ends.tolist()):
            out.append(Episode(signal, obs.keys[k], float(t[a]), float(t[b]), int(m[a:b + 1, k].max())))
    return sorted(out, key=lambda e: (e.start, e.key))


# --- injected anomalies ---------------------------------------------------------------

@dataclass
class SignalScore:
    kind: str
    signal: str
    primary: bool
    instances: int
    detected: int
    delays_s: list[float]
    episodes: int
    true_episodes: int
    gated: bool
    hour_long_spike: bool
    size: float

    @property
    def recall(self) -> float:
        return self.detected / self.instances if self.instances else math.nan

    @property
    def precision(self) -> float:
        return self.true_episodes / self.episodes if self.episodes else math.nan

    @property
    def median_delay_min(self) -> float:
        return float(np.median(self.delays_s)) / 60.0 if self.delays_s else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "signal": self.signal, "primary": self.primary, "instances": self.instances,
                "detected": self.detected, "recall": _j(self.recall), "precision": _j(self.precision),
                "median_delay_min": _j(self.median_delay_min), "delays_min": [d / 60 for d in self.delays_s],
                "episodes": self.episodes, "true_episodes": self.true_episodes, "gated": self.gated,
                "hour_long_spike": self.hour_long_spike, "size": self.size}


def _j(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def detection_time(obs: Observations, signal: str, a: Anomaly, grace: float,
                   sev: np.ndarray | None = None) -> float | None:
    """First step in [start, end + grace] where the signal warns on a scope containing `a`."""
    m = obs.severity.get(signal) if sev is None else sev
    cols = obs.key_index(a.scopes)
    if m is None or not cols:
        return None
    inside = (obs.times >= a.start) & (obs.times <= a.end + grace)
    hit = inside & (m[:, cols] >= 1).any(axis=1)
    steps = np.flatnonzero(hit)
    return float(obs.times[steps[0]]) if steps.size else None


def score_kind(obs: Observations, kind: Any, anomalies: list[Anomaly], grace: float, lo: float, hi: float,
               signals: Iterable[str] | None = None, sev_override: dict[str, np.ndarray] | None = None
               ) -> list[SignalScore]:
    """Recall, delay and precision of each of the kind's signals over one run."""
    out = []
    for i, sig in enumerate(signals or kind.signals):
        sev = (sev_override or {}).get(sig)
        delays = []
        for a in anomalies:
            t = detection_time(obs, sig, a, grace, sev)
            if t is not None:
                delays.append(t - a.start)
        eps = episodes(obs, sig, sev, lo, hi)
        true = sum(1 for e in eps if any(e.key in a.scopes and e.end >= a.start and e.start <= a.end + grace
                                         for a in anomalies))
        out.append(SignalScore(kind.name, sig, i == 0, len(anomalies), len(delays), delays, len(eps), true,
                               kind.gated, kind.hour_long_spike, kind.size))
    return out


def false_warnings(obs: Observations, lo: float, hi: float, signals: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Episodes per signal on clean traffic, per week of evaluated time, with where they were."""
    weeks = (hi - lo) / WEEK
    out = {}
    for sig in signals:
        eps = episodes(obs, sig, None, lo, hi)
        by_scope: dict[str, int] = {}
        for e in eps:
            by_scope[key_name(e.key)] = by_scope.get(key_name(e.key), 0) + 1
        out[sig] = {"episodes": len(eps), "per_week": len(eps) / weeks if weeks > 0 else math.nan,
                    "by_scope": by_scope, "list": [e.to_dict() for e in eps]}
    return out


# --- NAB ------------------------------------------------------------------------------

@dataclass
class NabScore:
    file: str
    windows: int
    detected: int
    delays_s: list[float]
    episodes: int
    true_episodes: int
    weeks: float

    @property
    def recall(self) -> float:
        return self.detected / self.windows if self.windows else math.nan

    @property
    def precision(self) -> float:
        return self.true_episodes / self.episodes if self.episodes else math.nan

    @property
    def fp_per_week(self) -> float:
        return (self.episodes - self.true_episodes) / self.weeks if self.weeks > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "windows": self.windows, "detected": self.detected, "recall": _j(self.recall),
                "precision": _j(self.precision), "episodes": self.episodes, "true_episodes": self.true_episodes,
                "false_per_week": _j(self.fp_per_week),
                "median_delay_h": _j(float(np.median(self.delays_s)) / 3600 if self.delays_s else math.nan),
                "delays_h": [d / 3600 for d in self.delays_s], "weeks_scored": round(self.weeks, 3)}


def score_nab(obs: Observations, file: str, windows: list[tuple[float, float]], lo: float, hi: float,
              signal: str = "request_rate", key: ScopeKey = ("global", "", "", "")) -> NabScore:
    """NAB-style: a warning inside a labelled window detects it (first one sets the delay);
    an episode overlapping no window is a false positive. Steps before `lo` (the
    probationary period) are not scored, nor windows that end before it."""
    k = obs.key_index([key])
    sev = np.zeros_like(obs.severity.get(signal, np.zeros((obs.times.shape[0], 0), np.int8)))
    if k:
        sev[:, k[0]] = obs.severity[signal][:, k[0]]
    scored = [w for w in windows if w[1] >= lo]
    delays = []
    for a, b in scored:
        inside = (obs.times >= max(a, lo)) & (obs.times <= b) & (sev[:, k[0]] >= 1 if k else False)
        steps = np.flatnonzero(inside)
        if steps.size:
            delays.append(float(obs.times[steps[0]]) - a)
    eps = [e for e in episodes(obs, signal, sev, lo, hi) if e.key == key]
    true = sum(1 for e in eps if any(e.end >= a and e.start <= b for a, b in windows))
    return NabScore(file, len(scored), len(delays), delays, len(eps), true, (hi - lo) / WEEK)


# --- threshold sweep ------------------------------------------------------------------

def rejudge(obs: Observations, signal: str, **overrides: float) -> np.ndarray:
    """Severity of an evaluator signal recomputed from the verdict values each snapshot
    published, with `warning_ratio`, `high_ratio`, `min_zscore`, `min_current`,
    `min_baseline_hours` or (raised, for signals counted in requests) `min_requests`
    changed. This is `baseline.judge`'s severity rule; with no
    overrides it must give back the live severities (run.py checks that it does)."""
    spec = obs.specs[signal]
    p = {f: overrides.get(f, getattr(spec, f)) for f in
         ("warning_ratio", "high_ratio", "min_zscore", "min_current", "min_baseline_hours", "min_requests")}
    if p["min_requests"] < spec.min_requests:
        raise ValueError(f"{signal}: min_requests can only be raised in a re-judge (live {spec.min_requests})")
    if p["min_requests"] > spec.min_requests and signal not in REQUEST_COUNTED:
        raise ValueError(f"{signal}: min_requests counts samples the snapshot does not publish")
    v = obs.values[signal]
    cur, base, ratio, z, bh = (v[f] for f in SWEEP_FIELDS)
    sev = np.zeros(cur.shape, dtype=np.int8)
    with np.errstate(invalid="ignore"):
        ready = bh >= p["min_baseline_hours"]
        if p["min_requests"] > spec.min_requests:
            ready = ready & (obs.window_requests >= p["min_requests"])
        if spec.direction in ("up", "both"):
            big = ready & (z >= p["min_zscore"]) & (cur >= p["min_current"])
            sev = np.maximum(sev, np.where(big & (ratio >= p["warning_ratio"]), 1, 0).astype(np.int8))
            sev = np.maximum(sev, np.where(big & (ratio >= p["high_ratio"]), 2, 0).astype(np.int8))
        if spec.direction in ("down", "both"):
            small = ready & (z <= -p["min_zscore"]) & (base >= p["min_current"])
            sev = np.maximum(sev, np.where(small & (ratio <= 1.0 / p["warning_ratio"]), 1, 0).astype(np.int8))
            sev = np.maximum(sev, np.where(small & (ratio <= 1.0 / p["high_ratio"]), 2, 0).astype(np.int8))
    return sev
