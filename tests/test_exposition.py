"""The /metrics exposition: promtool's lint passes on a full scrape, no `_created` series,
and a golden file pins the whole scrape for fixed records and a frozen clock.

Golden file: tests/golden/metrics.txt. When a change to the exposition is intended,
regenerate it with

    UPDATE_GOLDEN=1 python -m pytest tests/test_exposition.py

and review the diff like code. The comparison leaves out what depends on the wall clock:
`llm_exporter_last_*` gauges, the `llm_exporter_evaluation_duration_seconds` histogram and
the library's `process_*` metrics (CPU, memory, start time of this process).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import HOUR, T0, engine_at, parse_scrape, settings_for

from exporter.web.app import create_app
from exporter.engine import Engine

GOLDEN = Path(__file__).parent / "golden" / "metrics.txt"
T_EVAL = T0 + HOUR - 1
WALL_CLOCK = re.compile(r"^(# (HELP|TYPE) )?(llm_exporter_last_\w+|llm_exporter_component_last_success_timestamp_seconds|llm_exporter_evaluation_duration_seconds\w*|process_\w+)[ {]")

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def wiggle(k: int) -> float:
    """Deterministic mild noise in [-0.08, 0.08] (no RNG: the golden file must not depend on one)."""
    return ((k * 37) % 17 - 8) / 100.0


def golden_records() -> list[dict[str, Any]]:
    """Two days of hourly traffic for two apps on three models, then a spike hour: app
    `search` costs 5x, haiku is 3x slower, and errors jump. Plus an unpriced model and a
    fourth model that overflows label_limit_model=3."""
    out: list[dict[str, Any]] = []
    start = T0 - 48 * HOUR
    for h in range(49):
        hs = start + h * HOUR
        spike = h == 48
        for i in range(24):
            k = h * 24 + i
            ts = hs + 150 * i + 7
            out.append({"ts": ts, "provider": "openai", "model": "gpt-4o-mini", "app": "search",
                        "input_tokens": 800 + 10 * (k % 9), "output_tokens": 150 + (k % 7), "cache_read_tokens": 100,
                        "cost_usd": (5.0 if spike else 1.0) * (1 + wiggle(k)) / 24,
                        "latency_s": 0.9 * (1 + wiggle(k + 3)), "ttft_s": 0.25 * (1 + wiggle(k + 5)),
                        "status": 500 if (spike and i % 4 == 0) or (not spike and k % 97 == 0) else 200,
                        "request_id": f"g-{k}"})
            out.append({"ts": ts + 30, "provider": "anthropic", "model": "claude-3-5-haiku-20241022", "app": "chat",
                        "input_tokens": 1200 + (k % 11), "output_tokens": 300, "reasoning_tokens": 20,
                        "latency_s": (6.0 if spike else 2.0) * (1 + wiggle(k + 7)), "ttft_s": 0.5 * (1 + wiggle(k + 1)),
                        "status": 429 if k % 113 == 0 else 200, "session_id": f"s-{k // 6}", "request_id": f"c-{k}"})
        out.append({"ts": hs + 600, "provider": "ollama", "model": "llama3-local", "app": "batch", "input_tokens": 500,
                    "output_tokens": 50, "latency_s": 4.0, "request_id": f"u-{h}"})
    out.append({"ts": T0 + 900, "provider": "openai", "model": "gpt-4.1", "app": "batch", "input_tokens": 1000,
                "output_tokens": 100, "latency_s": 1.5, "request_id": "overflow-1"})
    return out


def build_engine(tmp_path: Path) -> Engine:
    engine, _ = engine_at(settings_for(tmp_path, label_limit_model=3), T_EVAL)
    items = golden_records()
    for i in range(0, len(items), 500):
        engine.ingest(items[i:i + 500], now=T_EVAL)
    engine.ingest([{"provider": "openai"}], now=T_EVAL)            # one rejected record
    engine.ingest(items[:3], now=T_EVAL)                          # three duplicates
    assert engine.evaluate(T_EVAL) is not None
    return engine


def scrape(engine: Engine, settings: Any) -> tuple[str, str]:
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        r = client.get("/metrics")
        assert r.status_code == 200
        return r.text, r.headers["content-type"]


def comparable(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not WALL_CLOCK.match(line)]


@pytest.fixture
def full_scrape(tmp_path: Path) -> str:
    engine = build_engine(tmp_path)
    text, content_type = scrape(engine, engine.settings)
    assert content_type.startswith("text/plain; version=")
    return text


def test_scrape_has_every_family(full_scrape: str) -> None:
    samples = parse_scrape(full_scrape)
    names = {n for n, _ in samples}
    for family in ("llm_requests_total", "llm_request_errors_total", "llm_tokens_total", "llm_cost_usd_total",
                   "llm_unpriced_requests_total", "llm_request_duration_seconds_bucket", "llm_time_to_first_token_seconds_count",
                   "llm_output_tokens_per_second_sum", "llm_anomaly_current", "llm_anomaly_baseline", "llm_anomaly_ratio",
                   "llm_anomaly_zscore", "llm_anomaly_severity", "llm_anomaly_baseline_span_seconds", "llm_anomaly_band_lower",
                   "llm_anomaly_band_upper", "llm_exporter_build_info", "llm_exporter_records_total",
                   "llm_exporter_label_overflow_total", "llm_exporter_store_errors_total"):
        assert family in names, family
    assert "llm_anomaly_baseline_hours" not in full_scrape                        # renamed to base units
    assert samples[("llm_anomaly_severity", (("app", "search"), ("scope", "app"), ("signal", "cost_per_hour")))] == 2
    assert samples[("llm_exporter_records_total", (("result", "duplicate"),))] == 3
    assert samples[("llm_exporter_records_total", (("result", "rejected"),))] == 1
    assert samples[("llm_exporter_label_overflow_total", (("label", "model"),))] == 1
    assert samples[("llm_unpriced_requests_total", (("app", "batch"), ("model", "llama3-local"), ("provider", "ollama")))] == 49


def test_no_created_series(full_scrape: str) -> None:
    assert "_created" not in full_scrape


@needs_promtool
def test_promtool_check_metrics_passes(full_scrape: str, tmp_path: Path) -> None:
    p = subprocess.run(["promtool", "check", "metrics"], input=full_scrape.encode(), capture_output=True, timeout=60)
    assert p.returncode == 0, (p.stdout + p.stderr).decode()
    assert (p.stdout + p.stderr).strip() == b""
    # the check can fail: the old unit-suffixed name would not pass the lint
    bad = full_scrape.replace("llm_anomaly_baseline_span_seconds", "llm_anomaly_baseline_hours")
    p = subprocess.run(["promtool", "check", "metrics"], input=bad.encode(), capture_output=True, timeout=60)
    assert p.returncode != 0 and b'use base unit "seconds" instead of "hours"' in p.stdout + p.stderr


def test_no_anomaly_gauges_before_the_first_evaluation(tmp_path: Path) -> None:
    engine, _ = engine_at(settings_for(tmp_path), T_EVAL)
    engine.ingest(golden_records()[:50], now=T_EVAL)
    text, _ = scrape(engine, engine.settings)
    assert "llm_requests_total{" in text
    assert "llm_anomaly_severity{" not in text and "llm_anomaly_current{" not in text


def test_golden_scrape(full_scrape: str) -> None:
    """The whole scrape, minus wall-clock series, equals tests/golden/metrics.txt
    (UPDATE_GOLDEN=1 rewrites it; see the module docstring)."""
    got = comparable(full_scrape)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("\n".join(got) + "\n")
    want = comparable(GOLDEN.read_text())
    if got != want:
        # tolerate only last-digit float noise (other platforms' libm); anything else is a real change
        if len(got) == len(want) and all(_same_line(a, b) for a, b in zip(got, want)):
            return
        diff = "\n".join(difflib.unified_diff(want, got, "golden/metrics.txt", "scrape", lineterm="", n=1))
        pytest.fail(f"scrape differs from the golden file (UPDATE_GOLDEN=1 to accept):\n{diff[:6000]}")


def _same_line(a: str, b: str) -> bool:
    if a == b:
        return True
    if a.startswith("#") or b.startswith("#"):
        return False
    sa, _, va = a.rpartition(" ")
    sb, _, vb = b.rpartition(" ")
    if sa != sb:
        return False
    x, y = float(va), float(vb)
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def test_usage_families_describe_the_names_they_collect(tmp_path: Path) -> None:
    """describe() (what registration reads) names exactly the families collect() yields."""
    engine, _ = engine_at(settings_for(tmp_path))
    engine.ingest([{"ts": T0 - 60, "provider": "openai", "model": "gpt-4o", "input_tokens": 5, "latency_s": 0.5,
                    "ttft_s": 0.1, "status": 500}])
    described = [(m.name, m.type) for m in engine.usage.describe()]
    collected = [(m.name, m.type) for m in engine.usage.collect()]
    assert described == collected and all(not m.samples for m in engine.usage.describe())
    engine.close()
