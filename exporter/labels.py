"""Label guards: the first N distinct values of a label are admitted, the rest become `other`.

Cardinality is a bug class: one misbehaving client sending a fresh model name per request
must not blow up Prometheus. Admitted values are persisted by the store so that a restart
admits the same set and counters keep their identities.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .codes import factorize

OTHER = "other"


class LabelGuard:
    """Admits up to `limit` distinct values of one label; counts what it turns away."""

    def __init__(self, name: str, limit: int, admitted: Iterable[str] = ()) -> None:
        self.name = name
        self.limit = limit
        self._admitted: dict[str, None] = dict.fromkeys(admitted)
        self.overflow_total = 0
        self.newly_admitted: list[str] = []

    def __contains__(self, value: str) -> bool:
        return value in self._admitted

    @property
    def values(self) -> list[str]:
        return list(self._admitted)

    def guard(self, values: np.ndarray) -> np.ndarray:
        """Map an object array of values; loops only over the batch's distinct values."""
        uniq, inverse = factorize(values)
        mapped = np.empty(len(uniq), dtype=object)
        overflow_counts = np.bincount(inverse, minlength=len(uniq))
        for i, v in enumerate(uniq):
            if v in self._admitted or v == OTHER:
                mapped[i] = v
            elif len(self._admitted) < self.limit:
                self._admitted[v] = None
                self.newly_admitted.append(v)
                mapped[i] = v
            else:
                mapped[i] = OTHER
                self.overflow_total += int(overflow_counts[i])
        return mapped[inverse]

    def take_new(self) -> list[str]:
        """Values admitted since the last call, for the store to persist."""
        new, self.newly_admitted = self.newly_admitted, []
        return new
