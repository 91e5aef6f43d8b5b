"""The capped rejection log: every rejection counted, the lowest indices kept, reasons
worked out only for those kept."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from exporter.ingest.rejections import Rejected, Rejections


@given(st.lists(st.lists(st.integers(0, 10_000), max_size=50), max_size=8), st.integers(1, 20))
def test_keeps_the_lowest_indices_of_all_added(groups: list[list[int]], limit: int) -> None:
    log = Rejections(limit)
    explained = 0

    def explain_from(idx: list[int]):   # noqa: ANN202
        def explain(k: int) -> Rejected:
            nonlocal explained
            explained += 1
            return Rejected(idx[k], "f", f"r{idx[k]}")
        return explain
    everything: list[int] = []
    for g in groups:
        unique = sorted(set(g) - set(everything))          # a record is rejected once
        if len(unique) % 2:
            for i in unique:
                log.add(Rejected(i, "f", f"r{i}"))
        else:
            log.add_many(np.array(unique[::-1], dtype=np.int64), explain_from(unique[::-1]))
        everything += unique
    assert log.total == len(everything) and log.omitted == len(everything) - len(log.kept)
    assert [r.index for r in log] == sorted(everything)[:limit]
    assert all(r.reason == f"r{r.index}" for r in log)
    assert explained <= limit * len(groups)


def test_a_million_rejections_cost_a_few_explanations() -> None:
    log = Rejections(100)
    calls = []
    log.add_many(np.arange(1_000_000, 0, -1), lambda k: calls.append(k) or Rejected(1_000_000 - k, "record", "x"))
    assert log.total == 1_000_000 and len(calls) == 100
    assert [r.index for r in log][:3] == [1, 2, 3] and not Rejections()
