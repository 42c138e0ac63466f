"""A bot's response-cache settings: defaults, validation, and which requests may be cached."""

from __future__ import annotations

import math
from typing import Any

from tenants.errors import ValidationFailed

SIMILARITY_THRESHOLD_DEFAULT = 0.5  # a gate before verification, which does the real work
SIMILARITY_THRESHOLD_MIN = 0.5
TTL_SECONDS_DEFAULT = 86_400
TTL_SECONDS_MAX = 30 * 86_400
CACHE_SETTINGS_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "semantic": True,
    "similarity_threshold": SIMILARITY_THRESHOLD_DEFAULT,
    "ttl_seconds": TTL_SECONDS_DEFAULT,
    "allow_nondeterministic": False,
    "faq_mode": False,
}
_BOOLEAN_SETTINGS = ("enabled", "semantic", "allow_nondeterministic", "faq_mode")

MAX_ENTRIES_PER_TENANT_DEFAULT = 20_000
# Candidate vectors compared per semantic lookup: 2,000 x 384 float32 is 3 MB (~25 ms to read and
# parse when a scope changed) and ~0.3 ms of numpy; a scope past that keeps its newest questions.
MAX_ENTRIES_PER_SCOPE_DEFAULT = 2_000
SCOPES_CACHED = 32  # scopes whose vectors a process keeps (3 MB each at the scope cap)
SEMANTIC_QUESTION_MAX_CHARS = 500
CANDIDATES_VERIFIED_MAX = 5  # above-threshold candidates verified, best first
EXPIRED_DROPPED_PER_STORE = 100  # bounds one store's script; expired entries also fail lookups


def cache_settings_validate(value: Any) -> dict[str, Any]:
    """A bot's ``cache`` settings, normalised with defaults; raises ValidationFailed on bad input.

    ``{"enabled": true, "semantic": true, "similarity_threshold": 0.5, "ttl_seconds": 86400,
    "allow_nondeterministic": false, "faq_mode": false}``
    """
    if not isinstance(value, dict):
        raise ValidationFailed("cache must be an object.", param="cache")
    for name in value:
        if name not in CACHE_SETTINGS_DEFAULTS:
            raise ValidationFailed(f"Unknown cache setting {name!r}.", param=f"cache.{name}")
    cleaned = {**CACHE_SETTINGS_DEFAULTS, **value}
    for name in _BOOLEAN_SETTINGS:
        if not isinstance(cleaned[name], bool):
            raise ValidationFailed(f"cache.{name} must be true or false.", param=f"cache.{name}")
    threshold = cleaned["similarity_threshold"]
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not math.isfinite(threshold)
        or not SIMILARITY_THRESHOLD_MIN <= threshold <= 1.0
    ):
        raise ValidationFailed(
            f"cache.similarity_threshold must be a number from {SIMILARITY_THRESHOLD_MIN} to 1.0.",
            param="cache.similarity_threshold",
        )
    cleaned["similarity_threshold"] = float(threshold)
    ttl = cleaned["ttl_seconds"]
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= TTL_SECONDS_MAX:
        raise ValidationFailed(
            f"cache.ttl_seconds must be an integer from 1 to {TTL_SECONDS_MAX}.", param="cache.ttl_seconds"
        )
    return cleaned


def resolved_settings(cache_settings: dict[str, Any]) -> dict[str, Any]:
    return {**CACHE_SETTINGS_DEFAULTS, **cache_settings}


def is_cacheable(generation: dict[str, Any], *, cache_settings: dict[str, Any]) -> bool:
    """Whether answers to a request with these generation parameters may be cached.

    Deterministic settings only: ``temperature`` 0 (greedy decoding), or a ``seed`` (the provider
    samples reproducibly). An absent temperature means the provider's default, usually 1.0, so it
    is not deterministic. A bot opts in to caching anything with ``allow_nondeterministic``; a bot
    with ``enabled`` false never caches.
    """
    resolved = resolved_settings(cache_settings)
    if not resolved["enabled"]:
        return False
    if resolved["allow_nondeterministic"]:
        return True
    temperature = generation.get("temperature")
    return (temperature is not None and temperature <= 0.0) or generation.get("seed") is not None
