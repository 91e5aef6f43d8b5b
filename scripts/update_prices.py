#!/usr/bin/env python3
"""Regenerate exporter/data/litellm_prices.json from the installed `litellm` package.

    pip install -U litellm && python scripts/update_prices.py

LiteLLM ships its model cost map (`model_prices_and_context_window_backup.json`, MIT
licence) inside the package and refreshes it with every release. We keep an extract of
it: the chat, completion, responses and embedding models that have token prices, with
only the fields the exporter prices from (token prices, their long-context, service-tier
and batch variants, cache-write prices by lifetime, tiered tables), the provider and the
mode. The exporter reads the extract at start-up and never imports litellm.

The file is read, not imported: importing litellm would try to download the newest map.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

SOURCE_FILE = "model_prices_and_context_window_backup.json"
MODES = {"chat", "completion", "responses", "embedding"}
# Price fields the exporter uses: a base price, optionally a cache lifetime, a
# long-context threshold, and a service tier or batch suffix.
FIELD = re.compile(r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
                   r"|cache_creation_input_token_cost|output_cost_per_reasoning_token)"
                   r"(_above_1hr)?(_above_\d+k?_tokens)?(_flex|_priority|_batches)?$")
KEEP = {"litellm_provider", "mode", "tiered_pricing"}
TIER_FIELDS = {"range", "input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
               "cache_creation_input_token_cost", "output_cost_per_reasoning_token"}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "exporter" / "data" / "litellm_prices.json"


def source_path() -> Path:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("litellm is not installed: pip install litellm")
    return Path(list(spec.submodule_search_locations)[0]) / SOURCE_FILE


def licence_text() -> str:
    dist = importlib.metadata.distribution("litellm")
    for f in dist.files or []:
        if f.name.upper().startswith("LICENSE"):
            text = Path(str(dist.locate_file(f))).read_text()
            start = text.find("MIT License")
            return text[start:].strip() if start >= 0 else text.strip()
    return "MIT License, Copyright (c) 2023 Berri AI"


def extract(cost_map: dict) -> dict[str, dict]:
    """The entries and fields we price from, with the source's own names and values."""
    out: dict[str, dict] = {}
    for key, entry in cost_map.items():
        if not isinstance(entry, dict) or entry.get("mode") not in MODES:
            continue
        if not isinstance(entry.get("input_cost_per_token"), (int, float)):
            continue
        kept = {k: v for k, v in entry.items()
                if (k in KEEP or FIELD.match(k)) and v is not None}
        if "tiered_pricing" in kept:
            kept["tiered_pricing"] = [{k: v for k, v in t.items() if k in TIER_FIELDS}
                                      for t in kept["tiered_pricing"] if isinstance(t, dict)]
        out[key] = kept
    return out


def render(meta: dict, models: dict[str, dict]) -> str:
    """One model per line, sorted, so that a regeneration reads as a small diff."""
    lines = ["{", f'"_meta": {json.dumps(meta, sort_keys=True)},', '"models": {']
    items = sorted(models.items())
    for i, (k, v) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        lines.append(f"{json.dumps(k)}: {json.dumps(v, sort_keys=True, separators=(',', ':'))}{comma}")
    lines += ["}", "}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    src = source_path()
    models = extract(json.loads(src.read_text()))
    version = importlib.metadata.version("litellm")
    meta = {
        "source": f"litellm {version}, {SOURCE_FILE}",
        "litellm_version": version,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "generator": "scripts/update_prices.py",
        "units": "USD per token; field names and values as in the source",
        "license": "MIT",
        "license_notice": licence_text(),
        "models": len(models),
    }
    args.out.write_text(render(meta, models))
    print(f"{args.out}: {len(models)} models from litellm {version}")


if __name__ == "__main__":
    main()
