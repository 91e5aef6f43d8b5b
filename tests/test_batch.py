"""The columnar batch parser must accept, reject and convert exactly like the per-record one."""

from __future__ import annotations

import math

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.ingest.batch import concat, parse_batch, take
from exporter.storage.journal import stored_blob, stored_records
from exporter.ingest.records import RecordColumns, parse_items, to_columns

NOW = 1_800_000_000.0

valid_numbers = st.one_of(st.none(), st.integers(0, 2_000_000), st.floats(0, 1e4, allow_nan=False))
valid_texts = st.one_of(st.none(), st.sampled_from(["support", " Bot ", "s-1", "r-9", "OpenAI"]))
VALID = {
    "ts": st.one_of(st.none(), st.floats(1e9, 2e9), st.integers(int(1e12), int(2e12)),
                    st.sampled_from(["2026-11-23T10:00:00Z", "2026-11-23 10:00:00+02:00"])),
    "app": valid_texts, "operation": valid_texts, "session_id": valid_texts, "request_id": valid_texts,
    "input_tokens": st.integers(0, 10**6), "output_tokens": st.integers(0, 10**6),
    "cache_read_tokens": st.one_of(st.none(), st.integers(0, 10**5)), "cache_write_tokens": st.integers(0, 10),
    "reasoning_tokens": st.integers(0, 10), "cost_usd": valid_numbers, "latency_s": st.floats(1, 100),
    "ttft_s": st.one_of(st.none(), st.floats(0, 1)), "stream": st.one_of(st.booleans(), st.none()),
    "request_had_tools": st.one_of(st.booleans(), st.none()),
    "status": st.one_of(st.none(), st.sampled_from(["ok", "error", "failed", 200, 429, 503])),
    "error_type": st.one_of(st.none(), st.sampled_from(["rate_limit", "timeout", "ratelimit", "odd"])),
    "stop_reason": st.one_of(st.none(), st.sampled_from(["stop", "LENGTH", ["tool_calls"], [], " "])),
    "tool_calls": st.one_of(st.none(), st.integers(0, 5), st.sampled_from([["search"], [{"name": "a"}]])),
    "prompt": st.text(max_size=5),
    "cache_write_1h_tokens": st.integers(0, 12),       # above cache_write_tokens sometimes: refused
    "service_tier": st.one_of(st.none(), st.sampled_from(["flex", " Priority ", "default", "turbo", ""])),
    "batch": st.one_of(st.booleans(), st.none()),
}
BAD = st.sampled_from([-1, -0.5, "x", "", "12", True, [1], {"a": 1}, 1.5e12, 2e9, "x" * 201, 7, None, "yesterday"])


@st.composite
def record(draw: st.DrawFn) -> dict:
    """A record that is valid except, sometimes, for one field."""
    d = {"provider": draw(st.sampled_from(["openai", "Anthropic", " vertex "])),
         "model": draw(st.sampled_from(["gpt-4o-mini", "Claude-3-5-Haiku"]))}
    for k, strat in VALID.items():
        if draw(st.booleans()):
            d[k] = draw(strat)
    if draw(st.integers(0, 2)) == 0:
        d[draw(st.sampled_from(sorted(VALID) + ["provider", "model"]))] = draw(BAD)
    return d


def assert_same(a: RecordColumns, b: RecordColumns) -> None:
    assert len(a) == len(b)
    for f in RecordColumns.__slots__:  # type: ignore[attr-defined]
        x, y = getattr(a, f), getattr(b, f)
        if x.dtype.kind == "f":
            assert np.allclose(x, y, equal_nan=True), f
        else:
            assert [tuple(v) if isinstance(v, tuple) else v for v in x.tolist()] == \
                   [tuple(v) if isinstance(v, tuple) else v for v in y.tolist()], f


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record(), min_size=1, max_size=12))
def test_fast_path_matches_per_record_parser(items: list[dict]) -> None:
    cols, rejected, idx = parse_batch(items, NOW)
    good, bad, ref_idx = parse_items(items, NOW)
    assert sorted((r.index, r.field) for r in rejected) == sorted((r.index, r.field) for r in bad)
    # Columns may come in another order (rows that failed a fast check are re-parsed and appended).
    order = np.argsort(idx, kind="stable")
    assert sorted(idx) == ref_idx
    assert_same(take(cols, order), to_columns(good))


def test_alias_spellings_take_the_per_record_path() -> None:
    items = [{"provider": "openai", "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5, "latency_ms": 1500}]
    cols, rejected, _ = parse_batch(items, NOW)
    assert not rejected
    assert cols.input_tokens.tolist() == [10] and cols.output_tokens.tolist() == [5]
    assert math.isclose(cols.latency[0], 1.5)


def test_stored_blob_round_trips_without_text() -> None:
    items = [{"provider": "openai", "model": "gpt-4o", "app": "Bot", "input_tokens": 3, "ttft_s": 0.1, "latency_s": 0.5,
              "tool_calls": [{"function": {"name": "lookup", "arguments": "{\"q\": \"secret question\"}"}}],
              "prompt": "secret question", "request_id": "r1"},
             {"provider": "anthropic", "model": "claude-3-5-haiku", "status": 429, "cache_write_tokens": 9,
              "cache_write_1h_tokens": 4, "service_tier": "priority", "batch": True}]
    cols, _, _ = parse_batch(items, NOW)
    raw = {"app": cols.app, "provider": cols.provider, "model": cols.model}
    blob = stored_blob(cols, raw)
    assert b"secret" not in blob
    rows = stored_records(blob)
    assert rows[0]["tool_calls"] == ["lookup"] and rows[0]["app"] == "Bot" and rows[0]["ttft_s"] == 0.1
    assert rows[1]["status"] == "error" and rows[1]["error_type"] == "rate_limit" and rows[1]["cost_usd"] is None
    assert (rows[1]["cache_write_1h_tokens"], rows[1]["service_tier"], rows[1]["batch"]) == (4, "priority", True)
    again, rejected, _ = parse_batch(rows, NOW)       # what is stored parses back to the same columns
    assert not rejected
    assert_same(again, cols)


def test_blobs_stored_before_the_pricing_fields_still_read() -> None:
    cols, _, _ = parse_batch([{"provider": "p", "model": "m", "input_tokens": 1}], NOW)
    doc = orjson.loads(stored_blob(cols, {"app": cols.app, "provider": cols.provider, "model": cols.model}))
    for f in ("cache_write_1h_tokens", "service_tier", "batch"):
        del doc[f]
    rows = stored_records(orjson.dumps(doc))
    assert rows[0]["service_tier"] is None and rows[0]["input_tokens"] == 1
    again, rejected, _ = parse_batch(rows, NOW)
    assert not rejected and again.batch.tolist() == [False]


def test_concat_and_take_keep_every_column() -> None:
    cols, _, _ = parse_batch([{"provider": "p", "model": "m", "input_tokens": i} for i in range(4)], NOW)
    both = concat([take(cols, np.array([0, 1])), take(cols, np.array([2, 3]))])
    assert_same(both, cols)
