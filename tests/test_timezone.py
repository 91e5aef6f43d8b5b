"""A site whose users change their clocks: the baseline learns their local hours.

Traffic follows its users' clocks. Learned in UTC, the day of a site in Berlin moves an
hour earlier on the last Sunday of March, and every ramp hour of the week after reads as
a shift. With `timezone` set, the baseline's hours of the day and of the week are the
users' own (`zones.local_hours`, `baseline.on_local_hours`), and nothing moves. These
tests judge the real evaluator on generated traffic whose daily cycle follows Berlin's
clocks across the change of 2027-03-28.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import pytest
from helpers import DAY, HOUR, Harness, Stream, Traffic, engine_at, every, generate

from exporter.anomaly.baseline import on_local_hours
from exporter.anomaly.evaluator import Snapshot
from exporter.config import ConfigError, load_settings
from exporter.zones import local_hours

CHANGE = datetime(2027, 3, 28, 1, tzinfo=timezone.utc).timestamp()     # clocks forward in Europe
MONDAY = CHANGE + 23 * HOUR                                              # the first Monday after it
BERLIN = (
    Stream("office", "gpt-4o-mini", rate=900, night=0.02, peak_hour=13.0, session=3, zone="Europe/Berlin"),
    Stream("helpdesk", "claude-3-5-haiku", "anthropic", rate=300, night=0.05, peak_hour=11.0,
           ttft=0.5, otps=50, zone="Europe/Berlin"),
)
VOLUME = ("request_rate", "cost_per_hour", "token_velocity")


def verdicts(snaps: Sequence[Snapshot]) -> list[tuple[str, str, str]]:
    """(UTC time, signal, scope) of every volume verdict that is not ok."""
    return [(datetime.fromtimestamp(s.t, timezone.utc).strftime("%a %H:%M"), r["signal"],
             f"{r['scope']}:{r['app'] or r['model'] or ''}")
            for s in snaps for r in s.rows() if r["signal"] in VOLUME and r["severity"] != "ok"]


@pytest.fixture(scope="module")
def weeks() -> Traffic:
    return generate(BERLIN, MONDAY - 15 * DAY, MONDAY + 3 * DAY, seed=4)


def judge_after_the_change(traffic: Traffic, harness: Harness) -> list[Snapshot]:
    """Feed the two weeks before the Monday after the change, then judge that Monday and
    Tuesday every 20 minutes."""
    harness.feed(traffic.take(traffic.ts < MONDAY))
    return harness.run(traffic.take(traffic.ts >= MONDAY), every(MONDAY, 2 * 24 * 60, step=20))


def test_local_hours_skip_and_repeat_at_the_changes() -> None:
    hours = np.arange(int(CHANGE // HOUR) - 2, int(CHANGE // HOUR) + 3)
    assert local_hours(hours, "UTC") is hours
    assert (local_hours(hours, "Europe/Berlin") - hours).tolist() == [1, 1, 2, 2, 2]   # CET, then CEST
    back = datetime(2027, 10, 31, 1, tzinfo=timezone.utc).timestamp()
    hours = np.arange(int(back // HOUR) - 2, int(back // HOUR) + 2)
    local = local_hours(hours, "Europe/Berlin")
    assert np.diff(local).tolist() == [1, 0, 1]                                      # 02:00 local twice
    assert (local_hours(hours, "Asia/Kolkata") - hours).tolist() == [6] * 4          # +05:30, to the hour


def test_on_local_hours_lays_values_out_on_the_local_clock() -> None:
    values = np.arange(8.0).reshape(2, 4)
    same, hours = on_local_hours(values, np.array([10, 11, 12, 13]))
    assert same is values and hours.tolist() == [10, 11, 12, 13]
    skipped, hours = on_local_hours(values, np.array([10, 11, 13, 14]))
    assert hours.tolist() == [10, 11, 12, 13, 14]
    assert np.array_equal(skipped, [[0, 1, np.nan, 2, 3], [4, 5, np.nan, 6, 7]], equal_nan=True)
    twice, hours = on_local_hours(values, np.array([10, 11, 11, 12]))
    assert hours.tolist() == [10, 11, 12] and twice.tolist() == [[0, 2, 3], [4, 6, 7]]


def test_the_week_after_the_change_is_usual_in_local_hours(weeks: Traffic) -> None:
    """With timezone Europe/Berlin, the Monday and Tuesday after the change give no volume
    verdict on any scope."""
    assert verdicts(judge_after_the_change(weeks, Harness(timezone="Europe/Berlin"))) == []


def test_learned_in_utc_the_same_days_read_as_shifted(weeks: Traffic) -> None:
    """The same days learned in UTC (the default): the day came an hour early, and the
    morning ramp reads as a rise. (The test above can fail: this is what it would see.)"""
    found = verdicts(judge_after_the_change(weeks, Harness()))
    assert any(signal == "request_rate" for _, signal, _ in found), found


def test_a_time_zone_is_checked_by_name() -> None:
    assert load_settings(flags={"timezone": "Europe/Berlin"}, environ={}).timezone == "Europe/Berlin"
    with pytest.raises(ConfigError, match="timezone.*unknown time zone 'Europe/Atlantis'"):
        load_settings(flags={"timezone": "Europe/Atlantis"}, environ={})


def test_budgets_count_in_the_same_zone_unless_told_otherwise() -> None:
    assert load_settings(flags={}, environ={}).budgets.timezone == "UTC"
    assert load_settings(flags={"timezone": "Europe/Berlin"}, environ={}).budgets.timezone == "Europe/Berlin"
    own = load_settings(flags={"timezone": "Europe/Berlin"}, environ={"LLM_EXPORTER_BUDGETS__TIMEZONE": "Asia/Tokyo"})
    assert (own.timezone, own.budgets.timezone) == ("Europe/Berlin", "Asia/Tokyo")


@pytest.mark.parametrize("tz", ["Europe/Berlin", "UTC"])
def test_the_engine_judges_in_the_configured_zone(weeks: Traffic, tmp_path, tz: str) -> None:
    """The same through the real engine and SQLite store, configured as a user would
    (`timezone`): the Monday morning after the change is quiet in Berlin's hours and not
    in UTC's."""
    settings = load_settings(flags={"db": str(tmp_path / "usage.db"), "timezone": tz}, environ={})
    engine, clock = engine_at(settings, MONDAY)
    records = weeks.take(weeks.ts < MONDAY + 12 * HOUR).records()
    fed, flagged = 0, []
    for t in every(MONDAY, 12 * 60, step=30):
        clock.t = t
        upto = next((i for i in range(fed, len(records)) if records[i]["ts"] > t), len(records))
        for i in range(fed, upto, 20_000):                    # live ingest up to the evaluation
            engine.ingest(records[i:min(i + 20_000, upto)])
        fed = upto
        snap = engine.evaluate(t)
        assert snap is not None
        flagged += [r["scope"] for r in snap.rows() if r["signal"] == "request_rate" and r["severity"] != "ok"]
    engine.close()
    assert (flagged == []) == (tz == "Europe/Berlin"), flagged
