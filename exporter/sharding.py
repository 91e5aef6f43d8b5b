"""Which exporter shard owns an app: a jump consistent hash of the `app` label.

Exporters can be sharded by app: N exporters, each receiving every record of the apps it
owns, so every per-app signal is judged on all of the app's traffic. Clients (and any
proxy in front of the exporters) choose the shard of a record with `shard_of(app, N)`;
the exporter's `shard` command prints it. The function is small enough to write again in
any language:

1. the key is the app as the exporter labels it: the record's `app` with surrounding
   white space removed, and `unknown` when it is absent or empty (case is kept);
2. h = the 64-bit FNV-1a hash of the key's UTF-8 bytes;
3. the shard is Lamping and Veach's jump consistent hash of h into N buckets
   (arXiv:1406.2294): going from N to N + 1 shards moves 1/(N + 1) of the apps, all of them
   to the new shard, and none between the old ones.

The check values in `tests/test_sharding.py` (and docs/scaling.md) pin the function, so an
implementation elsewhere can be tested against them.
"""

from __future__ import annotations

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = 0xFFFFFFFFFFFFFFFF
JUMP_MULTIPLIER = 2862933555777941757


def app_key(app: object) -> str:
    """The app label a record gets: stripped, `unknown` when absent or empty."""
    text = "" if app is None else str(app).strip()
    return text or "unknown"


def fnv1a_64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash of a 64-bit key into [0, buckets)."""
    if buckets < 1:
        raise ValueError(f"the number of shards must be at least 1, got {buckets}")
    b, j = -1, 0
    key &= MASK64
    while j < buckets:
        b = j
        key = (key * JUMP_MULTIPLIER + 1) & MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of(app: object, shards: int) -> int:
    """The shard, 0 to shards - 1, that owns `app`."""
    return jump_hash(fnv1a_64(app_key(app).encode("utf-8")), shards)
