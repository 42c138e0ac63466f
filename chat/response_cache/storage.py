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
from tenants.redis import get_loop_redis

# Adds an entry to the tenant's index (and its scope's), then drops expired entries and evicts the
# soonest to expire past the caps (the oldest, among entries of one TTL), atomically. Members:
# 'x:<digest>' (an exact entry, key prefix..member) or 's:<scope>|<entry>' (a semantic entry in the
# hashes prefix..scope..':v' / ':a' / ':i', its generation token ':g' renewed). The script
# derives those keys from its arguments, all under one tenant's prefix: fine on a single Redis; a
# cluster would need the schema as a hash tag.
# Scores are expiry times in microseconds (exact in a double until the year 2255).
# KEYS[1]: tenant index. ARGV: prefix, now_us, tenant cap, scope cap, member, expires_us, ttl_s
# (for the index keys), expired-drop limit, a new generation token for the scopes it drops from.
_STORE_SCRIPT = """
local index = KEYS[1]
local prefix = ARGV[1]
local now = tonumber(ARGV[2])
local tenant_cap = tonumber(ARGV[3])
local scope_cap = tonumber(ARGV[4])
local member = ARGV[5]
local expires = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local drop_limit = tonumber(ARGV[8])
local generation = ARGV[9]

local function drop(m)
  local bar = string.find(m, '|', 1, true)
  if bar then
    local scope = prefix .. string.sub(m, 1, bar - 1)
    local entry = string.sub(m, bar + 1)
    redis.call('HDEL', scope .. ':v', entry)
    redis.call('HDEL', scope .. ':a', entry)
    redis.call('ZREM', scope .. ':i', entry)
    if redis.call('EXISTS', scope .. ':g') == 1 then
      redis.call('SET', scope .. ':g', generation, 'KEEPTTL')
    end
  else
    redis.call('UNLINK', prefix .. m)
  end
  redis.call('ZREM', index, m)
end

local function extend(key)
  if redis.call('TTL', key) < ttl then
    redis.call('EXPIRE', key, ttl)
  end
end

redis.call('ZADD', index, expires, member)
extend(index)
local evicted = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, drop_limit)) do
  drop(m)
end
local bar = string.find(member, '|', 1, true)
if bar then
  local scope = string.sub(member, 1, bar - 1)
  local scope_index = prefix .. scope .. ':i'
  redis.call('ZADD', scope_index, expires, string.sub(member, bar + 1))
  extend(scope_index)
  local over = redis.call('ZCARD', scope_index) - scope_cap
  if over > 0 then
    for _, entry in ipairs(redis.call('ZRANGE', scope_index, 0, over - 1)) do
      drop(scope .. '|' .. entry)
      evicted = evicted + 1
    end
  end
end
local over = redis.call('ZCARD', index) - tenant_cap
if over > 0 then
  for _, m in ipairs(redis.call('ZRANGE', index, 0, over - 1)) do
    drop(m)
    evicted = evicted + 1
  end
end
return evicted
"""


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
