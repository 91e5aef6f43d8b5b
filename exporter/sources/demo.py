"""Synthetic but realistic traffic, so a new user has something to look at at once.

Three apps on four models with a daily cycle, log-normal token sizes and latencies, a
trickle of errors, sessions with tool calls; `live` adds an anomaly now and then (a cost
spike, a slow model, an error storm, a looping agent), each for a quarter of an hour. The
first one is an agent loop from the first live minute on, so whoever just started the
stack sees an alert reach Alertmanager's receivers within about five minutes.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

APPS = ("support-bot", "code-assistant", "nightly-summaries")
MODELS = (("openai", "gpt-4o-mini", 0.35, 0.5), ("openai", "gpt-4o", 0.8, 0.3),
          ("anthropic", "claude-3-5-haiku", 0.6, 0.4), ("anthropic", "claude-sonnet-4", 1.2, 0.25))
ANOMALIES = ("cost_spike", "slow_model", "error_storm", "runaway_session")


@dataclass(slots=True)
class Anomaly:
    kind: str
    start: float
    end: float


def daily_rate(ts: float, base_per_min: float) -> float:
    """Requests per minute: a trough at 04:00 UTC, a peak at 16:00, weekends at 60 %."""
    hour = (ts % 86400) / 3600
    weekday = int(ts // 86400 + 4) % 7          # 1970-01-01 was a Thursday
    shape = 0.55 + 0.45 * math.sin((hour - 10) / 24 * 2 * math.pi)
    return base_per_min * shape * (0.6 if weekday >= 5 else 1.0)


def minute(t0: float, rng: np.random.Generator, base_per_min: float = 12.0, anomaly: Anomaly | None = None) -> list[dict[str, Any]]:
    """The records of one minute starting at t0."""
    active = anomaly if anomaly and anomaly.start <= t0 < anomaly.end else None
    n = int(rng.poisson(daily_rate(t0, base_per_min)))
    if n == 0:
        return []
    ts = t0 + np.sort(rng.uniform(0, 60, n))
    app = rng.choice(len(APPS), n, p=[0.5, 0.35, 0.15])
    model = rng.choice(len(MODELS), n, p=[0.45, 0.2, 0.25, 0.1])
    inp = np.round(rng.lognormal(6.8, 0.8, n)).astype(int)
    out = np.round(rng.lognormal(5.3, 0.7, n)).astype(int)
    base_lat = np.array([MODELS[m][2] for m in model])
    per_tok = np.array([1 / 90, 1 / 60, 1 / 80, 1 / 50])[model]
    ttft = base_lat * rng.lognormal(0, 0.25, n)
    err = rng.random(n) < 0.01
    if active and active.kind == "cost_spike":
        pick = app == 1
        model[pick] = 3
        inp[pick] *= 6
    if active and active.kind == "slow_model":
        ttft[model == 0] *= 4
    if active and active.kind == "error_storm":
        err |= rng.random(n) < 0.25
    latency = ttft + out * per_tok * rng.lognormal(0, 0.2, n)
    records = []
    for i in range(n):
        provider, name = MODELS[model[i]][0], MODELS[model[i]][1]
        r: dict[str, Any] = {
            "ts": round(float(ts[i]), 3), "provider": provider, "model": name, "app": APPS[app[i]],
            "input_tokens": int(inp[i]), "output_tokens": 0 if err[i] else int(out[i]),
            "latency_s": round(float(latency[i]), 4), "ttft_s": round(float(ttft[i]), 4), "stream": True,
            "status": "error" if err[i] else "ok", "stop_reason": None if err[i] else "stop",
            "request_id": uuid.uuid4().hex, "session_id": f"s-{int(ts[i] // 300)}-{rng.integers(0, 40)}",
        }
        if err[i]:
            r["error_type"] = ("rate_limit", "server_error", "timeout")[int(rng.integers(0, 3))]
        records.append(r)
    if active and active.kind == "runaway_session":
        for k in range(20):
            records.append({"ts": round(t0 + k * 3, 3), "provider": "openai", "model": "gpt-4o", "app": "code-assistant",
                            "input_tokens": 12000 + k * 400, "output_tokens": 150, "latency_s": 2.5, "stop_reason": "tool_calls",
                            "request_had_tools": True, "tool_calls": ["run_tests"], "session_id": f"loop-{int(active.start)}",
                            "request_id": uuid.uuid4().hex})
    return records


def backfill(start: float, end: float, seed: int = 7) -> Iterator[list[dict[str, Any]]]:
    """History from start to end, an hour of minutes per yielded batch, no anomalies."""
    rng = np.random.default_rng(seed)
    t = math.floor(start / 60) * 60
    batch: list[dict[str, Any]] = []
    while t < end:
        batch.extend(minute(t, rng))
        t += 60
        if t % 3600 == 0:
            yield batch
            batch = []
    if batch:
        yield batch


def requests_counted(exposition: str) -> float:
    """The sum of `llm_requests_total` in a /metrics page: non-zero when the exporter already
    holds history, so a second `up` (or a restarted demo) adds no second week on top."""
    return sum(float(line.rpartition(" ")[2]) for line in exposition.splitlines()
               if line.startswith("llm_requests_total{"))


def first_anomaly(now: float) -> Anomaly:
    """The first anomaly of the live traffic: a runaway agent loop from the minute of `now` on.

    Its token burst is flagged by the exporter at once and pages after the rule's `for:`
    (2 minutes), the quickest path from a record to a notification; the others need the
    hour window to move first."""
    start = math.floor(now / 60) * 60
    return Anomaly("runaway_session", start, start + 900)


def next_anomaly(now: float, rng: np.random.Generator) -> Anomaly:
    """An anomaly starting 10–30 minutes from now, lasting 15 minutes."""
    start = now + float(rng.uniform(600, 1800))
    return Anomaly(ANOMALIES[int(rng.integers(0, len(ANOMALIES)))], start, start + 900)
