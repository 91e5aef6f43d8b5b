"""The oracle of `bench/detection/bound.py`: Page's CUSUM, its alarms and delays on
hand-made series, and the oracle itself on the shared traces (one clean week sets the
threshold, the same week with an error storm injected is read)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "detection"
sys.path.insert(0, str(BENCH))

import bound  # noqa: E402
from bound import Series, alarms_a_week, cusum, delays  # noqa: E402
from traffic import MissingData, build_traffic  # noqa: E402


def test_cusum_is_pages_recursion() -> None:
    llr = np.random.default_rng(3).normal(-0.2, 1.0, 5000)
    want, s = np.empty_like(llr), 0.0
    for i, x in enumerate(llr):
        s = max(0.0, s + x)
        want[i] = s
    np.testing.assert_allclose(cusum(llr), want, atol=1e-9)


def test_an_excursion_is_one_alarm_however_long_it_stays_up() -> None:
    # two excursions past 3: one climbs to 5 and stays for a while, one reaches 3 exactly
    llr = np.array([1, 1, 1, 1, 1, 0, 0, -5, -1, 3, -3], dtype=float)
    t = np.arange(llr.shape[0], dtype=float) * (bound.WEEK / llr.shape[0])
    s = Series(t, llr)
    got = alarms_a_week(s, 0.0, bound.WEEK, np.array([3.0, 5.0, 6.0]))
    np.testing.assert_allclose(got, [2.0, 1.0, 0.0])
    # only the upcrossings inside [lo, hi) count, and per week of that span
    np.testing.assert_allclose(alarms_a_week(s, t[5], bound.WEEK, np.array([3.0])), [1.0 / (1 - 5 / 11)])


def test_delay_is_from_the_onset_to_the_first_unit_at_the_threshold() -> None:
    t = np.arange(0.0, 3600.0, 60.0)                     # a unit a minute for an hour
    llr = np.where(t >= 1200.0, 0.5, -0.5)               # the change at minute 20
    d = delays(Series(t, llr), [1200.0, 3000.0], 900.0, np.array([1.0, 4.0, 100.0]))
    assert d[0, 0] == pytest.approx(1.0)                 # 0.5, 1.0: the second unit after the onset
    assert d[1, 0] == pytest.approx(7.0)
    assert math.isnan(d[2, 0])                           # never within the deadline
    assert d[0, 1] == 0.0                                # already past it at the onset


def test_the_oracle_finds_every_error_storm_within_its_hour_at_a_false_alarm_a_week(capsys) -> None:
    try:
        build_traffic(2, 7)
    except MissingData as e:
        pytest.skip(str(e))
    assert bound.main(["--seeds", "7", "--kinds", "error_storm"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| error_storm")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3].split()[0]) <= 1.0             # its threshold's false alarms on the clean week
    assert cells[4] == "7/7"
    # sharing the budget with the exporter's other series costs time
    assert float(cells[9]) >= float(cells[5])
