"""Looking an answer up: the exact layer, then (for a standalone question) the semantic layer."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from chat.response_cache.exact import answer_from_payload
from chat.response_cache.keys import CachedAnswer, CacheScope, _exact_member, _prefix, _semantic_member
from chat.response_cache.metrics import LOOKUPS
from chat.response_cache.semantic import is_semantic, semantic_lookup
from chat.response_cache.settings import resolved_settings
from tenants.redis import get_loop_redis


async def cache_lookup(
    scope: CacheScope,
    *,
    exact: str,
    question: str | None,
    cache_settings: dict[str, Any],
    redis: aioredis.Redis | None = None,
) -> CachedAnswer | None:
    """The cached answer to this request, or None.

    The exact layer first; then, only when ``question`` is given (a first turn, or a bot in FAQ
    mode: the engine decides) and the bot keeps ``semantic`` on, the semantic layer. The caller
    checks :func:`is_cacheable` first; a bot with caching off gets None here regardless.
    """
    resolved = resolved_settings(cache_settings)
    if not resolved["enabled"]:
        return None
    redis = redis or get_loop_redis()
    prefix = _prefix(scope.schema_name)
    exact_redis_key = prefix + _exact_member(exact)
    is_semantic_lookup = is_semantic(question, resolved)
    scope_key = prefix + _semantic_member(scope)
    if is_semantic_lookup:
        # One round trip for both: the exact entry, and whether the scope holds anything (and
        # which generation of it, to reuse this process's copy of its vectors).
        payload, generation = await redis.mget(exact_redis_key, scope_key + ":g")
    else:
        payload, generation = await redis.get(exact_redis_key), None
    LOOKUPS.labels(scope.schema_name, "exact", "miss" if payload is None else "hit").inc()
    if payload is not None:
        return answer_from_payload(payload, layer="exact", similarity=None)
    if not is_semantic_lookup or question is None:
        return None
    answer, outcome = None, "miss"
    if generation is not None:
        answer, outcome = await semantic_lookup(
            redis, scope_key, generation, question, threshold=resolved["similarity_threshold"]
        )
    LOOKUPS.labels(scope.schema_name, "semantic", outcome).inc()
    return answer
