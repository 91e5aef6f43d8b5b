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


def _engine_with_records(tmp_path: Path) -> Engine:
    engine = Engine(load_settings(flags={"db": str(tmp_path / "u.db")}, environ={}), clock=lambda: T)
    engine.ingest([
        {"ts": T - 5, "provider": "openai", "model": "gpt-4o-mini", "app": 'a"b\\c', "input_tokens": 10,
         "output_tokens": 5, "latency_s": 1.25, "ttft_s": 0.2},
        {"ts": T - 4, "provider": "openai", "model": "gpt-4o-mini", "app": "a", "status": 429},
    ])
    engine.evaluate(T)
    return engine


def test_openmetrics_rendering_matches_the_library(tmp_path: Path) -> None:
    """The fast renderer's OpenMetrics text equals prometheus-client's, and the whole scrape
    is one valid OpenMetrics document (one `# EOF`, at the end)."""
    from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    engine = _engine_with_records(tmp_path)
    only_usage = CollectorRegistry()
    only_usage.register(engine.usage)
    expected = om_generate_latest(only_usage).decode()
    assert expected.endswith("# EOF\n")
    assert engine.usage.render(openmetrics=True) == expected.removesuffix("# EOF\n")
    assert "# TYPE llm_requests counter\n" in expected and "llm_requests_total{" in expected
    full = engine.exposition(openmetrics=True).decode()
    assert full.count("# EOF") == 1 and full.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(full)}
    assert families["llm_requests"].type == "counter"
    assert {s.value for s in families["llm_requests"].samples if s.name == "llm_requests_total"} == {1.0}
    assert "llm_anomaly_severity" in families and "llm_exporter_component_errors" in families
    # the text format keeps its own family lines
    assert "# TYPE llm_requests_total counter\n" in engine.exposition().decode()
    engine.close()


PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")     # what Prometheus 2.x sends


def test_metrics_negotiates_openmetrics_and_gzip(tmp_path: Path) -> None:
    """`/metrics` answers in the format asked for, gzip-compressed when accepted; the bytes
    under the compression are the fast renderer's."""
    import gzip

    from fastapi.testclient import TestClient
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from exporter.web.app import create_app

    engine = _engine_with_records(tmp_path)
    usage_text, usage_om = engine.usage.render().encode(), engine.usage.render(openmetrics=True).encode()

    def raw(client: TestClient, accept: str, encoding: str) -> tuple[dict[str, str], bytes]:
        with client.stream("GET", "/metrics", headers={"Accept": accept, "Accept-Encoding": encoding}) as r:
            assert r.status_code == 200
            return dict(r.headers), b"".join(r.iter_raw())

    with TestClient(create_app(engine.settings, engine=engine, background=False)) as client:
        headers, body = raw(client, "*/*", "identity")
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "content-encoding" not in headers and body.startswith(usage_text) and b"# EOF" not in body
        headers, body = raw(client, PROMETHEUS_ACCEPT, "identity")
        assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert body.startswith(usage_om) and body.endswith(b"# EOF\n")
        headers, packed = raw(client, PROMETHEUS_ACCEPT, "gzip")
        assert headers["content-encoding"] == "gzip" and "Accept-Encoding" in headers["vary"]
        body = gzip.decompress(packed)
        assert len(packed) < len(body) / 3
        assert body.startswith(usage_om) and body.endswith(b"# EOF\n")
        assert {f.name for f in text_string_to_metric_families(body.decode())} >= {"llm_requests", "llm_anomaly_severity"}
        headers, packed = raw(client, "text/plain", "gzip, deflate")
        assert headers["content-encoding"] == "gzip" and gzip.decompress(packed).startswith(usage_text)
    engine.close()
