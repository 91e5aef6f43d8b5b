"""Following growing JSONL files: complete lines only, resume after a restart without
counting twice or losing lines, start over on truncation or rotation; and the real
server's --tail, through a kill -9."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from helpers import T0, Server, engine_at, rec, sample_sum, settings_for, value

from exporter.sources.tail import TailFollower

SERIES = {"app": "chat", "provider": "openai", "model": "gpt-4o-mini"}


def lines(start: int, n: int, base: float = T0 - 1000) -> bytes:
    """n JSONL records numbered from `start` (each carries its number as input_tokens, no request_id)."""
    return b"".join(orjson.dumps(rec(base + i, input_tokens=i)) + b"\n" for i in range(start, start + n))


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def tokens(engine: Any) -> float:
    return value(engine, "llm_tokens_total", **SERIES, token_type="input") or 0.0


def test_follow_growing_file_complete_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    engine, _ = engine_at(settings_for(tmp_path))
    f = TailFollower(engine, log)
    assert f.step() == 0                                     # no file yet
    log.write_bytes(lines(1, 5))
    assert f.step() == 5
    assert value(engine, "llm_requests_total", **SERIES) == 5
    assert f.step() == 0                                     # nothing new
    partial = orjson.dumps(rec(T0 - 10, input_tokens=1000))
    append(log, lines(6, 3) + partial[:20])                  # a writer caught mid-line
    assert f.step() == 3
    assert value(engine, "llm_requests_total", **SERIES) == 8
    append(log, partial[20:] + b"\n")
    assert f.step() == 1
    assert value(engine, "llm_requests_total", **SERIES) == 9
    assert tokens(engine) == sum(range(1, 9)) + 1000
    engine.close()


def test_restart_resumes_without_double_counting_or_loss(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    settings = settings_for(tmp_path)
    log.write_bytes(lines(1, 10))
    engine, _ = engine_at(settings)
    assert TailFollower(engine, log).step() == 10
    engine.close()
    append(log, lines(11, 4))                                 # written while the exporter was down

    engine, _ = engine_at(settings)
    f = TailFollower(engine, log)
    assert f.step() == 4                                      # only the new lines
    append(log, lines(15, 6))
    assert f.step() == 6
    assert value(engine, "llm_requests_total", **SERIES) == 20
    assert tokens(engine) == sum(range(1, 21))                # each line exactly once
    engine.close()


def test_truncated_file_starts_over(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    engine, _ = engine_at(settings_for(tmp_path))
    f = TailFollower(engine, log)
    log.write_bytes(lines(1, 10))
    assert f.step() == 10
    with open(log, "r+b") as fh:                              # copytruncate-style rotation
        fh.truncate(0)
    append(log, lines(100, 2))
    assert f.step() == 2
    assert value(engine, "llm_requests_total", **SERIES) == 12
    assert tokens(engine) == sum(range(1, 11)) + 100 + 101
    engine.close()


def test_rotated_file_new_inode_starts_over(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings)
    log.write_bytes(lines(1, 3))
    assert TailFollower(engine, log).step() == 3
    engine.close()
    os.rename(log, tmp_path / "usage.jsonl.1")                 # rotated while down; a bigger new file
    log.write_bytes(lines(50, 5))
    engine, _ = engine_at(settings)
    assert TailFollower(engine, log).step() == 5
    assert value(engine, "llm_requests_total", **SERIES) == 8
    assert tokens(engine) == 1 + 2 + 3 + sum(range(50, 55))
    engine.close()


def test_bad_lines_are_rejected_and_skipped(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    engine, _ = engine_at(settings_for(tmp_path))
    log.write_bytes(lines(1, 2) + b"{not json\n" + orjson.dumps({"provider": "openai"}) + b"\n\n" + lines(3, 1))
    f = TailFollower(engine, log)
    assert f.step() == 5
    assert f.rejected_total == 2
    assert value(engine, "llm_requests_total", **SERIES) == 3
    assert value(engine, "llm_exporter_records_total", result="rejected") == 2
    assert f.step() == 0                                      # and they are not read again
    engine.close()


def test_follower_thread(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    log.write_bytes(b"")
    engine, _ = engine_at(settings_for(tmp_path))
    stop = threading.Event()
    th = threading.Thread(target=TailFollower(engine, log, poll=0.02).run, args=(stop,), daemon=True)
    th.start()
    try:
        for k in range(5):
            append(log, lines(10 * k + 1, 3))
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while (value(engine, "llm_requests_total", **SERIES) or 0) < 15 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        th.join(timeout=5)
    assert value(engine, "llm_requests_total", **SERIES) == 15
    engine.close()


def test_server_tail_survives_kill_9(tmp_path: Path) -> None:
    """`serve --tail FILE`: lines appended before, during and after a kill -9 count once each."""
    log = tmp_path / "usage.jsonl"
    now = time.time() - 3600
    log.write_bytes(lines(1, 20, base=now))
    db = tmp_path / "tail.db"
    with Server(tmp_path, db, "--tail", str(log)) as srv:
        srv.wait_for(lambda: sample_sum(srv.scrape(), "llm_requests_total") == 20)
        append(log, lines(21, 10, base=now))
        srv.wait_for(lambda: sample_sum(srv.scrape(), "llm_requests_total") == 30)
        srv.kill9()
    append(log, lines(31, 5, base=now))
    with Server(tmp_path, db, "--tail", str(log)) as srv:
        srv.wait_for(lambda: sample_sum(srv.scrape(), "llm_requests_total") == 35)
        append(log, lines(36, 5, base=now))
        srv.wait_for(lambda: sample_sum(srv.scrape(), "llm_requests_total") == 40)
        time.sleep(1.2)                                        # a few more polls: nothing is read twice
        samples = srv.scrape()
        assert sample_sum(samples, "llm_requests_total") == 40
        assert sample_sum(samples, "llm_tokens_total", token_type="input") == sum(range(1, 41))
