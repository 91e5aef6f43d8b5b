"""Connection hygiene: the timeouts and limits uvicorn leaves out, and the ones it has.

What uvicorn (httptools) enforces by itself: an idle keep-alive connection is closed
`timeout_keep_alive` after its last response, and `limit_concurrency` answers 503 once
that many connections or requests are open (the connections stay open). What it does not:
a connection that never completes its headers, or stops sending its body, is kept
forever; header size is unbounded; and nothing caps the open connections, so 600 idle
or half-sent sockets held their file descriptors until the process ran out and new
clients got connection resets.

`GuardedProtocol` adds to uvicorn's httptools protocol:
- a header timeout: from the connection's opening, or a request's first byte, until its
  headers are complete (408 and close);
- a body timeout: the longest pause between two reads of a request body, not counting
  time the server itself stopped reading (408 and close);
- a header size limit (431 and close);
- a connection cap: past `max_connections` the connection idle longest is closed (an
  idle keep-alive connection costs its client one reconnect), or the new one if none is
  idle.
`serve_options` turns the settings into uvicorn's options; `raise_fd_limit` lifts the
soft file-descriptor limit to the hard one, as Go programs do, and the connection cap
stays below it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import Settings

log = logging.getLogger("llm_usage_exporter")
FD_RESERVE = 64      # descriptors kept for the database, its WAL, logs, tail files, the event loop


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_connections: int = 1000


def _response(status: bytes, message: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: "
            + str(len(message)).encode() + b"\r\nconnection: close\r\n\r\n" + message)


REQUEST_TIMEOUT = _response(b"408 Request Timeout", b"request not received in time\n")
HEADERS_TOO_LARGE = _response(b"431 Request Header Fields Too Large", b"request headers too large\n")
OVERLOADED = _response(b"503 Service Unavailable", b"too many open connections\n")


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body timeouts, a header size limit and a
    connection cap (see the module docstring). `limits` is set on a subclass per server."""

    limits: ConnectionLimits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = "headers"              # headers, body, app (request read, or idle after a response)
        self._header_bytes = 0
        self._progress = 0.0                 # loop time of the last byte of the phase
        self._phase_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0

    # --- connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        self._idle_since = now
        self._start("headers", now)
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _make_room(self) -> None:
        """Close the connection idle longest, or this one if none is idle."""
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedProtocol) and c._is_idle()]
        if idle:
            victim = min(idle, key=lambda c: c._idle_since)
            victim.transport.close()
            return
        log.warning("more than max_connections (%d) open and none idle: refusing a connection",
                    self.limits.max_connections)
        self.transport.write(OVERLOADED)
        self.transport.close()

    def _is_idle(self) -> bool:
        """Between requests (keep-alive), or opened and nothing sent yet."""
        return (self._phase in ("headers", "app") and self._header_bytes == 0
                and (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing())

    # --- phases and the one timer -----------------------------------------------------

    def _start(self, phase: str, now: float) -> None:
        self._phase = phase
        self._phase_started = self._progress = now
        self._cancel()
        if phase == "headers":
            self._timer = self.loop.call_later(self.limits.header_timeout, self._check)
        elif phase == "body":
            self._timer = self.loop.call_later(self.limits.body_timeout, self._check)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._phase == "headers":
            late = now - self._phase_started >= self.limits.header_timeout
            wait = self._phase_started + self.limits.header_timeout - now
        elif self._phase == "body":
            if self.flow.read_paused:        # the server stopped reading, not the client
                self._progress = now
            late = now - self._progress >= self.limits.body_timeout
            wait = self._progress + self.limits.body_timeout - now
        else:
            return
        if late:
            self._timed_out()
        else:
            self._timer = self.loop.call_later(max(wait, 0.01), self._check)

    def _timed_out(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True       # the app sees http.disconnect
            self.cycle.message_event.set()
            if not self.cycle.response_started:
                self.transport.write(REQUEST_TIMEOUT)
        elif self._header_bytes:                  # headers never completed
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()

    # --- uvicorn's hooks --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        if self._phase == "app":                 # the first bytes of the next request
            self._start("headers", now)
        if self._phase == "headers":
            self._header_bytes += len(data)
        else:
            self._progress = now
        super().data_received(data)
        if self._phase == "headers" and self._header_bytes > self.limits.max_header_bytes \
                and not self.transport.is_closing():
            self.transport.write(HEADERS_TOO_LARGE)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase == "app":                 # a pipelined request begins in the same read
            self._start("headers", self.loop.time())

    def on_headers_complete(self) -> None:
        self._header_bytes = 0
        super().on_headers_complete()
        self._start("body", self.loop.time())

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel()
        self._phase = "app"

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = self.loop.time()


def protocol_class(limits: ConnectionLimits) -> type[GuardedProtocol]:
    return type("GuardedHttpProtocol", (GuardedProtocol,), {"limits": limits})


def raise_fd_limit() -> int:
    """Lift the soft limit on open files to the hard one; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_limits(settings: Settings, fd_limit: int | None = None) -> ConnectionLimits:
    """The limits of `settings`, with the connection cap kept below the descriptor limit."""
    cap = settings.max_connections
    if fd_limit is not None and cap > fd_limit - FD_RESERVE:
        cap = max(1, fd_limit - FD_RESERVE)
        log.warning("max_connections lowered from %d to %d: the process may open %d files",
                    settings.max_connections, cap, fd_limit)
    return ConnectionLimits(settings.header_timeout, settings.body_timeout, settings.max_header_bytes, cap)


def serve_options(settings: Settings, limits: ConnectionLimits) -> dict[str, Any]:
    """uvicorn's options for the settings' timeouts and limits."""
    return {
        "http": protocol_class(limits),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "limit_concurrency": settings.limit_concurrency or None,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
