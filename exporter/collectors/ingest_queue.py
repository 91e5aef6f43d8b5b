"""The ingest queue's fill and the requests it turned away (the queue itself is the HTTP
edge's: `web.ingest_queue`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class IngestQueue(Protocol):
    @property
    def used(self) -> int: ...

    throttled_total: int


class IngestQueueCollector(Collector):
    """The queue's fill and the requests it turned away."""

    def __init__(self, queue: IngestQueue) -> None:
        self.q = queue

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("llm_exporter_ingest_queue_bytes",
                                "Bytes of POST bodies waiting for or in ingest.", value=self.q.used)
        yield CounterMetricFamily("llm_exporter_ingest_throttled",
                                  "Ingest requests refused with HTTP 429 because the ingest queue was full.",
                                  value=self.q.throttled_total)
