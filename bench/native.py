"""Records per second for each native shape, in process: Engine.ingest on batches of 1,000
objects as the client libraries produce them (OpenAI Chat Completions, stream chunks and
Responses, Anthropic Messages, Gemini, Bedrock Converse, LiteLLM StandardLoggingPayloads and
spend-log rows), beside the project's own record format, which takes the columnar fast path.

Native objects go through the per-record path (`native.translate` then `parse_record`), so
they cost more per record than our own format; this shows by how much. Each shape's figure is
the median over batches; every batch has fresh request ids.

    python bench/native.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import common

BATCH = 1000
TEXT = "Lorem ipsum dolor sit amet, " * 20       # native objects carry text: it is part of the cost


def openai_chat(i: int, now: float, tag: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{tag}-{i}", "object": "chat.completion", "created": int(now) - 60, "model": "gpt-4o",
            "service_tier": "default", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": TEXT, "refusal": None, "tool_calls": None}}],
            "usage": {"prompt_tokens": 2000 + i % 97, "completion_tokens": 300, "total_tokens": 2300 + i % 97,
                      "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 64, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
            "app": f"app{i % 7}"}


def openai_chunk(i: int, now: float, tag: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{tag}-{i}", "object": "chat.completion.chunk", "created": int(now) - 60,
            "model": "gpt-4o-mini", "choices": [], "latency_s": 1.2, "ttft_s": 0.3,
            "usage": {"prompt_tokens": 500 + i % 31, "completion_tokens": 120, "total_tokens": 620 + i % 31}}


def openai_response(i: int, now: float, tag: str) -> dict[str, Any]:
    return {"id": f"resp_{tag}_{i}", "object": "response", "created_at": now - 60, "completed_at": now - 57,
            "status": "completed", "model": "o3-mini", "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "output": [{"type": "reasoning", "id": "rs_1", "summary": []},
                       {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": TEXT, "annotations": []}]}],
            "usage": {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 0},
                      "output_tokens": 900 + i % 13, "output_tokens_details": {"reasoning_tokens": 640},
                      "total_tokens": 2100 + i % 13}}


def anthropic_message(i: int, now: float, tag: str) -> dict[str, Any]:
    return {"id": f"msg_{tag}_{i}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 40 + i % 11, "output_tokens": 700, "cache_read_input_tokens": 9000,
                      "cache_creation_input_tokens": 3000,
                      "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                      "service_tier": "standard"}}


def gemini(i: int, now: float, tag: str) -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": TEXT}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 5000 + i % 17, "cachedContentTokenCount": 4096,
                              "candidatesTokenCount": 120, "thoughtsTokenCount": 300, "totalTokenCount": 5420 + i % 17},
            "modelVersion": "gemini-2.5-flash", "responseId": f"gem-{tag}-{i}"}


def bedrock(i: int, now: float, tag: str) -> dict[str, Any]:
    return {"model": "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "ResponseMetadata": {"RequestId": f"br-{tag}-{i}", "HTTPStatusCode": 200},
            "output": {"message": {"role": "assistant", "content": [{"text": TEXT}]}}, "stopReason": "end_turn",
            "usage": {"inputTokens": 60 + i % 19, "outputTokens": 400, "totalTokens": 2960,
                      "cacheReadInputTokens": 2000, "cacheWriteInputTokens": 500},
            "metrics": {"latencyMs": 1830}}


def litellm_payload(i: int, now: float, tag: str) -> dict[str, Any]:
    start = now - 60 + i * 1e-3
    return {"id": f"chatcmpl-{tag}-{i}", "litellm_call_id": f"call-{tag}-{i}", "trace_id": "t", "session_id": "",
            "call_type": "acompletion", "cache_hit": None, "stream": True, "status": "success",
            "custom_llm_provider": "openai", "saved_cache_cost": 0.0, "startTime": start, "endTime": start + 2.1,
            "completionStartTime": start + 0.4, "response_time": 0.4, "model": "gpt-4o-mini",
            "metadata": {"user_api_key_alias": f"key-{i % 5}", "user_api_key_team_alias": f"team-{i % 3}",
                         "requester_metadata": None, "spend_logs_metadata": None,
                         "usage_object": {"completion_tokens": 300, "prompt_tokens": 2000 + i % 23, "total_tokens": 2300,
                                          "prompt_tokens_details": {"cached_tokens": 1024},
                                          "completion_tokens_details": {"reasoning_tokens": 0}}},
            "response_cost": 0.000389, "total_tokens": 2300, "prompt_tokens": 2000, "completion_tokens": 300,
            "request_tags": [f"app:app{i % 7}"], "end_user": None, "api_base": "https://api.openai.com",
            "model_group": "", "model_id": "", "messages": [{"role": "user", "content": TEXT}],
            "response": {"choices": [{"finish_reason": "stop", "message": {"content": TEXT, "tool_calls": None}}]},
            "model_parameters": {}, "hidden_params": {"usage_object": None}, "error_str": None,
            "error_information": None}


def spend_log(i: int, now: float, tag: str) -> dict[str, Any]:
    meta = {"user_api_key_alias": f"key-{i % 5}", "user_api_key_team_alias": f"team-{i % 3}", "status": "success",
            "usage_object": {"completion_tokens": 300, "prompt_tokens": 2000 + i % 23, "total_tokens": 2300,
                             "prompt_tokens_details": {"cached_tokens": 1024}}}
    t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 60))
    return {"request_id": f"chatcmpl-{tag}-{i}", "call_type": "acompletion", "api_key": "hash", "spend": 0.000389,
            "total_tokens": 2300, "prompt_tokens": 2000, "completion_tokens": 300, "startTime": f"{t}.100000+00:00",
            "endTime": f"{t}.900000+00:00", "completionStartTime": f"{t}.400000+00:00", "model": "gpt-4o-mini",
            "model_id": "", "model_group": "", "api_base": "", "user": "", "metadata": json.dumps(meta),
            "cache_hit": "False", "cache_key": "", "request_tags": json.dumps([f"app:app{i % 7}"]), "team_id": "",
            "end_user": "", "custom_llm_provider": "openai", "messages": TEXT, "response": TEXT, "session_id": None,
            "status": "success", "request_duration_ms": 800}


SHAPES: dict[str, Callable[[int, float, str], dict[str, Any]]] = {
    "openai_chat_completion": openai_chat, "openai_stream_last_chunk": openai_chunk,
    "openai_response": openai_response, "anthropic_message": anthropic_message, "gemini": gemini,
    "bedrock_converse": bedrock, "litellm_payload": litellm_payload, "litellm_spend_log": spend_log,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from exporter.engine import Engine

    n_batches = 4 if args.quick else 12
    now = time.time()
    rng = np.random.default_rng(7)
    figures = []
    detail: dict[str, list[float]] = {}
    with common.scratch_dir("native") as d:
        engine = Engine(common.settings(Path(d) / "bench.db"), clock=lambda: now)
        own = [common.realistic_records(BATCH, now, rng, f"own{j:03d}") for j in range(n_batches + 2)]
        plans: dict[str, list[list[dict[str, Any]]]] = {"own_format": own}
        for name, make in SHAPES.items():
            plans[name] = [[make(i, now, f"{name}{j}") for i in range(BATCH)] for j in range(n_batches + 2)]
        for name, batches in plans.items():
            for b in batches[:2]:                       # warm-up: series, caches
                res = engine.ingest(b, now=now)
                assert res.accepted == BATCH, (name, res.to_dict())
            rates = []
            for b in batches[2:]:
                t = time.perf_counter()
                res = engine.ingest(b, now=now)
                rates.append(BATCH / (time.perf_counter() - t))
                assert res.accepted == BATCH, (name, res.to_dict())
            detail[name] = rates
        engine.close()
    base = common.median(detail["own_format"])
    for name, rates in detail.items():
        rate = common.median(rates)
        label = f"{name.replace('_', ' ')}: records/s" + ("" if name == "own_format" else f" ({rate / base:.2f}× own format)")
        figures.append(common.figure(f"{name}_records_per_s", label, rate, "rec/s", decimals=0))
    return {"name": "native", "figures": figures, "detail": {"batches": n_batches, "records_per_s": detail}}


if __name__ == "__main__":
    common.cli("native", run)
