"""The detection benchmark's scoring, on a reduced scenario set through the real backtest.

Three days of RAGPulse-based history and one scored day: a run with a 5x cost spike in
one app, evaluated every minute around the spike, and a clean day evaluated every five
minutes. The scores must agree with what the backtest itself reports: its list of
severity transitions for the verdicts, and for the alerts a plain step-by-step replay of
Prometheus' `for:` over the snapshots' own rows (severity and `explained_by`, as the API
publishes them). The `for:` and explained logic is also checked on hand-made matrices.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "detection"
sys.path.insert(0, str(BENCH))

import run as bench  # noqa: E402
from alerts import (HOLD_AFTER, HOLD_UNLESS_FIRST, AlertRule, fired_within, firing, held_firing,  # noqa: E402
                    load_rules, parse_duration, run_start, runs)
from inject import GLOBAL, KIND_BY_NAME, app_scope, inject  # noqa: E402
from score import (  # noqa: E402
    AFTER, Collector, Observations, alerts_per_instance, episodes, false_figures, key_name, raise_alerts, score_kind,
)
from traffic import DAY, HOUR, MissingData, build_traffic, day_orders, in_zone, split_records, zone_shift  # noqa: E402

from exporter.sources.replay import backtest  # noqa: E402
from exporter.anomaly.rules import FOR, KEEP_FIRING, QUIET_AFTER_PAGE  # noqa: E402
from exporter.anomaly.signals import SIGNAL_NAMES  # noqa: E402

PLAN = bench.Plan("test", history_days=3, scored_days=1, instance_slots=((0, 14),), creep_slots=(), nab=(),
                  step=300.0)
SPIKE = PLAN.scored_start + 14 * HOUR
RULES = load_rules()


@pytest.fixture(scope="module")
def base():
    try:
        return build_traffic(PLAN.history_days + PLAN.scored_days + 1, PLAN.seed)
    except MissingData as e:
        pytest.skip(str(e))


class Rows:
    """Records what each snapshot publishes through its API rows, next to the collector."""

    def __init__(self, col: Collector) -> None:
        self.col = col
        self.steps: list[tuple[float, list[dict[str, Any]]]] = []

    def __call__(self, snap: Any) -> None:
        self.col(snap)
        self.steps.append((snap.t, [r for r in snap.rows() if r["severity"] != "ok"]))


def replay(traffic, start: float, end: float, step: float):
    col = Collector()
    rows = Rows(col)
    transitions = backtest(bench.make_settings({}, {}), traffic.to_records(), start, end, step, on_snapshot=rows)
    return col.result(), transitions, rows.steps


def row_scope(r: dict[str, Any]) -> str:
    if r["scope"] == "app":
        return f"app={r['app']}"
    return f"model={r['provider']}/{r['model']}" if r["scope"] == "model" else "global"


def reference_alerts(steps: list[tuple[float, list[dict[str, Any]]]]
                     ) -> tuple[set[tuple[str, str, str, str, float]], dict[str, tuple[int, int]]]:
    """Walk the steps one by one as Prometheus evaluates a rule: pending from the first step
    its condition holds, firing once it has held for `for:`, reset when it stops holding,
    unless it was firing: then it fires on for its `keep_firing_for:` from the first step
    without it, and through the condition's return meanwhile; a warning's condition also
    fails where its critical twin's page holds it (the rule's `hold`), judged after the
    critical rule of the same step.
    Returns (signal, direction, scope, severity, first firing time) of every alert, and per
    signal the number of runs of steps with some alert firing on a series, and of runs with
    a critical one firing (alerts and pages)."""
    out = set()
    pending: dict[tuple[str, str, str, str], float] = {}
    fired: set[tuple[str, str, str, str]] = set()
    paged_at: dict[tuple[str, str, str], float] = {}
    was: dict[tuple[str, str, str], tuple[bool, bool]] = {}
    counts: dict[str, list[int]] = {}
    keep_since: dict[tuple[str, str, str, str], float] = {}
    for t, rows in steps:
        holds = set()
        for r in rows:
            if r["explained_by"] is not None:
                continue
            level = {"warning": 1, "high": 2}[r["severity"]]
            direction = "" if r["direction"] != "both" else ("down" if (r["zscore"] or 0) < 0 else "up")
            for rule in RULES[r["signal"]]:
                if level >= rule.level:
                    holds.add((r["signal"], direction, row_scope(r), rule.severity))
        now: dict[tuple[str, str, str], tuple[bool, bool]] = {}
        fired_now, active = set(), set()
        kept = {k for k in fired if k not in holds and next(x for x in RULES[k[0]] if x.severity == k[3]).keep_s > 0}
        for k in sorted(holds | kept, key=lambda k: k[3] != "critical"):       # the critical rule first
            rule = next(x for x in RULES[k[0]] if x.severity == k[3])
            series = k[:3]
            if k in kept:                                # firing on without its condition
                if t - keep_since.setdefault(k, t) >= rule.keep_s:
                    keep_since.pop(k)
                    continue
                now[series] = (True, now.get(series, (False, False))[1] or rule.pages)
                fired_now.add(k)
                active.add(k)                            # the run goes on: its pending time stays
                if rule.pages:
                    paged_at[series] = t
                continue
            keep_since.pop(k, None)
            if rule.hold and not rule.pages:            # held by its twin's page, as its expression says
                last = paged_at.get(series)
                recent = last is not None and t - last < rule.hold_s
                if recent and (k not in fired if rule.hold == HOLD_UNLESS_FIRST else last != t):
                    continue
                if rule.hold_cond and series + ("critical",) in holds and k not in fired:
                    continue                             # the page's own condition holds it too
            active.add(k)
            since = pending.setdefault(k, t)
            if t - since >= rule.for_s or k in fired:
                now[series] = (True, now.get(series, (False, False))[1] or rule.pages)
                fired_now.add(k)
                if rule.pages:
                    paged_at[series] = t
                if not any(o[:4] == k and o[4] >= since for o in out):     # first firing of this run
                    out.add(k + (t,))
        pending = {k: v for k, v in pending.items() if k in active}     # a held or lapsed run starts over
        fired = fired_now
        for series, (fired_any, fired_page) in now.items():
            before_any, before_page = was.get(series, (False, False))
            c = counts.setdefault(series[0], [0, 0])
            c[0] += fired_any and not before_any
            c[1] += fired_page and not before_page
        was = now
    return out, {k: (v[0], v[1]) for k, v in counts.items()}


# --- pure parts ------------------------------------------------------------------------

def test_for_logic_on_a_hand_made_matrix() -> None:
    t = np.arange(12) * 60.0
    cond = np.zeros((12, 3), dtype=bool)
    cond[2:7, 0] = True           # holds 5 steps: 4 minutes from its first step
    cond[2:8, 1] = True           # 6 steps: 5 minutes
    cond[[1, 2, 3, 5, 6, 7, 8, 9], 2] = True    # a gap resets the pending time
    assert run_start(cond)[6, 0] == 2 and run_start(cond)[8, 2] == 5 and run_start(cond)[4, 2] == -1
    f = firing(t, cond, 300.0)
    assert not f[:, 0].any()
    assert f[:, 1].tolist() == [False] * 7 + [True] + [False] * 4
    assert not f[:, 2].any()
    assert firing(t, cond, 0.0).tolist() == cond.tolist()
    assert runs(cond) == [(0, 2, 6), (1, 2, 7), (2, 1, 3), (2, 5, 9)]
    assert parse_duration("5m") == 300 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90


def test_keep_firing_for_on_a_hand_made_matrix() -> None:
    """`keep_firing_for: 3m` with `for: 2m`: a firing alert fires on for 3 steps after its
    condition stops, and through a return of the condition within them (no second `for:`);
    a longer gap resolves it, and a condition that never fired keeps nothing."""
    t = np.arange(30) * 60.0
    cond = np.zeros((30, 3), dtype=bool)
    cond[[2, 3, 4, 5, 8, 9, 10], 0] = True       # fires 4..5, gap 6..7 (kept), on at once from 8
    cond[[2, 3, 4, 5, 10, 11, 12, 13], 1] = True  # fires 4..5, kept 6..8, resolved; 10 is pending again
    cond[[2, 3, 6, 7], 2] = True                  # never held 2 minutes: never fired, nothing kept
    f = firing(t, cond, 120.0, 180.0)
    assert np.flatnonzero(f[:, 0]).tolist() == list(range(4, 14))
    assert np.flatnonzero(f[:, 1]).tolist() == [4, 5, 6, 7, 8, 12, 13, 14, 15, 16]
    assert not f[:, 2].any()
    assert (firing(t, cond, 120.0, 0.0) == firing(t, cond, 120.0)).all()


def test_a_page_holds_its_warning_twin_as_the_rule_says() -> None:
    t = np.arange(100) * 60.0
    cond = np.zeros((100, 3), dtype=bool)
    page = np.zeros((100, 3), dtype=bool)
    # 0: the page comes first (its condition from step 2, firing 4..9); the twin's from 2 to 20
    cond[2:21, 0] = True
    page[4:10, 0] = True
    # 1: the twin fires first (from step 7 on, held since 2), then the page fires 10..14
    cond[2:30, 1] = True
    page[10:15, 1] = True
    # 2: a page 4..9, then a new warning run at 40 (held through 68: an hour after step 9, not at it)
    cond[40:90, 2] = True
    page[4:10, 2] = True
    assert fired_within(t, page, 3600.0)[[3, 4, 68, 69], 2].tolist() == [False, True, True, False]
    f = held_firing(t, cond, 300.0, page, 3600.0, HOLD_UNLESS_FIRST)
    assert not f[:, 0].any()                               # held beneath its page and after it
    assert np.flatnonzero(f[:, 1]).tolist() == list(range(7, 30))    # fires on through the page
    assert np.flatnonzero(f[:, 2]).tolist() == list(range(74, 90))   # pending again from 69
    # the older rules: the twin fires beneath the page, and is held only once it resolved
    g = held_firing(t, cond, 300.0, page, 3600.0, HOLD_AFTER)
    assert np.flatnonzero(g[:, 0]).tolist() == list(range(7, 10))
    assert np.flatnonzero(g[:, 1]).tolist() == list(range(7, 15))
    assert np.flatnonzero(g[:, 2]).tolist() == list(range(74, 90))
    # held by the page's own condition too: column 1's twin, pending since 2, would fire at
    # 7 but the page's condition begins at 6, so it never fires (the page's hold then takes
    # over); column 0 as before; a page condition that never fires still restarts the
    # twin's pending time (column 2: 40..44, then pending again from 45, firing from 50)
    page_cond = np.zeros((100, 3), dtype=bool)
    page_cond[2:10, 0] = True
    page_cond[6:15, 1] = True
    page_cond[40:45, 2] = True
    page2 = page.copy()
    page2[:, 2] = False
    h = held_firing(t, cond, 300.0, page2, 3600.0, HOLD_UNLESS_FIRST, page_cond=page_cond)
    assert not h[:, 0].any() and not h[:, 1].any()
    assert np.flatnonzero(h[:, 2]).tolist() == list(range(50, 90))
    # a twin that fired before the page's condition began fires on through it
    late = np.zeros((100, 3), dtype=bool)
    late[12:15, 1] = True
    assert np.flatnonzero(held_firing(t, cond, 300.0, page, 3600.0, HOLD_UNLESS_FIRST, page_cond=late)[:, 1]
                          ).tolist() == list(range(7, 30))


def test_explained_verdicts_raise_no_alert_and_rules_come_from_the_shipped_files() -> None:
    t = np.arange(10) * 60.0
    keys = [GLOBAL, app_scope("a")]
    sev = np.zeros((10, 2), np.int8)
    sev[1:9, :] = 1
    sev[3:9, 1] = 2
    expl = np.zeros((10, 2), bool)
    expl[1:9, 0] = True           # the global verdict is the echo of the app's
    obs = Observations(t, keys, {"cost_per_hour": sev}, {"cost_per_hour": expl},
                       {"cost_per_hour": np.ones((10, 2), np.int8)}, {"cost_per_hour": "up"})
    rules = {"cost_per_hour": (AlertRule("X", "cost_per_hour", "warning", 1, 300.0, True),
                               AlertRule("X", "cost_per_hour", "critical", 2, 120.0, True))}
    al = raise_alerts(obs, rules)
    assert not al.any["cost_per_hour"][:, 0].any()
    assert [(f.key, f.severity, f.onset, f.start, f.end) for f in al.firings] == [
        (keys[1], "critical", 180.0, 300.0, 480.0), (keys[1], "warning", 60.0, 360.0, 480.0)]
    ff = false_figures(obs, al, 0.0, 600.0)["signals"]["cost_per_hour"]
    assert (ff["warnings"], ff["alerts"], ff["pages"]) == (2, 1, 1)
    # the shipped rules: every evaluator signal alerts at warning and critical with the
    # generator's for:, quiet when explained; the detectors' rules come from detectors.yml
    for sig in SIGNAL_NAMES:
        got = {(r.severity, r.level, r.for_s, r.explainable) for r in RULES[sig]}
        assert got == {("warning", 1, parse_duration(FOR["warning"]), True),
                       ("critical", 2, parse_duration(FOR["critical"]), True)}
        # the warning is held by its page as the generator writes it
        assert {(r.severity, r.hold, r.hold_s, r.hold_cond) for r in RULES[sig]} == {
            ("warning", HOLD_UNLESS_FIRST, parse_duration(QUIET_AFTER_PAGE), True), ("critical", "", 0.0, False)}
        # and each fires on for the generator's keep_firing_for
        assert {(r.severity, r.keep_s) for r in RULES[sig]} == {
            (sev, parse_duration(KEEP_FIRING[sev])) for sev in ("warning", "critical")}
    assert {r.level for r in RULES["drift"]} == {1, 2}
    # the drift page holds its warning twin as the anomaly pages do, for drift.max_age_s after
    assert {(r.severity, r.hold, r.hold_s, r.hold_cond) for r in RULES["drift"]} == {
        ("warning", HOLD_UNLESS_FIRST, 6 * 3600.0, True), ("critical", "", 0.0, False)}
    assert all(len(RULES[f"runaway.{x}"]) == 1 for x in ("chain_length", "token_burst", "session_cost",
                                                         "tool_repetition", "invocation"))
    assert RULES["runaway.token_burst"][0].pages and not RULES["runaway.chain_length"][0].pages


def test_split_keeps_volume_and_sessions(base) -> None:
    recs = base.to_records()[:20000]
    out = split_records(recs, 5)
    assert len(out) == len(recs) and [r.ts for r in out] == [r.ts for r in recs]
    assert {r.app for r in out} == {f"{a}-{i}" for a in {r.app for r in recs} for i in range(1, 6)}
    assert {r.provider for r in out} == {f"{p}-{i}" for p in {r.provider for r in recs} for i in range(1, 6)}
    assert [r.model for r in out] == [r.model for r in recs]
    app_of: dict[str, str] = {}
    for r in out:
        if r.session_id:
            assert app_of.setdefault(r.session_id, r.app) == r.app
    assert split_records(recs, 1) is recs


def test_thin_keeps_a_share_of_whole_sessions(base) -> None:
    """`--thin`: a quieter site of the same apps keeps about that share of the sessions on
    every day, each with all its requests or none."""
    thin = build_traffic(PLAN.history_days + PLAN.scored_days + 1, PLAN.seed, share=0.2)
    kept, every = set(thin.session.tolist()), set(base.session.tolist())
    assert 0.15 < len(thin) / len(base) < 0.25 and 0.15 < len(kept) / len(every) < 0.25
    assert kept <= every
    count = lambda tr: dict(zip(*np.unique(tr.session.astype(str), return_counts=True)))   # noqa: E731
    full, part = count(base), count(thin)
    assert all(part[s] == full[s] for s in part)


def test_no_sessions_drops_every_session_id_after_the_split() -> None:
    """`--no-sessions`: the records name no session, and a split still places an app's
    copies by session (the same apps' traffic as with them)."""
    week = bench.Plan("week", history_days=1, scored_days=1, instance_slots=(), creep_slots=(), nab=(),
                      sessions=False)
    seen: list[Any] = []
    real = bench.backtest
    try:
        bench.backtest = lambda settings, records, *a, **k: seen.extend(records)   # the records it would replay
        bench.run_scenario(week, None, {}, {}, 3600.0, split=3)
    finally:
        bench.backtest = real
    assert seen and all(r.session_id is None for r in seen)
    with_ids = split_records(bench.base_traffic(week).to_records(), 3)
    assert [(r.ts, r.app) for r in seen] == [(r.ts, r.app) for r in with_ids]


def test_a_zone_moves_the_day_by_its_clocks() -> None:
    """`--zone`: the timeline moves on by whole weeks so that the zone's change of the clocks
    falls the night before the scored week (a Monday); before it the wall-clock traffic
    comes an hour before UTC's (CET), after it two (CEST: Berlin's clocks went forward)."""
    week = bench.Plan("week", history_days=7, scored_days=1, instance_slots=(), creep_slots=(), nab=())
    shift = zone_shift("Europe/Berlin", week.scored_start)
    assert shift % (7 * DAY) == 0 and shift > 0                       # the weekdays stay
    tr = build_traffic(9, week.seed)
    moved = in_zone(tr, "Europe/Berlin", shift)
    assert len(moved) == len(tr) and (np.diff(moved.ts) >= 0).all()
    wall = tr.ts + shift
    before, after = wall < week.scored_start + shift - 2 * DAY, wall >= week.scored_start + shift
    assert before.sum() > 10_000 and after.sum() > 1_000
    assert np.allclose(wall[before] - in_zone(tr.select(before), "Europe/Berlin", shift).ts, 3600)
    assert np.allclose(wall[after] - in_zone(tr.select(after), "Europe/Berlin", shift).ts, 7200)


def test_apps_never_replay_the_same_real_day_on_the_same_date() -> None:
    """The apps' own copies of the real days are distinct on every date, so the site's traffic
    is the sum of independent apps; each copy still goes through every real day once a block,
    and a volume copy is drawn freely."""
    rng = np.random.default_rng(7)
    copies = [2, 1, 1, 1]
    orders = day_orders(rng, copies, 3, 22, 6)
    assert [len(o) for o in orders] == [6, 3, 3, 3]
    base = np.array([orders[a][c] for a, n in enumerate(copies) for c in range(n)])
    assert base.shape == (5, 22)
    assert all(len(set(base[:, d].tolist())) == 5 for d in range(22))
    for row in base:
        for b in range(3):
            assert sorted(row[b * 6:(b + 1) * 6].tolist()) == list(range(6))
    # free draws collide: among the 10 volume copies some share a date with a base copy
    extra = np.array([orders[a][c] for a, n in enumerate(copies) for c in range(n, 3 * n)])
    assert any((extra[:, d, None] == base[None, :, d]).any() for d in range(22))
    with pytest.raises(ValueError, match="distinct days"):
        day_orders(rng, [4, 3], 1, 7, 6)


# --- through the backtest ------------------------------------------------------------------

def test_traffic_is_deterministic_and_realistic(base) -> None:
    again = build_traffic(PLAN.history_days + PLAN.scored_days + 1, PLAN.seed)
    assert len(again) == len(base) and (again.ts == base.ts).all() and (again.output_tokens == base.output_tokens).all()
    assert 0.005 < base.error.mean() < 0.015
    per_day = len(base) / (PLAN.history_days + PLAN.scored_days + 1)
    assert 3000 < per_day < 7000
    assert set(base.app.tolist()) == {"rag-search", "support-chat", "code-assist", "agent"}


def test_cost_spike_scored_as_the_backtest_reports_it(base) -> None:
    kind = KIND_BY_NAME["cost_spike_5x"]
    traffic, anomalies = inject(base, kind, PLAN.starts(kind), seed=1)
    (a,) = anomalies
    assert a.start == SPIKE and a.end == a.start + HOUR
    assert GLOBAL in a.scopes and app_scope("rag-search") in a.scopes
    lo, hi = SPIKE - HOUR, a.end + bench.GRACE + HOUR
    obs, transitions, steps = replay(traffic, lo, hi, 60.0)
    al = raise_alerts(obs, RULES)
    score, *_ = score_kind(obs, al, kind, anomalies, bench.GRACE, lo, hi)
    assert score.signal == "cost_per_hour" and score.primary and score.alerted

    # verdict: the first warning the backtest itself reported on a scope containing the spike
    names = {"all" if s == GLOBAL else s[1] if s[0] == "app" else f"{s[2]}/{s[3]}" for s in a.scopes}
    first = min(t.at for t in transitions if t.signal == "cost_per_hour" and t.after in ("warning", "high")
                and t.series in names and a.start <= t.at <= a.end + bench.GRACE)
    assert score.delays_s == [first - a.start] and score.recall == 1.0
    assert 0 < score.delays_s[0] <= 20 * 60      # a 5x step is seen within minutes
    # warning episodes: one per transition out of "ok" (the run starts and ends quiet)
    eps = episodes(obs, "cost_per_hour")
    assert len(eps) == sum(1 for t in transitions if t.signal == "cost_per_hour" and t.before == "ok")
    assert score.episodes == len(eps) and score.precision == 1.0

    # alerts: the same as a step-by-step replay of the rules over the snapshots' rows
    ref, _ = reference_alerts(steps)
    got = {(f.signal, f.direction, key_name(f.key), f.severity, f.start) for f in al.firings
           if f.signal in SIGNAL_NAMES}
    assert got == ref and ref
    containing = {key_name(k) for k in a.scopes}
    cost_alerts = sorted(t for s, _, scope, _, t in ref if s == "cost_per_hour" and scope in containing)
    assert score.alert_delays_s == [cost_alerts[0] - a.start]
    assert score.alert_delays_s[0] >= score.delays_s[0] + min(r.for_s for r in RULES["cost_per_hour"])
    # the global echo of the app's spike is explained, and stays quiet
    explained = [(t, r) for t, rows in steps for r in rows if r["signal"] == "cost_per_hour" and r["scope"] == "global"
                 and r["explained_by"] == "app=rag-search"]
    assert explained, "the evaluator should explain the global cost echo of one app's spike"
    gi = obs.key_index([GLOBAL])[0]
    for t, _ in explained:
        assert obs.explained["cost_per_hour"][np.searchsorted(obs.times, t), gi]
    assert not al.any["cost_per_hour"][:, gi].any()
    # one cause: every distinct alert that started firing within the spike + grace
    (per,) = alerts_per_instance(al, anomalies, bench.GRACE)
    detectors = {(f.signal, f.direction, key_name(f.key), f.severity) for f in al.firings
                 if f.signal not in SIGNAL_NAMES and a.start <= f.start <= a.end + bench.GRACE}
    inside = {o[:4] for o in ref if a.start <= o[4] <= a.end + bench.GRACE} | detectors
    assert per["alerts"] == len(inside) >= 1 and per["scopes"] == len({o[2] for o in inside})
    # its tail: every alert that starts in the 12 hours after it (each start a notification)
    tail = [o for o in ref if a.end + bench.GRACE < o[4] <= a.end + AFTER]
    tail += [f for f in al.firings if f.signal not in SIGNAL_NAMES and a.end + bench.GRACE < f.start <= a.end + AFTER]
    assert per["after"] == len(tail)


def test_clean_day_false_figures_match_the_transitions(base) -> None:
    obs, transitions, steps = replay(base, PLAN.scored_start, PLAN.scored_end, PLAN.step)
    assert len(obs.times) == int((PLAN.scored_end - PLAN.scored_start) // PLAN.step) + 1
    al = raise_alerts(obs, RULES)
    ff = false_figures(obs, al, PLAN.scored_start, PLAN.scored_end + 1)
    for sig in SIGNAL_NAMES:
        starts = sum(1 for t in transitions if t.signal == sig and t.before == "ok")
        assert ff["signals"][sig]["warnings"] == starts, sig
    assert ff["signals"]["cost_per_hour"]["warnings"] == 0
    _, counts = reference_alerts(steps)
    for sig in SIGNAL_NAMES:
        d = ff["signals"][sig]
        assert (d["alerts"], d["pages"]) == counts.get(sig, (0, 0)), sig
    weeks = (PLAN.scored_end + 1 - PLAN.scored_start) / (7 * DAY)
    assert ff["total"]["warnings_per_week"] == pytest.approx(ff["total"]["warnings"] / weeks, rel=1e-3)
    assert ff["total"]["warnings"] == sum(d["warnings"] for d in ff["signals"].values())


# --- the fixed error ratio (error_ratio.py) -------------------------------------------------

def test_error_ratio_reads_the_shipped_rule() -> None:
    """The shipped LLMErrorRatioHigh as error_ratio.py models it: the levels, minimum and z
    of thresholds.yml, the lower bound, the cooldown and the warning's hold of performance.yml."""
    import error_ratio
    levels, min_requests, z = error_ratio.load(error_ratio.RULES)
    assert (levels["warning"].ratio, levels["critical"].ratio, min_requests, z) == (0.05, 0.25, 10.0, 1.645)
    assert levels["critical"].for_min == 2 and levels["warning"].for_min == 5
    assert all(lvl.bounded and lvl.keep_min == 10 for lvl in levels.values())
    assert levels["warning"].held and not levels["critical"].held
    assert levels["warning"].apart and levels["critical"].apart    # quiet where the exporter names an app


def test_error_ratio_bound_and_firing() -> None:
    """The lower bound is the recording rule's (the value usage_test.yml expects); firing
    waits `for:`, keeps firing through the cooldown, and a held warning fires only where
    it fired before its page's condition began."""
    import error_ratio
    lb = error_ratio.wilson_lower(np.array([225.0, 0.0, 2.0]), np.array([900.0, 300.0, 20.0]), 1.645)
    assert lb[0] == pytest.approx(0.22702966315259546) and lb[1] == pytest.approx(0.0) and lb[2] < 0.05
    cond = np.array([0, 1, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    assert error_ratio.fire(cond, 2, 0).tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert error_ratio.fire(cond, 2, 3).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    warn = np.ones(10, dtype=bool)
    page_late = np.array([0] * 6 + [1] * 4, dtype=bool)     # the warning fired at 2, before the page's condition
    assert error_ratio.fire(warn, 2, 0, page_late).tolist() == [0, 0] + [1] * 8
    page_early = np.array([0, 1] + [1] * 4 + [0] * 4, dtype=bool)   # held from the start: fires only after
    assert error_ratio.fire(warn, 2, 0, page_early).tolist() == [0] * 8 + [1] * 2
