"""Request bodies: read within a size limit, and decompressed within the same limit.

Log shippers (Vector, Fluent Bit, Logstash) compress what they send. A gzip or deflate
body is inflated in steps of at most the remaining allowance, so a zip bomb stops at
`max_body_bytes` of output with a 413 instead of inflating to gigabytes. Decompression is
CPU work: it runs on the ingest worker, not on the event loop.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.requests import Request

    from .ingest_queue import Ticket


class BodyTooLarge(Exception):
    """413: the body, as sent or once decompressed, exceeds the limit."""

    def __init__(self, limit: int, declared: int | None = None, decompressed: bool = False) -> None:
        if declared is not None:
            msg = f"body of {declared} bytes exceeds max_body_bytes ({limit})"
        elif decompressed:
            msg = f"body exceeds max_body_bytes ({limit}) once decompressed"
        else:
            msg = f"body exceeds max_body_bytes ({limit})"
        super().__init__(msg)


class QueueFull(Exception):
    """429: the ingest queue has no room for the rest of this body."""


class UnsupportedEncoding(Exception):
    """415: a Content-Encoding we do not decode."""


class BadEncoding(Exception):
    """400: the body is not valid data of its declared Content-Encoding."""


ENCODINGS = ("gzip", "x-gzip", "deflate", "identity")


def declared_length(request: "Request") -> int | None:
    v = request.headers.get("content-length")
    return int(v) if v is not None and v.isdigit() else None


async def read_body(request: "Request", limit: int, ticket: "Ticket | None" = None) -> bytes:
    """The whole body, refused past `limit` bytes as they arrive (a missing or lying
    Content-Length is no way around it); a ticket grows with what was read."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit, declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        if ticket is not None and not ticket.grow(size):
            raise QueueFull()
        chunks.append(chunk)
    return b"".join(chunks)


def check_encoding(header: str) -> str:
    """The one content coding of a request ('identity' when none), or UnsupportedEncoding."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    if len(codings) > 1:
        raise UnsupportedEncoding(f"Content-Encoding {header!r}: send one coding of gzip, deflate or identity")
    coding = codings[0] if codings else "identity"
    if coding not in ENCODINGS:
        raise UnsupportedEncoding(f"Content-Encoding {coding!r} is not supported: use gzip, deflate or identity")
    return coding


def decode_content(body: bytes, coding: str, limit: int) -> bytes:
    """The body with its content coding removed, at most `limit` bytes of it."""
    if coding == "identity":
        return body
    gzip = coding in ("gzip", "x-gzip")
    # gzip: header and trailer, maybe several members; deflate: the zlib format of RFC 9110,
    # or the raw stream some clients send under that name
    wbits = 16 + zlib.MAX_WBITS if gzip else (zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS)
    parts: list[bytes] = []
    size = 0
    data = body
    try:
        while data:
            d = zlib.decompressobj(wbits)
            while data and not d.eof:
                out = d.decompress(data, limit + 1 - size)
                size += len(out)
                if size > limit:
                    raise BodyTooLarge(limit, decompressed=True)
                parts.append(out)
                data = d.unconsumed_tail
            if not d.eof:
                raise BadEncoding(f"truncated {coding} body")
            data = d.unused_data
            if data and not gzip:
                raise BadEncoding(f"data after the end of the {coding} stream")
    except zlib.error as e:
        raise BadEncoding(f"body is not valid {coding} data: {e}") from None
    return b"".join(parts)
