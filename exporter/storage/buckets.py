"""Time buckets: a batch of records folded into per-(series, minute) sums and sketches.

Every consumer downstream (the SQLite buckets at minute and hour resolution, the
evaluator's scope history) is fed from these groups rather than from the records, so the
per-record work is done once, vectorised, and everything after it scales with the number
of distinct (series, minute) pairs in a batch instead of the number of records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import sketch
from ..codes import is_none
from ..ingest.dedupe import hash_ids
from ..ingest.records import TOKEN_FIELDS, RecordColumns

__all__ = ["Bins", "F", "FIELDS", "SESSION_BUCKETS", "SESSION_FIELDS", "SKETCHES", "TOKEN_FIELDS", "Groups", "StoredRows", "aggregate", "merge", "sparse", "widen_adds"]
# The sums kept per bucket, in this order in the stored `adds` blob (the order is the file format).
# The last six describe request size: over successful requests that used tokens (that
# cost something), their count and the sum and sum of squares of log(total tokens) (of
# log(cost)). A window's mean log size is the anomaly evaluator's least noisy view of
# "each request got bigger" (a prompt change, a context that keeps growing, a switch to a
# pricier model), which sums of tokens or cost hide under the request count's burstiness.
# Buckets written before these fields existed read them as 0.
FIELDS: tuple[str, ...] = ("requests", "errors", *TOKEN_FIELDS, "cost", "unpriced", "empty_outputs",
                           "sized_requests", "log_tokens", "log_tokens_sq", "costed_requests", "log_cost", "log_cost_sq")
F = {name: i for i, name in enumerate(FIELDS)}
# Quantile sketches per group: request duration (s), time to first token (s), output tokens
# per second of generation, and milliseconds per output token of requests without a TTFT
# (`RecordColumns.ms_per_output_token`). Rows written before a kind existed read it empty.
SKETCHES: tuple[str, ...] = ("latency", "ttft", "otps", "tpot")
# Requests of one session share a model and a prompt, so they are not independent evidence
# of a change in request size or spend. Each group's request count, size sums and totals
# are also kept split by a hash of the session id into a few buckets (the requests of one session always share a bucket), so
# that the evaluator can ask whether a window's rise survives leaving out any one of them.
# Requests without a session id are in no bucket.
SESSION_BUCKETS = 8
SESSION_FIELDS: tuple[str, ...] = ("requests", "sized_requests", "log_tokens", "costed_requests", "log_cost", "cost", "tokens")


Bins = list[tuple[np.ndarray, np.ndarray, np.ndarray]]

# Latency bins, in seconds: [0, 1), [1, 2), [2, 4), ... [2**13, 2**14). A batch counts its
# requests per bin and group, from which the evaluator learns how long a slot's requests
# take to end and reach it (`anomaly.arrival`).
LAG_EDGES = np.concatenate([[0.0], 2.0 ** np.arange(0, 15)])
N_LAG_BINS = LAG_EDGES.size - 1
# The counts keep successes and failures apart (the successes' bins, then the failures'):
# a failure often comes back at once while a success takes the model's full latency, so
# the newest minutes hold more than their share of failures.
LAG_CELLS = 2 * N_LAG_BINS


def lag_bins(latency: np.ndarray) -> np.ndarray:
    """Each request's latency bin; -1 for a latency past the last edge (such a request has
    left every window before it ends). A record without a latency is taken to end at once."""
    lag = np.nan_to_num(np.maximum(np.asarray(latency, dtype=np.float64), 0.0), nan=0.0)
    b = np.searchsorted(LAG_EDGES, lag, side="right") - 1
    out: np.ndarray = np.where(b < N_LAG_BINS, b, -1).astype(np.int64)
    return out


@dataclass(slots=True)
class Groups:
    """Sums per group. `series` and `start` identify each group; `adds` is (G, len(FIELDS)).

    Sketches come dense (`sketches`, kind -> (G, NBINS), from a batch of records) or sparse
    (`bins`, per kind in SKETCHES order: (group, bin, count) of the non-empty bins, from
    stored rows), so that reading a large store never materialises dense sketches.
    """

    series: np.ndarray
    start: np.ndarray
    adds: np.ndarray
    sketches: dict[str, np.ndarray] | None
    bins: Bins | None = None
    sessions: np.ndarray | None = None   # (G, SESSION_BUCKETS, len(SESSION_FIELDS)), from a batch of records only
    # per kind in SKETCHES order: (group x SESSION_BUCKETS + bucket, bin, count) of the
    # records that name a session, from a batch of records only
    session_bins: Bins | None = None
    # (G, LAG_CELLS) records per arrival-lag bin, successes then failures, from a batch of records only
    lags: np.ndarray | None = None

    def nonzero_bins(self) -> Bins:
        if self.bins is None:
            out = []
            for kind in SKETCHES:
                sk = self.sketches[kind]  # type: ignore[index]
                g, b = np.nonzero(sk)
                out.append((g, b, sk[g, b]))
            self.bins = out
        return self.bins

    def __len__(self) -> int:
        return int(self.series.shape[0])

    def coarsen(self, res: int) -> "Groups":
        """Regroup to a coarser resolution (e.g. minutes into hours) by summing."""
        return merge([Groups(self.series, (self.start // res) * res, self.adds, None, self.nonzero_bins())])


def record_values(cols: RecordColumns, cost: np.ndarray) -> np.ndarray:
    """Per-record addends in FIELDS order; unknown cost adds 0 and counts as unpriced."""
    n = len(cols)
    out = np.empty((n, len(FIELDS)), dtype=np.float64)
    out[:, F["requests"]] = 1.0
    out[:, F["errors"]] = cols.is_error
    for name in TOKEN_FIELDS:
        out[:, F[name]] = getattr(cols, name)
    unpriced = np.isnan(cost)
    out[:, F["cost"]] = np.where(unpriced, 0.0, cost)
    out[:, F["unpriced"]] = unpriced
    out[:, F["empty_outputs"]] = (cols.output_tokens == 0) & ~cols.is_error
    total = cols.total_tokens.astype(np.float64)
    sized = (total > 0) & ~cols.is_error
    log_size = np.log(np.where(sized, total, 1.0))
    out[:, F["sized_requests"]] = sized
    out[:, F["log_tokens"]] = log_size
    out[:, F["log_tokens_sq"]] = log_size * log_size
    costed = (out[:, F["cost"]] > 0) & ~cols.is_error
    log_cost = np.log(np.where(costed, out[:, F["cost"]], 1.0))
    out[:, F["costed_requests"]] = costed
    out[:, F["log_cost"]] = log_cost
    out[:, F["log_cost_sq"]] = log_cost * log_cost
    return out


def widen_adds(adds: np.ndarray) -> np.ndarray:
    """Stored sums of an older, shorter FIELDS (n, k <= len(FIELDS)) padded with zeros."""
    if adds.shape[-1] == len(FIELDS):
        return adds
    out = np.zeros(adds.shape[:-1] + (len(FIELDS),))
    out[..., : adds.shape[-1]] = adds
    return out


def aggregate(cols: RecordColumns, series: np.ndarray, cost: np.ndarray, res: int = 60,
              sessions: bool = False) -> Groups:
    """Fold records into (series, bucket start) groups at resolution `res` seconds, with
    sparse sketches (a batch fills a few bins of each group's sketch) and, if asked (a
    batch of records), the size sums and timing samples split by session bucket and the
    records per arrival-lag bin (`arrival`)."""
    start = (np.floor(cols.ts / res) * res).astype(np.int64)
    uniq, inverse, order, first = _group(series.astype(np.int64), start)
    values = record_values(cols, cost)
    adds = np.add.reduceat(values[order], first, axis=0)
    idx = [sketch.bin_index(v) for v in (cols.latency, cols.ttft, cols.output_tokens_per_second, cols.ms_per_output_token)]
    bins = [_sketch_bins(i, inverse) for i in idx]
    if not sessions:
        return Groups(uniq >> 32, uniq & 0xFFFFFFFF, adds, None, bins)
    lags = _lag_counts(inverse, lag_cells(cols.latency, cols.is_error), len(uniq))
    bucket = session_buckets(cols)
    named = bucket >= 0
    cell = inverse * SESSION_BUCKETS + bucket
    split = _session_sums(values, inverse, bucket, len(uniq))
    return Groups(uniq >> 32, uniq & 0xFFFFFFFF, adds, None, bins, split,
                  [_sketch_bins(i[named], cell[named]) for i in idx], lags)


def lag_cells(latency: np.ndarray, is_error: np.ndarray) -> np.ndarray:
    """Each request's cell of the lag counts (`LAG_CELLS`): its latency bin, among the
    failures' bins if it failed; -1 past the last edge."""
    b = lag_bins(latency)
    out: np.ndarray = np.where(b >= 0, b + N_LAG_BINS * np.asarray(is_error, dtype=np.int64), -1)
    return out


def _lag_counts(group: np.ndarray, lag_cell: np.ndarray, n_groups: int) -> np.ndarray:
    """(G, LAG_CELLS) records per group and arrival-lag cell."""
    binned = lag_cell >= 0
    cells = np.bincount(group[binned] * LAG_CELLS + lag_cell[binned], minlength=n_groups * LAG_CELLS)
    return cells.reshape(n_groups, LAG_CELLS).astype(np.float64)


def session_buckets(cols: RecordColumns) -> np.ndarray:
    """Each record's session bucket, a stable hash of its session id, or -1 for a record
    without one: such requests are taken as independent, and left in every reading."""
    out = np.full(len(cols), -1, dtype=np.int64)
    named = np.flatnonzero(~is_none(cols.session_id))
    if named.size:
        first: dict[str, int] = {}                          # a batch holds few sessions: hash each once
        code = np.fromiter((first.setdefault(str(v), len(first)) for v in cols.session_id[named].tolist()),
                           dtype=np.int64, count=named.size)
        out[named] = (hash_ids(list(first)) % SESSION_BUCKETS)[code]
    return out


def _session_sums(values: np.ndarray, group: np.ndarray, bucket: np.ndarray, n_groups: int) -> np.ndarray:
    """(G, SESSION_BUCKETS, len(SESSION_FIELDS)) sums per group and bucket."""
    known = bucket >= 0
    cell = group[known] * SESSION_BUCKETS + bucket[known]
    size = n_groups * SESSION_BUCKETS
    tokens = values[known][:, [F[name] for name in TOKEN_FIELDS]].sum(axis=1)
    cols = [np.bincount(cell, weights=tokens if name == "tokens" else values[known, F[name]], minlength=size)
            for name in SESSION_FIELDS]
    return np.stack(cols, axis=-1).reshape(n_groups, SESSION_BUCKETS, len(SESSION_FIELDS))


def _group(series: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by (series, start): the distinct keys (series << 32 | start, sorted), each
    row's group, the rows in group order, and where each group begins in that order.
    Sorting one int64 key is several times cheaper than np.unique over rows of two."""
    key = (series << 32) | start
    order = np.argsort(key, kind="stable")
    k = key[order]
    new = np.empty(k.shape[0], dtype=bool)
    new[:1] = True
    np.not_equal(k[1:], k[:-1], out=new[1:])
    first = np.flatnonzero(new)
    inverse = np.empty(k.shape[0], dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return k[first], inverse, order, first


def _sketch_bins(idx: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group, bin, count) of the non-empty sketch bins of each group, from each value's
    bin (`sketch.bin_index`, -1 for none)."""
    keep = idx >= 0
    flat, counts = np.unique(group[keep] * sketch.NBINS + idx[keep], return_counts=True)
    return flat // sketch.NBINS, flat % sketch.NBINS, counts.astype(np.int64)


@dataclass(slots=True)
class StoredRows:
    """Bucket rows as read from the store, column by column, sketches still encoded.

    Each page of rows (a thousand or so) is turned into columns as soon as it is fetched,
    while its Python objects are still in cache: with tens of thousands of rows per fetch
    the same work costs several times more. Pages are then joined and decoded into Groups
    once per chunk (`groups`). The (bin, count) pairs stay plain bytes until then, because
    numpy concatenates a structured dtype field by field."""

    start: np.ndarray           # (n,) int64
    series: np.ndarray          # (n,) int64
    adds: np.ndarray            # (n, len(FIELDS)) float64
    lengths: list[np.ndarray]   # per kind in SKETCHES order: (n,) pairs in each row's sketch
    pairs: list[np.ndarray]     # per kind: the rows' encoded (bin, count) pairs one after another, as bytes (uint8)

    @classmethod
    def from_rows(cls, start: int, rows: Sequence[tuple[int, bytes, bytes, bytes, bytes]]) -> "StoredRows":
        """Rows of (series, adds, *encoded sketches) (b"" for no sketch) of bucket `start`:
        one transpose and one `len`/`join` per column, all in C."""
        series, adds, *blobs = zip(*rows)
        joined = b"".join(adds)
        if len(joined) == len(rows) * len(FIELDS) * 8:
            sums = np.frombuffer(joined, dtype=np.float64).reshape(len(rows), len(FIELDS))
        else:    # rows written with fewer FIELDS (an older version)
            sums = np.stack([widen_adds(np.frombuffer(a, dtype=np.float64)) for a in adds])
        return cls(np.full(len(rows), start, dtype=np.int64), np.array(series, dtype=np.int64), sums,
                   [np.fromiter(map(len, col), dtype=np.int64, count=len(col)) // sketch.PAIR_BYTES for col in blobs],
                   [np.frombuffer(b"".join(col), dtype=np.uint8) for col in blobs])

    @classmethod
    def concat(cls, parts: list["StoredRows"]) -> "StoredRows":
        """The parts' rows one after another (always a copy)."""
        return cls(np.concatenate([p.start for p in parts]), np.concatenate([p.series for p in parts]),
                   np.concatenate([p.adds for p in parts]),
                   [np.concatenate([p.lengths[k] for p in parts]) for k in range(len(SKETCHES))],
                   [np.concatenate([p.pairs[k] for p in parts]) for k in range(len(SKETCHES))])

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def groups(self) -> Groups:
        """Sparse Groups of these rows. Bins and counts are views of the encoded pairs
        (uint16, uint32): widening them would copy every pair twice more per kind."""
        rows = np.arange(len(self))
        pairs = [p.view(sketch.PAIR) for p in self.pairs]
        bins = [(np.repeat(rows, n), p["i"], p["n"]) for n, p in zip(self.lengths, pairs)]
        return Groups(self.series, self.start, self.adds, None, bins)


def sparse(groups: Groups) -> Groups:
    """The same groups with sparse sketches only: what a pending batch keeps in memory
    (a dense batch is about 11 KB per group; its non-empty bins are a few hundred bytes)."""
    return Groups(groups.series, groups.start, groups.adds, None, groups.nonzero_bins())


def merge(parts: list[Groups]) -> Groups:
    """Many batches' groups as one, summed per (series, start), with dense sketches.

    The store folds its pending batches with this in one go, so the read-modify-write of a
    bucket row happens once per checkpoint instead of once per batch; `coarsen` is the
    merge of one part whose starts were rounded down."""
    series = np.concatenate([p.series for p in parts]).astype(np.int64)
    start = np.concatenate([p.start for p in parts]).astype(np.int64)
    uniq, inverse, order, first = _group(series, start)
    g = len(uniq)
    adds = np.add.reduceat(np.concatenate([p.adds for p in parts])[order], first, axis=0)
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    sketches = {}
    for k, kind in enumerate(SKETCHES):
        bins = [p.nonzero_bins()[k] for p in parts]
        rows = inverse[np.concatenate([b[0] + off for b, off in zip(bins, offsets)]).astype(np.int64)]
        flat = rows * sketch.NBINS + np.concatenate([b[1] for b in bins])
        counts = np.concatenate([b[2] for b in bins])
        sketches[kind] = np.bincount(flat, weights=counts, minlength=g * sketch.NBINS).reshape(g, sketch.NBINS).astype(np.int64)
    return Groups(uniq >> 32, uniq & 0xFFFFFFFF, adds, sketches)
