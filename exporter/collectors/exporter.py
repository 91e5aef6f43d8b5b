"""The exporter's own metrics: build info, records by result, label overflow, store and
evaluation errors, the evaluation duration, and the health of each component."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..components import Components
from .usage import floatToGoString

RESULTS = ("accepted", "duplicate", "rejected")


class DurationHistogram:
    """Observed durations in fixed buckets, without prometheus-client's `_created` series
    (the metric contract has none, and turning them off is a process-wide switch)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.array([*bounds, np.inf])
        self.counts = np.zeros(self.bounds.size, dtype=np.int64)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[int(np.searchsorted(self.bounds, seconds, side="left"))] += 1
            self.sum += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.sum
        buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds.tolist(), cumulative)]
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


class _Errors(Protocol):
    errors_total: int


class ExporterState(Protocol):
    """What the collector reads from the engine (which keeps these values so they persist)."""

    results_total: dict[str, float]
    overflow_total: dict[str, float]
    last_record_wallclock: float
    evaluation_errors_total: float
    last_evaluation: float
    evaluation_duration: DurationHistogram
    components: Components

    @property
    def store(self) -> _Errors: ...


class ExporterCollector(Collector):
    """The exporter's own metrics; values live on the engine so they persist with it."""

    def __init__(self, engine: ExporterState) -> None:
        self.e = engine

    def collect(self) -> Iterator[Metric]:
        e = self.e
        info = GaugeMetricFamily("llm_exporter_build_info", "Build information; always 1.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        res = CounterMetricFamily("llm_exporter_records", "Records received, by result.", labels=["result"])
        for k in RESULTS:
            res.add_metric([k], e.results_total[k])
        yield res
        ovf = CounterMetricFamily("llm_exporter_label_overflow", "Records whose label value was mapped to 'other' by a label guard.", labels=["label"])
        for k, v in e.overflow_total.items():
            ovf.add_metric([k], v)
        yield ovf
        yield GaugeMetricFamily("llm_exporter_last_record_timestamp_seconds",
                                "Wall-clock time of the last accepted ingest (0 before any).", value=e.last_record_wallclock)
        yield CounterMetricFamily("llm_exporter_store_errors", "Failed store operations: batch writes (answered 503), "
                                  "checkpoints, pruning and reads.", value=e.store.errors_total)
        yield CounterMetricFamily("llm_exporter_evaluation_errors", "Evaluations that failed (the last good snapshot stays published).",
                                  value=e.evaluation_errors_total)
        yield GaugeMetricFamily("llm_exporter_last_evaluation_timestamp_seconds",
                                "Wall-clock time of the last successful evaluation.", value=e.last_evaluation)
        yield e.evaluation_duration.family("llm_exporter_evaluation_duration_seconds",
                                           "Time one evaluation of all signals takes.")
        errors = CounterMetricFamily("llm_exporter_component_errors",
                                     "Failures of one part of the exporter (its other parts go on), by component.",
                                     labels=["component"])
        last = GaugeMetricFamily("llm_exporter_component_last_success_timestamp_seconds",
                                 "Wall-clock time a component last ran without error (0: never).", labels=["component"])
        for name, n in e.components.errors.items():
            errors.add_metric([name], n)
            last.add_metric([name], e.components.last_success[name])
        yield errors
        yield last
