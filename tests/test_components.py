"""Failure isolation: a bug in one part (a detector, the evaluator, a tail follower) is counted
under its component and leaves the other parts running, the ingest path included."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import HOUR, T0, engine_at, rec, settings_for, steady_history, value

from exporter.sources.tail import TailFollower
from exporter.web import background as background_module
from exporter.web.background import Background


def broken(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected bug")


def errors(engine: Any, component: str) -> float | None:
    return value(engine, "llm_exporter_component_errors_total", component=component)


def last_success(engine: Any, component: str) -> float | None:
    return value(engine, "llm_exporter_component_last_success_timestamp_seconds", component=component)


def test_a_failing_detector_leaves_the_anomaly_gauges_and_the_other_detectors_running(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine, clock = engine_at(settings_for(tmp_path), T0)
    engine.ingest(steady_history(end=T0, days=2), now=T0)
    first = engine.evaluate(T0)
    assert first is not None and errors(engine, "drift") == 0.0 and last_success(engine, "drift") > 0
    monkeypatch.setattr(engine.detectors.drift, "evaluate", broken)
    monkeypatch.setattr(engine.detectors.drift, "observe", broken)

    # ingest still answers: the batch is committed and counted, the drift failure is only counted
    result = engine.ingest([rec(T0 + 10, request_id="after-bug", session_id="s1")], now=T0 + 10)
    assert result.accepted == 1 and value(engine, "llm_requests_total", app="chat", provider="openai",
                                          model="gpt-4o-mini") is not None
    assert errors(engine, "drift") == 1.0

    drift_before = engine.detectors.latest.drift
    snap = engine.evaluate(T0 + 60)
    assert snap is not None and snap is not first and snap.t == T0 + 60     # the anomaly snapshot moved on
    assert errors(engine, "drift") == 2.0 and errors(engine, "runaway") == 0.0 and errors(engine, "budget") == 0.0
    assert engine.detectors.latest.drift is drift_before                      # drift keeps its last verdict
    assert engine.detectors.latest.budget.now == T0 + 60                      # the others do not
    assert value(engine, "llm_exporter_evaluation_errors_total") == 1.0
    assert value(engine, "llm_drift_severity", provider="openai", model="gpt-4o-mini") is not None
    engine.close()


def test_a_failing_evaluator_keeps_its_last_snapshot_while_detectors_go_on(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = engine_at(settings_for(tmp_path), T0)
    engine.ingest(steady_history(end=T0, days=1), now=T0)
    first = engine.evaluate(T0)
    monkeypatch.setattr(engine.evaluator, "evaluate", broken)
    assert engine.evaluate(T0 + HOUR) is first
    assert errors(engine, "evaluator") == 1.0 and errors(engine, "budget") == 0.0
    assert engine.detectors.latest is not None and engine.detectors.latest.budget.now == T0 + HOUR
    assert value(engine, "llm_exporter_evaluation_errors_total") == 1.0
    engine.close()


def test_a_failing_first_detector_evaluation_publishes_empty_reports(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _ = engine_at(settings_for(tmp_path), T0)
    monkeypatch.setattr(engine.detectors.runaway, "evaluate", broken)
    monkeypatch.setattr(engine.detectors.budget, "evaluate", broken)
    assert engine.evaluate(T0) is not None
    rep = engine.detectors.latest
    assert rep is not None and rep.runaway.to_dict()["offenders"] == [] and rep.budget.to_dict()["rows"] == []
    engine.exposition()         # the scrape still renders
    engine.close()


def test_a_tail_follower_that_hits_an_unreadable_path_is_counted_and_restarted(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background_module, "TASK_RESTART_PAUSE", 0.05)
    engine, _ = engine_at(settings_for(tmp_path, evaluation_interval="1h"), time.time())
    followed = tmp_path / "records.jsonl"
    followed.mkdir()                    # a directory where a file should be: reading it raises IsADirectoryError
    follower = TailFollower(engine, followed, poll=0.02)
    bg = Background(engine, [("tail", follower.run)])
    bg.start()
    try:
        deadline = time.monotonic() + 10
        while errors(engine, "tail") < 2 and time.monotonic() < deadline:      # restarted, failed again
            time.sleep(0.02)
        assert errors(engine, "tail") >= 2
        followed.rmdir()
        followed.write_text('{"provider": "openai", "model": "gpt-4o", "request_id": "tail-1"}\n')
        while (engine.results_total["accepted"] < 1 or not last_success(engine, "tail")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.results_total["accepted"] == 1          # the restarted follower went on with the file
        assert last_success(engine, "tail") > 0
        assert all(t.is_alive() for t in bg.threads)
    finally:
        bg.close()
        engine.close()
    assert not any(t.is_alive() for t in bg.threads if t is not threading.current_thread())
