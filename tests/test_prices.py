"""The price table: name resolution across spellings, tiers and long-context bands,
config overrides and aliases, unknown stays unknown, the price API and status page, and
the generated price file against its source."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from helpers import T0, engine_at, rec, settings_for, value

from exporter.web.app import create_app
from exporter.ingest.batch import parse_batch
from exporter.engine import Engine
from exporter.ingest.price_rates import COLUMNS
from exporter.ingest.prices import PriceError, PriceTable, litellm_map

ROOT = Path(__file__).resolve().parent.parent
M = 1e-6      # USD per million tokens -> per token


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable()


def cost(table: PriceTable, **fields: Any) -> float:
    cols, rejected, _ = parse_batch([{"provider": "openai", **fields}], 0.0)
    assert not rejected, rejected
    return float(table.costs(cols)[0])


# --- name resolution ----------------------------------------------------------------------

@pytest.mark.parametrize("provider, model, entry", [
    ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5"),
    ("anthropic", "anthropic/claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929"),
    ("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    ("bedrock", "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4-5-20250929-v1:0",
     "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
    ("aws.bedrock", "bedrock/us-west-2/anthropic.claude-3-5-sonnet-20241022-v2:0", "anthropic.claude-3-5-sonnet-20241022-v2:0"),
    ("vertex", "claude-sonnet-4-5@20250929", "vertex_ai/claude-sonnet-4-5@20250929"),
    ("google", "gemini-2.5-pro", "gemini/gemini-2.5-pro"),
    ("gcp.gemini", "models/gemini-2.5-flash", "gemini/gemini-2.5-flash"),
    ("vertex_ai", "gemini-2.5-pro", "gemini-2.5-pro"),
    ("azure", "gpt-4o", "azure/gpt-4o"),
    ("openai", "gpt-4o", "gpt-4o"),
    ("openai", "openai/gpt-4.1", "gpt-4.1"),
    ("openai", "gpt-4o-2031-01-01", "gpt-4o"),                     # a snapshot the map does not list yet
    ("openai", "ft:gpt-4o-mini-2024-07-18:acme::a1b2", "ft:gpt-4o-mini-2024-07-18"),
    ("together", "meta-llama/Llama-3.2-3B-Instruct", "together_ai/meta-llama/llama-3.2-3b-instruct"),
])
def test_spellings_resolve_to_the_entry(table: PriceTable, provider: str, model: str, entry: str) -> None:
    found = table.resolve(provider, model)
    assert found.key == entry, found
    assert found.source == "litellm"


def test_the_resolution_says_how(table: PriceTable) -> None:
    found = table.resolve("bedrock", "arn:aws:bedrock:eu-west-1:1:inference-profile/eu.anthropic.claude-3-7-sonnet-20250219-v1:0")
    assert found.key == "eu.anthropic.claude-3-7-sonnet-20250219-v1:0"
    assert "ARN" in found.how
    assert "dated snapshot of gpt-4o" in table.resolve("openai", "gpt-4o-2031-01-01").how


@pytest.mark.parametrize("model, entry", [
    ("claude-sonnet-4@20250514", "claude-sonnet-4"), ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
    ("gemini-1.5-pro-002", "gemini-1.5-pro"), ("anthropic.claude-3-haiku-20240307-v1:0", "claude-3-haiku"),
    ("claude-opus-4-5", "claude-opus-4-5"),        # a new version, not a snapshot of claude-opus-4
])
def test_retired_models_come_from_the_hand_kept_table(table: PriceTable, model: str, entry: str) -> None:
    found = table.resolve("bedrock" if model.startswith("anthropic.") else "anthropic", model)
    assert found.key == entry, found


@pytest.mark.parametrize("model", ["o1-pro-xl", "gpt-4o-audio-preview-foo", "my-finetune", "qwen"])
def test_other_variants_and_unknown_names_stay_unpriced(table: PriceTable, model: str) -> None:
    assert table.lookup(model, "vllm") is None


def test_the_hand_kept_table_only_fills_gaps_of_the_map() -> None:
    """Every shipped hand-kept entry is a name the map cannot price."""
    table = PriceTable()
    from exporter.ingest.prices import load_shipped
    for name in load_shipped():
        found = table.resolve("", name)
        assert found.source == "shipped", (name, found.key)


# --- tiers, bands, cache lifetimes ----------------------------------------------------------

def test_long_context_prices_follow_the_whole_input(table: PriceTable) -> None:
    """Gemini 2.5 Pro: input of more than 200k tokens (cached or not) is billed at the higher prices."""
    base = dict(provider="gemini", model="gemini-2.5-pro", output_tokens=1000)
    assert cost(table, **base, input_tokens=200_000) == pytest.approx(200_000 * 1.25 * M + 1000 * 10 * M)
    assert cost(table, **base, input_tokens=200_001) == pytest.approx(200_001 * 2.5 * M + 1000 * 15 * M)
    above_by_cache = cost(table, **base, input_tokens=1, cache_read_tokens=200_000)
    assert above_by_cache == pytest.approx(1 * 2.5 * M + 200_000 * 0.25 * M + 1000 * 15 * M)


def test_xai_long_context_starts_at_the_threshold(table: PriceTable) -> None:
    rates = table.lookup("xai/grok-4.20", "xai")
    assert rates is not None and rates.inclusive and rates.thresholds
    at = int(rates.thresholds[0])
    assert rates.table[0, 1, 0] != rates.table[0, 0, 0]
    got = cost(table, provider="xai", model="xai/grok-4.20", input_tokens=at)
    assert got == pytest.approx(at * rates.table[0, 1, 0])


def test_service_tiers_and_batch(table: PriceTable) -> None:
    base = dict(model="gpt-5", input_tokens=1_000_000, output_tokens=1_000_000)
    standard = cost(table, **base)
    assert standard == pytest.approx(1.25 + 10.0)
    assert cost(table, **base, service_tier="default") == standard
    assert cost(table, **base, service_tier="auto") == standard
    assert cost(table, **base, service_tier="flex") == pytest.approx((1.25 + 10.0) / 2)
    assert cost(table, **base, service_tier="priority") == pytest.approx(2.5 + 20.0)
    assert cost(table, **base, batch=True) == pytest.approx((1.25 + 10.0) / 2)
    # Anthropic reports batch use as usage.service_tier = "batch"
    assert cost(table, provider="anthropic", model="claude-sonnet-4-5", input_tokens=10**6, service_tier="batch") \
        == pytest.approx(1.5)


def test_an_unknown_service_tier_is_unpriced_not_guessed() -> None:
    table = PriceTable()
    assert np.isnan(cost(table, model="gpt-5", input_tokens=10, service_tier="turbo"))
    seen = table.unpriced_seen()["models"]
    assert seen == [{"provider": "openai", "model": "gpt-5", "reason": "unknown service_tier 'turbo'", "requests": 1}]


def test_cache_writes_by_lifetime(table: PriceTable) -> None:
    """Claude: five-minute writes at 1.25x input, one-hour writes at 2x input."""
    got = cost(table, provider="anthropic", model="claude-sonnet-4-5", cache_write_tokens=1_000_000,
               cache_write_1h_tokens=400_000)
    assert got == pytest.approx(0.6 * 3.75 + 0.4 * 6.0)


def test_reasoning_tokens_use_their_own_price_where_listed(table: PriceTable) -> None:
    rates = table.lookup("dashscope/qwen-turbo", "dashscope")
    assert rates is not None
    got = cost(table, provider="dashscope", model="dashscope/qwen-turbo", output_tokens=1000, reasoning_tokens=1000)
    assert got == pytest.approx(1000 * 2e-7 + 1000 * 5e-7)


def test_costs_are_one_lookup_per_distinct_name_and_equal_record_by_record() -> None:
    """The vectorised batch equals pricing each record alone; each name is resolved once."""
    rng = np.random.default_rng(3)
    names = [("openai", "gpt-5"), ("gemini", "gemini-2.5-pro"), ("anthropic", "claude-opus-4-1"), ("vllm", "local"),
             ("bedrock", "eu.anthropic.claude-3-7-sonnet-20250219-v1:0"), ("xai", "grok-4.20")]
    items = []
    for i in range(3000):
        p, m = names[i % len(names)]
        w = int(rng.integers(0, 50_000))
        items.append({"provider": p, "model": m, "input_tokens": int(rng.integers(0, 300_000)),
                      "output_tokens": int(rng.integers(0, 5000)), "cache_read_tokens": int(rng.integers(0, 100_000)),
                      "cache_write_tokens": w, "cache_write_1h_tokens": int(rng.integers(0, w + 1)),
                      "reasoning_tokens": int(rng.integers(0, 5000)),
                      "service_tier": [None, "flex", "priority", "default"][i % 4], "batch": bool(i % 7 == 0)})
        if i % 11 == 0:
            items[-1]["cost_usd"] = 0.5
    cols, rejected, _ = parse_batch(items, 0.0)
    assert not rejected
    table = PriceTable()
    together = table.costs(cols)
    assert len(table._resolved) == len(names)
    alone = np.array([table.costs(parse_batch([it], 0.0)[0])[0] for it in items])
    np.testing.assert_allclose(together, alone, rtol=1e-12, atol=0)
    local = np.array([it["model"] == "local" and "cost_usd" not in it for it in items])
    assert np.isnan(together[local]).all() and not np.isnan(together[~local]).any()
    assert (together[[i for i, it in enumerate(items) if "cost_usd" in it]] == 0.5).all()


# --- configuration ------------------------------------------------------------------------

def test_config_prices_override_everything_and_bad_ones_name_the_key() -> None:
    table = PriceTable({"gpt-4o": {"input": 1, "output": 2}, "o1-pro-xl": {"input": 150, "output": 600}})
    assert table.resolve("azure", "gpt-4o").source == "config"
    assert cost(table, model="gpt-4o-2024-08-06", input_tokens=10**6, output_tokens=10**6) == pytest.approx(3.0)
    assert cost(table, model="o1-pro-xl", input_tokens=10**6, batch=True) == pytest.approx(75.0)
    with pytest.raises(PriceError, match="prices.x: needs input and output"):
        PriceTable({"x": {"input": 1}})
    with pytest.raises(PriceError, match=r"prices.y.cache_write_1h: must be a non-negative number"):
        PriceTable({"y": {"input": 1, "output": 1, "cache_write_1h": -1}})


def test_one_model_name_from_two_providers_in_one_batch() -> None:
    table = PriceTable({"azure/gpt-4o": {"input": 5, "output": 20}})
    items = [{"provider": p, "model": "gpt-4o", "input_tokens": 10**6} for p in ("openai", "azure", "openai", "azure")]
    assert table.costs(parse_batch(items, 0.0)[0]).tolist() == pytest.approx([2.5, 5.0, 2.5, 5.0])


def test_price_aliases_map_deployment_names() -> None:
    table = PriceTable(aliases={"prod-gpt4o": "gpt-4o", "azure/eu-mini": "azure/gpt-4o-mini"})
    found = table.resolve("azure", "prod-gpt4o")
    assert found.key == "azure/gpt-4o" and found.how.startswith("price alias prod-gpt4o -> gpt-4o")
    assert table.resolve("azure", "eu-mini").key == "azure/gpt-4o-mini"
    assert table.resolve("openai", "eu-mini").rates is None            # the alias is for Azure only
    with pytest.raises(PriceError, match="price_aliases.bad"):
        PriceTable(aliases={"bad": ""})


# --- unknown stays unknown: metrics, the API and the status page ------------------------------

@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Engine]]:
    settings = settings_for(tmp_path)
    engine, _ = engine_at(settings, T0)
    with TestClient(create_app(settings, engine=engine, background=False)) as client:
        yield client, engine


def test_unpriced_models_count_and_are_listed(api: tuple[TestClient, Engine]) -> None:
    client, engine = api
    body = [rec(T0 - 10, provider="vllm", model="my-local-llama", input_tokens=100),
            rec(T0 - 9, provider="vllm", model="my-local-llama", input_tokens=100),
            rec(T0 - 8, provider="openai", model="gpt-5", input_tokens=10**6, service_tier="flex")]
    assert client.post("/v1/records", json=body).json()["accepted"] == 3
    assert value(engine, "llm_unpriced_requests_total", app="chat", provider="vllm", model="my-local-llama") == 2
    assert value(engine, "llm_cost_usd_total", app="chat", provider="openai", model="gpt-5") \
        == pytest.approx(10**6 * 0.625 * M + 200 * 5 * M)       # flex: half price
    page = client.get("/").text
    assert '<table id="unpriced">' in page and "my-local-llama" in page and "no price for this model" in page
    summary = client.get("/api/prices").json()
    assert summary["unpriced_seen"]["models"][0] == {"provider": "vllm", "model": "my-local-llama",
                                                     "reason": "no price for this model", "requests": 2}
    assert summary["litellm"]["license"] == "MIT" and summary["litellm"]["litellm_version"]


def test_the_unpriced_list_is_bounded() -> None:
    table = PriceTable()
    items = [{"provider": "vllm", "model": f"m{i}", "input_tokens": 1} for i in range(300)]
    table.costs(parse_batch(items, 0.0)[0])
    seen = table.unpriced_seen()
    assert len(seen["models"]) == 100 and seen["requests_of_names_not_listed"] == 200


def test_price_api_shows_the_entry_and_prices(api: tuple[TestClient, Engine]) -> None:
    client, _ = api
    r = client.get("/api/prices", params={"model": "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "provider": "bedrock"})
    assert r.status_code == 200
    got = r.json()
    assert got["priced"] and got["source"] == "litellm" and got["entry"] == "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    prices = got["usd_per_million_tokens"]
    assert set(prices["standard"]) == set(COLUMNS)
    assert prices["standard"]["input"] == pytest.approx(3.3)
    long = client.get("/api/prices", params={"model": "gemini-2.5-pro", "provider": "google"}).json()
    assert long["usd_per_million_tokens"]["long_context"][0]["input_tokens_above"] == 200_000
    missing = client.get("/api/prices", params={"model": "my-deployment", "provider": "azure"})
    assert missing.status_code == 404
    assert missing.json()["priced"] is False and "azure/my-deployment" in missing.json()["looked_up"]
    assert client.get("/api/prices", params={"model": "x" * 201}).status_code == 400


# --- the generated file -------------------------------------------------------------------

def test_price_file_records_its_source_and_licence() -> None:
    meta, models = litellm_map()
    assert meta["license"] == "MIT" and "Berri AI" in meta["license_notice"]
    assert meta["litellm_version"] and meta["generated"] and meta["models"] == len(models) > 3000


@pytest.mark.skipif(importlib.util.find_spec("litellm") is None, reason="litellm not installed")
def test_price_file_is_what_the_script_makes_from_the_installed_litellm(tmp_path: Path) -> None:
    from importlib.metadata import version
    meta, _ = litellm_map()
    if version("litellm") != meta["litellm_version"]:
        pytest.fail(f"the price file was made from litellm {meta['litellm_version']}, installed is {version('litellm')}")
    out = tmp_path / "prices.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "update_prices.py"), "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    made, shipped = orjson.loads(out.read_bytes()), orjson.loads((ROOT / "exporter/data/litellm_prices.json").read_bytes())
    made["_meta"].pop("generated"), shipped["_meta"].pop("generated")
    assert made == shipped
