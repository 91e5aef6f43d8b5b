"""Rate tables: one model's prices as an array the cost computation indexes per record.

A table has the shape (tier, band, column): tiers are standard, flex, priority and batch;
bands are input sizes (band b applies when the request's input exceeds the first b
thresholds); columns are USD per token of each token type. Pricing a batch is then a
lookup and a dot product per record.

`from_litellm` reads an entry of LiteLLM's cost map with the rules LiteLLM prices by, so
that our cost equals its `cost_per_token` for the same usage (tests/test_price_oracle.py
holds us to that), except where docs/records.md says we differ on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .records import TOKEN_TYPES

TIERS = ("standard", "flex", "priority", "batch")
BATCH = TIERS.index("batch")
# Per-token columns. A cache write is billed at `cache_write` or, for the part written with a
# one-hour lifetime, at `cache_write_1h`; reasoning tokens are output tokens with their own price.
COLUMNS: tuple[str, ...] = tuple(c for t in TOKEN_TYPES for c in ((t, "cache_write_1h") if t == "cache_write" else (t,)))
CONFIG_TYPES = COLUMNS      # the token types a `prices:` entry may set
_FALLBACK = {"reasoning": "output", "cache_read": "input", "cache_write": "input", "cache_write_1h": "cache_write"}

_IN, _OUT, _READ, _WRITE = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
                            "cache_creation_input_token_cost")
_WRITE_1H = "cache_creation_input_token_cost_above_1hr"
_REASONING = "output_cost_per_reasoning_token"
_TIER_SUFFIX = ("", "_flex", "_priority")
_OTHER_SUFFIXES = ("_flex", "_priority", "_batches")
# Providers whose long-context price starts at the threshold itself rather than above it.
INCLUSIVE_THRESHOLD_PROVIDERS = frozenset({"xai"})
# Providers that bill cached input at a share of the input price when no cache price is listed.
CACHE_READ_SHARE = {"fireworks_ai": 0.5}


class PriceError(ValueError):
    """A price entry in the configuration is malformed."""


@dataclass(frozen=True, slots=True)
class Rates:
    """A model's prices: `table[tier, band]` is USD per token by column."""

    thresholds: tuple[float, ...]   # input sizes (tokens) where the next band starts
    inclusive: bool                 # band starts at the threshold (>=) instead of above it (>)
    table: np.ndarray               # (len(TIERS), len(thresholds) + 1, len(COLUMNS))

    def per_million(self) -> dict[str, Any]:
        """The prices in USD per million tokens, for people to read."""
        def row(t: int, b: int) -> dict[str, float]:
            return {c: round(float(v) * 1e6, 9) for c, v in zip(COLUMNS, self.table[t, b])}
        out: dict[str, Any] = {tier: row(t, 0) for t, tier in enumerate(TIERS)}
        out["long_context"] = [
            {"input_tokens_" + ("at_least" if self.inclusive else "above"): int(th),
             **{tier: row(t, b + 1) for t, tier in enumerate(TIERS)}}
            for b, th in enumerate(self.thresholds)]
        return out


def from_config(name: str, prices: Mapping[str, Any]) -> Rates:
    """Flat prices in USD per million tokens, from the `prices:` config or the shipped table.

    They have no tiers and no long-context band: flex and priority pay the same, and a
    batch request pays half (the usual batch discount), as for map entries without batch prices."""
    if not isinstance(prices, Mapping):
        raise PriceError(f"prices.{name}: must be a mapping of token type to USD per million tokens")
    unknown = set(prices) - set(CONFIG_TYPES)
    if unknown or "input" not in prices or "output" not in prices:
        raise PriceError(f"prices.{name}: needs input and output (USD per million tokens); "
                         f"known types {CONFIG_TYPES}, got {sorted(map(str, prices))}")
    values: dict[str, float] = {}
    for t in CONFIG_TYPES:
        v = prices.get(t)
        if v is None:
            v = values[_FALLBACK[t]] * 1e6
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise PriceError(f"prices.{name}.{t}: must be a non-negative number, got {v!r}")
        values[t] = float(v) / 1e6
    row = np.array([values[c] for c in COLUMNS])
    table = np.stack([row, row, row, row / 2])[:, None, :]
    return Rates((), False, table)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _threshold_value(label: str) -> float:
    return float(label.replace("k", "")) * (1000 if "k" in label else 1)


def _threshold_label(key: str) -> str:
    return key.rsplit("_above_", 1)[1].split("_tokens")[0]


def from_litellm(fields: Mapping[str, Any]) -> Rates:
    """Rates from one entry of LiteLLM's cost map (USD per token, LiteLLM's field names)."""
    f = {k: n for k, v in fields.items() if (n := _number(v)) is not None}
    provider = str(fields.get("litellm_provider", ""))
    online = f   # the prices of requests not sent as a batch
    if provider in CACHE_READ_SHARE and _READ not in f:
        online = {**f, _READ: f[_IN] * CACHE_READ_SHARE[provider]}
    labels = {_threshold_label(k) for k in f
              if k.startswith(tuple(p + "_above_" for p in (_IN, _OUT, _READ, _WRITE))) and "_tokens" in k}
    tiered = _tiered(fields)
    bounds = sorted({_threshold_value(x) for x in labels} | {start for start, _ in tiered[1:]})
    table = np.zeros((len(TIERS), len(bounds) + 1, len(COLUMNS)))
    for band in range(len(bounds) + 1):
        crossed = sorted((x for x in labels if _threshold_value(x) in bounds[:band]), key=_threshold_value)
        for tier in range(BATCH):
            table[tier, band] = _tier_rates(online, tier, crossed)
            if tiered:
                table[tier, band] = _tiered_rates(online, tiered, bounds[:band], table[tier, band])
        table[BATCH, band] = _batch_rates(f, crossed, table[0, band])
        if provider in INCLUSIVE_THRESHOLD_PROVIDERS:   # xAI bills reasoning as output
            table[:, band, COLUMNS.index("reasoning")] = table[:, band, COLUMNS.index("output")]
    return Rates(tuple(bounds), provider in INCLUSIVE_THRESHOLD_PROVIDERS, table)


def _get(f: Mapping[str, float], key: str) -> float | None:
    """A price, falling back from a tier's field to the standard one (flex -> standard)."""
    v = f.get(key)
    if v is None:
        for suffix in ("_priority", "_flex"):
            if suffix in key:
                return f.get(key.replace(suffix, ""))
    return v


def _tier_rates(f: Mapping[str, float], tier: int, crossed: list[str]) -> list[float]:
    """Standard, flex or priority prices once the input has crossed the `crossed` thresholds.

    Each price takes the value of its highest crossed threshold that has one (the tier's own
    field first, the standard field next), else its base value; cache prices that are not
    set cost what input costs, a one-hour cache write what a cache write costs."""
    sfx = _TIER_SUFFIX[tier]
    inp = _get(f, _IN + sfx) or 0.0
    out = _get(f, _OUT + sfx) or 0.0
    read, write = _get(f, _READ + sfx), _get(f, _WRITE + sfx)
    write_1h_key = _WRITE_1H + sfx
    for label in crossed:
        if not _applies_to_tier(f, label, sfx):
            continue
        above = f"_above_{label}_tokens{sfx}"
        inp = _pick(_get(f, _IN + above), inp)
        out = _pick(_get(f, _OUT + above), out)
        write = _pick(_get(f, _WRITE + above), write)
        read = _pick(_get(f, _READ + above), read)
        if f.get(_WRITE_1H + above) is not None:
            write_1h_key = _WRITE_1H + above
    read = inp if read is None else read
    write = inp if write is None else write
    write_1h = _pick(_get(f, write_1h_key), write)
    if sfx and f.get(_REASONING + sfx) is not None:
        reasoning = f[_REASONING + sfx]
    elif sfx and f.get(_OUT + sfx) is not None:
        reasoning = out
    else:
        reasoning = _pick(f.get(_REASONING), out)
    return [inp, out, read, write, write_1h, reasoning]


def _applies_to_tier(f: Mapping[str, float], label: str, sfx: str) -> bool:
    """A threshold counts for a tier when a standard field or one of the tier's own has it."""
    for k in f:
        if "_above_" in k and "_tokens" in k and _threshold_label(k) == label:
            if not k.endswith(_OTHER_SUFFIXES) or (sfx and k.endswith(sfx)):
                return True
    return False


def _pick(v: float | None, default: Any) -> Any:
    return default if v is None else v


def _batch_price(f: Mapping[str, float], prefix: str, crossed: list[str]) -> float | None:
    """A batch price: the highest crossed threshold with a batch price, else the flat one."""
    for label in reversed(crossed):
        v = f.get(f"{prefix}_above_{label}_tokens_batches")
        if v is not None:
            return v
    return f.get(prefix + "_batches")


def _batch_rates(f: Mapping[str, float], crossed: list[str], standard: np.ndarray) -> np.ndarray:
    """Batch prices. Without a batch input price, half the standard prices of the same band."""
    inp = _batch_price(f, _IN, crossed)
    if inp is None:
        return standard / 2
    read = _batch_price(f, _READ, crossed)
    if read is None:
        read = next((f[k] for k in (f"{_READ}_above_{x}_tokens" for x in reversed(crossed)) if k in f), None)
        read = _pick(read, _pick(f.get(_READ), inp))
    write, write_1h = _batch_price(f, _WRITE, crossed), _batch_price(f, _WRITE_1H, crossed)
    write = _pick(write, inp)
    write_1h = _pick(write_1h, write)
    out = _batch_price(f, _OUT, crossed)
    if out is None:
        out = f[_OUT] / 2 if _OUT in f else 0.0
    return np.array([inp, out, read, write, write_1h, out])


def _tiered(fields: Mapping[str, Any]) -> list[tuple[float, Mapping[str, Any]]]:
    """A `tiered_pricing` table as (range start, tier) sorted by start; [] when absent."""
    tiers = fields.get("tiered_pricing")
    if not isinstance(tiers, list):
        return []
    out = []
    for t in tiers:
        r = t.get("range") if isinstance(t, dict) else None
        if isinstance(r, list) and len(r) == 2 and _number(r[0]) is not None and _number(t.get(_IN)) is not None:
            out.append((float(r[0]), t))
    return sorted(out, key=lambda x: x[0])


def _tiered_rates(f: Mapping[str, float], tiered: list[tuple[float, Mapping[str, Any]]], crossed: list[float],
                  current: np.ndarray) -> np.ndarray:
    """All-or-nothing tiers: the tier the input size falls in prices every token of the request."""
    index = sum(1 for start, _ in tiered[1:] if start in crossed)
    t = {k: n for k, v in tiered[index][1].items() if (n := _number(v)) is not None}
    inp = t[_IN]
    out = _pick(t.get(_OUT), f.get(_OUT, 0.0))
    write = _pick(t.get(_WRITE), inp)
    if _REASONING in t or _OUT in t:
        reasoning = _pick(t.get(_REASONING), t.get(_OUT))
    else:
        reasoning = current[COLUMNS.index("reasoning")]
    return np.array([inp, out, _pick(t.get(_READ), inp), write, write, reasoning])

