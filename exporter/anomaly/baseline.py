"""Rolling-baseline statistics: pure numpy functions over (series, hours) arrays.

Everything here takes arrays and returns arrays, one row per series, so the evaluator
judges every series of a signal in one call. NaN marks an hour with no value (before the
series existed, or no requests for a quantile); the functions ignore it without the slow
per-row paths of np.nanpercentile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .signals import Severity, SignalSpec

MAD_SCALE = 1.4826          # makes the MAD estimate sigma for normal data
LOG_MAD_FLOOR = 0.05        # 5 % relative noise at least: a flat week must not make every wiggle an outlier
MIN_POINTS = 6              # fewer baseline values than this give no verdict


def row_quantiles(x: np.ndarray, qs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolated quantiles of each row, ignoring NaN; returns (S, len(qs)) and counts."""
    s, n = sorted_rows(x)
    return sorted_quantiles(s, n, qs), n


def sorted_rows(x: np.ndarray, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row sorted ascending, and its count of valid values.

    Sorting puts NaN last, so the valid values of a row are its first n entries (and n is
    where the first NaN sits). The sort is the expensive step of the statistics, so
    callers sort once and read every quantile and MAD from the sorted rows. `overwrite`:
    x is a temporary that may be sorted in place.
    """
    s = x if overwrite else x.copy()
    width = s.shape[1]
    if width > 1:
        # numpy's quicksort (x86-simd-sort, rows over 256 values) gets several times slower
        # on rows that open with a long run of equal values, such as the NaN hours before
        # a young scope existed. Such rows are turned back to front: the run then comes
        # last, where it costs nothing, and the sorted row is the same.
        first, later = s[:, 0], s[:, 3 * width // 4]
        runs = np.flatnonzero((first == later) | (np.isnan(first) & np.isnan(later)))
        s[runs] = s[runs, ::-1]
    s.sort(axis=1)
    rows = np.arange(s.shape[0])
    n = _first_true(lambda j: np.isnan(s[rows, np.minimum(j, width - 1)]), np.full(s.shape[0], width), width)
    return s, n


def _first_true(pred: Callable[[np.ndarray], np.ndarray], hi: np.ndarray, width: int) -> np.ndarray:
    """Per element, the first j in [0, hi) where `pred(j)` holds, or hi where none does.

    `pred` must be false then true along j (it is also called with j == hi). A binary
    search, all rows at once: a few steps over (rows,) arrays instead of a pass over every
    value; `width` bounds hi.
    """
    lo = np.zeros_like(hi)
    for _ in range(int(width).bit_length()):            # each step halves hi - lo
        mid = (lo + hi) >> 1
        holds = pred(mid)
        hi = np.where(holds, mid, hi)
        lo = np.where(holds, lo, np.minimum(mid + 1, hi))
    return lo


def _ranks(n: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two neighbouring ranks of the q-quantile of n values (n > 0) and the weight of
    the upper one, as linear interpolation (numpy's default) defines them."""
    pos = (n - 1) * q
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n - 1), pos - lo


def sorted_quantiles(s: np.ndarray, n: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """Quantiles (S, len(qs)) of rows sorted by `sorted_rows`; NaN where a row has no values."""
    out = np.full((s.shape[0], len(qs)), np.nan)
    rows = np.flatnonzero(n > 0)
    if not rows.size:
        return out
    nn = n[rows]
    for j, q in enumerate(qs):
        lo, hi, frac = _ranks(nn, q)
        out[rows, j] = s[rows, lo] * (1 - frac) + s[rows, hi] * frac
    return out


def sorted_abs_dev_median(s: np.ndarray, n: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Median of |x - centre| per row (the MAD, unscaled), from rows sorted by `sorted_rows`.

    Equal to `row_quantiles(np.abs(x - centre[:, None]), (0.5,))` but without sorting the
    deviations a second time: over sorted values the deviations fall then rise, so the two
    middle ones are found by a binary search per row (see `_middle_abs_deviations`). Rows
    holding an infinite value (a zero in log space with a zero floor) can make deviations
    NaN, which the search cannot rank; those few rows take the sorting path.
    """
    out = np.full(s.shape[0], np.nan)
    rows = np.flatnonzero(n > 0)
    if not rows.size:
        return out
    nn = n[rows]
    inf = np.isinf(s[rows, 0]) | np.isinf(s[rows, nn - 1])
    if inf.any():
        bad = rows[inf]
        out[bad] = row_quantiles(np.abs(s[bad] - centre[bad, None]), (0.5,))[0][:, 0]
        rows, nn = rows[~inf], nn[~inf]
    lo, hi, frac = _ranks(nn, 0.5)
    kth, following = _middle_abs_deviations(s, rows, nn, centre[rows], lo)
    out[rows] = kth * (1 - frac) + np.where(hi > lo, following, kth) * frac
    return out


def _middle_abs_deviations(s: np.ndarray, rows: np.ndarray, n: np.ndarray, centre: np.ndarray,
                           k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k-th and (k+1)-th smallest (0-based) of |s[r, :n] - centre| for each selected row r.

    With v = s[r, :n] sorted, the deviations fall then rise along v, so the k+1 smallest
    are k+1 neighbouring values v[j .. j+k] (a run) and the largest in a run sits at one of
    its ends: the k-th is min over j of max(centre - v[j], v[j+k] - centre). The first term
    falls and the second rises with j, so a binary search finds the first j where the
    second reaches the first, and the best run starts there or just before.

    The (k+1)-th is the smaller deviation of the run's two outer neighbours, or the k-th
    itself if that is larger: a value further out deviates no less than the neighbour on
    its side unless that neighbour deviates no more than the k-th, and then one value
    outside the run ties or beats the k-th, which makes the two equal. Every deviation
    compared is the very float |v - centre| gives, so the results are exact.
    """
    width = s.shape[1]
    flat = s.reshape(-1)
    start = rows * width                                # flat index of each row's first value
    last = n - 1 - k                                    # the last start j whose run fits

    def reached(j: np.ndarray) -> np.ndarray:
        j = start + np.minimum(j, last)
        return flat[j + k] - centre >= centre - flat[j]

    j = _first_true(reached, last + 1, width)
    right = flat[start + np.minimum(j, last) + k] - centre  # largest deviation of the run at j
    left = centre - flat[start + np.maximum(j - 1, 0)]      # and of the run at j - 1
    at_j = (j <= last) & ((j == 0) | (right <= left))
    kth = np.where(at_j, right, left)
    run = np.where(at_j, j, j - 1)
    below = np.where(run > 0, np.abs(flat[start + np.maximum(run - 1, 0)] - centre), np.inf)
    above = np.where(run + k + 1 < n, np.abs(flat[start + np.minimum(run + k + 1, n - 1)] - centre), np.inf)
    return kth, np.maximum(kth, np.minimum(below, above))


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
    """Robust statistics of each row of `history` (S, H), NaN ignored.

    Two sorts, of the values and of their hour-to-hour steps; the quartiles, medians and
    MADs are all read from those two (see `sorted_abs_dev_median`). Sorting is most of
    the cost when the hour turns, so nothing is sorted twice.
    """
    x = transform(history, spec)
    last = _last_valid(x)
    steps = np.diff(x, axis=1)
    s, n = sorted_rows(x, overwrite=x is not history)
    q = sorted_quantiles(s, n, (0.25, 0.5, 0.75))
    q1, med, q3 = q[:, 0], q[:, 1], q[:, 2]
    mad = sorted_abs_dev_median(s, n, med) * MAD_SCALE
    mad_floor = LOG_MAD_FLOOR if spec.log_space else np.maximum(spec.baseline_floor * 0.5, 0.1 * np.abs(med))
    ds, dn = sorted_rows(steps, overwrite=True)
    dmed = sorted_quantiles(ds, dn, (0.5,))[:, 0]
    dmad = sorted_abs_dev_median(ds, dn, dmed) * MAD_SCALE
    return Stats(n, q1, med, q3, np.fmax(mad, mad_floor), dmed, np.fmax(dmad, LOG_MAD_FLOOR), dn, last)


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
    """The last non-NaN value of each row, NaN if none; only rows ending in NaN are searched."""
    out = x[:, -1].copy()
    gap = np.flatnonzero(np.isnan(out))
    if gap.size:
        valid = ~np.isnan(x[gap])
        idx = x.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
        out[gap] = np.where(valid.any(axis=1), x[gap, idx], np.nan)
    return out
