"""Price look-up: dated snapshots share their family's price; other variants stay unpriced."""

from __future__ import annotations

import pytest

from exporter.prices import PriceError, PriceTable


@pytest.mark.parametrize("model, family", [
    ("gpt-4o-2024-08-06", "gpt-4o"), ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"), ("claude-sonnet-4@20250514", "claude-sonnet-4"),
    ("gemini-1.5-pro-002", "gemini-1.5-pro"), ("openai/gpt-4o-mini", "gpt-4o-mini"), ("gpt-4o-latest", "gpt-4o"),
])
def test_snapshots_find_their_family(model: str, family: str) -> None:
    table = PriceTable()
    assert table.lookup(model) is not None
    assert (table.lookup(model) == table.lookup(family)).all()


@pytest.mark.parametrize("model", ["o1-pro", "o3-pro", "gpt-4.5-preview", "gpt-4o-audio-preview", "my-finetune"])
def test_other_variants_are_not_priced_as_their_prefix(model: str) -> None:
    assert PriceTable().lookup(model) is None


def test_config_prices_extend_the_table_and_bad_ones_name_the_key() -> None:
    table = PriceTable({"o1-pro": {"input": 150, "output": 600}})
    assert table.lookup("o1-pro-2025-03-19")[:2].tolist() == pytest.approx([150e-6, 600e-6])
    with pytest.raises(PriceError, match="prices.x: needs input and output"):
        PriceTable({"x": {"input": 1}})
