"""Native objects of the LLM stacks, read as usage records.

A client can post what its library hands it, unmodified: an OpenAI Chat Completion (or
the last chunk of a stream, the one that carries `usage`), a Responses API response (or
its `response.completed` / `.incomplete` / `.failed` event), an embeddings answer, an
Anthropic Message, a Gemini / Vertex `GenerateContentResponse`, a Bedrock Converse answer,
a LiteLLM StandardLoggingPayload (what a callback or the `generic_api` logger sends) or a
LiteLLM proxy spend-log row. `translate` recognises the shape by its fields and returns the
record fields it implies; `records.parse_record` validates them like any record.

Only counts, names, ids and times are read. Message arrays, completions, tool arguments,
error messages and tracebacks are never looked at, so no text gets past this module.

Token counts are split by each source's documented semantics, so that every token is
priced once at its own price:

- OpenAI (Chat Completions, Responses, and LiteLLM's OpenAI-style usage for every
  provider): `prompt_tokens` / `input_tokens` *include* the cached and cache-write tokens,
  and `completion_tokens` / `output_tokens` *include* the reasoning tokens. Our
  `input_tokens` is the rest once those are taken out; `output_tokens` likewise.
- Anthropic: `input_tokens` *excludes* cache reads and writes; `output_tokens` includes
  the thinking tokens (`output_tokens_details.thinking_tokens`), billed as output.
- Bedrock Converse: like Anthropic (`inputTokens` excludes `cacheReadInputTokens` and
  `cacheWriteInputTokens`).
- Gemini: `promptTokenCount` includes `cachedContentTokenCount`; `toolUsePromptTokenCount`
  is billed as input; `thoughtsTokenCount` is billed as output and is outside
  `candidatesTokenCount` (older models counted it inside: then the counts add up to
  `totalTokenCount` without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import orjson

from .errors import classify_error
from .rejections import RecordError

# Keys whose presence sends a record through this module (and the per-record path).
MARKER_KEYS = frozenset({"usage", "usageMetadata", "usage_metadata", "object", "call_type", "response"})
# End and first-token times a record in our own format may carry instead of durations.
END_KEYS = ("end_time", "endTime")
FIRST_TOKEN_KEYS = ("first_token_time", "completion_start_time", "completionStartTime")


@dataclass(slots=True)
class Native:
    """What one native object says, in our field names.

    `owned` are the keys of the object that mean something else there than in our format
    (a Responses `status` is `incomplete`, not an HTTP status): the object's own value of
    such a key is not copied over the translation. `apps` are app candidates by source
    (`attribution.APP_SOURCES`); `provider` the provider the shape implies."""

    shape: str
    fields: dict[str, Any]
    apps: dict[str, Any] = field(default_factory=dict)
    provider: str | None = None
    owned: frozenset[str] = frozenset()


# --- small readers --------------------------------------------------------------------------

def _obj(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, dict) else {}


def _count(block: Mapping[str, Any], key: str, where: str) -> int:
    """A token count of a usage block: missing or null is 0; anything else must be a
    whole number >= 0."""
    v = block.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v != int(v):
        raise RecordError(f"{where}.{key}", f"must be a whole number >= 0, got {v!r}")
    return int(v)


def _first_count(block: Mapping[str, Any], keys: tuple[str, ...], where: str) -> int:
    for k in keys:
        if block.get(k) is not None:
            return _count(block, k, where)
    return 0


def _part(total: int, parts: int, total_name: str, where: str) -> int:
    if parts > total:
        raise RecordError(f"{where}.{total_name}", f"({total}) is less than the tokens it includes ({parts})")
    return total - parts


def _seconds(v: Any) -> float | None:
    """Epoch seconds from a number (seconds, or milliseconds above 1e11) or RFC 3339 text."""
    if v is None or isinstance(v, bool) or v == "":
        return None
    if isinstance(v, (int, float)):
        f = float(v)
        return f / 1000.0 if f > 1e11 else f
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            try:
                return _seconds(float(v))
            except ValueError:
                return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    return None


def duration(start: Any, end: Any) -> float | None:
    """Seconds from `start` to `end` (each epoch seconds or milliseconds, or RFC 3339); None
    when either is missing or the end comes first."""
    s, e = _seconds(start), _seconds(end)
    if s is None or e is None or e < s:
        return None
    return e - s


def _json(v: Any) -> Any:
    """A JSON document stored as text (LiteLLM spend logs keep metadata and tags so)."""
    if isinstance(v, (str, bytes)) and v[:1] in ("{", "[", b"{", b"["):
        try:
            return orjson.loads(v)
        except orjson.JSONDecodeError:
            return None
    return v


def _tool_names(calls: Any) -> list[str]:
    return [str(c) for c in calls if c] if isinstance(calls, list) else []


# --- usage blocks ---------------------------------------------------------------------------

def openai_usage(u: Mapping[str, Any], where: str = "usage") -> dict[str, int]:
    """Chat Completions usage (also LiteLLM's, whatever the provider): prompt and completion
    totals with their cached, cache-write and reasoning parts."""
    prompt = _count(u, "prompt_tokens", where)
    completion = _count(u, "completion_tokens", where)
    pd, cd = _obj(u.get("prompt_tokens_details")), _obj(u.get("completion_tokens_details"))
    cached = _count(pd, "cached_tokens", where + ".prompt_tokens_details") or _count(u, "cache_read_input_tokens", where)
    written = (_first_count(pd, ("cache_write_tokens", "cache_creation_tokens"), where + ".prompt_tokens_details")
               or _count(u, "cache_creation_input_tokens", where))
    reasoning = _count(cd, "reasoning_tokens", where + ".completion_tokens_details")
    lifetimes = _obj(pd.get("cache_creation_token_details")) or _obj(u.get("cache_creation"))
    return {
        "input_tokens": _part(prompt, cached + written, "prompt_tokens", where),
        "cache_read_tokens": cached,
        "cache_write_tokens": written,
        "cache_write_1h_tokens": min(_count(lifetimes, "ephemeral_1h_input_tokens", where), written),
        "output_tokens": _part(completion, reasoning, "completion_tokens", where),
        "reasoning_tokens": reasoning,
    }


def responses_usage(u: Mapping[str, Any], where: str = "usage") -> dict[str, int]:
    """Responses API usage: input and output totals with their cached and reasoning parts."""
    total_in, total_out = _count(u, "input_tokens", where), _count(u, "output_tokens", where)
    ind, outd = _obj(u.get("input_tokens_details")), _obj(u.get("output_tokens_details"))
    cached = _count(ind, "cached_tokens", where + ".input_tokens_details")
    written = _count(ind, "cache_write_tokens", where + ".input_tokens_details")
    reasoning = _count(outd, "reasoning_tokens", where + ".output_tokens_details")
    return {
        "input_tokens": _part(total_in, cached + written, "input_tokens", where),
        "cache_read_tokens": cached,
        "cache_write_tokens": written,
        "output_tokens": _part(total_out, reasoning, "output_tokens", where),
        "reasoning_tokens": reasoning,
    }


def anthropic_usage(u: Mapping[str, Any], where: str = "usage") -> dict[str, int]:
    """Anthropic usage: input excludes cache reads and writes; thinking is part of output."""
    written = _count(u, "cache_creation_input_tokens", where)
    thinking = _count(_obj(u.get("output_tokens_details")), "thinking_tokens", where + ".output_tokens_details")
    return {
        "input_tokens": _count(u, "input_tokens", where),
        "cache_read_tokens": _count(u, "cache_read_input_tokens", where),
        "cache_write_tokens": written,
        "cache_write_1h_tokens": min(_count(_obj(u.get("cache_creation")), "ephemeral_1h_input_tokens", where), written),
        "output_tokens": _part(_count(u, "output_tokens", where), thinking, "output_tokens", where),
        "reasoning_tokens": thinking,
    }


def bedrock_usage(u: Mapping[str, Any], where: str = "usage") -> dict[str, int]:
    """Bedrock Converse usage: input excludes cache reads and writes."""
    written = _count(u, "cacheWriteInputTokens", where)
    details = u.get("cacheDetails")
    one_hour = sum(_count(_obj(d), "inputTokens", where + ".cacheDetails") for d in details
                   if _obj(d).get("ttl") == "1h") if isinstance(details, list) else 0
    return {
        "input_tokens": _count(u, "inputTokens", where),
        "cache_read_tokens": _count(u, "cacheReadInputTokens", where),
        "cache_write_tokens": written,
        "cache_write_1h_tokens": min(one_hour, written),
        "output_tokens": _count(u, "outputTokens", where),
    }


def gemini_usage(u: Mapping[str, Any], where: str = "usageMetadata") -> dict[str, int]:
    """Gemini / Vertex usageMetadata, camelCase (REST) or snake_case (the Python SDK)."""
    def get(camel: str) -> int:
        snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
        return _first_count(u, (camel, snake), where)
    prompt, candidates = get("promptTokenCount"), get("candidatesTokenCount")
    cached, tool_prompt, thoughts = get("cachedContentTokenCount"), get("toolUsePromptTokenCount"), get("thoughtsTokenCount")
    total = get("totalTokenCount")
    if thoughts and total and prompt + candidates + tool_prompt == total:   # thoughts counted inside candidates
        candidates = _part(candidates, thoughts, "candidatesTokenCount", where)
    return {
        "input_tokens": _part(prompt, cached, "promptTokenCount", where) + tool_prompt,
        "cache_read_tokens": cached,
        "output_tokens": candidates,
        "reasoning_tokens": thoughts,
    }


def usage_tokens(u: Mapping[str, Any], where: str = "usage") -> dict[str, int]:
    """Our token fields from a usage block of any of the styles above, told by its keys."""
    if "prompt_tokens" in u or "completion_tokens" in u:
        return openai_usage(u, where)
    if "inputTokens" in u or "outputTokens" in u:
        return bedrock_usage(u, where)
    if any(k in u for k in ("promptTokenCount", "prompt_token_count", "candidatesTokenCount", "candidates_token_count")):
        return gemini_usage(u, where)
    if "input_tokens_details" in u or "reasoning_tokens" in _obj(u.get("output_tokens_details")):
        return responses_usage(u, where)
    if "input_tokens" in u or "output_tokens" in u:
        return anthropic_usage(u, where)
    return {}


# --- OpenAI ---------------------------------------------------------------------------------

def _provider_of_openai_shape(raw: Mapping[str, Any]) -> str:
    """Azure OpenAI adds content-filter results to the same shape."""
    if "prompt_filter_results" in raw or any("content_filter_results" in _obj(c) for c in raw.get("choices") or ()):
        return "azure"
    return "openai"


def openai_chat(raw: Mapping[str, Any]) -> Native:
    usage = raw.get("usage")
    chunk = raw.get("object") == "chat.completion.chunk"
    if not isinstance(usage, dict):
        if chunk:
            raise RecordError("usage", "this stream chunk carries no usage: post the last chunk of the stream, which "
                                       "carries it when the request sets stream_options.include_usage")
        raise RecordError("usage", "is required (a Chat Completion without usage counts nothing)")
    f: dict[str, Any] = {"model": raw.get("model"), "request_id": raw.get("id"), "ts": raw.get("created"),
                         "service_tier": raw.get("service_tier"), "operation": "chat", **openai_usage(usage)}
    choices = raw.get("choices")
    first = _obj(choices[0]) if isinstance(choices, list) and choices else {}
    if first:
        f["stop_reason"] = first.get("finish_reason")
        message = _obj(first.get("message")) or _obj(first.get("delta"))
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            f["tool_calls"] = calls
        elif isinstance(message.get("function_call"), dict):
            f["tool_calls"] = [message["function_call"]]
    if chunk:
        f["stream"] = True
    return Native("openai.chat_completion_chunk" if chunk else "openai.chat_completion", f,
                  provider=_provider_of_openai_shape(raw))


_RESPONSE_TOOL_ITEMS = {"function_call", "custom_tool_call", "mcp_call", "web_search_call", "file_search_call",
                        "computer_call", "code_interpreter_call", "image_generation_call", "local_shell_call",
                        "shell_call", "apply_patch_call", "tool_search_call"}


def openai_response(raw: Mapping[str, Any]) -> Native:
    """A Responses API response in any final status. `completed` is a success; `incomplete`
    a success cut short (its reason becomes the stop reason: `length` for the token limit);
    `failed` an error classified from its error code; `cancelled` a success that stopped
    early. `queued` and `in_progress` are not final: posting one would make the final
    response with the same id a duplicate, so they are refused."""
    status = raw.get("status")
    if status in ("queued", "in_progress"):
        raise RecordError("status", f"{status!r} is not final: post the response once it is completed, "
                                    "incomplete, failed or cancelled")
    usage = raw.get("usage")
    tokens = responses_usage(usage) if isinstance(usage, dict) else {}
    output = raw.get("output")
    items = [_obj(o) for o in output] if isinstance(output, list) else []
    calls = [o.get("name") or o.get("type") for o in items if o.get("type") in _RESPONSE_TOOL_ITEMS]
    f: dict[str, Any] = {"model": raw.get("model"), "request_id": raw.get("id"), "ts": raw.get("created_at"),
                         "service_tier": raw.get("service_tier"), "operation": "chat", **tokens,
                         "tool_calls": _tool_names(calls) or None,
                         "request_had_tools": bool(raw.get("tools")) or None,
                         "latency_s": duration(raw.get("created_at"), raw.get("completed_at"))}
    if status == "failed":
        err = _obj(raw.get("error"))
        f["status"] = "error"
        f["error_type"] = classify_error(None, err.get("code"), err.get("type")) or "other"
    elif status == "incomplete":
        reason = _obj(raw.get("incomplete_details")).get("reason") or "incomplete"
        f["stop_reason"] = "length" if reason == "max_output_tokens" else reason
    elif status == "cancelled":
        f["stop_reason"] = "cancelled"
    else:
        f["stop_reason"] = "tool_calls" if calls else "stop"
    return Native("openai.response", f, provider="openai", owned=frozenset({"status"}))


def openai_embeddings(raw: Mapping[str, Any]) -> Native:
    usage = _obj(raw.get("usage"))
    return Native("openai.embeddings", {"model": raw.get("model"), "operation": "embeddings",
                                        "input_tokens": _count(usage, "prompt_tokens", "usage")}, provider="openai")


# --- Anthropic, Gemini, Bedrock -------------------------------------------------------------

def anthropic_message(raw: Mapping[str, Any]) -> Native:
    usage = _obj(raw.get("usage"))
    content = raw.get("content")
    blocks = [_obj(b) for b in content] if isinstance(content, list) else []
    calls = [b.get("name") for b in blocks if b.get("type") in ("tool_use", "server_tool_use", "mcp_tool_use")]
    f = {"model": raw.get("model"), "request_id": raw.get("id"), "stop_reason": raw.get("stop_reason"),
         "service_tier": usage.get("service_tier"), "operation": "chat", **anthropic_usage(usage),
         "tool_calls": _tool_names(calls) or None}
    return Native("anthropic.message", f, provider="anthropic")


def gemini_response(raw: Mapping[str, Any]) -> Native:
    key = "usageMetadata" if "usageMetadata" in raw else "usage_metadata"
    usage = _obj(raw.get(key))
    candidates = raw.get("candidates")
    first = _obj(candidates[0]) if isinstance(candidates, list) and candidates else {}
    parts = _obj(first.get("content")).get("parts")
    calls = [(_obj(p.get("functionCall")) or _obj(p.get("function_call"))).get("name")
             for p in (parts if isinstance(parts, list) else ()) if isinstance(p, dict)]
    f = {"model": raw.get("modelVersion") or raw.get("model_version") or raw.get("model"),
         "request_id": raw.get("responseId") or raw.get("response_id"),
         "ts": raw.get("createTime") or raw.get("create_time"),
         "stop_reason": first.get("finishReason") or first.get("finish_reason"),
         "operation": "chat", **gemini_usage(usage, key), "tool_calls": _tool_names(calls) or None}
    return Native("gemini.generate_content", f, provider="gemini")


def bedrock_converse(raw: Mapping[str, Any]) -> Native:
    """A Converse (or ConverseStream metadata) answer. It does not name its model: the
    poster adds `model` (the modelId it called)."""
    metrics = _obj(raw.get("metrics"))
    meta = _obj(raw.get("ResponseMetadata"))
    content = _obj(_obj(raw.get("output")).get("message")).get("content")
    calls = [_obj(_obj(b).get("toolUse")).get("name") for b in content] if isinstance(content, list) else []
    latency = metrics.get("latencyMs")
    f = {"request_id": meta.get("RequestId"), "stop_reason": raw.get("stopReason"), "operation": "chat",
         **bedrock_usage(_obj(raw.get("usage"))), "tool_calls": _tool_names(calls) or None,
         "latency_ms": latency if isinstance(latency, (int, float)) and not isinstance(latency, bool) else None}
    status = meta.get("HTTPStatusCode")
    if isinstance(status, int) and status >= 400:
        f["status"] = status
    return Native("bedrock.converse", f, provider="bedrock")


# --- LiteLLM --------------------------------------------------------------------------------

_CALL_TYPES = {"completion": "chat", "acompletion": "chat", "responses": "chat", "aresponses": "chat",
               "anthropic_messages": "chat", "generate_content": "chat", "agenerate_content": "chat",
               "embedding": "embeddings", "aembedding": "embeddings", "text_completion": "text_completion",
               "atext_completion": "text_completion", "image_generation": "image_generation",
               "aimage_generation": "image_generation", "transcription": "transcription",
               "atranscription": "transcription", "speech": "speech", "aspeech": "speech", "rerank": "rerank",
               "arerank": "rerank", "moderation": "moderation", "amoderation": "moderation"}


def _litellm_model(model: Any, provider: Any) -> Any:
    """LiteLLM names some models with their provider in front (`bedrock/us.anthropic…`):
    the same model, so it is counted under the same name as elsewhere."""
    if isinstance(model, str) and isinstance(provider, str) and provider and model.startswith(provider + "/"):
        return model[len(provider) + 1:]
    return model


def _litellm_common(raw: Mapping[str, Any], meta: Mapping[str, Any], usage: Any) -> dict[str, Any]:
    """The fields a StandardLoggingPayload and a spend-log row share."""
    provider = raw.get("custom_llm_provider") or None
    f: dict[str, Any] = {
        "provider": provider,
        "model": _litellm_model(raw.get("model") or raw.get("model_group"), provider),
        "ts": _seconds(raw.get("startTime")),
        "operation": _CALL_TYPES.get(str(raw.get("call_type") or ""), raw.get("call_type") or None),
    }
    if isinstance(usage, dict) and usage:
        f.update(openai_usage(usage, "metadata.usage_object"))
    else:   # no usage object: the flat totals (cached and reasoning tokens are not split out then)
        f["input_tokens"] = raw.get("prompt_tokens")
        f["output_tokens"] = raw.get("completion_tokens")
    latency = duration(raw.get("startTime"), raw.get("endTime"))
    f["latency_s"] = latency
    first = duration(raw.get("startTime"), raw.get("completionStartTime"))
    # LiteLLM sets the first-token time to the end time when nothing streamed
    if first is not None and latency is not None and first < latency and raw.get("stream") is not False:
        f["ttft_s"] = first
    err = _obj(raw.get("error_information")) or _obj(meta.get("error_information"))
    failed = raw.get("status") == "failure" or meta.get("status") == "failure" or bool(err)
    if failed:
        code = err.get("error_code")
        status = int(code) if isinstance(code, (int, str)) and str(code).isdigit() else None
        f["status"] = "error"
        f["error_type"] = classify_error(status, err.get("error_class"), err.get("normalized_error")) or "other"
    return f


def _litellm_apps(raw: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    requester = _obj(meta.get("requester_metadata"))
    return {
        "requester_metadata": next((requester[k] for k in ("app", "app_name", "application") if requester.get(k)), None),
        "tag": _json(raw.get("request_tags")),
        "team_alias": meta.get("user_api_key_team_alias") or meta.get("team_alias"),
        "key_alias": meta.get("user_api_key_alias"),
    }


def litellm_payload(raw: Mapping[str, Any]) -> Native:
    """A StandardLoggingPayload: what LiteLLM hands every callback and `generic_api` posts."""
    meta = _obj(raw.get("metadata"))
    usage = meta.get("usage_object") or _obj(raw.get("hidden_params")).get("usage_object")
    f = _litellm_common(raw, meta, usage)
    f["request_id"] = raw.get("id") or raw.get("litellm_call_id")
    f["session_id"] = raw.get("session_id") or None
    f["stream"] = raw.get("stream") is True
    cost = raw.get("response_cost")
    # LiteLLM logs 0 when it could not price the call; it says so beside: then we price it
    unpriced = raw.get("response_cost_failure_debug_info") or raw.get("zero_cost_diagnostic")
    f["cost_usd"] = None if unpriced else cost
    response = _obj(raw.get("response"))
    choices = response.get("choices")
    first = _obj(choices[0]) if isinstance(choices, list) and choices else {}
    if first:
        f["stop_reason"] = first.get("finish_reason")
        calls = _obj(first.get("message")).get("tool_calls")
        if isinstance(calls, list) and calls:
            f["tool_calls"] = calls
    params = _obj(raw.get("model_parameters"))
    if params.get("tools"):
        f["request_had_tools"] = True
    return Native("litellm.standard_logging_payload", f, _litellm_apps(raw, meta),
                  owned=frozenset({"status", "model", "stream", "session_id", "metadata"}))


def litellm_spend_log(raw: Mapping[str, Any]) -> Native:
    """A row of the proxy's spend logs (`LiteLLM_SpendLogs`, `/spend/logs`): metadata and
    tags may be JSON text; times are RFC 3339; the duration is also in milliseconds."""
    meta = _obj(_json(raw.get("metadata")))
    f = _litellm_common(raw, meta, meta.get("usage_object"))
    if f.get("latency_s") is None and raw.get("request_duration_ms") is not None:
        f["latency_ms"] = raw.get("request_duration_ms")
    f["request_id"] = raw.get("request_id")
    f["session_id"] = raw.get("session_id") or None
    f["cost_usd"] = raw.get("spend")
    return Native("litellm.spend_log", f, _litellm_apps(raw, meta),
                  owned=frozenset({"status", "model", "session_id", "metadata", "request_id"}))


# --- recognition ----------------------------------------------------------------------------

_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed", "response.cancelled")


def shape_of(raw: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], Native] | None:
    """The reader of a native object, told by its fields; None for our own format."""
    obj = raw.get("object")
    if obj in ("chat.completion", "chat.completion.chunk", "text_completion"):
        return openai_chat
    if obj == "response":
        return openai_response
    if obj == "list" and isinstance(raw.get("usage"), dict) and "data" in raw:
        return openai_embeddings
    if "call_type" in raw:
        return litellm_spend_log if ("spend" in raw or "request_duration_ms" in raw) else litellm_payload
    if raw.get("type") == "message" and isinstance(raw.get("usage"), dict):
        return anthropic_message
    if "usageMetadata" in raw or "usage_metadata" in raw:
        return gemini_response
    usage = raw.get("usage")
    if isinstance(usage, dict) and ("inputTokens" in usage or "outputTokens" in usage):
        return bedrock_converse
    return None


def translate(raw: Mapping[str, Any]) -> Native | None:
    """Our record fields for a native object (None when `raw` is in our own format; a plain
    `usage` block inside our own format is split by `usage_tokens` there)."""
    if raw.get("type") in _RESPONSE_EVENTS and isinstance(raw.get("response"), dict):
        return openai_response(raw["response"])
    reader = shape_of(raw)
    return reader(raw) if reader is not None else None
