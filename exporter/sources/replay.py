"""History files in, on event time: `replay` loads them into the store, `backtest` replays
them through the same evaluator that serves live traffic and reports severity changes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from ..anomaly.evaluator import SEVERITY_NAMES, Snapshot
from ..config import Settings
from ..engine import Engine
from ..ingest.attribution import DEFAULT as DEFAULT_ATTRIBUTION
from ..ingest.attribution import Attribution
from ..ingest.records import UsageRecord, parse_items
from ..ingest.rejections import Rejected
from .files import read_history_file
from .progress import Progress

CHUNK = 5000


@dataclass(slots=True)
class FileProblem:
    path: str
    index: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: record {self.index}: {self.field}: {self.reason}"


def load_records(paths: Iterable[str], now: float,
                 attribution: Attribution = DEFAULT_ATTRIBUTION) -> tuple[list[UsageRecord], list[FileProblem]]:
    """Every valid record of the files, sorted by event time, and the problems found
    (`attribution`: the configured app precedence and default provider)."""
    records: list[UsageRecord] = []
    problems: list[FileProblem] = []
    for path in paths:
        items = list(read_history_file(path))
        good, bad, _ = parse_items(items, now, attribution)
        records.extend(good)
        problems.extend(FileProblem(path, b.index, b.field, b.reason) for b in bad)
    records.sort(key=lambda r: r.ts)
    return records, problems


def replay(engine: Engine, records: list[UsageRecord], progress: bool = True) -> dict[str, int]:
    """Ingest sorted records in chunks; the clock for dedupe expiry is each chunk's newest ts."""
    bar = Progress(len(records), "replay") if progress else None
    totals = {"accepted": 0, "duplicate": 0}
    for i in range(0, len(records), CHUNK):
        chunk = records[i:i + CHUNK]
        res = engine.ingest_records(chunk, now=max(chunk[-1].ts, engine.clock()))
        totals["accepted"] += res.accepted
        totals["duplicate"] += res.duplicate
        if bar:
            bar.update(i + len(chunk))
    if bar:
        bar.close()
    return totals


@dataclass(slots=True)
class Transition:
    at: float
    signal: str
    scope: str
    series: str
    before: str
    after: str
    current: float | None
    baseline: float | None
    ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "signal": self.signal, "scope": self.scope, "series": self.series,
                "from": self.before, "to": self.after, "current": self.current, "baseline": self.baseline,
                "ratio": self.ratio}


def series_name(key: tuple[str, str, str, str]) -> str:
    scope, app, provider, model = key
    return app if scope == "app" else f"{provider}/{model}" if scope == "model" else "all"


def backtest(settings: Settings, records: list[UsageRecord], start: float | None, end: float | None,
             step: float, progress: bool = False, on_snapshot: Any = None) -> list[Transition]:
    """Replay records on event time and evaluate every `step`; return severity changes.

    The engine runs on an in-memory store with a clock that reads the step time, so this is
    exactly the code path of live serving, evaluated at historical times. Step times are
    aligned to multiples of `step` so that a live evaluation at the same instant agrees.
    A record is dated when its request started but reaches a live exporter only when it has
    ended, so each one is fed at its start plus its latency (`arrivals`), the earliest it
    could have come.
    """
    if not records:
        return []
    t_clock = [records[0].ts]
    engine = Engine(settings.model_copy(update={"db": ":memory:"}), clock=lambda: t_clock[0])
    first = records[0].ts if start is None else start
    last = records[-1].ts + settings.window if end is None else end
    t = math.ceil(first / step) * step
    steps = max(int((last - t) // step) + 1, 0)
    came = arrivals(records)
    order = np.argsort(came, kind="stable")
    came = came[order]
    by_arrival = [records[i] for i in order.tolist()]
    pos = 0
    state: dict[tuple[str, tuple[str, str, str, str]], int] = {}
    out: list[Transition] = []
    bar = Progress(steps, "backtest") if progress else None
    for n in range(steps):
        t_clock[0] = t
        upto = int(np.searchsorted(came, t, side="right"))
        if upto > pos:
            for i in range(pos, upto, CHUNK):
                j = min(i + CHUNK, upto)
                engine.ingest_records(by_arrival[i:j], now=t)
            pos = upto
        snap = engine.evaluate(t)
        if snap is not None:
            out.extend(_transitions(snap, state))
            if on_snapshot is not None:
                on_snapshot(snap)
        if bar:
            bar.update(n + 1)
        t += step
    if bar:
        bar.close()
    engine.close()
    return out


def arrivals(records: list[UsageRecord]) -> np.ndarray:
    """When each record could first reach the exporter: its start plus its latency (a
    record without one, or with a latency that is no number, at its start)."""
    came = np.fromiter((r.ts + (r.latency_s or 0.0) for r in records), dtype=np.float64, count=len(records))
    ts = np.fromiter((r.ts for r in records), dtype=np.float64, count=len(records))
    return np.where(np.isfinite(came), came, ts)


def _transitions(snap: Snapshot, state: dict[tuple[str, tuple[str, str, str, str]], int]) -> Iterator[Transition]:
    for spec in snap.specs:
        v = snap.verdicts[spec.name]
        sev = v.severity
        for i, key in enumerate(snap.keys):
            new = int(sev[i])
            k = (spec.name, key)
            old = state.get(k, 0)
            if new != old:
                state[k] = new
                yield Transition(snap.t, spec.name, key[0], series_name(key), SEVERITY_NAMES[old], SEVERITY_NAMES[new],
                                 _f(v.current[i]), _f(v.baseline[i]), _f(v.ratio[i]))


def _f(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(float(x)) else None


def file_problems_report(problems: list[FileProblem], limit: int = 20) -> str:
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)


def rejected_to_problems(path: str, rejected: list[Rejected]) -> list[FileProblem]:
    return [FileProblem(path, r.index, r.field, r.reason) for r in rejected]
