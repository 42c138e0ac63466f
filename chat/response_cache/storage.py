"""Storing answers: both layers' entries, the tenant's expiry index, caps and eviction in one script."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from django.conf import settings

from chat.response_cache.embeddings import question_vector
from chat.response_cache.keys import (
    CacheScope,
    _entry_id,
    _exact_member,
    _index_key,
    _prefix,
    _semantic_member,
    canonical_json,
)
from chat.response_cache.metrics import STORES
from chat.response_cache.semantic import is_semantic
from chat.response_cache.settings import (
    EXPIRED_DROPPED_PER_STORE,
    MAX_ENTRIES_PER_SCOPE_DEFAULT,
    MAX_ENTRIES_PER_TENANT_DEFAULT,
    resolved_settings,
)
from tenants.redis import get_loop_redis, lua_source

# Adds an entry to the tenant's index (and its scope's), then drops expired entries and evicts the
# soonest to expire past the caps (the oldest, among entries of one TTL), atomically. Members:
# 'x:<digest>' (an exact entry, key prefix..member) or 's:<scope>|<entry>' (a semantic entry in the
# hashes prefix..scope..':v' / ':a' / ':i', its generation token ':g' renewed). The script
# derives those keys from its arguments, all under one tenant's prefix: fine on a single Redis; a
# cluster would need the schema as a hash tag.
# Scores are expiry times in microseconds (exact in a double until the year 2255).
# KEYS[1]: tenant index. ARGV: prefix, now_us, tenant cap, scope cap, member, expires_us, ttl_s
# (for the index keys), expired-drop limit, a new generation token for the scopes it drops from.
_STORE_SCRIPT = lua_source("chat/lua/cache_store.lua")


def _store_script(redis: aioredis.Redis) -> Any:
    # Registered per call (a SHA-1 of the text, microseconds): a script object keeps its client,
    # and clients are per event loop.
    return redis.register_script(_STORE_SCRIPT)


def _tenant_cap() -> int:
    return int(getattr(settings, "PARLEY_CACHE_MAX_ENTRIES_PER_TENANT", MAX_ENTRIES_PER_TENANT_DEFAULT))


def _scope_cap() -> int:
    return int(getattr(settings, "PARLEY_CACHE_MAX_ENTRIES_PER_SCOPE", MAX_ENTRIES_PER_SCOPE_DEFAULT))


async def cache_store(
    scope: CacheScope,
    *,
    exact: str,
    question: str | None,
    text: str,
    citations: list[dict],
    usage: dict,
    cache_settings: dict[str, Any],
    redis: aioredis.Redis | None = None,
) -> None:
    """Store an answer under its exact key and, when ``question`` is given, in the semantic layer.

    The caller stores only complete answers to requests that :func:`is_cacheable` admitted;
    a bot with caching off stores nothing here regardless, and an empty answer is not stored.
    """
    resolved = resolved_settings(cache_settings)
    if not resolved["enabled"] or not text:
        return
    redis = redis or get_loop_redis()
    prefix = _prefix(scope.schema_name)
    ttl = int(resolved["ttl_seconds"])
    now = time.time()
    expires_at = now + ttl
    entry_question = question if question is not None else ""
    payload = canonical_json(
        {
            "text": text,
            "citations": citations,
            "usage": usage,
            "question": entry_question,
            "stored_at": round(now, 3),
            "expires_at": round(expires_at, 3),
        }
    )
    script = _store_script(redis)
    now_us, expires_us = int(now * 1e6), int(expires_at * 1e6)
    common = [prefix, now_us, _tenant_cap(), _scope_cap()]
    member = _exact_member(exact)
    await redis.set(prefix + member, payload, ex=ttl)
    await script(
        keys=[_index_key(scope.schema_name)],
        args=[*common, member, expires_us, ttl, EXPIRED_DROPPED_PER_STORE, uuid.uuid4().hex],
    )
    STORES.labels(scope.schema_name, "exact").inc()
    if question is None or not is_semantic(question, resolved):
        return
    vector = await asyncio.to_thread(question_vector, question)
    scope_member = _semantic_member(scope)
    scope_key = prefix + scope_member
    entry = _entry_id(question)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(scope_key + ":v", mapping={entry: vector.astype(np.float32).tobytes()})
        pipe.hset(scope_key + ":a", entry, payload)
        pipe.set(scope_key + ":g", uuid.uuid4().hex)
        for suffix in (":v", ":a", ":g"):
            pipe.expire(scope_key + suffix, ttl, gt=True)
            pipe.expire(scope_key + suffix, ttl, nx=True)
        await pipe.execute()
    await script(
        keys=[_index_key(scope.schema_name)],
        args=[*common, f"{scope_member}|{entry}", expires_us, ttl, EXPIRED_DROPPED_PER_STORE, uuid.uuid4().hex],
    )
    STORES.labels(scope.schema_name, "semantic").inc()
