"""A LiteLLM logger that sends one usage record per call to the exporter.

For the SDK:

    import litellm
    from exporter.integrations.litellm_logger import UsageExporterLogger
    litellm.callbacks = [UsageExporterLogger("http://127.0.0.1:9473")]

For the proxy (`config.yaml`), with this package installed in the proxy's environment (or
this one file copied beside `config.yaml`):

    litellm_settings:
      callbacks: exporter.integrations.litellm_logger.usage_logger

configured by `LLM_USAGE_EXPORTER_URL` (default http://127.0.0.1:9473) and
`LLM_USAGE_EXPORTER_TOKEN` (an ingest token, when the exporter requires one).

What it promises the application it runs in:

- **Never blocks, never raises.** A callback only slims LiteLLM's StandardLoggingPayload
  and appends it to a queue under a lock; a background thread sends batches. Any error
  inside the callback is counted (`stats()["callback_errors"]`), not raised.
- **No text leaves the process.** Messages, responses, error messages, tracebacks and
  user e-mails are removed before queueing; only counts, names, ids, times, the finish
  reason and tool names are sent.
- **Retries keep their ids.** A batch that meets a connection error, a timeout, 408, 429
  or 5xx is sent again, unchanged, after a backoff (doubling, up to `max_backoff` seconds,
  or the server's `Retry-After`): the exporter counts a record once by its request id, so
  a batch stored although its answer was lost is not counted twice. A batch refused for
  good (400, 401, 403, 413, 415) is dropped and counted.
- **Bounded memory.** At most `max_queue` records wait (plus the batch in flight). While
  the exporter is down the oldest waiting records are dropped to make room and counted in
  `stats()["dropped"]`; a warning says so once per outage.

The module imports only the standard library, httpx and LiteLLM.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
from collections import deque
from typing import Any, Mapping

import httpx
from litellm.integrations.custom_logger import CustomLogger

log = logging.getLogger("llm_usage_exporter.litellm")

DEFAULT_URL = "http://127.0.0.1:9473"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
APP_KEYS = ("app", "app_name", "application")

# The parts of a StandardLoggingPayload the exporter reads (exporter/ingest/native.py).
TOP_KEYS = ("id", "litellm_call_id", "session_id", "call_type", "stream", "status", "custom_llm_provider",
            "prompt_tokens", "completion_tokens", "total_tokens", "startTime", "endTime", "completionStartTime",
            "response_cost", "model", "model_group", "request_tags", "cache_hit")
METADATA_KEYS = ("usage_object", "user_api_key_alias", "user_api_key_team_alias", "team_alias")
ERROR_KEYS = ("error_code", "error_class", "normalized_error")


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def slim(payload: Mapping[str, Any], kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The StandardLoggingPayload with only what the exporter reads: no text of any kind."""
    out: dict[str, Any] = {k: payload[k] for k in TOP_KEYS if payload.get(k) is not None}
    meta = _mapping(payload.get("metadata"))
    slim_meta: dict[str, Any] = {k: meta[k] for k in METADATA_KEYS if meta.get(k) is not None}
    requester = meta.get("requester_metadata")
    if isinstance(requester, Mapping):
        apps = {k: requester[k] for k in APP_KEYS if isinstance(requester.get(k), str)}
        if apps:
            slim_meta["requester_metadata"] = apps
    if slim_meta:
        out["metadata"] = slim_meta
    err = payload.get("error_information")
    if isinstance(err, Mapping):
        out["error_information"] = {k: err[k] for k in ERROR_KEYS if err.get(k) is not None}
    if payload.get("response_cost_failure_debug_info") or payload.get("zero_cost_diagnostic"):
        out["zero_cost_diagnostic"] = {"reason": "unpriced by litellm"}
    response = payload.get("response")
    choices = response.get("choices") if isinstance(response, Mapping) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        first = choices[0]
        calls = _mapping(first.get("message")).get("tool_calls")
        names = [_mapping(c).get("function", {}).get("name") for c in (calls if isinstance(calls, list) else ())
                 if isinstance(_mapping(c).get("function"), Mapping)]
        out["response"] = {"choices": [{"finish_reason": first.get("finish_reason"),
                                        "message": {"tool_calls": [{"function": {"name": n}} for n in names if n]}}]}
    params = payload.get("model_parameters")
    if isinstance(params, Mapping) and params.get("tools"):
        out["model_parameters"] = {"tools": True}
    # The SDK's own `metadata={"app": ...}` never reaches the payload: read it from the call.
    call_meta = ((kwargs or {}).get("litellm_params") or {}).get("metadata") or {}
    if isinstance(call_meta, Mapping):
        app = next((call_meta[k] for k in APP_KEYS if isinstance(call_meta.get(k), str) and call_meta[k]), None)
        if app:
            out["app"] = app
    return out


class UsageExporterLogger(CustomLogger):  # type: ignore[misc]   # litellm is not type-checked here
    """Batches LiteLLM's StandardLoggingPayloads to the exporter's `/v1/records` in the
    background (see the module docstring for what it promises)."""

    def __init__(self, url: str | None = None, token: str | None = None, *, app: str | None = None,
                 batch_size: int = 200, flush_interval: float = 1.0, max_queue: int = 10_000,
                 timeout: float = 5.0, max_backoff: float = 30.0) -> None:
        super().__init__()
        base = (url or os.environ.get("LLM_USAGE_EXPORTER_URL") or DEFAULT_URL).rstrip("/")
        self.url = base if base.endswith("/v1/records") else base + "/v1/records"
        self.token = token if token is not None else os.environ.get("LLM_USAGE_EXPORTER_TOKEN")
        self.app = app
        self.batch_size = max(1, batch_size)
        self.flush_interval = flush_interval
        self.max_queue = max(1, max_queue)
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._queue: deque[dict[str, Any]] = deque()
        self._inflight = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._outage = False
        self._drop_warned = False
        self._atexit = False
        self.counts = {"queued": 0, "sent": 0, "accepted": 0, "duplicate": 0, "rejected": 0, "refused": 0,
                       "dropped": 0, "retries": 0, "callback_errors": 0}
        self.last_error: str | None = None

    # --- LiteLLM's hooks: enqueue only ----------------------------------------------------

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._enqueue(kwargs)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._enqueue(kwargs)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._enqueue(kwargs)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._enqueue(kwargs)

    def _enqueue(self, kwargs: Any) -> None:
        try:
            payload = kwargs.get("standard_logging_object") if isinstance(kwargs, Mapping) else None
            if not isinstance(payload, Mapping):
                return
            record = slim(payload, kwargs)
            with self._lock:
                self._ensure_worker()
                if len(self._queue) >= self.max_queue:
                    self._queue.popleft()
                    self.counts["dropped"] += 1
                    if not self._drop_warned:
                        log.warning("usage exporter logger: %d records waiting, dropping the oldest to make room",
                                    self.max_queue)
                        self._drop_warned = True
                self._queue.append(record)
                self.counts["queued"] += 1
                if len(self._queue) >= self.batch_size:
                    self._wake.set()
        except Exception:       # noqa: BLE001 - a logger must never break the call it logs
            self.counts["callback_errors"] += 1

    # --- the sender -----------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        """Start the sender (again after a fork: the child has the queue but not the thread)."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._closed = False
        if not self._atexit:        # a script that ends right after its last call still sends it
            atexit.register(self.close, 2.0)
            self._atexit = True
        self._thread = threading.Thread(target=self._run, name="usage-exporter-logger", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.app:
            headers["X-LLM-App"] = self.app
        with httpx.Client(timeout=self.timeout, headers=headers) as client:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                while True:
                    with self._lock:
                        batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
                        self._inflight = len(batch)
                        if not batch:
                            self._idle.notify_all()
                            closed = self._closed
                            break
                    self._deliver(client, batch)
                    with self._lock:
                        self._inflight = 0
                if closed:
                    return

    def _deliver(self, client: httpx.Client, batch: list[dict[str, Any]]) -> None:
        """Send one batch until it is stored or refused for good; the same body every time."""
        backoff = 0.5
        while True:
            wait = self._send(client, batch)
            if wait is None:
                return
            self.counts["retries"] += 1
            if self._closed and self._deadline_passed():     # closing and still failing: give up on all
                with self._lock:
                    self.counts["dropped"] += len(batch) + len(self._queue)
                    self._queue.clear()
                return
            time.sleep(min(wait if wait > 0 else backoff * (0.5 + random.random()), self.max_backoff))
            backoff = min(backoff * 2, self.max_backoff)

    def _send(self, client: httpx.Client, batch: list[dict[str, Any]]) -> float | None:
        """POST the batch: None when it is done with (stored or refused), else how long to
        wait before the same batch goes again (0: the caller's backoff)."""
        try:
            r = client.post(self.url, json=batch)
        except httpx.HTTPError as e:
            self._failing(f"{type(e).__name__}: {e}", len(batch))
            return 0.0
        if r.status_code in RETRY_STATUSES:
            self._failing(f"HTTP {r.status_code}", len(batch))
            after = r.headers.get("retry-after", "")
            return float(after) if after.isdigit() else 0.0
        if self._outage:
            log.warning("usage exporter logger: %s answers again (%d records dropped so far)", self.url,
                        self.counts["dropped"])
            self._outage = False
            self._drop_warned = False
        self.counts["sent"] += len(batch)
        if r.status_code in (200, 422):
            try:
                body = r.json()
                for k in ("accepted", "duplicate", "rejected"):
                    self.counts[k] += int(body.get(k, 0))
            except (ValueError, AttributeError, TypeError):
                pass
            return None
        self.counts["refused"] += len(batch)
        self.last_error = f"HTTP {r.status_code}: {r.text[:200]}"
        log.error("usage exporter logger: %s refused a batch of %d records: %s", self.url, len(batch), self.last_error)
        return None

    def _failing(self, why: str, n: int) -> None:
        self.last_error = why
        if not self._outage:
            log.warning("usage exporter logger: %s unreachable (%s); retrying %d records, %d waiting",
                        self.url, why, n, len(self._queue))
            self._outage = True

    _close_deadline = 0.0

    def _deadline_passed(self) -> bool:
        return time.monotonic() > self._close_deadline

    # --- for the application and tests ---------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what waits now; True when nothing is left waiting or in flight in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._thread is None:
                return not self._queue
            self._wake.set()
            while self._queue or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
                self._wake.set()
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for at most `timeout` seconds, then stop the sender (a batch still failing
        by then is dropped and counted)."""
        self._close_deadline = time.monotonic() + timeout
        done = self.flush(timeout)
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, self._close_deadline - time.monotonic()) + self.timeout)
        return done

    def stats(self) -> dict[str, Any]:
        """Counters since start, how many records wait, and the last delivery error."""
        with self._lock:
            return {**self.counts, "waiting": len(self._queue) + self._inflight, "last_error": self.last_error}


usage_logger = UsageExporterLogger()   # the instance a proxy's config.yaml names
