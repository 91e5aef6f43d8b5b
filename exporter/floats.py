"""Numbers on their way to JSON: NaN and infinities mean "no value" and are written as null."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(x: Any, digits: int | None = None) -> float | None:
    """`x` as a float (rounded to `digits` when given), or None when it is missing, NaN or infinite."""
    if x is None:
        return None
    v = float(x)
    if not math.isfinite(v):
        return None
    return v if digits is None else round(v, digits)
