"""Restarts: counters resume from the store, dedupe and label guards remember, the
anomaly history is rebuilt, and an acknowledged batch survives `kill -9` of the server."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from helpers import HOUR, T0, Server, bucket_rows as stored_buckets, close_to, engine_at, ingest_by_day, rec, sample_sum, settings_for, steady_history, steady_hour, value

from exporter.anomaly.evaluator import Evaluator
from exporter.anomaly.history import scope_text
from exporter.engine import Engine

USAGE_FAMILIES = ("llm_requests", "llm_request_errors", "llm_tokens", "llm_cost_usd", "llm_unpriced_requests",
                  "llm_request_duration_seconds", "llm_time_to_first_token_seconds", "llm_output_tokens_per_second",
                  "llm_exporter_records", "llm_exporter_label_overflow")


def usage_samples(engine: Engine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in engine.registry.collect():
        if fam.name in USAGE_FAMILIES:
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def mixed_batch(t: float, k: int, prefix: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(k)
    out = []
    for i in range(k):
        out.append(rec(t + i, app=("chat", "search")[i % 2], model=("gpt-4o-mini", "gpt-4o", "mystery-1")[i % 3],
                       input_tokens=int(rng.integers(1, 5000)), output_tokens=int(rng.integers(0, 900)),
                       cache_read_tokens=int(rng.integers(0, 300)), latency_s=float(rng.lognormal(0, 1)),
                       ttft_s=0.05, status=(200, 429, 500, 200)[i % 4], request_id=f"{prefix}-{i}"))
    return out


def test_counters_resume_after_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, label_limit_model=2)
    engine, _ = engine_at(settings)
    engine.ingest(mixed_batch(T0 - 900, 60, "a"))
    engine.ingest(mixed_batch(T0 - 600, 40, "b") + [{"bad": "record"}])
    before = usage_samples(engine)
    assert before[("llm_requests_total", (("app", "chat"), ("model", "gpt-4o-mini"), ("provider", "openai")))] > 0
    assert before[("llm_exporter_label_overflow_total", (("label", "model"),))] > 0
    assert before[("llm_exporter_records_total", (("result", "rejected"),))] == 1
    assert any(n == "llm_request_duration_seconds_bucket" for n, _ in before)
    engine.close()

    again, _ = engine_at(settings, T0 + 60)
    assert usage_samples(again) == before
    # and they keep counting from there
    again.ingest([rec(T0, app="chat", model="gpt-4o-mini", latency_s=0.3, request_id="c-1")])
    labels = {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}
    key = ("llm_requests_total", tuple(sorted(labels.items())))
    assert value(again, "llm_requests_total", **labels) == before[key] + 1
    assert value(again, "llm_request_duration_seconds_count", **labels) == \
        before[("llm_request_duration_seconds_count", key[1])] + 1
    again.close()


def test_dedupe_survives_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings)
    assert engine.ingest([rec(T0 - 10, request_id="once"), rec(T0 - 9, request_id="twice")]).accepted == 2
    engine.close()
    engine, _ = engine_at(settings)
    r = engine.ingest([rec(T0 - 10, request_id="once"), rec(T0 - 8, request_id="fresh"), rec(T0 - 9, request_id="twice")])
    assert (r.accepted, r.duplicate, r.duplicate_indices) == (1, 2, [0, 2])
    assert value(engine, "llm_requests_total", app="chat", provider="openai", model="gpt-4o-mini") == 3
    assert value(engine, "llm_exporter_records_total", result="duplicate") == 2
    engine.close()


def test_admitted_labels_survive_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, label_limit_model=3)
    engine, _ = engine_at(settings)
    for m in ("m-a", "m-b", "m-c", "m-d", "m-e"):
        engine.ingest([rec(T0 - 60, model=m)])
    assert value(engine, "llm_exporter_label_overflow_total", label="model") == 2
    engine.close()
    engine, _ = engine_at(settings)
    assert engine.guards["model"].values == ["m-a", "m-b", "m-c"]
    engine.ingest([rec(T0 - 30, model="m-c"), rec(T0 - 30, model="m-d"), rec(T0 - 30, model="m-f")])
    m = lambda name: value(engine, "llm_requests_total", app="chat", provider="openai", model=name)   # noqa: E731
    assert (m("m-a"), m("m-c"), m("other"), m("m-d"), m("m-f")) == (1, 2, 4, None, None)
    assert value(engine, "llm_exporter_label_overflow_total", label="model") == 4
    engine.close()


def test_anomaly_verdicts_are_the_same_after_restart(tmp_path: Path) -> None:
    """The history is rebuilt from hourly and minute buckets: a restart in the middle of a
    cost spike and a latency spike gives the same snapshot as the process that saw it live."""
    settings = settings_for(tmp_path)
    t = T0 + HOUR - 1
    engine, _ = engine_at(settings, t)
    spike = steady_hour(T0, np.random.default_rng(2), cost=5.0, latency=4.0, n=40)
    ingest_by_day(engine, steady_history(days=8) + spike, now=t)
    live = {(r["signal"], r["scope"]): r for r in engine.evaluate(t).rows()}
    assert live[("cost_per_hour", "global")]["severity"] == "high"
    assert live[("latency_p95", "global")]["severity"] in ("warning", "high")
    engine.close()

    again, _ = engine_at(settings, t)
    restored = {(r["signal"], r["scope"]): r for r in again.evaluate(t).rows()}
    assert restored.keys() == live.keys()
    for k, row in live.items():
        for field in ("current", "baseline", "ratio", "zscore", "band_lower", "band_upper", "baseline_hours",
                      "requests_in_window", "severity"):
            assert restored[k][field] == close_to(row[field], rel=1e-9, abs=1e-9), (k, field)
    again.close()


def test_five_minute_size_spreads_survive_restart(tmp_path: Path) -> None:
    """How far the scopes' five-minute mean sizes strayed is measured from coarse slots the
    store does not keep for the whole baseline: the process stores it per finished hour,
    and a restart reads it back (and re-derives the hours its minute buckets still cover),
    so the restored statistics are those of the process that saw the traffic live."""
    settings = settings_for(tmp_path)
    t = T0 + HOUR - 1
    engine, _ = engine_at(settings, t)
    rng = np.random.default_rng(4)
    day = [r for h in range(-30, 1) for r in steady_hour(T0 + h * HOUR, rng, n=30, cost=0.3 if h % 5 else 4.0)]
    ingest_by_day(engine, day, now=t)
    engine.evaluate(t)
    hours = np.arange(int(T0 // HOUR) - 30, engine.history.bursts_final_before())
    live = dict(zip(engine.history.keys, engine.history.take_slot_sizes(hours)))
    engine.close()

    again, _ = engine_at(settings, t)
    assert again.store.slot_sizes(int(hours[0])), "the statistics were stored"
    restored = dict(zip(again.history.keys, again.history.take_slot_sizes(hours)))
    assert live.keys() == restored.keys()
    for key, stats in live.items():
        assert (stats[..., 0] > 0).sum() >= 24, key                   # every finished hour has its slots
        np.testing.assert_allclose(restored[key], stats, rtol=1e-9, atol=1e-9, err_msg=str(key))
    again.close()


def _kept_and_restarted(tmp_path: Path, spike: Callable[[np.random.Generator], list[dict[str, Any]]], signal: str,
                        marks: str, restored: bool,
                        read: Callable[[list[dict[str, Any]]], dict[Any, Any]]) -> list[dict[Any, Any]]:
    """Eight steady days and the hour `spike` makes (from T0), which flags `signal` at all traffic;
    then two steady hours, read at their end (`read` of the rows) by a process that kept
    running and by one restarted right after the spike, whose evaluator holds the stored
    mark of the spike's hour (`marks`: the evaluator's method that lists them) if `restored`."""
    rng = np.random.default_rng(5)
    before = steady_history(days=8) + spike(rng)
    later = steady_hour(T0 + HOUR, rng) + steady_hour(T0 + 2 * HOUR, rng)
    t, t2 = T0 + HOUR - 1, T0 + 3 * HOUR - 1
    results = []
    for name, restart in (("kept", False), ("restarted", True)):
        settings = settings_for(tmp_path, name=f"{name}.db")
        engine, clock = engine_at(settings, t)
        ingest_by_day(engine, before, now=t)
        flagged = {r["scope"] for r in engine.evaluate(t).rows() if r["signal"] == signal and r["severity"] != "ok"}
        assert "global" in flagged
        if restart:
            engine.close()
            engine, clock = engine_at(settings, t)
            if restored:
                assert (scope_text(("global", "", "", "")), int(T0 // HOUR)) in getattr(engine.evaluator, marks)()
        clock.t = t2
        ingest_by_day(engine, later, now=t2)
        results.append(read(engine.evaluate(t2).rows()))
        engine.close()
    return results


@pytest.mark.parametrize("restored", [True, False])
def test_hours_a_cost_verdict_judged_survive_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     restored: bool) -> None:
    """The evaluator leaves the hours its cost and token verdicts judged out of the size
    statistics, so that a spike of the last days does not become the level and the spread
    the next one is measured against. The marks are stored: a process restarted after a
    spike judges the hours after it as the process that kept running does. (With the
    stored marks ignored, `restored` False, the spike hour is back in the statistics and
    the verdicts differ: the test can tell.)"""
    if not restored:
        monkeypatch.setattr(Evaluator, "load_judged", lambda self, rows: None)
    kept, again = _kept_and_restarted(
        tmp_path, lambda rng: steady_hour(T0, rng, cost=5.0, n=40), "cost_per_hour", "judged_rows", restored,
        lambda rows: {(r["signal"], r["scope"]): r["zscore"] for r in rows
                      if r["signal"] in ("cost_per_hour", "token_velocity")})
    same = all(again[k] == close_to(z, rel=1e-9, abs=1e-9) for k, z in kept.items())
    assert same == restored, (kept, again)


@pytest.mark.parametrize("restored", [True, False])
def test_hours_a_request_rate_verdict_judged_survive_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             restored: bool) -> None:
    """An hour of ten times the usual requests is flagged by the request rate's evaluation
    windows, and its hour is left out of the held windows (2 to 8 hours) after it, which
    would otherwise read it as a shift held for hours (400 + 2 x 40 requests against 120
    on the 3 hours since: 4x). The marks are stored: a process restarted after the burst
    stays as quiet two hours later as the process that kept running. (With the stored
    marks ignored, `restored` False, the restarted process warns: the test can tell.)"""
    if not restored:
        monkeypatch.setattr(Evaluator, "load_judged_requests", lambda self, rows: None)
    kept, again = _kept_and_restarted(
        tmp_path, lambda rng: steady_hour(T0, rng, n=400), "request_rate", "judged_request_rows", restored,
        lambda rows: {r["scope"]: r["severity"] for r in rows if r["signal"] == "request_rate"})
    assert kept["global"] == "ok", kept
    assert (again == kept) == restored, (kept, again)


# --- kill -9 ---------------------------------------------------------------------------------

BATCH = 25
BATCHES = 160


def batch_of(i: int, t: float) -> list[dict[str, Any]]:
    return [rec(t, request_id=f"k9-{i}-{j}", app=("a", "b")[j % 2], input_tokens=100 + j, output_tokens=10,
                latency_s=0.5) for j in range(BATCH)]


def test_acknowledged_records_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "k9.db"
    t = time.time() - 120
    acked: list[int] = []
    in_flight: list[int] = []
    stop = threading.Event()

    srv = Server(tmp_path, db).start()

    def client() -> None:
        for i in range(BATCHES):
            if stop.is_set():
                return
            in_flight[:] = [i]
            try:
                r = srv.client.post("/v1/records", json=batch_of(i, t), timeout=10)
            except Exception:   # the server died under us: this batch may or may not be stored
                return
            if r.status_code == 200 and r.json()["accepted"] == BATCH:
                acked.append(i)
                in_flight.clear()
            else:
                return

    th = threading.Thread(target=client, daemon=True)
    th.start()
    deadline = time.monotonic() + 60
    while len(acked) < 20 and time.monotonic() < deadline and th.is_alive():
        time.sleep(0.005)
    srv.kill9()                                   # mid-stream: the client is posting batch after batch
    stop.set()
    th.join(timeout=30)
    srv.stop()
    srv.client.close()
    assert len(acked) >= 20, "the client never got going"
    assert acked == list(range(len(acked)))       # sequential, so only one batch can be in flight
    assert len(acked) < BATCHES, "the kill came after the stream ended"

    with Server(tmp_path, db) as again:
        samples = again.scrape()
        counted = sample_sum(samples, "llm_requests_total")
        print(f"acked {len(acked)} in flight {in_flight} counted {counted}")
        acknowledged = len(acked) * BATCH
        assert counted >= acknowledged
        assert counted in (acknowledged, acknowledged + BATCH * len(in_flight))
        assert sample_sum(samples, "llm_exporter_records_total", result="accepted") == counted
        assert sample_sum(samples, "llm_request_duration_seconds_count") == counted
        # the buckets (read by the stats API) hold every counted record: batches that were
        # committed but not yet checkpointed into buckets were folded in from the journal
        stats = again.client.get("/v1/usage/stats", params={"group_by": "app"}).json()
        assert sum(g["requests"] for g in stats["groups"]) == counted
        # re-posting everything: dedupe makes the total exactly the number of distinct records
        accepted = duplicate = 0
        for i in range(BATCHES):
            body = again.client.post("/v1/records", json=batch_of(i, t)).json()
            accepted += body["accepted"]
            duplicate += body["duplicate"]
        assert duplicate == counted and accepted == BATCHES * BATCH - counted
        assert sample_sum(again.scrape(), "llm_requests_total") == BATCHES * BATCH


# --- the journal: batches committed between checkpoints ------------------------------------

def bucket_rows(engine: Engine) -> dict[tuple[int, int, int], tuple[list[float], list[int]]]:
    out = {}
    for res in (60, 3600):
        for start, sid, adds, sk in stored_buckets(engine.store, res, 0, T0 + 10 * HOUR):
            out[(res, start, sid)] = (adds.tolist(), [int(x) for k in ("latency", "ttft", "otps") for x in sk[k]])
    return out


def test_a_crash_between_checkpoints_loses_nothing_from_the_buckets(tmp_path: Path) -> None:
    """A process that dies after acknowledging batches but before folding them into the
    buckets: the next start folds them from the journal, and the buckets (and the history
    built from them) are exactly those of a process that shut down cleanly."""
    batches = [mixed_batch(T0 - 3 * HOUR + 97 * k, 30, f"j{k}") for k in range(5)]
    clean, _ = engine_at(settings_for(tmp_path / "clean"), T0)
    for b in batches:
        assert clean.ingest(b).accepted == 30
    expected = bucket_rows(clean)
    snap_clean = {(r["signal"], r["scope"]): r["current"] for r in clean.evaluate(T0).rows()}
    clean.close()

    crashed, _ = engine_at(settings_for(tmp_path / "crash"), T0)
    for b in batches:
        crashed.ingest(b)
    assert crashed.store._pending, "the batches should still be waiting for a checkpoint"
    # no close(): the process is gone with its pending groups; only the SQLite file remains
    again, _ = engine_at(settings_for(tmp_path / "crash"), T0)
    assert bucket_rows(again) == expected
    snap = {(r["signal"], r["scope"]): r["current"] for r in again.evaluate(T0).rows()}
    assert snap == pytest.approx(snap_clean, nan_ok=True)
    again.close()
    third, _ = engine_at(settings_for(tmp_path / "crash"), T0)      # folded once, not again
    assert bucket_rows(third) == expected
    third.close()


def test_records_kept_only_as_journal_when_retention_is_zero(tmp_path: Path) -> None:
    engine, _ = engine_at(settings_for(tmp_path, record_retention=0), T0)
    engine.ingest(mixed_batch(T0 - 600, 12, "r0"))
    assert list(engine.store.records(0, T0 + 1)) == []            # never served
    engine.store.checkpoint()
    rows = engine.store._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    assert rows == 0                                              # and gone once folded
    assert sum(b[2][0] for b in stored_buckets(engine.store, 60, 0, T0 + 1)) == 12
    engine.close()
