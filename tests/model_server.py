"""A model server on 127.0.0.1 for the backend probe tests, answering the health endpoints
the shipped probe modules ask, and switchable while it runs.

    with ModelServer() as m:                  # mode "ok"
        m.url                                 # http://127.0.0.1:<port>
        m.mode = "error"                      # every path answers 503
        m.mode = "silent"                     # accepts connections, reads the request, never answers
    with ModelServer(tls=self_signed_cert(tmp_path, days=2)) as m:   # HTTPS, its CA in m.tls.cert

Paths, in mode "ok": `/health` 200 (vLLM, TGI, llama.cpp); `/api/version` 200
{"version": ...} (Ollama); `/v1/models` 200 {"object": "list", "data": [...]} with the right
bearer token (401 without, when `token` is set); `/api/v2/status.json` a Statuspage status
with `indicator` (none by default). `hits` counts requests by path.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SILENT_HOLD_S = 10.0      # how long a silent server keeps a connection before dropping it


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def self_signed_cert(directory: Path, days: int, host: str = "127.0.0.1") -> Cert:
    """A self-signed certificate for `host` (an IP address) valid for `days`, made by openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is not installed (Debian package openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"cert-{days}d.pem", directory / f"key-{days}d.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", str(days), "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}"],
                   check=True, capture_output=True, timeout=60)
    return Cert(cert, key)


class ModelServer:
    def __init__(self, *, tls: Cert | None = None, token: str | None = None) -> None:
        self.mode = "ok"
        self.indicator = "none"
        self.token = token
        self.tls = tls
        self.hits: Counter[str] = Counter()
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                server.hits[path] += 1
                if server.mode == "silent":
                    server._stopping.wait(SILENT_HOLD_S)
                    self.close_connection = True
                    return
                if server.mode == "error":
                    return self._send(503, {"error": "model is not loaded"})
                if path == "/health":
                    return self._send(200, None)
                if path == "/api/version":
                    return self._send(200, {"version": "0.5.7"})
                if path == "/v1/models":
                    if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                        return self._send(401, {"error": {"message": "invalid api key"}})
                    return self._send(200, {"object": "list", "data": [{"id": "llama-test", "object": "model"}]})
                if path == "/api/v2/status.json":
                    return self._send(200, {"page": {"id": "test"},
                                            "status": {"indicator": server.indicator, "description": "status"}})
                return self._send(404, {"error": "not found"})

            def _send(self, status: int, body: Any) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.cert, tls.key)
            # the handshake runs in the request's thread, never in the accepting one
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self.port = int(self.httpd.server_address[1])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="model-server")

    def start(self) -> "ModelServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait_hits(self, path: str, more_than: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.hits[path] <= more_than:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no request for {path} in {timeout}s")
            time.sleep(0.05)

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
