"""The anomaly signals: what each one measures, and the thresholds it is judged by.

The specs here are the one source of the anomaly thresholds. The exporter judges with
them (landing page, `/api/anomalies`, `llm_anomaly_severity`), and
`llm-usage-exporter rules` writes `prometheus/rules/thresholds.yml` and the anomaly alert
rules from them; a test fails when the checked-in files are not what the specs generate.
Overrides come from the `signals:` section of the configuration (or a thresholds file
written by `llm-usage-exporter tune`).

A verdict needs two things. The change must be big enough to matter: the signal's
estimated ratio to its baseline passes `warning_ratio` (or `high_ratio`). And it must be
real: the evidence behind that estimate passes a z threshold that the exporter derives
from its false-alarm budget (`alert_budget`, see `evidence.z_threshold`), so thresholds
on effect size are the only numbers to tune per signal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import IntEnum
from typing import Any, Literal

Direction = Literal["up", "down", "both"]
Family = Literal["usage", "performance"]


class Severity(IntEnum):
    """Published as `llm_anomaly_severity`: 0 ok, 1 warning, 2 high."""

    OK = 0
    WARNING = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """How one signal is judged.

    `warning_ratio` / `high_ratio`: how far the signal must move from its baseline. For
    "up" signals, multiples of the baseline; for "down" ones the verdict fires when the
    value falls to 1/ratio or below, so 2 reads "halved". Request rate moves both ways and
    has its own pair for drops (`drop_warning_ratio` / `drop_high_ratio`): night-time lulls
    in real traffic routinely reach a third of the usual rate, outages reach a tenth.
    `sustained_ratio`: a smaller change that warns when it holds for hours (a creep, a
    level shift), judged over 2, 4 and 8 hours: for cost and tokens a rise in request
    size, for the request rate a shift either way against the time of day.
    `min_current`: the smallest value worth a verdict, in the signal's unit (a jump from
    $0.001 to $0.003 an hour is not an anomaly); for drops it applies to the baseline.
    `min_baseline_hours`: history needed before the first verdict.
    `family`: usage signals (cost, tokens, requests) are explained by the app that sends
    them, performance signals (errors, latency) by the model that serves them; when an app
    and a model both show the same anomaly, the alert names the one its family points to.
    """

    name: str
    unit: str
    direction: Direction
    warning_ratio: float
    high_ratio: float
    min_current: float
    family: Family
    drop_warning_ratio: float = 0.0
    drop_high_ratio: float = 0.0
    sustained_ratio: float = 0.0
    min_baseline_hours: int = 24
    help: str = ""
    text: "SignalText | None" = None

    @property
    def directions(self) -> tuple[str, ...]:
        return ("up", "down") if self.direction == "both" else (self.direction,)

    def knobs(self) -> dict[str, float]:
        """The tunable numbers, by name (what `signals.<name>.<knob>` may override)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in TUNABLE}


@dataclass(frozen=True, slots=True)
class SignalText:
    """How a signal reads in alerts and dashboards (the generated rules take it from here).

    `alerts` names the alert of each direction the signal moves in; `measure` starts the
    alert's description; `value` renders a number of the signal's unit in an alert
    template as prefix, Go template function and suffix; `grafana_unit` and `axis` are for
    panels."""

    title: str
    alerts: dict[str, tuple[str, str]]       # direction -> (alert name, summary)
    measure: str
    value: tuple[str, str, str]
    grafana_unit: str
    axis: str


TUNABLE = ("warning_ratio", "high_ratio", "drop_warning_ratio", "drop_high_ratio", "sustained_ratio",
           "min_current", "min_baseline_hours")

# Effect sizes, with the reason for each (bench/detection measured what they trade):
# - cost 1.5x / 3x: spend one and a half times its usual level, on strong evidence, is what
#   a team wants to hear about; the evidence test keeps quiet traffic quiet. Over hours, a
#   1.25x rise warns as a creep.
# - tokens 2x / 4x: tokens move with cost; the cost signal carries the smaller steps.
# - request rate 3x / 6x up, 5x / 10x down: a drop must reach a fifth of the usual rate,
#   because real traffic has quiet spells at a third.
# - error rate 2.5x / 5x of its usual ratio, and at least 5 % of requests.
# - latency p95 2x / 5x; TTFT p95 2x / 4x; throughput down to 1/1.75 and 1/3.5. A change of
#   exactly the ratio is caught about half the time, so the warning sits below the 2.5x
#   rise that must not be missed. Halved token speed then warns on latency too, at the
#   throughput alert's scope, so in its notification.
DEFAULT_SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("cost_per_hour", "USD", "up", 1.5, 3.0, 0.10, "usage", sustained_ratio=1.25,
               help="cost over the window, scaled to one hour",
               text=SignalText("Cost per hour", {"up": ("LLMCostSpike", "LLM spend is far above its usual level")},
                               "Cost over the last hour", ("$", 'printf "%.2f"', "/h"), "currencyUSD", "USD / hour")),
    SignalSpec("token_velocity", "tokens/min", "up", 2.0, 4.0, 100.0, "usage", sustained_ratio=1.5,
               help="tokens per minute over the window (all token types)",
               text=SignalText("Token velocity",
                               {"up": ("LLMTokenVelocitySpike", "LLM token throughput is far above its usual level")},
                               "Tokens per minute over the last hour", ("", "humanize", " tokens/min"), "short",
                               "tokens / min")),
    SignalSpec("request_rate", "requests/min", "both", 3.0, 6.0, 0.5, "usage", drop_warning_ratio=5.0,
               drop_high_ratio=10.0, sustained_ratio=1.5, min_baseline_hours=72,
               help="requests per minute over the window, against the same time of day",
               text=SignalText("Request rate",
                               {"up": ("LLMRequestRateSpike", "LLM request rate is far above its usual level"),
                                "down": ("LLMRequestRateDrop", "LLM request rate has fallen far below its usual level")},
                               "Requests per minute over the last hour", ("", 'printf "%.1f"', " requests/min"), "short",
                               "requests / min")),
    SignalSpec("error_rate", "ratio", "up", 2.5, 5.0, 0.05, "performance",
               help="errors / requests over the window",
               text=SignalText("Error ratio", {"up": ("LLMErrorRateSpike", "LLM error rate is far above its usual level")},
                               "The share of failed requests over the last hour", ("", "humanizePercentage", ""),
                               "percentunit", "errors / requests")),
    SignalSpec("latency_p95", "seconds", "up", 2.0, 5.0, 0.0, "performance",
               help="p95 request duration over the window",
               text=SignalText("Latency p95",
                               {"up": ("LLMLatencySpike", "LLM request latency (p95) is far above its usual level")},
                               "p95 request duration over the last hour", ("", "humanizeDuration", ""), "s", "seconds")),
    SignalSpec("ttft_p95", "seconds", "up", 2.0, 4.0, 0.0, "performance",
               help="p95 time to first token over the window (streamed requests)",
               text=SignalText("Time to first token p95",
                               {"up": ("LLMTimeToFirstTokenSpike",
                                       "LLM time to first token (p95) is far above its usual level")},
                               "p95 time to first token over the last hour", ("", "humanizeDuration", ""), "s", "seconds")),
    SignalSpec("output_tokens_per_second", "tokens/s", "down", 1.75, 3.5, 1.0, "performance",
               help="median output tokens per second of generation time",
               text=SignalText("Output tokens per second",
                               {"down": ("LLMThroughputDrop", "LLM output throughput has fallen far below its usual level")},
                               "Median output throughput over the last hour", ("", 'printf "%.1f"', " tokens/s"), "short",
                               "tokens / s")),
)

SIGNAL_NAMES: tuple[str, ...] = tuple(s.name for s in DEFAULT_SIGNALS)


def signal_specs(overrides: dict[str, dict[str, Any]] | None = None) -> tuple[SignalSpec, ...]:
    """The default specs with per-signal overrides from configuration applied; unknown
    signals and knobs are refused with a message naming them."""
    if not overrides:
        return DEFAULT_SIGNALS
    unknown = set(overrides) - set(SIGNAL_NAMES)
    if unknown:
        raise ValueError(f"signals: unknown signal(s) {sorted(unknown)}; known: {list(SIGNAL_NAMES)}")
    out = []
    for s in DEFAULT_SIGNALS:
        over = dict(overrides.get(s.name) or {})
        bad = set(over) - set(TUNABLE)
        if bad:
            raise ValueError(f"signals.{s.name}: unknown knob(s) {sorted(bad)}; known: {list(TUNABLE)}")
        for k, v in over.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"signals.{s.name}.{k}: must be a non-negative number, got {v!r}")
        changes: dict[str, Any] = {k: (int(v) if k == "min_baseline_hours" else float(v)) for k, v in over.items()}
        spec = replace(s, **changes)
        if spec.high_ratio < spec.warning_ratio:
            raise ValueError(f"signals.{s.name}: high_ratio ({spec.high_ratio:g}) is below warning_ratio "
                             f"({spec.warning_ratio:g})")
        out.append(spec)
    return tuple(out)
