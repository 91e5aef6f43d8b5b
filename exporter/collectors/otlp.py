"""The spans the OTLP receiver was sent, by what became of them (the counts themselves live
with the engine, `ingest.otlp.SpanCounts`, and persist with its store)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class SpanTotals(Protocol):
    total: dict[str, float]


class OtlpSpanCollector(Collector):
    """`llm_exporter_otlp_spans_total{result}`."""

    def __init__(self, spans: SpanTotals) -> None:
        self.spans = spans

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("llm_exporter_otlp_spans",
                                "Spans received at /v1/traces, by result: record (a GenAI model call, one usage record, "
                                "counted again in llm_exporter_records_total) or ignored (any other span).",
                                labels=["result"])
        for k, v in self.spans.total.items():
            c.add_metric([k], v)
        yield c
