"""The status page: every signal and scope, green / amber / red, like the Grafana status table.

The HTML lives in `templates/status.html`; this module fills it from the latest snapshot
and the price table's unpriced names, escaping every value it inserts.
"""

from __future__ import annotations

import html
import time
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any

from .. import __version__
from ..engine import Engine
from ..ingest.prices import PriceTable

SEVERITY_ORDER = {"ok": 0, "warning": 1, "high": 2}


@lru_cache(maxsize=1)
def _template() -> Template:
    return Template(resources.files(__package__).joinpath("templates/status.html").read_text().rstrip("\n"))


def series_of(row: dict[str, Any]) -> str:
    """The series an anomaly row is about: its app, its provider/model, or all traffic."""
    if row["app"]:
        return str(row["app"])
    return f"{row['provider']}/{row['model']}" if row["model"] else "all"


def _cell(v: Any) -> str:
    return "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))


def status_page(engine: Engine) -> str:
    """The page for the engine's latest snapshot (a waiting banner before the first one)."""
    snap = engine.snapshot
    rows = list(snap.rows()) if snap else []
    bad = [r for r in rows if r["severity"] != "ok"]
    if snap is None:
        banner = '<div class="banner wait">Waiting for the first evaluation.</div>'
    elif bad:
        banner = f'<div class="banner alert">{len(bad)} anomalous signal(s).</div>'
    else:
        banner = '<div class="banner clear">All clear: no signal is anomalous.</div>'
    rows.sort(key=lambda r: (-SEVERITY_ORDER[r["severity"]], r["signal"], r["scope"]))
    body = "".join(
        f'<tr class="{r["severity"]}"><td>{html.escape(r["signal"])}</td><td>{html.escape(r["scope"])}</td>'
        f'<td>{html.escape(series_of(r))}</td>'
        f'<td>{_cell(r["current"])}</td><td>{_cell(r["baseline"])}</td><td>{_cell(r["ratio"])}</td>'
        f'<td>{_cell(r["zscore"])}</td><td>{r["threshold"]["warning"]:g} / {r["threshold"]["high"]:g}</td>'
        f'<td>{r["baseline_hours"]}</td><td>{r["severity"]}</td></tr>' for r in rows)
    evaluated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.t)) if snap else "never"
    return _template().substitute(version=__version__, banner=banner, evaluated=evaluated, rows=body,
                                  unpriced=unpriced_section(engine.prices))


def unpriced_section(prices: PriceTable) -> str:
    """A short table of the model names the exporter could not price since start-up."""
    seen = prices.unpriced_seen()
    if not seen["models"]:
        return ""
    rows = "".join(f"<tr><td>{html.escape(u['provider'])}</td><td>{html.escape(u['model'])}</td>"
                   f"<td>{html.escape(u['reason'])}</td><td>{u['requests']}</td></tr>" for u in seen["models"])
    more = (f"<p>…and {seen['requests_of_names_not_listed']} request(s) of other names.</p>"
            if seen["requests_of_names_not_listed"] else "")
    return (f'<h2>Unpriced models</h2><p>Requests without <code>cost_usd</code> whose model has no price: they count in '
            f'<code>llm_unpriced_requests_total</code>, never as free. See <a href="/api/prices">/api/prices</a>.</p>'
            f'<table id="unpriced"><thead><tr><th>provider</th><th>model</th><th>why</th><th>requests</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>{more}')
