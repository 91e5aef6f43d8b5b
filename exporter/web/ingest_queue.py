"""The ingest queue: POST bodies wait here for the one thread that ingests them.

Ingest is CPU work (decoding, validation, numpy, one SQLite transaction). Run on the event
loop, a 16 MiB batch held every other request, `/healthz` included, for seconds. So the
HTTP edge only reads bodies; a single worker thread decodes and ingests them in arrival
order (the engine serialises ingest anyway, and the GIL would give a second worker nothing).

What waits is bounded in bytes: a request reserves room for its body before reading it
(its declared length, or chunk by chunk when it has none) and gives it back when its
batch is done. A request that finds no room is refused at once with 429 and a
Retry-After, so a burst of large bodies costs bounded memory and a client learns to slow
down instead of timing out.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Ticket:
    """Room one request holds in the queue; it may grow while a body without a declared
    length is read. Release it exactly once (`with ticket:`)."""

    def __init__(self, queue: "IngestQueue", size: int) -> None:
        self.queue = queue
        self.size = size

    def grow(self, to: int) -> bool:
        """Hold at least `to` bytes; False (nothing changed) when the queue has no room."""
        if to <= self.size:
            return True
        if not self.queue._take(to - self.size):
            return False
        self.size = to
        return True

    def release(self) -> None:
        self.queue._give(self.size)
        self.size = 0

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class IngestQueue:
    """A byte budget for bodies waiting or in ingest, and the worker thread that runs them."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._used = 0
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        self.throttled_total = 0

    @property
    def used(self) -> int:
        return self._used

    def _take(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.capacity and self._used > 0:   # one request alone always fits
                return False
            self._used += n
            return True

    def _give(self, n: int) -> None:
        with self._lock:
            self._used -= n

    def admit(self, size: int) -> Ticket | None:
        """Room for a body of `size` bytes (0 when unknown yet), or None: answer 429."""
        if not self._take(size):
            self.throttled_total += 1
            return None
        return Ticket(self, size)

    def refused(self) -> None:
        """Count a request refused for want of room after it was admitted (a growing body)."""
        self.throttled_total += 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread, after the jobs queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def close(self) -> None:
        """Finish the jobs already queued, then stop the worker."""
        self._worker.shutdown(wait=True)
