"""`llm-usage-exporter tune`: a history's own false alerts set the thresholds, and the file it
writes is what both the exporter and `llm-usage-exporter rules` read.

The history: nine days of one app on gpt-4o (about $0.40 an hour, above the cost signal's
floor) whose requests sometimes come twice as big for an hour (its own normal, every other
day or so, not at a fixed time). At the shipped cost warning ratio of 1.5 those hours are
anomalies; tune must propose a cost ratio above them, and the proposal must hold: re-graded
at the proposed ratio the same history raises no more alerts than the target allows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml
from helpers import DAY, HOUR, T0

from exporter import cli
from exporter.anomaly.signals import signal_specs
from exporter.config import ConfigError, load_settings
from exporter.sources.replay import load_records
from exporter.sources.tune import alerts, tune

REPO = Path(__file__).resolve().parents[1]
DAYS = 9


def history(rng: np.random.Generator) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    start = T0 - DAYS * DAY
    big_hours = set(rng.choice(np.arange(2 * 24, DAYS * 24), size=6, replace=False).tolist())
    for h in range(DAYS * 24):
        hour = start + h * HOUR
        day_curve = 1.0 + 0.6 * np.sin((h % 24 - 8) / 24 * 2 * np.pi)
        n = rng.poisson(60 * day_curve)
        ts = np.sort(hour + rng.uniform(0, HOUR, n))
        factor = 2.0 if h in big_hours else 1.0
        for t in ts.tolist():
            size = rng.lognormal(np.log(1500), 0.3) * factor
            out.append({"ts": t, "provider": "openai", "model": "gpt-4o", "app": "chat",
                        "input_tokens": int(size * 0.8), "output_tokens": int(size * 0.2), "latency_s": 1.0})
    return out


@pytest.fixture(scope="module")
def history_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "history.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in history(np.random.default_rng(3))) + b"\n")
    return path


def test_alerts_count_episodes_that_outlast_the_hold() -> None:
    times = np.arange(10) * 60.0
    on = np.zeros((10, 2), dtype=bool)
    on[1:3, 0] = True           # 2 steps: held 1 minute -> not an alert with a 5-minute hold
    on[3:9, 1] = True           # 6 steps: held 5 minutes -> an alert
    assert alerts(on, times, 300.0) == 1
    assert alerts(on, times, 60.0) == 2
    assert alerts(np.zeros((10, 2), dtype=bool), times, 60.0) == 0


def test_tune_raises_the_cost_ratio_above_the_history_s_own_normal(tmp_path: Path, history_file: Path) -> None:
    settings = load_settings(flags={"db": str(tmp_path / "t.db")}, environ={})
    records, problems = load_records([str(history_file)], now=T0)
    assert not problems
    proposals, effects = tune(settings, records, step=900.0, target_per_week=1.0)
    cost = next(p for p in proposals if p.signal == "cost_per_hour" and p.knob == "warning_ratio")
    assert cost.default == 1.5 and cost.alerts_per_week_default > cost.alerts_per_week_proposed
    assert cost.proposed > 1.5 and cost.alerts_per_week_proposed <= 1.0 / len(proposals) + 1e-9
    # the proposal is what the history's effects say, re-graded
    times = np.array(effects.times)
    rise = effects.array("cost_per_hour", "rise")
    weeks = (times[-1] - times[0]) / (7 * DAY)
    assert alerts(rise >= cost.proposed, times, 300.0) / weeks == pytest.approx(cost.alerts_per_week_proposed)
    # without --lower nothing goes below the ratios in effect
    for p in proposals:
        assert p.proposed >= p.default


def test_the_written_file_is_read_by_the_exporter_and_the_rules(tmp_path: Path, history_file: Path) -> None:
    out = tmp_path / "thresholds.yaml"
    assert cli.main(["tune", str(history_file), "--step", "15m", "--write", str(out), "--db", str(tmp_path / "t.db")]) == 0
    doc = yaml.safe_load(out.read_text())
    tuned = doc["signals"]["cost_per_hour"]
    assert tuned["warning_ratio"] > 1.5 and tuned["high_ratio"] >= 2 * tuned["warning_ratio"]
    # the exporter reads it, and its own signals: win over it
    cfg = tmp_path / "exporter.yaml"
    cfg.write_text(yaml.safe_dump({"thresholds_file": str(out), "signals": {"error_rate": {"warning_ratio": 4, "high_ratio": 8}}}))
    settings = load_settings(cfg, environ={})
    specs = {s.name: s for s in signal_specs(settings.signals)}
    assert specs["cost_per_hour"].warning_ratio == tuned["warning_ratio"]
    assert specs["error_rate"].warning_ratio == 4
    # ... and so does `rules`, which writes the tuned numbers into the alert thresholds
    prom = tmp_path / "prometheus"
    shutil.copytree(REPO / "prometheus", prom)
    assert cli.main(["rules", "--out", str(prom / "rules"), "--config", str(cfg)]) == 0
    text = (prom / "rules" / "thresholds.yml").read_text()
    assert f'vector({tuned["warning_ratio"]:g})", labels: {{signal: cost_per_hour, severity: warning}}' in text


def test_a_bad_thresholds_file_is_refused_naming_the_knob(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("signals: {cost_per_hour: {warning_ratio: 3, high_ratio: 2}}\n")
    with pytest.raises(ConfigError, match="high_ratio"):
        load_settings(flags={"thresholds_file": str(bad)}, environ={})
    bad.write_text("signals: [1, 2]\n")
    with pytest.raises(ConfigError, match="thresholds_file"):
        load_settings(flags={"thresholds_file": str(bad)}, environ={})
    with pytest.raises(ConfigError, match="thresholds_file: cannot read"):
        load_settings(flags={"thresholds_file": str(tmp_path / "missing.yaml")}, environ={})
