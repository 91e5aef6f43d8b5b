"""The usage counters and histograms, kept as numpy arrays and exposed by a custom collector.

prometheus-client's own Counter and Histogram take a lock and walk Python objects per
observation; a batch of a thousand records would cost thousands of calls. Here a batch is
folded into arrays with `np.add.at`, and each touched series' totals are serialised for
the store so the counters resume after a restart instead of dropping to zero.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _float_to_go_string

from ..ingest.records import ERROR_TYPES, TOKEN_FIELDS, TOKEN_TYPES, RecordColumns

INF = math.inf
floatToGoString: Callable[[float], str] = _float_to_go_string     # the library's sample format (untyped there)
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "llm_request_duration_seconds": ("End-to-end duration of LLM requests.",
                                     (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, INF)),
    "llm_time_to_first_token_seconds": ("Time to first token of streamed LLM requests.",
                                        (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, INF)),
    "llm_output_tokens_per_second": ("Output tokens per second of generation time (after the first token) "
                                     "of streamed LLM requests.",
                                     (1, 5, 10, 20, 30, 45, 60, 80, 100, 150, 200, 300, INF)),
}
SERIES_LABELS = ("app", "provider", "model")


def _layout() -> tuple[dict[str, slice], int]:
    """Column ranges of one series' row in the counters table, in the order its totals are
    stored: requests, errors by type, tokens by type, cost, unpriced, then each histogram's
    buckets and sum."""
    parts = [("requests", 1), ("errors", len(ERROR_TYPES)), ("tokens", len(TOKEN_TYPES)), ("cost", 1), ("unpriced", 1)]
    for name, (_, bounds) in HISTOGRAMS.items():
        parts += [(name, len(bounds)), (name + "_sum", 1)]
    out, at = {}, 0
    for key, width in parts:
        out[key] = slice(at, at + width)
        at += width
    return out, at


COLUMNS, WIDTH = _layout()
_REQ, _COST, _UNPRICED = COLUMNS["requests"].start, COLUMNS["cost"].start, COLUMNS["unpriced"].start


class UsageMetrics(Collector):
    """Counters and histograms per (app, provider, model) series, indexed by store series id.

    Everything of one series is one row of `table` (WIDTH floats, laid out by COLUMNS), so a
    batch is a small matrix of additions (`delta`) over the series it touches: its new
    totals are written to the store before anything here changes (`totals`), and only a
    committed batch is added (`apply`)."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.lock = lock or threading.Lock()     # held by writers and, briefly, by readers taking a copy
        self.keys: list[tuple[str, str, str]] = []
        self._label_text: list[str] = []
        self.sids: list[int] = []
        self._row: dict[int, int] = {}
        self.table = np.zeros((64, WIDTH))

    # Column views of the table (they follow it when it grows).
    @property
    def requests(self) -> np.ndarray:
        return self.table[:, _REQ]

    @property
    def errors(self) -> np.ndarray:
        return self.table[:, COLUMNS["errors"]]

    @property
    def tokens(self) -> np.ndarray:
        return self.table[:, COLUMNS["tokens"]]

    @property
    def cost(self) -> np.ndarray:
        return self.table[:, _COST]

    @property
    def unpriced(self) -> np.ndarray:
        return self.table[:, _UNPRICED]

    def rows(self, series_ids: list[int], keys: list[tuple[str, str, str]]) -> np.ndarray:
        """Row index per series id, adding rows for new series."""
        out = np.empty(len(series_ids), dtype=np.int64)
        for i, (sid, key) in enumerate(zip(series_ids, keys)):
            r = self._row.get(sid)
            if r is None:
                r = len(self.keys)
                if r >= self.table.shape[0]:
                    grown = np.zeros((self.table.shape[0] * 2, WIDTH))
                    grown[:r] = self.table[:r]
                    self.table = grown
                self._row[sid] = r
                self.keys.append(key)
                self.sids.append(sid)
                self._label_text.append(f'app="{_esc(key[0])}",model="{_esc(key[2])}",provider="{_esc(key[1])}"')
            out[i] = r
        return out

    @staticmethod
    def delta(series: np.ndarray, k: int, cols: RecordColumns, cost: np.ndarray) -> np.ndarray:
        """A batch's additions as a (k, WIDTH) matrix: `series[i]` in [0, k) is the row of
        record i. Pure: nothing here changes."""
        d = np.zeros((k, WIDTH))
        d[:, _REQ] = np.bincount(series, minlength=k)
        if cols.is_error.any():
            et = np.array([ERROR_TYPES.index(e) if e in ERROR_TYPES else len(ERROR_TYPES) - 1
                           for e in cols.error_type[cols.is_error]], dtype=np.int64)
            d[:, COLUMNS["errors"]] = np.bincount(series[cols.is_error] * len(ERROR_TYPES) + et,
                                                  minlength=k * len(ERROR_TYPES)).reshape(k, len(ERROR_TYPES))
        tok = COLUMNS["tokens"].start
        for j, values in enumerate(getattr(cols, f) for f in TOKEN_FIELDS):
            if values.any():
                d[:, tok + j] = np.bincount(series, weights=values, minlength=k)
        priced = ~np.isnan(cost)
        d[:, _COST] = np.bincount(series[priced], weights=cost[priced], minlength=k)
        d[:, _UNPRICED] = np.bincount(series[~priced], minlength=k)
        for name, values in (("llm_request_duration_seconds", cols.latency),
                             ("llm_time_to_first_token_seconds", cols.ttft),
                             ("llm_output_tokens_per_second", cols.output_tokens_per_second)):
            ok = ~np.isnan(values)
            if not ok.any():
                continue
            bounds = np.array(HISTOGRAMS[name][1])
            nb = len(bounds)
            b = np.searchsorted(bounds, values[ok], side="left")
            d[:, COLUMNS[name]] = np.bincount(series[ok] * nb + b, minlength=k * nb).reshape(k, nb)
            d[:, COLUMNS[name + "_sum"].start] = np.bincount(series[ok], weights=values[ok], minlength=k)
        return d

    def totals(self, series_ids: list[int], delta: np.ndarray) -> dict[int, bytes]:
        """Each series' totals after `delta`, as the store keeps them; nothing here changes."""
        out = {}
        for j, sid in enumerate(series_ids):
            r = self._row.get(sid)
            row = delta[j] if r is None else self.table[r] + delta[j]
            out[sid] = row.tobytes()
        return out

    def apply(self, series_ids: list[int], keys: list[tuple[str, str, str]], delta: np.ndarray) -> None:
        """Add a committed batch (hold `lock`)."""
        rows = self.rows(series_ids, keys)
        self.table[rows] += delta                   # the series of one delta are distinct

    # --- persistence -------------------------------------------------------------------

    def load(self, sid: int, key: tuple[str, str, str], blob: bytes) -> None:
        r = int(self.rows([sid], [key])[0])
        v = np.frombuffer(blob, dtype=np.float64)
        if v.size != WIDTH:
            raise ValueError(f"stored totals of series {sid} hold {v.size} values, not {WIDTH}")
        self.table[r] = v

    # --- exposition -------------------------------------------------------------------

    def frozen(self) -> "Frozen":
        """A copy of everything a scrape reads, taken under the lock in microseconds, so
        formatting (seconds at tens of thousands of series) never blocks ingest."""
        with self.lock:
            n = len(self.keys)
            t = self.table[:n].copy()
            keys, labels = list(self.keys), list(self._label_text)
        return Frozen(keys, labels, t[:, _REQ], t[:, COLUMNS["errors"]], t[:, COLUMNS["tokens"]], t[:, _COST],
                      t[:, _UNPRICED], {k: t[:, COLUMNS[k]] for k in HISTOGRAMS},
                      {k: t[:, COLUMNS[k + "_sum"].start] for k in HISTOGRAMS})

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

    def render(self, openmetrics: bool = False) -> str:
        """The exposition text of these families, as prometheus-client would write it: the
        classic text format, or OpenMetrics (without the closing `# EOF`, which belongs at
        the end of the whole scrape). The two differ only in the family lines: OpenMetrics
        names a counter family without its `_total` and escapes quotes in the help text."""
        f = self.frozen()
        lab = f.labels
        out: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            if openmetrics:
                name = name.removesuffix("_total") if kind == "counter" else name
                doc = _esc_help(doc).replace('"', '\\"')
            else:
                doc = _esc_help(doc)
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")

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
