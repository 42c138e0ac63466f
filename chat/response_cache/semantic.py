"""The semantic layer: the scope's question vectors, the nearest candidates, and their verification."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis.asyncio as aioredis

from chat.response_cache.embeddings import EMBEDDING_DIMENSIONS, question_vector, question_vectors_clear
from chat.response_cache.keys import CachedAnswer
from chat.response_cache.settings import CANDIDATES_VERIFIED_MAX, SCOPES_CACHED, SEMANTIC_QUESTION_MAX_CHARS
from chat.response_cache.verification import paraphrase_rejection


def is_semantic(question: str | None, resolved_settings: dict[str, Any]) -> bool:
    # A long message is not a question asked again in other words (and the verification's
    # rules are written for questions, in English: others only ever miss).
    return (
        question is not None
        and resolved_settings["semantic"]
        and bool(question.strip())
        and len(question) <= SEMANTIC_QUESTION_MAX_CHARS
    )


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


async def semantic_lookup(
    redis: aioredis.Redis, scope_key: str, generation: bytes, question: str, *, threshold: float
) -> tuple[CachedAnswer | None, str]:
    vectors = _scope_vectors_get(scope_key, generation)
    if vectors is None:
        # The question is embedded (CPU, a worker thread) while Redis sends the scope's vectors.
        vector, stored = await asyncio.gather(
            asyncio.to_thread(question_vector, question),
            # (redis-py types its asyncio replies as ``Awaitable | reply``, shared with the sync client)
            cast("Awaitable[dict[bytes, bytes]]", redis.hgetall(scope_key + ":v")),
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
    payloads = await cast(
        "Awaitable[list[bytes | None]]", redis.hmget(scope_key + ":a", [vectors.entries[index] for index in best])
    )
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


def vector_caches_clear(*, questions: bool = True, words: bool = True, scopes: bool = True) -> None:
    """Forget this process's copies of vectors (benchmarks time the model and Redis with it)."""
    question_vectors_clear(questions=questions, words=words)
    if scopes:
        with _scope_vectors_lock:
            _scope_vectors.clear()
