"""OpenTelemetry GenAI semantic-convention attributes as usage-record fields.

One mapping serves two inputs: the spans the OTLP receiver decodes (`ingest.otlp`) and
records posted to `/v1/records` that carry the attribute names flat (`gen_ai.usage.input_tokens`
beside `gen_ai.request.model`). Both get the same tokens, ids and outcome.

The conventions count tokens differently from our records, and that difference is the
cost of a cached request: `gen_ai.usage.input_tokens` *includes* the cache reads and cache
writes (`gen_ai.usage.cache_read.input_tokens`, `gen_ai.usage.cache_creation.input_tokens`),
and `gen_ai.usage.output_tokens` includes `gen_ai.usage.reasoning.output_tokens`, while a
record's `input_tokens` is the uncached input and its `output_tokens` the visible output
(each type has its own price). So the cached and reasoning parts are subtracted. An
instrumentation that reports an input count *smaller* than its cached part cannot have
included it (Anthropic's API counts that way, and some instrumentations pass it on), so
then nothing is subtracted.

`gen_ai.response.id` becomes the record's `request_id`, so the same response reported
twice (an exporter's retry, two instrumentations of one call, a span and a posted record)
counts once. An id too short to be unique over the dedupe window (a local server's
`chatcmpl-123`) is not used: deduplicating on it would drop real requests.

Error classification (`error.type`, `http.response.status_code`) follows the one every
source shares (`ingest.errors`). `service.name` is not the record's own app but an app
source of its own (`service_name` in the `app_precedence` setting, `ingest.attribution`):
`service_app` says which app it names, and the record's precedence decides whether it wins.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .errors import classify_error

# --- attribute names ------------------------------------------------------------------

PROVIDER = "gen_ai.provider.name"
SYSTEM = "gen_ai.system"                       # the older name of gen_ai.provider.name
OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
FINISH_REASONS = "gen_ai.response.finish_reasons"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
STREAM = "gen_ai.request.stream"
CONVERSATION = "gen_ai.conversation.id"
TOOL_DEFINITIONS = "gen_ai.tool.definitions"
INPUT = "gen_ai.usage.input_tokens"
OUTPUT = "gen_ai.usage.output_tokens"
CACHE_READ = "gen_ai.usage.cache_read.input_tokens"
CACHE_CREATION = "gen_ai.usage.cache_creation.input_tokens"
REASONING = "gen_ai.usage.reasoning.output_tokens"
SERVICE_TIER = "openai.response.service_tier"
ERROR_TYPE = "error.type"
HTTP_STATUS = "http.response.status_code"
SERVICE_NAME = "service.name"

# Older spellings still emitted by instrumentations in the field, each after its current name.
INPUT_NAMES = (INPUT, "gen_ai.usage.prompt_tokens")
OUTPUT_NAMES = (OUTPUT, "gen_ai.usage.completion_tokens")
CACHE_READ_NAMES = (CACHE_READ, "gen_ai.usage.cache_read_input_tokens")
CACHE_CREATION_NAMES = (CACHE_CREATION, "gen_ai.usage.cache_creation_input_tokens")
SERVICE_TIER_NAMES = (SERVICE_TIER, "gen_ai.openai.response.service_tier")
HTTP_STATUS_NAMES = (HTTP_STATUS, "http.status_code")

# Every attribute the mapping reads: the receiver converts only these (a span's prompt and
# completion attributes are never even decoded into Python strings).
READ = frozenset({
    PROVIDER, SYSTEM, OPERATION, REQUEST_MODEL, RESPONSE_MODEL, RESPONSE_ID, FINISH_REASONS,
    TIME_TO_FIRST_CHUNK, STREAM, CONVERSATION, REASONING, ERROR_TYPE,
    *INPUT_NAMES, *OUTPUT_NAMES, *CACHE_READ_NAMES, *CACHE_CREATION_NAMES, *SERVICE_TIER_NAMES, *HTTP_STATUS_NAMES,
})
# Attributes whose presence alone says something (tool definitions: the request offered tools).
PRESENT = frozenset({TOOL_DEFINITIONS})
# The keys that make a posted record go through this mapping (and the batch parser's
# per-record path); `service.name` is read only beside them.
KEYS = frozenset(k for k in READ | PRESENT if k.startswith("gen_ai.")) | {ERROR_TYPE}
CONSUMED = READ | PRESENT | {SERVICE_NAME}

# Operations that are one call to a model: each is a usage record. Agents, workflows, tools
# and retrievals are not; an agent span's token counts, where it has them, add up the model
# calls beneath it, which count on their own.
MODEL_CALLS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
NOT_MODEL_CALLS = frozenset({"invoke_agent", "create_agent", "invoke_workflow", "execute_tool", "retrieval"})

MIN_RESPONSE_ID = 16     # characters: below this an id cannot be unique over days of traffic


def is_model_call(attrs: Mapping[str, Any]) -> bool:
    """A span that reports one model call: a model-call operation, or an operation we do not
    know (a newer convention's) or none at all, with a model named."""
    op = attrs.get(OPERATION)
    if isinstance(op, str) and op.strip().lower() in NOT_MODEL_CALLS:
        return False
    if isinstance(op, str) and op.strip().lower() in MODEL_CALLS:
        return True
    return attrs.get(REQUEST_MODEL) is not None or attrs.get(RESPONSE_MODEL) is not None


def record_fields(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The record fields (our names) that GenAI attributes give; absent ones are left out.
    Values are passed on as they come, so the record's validation judges them (and names the
    field) whatever their type."""
    out: dict[str, Any] = {}

    def put(field: str, value: Any) -> None:
        if value is not None:
            out[field] = value

    put("provider", _first(attrs, (PROVIDER, SYSTEM)))
    put("model", _first(attrs, (RESPONSE_MODEL, REQUEST_MODEL)))
    put("operation", attrs.get(OPERATION))
    cache_read = _first(attrs, CACHE_READ_NAMES)
    cache_write = _first(attrs, CACHE_CREATION_NAMES)
    reasoning = attrs.get(REASONING)
    put("input_tokens", _exclusive(_first(attrs, INPUT_NAMES), cache_read, cache_write))
    put("output_tokens", _exclusive(_first(attrs, OUTPUT_NAMES), reasoning))
    put("cache_read_tokens", cache_read)
    put("cache_write_tokens", cache_write)
    put("reasoning_tokens", reasoning)
    put("ttft_s", attrs.get(TIME_TO_FIRST_CHUNK))
    put("stream", attrs.get(STREAM))
    put("stop_reason", _first_reason(attrs.get(FINISH_REASONS)))
    put("request_id", response_request_id(attrs.get(RESPONSE_ID)))
    put("session_id", attrs.get(CONVERSATION))
    put("service_tier", _first(attrs, SERVICE_TIER_NAMES))
    if TOOL_DEFINITIONS in attrs:
        out["request_had_tools"] = True
    status = _first(attrs, HTTP_STATUS_NAMES)
    error = attrs.get(ERROR_TYPE)
    if error is not None and error != "":
        out["status"] = "error"
        out["error_type"] = error_class(error, _status_code(status))
    elif status is not None:
        out["status"] = status
    return out


def merged(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A posted record with its GenAI attributes turned into our fields. Fields under our
    own names win, as they do over every other spelling."""
    out = {k: v for k, v in raw.items() if k not in CONSUMED}
    derived = record_fields(raw)
    for k, v in derived.items():
        out.setdefault(k, v)
    return out


# --- app, ids, outcome -----------------------------------------------------------------

def service_app(service_name: Any) -> str | None:
    """The app a resource's `service.name` names; None for the SDKs' default
    (`unknown_service`, `unknown_service:python`), which names nothing."""
    if not isinstance(service_name, str):
        return None
    name = service_name.strip()
    if not name or name.startswith("unknown_service"):
        return None
    return name


def response_request_id(value: Any) -> Any:
    """The request id a `gen_ai.response.id` gives: the id, when long enough to be unique."""
    if isinstance(value, str) and len(value.strip()) < MIN_RESPONSE_ID:
        return None
    return value


_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")


def error_class(error_type: Any, http_status: int | None = None) -> str:
    """One of our error types for an OpenTelemetry `error.type` (a provider's error code,
    an exception class such as `openai.RateLimitError`, an HTTP status, `_OTHER`) and the
    HTTP status where the span has one, by the one classification every source shares
    (`errors.classify_error`: a name we recognise decides, an unknown one never hides a
    known status). A span that failed for no reason we can place is `other`."""
    text = str(error_type).strip()
    wrapped = _CLASS_REPR.fullmatch(text)       # str() of the class itself, as some instrumentations set it
    if wrapped:
        text = wrapped.group(1)
    return classify_error(http_status, text) or "other"


# --- helpers ---------------------------------------------------------------------------

def _first(attrs: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        v = attrs.get(name)
        if v is not None:
            return v
    return None


def _count(v: Any) -> int | None:
    """A token count as an int, or None when it is not one (validation will say why)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return None


def _exclusive(total: Any, *parts: Any) -> Any:
    """`total` less the `parts` it includes; `total` as it is when a part is not a count,
    or when the parts exceed it (then it cannot have included them)."""
    t = _count(total)
    if t is None:
        return total
    counts = [_count(p) for p in parts if p is not None]
    if any(c is None or c < 0 for c in counts):
        return t
    included = sum(c for c in counts if c is not None)
    return t - included if t >= included else t


def _first_reason(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return v[0] if v else None
    return v


def _status_code(v: Any) -> int | None:
    c = _count(v)
    return c if c is not None and 100 <= c <= 599 else None
