"""Usage statistics over a time range, from the hourly buckets: what `/v1/usage/stats` answers.

Buckets are read a page at a time as sparse groups and summed per output group with numpy,
so two weeks of ten thousand series take one pass, not a decode per bucket (the output
groups' sketches are dense: 3.8 KB each per kind).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import sketch
from ..floats import finite_or_none
from .buckets import FIELDS, SKETCHES, TOKEN_FIELDS, F
from .store import Store

DIMENSIONS = ("app", "provider", "model")
QUANTILES = (0.5, 0.95, 0.99)


def usage_statistics(store: Store, t0: float, t1: float, dims: list[str]) -> dict[str, Any]:
    """Totals and latency/TTFT percentiles per group of `dims` (minute buckets for the
    partial first and last hours are not split: ranges are rounded out to whole hours)."""
    start_h, end_h = math.floor(t0 / 3600) * 3600, math.ceil(t1 / 3600) * 3600
    names = store.series()
    if not names:
        return {"start": start_h, "end": end_h, "group_by": dims, "groups": []}
    label_of = {sid: tuple(dict(zip(DIMENSIONS, key))[d] for d in dims) for sid, key in names.items()}
    keys = sorted(set(label_of.values()))
    index = {k: i for i, k in enumerate(keys)}
    group_of = np.full(max(names) + 1, -1, dtype=np.int64)
    group_of[list(label_of)] = [index[k] for k in label_of.values()]
    n = len(keys)
    adds = np.zeros((n, len(FIELDS)))
    seen = np.zeros(n, dtype=bool)
    kinds = {"latency": SKETCHES.index("latency"), "ttft": SKETCHES.index("ttft")}
    counts = {kind: np.zeros(n * sketch.NBINS) for kind in kinds}     # one dense sketch per output group
    for g in store.bucket_groups(3600, start_h, end_h):
        k = group_of[g.series]
        np.add.at(adds, k, g.adds)
        seen[k] = True
        for kind, j in kinds.items():
            gi, b, c = g.nonzero_bins()[j]
            counts[kind] += np.bincount(k[gi] * sketch.NBINS + b, weights=c, minlength=n * sketch.NBINS)
    pct = {(kind, q): sketch.quantile(counts[kind].reshape(n, sketch.NBINS), q) for kind in kinds for q in QUANTILES}
    rows = []
    for i in np.flatnonzero(seen).tolist():
        a = adds[i]
        row: dict[str, Any] = dict(zip(dims, keys[i]))
        row.update({
            "requests": int(a[F["requests"]]), "errors": int(a[F["errors"]]),
            "error_rate": float(a[F["errors"]] / a[F["requests"]]) if a[F["requests"]] else None,
            "cost_usd": round(float(a[F["cost"]]), 6), "unpriced_requests": int(a[F["unpriced"]]),
            "tokens": {name.removesuffix("_tokens"): int(a[F[name]]) for name in TOKEN_FIELDS},
        })
        for kind in kinds:
            row[f"{kind}_s"] = {f"p{int(q * 100)}": finite_or_none(pct[(kind, q)][i], 4) for q in QUANTILES}
        rows.append(row)
    return {"start": start_h, "end": end_h, "group_by": dims, "groups": rows}
