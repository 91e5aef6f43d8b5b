"""The dedupe window: which request ids were already counted, in 8 bytes per id.

A request id is reduced to a 64-bit hash (`hash_ids`: FNV-1a over the id's characters,
computed for a whole batch at once, then a mixing step so every bit depends on every
character). Hashes are kept in chunks of ingest
time (a sixteenth of the window, at most an hour): the current chunk is a Python set,
older ones are frozen into sorted numpy arrays, so checking a batch is one `searchsorted`
per chunk and expiring is dropping arrays. An id is remembered for at least the window
and at most one chunk longer. The store keeps each
batch's hashes as one blob, so persisting costs one row per batch and a restart reloads
the window. Two different ids share a hash with probability about n²/2⁶⁵ — one in ten
thousand for a window of 60 million ids — and the only effect of a collision is one
record counted as a duplicate.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

MAX_CHUNK = 3600.0
HASH_NAME = "fnv1a64-utf32-mix"   # stored with the hashes: a store of another kind is not comparable
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def hash_ids(ids: Sequence[str]) -> np.ndarray:
    """Stable 64-bit hashes of request ids (the same in every process, unlike hash()).

    Vectorised over the batch: the ids become one fixed-width array of code points, and
    the loop runs over character positions, not over ids; each id stops at its own length,
    so its hash does not depend on the other ids in the batch."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    arr = np.array(ids, dtype=np.str_)
    width = arr.dtype.itemsize // 4
    points = arr.view(np.uint32).reshape(n, width).astype(np.uint64)
    length = np.char.str_len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            step = (h ^ points[:, j]) * _FNV_PRIME
            h = np.where(j < length, step, h) if j >= length.min() else step
        h ^= length.astype(np.uint64)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)   # splitmix64's finaliser
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h.view(np.int64)


class DedupeIndex:
    """Request-id hashes seen within `window` seconds of ingest time."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.chunk = max(1.0, min(MAX_CHUNK, window / 16))
        self._frozen: dict[int, np.ndarray] = {}     # chunk -> sorted hashes
        self._open_hour: int | None = None           # the open chunk's number
        self._open: set[int] = set()

    def __len__(self) -> int:
        return len(self._open) + sum(a.size for a in self._frozen.values())

    def seen(self, hashes: np.ndarray, now: float | None = None) -> np.ndarray:
        """A mask of the hashes already in the window (as `expire(now)` would leave it; this
        changes nothing)."""
        found = np.zeros(hashes.shape[0], dtype=bool)
        oldest = -np.inf if now is None else int((now - self.window) // self.chunk)
        for chunk, arr in self._frozen.items():
            if chunk < oldest:
                continue
            pos = np.searchsorted(arr, hashes)
            pos = np.minimum(pos, arr.size - 1)
            found |= arr[pos] == hashes
        if self._open and (self._open_hour is None or self._open_hour >= oldest):
            found |= np.fromiter(map(self._open.__contains__, hashes.tolist()), dtype=bool, count=hashes.shape[0])
        return found

    def add(self, hashes: Iterable[int] | np.ndarray, at: float) -> None:
        """Remember hashes first seen at ingest time `at`; expires hours beyond the window."""
        hour = int(at // self.chunk)
        if self._open_hour is None or hour > self._open_hour:
            self._freeze()
            self._open_hour = hour
        if hour < self._open_hour:      # a replay clock behind the live one: file under its own chunk
            arr = np.asarray(list(hashes), dtype=np.int64)
            old = self._frozen.get(hour)
            self._frozen[hour] = np.unique(arr if old is None else np.concatenate([old, arr]))
        else:
            self._open.update(np.asarray(hashes, dtype=np.int64).tolist())
        self.expire(at)

    def _freeze(self) -> None:
        if self._open_hour is not None and self._open:
            arr = np.fromiter(self._open, dtype=np.int64, count=len(self._open))
            old = self._frozen.get(self._open_hour)
            self._frozen[self._open_hour] = np.unique(arr if old is None else np.concatenate([old, arr]))
        self._open = set()

    def expire(self, now: float) -> None:
        """Forget chunks that lie wholly before now - window."""
        oldest = int((now - self.window) // self.chunk)
        for h in [h for h in self._frozen if h < oldest]:
            del self._frozen[h]
        if self._open_hour is not None and self._open_hour < oldest:
            self._open, self._open_hour = set(), None
