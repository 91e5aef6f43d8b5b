"""Sending records to more than one exporter: every replica of an HA pair, the shard of an app.

A small client on the standard library alone, for applications, integrations and
forwarders that post usage records:

    from exporter.client import Exporters
    exporters = Exporters([["http://exp-0a:9473", "http://exp-0b:9473"],     # shard 0, an HA pair
                           ["http://exp-1a:9473", "http://exp-1b:9473"]],    # shard 1
                          token="...")
    exporters.send(records)            # raises SendError naming what no replica took

Each record goes to the shard that owns its app (`sharding.shard_of`) and there to every
replica, so the replicas of a pair hold the same records. A record without a
`request_id` gets one first: a retry, or a replica that took a batch whose answer was
lost, then counts it once. Each replica is tried on its own, with retries after 429,
503 and connection errors (honouring `Retry-After`), so a replica that is down delays
nothing but its own copy. `send` returns what every replica answered and raises
`SendError` when a batch reached no replica of its shard (the records would be lost);
a batch that reached one replica of two is delivered, and the answer says which replica
missed it (`missed`), to be filled from its twin later (docs/runbook.md,
LLMExporterReplicaDown). A 4xx answer other than 429 is final: the batch is wrong, and
sending it again gets the same answer.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .sharding import shard_of

# the fields the exporter reads the app from, in the order it prefers them (ingest/records.py)
APP_FIELDS = ("app", "tenant", "team", "service")
RETRY_STATUS = (408, 429, 503)


def record_app(record: dict[str, Any]) -> Any:
    """The app a record will be labelled with, before the exporter's defaults: `app` when
    the record has that field, else the last of its aliases present (as the exporter maps
    them)."""
    if "app" in record:
        return record["app"]
    found = None
    for k in record:
        if k in APP_FIELDS[1:]:
            found = record[k]
    return found


class SendError(RuntimeError):
    """Records reached no replica of their shard; `result` has every answer."""

    def __init__(self, message: str, result: "SendResult") -> None:
        super().__init__(message)
        self.result = result


@dataclass
class SendResult:
    """What each exporter answered. `answers` maps URL to the JSON answer (or the error
    text); `missed` lists the URLs that did not take their batch; `lost` counts the
    records that no replica of their shard took."""

    answers: dict[str, Any] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    lost: int = 0


class Exporters:
    """The exporters of a deployment: a list of shards, each a list of replica base URLs."""

    def __init__(self, shards: Sequence[Sequence[str] | str], token: str | None = None, timeout: float = 30.0,
                 attempts: int = 4, backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> None:
        self.shards = [[shard] if isinstance(shard, str) else list(shard) for shard in shards]
        if not self.shards or not all(self.shards):
            raise ValueError("give at least one shard, each with at least one exporter URL")
        self.token, self.timeout, self.attempts, self.backoff, self.sleep = token, timeout, attempts, backoff, sleep

    def shard(self, app: Any) -> int:
        return shard_of(app, len(self.shards))

    def split(self, records: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The records of each shard, with a request_id given to those that lack one."""
        out: list[list[dict[str, Any]]] = [[] for _ in self.shards]
        for r in records:
            if r.get("request_id") in (None, ""):
                r = {**r, "request_id": uuid.uuid4().hex}
            out[self.shard(record_app(r))].append(r)
        return out

    def send(self, records: Iterable[dict[str, Any]]) -> SendResult:
        result = SendResult()
        for replicas, batch in zip(self.shards, self.split(records)):
            if not batch:
                continue
            body = json.dumps(batch).encode()
            took = 0
            for url in replicas:
                ok, answer = self._post(url, body)
                result.answers[url] = answer
                if ok:
                    took += 1
                else:
                    result.missed.append(url)
            if not took:
                result.lost += len(batch)
        if result.lost:
            raise SendError(f"{result.lost} records reached no replica of their shard: "
                            + "; ".join(f"{u}: {result.answers[u]}" for u in result.missed), result)
        return result

    def _post(self, base: str, body: bytes) -> tuple[bool, Any]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Any = None
        for attempt in range(self.attempts):
            req = urllib.request.Request(base.rstrip("/") + "/v1/records", data=body, method="POST", headers=headers)
            wait = self.backoff * 2 ** attempt
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return True, json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:500].decode(errors='replace')}"
                if e.code not in RETRY_STATUS:
                    return False, last
                try:
                    wait = max(wait, float(e.headers.get("Retry-After") or 0))
                except ValueError:
                    pass
            except (urllib.error.URLError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt + 1 < self.attempts:
                self.sleep(wait)
        return False, last
