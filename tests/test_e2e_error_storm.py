"""End to end: a model's error storm pages once, through the real Prometheus and Alertmanager.

A provider failing a large share of one model's calls is seen by several rules at once:
the exporter's `error_rate` anomaly at the model (and, before it names the model, at its
apps and at all traffic), the fixed error ratio (`LLMErrorRatioHigh`, 25 % over 5
minutes) and possibly the model's quality drift. One cause, one page: they must arrive
in one notification group, the model's, and nothing else may reach the pager or chat.

One native stack (scripts/stack.py) runs the real exporter, Prometheus and Alertmanager
with the shipped rule files and alertmanager.yml, timing divided by 60 (`for:` and the
group waits; the rules' own windows, such as the error ratio's 5 minutes, stay real
time). Two apps call `anthropic/storm-model` every 10 seconds each, with 50 hours of
history at 1 % errors; the storm then fails 60 % of both apps' calls at the same pace,
so nothing but the errors changes (no request-rate spike).
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_util import delivered, e2e_marks, load_stack  # noqa: E402
from test_e2e_alerts import _clear_of_the_hour_turn  # noqa: E402

stack_mod = load_stack()
Stack = stack_mod.Stack

pytestmark = e2e_marks()

WINDOW_S = 60                  # --window: the anomaly window
STEP_S = 10.0                  # each app calls every 10 s, in history and live
APPS = ("storm-a", "storm-b")
PROVIDER, MODEL = "anthropic", "storm-model"
HISTORY_HOURS = 50
BASE_ERRORS = 0.01
STORM_ERRORS = 0.6
MODEL_GROUP = {"category": "anomaly", "scope": "model", "provider": PROVIDER, "model": MODEL,
               "job": "llm-usage-exporter"}


def _rec(ts: float, app: str, failed: bool) -> dict[str, Any]:
    r: dict[str, Any] = {"ts": round(ts, 3), "provider": PROVIDER, "model": MODEL, "app": app,
                         "input_tokens": 500, "output_tokens": 0 if failed else 100,
                         "cost_usd": 0.0005 if failed else 0.001, "latency_s": 1.0,
                         "status": "error" if failed else "ok", "request_id": uuid.uuid4().hex}
    if failed:
        r["error_type"] = "server_error"
    return r


def history(now: float) -> list[dict[str, Any]]:
    """Both apps, a call every STEP_S each (the second app 5 s after the first), 1 % failing."""
    rng = np.random.default_rng(17)
    start = (now // STEP_S) * STEP_S - HISTORY_HOURS * 3600
    out = []
    for ts in np.arange(start, now, STEP_S):
        for i, app in enumerate(APPS):
            t = float(ts) + i * STEP_S / 2
            if t < now:
                out.append(_rec(t, app, bool(rng.random() < BASE_ERRORS)))
    return out


class Calls(threading.Thread):
    """Continues both apps' calls live, on schedule; `share` of them fail."""

    def __init__(self, stack: Any, next_ts: float) -> None:
        super().__init__(daemon=True, name="storm-calls")
        self.stack, self.next_ts = stack, next_ts
        self.share = BASE_ERRORS
        self.rng = np.random.default_rng(23)
        self.halt = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        app = 0
        while not self.halt.wait(max(0.0, self.next_ts - time.time())):
            try:
                self.stack.post_records([_rec(self.next_ts, APPS[app], bool(self.rng.random() < self.share))])
            except Exception as e:  # noqa: BLE001 - recorded, asserted by the test
                if not self.halt.is_set():
                    self.errors.append(repr(e))
            self.next_ts += STEP_S / 2
            app = 1 - app

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


@pytest.fixture(scope="module")
def storm() -> Iterator[tuple[Any, Calls]]:
    _clear_of_the_hour_turn(margin_s=300.0)   # the storm and its pages stay inside one hour
    with Stack(fast=True, time_scale=60, ready_timeout=60, exporter_args=["--window", f"{WINDOW_S}s"]) as s:
        now = time.time()
        past = history(now)
        result = s.post_records(past)
        assert result["accepted"] == len(past), result
        calls = Calls(s, past[-1]["ts"] + STEP_S / 2)
        calls.start()
        try:
            # the counters' first samples in Prometheus, before the storm: a rate needs two
            s.wait_for(lambda: s.prom_query(f'llm_requests_total{{model="{MODEL}"}}'), timeout=30,
                       message="the model's request counters in Prometheus")
            calls.share = STORM_ERRORS
            yield s, calls
        finally:
            calls.stop()
        assert not calls.errors, calls.errors


def test_a_models_error_storm_pages_once(storm: tuple[Any, Calls]) -> None:
    """The fixed error ratio and the error-rate anomaly of the model arrive in one group,
    the model's; no app or all-traffic page, nothing to chat (the error ratio's warning
    twin is held by its page)."""
    s, _ = storm

    def both() -> set[str] | None:
        names = {a["labels"]["alertname"] for _, a in delivered(s, receiver="pager", status="firing", labels=MODEL_GROUP)}
        return names if {"LLMErrorRatioHigh", "LLMErrorRateSpike"} <= names else None

    names = s.wait_for(both, timeout=240, interval=1, message="LLMErrorRatioHigh and LLMErrorRateSpike of the model paged")
    time.sleep(3 * 300 / s.time_scale)   # three group intervals: a page in another group would show now
    pages = delivered(s, receiver="pager")
    groups = {tuple(sorted(n["groupLabels"].items())) for n, _ in pages}
    assert groups == {tuple(sorted((k, v) for k, v in MODEL_GROUP.items()))}, groups
    names = {a["labels"]["alertname"] for _, a in pages}
    assert names <= {"LLMErrorRatioHigh", "LLMErrorRateSpike", "LLMQualityDrift"}, names
    assert {a["labels"]["severity"] for _, a in pages} == {"critical"}
    assert not delivered(s, receiver="chat"), [a["labels"] for _, a in delivered(s, receiver="chat")]
    # the ratio's warning twin never fired, not even unseen beneath its page
    ratio = [a["labels"]["severity"] for a in s.prom_alerts()
             if a["labels"]["alertname"] == "LLMErrorRatioHigh" and a["state"] == "firing"]
    assert ratio == ["critical"], ratio
