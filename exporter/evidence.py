"""Count-aware significance: how surprising a window's value is, as a z-score.

Every anomaly verdict asks two questions: is the change big enough to matter (the
signal's ratio threshold), and is it real rather than noise? This module answers the
second. Each test turns what a window holds (a count of requests or errors, a number of
slow requests, a mean of log token sizes) into a z-score that is roughly standard normal
when nothing is wrong, using the noise model that fits the quantity:

- request counts: overdispersed (quasi-)Poisson sampling (requests come in bursts, so a
  count's variance is `dispersion` times its mean) and, separately, the day-to-day variation of
  the level itself (log-normal). A count must be surprising under both to count as
  evidence, so a small scope needs a bigger deviation than a large one;
- error counts and threshold exceedances (slow requests, slow tokens): binomial, scaled
  for overdispersion;
- means of per-request log sizes: normal, with a variance that shrinks with the number
  of requests.

Deviance-based z-scores (the signed square root of the likelihood-ratio statistic) stay
close to normal even for counts of a few, where a normal approximation of the count
itself would not.

`apart_log_odds` answers a third question, once a verdict stands: whose anomaly is it?
When one app's requests to a model fail, the model's other traffic either failed with
them (the model's fault) or went on at its usual rate (the app's own: a retry storm, a
bad request, its quota).

`z_threshold` says how large a z must be: the false-alarm budget (false warnings a week
over all series) spread over every series and over the independent windows of each length
in a week (a Bonferroni bound), so the false rate does not grow with the number of apps
and models watched.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

WEEK = 7 * 86400.0
_NORMAL = NormalDist()


def nb_z(n: np.ndarray, mean: np.ndarray, dispersion: np.ndarray | float) -> np.ndarray:
    """Signed root deviance of count `n` against a negative binomial with the given mean and
    variance `dispersion` x mean (Poisson when dispersion is 1)."""
    n = np.asarray(n, dtype=np.float64)
    mean = np.maximum(np.asarray(mean, dtype=np.float64), 1e-9)
    extra = np.maximum(np.asarray(dispersion, dtype=np.float64) - 1.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(extra > 1e-9, mean / np.maximum(extra, 1e-9), np.inf)    # NB size parameter
        term_n = np.where(n > 0, n * np.log(n / mean), 0.0)
        # Poisson limit of (n + k) log((n + k) / (mean + k)) as k grows: n - mean
        term_k = np.where(np.isinf(k), n - mean, (n + k) * np.log((n + k) / (mean + k)))
        dev = 2.0 * (term_n - term_k)
    return np.sign(n - mean) * np.sqrt(np.maximum(dev, 0.0))


def level_z(n: np.ndarray, mean: np.ndarray, level_sd: np.ndarray, dispersion: np.ndarray | float) -> np.ndarray:
    """z of log(n / mean) when the level itself varies log-normally with `level_sd` (day to
    day) on top of the sampling variance of the count."""
    n = np.asarray(n, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(level_sd, dtype=np.float64) ** 2 + np.asarray(dispersion, dtype=np.float64) / np.maximum(mean, 0.5)
    return np.log((n + 0.5) / (mean + 0.5)) / np.sqrt(var)


def quasi_poisson_z(n: np.ndarray, mean: np.ndarray, dispersion: np.ndarray | float) -> np.ndarray:
    """Signed root of the Poisson deviance of count `n` scaled down by the overdispersion:
    requests that arrive in bursts of about `dispersion` carry that many times less
    information than independent ones, in both tails (a negative binomial would make an
    empty window far more surprising than bursty arrivals make it)."""
    return nb_z(n, mean, 1.0) / np.sqrt(np.maximum(np.asarray(dispersion, dtype=np.float64), 1.0))


def count_z(n: np.ndarray, mean: np.ndarray, level_sd: np.ndarray, dispersion: np.ndarray | float,
            level_df: np.ndarray | float = np.inf) -> np.ndarray:
    """Evidence that a count left its expected level: the smaller of the sampling and the
    level z-scores (with the sign of the deviation). A burst that sampling noise explains
    and a swing that an ordinary busy or quiet day explains both stay quiet. The level's
    spread is read off the baseline's hours, `level_df` degrees of freedom, so its z is a
    Student t (`t_as_z`): a young scope's day of hours asks for more."""
    zs = quasi_poisson_z(n, mean, dispersion)
    zl = t_as_z(level_z(n, mean, level_sd, dispersion), level_df)
    return np.sign(zs) * np.minimum(np.abs(zs), np.abs(zl))


def binomial_z(k: np.ndarray, n: np.ndarray, p: np.ndarray | float, dispersion: np.ndarray | float = 1.0) -> np.ndarray:
    """Signed root deviance of k successes in n trials against probability p, divided by the
    square root of the overdispersion; 0 where n is 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(k > 0, k * np.log(k / (n * p)), 0.0)
        b = np.where(n - k > 0, (n - k) * np.log((n - k) / (n * (1 - p))), 0.0)
    dev = np.where(n > 0, 2.0 * (a + b), 0.0)
    return np.sign(k - n * p) * np.sqrt(np.maximum(dev, 0.0)) / np.sqrt(np.maximum(dispersion, 1.0))


def mean_z(mean: np.ndarray, n: np.ndarray, centre: np.ndarray, var: np.ndarray,
           dispersion: np.ndarray | float) -> np.ndarray:
    """z of a window's mean of n values against the baseline centre, for values of variance
    `var` whose means vary `dispersion` times more than independent values would; 0 where
    n is 0."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (mean - centre) / np.sqrt(np.asarray(dispersion) * var / np.maximum(n, 1.0))
    return np.where((n > 0) & np.isfinite(z), z, 0.0)


def t_as_z(t: np.ndarray, df: np.ndarray | float) -> np.ndarray:
    """The standard normal z with the same tail probability as Student's t with `df`
    degrees of freedom (Wallace's approximation, within about 1 % of the exact value from
    4 degrees of freedom up; t itself where df is infinite, NaN where it is not positive).
    A z whose scale was read off a limited number of the baseline's values (the spread of
    its hours about their time of day) is such a t: its tail is heavier than the normal
    one the thresholds assume, so it is read as this z before it is compared with them."""
    t = np.asarray(t, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z = (8.0 * df + 1.0) / (8.0 * df + 3.0) * np.sqrt(df * np.log1p(t * t / df))
    return np.where(np.isinf(df), t, np.where(df > 0, np.sign(t) * z, np.nan))


# A Bayes factor of 20 ("strong" on the Kass-Raftery scale). By Wald's inequality, traffic
# that fails alike everywhere reaches it on an accumulating sample with a chance of at most
# 1/20, so a fault of a model is put on one of its apps about once in twenty faults.
APART_EVIDENCE = math.log(20.0)


def apart_log_odds(e_a: np.ndarray, n_a: np.ndarray, e_r: np.ndarray, n_r: np.ndarray,
                   usual: np.ndarray | float, dispersion: np.ndarray | float = 1.0) -> np.ndarray:
    """Log odds that the rest's e_r events of n_r trials came at their `usual` probability
    rather than at the probability shared with one part's e_a of n_a (the pooled share,
    its estimate were both to fail alike), divided by the overdispersion. Positive: the
    rest stayed usual while the part moved, so the part's change is its own. 0 where the
    rest has no trials or the pooled share is not above the usual one."""
    e_a, n_a, e_r, n_r = (np.asarray(v, dtype=np.float64) for v in (e_a, n_a, e_r, n_r))
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.clip((e_a + e_r) / np.maximum(n_a + n_r, 1.0), 1e-9, 1 - 1e-9)
        p0 = np.clip(np.asarray(usual, dtype=np.float64), 1e-9, 1 - 1e-9)
        odds = e_r * np.log(p0 / pooled) + (n_r - e_r) * np.log((1 - p0) / (1 - pooled))
    ok = (n_r > 0) & (pooled > p0)
    return np.where(ok, odds / np.maximum(dispersion, 1.0), 0.0)


def z_threshold(window_s: float, tests: int, budget_per_week: float, windows: int) -> float:
    """The z a one-sided test on windows of `window_s` must reach so that `tests` series,
    each judged on `windows` window lengths, raise about `budget_per_week` false alarms a
    week in total: a week holds WEEK / window_s independent windows of that length."""
    per_test = budget_per_week / (max(tests, 1) * max(windows, 1) * (WEEK / window_s))
    return _NORMAL.inv_cdf(1.0 - min(max(per_test, 1e-15), 0.5))


def page_evidence(severity: np.ndarray, z: np.ndarray, z_page: np.ndarray | float) -> np.ndarray:
    """Severity (0 ok, 1 warning, 2 high) with a high one lowered to a warning where its
    evidence |z| falls short of `z_page`, the threshold of the page budget (the setting
    `page_budget_share` of the warnings' budget). At small counts any count that passes
    the warning threshold is a large ratio, so the effect alone cannot tell a quiet scope's
    rare false alarm from a page; stronger evidence can. Arrays broadcast alike; NaN
    evidence never pages."""
    with np.errstate(invalid="ignore"):
        strong = np.abs(np.asarray(z, dtype=np.float64)) >= z_page
    return np.where((severity >= 2) & ~strong, 1, severity).astype(np.asarray(severity).dtype)


def normal_quantile(p: float) -> float:
    return _NORMAL.inv_cdf(p)
