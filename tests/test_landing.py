"""The landing page in headless Chromium, served by a real `llm-usage-exporter serve`:
a red (`high`) row for an anomalous signal, the "All clear" banner for steady traffic,
and a screenshot that actually shows those colours."""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import HOUR, Server, steady_history

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

HIGH_RED = (0xF8, 0xD7, 0xDA)       # tr.high td
OK_GREEN = (0xE8, 0xF5, 0xE9)       # tr.ok td
CLEAR_GREEN = (0xC8, 0xE6, 0xC9)    # .banner.clear


def traffic(now: float, spike: float) -> list[dict[str, Any]]:
    """Two steady days ($1/h, 40 requests/h) before the hour that overlaps the window, then 40
    requests in the last 50 minutes costing `spike` dollars in all."""
    end = math.floor((now - HOUR) / HOUR) * HOUR
    history = steady_history(end=end, days=2, n=40, cost=1.0, id_prefix="h")
    rng = np.random.default_rng(4)
    recent = [{"ts": now - 3000 + 70 * i, "provider": "openai", "model": "gpt-4o-mini", "app": "chat",
               "input_tokens": int(1000 * (1 + 0.05 * rng.uniform(-1, 1))), "output_tokens": 200,
               "cost_usd": spike / 40, "latency_s": 1.0, "ttft_s": 0.3, "request_id": f"now-{i}"} for i in range(40)]
    return history + recent


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # type: ignore[arg-type]


def serve_and_render(tmp_path: Path, spike: float, expect: str) -> tuple[str, Path, dict[str, Any]]:
    now = time.time()
    with Server(tmp_path, tmp_path / "landing.db") as srv:
        items = traffic(now, spike)
        for i in range(0, len(items), 1000):
            r = srv.client.post("/v1/records", json=items[i:i + 1000])
            assert r.status_code == 200 and r.json()["rejected"] == 0

        def evaluated() -> bool:
            rows = srv.client.get("/api/anomalies", params={"signal": "cost_per_hour", "scope": "global"}).json()["anomalies"]
            return bool(rows) and rows[0]["requests_in_window"] == 40 and rows[0]["severity"] == expect
        srv.wait_for(evaluated)
        row = srv.client.get("/api/anomalies", params={"signal": "cost_per_hour", "scope": "global"}).json()["anomalies"][0]
        url = srv.url + "/"
        dom = chromium("--dump-dom", url, profile=tmp_path / "profile")
        assert dom.returncode == 0, dom.stderr[-2000:]
        png = tmp_path / "landing.png"
        shot = chromium(f"--screenshot={png}", "--window-size=1200,800", "--hide-scrollbars", url,
                        profile=tmp_path / "profile")
        assert shot.returncode == 0, shot.stderr[-2000:]
    return dom.stdout, png, row


def table_rows(dom: str) -> list[tuple[str, list[str]]]:
    """(class, cell texts) of each row of the status table."""
    body = re.search(r'<table id="status">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, dom[:2000]
    rows = []
    for cls, cells in re.findall(r'<tr class="(\w+)">(.*?)</tr>', body.group(1), re.S):
        rows.append((cls, [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", cells, re.S)]))
    return rows


def test_anomalous_signal_gets_a_red_row(tmp_path: Path) -> None:
    dom, png, row = serve_and_render(tmp_path, spike=5.0, expect="high")
    assert row["ratio"] == pytest.approx(5.0, rel=0.1)
    rows = table_rows(dom)
    assert len(rows) == 7 * 3                                              # every signal: global, app, model
    high = [cells for cls, cells in rows if cls == "high"]
    assert {(c[0], c[1], c[2]) for c in high} == {("cost_per_hour", "global", "all"), ("cost_per_hour", "app", "chat"),
                                                  ("cost_per_hour", "model", "openai/gpt-4o-mini")}
    assert all(c[-1] == "high" for c in high)
    assert rows[0][0] == "high"                                            # worst first
    assert "3 anomalous signal(s)." in dom and "All clear" not in dom
    assert "tr.high td{background:#f8d7da}" in dom
    colours = png_colours(png)
    assert colours.get(HIGH_RED, 0) > 1000                                 # the red rows are on screen
    assert colours.get(CLEAR_GREEN, 0) == 0


def test_steady_traffic_shows_all_clear(tmp_path: Path) -> None:
    dom, png, row = serve_and_render(tmp_path, spike=1.0, expect="ok")
    rows = table_rows(dom)
    assert len(rows) == 7 * 3 and {cls for cls, _ in rows} == {"ok"}
    assert "All clear: no signal is anomalous." in dom
    colours = png_colours(png)
    assert colours.get(CLEAR_GREEN, 0) > 1000 and colours.get(OK_GREEN, 0) > 1000
    assert colours.get(HIGH_RED, 0) == 0


# --- a small PNG reader (8-bit RGB/RGBA, non-interlaced: what Chromium writes) ---------------------

def png_colours(path: Path) -> dict[tuple[int, int, int], int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, "not a PNG screenshot"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert ihdr is not None
    width, height, depth, colour_type, _, _, interlace = ihdr
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, ihdr
    assert (width, height) == (1200, 800)
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = np.zeros(stride, dtype=np.int64)
    out = np.empty((height, stride), dtype=np.uint8)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        if f == 0:
            cur = line
        elif f == 1:                                   # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 0xFF
        elif f == 2:                                   # Up
            cur = (line + prev) & 0xFF
        else:                                          # Average / Paeth: sequential, in plain ints
            ln, up, c = line.tolist(), prev.tolist(), [0] * stride
            for x in range(stride):
                a = c[x - bpp] if x >= bpp else 0
                b = up[x]
                if f == 3:
                    c[x] = (ln[x] + (a + b) // 2) & 0xFF
                    continue
                d = up[x - bpp] if x >= bpp else 0
                pa, pb, pc = abs(b - d), abs(a - d), abs(a + b - 2 * d)
                c[x] = (ln[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else d)) & 0xFF
            cur = np.array(c, dtype=np.int64)
        out[y] = cur
        prev = cur
    px = out.reshape(height, width, bpp)[:, :, :3].astype(np.int64)
    keys, counts = np.unique((px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2], return_counts=True)
    return {(int(k) >> 16, (int(k) >> 8) & 0xFF, int(k) & 0xFF): int(n) for k, n in zip(keys, counts)}
