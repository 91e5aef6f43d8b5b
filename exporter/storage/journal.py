"""The journal: each committed batch's raw records (no text beyond identifiers) as one blob,
the store's `records` rows. Buckets are rebuilt from it after a crash, a restart restores the
detectors' windows from it, and `/v1/usage/recent` and the export read it."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from ..ingest.records import TOKEN_FIELDS, RecordColumns

STORED_FIELDS = ("ts", "provider", "model", "app", "operation", "input_tokens", "output_tokens", "cache_read_tokens",
                 "cache_write_tokens", "reasoning_tokens", "cost_usd", "latency_s", "ttft_s", "stream", "status",
                 "error_type", "stop_reason", "request_had_tools", "tool_calls", "session_id", "request_id",
                 "cache_write_1h_tokens", "service_tier", "batch")


def stored_blob(cols: RecordColumns, raw: dict[str, np.ndarray]) -> bytes:
    """A batch of records as one JSON object of columns (no text beyond identifiers).

    Column-wise is what makes keeping raw records cheap: numeric columns serialise as
    arrays in one call instead of one dict per record. `raw` holds the label columns
    before guarding (the store keeps what was sent). Tool calls are kept as the list of
    tool names when there are names, so a restart restores the loop detector's view; a
    record with more calls than the names kept (MAX_TOOL_NAMES) keeps the count."""
    columns: dict[str, Any] = {
        "ts": cols.ts, "provider": raw["provider"].tolist(), "model": raw["model"].tolist(), "app": raw["app"].tolist(),
        "operation": cols.operation.tolist(),
        **{f: getattr(cols, f) for f in TOKEN_FIELDS},
        "cost_usd": cols.cost, "latency_s": cols.latency, "ttft_s": cols.ttft,    # NaN is written as null
        "stream": cols.stream, "status": np.where(cols.is_error, "error", "ok").tolist(),
        "error_type": cols.error_type.tolist(), "stop_reason": cols.stop_reason.tolist(),
        "request_had_tools": cols.request_had_tools,
        "tool_calls": [list(t) if t and len(t) == c else c for t, c in zip(cols.tool_names.tolist(), cols.tool_calls.tolist())],
        "session_id": cols.session_id.tolist(), "request_id": cols.request_id.tolist(),
        "cache_write_1h_tokens": cols.cache_write_1h_tokens, "service_tier": cols.service_tier.tolist(),
        "batch": cols.batch,
    }
    return orjson.dumps(columns, option=orjson.OPT_SERIALIZE_NUMPY)


def stored_records(blob: bytes) -> list[dict[str, Any]]:
    """The records of one stored batch, as dicts of the stored fields."""
    columns = orjson.loads(blob)
    n = len(columns["ts"])
    return [dict(zip(STORED_FIELDS, row))   # blobs written before a field existed lack it
            for row in zip(*(columns.get(f, [None] * n) for f in STORED_FIELDS))]
