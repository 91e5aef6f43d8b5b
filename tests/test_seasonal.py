"""Request rate against the same time of day: nights are not outages, outages still are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.config import load_settings
from exporter.engine import Engine

DAY = 86400
T0 = 1_800_000_000 - 1_800_000_000 % DAY          # a midnight (UTC)


def per_minute(ts: float) -> float:
    """Requests per minute: 20 by day, 0.5 from 01:00 to 05:00, a one-hour ramp at 05:00."""
    hour = (ts % DAY) / 3600
    if hour < 1:
        return 20 - 19.5 * hour
    if hour < 5:
        return 0.5
    if hour < 6:
        return 0.5 + 19.5 * (hour - 5)
    return 20.0


def traffic(start: float, end: float, rng: np.random.Generator, factor: float = 1.0) -> list[dict]:
    out = []
    for m in range(int(start // 60), int(end // 60)):
        for _ in range(rng.poisson(per_minute(m * 60) * factor)):
            out.append({"ts": m * 60 + rng.uniform(0, 60), "provider": "openai", "model": "gpt-4o-mini",
                        "app": "chat", "input_tokens": 500, "output_tokens": 100, "latency_s": 1.0})
    return out


def engine_with_history(tmp_path: Path, until: float, seasonal_request_rate: bool = True) -> Engine:
    signals = {} if seasonal_request_rate else {"request_rate": {"seasonal": False}}
    clock = [until]
    engine = Engine(load_settings(flags={"db": str(tmp_path / "u.db"), "record_retention": 0}, environ={})
                    .model_copy(update={"signals": signals}), clock=lambda: clock[0])
    rng = np.random.default_rng(11)
    for day in range(8):
        engine.ingest(traffic(T0 + day * DAY, min(T0 + (day + 1) * DAY, until), rng), now=until)
    if until > T0 + 8 * DAY:
        engine.ingest(traffic(T0 + 8 * DAY, until, rng), now=until)
    return engine


def request_rate(engine: Engine, t: float) -> dict:
    snap = engine.evaluate(t)
    return next(r for r in snap.rows() if r["signal"] == "request_rate" and r["scope"] == "global")


def test_night_is_not_an_outage(tmp_path: Path) -> None:
    t = T0 + 8 * DAY + 4 * 3600                      # 04:00, the quietest hour
    flat = request_rate(engine_with_history(tmp_path / "flat", t, seasonal_request_rate=False), t)
    assert flat["severity"] != "ok"                   # what a flat week says about every night
    seasonal = request_rate(engine_with_history(tmp_path / "daily", t), t)
    assert seasonal["severity"] == "ok", seasonal
    assert seasonal["ratio"] == pytest.approx(1.0, abs=0.5)


def test_window_straddling_the_morning_ramp_is_quiet(tmp_path: Path) -> None:
    """At 05:45 the window covers 04:45-05:45: a quarter of the flat night hour and most of
    the ramp. Compared with either clock hour alone it looks 10x high or 2x low."""
    t = T0 + 8 * DAY + 5 * 3600 + 2700               # 05:45
    row = request_rate(engine_with_history(tmp_path, t), t)
    assert row["severity"] == "ok", row
    assert row["ratio"] == pytest.approx(1.0, abs=0.3)


def test_daytime_outage_is_caught(tmp_path: Path) -> None:
    t = T0 + 8 * DAY + 15 * 3600                     # 15:00
    engine = engine_with_history(tmp_path, t - 3600)
    engine.ingest(traffic(t - 3600, t, np.random.default_rng(5), factor=0.03), now=t)   # 97 % of traffic gone
    row = request_rate(engine, t)
    assert row["severity"] == "high", row
    assert row["ratio"] < 1 / 6
