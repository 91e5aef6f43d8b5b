"""Baseline statistics: what "normal" looks like for every scope, from its hourly history.

Pure numpy functions over (scopes, hours) arrays, one row per scope, NaN where an hour has
no value. They run when the hour turns (the evaluator keeps the result until then), within
the first evaluation after it, which has the evaluation's time budget: so each row set is
sorted once and read for every order statistic it gives (`Ordered`), and otherwise they
favour clarity over the last microsecond.

- Counts (requests) follow the time of day: the expected count of an hour is the median
  of the same hour on the baseline's days (`daily_profile`), scaled where the last two
  weeks agree that a quarter of the week runs above or below it (`weekly_profile`: quiet
  weekends). How far a day strays from that
  (`level_spread`) and how bursty requests arrive within an hour (`burstiness`) set the
  noise a window's count is judged against.
- Request sizes (mean log tokens per request) are judged against a flat baseline
  (`size_stats`): their centre, their spread, and how much more hourly means vary than
  independent requests would make them.
- Error ratios (`error_stats`): the pooled ratio and its overdispersion, without the
  hours of an earlier error storm.
- Latency-like quantiles: the median of the hourly quantiles (`nan_median`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..evidence import binomial_z, normal_quantile

MAD_SCALE = 1.4826          # makes the MAD estimate sigma for normal data
TAIL_90_HALF_NORMAL = 1.6449  # the 90th percentile of |x| for a standard normal x
CHI2_1_MEDIAN = 0.4549      # median of chi-square with one degree of freedom
Q75_ABS_NORMAL = 1.1503     # upper quartile of |z| for standard normal z
CHI2_1_Q75 = Q75_ABS_NORMAL ** 2   # upper quartile of chi-square with one degree of freedom
STORM_HOUR_CHANCE = 0.05   # an hour of errors left out of the baseline is this unlikely over all its hours
MIN_DAYS = 3                # earlier days a seasonal expectation needs
MIN_HOURS = 6               # hours a flat statistic needs
PRIOR_BURSTINESS = 3.0      # dispersion assumed until enough hours were seen whole
MIN_LEVEL_SD = 0.05
WEEK_HOURS = 168
WEEK_BLOCK_HOURS = 6        # the week's pattern is read in quarter days
WEEK_BLOCKS = WEEK_HOURS // WEEK_BLOCK_HOURS
# Each of two weeks must stray this many times the noise of a quarter day's shift, the
# same way, before the week's pattern is read there: ordinary noise does so by chance in
# 2 P(z > 2)^2, about one quarter day in a thousand.
WEEK_PATTERN_Z = 2.0
Q50_ABS_NORMAL = 0.6745     # median of |z| for standard normal z
_HOUR_OF_DAY = np.arange(WEEK_HOURS) % 24                   # of each hour of the week
_BLOCK_OF_HOUR = np.arange(WEEK_HOURS) // WEEK_BLOCK_HOURS   # its quarter day of the week
# The degrees of freedom per value of a spread read off the upper quartile of |x| or x^2
# (`_tail_scale`, `level_spread`): that estimate's relative variance is
# p(1 - p) / (n f(q)^2 q^2) = 0.836 / n for normal x (p = 0.75, q = 1.1503, f the half-normal
# density), a sample standard deviation's 1 / (2 df), so n values carry 0.6 n degrees of freedom.
TAIL_SCALE_DF_PER_VALUE = 0.598
MIN_SIZE_SD = 0.05
MIN_BLOCKS = 6              # blocks a spread at that block length needs
SPREAD_FLOOR = MIN_SIZE_SD ** 2 / 100   # a measured spread of 0 still interpolates in log-log
MIN_WINDOWS = 24            # windows with sized requests a spread at their length needs
# Block lengths, in coarse slots, at which an hour's request counts are also summed for the
# burstiness: the evaluator's windows (1/12 to all of the window, which is 12 coarse slots).
# Sessions span several slots, so a window's count varies more than its slots' dispersion
# says (`window_dispersion`). A length is measured where the hour holds MIN_BLOCKS_PER_HOUR
# blocks of it or more: about their line, that leaves two degrees of freedom an hour (a
# 20-minute block's one gave factors a fifth above 1 on traffic whose sessions last a
# minute, by sampling alone).
BLOCK_SLOTS = (1, 2, 3, 4, 6, 12)
MIN_BLOCKS_PER_HOUR = 4
# per hour and window length, of the windows with sized requests: their number, the sums of
# their mean log sizes and squared means, of squares about their means, of requests less
# one and of one over requests
WINDOW_STATS = ("windows", "sum", "squares", "within", "dof", "inverse")


def nan_median(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Median along `axis` ignoring NaN (NaN where all are), equal to np.nanmedian.

    The rows are sorted (`Ordered`), then the middle values are picked. np.median's
    partition would spare the sort, but it partitions at two positions for an even length,
    and that costs about four times numpy's vectorised sort of a (scopes x baseline hours)
    array; np.nanmedian takes a slower path still, row by row."""
    return Ordered(np.moveaxis(x, axis, -1)).median()


def nan_quantile(x: np.ndarray, q: float, axis: int = -1) -> np.ndarray:
    """Lower q-quantile along `axis` ignoring NaN (NaN where all are)."""
    return Ordered(np.moveaxis(x, axis, -1)).quantile(q)


FAST_SORT = 256     # longest rows numpy's vectorised sort orders within registers


class Ordered:
    """The rows of an array (last axis) sorted once, for their order statistics ignoring
    NaN: every median and quantile here is read from one, so statistics of the same values
    share the sort.

    numpy's vectorised sort orders a row of up to FAST_SORT float64 values within
    registers, about four times faster per value than a longer row (a 1,000 x 336 array
    takes 2.2 ms, two 1,000 x 168 halves 0.5 ms each). Rows up to twice that long (a 14-day
    baseline is 336 hours) are sorted as two halves, and an order statistic of a row is
    then found among the two halves' values by a binary search on how many of the smallest
    come from each: the same value a sort of the whole row gives."""

    def __init__(self, x: np.ndarray) -> None:
        m = x.shape[-1]
        cut = m // 2 if FAST_SORT < m <= 2 * FAST_SORT else m
        self.parts = [np.sort(x[..., :cut], axis=-1)] + ([np.sort(x[..., cut:], axis=-1)] if cut < m else [])
        self.counts = [_valid_count(p) for p in self.parts]
        self.n = sum(self.counts[1:], self.counts[0])

    def kth(self, k: np.ndarray) -> np.ndarray:
        """The k-th smallest (from 0) value that is not NaN of each row, for 0 <= k < n
        (other rows get any value: callers mask them)."""
        if len(self.parts) == 1:
            a = self.parts[0]
            idx = np.clip(k, 0, max(a.shape[-1] - 1, 0))
            return np.take_along_axis(a, idx[..., None], axis=-1)[..., 0]
        return _kth_of_two(self.parts[0], self.counts[0], self.parts[1], self.counts[1], k)

    def median(self) -> np.ndarray:
        """The middle value, or the mean of the middle two, as np.median computes it,
        (a + b) / 2; NaN where a row has no value."""
        n = self.n
        if not self.parts[0].shape[-1]:
            return np.full(n.shape, np.nan)
        a, b = self.kth((n - 1) // 2), self.kth(n // 2)
        return np.where(n > 0, (a + b) / 2.0, np.nan)

    def quantile(self, q: float) -> np.ndarray:
        """The lower q-quantile, as np.quantile's 'lower' method: the value at
        floor(q (n - 1)); NaN where a row has no value."""
        n = self.n
        if not self.parts[0].shape[-1]:
            return np.full(n.shape, np.nan)
        return np.where(n > 0, self.kth(np.floor(q * (n - 1)).astype(np.int64)), np.nan)

    def second_highest(self) -> np.ndarray:
        """The second-highest value (-inf where a row has fewer than two)."""
        n = self.n
        if self.parts[0].shape[-1] + (self.parts[1].shape[-1] if len(self.parts) > 1 else 0) < 2:
            return np.full(n.shape, -np.inf)
        return np.where(n >= 2, self.kth(n - 2), -np.inf)


def _valid_count(s: np.ndarray) -> np.ndarray:
    """How many values of each row of the sorted `s` are not NaN. numpy's sort puts NaN
    last, so only the rows whose last value is NaN (few, mostly) need counting."""
    m = s.shape[-1]
    n = np.full(s.shape[:-1], m, dtype=np.int64)
    if m:
        gaps = np.isnan(s[..., -1])
        if gaps.any():
            n[gaps] = m - np.count_nonzero(np.isnan(s[gaps]), axis=-1)
    return n


def _kth_of_two(a: np.ndarray, na: np.ndarray, b: np.ndarray, nb: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The k-th smallest (from 0) of the first na values of each row of the sorted `a` and
    the first nb of the sorted `b`, for 0 <= k < na + nb.

    The k + 1 smallest are the i smallest of a and the k + 1 - i smallest of b for the
    least i whose next value of a, a[i], is no smaller than the last of those of b,
    b[k - i]: binary search for it, all rows at once (flat indices into the rows: the
    arrays are small, so the count of numpy calls is what costs), then the k-th is the
    larger of a[i - 1] and b[k - i]."""
    shape = k.shape
    fa, fb = a.reshape(-1), b.reshape(-1)
    ma, mb = max(a.shape[-1], 1), max(b.shape[-1], 1)
    rows = np.arange(k.size)
    oa, ob = rows * a.shape[-1], rows * b.shape[-1]
    na, nb = na.reshape(-1), nb.reshape(-1)
    k = np.clip(k.reshape(-1), 0, np.maximum(na + nb - 1, 0))
    lo = np.maximum(k + 1 - nb, 0)
    hi = np.minimum(k + 1, na)
    for _ in range(int(np.max(hi - lo, initial=0)).bit_length()):
        mid = (lo + hi) >> 1
        enough = fa.take(oa + np.minimum(mid, ma - 1)) >= fb.take(ob + np.clip(k - mid, 0, mb - 1))
        shut = enough | (lo >= hi)                       # a closed row keeps lo == hi
        hi = np.where(shut, np.minimum(mid, hi), hi)
        lo = np.where(shut, lo, mid + 1)
    from_a = np.where(lo > 0, fa.take(oa + np.clip(lo - 1, 0, ma - 1)) if fa.size else 0.0, -np.inf)
    from_b = np.where(k + 1 - lo > 0, fb.take(ob + np.clip(k - lo, 0, mb - 1)) if fb.size else 0.0, -np.inf)
    return np.maximum(from_a, from_b).reshape(shape)


def on_local_hours(values: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, H) values of consecutive UTC hours laid out on the consecutive local hours they
    span (`local`: their local hour numbers, `zones.local_hours`), and those local hours.
    Where the clocks went forward the skipped local hour is unknown (NaN); where they went
    back, the local hour that happened twice keeps its later hour. Unchanged where no
    clock moved, as in UTC."""
    if bool(np.all(np.diff(local) == 1)):                  # no clock moved (also empty)
        return values, local
    lo = int(local.min())
    span = np.arange(lo, int(local.max()) + 1)
    _, from_end = np.unique(local[::-1], return_index=True)
    latest = local.size - 1 - from_end                     # the later of a repeated hour
    out = np.full((values.shape[0], span.size), np.nan)
    out[:, local[latest] - lo] = values[:, latest]
    return out, span


def daily_profile(values: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """(S, 24) expected value of each hour of the day: the median of that hour over the
    baseline's days. `values` (S, H) are the baseline's hourly values (NaN before a
    scope existed) at consecutive local hour numbers `hours` (see `on_local_hours`). A
    scope with an hour of the day seen on fewer than MIN_DAYS days takes the median of its
    last day (of at least MIN_HOURS hours) for every hour: a young scope is judged against
    its recent level until it has days enough for a time of day. (Mixing the two would
    judge it against its first days' level at the hours seen three times and against its
    last day's elsewhere, a step in the middle of a window whenever its level has moved
    since it started.)"""
    s, h = values.shape
    hod = hours % 24
    out = np.full((s, 24), np.nan)
    days = -(-h // 24)
    grid = np.full((s, 24, days), np.nan)                 # values by hour of day and day
    grid[:, hod, (np.arange(h) // 24)] = values
    by_day = Ordered(grid)
    seen, med = by_day.n, by_day.median()
    enough = seen >= MIN_DAYS
    out[enough] = med[enough]
    young = np.flatnonzero(~enough.all(axis=1))
    if young.size:
        recent = values[young, -24:]
        known = np.sum(~np.isnan(recent), axis=1) >= MIN_HOURS
        level = np.where(known, nan_median(recent, axis=1), np.nan)
        out[young] = level[:, None]
    return out


def against_last_week(profile: np.ndarray, young: np.ndarray, values: np.ndarray, hours: np.ndarray,
                      judged: np.ndarray) -> np.ndarray:
    """(S, WEEK_HOURS) the hourly expectation a fall of the request rate is judged against:
    `profile` (the time of day, and of the week where two weeks agree), except at the
    `judged` hours that are `young` (S, J): less than two weeks after the scope's first
    hour, so the weekly pattern cannot have read them (`weekly_profile` needs two weeks).
    In a site's first two weeks a quiet weekend, judged against the time of day alone,
    reads as a fall of every scope all weekend. Such an hour expects the smaller of the
    profile and its occurrence a week back, so a fall must be one against both; where that
    is unknown too (a scope's first week) it is NaN, and no fall is judged until the scope
    has a week of history. A rise is judged against the profile as before.

    `values` (S, H) are hourly request counts (NaN unknown) at the consecutive local
    `hours`, holding the week before every `judged` local hour (the hours the windows and
    the held windows cover, and the one after for interpolation); the profile is indexed
    by local hour % WEEK_HOURS."""
    if not young.any():
        return profile
    v, span = on_local_hours(values, hours)
    i = judged - WEEK_HOURS - span[0]
    inside = (i >= 0) & (i < span.size)
    last = np.full((v.shape[0], judged.size), np.nan)
    last[:, inside] = v[:, i[inside]]
    slots = judged % WEEK_HOURS
    out = profile.copy()
    out[:, slots] = np.where(young, np.minimum(profile[:, slots], last), profile[:, slots])   # NaN where unknown
    return out


def weekly_profile(daily: np.ndarray, values: np.ndarray, hours: np.ndarray, floor: float,
                   sampling: np.ndarray | float = 0.0) -> np.ndarray:
    """(S, WEEK_HOURS) expected value of each hour of the week, indexed by local hour
    number % WEEK_HOURS (`on_local_hours`; UTC's unless a time zone is set): the daily
    profile (S, 24), scaled in each quarter day of the week where the last two weeks agree
    that it runs above or below the daily profile.

    A site used at work is quieter at weekends. Judged against the time of day alone, every
    weekend reads as a drop, and the level spread that would have to excuse it would blunt
    every weekday. One week cannot tell a weekly pattern from a one-off (an outage, a
    holiday, a launch); two weeks that agree can. A quarter day is read as patterned where
    both weeks' log ratios to the daily profile go the same way and each is more than
    WEEK_PATTERN_Z times the noise of such a ratio. It is then scaled by their mean where
    the two differ by no more than noise would make them (the smaller of the two would
    expect the busier of two quiet weekends, and read an ordinary quieter one as a fall),
    and by the smaller where they differ by more: one of them then holds something of its
    own besides the week's pattern (a launch on one of two busy Wednesdays), which the next
    week is not to expect. The noise is read off the differences between the two weeks'
    ratios of the same quarter day, which a weekly pattern cancels: their median over the
    week, over sqrt(2) (two weeks' noises) and over the median of |z|. A quiet quarter day
    (the night) holds fewer requests than the median one and strays further by sampling
    alone: its noise is at least its own sampling spread, `sampling` (S,) over its expected
    total (the variance of a log total of expectation E is about sampling / E: the
    burstiness for a count, times 1 + CV^2 of the sizes for a sum). A one-off in one week
    leaves the other near zero, so the quarter day stays as the daily profile has it.
    Quarter days, so that a site far from UTC finds its weekend in blocks of its own
    rather than straddling two UTC days.

    `values` (S, H) are hourly values (NaN unknown) at the consecutive local `hours`,
    the last two weeks or more; each quarter day of the week takes its two latest
    occurrences there with at least half their hours known (a block at the edge of `hours`
    may be partial), and a scope needs both occurrences of half the week's quarter days.
    `floor` is added per hour to both sides of each log ratio."""
    s = daily.shape[0]
    if hours.size == 0:
        return daily[:, _HOUR_OF_DAY]
    # pad `hours` out to whole blocks (unknown hours count nothing), then sum each block's
    # hours in order
    lead = int(hours[0]) % WEEK_BLOCK_HOURS
    width = -(-(lead + hours.size) // WEEK_BLOCK_HOURS) * WEEK_BLOCK_HOURS
    span = slice(lead, lead + hours.size)
    expected = daily[:, hours % 24]
    known = np.isfinite(values) & np.isfinite(expected)
    v, e, n = np.zeros((s, width)), np.zeros((s, width)), np.zeros((s, width))
    np.copyto(v[:, span], values, where=known)
    np.copyto(e[:, span], expected, where=known)
    n[:, span] = known
    v, e, n = (_block_sums(x, WEEK_BLOCK_HOURS) for x in (v, e, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(2 * n >= WEEK_BLOCK_HOURS, np.log((v + floor * n) / (e + floor * n)), np.nan)
    inside = np.zeros(width)
    inside[span] = 1.0
    whole = 2 * _block_sums(inside[None, :], WEEK_BLOCK_HOURS)[0] >= WEEK_BLOCK_HOURS   # not cut short by `hours`
    of_week = (int(hours[0]) // WEEK_BLOCK_HOURS + np.arange(width // WEEK_BLOCK_HOURS)) % WEEK_BLOCKS
    older, newer = np.full((s, WEEK_BLOCKS), np.nan), np.full((s, WEEK_BLOCKS), np.nan)
    total = np.full((s, WEEK_BLOCKS), np.nan)                         # expected total of the newer one
    for b in range(WEEK_BLOCKS):
        cols = np.flatnonzero((of_week == b) & whole)[-2:]
        if cols.size == 2:
            older[:, b], newer[:, b] = shift[:, cols[0]], shift[:, cols[1]]
            total[:, b] = e[:, cols[1]] + floor * n[:, cols[1]]
    apart = np.abs(older - newer)
    both = np.isfinite(apart)
    noise = nan_median(np.where(both, apart, np.nan), axis=1) / (Q50_ABS_NORMAL * np.sqrt(2.0))
    noise = np.where(both.sum(axis=1) >= WEEK_BLOCKS // 2, noise, np.nan)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        own = np.sqrt(np.asarray(sampling, dtype=np.float64).reshape(-1, 1) / total)
    noise = np.where(np.isnan(noise), np.nan, np.fmax(noise, own))
    with np.errstate(invalid="ignore"):
        pattern = (both & (older * newer > 0) & (np.abs(older) > WEEK_PATTERN_Z * noise)
                   & (np.abs(newer) > WEEK_PATTERN_Z * noise))
        alike = apart <= WEEK_PATTERN_Z * np.sqrt(2.0) * noise
    smaller = np.sign(older) * np.fmin(np.abs(older), np.abs(newer))
    factor = np.where(pattern, np.where(alike, (older + newer) / 2.0, smaller), 0.0)
    return daily[:, _HOUR_OF_DAY] * np.exp(factor)[:, _BLOCK_OF_HOUR]


def burstiness(requests: np.ndarray, burst: np.ndarray, slots_per_hour: int) -> np.ndarray:
    """Index of dispersion of request counts in the sub-hour slots of each scope's hours:
    the variance of a slot's count over its mean, 1 for Poisson arrivals, more when requests
    come in bursts (conversations, agent steps, batch jobs). `requests` (S, H) are the
    hours' totals, `burst` (S, H, 2) the sums and sums of squares of their slots' counts.
    Hours not seen whole (restarts, late records) are left out. The 75th percentile over
    hours, because bursts are what a short window must not mistake for a surge; the prior
    until six hours were seen whole."""
    total, sq = burst[..., 0], burst[..., 1]
    whole = (np.abs(total - requests) <= 0.01 * requests + 0.5) & (requests >= slots_per_hour)
    mean = total / slots_per_hour
    with np.errstate(invalid="ignore", divide="ignore"):
        disp = np.where(whole, (sq / slots_per_hour - mean * mean) / mean, np.nan)
    known = np.sum(~np.isnan(disp), axis=1)
    q = nan_quantile(disp, 0.75, axis=1)
    return np.maximum(np.where(known >= MIN_HOURS, q, PRIOR_BURSTINESS), 1.0)


def block_stats(counts: np.ndarray) -> np.ndarray:
    """(R, 1 + len(BLOCK_SLOTS)) of per-slot request counts (R, P), P the slots an hour
    holds: their total, then for each block length k the squares of the counts of the
    hour's P // k whole blocks of k slots about their least-squares line (0 where the hour
    holds fewer than MIN_BLOCKS_PER_HOUR such blocks). About a line, because a window's expectation
    follows the time of day's slope through the hour (`_Context.expected` interpolates
    between hours): a morning's ramp is no noise of the window's count."""
    r, p = counts.shape
    out = np.zeros((r, 1 + len(BLOCK_SLOTS)))
    out[:, 0] = counts.sum(axis=1)
    for j, k in enumerate(BLOCK_SLOTS):
        m = p // k
        if m >= MIN_BLOCKS_PER_HOUR:
            blocks = counts[:, : m * k].reshape(r, m, k).sum(axis=2)
            x = np.arange(m) - (m - 1) / 2.0
            centred = blocks - blocks.mean(axis=1, keepdims=True)
            slope = centred @ x / (x @ x)
            out[:, 1 + j] = ((centred - slope[:, None] * x) ** 2).sum(axis=1)
    return out


def window_dispersion(disp: np.ndarray, requests: np.ndarray, expected: np.ndarray, level_sd: np.ndarray,
                      blocks: np.ndarray, slots_per_hour: int, block_slots: tuple[int, ...]) -> np.ndarray:
    """(S, len(block_slots)) the index of dispersion of the request count of a window of
    each of `block_slots` coarse slots (the first is the slot itself): the slot's, `disp`
    (the `burstiness`), times how much more a window of that length varies.

    Requests come in sessions, and a session often lasts longer than a slot: a quiet or a
    busy stretch then spans several slots, so the counts of a 15- or 20-minute window vary
    more, against their mean, than five-minute counts do. Judged with the slot's dispersion,
    such a window's ordinary lull reads as a fall of the request rate, and its burst as a
    surge. On real traffic (RAGPulse sessions) the index at 20 minutes is 1.3 to 1.6 times
    the five-minute one. The factor for k slots is the variance of the hours' blocks of k
    slots over k times that of their slots, each about the hour's line (`history.
    block_stats`: the window's expectation follows the time of day's slope) and pooled over
    the baseline's hours: a ratio of two variances of the same hours' counts, which is 1
    for independent slots whatever their distribution. Pooled over the hours seen whole
    (all their requests in their blocks; an hour restored without them is left out) and
    ordinary: an hour whose total strays from its expectation (`expected` (S, H)) by more
    than three times what the level spread (`level_sd`) and its sampling make likely (the
    level z of `evidence.level_z`) held an outage or a storm, and one 30-minute storm would
    outweigh a month of ordinary hours. A length the hour holds fewer than
    MIN_BLOCKS_PER_HOUR blocks of (20 minutes and more), or that fewer than MIN_HOURS such hours
    measured, takes the factor of the length below it; no length reads less than a shorter
    one, nor less than the slot."""
    total = blocks[..., 0]
    p = slots_per_hour
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.sqrt(level_sd[:, None] ** 2 + disp[:, None] / np.maximum(expected, 0.5))
        strays = np.abs(np.log((requests + 0.5) / (expected + 0.5))) > 3.0 * spread
    whole = (np.abs(total - requests) <= 0.5) & (requests >= p) & np.isfinite(expected) & ~strays
    measured = np.sum(whole, axis=1) >= MIN_HOURS
    slot_var = np.where(whole, blocks[..., 1], 0.0).sum(axis=1) / max(p - 2, 1)
    factor = np.ones((requests.shape[0], len(block_slots)))
    for j, k in enumerate(block_slots[1:], start=1):
        m = p // k
        factor[:, j] = factor[:, j - 1]
        if m >= MIN_BLOCKS_PER_HOUR:
            block_var = np.where(whole, blocks[..., 1 + j], 0.0).sum(axis=1) / (m - 2)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = block_var / (k * slot_var)
            factor[:, j] = np.where(measured & np.isfinite(ratio), ratio, factor[:, j])
    return disp[:, None] * np.maximum.accumulate(np.maximum(factor, 1.0), axis=1)


def level_spread(values: np.ndarray, expected: np.ndarray, sampling_var: np.ndarray | float,
                 floor: float = 0.5) -> np.ndarray:
    """How far, in log terms, an hour strays from its expectation beyond what sampling
    explains: sqrt(q75(r^2 - sampling_var) / q75 of chi2(1)), with r = log((value + floor) /
    (expected + floor)). The upper quartile, like `_tail_scale`, sees more of the heavy tail
    real traffic has (busy days, a few big customers) while a quarter of the hours may be
    anomalous without inflating it. (S, H) inputs, (S,) out."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.log((values + floor) / (expected + floor))
    excess = r * r - sampling_var           # NaN where the value or its expectation is
    q = nan_quantile(excess, 0.75, axis=1)
    return np.sqrt(np.maximum(np.nan_to_num(q / CHI2_1_Q75, nan=0.0), MIN_LEVEL_SD ** 2))


def block_spread(observed: np.ndarray, expected: np.ndarray, hours: int) -> np.ndarray:
    """Spread of log(observed / expected) over consecutive blocks of `hours` hours, the
    newest block ending with the last column: the noise a shift held for that long must
    stand out from. Measured at the block length itself, because a busy or quiet day moves
    every hour of it the same way and so does not average out (see `_tail_scale`). (S, H)
    inputs, (S,) out; NaN with fewer than MIN_BLOCKS blocks."""
    s, h = observed.shape
    n_blocks = h // hours
    if n_blocks == 0:
        return np.full(s, np.nan)
    cut = h - n_blocks * hours
    o, e = _block_sums(observed[:, cut:], hours), _block_sums(expected[:, cut:], hours)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.log((o + 0.5) / (e + 0.5))
    valid = np.sum(~np.isnan(r), axis=1)
    out = _tail_scale(r)
    return np.where(valid >= MIN_BLOCKS, np.maximum(out, MIN_LEVEL_SD), np.nan)


def held_spreads(observed: np.ndarray, expected: np.ndarray, lengths: tuple[int, ...]) -> dict[int, np.ndarray]:
    """`block_spread` at each block length (hours, ascending), none below what the next
    shorter length implies: sd_k >= sd_j sqrt(j / k). A busy hour is followed by more busy
    hours rather than by quiet ones, so a sum of k hours strays at least as far as
    independent blocks of j hours would make it; a week holds only 21 blocks of 8 hours,
    and a spread read off so few that says less is their sampling noise (the 4-hour
    blocks, twice as many, know better)."""
    out: dict[int, np.ndarray] = {}
    prev: tuple[int, np.ndarray] | None = None
    for k in lengths:
        sd = block_spread(observed, expected, k)
        if prev is not None:
            sd = np.where(np.isnan(sd), sd, np.fmax(sd, prev[1] * np.sqrt(prev[0] / k)))
        out[k] = sd
        prev = (k, sd)
    return out


def _block_sums(x: np.ndarray, hours: int) -> np.ndarray:
    """Sums of consecutive blocks of `hours` columns of (S, H) `x` (H a multiple of
    `hours`), column by column in order: one vectorised add per column of a block, where
    numpy's sum over a short last axis pays its loop set-up per block. For the counts and
    medians of counts (multiples of 1/2) `block_spread` receives every sum is exact, so
    the order of the additions cannot change it; for other values it may differ from
    numpy's pairwise order in the last bit."""
    blocks = x.reshape(x.shape[0], x.shape[1] // hours, hours)
    out = blocks[:, :, 0].copy()
    for j in range(1, hours):
        out += blocks[:, :, j]
    return out


def _tail_scale(x: np.ndarray) -> np.ndarray:
    """A normal sigma read off the upper quartile of |x| (rows, NaN ignored): it sees more of
    a heavy tail than the median does, yet a quarter of the values may be anomalous (a
    creep or an outage still in the baseline) without inflating it."""
    return nan_quantile(np.abs(x), 0.75, axis=1) / Q75_ABS_NORMAL


@dataclass(slots=True)
class SizeStats:
    """Per scope: the centre and spread of log request sizes, and how much more than
    independent requests the hourly means vary (`dispersion` >= 1)."""

    centre: np.ndarray
    var: np.ndarray
    dispersion: np.ndarray
    hours: np.ndarray
    seen: np.ndarray          # the second-highest hourly mean: a level the scope has reached before
    # Windows shorter than the hour, measured (`window_stats`) at the lengths of
    # `history.WINDOW_SLOTS`, then the hour itself: (S, lengths + 1), NaN where too few
    # windows were seen.
    spread: np.ndarray = field(default_factory=lambda: np.zeros((0, 1)))   # variance of window means beyond sampling
    within: np.ndarray = field(default_factory=lambda: np.zeros(0))        # variance of requests about their window's mean
    # the hour's spread beyond sampling read as between + sessions / n (`excess_by_count`), (S,) each
    between: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sessions: np.ndarray = field(default_factory=lambda: np.zeros(0))


def size_stats(count: np.ndarray, total: np.ndarray, total_sq: np.ndarray,
               windows: np.ndarray | None = None) -> SizeStats:
    """From hourly (S, H) counts, sums and sums of squares of log sizes.

    The dispersion is read from the tail of the hours' standardised means as well as from
    their MAD, and the larger is kept: requests come in sessions that share a model and a
    prompt, so a quiet scope's hour is often one or two sessions, and its mean is then
    that of a session, not of independent requests. When a tenth of the hours or more are
    such sessions on a dearer model, the MAD (the middle half) never sees them and the next
    one reads as a jump; the 90th percentile does, while up to a tenth of anomalous hours
    in the baseline still cannot raise it."""
    ok = count >= 5
    with np.errstate(invalid="ignore", divide="ignore"):
        per_request = total / count
        mean = np.where(ok, per_request, np.nan)
        var = np.where(ok, (total_sq - total * total / count) / np.maximum(count - 1, 1), np.nan)
    by_mean = Ordered(mean)
    centre = by_mean.median()
    v = np.maximum(nan_median(var, axis=1), MIN_SIZE_SD ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (mean - centre[:, None]) / np.sqrt(v[:, None] / np.maximum(count, 1))
    dev = np.abs(u - nan_median(u, axis=1)[:, None])
    by_dev = Ordered(dev)
    mad = by_dev.median() * MAD_SCALE
    tail = by_dev.quantile(0.9) / TAIL_90_HALF_NORMAL
    hours = np.sum(ok, axis=1)
    disp = np.maximum(np.nan_to_num(np.fmax(mad, tail) ** 2, nan=1.0), 1.0)
    # twice in the baseline: one hour could be an anomaly, two make it part of the usual
    seen = by_mean.second_highest()
    st = SizeStats(np.where(hours >= MIN_HOURS, centre, np.nan), v, disp, hours, seen)
    if windows is None:
        windows = np.zeros(count.shape + (1, len(WINDOW_STATS)))      # one length below the hour, unmeasured
    tau2, var_w = window_stats(windows, centre)
    # the hour's, as the windows': over every hour with sized requests, quiet ones included,
    # less their sampling variance with the windows' within variance (the shortest length's)
    vw = var_w[:, 0]
    some = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dev2 = np.where(some, (per_request - centre[:, None]) ** 2 - vw[:, None] / count, 0.0)
        hour_tau2 = np.maximum(dev2.sum(axis=1) / some.sum(axis=1), 0.0)
    st.spread = np.concatenate([tau2, np.where(hours >= MIN_HOURS, hour_tau2, np.nan)[:, None]], axis=1)
    st.within = vw
    between, sessions = excess_by_count(np.where(some, dev2, np.nan), count, hour_tau2, vw)
    young = hours < MIN_HOURS
    st.between, st.sessions = np.where(young, np.nan, between), np.where(young, np.nan, sessions)
    return st


def excess_by_count(excess: np.ndarray, count: np.ndarray, flat: np.ndarray, within: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(between, sessions) per scope: the hours' variance of their means beyond the
    sampling of independent requests (`excess`, (S, H), NaN for hours left out) read as
    between + sessions / n for an hour of n requests, both at least 0.

    An hour's requests come in sessions, and its mean strays from the centre by what moves
    the whole hour (`between`) and by the effects of the sessions it holds, which average
    out over more of them (`sessions` / n while sessions hold about as many requests in
    quiet hours as in busy ones). One variance for all hours, their mean excess (`flat`),
    is what the quiet hours of one or two sessions make it, and asks a busy hour of many
    sessions to stray as far as they do. Weighted least squares on 1 / n, each hour
    weighted by the inverse square of its variance under `flat` and `within` (a squared
    deviation varies with the square of its variance); a negative coefficient is set to 0
    and the other fitted alone. NaN for a scope without hours."""
    valid = np.isfinite(excess) & (count > 0)
    x = np.divide(1.0, count, out=np.zeros(count.shape), where=valid)
    e = np.where(valid, excess, 0.0)
    d = within[:, None] * x
    d += flat[:, None]
    d *= d
    w = np.zeros(d.shape)
    with np.errstate(invalid="ignore"):
        np.divide(1.0, d, out=w, where=valid & (d > 0))
    wx = w * x
    # the normal equations from five weighted sums
    s0, s1, s2 = w.sum(axis=1), wx.sum(axis=1), np.einsum("ij,ij->i", wx, x)
    t0, t1 = np.einsum("ij,ij->i", w, e), np.einsum("ij,ij->i", wx, e)
    with np.errstate(invalid="ignore", divide="ignore"):
        det = s0 * s2 - s1 * s1
        slope = np.where(det > 1e-12 * s0 * s2, (s0 * t1 - s1 * t0) / det, 0.0)
        em = t0 / s0
        cut = em - slope * s1 / s0
        through_origin = t1 / s2
    flat_only = ~(slope > 0)                       # nothing that shrinks with n: one variance for all hours
    origin_only = ~flat_only & (cut < 0)           # all of it shrinks with n
    between = np.where(flat_only, np.maximum(em, 0.0), np.where(origin_only, 0.0, cut))
    sessions = np.where(flat_only, 0.0, np.where(origin_only, np.maximum(through_origin, 0.0), slope))
    known = s0 > 0
    return np.where(known, np.nan_to_num(between), np.nan), np.where(known, np.nan_to_num(sessions), np.nan)


def window_stats(windows: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far the mean log size of a window shorter than the hour strays from the centre
    beyond sampling, per window length, from per-hour sums over the windows that ended in
    the hour (S, H, lengths, WINDOW_STATS).

    Requests of one session share a model and a prompt, so a window that holds one or two
    sessions has their mean, not one of independent requests, and the shorter the window
    the fewer sessions it mixes: a quiet scope's 5-minute means swing far more than its
    hourly means, and a long session does not make its window any rarer. A random-effects
    reading, mean = centre + the window's sessions' effect + sampling noise, gives a
    window mean of n requests the variance tau^2 + var_w / n, with var_w the variance of
    requests about their own window's mean (pooled) and tau^2 the mean squared deviation
    of the windows' means less their mean sampling variance (the method of moments).

    Returns (tau^2, var_w), (S, lengths) each: NaN with fewer than MIN_WINDOWS windows."""
    k, s1, s2, within, dof, inv = (windows[..., i] for i in range(6))
    c = centre[:, None, None]
    with np.errstate(invalid="ignore"):
        dev2 = np.nansum(s2 - 2.0 * c * s1 + k * c * c, axis=1)
    total = k.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_w = np.maximum(within.sum(axis=1) / dof.sum(axis=1), MIN_SIZE_SD ** 2)
        tau2 = np.maximum((dev2 - var_w * inv.sum(axis=1)) / total, 0.0)
    known = (total >= MIN_WINDOWS) & np.isfinite(centre)[:, None] & np.isfinite(var_w)
    return np.where(known, tau2, np.nan), np.where(known, var_w, np.nan)


def _log_position(windows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each window length, the measured lengths either side (indices) and where it lies
    between them in log length (0 to 1; clipped outside the measured range)."""
    w = np.clip(np.asarray(windows, dtype=np.float64), lengths[0], lengths[-1])
    hi = np.clip(np.searchsorted(lengths, w), 1, len(lengths) - 1)
    lo = hi - 1
    x = np.log(w / lengths[lo]) / np.log(lengths[hi] / lengths[lo])
    return lo, hi, x


def window_spread(st: SizeStats, windows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(S, W) the variance of window means beyond sampling (tau^2) at each window length of
    `windows` (seconds), read from those measured at `lengths` (seconds, ascending, the hour
    last): straight in
    log-log between two measured lengths, as the variance of means over a longer stretch
    of clustered arrivals falls as a power of the number of clusters it holds. NaN where
    a length either side was not measured."""
    lo, hi, x = _log_position(windows, lengths)
    ls = np.log(np.maximum(st.spread, SPREAD_FLOOR))
    return np.exp(ls[:, lo] + (ls[:, hi] - ls[:, lo]) * x[None, :])


def sum_spread(sizes: SizeStats) -> np.ndarray:
    """1 + CV^2 of request sizes, reading them as log-normal with the spread of their logs:
    a total over n requests has a relative variance this many times 1/n. Heavy-tailed sizes
    (a few long contexts among short ones) make an hour's total swing far more than its
    request count, most of all in quiet hours."""
    return np.exp(np.nan_to_num(sizes.var, nan=0.0))


@dataclass(slots=True)
class ErrorStats:
    """Per scope: the usual error ratio and the overdispersion of hourly error counts."""

    ratio: np.ndarray
    dispersion: np.ndarray


def error_stats(requests: np.ndarray, errors: np.ndarray) -> ErrorStats:
    """Pooled ratio and overdispersion (`_pooled_error_stats`) of the hours that are not an
    earlier error storm.

    A storm of the last days is in the baseline hours: its errors would raise the pooled
    ratio and the dispersion, so the next storm (the same fault coming back) would look
    like less of a change, or like noise. An hour whose errors are beyond what the rest
    make likely once in twenty baselines (a one-sided binomial z, with the robust
    dispersion, past the Bonferroni level for the baseline's hours) is left out, and the
    statistics are taken again; only while such hours are under a quarter of the hours
    with requests, since a ratio that stays up that long is the scope's new level."""
    p, disp, robust = _pooled_error_stats(requests, errors)
    n, e = np.nan_to_num(requests), np.nan_to_num(errors)
    limit = normal_quantile(1.0 - STORM_HOUR_CHANCE / max(requests.shape[-1], 1))
    # a binomial z past `limit` needs at least this many errors (a normal bound, loose enough
    # that the exact test below sees every storm): the cheap sieve spares most hours the logs
    with np.errstate(invalid="ignore"):
        sd = np.sqrt(robust[:, None] * n * p[:, None] * (1 - p[:, None]))
        maybe = (n > 0) & (e > n * p[:, None] + 0.5 * limit * sd)
    r, h = np.nonzero(maybe)
    if not r.size:
        return ErrorStats(p, disp)
    storm = np.zeros_like(maybe)
    with np.errstate(invalid="ignore"):
        storm[r, h] = binomial_z(e[r, h], n[r, h], p[r], robust[r]) > limit
    rows = np.flatnonzero(storm.any(axis=1))
    storm = storm[rows]
    calm = storm.sum(axis=1) < 0.25 * (n[rows] > 0).sum(axis=1)
    rows, storm = rows[calm], storm[calm]
    if rows.size:
        p2, disp2, _ = _pooled_error_stats(np.where(storm, np.nan, requests[rows]), np.where(storm, np.nan, errors[rows]))
        p, disp = p.copy(), disp.copy()
        p[rows], disp[rows] = p2, disp2
    return ErrorStats(p, disp)


def _pooled_error_stats(requests: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled ratio with a weak prior (half an error in 50 requests, so a clean history
    does not make the first error infinitely surprising), the overdispersion of the hours
    with 10 or more requests, and the robust part of that overdispersion alone.

    The overdispersion is the smaller of two estimates, each biased upwards in a case the
    other is not: the median Pearson term over that of chi2(1), robust to a few anomalous
    hours in the baseline but discrete when an hour expects about one error (0 or 1 error
    an hour gives a median twice the chi2 one for errors that are in fact independent);
    and the pooled Pearson statistic (sum of squares over sum of variances), right for
    independent errors at any rate but inflated by an error storm in the baseline."""
    p = (np.nansum(errors, axis=1) + 0.5) / (np.nansum(requests, axis=1) + 50.0)
    used = requests >= 10
    var = np.where(used, requests * p[:, None] * (1 - p[:, None]), np.nan)
    sq = np.where(used, (errors - requests * p[:, None]) ** 2, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        median = nan_median(sq / var, axis=1) / CHI2_1_MEDIAN
        pooled = np.nansum(sq, axis=1) / np.nansum(var, axis=1)
    disp = np.maximum(np.nan_to_num(np.fmin(median, pooled), nan=1.0), 1.0)
    return p, disp, np.maximum(np.nan_to_num(median, nan=1.0), 1.0)
