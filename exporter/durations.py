"""Durations as people write them (`30s`, `5m`, `48h`, `7d`) and as the help shows them."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SHOWN = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def parse_duration(v: Any) -> float:
    """'90s', '5m', '48h', '7d' or a number of seconds, as seconds."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < 0:
            raise ValueError("must not be negative")
        if not math.isfinite(v):
            raise ValueError("must be a finite number of seconds")
        return float(v)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"{v!r} is not a duration like 30s, 5m, 48h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """The largest unit that counts the duration in whole numbers of at least 2:
    3600 -> '60m', 7 days -> '7d', 310 -> '310s', 0.25 -> '250ms'."""
    for unit, size in _SHOWN:
        count = seconds / size
        if count >= 2 and count == int(count):
            return f"{int(count)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds * 1000:g}ms"


# A settings field in seconds that accepts `5m` and is shown as `5m`.
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration, when_used="json")]
