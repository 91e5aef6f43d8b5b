"""Request-id hashes: stable across processes and batches, since the store keeps them."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.ingest.dedupe import DedupeIndex, hash_ids

ids_strategy = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                min_size=1, max_size=80), min_size=1, max_size=40)


@given(ids_strategy, ids_strategy)
@settings(max_examples=200, deadline=None)
def test_an_id_hashes_the_same_in_any_batch(a: list[str], b: list[str]) -> None:
    """The hash of an id may not depend on the other ids of its batch (their width, order)."""
    together = hash_ids(a + b)
    assert together[: len(a)].tolist() == hash_ids(a).tolist()
    assert together[len(a):].tolist() == hash_ids(b).tolist()
    assert hash_ids(list(reversed(a))).tolist() == list(reversed(hash_ids(a).tolist()))


def test_hashes_are_pinned() -> None:
    """The stored window is only useful if the function never changes silently: these values
    were computed once; a change to hash_ids must also change dedupe.HASH_NAME."""
    got = hash_ids(["req-1", "req-2", "b7c1f5d2-8f0e-4c1e-9a57-3f7c2f0a9e11", "é✓"]).tolist()
    assert got == PINNED


def test_distinct_ids_rarely_collide() -> None:
    ids = [f"req-{i}" for i in range(200_000)] + [f"{i:x}" for i in range(200_000)]
    assert np.unique(hash_ids(ids)).size == len(set(ids))


def test_window_remembers_and_forgets() -> None:
    idx = DedupeIndex(window=3600)
    h = hash_ids(["a", "b"])
    idx.add(h, at=1000.0)
    assert idx.seen(hash_ids(["a", "c"])).tolist() == [True, False]
    idx.add(hash_ids(["z"]), at=1000.0 + 3600 + 3600 / 16 * 2)
    assert idx.seen(h).tolist() == [False, False]


PINNED = [-8135444562913347038, -439600050178594883, 7273757710793354659, 4820594287237377371]
