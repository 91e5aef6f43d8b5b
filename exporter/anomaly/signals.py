"""The anomaly signals and their default thresholds.

These defaults are the exporter's own verdict (landing page, `/api/anomalies`,
`llm_anomaly_severity`). The shipped Prometheus rules hold the same numbers in
`prometheus/rules/thresholds.yml`; `tests/test_thresholds_agree.py` keeps the two equal,
so tuning one without the other fails the build.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Literal

Direction = Literal["up", "down", "both"]


class Severity(IntEnum):
    """Published as `llm_anomaly_severity`: 0 ok, 1 warning, 2 high."""

    OK = 0
    WARNING = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """How one signal is judged.

    `warning_ratio` / `high_ratio` are multiples of the baseline for "up" signals. For
    "down" signals the verdict fires when current/baseline falls to 1/ratio or below, so
    the same numbers read "halved" as 2. "both" applies both directions.
    `min_current` keeps tiny absolute values quiet (a jump from $0.001 to $0.003 is not
    an anomaly); for "down" signals it applies to the baseline instead, since the current
    value of a drop is by nature small. `baseline_floor` bounds the ratio's denominator so
    a baseline of zero errors does not make every error infinite. `min_requests` is the
    number of requests the window needs before the ratio means anything (quantiles and
    error ratios of five requests are noise). `log_space` says whether the baseline's
    median/MAD are taken over log values (skewed quantities: cost, tokens, latency).
    `seasonal` compares with the same time of day on earlier days only (the `seasonal`
    setting turns it on for every signal); such a signal needs six days of history before
    its first verdict.
    """

    name: str
    unit: str
    direction: Direction
    warning_ratio: float
    high_ratio: float
    min_current: float
    baseline_floor: float
    min_requests: int
    log_space: bool
    min_zscore: float = 3.0
    min_baseline_hours: int = 24
    seasonal: bool = False
    help: str = ""


# Chosen with bench/detection (injected anomalies on real traffic; see docs/tuning.md):
# a z of 2 for cost, tokens and latency catches 5x spikes that a z of 3 missed on traffic
# with a daily cycle, with no more false warnings; 50 requests before an error-rate verdict
# cut its false warnings from 50 to 7 a week; TTFT at 2x and throughput at 1/1.75 raised
# their recall with no paging false warnings. Request rate is judged against the same time
# of day: against a flat week every night looked like an outage (109 false drop warnings a
# week on a real daily cycle).
DEFAULT_SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("cost_per_hour", "USD", "up", 2.0, 4.0, 0.10, 0.01, 0, True, min_zscore=2.0,
               help="cost over the window, scaled to one hour"),
    SignalSpec("token_velocity", "tokens/min", "up", 3.0, 6.0, 100.0, 1.0, 0, True, min_zscore=2.0,
               help="tokens per minute over the window (all token types)"),
    SignalSpec("request_rate", "requests/min", "both", 3.0, 6.0, 0.5, 0.05, 0, True, seasonal=True,
               help="requests per minute over the window"),
    SignalSpec("error_rate", "ratio", "up", 2.5, 5.0, 0.05, 0.01, 50, False,
               help="errors / requests over the window"),
    SignalSpec("latency_p95", "seconds", "up", 2.5, 5.0, 0.0, 0.01, 20, True, min_zscore=2.0,
               help="p95 request duration over the window"),
    SignalSpec("ttft_p95", "seconds", "up", 2.0, 4.0, 0.0, 0.01, 20, True,
               help="p95 time to first token over the window (streamed requests)"),
    SignalSpec("output_tokens_per_second", "tokens/s", "down", 1.75, 3.5, 1.0, 0.1, 20, True,
               help="median output tokens per second of generation time"),
)

SIGNAL_NAMES: tuple[str, ...] = tuple(s.name for s in DEFAULT_SIGNALS)


def signal_specs(overrides: dict[str, dict[str, float]] | None = None) -> tuple[SignalSpec, ...]:
    """The default specs with per-signal overrides from configuration applied."""
    if not overrides:
        return DEFAULT_SIGNALS
    unknown = set(overrides) - set(SIGNAL_NAMES)
    if unknown:
        raise ValueError(f"signals: unknown signal(s) {sorted(unknown)}; known: {list(SIGNAL_NAMES)}")
    return tuple(replace(s, **overrides.get(s.name, {})) for s in DEFAULT_SIGNALS)  # type: ignore[arg-type]
