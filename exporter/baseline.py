"""Rolling-baseline statistics: pure numpy functions over (series, hours) arrays.

Everything here takes arrays and returns arrays, one row per series, so the evaluator
judges every series of a signal in one call. NaN marks an hour with no value (before the
series existed, or no requests for a quantile); the functions ignore it without the slow
per-row paths of np.nanpercentile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .signals import Severity, SignalSpec

MAD_SCALE = 1.4826          # makes the MAD estimate sigma for normal data
LOG_MAD_FLOOR = 0.05        # 5 % relative noise at least: a flat week must not make every wiggle an outlier
MIN_POINTS = 6              # fewer baseline values than this give no verdict


def row_quantiles(x: np.ndarray, qs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolated quantiles of each row, ignoring NaN; returns (S, len(qs)) and counts.

    Sorting puts NaN last, so the valid values of a row are its first n entries.
    """
    s = np.sort(x, axis=1)
    n = np.sum(~np.isnan(x), axis=1)
    out = np.full((x.shape[0], len(qs)), np.nan)
    ok = n > 0
    if not ok.any():
        return out, n
    rows = np.nonzero(ok)[0]
    nn = n[ok]
    for j, q in enumerate(qs):
        pos = (nn - 1) * q
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, nn - 1)
        frac = pos - lo
        out[rows, j] = s[rows, lo] * (1 - frac) + s[rows, hi] * frac
    return out, n


def transform(v: np.ndarray, spec: SignalSpec) -> np.ndarray:
    """The space the statistics are taken in: log for skewed quantities."""
    if spec.log_space:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log(v + spec.baseline_floor)
    return v


def untransform(x: np.ndarray, spec: SignalSpec) -> np.ndarray:
    if spec.log_space:
        return np.maximum(np.exp(x) - spec.baseline_floor, 0.0)
    return np.maximum(x, 0.0)


@dataclass(slots=True)
class Verdict:
    """One signal judged over all series; every field is an array with one entry per series."""

    current: np.ndarray
    baseline: np.ndarray
    ratio: np.ndarray
    zscore: np.ndarray
    band_lower: np.ndarray
    band_upper: np.ndarray
    change_zscore: np.ndarray
    baseline_hours: np.ndarray
    severity: np.ndarray


@dataclass(slots=True)
class Stats:
    """What a baseline says, independent of the current value: per series, the count of
    hourly values, their quartiles and median in the statistics' space, the MAD, the
    median and MAD of hour-to-hour steps, and the last value. It changes only when the
    hour turns or history arrives late, so the evaluator keeps it between evaluations."""

    n: np.ndarray
    q1: np.ndarray
    med: np.ndarray
    q3: np.ndarray
    mad: np.ndarray
    step_med: np.ndarray
    step_mad: np.ndarray
    step_n: np.ndarray
    last: np.ndarray


def baseline_stats(spec: SignalSpec, history: np.ndarray) -> Stats:
    """Robust statistics of each row of `history` (S, H), NaN ignored."""
    x = transform(history, spec)
    q, n = row_quantiles(x, (0.25, 0.5, 0.75))
    q1, med, q3 = q[:, 0], q[:, 1], q[:, 2]
    mad = row_quantiles(np.abs(x - med[:, None]), (0.5,))[0][:, 0] * MAD_SCALE
    mad_floor = LOG_MAD_FLOOR if spec.log_space else np.maximum(spec.baseline_floor * 0.5, 0.1 * np.abs(med))
    d = np.diff(x, axis=1)
    dq, dn = row_quantiles(d, (0.5,))
    dmed = dq[:, 0]
    dmad = row_quantiles(np.abs(d - dmed[:, None]), (0.5,))[0][:, 0] * MAD_SCALE
    return Stats(n, q1, med, q3, np.fmax(mad, mad_floor), dmed, np.fmax(dmad, LOG_MAD_FLOOR), dn, _last_valid(x))


def judge(spec: SignalSpec, current: np.ndarray, history: np.ndarray | None, baseline_hours: np.ndarray,
          window_requests: np.ndarray, stats: Stats | None = None) -> Verdict:
    """Compare each series' current value against its hourly history.

    `history` is (S, H) in the signal's unit, oldest hour first, NaN where missing; it must
    already exclude the window under test (or pass its `stats` instead). `baseline_hours` is
    how much history each series has (for the warm-up rule); `window_requests` gates
    signals that need samples.
    """
    st = stats if stats is not None else baseline_stats(spec, history)  # type: ignore[arg-type]
    enough = st.n >= MIN_POINTS
    sampled = window_requests >= spec.min_requests
    has_current = ~np.isnan(current) & sampled
    xc = transform(current, spec)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(enough & has_current, (xc - st.med) / st.mad, np.nan)
    baseline = np.where(enough, untransform(st.med, spec), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(enough & has_current, current / np.maximum(baseline, spec.baseline_floor), np.nan)
    iqr = st.q3 - st.q1
    lower = np.where(enough, untransform(st.q1 - 1.5 * iqr, spec), np.nan)
    upper = np.where(enough, untransform(st.q3 + 1.5 * iqr, spec), np.nan)
    with np.errstate(invalid="ignore"):
        change_z = np.where(st.step_n >= MIN_POINTS, (xc - st.last - st.step_med) / st.step_mad, np.nan)

    sev = np.zeros(current.shape[0], dtype=np.int64)
    ready = enough & has_current & (baseline_hours >= spec.min_baseline_hours)
    with np.errstate(invalid="ignore"):
        if spec.direction in ("up", "both"):
            big = ready & (z >= spec.min_zscore) & (current >= spec.min_current)
            sev = np.maximum(sev, np.where(big & (ratio >= spec.warning_ratio), int(Severity.WARNING), 0))
            sev = np.maximum(sev, np.where(big & (ratio >= spec.high_ratio), int(Severity.HIGH), 0))
        if spec.direction in ("down", "both"):
            small = ready & (z <= -spec.min_zscore) & (baseline >= spec.min_current)
            sev = np.maximum(sev, np.where(small & (ratio <= 1.0 / spec.warning_ratio), int(Severity.WARNING), 0))
            sev = np.maximum(sev, np.where(small & (ratio <= 1.0 / spec.high_ratio), int(Severity.HIGH), 0))
    return Verdict(current, baseline, ratio, z, lower, upper, change_z, baseline_hours.astype(np.float64), sev)


def _last_valid(x: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(x)
    idx = x.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
    out = x[np.arange(x.shape[0]), idx]
    return np.where(valid.any(axis=1), out, np.nan)
