"""Budgets, spend to date, and spend forecasts.

Budgets are set per day and per month, overall and per app. A "day" and a "month" are
local to a configured IANA time zone, because that is how finance reads an invoice and
how a team reads "today's spend"; the default is UTC.

Spend is kept as cost per local day per scope (overall, and each app) for
`history_days` (120), which is all the forecaster needs and is small (a few KB per app).
The store keeps the same daily cost per app with every batch (`daily_cost_rows`); after a
restart the engine loads it back with `load_daily()`.

Forecast method (`fit_daily`): spend has a strong weekly shape (working days against
weekends) and a level that moves over weeks. With at least 14 complete days of history
the model is multiplicative weekly seasonality:

- day-of-week factors: each of the last (up to) 4 whole weeks is divided by its own
  mean, and the factor of a weekday is the median of its ratios over those weeks, so a
  single incident day or a holiday does not bend the weekly shape, and growth between
  weeks does not leak into it;
- level: the median of the last 7 days after dividing out their factors, so the
  forecast follows the current week rather than a month-old average, and one spike day
  does not move it;
- forecast of a day = level × factor of its weekday;
- band: the relative residuals of the weekly fit (robust spread, 1.4826·MAD) give the
  day-to-day noise, and the uncertainty of the level (the larger of the standard error
  of a 7-day median and the spread of the weekly levels) is added as a fully correlated
  term; the band is the 90 % interval of a normal with that variance, clipped below at
  what is already spent. It does not model trends, so the 60/90-day bands are honest
  only about noise and week-to-week wobble, not about growth.

With fewer than 14 days, weekly factors cannot be told from noise, so the fallback is
the flat mean of the last (up to) 7 complete days with a band from their spread.
Holt-Winters or ARIMA would need more history than a fresh install has and tuning a
monitoring tool should not ask for; this model is a few medians, explainable in one
sentence on a dashboard.
"""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..codes import factorize
from ..floats import finite_or_none
from ..ingest.records import RecordColumns
from ..zones import TzLike, utc_offsets, zone

PERIODS: tuple[str, ...] = ("day", "month")
HORIZONS: tuple[str, ...] = ("month_end", "30d", "60d", "90d")
HORIZON_DAYS: dict[str, int] = {"30d": 30, "60d": 60, "90d": 90}
BAND_Z = 1.6449  # two-sided 90 % of a normal
_MAD_TO_SIGMA = 1.4826
_MEDIAN_SE = 1.2533  # standard error of a median / that of a mean, for normal data
_EPOCH = date(1970, 1, 1)

# --- calendar -------------------------------------------------------------------------

def _local_midnight(d: date, z: ZoneInfo) -> float:
    """Epoch seconds at which local date `d` begins.

    fold=0 maps a local time inside a DST gap with the offset from before the jump, so
    in zones that change clocks at midnight (the day has no 00:00) this yields the
    transition instant, which is when the day does begin; for a repeated midnight it
    yields the first one."""
    return datetime(d.year, d.month, d.day, tzinfo=z).timestamp()


def period_start(now: float, period: str, tz: TzLike = "UTC") -> float:
    """Epoch seconds at which the local `period` ("day" or "month") containing `now` began."""
    z = zone(tz)
    local = datetime.fromtimestamp(now, z).date()
    if period == "day":
        return _local_midnight(local, z)
    if period == "month":
        return _local_midnight(local.replace(day=1), z)
    raise ValueError(f"period must be one of {PERIODS}, got {period!r}")


def day_index_to_date(day: int) -> date:
    """The local calendar date of a day index (days since 1970-01-01)."""
    return _EPOCH + timedelta(days=int(day))


def daily_cost_rows(app: np.ndarray, ts: np.ndarray, cost: np.ndarray, tz: ZoneInfo) -> list[tuple[str, int, float]]:
    """Cost per (app, local day) of a batch, unpriced records counting 0: what the store
    adds to its daily table and the tracker to its rings."""
    c = np.nan_to_num(np.asarray(cost, dtype=np.float64), nan=0.0)
    apps, a_i = factorize(app)
    days, d_i = np.unique(local_day_index(ts, tz), return_inverse=True)
    key, inv = np.unique(a_i * len(days) + d_i.reshape(-1), return_inverse=True)
    sums = np.bincount(inv.reshape(-1), weights=c)
    return [(apps[k // len(days)], int(days[k % len(days)]), s) for k, s in zip(key.tolist(), sums.tolist())]


def local_day_index(ts: np.ndarray, tz: TzLike = "UTC") -> np.ndarray:
    """Local calendar day of each timestamp as days since 1970-01-01 (int64)."""
    ts = np.asarray(ts, dtype=np.float64)
    days: np.ndarray = np.floor((ts + utc_offsets(ts, tz)) / 86400.0).astype(np.int64)
    return days


# --- forecasting ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DailyModel:
    """A fitted daily spend model: mean(day) = level × factors[day % 7].

    `sigma_rel` is the relative day-to-day noise, `sigma_level_rel` the relative
    uncertainty of the level (shared by all forecast days)."""

    method: str
    level: float
    factors: np.ndarray
    sigma_rel: float
    sigma_level_rel: float

    def mean(self, days: np.ndarray) -> np.ndarray:
        """Expected spend of each day index."""
        return self.level * self.factors[np.asarray(days, dtype=np.int64) % 7]

    def total(self, days: np.ndarray, extra: float = 0.0, floor: float = 0.0,
              extra_uncertain: float = 0.0) -> tuple[float, float, float]:
        """Forecast total over `days` plus a known `extra`; the band adds
        `extra_uncertain` (already part of the mean, e.g. the rest of today) to the
        uncertain mass and is clipped below at `floor`."""
        if math.isnan(self.level):
            nan = float("nan")
            return nan, nan, nan
        mu = self.mean(days)
        mass = float(mu.sum()) + extra_uncertain
        var = (self.sigma_rel ** 2) * (float((mu ** 2).sum()) + extra_uncertain ** 2) \
            + (self.sigma_level_rel * mass) ** 2
        value = extra + mass
        half = BAND_Z * math.sqrt(var)
        return value, max(floor, value - half), value + half


def fit_daily(history: np.ndarray, last_day: int, weeks: int = 4) -> DailyModel:
    """Fit the daily model to complete days of spend ending at day index `last_day`.

    `history` is contiguous (one value per day, zeros for days without spend). See the
    module docstring for the method and why."""
    h = np.nan_to_num(np.asarray(history, dtype=np.float64), nan=0.0)
    n = h.shape[0]
    ones = np.ones(7)
    if n == 0:
        return DailyModel("none: no complete day of history yet", float("nan"), ones, 0.0, 0.0)
    if n < 14:
        recent = h[-7:]
        k = recent.shape[0]
        level = float(recent.mean())
        if k >= 3 and level > 0:
            sigma = float(recent.std(ddof=1)) / level
        else:
            sigma = 0.5  # one or two days say nothing about spread: a wide band on purpose
        return DailyModel(f"flat mean of the last {k} days (weekly pattern needs 14)",
                          level, ones, sigma, sigma / math.sqrt(k))
    w = min(weeks, n // 7)
    block = h[-7 * w:].reshape(w, 7)
    first_block_day = last_day - 7 * w + 1
    week_mean = block.mean(axis=1)
    live = week_mean > 0
    if not live.any():
        return DailyModel("weekly seasonal (no spend)", 0.0, ones, 0.0, 0.0)
    ratios = block[live] / week_mean[live, None]
    f_pos = np.median(ratios, axis=0)
    if f_pos.mean() > 0:
        f_pos = f_pos / f_pos.mean()
    else:
        f_pos = ones.copy()
    factors = np.empty(7)
    factors[(first_block_day + np.arange(7)) % 7] = f_pos
    last7 = h[-7:]
    f7 = factors[(last_day - 6 + np.arange(7)) % 7]
    use = f7 > 0.1  # days that are (nearly) always zero say nothing about the level
    level = float(np.median(last7[use] / f7[use])) if use.any() else float(last7.mean())
    fitted = week_mean[live, None] * f_pos[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(fitted > 0, block[live] / fitted - 1.0, np.nan)
    rel = rel[np.isfinite(rel)]
    sigma_rel = float(_MAD_TO_SIGMA * np.median(np.abs(rel - np.median(rel)))) if rel.size else 0.0
    sigma_level = _MEDIAN_SE * sigma_rel / math.sqrt(7)
    if live.sum() >= 3:
        wm = week_mean[live] / np.median(week_mean[live])
        sigma_level = max(sigma_level, float(_MAD_TO_SIGMA * np.median(np.abs(wm - np.median(wm)))))
    return DailyModel(f"weekly seasonal: day-of-week medians over {w} weeks x median level of the last 7 days",
                      level, factors, sigma_rel, sigma_level)


# --- the tracker ----------------------------------------------------------------------

class BudgetSettings(BaseModel):
    """Budgets and the calendar they are counted in.

    `timezone`: IANA name; days and months start at local midnight there.
    `day_usd`, `month_usd`: the overall budgets (None: not set).
    `apps`: per-app budgets, app -> {"day": usd, "month": usd} (either may be absent).
    `history_days`: daily spend kept per scope; 120 covers the 4 weeks the forecaster
    uses with room for a quarter's look back on the usage API.
    `forecast_weeks`: whole weeks the day-of-week factors are taken from.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    timezone: str = Field("UTC", description="IANA time zone whose days and months budgets count in")
    day_usd: float | None = Field(None, description="overall budget per day (none: not set)")
    month_usd: float | None = Field(None, description="overall budget per month (none: not set)")
    apps: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="per-app budgets, app -> {day: usd, month: usd}")
    history_days: int = Field(120, description="days of daily spend kept per scope (at least 28)")
    forecast_weeks: int = Field(4, description="whole weeks the day-of-week factors are taken from")

    @model_validator(mode="after")
    def _valid(self) -> BudgetSettings:
        zone(self.timezone)
        for name, v in (("day_usd", self.day_usd), ("month_usd", self.month_usd)):
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"budget.{name} must be a non-negative number, got {v!r}")
        for app, b in self.apps.items():
            unknown = set(b) - set(PERIODS)
            if unknown:
                raise ValueError(f"budget.apps[{app!r}]: unknown period(s) {sorted(unknown)}; known: {list(PERIODS)}")
            for p, v in b.items():
                if v is not None and not (v >= 0 and math.isfinite(v)):
                    raise ValueError(f"budget.apps[{app!r}].{p} must be a non-negative number, got {v!r}")
        if self.history_days < 28:
            raise ValueError(f"budget.history_days must be at least 28, got {self.history_days}")
        if not 1 <= self.forecast_weeks <= self.history_days // 7:
            raise ValueError("budget.forecast_weeks must be between 1 and history_days / 7")
        return self

    def budget(self, app: str | None, period: str) -> float | None:
        if app is None:
            return self.day_usd if period == "day" else self.month_usd
        v = self.apps.get(app, {}).get(period)
        return None if v is None else float(v)


@dataclass(slots=True)
class Forecast:
    """A forecast total with its 90 % band (NaN when there is no history)."""

    value: float
    lower: float
    upper: float

    def to_dict(self) -> dict[str, float | None]:
        return {"value": finite_or_none(self.value), "lower": finite_or_none(self.lower),
                "upper": finite_or_none(self.upper)}


@dataclass(slots=True)
class BudgetRow:
    """One scope: `app` None is the overall row.

    `budget_usd` and `period_to_date` are keyed by period ("day", "month"); the budget
    is None where none is configured. `forecast` is keyed by horizon: "month_end" is the
    month's expected total (spent so far + the rest of today + the remaining days);
    "30d"/"60d"/"90d" are the totals of the 30/60/90 whole local days that begin at the
    next midnight."""

    app: str | None
    budget_usd: dict[str, float | None]
    period_to_date: dict[str, float]
    period_start: dict[str, float]
    forecast: dict[str, Forecast]
    method: str
    history_days: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "budget_usd": dict(self.budget_usd),
            "period_to_date": dict(self.period_to_date),
            "period_start": dict(self.period_start),
            "forecast": {h: f.to_dict() for h, f in self.forecast.items()},
            "method": self.method,
            "history_days": self.history_days,
        }


@dataclass(slots=True)
class BudgetReport:
    """All budget rows at `now`; the overall row comes first, then apps by name."""

    timezone: str
    now: float
    today: int
    rows: list[BudgetRow]

    @classmethod
    def empty(cls, timezone: str, now: float) -> BudgetReport:
        """The report before any verdict (a tracker that failed its first evaluation)."""
        return cls(timezone, now, int(local_day_index(np.array([now]), timezone)[0]), [])

    def to_dict(self) -> dict[str, Any]:
        return {"timezone": self.timezone, "now": self.now, "today": day_index_to_date(self.today).isoformat(),
                "rows": [r.to_dict() for r in self.rows]}


class _DayRing:
    """Cost per local day for one scope, in a ring of fixed length."""

    __slots__ = ("day", "cost")

    def __init__(self, length: int) -> None:
        self.day = np.full(length, -1, dtype=np.int64)
        self.cost = np.zeros(length, dtype=np.float64)

    def add(self, days: np.ndarray, cost: np.ndarray, replace: bool = False) -> None:
        """Add (or with `replace`, set) the cost of distinct days; days older than what
        the ring holds in their slot are dropped."""
        R = self.day.shape[0]
        keep = days > days.max() - R
        days, cost = days[keep], cost[keep]
        slot = days % R
        newer = days > self.day[slot]
        self.cost[slot[newer]] = 0.0
        self.day[slot[newer]] = days[newer]
        same = self.day[slot] == days
        if replace:
            self.cost[slot[same]] = cost[same]
        else:
            self.cost[slot[same]] += cost[same]

    def series(self, first: int, last: int) -> np.ndarray:
        """Contiguous cost for days first..last (zeros where nothing is held)."""
        if last < first:
            return np.zeros(0)
        days = np.arange(first, last + 1)
        slot = days % self.day.shape[0]
        return np.where(self.day[slot] == days, self.cost[slot], 0.0)

    def first_day(self) -> int | None:
        held = self.day[self.day >= 0]
        return int(held.min()) if held.size else None


class BudgetTracker:
    """Daily spend per scope, period-to-date against budgets, and forecasts.

    Scopes are the overall spend (key None) and each app seen. Memory: one ring of
    `history_days + 7` days per scope (the app count is bounded by the label guard).
    """

    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = settings
        self.tz = zone(settings.timezone)
        self._len = settings.history_days + 7
        self._rings: dict[str | None, _DayRing] = {}

    def _ring(self, scope: str | None) -> _DayRing:
        r = self._rings.get(scope)
        if r is None:
            r = self._rings[scope] = _DayRing(self._len)
        return r

    def observe(self, cols: RecordColumns) -> None:
        """Add a batch's cost to its local days (unpriced records count as 0)."""
        if len(cols):
            self.add_daily(daily_cost_rows(cols.app, cols.ts, cols.cost, self.tz))

    def add_daily(self, rows: list[tuple[str, int, float]]) -> None:
        """Add (app, local day, cost) rows, as `daily_cost_rows` makes them: the engine
        computes them once per batch for the store and for this tracker."""
        if not rows:
            return
        days = np.array([r[1] for r in rows], dtype=np.int64)
        cost = np.array([r[2] for r in rows], dtype=np.float64)
        d_u, d_i = np.unique(days, return_inverse=True)
        self._ring(None).add(d_u, np.bincount(d_i.reshape(-1), weights=cost, minlength=d_u.shape[0]))
        by_app: dict[str, list[int]] = {}
        for j, r in enumerate(rows):      # one iteration per (app, day) of the batch
            by_app.setdefault(r[0], []).append(j)
        for app, idx in by_app.items():
            self._ring(app).add(days[idx], cost[idx])

    def load_daily(self, app: str | None, day_index: np.ndarray, cost: np.ndarray) -> None:
        """Restore a scope's daily spend (e.g. from the store after a restart).

        Values replace what is held for those days, so loading the same history twice
        does not double it; load before observing new records of those days."""
        day_index = np.asarray(day_index, dtype=np.int64)
        cost = np.nan_to_num(np.asarray(cost, dtype=np.float64), nan=0.0)
        if day_index.shape != cost.shape:
            raise ValueError("load_daily: day_index and cost must have the same length")
        if day_index.size == 0:
            return
        d_u, d_i = np.unique(day_index, return_inverse=True)
        last = np.zeros(d_u.shape[0])
        last[d_i] = cost  # a repeated day keeps its last value
        self._ring(app).add(d_u, last, replace=True)

    def evaluate(self, now: float) -> BudgetReport:
        """Budget rows at `now`: the overall row, then every app with a budget or spend."""
        s = self.settings
        today = int(local_day_index(np.array([now]), self.tz)[0])
        local = day_index_to_date(today)
        month_first = today - (local.day - 1)
        month_last = month_first + calendar.monthrange(local.year, local.month)[1] - 1
        starts = {p: period_start(now, p, self.tz) for p in PERIODS}
        lo_day = today - s.history_days + 1

        scopes: list[str | None] = [None]
        for app in sorted(set(a for a in self._rings if a is not None) | set(s.apps)):
            ring = self._rings.get(app)
            if app in s.apps or (ring is not None and ring.series(lo_day, today).sum() > 0):
                scopes.append(app)

        rows: list[BudgetRow] = []
        for scope in scopes:
            ring = self._rings.get(scope) or _DayRing(1)
            first = ring.first_day()
            ptd_day = float(ring.series(today, today).sum())
            ptd_month = float(ring.series(month_first, today).sum())
            hist_first = max(lo_day, first if first is not None else today)
            history = ring.series(hist_first, today - 1)
            model = fit_daily(history, today - 1, s.forecast_weeks)
            pred_today = float(model.mean(np.array([today]))[0]) if not math.isnan(model.level) else float("nan")
            # The rest of today is what a typical day still has to spend; a day already
            # over its forecast is assumed to stop here rather than run on at the same pace.
            rest_today = max(pred_today - ptd_day, 0.0) if not math.isnan(pred_today) else 0.0
            fc = {"month_end": Forecast(*model.total(np.arange(today + 1, month_last + 1), extra=ptd_month,
                                                     floor=ptd_month, extra_uncertain=rest_today))}
            for h, k in HORIZON_DAYS.items():
                fc[h] = Forecast(*model.total(np.arange(today + 1, today + 1 + k)))
            rows.append(BudgetRow(
                app=scope,
                budget_usd={p: s.budget(scope, p) for p in PERIODS},
                period_to_date={"day": ptd_day, "month": ptd_month},
                period_start=starts,
                forecast=fc,
                method=model.method,
                history_days=int(history.shape[0]),
            ))
        return BudgetReport(s.timezone, now, today, rows)
