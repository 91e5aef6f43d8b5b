"""A site used at work: quiet weekends are part of the usual traffic once two weeks agree.

The expected count of an hour is the time of day's median, scaled where the last two
weeks agree that a quarter day of the week runs above or below it (`weekly_profile`).
These tests judge the real evaluator on weeks of generated traffic whose Saturdays and
Sundays (UTC) carry a quarter of the weekday rate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
from helpers import DAY, HOUR, Harness, Stream, Traffic, every, generate, row, weekday

from exporter.anomaly import baseline as bl
from exporter.anomaly.evaluator import Snapshot

MONDAY = 1_800_000_000.0 - 1_800_000_000.0 % DAY + 3 * DAY          # 2027-01-18, a Monday
OFFICE = (
    Stream("office", "gpt-4o-mini", rate=600, session=3, weekend=0.25),
    Stream("helpdesk", "claude-3-5-haiku", "anthropic", rate=240, weekend=0.25, ttft=0.5, otps=50),
)
VOLUME = ("request_rate", "cost_per_hour", "token_velocity")


def drops(snaps: Sequence[Snapshot]) -> list[tuple[str, str, str]]:
    """(weekday and time, signal, scope) of every volume verdict that is not ok."""
    out = []
    for s in snaps:
        for r in s.rows():
            if r["signal"] in VOLUME and r["severity"] != "ok":
                when = f"{['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'][int(weekday(np.array(s.t)))]} " \
                       f"{(s.t % DAY) / HOUR:04.1f}h"
                out.append((when, r["signal"], f"{r['scope']}:{r['app'] or r['model'] or ''}"))
    return out


@pytest.fixture(scope="module")
def weeks() -> Traffic:
    return generate(OFFICE, MONDAY - 2 * DAY, MONDAY + 22 * DAY, seed=3)


def judge_weekend(traffic: Traffic, harness: Harness, saturday: float) -> list[Snapshot]:
    """Feed everything before `saturday`, then judge its weekend and the Monday morning after,
    every 20 minutes."""
    harness.feed(traffic.take(traffic.ts < saturday))
    return harness.run(traffic.take(traffic.ts >= saturday), every(saturday, 2 * 24 * 60 + 12 * 60, step=20))


def test_a_quiet_weekend_is_usual_after_two_weeks(weeks: Traffic) -> None:
    """The third weekend, with two like it in the history: no volume verdict on any scope,
    from Saturday 00:00 to Monday noon, and the expected rate is the weekend's."""
    saturday = MONDAY + 19 * DAY
    snaps = judge_weekend(weeks, Harness(), saturday)
    assert drops(snaps) == []
    sunday_noon = next(s for s in snaps if s.t >= saturday + DAY + 12 * HOUR)
    ratio = row(sunday_noon, "request_rate", "global")["ratio"]
    assert 0.6 < ratio < 1.6, ratio


def test_one_weekend_is_not_yet_a_pattern(weeks: Traffic) -> None:
    """The same weekend with one week of history (a horizon of eight days): the weekday
    rate is still expected, so the weekend's rate is far below it. (The test above can
    fail: this is what it would see without the weekly pattern.)"""
    saturday = MONDAY + 19 * DAY
    snaps = judge_weekend(weeks, Harness(horizon=8 * DAY), saturday)
    sunday_noon = next(s for s in snaps if s.t >= saturday + DAY + 12 * HOUR)
    ratio = row(sunday_noon, "request_rate", "global")["ratio"]
    assert ratio < 0.45, ratio


def falls(snaps: Sequence[Snapshot]) -> list[tuple[str, str, str]]:
    return [d for d in drops(snaps) if d[1] == "request_rate"]


@pytest.fixture(scope="module")
def young(weeks: Traffic) -> Traffic:
    """The same site, first seen on a Monday: a deployment in its first two weeks."""
    return weeks.take(weeks.ts >= MONDAY)


def test_the_second_weekend_is_no_fall_against_the_first(young: Traffic) -> None:
    """In a site's second week the weekly pattern cannot be read (it needs two weeks that
    agree), and against the time of day alone its weekend reads as a fall of every scope
    (`test_one_weekend_is_not_yet_a_pattern`). A fall is also judged against the same
    hours a week before: the first weekend's rate, so the second weekend raises no
    request-rate verdict. Without that, this weekend falls on every scope."""
    assert falls(judge_weekend(young, Harness(), MONDAY + 12 * DAY)) == []


def test_an_outage_in_the_second_week_is_still_a_fall(young: Traffic) -> None:
    """The second Saturday afternoon at a twentieth of the first one's rate: a fall against
    last week's same hours too, caught on all traffic."""
    saturday = MONDAY + 12 * DAY
    rng = np.random.default_rng(8)
    outage = young.where(saturday + 12 * HOUR, saturday + 18 * HOUR) & (rng.random(len(young)) > 0.05)
    snaps = judge_weekend(young.take(~outage), Harness(), saturday)
    assert ("request_rate", "global:") in {(sig, scope) for _, sig, scope in falls(snaps)}, falls(snaps)


def test_no_fall_is_judged_before_a_week_is_seen(young: Traffic) -> None:
    """The first weekend has no week before it: no fall is judged at all, not even of an
    outage (a rise still is). What a quiet weekend is cannot be told from a fall yet."""
    saturday = MONDAY + 5 * DAY
    harness = Harness()
    snaps = judge_weekend(young, harness, saturday)
    assert falls(snaps) == []
    sunday_noon = next(s for s in snaps if s.t >= saturday + DAY + 12 * HOUR)
    assert row(sunday_noon, "request_rate", "global")["ratio"] < 0.45      # far below the weekday rate


def test_a_fall_is_judged_against_last_week_only_without_two_weeks() -> None:
    """The pure function: a young judged hour (less than two weeks after the scope's first)
    expects of a fall the smaller of the profile and the same hour a week back (NaN where
    that is unknown); every other hour keeps its profile."""
    hours = np.arange(0, 2 * bl.WEEK_HOURS) + 1000 * bl.WEEK_HOURS
    judged = hours[-1] + 1 + np.arange(-8, 3)                   # the held windows' hours and the next two
    slot = judged % bl.WEEK_HOURS
    profile = np.full((3, bl.WEEK_HOURS), 100.0)
    values = np.full((3, hours.size), 100.0)
    values[:, judged[4] - bl.WEEK_HOURS - hours[0]] = 20.0      # a week back, one judged hour ran at a fifth
    values[:, judged[5] - bl.WEEK_HOURS - hours[0]] = 300.0     # and the next at three times
    values[2, : judged[7] - bl.WEEK_HOURS - hours[0]] = np.nan  # first seen a week before judged[7]
    young = np.zeros((3, judged.size), dtype=bool)
    young[1:] = True                                            # scope 0 has two weeks
    out = bl.against_last_week(profile, young, values, hours, judged)
    np.testing.assert_array_equal(out[0], profile[0])
    assert out[1, slot[4]] == 20.0 and (np.delete(out[1], slot[4]) == 100.0).all()
    assert np.isnan(out[2, slot[:7]]).all() and (np.delete(out[2], slot[:7]) == 100.0).all()
    assert bl.against_last_week(profile, np.zeros_like(young), values, hours, judged) is profile


def test_a_one_off_outage_is_not_learned_as_the_week(weeks: Traffic) -> None:
    """A Wednesday afternoon at a tenth of its rate in the second week is one week's, not
    the week's pattern: the next Wednesday afternoon at its usual rate is quiet, and the
    same outage again is still caught."""
    wednesday_2 = MONDAY + 9 * DAY
    outage = weeks.where(wednesday_2 + 12 * HOUR, wednesday_2 + 18 * HOUR)
    rng = np.random.default_rng(5)
    history = weeks.take(~outage | (rng.random(len(weeks)) < 0.1))
    wednesday_3 = wednesday_2 + 7 * DAY
    base = Harness().feed(history.take(history.ts < wednesday_3 + 12 * HOUR))
    later = history.take(history.ts >= wednesday_3 + 12 * HOUR)
    times = every(wednesday_3 + 12 * HOUR, 6 * 60, step=20)
    assert drops(base.copy().run(later, times)) == []
    again = later.take(~later.where(wednesday_3 + 12 * HOUR, wednesday_3 + 18 * HOUR)
                       | (rng.random(len(later)) < 0.1))
    caught = [d for d in drops(base.copy().run(again, times)) if d[1] == "request_rate"]
    assert ("request_rate", "global:") in {(sig, scope) for _, sig, scope in caught}, caught


def test_the_week_is_read_only_where_two_weeks_agree() -> None:
    """The pure function: a quarter day of the week is scaled where the last two weeks'
    shifts both go the same way beyond the noise between the weeks: by their mean where
    they are alike within that noise, by the smaller where one strays further (25 and 50
    of 100; 400 and 150); not at all where they disagree, where one is unknown, or where
    one is within the noise."""
    hours = np.arange(0, 2 * bl.WEEK_HOURS) + 1000 * bl.WEEK_HOURS      # two whole weeks, aligned
    rng = np.random.default_rng(1)
    daily = np.full((5, 24), 100.0)
    values = np.exp(np.log(100.0) + 0.05 * rng.standard_normal((5, hours.size)))   # noise of about 0.02 a block
    block = (hours // bl.WEEK_BLOCK_HOURS) % bl.WEEK_BLOCKS
    first = (np.arange(hours.size) < bl.WEEK_HOURS)[block == 5]
    values[0, block == 5] = np.where(first, 25.0, 50.0)       # both lower, one far more: the smaller
    values[1, block == 5] = np.where(first, 25.0, 200.0)      # one lower, one higher: no shift
    values[2, block == 5] = np.where(first, np.nan, 25.0)     # one week unknown: no shift
    values[3, block == 5] = np.where(first, 25.0, 101.0)      # one week within the noise: no shift
    values[4, block == 5] = np.where(first, 24.8, 25.2)       # both lower, alike within the noise: their mean
    values[0, block == 9] = np.where(first, 400.0, 150.0)      # both higher, one far more: the smaller
    out = bl.weekly_profile(daily, values, hours, floor=0.0)
    at = slice(5 * bl.WEEK_BLOCK_HOURS, 6 * bl.WEEK_BLOCK_HOURS)
    np.testing.assert_allclose(out[0, at], 50.0)
    np.testing.assert_allclose(out[1:4, at], 100.0)
    np.testing.assert_allclose(out[4, at], np.sqrt(24.8 * 25.2))
    at9 = slice(9 * bl.WEEK_BLOCK_HOURS, 10 * bl.WEEK_BLOCK_HOURS)
    np.testing.assert_allclose(out[0, at9], 150.0)
    rest = np.ones(bl.WEEK_HOURS, dtype=bool)
    rest[at], rest[at9] = False, False
    assert np.all(np.abs(np.log(out[:, rest] / 100.0)) < 0.1)
