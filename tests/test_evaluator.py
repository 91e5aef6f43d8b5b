"""Anomaly signals on crafted histories, evaluated on event time with an injected clock.

Each test builds eight days of hourly traffic with mild noise (±8 %) ending at T0, then
one test hour [T0, T0 + 1 h), and evaluates at the end of that hour. The window
(T - 1 h, T] then holds exactly the test hour, and the baseline the hours before it.
The published gauges are read from the engine's own registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import DAY, HOUR, T0, engine_at, gauge, ingest_by_day, settings_for, severity, steady_history, steady_hour

from exporter import sketch
from exporter.engine import Engine
from exporter.anomaly.signals import DEFAULT_SIGNALS, SIGNAL_NAMES

T_EVAL = T0 + HOUR - 1                    # the window (T0 - 1 s, T0 + 1 h - 1 s] holds the test hour
OK, WARNING, HIGH = 0.0, 1.0, 2.0
CHAT = {"app": "chat"}
MINI = {"provider": "openai", "model": "gpt-4o-mini"}


def run(tmp_path: Path, history: list[dict[str, Any]], test_hour: list[dict[str, Any]], **flags: Any) -> Engine:
    engine, clock = engine_at(settings_for(tmp_path, **flags), T_EVAL)
    ingest_by_day(engine, history + test_hour, now=T_EVAL)
    assert engine.evaluate(T_EVAL) is not None
    return engine


def hour(seed: int = 99, **kwargs: Any) -> list[dict[str, Any]]:
    """The test hour, with the same noise as the history unless told otherwise."""
    return steady_hour(T0, np.random.default_rng(seed), **kwargs)


def all_scopes(engine: Engine, signal: str) -> list[float | None]:
    return [severity(engine, signal), severity(engine, signal, "app", **CHAT), severity(engine, signal, "model", **MINI)]


# --- cost ------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor,expected", [(2.5, WARNING), (5.0, HIGH)])
def test_cost_spike(tmp_path: Path, factor: float, expected: float) -> None:
    engine = run(tmp_path, steady_history(cost=1.0), hour(cost=factor, noise=0.0))
    assert all_scopes(engine, "cost_per_hour") == [expected] * 3
    assert gauge(engine, "llm_anomaly_current", "cost_per_hour") == pytest.approx(factor, rel=1e-6)
    assert gauge(engine, "llm_anomaly_baseline", "cost_per_hour") == pytest.approx(1.0, rel=0.05)
    assert gauge(engine, "llm_anomaly_ratio", "cost_per_hour") == pytest.approx(factor, rel=0.05)
    assert gauge(engine, "llm_anomaly_zscore", "cost_per_hour") > 3
    upper = gauge(engine, "llm_anomaly_band_upper", "cost_per_hour")
    lower = gauge(engine, "llm_anomaly_band_lower", "cost_per_hour")
    assert 0.8 < lower < 1.0 < upper < 1.25                        # the normal band sits around $1/h
    assert gauge(engine, "llm_anomaly_baseline_span_seconds", "cost_per_hour") == 7 * DAY
    # the other signals of the same hour are untouched
    for signal in ("token_velocity", "request_rate", "error_rate", "latency_p95", "ttft_p95", "output_tokens_per_second"):
        assert severity(engine, signal) == OK, signal


def test_steady_week_is_all_ok(tmp_path: Path) -> None:
    engine = run(tmp_path, steady_history(error_rate=0.02), hour(error_rate=0.02))
    snap = engine.snapshot
    assert snap is not None
    rows = list(snap.rows())
    assert {r["signal"] for r in rows} == set(SIGNAL_NAMES)
    assert {r["scope"] for r in rows} == {"global", "app", "model"}
    assert len(rows) == len(SIGNAL_NAMES) * 3
    min_requests = {spec.name: spec.min_requests for spec in DEFAULT_SIGNALS}
    for r in rows:
        assert r["severity"] == "ok", r
        if r["requests_in_window"] >= min_requests[r["signal"]]:
            assert r["ratio"] == pytest.approx(1.0, abs=0.25), r
        else:                                                      # too few requests: no ratio at all
            assert r["ratio"] is None, r
        assert r["baseline_hours"] == 168
    for signal in SIGNAL_NAMES:
        assert all_scopes(engine, signal) == [OK] * 3, signal


def test_short_history_gives_no_verdict(tmp_path: Path) -> None:
    history = steady_history(days=0.5)                              # twelve hours
    engine = run(tmp_path, history, hour(cost=5.0, noise=0.0))
    assert gauge(engine, "llm_anomaly_ratio", "cost_per_hour") == pytest.approx(5.0, rel=0.06)   # clearly 5x...
    assert severity(engine, "cost_per_hour") == OK                                           # ...but no verdict yet
    span = gauge(engine, "llm_anomaly_baseline_span_seconds", "cost_per_hour")
    assert span == 11 * HOUR                           # the hour overlapping the window is not baseline
    assert span < 24 * HOUR


def test_minimum_volume_floor(tmp_path: Path) -> None:
    """$0.001 an hour rising to $0.003 is a tripling, but too small to matter."""
    engine = run(tmp_path, steady_history(cost=0.001), hour(cost=0.003, noise=0.0))
    assert gauge(engine, "llm_anomaly_current", "cost_per_hour") == pytest.approx(0.003)
    assert gauge(engine, "llm_anomaly_zscore", "cost_per_hour") > 3
    assert all_scopes(engine, "cost_per_hour") == [OK] * 3


# --- tokens and requests ----------------------------------------------------------------------

@pytest.mark.parametrize("factor,expected", [(3.3, WARNING), (7.0, HIGH)])
def test_token_velocity(tmp_path: Path, factor: float, expected: float) -> None:
    engine = run(tmp_path, steady_history(tokens=(1000, 200)),
                 hour(tokens=(int(1000 * factor), int(200 * factor)), noise=0.0))
    assert all_scopes(engine, "token_velocity") == [expected] * 3
    assert gauge(engine, "llm_anomaly_current", "token_velocity") == pytest.approx(40 * 1200 * factor / 60, rel=0.01)
    assert gauge(engine, "llm_anomaly_ratio", "token_velocity") == pytest.approx(factor, rel=0.1)
    assert severity(engine, "cost_per_hour") == OK                  # the records carry their own (steady) cost


@pytest.mark.parametrize("n,expected", [(10, WARNING), (1, HIGH)])
def test_request_rate_drop(tmp_path: Path, n: int, expected: float) -> None:
    """40 requests an hour falling to 10 (a quarter) or to one (near zero): a "both" signal."""
    engine = run(tmp_path, steady_history(n=40), hour(n=n, cost=n / 40, noise=0.0))
    assert all_scopes(engine, "request_rate") == [expected] * 3
    assert gauge(engine, "llm_anomaly_current", "request_rate") == pytest.approx(n / 60)
    assert gauge(engine, "llm_anomaly_ratio", "request_rate") == pytest.approx(n / 40, rel=0.1)
    assert gauge(engine, "llm_anomaly_zscore", "request_rate") < -3
    assert severity(engine, "cost_per_hour") == OK                  # cost fell: not an "up" anomaly


def test_request_rate_surge(tmp_path: Path) -> None:
    engine = run(tmp_path, steady_history(n=40), hour(n=160, cost=1.0, noise=0.0))
    assert severity(engine, "request_rate") == WARNING
    assert gauge(engine, "llm_anomaly_ratio", "request_rate") == pytest.approx(4.0, rel=0.1)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("base,storm,expected", [(0.01, 0.20, HIGH), (0.02, 0.07, WARNING)])
def test_error_rate_storm(tmp_path: Path, base: float, storm: float, expected: float) -> None:
    engine = run(tmp_path, steady_history(n=100, error_rate=base), hour(n=100, error_rate=storm, noise=0.0))
    assert all_scopes(engine, "error_rate") == [expected] * 3
    assert gauge(engine, "llm_anomaly_current", "error_rate") == pytest.approx(storm)
    assert gauge(engine, "llm_anomaly_baseline", "error_rate") == pytest.approx(base, rel=0.15)
    assert gauge(engine, "llm_anomaly_ratio", "error_rate") == pytest.approx(storm / base, rel=0.15)


def test_error_rate_needs_enough_requests(tmp_path: Path) -> None:
    """Ten requests with five errors is 50 %, but error_rate wants 20 requests in the window."""
    engine = run(tmp_path, steady_history(n=100, error_rate=0.01), hour(n=10, cost=0.1, error_rate=0.5, noise=0.0))
    assert gauge(engine, "llm_anomaly_current", "error_rate") == pytest.approx(0.5)
    assert gauge(engine, "llm_anomaly_ratio", "error_rate") is not None
    assert np.isnan(gauge(engine, "llm_anomaly_ratio", "error_rate"))
    assert severity(engine, "error_rate") == OK


# --- latency, TTFT, throughput ----------------------------------------------------------------

def two_models(hs: float, rng: np.random.Generator, slow: float = 1.0, ttft_factor: float = 1.0) -> list[dict[str, Any]]:
    return (steady_hour(hs, rng, n=30, latency=1.0, ttft=0.3) +
            steady_hour(hs, rng, n=30, latency=2.0 * slow, ttft=0.5 * ttft_factor, model="claude-3-5-haiku",
                        provider="anthropic"))


def history_of(make: Any, days: int = 8) -> list[dict[str, Any]]:
    rng = np.random.default_rng(5)
    return [d for h in range(days * 24) for d in make(T0 - (days * 24 - h) * HOUR, rng)]


def test_latency_p95_on_one_model(tmp_path: Path) -> None:
    engine = run(tmp_path, history_of(two_models), two_models(T0, np.random.default_rng(6), slow=3.0))
    haiku = {"provider": "anthropic", "model": "claude-3-5-haiku"}
    assert severity(engine, "latency_p95", "model", **haiku) == WARNING
    assert gauge(engine, "llm_anomaly_ratio", "latency_p95", "model", **haiku) == pytest.approx(3.0, rel=0.1)
    assert gauge(engine, "llm_anomaly_current", "latency_p95", "model", **haiku) == pytest.approx(6.0 * 1.15, rel=0.15)
    assert severity(engine, "latency_p95", "model", **MINI) == OK
    assert gauge(engine, "llm_anomaly_ratio", "latency_p95", "model", **MINI) == pytest.approx(1.0, rel=0.1)


def test_latency_p95_high(tmp_path: Path) -> None:
    engine = run(tmp_path, steady_history(latency=1.0), hour(latency=6.0))
    assert all_scopes(engine, "latency_p95") == [HIGH] * 3


def test_ttft_p95(tmp_path: Path) -> None:
    engine = run(tmp_path, history_of(two_models), two_models(T0, np.random.default_rng(6), ttft_factor=3.2))
    haiku = {"provider": "anthropic", "model": "claude-3-5-haiku"}
    assert severity(engine, "ttft_p95", "model", **haiku) == WARNING
    assert gauge(engine, "llm_anomaly_ratio", "ttft_p95", "model", **haiku) == pytest.approx(3.2, rel=0.12)
    assert severity(engine, "ttft_p95", "model", **MINI) == OK
    assert severity(engine, "latency_p95", "model", **haiku) == OK     # 2 s -> ~3.1 s is under 2.5x


def test_output_tokens_per_second_halved(tmp_path: Path) -> None:
    """Generation time 0.7 s -> 1.56 s for the same output: throughput falls to 45 %."""
    engine = run(tmp_path, steady_history(latency=1.0, ttft=0.3), hour(latency=0.3 + 0.7 / 0.45, ttft=0.3))
    assert all_scopes(engine, "output_tokens_per_second") == [WARNING] * 3
    assert gauge(engine, "llm_anomaly_ratio", "output_tokens_per_second") == pytest.approx(0.45, rel=0.1)
    assert gauge(engine, "llm_anomaly_zscore", "output_tokens_per_second") < -3
    rows = [r for r in engine.snapshot.rows() if r["signal"] == "output_tokens_per_second" and r["scope"] == "global"]
    assert rows[0]["direction"] == "down" and rows[0]["severity"] == "warning"
    assert severity(engine, "latency_p95") == OK                      # 1.86x is under the latency threshold


def test_faster_throughput_is_not_an_anomaly(tmp_path: Path) -> None:
    engine = run(tmp_path, steady_history(latency=1.0, ttft=0.3), hour(latency=0.3 + 0.7 / 4, ttft=0.3))
    assert gauge(engine, "llm_anomaly_ratio", "output_tokens_per_second") > 3
    assert severity(engine, "output_tokens_per_second") == OK


# --- scopes and gauges -------------------------------------------------------------------------

def test_spike_in_one_app_only(tmp_path: Path) -> None:
    """search: $1/h -> $5/h (high); chat: a steady $10/h, so the global total only goes $11 -> $15."""
    def apps(hs: float, rng: np.random.Generator) -> list[dict[str, Any]]:
        return steady_hour(hs, rng, app="search", cost=1.0) + steady_hour(hs, rng, app="chat", cost=10.0)
    test_hour = (steady_hour(T0, np.random.default_rng(3), app="search", cost=5.0, noise=0) +
                 steady_hour(T0, np.random.default_rng(4), app="chat", cost=10.0, noise=0))
    engine = run(tmp_path, history_of(apps), test_hour)
    assert severity(engine, "cost_per_hour", "app", app="search") == HIGH
    assert severity(engine, "cost_per_hour", "app", app="chat") == OK
    assert severity(engine, "cost_per_hour") == OK                      # $11 -> $15 overall is no spike
    assert gauge(engine, "llm_anomaly_current", "cost_per_hour") == pytest.approx(15.0)
    # scope labels: app scope carries only app; model scope provider and model; global neither
    assert engine.registry.get_sample_value("llm_anomaly_severity", {"signal": "cost_per_hour", "scope": "app",
                                                                      "app": "search", "model": "gpt-4o-mini"}) is None


def test_signal_threshold_override_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("signals:\n  cost_per_hour: {warning_ratio: 3.0, high_ratio: 8.0}\n")
    from exporter.config import load_settings
    settings = load_settings(cfg, flags={"db": str(tmp_path / "o.db")}, environ={})
    engine, _ = engine_at(settings, T_EVAL)
    ingest_by_day(engine, steady_history() + hour(cost=2.5, noise=0.0), now=T_EVAL)
    engine.evaluate(T_EVAL)
    assert severity(engine, "cost_per_hour") == OK                      # 2.5x is under the raised 3x
    rows = [r for r in engine.snapshot.rows() if r["signal"] == "cost_per_hour"]
    assert rows[0]["threshold"] == {"warning": 3.0, "high": 8.0}


def test_series_without_window_or_baseline_is_not_published(tmp_path: Path) -> None:
    """A scope with no requests in the window nor in the baseline has nothing to say; it
    should leave /metrics as it does after a restart (which reloads only the horizon)."""
    engine = run(tmp_path, steady_history(days=8), hour())
    engine.ingest([{"ts": T0 - 20 * DAY, "provider": "openai", "model": "ancient", "app": "gone"}], now=T_EVAL)
    engine.evaluate(T_EVAL)
    assert severity(engine, "cost_per_hour", "app", app="gone") is None
    assert severity(engine, "cost_per_hour", "app", **CHAT) == OK


def test_hourly_quantiles_belong_to_their_own_hour(tmp_path: Path) -> None:
    """One batch spanning ten hours (a replay or catch-up), each hour with its own latency:
    the baseline's hourly p95 of every hour must be that hour's, not a neighbour's."""
    engine, _ = engine_at(settings_for(tmp_path), T0)
    latency = {h: 1.0 + 0.5 * h for h in range(10)}
    items = [{"ts": T0 - (10 - h) * HOUR + 60 * i + 5, "provider": "openai", "model": "m", "latency_s": latency[h]}
             for h in range(10) for i in range(30)]
    assert engine.ingest(items, now=T0).accepted == 300
    _, q, before, span = engine.history.hourly(T0 + HOUR, baseline=10 * HOUR, seasonal=False)
    row = engine.history.keys.index(("global", "", "", ""))
    assert span[row] == 10
    got = q[row, :, 0]                                      # latency p95 per hour, oldest first
    assert got == pytest.approx([latency[h] for h in range(10)], rel=0.025)


@pytest.mark.parametrize("seasonal,expected", [(False, HIGH), (True, OK)])
def test_seasonal_baseline_compares_the_same_hour_of_day(tmp_path: Path, seasonal: bool, expected: float) -> None:
    """Every evening hour (22:00 UTC, the test hour's) costs $5 instead of $1: against the
    whole week that is a spike, against the same hour of the past days it is normal."""
    assert (T0 % DAY) / HOUR == 22

    def daily(hs: float, rng: np.random.Generator) -> list[dict[str, Any]]:
        return steady_hour(hs, rng, cost=5.0 if (hs % DAY) / HOUR == 22 else 1.0)
    engine = run(tmp_path, history_of(daily), hour(cost=5.0, noise=0.0), seasonal=seasonal)
    assert severity(engine, "cost_per_hour") == expected
    assert gauge(engine, "llm_anomaly_baseline", "cost_per_hour") == pytest.approx(5.0 if seasonal else 1.0, rel=0.1)



def test_an_hour_leaving_the_ring_marks_the_history_changed() -> None:
    """When an hour claims the ring slot of an older one, the cached baseline statistics
    may include the hour that left: the history reports it as changed from that hour, so
    the evaluator recomputes them (and not only when the hour turns)."""
    from exporter.storage.buckets import FIELDS, Groups
    from exporter.anomaly.history import ScopeHistory

    def hour_group(hour: int) -> Groups:
        empty = np.zeros((1, sketch.NBINS), dtype=np.int64)
        return Groups(np.array([1]), np.array([hour * 3600]), np.ones((1, len(FIELDS))),
                      {"latency": empty, "ttft": empty, "otps": empty})

    h = ScopeHistory(window=HOUR, horizon=4 * HOUR)
    keys = {1: ("app", "p", "m")}
    h0 = int(T0 // HOUR)
    for k in range(h.hours.n):                       # fill every slot
        h.add(hour_group(h0 + k), keys)
    h.changed_from_hour = np.iinfo(np.int64).max     # as after an evaluation
    h.add(hour_group(h0 + h.hours.n), keys)          # the next hour takes the oldest one's slot
    assert h.hours.tag[h0 % h.hours.n] == h0 + h.hours.n
    assert h.changed_from_hour == h0
