"""Settings: precedence of the four layers, errors that name the knob, the generated
command line, the loopback guard and bearer-token authentication."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import CLEAN_ENV, T0, engine_at, exporter_command, rec, settings_for

from exporter import cli
from exporter.web.app import create_app
from exporter.config import ConfigError, Settings, load_settings, parse_duration


def write_yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exporter.yaml"
    p.write_text(text)
    return p


# --- precedence ---------------------------------------------------------------------------

def test_defaults() -> None:
    s = load_settings(environ={})
    assert (s.host, s.port, s.window, s.baseline, s.horizon) == ("127.0.0.1", 9473, 3600.0, 7 * 86400.0, 14 * 86400.0)
    assert s.label_limit_model == 200 and s.max_body_bytes == 16 * 1024 * 1024 and s.tail == []


def test_precedence_defaults_yaml_env_flags(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "port: 1001\nwindow: 30m\nlabel-limit-app: 7\nlog_level: debug\n")
    env = {"LLM_EXPORTER_PORT": "2002", "LLM_EXPORTER_WINDOW": "45m"}
    # YAML over defaults
    s = load_settings(cfg, environ={})
    assert (s.port, s.window, s.label_limit_app, s.log_level) == (1001, 1800.0, 7, "debug")
    # environment over YAML
    s = load_settings(cfg, environ=env)
    assert (s.port, s.window, s.label_limit_app) == (2002, 2700.0, 7)
    # flags over environment; a None flag (not given) does not override
    s = load_settings(cfg, flags={"port": "3003", "window": None}, environ=env)
    assert (s.port, s.window, s.label_limit_app) == (3003, 2700.0, 7)


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "label_limit_model: 3\n")
    assert load_settings(environ={"LLM_EXPORTER_CONFIG": str(cfg)}).label_limit_model == 3


def test_environment_types(tmp_path: Path) -> None:
    s = load_settings(environ={"LLM_EXPORTER_ALLOW_UNAUTHENTICATED": "yes", "LLM_EXPORTER_TAIL": "a.jsonl,b.jsonl",
                               "LLM_EXPORTER_DEDUPE_WINDOW": "1d", "LLM_EXPORTER_PROTECT_METRICS": "0",
                               "LLM_EXPORTER_ALERT_BUDGET": "2.5"})
    assert s.allow_unauthenticated is True and s.protect_metrics is False and s.alert_budget == 2.5
    assert [p.name for p in s.tail] == ["a.jsonl", "b.jsonl"]
    assert s.dedupe_window == 86400.0


def test_command_line_layer_over_real_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's own parsing path: YAML < LLM_EXPORTER_* < flags."""
    cfg = write_yaml(tmp_path, "port: 1001\nlabel_limit_provider: 4\nwindow: 10m\n")
    monkeypatch.setenv("LLM_EXPORTER_PORT", "2002")
    monkeypatch.setenv("LLM_EXPORTER_WINDOW", "20m")
    args = cli.build_parser().parse_args(["serve", "--config", str(cfg), "--window", "40m", "--protect-metrics"])
    s = cli._settings(args)
    assert (s.port, s.window, s.label_limit_provider, s.protect_metrics) == (2002, 2400.0, 4, True)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("48h", 172800), ("7d", 604800), ("1w", 604800),
                                          ("250ms", 0.25), ("15", 15), (12.5, 12.5), (" 2 h ", 7200)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


# --- bad values name the knob -----------------------------------------------------------------

def test_bad_env_value_names_knob_and_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"LLM_EXPORTER_PORT": "abc"})
    msg = str(info.value)
    assert "port (LLM_EXPORTER_PORT) from environment" in msg and "integer" in msg


def test_bad_duration_names_knob() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(flags={"window": "-5m"}, environ={})
    assert "window from command line" in str(info.value) and "'-5m' is not a duration" in str(info.value)
    with pytest.raises(ConfigError, match=r"window from command line: must not be negative"):
        load_settings(flags={"window": -5}, environ={})
    with pytest.raises(ConfigError, match=r"evaluation_interval .*from environment"):
        load_settings(environ={"LLM_EXPORTER_EVALUATION_INTERVAL": "0"})


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "port: 9000\nwindwo: 5m\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert f"windwo from config file {cfg}: is not a known setting" in str(info.value)


@pytest.mark.parametrize("yaml_text,needle", [
    ("port: 70000\n", "port from config file"),
    ("log_level: loud\n", "log_level from config file"),
    ("label_limit_model: 0\n", "label_limit_model from config file"),
    ("page_budget_share: 1.5\n", "page_budget_share from config file"),
    ("page_budget_share: 0\n", "page_budget_share from config file"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("port: [1\n", "is not valid YAML"),
])
def test_bad_yaml_values(tmp_path: Path, yaml_text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(write_yaml(tmp_path, yaml_text), environ={})


def test_bad_env_bool_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LLM_EXPORTER_PROTECT_METRICS: must be true or false"):
        load_settings(environ={"LLM_EXPORTER_PROTECT_METRICS": "sometimes"})
    with pytest.raises(ConfigError, match="config: cannot read"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_horizon_must_cover_baseline_and_window() -> None:
    with pytest.raises(ConfigError, match="^horizon: must cover the baseline plus the window"):
        load_settings(flags={"baseline": "7d", "horizon": "7d"}, environ={})


def test_cli_exits_2_naming_the_knob(tmp_path: Path) -> None:
    env = {**CLEAN_ENV, "LLM_EXPORTER_PORT": "abc"}
    p = subprocess.run(exporter_command() + ["serve", "--db", str(tmp_path / "x.db")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "port (LLM_EXPORTER_PORT) from environment" in p.stderr
    assert not (tmp_path / "x.db").exists()                        # refused before touching the store


# --- the generated command line ---------------------------------------------------------------

def test_help_lists_every_knob() -> None:
    out = subprocess.run(exporter_command() + ["serve", "--help"], env=CLEAN_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    top = subprocess.run(exporter_command() + ["--help"], env=CLEAN_ENV, capture_output=True, text=True, timeout=60).stdout
    for name in Settings.model_fields:
        for text in (out.stdout, top):
            assert f"\n  {name} " in text, f"{name} missing from --help"
            assert f"LLM_EXPORTER_{name.upper()}" in text or name in ("prices", "price_aliases", "signals", "drift", "runaway", "budgets")
    for flag in ("--host", "--port", "--db", "--window", "--label-limit-model", "--protect-metrics", "--tail"):
        assert flag in out.stdout
    assert "--auth-tokens" not in out.stdout                       # secrets never come from a flag


def test_help_does_not_advertise_env_vars_that_are_never_read() -> None:
    """YAML-only knobs have no environment variable: the help must not offer one."""
    text = cli._knob_help()
    for name in ("prices", "price_aliases", "signals", "drift", "runaway", "budgets"):
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert "(YAML only)" in line
        assert f"LLM_EXPORTER_{name.upper()}" not in line
    assert load_settings(environ={"LLM_EXPORTER_PRICES": "{}"}).prices == {}


# --- binding and authentication -------------------------------------------------------------

def test_non_loopback_bind_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    p = subprocess.run(exporter_command() + ["serve", "--host", "0.0.0.0", "--db", str(tmp_path / "x.db"),
                                             "--port", "1"], env=CLEAN_ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.startswith("llm-usage-exporter: host: binding 0.0.0.0")
    assert "auth_token_file" in p.stderr and "--allow-unauthenticated" in p.stderr


def test_binding_rules(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# ingest tokens\ns3cret-a\n\n  s3cret-b  \n")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        settings_for(tmp_path, host=host).check_binding()
    with pytest.raises(ConfigError, match="^host: binding 10.1.2.3"):
        settings_for(tmp_path, host="10.1.2.3").check_binding()
    settings_for(tmp_path, host="0.0.0.0", allow_unauthenticated=True).check_binding()
    s = settings_for(tmp_path, host="0.0.0.0", auth_token_file=str(token_file))
    s.check_binding()
    assert s.tokens() == {"s3cret-a", "s3cret-b"}
    s = load_settings(flags={"host": "0.0.0.0", "db": str(tmp_path / "x.db")}, environ={"LLM_EXPORTER_AUTH_TOKENS": "t1, t2,"})
    s.check_binding()
    assert s.tokens() == {"t1", "t2"}
    with pytest.raises(ConfigError, match="auth_token_file: cannot read"):
        settings_for(tmp_path, auth_token_file=str(tmp_path / "missing")).tokens()


def test_bearer_token_from_file_guards_ingest(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("tok-one\ntok-two\n")
    settings = settings_for(tmp_path, auth_token_file=str(token_file))
    engine, _ = engine_at(settings)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        body = [rec(T0 - 60, request_id="a1")]
        r = client.post("/v1/records", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert client.post("/v1/records", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/records", json=body, headers={"Authorization": "Basic tok-one"}).status_code == 401
        assert engine.registry.get_sample_value("llm_requests_total", {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}) is None
        r = client.post("/v1/records", json=body, headers={"Authorization": "Bearer tok-two"})
        assert r.status_code == 200 and r.json()["accepted"] == 1
        assert engine.registry.get_sample_value("llm_requests_total", {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}) == 1.0
        # the webhook is guarded too; /metrics is open unless protect_metrics is set
        assert client.post("/api/alertmanager/webhook", json={"alerts": []}).status_code == 401
        assert client.get("/metrics").status_code == 200
        assert client.get("/healthz").status_code == 200


def test_protect_metrics(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("scrape-token\n")
    settings = settings_for(tmp_path, auth_token_file=str(token_file), protect_metrics=True)
    engine, _ = engine_at(settings)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        assert client.get("/metrics").status_code == 401
        r = client.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert r.status_code == 200 and "llm_exporter_build_info" in r.text


# --- the detectors' sections: typed, with a flag and a variable per scalar knob --------------

def test_section_knobs_merge_one_by_one_across_layers(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path, "runaway:\n  chain_max_calls: 80\n  tool_repeat_max: 30\nbudgets:\n  day_usd: 10\n"
                               "  apps: {search: {day: 2}}\ndrift:\n  preset: low\n")
    s = load_settings(cfg, flags={"runaway__tool_repeat_max": "40", "budgets__timezone": "Europe/Berlin"},
                      environ={"LLM_EXPORTER_RUNAWAY__CHAIN_WINDOW_S": "45m", "LLM_EXPORTER_DRIFT__MAX_AGE_S": "2h",
                               "LLM_EXPORTER_RUNAWAY__BURST_COUNT_CACHE_READS": "yes"})
    assert s.runaway.chain_max_calls == 80                       # YAML
    assert s.runaway.tool_repeat_max == 40                       # flag over YAML, knob by knob
    assert s.runaway.chain_window_s == 2700.0 and s.runaway.burst_count_cache_reads is True   # environment
    assert s.drift.preset == "low" and s.drift.max_age_s == 7200.0
    assert s.budgets.day_usd == 10.0 and s.budgets.apps == {"search": {"day": 2.0}} and s.budgets.timezone == "Europe/Berlin"


def test_section_errors_name_the_knob_and_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"runaway\.chain_max_calls \(LLM_EXPORTER_RUNAWAY__CHAIN_MAX_CALLS\) "
                                          r"from environment: runaway.chain_max_calls must be positive"):
        load_settings(environ={"LLM_EXPORTER_RUNAWAY__CHAIN_MAX_CALLS": "0"})
    with pytest.raises(ConfigError, match=r"drift\.preset from config file .*unknown preset 'loud'|"
                                          r"drift from config file .*unknown preset 'loud'"):
        load_settings(write_yaml(tmp_path, "drift: {preset: loud}\n"), environ={})
    with pytest.raises(ConfigError, match=r"budgets\.timezone from command line: .*unknown time zone 'Mars/Olympus'|"
                                          r"budgets from command line: .*unknown time zone 'Mars/Olympus'"):
        load_settings(flags={"budgets__timezone": "Mars/Olympus"}, environ={})
    with pytest.raises(ConfigError, match=r"runaway\.chain_calls from config file .*: is not a known setting"):
        load_settings(write_yaml(tmp_path, "runaway: {chain_calls: 3}\n"), environ={})
    with pytest.raises(ConfigError, match=r"runaway from config file .* and environment: runaway.session_idle_s must be "
                                          r"at least chain_window_s"):
        load_settings(write_yaml(tmp_path, "runaway: {session_idle_s: 60}\n"),
                      environ={"LLM_EXPORTER_RUNAWAY__CHAIN_WINDOW_S": "10m"})


def test_help_shows_durations_and_paths_as_people_write_them() -> None:
    text = cli._knob_help()
    line = {ln.split()[0]: ln for ln in text.splitlines()[2:]}
    assert "default 60m:" in line["window"] and "default 7d:" in line["baseline"] and "default 30s:" in line["evaluation_interval"]
    assert "default llm-usage.db:" in line["db"] and "PosixPath" not in text
    assert "--runaway-chain-window-s" in line["runaway.chain_window_s"] and "default 30m:" in line["runaway.chain_window_s"]
    assert "LLM_EXPORTER_BUDGETS__DAY_USD" in line["budgets.day_usd"] and "default 6h:" in line["drift.max_age_s"]
    assert "(YAML only)" in line["runaway.app_overrides"] and "(YAML only)" in line["budgets.apps"]
    for name in ("drift.window", "runaway.spike_z", "budgets.timezone"):
        assert line[name].split("default ", 1)[1].split(":", 1)[1].strip(), f"{name} has no description"
    p = subprocess.run(exporter_command() + ["serve", "--help"], env=CLEAN_ENV, capture_output=True, text=True, timeout=60)
    assert "--runaway-chain-max-calls" in p.stdout and "--budgets-month-usd" in p.stdout and "default 60m" in p.stdout


def test_sqlite_synchronous_is_a_setting(tmp_path: Path) -> None:
    engine, _ = engine_at(settings_for(tmp_path, sqlite_synchronous="FULL"))
    assert engine.store._db.execute("PRAGMA synchronous").fetchone()[0] == 2       # FULL
    engine.close()
    s = load_settings(flags={"db": str(tmp_path / "u.db")}, environ={"LLM_EXPORTER_SQLITE_SYNCHRONOUS": "extra"})
    assert s.sqlite_synchronous == "extra"
    with pytest.raises(ConfigError, match="sqlite_synchronous .*from environment"):
        load_settings(environ={"LLM_EXPORTER_SQLITE_SYNCHRONOUS": "NORMAL; DROP TABLE meta"})
