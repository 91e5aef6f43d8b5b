"""Sharding by app and sending to every replica: the documented hash (exporter/sharding.py)
and the client that routes records with it (exporter/client.py).

The hash is pinned by check values (so another implementation can be tested against
them), keyed on the app exactly as the exporter labels it, spreads apps evenly, and moves
only the apps a new shard takes. The client is run against real HTTP servers: every
replica of the app's shard gets the batch, a replica answering 503 is retried, one that
stays down is reported as missed while its twin holds the records, and a shard with no
replica left raises."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from exporter.client import APP_FIELDS, Exporters, SendError, record_app
from exporter.ingest.batch import parse_batch
from exporter.ingest.records import ALIASES, parse_record
from exporter.sharding import app_key, fnv1a_64, jump_hash, shard_of

ROOT = Path(__file__).resolve().parent.parent

# (app, shards) -> shard: the function as documented in docs/scaling.md
CHECK_VALUES = {("support-bot", 3): 0, ("etl", 3): 1, ("unknown", 3): 1, ("agent-7", 10): 7,
                ("Ärger", 10): 4, ("support-bot", 100): 10, ("etl", 100): 45}


def test_check_values() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325 and fnv1a_64(b"a") == 0xAF63DC4C8601EC8C   # FNV-1a's own vectors
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8
    for (app, n), shard in CHECK_VALUES.items():
        assert shard_of(app, n) == shard, (app, n)


def test_check_values_are_the_ones_documented() -> None:
    doc = (ROOT / "docs" / "scaling.md").read_text()
    for (app, n), shard in CHECK_VALUES.items():
        assert f"| `{app}` | {n} | {shard} |" in doc, (app, n)


@pytest.mark.parametrize("raw", ["support-bot", "  support-bot  ", "Support-Bot", "", None, "   ", "Ärger", "a b"])
def test_the_key_is_the_app_as_the_exporter_labels_it(raw: Any) -> None:
    rec = {"provider": "openai", "model": "gpt-4o", **({} if raw is None else {"app": raw})}
    assert parse_record(rec, 0.0).app == app_key(raw)
    cols, _, _ = parse_batch([rec], 0.0)
    assert cols.app[0] == app_key(raw)


def test_the_client_reads_the_app_from_the_fields_the_exporter_does() -> None:
    assert set(APP_FIELDS) == {"app"} | {k for k, v in ALIASES.items() if v == "app"}
    for rec in ({"app": "x", "tenant": "y"}, {"tenant": "y"}, {"team": "t", "service": "s"}, {"app": "", "team": "t"},
                {}):
        full = {"provider": "p", "model": "m", **rec}
        assert app_key(record_app(full)) == parse_record(full, 0.0).app, rec


def test_apps_spread_evenly_and_a_new_shard_moves_only_its_share() -> None:
    apps = [f"app-{i}" for i in range(20_000)]
    for n in (2, 3, 7):
        counts = Counter(shard_of(a, n) for a in apps)
        assert set(counts) == set(range(n))
        assert max(counts.values()) / min(counts.values()) < 1.1, counts
        before = [shard_of(a, n) for a in apps]
        after = [shard_of(a, n + 1) for a in apps]
        moved = [(b, a) for b, a in zip(before, after) if b != a]
        assert all(a == n for _, a in moved)                     # only to the new shard
        assert abs(len(moved) / len(apps) - 1 / (n + 1)) < 0.02   # and only its share


def test_bad_shard_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        jump_hash(1, 0)
    p = subprocess.run([sys.executable, "-m", "exporter.cli", "shard", "x", "--shards", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "--shards must be at least 1" in p.stderr


def test_the_shard_command_prints_the_owner_of_each_app() -> None:
    p = subprocess.run([sys.executable, "-m", "exporter.cli", "shard", "support-bot", " etl ", "", "--shards", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["0\tsupport-bot", "1\tetl", "1\tunknown"]


# --- the client, against real HTTP servers ------------------------------------------------

class Replica:
    """An HTTP server taking POST /v1/records; `script` is the statuses to answer in turn
    (200 once it runs out). What it took is in `records`."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.script = list(script or [])
        self.records: list[dict[str, Any]] = []
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts += 1
                status = outer.script.pop(0) if outer.script else 200
                if status == 200:
                    outer.records.extend(json.loads(body))
                out = json.dumps({"accepted": len(json.loads(body))} if status == 200 else {"reason": "locked"}).encode()
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for r in made:
        r.close()


def _records(apps: list[str], each: int = 3) -> list[dict[str, Any]]:
    return [{"provider": "openai", "model": "gpt-4o", "app": a, "input_tokens": 1} for a in apps for _ in range(each)]


def test_every_replica_of_the_owning_shard_gets_the_same_records(replicas: list[Replica]) -> None:
    replicas.extend(Replica() for _ in range(4))
    ex = Exporters([[replicas[0].url, replicas[1].url], [replicas[2].url, replicas[3].url]], sleep=lambda s: None)
    apps = [f"app-{i}" for i in range(12)]
    result = ex.send(_records(apps))
    assert not result.missed and result.lost == 0
    for shard, (a, b) in enumerate([(replicas[0], replicas[1]), (replicas[2], replicas[3])]):
        assert a.records == b.records and a.records
        assert {r["app"] for r in a.records} == {x for x in apps if shard_of(x, 2) == shard}
        ids = [r["request_id"] for r in a.records]
        assert len(set(ids)) == len(ids)                  # given once, the same on both replicas


def test_a_busy_replica_is_retried_and_a_dead_one_is_reported_while_its_twin_holds_the_records(
        replicas: list[Replica]) -> None:
    busy, ok = Replica([503, 503]), Replica()
    replicas.extend([busy, ok])
    result = Exporters([[busy.url, ok.url]], sleep=lambda s: None).send(_records(["chat"]))
    assert busy.posts == 3 and busy.records == ok.records and len(ok.records) == 3
    assert not result.missed
    dead_url = "http://127.0.0.1:9"                    # the discard port: nothing listens
    twin = Replica()
    replicas.append(twin)
    result = Exporters([[dead_url, twin.url]], attempts=2, sleep=lambda s: None).send(_records(["chat"]))
    assert result.missed == [dead_url] and result.lost == 0 and len(twin.records) == 3


def test_records_that_reach_no_replica_raise_and_a_wrong_batch_is_not_retried(replicas: list[Replica]) -> None:
    bad = Replica([422, 422])
    replicas.append(bad)
    with pytest.raises(SendError, match="3 records reached no replica") as e:
        Exporters([[bad.url]], sleep=lambda s: None).send(_records(["chat"]))
    assert bad.posts == 1 and "HTTP 422" in e.value.result.answers[bad.url]
