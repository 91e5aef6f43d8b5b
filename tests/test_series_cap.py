"""The cap on (app, provider, model) combinations: beyond `max_series` a new combination is
counted under its app with provider and model `other`, counted as overflow, the same after
a restart, and the scrape stays bounded however the labels combine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import T0, engine_at, parse_scrape, rec, sample_sum, settings_for


def grid(apps: int, providers: int, models: int, prefix: str = "g") -> list[dict[str, Any]]:
    return [rec(T0 - 600 + i % 500, app=f"app-{a:03d}", provider=f"prov-{p}", model=f"model-{m:03d}",
                request_id=f"{prefix}-{a}-{p}-{m}", latency_s=0.4)
            for i, (a, p, m) in enumerate((a, p, m) for a in range(apps) for p in range(providers) for m in range(models))]


def by_app(samples: dict[Any, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in samples.items():
        if name == "llm_requests_total":
            app = dict(labels)["app"]
            out[app] = out.get(app, 0.0) + v
    return out


def test_combinations_beyond_the_cap_fold_under_their_app(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_series=50)
    engine, _ = engine_at(settings, T0)
    records = grid(20, 3, 10)                                       # 600 combinations, each label within its limit
    for i in range(0, len(records), 100):
        assert engine.ingest(records[i:i + 100]).accepted == 100
    samples = parse_scrape(engine.exposition().decode())
    series = {dict(labels)["app"] + "|" + dict(labels)["provider"] + "|" + dict(labels)["model"]
              for (name, labels) in samples if name == "llm_requests_total"}
    folded = {s for s in series if s.endswith("|other|other")}
    # the first 50 combinations (app-000's 30 and 20 of app-001's) are admitted; the other
    # apps' are counted under one series per app
    assert len(series) - len(folded) == 50 and len(folded) == 19
    assert sample_sum(samples, "llm_requests_total") == 600
    assert by_app(samples) == {f"app-{a:03d}": 30.0 for a in range(20)}   # cost and usage stay attributed to the app
    assert sample_sum(samples, "llm_exporter_label_overflow_total", label="series") == 600 - 50
    assert sample_sum(samples, "llm_request_duration_seconds_count", provider="other") == 550
    engine.close()

    again, _ = engine_at(settings, T0)                               # the same mapping after a restart
    more = grid(20, 3, 10, prefix="h")
    for i in range(0, len(more), 100):
        again.ingest(more[i:i + 100])
    samples = parse_scrape(again.exposition().decode())
    assert sample_sum(samples, "llm_requests_total") == 1200
    assert len({labels for (name, labels) in samples if name == "llm_requests_total"}) == 69
    assert sample_sum(samples, "llm_exporter_label_overflow_total", label="series") == 2 * 550
    assert by_app(samples) == {f"app-{a:03d}": 60.0 for a in range(20)}
    again.close()


def test_sixty_thousand_combinations_keep_the_scrape_bounded(tmp_path: Path) -> None:
    """100 apps x 3 providers x 200 models, each label within its own limit: 60,000 series
    and a 259 MB scrape before the cap; now at most max_series (3,000) plus one per app."""
    engine, _ = engine_at(settings_for(tmp_path), T0)
    records = grid(100, 3, 200)
    for i in range(0, len(records), 5000):
        assert engine.ingest(records[i:i + 5000]).accepted == 5000
    text = engine.exposition()
    samples = parse_scrape(text.decode())
    keys = {labels for (name, labels) in samples if name == "llm_requests_total"}
    assert len(keys) <= 3000 + 100
    assert sample_sum(samples, "llm_requests_total") == 60_000
    assert sample_sum(samples, "llm_exporter_label_overflow_total", label="series") == 60_000 - 3000
    assert len(text) < 30_000_000
    engine.close()
