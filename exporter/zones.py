"""Time zones: UTC offsets and local hours, vectorised.

Two things count in the time of the people a site serves rather than in UTC: budgets
(a day's budget starts at local midnight) and the anomaly baseline's hours of the day
and of the week (traffic follows its users' clocks, so when they move their clocks for
daylight saving time the whole day moves by an hour in UTC). Both ask the zone once per
distinct hour, never per record.
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

TzLike = str | ZoneInfo


def zone(tz: TzLike) -> ZoneInfo:
    """A ZoneInfo from a name, with a configuration error that says which name failed."""
    if isinstance(tz, ZoneInfo):
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {tz!r}: use an IANA name such as 'Europe/Berlin'") from e


def _offset_at(z: ZoneInfo, t: float) -> float:
    off = datetime.fromtimestamp(t, timezone.utc).astimezone(z).utcoffset()
    return 0.0 if off is None else off.total_seconds()


def _transition(z: ZoneInfo, lo: int, hi: int, before: float) -> int:
    """First whole second in (lo, hi] whose offset differs from `before` (bisection)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset_at(z, mid) == before:
            lo = mid
        else:
            hi = mid
    return hi


def utc_offsets(ts: np.ndarray, tz: TzLike = "UTC") -> np.ndarray:
    """UTC offset in seconds at each timestamp, vectorised.

    The zone is asked once per distinct UTC hour in `ts` (offsets are constant within an
    hour except at a transition); an hour whose start and end offsets differ gets its
    exact transition second by bisection, and the records on either side of it get
    their own offset. Python touches distinct hours, never records."""
    ts = np.asarray(ts, dtype=np.float64)
    if ts.size == 0:
        return np.zeros(0)
    z = zone(tz)
    hours = np.floor(ts / 3600.0).astype(np.int64)
    uh, inv = np.unique(hours, return_inverse=True)
    before = np.empty(uh.shape[0])
    after = np.empty(uh.shape[0])
    switch = np.full(uh.shape[0], np.inf)
    for j, h in enumerate(uh.tolist()):  # one iteration per distinct UTC hour
        a = _offset_at(z, h * 3600)
        b = _offset_at(z, h * 3600 + 3600)
        before[j], after[j] = a, b
        if a != b:
            switch[j] = _transition(z, h * 3600, h * 3600 + 3600, a)
    return np.where(ts >= switch[inv], after[inv], before[inv])




def local_hours(hours: np.ndarray, tz: TzLike = "UTC") -> np.ndarray:
    """Each absolute UTC hour (hours since the epoch) as a local hour number: the hour plus
    the zone's UTC offset at its middle, rounded to whole hours. Its remainder by 24 is
    the local hour of the day, by 168 the local hour of the week (as for UTC, 0 is a
    Thursday 00:00). Local hour numbers rise by one an hour, except at a daylight saving
    change: one is skipped when the clocks go forward, one repeats when they go back. A
    zone whose offset is not a whole number of hours (India's +05:30) is rounded to the
    nearest hour; what matters is that its hours move together with its clocks."""
    hours = np.asarray(hours, dtype=np.int64)
    if tz == "UTC" or hours.size == 0:
        return hours
    offsets = utc_offsets(hours * 3600.0 + 1800.0, tz)
    out: np.ndarray = hours + np.rint(offsets / 3600.0).astype(np.int64)
    return out
