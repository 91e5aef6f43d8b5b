"""History files: JSONL or CSV, one record per line or row, read for replay and backtest."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from ..ingest.rejections import Rejected


def _decode_lines(lines: Iterable[bytes]) -> Iterator[Any | Rejected]:
    """Lines of a history file, one decoded value (or the Rejected of a bad line) per
    non-blank line."""
    index = 0
    for line_no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield Rejected(index, "record", f"malformed JSON on line {line_no} column {e.colno}: {e.msg}")
        index += 1


def read_history_file(path: str) -> Iterator[dict[str, Any] | Rejected]:
    """Rows of a JSONL or CSV history file (decided by extension, then by first byte)."""
    with open(path, "rb") as fh:
        head = fh.read(1)
    is_csv = path.lower().endswith(".csv") or (head not in (b"{", b"[") and not path.lower().endswith((".jsonl", ".ndjson", ".json")))
    if not is_csv:
        with open(path, "rb") as fh:
            yield from _decode_lines(fh)
        return
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            yield {k.strip(): v for k, v in row.items() if k is not None}
