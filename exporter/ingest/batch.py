"""Batch parsing: decoded JSON items straight into `RecordColumns`, one field at a time.

`records.parse_record` validates one record with plain Python; at tens of thousands of
records a second that per-record cost dominates ingest. Here each field is pulled out of
all items with one list comprehension and checked with numpy. Items that fail any check,
and whole batches that use alias spellings, go through `parse_record`, which stays the
single definition of what is valid and gives the exact error message. Both paths produce
the same columns (a test compares them on generated input).
"""

from __future__ import annotations

import math
import operator
from itertools import repeat
from typing import Any, Sequence

import numpy as np

from ..codes import is_none
from . import genai
from .attribution import DEFAULT as DEFAULT_ATTRIBUTION
from .attribution import Attribution
from .native import END_KEYS, FIRST_TOKEN_KEYS, MARKER_KEYS
from .records import (
    ALIASES,
    MAX_COST,
    MAX_SECONDS,
    MAX_TEXT,
    MAX_TOKENS,
    MAX_TS,
    MILLISECOND_FIELDS,
    TOKEN_FIELDS,
    RecordColumns,
    RecordError,
    _status_and_error,
    _tool_calls,
    parse_record,
    parse_ts,
    to_columns,
)
from .rejections import Rejected, Rejections

SLOW_KEYS = (frozenset(ALIASES) | frozenset(MILLISECOND_FIELDS) | MARKER_KEYS | frozenset(END_KEYS + FIRST_TOKEN_KEYS)
             | genai.KEYS)
# Keys that can give a record its provider and model (a `usage` block can hold any field; a
# native object's shape implies its provider and names its model its own way; GenAI attributes
# name both).
PROVIDER_KEYS = frozenset({"provider", genai.PROVIDER, genai.SYSTEM} | MARKER_KEYS
                          | {k for k, v in ALIASES.items() if v == "provider"})
MODEL_KEYS = frozenset({"model", genai.REQUEST_MODEL, genai.RESPONSE_MODEL} | MARKER_KEYS
                       | {k for k, v in ALIASES.items() if v == "model"})
_NUMBER_TYPES = (int, float, type(None))
_FLAG_TYPES = {bool, type(None)}


def parse_batch(items: Sequence[Any], now: float, indices: Sequence[int] | None = None,
                rejections: Rejections | None = None,
                attribution: Attribution = DEFAULT_ATTRIBUTION) -> tuple[RecordColumns, Rejections, list[int]]:
    """Validate decoded items; returns the good records as columns, the rejections (added to
    `rejections` when given), and the record number of each good record (in column order).
    `indices[k]` is the record number of `items[k]` (default: k); `attribution` resolves the
    app and provider of records that do not name them."""
    rejections = rejections if rejections is not None else Rejections()
    numbers = np.arange(len(items)) if indices is None else np.asarray(indices, dtype=np.int64)
    if set(map(type, items)) <= {dict}:       # the usual batch: every item is an object
        dicts: list[dict[str, Any]] = list(items)
    else:
        is_dict = np.fromiter((type(x) is dict for x in items), dtype=bool, count=len(items))
        kept, refused = np.flatnonzero(is_dict), np.flatnonzero(~is_dict)
        dicts = [items[j] for j in kept.tolist()]

        def not_an_object(k: int) -> Rejected:
            j = int(refused[k])
            item = items[j]
            if isinstance(item, Rejected):
                return Rejected(int(numbers[j]), item.field, item.reason)
            return Rejected(int(numbers[j]), "record", f"must be a JSON object, got {type(item).__name__}")
        rejections.add_many(numbers[refused], not_an_object)
        numbers = numbers[kept]
        del is_dict, kept, refused
    dicts, numbers = _screen(dicts, numbers, now, rejections, attribution)
    idx: list[int] = numbers.tolist()
    keys: set[str] = set().union(*dicts) if dicts else set()
    if keys & SLOW_KEYS:
        cols, slow_idx = _slow(dicts, idx, now, rejections, attribution)
        return cols, rejections, slow_idx
    cols, bad, absent = _fast(dicts, now, keys, attribution)
    if bad.any():
        # Without provider or model a record is refused whatever else it holds: count those
        # at once (a body of empty objects is millions of them) and explain only the kept.
        certain = np.flatnonzero(bad & absent)
        if certain.size:
            numbered = np.asarray(idx, dtype=np.int64)

            def explain(k: int) -> Rejected:
                j = int(certain[k])
                try:
                    parse_record(dicts[j], now, attribution)
                except RecordError as e:
                    return Rejected(idx[j], e.field, e.message)
                return Rejected(idx[j], "record", "is missing provider or model")   # not reached
            rejections.add_many(numbered[certain], explain)
        rest = np.flatnonzero(bad & ~absent)
        good = np.flatnonzero(~bad)
        slow_cols, slow_idx = _slow([dicts[j] for j in rest.tolist()], [idx[j] for j in rest.tolist()], now, rejections,
                                    attribution)
        cols = concat([take(cols, good), slow_cols])
        idx = [idx[j] for j in good.tolist()] + slow_idx
    return cols, rejections, idx


def _screen(dicts: list[dict[str, Any]], numbers: np.ndarray, now: float, rejections: Rejections,
            attribution: Attribution) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Refuse at once the objects with no key that could name a provider or a model: a
    body of empty objects is millions of them, and building columns for them first cost
    gigabytes. Only the rejections kept for the answer are explained (by parse_record).
    With a fallback provider (a header, a query parameter, `default_provider`), a model
    is enough."""
    if not dicts:
        return dicts, numbers
    n = len(dicts)            # map() of C functions: no Python bytecode per object
    any_provider = attribution.fallback_provider is not None
    ok = np.fromiter(map(operator.contains, dicts, repeat("model", n)), dtype=bool, count=n)
    if not any_provider:
        ok &= np.fromiter(map(operator.contains, dicts, repeat("provider", n)), dtype=bool, count=n)
    if ok.all():
        return dicts, numbers
    for j in np.flatnonzero(~ok).tolist():        # other spellings may name them
        d = dicts[j]
        ok[j] = (any_provider or not d.keys().isdisjoint(PROVIDER_KEYS)) and not d.keys().isdisjoint(MODEL_KEYS)
    if ok.all():
        return dicts, numbers
    bad = np.flatnonzero(~ok)

    def explain(k: int) -> Rejected:
        j = int(bad[k])
        try:
            parse_record(dicts[j], now, attribution)
        except RecordError as e:
            return Rejected(int(numbers[j]), e.field, e.message)
        return Rejected(int(numbers[j]), "record", "has no provider or model")    # not reached
    rejections.add_many(numbers[bad], explain)
    keep = np.flatnonzero(ok)
    return [dicts[j] for j in keep.tolist()], numbers[keep]


def _slow(dicts: list[dict[str, Any]], idx: list[int], now: float, rejections: Rejections,
          attribution: Attribution) -> tuple[RecordColumns, list[int]]:
    good, good_idx = [], []
    for d, i in zip(dicts, idx):
        try:
            good.append(parse_record(d, now, attribution))
            good_idx.append(i)
        except RecordError as e:
            rejections.add(Rejected(i, e.field, e.message))
    return to_columns(good), good_idx


def _fast(ds: list[dict[str, Any]], now: float, present: set[str],
          attribution: Attribution) -> tuple[RecordColumns, np.ndarray, np.ndarray]:
    """Columns for every item, a mask of the items that need the per-record path, and a mask
    of those missing a required field (which the per-record path would refuse too).
    `present` holds every key used in the batch: fields no record sends are not looked up."""
    n = len(ds)
    bad = np.zeros(n, dtype=bool)
    absent = np.zeros(n, dtype=bool)
    nothing: list[Any] = [None] * n

    def values(field: str) -> list[Any]:
        return [d.get(field) for d in ds] if field in present else nothing

    def number(field: str, upper: float, integer: bool) -> np.ndarray:
        vals = values(field)
        if vals is nothing:
            return np.full(n, np.nan)
        if not set(map(type, vals)) <= set(_NUMBER_TYPES):
            arr = np.full(n, np.nan)
            for j, v in enumerate(vals):
                if type(v) in _NUMBER_TYPES:
                    arr[j] = math.nan if v is None else v
                else:
                    bad[j] = True      # strings, booleans, objects: the per-record path decides
            arr = np.asarray(arr, dtype=np.float64)
        else:
            arr = np.asarray(vals, dtype=np.float64)
        missing = np.isnan(arr)
        ok = (arr >= 0) & (arr <= upper)                   # false for NaN and infinities
        if integer:
            ok &= arr == np.floor(arr)
        bad[~(ok | missing)] = True
        return arr

    def text(field: str, lower: bool = False, required: bool = False, fallback: str | None = None) -> np.ndarray:
        vals = values(field)
        out = np.empty(n, dtype=object)
        cleaned = _clean_texts(vals, lower)
        if cleaned is None:     # something is not a string or too long: find which, per item
            cleaned = []
            for j, v in enumerate(vals):
                if type(v) is str and len(v.strip()) <= MAX_TEXT:
                    t = v.strip()
                    cleaned.append((t.lower() if lower else t) or None)
                else:
                    if v is not None:
                        bad[j] = True
                    cleaned.append(None)
        out[:] = cleaned
        if fallback is not None:
            out[is_none(out)] = fallback
        if required:
            missing = np.flatnonzero(is_none(out))
            if missing.size:
                bad[missing] = True
                absent[missing] = [vals[j] is None or (type(vals[j]) is str and not vals[j].strip())
                                   for j in missing.tolist()]
        return out

    def flag(field: str) -> np.ndarray:
        vals = values(field)
        if set(map(type, vals)) <= _FLAG_TYPES:
            true: np.ndarray = np.array(vals, dtype=object) == True  # noqa: E712 (elementwise)
            return true
        out = np.zeros(n, dtype=bool)
        for j, v in enumerate(vals):
            if v is True:
                out[j] = True
            elif v is not None and v is not False:
                bad[j] = True
        return out

    ts_vals = values("ts")
    if set(map(type, ts_vals)) <= set(_NUMBER_TYPES):
        ts = np.asarray(ts_vals, dtype=np.float64)
        ts = np.where(np.isnan(ts), now, ts)
        with np.errstate(invalid="ignore"):
            bad[~np.isfinite(ts) | (ts < 0)] = True
            ts = np.where(ts > 1e11, ts / 1000.0, ts)
            bad[ts > MAX_TS] = True
    else:
        ts = np.empty(n)
        for j, v in enumerate(ts_vals):
            try:
                ts[j] = parse_ts(v, now)
            except RecordError:
                bad[j] = True
                ts[j] = now

    tokens = {f: number(f, MAX_TOKENS, True) for f in TOKEN_FIELDS}
    write_1h = number("cache_write_1h_tokens", MAX_TOKENS, True)
    with np.errstate(invalid="ignore"):   # the 1-hour writes are part of all writes
        bad[write_1h > np.nan_to_num(tokens["cache_write_tokens"], nan=0.0)] = True
    cost = number("cost_usd", MAX_COST, False)
    latency = number("latency_s", MAX_SECONDS, False)
    ttft = number("ttft_s", MAX_SECONDS, False)
    with np.errstate(invalid="ignore"):
        bad[~np.isnan(latency) & ~np.isnan(ttft) & (ttft > latency * 1.01 + 1e-3)] = True

    status = values("status")
    error_type = values("error_type")
    is_error = np.zeros(n, dtype=bool)
    etype = np.empty(n, dtype=object)
    judged = _per_distinct(list(zip(status, error_type)), _status_or_none)
    failed = [j for j, p in enumerate(judged) if p is None]
    if failed:
        bad[failed] = True
        judged = [p or ("ok", None) for p in judged]
    is_error[:] = [p[0] == "error" for p in judged]
    etype[:] = [p[1] for p in judged]

    calls_vals = values("tool_calls")
    tool_calls = np.zeros(n, dtype=np.int64)
    names = np.empty(n, dtype=object)
    names[:] = [()] * n
    signature = np.empty(n, dtype=object)
    if any(v is not None for v in calls_vals):
        for j, v in enumerate(calls_vals):
            if v is None:
                continue
            try:
                c, nm = _tool_calls(v)
            except RecordError:
                bad[j] = True
                continue
            tool_calls[j] = c
            names[j] = nm
            signature[j] = "|".join(nm) if nm else None

    stop = np.empty(n, dtype=object)
    stop_vals = values("stop_reason")
    stop_clean = _clean_texts(stop_vals, lower=True)
    if stop_clean is not None:
        stop[:] = stop_clean
    else:                       # lists (one reason per choice), or something to refuse
        for j, v in enumerate(stop_vals):
            if isinstance(v, list):
                v = v[0] if v else None
            if v is None or (type(v) is str and not v.strip()):
                stop[j] = None
            elif type(v) is str and len(v.strip()) <= MAX_TEXT:
                stop[j] = v.strip().lower()
            else:
                bad[j] = True

    service = None
    if genai.SERVICE_NAME in present:           # OpenTelemetry's service.name: an app source of its own
        service = text(genai.SERVICE_NAME)
        service[:] = _per_distinct(service.tolist(), genai.service_app)
    app = attribution.app_column(text("app"), service)
    operation = text("operation", lower=True)
    operation[is_none(operation)] = "chat"
    stream = flag("stream") | ~np.isnan(ttft)
    had_tools = flag("request_had_tools") | (tool_calls > 0)
    cols = RecordColumns(
        ts=ts, app=app, provider=text("provider", lower=True, required=True, fallback=_lower(attribution.fallback_provider)),
        model=text("model", lower=True, required=True), session_id=text("session_id"),
        **{f: _count(tokens[f]) for f in TOKEN_FIELDS},
        cost=cost, latency=latency, ttft=ttft, is_error=is_error, error_type=etype, stop_reason=stop,
        request_had_tools=had_tools, tool_calls=tool_calls, tool_signature=signature,
        request_id=text("request_id"), operation=operation, stream=stream, tool_names=names,
        cache_write_1h_tokens=_count(write_1h), service_tier=text("service_tier", lower=True), batch=flag("batch"),
    )
    return cols, bad, absent


def _lower(v: str | None) -> str | None:
    return v.strip().lower() or None if v is not None else None


def _count(a: np.ndarray) -> np.ndarray:
    """A token column as integers, missing counting 0."""
    return np.where(np.isnan(a), 0.0, a).astype(np.int64)


def _per_distinct(vals: list[Any], fn: Any) -> list[Any]:
    """`fn` of every value, computed once per distinct value: a batch holds thousands of
    records but a handful of apps, models or statuses. Unhashable values go one by one."""
    try:
        table = {v: fn(v) for v in set(vals)}
    except TypeError:
        return [fn(v) for v in vals]
    return list(map(table.__getitem__, vals))


def _status_or_none(pair: tuple[Any, Any]) -> tuple[str, str | None] | None:
    try:
        return _status_and_error(*pair)
    except (RecordError, TypeError):
        return None


def _clean_texts(vals: list[Any], lower: bool) -> list[str | None] | None:
    """Stripped (and lower-cased) strings, with '' as None; None if any value is neither a
    string nor null, or too long (the caller then finds which, item by item)."""
    if not lower and set(map(type, vals)) == {str}:   # ids: all distinct, usually clean already
        stripped = list(map(str.strip, vals))
        if max(map(len, stripped), default=0) > MAX_TEXT:
            return None
        return [s or None for s in stripped] if "" in stripped else list[str | None](stripped)
    try:
        distinct = set(vals)
    except TypeError:
        return None
    distinct.discard(None)
    table: dict[Any, str | None] = {None: None}
    for v in distinct:
        if type(v) is not str:
            return None
        t = v.strip()
        if len(t) > MAX_TEXT:
            return None
        table[v] = (t.lower() if lower else t) or None
    return list(map(table.__getitem__, vals))


def take(cols: RecordColumns, idx: np.ndarray) -> RecordColumns:
    """The rows `idx` of every column."""
    return RecordColumns(**{f: getattr(cols, f)[idx] for f in RecordColumns.__slots__})


def concat(parts: list[RecordColumns]) -> RecordColumns:
    parts = [p for p in parts if len(p)] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    return RecordColumns(**{f: np.concatenate([getattr(p, f) for p in parts])
                            for f in RecordColumns.__slots__})
