"""Model names as users send them, turned into the names a price table knows.

The same model arrives as `claude-sonnet-4-5`, `anthropic/claude-sonnet-4-5-20250929`,
`us.anthropic.claude-sonnet-4-5-20250929-v1:0` (Bedrock, cross-region), an inference
profile ARN, or `claude-sonnet-4-5@20250929` (Vertex). `candidates` lists, in the order
docs/records.md documents, the spellings to look up and how each was derived, so the
price API can say why a name got the price it got.
"""

from __future__ import annotations

import re
from typing import Container, Iterator

# Provider names as records send them (ours, OpenTelemetry's gen_ai.provider.name, LiteLLM's)
# mapped onto the key prefixes of LiteLLM's cost map.
PROVIDER_ALIASES = {
    "vertex": "vertex_ai", "vertexai": "vertex_ai", "google_vertex": "vertex_ai", "gcp.vertex_ai": "vertex_ai",
    "google": "gemini", "google_ai_studio": "gemini", "gcp.gemini": "gemini", "gcp.gen_ai": "gemini",
    "aws.bedrock": "bedrock", "aws_bedrock": "bedrock", "amazon_bedrock": "bedrock", "bedrock_converse": "bedrock",
    "azure_openai": "azure", "azure-openai": "azure", "azure.ai.openai": "azure",
    "azure.ai.inference": "azure_ai", "together": "together_ai", "fireworks": "fireworks_ai",
    "mistral_ai": "mistral", "mistralai": "mistral", "x_ai": "xai", "x.ai": "xai", "grok": "xai",
    "ibm.watsonx.ai": "watsonx", "text-completion-openai": "openai", "cohere_chat": "cohere",
}
# Where else a provider's models may be listed (Gemini models are also sold on Vertex).
RELATED = {"gemini": ("vertex_ai",), "vertex_ai": ("gemini",)}
# Bedrock: cross-region inference profiles prefix the model id with a geography.
_BEDROCK_GEO = re.compile(r"^(us|eu|apac|ap|global|us-gov|jp|au|ca)\.(?=[a-z0-9-]+\.)")
_BEDROCK_REGION = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d/")
_BEDROCK_VERSION = re.compile(r"(-v\d+(:\d+)?|:\d+)$")
_BEDROCK_VENDOR = re.compile(r"^(anthropic|meta|amazon|mistral|cohere|ai21|deepseek|qwen|openai|writer|moonshot|"
                             r"google|minimax|nvidia|twelvelabs|stability)\.")
# What may follow a priced name for a model to share its price: dates, build numbers of
# three or more digits, versions and "latest" (gpt-4o-2024-08-06, claude-3-5-sonnet-20241022,
# gemini-1.5-pro-002, claude-sonnet-4@20250514, mistral-large-2411). Anything else ("-pro",
# "-mini", ".5-preview", and short numbers: claude-opus-4-5 is not claude-opus-4) is a
# different model with a different price.
SNAPSHOT_SUFFIX = re.compile(r"^([-@](\d{3,}(-\d{2}){0,2}|latest|v\d+(:\d+)?)|:\d+)+$")


def canonical_provider(provider: str) -> str:
    p = (provider or "").strip().lower()
    if p.startswith("vertex_ai-"):      # LiteLLM's vertex_ai-language-models and the like
        return "vertex_ai"
    return PROVIDER_ALIASES.get(p, p)


def namespaces(provider: str, known: frozenset[str] | set[str]) -> tuple[str, ...]:
    """Key prefixes to try for a provider, its own first."""
    p = canonical_provider(provider)
    return tuple(ns for ns in (p, *RELATED.get(p, ())) if ns in known)


def candidates(provider: str, model: str, known: frozenset[str] | set[str]) -> Iterator[tuple[str, str]]:
    """(key to look up, how it was derived) in order of preference, without repeats.

    For every spelling of the name, the provider's own listing (`azure/gpt-4o`) comes before
    the provider-neutral name (`gpt-4o`)."""
    seen: set[str] = set()
    for name, how, prov in _spellings(provider, model, known):
        for ns in namespaces(prov, known):
            key = f"{ns}/{name}"
            if key not in seen:
                seen.add(key)
                yield key, how + (f"; listed under {ns}/" if how else f"listed under {ns}/")
        if name not in seen:
            seen.add(name)
            yield name, how or "as sent"


def _spellings(provider: str, model: str, known: frozenset[str] | set[str]) -> Iterator[tuple[str, str, str]]:
    """(name, how, provider) for the name as sent and each normalised form of it."""
    name, prov = model.strip().lower(), provider
    yield name, "", prov
    first, _, rest = name.partition("/")
    if rest and canonical_provider(first) in known | {"openai", "anthropic"}:
        name, prov = rest, first
        yield name, f"provider prefix {first}/ read as the provider", prov
    if name.startswith("models/"):       # the Gemini API's resource names
        name = name.removeprefix("models/")
        yield name, "models/ removed", prov
    if name.startswith("arn:") and "/" in name:     # a Bedrock model or inference-profile ARN
        name = name.rsplit("/", 1)[1]
        yield name, "ARN reduced to its model id", prov
    if _BEDROCK_REGION.match(name):
        name = name.split("/", 1)[1]
        yield name, "AWS region removed", prov
    if _BEDROCK_GEO.match(name):
        name = _BEDROCK_GEO.sub("", name)
        yield name, "cross-region prefix removed", prov
    if _BEDROCK_VENDOR.match(name) and _BEDROCK_VERSION.search(name):
        name = _BEDROCK_VERSION.sub("", name)
        yield name, "Bedrock version suffix removed", prov
    if _BEDROCK_VENDOR.match(name) and canonical_provider(prov) == "bedrock":
        name = _BEDROCK_VENDOR.sub("", name)
        yield name, "Bedrock vendor prefix removed", prov
    if "@" in name:                      # Vertex: claude-sonnet-4-5@20250929
        yield name.replace("@", "-"), "Vertex @version read as -version", prov
        name = name.split("@", 1)[0]
        yield name, "Vertex @version removed", prov
    if name.startswith("ft:") and name.count(":") > 1:   # ft:gpt-4o-mini-2024-07-18:org::id
        yield "ft:" + name.split(":")[1], "fine-tuned model priced as fine-tuning of its base", prov


def snapshot_of(name: str, keys: Container[str]) -> str | None:
    """The longest key that `name` extends by a date, build number or version only."""
    for i in range(len(name) - 1, 0, -1):
        if name[:i] in keys and SNAPSHOT_SUFFIX.match(name[i:]):
            return name[:i]
    return None
