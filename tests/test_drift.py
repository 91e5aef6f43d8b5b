"""Drift detector: crafted windows with known rates, presets, warm-up and bounds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from exporter.detectors.drift import (
    PRESETS, SIGNALS, DriftDetector, DriftResult, DriftSettings, drift_signals, length_collapse_ratio,
    response_flags, stop_is_anomalous,
)
from exporter.ingest.records import RecordColumns, parse_record, to_columns

T0 = 1_700_000_000.0


def batch(n: int, start: float = T0, step: float = 10.0, model: str = "gpt-4o", provider: str = "openai",
          **fields: Any) -> RecordColumns:
    """n records one `step` apart; a field given as a list is taken per record."""
    recs = []
    for i in range(n):
        d: dict[str, Any] = {"ts": start + i * step, "provider": provider, "model": model, "output_tokens": 300}
        for k, v in fields.items():
            d[k] = v[i] if isinstance(v, list) else v
        recs.append(parse_record(d, start))
    return to_columns(recs)


def mixed(n: int, bad: int, **bad_fields: Any) -> dict[str, list[Any]]:
    """Per-record field lists where the first `bad` records carry `bad_fields` and are
    spread evenly through the window (so neither half of it is special)."""
    idx = set(np.linspace(0, n - 1, bad).round().astype(int).tolist()) if bad else set()
    assert len(idx) == bad
    out: dict[str, list[Any]] = {}
    defaults = {"output_tokens": 300, "stop_reason": "stop", "status": "ok", "tool_calls": 0, "request_had_tools": False}
    for k in bad_fields:
        out[k] = [bad_fields[k] if i in idx else defaults[k] for i in range(n)]
    return out


def only(results: list[DriftResult]) -> DriftResult:
    assert len(results) == 1
    return results[0]


def run(cols: RecordColumns, settings: DriftSettings | None = None, now: float | None = None) -> DriftResult:
    det = DriftDetector(settings or DriftSettings())
    det.observe(cols)
    return only(det.evaluate(now if now is not None else float(cols.ts.max()) + 1))


def test_healthy_window_is_quiet() -> None:
    r = run(batch(200, stop_reason="stop"))
    assert r.ready and r.fill == 200 and r.severity == 0 and r.reasons == []
    assert r.values["empty_response_rate"] == 0.0
    assert r.values["error_rate"] == 0.0
    assert r.values["length_collapse_ratio"] == pytest.approx(1.0)
    assert math.isnan(r.values["tool_silence_rate"])  # no request offered tools
    assert set(r.values) == set(SIGNALS)


def test_warm_up_gives_no_verdict() -> None:
    r = run(batch(49, output_tokens=0))  # every answer empty, but only 49 of them
    assert r.values["empty_response_rate"] == 1.0
    assert not r.ready and r.severity == 0 and r.reasons == [] and r.fill == 49
    r = run(batch(50, output_tokens=0))
    assert r.ready and r.severity == 2


def test_empty_responses_severe_with_reason_text() -> None:
    r = run(batch(200, **mixed(200, 40, output_tokens=0)))
    assert r.values["empty_response_rate"] == pytest.approx(0.20)
    assert r.severity == 2
    assert "empty_response_rate 0.20 >= severe 0.15" in r.reasons


def test_errors_are_not_empty_answers() -> None:
    r = run(batch(200, **mixed(200, 60, status="error", output_tokens=0)))
    assert r.values["error_rate"] == pytest.approx(0.30)
    assert r.values["empty_response_rate"] == 0.0
    assert r.severity == 2 and any(x.startswith("error_rate 0.30 >= severe") for x in r.reasons)


def test_one_mild_is_mild_two_mild_are_severe() -> None:
    one = run(batch(200, **mixed(200, 12, output_tokens=0)))  # 6 % empty: mild under normal
    assert one.severity == 1 and one.reasons == ["empty_response_rate 0.06 >= mild 0.05"]
    fields = mixed(200, 12, output_tokens=0)
    fields["stop_reason"] = ["content_filter" if i % 20 == 7 else "stop" for i in range(200)]  # 10 of 200
    two = run(batch(200, **fields))
    assert two.values["stop_anomaly_rate"] == pytest.approx(10 / 200)
    assert len(two.reasons) == 2 and all("mild" in x for x in two.reasons)
    assert two.severity == 2


def test_presets_differ_on_the_same_window() -> None:
    # 4 % empty answers: above `high`'s mild 3 %, below `normal` 5 % and `low` 10 %.
    cols = batch(200, **mixed(200, 8, output_tokens=0))
    for preset, want in (("high", 1), ("normal", 0), ("low", 0)):
        r = run(cols, DriftSettings(preset=preset))
        assert r.preset == preset and r.severity == want, preset
    # Per-model presets: the same data under two models gets two verdicts.
    a = batch(200, model="m-a", **mixed(200, 8, output_tokens=0))
    b = batch(200, model="m-b", **mixed(200, 8, output_tokens=0))
    det = DriftDetector(DriftSettings(preset="low", model_presets={"m-a": "high", "openai/m-b": "normal"}))
    det.observe(a)
    det.observe(b)
    res = {r.model: r for r in det.evaluate(T0 + 3000)}
    assert (res["m-a"].preset, res["m-a"].severity) == ("high", 1)
    assert (res["m-b"].preset, res["m-b"].severity) == ("normal", 0)


def test_presets_are_ordered_by_sensitivity() -> None:
    for name in SIGNALS:
        lo, no, hi = (PRESETS[p][name] for p in ("low", "normal", "high"))
        for th in (lo, no, hi):
            assert (th.severe > th.mild) if th.above else (th.severe < th.mild)
        if lo.above:
            assert lo.mild > no.mild > hi.mild and lo.severe > no.severe > hi.severe
        else:
            assert lo.mild < no.mild < hi.mild and lo.severe < no.severe < hi.severe


def test_length_collapse() -> None:
    lengths = [500 + (i % 7) * 10 for i in range(100)] + [90 + (i % 5) * 5 for i in range(100)]
    r = run(batch(200, output_tokens=lengths))
    assert r.values["length_collapse_ratio"] == pytest.approx(100 / 530, rel=0.05)
    assert r.severity == 2 and r.reasons[0].startswith("length_collapse_ratio 0.19 <= severe 0.25")
    # Growth is not collapse.
    r = run(batch(200, output_tokens=lengths[::-1]))
    assert r.values["length_collapse_ratio"] > 4 and r.severity == 0


def test_length_halves_follow_event_time_not_arrival() -> None:
    """Batches may overlap: the later batch carries older records. Halves are by time."""
    det = DriftDetector(DriftSettings())
    det.observe(batch(100, start=T0 + 1000, step=10, output_tokens=100))  # recent, short
    det.observe(batch(100, start=T0, step=10, output_tokens=500))  # older, arrived late
    r = only(det.evaluate(T0 + 3000))
    assert r.values["length_collapse_ratio"] == pytest.approx(0.2)


def test_tool_silence() -> None:
    calls = [0] * 180 + [1] * 20  # 90 % of tool requests got no call
    r = run(batch(200, request_had_tools=True, tool_calls=calls))
    assert r.values["tool_silence_rate"] == pytest.approx(0.9)
    assert r.severity == 2
    # An agent's normal share of final answers (25 %) is quiet.
    r = run(batch(200, request_had_tools=True, tool_calls=[0 if i % 4 == 0 else 1 for i in range(200)]))
    assert r.values["tool_silence_rate"] == pytest.approx(0.25) and r.severity == 0
    # Too few tool requests: no rate at all.
    r = run(batch(200, request_had_tools=[i < 10 for i in range(200)], tool_calls=0))
    assert math.isnan(r.values["tool_silence_rate"]) and r.severity == 0


def test_stop_reason_classification() -> None:
    reasons = np.array(["stop", "end_turn", "stop_sequence", "eos", "tool_use", "tool_calls", "function_call",
                        "length", "max_tokens", None, "content_filter", "error", "safety", "recitation",
                        "something_new"], dtype=object)
    got = stop_is_anomalous(reasons).tolist()
    assert got == [False] * 10 + [True] * 5


def test_min_events_guards_small_counts() -> None:
    # 2 odd stops in 50 responses is 4 %: above `high`'s 3 %, but two events are not a trend.
    fields = {"stop_reason": ["safety" if i in (10, 40) else "stop" for i in range(50)]}
    r = run(batch(50, **fields), DriftSettings(preset="high"))
    assert r.values["stop_anomaly_rate"] == pytest.approx(0.04) and r.severity == 0
    r = run(batch(50, **fields), DriftSettings(preset="high", min_events=2))
    assert r.severity == 1


def test_window_is_bounded_and_keeps_the_newest() -> None:
    det = DriftDetector(DriftSettings(window=200))
    det.observe(batch(150, output_tokens=0))  # old empties ...
    det.observe(batch(150, start=T0 + 1500, output_tokens=300))  # ... pushed out by 150 healthy
    r = only(det.evaluate(T0 + 3100))
    assert r.fill == 200
    assert r.values["empty_response_rate"] == pytest.approx(50 / 200)
    det.observe(batch(1000, start=T0 + 3000, step=1))
    r = only(det.evaluate(T0 + 4100))
    assert r.fill == 200 and r.values["empty_response_rate"] == 0.0


def test_max_age_drops_old_entries_and_forgets_the_series() -> None:
    det = DriftDetector(DriftSettings(max_age_s=3600))
    det.observe(batch(100, output_tokens=0))  # T0 .. T0+990
    det.observe(batch(60, start=T0 + 3000))
    r = only(det.evaluate(T0 + 4000))  # entries before T0+400 are too old
    assert r.fill == 60 + 60 and r.values["empty_response_rate"] == pytest.approx(60 / 120)
    assert det.evaluate(T0 + 3000 + 590 + 3601) == []


def test_signals_helpers_on_empty_and_tiny_windows() -> None:
    empty = np.zeros(0)
    vals = drift_signals(empty, empty.astype(np.int64), empty.astype(np.uint8))
    assert all(math.isnan(v) for v in vals.values())
    cols = batch(10)
    assert math.isnan(length_collapse_ratio(cols.ts, cols.output_tokens, response_flags(cols), 20))


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        DriftSettings(preset="paranoid")
    with pytest.raises(ValueError, match="unknown preset"):
        DriftSettings(model_presets={"gpt-4o": "extreme"})
    with pytest.raises(ValueError, match="min_fill"):
        DriftSettings(window=100, min_fill=150)


def test_to_dict_is_json_safe() -> None:
    d = run(batch(60)).to_dict()
    assert d["values"]["tool_silence_rate"] is None
    assert d["provider"] == "openai" and d["model"] == "gpt-4o" and d["ready"] is True


def test_a_change_in_the_app_mix_is_not_a_length_collapse() -> None:
    """One model, a verbose app (~600 tokens) and a terse one (~60): the terse app takes
    over the recent half. Per app nothing changed, so no collapse; the raw medians would
    say 0.1."""
    rng = np.random.default_rng(4)
    app = ["verbose"] * 70 + ["terse"] * 30 + ["verbose"] * 20 + ["terse"] * 80
    out = [int(rng.normal(600 if a == "verbose" else 60, 20)) for a in app]
    cols = batch(200, output_tokens=out, app=app)
    r = run(cols)
    assert 0.8 < r.values["length_collapse_ratio"] < 1.25 and r.severity == 0
    raw = length_collapse_ratio(cols.ts, cols.output_tokens, response_flags(cols), 20)
    assert raw < 0.2                                           # what the app-blind ratio would say
    # a real collapse in both apps still shows
    collapsed = [o if i < 100 else o // 5 for i, o in enumerate(out)]
    r = run(batch(200, output_tokens=collapsed, app=app))
    assert r.values["length_collapse_ratio"] < 0.3 and r.severity == 2
