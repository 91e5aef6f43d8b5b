"""Backtests run the live code path on event time: a backtest's snapshot at T equals a
live engine's evaluation at T over the same records; replay and backtest from the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from helpers import CLEAN_ENV, HOUR, T0, close_to, engine_at, exporter_command, ingest_by_day, settings_for, steady_hour, value

from exporter.anomaly.evaluator import Snapshot
from exporter.sources.replay import backtest, load_records

T = T0 + HOUR            # a multiple of the step: the live evaluation and a backtest step coincide
STEP = 300.0


def scenario() -> list[dict[str, Any]]:
    """Eight steady days, then an hour in which app `search` costs 5x and model haiku is 3x slower."""
    rng = np.random.default_rng(21)

    def hour(hs: float, rng: np.random.Generator, spike: bool = False) -> list[dict[str, Any]]:
        return (steady_hour(hs, rng, app="search", cost=5.0 if spike else 1.0, id_prefix="s") +
                steady_hour(hs, rng, app="chat", model="claude-3-5-haiku", provider="anthropic", n=30,
                            latency=6.0 if spike else 2.0, error_rate=0.03, id_prefix="c"))
    history = [d for h in range(8 * 24) for d in hour(T0 - (8 * 24 - h) * HOUR, rng)]
    return history + hour(T0, np.random.default_rng(22), spike=True)


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in items))
    return path


def by_key(snap: Snapshot) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {(r["signal"], r["scope"], r["app"], r["provider"], r["model"]): r for r in snap.rows()}


def test_backtest_snapshot_matches_live_evaluation(tmp_path: Path) -> None:
    items = scenario()
    path = write_jsonl(tmp_path / "history.jsonl", items)
    records, problems = load_records([str(path)], now=T)
    assert problems == [] and len(records) == len(items)
    assert all(a.ts <= b.ts for a, b in zip(records, records[1:]))           # sorted by event time

    # The live engine runs as it does in service: the records arrive as time passes and it
    # evaluates every step. The evaluator has a memory (the scopes that named an anomaly a
    # moment ago keep its name; the hours a cost verdict judged leave the size statistics),
    # so a backtest equals the live engine that judged at the same times.
    settings = settings_for(tmp_path)
    steps = [T - 2 * HOUR + k * STEP for k in range(25)]
    live, clock = engine_at(settings, steps[0])
    ingest_by_day(live, [d for d in items if d["ts"] + d["latency_s"] <= steps[0]], now=steps[0])
    live_snap = None
    for prev, t in zip([steps[0]] + steps, steps):
        clock.t = t
        arriving = [d for d in items if prev < d["ts"] + d["latency_s"] <= t]     # once each has ended
        if arriving:
            assert not live.ingest(arriving, now=t).rejected
        live_snap = live.evaluate(t)
    assert live_snap is not None

    snaps: dict[float, Snapshot] = {}
    transitions = backtest(settings, records, start=T - 2 * HOUR, end=T, step=STEP,
                           on_snapshot=lambda s: snaps.__setitem__(s.t, s))
    assert sorted(snaps) == steps
    bt = by_key(snaps[T])
    lv = by_key(live_snap)
    assert bt.keys() == lv.keys() and len(lv) == 7 * 5
    for k, row in lv.items():
        for field in ("severity", "current", "baseline", "ratio", "zscore", "evidence_window_seconds", "explained_by", "band_lower", "band_upper",
                      "baseline_hours", "requests_in_window"):
            assert bt[k][field] == close_to(row[field], rel=1e-9, abs=1e-12), (k, field)
    # the scenario is not trivially quiet: the spike and the slowdown are judged the same way
    assert lv[("cost_per_hour", "app", "search", None, None)]["severity"] == "high"
    assert lv[("latency_p95", "model", None, "anthropic", "claude-3-5-haiku")]["severity"] == "warning"
    assert lv[("cost_per_hour", "app", "chat", None, None)]["severity"] == "ok"
    # and the transitions say when each one started, in event time
    fired = {(t.signal, t.scope, t.series): t for t in transitions if t.before == "ok"}
    spike = fired[("cost_per_hour", "app", "search")]
    assert T0 < spike.at <= T and spike.after in ("warning", "high")
    assert ("latency_p95", "model", "anthropic/claude-3-5-haiku") in fired
    assert not any(t.at <= T0 for t in transitions)                          # quiet before the spike hour
    live.close()


def test_backtest_feeds_each_record_when_it_has_ended(tmp_path: Path) -> None:
    """A record is dated when its request started and reaches a live exporter only once the
    request has ended: two requests of an app started 250 s before T, taking 200 and 400 s.
    At T the backtest has the first only; a step later, both."""
    slow = [{"ts": T - 250.0, "provider": "openai", "model": "o3", "app": "slow", "latency_s": lat,
             "input_tokens": 100, "output_tokens": 100} for lat in (200.0, 400.0)]
    path = write_jsonl(tmp_path / "history.jsonl", scenario() + slow)
    records, _ = load_records([str(path)], now=T)
    snaps: dict[float, Snapshot] = {}
    backtest(settings_for(tmp_path), records, start=T - STEP, end=T + STEP, step=STEP,
             on_snapshot=lambda s: snaps.__setitem__(s.t, s))
    seen = {t: by_key(s)[("request_rate", "app", "slow", None, None)]["requests_in_window"]
            for t, s in snaps.items() if ("request_rate", "app", "slow", None, None) in by_key(s)}
    assert seen == {T: 1, T + STEP: 2}


def test_backtest_of_nothing() -> None:
    from exporter.config import load_settings
    assert backtest(load_settings(environ={}), [], None, None, STEP) == []


def test_replay_and_backtest_commands(tmp_path: Path) -> None:
    items = scenario()
    path = write_jsonl(tmp_path / "history.jsonl", items + [{"provider": "openai"}])
    db = tmp_path / "replayed.db"
    p = subprocess.run(exporter_command() + ["replay", str(path), "--db", str(db)], env=CLEAN_ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"replayed {len(items)} records: {len(items)} accepted, 0 duplicate, 1 rejected" in p.stdout
    assert f"record {len(items)}: model: is required" in p.stderr
    engine, _ = engine_at(settings_for(tmp_path, "replayed.db"), T)
    total = sum(v for m in ("gpt-4o-mini", "claude-3-5-haiku") for a in ("search", "chat")
                for v in [value(engine, "llm_requests_total", app=a, provider="openai" if m == "gpt-4o-mini" else "anthropic", model=m)]
                if v is not None)
    assert total == len(items)
    engine.close()

    p = subprocess.run(exporter_command() + ["backtest", str(path), "--from", str(T - HOUR), "--to", str(T),
                                             "--step", "5m", "--format", "json", "--db", str(tmp_path / "unused.db")],
                       env=CLEAN_ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["records"] == len(items)
    changes = {(t["signal"], t["scope"], t["series"], t["to"]) for t in out["transitions"]}
    assert ("cost_per_hour", "app", "search", "high") in changes
    assert all(T - HOUR <= t["at"] <= T for t in out["transitions"])
    assert not (tmp_path / "unused.db").exists()                            # a backtest never touches the store
