"""The demo traffic the compose file's `demo` profile sends: its first anomaly comes at once,
and a demo started again against an exporter that holds history adds no second backfill."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import Server, exporter_command, sample_sum

from exporter.sources import demo


def test_first_anomaly_is_an_agent_loop_from_the_first_live_minute():
    now = 1_700_000_123.4
    anomaly = demo.first_anomaly(now)
    assert anomaly.kind == "runaway_session"
    assert anomaly.start == 1_700_000_100 and anomaly.start <= now < anomaly.end
    records = demo.minute(anomaly.start, np.random.default_rng(1), anomaly=anomaly)
    loop = [r for r in records if str(r.get("session_id", "")).startswith("loop-")]
    assert len(loop) >= 10 and {r["app"] for r in loop} == {"code-assistant"}
    assert len({r["session_id"] for r in loop}) == 1


def test_requests_counted_sums_every_series_of_the_counter():
    page = ("# HELP llm_requests_total Requests.\n# TYPE llm_requests_total counter\n"
            'llm_requests_total{app="a",model="m",provider="p"} 3.0\n'
            'llm_requests_total{app="b",model="m",provider="p"} 4.0\n'
            "llm_requests_created 1.7e9\n"
            'llm_request_errors_total{app="a",error_type="timeout",model="m",provider="p"} 9.0\n')
    assert demo.requests_counted(page) == 7.0
    assert demo.requests_counted("") == 0.0


def _run_demo_until_live(url: str, log: Path, days: float) -> str:
    """`llm-usage-exporter demo` until it announces live traffic; then stopped. Its stderr."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([*exporter_command(), "demo", "--target", url, "--days", str(days)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "demo: live traffic" not in log.read_text():
            assert proc.poll() is None, f"the demo exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the demo did not go live:\n{log.read_text()}"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return log.read_text()


@pytest.mark.slow
def test_a_second_demo_adds_no_second_backfill(tmp_path: Path):
    with Server(tmp_path, tmp_path / "usage.db", "--allow-unauthenticated") as srv:
        first = _run_demo_until_live(srv.url, tmp_path / "demo-1.log", days=0.2)
        assert "backfilling 0.2 days" in first
        backfilled = sample_sum(srv.scrape(), "llm_requests_total")
        # 4.8 hours of demo minutes: the demo's daily curve gives the expected count (a
        # weekend night holds a tenth of a weekday afternoon's), Poisson around it
        now = time.time()
        expected = sum(demo.daily_rate(t, 12.0) for t in np.arange(now - 0.2 * 86400, now, 60.0))
        assert backfilled > 0.7 * expected, (backfilled, expected)

        second = _run_demo_until_live(srv.url, tmp_path / "demo-2.log", days=0.2)
        assert f"already counts {backfilled:.0f} requests; no backfill" in second, second
        assert "backfilling" not in second
        # at most one live minute more (the demo posts each minute when it is over)
        assert sample_sum(srv.scrape(), "llm_requests_total") - backfilled < 200
