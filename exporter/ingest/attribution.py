"""Who asked and who served: a record's `app` and `provider`, each by one documented precedence.

**App.** Sources name the calling application in several places. `app_precedence` lists
them in the order they are consulted, and the first one present wins:

- `app`: the record's own `app` field (or its spellings `tenant`, `team`, `service`);
- `requester_metadata`: LiteLLM, the `app` the client put in its request's `metadata`
  (the proxy logs it as `metadata.requester_metadata`);
- `tag`: LiteLLM, the first request tag that starts with `app_tag_prefix` (`app:support-bot`);
- `team_alias`: LiteLLM, the alias of the virtual key's team;
- `key_alias`: LiteLLM, the alias of the virtual key;
- `service_name`: OpenTelemetry, the resource's `service.name` (an OTLP span's, or one posted
  beside GenAI attributes); the SDKs' default `unknown_service…` names no app;
- `header`: the POST's `X-LLM-App` header or `?app=` parameter.

A record none of them names counts under `unknown`. User, end-user, session and request
ids are never an app: they are unbounded. Whatever the source, app values are label values
and go through the label guard (`label_limit_app`).

**Provider.** The record's own field (`provider`, LiteLLM's `custom_llm_provider`, the
GenAI `gen_ai.provider.name`) first; then the POST's `X-LLM-Provider` header or
`?provider=` parameter, which names the backend a client talks to when the object cannot
(an OpenAI-compatible server answers in OpenAI's shape); then the provider the object's
shape implies (a Chat Completion is OpenAI's, a Message Anthropic's); then the
`default_provider` setting. With none of them a record is refused: `provider: is required`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ..codes import is_none

APP_SOURCES: dict[str, str] = {
    "app": "the record's own app field",
    "requester_metadata": "LiteLLM: metadata.requester_metadata.app (the metadata a client sent to the proxy)",
    "tag": "LiteLLM: the first request tag starting with app_tag_prefix",
    "team_alias": "LiteLLM: the virtual key's team alias",
    "key_alias": "LiteLLM: the virtual key's alias",
    "service_name": "OpenTelemetry: the resource's service.name",
    "header": "the POST's X-LLM-App header or ?app= parameter",
}
DEFAULT_APP_PRECEDENCE: tuple[str, ...] = tuple(APP_SOURCES)
DEFAULT_APP_TAG_PREFIX = "app:"


def check_precedence(sources: Sequence[str]) -> tuple[str, ...]:
    """The precedence as a tuple, or ValueError naming an unknown or repeated source."""
    out: list[str] = []
    for s in sources:
        name = s.strip().lower()
        if name not in APP_SOURCES:
            raise ValueError(f"unknown app source {s!r}; the sources are {', '.join(APP_SOURCES)}")
        if name in out:
            raise ValueError(f"app source {name!r} is listed twice")
        out.append(name)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Attribution:
    """The precedence settings, and what one POST says about its records (header, query)."""

    app_precedence: tuple[str, ...] = DEFAULT_APP_PRECEDENCE
    app_tag_prefix: str = DEFAULT_APP_TAG_PREFIX
    default_provider: str | None = None
    request_app: str | None = None
    request_provider: str | None = None

    def for_request(self, app: str | None, provider: str | None) -> "Attribution":
        """The same settings with one POST's header or query values."""
        if app is None and provider is None:
            return self
        return replace(self, request_app=app, request_provider=provider)

    # --- app -----------------------------------------------------------------------------

    def app(self, candidates: Mapping[str, Any]) -> Any:
        """The first app named by the sources in precedence order (None: none is).
        `candidates` maps a source to its value; `tag` holds the record's tag list."""
        for source in self.app_precedence:
            if source == "header":
                v: Any = self.request_app
            elif source == "tag":
                v = self.app_from_tags(candidates.get("tag"))
            else:
                v = candidates.get(source)
            if v is not None and not (isinstance(v, str) and not v.strip()):
                return v
        return None

    def app_from_tags(self, tags: Any) -> str | None:
        """The rest of the first tag that starts with the prefix (`app:bot` → `bot`)."""
        if not isinstance(tags, (list, tuple)) or not self.app_tag_prefix:
            return None
        for tag in tags:
            if isinstance(tag, str) and tag.startswith(self.app_tag_prefix) and tag[len(self.app_tag_prefix):].strip():
                return tag[len(self.app_tag_prefix):].strip()
        return None

    def app_column(self, own: np.ndarray, service: np.ndarray | None = None) -> np.ndarray:
        """The app of records in the columnar path, where only `app`, `service_name` (the
        `service.name` column, None when no record has one) and `header` can name one: each
        record takes the first in precedence order that is present, else `unknown`."""
        columns = {"app": own, "service_name": service}
        out = np.full(len(own), None, dtype=object)
        open_ = np.ones(len(own), dtype=bool)
        for source in self.app_precedence:
            if source == "header":
                if self.request_app is not None:
                    out[open_] = self.request_app
                    open_[:] = False
                continue
            col = columns.get(source)
            if col is None:
                continue
            named = open_ & ~is_none(col)
            out[named] = col[named]
            open_ &= ~named
        out[open_] = "unknown"
        return out

    # --- provider ------------------------------------------------------------------------

    def provider(self, inferred: str | None = None) -> str | None:
        """The provider of a record that names none: the request's, the shape's, the default."""
        return self.request_provider or inferred or self.default_provider

    @property
    def fallback_provider(self) -> str | None:
        """The provider a record in our own format gets when it names none."""
        return self.request_provider or self.default_provider


DEFAULT = Attribution()
