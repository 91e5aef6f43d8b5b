"""Traffic for the detection benchmark: real arrival processes and token sizes made into
weeks of usage records.

Base traffic (`build_traffic`)
- Arrivals and sessions: the RAGPulse trace (7 days of a university RAG service, MIT).
  It is cut into its six complete local days, each starting at 04:00 (the quietest
  hour of its daily cycle), and the days are laid end to end in a seeded order to fill
  as many days as asked. Each app is its own copy of that process with its own day
  order, so apps share the daily cycle but not their day-to-day noise. Repeated days are
  the only synthetic part of the timing.
- Token sizes: RAGPulse's own input/output tokens for the RAG and agent apps; the Azure
  LLM inference traces (2023, CC-BY 4.0) for the chat (conversation trace) and code
  (code trace) apps, drawn per request with a seeded generator.
- Everything else is modelled, per request, from a seeded generator: the model of a
  session (fixed per app mix), latency (a per-model log-normal TTFT plus per-token
  prefill time, then output tokens at a per-model log-normal speed), about 1 % errors
  (rate limits, server errors, timeouts), stop reasons of each provider's spelling, and
  tool use (the agent app offers tools on every call; RAGPulse's web-search flag becomes
  a tool call in the RAG app).

Split traffic (`split_records`)
- The same records over n times the apps (by session) and model deployments (by
  request, as a suffix of the provider), to see whether false alarms grow with the
  number of series.

NAB traffic (`nab_traffic`)
- A NAB series' value is read as a request rate per 5-minute bucket, scaled so that the
  median bucket holds `median_per_bucket` requests; each bucket's requests get uniform
  arrival times within it and token sizes from the Azure conversation trace.

All of it is deterministic for a given seed. Traces are read at run time from
`../shared/data` next to the repository (or `$LLM_BENCH_DATA`); nothing derived from
them is stored in the repository.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

try:
    from exporter.zones import utc_offsets
except ImportError:                        # before the zones had a module of their own
    from exporter.detectors.budget import utc_offsets  # type: ignore[no-redef]

try:
    from exporter.ingest.records import UsageRecord
except ImportError:                        # an older revision, for a before / after comparison
    from exporter.records import UsageRecord  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0
HOUR = 3600.0
EPOCH = 1_736_121_600.0                  # 2025-01-06T00:00:00Z, a Monday; synthetic day 0
DAY_START_S = 4 * HOUR                   # synthetic days begin at 04:00, RAGPulse's quietest hour
RAGPULSE_LOCAL_OFFSET = 43316.0          # trace t=0 is 12:01:56 local (UTC+8) on 2025-09-10
RAGPULSE_FIRST_CUT = DAY - RAGPULSE_LOCAL_OFFSET + DAY_START_S   # trace second of the first 04:00


def data_dir() -> Path:
    env = os.environ.get("LLM_BENCH_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


class MissingData(RuntimeError):
    """A trace the benchmark needs is not on this machine."""


def _need(path: Path) -> Path:
    if not path.exists():
        raise MissingData(f"trace not found: {path} (expected the shared traces in {data_dir()})")
    return path


# --- models ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelProfile:
    provider: str
    model: str
    ttft_median_s: float       # time to first token for a short prompt
    ttft_sigma: float          # log-normal sigma of TTFT
    prefill_s_per_token: float
    tps_median: float          # output tokens per second of generation
    tps_sigma: float
    stop: str                  # normal stop reason
    length_stop: str           # stop reason at the length limit
    tool_stop: str             # stop reason when the answer is a tool call


MODELS: dict[str, ModelProfile] = {
    "gpt-4o-mini": ModelProfile("openai", "gpt-4o-mini", 0.40, 0.35, 2.0e-5, 85.0, 0.25, "stop", "length", "tool_calls"),
    "gpt-4o": ModelProfile("openai", "gpt-4o", 0.55, 0.35, 3.0e-5, 55.0, 0.25, "stop", "length", "tool_calls"),
    "claude-3-5-haiku": ModelProfile("anthropic", "claude-3-5-haiku", 0.65, 0.30, 2.5e-5, 65.0, 0.25,
                                     "end_turn", "max_tokens", "tool_use"),
}


@dataclass(frozen=True)
class AppProfile:
    name: str
    copies: int                          # RAGPulse arrival copies (volume)
    tokens: str                          # "ragpulse", "azure_conv", "azure_code"
    models: tuple[tuple[str, float], ...]  # model mix per session
    tools: bool = False                  # offers tools on every call (agent)
    stream: bool = True


APPS: tuple[AppProfile, ...] = (
    AppProfile("rag-search", 2, "ragpulse", (("gpt-4o-mini", 0.85), ("gpt-4o", 0.15))),
    AppProfile("support-chat", 1, "azure_conv", (("claude-3-5-haiku", 1.0),)),
    AppProfile("code-assist", 1, "azure_code", (("gpt-4o", 0.6), ("claude-3-5-haiku", 0.4)), stream=False),
    AppProfile("agent", 1, "ragpulse", (("gpt-4o-mini", 1.0),), tools=True),
)
TOOLS = ("search", "fetch_page", "run_sql", "calculator")
ERROR_MIX = (("rate_limit", 0.45), ("server_error", 0.35), ("timeout", 0.20))
BASE_ERROR_RATE = 0.01


# --- columns --------------------------------------------------------------------------

@dataclass
class Traffic:
    """Usage records as columns (easy to modify in place for injections)."""

    ts: np.ndarray
    app: np.ndarray
    model: np.ndarray            # model name; the provider follows from MODELS
    session: np.ndarray          # object, None for no session
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    latency: np.ndarray
    ttft: np.ndarray             # NaN when not streamed
    error: np.ndarray            # bool
    error_type: np.ndarray       # object
    stop: np.ndarray             # object
    had_tools: np.ndarray        # bool
    tool_calls: np.ndarray       # int
    tool_name: np.ndarray        # object: the one tool called (None when no call)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def columns(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "meta"]

    def copy(self) -> "Traffic":
        return Traffic(**{c: getattr(self, c).copy() for c in self.columns()}, meta=dict(self.meta))

    def select(self, mask: np.ndarray) -> "Traffic":
        return Traffic(**{c: getattr(self, c)[mask] for c in self.columns()}, meta=dict(self.meta))

    def append(self, other: "Traffic") -> "Traffic":
        return Traffic(**{c: np.concatenate([getattr(self, c), getattr(other, c)]) for c in self.columns()},
                       meta=dict(self.meta))

    def sorted(self) -> "Traffic":
        order = np.argsort(self.ts, kind="stable")
        return Traffic(**{c: getattr(self, c)[order] for c in self.columns()}, meta=dict(self.meta))

    def to_records(self) -> list[UsageRecord]:
        """UsageRecords in event-time order (the backtest's input)."""
        t = self.sorted()
        out: list[UsageRecord] = []
        prov = {m: p.provider for m, p in MODELS.items()}
        cols = zip(t.ts.tolist(), t.app.tolist(), t.model.tolist(), t.session.tolist(), t.input_tokens.tolist(),
                   t.output_tokens.tolist(), t.latency.tolist(), t.ttft.tolist(), t.error.tolist(),
                   t.error_type.tolist(), t.stop.tolist(), t.had_tools.tolist(), t.tool_calls.tolist(),
                   t.tool_name.tolist())
        for ts, app, model, sid, inp, outp, lat, ttft, err, et, stop, had, ncalls, tool in cols:
            streamed = ttft == ttft
            out.append(UsageRecord(
                ts=ts, provider=prov[model], model=model, app=app, input_tokens=int(inp), output_tokens=int(outp),
                latency_s=float(lat), ttft_s=float(ttft) if streamed else None, stream=streamed,
                status="error" if err else "ok", error_type=et if err else None, stop_reason=None if err else stop,
                request_had_tools=bool(had), tool_calls=int(ncalls),
                tool_names=(tool,) * int(ncalls) if tool else (), session_id=sid))
        return out


def empty_traffic() -> Traffic:
    o = lambda: np.empty(0, dtype=object)  # noqa: E731
    return Traffic(np.empty(0), o(), o(), o(), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty(0),
                   np.empty(0, bool), o(), o(), np.empty(0, bool), np.empty(0, np.int64), o())


# --- trace readers --------------------------------------------------------------------

_CACHE: dict[str, Any] = {}


def ragpulse() -> dict[str, np.ndarray]:
    """RAGPulse columns: t (s from trace start), input, output, session, web."""
    if "ragpulse" not in _CACHE:
        path = _need(data_dir() / "ragpulse" / "ragpulse_trace.csv")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        _CACHE["ragpulse"] = {
            "t": np.array([float(r["timestamp_s"]) for r in rows]),
            "input": np.array([int(r["input_tokens"]) for r in rows], dtype=np.int64),
            "output": np.array([int(r["output_tokens"]) for r in rows], dtype=np.int64),
            "session": np.array([r["session_id"] for r in rows], dtype=object),
            "web": np.array([r["used_web_search"] == "1" for r in rows]),
        }
    return _CACHE["ragpulse"]


def azure(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(context tokens, generated tokens) of the Azure code or conv trace."""
    key = f"azure_{kind}"
    if key not in _CACHE:
        path = _need(data_dir() / "azure-llm-2023" / f"AzureLLMInferenceTrace_{kind}.csv")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        _CACHE[key] = (np.array([int(r["ContextTokens"]) for r in rows], dtype=np.int64),
                       np.array([int(r["GeneratedTokens"]) for r in rows], dtype=np.int64))
    return _CACHE[key]


def ragpulse_days() -> list[np.ndarray]:
    """Indices of the trace's six complete local days (04:00 to 04:00)."""
    t = ragpulse()["t"]
    out = []
    k = 0
    while RAGPULSE_FIRST_CUT + (k + 1) * DAY <= t.max() + 1:
        lo = RAGPULSE_FIRST_CUT + k * DAY
        out.append(np.flatnonzero((t >= lo) & (t < lo + DAY)))
        k += 1
    return out


# --- per-request modelling ------------------------------------------------------------

def _requests(rng: np.random.Generator, ts: np.ndarray, app: AppProfile, session: np.ndarray,
              inp: np.ndarray, outp: np.ndarray, web: np.ndarray) -> Traffic:
    """Model, latency, errors, stop reasons and tools for one app's arrivals."""
    n = ts.shape[0]
    names = np.array([m for m, _ in app.models], dtype=object)
    probs = np.array([p for _, p in app.models])
    uniq, inv = np.unique(session.astype(str), return_inverse=True)
    model = names[rng.choice(len(names), size=uniq.shape[0], p=probs)][inv]

    ttft = np.empty(n)
    tps = np.empty(n)
    for name in np.unique(model).tolist():
        p = MODELS[name]
        sel = model == name
        k = int(sel.sum())
        ttft[sel] = p.ttft_median_s * rng.lognormal(0.0, p.ttft_sigma, k) + p.prefill_s_per_token * inp[sel]
        tps[sel] = p.tps_median * rng.lognormal(0.0, p.tps_sigma, k)
    latency = ttft + outp / tps

    error = rng.random(n) < BASE_ERROR_RATE
    et_names = np.array([e for e, _ in ERROR_MIX], dtype=object)
    error_type = np.where(error, et_names[rng.choice(len(ERROR_MIX), size=n, p=[p for _, p in ERROR_MIX])], None)
    # Failed calls: no tokens billed; rate limits and server errors fail fast, timeouts wait.
    fail_latency = np.where(error_type == "timeout", rng.uniform(20.0, 60.0, n), rng.uniform(0.05, 1.5, n))
    latency = np.where(error, fail_latency, latency)
    inp = np.where(error, 0, inp)
    outp = np.where(error, 0, outp)

    stop = np.empty(n, dtype=object)
    for name in np.unique(model).tolist():
        p = MODELS[name]
        sel = model == name
        r = rng.random(int(sel.sum()))
        stop[sel] = np.where(r < 0.015, p.length_stop, np.where(r < 0.017, "content_filter", p.stop))

    had_tools = np.zeros(n, dtype=bool)
    tool_calls = np.zeros(n, dtype=np.int64)
    tool_name = np.full(n, None, dtype=object)
    tools = np.array(TOOLS, dtype=object)
    if app.tools:
        had_tools[:] = True
        calls = rng.random(n) < 0.7
        tool_calls = np.where(calls, rng.integers(1, 3, n), 0)
        tool_name = np.where(calls, tools[rng.integers(0, len(TOOLS), n)], None)
    else:
        had_tools = web.copy()
        tool_calls = web.astype(np.int64)
        tool_name = np.where(web, "web_search", None)
    tool_calls = np.where(error, 0, tool_calls)
    tool_name = np.where(error, None, tool_name)
    for name in np.unique(model).tolist():
        sel = (model == name) & (tool_calls > 0)
        stop[sel] = MODELS[name].tool_stop
    ttft_col = np.where(error, np.nan, np.minimum(ttft, latency)) if app.stream else np.full(n, np.nan)

    return Traffic(ts, np.full(n, app.name, dtype=object), model.astype(object), session,
                   inp.astype(np.int64), outp.astype(np.int64), latency, ttft_col, error, error_type.astype(object),
                   stop, had_tools, tool_calls.astype(np.int64), tool_name.astype(object))


def build_traffic(days: int, seed: int = 7, apps: tuple[AppProfile, ...] = APPS, volume: int = 1,
                  weekend: float = 1.0, share: float = 1.0) -> Traffic:
    """`days` synthetic days from EPOCH (each from 04:00 to 04:00), all apps, sorted by time.
    `volume` multiplies every app's RAGPulse arrival copies: a busier site of the same apps,
    each copy replaying its own seeded order of the real days. `weekend` is the share of
    the sessions kept on Saturdays and Sundays (EPOCH is a Monday): a site used at work,
    whose weekends are quieter than its weekdays. `share` is the share of the sessions kept
    on every day (times `weekend` on weekends): a quieter site of the same apps."""
    rp = ragpulse()
    day_idx = ragpulse_days()
    rng = np.random.default_rng(seed)
    orders = day_orders(np.random.default_rng([seed, 3]), [app.copies for app in apps], volume, days, len(day_idx))
    parts: list[Traffic] = []
    for a, app in enumerate(apps):
        for copy in range(app.copies * volume):
            order = orders[a][copy]
            ts_l, sess_l, in_l, out_l, web_l = [], [], [], [], []
            for d in range(days):
                k = order[d]
                idx = day_idx[k]
                if weekend < 1.0 and d % 7 >= 5:
                    sess, inv = np.unique(rp["session"][idx].astype(str), return_inverse=True)
                    idx = idx[(rng.random(sess.size) < weekend)[inv]]
                lo = RAGPULSE_FIRST_CUT + k * DAY
                ts_l.append(EPOCH + d * DAY + DAY_START_S + (rp["t"][idx] - lo))
                sess_l.append(np.array([f"{app.name}-{copy}-{d}-{s}" for s in rp["session"][idx].tolist()], dtype=object))
                web_l.append(rp["web"][idx])
                if app.tokens == "ragpulse":
                    in_l.append(rp["input"][idx])
                    out_l.append(rp["output"][idx])
                else:
                    ai, ao = azure(app.tokens.split("_")[1])
                    pick = rng.integers(0, ai.shape[0], idx.shape[0])
                    in_l.append(ai[pick])
                    out_l.append(ao[pick])
            ts = np.concatenate(ts_l)
            # Jitter arrivals by up to a second so that two copies of one trace day never share a timestamp.
            ts = ts + rng.uniform(0.0, 1.0, ts.shape[0])
            if copy >= app.copies:
                # A volume copy is other users having the same kinds of conversation, not the same
                # users at the same second: with six real days, copies of one day would otherwise
                # replay each conversation several times within a second under different session
                # ids, answers no detector can tell from independent ones. Each session of such a
                # copy starts up to an hour earlier or later (its own generator, so the other draws
                # and volume 1 stay as they were), keeping its own pacing and the day's shape.
                sess = np.concatenate(sess_l)
                _, inv = np.unique(sess.astype(str), return_inverse=True)
                shift_rng = np.random.default_rng([seed, apps.index(app), copy])
                ts = ts + shift_rng.uniform(-HOUR, HOUR, int(inv.max()) + 1)[inv]
            web = np.concatenate(web_l) if app.tokens == "ragpulse" and not app.tools else np.zeros(ts.shape[0], bool)
            parts.append(_requests(rng, ts, app, np.concatenate(sess_l), np.concatenate(in_l),
                                   np.concatenate(out_l), web))
    out = parts[0]
    for p in parts[1:]:
        out = out.append(p)
    out = out.sorted()
    if share < 1.0:        # after every other draw (its own generator): the full site's sessions, a share of them
        names, inv = np.unique(out.session.astype(str), return_inverse=True)
        out = out.select((np.random.default_rng([seed, 1]).random(names.size) < share)[inv])
    out.meta = {"days": days, "seed": seed, "start": EPOCH, "end": EPOCH + days * DAY + DAY_START_S}
    return out


def day_orders(rng: np.random.Generator, copies: list[int], volume: int, days: int, real: int) -> list[list[list[int]]]:
    """Which real day each app copy replays on each synthetic day: `orders[app][copy][day]`.

    Each copy goes through the `real` days in a random order, block after block. The apps'
    own copies (the first `copies[app]` of each; at most `real` of them in all) never replay
    the same real day on the same date: such a pair would send the same conversations at
    the same second under two apps' names, so the site's traffic would vary as one user
    base's, not as the sum of independent ones (on the six real days, random orders put
    such a pair on most dates, and the variance of all traffic's 5-minute counts was 1.3 to
    2.4 times the sum of its apps'). Each block's permutation is drawn again until it
    differs at every date from those already drawn; a Latin rectangle always extends, so a
    draw is found. The volume copies are drawn freely (each of their sessions is moved by
    up to an hour)."""
    base = sum(copies)
    if base > real:
        raise ValueError(f"{base} app copies cannot replay distinct days of {real} on every date")
    blocks = -(-days // real)
    taken = np.full((0, blocks * real), -1)
    out: list[list[list[int]]] = []
    for n in copies:
        mine: list[list[int]] = []
        for copy in range(n * volume):
            if copy < n:
                order = np.concatenate([_distinct_permutation(rng, taken[:, b * real:(b + 1) * real], real)
                                        for b in range(blocks)])
                taken = np.vstack([taken, order])
            else:
                order = np.concatenate([rng.permutation(real) for _ in range(blocks)])
            mine.append(order[:days].tolist())
        out.append(mine)
    return out


def _distinct_permutation(rng: np.random.Generator, taken: np.ndarray, real: int) -> np.ndarray:
    """A random permutation of range(real) that differs from every row of `taken` at every place."""
    while True:
        perm = rng.permutation(real)
        if not np.any(taken == perm):
            return perm


def in_zone(tr: Traffic, zone: str, shift: float) -> Traffic:
    """The traffic of a site whose users live in `zone`: the synthetic timeline, moved on
    by `shift` seconds, is read as their wall-clock time and converted to UTC, so their
    days move in UTC when their clocks change for daylight saving time. (A wall time the
    clocks skip takes the offset from before the change; of a wall hour that happens twice
    only the first happens: a night hour, as the clocks change at night.)"""
    out = tr.copy()
    wall = tr.ts + shift
    first = utc_offsets(wall, zone)
    out.ts = wall - utc_offsets(wall - first, zone)
    out = out.sorted()
    out.meta = dict(tr.meta)
    return out


def zone_shift(zone: str, scored_start: float) -> float:
    """Whole weeks to move the synthetic timeline by, so that `zone`'s first change of the
    clocks after it falls in the week before the scored days (for the full plan, which
    starts on a Monday, the Sunday night before): the scored days are the first after the
    change. The weekdays stay as they were."""
    for weeks in range(0, 60):
        at = scored_start + weeks * 7 * DAY
        if utc_offsets(np.array([at - 7 * DAY]), zone)[0] != utc_offsets(np.array([at]), zone)[0]:
            return weeks * 7 * DAY
    raise ValueError(f"{zone} does not change its clocks")


def modelled(rng: np.random.Generator, ts: np.ndarray, app: str, model: str, inp: np.ndarray, outp: np.ndarray,
             session: np.ndarray | None = None, stream: bool = True, tools: bool = False) -> Traffic:
    """Requests at given times and token sizes, modelled like the base traffic (for injections and NAB)."""
    n = ts.shape[0]
    prof = AppProfile(app, 1, "", ((model, 1.0),), tools=tools, stream=stream)
    sess = session if session is not None else np.full(n, None, dtype=object)
    t = _requests(rng, ts, prof, np.where(sess == None, "", sess).astype(object), inp, outp,  # noqa: E711
                  np.zeros(n, dtype=bool))
    t.session = sess
    return t


def split_records(records: list[UsageRecord], n: int, seed: int = 13) -> list[UsageRecord]:
    """The same requests spread over n times as many apps and model deployments: each
    session goes to one of n copies of its app (`rag-search-1` .. `rag-search-<n>`; requests
    without a session are placed one by one), and each request to one of n deployments of
    its model, named by a suffixed provider (`openai-1` ..), so the model name and its
    price stay as they were. Volume, timing and sizes are unchanged; only the number of
    series each signal is judged on grows (n x the apps, n x the models)."""
    if n <= 1:
        return records
    rng = np.random.default_rng(seed)
    sessions = sorted({r.session_id for r in records if r.session_id})
    copy_of = dict(zip(sessions, rng.integers(1, n + 1, len(sessions)).tolist()))
    loose = rng.integers(1, n + 1, len(records)).tolist()
    deployment = rng.integers(1, n + 1, len(records)).tolist()
    return [replace(r, app=f"{r.app}-{copy_of[r.session_id] if r.session_id else a}", provider=f"{r.provider}-{d}")
            for r, a, d in zip(records, loose, deployment)]


# --- NAB ------------------------------------------------------------------------------

NAB_FILES = (
    "artificialNoAnomaly/art_daily_small_noise.csv",
    "artificialWithAnomaly/art_daily_jumpsup.csv",
    "realAWSCloudwatch/ec2_cpu_utilization_53ea38.csv",
    "realAWSCloudwatch/elb_request_count_8c0756.csv",
    "realAdExchange/exchange-2_cpc_results.csv",
    "realTraffic/TravelTime_387.csv",
    "realTweets/Twitter_volume_AAPL.csv",
    "realTweets/Twitter_volume_GOOG.csv",
)


def _nab_time(s: str) -> float:
    return datetime.fromisoformat(s.strip()).replace(tzinfo=timezone.utc).timestamp()


def nab_series(name: str) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """(timestamps, values, labelled windows) of one NAB file; times read as UTC."""
    root = data_dir() / "nab"
    with open(_need(root / "data" / name), newline="") as fh:
        rows = list(csv.DictReader(fh))
    ts = np.array([_nab_time(r["timestamp"]) for r in rows])
    vals = np.array([float(r["value"]) for r in rows])
    labels = json.loads(_need(root / "labels" / "combined_windows.json").read_text())
    windows = [(_nab_time(a), _nab_time(b)) for a, b in labels.get(name, [])]
    return ts, vals, windows


def nab_files() -> list[str]:
    """Every labelled series under nab/data (the list above, checked against the labels file)."""
    root = data_dir() / "nab"
    labels = json.loads(_need(root / "labels" / "combined_windows.json").read_text())
    found = sorted(str(p.relative_to(root / "data")) for p in (root / "data").rglob("*.csv"))
    return [f for f in found if f in labels]


def nab_traffic(name: str, seed: int = 11, median_per_bucket: float = 12.0) -> tuple[Traffic, list[tuple[float, float]]]:
    """Requests whose rate per 5-minute bucket follows the NAB series (see module doc)."""
    ts, vals, windows = nab_series(name)
    rng = np.random.default_rng(seed)
    order = np.argsort(ts)
    ts, vals = ts[order], vals[order]
    gaps = np.diff(ts)
    step = float(np.median(gaps))
    dur = np.r_[gaps, step]
    dur = np.minimum(dur, 4 * step)      # a hole in the series is a hole, not a long bucket
    vals = np.maximum(vals, 0.0)
    med = float(np.median(vals[vals > 0])) if (vals > 0).any() else 1.0
    expected = vals / med * median_per_bucket * dur / 300.0
    counts = np.floor(expected + rng.random(expected.shape[0])).astype(np.int64)   # stochastic rounding
    starts = np.repeat(ts, counts)
    t = starts + rng.random(starts.shape[0]) * np.repeat(dur, counts)
    ai, ao = azure("conv")
    pick = rng.integers(0, ai.shape[0], t.shape[0])
    tr = modelled(rng, np.sort(t), "nab", "gpt-4o-mini", ai[pick], ao[pick])
    tr.meta = {"start": float(ts[0]), "end": float(ts[-1] + dur[-1]), "file": name,
               "scale": median_per_bucket / med, "step": step}
    return tr, windows
