"""The fast baseline statistics and history reads equal plain reference implementations.

`baseline.baseline_stats` sorts each signal's values and steps once and reads every
quantile and MAD from those sorts; `ScopeHistory` reads hours and the window with
block-wise gathers and slice sums. These tests compare them, bit for bit, with the
straightforward versions (a sort per quantile, NaN-aware reductions) on random data
with the awkward cases: NaN gaps, ties, infinities, rows with few or no values, odd and
even counts, and histories as short as one hour.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from exporter.anomaly import baseline
from exporter import sketch
from exporter.storage.buckets import F, FIELDS, SKETCHES, TOKEN_FIELDS
from exporter.anomaly.history import QUANTILES, _sum_slots, _take_planes, _window_quantiles, token_sum
from exporter.anomaly.signals import DEFAULT_SIGNALS


def reference_quantiles(x: np.ndarray, qs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
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


def reference_last_valid(x: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(x)
    idx = x.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
    out = x[np.arange(x.shape[0]), idx]
    return np.where(valid.any(axis=1), out, np.nan)


def reference_stats(spec, history: np.ndarray) -> baseline.Stats:
    """The statistics as first written: four sorts per signal."""
    x = baseline.transform(history, spec)
    q, n = reference_quantiles(x, (0.25, 0.5, 0.75))
    q1, med, q3 = q[:, 0], q[:, 1], q[:, 2]
    mad = reference_quantiles(np.abs(x - med[:, None]), (0.5,))[0][:, 0] * baseline.MAD_SCALE
    floor = baseline.LOG_MAD_FLOOR if spec.log_space else np.maximum(spec.baseline_floor * 0.5, 0.1 * np.abs(med))
    d = np.diff(x, axis=1)
    dq, dn = reference_quantiles(d, (0.5,))
    dmed = dq[:, 0]
    dmad = reference_quantiles(np.abs(d - dmed[:, None]), (0.5,))[0][:, 0] * baseline.MAD_SCALE
    return baseline.Stats(n, q1, med, q3, np.fmax(mad, floor), dmed, np.fmax(dmad, baseline.LOG_MAD_FLOOR), dn,
                          reference_last_valid(x))


def random_history(rng: np.random.Generator, rows: int, hours: int) -> np.ndarray:
    """Log-normal hourly values of varied scale with gaps, leading NaN, exact ties and zeros."""
    scale = rng.lognormal(0, 2, (rows, 1))
    h = scale * rng.lognormal(0, rng.uniform(0.01, 1.5, (rows, 1)), (rows, hours))
    kind = rng.integers(0, 6, rows)
    h[kind == 1] = np.round(h[kind == 1], 1)                              # many ties
    h[kind == 2] = np.where(rng.random((int((kind == 2).sum()), hours)) < 0.5, 0.0, h[kind == 2])
    gaps = rng.random((rows, hours)) < rng.uniform(0, 0.6, (rows, 1))
    h[(kind >= 3)[:, None] & gaps] = np.nan
    start = rng.integers(0, hours + 1, rows)                              # before the scope existed
    h[(kind == 4)[:, None] & (np.arange(hours)[None, :] < start[:, None])] = np.nan
    h[kind == 5, ::2] = 1.0                                               # a constant half
    return h


def assert_stats_equal(got: baseline.Stats, want: baseline.Stats) -> None:
    for f in fields(baseline.Stats):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert np.array_equal(a, b, equal_nan=True), f.name
        assert np.array_equal(np.signbit(a), np.signbit(b)), f.name


@pytest.mark.parametrize("hours", [1, 2, 3, 6, 7, 24, 167, 168, 255, 256, 257, 336])
@pytest.mark.parametrize("spec", DEFAULT_SIGNALS, ids=lambda s: s.name)
def test_stats_equal_reference(spec, hours: int) -> None:
    rng = np.random.default_rng(hours * 31 + len(spec.name))
    history = random_history(rng, 300, hours)
    if spec.name == "error_rate":
        history = np.minimum(history / (1 + history), 1.0)
    before = history.copy()
    assert_stats_equal(baseline.baseline_stats(spec, history), reference_stats(spec, history))
    assert np.array_equal(history, before, equal_nan=True)                # the input is left alone


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("hours", [2, 7, 336])
def test_stats_equal_reference_with_infinities(hours: int) -> None:
    """A zero floor puts log(0) = -inf into log space; huge values overflow the deviations."""
    rng = np.random.default_rng(hours)
    spec = replace(DEFAULT_SIGNALS[0], baseline_floor=0.0)
    history = random_history(rng, 200, hours)
    history[::3] = np.where(rng.random((len(history[::3]), hours)) < 0.3, 0.0, history[::3])
    history[1::7, 0] = np.inf
    history[2::11] = rng.choice([1e-300, 1e300, np.nan, 1.0], (len(history[2::11]), hours))
    assert_stats_equal(baseline.baseline_stats(spec, history), reference_stats(spec, history))
    linear = next(s for s in DEFAULT_SIGNALS if not s.log_space)
    history[3::5] = rng.choice([-1.7e308, 1.7e308, 0.0, np.nan], (len(history[3::5]), hours))
    assert_stats_equal(baseline.baseline_stats(linear, history), reference_stats(linear, history))


@pytest.mark.parametrize("hours", [1, 2, 3, 4, 5, 8, 9, 40])
def test_mad_equals_reference_on_ties_and_skew(hours: int) -> None:
    """Small integers give runs of equal deviations on both sides of the median."""
    rng = np.random.default_rng(100 + hours)
    x = rng.integers(0, rng.integers(1, 6, (4000, 1)), (4000, hours)).astype(np.float64)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[::5] = x[::5] ** 3                                                  # skewed rows
    s, n = baseline.sorted_rows(x)
    for centre in (reference_quantiles(x, (0.5,))[0][:, 0], rng.integers(-2, 8, 4000).astype(np.float64)):
        want = reference_quantiles(np.abs(x - centre[:, None]), (0.5,))[0][:, 0]
        assert np.array_equal(baseline.sorted_abs_dev_median(s, n, centre), want, equal_nan=True)


def test_row_quantiles_equal_reference() -> None:
    rng = np.random.default_rng(3)
    for hours in (1, 5, 300):
        x = random_history(rng, 100, hours)
        for got, want in zip(baseline.row_quantiles(x, (0.1, 0.5, 0.95)), reference_quantiles(x, (0.1, 0.5, 0.95))):
            assert np.array_equal(got, want, equal_nan=True)


def test_take_planes_equals_fancy_indexing() -> None:
    rng = np.random.default_rng(4)
    ring = rng.normal(size=(300, 40, len(FIELDS)))
    slots = np.concatenate([np.arange(30, 40), np.arange(0, 17)])
    got = _take_planes(ring, slots, block_bytes=64 * len(slots) * len(FIELDS) * 8 + 5)
    assert got.shape == (300, len(slots), len(FIELDS))
    assert np.array_equal(got, ring[:, slots])
    assert got[..., F["cost"]].flags.c_contiguous
    small = _take_planes(ring, slots)                                     # one block: the ring's layout
    assert np.array_equal(small, ring[:, slots]) and small.flags.c_contiguous


def test_window_sums_and_quantiles_equal_sketch_quantile() -> None:
    rng = np.random.default_rng(5)
    ring = (rng.random((50, 14, len(SKETCHES), sketch.NBINS)) < 0.03) * rng.integers(0, 9, (50, 14, len(SKETCHES), sketch.NBINS))
    ring = ring.astype(np.int32)
    ring[7] = 0                                                           # an empty scope
    slots = np.array([13, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    sk = _sum_slots(ring, slots)
    want = np.zeros_like(sk)
    for s in slots:
        want += ring[:, s]
    assert np.array_equal(sk, want) and sk.dtype == np.int32
    assert not _sum_slots(ring, np.array([], dtype=np.int64)).any()
    qs = _window_quantiles(sk, sk.sum(axis=-1))
    for k, kind in enumerate(SKETCHES):
        assert np.array_equal(qs[kind], sketch.quantile(sk[:, k], QUANTILES[kind]), equal_nan=True)


def test_token_sum_equals_plain_sum() -> None:
    rng = np.random.default_rng(6)
    adds = rng.lognormal(5, 3, (100, 30, len(FIELDS))) * (rng.random((100, 30, len(FIELDS))) < 0.7)
    want = sum(adds[..., F[name]] for name in TOKEN_FIELDS)
    assert np.array_equal(token_sum(adds), want)
    assert np.array_equal(token_sum(adds[:, 0]), want[:, 0])
