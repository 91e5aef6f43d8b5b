"""Quality drift: the failures that still return HTTP 200.

A provider can degrade without a single error: responses come back empty, get shorter
and shorter, stop calling the tools they were given, or end for odd reasons (a safety
filter, a recitation check). None of that moves the request or error counters, so this
module watches the responses themselves.

For every (provider, model) it keeps the most recent `window` responses in a ring
buffer of numpy columns (event time, output tokens, a bit mask of per-response facts)
and, at evaluation time, computes five signals over the entries younger than
`max_age_s`:

- `empty_response_rate`: non-error responses with zero output tokens / non-error responses
- `length_collapse_ratio`: median output tokens of the recent half of the window / median
  of the earlier half (non-error, non-empty responses; small means collapse), each
  answer measured against the median of its own app, so that one model shared by a
  terse app and a verbose one does not "collapse" when the terse app gets busier
- `tool_silence_rate`: non-error requests that offered tools and got no tool call /
  non-error requests that offered tools
- `stop_anomaly_rate`: non-error responses whose stop reason is not a normal end, a tool
  call or a length limit / non-error responses
- `error_rate`: errors / all responses

The window is counted in responses rather than time because quality is a property of
responses: a model serving 10 requests an hour and one serving 10 a second both get a
verdict resting on the same number of samples. The age limit stops a quiet model's
verdict from resting on yesterday's traffic.

Thresholds are absolute (a rate or a ratio, not a multiple of a baseline): the window
already compares the recent past with itself for length, and the other rates have
natural healthy levels near zero. Three presets trade sensitivity for noise; the
numbers are in `PRESETS` with the reasoning beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.codes import factorize
from exporter.ingest.records import RecordColumns

SIGNALS: tuple[str, ...] = (
    "empty_response_rate",
    "length_collapse_ratio",
    "tool_silence_rate",
    "stop_anomaly_rate",
    "error_rate",
)

# Stop reasons that mean "the model finished normally": a natural end, a tool call, or a
# length limit the caller asked for. Spellings of OpenAI, Anthropic, Gemini, Bedrock and
# local servers. A missing stop reason is normal too, since many sources do not send one.
NORMAL_STOP_REASONS: frozenset[str] = frozenset({
    "stop", "end_turn", "stop_sequence", "eos", "tool_use", "tool_calls", "function_call",
    "length", "max_tokens", "end", "complete", "completed", "finish", "finished",
})

# Bits of the per-response flag mask.
_ERROR = np.uint8(1)
_EMPTY = np.uint8(2)
_HAD_TOOLS = np.uint8(4)
_TOOL_SILENT = np.uint8(8)
_STOP_ANOMALY = np.uint8(16)


@dataclass(frozen=True, slots=True)
class Threshold:
    """Mild and severe limits of one signal; `above` says which side is bad."""

    mild: float
    severe: float
    above: bool = True

    def level(self, value: float) -> int:
        """0, 1 (mild) or 2 (severe); NaN is never a finding."""
        if math.isnan(value):
            return 0
        if self.above:
            return 2 if value >= self.severe else 1 if value >= self.mild else 0
        return 2 if value <= self.severe else 1 if value <= self.mild else 0


# Why these numbers. Healthy production traffic runs at roughly 0-1 % empty responses,
# 0-1 % odd stop reasons and 1-3 % errors (rate limits come in bursts). With a window of
# 200 responses the binomial noise of a 1 % rate is about 0.7 points, and about 1.4
# points at the minimum fill of 50, so the `normal` mild limits (5 %, 8 % for errors)
# sit several standard errors above a healthy level even on a half-filled window, while
# the severe limits mark a state no user would accept (one answer in seven empty). `high`
# halves the distance to the healthy level for teams that would rather look at a few
# false alarms than miss a regression; `low` suits models with known noisy behaviour
# (e.g. a content filter that trips often by design).
# Tool silence is judged more loosely because a final answer after a few tool rounds is
# itself a silent tool request: an agent averaging three tool calls per task sits near
# 25 % silence when healthy, so `normal` starts at 60 %; a model whose function calling
# broke goes to nearly 100 %. Apps where tools are merely offered should use `low`.
# Length collapse compares the recent half of the window with the earlier half; normal
# variation between two halves of 100 responses stays within ±30 %, so halving is mild
# and a drop to a quarter is severe.
PRESETS: dict[str, dict[str, Threshold]] = {
    "low": {
        "empty_response_rate": Threshold(0.10, 0.25),
        "length_collapse_ratio": Threshold(0.35, 0.15, above=False),
        "tool_silence_rate": Threshold(0.80, 0.95),
        "stop_anomaly_rate": Threshold(0.10, 0.25),
        "error_rate": Threshold(0.15, 0.40),
    },
    "normal": {
        "empty_response_rate": Threshold(0.05, 0.15),
        "length_collapse_ratio": Threshold(0.50, 0.25, above=False),
        "tool_silence_rate": Threshold(0.60, 0.85),
        "stop_anomaly_rate": Threshold(0.05, 0.15),
        "error_rate": Threshold(0.08, 0.25),
    },
    "high": {
        "empty_response_rate": Threshold(0.03, 0.08),
        "length_collapse_ratio": Threshold(0.70, 0.40, above=False),
        "tool_silence_rate": Threshold(0.40, 0.70),
        "stop_anomaly_rate": Threshold(0.03, 0.08),
        "error_rate": Threshold(0.04, 0.12),
    },
}


@dataclass(slots=True)
class DriftSettings:
    """Window and sensitivity of the drift detector.

    `window`: responses kept per (provider, model). 200 gives rates a resolution of half
    a point and each half of the length comparison 100 samples, while still turning
    over within minutes on a busy model.
    `max_age_s`: entries older than this (event time) are ignored and eventually dropped;
    6 h keeps a quiet model's verdict about the same working day.
    `min_fill`: responses needed before any verdict; below it the result is severity 0
    and `ready` False, because rates over a handful of responses are noise.
    `preset`: default sensitivity (`low`, `normal`, `high`).
    `model_presets`: per-model sensitivity, keyed by `model` or `provider/model` (the
    latter wins).
    `min_events`: a rate signal needs at least this many offending responses to count as
    mild or severe, so that 1 empty answer in 20 tool requests is not "5 %".
    `min_signal_n`: a conditional rate (tool silence over tool requests, the length
    halves) needs this many responses in its denominator, else it is NaN.
    """

    window: int = 200
    max_age_s: float = 21600.0
    min_fill: int = 50
    preset: str = "normal"
    model_presets: dict[str, str] = field(default_factory=dict)
    min_events: int = 3
    min_signal_n: int = 20

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"drift.window must be at least 2, got {self.window}")
        if not 1 <= self.min_fill <= self.window:
            raise ValueError(f"drift.min_fill must be between 1 and window ({self.window}), got {self.min_fill}")
        if not self.max_age_s > 0:
            raise ValueError(f"drift.max_age_s must be positive, got {self.max_age_s}")
        for where, name in [("preset", self.preset)] + [(f"model_presets[{k!r}]", v) for k, v in self.model_presets.items()]:
            if name not in PRESETS:
                raise ValueError(f"drift.{where}: unknown preset {name!r}; known: {sorted(PRESETS)}")

    def preset_for(self, provider: str, model: str) -> str:
        """The preset that applies to one series."""
        return self.model_presets.get(f"{provider}/{model}", self.model_presets.get(model, self.preset))


@dataclass(slots=True)
class DriftResult:
    """The verdict for one (provider, model); `values` holds all five signals (NaN when
    a signal has too little data to mean anything)."""

    provider: str
    model: str
    values: dict[str, float]
    severity: int
    reasons: list[str]
    fill: int
    ready: bool
    preset: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: NaN becomes None."""
        return {
            "provider": self.provider,
            "model": self.model,
            "values": {k: (None if math.isnan(v) else v) for k, v in self.values.items()},
            "severity": self.severity,
            "reasons": list(self.reasons),
            "fill": self.fill,
            "ready": self.ready,
            "preset": self.preset,
        }


# --- pure functions -------------------------------------------------------------------

def response_flags(cols: RecordColumns) -> np.ndarray:
    """The per-response facts the signals need, packed into one uint8 per record."""
    err = cols.is_error.astype(bool)
    ok = ~err
    empty = ok & (cols.output_tokens == 0)
    had_tools = ok & cols.request_had_tools.astype(bool)
    silent = had_tools & (cols.tool_calls == 0)
    stop_anomaly = ok & stop_is_anomalous(cols.stop_reason)
    return (err * _ERROR | empty * _EMPTY | had_tools * _HAD_TOOLS
            | silent * _TOOL_SILENT | stop_anomaly * _STOP_ANOMALY).astype(np.uint8)


def stop_is_anomalous(stop_reason: np.ndarray) -> np.ndarray:
    """True where a stop reason is present and not a normal end, tool call or length limit.

    Grouped through np.unique so the set lookup runs once per distinct reason, not per
    record."""
    if stop_reason.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    keys = np.where(np.equal(stop_reason, None), "", stop_reason).astype(str)  # type: ignore[call-overload]
    uniq, inv = np.unique(keys, return_inverse=True)
    bad = np.fromiter((u != "" and u.lower() not in NORMAL_STOP_REASONS for u in uniq), dtype=bool, count=uniq.size)
    return bad[inv]


def drift_signals(ts: np.ndarray, output_tokens: np.ndarray, flags: np.ndarray,
                  min_signal_n: int = 20, app: np.ndarray | None = None) -> dict[str, float]:
    """The five signals over one window's entries (any order; sorted by time here).

    Rates whose denominator is empty are NaN; so is the length ratio when either half
    has fewer than `min_signal_n` non-empty answers or the earlier median is zero.
    """
    n = int(ts.shape[0])
    nan = float("nan")
    if n == 0:
        return {s: nan for s in SIGNALS}
    err = (flags & _ERROR) != 0
    n_ok = n - int(err.sum())
    had_tools = int(((flags & _HAD_TOOLS) != 0).sum())

    def rate(num: int, den: int, min_den: int = 1) -> float:
        return num / den if den >= min_den else nan

    out = {
        "empty_response_rate": rate(int(((flags & _EMPTY) != 0).sum()), n_ok),
        "length_collapse_ratio": length_collapse_ratio(ts, output_tokens, flags, min_signal_n, app),
        "tool_silence_rate": rate(int(((flags & _TOOL_SILENT) != 0).sum()), had_tools, min_signal_n),
        "stop_anomaly_rate": rate(int(((flags & _STOP_ANOMALY) != 0).sum()), n_ok),
        "error_rate": rate(int(err.sum()), n),
    }
    return out


def length_collapse_ratio(ts: np.ndarray, output_tokens: np.ndarray, flags: np.ndarray,
                          min_half: int = 20, app: np.ndarray | None = None) -> float:
    """Median output length of the recent half over the earlier half of the window.

    Only successful, non-empty answers count: errors have no length and empty answers
    are already their own signal, so counting them here would report one fault twice.
    With `app` (a code per entry) the ratio is taken per app and the apps' ratios are
    combined (a geometric mean weighted by the smaller half): when a terse app gets busier
    on a model it shares with a verbose one, no app's answers got shorter, while a model
    that collapses shortens every app's. Apps with fewer than `min_half` // 4 answers in
    either half do not take part.
    """
    keep = (flags & (_ERROR | _EMPTY)) == 0
    if int(keep.sum()) < 2 * min_half:
        return float("nan")
    order = np.argsort(ts[keep], kind="stable")
    lengths = output_tokens[keep][order].astype(np.float64)
    recent = np.arange(lengths.shape[0]) >= lengths.shape[0] - lengths.shape[0] // 2
    group = np.zeros(lengths.shape[0], dtype=np.int64) if app is None else app[keep][order]
    min_app = max(1, min_half // 4)
    logs, weights = [], []
    for code in np.unique(group).tolist():         # one iteration per app on this model
        mine = group == code
        earlier_n, recent_n = int((mine & ~recent).sum()), int((mine & recent).sum())
        if min(earlier_n, recent_n) < min_app:
            continue
        earlier = float(np.median(lengths[mine & ~recent]))
        if earlier <= 0:
            continue
        logs.append(math.log(max(float(np.median(lengths[mine & recent])), 1e-9) / earlier))
        weights.append(min(earlier_n, recent_n))
    if not weights:
        return float("nan")
    return math.exp(float(np.average(logs, weights=weights)))


def judge(values: dict[str, float], thresholds: dict[str, Threshold], counts: dict[str, int],
          min_events: int) -> tuple[int, list[str]]:
    """Severity and human-readable reasons: one severe signal, or two mild ones, is severe.

    `counts` holds the number of offending responses behind each rate; a rate resting on
    fewer than `min_events` of them is not a finding.
    """
    levels: dict[str, int] = {}
    reasons: list[str] = []
    for name in SIGNALS:
        th = thresholds[name]
        v = values[name]
        lvl = th.level(v)
        if lvl and name in counts and counts[name] < min_events:
            lvl = 0
        if lvl:
            levels[name] = lvl
            limit = th.severe if lvl == 2 else th.mild
            reasons.append(f"{name} {v:.2f} {'>=' if th.above else '<='} {'severe' if lvl == 2 else 'mild'} {limit:.2f}")
    n_severe = sum(1 for v in levels.values() if v == 2)
    n_mild = sum(1 for v in levels.values() if v == 1)
    severity = 2 if n_severe >= 1 or n_mild >= 2 else 1 if n_mild == 1 else 0
    return severity, reasons


# --- the detector ---------------------------------------------------------------------

class _Ring:
    """A fixed-size ring of the most recent responses of one series."""

    __slots__ = ("ts", "out", "flags", "app", "head", "size")

    def __init__(self, capacity: int) -> None:
        self.ts = np.zeros(capacity, dtype=np.float64)
        self.out = np.zeros(capacity, dtype=np.int64)
        self.flags = np.zeros(capacity, dtype=np.uint8)
        self.app = np.zeros(capacity, dtype=np.int32)
        self.head = 0  # next write position
        self.size = 0

    def push(self, ts: np.ndarray, out: np.ndarray, flags: np.ndarray, app: np.ndarray) -> None:
        cap = self.ts.shape[0]
        n = ts.shape[0]
        if n >= cap:
            ts, out, flags, app = ts[-cap:], out[-cap:], flags[-cap:], app[-cap:]
            n = cap
        pos = (self.head + np.arange(n)) % cap
        self.ts[pos] = ts
        self.out[pos] = out
        self.flags[pos] = flags
        self.app[pos] = app
        self.head = int((self.head + n) % cap)
        self.size = min(cap, self.size + n)

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        s = self.size
        return self.ts[:s], self.out[:s], self.flags[:s], self.app[:s]  # the filled slots (order irrelevant)


class DriftDetector:
    """Rolling per-(provider, model) quality windows; `observe` on ingest, `evaluate` on
    the evaluator's clock.

    Memory is bounded by the label guards: at most providers × models series, each a
    fixed ring of `window` entries (21 bytes per entry), and a series whose every entry
    is older than `max_age_s` is dropped at evaluation. Apps are kept as small integer
    codes (the label guard bounds them too).
    """

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self._rings: dict[tuple[str, str], _Ring] = {}
        self._app_codes: dict[str, int] = {}

    def observe(self, cols: RecordColumns) -> None:
        """Add a batch. Records go to their series in event-time order within the batch;
        a little overlap between batches does not matter, as the window is sorted by
        time where order counts (the length halves)."""
        n = len(cols)
        if n == 0:
            return
        flags = response_flags(cols)
        a_u, a_i = factorize(cols.app)
        app = np.array([self._app_codes.setdefault(a, len(self._app_codes)) for a in a_u.tolist()], dtype=np.int32)[a_i]
        p_u, p_i = factorize(cols.provider)
        m_u, m_i = factorize(cols.model)
        code = p_i.astype(np.int64) * m_u.size + m_i
        order = np.lexsort((cols.ts, code))
        code_s = code[order]
        starts = np.flatnonzero(np.r_[True, code_s[1:] != code_s[:-1]])
        ends = np.r_[starts[1:], n]
        for a, b in zip(starts.tolist(), ends.tolist()):  # one iteration per series in the batch
            idx = order[a:b]
            c = int(code_s[a])
            key = (str(p_u[c // m_u.size]), str(m_u[c % m_u.size]))
            ring = self._rings.get(key)
            if ring is None:
                ring = self._rings[key] = _Ring(self.settings.window)
            ring.push(cols.ts[idx], cols.output_tokens[idx], flags[idx], app[idx])

    def evaluate(self, now: float) -> list[DriftResult]:
        """One result per series with entries younger than `max_age_s` at `now`, sorted
        by (provider, model). Series with none left are forgotten, so their gauges go."""
        s = self.settings
        cutoff = now - s.max_age_s
        results: list[DriftResult] = []
        for key in sorted(self._rings):
            ring = self._rings[key]
            ts, out, flags, app = ring.view()
            keep = ts >= cutoff
            fill = int(keep.sum())
            if fill == 0:
                del self._rings[key]
                continue
            ts, out, flags, app = ts[keep], out[keep], flags[keep], app[keep]
            values = drift_signals(ts, out, flags, s.min_signal_n, app)
            preset = s.preset_for(*key)
            ready = fill >= s.min_fill
            severity, reasons = 0, list[str]()
            if ready:
                counts = {
                    "empty_response_rate": int(((flags & _EMPTY) != 0).sum()),
                    "tool_silence_rate": int(((flags & _TOOL_SILENT) != 0).sum()),
                    "stop_anomaly_rate": int(((flags & _STOP_ANOMALY) != 0).sum()),
                    "error_rate": int(((flags & _ERROR) != 0).sum()),
                }
                severity, reasons = judge(values, PRESETS[preset], counts, s.min_events)
            results.append(DriftResult(key[0], key[1], values, severity, reasons, fill, ready, preset))
        return results
