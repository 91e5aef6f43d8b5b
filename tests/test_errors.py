"""Error classification: HTTP statuses, provider codes and types, SDK exception class names and
OpenTelemetry `error.type` values fold into the six error types; a known status is never
overridden by a name we do not know."""

from __future__ import annotations

import pytest

from exporter.ingest.errors import ERROR_TYPES, classify_error, error_type_of_name, error_type_of_status
from exporter.ingest.records import parse_record

NAMES = {
    # OpenAI SDK classes and API error codes / types
    "RateLimitError": "rate_limit", "openai.RateLimitError": "rate_limit", "rate_limit_exceeded": "rate_limit",
    "insufficient_quota": "rate_limit", "APITimeoutError": "timeout", "InternalServerError": "server_error",
    "APIConnectionError": "server_error", "server_error": "server_error", "BadRequestError": "client_error",
    "invalid_request_error": "client_error", "context_length_exceeded": "client_error",
    "AuthenticationError": "client_error", "PermissionDeniedError": "client_error", "NotFoundError": "client_error",
    "UnprocessableEntityError": "client_error", "invalid_prompt": "client_error",
    # Anthropic error types
    "overloaded_error": "server_error", "api_error": "server_error", "rate_limit_error": "rate_limit",
    "authentication_error": "client_error", "not_found_error": "client_error", "request_too_large": "client_error",
    # LiteLLM exception classes
    "litellm.RateLimitError: slow down": "rate_limit", "ContextWindowExceededError": "client_error",
    "ContentPolicyViolationError": "content_filter", "ServiceUnavailableError": "server_error",
    "Timeout": "timeout", "BudgetExceededError": "client_error", "429_RATE_LIMIT_EXCEEDED": "rate_limit",
    # Bedrock, Google (gRPC status names), httpx, asyncio
    "ThrottlingException": "rate_limit", "ModelTimeoutException": "timeout", "ValidationException": "client_error",
    "ServiceQuotaExceededException": "rate_limit", "ModelErrorException": "server_error",
    "RESOURCE_EXHAUSTED": "rate_limit", "DEADLINE_EXCEEDED": "timeout", "UNAVAILABLE": "server_error",
    "INVALID_ARGUMENT": "client_error", "httpx.ReadTimeout": "timeout", "TimeoutError": "timeout",
    # OpenTelemetry error.type: a status code as text, or the fallback value
    "429": "rate_limit", "503": "server_error", "504": "timeout", "_OTHER": "other",
    # our own names
    **{t: t for t in ERROR_TYPES},
}


@pytest.mark.parametrize("name,expected", sorted(NAMES.items()))
def test_names(name: str, expected: str) -> None:
    assert error_type_of_name(name) == expected


def test_unknown_names_are_none() -> None:
    for name in ("", "ValueError", "KeyError", "something_odd", None, True, [], "Error", "Exception"):
        assert error_type_of_name(name) is None, name


def test_statuses() -> None:
    assert [error_type_of_status(c) for c in (200, 302, 400, 401, 404, 408, 413, 429, 500, 502, 503, 504, 529)] == [
        None, None, "client_error", "client_error", "client_error", "timeout", "client_error", "rate_limit",
        "server_error", "server_error", "server_error", "timeout", "server_error"]


def test_a_known_status_is_never_overridden_by_an_unknown_name() -> None:
    assert classify_error(429, "SomethingWeird") == "rate_limit"
    assert classify_error(503, "x") == "server_error"
    # a recognised name is the more specific word and wins
    assert classify_error(500, "APITimeoutError") == "timeout"
    assert classify_error(400, "content_policy_violation") == "content_filter"
    assert classify_error(None, "SomethingWeird") == "other"
    # a name that only says "some other failure" places nothing either
    assert classify_error(503, "_OTHER") == "server_error" and classify_error(None, "_OTHER") == "other"
    assert classify_error(None) is None and classify_error(200) is None


def test_records_use_the_classification() -> None:
    r = parse_record({"provider": "p", "model": "m", "status": 429, "error_type": "ApiWeirdness"}, 0)
    assert (r.status, r.error_type) == ("error", "rate_limit")
    r = parse_record({"provider": "p", "model": "m", "error_type": "overloaded_error"}, 0)
    assert (r.status, r.error_type) == ("error", "server_error")
    r = parse_record({"provider": "p", "model": "m", "status": "failure", "error_type": "RateLimitError"}, 0)
    assert (r.status, r.error_type) == ("error", "rate_limit")
    r = parse_record({"provider": "p", "model": "m", "status": 200}, 0)
    assert (r.status, r.error_type) == ("ok", None)
