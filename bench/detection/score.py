"""From backtest snapshots to scores: what each signal said at each step, the alerts the
shipped rules would have raised from it, and recall / delay / precision / false warnings,
alerts and pages against the injected truth.

Signals scored:
- the evaluator's signals (`cost_per_hour`, ... from `snap.verdicts`), per scope key,
  with `explained` (a narrower scope's anomaly explains this one) and the direction of
  the change (the sign of the z-score; request rate alerts up and down separately);
- `drift` (a model's drift severity) and `drift.<signal>` (that signal among the
  reasons), per model scope;
- `runaway.<reason>` (an app has sessions flagged for that reason), `runaway` (any
  reason) and `runaway.invocation` (the app's invocation spike flag), per app scope.

A *warning* is a verdict at severity >= 1 (warning or high; mild or severe for drift); a
warning *episode* is a run of consecutive steps at warning on one (signal, scope) series.
An *alert* is what the shipped rules make of it (`alerts.py`): the verdict, unless
explained, held for the rule's `for:`; a *page* is a critical alert. The signals that
alerts route are the evaluator's, `drift`, `runaway.<reason>` and `runaway.invocation`;
the totals over all signals add up those (`drift.<signal>` and `runaway` restate them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from alerts import RUNAWAY_REASONS, AlertRule, firing, held_firing, run_start, runs
from inject import Anomaly

ScopeKey = tuple[str, str, str, str]
WEEK = 7 * 86400.0
DERIVED = {"runaway": tuple(f"runaway.{r}" for r in RUNAWAY_REASONS)}   # alerts of a derived signal


def key_name(key: ScopeKey) -> str:
    scope, app, provider, model = key
    return f"app={app}" if scope == "app" else f"model={provider}/{model}" if scope == "model" else "global"


class Collector:
    """The `on_snapshot` callback: keeps, per signal and step, the scopes at warning with
    their severity, whether the verdict was explained, and the direction of the change.

    Works with any exporter revision: a Verdict without `explained` is never explained."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.keys: list[ScopeKey] = []
        self._index: dict[ScopeKey, int] = {}
        # signal -> (step, key index, severity, explained, direction sign)
        self.flags: dict[str, list[tuple[int, int, int, int, int]]] = {}
        self.directions: dict[str, str] = {}

    def _key(self, key: ScopeKey) -> int:
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.keys)
            self.keys.append(key)
        return i

    def _flag(self, signal: str, step: int, key: ScopeKey, sev: int) -> None:
        self.flags.setdefault(signal, []).append((step, self._key(key), sev, 0, 1))

    def __call__(self, snap: Any) -> None:
        step = len(self.times)
        self.times.append(float(snap.t))
        idx = np.array([self._key(tuple(k)) for k in snap.keys], dtype=np.int64)
        for spec in snap.specs:
            v = snap.verdicts[spec.name]
            self.directions[spec.name] = str(getattr(spec, "direction", "up"))
            rows = self.flags.setdefault(spec.name, [])
            sev = np.asarray(v.severity)
            hit = np.flatnonzero(sev >= 1)
            if not hit.size:
                continue
            expl = getattr(v, "explained", None)
            expl = np.asarray(expl) if expl is not None and np.size(expl) == sev.shape[0] else None
            z = np.asarray(getattr(v, "zscore", np.zeros(sev.shape[0])), dtype=np.float64)
            for j in hit.tolist():
                rows.append((step, int(idx[j]), int(sev[j]), int(expl is not None and expl[j] >= 0),
                             -1 if z[j] < 0 else 1))
        rep = snap.extra.get("detectors")
        if rep is None:
            return
        for r in rep.drift:
            key = ("model", "", r.provider, r.model)
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
        shape = (t.shape[0], len(self.keys))
        sev: dict[str, np.ndarray] = {}
        expl: dict[str, np.ndarray] = {}
        sign: dict[str, np.ndarray] = {}
        names = set(self.flags) | {"drift", "runaway", "runaway.invocation", *(f"runaway.{r}" for r in RUNAWAY_REASONS)}
        for name in names:
            m, e, d = np.zeros(shape, np.int8), np.zeros(shape, bool), np.ones(shape, np.int8)
            rows = self.flags.get(name, [])
            if rows:
                a = np.array(rows, dtype=np.int64)
                m[a[:, 0], a[:, 1]] = a[:, 2]
                e[a[:, 0], a[:, 1]] = a[:, 3] > 0
                d[a[:, 0], a[:, 1]] = a[:, 4]
            sev[name], expl[name], sign[name] = m, e, d
        return Observations(t, list(self.keys), sev, expl, sign, dict(self.directions))


@dataclass
class Observations:
    times: np.ndarray                       # (S,) step times
    keys: list[ScopeKey]                    # (K,)
    severity: dict[str, np.ndarray]         # signal -> (S, K) int8
    explained: dict[str, np.ndarray]        # signal -> (S, K) bool
    sign: dict[str, np.ndarray]             # signal -> (S, K) int8: +1 up, -1 down
    directions: dict[str, str] = field(default_factory=dict)   # evaluator signal -> "up" / "down" / "both"

    def key_index(self, keys: Iterable[ScopeKey]) -> list[int]:
        pos = {k: i for i, k in enumerate(self.keys)}
        return [pos[k] for k in keys if k in pos]

    def window(self, lo: float, hi: float) -> "Observations":
        """The steps with lo <= t < hi."""
        keep = (self.times >= lo) & (self.times < hi)
        return Observations(self.times[keep], self.keys, {k: v[keep] for k, v in self.severity.items()},
                            {k: v[keep] for k, v in self.explained.items()}, {k: v[keep] for k, v in self.sign.items()},
                            self.directions)


# --- alerts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Firing:
    """One alert from the moment it fires until it resolves."""

    signal: str
    direction: str          # "up" / "down" for a signal alerted both ways, else ""
    key: ScopeKey
    severity: str
    pages: bool
    onset: float            # first step of the verdict run (the alert pending from)
    start: float            # first firing step
    end: float              # last firing step

    @property
    def name(self) -> str:
        d = f" {self.direction}" if self.direction else ""
        return f"{self.signal}{d} {key_name(self.key)} {self.severity}"

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "direction": self.direction, "scope": key_name(self.key),
                "severity": self.severity, "onset": self.onset, "start": self.start, "end": self.end}


@dataclass
class Alerts:
    """What the rules raise from one run: per alerting signal, where any of its alerts is
    firing and where a paging one is (both (S, K)), and every firing."""

    any: dict[str, np.ndarray]
    paging: dict[str, np.ndarray]
    firings: list[Firing]
    rules: dict[str, tuple[AlertRule, ...]]

    def firing_any(self, signal: str) -> np.ndarray | None:
        """Where an alert of the signal fires; a derived signal (`runaway`) fires when any of
        its parts does; None for a signal no rule alerts on."""
        if signal in self.any:
            return self.any[signal]
        parts = [self.any[s] for s in DERIVED.get(signal, ()) if s in self.any]
        return np.logical_or.reduce(parts) if parts else None


def raise_alerts(obs: Observations, rules: dict[str, tuple[AlertRule, ...]]) -> Alerts:
    """Apply the rules to every signal they route."""
    t = obs.times
    shape = (t.shape[0], len(obs.keys))
    any_: dict[str, np.ndarray] = {}
    paging: dict[str, np.ndarray] = {}
    out: list[Firing] = []
    for sig, sig_rules in rules.items():
        m = obs.severity.get(sig)
        if m is None:
            continue
        quiet = obs.explained.get(sig, np.zeros(shape, bool))
        never = np.zeros(shape, bool)
        both = obs.directions.get(sig) == "both"
        dirs = (("up", obs.sign[sig] > 0), ("down", obs.sign[sig] < 0)) if both else (("", np.ones(shape, bool)),)
        a, p = np.zeros(shape, bool), np.zeros(shape, bool)
        for direction, mask in dirs:
            page = page_cond = never
            for r in sorted(sig_rules, key=lambda x: not x.pages):    # the critical rule first, as in its group
                cond = (m >= r.level) & mask & ~(quiet if r.explainable else never)
                if r.hold and not r.pages:
                    f = held_firing(t, cond, r.for_s, page, r.hold_s, r.hold, r.keep_s,
                                    page_cond if r.hold_cond else None)
                else:
                    f = firing(t, cond, r.for_s, r.keep_s)
                if r.pages:
                    page, page_cond = f, cond
                a |= f
                if r.pages:
                    p |= f
                starts = run_start(cond)
                for k, i, j in runs(f):
                    out.append(Firing(sig, direction, obs.keys[k], r.severity, r.pages, float(t[starts[i, k]]),
                                      float(t[i]), float(t[j])))
        any_[sig], paging[sig] = a, p
    out.sort(key=lambda f: (f.start, f.signal, f.key, f.severity))
    return Alerts(any_, paging, out, rules)


# --- episodes -------------------------------------------------------------------------

@dataclass
class Episode:
    signal: str
    key: ScopeKey
    start: float            # first step of the run
    end: float              # last step of the run
    peak: int

    def to_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "scope": key_name(self.key), "start": self.start, "end": self.end,
                "peak": self.peak}


def episodes(obs: Observations, signal: str, mask: np.ndarray | None = None,
             lo: float = -math.inf, hi: float = math.inf) -> list[Episode]:
    """Runs of consecutive steps at warning (or where `mask` holds), per scope, among steps
    with lo <= t < hi."""
    m = obs.severity.get(signal)
    if mask is not None:
        on = mask
    elif m is not None:
        on = m >= 1
    else:
        return []
    keep = (obs.times >= lo) & (obs.times < hi)
    t, on = obs.times[keep], on[keep]
    peak = m[keep] if m is not None else on.astype(np.int8)
    out = [Episode(signal, obs.keys[k], float(t[a]), float(t[b]), int(peak[a:b + 1, k].max()))
           for k, a, b in runs(on)]
    return sorted(out, key=lambda e: (e.start, e.key))


# --- injected anomalies ---------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, nearest rank (with 7 instances p90 is the slowest one)."""
    if not values:
        return math.nan
    v = sorted(values)
    return float(v[max(0, math.ceil(q / 100 * len(v)) - 1)])


@dataclass
class SignalScore:
    kind: str
    signal: str
    primary: bool
    instances: int
    delays_s: list[float | None]          # verdict: first warning on a containing scope - start (None: missed)
    alert_delays_s: list[float | None]    # alert: first alert firing on a containing scope - start
    alerted: bool                         # some rule routes this signal
    episodes: int
    true_episodes: int
    gated: bool
    size: float
    duration_s: float

    @staticmethod
    def _found(d: list[float | None]) -> list[float]:
        return [x for x in d if x is not None]

    @property
    def detected(self) -> int:
        return len(self._found(self.delays_s))

    @property
    def alert_detected(self) -> int:
        return len(self._found(self.alert_delays_s))

    @property
    def recall(self) -> float:
        return self.detected / self.instances if self.instances else math.nan

    @property
    def alert_recall(self) -> float:
        return self.alert_detected / self.instances if self.instances and self.alerted else math.nan

    @property
    def precision(self) -> float:
        return self.true_episodes / self.episodes if self.episodes else math.nan

    def delay_min(self, alert: bool = False, q: float = 50.0) -> float:
        d = self._found(self.alert_delays_s if alert else self.delays_s)
        if not d:
            return math.nan
        return (float(np.median(d)) if q == 50.0 else percentile(d, q)) / 60.0

    def within(self, limit_s: float, alert: bool = False) -> int:
        """Instances detected no later than `limit_s` after their start."""
        return sum(1 for x in self._found(self.alert_delays_s if alert else self.delays_s) if x <= limit_s)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "signal": self.signal, "primary": self.primary, "instances": self.instances,
                "size": self.size, "gated": self.gated, "duration_s": self.duration_s, "alerted": self.alerted,
                "detected": self.detected, "recall": _j(self.recall),
                "median_delay_min": _j(self.delay_min()), "p90_delay_min": _j(self.delay_min(q=90)),
                "delays_min": [None if d is None else d / 60 for d in self.delays_s],
                "alert_detected": self.alert_detected if self.alerted else None,
                "alert_recall": _j(self.alert_recall),
                "alert_median_delay_min": _j(self.delay_min(True)), "alert_p90_delay_min": _j(self.delay_min(True, 90)),
                "alert_delays_min": [None if d is None else d / 60 for d in self.alert_delays_s],
                "within_duration": self.within(self.duration_s),
                "alert_within_duration": self.within(self.duration_s, True) if self.alerted else None,
                "precision": _j(self.precision), "episodes": self.episodes, "true_episodes": self.true_episodes}


def _j(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def first_time(obs: Observations, on: np.ndarray | None, a: Anomaly, grace: float) -> float | None:
    """First step in [start, end + grace] where `on` holds on a scope containing `a`."""
    cols = obs.key_index(a.scopes)
    if on is None or not cols:
        return None
    inside = (obs.times >= a.start) & (obs.times <= a.end + grace)
    steps = np.flatnonzero(inside & on[:, cols].any(axis=1))
    return float(obs.times[steps[0]]) if steps.size else None


def detection_time(obs: Observations, signal: str, a: Anomaly, grace: float) -> float | None:
    """First warning of the signal on a scope containing `a`, in [start, end + grace]."""
    m = obs.severity.get(signal)
    return first_time(obs, None if m is None else m >= 1, a, grace)


def score_kind(obs: Observations, alerts: Alerts, kind: Any, anomalies: list[Anomaly], grace: float,
               lo: float, hi: float) -> list[SignalScore]:
    """Recall, delays (verdict and alert) and precision of each of the kind's signals."""
    out = []
    for i, sig in enumerate(kind.signals):
        on_alert = alerts.firing_any(sig)
        delays: list[float | None] = []
        alert_delays: list[float | None] = []
        for a in anomalies:
            t = detection_time(obs, sig, a, grace)
            delays.append(None if t is None else t - a.start)
            ta = first_time(obs, on_alert, a, grace)
            alert_delays.append(None if ta is None else ta - a.start)
        eps = episodes(obs, sig, None, lo, hi)
        true = sum(1 for e in eps if any(e.key in a.scopes and e.end >= a.start and e.start <= a.end + grace
                                         for a in anomalies))
        out.append(SignalScore(kind.name, sig, i == 0, len(anomalies), delays, alert_delays, on_alert is not None,
                               len(eps), true, kind.gated, kind.size, kind.duration))
    return out


AFTER = 12 * 3600.0     # how long after an instance its tail is counted


def alerts_per_instance(alerts: Alerts, anomalies: list[Anomaly], grace: float) -> list[dict[str, Any]]:
    """For each instance, the distinct alerts (signal, direction, scope, severity) of every
    alerting signal that start firing between its start and its end + grace, and the
    distinct scopes they name (anomaly alerts of one scope share a notification).
    `after`: the alerts (each start a notification) that start in the AFTER hours past
    that, outside every instance: an event's tail, while windows of hours still hold it."""
    def inside(t: float) -> bool:
        return any(b.start <= t <= b.end + grace for b in anomalies)

    out = []
    for a in anomalies:
        fired = {f.name: f for f in alerts.firings if a.start <= f.start <= a.end + grace}
        after = sum(1 for f in alerts.firings if a.end + grace < f.start <= a.end + AFTER and not inside(f.start))
        out.append({"start": a.start, "alerts": len(fired), "scopes": len({f.key for f in fired.values()}),
                    "pages": len({n for n, f in fired.items() if f.pages}), "names": sorted(fired),
                    "after": after})
    return out


# --- clean traffic ----------------------------------------------------------------------

def false_figures(obs: Observations, alerts: Alerts, lo: float, hi: float) -> dict[str, Any]:
    """On clean traffic, per alerting signal and in total: warning episodes, alerts (any
    severity; one per run of firing on a series) and pages (critical alerts), per week of
    evaluated time, with the scopes they were on."""
    weeks = (hi - lo) / WEEK
    signals: dict[str, dict[str, Any]] = {}
    for sig in alerts.any:
        warn = episodes(obs, sig, None, lo, hi)
        fired = episodes(obs, sig, alerts.any[sig], lo, hi)
        pages = episodes(obs, sig, alerts.paging[sig], lo, hi)
        d: dict[str, Any] = {}
        for name, eps in (("warnings", warn), ("alerts", fired), ("pages", pages)):
            by: dict[str, int] = {}
            for e in eps:
                by[key_name(e.key)] = by.get(key_name(e.key), 0) + 1
            d[name] = len(eps)
            d[name + "_per_week"] = _j(len(eps) / weeks)
            d[name + "_by_scope"] = by
        d["alert_list"] = [e.to_dict() for e in fired]
        signals[sig] = d
    total = {n: sum(d[n] for d in signals.values()) for n in ("warnings", "alerts", "pages")}
    total.update({n + "_per_week": _j(total[n] / weeks) for n in ("warnings", "alerts", "pages")})
    return {"weeks": round(weeks, 4), "scopes": len(obs.keys), "signals": signals, "total": total}


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
    on = np.zeros((obs.times.shape[0], len(obs.keys)), dtype=bool)
    if k and signal in obs.severity:
        on[:, k[0]] = obs.severity[signal][:, k[0]] >= 1
    scored = [w for w in windows if w[1] >= lo]
    delays = []
    for a, b in scored:
        inside = (obs.times >= max(a, lo)) & (obs.times <= b) & (on[:, k[0]] if k else False)
        steps = np.flatnonzero(inside)
        if steps.size:
            delays.append(float(obs.times[steps[0]]) - a)
    eps = [e for e in episodes(obs, signal, on, lo, hi) if e.key == key]
    true = sum(1 for e in eps if any(e.end >= a and e.start <= b for a, b in windows))
    return NabScore(file, len(scored), len(delays), delays, len(eps), true, (hi - lo) / WEEK)
