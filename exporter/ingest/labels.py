"""Label guards: the first N distinct values of a label are admitted, the rest become `other`;
and the cap on (app, provider, model) combinations.

Cardinality is a bug class: one misbehaving client sending a fresh model name per request
must not blow up Prometheus. Admitted values are persisted by the store so that a restart
admits the same set and counters keep their identities.

Each label within its own limit is not enough: 100 apps, 30 providers and 200 models make
600,000 combinations, and every combination is a series of every usage family. So the
combinations are capped too (`max_series`): a new one beyond the cap keeps its app and is
counted under provider and model `other` (`fold`), which bounds the series to the cap plus
one per admitted app.

Guards plan before they admit: `plan` maps a batch without changing anything, and the
values it would admit are admitted (`admit`) only once the batch is committed, so a batch
the store refuses leaves no trace here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..codes import factorize

OTHER = "other"
SERIES = "series"          # the `label` value under which folded combinations are counted


@dataclass(slots=True)
class GuardPlan:
    """One label column of a batch as guarded: the mapped values, the values the batch
    admits, and how many records were mapped to `other`."""

    mapped: np.ndarray
    admitted: list[str] = field(default_factory=list)
    overflow: int = 0


class LabelGuard:
    """Admits up to `limit` distinct values of one label; the rest map to `other`."""

    def __init__(self, name: str, limit: int, admitted: Iterable[str] = ()) -> None:
        self.name = name
        self.limit = limit
        self._admitted: dict[str, None] = dict.fromkeys(admitted)

    def __contains__(self, value: str) -> bool:
        return value in self._admitted

    @property
    def values(self) -> list[str]:
        return list(self._admitted)

    def plan(self, values: np.ndarray) -> GuardPlan:
        """Map an object array of values; loops only over the batch's distinct values.
        Nothing changes until `admit`."""
        uniq, inverse = factorize(values)
        mapped = np.empty(len(uniq), dtype=object)
        counts = np.bincount(inverse, minlength=len(uniq))
        room = self.limit - len(self._admitted)
        out = GuardPlan(mapped)
        for i, v in enumerate(uniq):
            if v in self._admitted or v == OTHER:
                mapped[i] = v
            elif room > 0:
                room -= 1
                out.admitted.append(v)
                mapped[i] = v
            else:
                mapped[i] = OTHER
                out.overflow += int(counts[i])
        out.mapped = mapped[inverse]
        return out

    def admit(self, values: Iterable[str]) -> None:
        for v in values:
            self._admitted[v] = None


def fold(key: tuple[str, str, str]) -> tuple[str, str, str]:
    """Where a combination beyond `max_series` is counted: its app, provider and model `other`."""
    return (key[0], OTHER, OTHER)


def is_folded(key: tuple[str, str, str]) -> bool:
    """Combinations of the `fold` form are always admitted (there is one per app at most)."""
    return key[1] == OTHER and key[2] == OTHER
