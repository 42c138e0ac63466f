"""The exact layer: one GET of the answer stored under a request's SHA-256."""

from __future__ import annotations

import json
from typing import Any

from chat.response_cache.keys import CachedAnswer, CacheScope, _exact_member, _prefix
from chat.response_cache.metrics import LOOKUPS
from chat.response_cache.settings import resolved_settings


def answer_from_payload(payload: bytes | str, *, layer: str, similarity: float | None) -> CachedAnswer:
    data = json.loads(payload)
    return CachedAnswer(
        text=data["text"],
        citations=data["citations"],
        usage=data["usage"],
        layer=layer,
        question=data["question"],
        similarity=similarity,
    )


def exact_entry_key(scope: CacheScope, *, exact: str, cache_settings: dict[str, Any]) -> str | None:
    """The exact layer's key for a request, for a caller that GETs it in a round trip of its own
    making (the door's admission, chat.turn_core); None when the bot's cache is off."""
    if not resolved_settings(cache_settings)["enabled"]:
        return None
    return _prefix(scope.schema_name) + _exact_member(exact)


def exact_answer(scope: CacheScope, payload: bytes | None) -> CachedAnswer | None:
    """The answer an ``exact_entry_key`` GET found (counted as a hit), or None."""
    if payload is None:
        return None
    LOOKUPS.labels(scope.schema_name, "exact", "hit").inc()
    return answer_from_payload(payload, layer="exact", similarity=None)
