"""Usage records: the one input format, its validation, and its columnar form.

A record describes one LLM request. Only the fields listed in `UsageRecord` survive
parsing; everything else in the input (prompts, completions, message arrays, headers)
is dropped here, which is how the exporter keeps its promise never to store text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import genai
from .attribution import DEFAULT as DEFAULT_ATTRIBUTION
from .attribution import Attribution
from .errors import ERROR_TYPES as ERROR_TYPES  # re-exported: the labels' vocabulary
from .errors import classify_error
from .native import END_KEYS, FIRST_TOKEN_KEYS, duration, translate, usage_tokens
from .rejections import RecordError as RecordError  # re-exported: the error of every record check
from .rejections import Rejected

# The token types: `llm_tokens_total{token_type}`, the record fields `<type>_tokens`, the bucket
# sums and the price columns all follow this one list.
TOKEN_TYPES: tuple[str, ...] = ("input", "output", "cache_read", "cache_write", "reasoning")
TOKEN_FIELDS: tuple[str, ...] = tuple(f"{t}_tokens" for t in TOKEN_TYPES)
MAX_TEXT = 200
MAX_TOKENS = 1_000_000_000
MAX_COST = 1_000_000.0
MAX_SECONDS = 86_400.0
MAX_TOOL_NAMES = 32          # tool names kept per record (the count keeps every call)
MAX_TOOL_NAME = 64
# The accepted event times: 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z. Earlier (Go's zero
# time 0001-01-01 is a common "unset") would give negative bucket starts; later cannot be
# written as RFC 3339. Records more than an hour ahead of the clock are refused at ingest.
MIN_TS = 0.0
MAX_TS = 253_402_300_799.0

# Other spellings of our fields, so that OpenAI-style usage blocks, LiteLLM spend logs and
# OpenTelemetry GenAI attributes can be posted as they are.
ALIASES: dict[str, str] = {
    "timestamp": "ts", "time": "ts", "start_time": "ts", "startTime": "ts",
    "gen_ai.provider.name": "provider", "gen_ai.system": "provider", "custom_llm_provider": "provider",
    "gen_ai.request.model": "model", "gen_ai.response.model": "model",
    "prompt_tokens": "input_tokens", "gen_ai.usage.input_tokens": "input_tokens",
    "completion_tokens": "output_tokens", "gen_ai.usage.output_tokens": "output_tokens",
    "cached_tokens": "cache_read_tokens", "cache_read_input_tokens": "cache_read_tokens",
    "cache_creation_input_tokens": "cache_write_tokens",
    "reasoning_output_tokens": "reasoning_tokens",
    "cost": "cost_usd", "spend": "cost_usd", "response_cost": "cost_usd",
    "latency": "latency_s", "duration_s": "latency_s", "duration": "latency_s",
    "time_to_first_token_s": "ttft_s", "ttft": "ttft_s",
    "finish_reason": "stop_reason", "gen_ai.response.finish_reasons": "stop_reason",
    "error.type": "error_type", "gen_ai.operation.name": "operation",
    "conversation_id": "session_id", "gen_ai.conversation.id": "session_id", "trace_id": "session_id",
    "id": "request_id", "call_id": "request_id",
    "tenant": "app", "team": "app", "service": "app",
}
MILLISECOND_FIELDS = {"latency_ms": "latency_s", "ttft_ms": "ttft_s", "duration_ms": "latency_s"}


@dataclass(slots=True)
class UsageRecord:
    """One validated LLM request. Text fields are bounded identifiers, never content."""

    ts: float
    provider: str
    model: str
    app: str = "unknown"
    operation: str = "chat"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0
    service_tier: str | None = None
    batch: bool = False
    cost_usd: float | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    stream: bool = False
    status: str = "ok"
    error_type: str | None = None
    stop_reason: str | None = None
    request_had_tools: bool = False
    tool_calls: int = 0
    tool_names: tuple[str, ...] = field(default_factory=tuple)
    session_id: str | None = None
    request_id: str | None = None

    @property
    def is_error(self) -> bool:
        return self.status == "error"

    def to_dict(self) -> dict[str, Any]:
        """The record as stored and exported (no text beyond identifiers)."""
        d = {f: getattr(self, f) for f in self.__slots__}
        d["tool_names"] = list(self.tool_names)
        return d


# --- field coercion -------------------------------------------------------------------

def _text(name: str, v: Any, required: bool = False, lower: bool = False) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise RecordError(name, "is required")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise RecordError(name, f"must be a string, got {type(v).__name__}")
    s = str(v).strip()
    if len(s) > MAX_TEXT:
        raise RecordError(name, f"is longer than {MAX_TEXT} characters")
    return s.lower() if lower else s


def _int(name: str, v: Any) -> int:
    if v is None or v == "":
        return 0
    if isinstance(v, bool):
        raise RecordError(name, "must be a whole number, got a boolean")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise RecordError(name, f"must be a whole number, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise RecordError(name, f"must be a whole number, got {v!r}")
    if f < 0 or f > MAX_TOKENS:
        raise RecordError(name, f"must be between 0 and {MAX_TOKENS}, got {v!r}")
    return int(f)


def _float(name: str, v: Any, upper: float) -> float | None:
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise RecordError(name, "must be a number, got a boolean")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise RecordError(name, f"must be a number, got {v!r}") from None
    if not math.isfinite(f) or f < 0 or f > upper:
        raise RecordError(name, f"must be between 0 and {upper:g}, got {v!r}")
    return f


def _bool(name: str, v: Any) -> bool:
    if v is None or v == "":
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise RecordError(name, f"must be true or false, got {v!r}")


def parse_ts(v: Any, now: float) -> float:
    """RFC 3339 text or epoch seconds; epoch values above 1e11 are read as milliseconds.
    The result lies in [MIN_TS, MAX_TS]."""
    if v is None or v == "":
        return now
    if isinstance(v, bool):
        raise RecordError("ts", "must be RFC 3339 text or epoch seconds, got a boolean")
    if isinstance(v, (int, float)) or (isinstance(v, str) and _looks_numeric(v)):
        f = float(v)
        if not math.isfinite(f) or f < 0:
            raise RecordError("ts", f"must be a non-negative epoch time, got {v!r}")
        t = f / 1000.0 if f > 1e11 else f
    elif not isinstance(v, str):
        raise RecordError("ts", f"must be RFC 3339 text or epoch seconds, got {type(v).__name__}")
    else:
        s = v.strip().replace("Z", "+00:00").replace("z", "+00:00")
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise RecordError("ts", f"is not RFC 3339 or epoch seconds: {v!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        try:
            t = dt.timestamp()
        except (OverflowError, ValueError):     # 0001-01-01 with a positive offset is before year 1 in UTC
            t = -math.inf
    if not MIN_TS <= t <= MAX_TS:
        raise RecordError("ts", f"must lie between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z, got {v!r}")
    return t


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _status_and_error(status: Any, error_type: Any) -> tuple[str, str | None]:
    """Fold the many ways of saying "this failed" into status + a fixed error_type
    (`errors.classify_error`: a recognised name wins, an unknown one never hides a status)."""
    name = _text("error_type", error_type)
    if status is None or status == "":
        return ("error", classify_error(None, name)) if name else ("ok", None)
    if isinstance(status, (int, float)) and not isinstance(status, bool):
        code = int(status)
        if 200 <= code < 400:
            return "ok", None
        return "error", classify_error(code, name) or "other"
    s = _text("status", status, lower=True) or "ok"
    if s.isdigit():
        return _status_and_error(int(s), error_type)
    if s in ("ok", "success", "succeeded", "completed"):
        return "ok", None
    if s in ("error", "failure", "failed", "fail"):
        return "error", classify_error(None, name) or "other"
    raise RecordError("status", f"must be 'ok', 'error' or an HTTP status code, got {status!r}")


def _tool_calls(v: Any) -> tuple[int, tuple[str, ...]]:
    """A count, or a list of calls of which only the tool names are kept."""
    if v is None or v == "":
        return 0, ()
    if isinstance(v, list):
        if not all(isinstance(call, (str, dict)) for call in v):
            raise RecordError("tool_calls", "must be a count or a list of tool names / call objects")
        if len(v) > MAX_TOKENS:
            raise RecordError("tool_calls", f"must hold at most {MAX_TOKENS} calls")
        names: list[str] = []
        for call in v[:MAX_TOOL_NAMES]:       # the names of the first calls; the count keeps them all
            if isinstance(call, str):
                names.append(call[:MAX_TOOL_NAME])
            else:
                fn = call.get("function")
                name = call.get("name") or (fn.get("name") if isinstance(fn, dict) else None) or "?"
                names.append(str(name)[:MAX_TOOL_NAME])
        return len(v), tuple(names)
    return _int("tool_calls", v), ()


def normalise_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Map aliases and unit-suffixed fields onto our names; our own names win. OpenTelemetry
    GenAI attributes go through `genai.merged`; a nested `usage` block (OpenAI, Anthropic,
    Bedrock or Gemini style) is split into our token types by its own semantics
    (`native.usage_tokens`)."""
    if not genai.KEYS.isdisjoint(raw):      # OpenTelemetry GenAI attributes count tokens their own way
        raw = genai.merged(raw)
    out: dict[str, Any] = {}
    usage = raw.get("usage")
    if isinstance(usage, dict):
        out.update(usage_tokens(usage))
        for k, v in usage.items():        # other fields a usage block may hold (cost, service_tier)
            out.setdefault(ALIASES.get(str(k), str(k)), v)
    for k, v in raw.items():
        if k in MILLISECOND_FIELDS and v not in (None, ""):
            target = MILLISECOND_FIELDS[k]
            try:
                out.setdefault(target, float(v) / 1000.0)
            except (TypeError, ValueError):
                raise RecordError(k, f"must be a number, got {v!r}") from None
            continue
        key = ALIASES.get(k, k)
        if key == k or key not in raw:
            out[key] = v
    return out


# Fields a poster may add around a native object (`{"app": "bot", **message.model_dump()}`)
OWN_FIELDS = frozenset(UsageRecord.__slots__) | frozenset(MILLISECOND_FIELDS)


def _times(raw: dict[str, Any], d: dict[str, Any]) -> None:
    """Latency and TTFT from a start (`ts`), an end and a first-token time, where a record
    carries times instead of durations. A first token at the end is no TTFT (LiteLLM
    writes the end time there when nothing streamed)."""
    end = next((raw[k] for k in END_KEYS if raw.get(k) not in (None, "")), None)
    first = next((raw[k] for k in FIRST_TOKEN_KEYS if raw.get(k) not in (None, "")), None)
    if end is None and first is None:
        return
    latency = duration(d.get("ts"), end)
    if d.get("latency_s") is None and latency is not None:
        d["latency_s"] = latency
    ttft = duration(d.get("ts"), first)
    if d.get("ttft_s") is None and ttft is not None and (latency is None or ttft < latency):
        d["ttft_s"] = ttft


def record_fields(raw: dict[str, Any], attribution: Attribution = DEFAULT_ATTRIBUTION) -> dict[str, Any]:
    """A decoded object's fields in our names, native objects translated, with its app and
    provider resolved by `attribution`'s precedence (None when nothing names them)."""
    native = translate(raw)
    if native is None:
        d = normalise_keys(raw)
        apps: dict[str, Any] = {}
        inferred = None
        if d.get("latency_s") is None or d.get("ttft_s") is None:
            _times(raw, d)
    else:
        d = normalise_keys({k: v for k, v in native.fields.items() if v is not None})
        d.update(normalise_keys({k: v for k, v in raw.items() if k in OWN_FIELDS and k not in native.owned
                                 and v is not None and v != ""}))
        apps, inferred = native.apps, native.provider
    apps["app"] = d.get("app")
    apps["service_name"] = genai.service_app(raw.get(genai.SERVICE_NAME))
    d["app"] = attribution.app(apps)
    if d.get("provider") is None or (isinstance(d["provider"], str) and not d["provider"].strip()):
        d["provider"] = attribution.provider(inferred)
    return d


def parse_record(raw: Any, now: float, attribution: Attribution = DEFAULT_ATTRIBUTION) -> UsageRecord:
    """Validate one decoded JSON object (or CSV row) into a record, or raise RecordError."""
    if not isinstance(raw, dict):
        raise RecordError("record", f"must be a JSON object, got {type(raw).__name__}")
    d = record_fields(raw, attribution)
    status, error_type = _status_and_error(d.get("status"), d.get("error_type"))
    latency = _float("latency_s", d.get("latency_s"), MAX_SECONDS)
    ttft = _float("ttft_s", d.get("ttft_s"), MAX_SECONDS)
    if latency is not None and ttft is not None and ttft > latency * 1.01 + 1e-3:
        raise RecordError("ttft_s", f"({ttft:g}) exceeds latency_s ({latency:g})")
    n_calls, names = _tool_calls(d.get("tool_calls"))
    stop = d.get("stop_reason")
    if isinstance(stop, list):
        stop = stop[0] if stop else None
    stream = _bool("stream", d.get("stream")) or ttft is not None
    cache_write = _int("cache_write_tokens", d.get("cache_write_tokens"))
    cache_write_1h = _int("cache_write_1h_tokens", d.get("cache_write_1h_tokens"))
    if cache_write_1h > cache_write:
        raise RecordError("cache_write_1h_tokens", f"({cache_write_1h}) is part of cache_write_tokens "
                                                   f"({cache_write}) and cannot exceed it")
    return UsageRecord(
        ts=parse_ts(d.get("ts"), now),
        provider=_text("provider", d.get("provider"), required=True, lower=True),  # type: ignore[arg-type]
        model=_text("model", d.get("model"), required=True, lower=True),  # type: ignore[arg-type]
        app=_text("app", d.get("app")) or "unknown",
        operation=_text("operation", d.get("operation"), lower=True) or "chat",
        input_tokens=_int("input_tokens", d.get("input_tokens")),
        output_tokens=_int("output_tokens", d.get("output_tokens")),
        cache_read_tokens=_int("cache_read_tokens", d.get("cache_read_tokens")),
        cache_write_tokens=cache_write,
        reasoning_tokens=_int("reasoning_tokens", d.get("reasoning_tokens")),
        cache_write_1h_tokens=cache_write_1h,
        service_tier=_text("service_tier", d.get("service_tier"), lower=True),
        batch=_bool("batch", d.get("batch")),
        cost_usd=_float("cost_usd", d.get("cost_usd"), MAX_COST),
        latency_s=latency,
        ttft_s=ttft,
        stream=stream,
        status=status,
        error_type=error_type,
        stop_reason=(_text("stop_reason", stop, lower=True) or None),
        request_had_tools=_bool("request_had_tools", d.get("request_had_tools")) or n_calls > 0,
        tool_calls=n_calls,
        tool_names=names,
        session_id=_text("session_id", d.get("session_id")),
        request_id=_text("request_id", d.get("request_id")),
    )


def parse_items(items: Sequence[Any | Rejected], now: float,
                attribution: Attribution = DEFAULT_ATTRIBUTION) -> tuple[list[UsageRecord], list[Rejected], list[int]]:
    """Validate decoded items; returns records, rejections and each record's input index."""
    good: list[UsageRecord] = []
    bad: list[Rejected] = []
    idx: list[int] = []
    for i, item in enumerate(items):
        if isinstance(item, Rejected):
            bad.append(Rejected(i, item.field, item.reason))
            continue
        try:
            good.append(parse_record(item, now, attribution))
            idx.append(i)
        except RecordError as e:
            bad.append(Rejected(i, e.field, e.message))
    return good, bad, idx


# --- columnar form --------------------------------------------------------------------

@dataclass(slots=True)
class RecordColumns:
    """A batch of records as numpy columns, for the vectorised paths.

    Missing floats (cost, latency, ttft) are NaN. String columns are object arrays.
    `cost` here is the final cost after pricing (NaN when unpriced).
    """

    ts: np.ndarray
    app: np.ndarray
    provider: np.ndarray
    model: np.ndarray
    session_id: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    cache_read_tokens: np.ndarray
    cache_write_tokens: np.ndarray
    reasoning_tokens: np.ndarray
    cost: np.ndarray
    latency: np.ndarray
    ttft: np.ndarray
    is_error: np.ndarray
    error_type: np.ndarray
    stop_reason: np.ndarray
    request_had_tools: np.ndarray
    tool_calls: np.ndarray
    tool_signature: np.ndarray
    request_id: np.ndarray
    operation: np.ndarray
    stream: np.ndarray
    tool_names: np.ndarray
    cache_write_1h_tokens: np.ndarray   # the part of cache_write_tokens written with a 1-hour lifetime
    service_tier: np.ndarray
    batch: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def total_tokens(self) -> np.ndarray:
        total: np.ndarray = (self.input_tokens + self.output_tokens + self.cache_read_tokens
                             + self.cache_write_tokens + self.reasoning_tokens)
        return total

    @property
    def output_tokens_per_second(self) -> np.ndarray:
        """Output tokens over generation time, latency minus TTFT; NaN where either is unknown.

        A request without a TTFT (not streamed) has no generation time of its own: its
        latency also holds the queue and the prompt's prefill, which grow with the prompt,
        so its tokens per second would be another quantity. Mixed into one distribution
        with streamed requests, a model's median would follow the share of its traffic
        that streams (which app is busy), not how fast it generates."""
        gen = self.latency - self.ttft
        with np.errstate(divide="ignore", invalid="ignore"):
            tps = np.where((gen > 0) & (self.output_tokens > 0) & ~self.is_error, self.output_tokens / gen, np.nan)
        return tps

    @property
    def ms_per_output_token(self) -> np.ndarray:
        """Milliseconds of the whole request per output token, for successful requests
        without a TTFT; NaN elsewhere.

        A request's duration grows with the length of its answer, so across a model's
        traffic durations spread over orders of magnitude, and a slowdown hides among long
        answers. Per output token, the spread narrows to how fast the model serves, and a
        slower model shows as many requests beyond the usual tail. Streamed requests are
        left out: their TTFT and generation speed already split their duration into its
        two parts. Milliseconds keep fast models (a few thousand tokens a second) inside
        the sketches' range."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ms = np.where(np.isnan(self.ttft) & (self.latency > 0) & (self.output_tokens > 0) & ~self.is_error,
                          1000.0 * self.latency / self.output_tokens, np.nan)
        return ms


def to_columns(records: Sequence[UsageRecord], costs: Sequence[float | None] | None = None) -> RecordColumns:
    """Columnar view of records; `costs` overrides the records' own cost (after pricing)."""
    def col(getter: Callable[[UsageRecord], Any], dtype: Any) -> np.ndarray:
        return np.fromiter((getter(r) for r in records), dtype=dtype, count=len(records))

    def fcol(values: Iterable[float | None]) -> np.ndarray:
        return np.fromiter((math.nan if v is None else v for v in values), dtype=np.float64, count=len(records))

    def ocol(getter: Callable[[UsageRecord], Any]) -> np.ndarray:
        out = np.empty(len(records), dtype=object)
        out[:] = [getter(r) for r in records]
        return out

    return RecordColumns(
        ts=col(lambda r: r.ts, np.float64),
        app=ocol(lambda r: r.app),
        provider=ocol(lambda r: r.provider),
        model=ocol(lambda r: r.model),
        session_id=ocol(lambda r: r.session_id),
        input_tokens=col(lambda r: r.input_tokens, np.int64),
        output_tokens=col(lambda r: r.output_tokens, np.int64),
        cache_read_tokens=col(lambda r: r.cache_read_tokens, np.int64),
        cache_write_tokens=col(lambda r: r.cache_write_tokens, np.int64),
        reasoning_tokens=col(lambda r: r.reasoning_tokens, np.int64),
        cost=fcol(costs if costs is not None else (r.cost_usd for r in records)),
        latency=fcol(r.latency_s for r in records),
        ttft=fcol(r.ttft_s for r in records),
        is_error=col(lambda r: r.status == "error", np.bool_),
        error_type=ocol(lambda r: r.error_type),
        stop_reason=ocol(lambda r: r.stop_reason),
        request_had_tools=col(lambda r: r.request_had_tools, np.bool_),
        tool_calls=col(lambda r: r.tool_calls, np.int64),
        tool_signature=ocol(lambda r: "|".join(r.tool_names) if r.tool_names else None),
        request_id=ocol(lambda r: r.request_id),
        operation=ocol(lambda r: r.operation),
        stream=col(lambda r: r.stream, np.bool_),
        tool_names=ocol(lambda r: r.tool_names),
        cache_write_1h_tokens=col(lambda r: r.cache_write_1h_tokens, np.int64),
        service_tier=ocol(lambda r: r.service_tier),
        batch=col(lambda r: r.batch, np.bool_),
    )
