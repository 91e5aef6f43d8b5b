"""POST bodies into decoded JSON values: one object, an array, or NDJSON lines.

A bad NDJSON line is rejected under its record number and the other lines still count; a
malformed single document is a `BodyError` (HTTP 400), and so is a body that is neither JSON
nor NDJSON: binary data (an OTLP protobuf export sent here), or text none of whose lines is
a JSON value. One answer then says so, instead of one rejected record per line. Validation of the decoded values is
`records.parse_record` and `batch.parse_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .rejections import DEFAULT_LIMIT, Rejected, Rejections


class BodyError(ValueError):
    """The request body as a whole cannot be read (malformed JSON): an HTTP 400."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None, pos: int | None = None):
        super().__init__(message)
        self.line, self.column, self.pos = line, column, pos


@dataclass(slots=True)
class Decoded:
    """A POST body split into decoded JSON values: `items[k]` is record number `indices[k]`
    (None: k); records that did not decode are in `rejections` under their number."""

    items: list[Any]
    indices: list[int] | None
    rejections: Rejections


NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")
BINARY_TYPES = ("application/x-protobuf", "application/protobuf", "application/grpc", "application/octet-stream")


def decode_body(body: bytes, content_type: str = "", max_errors: int = DEFAULT_LIMIT) -> Decoded:
    """Split a POST body into decoded items: one object, an array, or NDJSON lines.

    Lines of an NDJSON body that fail to decode are rejected under their record number, so
    the other lines still count; a malformed single JSON document raises BodyError.
    """
    ct = content_type.split(";")[0].strip().lower()
    if ct in BINARY_TYPES:
        raise BodyError(f"Content-Type {ct}: this endpoint takes JSON or NDJSON records (OpenTelemetry OTLP "
                        "exports go to POST /v1/traces)")
    text = body.strip()
    if not text:
        raise BodyError("empty body: send a JSON object, a JSON array or NDJSON")
    declared = ct in NDJSON_TYPES
    ndjson = declared
    if not ndjson and ct not in ("application/json",) and not text.startswith(b"[") and b"\n" in text:
        try:        # a pretty-printed object is one document; NDJSON never parses as one
            doc = orjson.loads(text)
            return Decoded(doc if isinstance(doc, list) else [doc], None, Rejections(max_errors))
        except orjson.JSONDecodeError:
            ndjson = True
    if ndjson:
        decoded = decode_ndjson(text, max_errors)
        if not decoded.items and (not declared or is_binary(text)):
            # Nothing decoded: the body is not NDJSON with some bad lines but something else.
            # (Declared NDJSON of text lines is answered line by line: a log of junk lines.)
            first = next(iter(decoded.rejections), None)
            raise BodyError("body is neither JSON nor NDJSON" + (" (binary data)" if is_binary(text) else "")
                            + (f": {first.reason}" if first else ""))
        return decoded
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise BodyError(f"malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}",
                        e.lineno, e.colno, e.pos) from None
    return Decoded(doc if isinstance(doc, list) else [doc], None, Rejections(max_errors))


_CONTROL = np.zeros(256, dtype=bool)
_CONTROL[[c for c in range(32) if c not in (9, 10, 13)]] = True
_CONTROL[127] = True


def is_binary(data: bytes) -> bool:
    """Holds a control character JSON text never has outside a string, and never raw inside one."""
    return bool(_CONTROL[np.frombuffer(data, dtype=np.uint8)].any())


_BLANK = np.zeros(256, dtype=bool)
_BLANK[[ord(" "), ord("\t"), ord("\r"), ord("\n")]] = True


def decode_ndjson(text: bytes, max_errors: int = DEFAULT_LIMIT) -> Decoded:
    """NDJSON lines as records; blank lines are skipped and not numbered.

    Lines are found with numpy, a slice of about a megabyte at a time, and only a line
    whose first character is `{` is handed to the JSON decoder: any other line cannot be a
    record, so it is counted as rejected and decoded again only if it is among the
    rejections kept for the answer. Eight million junk lines cost some arrays of offsets
    per slice, not eight million Python objects."""
    rejections = Rejections(max_errors)
    items: list[Any] = []
    indices: list[int] = []
    at, counted, lines = 0, 0, 0
    while at < len(text):
        cut = text.find(b"\n", min(at + NDJSON_SLICE, len(text)))
        cut = len(text) if cut < 0 else cut + 1
        counted, lines = _decode_slice(text, at, cut, counted, lines, items, indices, rejections)
        at = cut
    return Decoded(items, indices, rejections)


NDJSON_SLICE = 1 << 20


def _decode_slice(text: bytes, at: int, cut: int, counted: int, lines: int, items: list[Any], indices: list[int],
                  rejections: Rejections) -> tuple[int, int]:
    """Decode the lines of text[at:cut] (whole lines); `counted` records and `lines` lines
    came before them. Returns both counts after them."""
    buf = np.frombuffer(text, dtype=np.uint8, count=cut - at, offset=at)
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], ends + 1))
    ends = np.concatenate((ends, [buf.size]))
    first = np.where(ends > starts, buf[np.minimum(starts, max(buf.size - 1, 0))], 10).astype(np.uint8)
    blank = _BLANK[first]
    if blank.any():         # a line starting with white space: strip it in Python (rare in real logs)
        for j in np.flatnonzero(blank & (ends > starts)).tolist():
            stripped = text[at + starts[j]:at + ends[j]].lstrip()
            first[j] = stripped[0] if stripped else 10
        blank = _BLANK[first]
    line = np.flatnonzero(~blank)                   # non-blank lines, in order: record counted + k is line[k]
    objects = first[line] == ord("{")
    failed: list[int] = []
    for k, s, e in zip(np.flatnonzero(objects).tolist(), starts[line[objects]].tolist(), ends[line[objects]].tolist()):
        try:
            items.append(orjson.loads(text[at + s:at + e]))
            indices.append(counted + k)
        except orjson.JSONDecodeError:
            failed.append(k)
    bad = np.flatnonzero(~objects)
    if failed:
        bad = np.sort(np.concatenate([bad, np.asarray(failed, dtype=np.int64)]))

    def explain(j: int) -> Rejected:
        k = int(bad[j])
        n = int(line[k])
        return _line_rejection(counted + k, lines + n + 1, text[at + starts[n]:at + ends[n]])
    rejections.add_many(bad + counted, explain)
    return counted + int(line.size), lines + int(starts.size) - (buf.size > 0 and buf[-1] == 10)


def _line_rejection(index: int, line_no: int, raw: bytes) -> Rejected:
    """Why NDJSON line `line_no` (record `index`) is not a record."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return Rejected(index, "record", f"malformed JSON on line {line_no} column {e.colno}: {e.msg}")
    return Rejected(index, "record", f"must be a JSON object, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    return type(value).__name__
