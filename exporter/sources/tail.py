"""Follow growing JSONL files like `tail -f`, resuming at the stored offset after a restart.

The offset is committed in the same transaction as the records it covers, so a crash
never skips lines nor counts them twice. A file that shrinks (truncated or rotated in
place) is read again from the start; a new inode at the same path likewise.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import orjson

from ..engine import Engine
from ..ingest.bodies import decode_ndjson
from ..storage.store import StoreError

log = logging.getLogger("llm_usage_exporter")
MAX_READ = 4 * 1024 * 1024


class TailFollower:
    """Reads complete new lines of one file and ingests them."""

    def __init__(self, engine: Engine, path: Path, poll: float = 0.5) -> None:
        self.engine = engine
        self.path = Path(path).resolve()
        self.poll = poll
        self.key = f"tail:{self.path}"
        saved = engine.store.get_meta(self.key)
        self.inode: int | None
        self.offset: int
        self.inode, self.offset = (orjson.loads(saved) if saved else (None, 0))
        self.rejected_total = 0

    def step(self) -> int:
        """Ingest what is new; returns the number of lines read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0
        if st.st_size == self.offset:
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(MAX_READ)
        end = data.rfind(b"\n")
        if end < 0:
            return 0
        chunk = data[: end + 1]
        decoded = decode_ndjson(chunk, self.engine.settings.max_errors_listed)
        records = len(decoded.items) + decoded.rejections.total
        new_offset = self.offset + len(chunk)
        meta = {self.key: orjson.dumps([self.inode, new_offset]).decode()}
        result = self.engine.ingest(decoded.items, meta=meta, indices=decoded.indices, rejections=decoded.rejections)
        self.offset = new_offset
        for r in result.rejected:
            log.warning("%s: line record %d rejected: %s: %s", self.path, r.index, r.field, r.reason)
        if result.rejections.omitted:
            log.warning("%s: %d more records rejected in this read", self.path, result.rejections.omitted)
        self.rejected_total += result.rejected_total
        return records

    def run(self, stop: threading.Event) -> None:
        """Follow until `stop`. A store that cannot take the lines now is retried at the next
        poll; any other error (a file that became unreadable) ends this run, and the server's
        background restarts it after a pause (`web.background`), counting it under `tail`."""
        components = self.engine.components
        while not stop.is_set():
            try:
                busy = self.step()
            except StoreError:
                log.exception("tail %s: store write failed; retrying", self.path)
                components.failed("tail")
                busy = 0
            else:
                components.succeeded("tail")
            if not busy:
                stop.wait(self.poll)
