"""The protobuf wire format, walked just enough to cut a large message into small ones.

A protobuf parser builds every message of a body at once, and a message costs far more in
memory than its bytes on the wire: 16 MiB of empty OTLP spans (two bytes each) parse into
1.4 GB. A message is a sequence of fields, and any run of whole fields is itself a valid
encoding of the same message type, so a body larger than a limit can be parsed a run at a
time: `runs` walks the fields of one message and groups them into runs of at most `limit`
bytes, and hands over the few fields that are larger than the limit on their own, for the
caller to descend into (a repeated container) or to skip (a prompt's text).
"""

from __future__ import annotations

from typing import Iterator

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
RUN = 0         # the `number` of a run of whole fields in `runs`


class WireError(ValueError):
    """Bytes that are not the protobuf encoding of a message."""


def fields(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of every field of the
    message buf[start:end]; the value of a length-delimited field is buf[value start:field end].

    The varints are read inline, one-byte ones first: this loop is what a body of millions
    of tiny fields costs."""
    i = start
    try:
        while i < end:
            at = i
            key = buf[i]
            i += 1
            if key >= 0x80:
                key, i = _varint_rest(buf, i, key)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise WireError(f"field number 0 at byte {at}")
            if wire == LEN:
                n = buf[i]
                i += 1
                if n >= 0x80:
                    n, i = _varint_rest(buf, i, n)
                vs = i
                i += n
            elif wire == VARINT:
                vs = i
                while buf[i] >= 0x80:
                    i += 1
                    if i - vs >= 10:
                        raise WireError(f"varint longer than ten bytes at byte {vs}")
                i += 1
            elif wire == I64:
                vs, i = i, i + 8
            elif wire == I32:
                vs, i = i, i + 4
            else:       # groups (deprecated, never in OTLP) and the unused wire types 6 and 7
                raise WireError(f"wire type {wire} at byte {at}")
            if i > end:
                raise WireError(f"field {number} at byte {at} runs past the end of its message")
            yield number, wire, at, vs, i
    except IndexError:
        raise WireError("truncated message") from None


def _varint_rest(buf: bytes | memoryview, i: int, first: int) -> tuple[int, int]:
    """A varint whose first byte `first` (at i - 1) has its continuation bit set."""
    value, shift = first & 0x7F, 7
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise WireError(f"varint longer than ten bytes at byte {i - 10}")


def has_field(buf: bytes | memoryview, start: int, end: int, number: int) -> bool:
    """Whether the message buf[start:end] has a field `number` (checking every field's
    encoding up to it)."""
    return any(n == number for n, *_ in fields(buf, start, end))


def runs(buf: bytes | memoryview, start: int, end: int, limit: int) -> Iterator[tuple[int, int, int]]:
    """The fields of the message buf[start:end] in order, as (RUN, run start, run end) for runs
    of whole fields of at most `limit` bytes in all, and (field number, value start, value end)
    for a length-delimited field longer than `limit` on its own."""
    run_start = run_end = start
    for number, wire, at, vs, i in fields(buf, start, end):
        if wire == LEN and i - at > limit:
            if run_end > run_start:
                yield RUN, run_start, run_end
            yield number, vs, i
            run_start = run_end = i
            continue
        if i - run_start > limit and run_end > run_start:
            yield RUN, run_start, run_end
            run_start = at
        run_end = i
    if run_end > run_start:
        yield RUN, run_start, run_end

