"""/metrics writes the usage families directly; the text must equal prometheus-client's."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from exporter.config import load_settings
from exporter.engine import Engine

T = 1_800_000_000.0


def test_direct_rendering_matches_the_library(tmp_path: Path) -> None:
    engine = Engine(load_settings(flags={"db": str(tmp_path / "u.db")}, environ={}), clock=lambda: T)
    odd = 'we"ird\\app\nname'
    engine.ingest([
        {"ts": T - 5, "provider": "openai", "model": "gpt-4o-mini", "app": "a", "input_tokens": 10, "output_tokens": 5,
         "latency_s": 1.25, "ttft_s": 0.2, "cache_read_tokens": 3},
        {"ts": T - 4, "provider": "openai", "model": "gpt-4o-mini", "app": "a", "status": 429},
        {"ts": T - 3, "provider": "anthropic", "model": "claude-3-5-haiku", "app": odd, "input_tokens": 123456789,
         "latency_s": 300.0, "status": "error", "error_type": "timeout"},
        {"ts": T - 2, "provider": "x", "model": "unpriced-model", "app": "b", "output_tokens": 7, "latency_s": 0.05},
    ])
    only_usage = CollectorRegistry()
    only_usage.register(engine.usage)
    expected = generate_latest(only_usage).decode()
    assert engine.usage.render() == expected
    assert 'app="we\\"ird\\\\app\\nname"' in expected          # escaping exercised
    full = engine.exposition().decode()
    assert full.startswith(expected)
    # Every family of the full registry is in the scrape, exactly once.
    names = set(re.findall(r"^# TYPE (\S+)", generate_latest(engine.registry).decode(), re.M))
    assert names == set(re.findall(r"^# TYPE (\S+)", full, re.M))
    assert len(re.findall(r"^# TYPE ", full, re.M)) == len(names)
    engine.close()
