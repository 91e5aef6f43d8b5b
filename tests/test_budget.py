"""Budgets: local calendars across DST, period-to-date resets, and forecasts."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from exporter.detectors.budget import (
    BudgetSettings, BudgetTracker, day_index_to_date, fit_daily, local_day_index, period_start, utc_offsets,
)
from exporter.ingest.records import RecordColumns, parse_record, to_columns

NY = ZoneInfo("America/New_York")


def at(tz: ZoneInfo, *args: int) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def recs(rows: list[dict[str, Any]]) -> RecordColumns:
    base = {"provider": "openai", "model": "gpt-4o", "app": "chat"}
    return to_columns([parse_record({**base, **r}, 0.0) for r in rows])


def didx(d: date) -> int:
    return (d - date(1970, 1, 1)).days


def period_end(now: float, period: str, tz: ZoneInfo) -> float:
    """When the local period containing `now` ends: the start of the next one."""
    start = datetime.fromtimestamp(period_start(now, period, tz), tz)
    later = start + timedelta(days=32 if period == "month" else 1, hours=12)     # well inside the next period
    return period_start(later.timestamp(), period, tz)


def daily_series(tr: BudgetTracker) -> dict[str | None, tuple[np.ndarray, np.ndarray]]:
    """What the tracker holds: scope -> (day indices, costs), sorted by day."""
    out = {}
    for scope, ring in tr._rings.items():
        held = ring.day >= 0
        order = np.argsort(ring.day[held])
        out[scope] = (ring.day[held][order].copy(), ring.cost[held][order].copy())
    return out


# --- calendar -------------------------------------------------------------------------

def test_period_boundaries_in_new_york_across_dst() -> None:
    # 2024-03-10: clocks jump 02:00 -> 03:00, the day lasts 23 h.
    t = at(NY, 2024, 3, 10, 15, 0)
    assert period_start(t, "day", NY) == datetime(2024, 3, 10, 5, tzinfo=timezone.utc).timestamp()
    assert period_end(t, "day", NY) - period_start(t, "day", NY) == 23 * 3600
    # 2024-11-03: clocks fall back 02:00 -> 01:00, the day lasts 25 h.
    t = at(NY, 2024, 11, 3, 23, 30)
    assert period_start(t, "day", NY) == datetime(2024, 11, 3, 4, tzinfo=timezone.utc).timestamp()
    assert period_end(t, "day", NY) - period_start(t, "day", NY) == 25 * 3600
    # March in New York starts at 05:00 UTC and ends at 04:00 UTC (EDT by then).
    assert period_start(t - 240 * 86400, "month", NY) == datetime(2024, 3, 1, 5, tzinfo=timezone.utc).timestamp()
    assert period_end(at(NY, 2024, 3, 20, 12), "month", NY) == datetime(2024, 4, 1, 4, tzinfo=timezone.utc).timestamp()
    # Late evening local time is already the next UTC day, but still the same local day.
    t = at(NY, 2024, 1, 31, 22, 0)
    assert datetime.fromtimestamp(t, timezone.utc).day == 1
    assert period_start(t, "month", NY) == at(NY, 2024, 1, 1)
    with pytest.raises(ValueError, match="period"):
        period_start(t, "week", NY)


def test_local_day_index_matches_the_calendar_around_transitions() -> None:
    for tz in (NY, ZoneInfo("Europe/Berlin"), ZoneInfo("Australia/Lord_Howe"), ZoneInfo("America/Havana")):
        # every 7 minutes through both 2024 transitions of the northern zones (and Lord Howe's
        # half-hour shift in April), plus the exact seconds around each change
        ts = np.concatenate([np.arange(at(tz, 2024, 3, 8), at(tz, 2024, 4, 9), 420.0),
                             np.arange(at(tz, 2024, 10, 25), at(tz, 2024, 11, 5), 420.0)])
        got = local_day_index(ts, tz)
        want = np.array([didx(datetime.fromtimestamp(x, tz).date()) for x in ts])
        assert (got == want).all(), tz
        offs = utc_offsets(ts, tz)
        want_off = np.array([datetime.fromtimestamp(x, tz).utcoffset().total_seconds() for x in ts])  # type: ignore[union-attr]
        assert (offs == want_off).all(), tz
    # The second of the switch itself: 2024-03-10 07:00:00 UTC is 03:00 EDT.
    sw = datetime(2024, 3, 10, 7, tzinfo=timezone.utc).timestamp()
    assert utc_offsets(np.array([sw - 1, sw]), NY).tolist() == [-5 * 3600, -4 * 3600]
    assert local_day_index(np.array([at(NY, 1970, 1, 1, 0, 30)]), NY).tolist() == [0]


def test_unknown_time_zone_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        BudgetSettings(timezone="Mars/Olympus")


# --- period to date -------------------------------------------------------------------

def test_period_to_date_resets_at_local_midnight_and_month_start() -> None:
    tr = BudgetTracker(BudgetSettings(timezone="America/New_York", day_usd=100, month_usd=1000))
    tr.observe(recs([
        {"ts": at(NY, 2024, 3, 30, 12), "cost_usd": 5.0},
        {"ts": at(NY, 2024, 3, 31, 23, 30), "cost_usd": 2.0},  # 03:30 UTC on April 1st
        {"ts": at(NY, 2024, 4, 1, 0, 30), "cost_usd": 1.0},
        {"ts": at(NY, 2024, 4, 1, 1, 0)},  # unpriced: counts as 0
    ]))
    row = tr.evaluate(at(NY, 2024, 3, 31, 23, 59)).rows[0]
    assert row.app is None and row.budget_usd == {"day": 100, "month": 1000}
    assert row.period_to_date == {"day": 2.0, "month": 7.0}
    row = tr.evaluate(at(NY, 2024, 4, 1, 2, 0)).rows[0]
    assert row.period_to_date == {"day": 1.0, "month": 1.0}
    assert row.period_start["day"] == at(NY, 2024, 4, 1)
    assert row.period_start["month"] == at(NY, 2024, 4, 1)


def test_rows_for_budgets_and_spending_apps() -> None:
    s = BudgetSettings(apps={"search": {"day": 10.0}, "idle": {"month": 50.0}})
    tr = BudgetTracker(s)
    now = datetime(2024, 5, 15, 12, tzinfo=timezone.utc).timestamp()
    tr.observe(recs([{"ts": now - 60, "app": "search", "cost_usd": 1.5},
                     {"ts": now - 50, "app": "chat", "cost_usd": 0.5},
                     {"ts": now - 40, "app": "free"}]))  # unpriced only: no spend, no budget, no row
    rows = {r.app: r for r in tr.evaluate(now).rows}
    assert list(rows) == [None, "chat", "idle", "search"]
    assert rows[None].budget_usd == {"day": None, "month": None}
    assert rows[None].period_to_date["day"] == pytest.approx(2.0)
    assert rows["search"].budget_usd == {"day": 10.0, "month": None}
    assert rows["idle"].budget_usd == {"day": None, "month": 50.0} and rows["idle"].period_to_date["day"] == 0.0
    # No complete day of history: forecasts are unknown, said so rather than guessed.
    assert math.isnan(rows[None].forecast["30d"].value) and rows[None].method.startswith("none")
    d = tr.evaluate(now).to_dict()
    assert d["today"] == "2024-05-15" and d["rows"][0]["forecast"]["30d"] == {"value": None, "lower": None, "upper": None}


# --- forecasting ----------------------------------------------------------------------

WEEKLY = np.array([100.0, 110.0, 105.0, 100.0, 95.0, 30.0, 25.0])  # Mon..Sun


def seasonal_history(first: date, days: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = didx(first) + np.arange(days)
    dow = np.array([day_index_to_date(int(d)).weekday() for d in idx])
    return idx, WEEKLY[dow] * (1 + noise * rng.standard_normal(days))


def expected(d0: date, d1: date) -> float:
    """True mean spend of the whole days d0..d1 under WEEKLY."""
    return float(sum(WEEKLY[(d0 + timedelta(days=k)).weekday()] for k in range((d1 - d0).days + 1)))


def test_month_end_forecast_on_a_weekly_series() -> None:
    tr = BudgetTracker(BudgetSettings(timezone="Europe/Berlin", month_usd=3000))
    ber = ZoneInfo("Europe/Berlin")
    # 8 weeks of history up to 2024-05-16 (a Thursday), then half of the 17th spent.
    days, cost = seasonal_history(date(2024, 3, 22), 56, noise=0.05)
    tr.load_daily(None, days, cost)
    today = date(2024, 5, 17)
    tr.observe(recs([{"ts": at(ber, 2024, 5, 17, 9), "cost_usd": 40.0}]))
    row = tr.evaluate(at(ber, 2024, 5, 17, 13)).rows[0]
    assert row.method.startswith("weekly seasonal") and row.history_days == 56
    may_so_far = float(cost[days >= didx(date(2024, 5, 1))].sum()) + 40.0
    assert row.period_to_date["month"] == pytest.approx(may_so_far)
    truth = may_so_far + (WEEKLY[today.weekday()] - 40.0) + expected(date(2024, 5, 18), date(2024, 5, 31))
    fc = row.forecast["month_end"]
    assert fc.value == pytest.approx(truth, rel=0.02)
    assert fc.lower <= truth <= fc.upper and fc.lower >= may_so_far
    assert fc.upper - fc.lower < 0.15 * truth
    for h, n in (("30d", 30), ("60d", 60), ("90d", 90)):
        want = expected(date(2024, 5, 18), date(2024, 5, 17) + timedelta(days=n))
        assert row.forecast[h].value == pytest.approx(want, rel=0.04), h
        assert row.forecast[h].lower < want < row.forecast[h].upper, h
    # A flat average would be wrong exactly where the week matters: the last two weeks of
    # May hold four weekend days of ~28 against weekday ~100.
    flat = may_so_far + (WEEKLY.mean() * 14.5)
    assert abs(fc.value - truth) < abs(flat - truth)


def test_forecast_ignores_a_single_incident_day() -> None:
    days, cost = seasonal_history(date(2024, 3, 22), 56, noise=0.03, seed=2)
    spiked = cost.copy()
    spiked[-3] *= 10  # one runaway day three days ago
    a = fit_daily(cost, int(days[-1]))
    b = fit_daily(spiked, int(days[-1]))
    fut = np.arange(days[-1] + 1, days[-1] + 31)
    assert b.total(fut)[0] == pytest.approx(a.total(fut)[0], rel=0.05)


def test_short_history_falls_back_to_a_flat_mean() -> None:
    days = didx(date(2024, 5, 10)) + np.arange(5)
    model = fit_daily(np.array([10.0, 12.0, 8.0, 11.0, 9.0]), int(days[-1]))
    assert model.method.startswith("flat mean of the last 5 days")
    value, lo, hi = model.total(np.arange(days[-1] + 1, days[-1] + 31))
    assert value == pytest.approx(300.0) and lo < 300 < hi and lo >= 0
    one = fit_daily(np.array([10.0]), int(days[-1]))
    v1, lo1, hi1 = one.total(np.arange(30))
    assert v1 == pytest.approx(300.0) and hi1 - lo1 > hi - lo  # one day: a wider band


def test_history_round_trip_and_reload_does_not_double() -> None:
    tr = BudgetTracker(BudgetSettings())
    now = datetime(2024, 6, 20, 12, tzinfo=timezone.utc).timestamp()
    rows = [{"ts": now - k * 86400 - 3600, "app": ("a", "b")[k % 2], "cost_usd": float(k + 1)} for k in range(30)]
    tr.observe(recs(rows))
    saved = daily_series(tr)
    assert set(saved) == {None, "a", "b"}
    assert saved[None][1].sum() == pytest.approx(sum(range(1, 31)))
    before = tr.evaluate(now).to_dict()
    fresh = BudgetTracker(BudgetSettings())
    for _ in range(2):
        for scope, (d, c) in saved.items():
            fresh.load_daily(scope, d, c)
    assert fresh.evaluate(now).to_dict() == before
    with pytest.raises(ValueError, match="same length"):
        fresh.load_daily(None, np.array([1, 2]), np.array([1.0]))


def test_history_is_bounded() -> None:
    tr = BudgetTracker(BudgetSettings(history_days=60))
    start = datetime(2024, 1, 1, 12, tzinfo=timezone.utc).timestamp()
    tr.observe(recs([{"ts": start + k * 86400, "cost_usd": 1.0} for k in range(200)]))
    days, cost = daily_series(tr)[None]
    assert days.shape[0] <= 67 and days.max() - days.min() < 67
    assert int(days.max()) == int(local_day_index(np.array([start + 199 * 86400]))[0])


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="unknown period"):
        BudgetSettings(apps={"x": {"week": 5.0}})
    with pytest.raises(ValueError, match="non-negative"):
        BudgetSettings(day_usd=-1.0)
