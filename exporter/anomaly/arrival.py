"""How long records take to arrive, and what share of a time slot's records is in.

A record is dated when its request started (`ts`), but it can reach the exporter only once
the request has ended: a second or two for a chat call, minutes for a reasoning model or an
agent step. Until then the newest minutes of every window hold only the requests that have
already ended. Judged against those minutes' whole expectation, every count would read as a
fall, largest on the busiest scopes (the missing share is a fixed fraction of the count,
the noise only its square root), and most on the models with the slowest requests.

So each scope keeps, for each hour of the last day, a histogram of its requests'
latencies in log-spaced bins; the hours are weighed by age (halved every
`HALF_LIFE_HOURS`), and the evaluator expects of each slot only the share that has ended
by the time it judges:

    share(slot) = (1 / slot length) * integral over the slot's times u of F(t - u) du

with F the latency distribution (uniform within a bin). With every request ended at once
F is 1 from 0 and the share is the part of the slot gone by, the reading the evaluator had.

The lag learned is the latency, not the time a record took to arrive: a client that
resends an hour of records after an outage, or a file followed again from where it
stopped, would otherwise teach that records come an hour late, and every count after it
would read as a rise until that was forgotten. The sender's own delay (an SDK's batching,
a few seconds) is not modelled. A scope with few requests of its own borrows the shape of
all traffic's latencies (`PRIOR_RECORDS` of weight); with none learned anywhere the share
is the old one. A restart learns the same hours again from the raw records of the last day.
"""

from __future__ import annotations

import numpy as np

from ..storage.buckets import LAG_CELLS, LAG_EDGES, N_LAG_BINS, lag_bins, lag_cells

__all__ = ["LAG_CELLS", "LAG_EDGES", "N_LAG_BINS", "lag_bins", "lag_cells", "LAG_HOURS", "HALF_LIFE_HOURS",
           "PRIOR_RECORDS", "hour_weights", "lag_cdf", "arrived_share", "failure_share"]

LAG_HOURS = 24               # hours of lags kept per scope
HALF_LIFE_HOURS = 3.0        # an hour's lags weigh half as much as those of three hours later
PRIOR_RECORDS = 20.0         # weight of all traffic's lag shape in a scope's own


def hour_weights() -> np.ndarray:
    """(LAG_HOURS,) the weight of each kept hour's lags, oldest first: halved every
    HALF_LIFE_HOURS back from the current hour."""
    age = np.arange(LAG_HOURS - 1, -1, -1, dtype=np.float64)
    return np.asarray(0.5 ** (age / HALF_LIFE_HOURS))


def lag_cdf(hist: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """(S, N_LAG_BINS + 1) the lag distribution at the bin edges for each scope's histogram
    (S, N_LAG_BINS), with `prior` (N_LAG_BINS,), a distribution, mixed in at PRIOR_RECORDS of
    weight. Rows with nothing learned come out NaN."""
    h = np.asarray(hist, dtype=np.float64)
    if prior is not None and np.isfinite(prior).all() and prior.sum() > 0:
        h = h + PRIOR_RECORDS * prior[None, :]
    total = h.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cum = np.cumsum(h, axis=1) / total
    return np.hstack([np.zeros((h.shape[0], 1)), cum])


def _integral(cdf: np.ndarray, age: np.ndarray) -> np.ndarray:
    """(S, A) the integral of F from 0 to each age (A,), F piecewise linear between edges
    (its values `cdf` (S, edges)) and 1 past the last edge."""
    e = LAG_EDGES
    width = np.diff(e)
    at_edges = np.hstack([np.zeros((cdf.shape[0], 1)), np.cumsum(width * (cdf[:, :-1] + cdf[:, 1:]) / 2, axis=1)])
    a = np.clip(age, 0.0, None)
    j = np.clip(np.searchsorted(e, a, side="right") - 1, 0, e.size - 2)      # bin holding each age
    x = np.clip(a - e[j], 0.0, width[j])                                       # into that bin
    f0, f1 = cdf[:, j], cdf[:, j + 1]
    inside = at_edges[:, j] + x * f0 + x * x * (f1 - f0) / (2 * width[j])
    out: np.ndarray = inside + np.maximum(a - e[-1], 0.0)                      # F = 1 past the last edge
    return out


def arrived_share(cdf: np.ndarray, start_age: np.ndarray, end_age: np.ndarray, length: float) -> np.ndarray:
    """(S, A) the share of a slot's records (of `length` seconds) in by the time they are
    judged, for slots whose start and end lie `start_age` and `end_age` (A,) seconds before
    it (an end age of 0 for the slot still filling; its share is then at most the part gone
    by). Rows of `cdf` with nothing learned read every record as in at once."""
    s, e = np.asarray(start_age, dtype=np.float64), np.maximum(np.asarray(end_age, dtype=np.float64), 0.0)
    plain = np.broadcast_to((np.maximum(s, 0.0) - e) / length, (cdf.shape[0], s.size))
    known = np.isfinite(cdf).all(axis=1)
    if not known.any():
        return np.array(plain)
    share = (_integral(np.nan_to_num(cdf), s) - _integral(np.nan_to_num(cdf), e)) / length
    return np.where(known[:, None], share, plain)


def failure_share(usual: np.ndarray, ok_share: np.ndarray, failed_share: np.ndarray) -> np.ndarray:
    """(S, A) the share of failures expected among the records of each slot that have
    arrived, when `usual` (S,) of requests fail and the slot's successes and failures have
    arrived in the shares `ok_share` and `failed_share` (S, A). Failures that come back at
    once while successes run on make the newest slots' share larger than `usual`; where
    nothing is expected in yet, `usual` itself."""
    p = np.asarray(usual, dtype=np.float64)[:, None]
    failed, ok = p * failed_share, (1.0 - p) * ok_share
    with np.errstate(invalid="ignore", divide="ignore"):
        q = failed / (failed + ok)
    out: np.ndarray = np.where(failed + ok > 0, q, np.broadcast_to(p, q.shape))
    return out
