"""The evaluator's fast helpers equal plain reference implementations.

- `baseline.nan_median` and `baseline.nan_quantile` sort once and index, where numpy's
  nanmedian / nanquantile take a slow path per row: they must give numpy's values (the
  'lower' method for the quantile), bit for bit, on random data with NaN gaps, ties,
  infinities and all-NaN rows, along any axis; rows longer than numpy's fast sort
  (`baseline.FAST_SORT`) too, which are sorted as two halves (`baseline.Ordered`), and
  every order statistic of such rows equals the whole row's sorted value.
- `ScopeHistory.recent_sums` (cumulative sums over the fine ring) must equal a direct sum
  of the ring's slots of each window, and of the records themselves.
- `ScopeHistory.recent_exceedances` keeps per-slot counts between evaluations: they must
  equal counting the coarse sketches (and the records) afresh, also after a counted slot
  receives more records, after slots are recycled, after new scopes appear, and after the
  thresholds change with a new version (all of them, or a few scopes' only).
- An open hour's quantiles (`_finalise_open`, all kinds in one pass) equal
  `sketch.quantile` of its sketches, NaN under MIN_SKETCH_COUNT samples.
- The history's block-wise gathers and slice sums (`_take_planes`, `_sum_slots`,
  `_window_quantiles`, `token_sum`) equal fancy indexing and plain sums; the window's
  slot-by-slot sums (`_sum_in_order`, `_sums_from_newest`) equal numpy's sum and
  cumulative sum of the gathered slots bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import DAY, HOUR, Harness, Stream, Traffic, generate

from exporter import sketch
from exporter.anomaly.baseline import FAST_SORT, Ordered, nan_median, nan_quantile
from exporter.storage.buckets import F, FIELDS, SKETCHES, TOKEN_FIELDS, record_values
from exporter.anomaly.history import (MIN_SKETCH_COUNT, QUANTILES, ScopeHistory, _sum_in_order, _sum_slots,
                                      _sums_from_newest, _take_planes, _window_quantiles, token_sum)


# --- NaN-aware median and quantile ---------------------------------------------------------------

def random_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Log-normal values of varied scale with NaN gaps, all-NaN and single-value rows, exact
    ties, zeros, negatives and infinities."""
    x = rng.lognormal(0, 2, shape) * rng.choice([-1.0, 1.0], shape, p=[0.1, 0.9])
    x[rng.random(shape) < rng.uniform(0, 0.7)] = np.nan
    flat = x.reshape(-1, shape[-1])
    flat[::7] = np.round(flat[::7])                     # ties
    flat[1::11] = np.nan                                # all-NaN rows
    flat[2::13, 1:] = np.nan                            # one value at most
    flat[3::17, ::3] = 0.0
    flat[4::19, 0] = np.inf
    flat[5::23, -1] = -np.inf
    return x


@pytest.mark.filterwarnings("ignore::RuntimeWarning")          # numpy warns about all-NaN slices
@pytest.mark.parametrize("shape,axis", [((300, 1), 1), ((300, 2), 1), ((300, 7), 1), ((300, 168), 1),
                                        ((168, 300), 0), ((7, 40, 24), 0), ((6, 40, 25), -1), ((5, 6, 7), 1),
                                        ((200, 256), 1), ((200, 257), 1), ((200, 336), 1), ((3, 512, 9), 1),
                                        ((100, 513), 1), ((300, 20, 300), 1)])
def test_nan_median_equals_numpy(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(sum(shape) + axis)
    x = random_values(rng, shape)
    before = x.copy()
    got, want = nan_median(x, axis=axis), np.nanmedian(x, axis=axis)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x, before)                    # the input is left alone


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("q", [0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0, 0.3333, 0.6180339887])
@pytest.mark.parametrize("shape,axis", [((300, 1), 1), ((300, 9), 1), ((300, 168), 1), ((168, 300), 0), ((7, 40, 24), 0),
                                        ((200, 257), 1), ((200, 336), 1), ((336, 100), 0)])
def test_nan_quantile_equals_numpy_lower(q: float, shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(int(q * 1000) + sum(shape))
    x = random_values(rng, shape)
    got, want = nan_quantile(x, q, axis=axis), np.nanquantile(x, q, axis=axis, method="lower")
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m", [2, 255, 256, 257, 300, 336, 512])
def test_order_statistics_of_halves_equal_a_full_sort(m: int) -> None:
    rng = np.random.default_rng(m)
    x = random_values(rng, (400, m))
    x[7] = 1.5                                                   # a row of one value
    x[8, : m // 2] = np.nan                                      # a half with nothing
    x[9, m // 2:] = np.nan
    o = Ordered(x)
    assert len(o.parts) == (2 if FAST_SORT < m <= 2 * FAST_SORT else 1)
    full = np.sort(x, axis=1)
    n = np.sum(~np.isnan(x), axis=1)
    np.testing.assert_array_equal(o.n, n)
    for k in range(m):
        rows = np.flatnonzero(k < n)
        np.testing.assert_array_equal(o.kth(np.full(400, k))[rows], full[rows, k])
    want = np.where(n >= 2, full[np.arange(400), np.maximum(n - 2, 0)], -np.inf)
    np.testing.assert_array_equal(o.second_highest(), want)


# --- the history's window reads --------------------------------------------------------------------

DAY0 = 1_800_000_000.0 - 1_800_000_000.0 % DAY
STREAMS = (Stream("chat", "gpt-4o-mini", rate=900, session=3), Stream("search", "gpt-4o-mini", rate=300),
           Stream("search", "claude-3-5-haiku", "anthropic", rate=300, ttft=0.5, otps=40),
           Stream("batch", "claude-3-5-haiku", "anthropic", rate=200, session=20, gap=2, ttft=None))


def scope_masks(traffic: Traffic, h: ScopeHistory) -> np.ndarray:
    """(S, records) which records each scope row of the history holds."""
    out = np.zeros((h.size, len(traffic)), dtype=bool)
    for i, (scope, app, provider, model) in enumerate(h.keys):
        if scope == "global":
            out[i] = True
        elif scope == "app":
            out[i] = traffic.app == app
        else:
            out[i] = (traffic.provider == provider) & (traffic.model == model)
    return out


def reference_sums(h: ScopeHistory, t: float, counts: list[int]) -> np.ndarray:
    """Sums of the fine ring's slots of each window, slot by slot."""
    hi = math.floor(t / h.fine)
    out = np.zeros((h.size, len(counts), len(FIELDS)))
    for j, k in enumerate(counts):
        for a in range(hi - k + 1, hi + 1):
            s = a % h.fine_ring.n
            if h.fine_ring.tag[s] == a:
                out[:, j] += h.fine_add[: h.size, s]
    return out


def test_recent_sums_equal_direct_sums() -> None:
    traffic = generate(STREAMS, DAY0, DAY0 + 3 * HOUR, seed=1)
    harness = Harness().feed(traffic)
    h = harness.history
    values = record_values(traffic.columns(), traffic.cost)
    masks = scope_masks(traffic, h)
    counts = [1, 5, 10, 15, 20, 30, 60]
    checked = 0
    for t in (DAY0 + 3 * HOUR - 0.5, DAY0 + 3 * HOUR - 61, DAY0 + 2.5 * HOUR + 7, DAY0 + 3 * HOUR + 600):
        got = h.recent_sums(t, counts)
        want = reference_sums(h, t, counts)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
        hi = math.floor(t / h.fine)
        for j, k in enumerate(counts):     # and the records themselves, where the ring still holds the minutes
            window = np.arange(hi - k + 1, hi + 1)
            if (h.fine_ring.tag[window % h.fine_ring.n] > window).any():
                continue
            slot = np.floor(traffic.ts / h.fine)
            inside = (slot >= hi - k + 1) & (slot <= hi)
            from_records = (masks & inside) @ values
            np.testing.assert_allclose(got[:, j], from_records, rtol=1e-9, atol=1e-9)
            checked += 1
    assert checked >= 3 * len(counts)
    assert h.recent_sums(DAY0 + 3 * HOUR - 0.5, [60])[:, 0, F["requests"]].min() > 0


def reference_exceedances(h: ScopeHistory, t: float, n_slots: int, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples at or above each kind's threshold bin and all samples, per coarse slot,
    counted from the sketches."""
    hi = math.floor(t / h.coarse)
    above = np.zeros((h.size, n_slots, len(SKETCHES)))
    total = np.zeros_like(above)
    for j, a in enumerate(range(hi - n_slots + 1, hi + 1)):
        s = a % h.coarse_ring.n
        if h.coarse_ring.tag[s] != a:
            continue
        for k in range(len(SKETCHES)):
            counts = h.coarse_sk[: h.size, s, k].astype(np.int64)
            total[:, j, k] = counts.sum(axis=1)
            for row in range(h.size):
                b = int(thresholds[row, k])
                above[row, j, k] = counts[row, max(b, 0):].sum() if b >= 0 else 0
    return above, total


def record_exceedances(traffic: Traffic, h: ScopeHistory, t: float, n_slots: int,
                       thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same counted from the records' own values (latency, TTFT, token speed, time per output token)."""
    cols = traffic.columns()
    bins = [sketch.bin_index(v) for v in (cols.latency, cols.ttft, cols.output_tokens_per_second, cols.ms_per_output_token)]
    masks = scope_masks(traffic, h)
    hi = math.floor(t / h.coarse)
    slot = np.floor(traffic.ts / h.coarse)
    above = np.zeros((h.size, n_slots, len(SKETCHES)))
    total = np.zeros_like(above)
    for j, a in enumerate(range(hi - n_slots + 1, hi + 1)):
        here = masks & (slot == a)
        for k, b in enumerate(bins):
            total[:, j, k] = (here & (b >= 0)).sum(axis=1)
            thr = thresholds[:, k][:, None]
            above[:, j, k] = (here & (b >= 0) & (thr >= 0) & (b >= thr)).sum(axis=1)
    return above, total


def random_thresholds(rng: np.random.Generator, h: ScopeHistory) -> np.ndarray:
    """A bin per scope and kind around the data's quantiles, with -1 (none), 0 and bins
    past the last one mixed in."""
    thr = rng.integers(sketch.bin_index(np.array([0.2]))[0], sketch.bin_index(np.array([100.0]))[0], (h.size, len(SKETCHES)))
    thr[0, 0], thr[1 % h.size, 1] = -1, 0
    thr[-1, 2] = sketch.NBINS + 3
    return thr


def test_recent_exceedances_equal_counts_from_the_sketches() -> None:
    rng = np.random.default_rng(7)
    traffic = generate(STREAMS, DAY0, DAY0 + 4 * HOUR, seed=2)
    harness = Harness()
    h = harness.history
    fed = DAY0 + 2 * HOUR
    harness.feed(traffic.take(traffic.ts < fed))
    thresholds, version = random_thresholds(rng, h), 1
    n_slots = 12

    def check(t: float) -> None:
        above, total, absolute = h.recent_exceedances(t, n_slots, thresholds, version)
        assert np.array_equal(absolute, np.arange(math.floor(t / h.coarse) - n_slots + 1, math.floor(t / h.coarse) + 1))
        want_above, want_total = reference_exceedances(h, t, n_slots, thresholds)
        np.testing.assert_array_equal(above, want_above)
        np.testing.assert_array_equal(total, want_total)
        # the sketches hold the records' values: the same counts from the records
        rec_above, rec_total = record_exceedances(traffic.take(traffic.ts < fed), h, t, n_slots, thresholds)
        np.testing.assert_array_equal(above, rec_above)
        np.testing.assert_array_equal(total, rec_total)

    check(fed - 1)
    assert h.recent_exceedances(fed - 1, n_slots, thresholds, version)[1].sum() > 1000
    # more records land in slots already counted (the newest one still filling)
    harness.feed(traffic.between(fed, fed + 150))
    fed += 150
    check(fed - 1)
    # the ring moves on by 40 minutes: slots are recycled for newer ones
    harness.feed(traffic.between(fed, fed + 2400))
    fed += 2400
    check(fed - 1)
    # a new app on a new model: new scope rows
    newcomer = generate([Stream("fresh", "mistral-small", "mistral", rate=600)], fed, fed + 600, seed=3)
    traffic = Traffic.concat([traffic, newcomer])
    harness.feed(traffic.between(fed, fed + 600))
    fed += 600
    thresholds = np.vstack([thresholds, random_thresholds(rng, h)[: h.size - thresholds.shape[0]]])
    check(fed - 1)
    # new thresholds: a new version counts every slot again
    thresholds, version = random_thresholds(rng, h), 2
    check(fed - 1)
    check(fed - 301)                                        # an earlier time, slots already counted
    # a new version that moves some scopes' thresholds only, as an hour turn does: those
    # scopes are counted again, the others keep their counts
    thresholds = thresholds.copy()
    thresholds[::3, 0] += 1
    thresholds[1::4, 2] = np.maximum(thresholds[1::4, 2] - 2, -1)
    version = 3
    check(fed - 1)
    check(fed - 301)
    thresholds, version = thresholds.copy(), 4              # a new version, the same thresholds
    check(fed - 1)
    # the cached path gives what a history that never counted before gives
    fresh = Harness().feed(traffic.take(traffic.ts < fed)).history
    a1, t1, _ = h.recent_exceedances(fed - 1, n_slots, thresholds, version)
    a2, t2, _ = fresh.recent_exceedances(fed - 1, n_slots, thresholds, version)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(t1, t2)


# --- gathers and sums kept from the earlier history layout ---------------------------------------

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


@pytest.mark.parametrize("n_slots,start", [(60, 10), (60, 0), (5, 62), (1, 3)])
def test_window_sums_equal_numpy_sums_of_the_gathered_slots(n_slots: int, start: int) -> None:
    """`_sum_in_order` and `_sums_from_newest` add slot by slot: the same values, bit for
    bit, as numpy's sum and cumulative sum of the gathered slots, wrap-around and slots the
    ring no longer holds included."""
    rng = np.random.default_rng(n_slots + start)
    ring = rng.normal(size=(40, 64, len(FIELDS))) * rng.lognormal(0, 3, (40, 64, len(FIELDS)))
    slots = (np.arange(n_slots) + start) % 64
    ok = rng.random(n_slots) < 0.8
    assert np.array_equal(_sum_in_order(ring, slots[ok]), np.take(ring, slots[ok], axis=1).sum(axis=1))
    counts = sorted({1, max(n_slots // 2, 1), n_slots}) + [n_slots]          # a length asked for twice
    data = np.take(ring, slots, axis=1)
    data[:, ~ok] = 0.0
    want = np.cumsum(data[:, ::-1], axis=1)[:, np.asarray(counts) - 1]
    assert np.array_equal(_sums_from_newest(ring, slots, ok, counts), want)


def test_token_sum_equals_plain_sum() -> None:
    rng = np.random.default_rng(6)
    adds = rng.lognormal(5, 3, (100, 30, len(FIELDS))) * (rng.random((100, 30, len(FIELDS))) < 0.7)
    want = sum(adds[..., F[name]] for name in TOKEN_FIELDS)
    assert np.array_equal(token_sum(adds), want)
    assert np.array_equal(token_sum(adds[:, 0]), want[:, 0])


def test_open_hour_quantiles_equal_sketch_quantile() -> None:
    traffic = generate(STREAMS + (Stream("rare", "gpt-4o", rate=3),), DAY0, DAY0 + 3 * HOUR, seed=4)
    h = Harness().feed(traffic).history
    n = h.size
    checked = 0
    for s in range(h.open.n):
        hour = int(h.open.tag[s])
        if hour < 0 or h.hours.tag[hour % h.hours.n] != hour:
            continue
        h._finalise_open(s)
        for k, kind in enumerate(SKETCHES):
            counts = h.open_sk[:n, s, k].astype(np.int64)
            want = np.where(counts.sum(axis=1) >= MIN_SKETCH_COUNT, sketch.quantile(counts, QUANTILES[kind]), np.nan)
            np.testing.assert_array_equal(h.hour_q[:n, hour % h.hours.n, k], want)
            checked += int(np.isfinite(want).sum())
        few = h.open_sk[:n, s].sum(axis=-1) < MIN_SKETCH_COUNT
        assert few.any() and np.isnan(h.hour_q[:n, hour % h.hours.n][few]).all()
    assert checked > 20
