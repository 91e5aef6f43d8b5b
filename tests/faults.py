"""Real faults for the integrity tests: a SQLite file another connection has locked, a table
whose inserts fail, a full file system, a process that may not write what root could,
and a snapshot of everything an engine holds in memory.

    from faults import break_table, mend, locked, small_disk, unprivileged, memory_state
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from exporter.engine import Engine


def break_table(db: Path | str, table: str) -> sqlite3.Connection:
    """Make every insert into `table` fail (as a full disk or a damaged page would abort the
    statement) until `mend` is called."""
    c = sqlite3.connect(db)
    c.execute(f"CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    c.commit()
    return c


def mend(c: sqlite3.Connection, table: str) -> None:
    c.execute(f"DROP TRIGGER fail_{table}")
    c.commit()
    c.close()


@contextmanager
def locked(db: Path | str) -> Iterator[sqlite3.Connection]:
    """A second real connection holding an exclusive write lock on `db` until the block ends."""
    c = sqlite3.connect(db, isolation_level=None, timeout=10)
    c.execute("BEGIN EXCLUSIVE")
    try:
        yield c
    finally:
        c.execute("ROLLBACK")
        c.close()


class SmallDisk:
    """A tmpfs of a few MB: a file system that really fills up, and grows back on demand."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb

    def grow(self, size_mb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(self.path)], check=True, capture_output=True)
        self.size_mb = size_mb


@contextmanager
def small_disk(size_mb: int = 2) -> Iterator[SmallDisk | None]:
    """A tmpfs mounted on a fresh directory, or None where the test may not mount one."""
    where = Path(tempfile.mkdtemp(prefix="llm-full-disk-"))
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], capture_output=True)
        mounted = r.returncode == 0
    try:
        yield SmallDisk(where, size_mb) if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: nothing for an ordinary user;
    for root, setpriv dropping the capabilities that bypass them (root's own files stay
    readable, so the interpreter still runs). Skips the test when neither works."""
    if os.geteuid() != 0:
        return []
    exe = shutil.which("setpriv")
    if exe is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    prefix = [exe, "--bounding-set", "-dac_override,-dac_read_search", "--"]
    probe = Path(tempfile.mkdtemp(prefix="llm-ro-probe-"))
    try:
        (probe / "f").write_text("x")
        (probe / "f").chmod(0o444)
        r = subprocess.run(prefix + ["sh", "-c", f"echo y >> {probe / 'f'}"], capture_output=True)
        if r.returncode == 0:
            pytest.skip("setpriv cannot drop the capabilities here: file permissions cannot be tested")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return prefix


def memory_state(engine: Engine) -> dict[str, Any]:
    """Everything a batch may change in an engine's memory, as comparable plain values."""
    d = engine.dedupe
    h = engine.history
    state: dict[str, Any] = {
        "usage_keys": list(engine.usage.keys),
        "usage": engine.usage.table[:len(engine.usage.keys)].tolist(),
        "results": dict(engine.results_total),
        "overflow": dict(engine.overflow_total),
        "guards": {k: g.values for k, g in engine.guards.items()},
        "dedupe": (sorted(d._open), {k: v.tolist() for k, v in d._frozen.items()}, d._open_hour),
        "series": dict(engine.store.series()),
        "newest": engine.newest_event_ts,
        "last_record": engine.last_record_wallclock,
        "pending": len(engine.store._pending),
        "history_keys": list(h.keys),
    }
    for name in ("hour_add", "hour_q", "open_sk", "fine_add", "coarse_sk", "first_hour"):
        arr = getattr(h, name)[:h.size]
        state["history_" + name] = np.nan_to_num(arr, nan=-1.0).tobytes()
    for ring in ("hours", "open", "fine_ring", "coarse_ring"):
        state["ring_" + ring] = getattr(h, ring).tag.tolist()
    t = engine.newest_event_ts or 0.0
    reports = engine.detectors.evaluate(t)
    state["detectors"] = repr(([r.to_dict() for r in reports.drift], reports.runaway.to_dict(), reports.budget.to_dict()))
    return state
