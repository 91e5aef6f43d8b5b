"""Quality drift: the failures that still return HTTP 200.

A provider can degrade without a single error: responses come back empty, get shorter
and shorter, stop calling the tools they were given, or end for odd reasons (a safety
filter, a recitation check). None of that moves the request or error counters, so this
module watches the responses themselves, per (provider, model), with five signals:

- `empty_response_rate`: non-error responses with zero output tokens / non-error responses
- `length_collapse_ratio`: how long recent answers are against the same app's answers of
  the reference hours (a Hodges-Lehmann estimate: the median ratio of a recent answer's
  length to a reference answer's, per app, combined over the apps; small means collapse).
  Comparing within an app keeps a terse app that gets busier on a shared model from
  looking like a collapse.
- `tool_silence_rate`: non-error requests that offered tools and got no tool call /
  non-error requests that offered tools
- `stop_anomaly_rate`: non-error responses whose stop reason is not a normal end, a tool
  call or a length limit / non-error responses
- `error_rate`: errors / all responses

Every verdict needs two things, as the anomaly evaluator's do (see `evidence.py`):

1. **An effect that matters**: the signal over a recent window passes the preset's
   absolute limit (a rate of 5 % empty answers, answers half as long).
2. **Evidence that it is a change, not noise**: the recent window differs from the same
   model's reference hours by more than chance explains. Rates are tested with a
   binomial test conditional on the events of both periods (`evidence.binomial_z`), so a
   window of 25 answers needs more events than one of 200 and a model whose reference
   holds few responses needs a bigger difference. Lengths are tested twice, per app and
   combined over the apps, each test at half the signal's budget: a rank-sum test asks
   whether recent answers tend to be shorter than the reference's, whatever the shape of
   the length distribution (answer lengths are often bimodal, where a median of a few
   dozen answers jumps between the modes), and a count asks whether more of them than
   chance explains fall below the reference's shortest 5 % (a collapse moves answers to
   where the reference hardly has any; ranks do not see how far they moved).
   "Chance" is more than sampling: answers of one conversation are alike (a design
   effect, from the window and from the intraclass correlation of sessions), and a
   model's level moves from hour to hour with the time of day and bursts (a between-hour
   variance estimated from the reference hours). With both,
   the length z of the detection benchmark's clean week has a standard deviation of
   0.93-0.98 on every window size (1.3-1.7 on sampling alone), and 0.92-1.02 on the
   12-answer window of lengths (seeds 7 and 11). The short answers' count has 0.81-0.98
   on every window size in the same weeks, and came no closer to its threshold than 0.17.

The recent windows are the latest eighth, quarter, half and whole of the `window` most
recent responses (25, 50, 100 and 200 by default) among the requests that started the
series' 99th percentile latency ago or earlier (a long answer ends, and comes, later than
a short one started with it: the latest answers to come are the short ones), and for answer lengths
also its sixteenth (12): a collapse of every answer shows within a dozen responses, a
subtler one on the larger windows. A length verdict needs its window's answers to come
from several conversations (`effective_conversations`), since a window of a dozen can be
one conversation's, whose likeness no design effect can measure. Windows
are counted in responses rather than time because quality is a property of responses:
a model serving 10 requests an hour and one serving 10 a second get verdicts resting on
the same numbers of samples. The age limit stops a quiet model's window from resting on
yesterday's traffic.

The reference is time-based: per-hour counts and per-app length histograms of the
`baseline_s` before the window (24 h by default), from hours complete before the window's
first response. An hour in which a signal was found drifting is left out of that
signal's reference, so a fault that lasts does not become its own baseline while its
pre-fault hours are still within the day; a change that has lasted longer than that
becomes the new normal. The engine stores those marks (`tainted_rows`), so a restart,
which rebuilds the windows and hours from the store's raw records, keeps them.

The evidence threshold comes from the preset's false-alarm budget (false drift warnings
a week over all models and signals, `PRESET_BUDGETS`), spread over the models watched,
the five signals, the window sizes and the independent windows a week holds
(`evidence.z_threshold`), so the false rate does not grow with the number of models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.codes import factorize
from exporter.evidence import binomial_z, page_evidence, z_threshold
from exporter.ingest.records import RecordColumns

# Requests started within the series' 99th percentile latency of now are left out of the
# windows until then (`_Ring.settled`); the ring holds twice the window, so that what they
# push out is not the settled answers the window needs.
SETTLE_QUANTILE = 0.99
RING_SPARE = 2

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
_APART = np.uint8(32)       # a failure put on its app (see `DriftDetector.evaluate`): in no count

# Per-response counts (columns of `indicators` and of the hourly reference) and, for each
# rate signal, which column counts its events and which its trials.
COUNTS: tuple[str, ...] = ("responses", "errors", "answers", "empty", "tool_requests", "tool_silent", "stop_anomaly")
RATES: dict[str, tuple[int, int]] = {
    "empty_response_rate": (3, 2),
    "tool_silence_rate": (5, 4),
    "stop_anomaly_rate": (6, 2),
    "error_rate": (1, 0),
}
# Answer lengths are kept in the reference as histograms of log2(output tokens) with four
# bins to an octave (a resolution of 19 %, far finer than the halving the presets look
# for), up to 2^20 tokens.
BINS_PER_OCTAVE = 4
LENGTH_BINS = 20 * BINS_PER_OCTAVE
# The recent windows, as fractions of `DriftSettings.window`. Answer lengths are also
# judged on a sixteenth (12 answers by default): a collapse of every answer is evidence
# within a dozen, and an effect (the median answer) that shows once half the window has
# changed. Rates keep the larger windows, where `min_events` odd answers are a trend.
WINDOW_FRACTIONS: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1.0)
LENGTH_WINDOW_FRACTIONS: tuple[float, ...] = (1 / 16,) + WINDOW_FRACTIONS
# Answer lengths are judged by two tests, each at half the length signal's share of the
# budget: the rank-sum test (are recent answers shorter than the reference's?) and a count
# of short answers, those below the lowest SHORT_SHARE of the app's reference answers (how
# many moved to where the reference hardly has any?). The rank test sees a broad shift;
# it cannot see how far answers moved, and on bimodal lengths a long answer cut to a fifth
# still outranks the short mode, so a dozen collapsed answers stay under its threshold. A
# collapse puts more than half of them below the reference's 5 % edge, which the count
# sees within a dozen. The share is the latency tails' (`anomaly.evaluator.TAIL`).
SHORT_SHARE = 0.05
LENGTH_TESTS = 2
HOUR = 3600.0


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


# The limits are effect sizes: how big a change must be to matter, whatever the evidence.
# Healthy production traffic runs at roughly 0-1 % empty responses, 0-1 % odd stop
# reasons and 1-3 % errors (rate limits come in bursts); the `normal` mild limits (5 %,
# 8 % for errors) sit well above those levels, and the severe limits mark a state no user
# would accept (one answer in seven empty). `high` halves the distance to the healthy
# level for teams that would rather look at a few false alarms than miss a regression;
# `low` suits models with known noisy behaviour (e.g. a content filter that trips often by
# design).
# Tool silence is judged more loosely because a final answer after a few tool rounds is
# itself a silent tool request: an agent averaging three tool calls per task sits near
# 25 % silence when healthy, so `normal` starts at 60 %; a model whose function calling
# broke goes to nearly 100 %. Apps where tools are merely offered should use `low`.
# Length collapse: answers half as long as the reference is mild, a quarter severe.
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
# The evidence side of each preset: false drift warnings a week that the evidence
# thresholds allow over all models and signals together, if every model used the preset
# (a Bonferroni bound, so the real rate is lower when the tests are correlated).
PRESET_BUDGETS: dict[str, float] = {"low": 0.1, "normal": 0.5, "high": 3.0}


@dataclass(slots=True)
class DriftSettings:
    """Windows, reference and sensitivity of the drift detector.

    `window`: responses kept per (provider, model); the recent windows are its latest
    eighth, quarter, half and whole (25, 50, 100, 200 by default), and for answer
    lengths its sixteenth too (12).
    `max_age_s`: entries older than this (event time) are ignored and eventually dropped;
    6 h keeps a quiet model's window about the same working day.
    `baseline_s`: how far back the reference hours reach; 24 h covers a daily cycle and
    is what a restart rebuilds from the store's raw records.
    `min_fill`: responses needed before any verdict; below it the result is severity 0
    and `ready` False, because rates over a handful of responses are noise.
    `preset`: default sensitivity (`low`, `normal`, `high`).
    `model_presets`: per-model sensitivity, keyed by `model` or `provider/model` (the
    latter wins).
    `min_events`: a rate signal needs at least this many offending responses in its
    window to count, so that two odd answers are never a trend however rare they were;
    a length collapse needs its window's answers to spread over this many conversations'
    worth (`effective_conversations`), so that two users' short answers are never one.
    `min_signal_n`: a conditional signal (tool silence over tool requests, the answers
    behind a length ratio) needs this many responses in its window, else it is NaN; 10
    lets the 12-response length window count when an error or an empty answer is in it.
    """

    window: int = 200
    max_age_s: float = 21600.0
    baseline_s: float = 86400.0
    min_fill: int = 50
    preset: str = "normal"
    model_presets: dict[str, str] = field(default_factory=dict)
    min_events: int = 3
    min_signal_n: int = 10

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"drift.window must be at least 2, got {self.window}")
        if not 1 <= self.min_fill <= self.window:
            raise ValueError(f"drift.min_fill must be between 1 and window ({self.window}), got {self.min_fill}")
        if not self.max_age_s > 0:
            raise ValueError(f"drift.max_age_s must be positive, got {self.max_age_s}")
        if not self.baseline_s >= HOUR:
            raise ValueError(f"drift.baseline_s must be at least 3600 (one hour), got {self.baseline_s}")
        for where, name in [("preset", self.preset)] + [(f"model_presets[{k!r}]", v) for k, v in self.model_presets.items()]:
            if name not in PRESETS:
                raise ValueError(f"drift.{where}: unknown preset {name!r}; known: {sorted(PRESETS)}")

    def preset_for(self, provider: str, model: str) -> str:
        """The preset that applies to one series."""
        return self.model_presets.get(f"{provider}/{model}", self.model_presets.get(model, self.preset))

    def windows(self, fractions: tuple[float, ...] = WINDOW_FRACTIONS) -> list[int]:
        """The recent window sizes, smallest first (of the rates; pass
        LENGTH_WINDOW_FRACTIONS for those of the answer lengths)."""
        return sorted({max(1, round(f * self.window)) for f in fractions})


@dataclass(slots=True)
class DriftResult:
    """The verdict for one (provider, model). `values` holds all five signals, each over
    the window that decided its verdict (the largest window when there is none); NaN when
    a signal has too little data to mean anything. `zscores` is the evidence behind each
    value (negative: shorter answers, fewer events than the reference) and `windows` the
    responses it rests on. `errors_apart`: the model's failing requests were one app's (see
    `DriftDetector.evaluate`), so its error rate gave no verdict."""

    provider: str
    model: str
    values: dict[str, float]
    severity: int
    reasons: list[str]
    fill: int
    ready: bool
    preset: str
    zscores: dict[str, float] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)
    errors_apart: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: NaN becomes None."""
        return {
            "provider": self.provider,
            "model": self.model,
            "values": {k: (None if math.isnan(v) else v) for k, v in self.values.items()},
            "zscores": {k: (None if math.isnan(v) else round(v, 2)) for k, v in self.zscores.items()},
            "windows": dict(self.windows),
            "severity": self.severity,
            "reasons": list(self.reasons),
            "fill": self.fill,
            "ready": self.ready,
            "preset": self.preset,
            "errors_apart": self.errors_apart,
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


def indicators(flags: np.ndarray) -> np.ndarray:
    """(n, len(COUNTS)) 0/1 per response: what each response adds to each count. A failure
    put on its app is neither a response nor an error of the model's."""
    f = flags.astype(np.uint8)
    err = (f & _ERROR) != 0
    own = (f & _APART) == 0
    return np.stack([own, err & own, ~err, (f & _EMPTY) != 0, (f & _HAD_TOOLS) != 0,
                     (f & _TOOL_SILENT) != 0, (f & _STOP_ANOMALY) != 0], axis=1).astype(np.int64)


def length_bins(output_tokens: np.ndarray) -> np.ndarray:
    """Histogram bin of each answer length (log2 with BINS_PER_OCTAVE bins an octave)."""
    x = np.maximum(np.asarray(output_tokens, dtype=np.float64), 1.0)
    return np.minimum(np.floor(np.log2(x) * BINS_PER_OCTAVE), LENGTH_BINS - 1).astype(np.int64)


def design_effect(window: np.ndarray, unit: np.ndarray, d: np.ndarray, n_windows: int) -> np.ndarray:
    """How much more a window's sum of `d` varies than if its responses were independent,
    given that responses of one unit (a session) are alike: the sum over units of the
    squared unit sums of `d` over the sum of its squares, per window (and column of `d`),
    never below 1.

    `window[i]`, `unit[i]` (small integer codes) and `d[i]` (a value or a row of columns)
    describe one (window, response) pair each, `d` already centred on its window's mean so
    that a real shift of the window does not count as likeness. Each response its own unit
    gives exactly 1; a window whose responses all come from one unit says nothing about
    likeness, and gets 1 too."""
    if d.shape[0] == 0:
        return np.ones((n_windows,) + d.shape[1:])
    cols = d.reshape(d.shape[0], -1)
    n_c = cols.shape[1]
    n_u = int(unit.max()) + 1
    col = np.arange(n_c)[None, :]
    unit_sums = np.bincount(((window * n_u + unit)[:, None] * n_c + col).ravel(), weights=cols.ravel(),
                            minlength=n_windows * n_u * n_c).reshape(n_windows, n_u, n_c)
    unit_sq = (unit_sums ** 2).sum(axis=1)
    dev_sq = np.bincount((window[:, None] * n_c + col).ravel(), weights=(cols ** 2).ravel(),
                         minlength=n_windows * n_c).reshape(n_windows, n_c)
    ok = dev_sq > 0
    out = np.where(ok, np.maximum(1.0, unit_sq / np.where(ok, dev_sq, 1.0)), 1.0)
    return out.reshape((n_windows,) + d.shape[1:])


def between_hour_variance(estimate: np.ndarray, sampling_var: np.ndarray) -> float:
    """How much a quantity's true level varies from hour to hour beyond sampling noise: the
    DerSimonian-Laird estimate of the between-hour variance from per-hour estimates and
    their sampling variances (hours with an infinite or NaN variance left out). Answer
    lengths drift with the time of day and the mix of users, error rates come in bursts;
    a window is judged against the reference with this much variance added, so an
    ordinary hour-to-hour swing is no evidence.

    With a day's few hours the estimate is noisy and, truncated at 0, biased upwards: it
    errs on the side of fewer findings. (Counting it only when Cochran's Q says the hours
    differ significantly made the verdict jump when an hour turned and Q crossed the
    line.) 0 with fewer than two hours."""
    ok = np.isfinite(estimate) & np.isfinite(sampling_var) & (sampling_var > 0)
    df = int(ok.sum()) - 1
    if df < 1:
        return 0.0
    w = 1.0 / sampling_var[ok]
    mean = float((w * estimate[ok]).sum() / w.sum())
    q = float((w * (estimate[ok] - mean) ** 2).sum())
    scale = float(w.sum() - (w ** 2).sum() / w.sum())
    return max(0.0, (q - df) / scale) if scale > 0 else 0.0


def hour_blocks(counts: np.ndarray, minimum: float) -> np.ndarray:
    """Block number of each hour (in time order) when consecutive hours are merged until a
    block holds at least `minimum` (a remainder joins the last full block): a variance
    between hours is only as good as each hour's own estimate, and a night hour of five
    responses with one error would pass for a burst."""
    block = np.zeros(counts.shape[0], dtype=np.int64)
    current, held = 0, 0.0
    for i, c in enumerate(counts.tolist()):                    # at most baseline_s / 3600 + 1 hours
        block[i] = current
        held += c
        if held >= minimum:
            current, held = current + 1, 0.0
    if held < minimum and current > 0:
        block[block == current] = current - 1
    return block


def rate_level_variance(events: np.ndarray, trials: np.ndarray, min_trials: int) -> float:
    """Between-hour variance of a rate, from hourly event and trial counts in time order,
    the hours merged into blocks of at least `min_trials` trials and 5 expected events
    (where Pearson's statistic behind the estimate holds). 0 for a rate of 0 or 1."""
    n_all = float(trials.sum())
    p = float(events.sum()) / n_all if n_all > 0 else 0.0
    if not 0.0 < p < 1.0:
        return 0.0
    block = hour_blocks(trials, max(float(min_trials), 5.0 / p))
    x, n = np.bincount(block, weights=events), np.bincount(block, weights=trials)
    with np.errstate(invalid="ignore", divide="ignore"):
        return between_hour_variance(x / n, p * (1.0 - p) / n)


def intraclass_correlation(values: np.ndarray, unit: np.ndarray) -> float:
    """How alike the values of one unit (a conversation) are: the one-way ANOVA estimate of
    the intraclass correlation, clipped to [0, 1]; 0 when no unit holds two values.
    `unit` holds small integer codes."""
    if values.shape[0] < 3:
        return 0.0
    counts = np.bincount(unit)
    held = counts > 0
    n_u = counts[held].astype(np.float64)
    groups, total = n_u.shape[0], float(values.shape[0])
    if groups < 2 or groups == total:
        return 0.0
    means = np.zeros(counts.shape[0])
    means[held] = np.bincount(unit, weights=values)[held] / n_u
    within = float(((values - means[unit]) ** 2).sum()) / (total - groups)
    between = float((n_u * (means[held] - values.mean()) ** 2).sum()) / (groups - 1)
    n0 = (total - float((n_u ** 2).sum()) / total) / (groups - 1)
    denom = between + (n0 - 1.0) * within
    return min(1.0, max(0.0, (between - within) / denom)) if denom > 0 else 0.0


def rate_z(events: np.ndarray, trials: np.ndarray, ref_events: np.ndarray, ref_trials: np.ndarray,
           dispersion: np.ndarray | float = 1.0) -> np.ndarray:
    """Evidence that a window's rate exceeds its reference's: given the events of both
    periods, how surprising it is that this many fell in the window (binomial, with the
    window's share of the trials as the probability, scaled down by the dispersion).
    Conditioning on the total needs no estimate of the healthy rate, so a reference
    without a single event is no problem: it just takes more events in the window to
    count. 0 without trials on either side."""
    x, n, r, m = (np.asarray(v, dtype=np.float64) for v in (events, trials, ref_events, ref_trials))
    valid = (n > 0) & (m > 0) & (x + r > 0)
    p = np.where(valid, n / np.where(valid, n + m, 1.0), 0.5)
    return np.where(valid, binomial_z(x, x + r, p, dispersion), 0.0)


def rate_evidence(event: np.ndarray, trial: np.ndarray, unit: np.ndarray, age: np.ndarray, windows: np.ndarray,
                  ref_events: np.ndarray, ref_trials: np.ndarray, level_var: np.ndarray | float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(events, trials, z), each (W, S), of S rate signals on W recent windows.

    `event` and `trial` (n, S) say per response of the ring whether it counts; order does
    not matter, as `age` is each response's position from the newest (window k holds those
    with age < k). `ref_events`, `ref_trials` (W, S) are the reference's counts. The z
    allows for events clustering in sessions (`design_effect`) and for the rate's
    between-hour variance `level_var` (S,) as a beta-binomial does: the window's count
    varies n * (1 + n * level_var / (p (1 - p))) times p (1 - p)."""
    trial = trial.astype(np.float64)
    hit = event * trial
    member = age[None, :] < windows[:, None]                                 # (W, n)
    x, n = member @ hit, member @ trial
    mean = x / np.maximum(n, 1.0)
    w_idx, i_idx = np.nonzero(member)
    d = trial[i_idx] * (hit[i_idx] - mean[w_idx])                             # 0 for responses that are no trial
    with np.errstate(invalid="ignore", divide="ignore"):
        p = ref_events / np.where(ref_trials > 0, ref_trials, 1.0)
        level = np.where((p > 0) & (p < 1), n * np.asarray(level_var) / (p * (1.0 - p)), 0.0)
    z = rate_z(x, n, ref_events, ref_trials, design_effect(w_idx, unit[i_idx], d, windows.shape[0]) + level)
    return x, n, z


def rank_sum_terms(recent: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-sum terms of recent answers against reference answers, both as histograms over
    the same ordered bins (one row per window): the recent rank sum's deviation from its
    expectation, its variance under the null with the tie correction, and the mid-rank
    deviation of each bin, (N + 1) / 2 subtracted. Shapes (W,), (W,), (W, B)."""
    c = recent + ref
    n1, n2 = recent.sum(axis=1), ref.sum(axis=1)
    big_n = n1 + n2
    mid = np.cumsum(c, axis=1) - c + (c + 1.0) / 2.0 - (big_n[:, None] + 1.0) / 2.0
    dev = (recent * mid).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ties = np.where(big_n > 1, (c ** 3 - c).sum(axis=1) / (big_n * (big_n - 1.0)), 0.0)
    return dev, n1 * n2 / 12.0 * (big_n + 1.0 - ties), mid


def shift_estimate(recent: np.ndarray, ref: np.ndarray) -> np.ndarray | float:
    """Hodges-Lehmann shift between two histograms over the same bins, in bins: the median
    of the differences over all (recent, reference) pairs, interpolated within its bin.
    Row by row for 2-D input (the pair counts by difference come from one FFT for all
    rows); NaN where either is empty."""
    q = np.atleast_2d(np.asarray(recent, dtype=np.float64))
    r = np.atleast_2d(np.asarray(ref, dtype=np.float64))
    bins = q.shape[1]
    size = 2 * bins                                            # >= 2B - 1: no wrap-around
    diffs = np.fft.irfft(np.fft.rfft(q, size) * np.fft.rfft(r[:, ::-1], size), size)[:, : 2 * bins - 1]
    diffs = np.maximum(diffs, 0.0)                             # index j: difference j - (B - 1); FFT noise below 0
    total = diffs.sum(axis=1)
    cdf = np.cumsum(diffs, axis=1) / np.where(total > 0, total, 1.0)[:, None]
    j = np.minimum((cdf < 0.5).sum(axis=1), 2 * bins - 2)
    rows = np.arange(q.shape[0])
    below = np.where(j > 0, cdf[rows, np.maximum(j - 1, 0)], 0.0)
    out = j - (bins - 1) - 0.5 + (0.5 - below) / np.maximum(cdf[rows, j] - below, 1e-12)
    out = np.where(total > 0.5, out, math.nan)
    return float(out[0]) if np.ndim(recent) == 1 else out


def effective_conversations(unit: np.ndarray, age: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Kish's effective number of conversations in each window: (sum n)^2 / sum n^2 over
    the answers n of each conversation. Twelve answers of one conversation are one, of
    twelve conversations twelve. `unit` holds small integer codes; window k holds the
    answers with `age` < k."""
    w_idx, i_idx = np.nonzero(age[None, :] < windows[:, None])
    n_u = int(unit.max()) + 1 if unit.shape[0] else 1
    sizes = np.bincount(w_idx * n_u + unit[i_idx], minlength=windows.shape[0] * n_u).reshape(-1, n_u)
    total, squares = sizes.sum(axis=1).astype(np.float64), (sizes.astype(np.float64) ** 2).sum(axis=1)
    return np.where(squares > 0, total ** 2 / np.where(squares > 0, squares, 1.0), 0.0)


def length_level_variance(hours: np.ndarray, min_answers: int) -> float:
    """Between-hour variance of the probability index theta (see `length_evidence`) of one
    app's answer lengths, from its histograms per reference hour (H, B) in time order,
    merged into blocks of at least `min_answers` answers; each block is compared with the
    rest of the reference."""
    if hours.shape[0] < 2:
        return 0.0
    block = hour_blocks(hours.sum(axis=1), float(min_answers))
    h = np.add.reduceat(hours, np.flatnonzero(np.r_[True, block[1:] != block[:-1]]), axis=0).astype(np.float64)
    dev, var, _ = rank_sum_terms(h, h.sum(axis=0)[None, :] - h)
    pairs = h.sum(axis=1) * (h.sum() - h.sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return between_hour_variance(dev / pairs, var / pairs ** 2)


def short_edges(ref: np.ndarray) -> np.ndarray:
    """The short answers' bins of each reference histogram (rows of `ref`, (..., B)): the
    answers in bins below the returned edge are short. The edge is the highest whose
    bins below hold at most SHORT_SHARE of the reference, so the reference's own share
    of short answers is at most that (0 where the lowest bin alone holds more)."""
    total = ref.sum(axis=-1, keepdims=True)
    return (np.cumsum(ref, axis=-1) <= SHORT_SHARE * total).sum(axis=-1)


def short_level_variance(hours: np.ndarray, min_answers: int) -> float:
    """Between-hour variance of one app's share of short answers (below the edge of its
    whole reference, `short_edges`), from its histograms per reference hour (H, B) in
    time order: an app whose short answers come in some hours more than in others needs
    more of them in a window to count."""
    if hours.shape[0] < 2:
        return 0.0
    edge = int(short_edges(hours.sum(axis=0)))
    return rate_level_variance(hours[:, :edge].sum(axis=1), hours.sum(axis=1), min_answers)


def length_evidence(bins: np.ndarray, app: np.ndarray, unit: np.ndarray, age: np.ndarray, windows: np.ndarray,
                    reference: dict[int, np.ndarray], level_var: dict[int, float], z_needed: np.ndarray,
                    likeness: float = 0.0, short_var: dict[int, float] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(length ratio, z, answers) of each recent window's answers against the reference.

    `bins`, `app`, `unit` (small integer codes) describe the answers of the ring; `age` is
    each answer's position counted from the newest response (0 = newest), so window k
    holds the answers with age < k. `reference[app]` is that app's reference histogram for
    each window (W, B), `level_var[app]` the between-hour variance of its theta
    (`length_level_variance`).

    Per app (stratum) a rank-sum test of the window's answers against the app's reference
    answers, as the probability index theta = P(recent answer longer than a reference one)
    - 1/2 (ties count half); answers of one conversation are alike, so its sampling
    variance is multiplied by a design effect: the larger of the one measured within the
    window (`design_effect`) and 1 + `likeness` (m - 1), where `likeness` is the
    intraclass correlation of answer lengths on the ring's older half (outside the smaller
    windows, where a change would read as likeness) and m the
    answers per conversation in it (sum of squares over sum); a window of two long
    conversations is two answers' worth of evidence when conversations are very alike.
    The between-hour variance of the reference hours' own theta is added
    (`between_hour_variance`). The apps are combined with inverse-variance weights, so
    each contributes by its evidence and a change in the app mix is no collapse.

    The second test counts the window's short answers, those below the app's reference
    edge (`short_edges`), against the reference's: given the short answers of both, the
    window's share of them follows its share of the answers (as `rate_z`), summed over
    the apps. Its dispersion is the same design effect, of the short answers, and the
    between-hour variance of each app's short share, `short_var[app]`. The z returned is
    the stronger of the two, signed as the rank test's (negative: shorter); `z_needed` is
    the threshold of either, at its share of the budget (`LENGTH_TESTS`).

    The ratio, 2 ** (Hodges-Lehmann shift in octaves, the apps weighted by their answers), is
    computed where the z reaches -`z_needed` and for the largest window (the published
    value), NaN elsewhere; NaN and z 0 without answers that have a reference."""
    n_w = windows.shape[0]
    codes = [c for c in np.flatnonzero(np.bincount(app)).tolist() if c in reference]   # apps with a reference
    if not codes or app.shape[0] == 0:
        return np.full(n_w, math.nan), np.zeros(n_w), np.zeros(n_w, dtype=np.int64)
    ref = np.stack([reference[c] for c in codes]).astype(np.float64)                   # (A, W, B)
    slot = np.full(int(app.max()) + 1, -1)
    slot[codes] = np.arange(len(codes))
    a_of = slot[app]                                                                   # app row of each answer, -1 none
    w_idx, i_idx = np.nonzero((age[None, :] < windows[:, None]) & (a_of >= 0)[None, :])
    cell = a_of[i_idx] * n_w + w_idx                                                   # (app, window) of each pair
    n_cells = len(codes) * n_w
    keep = ref.reshape(n_cells, -1).sum(axis=1)[cell] > 0                              # windows where the app has a reference
    cell, i_idx = cell[keep], i_idx[keep]
    q = np.bincount(cell * LENGTH_BINS + bins[i_idx], minlength=n_cells * LENGTH_BINS).astype(np.float64)
    q = q.reshape(n_cells, LENGTH_BINS)
    dev, var, mid = rank_sum_terms(q, ref.reshape(n_cells, -1))
    pairs = q.sum(axis=1) * ref.reshape(n_cells, -1).sum(axis=1)
    # design effect of each (app, window): rank deviations around their mean, summed per conversation
    d = mid[cell, bins[i_idx]]
    d = d - (np.bincount(cell, weights=d, minlength=n_cells) / np.maximum(q.sum(axis=1), 1.0))[cell]
    deff = design_effect(cell, unit[i_idx], d, n_cells)
    alike = np.ones(n_cells)
    if likeness > 0 and cell.shape[0]:
        n_u = int(unit.max()) + 1
        sizes = np.bincount(cell * n_u + unit[i_idx], minlength=n_cells * n_u).reshape(n_cells, n_u).astype(np.float64)
        m = (sizes ** 2).sum(axis=1) / np.maximum(sizes.sum(axis=1), 1.0)
        alike = 1.0 + likeness * np.maximum(m - 1.0, 0.0)
        deff = np.maximum(deff, alike)
    z_short = _short_z(q, ref.reshape(n_cells, -1), cell, unit[i_idx], bins[i_idx], alike,
                       np.repeat([(short_var or {}).get(c, 0.0) for c in codes], n_w), len(codes), n_w)
    tau2 = np.repeat([level_var.get(c, 0.0) for c in codes], n_w)
    good = pairs > 0
    safe = np.where(good, pairs, 1.0)
    v = var / safe ** 2 * deff + tau2
    good &= v > 0
    inv = np.where(good, 1.0 / np.where(good, v, 1.0), 0.0)
    num = (np.where(good, dev / safe, 0.0) * inv).reshape(len(codes), n_w).sum(axis=0)
    inv_var = inv.reshape(len(codes), n_w).sum(axis=0)
    answers = q.sum(axis=1).reshape(len(codes), n_w).sum(axis=0).astype(np.int64)
    z = np.where(inv_var > 0, num / np.sqrt(np.where(inv_var > 0, inv_var, 1.0)), 0.0)
    z = np.minimum(z, -z_short)
    ratio = np.full(n_w, math.nan)
    q3, ref3 = q.reshape(len(codes), n_w, -1), ref
    for w in range(n_w):
        if answers[w] == 0 or not (z[w] <= -z_needed[w] or w == n_w - 1):
            continue
        took = q3[:, w].sum(axis=1) > 0
        shifts = np.asarray(shift_estimate(q3[took, w], ref3[took, w]))
        ratio[w] = 2.0 ** (float(np.average(shifts, weights=q3[took, w].sum(axis=1))) / BINS_PER_OCTAVE)
    return ratio, z, answers


def _short_z(q: np.ndarray, ref: np.ndarray, cell: np.ndarray, unit: np.ndarray, bins: np.ndarray,
             alike: np.ndarray, tau2: np.ndarray, n_apps: int, n_w: int) -> np.ndarray:
    """(W,) z of the windows' short answers (`length_evidence`, its second test) from the
    (app, window) cells' histograms `q` and references `ref` (cells, B), and the cell,
    conversation and bin of each (window, answer) pair; positive: more short answers."""
    n_cells = q.shape[0]
    below = np.arange(q.shape[1])[None, :] < short_edges(ref)[:, None]
    x, r = (q * below).sum(axis=1), (ref * below).sum(axis=1)
    n, m = q.sum(axis=1), ref.sum(axis=1)
    short = below[cell, bins].astype(np.float64)
    d = short - (np.bincount(cell, weights=short, minlength=n_cells) / np.maximum(n, 1.0))[cell]
    deff = np.maximum(design_effect(cell, unit, d, n_cells), alike)
    valid = (n > 0) & (m > 0) & (x + r > 0)
    share = np.where(valid, n / np.where(valid, n + m, 1.0), 0.0)
    t = np.where(valid, x + r, 0.0)
    binomial = t * share * (1.0 - share)
    by_window = np.stack([v.reshape(n_apps, n_w).sum(axis=0) for v in
                          (np.where(valid, x, 0.0), t, t * share, binomial, deff * binomial + n ** 2 * tau2 * valid)])
    x_w, t_w, e_w, b_w, v_w = by_window
    ok = (t_w > 0) & (b_w > 0)
    p = np.where(ok, e_w / np.where(ok, t_w, 1.0), 0.5)
    return np.where(ok, binomial_z(x_w, t_w, p, v_w / np.where(ok, b_w, 1.0)), 0.0)


def levels(values: np.ndarray, th: Threshold) -> np.ndarray:
    """Threshold.level over an array (NaN compares false: 0)."""
    with np.errstate(invalid="ignore"):
        if th.above:
            return (values >= th.severe).astype(np.int64) + (values >= th.mild)
        return (values <= th.severe).astype(np.int64) + (values <= th.mild)


def judge(found: dict[str, int]) -> int:
    """Severity from each signal's level: one severe signal, or two mild ones, is severe;
    one mild is mild."""
    n_severe = sum(1 for v in found.values() if v == 2)
    n_mild = sum(1 for v in found.values() if v == 1)
    return 2 if n_severe >= 1 or n_mild >= 2 else 1 if n_mild == 1 else 0


# --- the detector ---------------------------------------------------------------------

class _Ring:
    """A fixed-size ring of the most recent responses of one series (their start and
    latency, length, flags, app and conversation)."""

    __slots__ = ("ts", "lat", "out", "flags", "app", "unit", "head", "size", "pushes", "marks")

    def __init__(self, capacity: int) -> None:
        self.ts = np.zeros(capacity, dtype=np.float64)
        self.lat = np.zeros(capacity, dtype=np.float64)
        self.out = np.zeros(capacity, dtype=np.int64)
        self.flags = np.zeros(capacity, dtype=np.uint8)
        self.app = np.zeros(capacity, dtype=np.int32)
        self.unit = np.zeros(capacity, dtype=np.int64)
        self.head = 0  # next write position
        self.size = 0
        self.pushes = 0  # batches pushed: the ring's version ...
        self.marks = 0   # ... and marks set (`put_apart`)

    def push(self, ts: np.ndarray, lat: np.ndarray, out: np.ndarray, flags: np.ndarray, app: np.ndarray,
             unit: np.ndarray) -> None:
        cap = self.ts.shape[0]
        n = ts.shape[0]
        if n >= cap:
            ts, lat, out, flags, app, unit = ts[-cap:], lat[-cap:], out[-cap:], flags[-cap:], app[-cap:], unit[-cap:]
            n = cap
        pos = (self.head + np.arange(n)) % cap
        self.ts[pos] = ts
        self.lat[pos] = lat
        self.out[pos] = out
        self.flags[pos] = flags
        self.app[pos] = app
        self.unit[pos] = unit
        self.head = int((self.head + n) % cap)
        self.size = min(cap, self.size + n)
        self.pushes += 1

    def put_apart(self, app: int, first: float = -math.inf, last: float = math.inf) -> np.ndarray:
        """Mark the failures of `app` held (those from `first` to `last`) as that app's
        (`_APART`); the times of the newly marked ones."""
        s = self.size
        hit = ((self.app[:s] == app) & ((self.flags[:s] & (_ERROR | _APART)) == _ERROR)
               & (self.ts[:s] >= first) & (self.ts[:s] <= last))
        if hit.any():
            self.flags[:s][hit] |= _APART
            self.marks += 1
        return self.ts[:s][hit]

    def view(self) -> tuple[np.ndarray, ...]:
        s = self.size
        return self.ts[:s], self.out[:s], self.flags[:s], self.app[:s], self.unit[:s]  # filled slots, any order

    def settled(self, now: float, since: float, limit: int) -> np.ndarray:
        """The slots (any order) of the latest `limit` responses that started from `since`
        up to `now` less the series' SETTLE_QUANTILE latency: requests started later may
        still be running, the long ones more often than the short ones, so the answers
        among them that have come are no fair sample of their answers."""
        s = self.size
        ts = self.ts[:s]
        lag = float(np.quantile(self.lat[:s], SETTLE_QUANTILE)) if s else 0.0
        ok = np.flatnonzero((ts >= since) & (ts <= now - lag))
        if ok.size > limit:
            ok = ok[np.argsort(ts[ok], kind="stable")[-limit:]]
        return ok


class _Hours:
    """The reference of one series: per clock hour, the counts of `COUNTS` and a histogram
    of answer lengths per app, for the last `slots` hours; and which hours each signal was
    found drifting in (left out of that signal's reference)."""

    __slots__ = ("hour", "counts", "lengths", "tainted", "version", "_cache")

    def __init__(self, slots: int) -> None:
        self.hour = np.full(slots, -1, dtype=np.int64)
        self.counts = np.zeros((slots, len(COUNTS)), dtype=np.int64)
        # app code -> slot -> (LENGTH_BINS,) counts, only for the hours in which the app had
        # answers: with many apps per model most (app, hour) cells are empty, and dense
        # (slots, LENGTH_BINS) arrays per app cost 8 kB each whatever the traffic
        self.lengths: dict[int, dict[int, np.ndarray]] = {}
        self.tainted = np.zeros((slots, len(SIGNALS)), dtype=bool)
        self.version = 0                                       # bumped when an hour before the newest changes
        self._cache: tuple[Any, np.ndarray, dict[int, float], dict[int, float]] | None = None

    def add(self, ts: np.ndarray, ind: np.ndarray, app: np.ndarray, answer: np.ndarray, bins: np.ndarray) -> None:
        slots = self.hour.shape[0]
        hours = np.floor(ts / HOUR).astype(np.int64)
        newest = max(int(self.hour.max()), int(hours.max()))
        keep = hours > newest - slots                          # older than the ring of hours holds: dropped
        hours, ind, app, answer, bins = hours[keep], ind[keep], app[keep], answer[keep], bins[keep]
        for h in np.unique(hours).tolist():                     # one iteration per clock hour in the batch
            s = h % slots
            if self.hour[s] != h:                              # a newer hour takes the slot over
                self.hour[s] = h
                self.counts[s] = 0
                self.tainted[s] = False
                for hist in self.lengths.values():
                    hist.pop(s, None)
        if hours.shape[0] and int(hours.min()) < int(self.hour.max()):
            self.version += 1                                  # late data in an hour a reference may hold
        slot = hours % slots
        np.add.at(self.counts, slot, ind)
        pairs = np.unique(app[answer].astype(np.int64) * slots + slot[answer])
        for code, s in zip((pairs // slots).tolist(), (pairs % slots).tolist()):   # per (app, hour) in the batch
            row = self.lengths.setdefault(code, {}).get(s)
            if row is None:
                row = self.lengths[code][s] = np.zeros(LENGTH_BINS, dtype=np.int32)
            mine = answer & (app == code) & (slot == s)
            row += np.bincount(bins[mine], minlength=LENGTH_BINS).astype(np.int32)

    def length_hours(self, code: int) -> np.ndarray:
        """(slots, LENGTH_BINS) answer length histograms of one app, zero for hours without."""
        out = np.zeros((self.hour.shape[0], LENGTH_BINS))
        for s, row in self.lengths[code].items():
            out[s] = row
        return out

    def reference(self, first_hour: int, last_hour: int, signal: int) -> np.ndarray:
        """Mask of the slots holding hours first_hour..last_hour not tainted for `signal`."""
        return (self.hour >= first_hour) & (self.hour <= last_hour) & ~self.tainted[:, signal]

    def taint(self, first_hour: int, last_hour: int, signal: int) -> bool:
        """Mark the hours held from first_hour to last_hour as drifting for `signal`; True
        if one was not marked yet."""
        cells = (self.hour >= first_hour) & (self.hour <= last_hour)
        new = bool((cells & ~self.tainted[:, signal]).any())
        self.tainted[cells, signal] = True
        return new

    def level_variances(self, mask: np.ndarray, min_block: int
                        ) -> tuple[np.ndarray, dict[int, float], dict[int, float]]:
        """Between-hour variances over the reference hours in `mask` (signals, slots): of
        each rate (in RATES order), of each app's length index and of each app's share of
        short answers. They change only with the reference hours, so they are kept until
        the mask, the hours or late data change them."""
        key = (self.version, mask.tobytes(), self.hour.tobytes(), min_block)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2], self._cache[3]
        by_time = np.argsort(self.hour)
        rates = np.zeros(len(RATES))
        for i, (name, (e, t)) in enumerate(RATES.items()):
            rows = self.counts[by_time][mask[SIGNALS.index(name), by_time] > 0]
            rates[i] = rate_level_variance(rows[:, e], rows[:, t], min_block)
        j = SIGNALS.index("length_collapse_ratio")
        held = {code: self.length_hours(code)[by_time][mask[j, by_time] > 0] for code in self.lengths}
        lengths = {code: length_level_variance(h, min_block) for code, h in held.items()}
        short = {code: short_level_variance(h, min_block) for code, h in held.items()}
        self._cache = (key, rates, lengths, short)
        return rates, lengths, short


def _masked_sum(mask: np.ndarray, rows: dict[int, np.ndarray]) -> np.ndarray:
    """(W, LENGTH_BINS): for each window's mask over the hour slots (W, slots), the sum of
    the histograms of the slots it takes; `rows` holds the non-empty slots only."""
    if not rows:
        return np.zeros((mask.shape[0], LENGTH_BINS))
    slots = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
    return mask[:, slots] @ np.stack(list(rows.values())).astype(np.float64)


class DriftDetector:
    """Rolling per-(provider, model) quality windows and hourly references; `observe` on
    ingest, `evaluate` on the evaluator's clock.

    Memory is bounded by the label guards: at most providers x models series, each a
    fixed ring of `window` entries (29 bytes per entry) and `baseline_s` / 3600 + 1 hourly
    slots of 7 counts, plus 80 length bins per app seen on the model (8 KB an app with the
    default day). A series whose every entry is older than `max_age_s` is dropped at
    evaluation. Apps are kept as small integer codes (the label guard bounds them too);
    sessions as hashes, only in the ring. A series with no new response, reference hour
    or clock hour since its last verdict keeps that verdict without judging again.
    """

    def __init__(self, settings: DriftSettings, page_share: float = 1.0) -> None:
        self.settings = settings
        self.page_share = page_share     # of the preset's budget, for the evidence a severe level needs (`page_budget_share`)
        self._rings: dict[tuple[str, str], _Ring] = {}
        self._hours: dict[tuple[str, str], _Hours] = {}
        self._app_codes: dict[str, int] = {}
        self._solo = 0                                         # responses without a session get units of their own
        self._memo: dict[tuple[str, str], tuple[Any, DriftResult]] = {}   # last verdict and what it rested on
        self._slots = math.ceil(settings.baseline_s / HOUR) + 1
        self.taint_version = 0                                 # bumped when an hour is newly marked drifting
        # (provider, model, app, hour) -> [first, last] event times of the failures marked as the app's
        self._apart: dict[tuple[str, str, str, int], list[float]] = {}
        self.apart_version = 0                                 # bumped when failures are newly marked

    def observe(self, cols: RecordColumns) -> None:
        """Add a batch. Records go to their series in event-time order within the batch;
        a little overlap between batches does not matter, as the window is sorted by time
        where order counts and the reference is kept per clock hour.

        Each response keeps its latency: the windows hold only requests that started long
        enough ago for nearly all of their kind to have ended (`evaluate`)."""
        n = len(cols)
        if n == 0:
            return
        flags = response_flags(cols)
        ind = indicators(flags)
        answer = (flags & (_ERROR | _EMPTY)) == 0
        bins = length_bins(cols.output_tokens)
        a_u, a_i = factorize(cols.app)
        app = np.array([self._app_codes.setdefault(a, len(self._app_codes)) for a in a_u.tolist()], dtype=np.int32)[a_i]
        unit = _session_units(cols.session_id, self._solo)
        self._solo += n
        p_u, p_i = factorize(cols.provider)
        m_u, m_i = factorize(cols.model)
        code = p_i.astype(np.int64) * m_u.size + m_i
        latency = np.nan_to_num(np.maximum(cols.latency, 0.0))
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
                ring = self._rings[key] = _Ring(RING_SPARE * self.settings.window)
                self._hours[key] = _Hours(self._slots)
            ring.push(cols.ts[idx], latency[idx], cols.output_tokens[idx], flags[idx], app[idx], unit[idx])
            self._hours[key].add(cols.ts[idx], ind[idx], app[idx], answer[idx], bins[idx])

    def tainted_rows(self) -> list[tuple[str, str, int, str]]:
        """(provider, model, hour, signal) of every hour held that a signal was found
        drifting in, for the store: a restart rebuilds the windows and hours from raw
        records, and these marks keep a lasting fault out of its own reference."""
        out = []
        for (provider, model), hours in self._hours.items():
            for s, j in zip(*np.nonzero(hours.tainted)):
                out.append((provider, model, int(hours.hour[s]), SIGNALS[int(j)]))
        return out

    def load_tainted(self, rows: list[tuple[str, str, int, str]]) -> None:
        """Marks stored from `tainted_rows` (at start-up, after the raw records were
        observed), for the hours the series hold; unknown series and signals are skipped."""
        for provider, model, hour, signal in rows:
            hours = self._hours.get((provider, model))
            if hours is None or signal not in SIGNALS:
                continue
            s = hour % hours.hour.shape[0]
            if hours.hour[s] == hour:
                hours.tainted[s, SIGNALS.index(signal)] = True

    def evaluate(self, now: float, errors_apart: frozenset[tuple[str, str, str]] = frozenset()) -> list[DriftResult]:
        """One result per series with entries younger than `max_age_s` at `now`, sorted
        by (provider, model). Series with none left are forgotten, so their gauges go.

        `errors_apart` lists the (provider, model, app)s whose failing requests on the
        model the anomaly evaluator found to be the app's (the model's other traffic went
        on at its usual rate: a retry storm, an app's own quota): their error rate is that
        app's anomaly, alerted at the app, and gives no drift verdict of the model's. It is
        still published, and its hours are kept out of the model's error reference as
        drifting hours are (a fault of the model an hour later is judged against healthy
        hours). The app's failures held in the windows then are marked as the app's: once
        its verdict ends they count in neither the model's responses nor its errors until
        they leave the windows. The windows count responses, so on a quiet model they hold
        a storm for longer than the evaluator's hour does, and the model would page for it
        when the app's verdict ended."""
        apart_models = {(provider, model) for provider, model, _ in errors_apart}
        s = self.settings
        cutoff = now - s.max_age_s
        live: list[tuple[tuple[str, str], np.ndarray]] = []
        for key in sorted(self._rings):
            keep = self._rings[key].settled(now, cutoff, s.window)
            if not self._rings[key].size or not (self._rings[key].view()[0] >= cutoff).any():
                del self._rings[key], self._hours[key]
                self._memo.pop(key, None)
                continue
            live.append((key, keep))
        tests = max(len(live), 1) * len(SIGNALS)
        out: list[DriftResult] = []
        for key, keep in live:
            ring, hours = self._rings[key], self._hours[key]
            if not keep.size:                  # every response held may still have slower company running
                if key in self._memo:
                    out.append(self._memo[key][1])
                continue
            # the verdict depends on the kept responses, the reference hours, the hour and the number of tests only
            apart = key in apart_models
            state = (ring.pushes, ring.marks, keep.tobytes(), math.floor(now / HOUR), math.floor((now - s.baseline_s) / HOUR), tests,
                     hours.version, hours.hour.tobytes(), hours.tainted.tobytes(), apart)
            memo = self._memo.get(key)
            if memo is None or memo[0] != state:
                cols = ring.view()
                order = np.argsort(cols[0][keep], kind="stable")
                memo = self._memo[key] = (state, self._judge_series(key, tuple(x[keep][order] for x in cols), now, tests,
                                                                    apart))
            out.append(memo[1])
        for provider, model, app in errors_apart:
            held, code = self._rings.get((provider, model)), self._app_codes.get(app)
            if held is not None and code is not None:
                self._remember_apart(provider, model, app, held.put_apart(code))
        self._forget_apart(cutoff)
        return out

    def _remember_apart(self, provider: str, model: str, app: str, ts: np.ndarray) -> None:
        """Note the span of the failures just marked as `app`'s, per clock hour, for the store."""
        if not ts.size:
            return
        hours = np.floor(ts / HOUR).astype(np.int64)
        for h in np.unique(hours).tolist():
            inside = ts[hours == h]
            span = self._apart.setdefault((provider, model, app, int(h)), [math.inf, -math.inf])
            span[0], span[1] = min(span[0], float(inside.min())), max(span[1], float(inside.max()))
        self.apart_version += 1

    def _forget_apart(self, cutoff: float) -> None:
        """Spans whose failures have all aged out of the windows, or whose series went."""
        for k in [k for k, (_, last) in self._apart.items() if last < cutoff or k[:2] not in self._rings]:
            del self._apart[k]

    def apart_rows(self) -> list[tuple[str, str, str, int, float, float]]:
        """(provider, model, app, hour, first, last) of the failures marked as an app's,
        for the store: the windows count responses, so they can hold an app's storm after
        the evaluator's verdict on it ended, and a restart then must not count it as the
        model's again (the evaluator no longer says whose it was)."""
        return [(*k, span[0], span[1]) for k, span in self._apart.items()]

    def load_apart(self, rows: list[tuple[str, str, str, int, float, float]]) -> None:
        """Marks stored from `apart_rows` (at start-up, after the raw records were
        observed): the app's failures in each span are marked again. Unknown series and
        apps are skipped."""
        for provider, model, app, hour, first, last in rows:
            held, code = self._rings.get((provider, model)), self._app_codes.get(app)
            if held is None or code is None:
                continue
            held.put_apart(code, first, last)
            span = self._apart.setdefault((provider, model, app, int(hour)), [math.inf, -math.inf])
            span[0], span[1] = min(span[0], first), max(span[1], last)

    def _judge_series(self, key: tuple[str, str], cols: tuple[np.ndarray, ...], now: float,
                      tests: int, errors_apart: bool = False) -> DriftResult:
        """Every signal on every recent window at once; each signal's verdict is its
        strongest window (level first, then evidence)."""
        s = self.settings
        ts, out, flags, app, unit = cols
        fill = int(ts.shape[0])
        preset = s.preset_for(*key)
        limits = PRESETS[preset]
        hours = self._hours[key]
        ready = fill >= s.min_fill
        # the windows of the rates and of the lengths, as rows of one table; a signal's other rows stay empty
        rate_w = np.array([k for k in s.windows() if k <= fill] or [fill], dtype=np.int64)
        length_w = np.union1d([k for k in s.windows(LENGTH_WINDOW_FRACTIONS) if k <= fill], rate_w[-1:]).astype(np.int64)
        windows = np.union1d(rate_w, length_w)
        rate_rows, length_rows = np.searchsorted(windows, rate_w), np.searchsorted(windows, length_w)
        n_w = windows.shape[0]
        gap = (float(ts[-1]) - float(ts[0])) / (fill - 1) if fill > 1 else HOUR     # mean time between responses
        def thresholds(share: float) -> np.ndarray:
            """(W, 2) thresholds of the rates and of the length tests, each of these at its
            share of the budget (`LENGTH_TESTS`)."""
            return np.array([[z_threshold(max(float(k) * gap, 1.0), tests, PRESET_BUDGETS[preset] * share / split,
                                          len(fractions))
                              for fractions, split in ((WINDOW_FRACTIONS, 1), (LENGTH_WINDOW_FRACTIONS, LENGTH_TESTS))]
                             for k in windows.tolist()])
        zc = thresholds(1.0)
        zc_page = zc if self.page_share == 1.0 else thresholds(self.page_share)     # a severe level's (`page_evidence`)
        start = ts[fill - windows]
        # reference hours per window and signal: within baseline_s, complete before the window's first response
        in_range = ((hours.hour[None, :] >= math.floor((now - s.baseline_s) / HOUR))
                    & (hours.hour[None, :] <= np.floor(start / HOUR)[:, None] - 1))               # (W, slots)
        ref_mask = (in_range[:, None, :] & ~hours.tainted.T[None, :, :]).astype(np.int64)         # (W, signals, slots)

        value = np.full((n_w, len(SIGNALS)), math.nan)
        z = np.zeros((n_w, len(SIGNALS)))
        level = np.zeros((n_w, len(SIGNALS)), dtype=np.int64)
        # rates (while the model's failures are put on an app, all of them count, as the
        # rate it publishes then; after, the failures marked as the app's do not)
        ind = indicators(flags & ~_APART if errors_apart else flags)
        age = fill - 1 - np.arange(fill)                                                          # 0 = newest
        _, units = np.unique(unit, return_inverse=True)
        rate_cols = [SIGNALS.index(name) for name in RATES]
        ev = [e for e, _ in RATES.values()]
        tr = [t for _, t in RATES.values()]
        ref = np.einsum("wrs,sc->wrc", ref_mask[rate_rows][:, rate_cols], hours.counts)          # (W, rates, counts)
        r = np.arange(len(RATES))
        rate_var, length_var, short_var = hours.level_variances(ref_mask[-1], int(rate_w[0]))
        x, n, z_rate = rate_evidence(ind[:, ev], ind[:, tr], units, age, rate_w, ref[:, r, ev], ref[:, r, tr], rate_var)
        min_n = np.array([s.min_signal_n if name == "tool_silence_rate" else 1 for name in RATES])
        rate_value = np.where(n >= min_n, x / np.maximum(n, 1.0), math.nan)
        found = (z_rate >= zc[rate_rows, 0][:, None]) & (x >= s.min_events)
        for i, (c, name) in enumerate(zip(rate_cols, RATES)):
            value[rate_rows, c], z[rate_rows, c] = rate_value[:, i], z_rate[:, i]
            level[rate_rows, c] = page_evidence(np.where(found[:, i], levels(rate_value[:, i], limits[name]), 0),
                                                z_rate[:, i], zc_page[rate_rows, 0])
        # answer lengths
        j = SIGNALS.index("length_collapse_ratio")
        answer = (flags & (_ERROR | _EMPTY)) == 0
        length_mask = ref_mask[length_rows, j].astype(np.float64)
        reference = {code: _masked_sum(length_mask, rows) for code, rows in hours.lengths.items()}
        # how alike a conversation's answers are, from the ring's older half (outside the windows it could bias)
        older = answer & (age >= fill // 2)
        logs = np.log2(np.maximum(out[older], 1).astype(np.float64))
        app_mean = np.bincount(app[older], weights=logs) / np.maximum(np.bincount(app[older]), 1)
        likeness = intraclass_correlation(logs - app_mean[app[older]], units[older]) if older.any() else 0.0
        zc_len = zc[length_rows, 1]
        ratio, z_len, answers = length_evidence(length_bins(out[answer]), app[answer], units[answer], age[answer],
                                                length_w, reference, length_var, zc_len, likeness, short_var)
        # the answers of fewer conversations than min_events are a value but no evidence: their
        # likeness cannot be measured
        enough = answers >= s.min_signal_n
        spread = effective_conversations(units[answer], age[answer], length_w) >= s.min_events
        value[length_rows, j] = np.where(enough, ratio, math.nan)
        z[length_rows, j] = np.where(enough & spread, z_len, 0.0)
        level[length_rows, j] = page_evidence(
            np.where(enough & spread & (z_len <= -zc_len), levels(ratio, limits["length_collapse_ratio"]), 0),
            z_len, zc_page[length_rows, 1])
        if not ready:
            level[:] = 0
        # each signal's deciding window: the highest level, then the strongest evidence; the largest window without one
        strength = np.where(level > 0, level * 1e6 + np.abs(z), -1.0)
        pick = np.where(level.max(axis=0) > 0, np.argmax(strength, axis=0), n_w - 1)
        cols_ = np.arange(len(SIGNALS))
        best_level = level[pick, cols_]
        reasons: list[str] = []
        for i, name in enumerate(SIGNALS):
            if not best_level[i]:
                continue
            th = limits[name]
            w = int(pick[i])
            limit = th.severe if best_level[i] == 2 else th.mild
            if hours.taint(math.floor(float(start[w]) / HOUR), math.floor(now / HOUR), i):
                self.taint_version += 1
            if errors_apart and name == "error_rate":
                # one app's failures, which the anomaly evaluator names at the app: no verdict
                # here, but its hours stay out of the reference like any other drifting hours
                best_level[i] = 0
                continue
            reasons.append(f"{name} {value[w, i]:.2f} {'>=' if th.above else '<='} "
                           f"{'severe' if best_level[i] == 2 else 'mild'} {limit:.2f} "
                           f"(last {int(windows[w])} responses, z {z[w, i]:.1f})")
        severity = judge(dict(zip(SIGNALS, best_level.tolist())))
        return DriftResult(key[0], key[1], dict(zip(SIGNALS, value[pick, cols_].tolist())), severity, reasons, fill,
                           ready, preset, dict(zip(SIGNALS, z[pick, cols_].tolist())),
                           dict(zip(SIGNALS, windows[pick].tolist())), errors_apart)


def _session_units(session_id: np.ndarray, first_solo: int) -> np.ndarray:
    """A unit per response for the design effect: a hash of its session id, or, without
    one, a negative number of its own (counted from `first_solo`, so never reused). Hashes
    only need to be equal within a process."""
    n = session_id.shape[0]
    none = np.asarray(session_id == None, dtype=bool)  # noqa: E711 (element-wise on an object array)
    units = -1 - first_solo - np.arange(n, dtype=np.int64)
    if not none.all():
        uniq, inv = factorize(session_id[~none])
        hashed = np.array([hash(u) & 0x7FFFFFFFFFFFFFFF for u in uniq.tolist()], dtype=np.int64)  # per distinct session
        units[~none] = hashed[inv]
    return units
