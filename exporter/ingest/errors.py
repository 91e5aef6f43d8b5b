"""Error classification: every way a source says "this request failed, and why" folded into
the project's six error types.

Sources name failures in many vocabularies: an HTTP status (429), a provider's error code or
type (`rate_limit_exceeded`, `overloaded_error`, `ThrottlingException`), an SDK's exception
class (`openai.RateLimitError`, `litellm.exceptions.APIConnectionError`, `httpx.ReadTimeout`),
or OpenTelemetry's `error.type` (a class name, a status code as text, or `_OTHER`). They all
go through `error_type_of_name` and `error_type_of_status`; `classify_error` combines them:

- a name we recognise wins: it is the more specific word (`timeout` beside a 500, or
  `content_policy_violation` beside a 400);
- otherwise the status decides: a name we do not recognise never hides a clear status
  (an unknown `error_type` with a 429 is still `rate_limit`), and neither does a name that
  only says "some other failure" (`other`, OpenTelemetry's `_OTHER`, `unknown`);
- otherwise the request failed for a reason we cannot place: `other`.

Names are compared on their last dotted part, letters and digits only, lower case, so
`RateLimitError`, `rate_limit_error` and `litellm.RateLimitError` are one word.
"""

from __future__ import annotations

import re
from typing import Any

ERROR_TYPES: tuple[str, ...] = ("rate_limit", "timeout", "server_error", "client_error", "content_filter", "other")

# Known words, keyed by their squashed spelling (see `_squash`). An "error" or "exception"
# suffix is also tried removed, so `RateLimitError` finds `ratelimit`.
_NAMES: dict[str, str] = {}
for _etype, _words in {
    "rate_limit": (
        "rate_limit", "ratelimit", "rate_limited", "rate_limit_exceeded", "too_many_requests", "throttled",
        "throttling", "resource_exhausted", "quota_exceeded", "insufficient_quota", "service_quota_exceeded",
        "requests_per_minute_exceeded", "tokens_per_minute_exceeded", "concurrency_limit_exceeded",
    ),
    "timeout": (
        "timeout", "timed_out", "deadline_exceeded", "request_timeout", "gateway_timeout", "read_timeout",
        "connect_timeout", "write_timeout", "pool_timeout", "api_timeout", "model_timeout", "cancelled_timeout",
    ),
    "server_error": (
        "server", "server_error", "internal", "internal_error", "internal_server", "internal_server_error",
        "api", "api_error", "overloaded", "overloaded_error", "service_unavailable", "unavailable",
        "bad_gateway", "api_connection", "connection", "connect", "remote_protocol", "model_error",
        "model_not_ready", "model_stream_error", "engine_overloaded", "data_loss",
    ),
    "client_error": (
        "client", "client_error", "bad_request", "invalid_request", "invalid_request_error", "invalid_argument",
        "invalid_prompt", "validation", "unprocessable_entity", "authentication", "authentication_error",
        "unauthenticated", "permission", "permission_denied", "permission_error", "access_denied", "forbidden",
        "not_found", "not_found_error", "resource_not_found", "model_not_found", "conflict", "failed_precondition",
        "context_window_exceeded", "context_length_exceeded", "request_too_large", "payload_too_large",
        "invalid_api_key", "unsupported_params", "unsupported_value", "billing", "billing_error",
        "budget_exceeded", "out_of_range", "unimplemented", "already_exists", "json_schema_validation",
        "image_parse", "invalid_image", "invalid_model",
    ),
    "content_filter": (
        "content_filter", "content_filtered", "content_policy", "content_policy_violation", "safety",
        "blocked", "prohibited_content", "guardrail_intervened", "guardrail_raised", "responsible_ai_policy_violation",
        "moderation", "flagged", "refusal", "recitation", "spii", "blocklist",
    ),
    "other": ("other", "_other", "unknown", "cancelled", "canceled", "aborted"),
}.items():
    for _w in _words:
        _NAMES[re.sub(r"[^a-z0-9]", "", _w)] = _etype
for _etype in ERROR_TYPES:
    _NAMES[_etype.replace("_", "")] = _etype

_SUFFIXES = ("exception", "error", "err")
_NON_WORD = re.compile(r"[^a-z0-9]")


def _squash(name: str) -> str:
    """The last dotted part, letters and digits only, lower-cased (`openai.RateLimitError` →
    `ratelimiterror`). A `litellm.X: message` text keeps only the class name before the colon."""
    head = name.strip().split(":", 1)[0].strip()
    last = head.rsplit(".", 1)[-1] if not head.replace(".", "").isdigit() else head
    return _NON_WORD.sub("", last.lower())


def error_type_of_status(code: int) -> str | None:
    """The error type of an HTTP status code; None for a status that is not an error (< 400)."""
    if code < 400:
        return None
    if code == 429:
        return "rate_limit"
    if code in (408, 504, 524, 598, 599):
        return "timeout"
    if code >= 500:                 # 529: Anthropic overloaded
        return "server_error"
    return "client_error"


def error_type_of_name(name: Any) -> str | None:
    """The error type a provider code, an error type, an SDK exception class name, an
    OpenTelemetry `error.type` or a status code written as text stands for; None when the
    name is not one we know (the caller then falls back on a status, or `other`)."""
    if name is None or isinstance(name, bool):
        return None
    if isinstance(name, (int, float)):
        return error_type_of_status(int(name)) if 100 <= name < 1000 else None
    if not isinstance(name, str):
        return None
    s = name.strip()
    if s.isdigit() and len(s) == 3:
        return error_type_of_status(int(s))
    key = _squash(s)
    if not key:
        return None
    found = _NAMES.get(key)
    if found:
        return found
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and key[: -len(suffix)] in _NAMES:
            return _NAMES[key[: -len(suffix)]]
    # Class and code names compose these words freely (`ReadTimeout`, `ModelTimeoutException`,
    # `TPMRateLimitExceeded`): the ones that cannot mean anything else.
    if "ratelimit" in key or "throttl" in key or "toomanyrequests" in key:
        return "rate_limit"
    if "timeout" in key or "timedout" in key:
        return "timeout"
    if "contentpolicy" in key or "contentfilter" in key:
        return "content_filter"
    return None


def classify_error(status: int | None = None, *names: Any) -> str | None:
    """The error type of a failed request from its HTTP status (None: unknown) and any
    names the source gives (codes, types, class names; the first recognised one wins).
    None when nothing says the request failed (a status below 400, or none, and no name);
    a name we do not recognise beside no error status is `other`."""
    for name in names:
        found = error_type_of_name(name)
        if found is not None and found != "other":      # "other" names no cause: a status may
            return found
    if status is not None:
        by_status = error_type_of_status(status)
        if by_status is not None:
            return by_status
    if any(n not in (None, "") for n in names):
        return "other"
    return None
