"""The engine's ingest path: counters and histograms, dedupe, label guards and the price table."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import T0, bucket_rows, engine_at, rec, settings_for, value

from exporter.engine import Engine
from exporter.ingest.prices import PriceError, PriceTable

SERIES = {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}


def series(model: str = "gpt-4o-mini", app: str = "chat", provider: str = "openai") -> dict[str, str]:
    return {"app": app, "provider": provider, "model": model}


# --- counters and histograms ---------------------------------------------------------------

def test_counters_tokens_errors_and_histograms(engine: Engine) -> None:
    res = engine.ingest([
        rec(T0 - 300, input_tokens=100, output_tokens=50, cache_read_tokens=30, reasoning_tokens=7, cost_usd=0.5,
            latency_s=1.0, ttft_s=0.25),
        rec(T0 - 200, input_tokens=200, output_tokens=0, cost_usd=0.25, latency_s=0.05, status=429),
        rec(T0 - 100, input_tokens=10, output_tokens=90, cost_usd=0.125, latency_s=130, status="error", error_type="timeout"),
        rec(T0 - 50, app="batch", input_tokens=1, output_tokens=1, cost_usd=1.0),
    ])
    assert (res.accepted, res.duplicate, res.rejected) == (4, 0, [])
    assert value(engine, "llm_requests_total", **SERIES) == 3
    assert value(engine, "llm_requests_total", **series(app="batch")) == 1
    assert value(engine, "llm_cost_usd_total", **SERIES) == pytest.approx(0.875)
    assert value(engine, "llm_unpriced_requests_total", **SERIES) == 0
    toks = {t: value(engine, "llm_tokens_total", **SERIES, token_type=t) for t in ("input", "output", "cache_read", "cache_write", "reasoning")}
    assert toks == {"input": 310, "output": 140, "cache_read": 30, "cache_write": None, "reasoning": 7}
    assert value(engine, "llm_request_errors_total", **SERIES, error_type="rate_limit") == 1
    assert value(engine, "llm_request_errors_total", **SERIES, error_type="timeout") == 1
    assert value(engine, "llm_request_errors_total", **SERIES, error_type="server_error") is None
    # latency buckets are cumulative and `le` is inclusive: 1.0 lands in le="1.0"
    h = "llm_request_duration_seconds"
    assert value(engine, h + "_bucket", **SERIES, le="0.1") == 1
    assert value(engine, h + "_bucket", **SERIES, le="0.5") == 1
    assert value(engine, h + "_bucket", **SERIES, le="1.0") == 2
    assert value(engine, h + "_bucket", **SERIES, le="120.0") == 2
    assert value(engine, h + "_bucket", **SERIES, le="+Inf") == 3
    assert value(engine, h + "_count", **SERIES) == 3
    assert value(engine, h + "_sum", **SERIES) == pytest.approx(131.05)
    assert value(engine, h + "_count", **series(app="batch")) is None       # no latency: no histogram series
    # TTFT only for the streamed request; throughput = 50 tokens / (1.0 - 0.25) s, errors excluded
    assert value(engine, "llm_time_to_first_token_seconds_count", **SERIES) == 1
    assert value(engine, "llm_time_to_first_token_seconds_bucket", **SERIES, le="0.2") == 0
    assert value(engine, "llm_time_to_first_token_seconds_bucket", **SERIES, le="0.35") == 1
    assert value(engine, "llm_output_tokens_per_second_count", **SERIES) == 1
    assert value(engine, "llm_output_tokens_per_second_sum", **SERIES) == pytest.approx(50 / 0.75)
    assert value(engine, "llm_exporter_records_total", result="accepted") == 4
    assert value(engine, "llm_requests_created", **SERIES) is None


def test_engine_registry_is_private(tmp_path: Path) -> None:
    a, _ = engine_at(settings_for(tmp_path, "a.db"))
    b, _ = engine_at(settings_for(tmp_path, "b.db"))
    a.ingest([rec(T0 - 10)])
    assert value(a, "llm_requests_total", **SERIES) == 1
    assert value(b, "llm_requests_total", **SERIES) is None
    a.close()
    b.close()


# --- dedupe ---------------------------------------------------------------------------------

def test_dedupe_within_and_across_batches(engine: Engine) -> None:
    r1 = engine.ingest([rec(T0 - 50, request_id="x1"), rec(T0 - 40, request_id="x2"), rec(T0 - 30, request_id="x1"),
                        rec(T0 - 20), rec(T0 - 20)])                  # no request_id: never deduplicated
    assert (r1.accepted, r1.duplicate, r1.duplicate_indices) == (4, 1, [2])
    r2 = engine.ingest([rec(T0 - 10, request_id="x2"), rec(T0 - 10, request_id="x3"), rec(T0 - 10, request_id="x1")])
    assert (r2.accepted, r2.duplicate, r2.duplicate_indices) == (1, 2, [0, 2])
    assert value(engine, "llm_requests_total", **SERIES) == 5
    assert value(engine, "llm_exporter_records_total", result="duplicate") == 3
    assert value(engine, "llm_exporter_records_total", result="accepted") == 5
    # an all-duplicate batch changes nothing but the duplicate count
    r3 = engine.ingest([rec(T0 - 5, request_id="x3")])
    assert (r3.accepted, r3.duplicate) == (0, 1)
    assert value(engine, "llm_requests_total", **SERIES) == 5
    assert value(engine, "llm_exporter_records_total", result="duplicate") == 4


def test_dedupe_window_expires(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, dedupe_window="1h")
    engine, clock = engine_at(settings, T0)
    assert engine.ingest([rec(T0 - 10, request_id="r")]).accepted == 1
    clock.t = T0 + 1800
    engine.prune()
    assert engine.ingest([rec(T0 + 1700, request_id="r")]).duplicate == 1
    clock.t = T0 + 7200
    engine.prune()                                                    # seen at T0, forgotten after an hour
    assert engine.ingest([rec(T0 + 7100, request_id="r")]).accepted == 1
    assert value(engine, "llm_requests_total", **SERIES) == 2
    engine.close()


# --- label guards ----------------------------------------------------------------------------

def test_label_overflow_maps_to_other(tmp_path: Path) -> None:
    engine, _ = engine_at(settings_for(tmp_path, label_limit_model=3))
    for m in ("m-a", "m-b", "m-c"):
        engine.ingest([rec(T0 - 100, model=m, cost_usd=0.01)])
    engine.ingest([rec(T0 - 90, model="m-d", cost_usd=0.01), rec(T0 - 80, model="m-d", cost_usd=0.01),
                   rec(T0 - 70, model="m-e", cost_usd=0.01), rec(T0 - 60, model="m-a", cost_usd=0.01)])
    for m in ("m-a", "m-b", "m-c"):
        assert value(engine, "llm_requests_total", **series(m)) == (2 if m == "m-a" else 1)
    assert value(engine, "llm_requests_total", **series("m-d")) is None
    assert value(engine, "llm_requests_total", **series("other")) == 3
    assert value(engine, "llm_cost_usd_total", **series("other")) == pytest.approx(0.03)
    assert value(engine, "llm_exporter_label_overflow_total", label="model") == 3
    assert value(engine, "llm_exporter_label_overflow_total", label="app") == 0
    assert engine.guards["model"].values == ["m-a", "m-b", "m-c"]
    engine.close()


def test_overflowed_model_is_still_priced_by_its_real_name(tmp_path: Path) -> None:
    engine, _ = engine_at(settings_for(tmp_path, label_limit_model=1))
    engine.ingest([rec(T0 - 100, model="gpt-4o", input_tokens=0, output_tokens=0)])
    engine.ingest([rec(T0 - 90, model="gpt-4o-mini", input_tokens=1_000_000, output_tokens=0)])
    assert value(engine, "llm_cost_usd_total", **series("other")) == pytest.approx(0.15)
    assert value(engine, "llm_unpriced_requests_total", **series("other")) == 0
    engine.close()


# --- prices ---------------------------------------------------------------------------------

def test_cost_from_the_price_table(engine: Engine) -> None:
    # gpt-4o-mini: $0.15 input, $0.60 output, $0.075 cache read per million; reasoning falls back
    # to the output price, cache writes to the input price.
    engine.ingest([rec(T0 - 10, input_tokens=1_000_000, output_tokens=500_000)])
    assert value(engine, "llm_cost_usd_total", **SERIES) == pytest.approx(0.45, abs=1e-12)
    engine.ingest([rec(T0 - 9, input_tokens=1200, output_tokens=300, cache_read_tokens=2000, cache_write_tokens=100,
                       reasoning_tokens=50)])
    extra = (1200 * 0.15 + 300 * 0.60 + 2000 * 0.075 + 100 * 0.15 + 50 * 0.60) / 1e6
    assert value(engine, "llm_cost_usd_total", **SERIES) == pytest.approx(0.45 + extra, abs=1e-12)
    engine.ingest([rec(T0 - 8, input_tokens=10**6, output_tokens=10**6, cost_usd=0.01)])   # the record's cost wins
    assert value(engine, "llm_cost_usd_total", **SERIES) == pytest.approx(0.46 + extra, abs=1e-12)
    assert value(engine, "llm_unpriced_requests_total", **SERIES) == 0


@pytest.mark.parametrize("model,expected", [
    ("gpt-4o-mini-2024-07-18", 0.15 + 0.60),        # dated snapshot: the longest matching family
    ("gpt-4o-2024-08-06", 2.50 + 10.00),
    ("openai/gpt-4o-mini", 0.15 + 0.60),              # provider prefix dropped
    ("GPT-4o-Mini", 0.15 + 0.60),                     # names are lower-cased on parse
    ("claude-3-5-haiku-20241022", 0.80 + 4.00),
    ("anthropic/claude-sonnet-4-20250514", 3.00 + 15.00),
])
def test_price_lookup_variants(engine: Engine, model: str, expected: float) -> None:
    engine.ingest([rec(T0 - 10, model=model, input_tokens=10**6, output_tokens=10**6)])
    assert value(engine, "llm_cost_usd_total", **series(model.lower())) == pytest.approx(expected)


def test_config_prices_override_and_extend(tmp_path: Path) -> None:
    cfg = tmp_path / "prices.yaml"
    cfg.write_text("prices:\n  gpt-4o-mini: {input: 1.0, output: 2.0}\n  My-Finetune: {input: 3.0, output: 12.0, cache_read: 0.5}\n")
    from exporter.config import load_settings
    settings = load_settings(cfg, flags={"db": str(tmp_path / "p.db")}, environ={})
    engine, _ = engine_at(settings)
    engine.ingest([rec(T0 - 10, input_tokens=10**6, output_tokens=10**6),
                   rec(T0 - 9, model="my-finetune-v2", input_tokens=10**6, output_tokens=10**6, cache_read_tokens=10**6)])
    assert value(engine, "llm_cost_usd_total", **SERIES) == pytest.approx(3.0)
    assert value(engine, "llm_cost_usd_total", **series("my-finetune-v2")) == pytest.approx(15.5)
    engine.close()


def test_bad_price_entry_is_refused() -> None:
    with pytest.raises(PriceError, match=r"prices.cheap: needs input and output"):
        PriceTable({"cheap": {"input": 1.0}})
    with pytest.raises(PriceError, match=r"prices.cheap.output: must be a non-negative number"):
        PriceTable({"cheap": {"input": 1.0, "output": -2}})


def test_unknown_model_is_unpriced_not_free(engine: Engine) -> None:
    engine.ingest([rec(T0 - 10, model="mystery-7b", input_tokens=10**6, output_tokens=10**6, request_id="u1"),
                   rec(T0 - 9, model="mystery-7b", input_tokens=10, output_tokens=10, request_id="u2"),
                   rec(T0 - 8, model="mystery-7b", input_tokens=10, output_tokens=10, cost_usd=0.2, request_id="u3")])
    m = series("mystery-7b")
    assert value(engine, "llm_requests_total", **m) == 3
    assert value(engine, "llm_unpriced_requests_total", **m) == 2
    assert value(engine, "llm_cost_usd_total", **m) == pytest.approx(0.2)   # only the record that carried a cost
    stored = {r["request_id"]: r["cost_usd"] for r in engine.store.records(0, T0 + 1)}
    assert stored == {"u1": None, "u2": None, "u3": 0.2}                   # unknown, not zero


# --- timestamps from the future ----------------------------------------------------------------

def test_far_future_timestamps_are_rejected_and_cannot_wipe_history(tmp_path: Path) -> None:
    """A typo'd year or a microsecond epoch (read as milliseconds: year 55,840) must not be
    accepted: pruning measures retention from the newest event, so one such record would
    delete every real bucket and record, and the second one could not even be stored."""
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0)
    engine.ingest([rec(T0 - 600, cost_usd=1.0, request_id="real")])
    res = engine.ingest([rec(T0 + 400 * 86400, request_id="typo-year"), rec(1_699_999_200_000_000, request_id="micro"),
                         rec(T0 + 1800, request_id="skewed-clock"), rec(T0 - 300, request_id="fine")])
    assert [(r.index, r.field) for r in res.rejected] == [(0, "ts"), (1, "ts")]
    assert "ahead of" in res.rejected[0].reason
    assert res.accepted == 2                                   # half an hour of clock skew is tolerated
    engine.prune()
    assert value(engine, "llm_requests_total", **SERIES) == 3
    assert [r["request_id"] for r in engine.store.records(0, T0 + 86400)] == ["real", "skewed-clock", "fine"]
    assert len(list(bucket_rows(engine.store, 3600, 0, T0 + 86400))) == 2
    assert len(list(bucket_rows(engine.store, 60, 0, T0 + 86400))) == 3
    engine.close()
