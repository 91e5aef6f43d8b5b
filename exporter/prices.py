"""The price table: turns token counts into dollars when a record carries no cost.

A model with no price is never treated as free: its cost stays unknown (NaN) and the
request counts in `llm_unpriced_requests_total`, so a dashboard can say how much spend
it cannot see.
"""

from __future__ import annotations

from importlib import resources
from typing import Mapping

import re

import numpy as np
import yaml

from .codes import factorize
from .records import RecordColumns

PRICE_TYPES = ("input", "output", "cache_read", "cache_write", "reasoning")
# What may follow a priced name for a model to share its price: dates, build numbers,
# versions and "latest" (gpt-4o-2024-08-06, claude-3-5-sonnet-20241022, gemini-1.5-pro-002,
# claude-sonnet-4@20250514, ...-v2:0). Anything else ("-pro", "-mini", ".5-preview") is a
# different model with a different price, and stays unpriced until configured.
_SNAPSHOT_SUFFIX = re.compile(r"^([-@:](\d[\d-]*|latest|v\d+(:\d+)?))+$")
_FALLBACK = {"reasoning": "output", "cache_read": "input", "cache_write": "input"}


class PriceError(ValueError):
    """A price entry in the configuration is malformed."""


def load_shipped() -> dict[str, dict[str, float]]:
    text = resources.files("exporter").joinpath("data/prices.yaml").read_text()
    return yaml.safe_load(text)


class PriceTable:
    """Per-model price vectors (USD per token), with prefix matching for dated snapshots."""

    def __init__(self, overrides: Mapping[str, Mapping[str, float]] | None = None) -> None:
        table = load_shipped()
        for model, prices in (overrides or {}).items():
            table[str(model).lower()] = dict(prices)
        self._vectors: dict[str, np.ndarray] = {m: self._vector(m, p) for m, p in table.items()}
        self._by_length = sorted(self._vectors, key=len, reverse=True)
        self._cache: dict[str, np.ndarray | None] = {}

    @staticmethod
    def _vector(model: str, prices: Mapping[str, float]) -> np.ndarray:
        unknown = set(prices) - set(PRICE_TYPES)
        if unknown or "input" not in prices or "output" not in prices:
            raise PriceError(f"prices.{model}: needs input and output (USD per million tokens); "
                             f"known types {PRICE_TYPES}, got {sorted(prices)}")
        out = []
        for t in PRICE_TYPES:
            v = prices.get(t, prices.get(_FALLBACK.get(t, t)))
            if not isinstance(v, (int, float)) or v < 0:
                raise PriceError(f"prices.{model}.{t}: must be a non-negative number, got {v!r}")
            out.append(float(v) / 1e6)
        return np.array(out)

    def lookup(self, model: str) -> np.ndarray | None:
        """USD per token by type for a model, or None when the table has no price for it."""
        if model in self._cache:
            return self._cache[model]
        name = model.split("/", 1)[1] if "/" in model and model.split("/", 1)[0] not in self._vectors else model
        found = self._vectors.get(name)
        if found is None:
            found = next((self._vectors[m] for m in self._by_length
                          if name.startswith(m) and _SNAPSHOT_SUFFIX.match(name[len(m):])), None)
        self._cache[model] = found
        return found

    def costs(self, cols: RecordColumns, raw_model: np.ndarray | None = None) -> np.ndarray:
        """Cost per record: the record's own cost if present, else priced tokens, else NaN.

        `raw_model` is the model name before label guarding (an `other` model still has a price).
        """
        models = raw_model if raw_model is not None else cols.model
        uniq, inverse = factorize(models)
        table = np.full((len(uniq), len(PRICE_TYPES)), np.nan)
        for i, m in enumerate(uniq):
            v = self.lookup(m)
            if v is not None:
                table[i] = v
        tokens = np.stack([cols.input_tokens, cols.output_tokens, cols.cache_read_tokens,
                           cols.cache_write_tokens, cols.reasoning_tokens], axis=1).astype(np.float64)
        priced = (tokens * table[inverse]).sum(axis=1)
        return np.where(np.isnan(cols.cost), priced, cols.cost)
