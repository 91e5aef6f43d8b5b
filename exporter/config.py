"""Settings: defaults in code, then a YAML file, then LLM_EXPORTER_* variables, then flags.

One typed class holds every knob. The command line is generated from it, so `--help`
lists every knob with its environment variable, and a bad value anywhere refuses to
start with a message that names the knob and where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "LLM_EXPORTER_"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


class ConfigError(ValueError):
    """A setting is invalid; the message names the knob."""


def parse_duration(v: Any) -> float:
    """'90s', '5m', '48h', '7d' or a number of seconds, as seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < 0:
            raise ValueError("must not be negative")
        return float(v)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"{v!r} is not a duration like 30s, 5m, 48h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


class Settings(BaseModel):
    """Every knob of the exporter. Durations accept 30s / 5m / 48h / 7d or seconds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    DURATIONS: ClassVar[tuple[str, ...]] = (
        "window", "evaluation_interval", "dedupe_window", "record_retention", "minute_retention", "horizon", "baseline",
        "store_busy_timeout", "keep_alive_timeout", "header_timeout", "body_timeout")

    host: str = Field("127.0.0.1", description="address to bind; anything but loopback needs ingest tokens or --allow-unauthenticated")
    port: int = Field(9473, ge=1, le=65535, description="TCP port for the HTTP API and /metrics")
    db: Path = Field(Path("llm-usage.db"), description="SQLite file holding history, counter totals and the dedupe window")
    window: float = Field(3600, gt=0, description="the window each anomaly signal is measured over (current value)")
    baseline: float = Field(7 * 86400, gt=0, description="how far back the rolling baseline reaches")
    horizon: float = Field(14 * 86400, gt=0, description="how long hourly buckets are kept (at least the baseline)")
    seasonal: bool = Field(False, description="compare against the same hour of day only (needs a week of history)")
    evaluation_interval: float = Field(30, gt=0, description="how often the evaluator recomputes the anomaly gauges")
    dedupe_window: float = Field(48 * 3600, ge=0, description="how long a request_id is remembered, so retries count once")
    record_retention: float = Field(72 * 3600, ge=0, description="how long raw records are kept for /v1/usage/recent and export (0: not kept)")
    minute_retention: float = Field(6 * 3600, gt=0, description="how long minute buckets are kept")
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="largest accepted POST body, also after gzip/deflate decoding; larger gets HTTP 413")
    max_errors_listed: int = Field(100, gt=0, description="rejected records listed with their reason in an ingest answer (the rest are counted)")
    ingest_queue_bytes: int = Field(64 * 1024 * 1024, gt=0, description="request bodies waiting for or in ingest; a POST beyond it gets HTTP 429")
    store_busy_timeout: float = Field(2, ge=0, description="how long a write waits for a lock another process holds on the db before HTTP 503")
    label_limit_app: int = Field(100, gt=0, description="distinct app label values before the rest map to 'other'")
    label_limit_provider: int = Field(30, gt=0, description="distinct provider label values before 'other'")
    label_limit_model: int = Field(200, gt=0, description="distinct model label values before 'other'")
    max_series: int = Field(3000, gt=0, description="distinct (app, provider, model) combinations; a new one beyond counts under its app with provider and model 'other'")
    auth_token_file: Path | None = Field(None, description="file with one bearer token per line: ingest and every read endpoint")
    auth_tokens: str | None = Field(None, description="comma-separated bearer tokens for ingest and reads (env var only; never a flag)")
    read_token_file: Path | None = Field(None, description="file with one read-only bearer token per line (GET endpoints, not ingest)")
    read_tokens: str | None = Field(None, description="comma-separated read-only bearer tokens (env var only; never a flag)")
    allow_unauthenticated: bool = Field(False, description="allow a non-loopback bind without ingest tokens")
    protect_metrics: bool = Field(False, description="require a bearer token (either kind) on /metrics too")
    # Idle keep-alive connections stay open longer than Prometheus' and Alertmanager's HTTP
    # clients keep them (5 minutes), so the client, not the server, closes an idle one: with
    # uvicorn's default of 5 s a request sent just as the server closed the connection failed
    # with "connection reset by peer". The connection cap reclaims idle ones when needed.
    keep_alive_timeout: float = Field(310, gt=0, description="idle keep-alive connections are closed after this (longer than Prometheus keeps them)")
    header_timeout: float = Field(10, gt=0, description="a request's headers must arrive within this, or the connection is closed (HTTP 408)")
    body_timeout: float = Field(30, gt=0, description="a request body may pause this long between reads before the connection is closed")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="largest request line plus headers; larger gets HTTP 431")
    max_connections: int = Field(1000, gt=0, description="open connections; beyond it the longest-idle one is closed, or the new one if none is idle")
    limit_concurrency: int = Field(0, ge=0, description="uvicorn's limit: HTTP 503 once this many connections or requests are open (0: off)")
    tail: list[Path] = Field(default_factory=list, description="JSONL files to follow like tail -f (resumes after a restart)")
    demo: bool = Field(False, description="backfill a week of synthetic history and keep generating traffic")
    log_level: str = Field("info", description="debug, info, warning or error")
    prices: dict[str, dict[str, float]] = Field(default_factory=dict, description="USD per million tokens by model and token type (YAML only; overrides every shipped price)")
    price_aliases: dict[str, str] = Field(default_factory=dict, description="model names to price as another model, e.g. Azure deployments: {my-deployment: gpt-4o} (YAML only)")
    signals: dict[str, dict[str, float]] = Field(default_factory=dict, description="per-signal threshold overrides, e.g. signals.cost_per_hour.warning_ratio (YAML only)")
    drift: dict[str, Any] = Field(default_factory=dict, description="drift detector settings: window, min_fill, preset, model_presets (YAML only)")
    runaway: dict[str, Any] = Field(default_factory=dict, description="runaway-loop detector settings (YAML only)")
    budgets: dict[str, Any] = Field(default_factory=dict, description="timezone, day_usd, month_usd, apps: {app: {day, month}} (YAML only)")

    @field_validator(*DURATIONS, mode="before")
    @classmethod
    def _durations(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be debug, info, warning or error")
        return v.lower()

    def tokens(self) -> set[str]:
        """Tokens for ingest and reads, from the file and the environment (never from a flag)."""
        return _read_tokens("auth_token_file", self.auth_tokens, self.auth_token_file)

    def read_only_tokens(self) -> set[str]:
        """Tokens for the read endpoints only."""
        return _read_tokens("read_token_file", self.read_tokens, self.read_token_file)

    def check_binding(self) -> None:
        """Refuse to listen beyond loopback without authentication unless told to. Loopback
        is judged on the addresses the host name resolves to (`127.evil.example` is a name)."""
        if not is_loopback(self.host) and not self.tokens() and not self.allow_unauthenticated:
            raise ConfigError(
                f"host: binding {self.host} exposes ingest to the network; set auth_token_file "
                f"(or {ENV_PREFIX}AUTH_TOKENS) or pass --allow-unauthenticated")


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"host: cannot resolve {host!r}") from None
    addresses = {str(info[4][0]).split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def _read_tokens(knob: str, inline: str | None, path: Path | None) -> set[str]:
    found: set[str] = set()
    if inline:
        found.update(t.strip() for t in inline.split(",") if t.strip())
    if path:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{knob}: cannot read {path}: {e.strerror}") from None
        found.update(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return found


SCALAR_FIELDS = [n for n, f in Settings.model_fields.items() if n not in ("prices", "price_aliases", "signals", "drift", "runaway", "budgets")]
FLAG_FORBIDDEN = {"auth_tokens", "read_tokens"}


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """LLM_EXPORTER_<KNOB> values for the scalar knobs (tail takes a comma list)."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name in SCALAR_FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            v: Any = environ[key]
            if name == "tail":
                v = [p for p in v.split(",") if p]
            elif Settings.model_fields[name].annotation is bool:
                v = _env_bool(key, v)
            out[name] = v
    return out


def _env_bool(key: str, v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: must be true or false, got {v!r}")


def load_settings(config_file: Path | str | None = None, flags: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Merge the four layers and validate once, naming the bad knob and its source."""
    layers: list[tuple[str, dict[str, Any]]] = []
    config_file = config_file or (environ if environ is not None else os.environ).get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            doc = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config: cannot read {config_file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {config_file} is not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config: {config_file} must hold a mapping of knob: value")
        layers.append((f"config file {config_file}", {k.replace("-", "_"): v for k, v in doc.items()}))
    layers.append(("environment", env_overrides(environ)))
    layers.append(("command line", {k: v for k, v in (flags or {}).items() if v is not None}))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        for k, v in values.items():
            merged[k] = v
            origin[k] = source
    try:
        settings = Settings(**merged)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            knob = str(err["loc"][0]) if err["loc"] else "?"
            where = origin.get(knob, "defaults")
            hint = f" ({ENV_PREFIX}{knob.upper()})" if where == "environment" else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "is not a known setting (see llm-usage-exporter --help)"
            problems.append(f"{knob}{hint} from {where}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    if settings.horizon < settings.baseline + settings.window:
        raise ConfigError("horizon: must cover the baseline plus the window "
                          f"({settings.horizon:g}s < {settings.baseline + settings.window:g}s)")
    return settings
