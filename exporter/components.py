"""The parts that run on their own (the evaluator, each detector, store upkeep, tail
followers), each isolated: a failure in one is logged and counted under its name, and the
others go on. Exposed as `llm_exporter_component_errors_total{component}` and
`llm_exporter_component_last_success_timestamp_seconds{component}`, as node_exporter
reports each collector's success beside the scrape instead of failing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("llm_usage_exporter")
T = TypeVar("T")

# Every component, so each has its series from the start (at 0) instead of appearing with its
# first failure. `tail` counts every followed file together: file paths are not label values.
COMPONENTS = ("evaluator", "drift", "runaway", "budget", "checkpoint", "prune", "tail", "demo")


class Components:
    """Error counts and the wall-clock time of the last success, per component."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.errors = dict.fromkeys(COMPONENTS, 0.0)
        self.last_success = dict.fromkeys(COMPONENTS, 0.0)
        self._lock = threading.Lock()

    def succeeded(self, name: str) -> None:
        with self._lock:
            self.last_success[name] = self.clock()

    def failed(self, name: str) -> None:
        with self._lock:
            self.errors[name] += 1

    def attempt(self, name: str, fn: Callable[[], T], fallback: T) -> T:
        """`fn()`, or `fallback` when it raises: the exception is logged and counted, never
        passed on, so the caller's other components still run."""
        try:
            result = fn()
        except Exception:   # isolation is the point: any bug in one part stays in that part
            log.exception("%s failed", name)
            self.failed(name)
            return fallback
        self.succeeded(name)
        return result
