"""Settings: defaults in code, then a YAML file, then LLM_EXPORTER_* variables, then flags.

One typed model holds every knob, the detectors' sections included: each detector
defines its own settings model beside its code (`detectors.drift.DriftSettings`,
`detectors.runaway.RunawaySettings`, `detectors.budget.BudgetSettings`) and `Settings`
composes them, so this module sits above the detectors in the import graph. The command
line is generated from the model (`knobs`), so `--help` lists every knob with its flag,
environment variable and default; a section's scalar knobs have their own
(`--runaway-chain-max-calls`, `LLM_EXPORTER_RUNAWAY__CHAIN_MAX_CALLS`). The four layers are
merged knob by knob and validated once, by pydantic, which also runs each section's own
checks; a bad value anywhere refuses to start with a message that names the knob and
where it came from. Durations accept 30s / 5m / 48h / 7d or seconds and are shown as
`60m`; in a section, a number of seconds is a knob whose name ends in `_s`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import typing
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .anomaly.signals import signal_specs
from .detectors.budget import BudgetSettings
from .detectors.drift import DriftSettings
from .detectors.runaway import RunawaySettings
from .durations import Duration, format_duration, parse_duration
from .ingest.attribution import (
    APP_SOURCES,
    DEFAULT_APP_PRECEDENCE,
    DEFAULT_APP_TAG_PREFIX,
    Attribution,
    check_precedence,
)
from .zones import zone

ENV_PREFIX = "LLM_EXPORTER_"
NESTED = "__"          # LLM_EXPORTER_RUNAWAY__CHAIN_MAX_CALLS
__all__ = ["ENV_PREFIX", "ConfigError", "Knob", "Settings", "knobs", "load_settings", "parse_duration"]


class ConfigError(ValueError):
    """A setting is invalid; the message names the knob."""


def _lower(v: Any) -> Any:
    return v.lower() if isinstance(v, str) else v


T = typing.TypeVar("T")
Lower = Annotated[T, BeforeValidator(_lower)]


def _app_sources(v: Any) -> Any:
    """A comma list (a flag, a variable) or a YAML list of app sources, checked."""
    if isinstance(v, str):
        v = [p for p in v.split(",") if p.strip()]
    return list(check_precedence(v)) if isinstance(v, (list, tuple)) else v


def _provider_name(v: Any) -> Any:
    if isinstance(v, str):
        v = v.strip().lower()
        if not v:
            return None
        if len(v) > 200:
            raise ValueError("must be at most 200 characters")
    return v


AppSources = Annotated[list[str], BeforeValidator(_app_sources)]


class Settings(BaseModel):
    """Every knob of the exporter."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="address to bind; anything but loopback needs ingest tokens or --allow-unauthenticated")
    port: int = Field(9473, ge=1, le=65535, description="TCP port for the HTTP API and /metrics")
    db: Path = Field(Path("llm-usage.db"), description="SQLite file holding history, counter totals and the dedupe window")
    window: Duration = Field(3600, gt=0, description="the window each anomaly signal is measured over (current value)")
    baseline: Duration = Field(7 * 86400, gt=0, description="how far back the rolling baseline reaches")
    horizon: Duration = Field(14 * 86400, gt=0, description="how long hourly buckets are kept (at least the baseline; two weeks or more let a weekly pattern, such as quiet weekends, be learned)")
    alert_budget: float = Field(1.0, gt=0, description="false anomaly warnings a week the evaluator's evidence thresholds allow, over all signals and scopes together")
    page_budget_share: float = Field(1.0, gt=0, le=1, description="share of the false-alarm budgets (alert_budget, and the drift preset's) that may page: a high verdict, a critical alert, needs evidence past the threshold of that smaller budget, else it is a warning; 1 asks of a page the evidence of a warning, 0.2 about 0.35 more in z (fewer false pages on quiet scopes, later pages on real ones: docs/tuning.md)")
    timezone: str = Field("UTC", description="IANA time zone of the people the traffic follows, e.g. Europe/Berlin: the baseline learns the hours of the day and week in their local time, so a daylight saving change does not read as a day shifted by an hour (also the budgets' days, unless budgets.timezone is set)")
    evaluation_interval: Duration = Field(30, gt=0, description="how often the evaluator recomputes the anomaly gauges")
    dedupe_window: Duration = Field(48 * 3600, ge=0, description="how long a request_id is remembered, so retries count once")
    record_retention: Duration = Field(72 * 3600, ge=0, description="how long raw records are kept for /v1/usage/recent and export (0: not kept)")
    minute_retention: Duration = Field(6 * 3600, gt=0, description="how long minute buckets are kept")
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="largest accepted POST body, also after gzip/deflate decoding; larger gets HTTP 413")
    max_errors_listed: int = Field(100, gt=0, description="rejected records listed with their reason in an ingest answer (the rest are counted)")
    ingest_queue_bytes: int = Field(64 * 1024 * 1024, gt=0, description="request bodies waiting for or in ingest; a POST beyond it gets HTTP 429")
    store_busy_timeout: Duration = Field(2, ge=0, description="how long a write waits for a lock another process holds on the db before HTTP 503")
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
    keep_alive_timeout: Duration = Field(310, gt=0, description="idle keep-alive connections are closed after this (longer than Prometheus keeps them)")
    header_timeout: Duration = Field(10, gt=0, description="a request's headers must arrive within this, or the connection is closed (HTTP 408)")
    body_timeout: Duration = Field(30, gt=0, description="a request body may pause this long between reads before the connection is closed")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="largest request line plus headers; larger gets HTTP 431")
    max_connections: int = Field(1000, gt=0, description="open connections; beyond it the longest-idle one is closed, or the new one if none is idle")
    limit_concurrency: int = Field(0, ge=0, description="uvicorn's limit: HTTP 503 once this many connections or requests are open (0: off)")
    tail: list[Path] = Field(default_factory=list, description="JSONL files to follow like tail -f (resumes after a restart)")
    demo: bool = Field(False, description="backfill a week of synthetic history and keep generating traffic")
    prometheus_url: str | None = Field(None, description="the Prometheus that scrapes the blackbox exporter's backend probes, e.g. http://prometheus:9090; GET /api/backends reads them from it (unset: that endpoint answers 503)")
    prometheus_timeout: Duration = Field(5, gt=0, description="how long GET /api/backends waits for each answer of prometheus_url")
    prometheus_token_file: Path | None = Field(None, description="file with the bearer token prometheus_url wants, if any (read at each request)")
    log_level: Lower[Literal["debug", "info", "warning", "error"]] = Field("info", description="debug, info, warning or error")
    sqlite_synchronous: Lower[Literal["off", "normal", "full", "extra"]] = Field(
        "normal", description="SQLite's synchronous mode: normal survives a process crash, full also a power loss")
    prices: dict[str, dict[str, float]] = Field(default_factory=dict, description="USD per million tokens by model and token type (YAML only; overrides every shipped price)")
    price_aliases: dict[str, str] = Field(default_factory=dict, description="model names to price as another model, e.g. Azure deployments: {my-deployment: gpt-4o} (YAML only)")
    signals: dict[str, dict[str, float]] = Field(default_factory=dict, description="per-signal threshold overrides, e.g. signals.cost_per_hour.warning_ratio (YAML only; over thresholds_file)")
    thresholds_file: Path | None = Field(None, description="YAML file with a signals: section (as `llm-usage-exporter tune` writes it); the config's own signals: override it")
    default_provider: Annotated[str | None, BeforeValidator(_provider_name)] = Field(
        None, description="provider of a record that names none, when neither the X-LLM-Provider header, ?provider= "
                          "nor the object's shape does (none: such a record is refused)")
    app_precedence: AppSources = Field(
        default_factory=lambda: list(DEFAULT_APP_PRECEDENCE),
        description="where a record's app comes from, first found wins (comma list): " + ", ".join(APP_SOURCES))
    app_tag_prefix: str = Field(DEFAULT_APP_TAG_PREFIX, max_length=50,
                                description="a LiteLLM request tag starting with this names the app (app:support-bot)")
    drift: DriftSettings = Field(default_factory=DriftSettings, description="drift detector: quality that degrades while still returning 200")
    runaway: RunawaySettings = Field(default_factory=RunawaySettings, description="runaway-loop detector: sessions that loop, burst or cost too much")
    budgets: BudgetSettings = Field(default_factory=BudgetSettings, description="spend budgets and the calendar they count in")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        zone(v)
        return v

    @model_validator(mode="after")
    def _budgets_follow_the_zone(self) -> Settings:
        """Budgets count in the users' days too, unless `budgets.timezone` says otherwise."""
        if "timezone" not in self.budgets.model_fields_set and self.budgets.timezone != self.timezone:
            self.budgets.timezone = self.timezone
        return self

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        """An http(s) base URL without query or fragment; '' counts as unset."""
        if v is None or not v.strip():
            return None
        parts = urllib.parse.urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"must be an http:// or https:// base URL like http://prometheus:9090, got {v!r}")
        return v.strip().rstrip("/")

    def attribution(self) -> Attribution:
        """The app and provider precedence these settings configure."""
        return Attribution(tuple(self.app_precedence), self.app_tag_prefix, self.default_provider)

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


# --- the knobs, as the command line and the environment see them ---------------------------

SECTIONS = ("drift", "runaway", "budgets")          # typed sections with knobs of their own
YAML_ONLY = ("prices", "price_aliases", "signals")   # free-form mappings
FLAG_FORBIDDEN = {"auth_tokens", "read_tokens"}      # secrets: a file or the environment, never a flag
_SCALARS = (bool, int, float, str, Path)


@dataclass(frozen=True, slots=True)
class Knob:
    """One setting as a person meets it: `path` is ("port",) or ("runaway", "chain_max_calls")."""

    path: tuple[str, ...]
    annotation: Any
    default: Any
    description: str
    duration: bool

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def scalar(self) -> bool:
        """A value that fits a flag or an environment variable (mappings are YAML only)."""
        return self.path[0] not in YAML_ONLY and (len(self.path) > 1 or self.path[0] not in SECTIONS) and \
            _is_scalar(self.annotation)

    @property
    def env(self) -> str | None:
        return ENV_PREFIX + NESTED.join(self.path).upper() if self.scalar else None

    @property
    def flag(self) -> str | None:
        if not self.scalar or self.name in FLAG_FORBIDDEN:
            return None
        return "--" + "-".join(self.path).replace("_", "-")

    @property
    def dest(self) -> str:
        return NESTED.join(self.path)

    def show(self, value: Any) -> str:
        """A value as the help shows it: durations as `60m`, paths as text, none for None."""
        if self.path[0] in SECTIONS and len(self.path) == 1:
            return "(below)"
        if value is None:
            return "none"
        if self.duration and isinstance(value, (int, float)):
            return format_duration(float(value))
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list) and value:         # as a flag or a variable takes it
            return ",".join(map(str, value))
        if isinstance(value, (Path, str)):
            return str(value) or "''"
        return repr(value)


def _is_scalar(annotation: Any) -> bool:
    """A type a flag or a variable can hold: a scalar, an optional one, or a list of them
    (a repeated flag, a comma list in the variable)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_scalar(args[0])
    if origin is Literal:
        return True
    if origin is dict:
        return False
    if args and origin is not None:     # X | None, list[X]
        return all(_is_scalar(a) for a in args)
    return annotation in _SCALARS


def _is_duration(annotation: Any, metadata: typing.Sequence[Any] = ()) -> bool:
    """A `Duration` field (pydantic keeps the Annotated part of a model field in `metadata`)."""
    if typing.get_origin(annotation) is Annotated:
        metadata = [*metadata, *typing.get_args(annotation)[1:]]
    return any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in metadata)


def _field_docs(cls: type) -> dict[str, str]:
    """Per-field help from a docstring's "`name`: what it is. Why ..." lines (the first
    sentence), for settings classes that keep their field notes in the docstring."""
    out: dict[str, str] = {}
    names: list[str] = []
    text: list[str] = []

    def flush() -> None:
        sentence = " ".join(text).split(". ")[0].strip().rstrip(".")
        for n in names:
            out.setdefault(n, sentence)
    for line in (cls.__doc__ or "").splitlines():
        s = line.strip()
        head, colon, rest = s.partition(": ")
        if s.startswith("`") and colon and all(p.strip().startswith("`") for p in head.split(",")):
            flush()
            names, text = [p.strip().strip("`") for p in head.split(",")], [rest]
        elif s and names:
            text.append(s)
        else:
            flush()
            names, text = [], []
    flush()
    return out


def _section_knobs(name: str, cls: Any) -> Iterator[Knob]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        for leaf, f in cls.model_fields.items():
            default = f.get_default(call_default_factory=True)
            yield Knob((name, leaf), f.annotation, default, f.description or "", _is_duration(f.annotation, f.metadata))
        return
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        duration = field.name.endswith("_s") and hints[field.name] is float
        annotation = Annotated[float, BeforeValidator(parse_duration)] if duration else hints[field.name]
        yield Knob((name, field.name), annotation, default, docs.get(field.name, ""), duration)


def knobs() -> Iterator[Knob]:
    """Every knob in order: each top-level setting, and after each section its own knobs."""
    for name, f in Settings.model_fields.items():
        default = f.get_default(call_default_factory=True)
        yield Knob((name,), f.annotation, default, f.description or "", _is_duration(f.annotation, f.metadata))
        if name in SECTIONS:
            yield from _section_knobs(name, f.annotation)


def env_overrides(environ: typing.Mapping[str, str] | None = None) -> dict[str, Any]:
    """LLM_EXPORTER_<KNOB> values of the scalar knobs, by dotted knob name (tail takes a comma list)."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for knob in knobs():
        if knob.env is None or knob.env not in environ:
            continue
        v: Any = environ[knob.env]
        if knob.name == "tail":
            v = [p for p in v.split(",") if p]
        elif _is_bool(knob.annotation):
            v = _env_bool(knob.env, v)
        out[knob.name] = v
    return out


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _env_bool(key: str, v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: must be true or false, got {v!r}")


def _nest(flat: dict[str, Any], origin: dict[str, str], source: str, merged: dict[str, Any]) -> None:
    """Merge dotted knob values into `merged` (a section's knobs one by one, so a variable
    overrides one knob of a YAML section, not the whole section), noting each one's source."""
    for name, v in flat.items():
        section, dot, leaf = name.partition(".")
        if dot:
            current = merged.get(section)
            merged[section] = {**(current if isinstance(current, dict) else {}), leaf: v}
        else:
            merged[name] = v
        origin[name] = source


def _durations_in_sections(merged: dict[str, Any]) -> None:
    """Section knobs in seconds that the section's own class takes as plain numbers."""
    for knob in knobs():
        if len(knob.path) == 2 and knob.duration:
            section = merged.get(knob.path[0])
            if isinstance(section, dict) and isinstance(section.get(knob.path[1]), str):
                try:
                    section[knob.path[1]] = parse_duration(section[knob.path[1]])
                except ValueError:
                    pass            # validation names the knob and the value


def load_settings(config_file: Path | str | None = None, flags: dict[str, Any] | None = None,
                  environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Merge the four layers knob by knob and validate once, naming the bad knob and its source."""
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            doc = yaml.safe_load(Path(config_file).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config: cannot read {config_file}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {config_file} is not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config: {config_file} must hold a mapping of knob: value")
        layers.append((f"config file {config_file}", _flatten_sections({k.replace("-", "_"): v for k, v in doc.items()})))
    layers.append(("environment", env_overrides(environ)))
    layers.append(("command line", {k.replace(NESTED, "."): v for k, v in (flags or {}).items() if v is not None}))
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        _nest(values, origin, source, merged)
    _durations_in_sections(merged)
    try:
        settings = Settings(**merged)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = [str(x) for x in err["loc"]]
            knob = ".".join(loc[:2]) if loc[:1] and loc[0] in SECTIONS else (loc[0] if loc else "?")
            sources = {src for name, src in origin.items() if name == knob or name.startswith(knob + ".")}
            where = origin.get(knob) or " and ".join(sorted(sources)) or "defaults"
            hint = f" ({ENV_PREFIX}{knob.upper().replace('.', NESTED)})" if where == "environment" else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
                msg = "is not a known setting (see llm-usage-exporter --help)"
            problems.append(f"{knob}{hint} from {where}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    if settings.horizon < settings.baseline + settings.window:
        raise ConfigError("horizon: must cover the baseline plus the window "
                          f"({settings.horizon:g}s < {settings.baseline + settings.window:g}s)")
    if settings.thresholds_file is not None:
        settings = settings.model_copy(update={"signals": _tuned_signals(settings.thresholds_file, settings.signals)})
    try:
        signal_specs(settings.signals)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return settings


def _tuned_signals(path: Path, own: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The thresholds file's signals: section, with the configuration's own knobs on top."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"thresholds_file: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"thresholds_file: {path} is not valid YAML: {e}") from None
    tuned = doc.get("signals") if isinstance(doc, dict) else None
    if not isinstance(tuned, dict) or not all(isinstance(v, dict) for v in tuned.values()):
        raise ConfigError(f"thresholds_file: {path} must hold a mapping signals: {{signal: {{knob: value}}}}")
    merged = {str(k): dict(v) for k, v in tuned.items()}
    for name, knobs in own.items():
        merged[name] = {**merged.get(name, {}), **knobs}
    return merged


def _flatten_sections(doc: dict[str, Any]) -> dict[str, Any]:
    """A YAML document's sections as dotted knobs (`runaway: {chain_max_calls: 80}` is
    `runaway.chain_max_calls`), so each knob of a section can be overridden on its own;
    a section that is not a mapping is left whole for validation to refuse."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if k in SECTIONS and isinstance(v, dict):
            out.update({f"{k}.{leaf}": value for leaf, value in v.items()})
            if not v:
                out[k] = {}
        else:
            out[k] = v
    return out
