"""What names a cached answer: its scope, the exact key, and the Redis keys under the tenant's prefix."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tenants.redis import tenant_key


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


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def generation_digest(generation: dict[str, Any]) -> str:
    """A short digest of generation parameters, for ``CacheScope.generation_signature``."""
    return hashlib.sha256(canonical_json(generation).encode()).hexdigest()[:16]


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
    return hashlib.sha256(canonical_json(request).encode()).hexdigest()


def _prefix(schema_name: str) -> str:
    return tenant_key(schema_name, "cache", "")


def _index_key(schema_name: str) -> str:
    return tenant_key(schema_name, "cache", "index")


def _exact_member(digest: str) -> str:
    return f"x:{digest}"


def _semantic_member(scope: CacheScope) -> str:
    """The scope's part of its keys: readable ids, then a digest of the rest (any length)."""
    from chat.response_cache.embeddings import embedder_key  # the semantic layer's (numpy, the model)

    rest = f"{scope.knowledge_signature}\x00{scope.generation_signature}\x00{embedder_key()}"
    return f"s:{scope.bot_id}:{scope.bot_version}:{hashlib.sha256(rest.encode()).hexdigest()[:16]}"


def _entry_id(question: str) -> str:
    return hashlib.sha256(" ".join(question.split()).lower().encode()).hexdigest()[:16]
