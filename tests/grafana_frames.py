"""What a Grafana table panel shows, built from Prometheus answers the way Grafana builds it.

Grafana is not installable here, so the tests rebuild its data path for table panels:

1. **Table-format frames** (`table_frames`). The Prometheus data source turns the instant
   answers of the queries with `format: table` into one frame per query (refId): a `Time`
   field, one string field per label name in the order the series bring them (each
   series' labels sorted by name, a name added when first seen, `""` where a series lacks
   it; `__name__` included), and the value field, named `Value #<refId>` when the panel
   has several queries and `Value` when it has one. This follows `transformDFToTable` of
   Grafana's Prometheus data source (packages/grafana-prometheus/src/result_transformer.ts).
2. **The panel's transformations** (`apply`), in order. `merge` follows Grafana's merge
   transformer (packages/grafana-data/src/transformations/transformers/merge.ts): the
   fields present in every frame are the key; rows of the same key are merged into an
   existing row when none of their common fields disagree, otherwise they make a row of
   their own. `organize` excludes fields by name, orders them (`fieldOrder: manual` with
   `indexByName`, unlisted fields last) and renames them.

A field is `Field(name, kind, values)`; a missing value is `None`. `TableView` then says
what a reader sees: the visible columns (without fields hidden by a `custom.hidden`
override) and the rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

Labels = dict[str, str]


@dataclass
class Field:
    name: str
    kind: str                       # "time", "string" or "number"
    values: list[Any] = field(default_factory=list)


@dataclass
class Frame:
    fields: list[Field]
    ref_id: str = ""

    @property
    def length(self) -> int:
        return len(self.fields[0].values) if self.fields else 0

    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def column(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


def parse_sample(value: str) -> float:
    """Prometheus' sample text as Grafana parses it (`+Inf`, `-Inf`, `NaN` included)."""
    return float(value)


def table_frames(answers: Sequence[tuple[str, Sequence[tuple[Labels, str]]]], time_ms: int) -> list[Frame]:
    """One table frame per query: `answers` is [(refId, [(labels, value text), ...])] in the
    panel's query order, each the instant vector Prometheus returned (possibly empty)."""
    several = len(answers) > 1
    frames = []
    for ref, series in answers:
        labels: list[str] = []
        for metric, _ in series:
            for name in sorted(metric):
                if name not in labels:
                    labels.append(name)
        time = Field("Time", "time", [time_ms] * len(series))
        label_fields = [Field(n, "string", [metric.get(n, "") for metric, _ in series]) for n in labels]
        value = Field(f"Value #{ref}" if several else "Value", "number", [parse_sample(v) for _, v in series])
        frames.append(Frame([time, *label_fields, value], ref))
    return frames


def _js(value: Any) -> str:
    """How JavaScript writes a value into a string (the merge key concatenates them)."""
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value.is_integer():
            return str(int(value))
    return str(value)


def merge(frames: Sequence[Frame]) -> list[Frame]:
    if len(frames) <= 1:
        return list(frames)
    data = [f for f in frames if f.fields]
    if not data:
        return [frames[0]]
    names: list[str] = []
    kinds: dict[str, str] = {}
    index: dict[str, dict[int, int]] = {}
    key_names: list[str] = []
    for fi, frame in enumerate(data):
        for xi, fld in enumerate(frame.fields):
            if fld.name not in kinds:
                names.append(fld.name)
                kinds[fld.name] = fld.kind
            index.setdefault(fld.name, {})[fi] = xi
            if fi == len(data) - 1 and len(index[fld.name]) == len(data):
                key_names.append(fld.name)
    if not key_names:
        return list(frames)
    key_fields = {fi: [index[n][fi] for n in key_names] for fi in range(len(data))}

    def key(fi: int, row: int) -> str:
        return "".join(_js(data[fi].fields[xi].values[row]) for xi in key_fields[fi])

    def values(fi: int, row: int) -> dict[str, Any]:
        return {n: data[fi].fields[index[n][fi]].values[row] for n in names if fi in index[n]}

    def mergeable(existing: dict[str, Any], new: dict[str, Any]) -> bool:
        # JavaScript's `!==`: NaN disagrees with NaN, as here
        return all(existing.get(k) is None or existing[k] == v for k, v in new.items())

    by_key: dict[str, list[dict[str, Any]]] = {}
    order: list[tuple[str, int]] = []
    for fi, frame in enumerate(data):
        for row in range(frame.length):
            k, v = key(fi, row), values(fi, row)
            if k not in by_key:
                by_key[k] = [v]
                order.append((k, 0))
                continue
            merged = False
            for i, existing in enumerate(by_key[k]):
                if mergeable(existing, v):
                    by_key[k][i] = {**existing, **v}
                    merged = True
            if not merged:
                by_key[k].append(v)
                order.append((k, len(by_key[k]) - 1))
    out = Frame([Field(n, kinds[n]) for n in names])
    for k, i in order:
        row = by_key[k][i]
        for fld in out.fields:
            fld.values.append(row.get(fld.name))
    return [out]


def organize(frames: Sequence[Frame], options: dict[str, Any]) -> list[Frame]:
    exclude = {n for n, v in (options.get("excludeByName") or {}).items() if v}
    index: dict[str, int] = options.get("indexByName") or {}
    manual = options.get("fieldOrder") == "manual"
    rename: dict[str, str] = options.get("renameByName") or {}
    out = []
    for frame in frames:
        fields = [f for f in frame.fields if f.name not in exclude]
        if manual and index:
            fields = sorted(fields, key=lambda f: index.get(f.name, 2 ** 53 - 1))
        out.append(Frame([Field(rename.get(f.name) or f.name, f.kind, list(f.values)) for f in fields], frame.ref_id))
    return out


TRANSFORMS = {"merge": lambda frames, options: merge(frames), "organize": organize}


def apply(frames: Sequence[Frame], transformations: Iterable[dict[str, Any]]) -> list[Frame]:
    """The panel's transformations applied in order; an unknown one is an error (the tests
    must not pretend to know what it does)."""
    out = list(frames)
    for t in transformations:
        if t.get("disabled"):
            continue
        if t["id"] not in TRANSFORMS:
            raise NotImplementedError(f"transformation {t['id']!r} is not modelled")
        out = TRANSFORMS[t["id"]](out, t.get("options") or {})
    return out


@dataclass
class TableView:
    """What a table panel shows: its visible columns and rows (one frame)."""

    frame: Frame
    hidden: set[str]

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.frame.fields if f.name not in self.hidden]

    def rows(self) -> list[dict[str, Any]]:
        return [{f.name: f.values[i] for f in self.frame.fields} for i in range(self.frame.length)]

    def labels_of(self, row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The row's visible text columns: what tells a reader which series it is."""
        return tuple((f.name, row[f.name]) for f in self.frame.fields
                     if f.kind == "string" and f.name not in self.hidden)


def hidden_fields(panel: dict[str, Any]) -> set[str]:
    out = set()
    for o in panel.get("fieldConfig", {}).get("overrides", []):
        if o["matcher"]["id"] == "byName" and any(p["id"] == "custom.hidden" and p["value"] for p in o["properties"]):
            out.add(o["matcher"]["options"])
    return out


def table_view(panel: dict[str, Any], answers: Sequence[tuple[str, Sequence[tuple[Labels, str]]]],
               time_ms: int) -> TableView:
    """The table `panel` shows for these Prometheus answers (one per query, in order)."""
    frames = apply(table_frames(answers, time_ms), panel.get("transformations") or [])
    if len(frames) != 1:
        raise AssertionError(f"{panel['title']}: the transformations leave {len(frames)} frames, a table shows one")
    return TableView(frames[0], hidden_fields(panel))
