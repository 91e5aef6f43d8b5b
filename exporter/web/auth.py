"""Bearer tokens: who may send records and who may read what the exporter knows.

Once any token is configured, every endpoint needs one except `/healthz` and `/readyz`
(probes) and `/metrics` (unless `protect_metrics`): the raw records carry request and
session ids, and statistics, anomalies, budgets and the API schema describe the business.
Ingest tokens (`auth_token_file`, `LLM_EXPORTER_AUTH_TOKENS`) allow everything; read-only
tokens (`read_token_file`, `LLM_EXPORTER_READ_TOKENS`) allow GET and HEAD, and a write
with one is refused with 403.

The check is ASGI middleware on the raw header bytes, before any route runs, so FastAPI's
own routes (`/docs`, `/openapi.json`) are covered and a token that is not ASCII is simply
a wrong token (401), never an exception. Tokens are compared as SHA-256 digests with
`hmac.compare_digest`, against every configured token, so timing tells nothing about them.
`Authorization: Basic` with the token as the password works too, for a browser's login
prompt on the status page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any, Awaitable, Callable, Iterable

import orjson

from . import otlp

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
READ_METHODS = frozenset({"GET", "HEAD"})
REALM = b'realm="llm-usage-exporter"'

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class Tokens:
    """The configured tokens, by what they allow."""

    def __init__(self, write: Iterable[str], read: Iterable[str] = (), protect_metrics: bool = False) -> None:
        self._write = [_digest(t.encode()) for t in sorted(write)]
        self._read = [_digest(t.encode()) for t in sorted(read)]
        self.protect_metrics = protect_metrics

    @property
    def enabled(self) -> bool:
        return bool(self._write or self._read)

    def needed(self, method: str, path: str) -> str | None:
        """'write', 'read' or None (open) for a request."""
        if path in OPEN_PATHS or (path == "/metrics" and not self.protect_metrics):
            return None
        return "read" if method in READ_METHODS else "write"

    def grant(self, authorization: bytes | None) -> str | None:
        """What the presented credentials allow: 'write', 'read' or None."""
        token = presented_token(authorization)
        if token is None:
            return None
        d = _digest(token)
        write = read = False
        for known in self._write:          # every comparison runs: no early exit
            write |= hmac.compare_digest(d, known)
        for known in self._read:
            read |= hmac.compare_digest(d, known)
        return "write" if write else "read" if read else None


def presented_token(authorization: bytes | None) -> bytes | None:
    """The token of `Bearer <token>` or the password of `Basic <base64(user:token)>`."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return rest.strip() or None
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        _, colon, password = decoded.partition(b":")
        return password if colon and password else None
    return None


class AuthMiddleware:
    """Refuses requests without the token their endpoint needs (401, or 403 for a read-only
    token on a write)."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        need = self.tokens.needed(scope["method"], scope["path"])
        if need is None:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        granted = self.tokens.grant(header)
        if granted == "write" or (granted == "read" and need == "read"):
            await self.app(scope, receive, send)
            return
        if granted == "read":
            await _refuse(scope, send, 403, "this token is read-only: sending records needs an ingest token", [])
        else:
            await _refuse(scope, send, 401, "missing or wrong bearer token",
                          [(b"www-authenticate", b"Bearer " + REALM), (b"www-authenticate", b"Basic " + REALM)])


async def _refuse(scope: Scope, send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    if scope["path"] in otlp.PATHS:         # OTLP clients are answered with a google.rpc.Status
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        body, media = otlp.status_body(status, message, content_type.decode("latin-1"))
    else:
        body, media = orjson.dumps({"error": message}), "application/json"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})
