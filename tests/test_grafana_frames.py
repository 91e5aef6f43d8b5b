"""The model of Grafana's table data path (tests/grafana_frames.py) reproduces what Grafana
does with Prometheus answers, including the failure it exists to catch: status tables that
merge raw selectors split every series into one mostly empty row per query, because the
metric name is a field of every frame and so part of the merge key."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grafana_frames import apply, table_frames, table_view  # noqa: E402

T = 1_700_000_000_000
APP = {"instance": "exporter:9473", "job": "llm-usage-exporter", "scope": "app", "signal": "cost_per_hour"}


def organize(**rename: str) -> dict:
    return {"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True, "instance": True},
                                          "fieldOrder": "manual", "indexByName": {}, "renameByName": rename}}


def panel(*transformations: dict) -> dict:
    return {"title": "t", "transformations": list(transformations), "fieldConfig": {"overrides": []}}


def test_table_frames_follow_the_prometheus_data_source() -> None:
    frames = table_frames([
        ("A", [({"__name__": "m", "b": "2", "a": "1"}, "3"), ({"__name__": "m", "c": "x"}, "NaN")]),
        ("B", []),
    ], T)
    a, b = frames
    # labels sorted within a series, in order of first appearance across series
    assert a.names() == ["Time", "__name__", "a", "b", "c", "Value #A"]
    assert a.column("c").values == ["", "x"] and a.column("a").values == ["1", ""]
    assert a.column("Value #A").values[0] == 3 and math.isnan(a.column("Value #A").values[1])
    # an empty answer is a frame without rows, still counted for the `Value #X` names
    assert b.names() == ["Time", "Value #B"] and b.length == 0
    (only,) = table_frames([("A", [({"x": "1"}, "1")])], T)
    assert only.names() == ["Time", "x", "Value"]


def test_merging_raw_selectors_splits_every_series() -> None:
    """Two raw selectors: `__name__` differs, so the merge key does, and nothing merges."""
    answers = [
        ("A", [({"__name__": "llm_anomaly_severity", **APP, "app": a}, "1") for a in ("chat", "batch")]),
        ("B", [({"__name__": "llm_anomaly_ratio", **APP, "app": a}, "2.5") for a in ("chat", "batch")]),
    ]
    view = table_view(panel({"id": "merge", "options": {}}, organize(**{"Value #A": "severity", "Value #B": "ratio"})),
                      answers, T)
    rows = view.rows()
    assert len(rows) == 4                                          # two per series
    assert [view.labels_of(r) for r in rows].count(view.labels_of(rows[0])) == 2
    assert sum(r["severity"] is None for r in rows) == 2 and sum(r["ratio"] is None for r in rows) == 2


def test_merging_aggregated_queries_makes_one_row_per_series() -> None:
    """Without the metric name (an aggregation keeps only the named labels) each series is
    one row holding every value, also when one query answers for fewer series."""
    key = {"signal": "cost_per_hour", "scope": "app"}
    answers = [
        ("A", [({**key, "app": a}, "1") for a in ("chat", "batch")]),
        ("B", [({**key, "app": a}, "2.5") for a in ("batch", "chat")]),
        ("C", [({**key, "app": "chat"}, "7")]),
        ("D", []),
    ]
    view = table_view(panel({"id": "merge", "options": {}}, organize(**{"Value #A": "severity", "Value #B": "ratio",
                                                                        "Value #C": "current", "Value #D": "baseline"})),
                      answers, T)
    rows = {r["app"]: r for r in view.rows()}
    assert len(view.rows()) == 2
    assert rows["chat"]["severity"] == 1 and rows["chat"]["ratio"] == 2.5 and rows["chat"]["current"] == 7
    assert rows["batch"]["current"] is None and rows["batch"]["baseline"] is None
    assert view.columns == ["app", "scope", "signal", "severity", "ratio", "current", "baseline"]


def test_label_sets_that_differ_between_queries_do_not_merge() -> None:
    """A query that keeps `job` beside queries that do not: `job` is no key, and rows of the
    same model still merge (its empty value in the others is null, not a disagreement)."""
    answers = [
        ("A", [({"provider": "openai", "model": "gpt-4o"}, "10")]),
        ("B", [({"job": "llm", "provider": "openai", "model": "gpt-4o"}, "0.5")]),
    ]
    frames = apply(table_frames(answers, T), [{"id": "merge", "options": {}}])
    assert frames[0].length == 1


def test_organize_orders_by_original_names_then_renames() -> None:
    frames = apply(table_frames([("A", [({"b": "1", "a": "2"}, "1")]), ("B", [({"b": "1", "a": "2"}, "2")])], T), [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True}, "fieldOrder": "manual",
                                       "indexByName": {"Value #B": 0, "b": 1}, "renameByName": {"Value #B": "second"}}},
    ])
    assert frames[0].names() == ["second", "b", "a", "Value #A"]
