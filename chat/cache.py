"""The response cache: an exact layer and a semantic layer, both in Redis, both per tenant.

**Exact.** A SHA-256 over the normalised request (tenant, bot, bot version, knowledge signature,
system prompt, the history the model would see, the user message, generation parameters) names
one stored answer: one GET, sub-millisecond.

**Semantic.** For turns whose answer does not depend on earlier turns (a first turn, or a bot in
FAQ mode) the engine also passes the question. Its embedding (all-MiniLM-L6-v2, the bundled
local model) is compared with the questions answered before in the same scope (tenant, bot, bot
version, knowledge signature, generation parameters); candidates above the bot's similarity
threshold are then *verified* before one counts as a hit. Cosine similarity alone serves wrong
answers: the model scores "How do I cancel my subscription?" / "How do I pause my subscription?"
at 0.80, above the true paraphrases "How can I terminate my membership?" (0.71) and "I want to
stop my plan, how?" (0.43). The verification (:func:`paraphrase_rejection`) compares what the two
questions *say*, and rejects rather than guesses:

- negation, numbers and the kind of question must agree ("why was I charged" / "why was I not
  charged"; "5 users" / "50 users"; "where is my refund" / "how do I get a refund"), and so must
  which word a number counts ("one license on two devices" / "two licenses on one device") and
  which word a relation word governs ("ship to Canada" / "ship from Canada", "annually instead
  of monthly" / "monthly instead of annually");
- the content words (stop words and fillers dropped, lightly stemmed, support-domain synonyms
  folded together: plan/subscription/membership, cancel/stop/terminate, turn on/enable, …) must
  be the same. A word found in one question only must pair with a word of the other that the
  model places very close on its own (>= ``WORD_SIMILARITY_MIN``) and that is not a known
  opposite (enable/disable, add/remove, log in/log out, and any un-/dis-/de-/re- prefixed form);
  a substitution with no such partner rejects ("student discount" / "teacher discount"). A word
  on one side only, unpaired, rejects too ("disable notifications" / "turn off email
  notifications"), except one word naming the setting every support question is asked in (the
  app, the account, the plan, availability: ``_CONTEXT_WORDS``).

Measured on the pair set in ``tests/perf/semantic_cache_pairs.jsonl`` (tests/perf/RESULTS.md):
no near-miss question served another's answer, pair by pair or among all the set's questions in
one scope, while about 40% of paraphrases hit (half of those the rules were tuned on, a quarter
of the held-out ones); cosine alone serves a wrong answer to 19% of near-misses at 0.92 and still
catches almost no paraphrase. What the rules miss are paraphrases that share few words.

**Storage.** Everything lives under the tenant's Redis prefix (``t:<schema>:cache:``), so two
tenants never share an entry and deleting a tenant purges its cache. Semantic entries of a scope
are three hashes/sorted sets (vectors as packed float32, answers as JSON, an expiry index); a
per-tenant sorted set indexes every entry of both layers by expiry time, so a store can drop
expired entries and evict the oldest past ``PARLEY_CACHE_MAX_ENTRIES_PER_TENANT`` (and a scope's
past ``PARLEY_CACHE_MAX_ENTRIES_PER_SCOPE``) in the same atomic script. Redis 7.0 has no
per-field TTL, so entries carry their own expiry and the keys holding them expire when their
scope goes idle. A process keeps the vectors of the scopes it looked up lately, valid while the
scope's generation token is unchanged, so a lookup reads one small key instead of every vector.

**Determinism.** Only requests whose answer is reproducible are cached (:func:`is_cacheable`),
unless the bot opts in with ``allow_nondeterministic``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from django.conf import settings
from prometheus_client import Counter

from tenants.errors import ValidationFailed
from tenants.redis import get_loop_redis, tenant_key

# --- settings ----------------------------------------------------------------------------------

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

SEMANTIC_EMBEDDER = {"kind": "local"}  # the verification's thresholds were measured on this model
EMBEDDING_DIMENSIONS = 384
QUESTION_VECTORS_CACHED = 1024  # per process: a lookup's miss is followed by a store of the same question
WORD_VECTORS_CACHED = 8192  # per process: ~12 MB; a support bot's vocabulary is far smaller

LOOKUPS = Counter(
    "parley_cache_lookups",
    "Response cache lookups by layer (exact, semantic) and outcome (hit, miss; semantic also "
    "rejected: candidates above the threshold all failed verification).",
    ["tenant", "layer", "outcome"],
)
STORES = Counter("parley_cache_stores", "Answers stored in the response cache, by layer.", ["tenant", "layer"])


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


def _resolved(cache_settings: dict[str, Any]) -> dict[str, Any]:
    return {**CACHE_SETTINGS_DEFAULTS, **cache_settings}


def is_cacheable(generation: dict[str, Any], *, cache_settings: dict[str, Any]) -> bool:
    """Whether answers to a request with these generation parameters may be cached.

    Deterministic settings only: ``temperature`` 0 (greedy decoding), or a ``seed`` (the provider
    samples reproducibly). An absent temperature means the provider's default, usually 1.0, so it
    is not deterministic. A bot opts in to caching anything with ``allow_nondeterministic``; a bot
    with ``enabled`` false never caches.
    """
    resolved = _resolved(cache_settings)
    if not resolved["enabled"]:
        return False
    if resolved["allow_nondeterministic"]:
        return True
    temperature = generation.get("temperature")
    return (temperature is not None and temperature <= 0.0) or generation.get("seed") is not None


# --- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheScope:
    """What makes two answers comparable. Answers are never shared across scopes."""

    schema_name: str
    bot_id: int
    bot_version: int
    knowledge_signature: str  # sorted "kb_id:version" pairs of the bot's knowledge bases
    # What else shapes an answer besides the question, for the semantic layer (the exact key
    # covers it by itself): generation_digest() of the request's generation parameters.
    generation_signature: str = ""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    text: str
    citations: list[dict]
    usage: dict  # prompt_tokens, completion_tokens, provider, model, finish_reason
    layer: str  # "exact" | "semantic"
    question: str  # the cached question (for semantic: the one first asked)
    similarity: float | None = None


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def generation_digest(generation: dict[str, Any]) -> str:
    """A short digest of generation parameters, for ``CacheScope.generation_signature``."""
    return hashlib.sha256(_canonical_json(generation).encode()).hexdigest()[:16]


def exact_key(
    scope: CacheScope, *, system_prompt: str, history: list[dict], user_message: str, generation: dict
) -> str:
    """SHA-256 (hex) of the canonical JSON of everything that determines an answer."""
    request = {
        "schema": scope.schema_name,
        "bot": scope.bot_id,
        "bot_version": scope.bot_version,
        "knowledge": scope.knowledge_signature,
        "system": system_prompt,
        "history": [{"role": message["role"], "content": message["content"]} for message in history],
        "user": user_message,
        "generation": generation,
    }
    return hashlib.sha256(_canonical_json(request).encode()).hexdigest()


def _prefix(schema_name: str) -> str:
    return tenant_key(schema_name, "cache", "")


def _index_key(schema_name: str) -> str:
    return tenant_key(schema_name, "cache", "index")


def _exact_member(digest: str) -> str:
    return f"x:{digest}"


def _semantic_member(scope: CacheScope) -> str:
    """The scope's part of its keys: readable ids, then a digest of the rest (any length)."""
    rest = f"{scope.knowledge_signature}\x00{scope.generation_signature}\x00{_embedder().key}"
    return f"s:{scope.bot_id}:{scope.bot_version}:{hashlib.sha256(rest.encode()).hexdigest()[:16]}"


def _entry_id(question: str) -> str:
    return hashlib.sha256(" ".join(question.split()).lower().encode()).hexdigest()[:16]


# --- storage -----------------------------------------------------------------------------------

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


def _answer(payload: bytes | str, *, layer: str, similarity: float | None) -> CachedAnswer:
    data = json.loads(payload)
    return CachedAnswer(
        text=data["text"],
        citations=data["citations"],
        usage=data["usage"],
        layer=layer,
        question=data["question"],
        similarity=similarity,
    )


def _is_semantic(question: str | None, resolved_settings: dict[str, Any]) -> bool:
    # A long message is not a question asked again in other words (and the verification's
    # rules are written for questions, in English: others only ever miss).
    return (
        question is not None
        and resolved_settings["semantic"]
        and bool(question.strip())
        and len(question) <= SEMANTIC_QUESTION_MAX_CHARS
    )


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
    resolved = _resolved(cache_settings)
    if not resolved["enabled"]:
        return None
    redis = redis or get_loop_redis()
    prefix = _prefix(scope.schema_name)
    exact_redis_key = prefix + _exact_member(exact)
    is_semantic = _is_semantic(question, resolved)
    scope_key = prefix + _semantic_member(scope)
    if is_semantic:
        # One round trip for both: the exact entry, and whether the scope holds anything (and
        # which generation of it, to reuse this process's copy of its vectors).
        payload, generation = await redis.mget(exact_redis_key, scope_key + ":g")
    else:
        payload, generation = await redis.get(exact_redis_key), None
    LOOKUPS.labels(scope.schema_name, "exact", "miss" if payload is None else "hit").inc()
    if payload is not None:
        return _answer(payload, layer="exact", similarity=None)
    if not is_semantic or question is None:
        return None
    answer, outcome = None, "miss"
    if generation is not None:
        answer, outcome = await _semantic_lookup(
            redis, scope_key, generation, question, threshold=resolved["similarity_threshold"]
        )
    LOOKUPS.labels(scope.schema_name, "semantic", outcome).inc()
    return answer


def exact_lookup(scope: CacheScope, *, exact: str, cache_settings: dict[str, Any], redis) -> CachedAnswer | None:
    """The exact layer alone, for synchronous callers (the web edge answers exact hits itself):
    one GET. Counts a lookup only on a hit; a miss is looked up again, and counted, by the worker."""
    key = exact_entry_key(scope, exact=exact, cache_settings=cache_settings)
    return None if key is None else exact_answer(scope, redis.get(key))


def exact_entry_key(scope: CacheScope, *, exact: str, cache_settings: dict[str, Any]) -> str | None:
    """The exact layer's key for a request, for a caller that GETs it in a round trip of its own
    making (the edge's admission); None when the bot's cache is off."""
    if not _resolved(cache_settings)["enabled"]:
        return None
    return _prefix(scope.schema_name) + _exact_member(exact)


def exact_answer(scope: CacheScope, payload: bytes | None) -> CachedAnswer | None:
    """The answer an ``exact_entry_key`` GET found (counted as a hit), or None."""
    if payload is None:
        return None
    LOOKUPS.labels(scope.schema_name, "exact", "hit").inc()
    return _answer(payload, layer="exact", similarity=None)


@dataclass(frozen=True, slots=True)
class _ScopeVectors:
    generation: bytes
    entries: list[str]
    matrix: np.ndarray  # (entries, EMBEDDING_DIMENSIONS) float32, unit rows


# Per process, the vectors of the scopes looked up lately, each valid while its scope's generation
# token (a new random one at every store and eviction in it; random, not a counter, because a
# scope that expired and starts again must not match an old copy) is unchanged: a busy bot's lookups then read
# one small key instead of its whole scope (3 MB at 2,000 entries, ~20-50 ms to read and parse).
_scope_vectors: OrderedDict[str, _ScopeVectors] = OrderedDict()
_scope_vectors_lock = threading.Lock()


def _scope_vectors_get(scope_key: str, generation: bytes) -> _ScopeVectors | None:
    with _scope_vectors_lock:
        cached = _scope_vectors.get(scope_key)
        if cached is None or cached.generation != generation:
            return None
        _scope_vectors.move_to_end(scope_key)
        return cached


def _scope_vectors_put(scope_key: str, vectors: _ScopeVectors) -> None:
    with _scope_vectors_lock:
        _scope_vectors[scope_key] = vectors
        _scope_vectors.move_to_end(scope_key)
        while len(_scope_vectors) > SCOPES_CACHED:
            _scope_vectors.popitem(last=False)


def _scope_vectors_parse(generation: bytes, stored: dict[bytes, bytes]) -> _ScopeVectors:
    width = EMBEDDING_DIMENSIONS * 4
    entries = [entry for entry, packed in stored.items() if len(packed) == width]
    matrix = np.frombuffer(b"".join(stored[entry] for entry in entries), dtype=np.float32)
    return _ScopeVectors(
        generation=generation,
        entries=[entry.decode() for entry in entries],
        matrix=matrix.reshape(len(entries), EMBEDDING_DIMENSIONS),
    )


async def _semantic_lookup(
    redis: aioredis.Redis, scope_key: str, generation: bytes, question: str, *, threshold: float
) -> tuple[CachedAnswer | None, str]:
    vectors = _scope_vectors_get(scope_key, generation)
    if vectors is None:
        # The question is embedded (CPU, a worker thread) while Redis sends the scope's vectors.
        vector, stored = await asyncio.gather(
            asyncio.to_thread(question_vector, question), redis.hgetall(scope_key + ":v")
        )
        # Read after the generation: a store in between leaves a newer copy under an older
        # generation, which the next lookup replaces; never an older copy under a newer one.
        vectors = _scope_vectors_parse(generation, stored)
        _scope_vectors_put(scope_key, vectors)
    else:
        vector = await asyncio.to_thread(question_vector, question)
    if not vectors.entries:
        return None, "miss"
    # einsum, not BLAS (``@``): right after an embedding, torch's worker threads still spin, and
    # BLAS's own threads fighting them for the cores made this 0.02 ms product take 4-20 ms.
    similarities = np.einsum("ij,j->i", vectors.matrix, vector)
    above = np.flatnonzero(similarities >= threshold)
    if not above.size:
        return None, "miss"
    best = above[np.argsort(-similarities[above], kind="stable")][:CANDIDATES_VERIFIED_MAX]
    payloads = await redis.hmget(scope_key + ":a", [vectors.entries[index] for index in best])
    now = time.time()
    candidates: list[tuple[dict[str, Any], float]] = []
    for index, payload in zip(best, payloads, strict=True):
        if payload is None:
            continue  # evicted since this process read the scope's vectors
        data = json.loads(payload)
        if data["expires_at"] > now:
            candidates.append((data, float(similarities[index])))
    if not candidates:
        return None, "miss"
    chosen = await asyncio.to_thread(_first_verified, question, candidates)
    if chosen is None:
        return None, "rejected"
    data, similarity = chosen
    answer = CachedAnswer(
        text=data["text"],
        citations=data["citations"],
        usage=data["usage"],
        layer="semantic",
        question=data["question"],
        similarity=round(similarity, 4),
    )
    return answer, "hit"


def _first_verified(
    question: str, candidates: Sequence[tuple[dict[str, Any], float]]
) -> tuple[dict[str, Any], float] | None:
    for data, similarity in candidates:
        if paraphrase_rejection(data["question"], question) is None:
            return data, similarity
    return None


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
    resolved = _resolved(cache_settings)
    if not resolved["enabled"] or not text:
        return
    redis = redis or get_loop_redis()
    prefix = _prefix(scope.schema_name)
    ttl = int(resolved["ttl_seconds"])
    now = time.time()
    expires_at = now + ttl
    entry_question = question if question is not None else ""
    payload = _canonical_json(
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
    if question is None or not _is_semantic(question, resolved):
        return
    vector = await asyncio.to_thread(question_vector, question)
    scope_member = _semantic_member(scope)
    scope_key = prefix + scope_member
    entry = _entry_id(question)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(scope_key + ":v", entry, vector.astype(np.float32).tobytes())
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


# --- embeddings --------------------------------------------------------------------------------


class _LRU:
    """A small thread-safe LRU of vectors (embedding runs in worker threads)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def put(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


_question_vectors = _LRU(QUESTION_VECTORS_CACHED)
_word_vectors = _LRU(WORD_VECTORS_CACHED)


def vector_caches_clear(*, questions: bool = True, words: bool = True, scopes: bool = True) -> None:
    """Forget this process's copies of vectors (benchmarks time the model and Redis with it)."""
    if questions:
        _question_vectors.clear()
    if words:
        _word_vectors.clear()
    if scopes:
        with _scope_vectors_lock:
            _scope_vectors.clear()


def _embedder() -> Any:
    from knowledge.embedders import get_embedder

    return get_embedder(SEMANTIC_EMBEDDER)


def question_vector(question: str) -> np.ndarray:
    """The question's unit embedding (float32); blocking: call it from a thread in async code."""
    cached = _question_vectors.get(question)
    if cached is None:
        cached = np.asarray(_embedder().embed_query(question), dtype=np.float32)
        _question_vectors.put(question, cached)
    return cached


def word_vectors(words: Iterable[str]) -> dict[str, np.ndarray]:
    """Unit embeddings of single words, from the process cache or one batch of the model."""
    found: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for word in dict.fromkeys(words):
        vector = _word_vectors.get(word)
        if vector is None:
            missing.append(word)
        else:
            found[word] = vector
    if missing:
        for word, vector in zip(missing, _embedder().embed_documents(missing), strict=True):
            found[word] = np.asarray(vector, dtype=np.float32)
            _word_vectors.put(word, found[word])
    return found


# --- verification ------------------------------------------------------------------------------

WORD_SIMILARITY_MIN = 0.8  # single words this close are synonyms; antonyms reach 0.72 (enable/disable)
EXTRA_TERMS_MAX = 1  # context words allowed on one side only (see _CONTEXT_WORDS)
UNMATCHED_TERMS_MAX = 6  # more words on one side only than this rejects without embedding them

# Expanded before tokenising, so that "can't" carries its negation and "'s" does not become a word.
_CONTRACTIONS = [
    (re.compile(r"\b(can't|cannot|can not)\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bshan't\b"), "shall not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'s\b"), " is"),  # "where's" is "where is"; a possessive's "is" is a stop word anyway
    (re.compile(r"'(m|re|ve|ll|d)\b"), ""),
]

# Phrases folded into one word before tokenising (most specific first): multi-word expressions
# of one meaning, and the relation words that "instead of" / "rather than" stand for.
_PHRASE_TABLE: list[tuple[str, str]] = [
    (
        r"(two|2)[- ]?(factor|step)( authentication| verification| auth)?|2fa|mfa|multi[- ]?factor( authentication)?",
        "2fa",
    ),
    (r"(log|logs|logged|logging|sign|signs|signed|signing)[- ]?(in|into|on)\b|login", "login"),
    (r"(log|logs|logged|logging|sign|signs|signed|signing)[- ]?(out|off)\b|logout", "logout"),
    (r"(sign|signs|signed|signing)[- ]?up|register|registration", "signup"),
    (r"(turn|turns|turned|turning|switch|switches|switched|switching|toggle)( it)? on", "enable"),
    (r"(turn|turns|turned|turning|switch|switches|switched|switching|toggle)( it)? off", "disable"),
    (r"money[- ]back|(my|the|your) money back", "refund"),
    (
        r"(send|sending|sent|bring|ship|shipping|take)( it| them| this| something| an item| a product| items)? back",
        "return",
    ),
    (r"(set|setting|sets)[- ]?up", "setup"),
    (r"(call|calls|called|calling) off", "cancel"),
    (r"(put|putting|puts|place|placing)( \w+)?( \w+)? on hold|on hold", "pause"),
    (r"(move|moving|go|going) up", "upgrade"),
    (r"(move|moving|go|going) down", "downgrade"),
    (r"get(ting)? rid of", "delete"),
    (r"back(ed|ing)?[- ]?up|backups?", "backup"),
    (r"locked out|lock out", "locked"),
    (r"(credit|debit|bank) card", "card"),
    (r"e-?mail( address)?", "email"),
    (r"user[- ]?name|login name", "username"),
    (r"phone number|mobile number|cell number", "phone"),
    (r"(customer|tech|technical|help|support) (support|service|team|desk|center|centre)", "support"),
    (r"(real|live|human) (person|agent|being|representative)|human|representative", "agent"),
    (r"(promo|promotion|promotional|discount|coupon|voucher) codes?", "coupon"),
    (r"(without (an? )?|no )(internet|network|wifi|wi-fi)( connection| access)?", "offline"),
    (r"rather than|instead of", "instead"),
    (r"more than|over|above|at least", "over"),
    (r"less than|fewer than|under|below|at most", "under"),
    (r"how long|how much time|how many (days|hours|weeks)", "duration"),
    (r"at (the same time|once)", "simultaneously"),
    (r"everywhere|(on |from )?(all|every) (of )?(my |your |the )?devices?", "alldevices"),
    (r"for good|forever", "permanently"),
    (r"on file", ""),
]
_PHRASES = [(re.compile(rf"\b(?:{pattern})\b"), replacement) for pattern, replacement in _PHRASE_TABLE]


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


_NEGATIONS = frozenset({"not", "no", "never", "without", "none", "nothing", "nobody", "neither", "nor"})
# Question words that change what kind of answer is wanted; "how do I …" (the usual support
# question, a procedure) and "where can I …" are not among them. "where" only as "where is …".
_QUESTION_TYPES = {"why": "reason", "when": "time", "duration": "time", "where": "status"}
# Relation words: what they govern (the next content word) must not move between the questions.
_MARKERS = frozenset({"to", "into", "from", "than", "instead", "before", "after"})
# After these words "to" starts an infinitive ("possible to add"), not a relation ("add to my plan").
_INFINITIVE_LEADS = _word_set(
    """want wants wanted need needs needed like possible able how way ways going try trying tried wish
    required require requires have has had order used supposed allowed easy hard best where what when
    who option options steps"""
)

_NUMBER_WORDS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
    "twice": 2, "double": 2, "dozen": 12,
}  # fmt: skip
# "one", "single", "once" are numbers only when they count something, and their absence is not a
# different number: "the same account" says what "one account" does.
_SOFT_ONES = frozenset({"one", "single", "once"})

_STOP_WORDS = _word_set(
    """a an the and or but if so of in on at by for with about as is am are was were be been being do does
    did doing have has had having i me my mine myself we us our ours you your yours he him his she her it
    its they them their this that these those there here what which who whom whose how why when where
    can could will would shall should may might must any some all each every other another such own same
    very too also just only really still already yet now then again ever even up down out off via per
    within until while because through during across around like as please hi hello thanks thank okay ok
    i'm im way ways possible able want wants wanted need needs needed wish would let know tell thing things
    something anything someone somebody anyone anybody help question questions step steps process option
    options use using used make making made go going get gets getting got gotten actually exactly currently
    just more most much many lot lots kind sort happen happens happened happening do done able"""
)

# Support-domain synonyms: every word of a group (and its stem) becomes the group's first word.
_SYNONYM_GROUPS: list[tuple[str, ...]] = [
    ("cancel", "cancellation", "terminate", "termination", "discontinue", "quit", "stop", "unsubscribe"),
    ("pause", "suspend", "suspension", "freeze"),
    ("resume", "unpause", "reactivate", "reactivation"),
    ("end", "expire", "expiry", "expiration", "finish"),
    ("start", "begin", "beginning", "create", "creation", "new"),
    ("delete", "deletion", "remove", "removal", "erase", "wipe"),
    ("add", "invite", "join", "put", "insert"),
    ("change", "update", "edit", "modify", "modification", "switch", "alter", "adjust", "amend"),
    ("buy", "purchase", "order", "bought", "purchases", "checkout"),
    ("item", "product", "article", "merchandise"),
    ("ship", "shipping", "shipment", "deliver", "delivery", "send", "sent", "package", "parcel", "mail"),
    ("track", "follow", "trace", "status"),
    ("plan", "subscription", "membership", "tier"),
    ("account", "profile"),
    ("user", "member", "people", "person", "seat", "colleague", "teammate", "coworker"),
    ("team", "workspace", "organization", "organisation"),
    ("phone", "mobile", "cellphone", "smartphone", "iphone", "android"),
    ("app", "application", "software", "program"),
    ("pay", "payment", "charge", "paid"),
    ("invoice", "bill", "billing", "receipt", "statement"),
    ("refund", "reimburse", "reimbursement"),
    ("data", "information", "info", "records", "record", "details"),
    ("secure", "safe", "security", "protected", "protect"),
    ("encrypt", "encrypted", "encryption"),
    ("password", "passcode", "passphrase"),
    ("contact", "reach", "talk", "speak", "call", "chat"),
    ("agent", "operator", "staff"),
    ("available", "offer", "provide", "include", "included", "access", "allowed", "allow"),
    ("hours", "open"),
    ("coupon", "discount", "promo", "voucher"),
    ("apply", "enter", "redeem"),
    ("slow", "laggy", "lag", "lagging", "sluggish"),
    ("express", "fast", "faster", "expedited", "quick", "quicker", "rush"),
    ("bug", "problem", "issue", "error", "glitch", "defect"),
    ("restore", "recover", "recovery", "undelete", "retrieve"),
    ("merge", "combine", "consolidate"),
    ("broken", "damaged", "damage", "defective", "faulty", "cracked"),
    ("wrong", "incorrect"),
    ("verify", "verification", "confirm", "confirmation", "validate"),
    ("receive", "received", "arrive", "arrived"),
    ("download", "export"),
    ("import", "upload"),
    ("limit", "maximum", "max", "largest", "cap", "large", "big"),
    ("minimum", "min", "smallest"),
    ("csv", "spreadsheet", "excel", "xlsx"),
    ("file", "document", "doc"),
    ("automatic", "automatically", "auto"),
    ("renew", "renewal", "renews"),
    ("annual", "annually", "yearly", "year"),
    ("month", "monthly"),
    ("price", "cost", "fee", "pricing", "costs"),
    ("standard", "regular", "normal"),
    ("view", "see", "find", "check", "locate", "show", "display", "list"),
    ("history", "past", "previous", "earlier"),
    ("picture", "photo", "avatar", "image"),
    ("fail", "failed", "decline", "declined", "rejected"),
    ("several", "multiple"),
    ("trial", "try"),
    ("close", "shut", "shutdown"),
    ("remaining", "remain", "left"),
    ("connect", "sync", "link", "integrate", "integration"),
    ("disconnect", "unlink", "unsync"),
    ("latest", "newest", "recent"),
    ("copy", "copies", "duplicate"),
]

# Opposites: two questions differing by such a pair never match, however close the words are.
_ANTONYM_PAIRS = [
    ("cancel", "pause"), ("cancel", "resume"), ("pause", "resume"), ("start", "end"), ("start", "cancel"),
    ("add", "delete"), ("enable", "disable"), ("login", "logout"), ("upgrade", "downgrade"),
    ("increase", "decrease"), ("import", "download"), ("limit", "minimum"), ("lock", "unlock"),
    ("locked", "unlock"), ("block", "unblock"), ("archive", "unarchive"), ("subscribe", "cancel"),
    ("buy", "sell"), ("buy", "refund"), ("refund", "exchange"), ("early", "late"), ("open", "close"),
    ("hours", "close"), ("hide", "view"), ("mute", "unmute"), ("free", "pay"), ("monthly", "annual"),
    ("month", "annual"), ("minute", "day"), ("day", "week"), ("week", "month"), ("online", "offline"),
    ("connect", "disconnect"), ("share", "unshare"), ("encrypt", "decrypt"), ("merge", "split"),
    ("restore", "delete"), ("return", "exchange"), ("deposit", "withdraw"), ("add", "withdraw"),
    ("quick", "slow"), ("express", "slow"), ("existing", "start"), ("opened", "unopened"),
]  # fmt: skip
_CONTRAST_PREFIXES = ("un", "dis", "de", "re", "non", "in", "im")

# Words that name the setting every support question is asked in (the product, the account, the
# plan, an order) rather than what is asked: one of them may appear in one question only ("Is
# express shipping available?" / "Do you have a faster delivery option?"). Any other word found on
# one side only makes it another question: "disable notifications" / "turn off email
# notifications", "return an item" / "return an unopened item".
_CONTEXT_WORDS = (
    "app", "application", "service", "website", "site", "platform", "product", "item", "account", "plan",
    "order", "pay", "available", "work", "works", "best", "data", "file", "login",
)  # fmt: skip


def _stem(word: str) -> str:
    """A light suffix stripper: enough to equate inflections (share/sharing/shared, plans/plan)."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, replacement, minimum in (
        ("ically", "ic", 4),
        ("ies", "y", 3),
        ("sses", "ss", 3),
        ("ing", "", 3),
        ("ed", "", 3),
        ("ly", "", 4),
        ("es", "", 4),
        ("s", "", 3),
    ):
        if word.endswith(suffix) and len(word) - len(suffix) >= minimum:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            word = word[: len(word) - len(suffix)] + replacement
            if suffix in ("ing", "ed") and len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # logging → logg → log
            break
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]  # share / shar(ing): compare the bare stems
    if len(word) > 4 and word.endswith("ll"):
        word = word[:-1]  # cancelled → cancel
    return word


def _build_synonyms() -> dict[str, str]:
    table: dict[str, str] = {}
    for group in _SYNONYM_GROUPS:
        head = group[0]
        for word in group:
            table.setdefault(word, head)
            table.setdefault(_stem(word), head)
    return table


_SYNONYMS = _build_synonyms()


def _term(word: str) -> str:
    if word in _SYNONYMS:
        return _SYNONYMS[word]
    stem = _stem(word)
    return _SYNONYMS.get(stem, stem)


# Compared as terms: "enable" / "disable" are the terms "enabl" / "disabl".
_ANTONYMS = frozenset(frozenset((_term(first), _term(second))) for first, second in _ANTONYM_PAIRS)
_CONTEXT_TERMS = frozenset(_term(word) for word in _CONTEXT_WORDS)


@dataclass(slots=True)
class QuestionTerms:
    """What a question says, reduced to what the verification compares."""

    terms: list[str] = field(default_factory=list)  # content terms, in order
    surfaces: dict[str, str] = field(default_factory=dict)  # term → first word it came from
    is_negated: bool = False
    question_type: set[str] = field(default_factory=set)  # reason, time, status: see _QUESTION_TYPES
    numbers: list[int] = field(default_factory=list)  # sorted, soft "one"s left out
    counted: dict[str, int] = field(default_factory=dict)  # term → the number counting it
    governed: dict[str, str] = field(default_factory=dict)  # term → the relation word governing it


def _normalised_text(question: str) -> str:
    text = unicodedata.normalize("NFKD", question).lower().replace("\u2019", "'").replace("\u2018", "'")
    text = "".join(character for character in text if not unicodedata.combining(character))  # café → cafe
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    for pattern, replacement in _PHRASES:
        text = pattern.sub(f" {replacement} ", text)
    return text


def question_terms(question: str) -> QuestionTerms:
    words = re.findall(r"[a-z0-9]+", _normalised_text(question))
    analysis = QuestionTerms()
    pending_marker: str | None = None
    pending_number: int | None = None
    for position, word in enumerate(words):
        following = words[position + 1] if position + 1 < len(words) else ""
        if word in _NEGATIONS:
            analysis.is_negated = True
            continue
        if word in _QUESTION_TYPES:
            if word != "where" or following in ("is", "are"):
                analysis.question_type.add(_QUESTION_TYPES[word])
            continue
        if word in _MARKERS:
            if not (word == "to" and position and words[position - 1] in _INFINITIVE_LEADS):
                pending_marker = word
            continue
        if word.isdigit() or word in _NUMBER_WORDS:
            pending_number = int(word) if word.isdigit() else _NUMBER_WORDS[word]
            analysis.numbers.append(pending_number)
            continue
        if word in _SOFT_ONES:
            if following and following not in _STOP_WORDS and following not in _MARKERS:
                pending_number = 1
            continue
        if word in _STOP_WORDS:
            continue
        term = _term(word)
        analysis.terms.append(term)
        analysis.surfaces.setdefault(term, word)
        if pending_marker is not None:
            analysis.governed.setdefault(term, pending_marker)
            pending_marker = None
        if pending_number is not None:
            analysis.counted.setdefault(term, pending_number)
            pending_number = None
    analysis.numbers.sort()
    return analysis


def _are_opposites(first: str, second: str) -> bool:
    if frozenset((first, second)) in _ANTONYMS:
        return True
    return any(first == prefix + second or second == prefix + first for prefix in _CONTRAST_PREFIXES)


def _relation_conflict(first: QuestionTerms, second: QuestionTerms, shared: set[str]) -> bool:
    for term in shared:
        marker_first, marker_second = first.governed.get(term), second.governed.get(term)
        if marker_first and marker_second and marker_first != marker_second:
            return True  # "ship to Canada" / "ship from Canada"
    for marker in set(first.governed.values()) & set(second.governed.values()):
        governed_first = {term for term in shared if first.governed.get(term) == marker}
        governed_second = {term for term in shared if second.governed.get(term) == marker}
        if governed_first - governed_second and governed_second - governed_first:
            return True  # "premium cheaper than basic" / "basic cheaper than premium"
    return False


def paraphrase_rejection(
    cached: str,
    asked: str,
    *,
    word_similarity: Callable[[list[tuple[str, str]]], list[float]] | None = None,
) -> str | None:
    """Why ``asked`` is not the same question as ``cached`` (a short reason), or None if it is.

    Blocking when words must be embedded (rarely: once per new word per process).
    ``word_similarity`` maps (word, word) pairs to their cosine; the bundled model by default.
    """
    first, second = question_terms(cached), question_terms(asked)
    if first.is_negated != second.is_negated:
        return "negation"
    if first.question_type != second.question_type:
        return "question type"  # "Where is my refund?" / "How do I get a refund?"
    if first.numbers != second.numbers:
        return "numbers"
    first_terms, second_terms = set(first.terms), set(second.terms)
    shared = first_terms & second_terms
    for term in shared:
        if term in first.counted and term in second.counted and first.counted[term] != second.counted[term]:
            return "numbers"  # "one license on two devices" / "two licenses on one device"
    if _relation_conflict(first, second, shared):
        return "relation"
    only_first = sorted(first_terms - second_terms)
    only_second = sorted(second_terms - first_terms)
    for term_first in only_first:
        for term_second in only_second:
            if _are_opposites(term_first, term_second):
                return "opposites"
    if len(only_first) > UNMATCHED_TERMS_MAX or len(only_second) > UNMATCHED_TERMS_MAX:
        return "substitution"  # far too different to be worth embedding every word
    paired_first: set[str] = set()
    paired_second: set[str] = set()
    if only_first and only_second:
        candidates = [(a, b) for a in only_first for b in only_second]
        surface_pairs = [(first.surfaces[a], second.surfaces[b]) for a, b in candidates]
        similarities = (word_similarity or _model_word_similarity)(surface_pairs)
        for (term_first, term_second), similarity in zip(candidates, similarities, strict=True):
            if similarity >= WORD_SIMILARITY_MIN:
                paired_first.add(term_first)
                paired_second.add(term_second)
    unpaired_first = [term for term in only_first if term not in paired_first]
    unpaired_second = [term for term in only_second if term not in paired_second]
    if unpaired_first and unpaired_second:
        return "substitution"
    extras = unpaired_first or unpaired_second
    if len(extras) > EXTRA_TERMS_MAX or any(term not in _CONTEXT_TERMS for term in extras):
        return "extra words"
    if not shared and not paired_first:
        return "nothing shared"
    return None


def _model_word_similarity(pairs: list[tuple[str, str]]) -> list[float]:
    vectors = word_vectors(word for pair in pairs for word in pair)
    return [float(vectors[a] @ vectors[b]) for a, b in pairs]
