"""The baseline statistics the evaluator rebuilds when the hour turns equal a plain reference.

The fast path sorts each row once and reads several order statistics from it, gathers the
baseline hours once and keeps them for the next hour (`ScopeHistory.baseline_hours`),
masks only the cells it must, and sums short blocks column by column. The reference here
does what the statistics say in the plainest numpy: np.nanmedian, np.nanquantile ('lower'),
np.partition, a fresh gather of the rings with whole-array masks, numpy's own block sums.
They must agree bit for bit:

- the pure functions, on random data with NaN gaps, all-NaN rows and rows of one value;
- the whole `Baseline`, in live operation: ragged history (scopes that start days apart, a
  quiet scope whose hours mostly hold too few requests for a mean or a quantile), hour
  after hour (the gathered hours reused), with records arriving late into baseline hours,
  a scope appearing mid-run, a baseline longer than the ring's horizon (hours the ring no
  longer holds) and one longer than 256 hours; and the baseline's request counts, read from
  the gathered hours, equal a plain sum of the ring.
"""

from __future__ import annotations

import warnings
from statistics import NormalDist

import numpy as np
import pytest
from helpers import DAY, HOUR, Harness, Stream, Traffic, generate

from exporter.anomaly import baseline as bl
from exporter.anomaly.baseline import BLOCK_SLOTS
from exporter.evidence import binomial_z
from exporter.anomaly.evaluator import (LOG_FLOOR, SUSTAINED_HOURS, WINDOW_FRACTIONS, Baseline, Evaluator, KINDS,
                                        MIN_QUANTILE_HOURS, SIZE_FIELDS)
from exporter.anomaly.history import SIZE_KINDS, ScopeHistory, _GatheredHours, token_sum
from exporter.storage.buckets import F


def nanmedian(x: np.ndarray, axis: int = 1) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)         # all-NaN rows
        return np.nanmedian(x, axis=axis)


def nanquantile(x: np.ndarray, q: float, axis: int = 1) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(x, q, axis=axis, method="lower")


# --- plain references of the statistics ------------------------------------------------------

def ref_daily_profile(values: np.ndarray, hours: np.ndarray) -> np.ndarray:
    s, h = values.shape
    out = np.full((s, 24), np.nan)
    grid = np.full((s, 24, -(-h // 24)), np.nan)
    grid[:, hours % 24, np.arange(h) // 24] = values
    enough = np.sum(~np.isnan(grid), axis=2) >= bl.MIN_DAYS
    out[enough] = nanmedian(grid, axis=2)[enough]
    young = np.flatnonzero(~enough.all(axis=1))
    if young.size:
        recent = values[young, -24:]
        known = np.sum(~np.isnan(recent), axis=1) >= bl.MIN_HOURS
        out[young] = np.where(known, nanmedian(recent), np.nan)[:, None]
    return out


def ref_weekly_profile(daily: np.ndarray, values: np.ndarray, hours: np.ndarray, floor: float,
                       sampling: np.ndarray | float = 0.0) -> np.ndarray:
    """Each quarter day of the week, one at a time: its two latest occurrences in `hours`
    that are at least half inside them, their log ratios where half their hours are known,
    the noise from the median difference between the two weeks, and the mean of two ratios
    that agree beyond it (the smaller where they differ by more than the noise)."""
    s = daily.shape[0]
    out = np.full((s, bl.WEEK_HOURS), np.nan)
    for i in range(bl.WEEK_HOURS):
        out[:, i] = daily[:, i % 24]
    by_block: dict[int, list[int]] = {}
    for j, hour in enumerate(hours.tolist()):
        by_block.setdefault(hour // bl.WEEK_BLOCK_HOURS, []).append(j)
    shifts = np.full((s, bl.WEEK_BLOCKS, 2), np.nan)
    totals = np.full((s, bl.WEEK_BLOCKS), np.nan)
    per = np.broadcast_to(np.asarray(sampling, dtype=np.float64), (s,))
    for b in range(bl.WEEK_BLOCKS):
        occurrences = [cols for blk, cols in sorted(by_block.items())
                       if blk % bl.WEEK_BLOCKS == b and 2 * len(cols) >= bl.WEEK_BLOCK_HOURS][-2:]
        if len(occurrences) < 2:
            continue
        for r in range(s):
            for w, cols in enumerate(occurrences):
                pairs = [(values[r, j], daily[r, hours[j] % 24]) for j in cols
                         if not np.isnan(values[r, j]) and not np.isnan(daily[r, hours[j] % 24])]
                if 2 * len(pairs) >= bl.WEEK_BLOCK_HOURS:
                    ratio = (sum(v for v, _ in pairs) + floor * len(pairs)) / (sum(e for _, e in pairs) + floor * len(pairs))
                    shifts[r, b, w] = np.log(np.array([ratio]))[0]       # numpy's array loop, as the fast path
                if w == 1:
                    totals[r, b] = sum(e for _, e in pairs) + floor * len(pairs)
    for r in range(s):
        apart = [abs(x - y) for x, y in shifts[r] if not np.isnan(x) and not np.isnan(y)]
        if 2 * len(apart) < bl.WEEK_BLOCKS:
            continue
        median_noise = float(np.median(apart)) / (bl.Q50_ABS_NORMAL * np.sqrt(2.0))
        for b, (x, y) in enumerate(shifts[r]):
            noise = max(median_noise, float(np.sqrt(np.array([per[r] / totals[r, b]]))[0]))
            if x * y > 0 and abs(x) > bl.WEEK_PATTERN_Z * noise and abs(y) > bl.WEEK_PATTERN_Z * noise:
                alike = abs(x - y) <= bl.WEEK_PATTERN_Z * np.sqrt(2.0) * noise
                shift = (x + y) / 2.0 if alike else np.sign(x) * min(abs(x), abs(y))
                for i in range(b * bl.WEEK_BLOCK_HOURS, (b + 1) * bl.WEEK_BLOCK_HOURS):
                    out[r, i] = daily[r, i % 24] * np.exp(np.array([shift]))[0]
    return out


def ref_against_last_week(profile: np.ndarray, first_hour: np.ndarray, short_horizon: bool, values: np.ndarray,
                          hours: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """Each judged hour of each scope, one at a time: where it is less than two weeks after
    the scope's first hour (or the horizon cannot hold two weeks), the smaller of the profile
    and the same hour a week back (unknown: NaN)."""
    out = profile.copy()
    at = {int(h): j for j, h in enumerate(hours.tolist())}
    for r in range(profile.shape[0]):
        for hour in judged.tolist():
            if not short_horizon and first_hour[r] <= hour - 2 * bl.WEEK_HOURS:
                continue
            j = at.get(hour - bl.WEEK_HOURS)
            last = values[r, j] if j is not None else np.nan
            slot = hour % bl.WEEK_HOURS
            out[r, slot] = np.nan if np.isnan(last) else min(profile[r, slot], last)
    return out


def ref_level_spread(values: np.ndarray, expected: np.ndarray, sampling: np.ndarray | float,
                     floor: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.log((values + floor) / (expected + floor))
    excess = np.where(np.isnan(expected) | np.isnan(values), np.nan, r * r - sampling)
    q = nanquantile(excess, 0.75)
    return np.sqrt(np.maximum(np.nan_to_num(q / bl.CHI2_1_Q75, nan=0.0), bl.MIN_LEVEL_SD ** 2))


def ref_block_spread(observed: np.ndarray, expected: np.ndarray, hours: int) -> np.ndarray:
    s, h = observed.shape
    n = h // hours
    if n == 0:
        return np.full(s, np.nan)
    o = observed[:, h - n * hours:].reshape(s, n, hours).sum(axis=2)
    e = expected[:, h - n * hours:].reshape(s, n, hours).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.log((o + 0.5) / (e + 0.5))
    out = nanquantile(np.abs(r), 0.75) / bl.Q75_ABS_NORMAL
    return np.where(np.sum(~np.isnan(r), axis=1) >= bl.MIN_BLOCKS, np.maximum(out, bl.MIN_LEVEL_SD), np.nan)


def ref_burstiness(requests: np.ndarray, burst: np.ndarray, slots_per_hour: int) -> np.ndarray:
    total, sq = burst[..., 0], burst[..., 1]
    whole = (np.abs(total - requests) <= 0.01 * requests + 0.5) & (requests >= slots_per_hour)
    mean = total / slots_per_hour
    with np.errstate(invalid="ignore", divide="ignore"):
        disp = np.where(whole, (sq / slots_per_hour - mean * mean) / mean, np.nan)
    q = nanquantile(disp, 0.75)
    return np.maximum(np.where(np.sum(~np.isnan(disp), axis=1) >= bl.MIN_HOURS, q, bl.PRIOR_BURSTINESS), 1.0)


def ref_window_dispersion(disp: np.ndarray, requests: np.ndarray, expected: np.ndarray, level_sd: np.ndarray,
                          blocks: np.ndarray, per_hour: int, windows: list[int]) -> np.ndarray:
    """Scope by scope and window by window: the slot's dispersion times the variance of the
    ordinary whole hours' blocks of the longest measured length within the window, over
    that length times the variance of their slots (both about the hours' lines, pooled),
    at least 1 and at least a shorter length's."""
    out = np.ones((requests.shape[0], len(windows)))
    for i in range(requests.shape[0]):
        whole = [j for j in range(requests.shape[1])
                 if abs(blocks[i, j, 0] - requests[i, j]) <= 0.5 and requests[i, j] >= per_hour
                 and np.isfinite(expected[i, j])
                 and not abs(np.log((requests[i, j] + 0.5) / (expected[i, j] + 0.5)))
                 > 3.0 * np.sqrt(level_sd[i] ** 2 + disp[i] / max(expected[i, j], 0.5))]
        factor = {1: 1.0}
        if len(whole) >= bl.MIN_HOURS:
            held = np.zeros(requests.shape[1], dtype=bool)
            held[whole] = True
            # numpy's pairwise sum over the row, as the evaluator adds
            pooled = [float(np.sum(np.where(held, blocks[i, :, c], 0.0))) for c in range(blocks.shape[2])]
            slot_var = pooled[1] / (per_hour - 2)
            for c, k in enumerate(BLOCK_SLOTS[1:], start=1):
                if per_hour // k >= bl.MIN_BLOCKS_PER_HOUR and slot_var > 0:
                    factor[k] = pooled[1 + c] / (per_hour // k - 2) / (k * slot_var)
        for w, length in enumerate(windows):
            out[i, w] = disp[i] * max(1.0, *(f for k, f in factor.items() if k <= length))
    return out


def ref_size_stats(count: np.ndarray, total: np.ndarray, total_sq: np.ndarray, windows: np.ndarray) -> bl.SizeStats:
    ok = count >= 5
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, total / count, np.nan)
        var = np.where(ok, (total_sq - total * total / count) / np.maximum(count - 1, 1), np.nan)
    centre = nanmedian(mean)
    v = np.maximum(nanmedian(var), bl.MIN_SIZE_SD ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (mean - centre[:, None]) / np.sqrt(v[:, None] / np.maximum(count, 1))
    dev = np.abs(u - nanmedian(u)[:, None])
    mad, tail = nanmedian(dev) * bl.MAD_SCALE, nanquantile(dev, 0.9) / bl.TAIL_90_HALF_NORMAL
    hours = np.sum(ok, axis=1)
    disp = np.maximum(np.nan_to_num(np.fmax(mad, tail) ** 2, nan=1.0), 1.0)
    highest = np.where(ok, mean, -np.inf)
    seen = np.partition(highest, -2, axis=1)[:, -2] if count.shape[1] >= 2 else np.full(len(count), -np.inf)
    st = bl.SizeStats(np.where(hours >= bl.MIN_HOURS, centre, np.nan), v, disp, hours, seen)
    tau2, var_w = bl.window_stats(windows, centre)
    vw, some = var_w[:, 0], count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dev2 = np.where(some, (total / count - centre[:, None]) ** 2 - vw[:, None] / count, 0.0)
        hour_tau2 = np.maximum(dev2.sum(axis=1) / some.sum(axis=1), 0.0)
    st.spread = np.concatenate([tau2, np.where(hours >= bl.MIN_HOURS, hour_tau2, np.nan)[:, None]], axis=1)
    st.within = vw
    st.between, st.sessions = np.full(len(count), np.nan), np.full(len(count), np.nan)
    for i in range(len(count)):
        # weighted least squares of the hours' excess on 1 / n; a negative coefficient is 0
        use = some[i]
        if hours[i] < bl.MIN_HOURS or not use.any() or not np.isfinite(vw[i] + hour_tau2[i]):
            continue
        x, e = 1.0 / count[i, use], dev2[i, use]
        w = 1.0 / (hour_tau2[i] + vw[i] * x) ** 2
        design = np.stack([np.ones_like(x), x], axis=1) * np.sqrt(w)[:, None]
        a, b = np.linalg.lstsq(design, e * np.sqrt(w), rcond=None)[0] if np.ptp(x) > 0 else (0.0, 0.0)
        if not b > 0:
            a, b = max(float(np.sum(w * e) / np.sum(w)), 0.0), 0.0
        elif a < 0:
            a, b = 0.0, max(float(np.sum(w * x * e) / np.sum(w * x * x)), 0.0)
        st.between[i], st.sessions[i] = a, b
    return st


def ref_error_stats(requests: np.ndarray, errors: np.ndarray) -> bl.ErrorStats:
    """Row by row: the pooled statistics, again without the storm hours where there are
    some and they are under a quarter of the hours with requests."""
    first = ref_pooled_error_stats(requests, errors)
    ratio, disp = first.ratio.copy(), first.dispersion.copy()
    limit = NormalDist().inv_cdf(1.0 - bl.STORM_HOUR_CHANCE / max(requests.shape[1], 1))
    for i in range(requests.shape[0]):
        n, e = np.nan_to_num(requests[i]), np.nan_to_num(errors[i])
        p = first.ratio[i]
        terms = [(e[h] - n[h] * p) ** 2 / (n[h] * p * (1 - p)) for h in range(n.size) if n[h] >= 10]
        robust = max(float(np.median(terms)) / bl.CHI2_1_MEDIAN, 1.0) if terms else 1.0
        storm = [h for h in range(n.size) if n[h] > 0 and float(binomial_z(e[h], n[h], p, robust)) > limit]
        if storm and len(storm) < 0.25 * int((n > 0).sum()):
            r, x = requests[i:i + 1].copy(), errors[i:i + 1].copy()
            r[0, storm], x[0, storm] = np.nan, np.nan
            again = ref_pooled_error_stats(r, x)
            ratio[i], disp[i] = again.ratio[0], again.dispersion[0]
    return bl.ErrorStats(ratio, disp)


def ref_pooled_error_stats(requests: np.ndarray, errors: np.ndarray) -> bl.ErrorStats:
    p = (np.nansum(errors, axis=1) + 0.5) / (np.nansum(requests, axis=1) + 50.0)
    used = requests >= 10
    var = np.where(used, requests * p[:, None] * (1 - p[:, None]), np.nan)
    sq = np.where(used, (errors - requests * p[:, None]) ** 2, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        median = nanmedian(sq / var) / bl.CHI2_1_MEDIAN
        pooled = np.nansum(sq, axis=1) / np.nansum(var, axis=1)
    return bl.ErrorStats(p, np.maximum(np.nan_to_num(np.fmin(median, pooled), nan=1.0), 1.0))


def reference_baseline(h: ScopeHistory, end: int, count: int) -> dict[str, np.ndarray]:
    """Every statistic of `Evaluator._baseline_at(end)`, from a plain gather of the rings."""
    n = h.size
    hours = np.arange(end - count, end)
    slot, ok = h.hours.slots_for(hours)
    adds, q = h.hour_add[:n][:, slot].copy(), h.hour_q[:n][:, slot].copy()
    burst, slots = h.hour_burst[:n][:, slot].copy(), h.hour_slots[:n][:, slot].copy()
    blocks = h.hour_blocks[:n][:, slot].copy()
    adds[:, ~ok], q[:, ~ok], burst[:, ~ok], slots[:, ~ok], blocks[:, ~ok] = 0.0, np.nan, 0.0, 0.0, 0.0
    unknown = ~ok[None, :] | (hours[None, :] < h.first_hour[:n, None])
    held = np.where(~unknown[..., None], adds, 0.0)
    req, cost, tokens = (np.where(unknown, np.nan, a) for a in (adds[..., F["requests"]], adds[..., F["cost"]], token_sum(adds)))
    disp = ref_burstiness(np.nan_to_num(req), burst, round(3600 / h.coarse))
    slots = np.where(unknown[..., None, None, None], 0.0, slots)
    stats = {}
    for kind in ("tokens", "cost"):
        c, s1, s2 = SIZE_FIELDS[kind]
        stats[kind] = ref_size_stats(held[..., F[c]], held[..., F[s1]], held[..., F[s2]],
                                     slots[..., SIZE_KINDS.index(kind), :])
    hod = hours % bl.WEEK_HOURS
    weeks = np.arange(end - 2 * bl.WEEK_HOURS, end)
    w_slot, w_ok = h.hours.slots_for(weeks)
    w_adds = h.hour_add[:n][:, w_slot].copy()
    w_unknown = ~w_ok[None, :] | (weeks[None, :] < h.first_hour[:n, None])
    week_values = [np.where(w_unknown, np.nan, a) for a in (w_adds[..., F["requests"]], w_adds[..., F["cost"]],
                                                            token_sum(w_adds))]
    out: dict[str, np.ndarray] = {}
    judged = (("requests", req, 0.5, 1.0),
              ("cost", cost, LOG_FLOOR["cost_per_hour"], bl.sum_spread(stats["cost"])),
              ("tokens", tokens, LOG_FLOOR["token_velocity"] * 60, bl.sum_spread(stats["tokens"])))
    profiles = [ref_weekly_profile(ref_daily_profile(values, hours), week, weeks, floor, np.asarray(per) * disp)
                for (_, values, floor, per), week in zip(judged, week_values)]
    req_profile = profiles[0]
    out["request_falls.profile"] = ref_against_last_week(
        req_profile, h.first_hour[:n], h.hours.n - 2 < 2 * bl.WEEK_HOURS, week_values[0], weeks,
        np.arange(end - max(SUSTAINED_HOURS), end + 3))
    for (name, values, floor, per), profile in zip(judged, profiles):
        with np.errstate(invalid="ignore", divide="ignore"):
            sampling = np.asarray(per)[..., None] * disp[:, None] / np.maximum(req_profile[:, hod], 0.5)
        out[f"{name}.profile"] = profile
        out[f"{name}.level_sd"] = ref_level_spread(values, profile[:, hod], sampling, floor)
        out[f"{name}.level_df"] = bl.TAIL_SCALE_DF_PER_VALUE * np.sum(~np.isnan(values) & ~np.isnan(profile[:, hod]),
                                                                      axis=1)
    out["burstiness"] = disp
    windows = [max(1, round(f * h.window / h.coarse)) for f in WINDOW_FRACTIONS]
    out["window_burstiness"] = ref_window_dispersion(disp, np.nan_to_num(req), req_profile[:, hod],
                                                     out["requests.level_sd"], blocks, h.slots_per_hour, windows)
    for attr, kind in (("sizes", "tokens"), ("costs", "cost")):
        for f in ("centre", "var", "dispersion", "hours", "seen", "spread", "within"):
            out[f"{attr}.{f}"] = getattr(stats[kind], f)
    errors = ref_error_stats(held[..., F["requests"]], held[..., F["errors"]])
    out["errors.ratio"], out["errors.dispersion"] = errors.ratio, errors.dispersion
    requests = held[..., F["requests"]].sum(axis=1)
    for field in ("costed_requests", "sized_requests"):
        out[f"spending_share.{field}"] = np.ones(n)
        for i in range(n):
            if requests[i] > 0:
                out[f"spending_share.{field}"][i] = held[i, :, F[field]].sum() / requests[i]
    qs = np.where(unknown[..., None], np.nan, q)
    for k, kind in enumerate(KINDS):
        out[f"quantile.{kind}"] = nanmedian(qs[..., k])
    bins = np.stack([Evaluator._threshold_bin(out[f"quantile.{kind}"], kind) for kind in KINDS], axis=1)
    out["threshold_bins"] = np.where(np.isfinite(qs).sum(axis=1) >= MIN_QUANTILE_HOURS, bins, -1)   # a day of hours
    prev = None
    for k in SUSTAINED_HOURS:                         # each length at least the shorter one's, scaled
        sd = ref_block_spread(np.nan_to_num(req), np.nan_to_num(req_profile[:, hod]), k)
        out[f"sustained.{k}"] = sd if prev is None else np.where(np.isnan(sd), sd, np.fmax(sd, prev[1] * np.sqrt(prev[0] / k)))
        prev = (k, out[f"sustained.{k}"])
    return out


def flatten(b: Baseline) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in ("requests", "cost", "tokens"):
        s = getattr(b, name)
        out[f"{name}.profile"], out[f"{name}.level_sd"], out[f"{name}.level_df"] = s.profile, s.level_sd, s.level_df
    out["request_falls.profile"] = b.request_falls.profile
    out["burstiness"] = b.burstiness
    out["window_burstiness"] = b.window_burstiness
    for attr in ("sizes", "costs"):
        st = getattr(b, attr)
        for f in ("centre", "var", "dispersion", "hours", "seen", "spread", "within"):
            out[f"{attr}.{f}"] = getattr(st, f)
    out["errors.ratio"], out["errors.dispersion"] = b.errors.ratio, b.errors.dispersion
    for field, share in b.spending_share.items():
        out[f"spending_share.{field}"] = share
    for kind in KINDS:
        out[f"quantile.{kind}"] = b.quantile[kind]
    out["threshold_bins"] = b.threshold_bins
    for k in SUSTAINED_HOURS:
        out[f"sustained.{k}"] = b.sustained[k].count_sd
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], where: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, f"{where}: {key}"
        assert np.array_equal(got[key], want[key], equal_nan=True), f"{where}: {key} differs"


# --- the pure functions on random data ----------------------------------------------------------


def ragged(rng: np.random.Generator, shape: tuple[int, int], scale: float = 40.0) -> np.ndarray:
    """Counts with NaN before each row's first hour (rows start at random hours, some never,
    some in the last hour) and NaN gaps."""
    x = rng.poisson(scale * rng.lognormal(0, 1, (shape[0], 1)), shape).astype(np.float64)
    start = rng.integers(0, shape[1] + 1, shape[0])
    start[:5] = [0, 0, shape[1], shape[1] - 1, shape[1] - 30]
    x[np.arange(shape[1])[None, :] < start[:, None]] = np.nan
    x[rng.random(shape) < 0.05] = np.nan
    return x


@pytest.mark.parametrize("h", [1, 23, 24, 71, 168, 200, 300, 336])
def test_profiles_and_spreads_equal_the_reference(h: int) -> None:
    rng = np.random.default_rng(h)
    hours = np.arange(500_000 - h, 500_000) + rng.integers(0, 24)
    values = ragged(rng, (120, h))
    expected = bl.daily_profile(values, hours)
    np.testing.assert_array_equal(expected, ref_daily_profile(values, hours))
    for floor in (0.5, 0.01):
        for per in (0.0, rng.lognormal(0, 1, 120)):
            np.testing.assert_array_equal(bl.weekly_profile(expected, values, hours, floor, per),
                                          ref_weekly_profile(expected, values, hours, floor, per))
    sampling = rng.lognormal(-3, 1, (120, h))
    sampling[rng.random(sampling.shape) < 0.02] = np.nan
    for floor in (0.5, 0.01):
        np.testing.assert_array_equal(bl.level_spread(values, expected[:, hours % 24], sampling, floor),
                                      ref_level_spread(values, expected[:, hours % 24], sampling, floor))
    obs, exp = np.nan_to_num(values), np.nan_to_num(expected[:, hours % 24])
    for k in SUSTAINED_HOURS:
        np.testing.assert_array_equal(bl.block_spread(obs, exp, k), ref_block_spread(obs, exp, k))
    burst = np.stack([obs, obs * obs * rng.uniform(0.05, 0.5, obs.shape)], axis=-1)
    burst[rng.random(obs.shape) < 0.1] = 0.0                         # hours not seen whole
    np.testing.assert_array_equal(bl.burstiness(obs, burst, 12), ref_burstiness(obs, burst, 12))


def test_block_sums_add_in_order() -> None:
    """Column by column in order: exact for the counts and half counts `block_spread` gets,
    and within float rounding of numpy's own sum for any values."""
    rng = np.random.default_rng(3)
    halves = rng.integers(0, 10**6, (50, 336)) / 2.0
    anything = rng.lognormal(0, 3, (50, 336))
    for k in (1, 2, 3, 4, 8, 12):
        np.testing.assert_array_equal(bl._block_sums(halves, k), halves.reshape(50, -1, k).sum(axis=2))
        np.testing.assert_allclose(bl._block_sums(anything, k), anything.reshape(50, -1, k).sum(axis=2), rtol=1e-14)


@pytest.mark.parametrize("h", [1, 2, 7, 168, 300, 336])
def test_size_and_error_stats_equal_the_reference(h: int) -> None:
    rng = np.random.default_rng(100 + h)
    count = np.nan_to_num(ragged(rng, (150, h), scale=8.0))       # many hours under 5 requests
    count[::9] = 0.0
    mean = rng.normal(6.0, 0.3, (150, 1)) + rng.normal(0, 0.2, (150, h))
    total = count * mean
    total_sq = count * (mean * mean + rng.lognormal(-1, 0.3, (150, h)))
    windows = np.zeros((150, h, 1, len(bl.WINDOW_STATS)))
    m = rng.poisson(12, (150, h)) * (count > 0)
    windows[..., 0, 0] = m
    windows[..., 0, 1] = m * 6.0 + rng.normal(0, 1, (150, h))
    windows[..., 0, 2] = m * 36.0 + rng.normal(0, 6, (150, h))
    windows[..., 0, 3] = rng.lognormal(0, 1, (150, h)) * (m > 0)
    windows[..., 0, 4] = np.maximum(count - m, 0)
    windows[..., 0, 5] = m / np.maximum(count, 1)
    got, want = bl.size_stats(count, total, total_sq, windows), ref_size_stats(count, total, total_sq, windows)
    for f in ("centre", "var", "dispersion", "hours", "seen", "spread", "within"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    for f in ("between", "sessions"):
        np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-6, atol=1e-12, err_msg=f)
    if h >= 168:
        assert np.nanmax(got.sessions) > 0 and np.nanmax(got.between) > 0   # both readings occur
    errors = rng.binomial(count.astype(np.int64), 0.03).astype(np.float64)
    storms = (rng.random((150, h)) < 0.03) | ((np.arange(150) % 17 == 0)[:, None] & (rng.random((150, h)) < 0.4))
    errors = np.where(storms, np.ceil(count * 0.5), errors)      # earlier storms; a few rows with storms every other hour
    e_got, e_want = bl.error_stats(count, errors), ref_error_stats(count, errors)
    np.testing.assert_array_equal(e_got.ratio, e_want.ratio)
    np.testing.assert_array_equal(e_got.dispersion, e_want.dispersion)


# --- the whole baseline in live operation -------------------------------------------------------

STREAMS = (Stream("chat", "gpt-4o-mini", rate=600, session=3),
           Stream("search", "claude-3-5-haiku", "anthropic", rate=200, ttft=None),
           Stream("quiet", "gpt-4o", rate=4, session=2),                  # most hours: too few for a mean
           Stream("batch", "claude-3-5-haiku", "anthropic", rate=150, session=20, gap=2))


@pytest.mark.parametrize("baseline_days,horizon_days,days,slack", [(4, 14, 6, 24), (4, 14, 6, 1), (6, 5, 8, 2),
                                                                  (11, 14, 12, 24)])
def test_baseline_equals_the_reference_hour_after_hour(baseline_days: float, horizon_days: float, days: float,
                                                       slack: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Live: feed, evaluate every 20 minutes over five hour turns, and compare the
    evaluator's baseline with the reference's at every evaluation; then at earlier times
    (a backtest going back). With little slack the gathered hours are moved back to the start
    of their columns every hour or two, and forward again for the earlier times."""
    monkeypatch.setattr(_GatheredHours, "SLACK", slack)
    start = 1_800_000_000.0 - 1_800_000_000.0 % DAY
    end = start + days * DAY
    traffic = generate(STREAMS, start, end, seed=int(baseline_days))
    young = generate([Stream("fresh", "mistral-small", "mistral", rate=300)], end - 2 * DAY, end + 6 * HOUR, seed=9)
    late = generate([Stream("chat", "gpt-4o-mini", rate=900)], end - 30 * HOUR, end - 29 * HOUR, seed=11)
    newcomer = generate([Stream("newcomer", "o4-mini", rate=400)], end + 2 * HOUR, end + 6 * HOUR, seed=12)
    harness = Harness(baseline=baseline_days * DAY, horizon=horizon_days * DAY)
    harness.feed(Traffic.concat([traffic, young.take(young.ts < end)]))
    live = Traffic.concat([generate(STREAMS, end, end + 6 * HOUR, seed=13), young.take(young.ts >= end), newcomer])
    live = live.take(np.argsort(live.ts, kind="stable"))
    h = harness.history
    count = int(round(baseline_days * DAY / 3600))
    # statistics restored for hours before the young scope's first (a store can hold them):
    # the baseline reads those hours as unknown all the same
    rng = np.random.default_rng(5)
    text = "\x1f".join(("app", "fresh", "", ""))
    early = [int(end // 3600) - 50 + k for k in range(3)]
    width = int(np.prod(h.hour_slots.shape[2:]))
    h.load_slot_sizes([(text, hour, rng.lognormal(0, 1, width).tobytes()) for hour in early])
    h.load_bursts([(text, hour, 40.0, 300.0) for hour in early])
    checked, fed = 0, end
    for i, t in enumerate(np.arange(end + 20 * 60, end + 5 * HOUR + 1, 20 * 60)):
        harness.feed(live.take((live.ts > fed) & (live.ts <= t)))
        fed = t
        if i == 5:
            harness.feed(late)                       # late records into an hour of the baseline
        harness.evaluate(t)
        ev = harness._evaluator
        assert ev is not None and ev._baseline is not None
        assert_same(flatten(ev._baseline), reference_baseline(h, ev._baseline.end, count), f"t={t - end:.0f}s")
        hours = np.arange(ev._baseline.end - count, ev._baseline.end)      # and the requests that keep scopes active
        slot, ok = h.hours.slots_for(hours)
        plain = h.hour_add[: h.size][:, slot[ok], F["requests"]].sum(axis=1)
        assert np.array_equal(h.baseline_requests(t, baseline_days * DAY), plain)
        checked += 1
    assert checked == 15
    back = Harness(baseline=baseline_days * DAY, horizon=horizon_days * DAY)
    back.history, back.series, back.series_keys = h, harness.series, harness.series_keys
    for t in (fed - 3 * HOUR, fed - 7 * HOUR, fed - 2 * HOUR):      # earlier hours, the same history
        back.evaluate(t)
        b = back._evaluator._baseline if back._evaluator is not None else None
        assert b is not None
        assert_same(flatten(b), reference_baseline(h, b.end, count), f"back to t={t - end:.0f}s")
    # the run covered what it means to: young scopes, a newcomer, hours the ring no longer holds
    assert h.keys.index(("app", "newcomer", "", "")) > 0
    hours = np.arange(ev._baseline.end - count, ev._baseline.end)
    assert (hours[None, :] < h.first_hour[: h.size, None]).any(axis=1).sum() >= 3
    assert h.held_hours(hours).all() == (horizon_days > baseline_days)
    assert np.isnan(ev._baseline.quantile["latency"]).sum() < h.size   # most scopes have a baseline quantile


def test_gathered_hours_are_read_only_views() -> None:
    """A consumer writing into the baseline hours would change the next hour's baseline."""
    start = 1_800_000_000.0 - 1_800_000_000.0 % DAY
    harness = Harness(baseline=2 * DAY).feed(generate(STREAMS[:2], start, start + 3 * DAY, seed=2))
    hours = np.arange(int(start // 3600) + 24, int(start // 3600) + 72)
    held = harness.history.baseline_hours(hours)
    for a in (held.adds, held.quantiles, held.bursts, held.slots):
        with pytest.raises(ValueError):
            a[0, 0] = 1.0
    with pytest.raises(ValueError):
        harness.history.baseline_hours(hours[::2])
    empty = ScopeHistory(HOUR, 14 * DAY).baseline_hours(hours)          # before the first record
    assert empty.adds.shape == (0, len(hours), len(F)) and empty.slots.shape[:2] == (0, len(hours))
    snap = Harness().evaluate(1_800_000_000.0)                           # and the evaluation over it
    assert snap.active.shape == (0,)
