"""Anomalies injected into a copy of the base traffic at known times and sizes.

Each kind names the signals that should catch it (the first is the one the targets are
judged on) and the scopes that contain it: an instance counts as detected when one of
those signals reaches warning on one of those scopes between its start and its end plus
the grace period. Instances of one kind share a run and sit at least a day apart, so no
instance falls in another's window; each kind gets its own copy of the traffic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from traffic import DAY, HOUR, MODELS, Traffic, modelled

ScopeKey = tuple[str, str, str, str]
GLOBAL: ScopeKey = ("global", "", "", "")
MIN = 60.0


def app_scope(app: str) -> ScopeKey:
    return ("app", app, "", "")


def model_scope(model: str) -> ScopeKey:
    return ("model", "", MODELS[model].provider, model)


@dataclass
class Anomaly:
    """One injected instance: when, how big, where, and which signals should see it."""

    kind: str
    start: float
    end: float
    size: float
    scopes: list[ScopeKey]
    signals: tuple[str, ...]
    gated: bool           # counts towards the recall / delay targets (size 2x and above)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scopes"] = ["/".join(p for p in s if p) for s in self.scopes]
        return d


@dataclass(frozen=True)
class Kind:
    name: str
    duration: float
    size: float
    signals: tuple[str, ...]
    describe: str
    apply: Callable[[Traffic, float, float, np.random.Generator], tuple[Traffic, list[ScopeKey]]]
    gated: bool = True               # judged against the recall and delay targets (a change of 2x and above)


def _window(tr: Traffic, start: float, end: float) -> np.ndarray:
    return (tr.ts >= start) & (tr.ts < end)


def _scale_tokens(tr: Traffic, sel: np.ndarray, factor: np.ndarray | float) -> None:
    """Multiply input and output tokens (so the cost by the same factor); the generation
    time grows with the output so the model's speed stays as it was."""
    f = np.broadcast_to(np.asarray(factor, dtype=float), tr.ts.shape)[sel]
    tr.input_tokens[sel] = np.round(tr.input_tokens[sel] * f).astype(np.int64)
    gen = tr.latency[sel] - np.nan_to_num(tr.ttft[sel], nan=0.0)
    tr.output_tokens[sel] = np.round(tr.output_tokens[sel] * f).astype(np.int64)
    tr.latency[sel] = tr.latency[sel] + gen * (f - 1.0)


def _scopes_of(tr: Traffic, sel: np.ndarray, apps: bool = True, models: bool = True) -> list[ScopeKey]:
    out = [GLOBAL]
    if apps:
        out += [app_scope(a) for a in sorted(set(tr.app[sel].tolist()))]
    if models:
        out += [model_scope(m) for m in sorted(set(tr.model[sel].tolist()))]
    return out


def cost_spike(app: str, factor: float) -> Callable:
    def apply(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
        sel = _window(tr, start, end) & (tr.app == app) & ~tr.error
        _scale_tokens(tr, sel, factor)
        return tr, _scopes_of(tr, sel)
    return apply


def cost_creep(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """All traffic's cost grows linearly to +50 % over the window (then falls back)."""
    sel = _window(tr, start, end) & ~tr.error
    factor = 1.0 + 0.5 * (tr.ts - start) / (end - start)
    _scale_tokens(tr, sel, factor)
    return tr, _scopes_of(tr, sel)


def token_runaway(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """One agent session re-sending its growing context every 20 s (alternating tools, so
    no identical-tool run): 90 calls in 30 minutes, input 3k growing by 1.5k per call."""
    n = int((end - start) // 20)
    ts = start + 20.0 * np.arange(n) + rng.uniform(0, 2, n)
    inp = np.minimum(3000 + 1500 * np.arange(n), 120_000).astype(np.int64)
    outp = rng.integers(200, 600, n).astype(np.int64)
    sid = np.full(n, f"runaway-{int(start)}", dtype=object)
    extra = modelled(rng, ts, "agent", "gpt-4o-mini", inp, outp, session=sid, tools=True)
    extra.error[:] = False
    extra.error_type[:] = None
    extra.tool_calls[:] = 1
    extra.tool_name[:] = np.where(np.arange(n) % 2 == 0, "search", "fetch_page")
    extra.stop[:] = "tool_calls"
    return tr.append(extra), [app_scope("agent")]


def retry_storm(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """support-chat retries without back-off: every minute a burst of 10 calls within 3 s,
    all rejected with rate_limit (no tokens, fast), no session id."""
    minutes = int((end - start) // MIN)
    ts = np.concatenate([start + m * MIN + np.sort(rng.uniform(0, 3, 10)) for m in range(minutes)])
    n = ts.shape[0]
    extra = modelled(rng, ts, "support-chat", "claude-3-5-haiku", np.zeros(n, np.int64), np.zeros(n, np.int64))
    extra.error[:] = True
    extra.error_type[:] = "rate_limit"
    extra.latency[:] = rng.uniform(0.05, 0.3, n)
    extra.ttft[:] = np.nan
    extra.stop[:] = None
    return tr.append(extra), [GLOBAL, app_scope("support-chat"), model_scope("claude-3-5-haiku")]


def error_storm(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """20 % of claude-3-5-haiku calls fail with server errors (all apps that use it)."""
    sel = _window(tr, start, end) & (tr.model == "claude-3-5-haiku") & ~tr.error
    hit = sel & (rng.random(len(tr)) < 0.2 / 0.99)
    tr.error[hit] = True
    tr.error_type[hit] = "server_error"
    tr.input_tokens[hit] = 0
    tr.output_tokens[hit] = 0
    tr.latency[hit] = rng.uniform(0.05, 1.5, int(hit.sum()))
    tr.ttft[hit] = np.nan
    tr.tool_calls[hit] = 0
    tr.tool_name[hit] = None
    return tr, _scopes_of(tr, sel)


def latency_spike(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """gpt-4o answers 2.5x slower (TTFT and total duration)."""
    sel = _window(tr, start, end) & (tr.model == "gpt-4o") & ~tr.error
    tr.latency[sel] *= 2.5
    tr.ttft[sel] *= 2.5
    return tr, _scopes_of(tr, sel)


def throughput_halved(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """gpt-4o-mini generates at half its speed (generation time doubles, TTFT unchanged)."""
    sel = _window(tr, start, end) & (tr.model == "gpt-4o-mini") & ~tr.error
    gen = tr.latency[sel] - np.nan_to_num(tr.ttft[sel], nan=0.0)
    tr.latency[sel] += gen
    return tr, _scopes_of(tr, sel)


def rate_drop(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """All traffic drops to 3 % for the window (an upstream outage)."""
    sel = _window(tr, start, end)
    scopes = _scopes_of(tr, sel)
    keep = ~sel | (rng.random(len(tr)) < 0.03)
    return tr.select(keep), scopes


def drift_empty(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """20 % of gpt-4o-mini answers come back empty (HTTP 200, zero output tokens)."""
    sel = _window(tr, start, end) & (tr.model == "gpt-4o-mini") & ~tr.error
    hit = sel & (rng.random(len(tr)) < 0.2)
    tr.latency[hit] = np.nan_to_num(tr.ttft[hit], nan=0.3) + 0.05
    tr.output_tokens[hit] = 0
    tr.tool_calls[hit] = 0
    tr.tool_name[hit] = None
    tr.stop[hit] = "stop"
    return tr, [model_scope("gpt-4o-mini")]


def drift_length(tr: Traffic, start: float, end: float, rng: np.random.Generator) -> tuple[Traffic, list[ScopeKey]]:
    """claude-3-5-haiku answers shrink to a fifth of their length."""
    sel = _window(tr, start, end) & (tr.model == "claude-3-5-haiku") & ~tr.error & (tr.output_tokens > 0)
    gen = tr.latency[sel] - np.nan_to_num(tr.ttft[sel], nan=0.0)
    tr.output_tokens[sel] = np.maximum(1, np.round(tr.output_tokens[sel] * 0.2)).astype(np.int64)
    tr.latency[sel] -= gen * 0.8
    return tr, [model_scope("claude-3-5-haiku")]


KINDS: tuple[Kind, ...] = (
    Kind("cost_spike_2x", HOUR, 2.0, ("cost_per_hour", "token_velocity"),
         "rag-search cost x2 for 1 h (tokens x2)", cost_spike("rag-search", 2.0)),
    Kind("cost_spike_5x", HOUR, 5.0, ("cost_per_hour", "token_velocity"),
         "rag-search cost x5 for 1 h (tokens x5)", cost_spike("rag-search", 5.0)),
    Kind("cost_creep", DAY, 1.5, ("cost_per_hour",),
         "all cost +0 -> +50 % over 24 h", cost_creep, gated=False),
    Kind("token_runaway", 30 * MIN, 10.0, ("runaway", "runaway.token_burst", "runaway.chain_length", "token_velocity"),
         "one agent session, 90 calls in 30 min, context 3k -> 120k", token_runaway),
    Kind("retry_storm", 30 * MIN, 10.0, ("runaway.invocation", "error_rate", "request_rate"),
         "support-chat: 10 failing calls a minute for 30 min", retry_storm),
    Kind("error_storm", HOUR, 20.0, ("error_rate", "drift", "drift.error_rate"),
         "claude-3-5-haiku 20 % errors for 1 h", error_storm),
    Kind("latency_spike", HOUR, 2.5, ("latency_p95", "ttft_p95"),
         "gpt-4o latency and TTFT x2.5 for 1 h", latency_spike),
    Kind("throughput_halved", HOUR, 2.0, ("output_tokens_per_second",),
         "gpt-4o-mini output speed /2 for 1 h", throughput_halved),
    Kind("rate_drop", HOUR, 33.0, ("request_rate",),
         "all traffic down to 3 % for 1 h", rate_drop),
    Kind("drift_empty", 3 * HOUR, 20.0, ("drift", "drift.empty_response_rate"),
         "gpt-4o-mini 20 % empty answers for 3 h", drift_empty),
    Kind("drift_length", 3 * HOUR, 5.0, ("drift", "drift.length_collapse_ratio"),
         "claude-3-5-haiku answers x0.2 long for 3 h", drift_length),
)
KIND_BY_NAME = {k.name: k for k in KINDS}


def inject(base: Traffic, kind: Kind, starts: list[float], seed: int) -> tuple[Traffic, list[Anomaly]]:
    """A copy of `base` with one instance of `kind` at each start."""
    tr = base.copy()
    rng = np.random.default_rng(seed)
    out: list[Anomaly] = []
    for s in starts:
        tr, scopes = kind.apply(tr, s, s + kind.duration, rng)
        out.append(Anomaly(kind.name, s, s + kind.duration, kind.size, scopes, kind.signals, kind.gated))
    return tr.sorted(), out
