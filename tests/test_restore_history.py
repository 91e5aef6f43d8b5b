"""Rebuilding the scope history at start-up: however the buckets are paged and chunked, and
however the hourly groups are folded, the history comes out bit for bit the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import DAY, HOUR, T0, engine_at, ingest_by_day, settings_for, steady_hour

from exporter import sketch
from exporter.storage import store as store_module
from exporter.storage.buckets import FIELDS, SKETCHES, Groups
from exporter.anomaly.history import ScopeHistory, _codes
from exporter.storage.store import Store

ARRAYS = ("hour_add", "hour_q", "open_sk", "fine_add", "coarse_sk", "first_hour")
RINGS = ("hours", "open", "fine_ring", "coarse_ring")


def state(h: ScopeHistory) -> dict[str, Any]:
    """Everything a ScopeHistory holds; arrays as (dtype, shape, bytes), so NaNs compare too."""
    out: dict[str, Any] = {name: (a.dtype, a.shape, a.tobytes()) for name in ARRAYS for a in [getattr(h, name)]}
    out.update({f"{r}.tag": getattr(h, r).tag.tolist() for r in RINGS})
    out.update(keys=list(h.keys), series_rows=dict(h._series_rows), late=h.late_sketch_groups,
               dirty=set(h._dirty_open), changed_from=h.changed_from_hour)
    return out


def different(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in a if a[k] != b[k]]


# --- restart: paging and chunking -------------------------------------------------------------

def mixed_traffic(end: float, days: int) -> list[dict[str, Any]]:
    """A few apps and models, some without TTFT (empty sketches), some failing, with a
    daily cycle, up to `end`."""
    rng = np.random.default_rng(11)
    out: list[dict[str, Any]] = []
    start = end - days * DAY
    for h in range(days * 24):
        hs = start + h * HOUR
        for app, model, ttft in (("chat", "gpt-4o-mini", 0.3), ("chat", "gpt-4o", None), ("search", "gpt-4o-mini", 0.2),
                                 ("batch", "claude-3-5-haiku", 0.5)):
            n = int(10 + 8 * np.sin(h / 24 * 2 * np.pi) + rng.integers(0, 6))
            out += steady_hour(hs, rng, n=n, app=app, model=model, ttft=ttft, latency=1.0 + 0.5 * rng.random(),
                               error_rate=0.05 if app == "batch" else 0.0,
                               provider="anthropic" if model.startswith("claude") else "openai")
    return out


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with four days of hourly and the last hour's minute buckets."""
    tmp_path = tmp_path_factory.mktemp("restore")
    settings = settings_for(tmp_path)
    t = T0 + HOUR - 1
    engine, _ = engine_at(settings, t)
    ingest_by_day(engine, mixed_traffic(T0 + HOUR, days=4), now=t)
    engine.close()
    return tmp_path


def restored(tmp_path: Path) -> dict[str, Any]:
    engine, _ = engine_at(settings_for(tmp_path), T0 + HOUR - 1)
    try:
        return state(engine.history)
    finally:
        engine.close()


@pytest.mark.parametrize("rows_per_chunk, page_rows", [(1, 1), (5, 2), (9, 4), (60, 7), (1_000, 1_000)])
def test_restored_history_is_the_same_for_any_page_and_chunk_size(
        stored: Path, monkeypatch: pytest.MonkeyPatch, rows_per_chunk: int, page_rows: int) -> None:
    """From chunks of one start each, read a row or two at a time, to chunks of many hours."""
    whole = restored(stored)
    assert len(whole["keys"]) == 1 + 3 + 3
    paged = Store.bucket_groups

    def bucket_groups(self: Store, res: int, start: float, end: float, **_: Any) -> Any:
        return paged(self, res, start, end, rows_per_chunk=rows_per_chunk)

    monkeypatch.setattr(Store, "bucket_groups", bucket_groups)
    monkeypatch.setattr(store_module, "PAGE_ROWS", page_rows)
    again = restored(stored)
    assert not different(whole, again)


def test_chunks_hold_whole_starts_and_every_row_once(stored: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "PAGE_ROWS", 3)
    store = Store(stored / "usage.db")
    rows = store._db.execute("SELECT start, series FROM buckets WHERE res=3600 ORDER BY start, series").fetchall()
    seen: list[tuple[int, int]] = []
    starts_per_chunk, sizes = [], []
    for g in store.bucket_groups(3600, 0, T0 + 2 * HOUR, rows_per_chunk=10):
        seen += list(zip(g.start.tolist(), g.series.tolist()))
        starts_per_chunk.append(sorted(set(g.start.tolist())))
        sizes.append(len(g))
    assert seen == rows
    flat = [s for chunk in starts_per_chunk for s in chunk]
    assert flat == sorted(set(flat))          # no start is split between chunks
    assert min(sizes[:-1]) >= 10 and max(sizes) < 10 + 4   # four series: a chunk stops at the first start past 10 rows
    store.close()


def test_missing_sketches_read_as_empty(tmp_path: Path) -> None:
    """Rows written with NULL sketches (the column allows it) come back with no bins."""
    store = Store(tmp_path / "s.db")
    sid = store.series_ids([("a", "p", "m")])[0]
    adds = np.arange(len(FIELDS), dtype=np.float64)
    lat = sketch.encode(sketch.histogram(np.array([0.5, 0.5, 2.0])))
    cols = "(res, start, series, adds, latency, ttft, otps, tpot)"
    store._db.execute(f"INSERT INTO buckets {cols} VALUES (3600, 7200, ?, ?, ?, NULL, NULL, NULL)", (sid, adds.tobytes(), lat))
    store._db.execute(f"INSERT INTO buckets {cols} VALUES (3600, 10800, ?, ?, NULL, NULL, x'', NULL)", (sid, adds.tobytes()))
    (g,) = list(store.bucket_groups(3600, 0, 20_000))
    assert g.start.tolist() == [7200, 10800] and (g.adds == adds).all()
    latency, ttft, otps, tpot = g.nonzero_bins()
    assert latency[0].tolist() == [0, 0] and latency[2].tolist() == [2, 1]
    assert ttft[0].size == 0 and otps[0].size == 0 and tpot[0].size == 0
    store.close()


# --- add_hours against the live path -----------------------------------------------------------

def hourly_groups(rng: np.random.Generator, series: list[int], hours: list[int]) -> Groups:
    """One group per (series, hour) in a shuffled order, with random sums and sketches (some empty)."""
    s = np.repeat(np.array(series), len(hours))
    st = np.tile(np.array(hours) * 3600, len(series))
    order = rng.permutation(len(s))
    s, st = s[order], st[order]
    adds = rng.lognormal(2, 1, (len(s), len(FIELDS)))
    sketches = {}
    for k in SKETCHES:
        dense = rng.integers(0, 4, (len(s), sketch.NBINS)) * (rng.random((len(s), sketch.NBINS)) < 0.04)
        dense[rng.random(len(s)) < 0.2] = 0
        sketches[k] = dense.astype(np.int64)
    return Groups(s.astype(np.int64), st.astype(np.int64), adds, sketches)


def test_add_hours_leaves_the_hourly_state_add_leaves() -> None:
    """add_hours (sketches summed per scope and hour at once) and add (each group's bins
    scattered to each of its scopes) agree bit for bit on the hourly sums, the open hours'
    sketches, the hours' quantiles, and the late count; add_hours just computes every
    hour's quantiles straight away."""
    rng = np.random.default_rng(4)
    keys = {sid: (f"app{sid % 3}", "p", f"m{sid % 4}") for sid in range(1, 13)}
    h0 = int(T0 // 3600)
    calls = [([3, 1, 2], [h0]), ([1, 2, 3, 4, 5], [h0 + 1, h0 + 2]),
             ([6, 2, 7], [h0 + 3, h0 + 4, h0 + 5, h0 + 6, h0 + 7]),    # the open ring wraps within one call
             ([8, 1], [h0 + 2]),                                      # late: older than every open hour
             ([9, 10, 11, 12, 2], [h0 + 7, h0 + 8])]
    batch, live = ScopeHistory(3600, 2 * DAY), ScopeHistory(3600, 2 * DAY)
    late_hour_slot = (h0 + 2) % batch.hours.n
    for series, hours in calls:
        g = hourly_groups(rng, series, hours)
        batch.add_hours(g, keys)
        live.add(g, keys)
    a, b = state(batch), state(live)
    assert a["late"] == b["late"] > 0
    assert different(a, b) == ["hour_q", "fine_add", "coarse_sk", "fine_ring.tag", "coarse_ring.tag"]
    batch.refresh_open_hours()
    live.refresh_open_hours()
    n = batch.size
    q_batch, q_live = batch.hour_q[:n].copy(), live.hour_q[:n].copy()
    # The late hour: add_hours took the late groups' quantiles, add has none for them.
    assert np.isfinite(q_batch[:, late_hour_slot]).any()
    q_batch[:, late_hour_slot] = q_live[:, late_hour_slot]
    assert q_batch.tobytes() == q_live.tobytes()
    assert np.isfinite(q_live).sum() > 20


def test_scopes_are_numbered_in_the_order_series_first_appear() -> None:
    keys = {sid: (f"app{sid % 4}", "p", f"m{sid % 5}") for sid in range(1, 30)}
    batches = [[7, 3, 7, 12], [3, 1, 20, 7, 1], [29, 3, 2, 12, 28]]
    h = ScopeHistory(3600, DAY)
    expected_keys: list[tuple[str, str, str, str]] = []
    index: dict[tuple[str, str, str, str], int] = {}

    def scope(k: tuple[str, str, str, str]) -> int:
        if k not in index:
            index[k] = len(expected_keys)
            expected_keys.append(k)
        return index[k]

    for batch in batches:
        rows = h.scope_rows(np.array(batch), keys)
        want = [[scope(("global", "", "", "")), scope(("app", keys[s][0], "", "")), scope(("model", "", "p", keys[s][2]))]
                for s in batch]
        assert rows.tolist() == want
    assert h.keys == expected_keys


@pytest.mark.parametrize("bound", [50, 100_000])
def test_codes_are_those_of_unique(bound: int) -> None:
    values = np.random.default_rng(2).integers(0, bound, (300, 3))
    uniq, inverse = _codes(values, bound)
    want_uniq, want_inverse = np.unique(values, return_inverse=True)
    assert uniq.tolist() == want_uniq.tolist()
    assert inverse.tolist() == want_inverse.reshape(values.shape).tolist()


def fed_three_ways(site: tuple[Any, ...], seed: int) -> tuple[Any, ...]:
    """A day of `site`'s traffic fed a minute at a time and an hour at a time (two
    `Harness`es), and restored from its hourly and minute buckets as a restart does
    (`add_hours`, `add_bursts`); the restored history's rows in the minute-fed one's
    order, the hours whose slots were all handed on, and the traffic, its series ids and
    columns."""
    from helpers import Harness, generate

    from exporter.storage.buckets import aggregate
    day0 = T0 - T0 % DAY
    traffic = generate(site, day0, day0 + DAY, seed=seed)
    minute, hourly = Harness().feed(traffic, batch=60), Harness().feed(traffic, batch=HOUR)
    hours = np.arange(int(day0 // HOUR), minute.history.bursts_final_before())    # every slot handed on
    assert hours.size >= 18
    restored = ScopeHistory(HOUR, 14 * DAY)
    sids = np.array([minute.series[k] for k in zip(traffic.app.tolist(), traffic.provider.tolist(),
                                                    traffic.model.tolist())])
    cols = traffic.columns()
    restored.add_hours(aggregate(cols, sids, cols.cost, res=3600), minute.series_keys)
    restored.add_bursts([aggregate(cols, sids, cols.cost, res=60)], minute.series_keys)
    rows = [restored.keys.index(k) for k in minute.history.keys]
    return minute, hourly, restored, rows, hours, traffic, sids, cols


def test_five_minute_size_statistics_are_the_same_however_fed() -> None:
    """The hours' statistics of five-minute mean sizes (history.hour_slots) are handed on
    by the coarse slots as they finish: the same whether the records come a minute or an
    hour at a time, and the same again when a restart re-derives them from minute buckets
    (`add_bursts`), but for the hours whose slots a running process still holds. They are
    what the slots hold: per slot of log tokens, its mean, squared mean, squares about the
    mean, requests less one and one over requests."""
    from helpers import Stream

    from exporter.storage.buckets import F, aggregate
    site = (Stream("chat", "gpt-4o-mini", rate=60, session=3), Stream("rare", "gpt-4o", rate=5, session=8))
    minute, hourly, restored, rows, hours, traffic, sids, cols = fed_three_ways(site, seed=2)
    live = minute.history.take_slot_sizes(hours)
    np.testing.assert_allclose(hourly.history.take_slot_sizes(hours), live, rtol=1e-12)
    assert (live[..., 0] > 0).mean() > 0.5                   # most scopes sized requests in most hours
    np.testing.assert_allclose(restored.take_slot_sizes(hours)[rows], live, rtol=1e-12)

    # the first hour of the rare app with requests, from its five-minute sums
    rare = minute.history.keys.index(("app", "rare", "", ""))
    j = int(np.flatnonzero(live[rare, :, 0, 0, 0] > 0)[0])
    first = aggregate(cols, sids, cols.cost, res=300)
    app_rows = np.array([minute.series_keys[int(s)][0] == "rare" for s in first.series])
    in_hour = app_rows & (first.start // 3600 == hours[j])
    slots = np.unique(first.start[in_hour])
    n = np.array([first.adds[in_hour & (first.start == s), F["sized_requests"]].sum() for s in slots])
    total = np.array([first.adds[in_hour & (first.start == s), F["log_tokens"]].sum() for s in slots])
    squares = np.array([first.adds[in_hour & (first.start == s), F["log_tokens_sq"]].sum() for s in slots])
    some = n > 0
    mean, within = (total / n)[some], (squares - total * total / n)[some]
    stats = live[rare, j, 0, 0]
    np.testing.assert_allclose(stats, [mean.size, mean.sum(), (mean ** 2).sum(), within.sum(), (n[some] - 1).sum(),
                                       (1 / n[some]).sum()], rtol=1e-9, atol=1e-9)


def test_block_statistics_are_the_same_however_fed() -> None:
    """The hours' block statistics (history.hour_blocks: the requests of an hour's coarse
    slots, and for each block length the squares of its blocks' counts about their mean)
    are what the hour's five-minute counts make them: the same whether the records come a
    minute or an hour at a time, and again when a restart re-derives them from minute
    buckets (`add_bursts`). Sessions of twenty calls a minute apart make 15-minute
    blocks vary more, against their mean, than five-minute slots: `window_dispersion`
    reads half as much again; calls that come one at a time read about the same."""
    from helpers import Harness, Stream

    from exporter.anomaly.baseline import burstiness, window_dispersion
    from exporter.anomaly.baseline import BLOCK_SLOTS
    from exporter.storage.buckets import F, aggregate
    site = (Stream("agent", "gpt-4o-mini", rate=600, session=20, gap=60), Stream("chat", "gpt-4o", rate=600))
    minute, hourly, restored, rows, hours, traffic, sids, cols = fed_three_ways(site, seed=3)
    live = minute.history.baseline_hours(hours).blocks.copy()
    np.testing.assert_array_equal(hourly.history.baseline_hours(hours).blocks, live)
    np.testing.assert_array_equal(restored.baseline_hours(hours).blocks[rows], live)
    # the whole day in one batch (a backfill): its hours leave the slot counts while it is
    # handed on, each measured as it leaves, the last ones once the batch is in
    whole_day = Harness().feed(traffic, batch=DAY).history
    np.testing.assert_array_equal(whole_day.baseline_hours(hours).blocks[[whole_day.keys.index(k) for k in minute.history.keys]], live)

    # each app's hours, from its own five-minute counts
    fives = aggregate(cols, sids, cols.cost, res=300)
    for app in ("agent", "chat"):
        r = minute.history.keys.index(("app", app, "", ""))
        mine = np.array([minute.series_keys[int(x)][0] == app for x in fives.series])
        for j, hour in enumerate(hours.tolist()):
            counts = np.zeros(12)
            at = mine & (fives.start // 3600 == hour)
            np.add.at(counts, (fives.start[at] - hour * 3600) // 300, fives.adds[at, F["requests"]])
            want = [counts.sum()]
            for k in BLOCK_SLOTS:
                b = counts.reshape(-1, k).sum(axis=1)
                fit = np.polyval(np.polyfit(np.arange(b.size), b, 1), np.arange(b.size)) if b.size >= 4 else b
                want.append(float(((b - fit) ** 2).sum()))
            np.testing.assert_allclose(live[r, j], want, rtol=1e-12, atol=1e-9)

    held = minute.history.baseline_hours(hours)
    requests = held.adds[..., F["requests"]]
    disp = burstiness(requests, held.bursts, 12)
    usual = np.repeat(requests.mean(axis=1, keepdims=True), hours.size, axis=1)     # no hour strays (level sd inf)
    by_length = window_dispersion(disp, requests, usual, np.full(len(disp), np.inf), held.blocks, 12, BLOCK_SLOTS)
    growth = by_length / disp[:, None]
    assert live[..., 1 + BLOCK_SLOTS.index(3)].sum() > 0 and not live[..., 1 + BLOCK_SLOTS.index(4):].any()
    agent, chat = (minute.history.keys.index(("app", app, "", "")) for app in ("agent", "chat"))
    assert growth[agent, BLOCK_SLOTS.index(3)] > 1.5                 # sessions span the slots
    assert growth[chat, BLOCK_SLOTS.index(3)] < 1.2                  # one call each: about Poisson
    assert np.all(np.diff(by_length, axis=1) >= 0)


def test_slot_size_and_burst_statistics_come_back_from_the_store_bit_for_bit(tmp_path: Path) -> None:
    """The hours' statistics of coarse-slot mean sizes (hour_slots) and burstiness sums
    (hour_burst) that a process stored in its SQLite file are what a restarted process's
    evaluator reads (`take_slot_sizes`, `take_bursts`), bit for bit. Scopes the restarted history does not know yet are numbered in the order
    their rows come; a row of another shape (another version) or of an hour the ring does
    not hold is skipped and makes no scope; of two rows for one scope and hour, the later
    counts."""
    from exporter.anomaly.history import scope_key, scope_text
    rng = np.random.default_rng(8)
    keys = {i + 1: (f"app-{i % 7}", f"prov{i % 3}", f"model-{i:02d}") for i in range(30)}
    end = int(T0 // HOUR)
    hours = list(range(end - 72, end))

    def claimed(series: list[int]) -> ScopeHistory:
        """A history holding the hours, as `add_hours` leaves it at start-up."""
        h = ScopeHistory(HOUR, 14 * DAY)
        h.add_hours(hourly_groups(np.random.default_rng(1), series, hours), keys)
        return h

    live = claimed(sorted(keys))
    n = live.size
    stats = rng.lognormal(0, 1, (n,) + live.hour_slots.shape[1:])
    stats[rng.random(stats.shape[:2]) < 0.3] = 0.0                  # hours without sized requests
    live.hour_slots[:n] = stats
    bursts = rng.lognormal(3, 1, (n,) + live.hour_burst.shape[1:])
    bursts[rng.random(bursts.shape[:2]) < 0.3] = 0.0                # hours without requests
    live.hour_burst[:n] = bursts
    blocks = rng.lognormal(3, 1, (n,) + live.hour_blocks.shape[1:])
    blocks[rng.random(blocks.shape[:2]) < 0.3] = 0.0                # hours without requests
    live.hour_blocks[:n] = blocks
    store = Store(tmp_path / "usage.db")
    store.write_bursts(live.burst_rows(hours[0], end), end, live.slot_size_rows(hours[0], end),
                       live.burst_block_rows(hours[0], end))
    blob = stats[0, 0].astype("<f8").tobytes()
    store.write_bursts([(scope_text(("app", "aged-out", "", "")), end - 30 * 24, 5.0, 25.0)], end,
                       [(scope_text(("app", "other-version", "", "")), end - 1, blob[:40]),
                        (scope_text(("app", "aged-out", "", "")), end - 30 * 24, blob)])
    store.close()

    again = Store(tmp_path / "usage.db")
    rows = again.slot_sizes(end - 40 * 24)
    burst_rows = again.bursts(end - 40 * 24)
    block_rows = again.burst_blocks(end - 40 * 24)
    again.close()
    held = live.take_slot_sizes(np.array(hours))[..., 0].reshape(n, len(hours), -1)
    assert len(rows) == int((held.sum(axis=2) > 0).sum()) + 2
    restored = claimed(sorted(keys)[::3])                            # some scopes are new to it
    known = list(restored.keys)
    restored.load_slot_sizes(rows)
    new = [k for k in dict.fromkeys(scope_key(text) for text, _, _ in rows) if k not in known and k in live.keys]
    assert restored.keys == known + new
    assert set(restored.keys) == set(live.keys)
    order = [restored.keys.index(k) for k in live.keys]
    span = np.array(hours)
    assert np.array_equal(restored.take_slot_sizes(span)[order], live.take_slot_sizes(span))
    assert (live.take_slot_sizes(span)[..., 0] > 0).sum() > 1000

    assert len(burst_rows) == int((live.take_bursts(span)[..., 0] > 0).sum()) + 1
    twice = claimed(sorted(keys)[1::3])
    known = list(twice.keys)
    twice.load_bursts(burst_rows)
    new = [k for k in dict.fromkeys(scope_key(text) for text, *_ in burst_rows) if k not in known and k in live.keys]
    assert twice.keys == known + new
    order = [twice.keys.index(k) for k in live.keys]
    assert np.array_equal(twice.take_bursts(span)[order], live.take_bursts(span))
    assert (live.take_bursts(span)[..., 0] > 0).sum() > 1000
    twice.load_burst_blocks(block_rows + [(block_rows[0][0], block_rows[0][1], block_rows[0][2][:16])])   # another shape
    assert np.array_equal(twice.baseline_hours(span).blocks[order], live.baseline_hours(span).blocks)
    assert (live.baseline_hours(span).blocks[..., 0] > 0).sum() > 1000

    text, hour, first = next(row for row in rows if scope_key(row[0]) in live.keys)
    later = (np.frombuffer(first, dtype="<f8") * 2).astype("<f8").tobytes()
    restored.load_slot_sizes([(text, hour, first), (text, hour, later)])
    r, slot = restored.keys.index(scope_key(text)), hour % restored.hours.n
    assert restored.hour_slots[r, slot].tobytes() == later
    twice.load_bursts([(text, hour, 1.0, 2.0), (text, hour, 3.0, 4.0)])
    assert twice.hour_burst[twice.keys.index(scope_key(text)), slot].tolist() == [3.0, 4.0]
