"""Whose anomaly is it: `apart_log_odds`, the evidence that one app's failures are its own
and not its model's, on simulated failures of both kinds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exporter import evidence
from exporter.evidence import APART_EVIDENCE, apart_log_odds

USUAL = 0.01          # the model's usual share of failing requests


def ever_apart(rng: np.random.Generator, p_app: float, p_rest: float, rate_app: float, rate_rest: float,
               events: int, minutes: int = 120) -> float:
    """Share of `events` simulated events in which the evidence ever reaches the bar, judged
    each minute on the hour before (the evaluator's configured window): an hour at the usual
    share, then `minutes` of the event, requests Poisson per minute."""
    total = 60 + minutes
    usual = np.r_[np.full(60, USUAL), np.ones(minutes)]
    n_a, n_r = rng.poisson(rate_app, (events, total)), rng.poisson(rate_rest, (events, total))
    e_a = rng.binomial(n_a, np.where(usual < 1, USUAL, p_app))
    e_r = rng.binomial(n_r, np.where(usual < 1, USUAL, p_rest))

    def hours(x: np.ndarray) -> np.ndarray:          # sums over each trailing hour ending in the event
        c = np.cumsum(x, axis=1)
        return c[:, 60:] - c[:, :-60]
    odds = apart_log_odds(hours(e_a), hours(n_a), hours(e_r), hours(n_r), USUAL)
    return float((odds >= APART_EVIDENCE).any(axis=1).mean())


@pytest.mark.parametrize("rate_app,rate_rest", [(5, 2), (20, 5), (5, 0.5), (1, 1), (50, 50)])
def test_a_fault_of_the_model_is_rarely_put_on_one_app(rate_app: float, rate_rest: float) -> None:
    """Every request to the model fails alike (20 %, or 5 %), the app sending more or fewer
    of them than the rest: over two hours of minute-by-minute verdicts the evidence wrongly
    reaches the bar in at most about one event in twenty (Wald's bound for one growing
    sample), while an app whose own requests fail (60 %, the rest at the usual 1 %) is
    found in every event."""
    rng = np.random.default_rng(int(rate_app * 100 + rate_rest))
    for share in (0.2, 0.05):
        assert ever_apart(rng, share, share, rate_app, rate_rest, 1000) <= 0.06, share
    assert ever_apart(rng, 0.6, USUAL, rate_app, rate_rest, 200) == 1.0


def test_apart_log_odds_cases() -> None:
    # 30 of 60 app requests fail, the other 40 requests all succeed: strongly the app's
    strong = float(apart_log_odds(30, 60, 0, 40, USUAL))
    assert strong == pytest.approx(40 * math.log(0.99 / 0.7), rel=1e-6) and strong > APART_EVIDENCE
    # the same, overdispersed 4 times: a quarter of the evidence
    assert float(apart_log_odds(30, 60, 0, 40, USUAL, 4.0)) == pytest.approx(strong / 4)
    # the rest failing as the app does: against
    assert float(apart_log_odds(30, 60, 20, 40, USUAL)) < 0
    # ten failures of ten calls and one good call elsewhere prove little
    assert 0 < float(apart_log_odds(10, 10, 0, 1, USUAL)) < APART_EVIDENCE
    # no other traffic, or nothing above the usual share: no evidence either way
    assert float(apart_log_odds(30, 60, 0, 0, USUAL)) == 0.0
    assert float(apart_log_odds(0, 60, 0, 40, USUAL)) == 0.0


def test_a_high_severity_without_the_page_budgets_evidence_is_a_warning() -> None:
    """`page_evidence` lowers a high verdict to a warning where |z| is short of the page
    threshold, in either direction; warnings, quiet scopes and strong evidence are left
    as they are, and NaN evidence never pages."""
    sev = np.array([2, 2, 2, 2, 1, 0, 2])
    z = np.array([4.2, -4.2, 4.6, -4.6, 3.0, 9.0, np.nan])
    np.testing.assert_array_equal(evidence.page_evidence(sev, z, 4.5), [1, 1, 2, 2, 1, 0, 1])
    # a fifth of the budget asks about a third of a z more at the scale of a site
    warn, page = evidence.z_threshold(3600, 56, 1.0, 9), evidence.z_threshold(3600, 56, 0.2, 9)
    assert 0.25 < page - warn < 0.45
