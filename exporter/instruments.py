"""The usage counters and histograms, kept as numpy arrays and exposed by a custom collector.

prometheus-client's own Counter and Histogram take a lock and walk Python objects per
observation; a batch of a thousand records would cost thousands of calls. Here a batch is
folded into arrays with `np.add.at`, and each touched series' totals are serialised for
the store so the counters resume after a restart instead of dropping to zero.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .records import ERROR_TYPES, TOKEN_TYPES, RecordColumns

INF = math.inf
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "llm_request_duration_seconds": ("End-to-end duration of LLM requests.",
                                     (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, INF)),
    "llm_time_to_first_token_seconds": ("Time to first token of streamed LLM requests.",
                                        (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, INF)),
    "llm_output_tokens_per_second": ("Output tokens per second of generation time (after the first token).",
                                     (1, 5, 10, 20, 30, 45, 60, 80, 100, 150, 200, 300, INF)),
}
SERIES_LABELS = ("app", "provider", "model")


class UsageMetrics(Collector):
    """Counters and histograms per (app, provider, model) series, indexed by store series id."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.lock = lock or threading.Lock()     # held by writers and, briefly, by readers taking a copy
        self.keys: list[tuple[str, str, str]] = []
        self._label_text: list[str] = []
        self.sids: list[int] = []
        self._row: dict[int, int] = {}
        self._cap = 0
        self.requests = np.zeros(0)
        self.errors = np.zeros((0, len(ERROR_TYPES)))
        self.tokens = np.zeros((0, len(TOKEN_TYPES)))
        self.cost = np.zeros(0)
        self.unpriced = np.zeros(0)
        self.hist = {n: np.zeros((0, len(b))) for n, (_, b) in HISTOGRAMS.items()}
        self.hist_sum = {n: np.zeros(0) for n in HISTOGRAMS}
        self._grow(64)

    def _grow(self, cap: int) -> None:
        def g(a: np.ndarray) -> np.ndarray:
            out = np.zeros((cap,) + a.shape[1:])
            out[: a.shape[0]] = a
            return out
        self.requests, self.errors, self.tokens = g(self.requests), g(self.errors), g(self.tokens)
        self.cost, self.unpriced = g(self.cost), g(self.unpriced)
        self.hist = {n: g(a) for n, a in self.hist.items()}
        self.hist_sum = {n: g(a) for n, a in self.hist_sum.items()}
        self._cap = cap

    def rows(self, series_ids: list[int], keys: list[tuple[str, str, str]]) -> np.ndarray:
        """Row index per series id, adding rows for new series."""
        out = np.empty(len(series_ids), dtype=np.int64)
        for i, (sid, key) in enumerate(zip(series_ids, keys)):
            r = self._row.get(sid)
            if r is None:
                r = len(self.keys)
                if r >= self._cap:
                    self._grow(self._cap * 2)
                self._row[sid] = r
                self.keys.append(key)
                self.sids.append(sid)
                self._label_text.append(f'app="{_esc(key[0])}",model="{_esc(key[2])}",provider="{_esc(key[1])}"')
            out[i] = r
        return out

    def add(self, row: np.ndarray, cols: RecordColumns, cost: np.ndarray) -> None:
        """Fold a batch in; `row` is each record's row (from `rows`)."""
        np.add.at(self.requests, row, 1.0)
        if cols.is_error.any():
            et = np.array([ERROR_TYPES.index(e) if e in ERROR_TYPES else len(ERROR_TYPES) - 1
                           for e in cols.error_type[cols.is_error]], dtype=np.int64)
            np.add.at(self.errors, (row[cols.is_error], et), 1.0)
        tok = np.stack([cols.input_tokens, cols.output_tokens, cols.cache_read_tokens,
                        cols.cache_write_tokens, cols.reasoning_tokens], axis=1)
        np.add.at(self.tokens, row, tok)
        priced = ~np.isnan(cost)
        np.add.at(self.cost, row[priced], cost[priced])
        np.add.at(self.unpriced, row[~priced], 1.0)
        for name, values in (("llm_request_duration_seconds", cols.latency),
                             ("llm_time_to_first_token_seconds", cols.ttft),
                             ("llm_output_tokens_per_second", cols.output_tokens_per_second)):
            ok = ~np.isnan(values)
            if not ok.any():
                continue
            bounds = np.array(HISTOGRAMS[name][1])
            b = np.searchsorted(bounds, values[ok], side="left")
            np.add.at(self.hist[name], (row[ok], b), 1.0)
            np.add.at(self.hist_sum[name], row[ok], values[ok])

    # --- persistence -------------------------------------------------------------------

    def dump(self, r: int) -> bytes:
        """One series' totals as bytes, for the store."""
        parts = [self.requests[r:r + 1], self.errors[r], self.tokens[r], self.cost[r:r + 1], self.unpriced[r:r + 1]]
        for n in HISTOGRAMS:
            parts += [self.hist[n][r], self.hist_sum[n][r:r + 1]]
        return np.concatenate(parts).astype(np.float64).tobytes()

    def load(self, sid: int, key: tuple[str, str, str], blob: bytes) -> None:
        r = int(self.rows([sid], [key])[0])
        v = np.frombuffer(blob, dtype=np.float64)
        i = 0

        def take(n: int) -> np.ndarray:
            nonlocal i
            out = v[i:i + n]
            i += n
            return out
        self.requests[r] = take(1)[0]
        self.errors[r] = take(len(ERROR_TYPES))
        self.tokens[r] = take(len(TOKEN_TYPES))
        self.cost[r] = take(1)[0]
        self.unpriced[r] = take(1)[0]
        for n, (_, bounds) in HISTOGRAMS.items():
            self.hist[n][r] = take(len(bounds))
            self.hist_sum[n][r] = take(1)[0]

    def row_of(self, sid: int) -> int | None:
        return self._row.get(sid)

    # --- exposition -------------------------------------------------------------------

    def frozen(self) -> "Frozen":
        """A copy of everything a scrape reads, taken under the lock in microseconds, so
        formatting (seconds at tens of thousands of series) never blocks ingest."""
        with self.lock:
            n = len(self.keys)
            return Frozen(list(self.keys), list(self._label_text), self.requests[:n].copy(), self.errors[:n].copy(),
                          self.tokens[:n].copy(), self.cost[:n].copy(), self.unpriced[:n].copy(),
                          {k: v[:n].copy() for k, v in self.hist.items()}, {k: v[:n].copy() for k, v in self.hist_sum.items()})

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what a registry asks for when the collector is
        registered. Without it the registry calls `collect`, which at ten thousand series
        builds half a million sample objects (about 150 MB for two seconds) just to learn
        seven names."""
        yield CounterMetricFamily("llm_requests", HELP["llm_requests"], labels=SERIES_LABELS)
        yield CounterMetricFamily("llm_request_errors", HELP["llm_request_errors"], labels=SERIES_LABELS + ("error_type",))
        yield CounterMetricFamily("llm_tokens", HELP["llm_tokens"], labels=SERIES_LABELS + ("token_type",))
        yield CounterMetricFamily("llm_cost_usd", HELP["llm_cost_usd"], labels=SERIES_LABELS)
        yield CounterMetricFamily("llm_unpriced_requests", HELP["llm_unpriced_requests"], labels=SERIES_LABELS)
        for name, (doc, _) in HISTOGRAMS.items():
            yield HistogramMetricFamily(name, doc, labels=SERIES_LABELS)

    def collect(self) -> Iterator[Metric]:
        """The families as prometheus-client objects (registry reads, tests). `/metrics`
        uses `render`, which writes the same text directly."""
        f = self.frozen()
        n = len(f.keys)
        keys = [list(k) for k in f.keys]
        req = CounterMetricFamily("llm_requests", HELP["llm_requests"], labels=SERIES_LABELS)
        cost = CounterMetricFamily("llm_cost_usd", HELP["llm_cost_usd"], labels=SERIES_LABELS)
        unp = CounterMetricFamily("llm_unpriced_requests", HELP["llm_unpriced_requests"], labels=SERIES_LABELS)
        err = CounterMetricFamily("llm_request_errors", HELP["llm_request_errors"], labels=SERIES_LABELS + ("error_type",))
        tok = CounterMetricFamily("llm_tokens", HELP["llm_tokens"], labels=SERIES_LABELS + ("token_type",))
        for r in range(n):
            req.add_metric(keys[r], f.requests[r])
            cost.add_metric(keys[r], f.cost[r])
            unp.add_metric(keys[r], f.unpriced[r])
            for j, et in enumerate(ERROR_TYPES):
                if f.errors[r, j]:
                    err.add_metric(keys[r] + [et], f.errors[r, j])
            for j, tt in enumerate(TOKEN_TYPES):
                if f.tokens[r, j]:
                    tok.add_metric(keys[r] + [tt], f.tokens[r, j])
        yield from (req, err, tok, cost, unp)
        for name, (doc, bounds) in HISTOGRAMS.items():
            fam = HistogramMetricFamily(name, doc, labels=SERIES_LABELS)
            counts = np.cumsum(f.hist[name], axis=1)
            les = [_le(b) for b in bounds]
            for r in range(n):
                if counts[r, -1] == 0:
                    continue
                fam.add_metric(keys[r], list(zip(les, counts[r].tolist())), f.hist_sum[name][r])
            yield fam

    def render(self) -> str:
        """The exposition text of these families, as prometheus-client would write it."""
        f = self.frozen()
        lab = f.labels
        out: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            out.append(f"# HELP {name} {_esc_help(doc)}\n# TYPE {name} {kind}\n")

        def plain(name: str, values: np.ndarray, rows: np.ndarray | None = None, extra: str = "") -> None:
            idx = range(len(lab)) if rows is None else rows.tolist()
            out.extend(f"{name}{{{_with(lab[r], extra)}}} {floatToGoString(v)}\n"
                       for r, v in zip(idx, values.tolist()))

        family("llm_requests_total", "counter", HELP["llm_requests"])
        plain("llm_requests_total", f.requests)
        family("llm_request_errors_total", "counter", HELP["llm_request_errors"])
        rows, cols = np.nonzero(f.errors)
        out.extend(f"llm_request_errors_total{{{_with(lab[r], ERROR_LABELS[c])}}} {floatToGoString(v)}\n"
                   for r, c, v in zip(rows.tolist(), cols.tolist(), f.errors[rows, cols].tolist()))
        family("llm_tokens_total", "counter", HELP["llm_tokens"])
        rows, cols = np.nonzero(f.tokens)
        out.extend(f"llm_tokens_total{{{lab[r]},{TOKEN_LABELS[c]}}} {floatToGoString(v)}\n"
                   for r, c, v in zip(rows.tolist(), cols.tolist(), f.tokens[rows, cols].tolist()))
        family("llm_cost_usd_total", "counter", HELP["llm_cost_usd"])
        plain("llm_cost_usd_total", f.cost)
        family("llm_unpriced_requests_total", "counter", HELP["llm_unpriced_requests"])
        plain("llm_unpriced_requests_total", f.unpriced)
        for name, (doc, bounds) in HISTOGRAMS.items():
            family(name, "histogram", doc)
            counts = np.cumsum(f.hist[name], axis=1)
            le_labels = [f'le="{_le(b)}"' for b in bounds]
            for r in np.flatnonzero(counts[:, -1]).tolist():
                head, tail = _split_le(lab[r])
                c = counts[r].tolist()
                out.extend(f"{name}_bucket{{{head}{le},{tail}}} {floatToGoString(v)}\n" for le, v in zip(le_labels, c))
                out.append(f"{name}_count{{{lab[r]}}} {floatToGoString(c[-1])}\n"
                           f"{name}_sum{{{lab[r]}}} {floatToGoString(f.hist_sum[name][r])}\n")
        return "".join(out)


@dataclass(slots=True)
class Frozen:
    keys: list[tuple[str, str, str]]
    labels: list[str]
    requests: np.ndarray
    errors: np.ndarray
    tokens: np.ndarray
    cost: np.ndarray
    unpriced: np.ndarray
    hist: dict[str, np.ndarray]
    hist_sum: dict[str, np.ndarray]


ERROR_LABELS = [f'error_type="{e}"' for e in ERROR_TYPES]
TOKEN_LABELS = [f'token_type="{t}"' for t in TOKEN_TYPES]
HELP = {
    "llm_requests": "LLM requests.",
    "llm_cost_usd": "Cost of LLM requests in US dollars (priced requests only).",
    "llm_unpriced_requests": "Requests whose cost is unknown: no cost in the record and no price for the model.",
    "llm_request_errors": "Failed LLM requests by error type.",
    "llm_tokens": "Tokens processed, by token type.",
}


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _esc_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _with(labels: str, extra: str) -> str:
    """Insert `extra` (error_type=...) in sorted label order: after app, before model."""
    if not extra:
        return labels
    head, tail = _split_le(labels)
    return f"{head}{extra},{tail}"


def _split_le(labels: str) -> tuple[str, str]:
    """Split the series labels where a label sorting between app and model goes (error_type, le)."""
    cut = labels.index(",model=")
    return labels[: cut + 1], labels[cut + 1:]


def _le(b: float) -> str:
    return "+Inf" if b == INF else repr(float(b))
