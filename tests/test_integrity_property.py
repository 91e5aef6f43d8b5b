"""The integrity property, for any sequence of batches of which some store writes fail:

- the counters (in memory, and after a restart) equal the sum over the acknowledged
  batches exactly, as a reference model computes it (dedupe by request id, label guards
  admitting in order, rejected records);
- re-sending every unacknowledged batch with the same request ids makes them equal the sum
  over all distinct records;
- the buckets behind /v1/usage/stats hold exactly what the counters hold.

Failures are real SQLite failures at every point of the batch's transaction: a trigger
aborting the insert into one table, a second connection holding the write lock, and a
failing checkpoint (after the batch was committed and acknowledged)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from faults import break_table, locked, mend
from helpers import T0, engine_at, settings_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.storage.usage_stats import usage_statistics
from exporter.engine import Engine
from exporter.storage.store import StoreError

TABLES = ("series", "dedupe", "totals", "records", "label_values", "daily_cost", "meta")
FAULTS = st.one_of(st.none(), st.none(), st.sampled_from(TABLES + ("locked", "buckets")))
MODEL_LIMIT = 2

record = st.fixed_dictionaries({
    "request_id": st.one_of(st.none(), st.sampled_from([f"r{i}" for i in range(25)])),
    "app": st.sampled_from(["a", "b", "c"]),
    "model": st.sampled_from(["m1", "m2", "m3", "m4"]),
    "input_tokens": st.integers(0, 1000),
    "valid": st.booleans().map(lambda b: b or None),          # mostly valid
})
batch = st.lists(record, min_size=1, max_size=8)
scenario = st.lists(st.tuples(batch, FAULTS), min_size=1, max_size=10)


def body(items: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    out = []
    for j, r in enumerate(items):
        d = {"ts": T0 - 600 + k * 7 + j, "provider": "p", "app": r["app"], "input_tokens": r["input_tokens"],
             "cost_usd": 0.01, "latency_s": 0.5}
        if r["valid"] is not False:
            d["model"] = r["model"]
        if r["request_id"] is not None:
            d["request_id"] = r["request_id"]
        out.append(d)
    return out


class Reference:
    """What the counters must say after a sequence of acknowledged batches."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.models: list[str] = []
        self.requests: Counter[tuple[str, str]] = Counter()
        self.tokens = 0
        self.results = Counter({"accepted": 0, "duplicate": 0, "rejected": 0})
        self.overflow = 0

    def add(self, items: list[dict[str, Any]]) -> None:
        fresh, ids = [], set()
        for d in items:
            if "model" not in d:
                self.results["rejected"] += 1
                continue
            rid = d.get("request_id")
            if rid is not None and (rid in self.seen or rid in ids):
                self.results["duplicate"] += 1
                continue
            if rid is not None:
                ids.add(rid)
            fresh.append(d)
        self.seen |= ids
        for m in sorted({d["model"] for d in fresh}):         # a guard admits a batch's new values in order
            if m not in self.models and len(self.models) < MODEL_LIMIT:
                self.models.append(m)
        for d in fresh:
            model = d["model"] if d["model"] in self.models else "other"
            self.overflow += model == "other"
            self.requests[(d["app"], model)] += 1
            self.tokens += d["input_tokens"]
        self.results["accepted"] += len(fresh)


def counters(engine: Engine) -> dict[str, Any]:
    n = len(engine.usage.keys)
    requests: Counter[tuple[str, str]] = Counter()
    for (app, _, model), count in zip(engine.usage.keys, engine.usage.requests[:n].tolist()):
        if count:
            requests[(app, model)] += int(count)
    return {"requests": requests, "tokens": float(engine.usage.tokens[:n, 0].sum()),
            "results": Counter({k: int(v) for k, v in engine.results_total.items()}),
            "overflow": int(engine.overflow_total["model"])}


def expected(ref: Reference) -> dict[str, Any]:
    return {"requests": +ref.requests, "tokens": float(ref.tokens), "results": ref.results, "overflow": ref.overflow}


def bucket_requests(engine: Engine) -> int:
    stats = usage_statistics(engine.store, T0 - 86400, T0 + 3600, ["app"])
    return sum(g["requests"] for g in stats["groups"])


def attempt(engine: Engine, db: Path, items: list[dict[str, Any]], fault: str | None) -> bool:
    """Ingest one batch under a fault; True when it was acknowledged."""
    if fault == "locked":
        with locked(db):
            try:
                engine.ingest(items)
            except StoreError as e:
                assert e.kind == "locked"
                return False
            raise AssertionError("a locked store took a batch")
    table = "buckets" if fault == "buckets" else fault
    c = break_table(db, table) if table else None
    try:
        engine.ingest(items)
        return True
    except StoreError:
        assert fault not in (None, "buckets"), "only the fault may fail a batch"
        return False
    finally:
        if c is not None and table:
            mend(c, table)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario)
def test_counters_equal_the_sum_over_acknowledged_batches(steps: list[tuple[list[dict[str, Any]], str | None]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = settings_for(Path(d), label_limit_model=MODEL_LIMIT, store_busy_timeout="0")
        engine, _ = engine_at(cfg, T0)
        engine.store.checkpoint_batches = 1                 # every batch checkpoints: "buckets" faults bite
        ref = Reference()
        unacked: list[list[dict[str, Any]]] = []
        for k, (items, fault) in enumerate(steps):
            sent = body(items, k)
            if attempt(engine, cfg.db, sent, fault):
                ref.add(sent)
            else:
                unacked.append(sent)
        assert counters(engine) == expected(ref)
        engine.close()

        engine, _ = engine_at(cfg, T0)                      # a restart: the store holds exactly the same
        assert counters(engine) == expected(ref)
        assert bucket_requests(engine) == ref.results["accepted"]
        for sent in unacked:                                # the client re-sends what was not acknowledged
            engine.ingest(sent)
            ref.add(sent)
        assert counters(engine) == expected(ref)
        everything = [d for k, (items, _) in enumerate(steps) for d in body(items, k) if "model" in d]
        distinct = len({d["request_id"] for d in everything if "request_id" in d}) + \
            sum(1 for d in everything if "request_id" not in d)
        assert sum(ref.requests.values()) == distinct == sum(counters(engine)["requests"].values())
        assert bucket_requests(engine) == distinct
        engine.close()
