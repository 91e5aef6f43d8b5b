"""The request rate against the same time of day: nights are not outages, outages still are.

Traffic with a strong daily cycle (helpers.generate): the rate peaks at 15:00 UTC and falls
to a third of that at night, with sessions, busy and quiet days and hourly jitter. Ten days
of history, then the eleventh day judged live, every few minutes. A window's request count
is compared with the same time of day on up to seven earlier days (their median), or, for a
scope younger than three days, with the day before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import pytest
from helpers import DAY, HOUR, Harness, Stream, Traffic, every, first_flagged, generate, row

from exporter.anomaly.evaluator import Snapshot

DAY0 = 1_800_000_000.0 - 1_800_000_000.0 % DAY       # a midnight (UTC)
T = DAY0 + 10 * DAY                                   # the day judged
NOON = T + 14 * HOUR                                  # daytime anomalies start at 14:00
CYCLE = (Stream("web", "gpt-4o-mini", rate=900, night=1 / 3, session=2),
         Stream("api", "claude-3-5-haiku", "anthropic", rate=300, night=1 / 3))
LEVEL = {"ok": 0, "warning": 1, "high": 2}


@pytest.fixture(scope="module")
def daily() -> tuple[Harness, Traffic]:
    """Ten days of history up to the judged day's midnight, and the three days from there."""
    traffic = generate(CYCLE, DAY0, T + 3 * DAY, seed=21)
    return Harness().feed(traffic.take(traffic.ts < T)), traffic.take(traffic.ts >= T)


def judge(h: Harness, traffic: Traffic, start: float, times: Sequence[float]) -> list[Snapshot]:
    """A copy of the history fed up to `start`, then judged live at `times`."""
    h = h.copy()
    h.feed(traffic.take(traffic.ts < start))
    return h.run(traffic.take(traffic.ts >= start), times)


def rate_rows(snaps: Sequence[Snapshot]) -> list[dict]:
    return [r for s in snaps for r in s.rows() if r["signal"] == "request_rate"]


def flags(snaps: Sequence[Snapshot], start: float) -> list[tuple[float, str, str]]:
    return [(round((s.t - start) / 60, 1), r["app"] or r["model"] or "global", r["severity"])
            for s in snaps for r in s.rows() if r["signal"] == "request_rate" and r["severity"] != "ok"]


def thinned(traffic: Traffic, sel: np.ndarray, keep: float, seed: int) -> Traffic:
    """The traffic with only a share `keep` of the selected requests left."""
    rng = np.random.default_rng(seed)
    return traffic.take(~(sel & (rng.random(len(traffic)) >= keep)))


def test_nights_and_the_morning_ramp_are_not_outages(daily: tuple[Harness, Traffic]) -> None:
    """From midnight to 16:00 every 10 minutes: the night at a third of the afternoon rate,
    the morning ramp (windows straddling it look 2x high or low against either clock hour
    alone), and the afternoon peak. No verdict on any scope, and each window's baseline
    follows the time of day."""
    h, traffic = daily
    snaps = judge(h, traffic, T, every(T, 16 * 60, step=10))
    assert flags(snaps, T) == []
    rows = [r for r in rate_rows(snaps) if r["scope"] == "global"]
    assert all(0.7 < r["ratio"] < 1.4 for r in rows), [r["ratio"] for r in rows]
    base = {round((s.t - T) / HOUR, 2): row(s, "request_rate")["baseline"] for s in snaps}
    night, peak = base[4.01], base[15.01]                # 04:00 and 15:00
    assert 0.25 < night / peak < 0.45
    assert peak == pytest.approx(sum(s.rate for s in CYCLE) / 60, rel=0.25)


def test_a_daytime_outage_is_caught_within_minutes(daily: tuple[Harness, Traffic]) -> None:
    """98 % of the traffic gone at 14:00: a drop (negative z) on the global scope within 10
    minutes, high (a tenth of the usual or less) within 15."""
    h, traffic = daily
    gone = thinned(traffic, traffic.where(NOON), 0.02, seed=1)
    snaps = judge(h, gone, NOON, every(NOON, 30))
    warned = first_flagged(snaps, "request_rate")
    paged = first_flagged(snaps, "request_rate", level="high")
    assert warned is not None and warned - NOON <= 10 * 60, flags(snaps, NOON)
    assert paged is not None and paged - NOON <= 15 * 60, flags(snaps, NOON)
    r = row(snaps[-1], "request_rate")
    assert r["zscore"] < 0 and r["severity"] == "high" and r["ratio"] < 0.6


def test_a_drop_to_a_tenth_of_one_app_pages(daily: tuple[Harness, Traffic]) -> None:
    """The web app falls to a tenth of its usual rate at 14:00: high within 30 minutes
    on the app; the api app is untouched and stays quiet."""
    h, traffic = daily
    snaps = judge(h, thinned(traffic, traffic.where(NOON, app="web"), 0.1, seed=2), NOON, every(NOON, 30))
    paged = first_flagged(snaps, "request_rate", "app", "web", level="high")
    assert paged is not None and paged - NOON <= 30 * 60, flags(snaps, NOON)
    assert row(snaps[-1], "request_rate", "app", "web")["zscore"] < 0
    assert all(row(s, "request_rate", "app", "api")["severity"] == "ok" for s in snaps)


def test_a_surge_is_caught_and_points_up(daily: tuple[Harness, Traffic]) -> None:
    """Five times the api app's requests from 14:00: a warning (above the 3x warning ratio,
    below the 6x high one) within 10 minutes, with a positive z."""
    h, traffic = daily
    extra = generate([replace(CYCLE[1], rate=4 * CYCLE[1].rate, day_sd=0.0, hour_sd=0.0)], NOON, NOON + HOUR, seed=3)
    snaps = judge(h, Traffic.concat([traffic, extra]), NOON, every(NOON, 30))
    warned = first_flagged(snaps, "request_rate", "app", "api")
    assert warned is not None and warned - NOON <= 10 * 60, flags(snaps, NOON)
    assert max(LEVEL[row(s, "request_rate", "app", "api")["severity"]] for s in snaps) == LEVEL["warning"]
    assert row(snaps[-1], "request_rate", "app", "api")["zscore"] > 0
    assert all(row(s, "request_rate", "app", "web")["severity"] == "ok" for s in snaps)


SPELL_XFAIL = pytest.mark.xfail(strict=True, reason=(
    "a verdict needs evidence that the count left its usual level and an effect past the drop ratio (1/5), but "
    "the effect is the point estimate (n + 0.5) / (expected + 0.5) of whichever window's evidence passed, and a "
    "real 1/3 drop leaves a handful of requests in a 5-minute window: app=api (and its model) warns at 5.5, 30.5 "
    "and 40.5 min, on the 5-minute window each time (30.5 min: 3 requests against 25.7 expected, fall 7.5, where "
    "a third would read 3.0; z -5.4 passes the 4.7 threshold). On the site of test_evaluator, 8 seeds x 2 times "
    "of day, 15 of 16 such 45-minute spells raised a warning and one a high"))


@pytest.mark.parametrize("start_hour", [pytest.param(2, marks=SPELL_XFAIL), pytest.param(14, marks=SPELL_XFAIL)])
def test_a_quiet_spell_at_a_third_of_the_usual_rate_stays_quiet(daily: tuple[Harness, Traffic], start_hour: int) -> None:
    """Real traffic has quiet spells at a third of the usual rate (that is why a drop must
    reach a fifth): 45 minutes at a third, at night or in the afternoon, raise no verdict."""
    h, traffic = daily
    start = T + start_hour * HOUR
    snaps = judge(h, thinned(traffic, traffic.where(start, start + 45 * 60), 1 / 3, seed=4), start, every(start, 60))
    assert flags(snaps, start) == []


@pytest.mark.parametrize("seed", [1, 2])
def test_sessions_longer_than_a_slot_are_no_falls_or_surges(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent app whose runs last about twenty minutes (twenty calls a minute apart):
    its quiet and busy stretches span several 5-minute slots, so a 15-minute window's count
    varies half as much again as the slots' dispersion says. Judged with the dispersion of
    counts of each window's own length (`baseline.window_dispersion`), a clean day raises no
    request-rate verdict; judged with the slots' alone, the same day's lulls and bursts
    read as falls and surges (9 and 6 flagged evaluations of the 720)."""
    from exporter.anomaly import evaluator as ev
    stream = Stream("agent", "gpt-4o-mini", rate=240, session=20, gap=60, day_sd=0.05, hour_sd=0.03)
    start = DAY0 + 8 * DAY
    traffic = generate([stream], DAY0, start + DAY, seed=seed)
    times = list(np.arange(start + 60, start + DAY, 120.0))

    def judged(h: Harness) -> int:
        snaps = h.run(traffic.take(traffic.ts >= start), times)
        return sum(int(np.sum(s.verdicts["request_rate"].severity >= 1)) for s in snaps)

    history = Harness().feed(traffic.take(traffic.ts < start))
    assert judged(history.copy()) == 0
    b = history.copy()
    b.evaluate(start)
    app = b.history.keys.index(("app", "agent", "", ""))
    window = b.baseline_stats().window_burstiness[app]
    assert window[2] > 1.4 * window[0]                        # 15 minutes against 5

    built = ev.Evaluator._baseline_at

    def slots_only(self: ev.Evaluator, end: int) -> ev.Baseline:
        base = built(self, end)
        base.window_burstiness = np.repeat(base.burstiness[:, None], base.window_burstiness.shape[1], axis=1)
        return base
    monkeypatch.setattr(ev.Evaluator, "_baseline_at", slots_only)
    assert judged(history.copy()) > 0


def test_regular_traffic_reads_as_usual_at_any_second() -> None:
    """A request every three seconds for eight days, judged one second into a minute: the
    window holds what the time of day leads to expect, so the evidence is nil (|z| < 0.5)."""
    ts = np.arange(DAY0, T + HOUR, 3.0) + 0.5
    n = ts.size
    regular = Traffic(ts, np.full(n, "svc", dtype=object), np.full(n, "openai", dtype=object),
                      np.full(n, "gpt-4o-mini", dtype=object), np.full(n, 100), np.full(n, 10), np.full(n, 1e-4),
                      np.full(n, 0.5), np.full(n, np.nan), np.zeros(n, dtype=bool))
    snaps = judge(Harness(), regular, T + 1800, [T + 1800 + 1.0, T + 1800 + 59.0])
    assert [abs(row(s, "request_rate")["zscore"]) < 0.5 for s in snaps] == [True, True]


# --- a shift held for hours ------------------------------------------------------------------

SHIFT_START = T + 10 * HOUR


@pytest.fixture(scope="module")
def steady_and_noisy() -> dict[str, tuple[Harness, Traffic, Stream]]:
    """One app on a daily cycle, twice: with days that differ by 3 % (a steady service) and
    by 25 % (ordinary day-to-day variation of a smaller one)."""
    out = {}
    for name, day_sd in (("steady", 0.03), ("noisy", 0.25)):
        stream = Stream("svc", "gpt-4o-mini", rate=400, day_sd=day_sd, hour_sd=0.0)
        traffic = generate([stream], DAY0, T + DAY, seed=31)
        out[name] = (Harness().feed(traffic.take(traffic.ts < T)), traffic.take(traffic.ts >= T), stream)
    return out


def shifted(traffic: Traffic, stream: Stream, factor: float, hours: float, seed: int = 32) -> Traffic:
    extra = generate([replace(stream, rate=stream.rate * (factor - 1), day_sd=0.0)], SHIFT_START,
                     SHIFT_START + hours * HOUR, seed=seed)
    return Traffic.concat([traffic, extra])


def held(snaps: Sequence[Snapshot]) -> list[tuple[float, str, float]]:
    """(hours after the shift, severity, held effect) of the global request rate."""
    out = []
    for s in snaps:
        v = s.verdicts["request_rate"]
        i = s.keys.index(("global", "", "", ""))
        out.append((round((s.t - SHIFT_START) / HOUR, 2), row(s, "request_rate")["severity"],
                    round(float(max(v.effects.held_rise[i], v.effects.held_fall[i])), 2)))
    return out


@pytest.mark.parametrize("factor,warned_by", [(1.5, 4.5), (1.75, 2.5)])
def test_a_shift_held_for_hours_warns_on_a_steady_series(steady_and_noisy: dict, factor: float, warned_by: float) -> None:
    """A steady service gets `factor` times its usual requests from 10:00, for 8 hours: far
    below the 3x surge ratio, but held, so it warns (sustained ratio 1.5) within
    `warned_by` hours, never as high; at 1.75x it stays warned to the end."""
    h, traffic, stream = steady_and_noisy["steady"]
    times = every(SHIFT_START, 8 * 60, step=30)
    snaps = judge(h, shifted(traffic, stream, factor, 8), SHIFT_START, times)
    seen = held(snaps)
    first = next((hours for hours, severity, _ in seen if severity != "ok"), None)
    assert first is not None and first <= warned_by, seen
    assert all(severity != "high" for _, severity, _ in seen), seen
    if factor >= 1.75:
        assert all(severity == "warning" for hours, severity, _ in seen if hours >= warned_by), seen
    unshifted = judge(h, traffic, SHIFT_START, times)
    assert flags(unshifted, SHIFT_START) == []


def test_ordinary_day_to_day_variation_is_not_a_shift(steady_and_noisy: dict) -> None:
    """A quarter more for 8 hours on a series whose days differ by 25 %: a busy day, not
    an anomaly. (1.5x would not do here: the day judged is itself a quarter above the
    usual, so it would hold 1.9x for hours, which days that vary by a quarter do not.)"""
    h, traffic, stream = steady_and_noisy["noisy"]
    snaps = judge(h, shifted(traffic, stream, 1.25, 8), SHIFT_START, every(SHIFT_START, 8 * 60, step=30))
    assert flags(snaps, SHIFT_START) == []


def test_a_long_blocks_spread_is_no_less_than_its_shorter_blocks_imply() -> None:
    """A week whose 4-hour blocks swing by a third either way, busy and quiet in turn, so
    that every 8-hour block sums to its usual level: the 21 blocks of 8 hours alone read a
    spread of nothing (the floor), and a shift held 8 hours at 1.4x would be z 7. Hours of
    real traffic do not alternate like that; the 8-hour spread is now at least the 4-hour
    one over sqrt(2), as if 4-hour blocks were independent, so the same shift is z 1.5. On
    a series whose long blocks do stray more, their own spread stands."""
    from exporter.anomaly import baseline as bl
    hours = 168
    expected = np.full((2, hours), 100.0)
    swing = np.where((np.arange(hours) // 4) % 2 == 0, 4 / 3, 2 / 3)
    days = np.repeat(np.random.default_rng(5).lognormal(0.0, 0.3, hours // 8), 8)
    observed = expected * np.stack([swing, days])
    alone = {k: bl.block_spread(observed, expected, k) for k in (2, 4, 8)}
    chained = bl.held_spreads(observed, expected, (2, 4, 8))
    assert alone[8][0] == bl.MIN_LEVEL_SD
    assert chained[8][0] == pytest.approx(alone[4][0] / np.sqrt(2))
    assert np.log(1.4) / alone[8][0] > 6.5 > 1.8 > np.log(1.4) / chained[8][0]
    np.testing.assert_array_equal(chained[8][1], alone[8][1])      # held days: the long blocks know best
    assert alone[8][1] > alone[4][1] / np.sqrt(2)


# --- young scopes --------------------------------------------------------------------------------

def test_a_young_scope_is_judged_against_the_day_before(daily: tuple[Harness, Traffic]) -> None:
    """A new app on its own model, with no daily cycle, sent 900 requests an hour for its
    first 30 hours and 300 since. At 54 hours old, with two earlier days at the time of
    day (three are needed), it is judged against the day before: its baseline is the last
    day's 300 an hour (not its life's median of 900, nor its average of 630), so 300 an hour
    is quiet (with the request rate's warm-up lowered to 24 hours, as a user may). A fall
    to nothing is not judged yet: a fall must also be one against the same hours a week
    before, and a scope in its first week has none (`baseline.against_last_week`;
    `test_weekly.py` catches an outage in a site's second week)."""
    h, traffic = daily
    born = T + 2 * HOUR
    judged = born + 54 * HOUR
    young = Stream("newapp", "mistral-small", "mistral", rate=300, night=1.0, day_sd=0.0, hour_sd=0.0, start=born)
    life = Traffic.concat([generate([replace(young, rate=900)], born, born + 30 * HOUR, seed=41),
                           generate([young], born + 30 * HOUR, judged + HOUR, seed=42)])
    h = h.copy(signals={"request_rate": {"min_baseline_hours": 24}})
    everything = Traffic.concat([traffic.take(traffic.ts < judged + HOUR), life])
    times = every(judged, 60, step=15)
    snaps = judge(h, everything, judged, times)
    for s in snaps:
        r = row(s, "request_rate", "app", "newapp")
        assert r["baseline"] == pytest.approx(300 / 60, rel=0.1), r
        assert r["severity"] == "ok", r
        c = row(s, "cost_per_hour", "app", "newapp")
        assert c["baseline"] == pytest.approx(c["current"], rel=0.25) and c["severity"] == "ok", c
    assert row(snaps[0], "request_rate", "app", "newapp")["baseline_hours"] == 53      # whole hours before the window
    gone = everything.take(~everything.where(judged, app="newapp"))
    snaps = judge(h, gone, judged, times)
    r = row(snaps[-1], "request_rate", "app", "newapp")
    assert r["severity"] == "ok" and r["current"] == 0.0 and r["baseline"] == pytest.approx(300 / 60, rel=0.1), r
