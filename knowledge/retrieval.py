"""Hybrid retrieval: the one narrow function the chat engine (and the search API) calls.

Two candidate lists — nearest neighbours by cosine distance on pgvector, and PostgreSQL full-text
matches ranked by ``ts_rank_cd`` — fused by reciprocal rank fusion (score = Σ 1/(60 + rank)).
Full text catches exact names, codes and rare words that embeddings blur; vectors catch paraphrases
that share no words with the passage.

Vector search is exact when the searched scope is small (a filtered scan is fast and perfectly
accurate, whereas an HNSW scan filtered afterwards can come back short), and approximate (HNSW,
``ef_search`` raised in proportion to how much of the tenant the filter leaves out) otherwise.
Runs in the caller's tenant schema.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Sum

from knowledge.embedders import get_embedder
from knowledge.models import ANN_INDEXED_DIMENSIONS, Document
from tenants.redis import get_redis, tenant_key

RRF_K = 60
CANDIDATES_PER_LIST = 4  # times the limit, from each of the two lists
MAX_EF_SEARCH = 1000  # pgvector's upper bound

# Full text in two passes: passages holding every word of the question (plainto_tsquery AND-s the
# lexemes), then, if those are too few, passages holding any of them (OR-ed). Ranking reads each
# matching row's tsvector, so a question made of common words would rank thousands of rows: each
# pass ranks at most TEXT_MATCHES_RANKED matches (found through the GIN index; 12-20 µs each), which bounds the
# cost at the price of an arbitrary subset when a question matches more than that.
TEXT_MATCHES_RANKED = 300
_TEXT_QUERY = """
SELECT m.id
FROM (
    SELECT c.id, c.search_vector
    FROM knowledge_chunk c
    WHERE c.knowledge_base_id = ANY(%(kbs)s) {document_filter} AND c.search_vector @@ {tsquery}
    LIMIT %(ranked)s
) m
ORDER BY ts_rank_cd(m.search_vector, {tsquery}) DESC, m.id
LIMIT %(limit)s
"""
_STRICT_TSQUERY = "plainto_tsquery('english', %(q)s)"
_LOOSE_TSQUERY = "replace(plainto_tsquery('english', %(q)s)::text, '&', '|')::tsquery"

_VECTOR_QUERY = """
SELECT c.id, c.embedding::vector({dimensions}) <=> %s::vector({dimensions}) AS distance
FROM knowledge_chunk c
WHERE c.dimensions = {dimensions} AND c.knowledge_base_id = ANY(%s) {document_filter}
ORDER BY {order}
LIMIT %s
"""

_DETAILS_QUERY = """
SELECT c.id, c.document_id, d.title, c.text, c.page, c.heading, c.knowledge_base_id
FROM knowledge_chunk c JOIN knowledge_document d ON d.id = c.document_id
WHERE c.id = ANY(%s)
"""


@dataclass(frozen=True, slots=True)
class RetrievedChunk:
    chunk_id: int
    document_id: int
    knowledge_base_id: int
    title: str
    text: str
    page: int | None
    heading: str
    score: float  # fused reciprocal-rank score
    vector_rank: int | None  # 1-based rank in the nearest-neighbour list (None: not in it)
    text_rank: int | None  # 1-based rank in the full-text list
    similarity: float | None  # cosine similarity to the query, when in the vector list


def retrieve(
    *,
    knowledge_base_ids: list[int],
    query: str,
    limit: int = 5,
    document_ids: list[int] | None = None,
) -> list[RetrievedChunk]:
    """Top ``limit`` chunks of the given knowledge bases (optionally only these documents) for ``query``."""
    query = query.strip()
    if not knowledge_base_ids or not query or limit < 1:
        return []
    candidates = limit * CANDIDATES_PER_LIST
    ranked_lists: list[list[int]] = [_text_candidates(knowledge_base_ids, query, candidates, document_ids)]
    distances: dict[int, float] = {}
    for group in _embedder_groups(knowledge_base_ids):
        hits = _vector_candidates(group, query, candidates, document_ids)
        distances.update(hits)
        ranked_lists.append([chunk_id for chunk_id, _ in hits])
    return _fuse(ranked_lists, distances, limit)


@dataclass(frozen=True, slots=True)
class _EmbedderGroup:
    embedder: dict
    dimensions: int
    knowledge_base_ids: list[int]
    chunks: int  # chunks in these knowledge bases
    dimension_chunks: int  # chunks of the tenant with this dimension (what one HNSW index holds)


# One query for every knowledge base of the tenant (a handful): their embedders and chunk counts,
# from which each search's scope and its index's size both follow.
_KNOWLEDGE_BASES_QUERY = """
SELECT kb.id, kb.embedder, kb.dimensions, COALESCE(SUM(d.chunk_count), 0)
FROM knowledge_knowledgebase kb LEFT JOIN knowledge_document d ON d.knowledge_base_id = kb.id
GROUP BY kb.id
"""


def _embedder_groups(knowledge_base_ids: list[int]) -> list[_EmbedderGroup]:
    """Knowledge bases sharing an embedder are searched with one query embedding."""
    with connection.cursor() as cursor:
        cursor.execute(_KNOWLEDGE_BASES_QUERY)
        rows = cursor.fetchall()
    by_dimension: dict[int, int] = defaultdict(int)
    for _kb_id, _embedder, dimensions, chunks in rows:
        by_dimension[dimensions] += int(chunks)
    wanted = set(knowledge_base_ids)
    groups: dict[str, _EmbedderGroup] = {}
    for kb_id, embedder, dimensions, chunks in rows:
        if kb_id not in wanted or dimensions not in ANN_INDEXED_DIMENSIONS:
            continue
        embedder = json.loads(embedder) if isinstance(embedder, str) else embedder
        key = json.dumps(embedder, sort_keys=True)
        group = groups.get(key)
        groups[key] = _EmbedderGroup(
            embedder=embedder,
            dimensions=dimensions,
            knowledge_base_ids=[*(group.knowledge_base_ids if group else []), kb_id],
            chunks=(group.chunks if group else 0) + int(chunks),
            dimension_chunks=by_dimension[dimensions],
        )
    return list(groups.values())


def _text_candidates(knowledge_base_ids, query, candidates, document_ids) -> list[int]:
    params = {"q": query, "kbs": list(knowledge_base_ids), "ranked": TEXT_MATCHES_RANKED, "limit": candidates}
    document_filter = ""
    if document_ids is not None:
        document_filter, params["documents"] = "AND c.document_id = ANY(%(documents)s)", list(document_ids)
    found: list[int] = []
    with connection.cursor() as cursor:
        for tsquery in (_STRICT_TSQUERY, _LOOSE_TSQUERY):
            cursor.execute(_TEXT_QUERY.format(document_filter=document_filter, tsquery=tsquery), params)
            found += [row[0] for row in cursor.fetchall() if row[0] not in found]
            if len(found) >= candidates:
                break
    return found[:candidates]


def query_embedding(embedder_config: dict, query: str) -> list[float]:
    """The query's embedding, cached in Redis (a repeated question skips the model)."""
    embedder = get_embedder(embedder_config)
    digest = hashlib.sha256(f"{embedder.key}\x00{query}".encode()).hexdigest()
    key = tenant_key(connection.schema_name, "qemb", digest)
    redis = get_redis()
    cached = redis.get(key)
    if cached:
        return json.loads(cached)
    vector = embedder.embed_query(query)
    payload = json.dumps([round(value, 7) for value in vector])
    redis.set(key, payload, ex=settings.KNOWLEDGE_QUERY_EMBEDDING_CACHE_SECONDS)
    return vector


def _vector_candidates(group: _EmbedderGroup, query, candidates, document_ids) -> list[tuple[int, float]]:
    vector = query_embedding(group.embedder, query)
    literal = "[" + ",".join(repr(float(value)) for value in vector) + "]"
    in_scope = group.chunks
    if document_ids is not None:  # a document filter narrows the scope: count it
        documents = Document.objects.filter(knowledge_base_id__in=group.knowledge_base_ids, pk__in=document_ids)
        in_scope = documents.aggregate(total=Sum("chunk_count"))["total"] or 0
    if not in_scope:
        return []
    exact = in_scope <= settings.KNOWLEDGE_EXACT_SEARCH_MAX_CHUNKS
    dimensions = group.dimensions
    distance = f"c.embedding::vector({dimensions}) <=> %s::vector({dimensions})"
    # "+ 0" keeps the planner off the HNSW index: the ordering expression no longer matches it.
    order = f"({distance}) + 0, c.id" if exact else distance
    params: list = [literal, list(group.knowledge_base_ids)]
    document_filter = ""
    if document_ids is not None:
        document_filter, params = "AND c.document_id = ANY(%s)", [*params, list(document_ids)]
    sql = _VECTOR_QUERY.format(dimensions=dimensions, document_filter=document_filter, order=order)
    with transaction.atomic(), connection.cursor() as cursor:
        if not exact:
            ef_search = _ef_search(group.dimension_chunks or in_scope, in_scope, candidates)
            cursor.execute("SET LOCAL hnsw.ef_search = %s", [ef_search])
        cursor.execute(sql, [*params, literal, candidates])
        return [(row[0], float(row[1])) for row in cursor.fetchall()]


def _ef_search(total: int, in_scope: int, candidates: int) -> int:
    """A filter applied after the HNSW scan discards the candidates outside the scope, so the scan
    must look at proportionally more of them to return enough inside it."""
    wanted = max(settings.KNOWLEDGE_HNSW_EF_SEARCH, candidates) * max(1.0, total / in_scope)
    return min(MAX_EF_SEARCH, math.ceil(wanted))


def _fuse(ranked_lists: list[list[int]], distances: dict[int, float], limit: int) -> list[RetrievedChunk]:
    scores: dict[int, float] = defaultdict(float)
    vector_ranks: dict[int, int] = {}
    text_ranks: dict[int, int] = {}
    for list_index, ranked in enumerate(ranked_lists):
        for rank, chunk_id in enumerate(ranked, start=1):
            scores[chunk_id] += 1.0 / (RRF_K + rank)
            if list_index == 0:
                text_ranks[chunk_id] = rank
            else:
                vector_ranks.setdefault(chunk_id, rank)
    winners = sorted(scores, key=lambda chunk_id: (-scores[chunk_id], chunk_id))[:limit]
    if not winners:
        return []
    with connection.cursor() as cursor:
        cursor.execute(_DETAILS_QUERY, [winners])
        rows = {row[0]: row for row in cursor.fetchall()}
    results = []
    for chunk_id in winners:
        row = rows.get(chunk_id)
        if row is None:  # deleted between the two queries
            continue
        distance = distances.get(chunk_id)
        results.append(
            RetrievedChunk(
                chunk_id=chunk_id,
                document_id=row[1],
                title=row[2],
                text=row[3],
                page=row[4],
                heading=row[5],
                knowledge_base_id=row[6],
                score=round(scores[chunk_id], 6),
                vector_rank=vector_ranks.get(chunk_id),
                text_rank=text_ranks.get(chunk_id),
                similarity=None if distance is None else round(1.0 - distance, 6),
            )
        )
    return results
