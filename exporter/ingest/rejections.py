"""The rejected records of one batch: every one counted, the first few kept with a reason.

A body of 16 MiB can hold eight million bad lines. Keeping a reason for each cost
gigabytes and made an answer of a gigabyte, so a batch keeps the `limit` rejections with
the lowest record indices (the ones a client fixes first) and counts the rest. Reasons are
worked out only for the records that are kept: a stage that rejects records in bulk hands
over their indices and a function that explains one of them (`add_many`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

DEFAULT_LIMIT = 100


class RecordError(ValueError):
    """A record (or a native object) that cannot be accepted; `field` names the culprit
    for the caller, `message` says why."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(slots=True)
class Rejected:
    index: int
    field: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "reason": self.reason}


class Rejections:
    """A count of rejected records and the `limit` of them with the lowest indices."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.total = 0
        self._kept: list[Rejected] = []       # sorted by index, at most `limit`

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:
        return self.total > 0

    def __iter__(self) -> Iterator[Rejected]:
        return iter(self._kept)

    @property
    def kept(self) -> list[Rejected]:
        return list(self._kept)

    @property
    def omitted(self) -> int:
        """Rejections counted but not kept."""
        return self.total - len(self._kept)

    def _cutoff(self) -> float:
        """Indices at or above this cannot be kept any more."""
        return self._kept[-1].index if len(self._kept) >= self.limit else float("inf")

    def _keep(self, r: Rejected) -> None:
        bisect.insort(self._kept, r, key=lambda x: x.index)
        if len(self._kept) > self.limit:
            self._kept.pop()

    def add(self, r: Rejected) -> None:
        self.total += 1
        if r.index < self._cutoff():
            self._keep(r)

    def add_many(self, indices: Sequence[int] | np.ndarray, explain: Callable[[int], Rejected]) -> None:
        """Count `indices` as rejected; `explain(k)` gives the Rejected of `indices[k]` and is
        called at most `limit` times, only for those that are kept."""
        idx = np.asarray(indices, dtype=np.int64)
        if not idx.size:
            return
        self.total += int(idx.size)
        cutoff = self._cutoff()
        candidates = np.flatnonzero(idx < cutoff) if cutoff != float("inf") else np.arange(idx.size)
        if candidates.size > self.limit:
            nearest = np.argpartition(idx[candidates], self.limit - 1)[: self.limit]
            candidates = candidates[nearest]
        for k in candidates[np.argsort(idx[candidates], kind="stable")].tolist():
            if idx[k] < self._cutoff():
                self._keep(explain(k))
