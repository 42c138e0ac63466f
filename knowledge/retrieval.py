"""Hybrid retrieval: the one narrow function the chat engine (and the search API) calls.

Two candidate lists — nearest neighbours by cosine distance on pgvector, and full-text matches ranked
by BM25F — fused by weighted reciprocal rank fusion, then optionally reordered by the knowledge
base's reranker (:mod:`knowledge.reranking`). Full text catches exact names, codes and rare words
that embeddings blur; vectors catch paraphrases that share no words with the passage.

BM25F. A chunk has three fields: the document's title, the chunk's heading path and its text (the
weight labels A, B and D of ``search_vector``). A query lexeme's frequency in a chunk is
``title_weight·tf_title + heading_weight·tf_heading + tf_text``, saturated by ``k1`` and normalised
by the text's length against the knowledge base's mean (``b``); its inverse document frequency comes
from the knowledge base's own statistics (:class:`~knowledge.models.DocumentTerm`, summed over its
documents), so a word common in this knowledge base weighs little even if it is rare elsewhere.

Which matches are ranked: all that can reach the top of the list, within a stated cost. The
chunks holding every query lexeme are scored first (usually the best). Then the lexemes are taken
from the rarest up (MaxScore): the matches of the rarest ones are scored exactly, and a chunk that
holds none of them can score at most the sum of the other lexemes' upper bounds, ``idf·(k1 + 1)``
each; once the list's last kept score beats that sum, nothing unscored can enter it, and ranking
stops. Otherwise the next lexeme's new matches are scored, and so on. At most
``MAX_SCORED_MATCHES`` chunks are scored in all (the bound on the cost, which a question made only
of words present in thousands of chunks reaches: it then ranks the matches scored so far).
``RetrievalTrace.text_exact`` says whether the list was proven exact.

Vector search is exact when the searched scope is small (a filtered scan is fast and perfectly
accurate, whereas an HNSW scan filtered afterwards can come back short), and approximate (HNSW,
``ef_search`` raised in proportion to how much of the tenant the filter leaves out) otherwise.
Runs in the caller's tenant schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, cast

from django.conf import settings
from django.db import transaction
from django.db.models import Sum

from knowledge.embedders import get_embedder
from knowledge.models import ANN_INDEXED_DIMENSIONS, SEARCHABLE_TEXT_PATTERN, Document
from tenants.connection import connection
from tenants.redis import get_redis, tenant_key

MAX_EF_SEARCH = 1000  # pgvector's upper bound

Mode = Literal["hybrid", "text", "vector"]


@dataclass(frozen=True, slots=True)
class RankingParameters:
    """How the two lists are built and fused. The defaults were chosen on the tuning halves of the
    retrieval benchmark's question sets (tests/perf/test_retrieval_quality.py; docs/retrieval.md)."""

    k1: float = 0.9
    b: float = 0.5
    title_weight: float = 1.0  # a title's occurrence counts as this many occurrences in the text
    heading_weight: float = 1.0  # the same for the heading path
    depth: int = 50  # candidates taken from each list (at least the limit)
    rrf_k: int = 10
    text_weight: float = 1.0  # the full-text list's share in the fused score; vectors weigh 1
    part_weight: float = 0.0  # lists of a multi-part question's parts (0: not searched), see _query_parts
    by_document: bool = True  # fuse documents (each list's best chunk per document), see _fuse_documents


DEFAULT_PARAMETERS = RankingParameters()
# The cost bound of one full-text ranking: chunks whose BM25F score is computed (each unnests its
# search vector: about 15-40 µs on this project's 2-core machine, see the retrieval benchmark).
MAX_SCORED_MATCHES = 300
# Matches a pass of MaxScore adds at most (beyond its first lexeme): small, so that a question with
# a rare word scores that word's few matches and stops there, not every match of its common words.
MATCHES_PER_PASS = 150

# Query lexemes with their frequencies in the knowledge bases' chunks, summed over their documents.
_TERM_STATS_QUERY = """
SELECT q.lexeme, COALESCE(SUM(t.chunks), 0)
FROM unnest(tsvector_to_array(to_tsvector('english', regexp_replace(%(q)s, %(pattern)s, ' ', 'g')))) AS q(lexeme)
LEFT JOIN knowledge_documentterm t ON t.knowledge_base_id = ANY(%(kbs)s) AND t.lexeme = q.lexeme
GROUP BY q.lexeme
"""

# BM25F of at most %(budget)s chunks matching {tsquery} (found through the GIN index): each reads only
# its search vector. The candidates are materialised first so that the LIMIT bounds the scoring; the
# arithmetic is float8 (parameters would otherwise arrive as numeric, several times slower per row).
_BM25_QUERY = """
WITH m AS MATERIALIZED (
    SELECT c.id, c.document_id, c.token_count, c.search_vector
    FROM knowledge_chunk c
    WHERE c.knowledge_base_id = ANY(%(kbs)s) {document_filter} AND c.search_vector @@ %(tsquery)s::tsquery
    LIMIT %(budget)s
)
SELECT m.id, s.score, count(*) OVER (), m.document_id
FROM m
CROSS JOIN LATERAL (
    SELECT SUM(q.idf * f.tf * %(k1_plus_1)s::float8
               / (f.tf + %(k1)s::float8 * (%(one_minus_b)s::float8 + %(b_per_length)s::float8 * m.token_count)))
        AS score
    FROM (
        SELECT v.lexeme,
               cardinality(v.weights)
               + %(title_extra)s::float8 * cardinality(array_positions(v.weights, 'A'))
               + %(heading_extra)s::float8 * cardinality(array_positions(v.weights, 'B')) AS tf
        FROM unnest(m.search_vector) v
        WHERE v.lexeme = ANY(%(lexemes)s)
    ) f
    JOIN unnest(%(lexemes)s::text[], %(idfs)s::float8[]) AS q(lexeme, idf) ON q.lexeme = f.lexeme
) s
ORDER BY s.score DESC, m.id
LIMIT %(depth)s
"""

_VECTOR_QUERY = """
SELECT c.id, c.embedding::vector({dimensions}) <=> %s::vector({dimensions}) AS distance, c.document_id
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
    score: float  # fused reciprocal-rank score (the reranker's relevance when it ordered the list)
    vector_rank: int | None  # 1-based rank in the nearest-neighbour list (None: not in it)
    text_rank: int | None  # 1-based rank in the full-text list
    similarity: float | None  # cosine similarity to the query, when in the vector list
    reranked: bool = False  # ordered by the knowledge base's reranker


@dataclass(slots=True)
class RetrievalTrace:
    """What one retrieval did, for benchmarks and debugging (pass one to ``retrieve``)."""

    scored_matches: int = 0  # chunks whose BM25F score was computed
    text_exact: bool = True  # the full-text list is provably the true top of all matches
    rerank_seconds: float = 0.0
    rerank_outcome: str = ""  # "", "reranked", "timeout", "error"
    passes: list[int] = field(default_factory=list)  # lexemes added per full-text pass


def retrieve(
    *,
    knowledge_base_ids: list[int],
    query: str,
    limit: int = 5,
    document_ids: list[int] | None = None,
    mode: Mode = "hybrid",
    rerank: bool = True,
    parameters: RankingParameters | None = None,
    trace: RetrievalTrace | None = None,
) -> list[RetrievedChunk]:
    """Top ``limit`` chunks of the given knowledge bases (optionally only these documents) for ``query``.

    ``mode`` selects the lists (both, by default; one alone for evaluations); ``rerank=False`` skips a
    configured reranker. ``parameters`` overrides the tuned defaults (evaluations only).
    """
    query = query.strip()
    if not knowledge_base_ids or not query or limit < 1:
        return []
    parameters = parameters or DEFAULT_PARAMETERS
    trace = trace if trace is not None else RetrievalTrace()
    knowledge_bases = _knowledge_bases(knowledge_base_ids)
    depth = max(limit, parameters.depth)
    groups = _embedder_groups(knowledge_bases) if mode in ("hybrid", "vector") else []
    distances: dict[int, float] = {}
    document_of: dict[int, int] = {}  # chunk → document, of every candidate
    weighted: list[tuple[float, list[int]]] = []
    text_ranked: list[int] = []
    vector_lists: list[list[int]] = []
    parts = _query_parts(query) if parameters.part_weight > 0 else []
    for index, text in enumerate([query, *parts]):
        weight = 1.0 if index == 0 else parameters.part_weight
        if mode in ("hybrid", "text"):
            ranked = _text_candidates(knowledge_bases, text, depth, document_ids, parameters, trace, document_of)
            weighted.append((weight * parameters.text_weight, ranked))
            text_ranked = text_ranked or ranked
        for group in groups:
            hits = _vector_candidates(group, text, depth, document_ids, document_of)
            if index == 0:
                distances.update(hits)
                vector_lists.append([chunk_id for chunk_id, _ in hits])
            weighted.append((weight, [chunk_id for chunk_id, _ in hits]))
    fused = _fuse(weighted, parameters.rrf_k)
    if parameters.by_document:
        fused = _fuse_documents(weighted, parameters.rrf_k, fused, document_of)
    reranker = _reranker_config(knowledge_bases) if rerank else None
    if reranker is not None:
        from knowledge.reranking import rerank_candidates  # the HTTP client loads only where one is configured

        pool = fused[: max(limit, reranker["candidates"])]
        chunks = _details(pool, text_ranked, vector_lists, distances)
        return rerank_candidates(config=reranker, query=query, chunks=chunks, limit=limit, trace=trace)
    return _details(fused[:limit], text_ranked, vector_lists, distances)


@dataclass(frozen=True, slots=True)
class _KnowledgeBaseRow:
    id: int
    embedder: dict
    dimensions: int
    chunks: int
    tokens: int
    reranker: dict


@dataclass(frozen=True, slots=True)
class _KnowledgeBases:
    wanted: list[_KnowledgeBaseRow]
    chunks_by_dimension: dict[int, int]  # chunks of the whole tenant per dimension (one HNSW index each)

    @property
    def ids(self) -> list[int]:
        return [row.id for row in self.wanted]


@dataclass(frozen=True, slots=True)
class _EmbedderGroup:
    embedder: dict
    dimensions: int
    knowledge_base_ids: list[int]
    chunks: int  # chunks in these knowledge bases
    dimension_chunks: int  # chunks of the tenant with this dimension (what one HNSW index holds)


# One query for every knowledge base of the tenant (a handful): their embedders, rerankers, chunk and
# token counts, from which each search's scope, its index's size and BM25's length norm all follow.
_KNOWLEDGE_BASES_QUERY = """
SELECT kb.id, kb.embedder, kb.dimensions, COALESCE(SUM(d.chunk_count), 0), COALESCE(SUM(d.token_count), 0),
       kb.reranker
FROM knowledge_knowledgebase kb LEFT JOIN knowledge_document d ON d.knowledge_base_id = kb.id
GROUP BY kb.id
"""


def _json(value) -> dict:
    return json.loads(value) if isinstance(value, str) else (value or {})


def _knowledge_bases(knowledge_base_ids: list[int]) -> _KnowledgeBases:
    with connection.cursor() as cursor:
        cursor.execute(_KNOWLEDGE_BASES_QUERY)
        rows = cursor.fetchall()
    by_dimension: dict[int, int] = defaultdict(int)
    wanted_ids = set(knowledge_base_ids)
    wanted = []
    for kb_id, embedder, dimensions, chunks, tokens, reranker in rows:
        by_dimension[dimensions] += int(chunks)
        if kb_id in wanted_ids:
            wanted.append(
                _KnowledgeBaseRow(kb_id, _json(embedder), dimensions, int(chunks), int(tokens), _json(reranker))
            )
    return _KnowledgeBases(wanted=wanted, chunks_by_dimension=dict(by_dimension))


def _embedder_groups(knowledge_bases: _KnowledgeBases) -> list[_EmbedderGroup]:
    """Knowledge bases sharing an embedder are searched with one query embedding."""
    groups: dict[str, _EmbedderGroup] = {}
    for row in knowledge_bases.wanted:
        if row.dimensions not in ANN_INDEXED_DIMENSIONS:
            continue
        key = json.dumps(row.embedder, sort_keys=True)
        group = groups.get(key)
        groups[key] = _EmbedderGroup(
            embedder=row.embedder,
            dimensions=row.dimensions,
            knowledge_base_ids=[*(group.knowledge_base_ids if group else []), row.id],
            chunks=(group.chunks if group else 0) + row.chunks,
            dimension_chunks=knowledge_bases.chunks_by_dimension[row.dimensions],
        )
    return list(groups.values())


def _reranker_config(knowledge_bases: _KnowledgeBases) -> dict | None:
    """The reranker of the searched knowledge bases: the first one configured (a bot searching several
    knowledge bases with different rerankers gets one ordering, not two)."""
    return next((row.reranker for row in knowledge_bases.wanted if row.reranker.get("kind")), None)


# --- full text: BM25F with MaxScore ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Term:
    lexeme: str
    idf: float
    matches: int  # chunks holding it (in the searched knowledge bases)


def _query_terms(knowledge_bases: _KnowledgeBases, query: str) -> list[_Term]:
    """The query's lexemes with their idf, rarest first. Robertson-Sparck Jones idf, floored at 0
    by the "+ 1" inside the log (Lucene's form): a lexeme in most chunks weighs almost nothing."""
    total = sum(row.chunks for row in knowledge_bases.wanted)
    with connection.cursor() as cursor:
        cursor.execute(_TERM_STATS_QUERY, {"q": query, "kbs": knowledge_bases.ids, "pattern": SEARCHABLE_TEXT_PATTERN})
        rows = cursor.fetchall()
    terms = [
        _Term(lexeme=lexeme, idf=math.log(1.0 + (total - df + 0.5) / (df + 0.5)), matches=int(df))
        for lexeme, df in rows
        if df > 0
    ]
    return sorted(terms, key=lambda term: (-term.idf, term.lexeme))


def _tsquery_text(lexemes: list[str]) -> str:
    """A tsquery matching any of these (already normalised) lexemes, in tsquery's quoting."""
    return " | ".join("'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'" for lexeme in lexemes)


def _text_candidates(
    knowledge_bases: _KnowledgeBases,
    query: str,
    depth: int,
    document_ids: list[int] | None,
    parameters: RankingParameters,
    trace: RetrievalTrace,
    document_of: dict[int, int],
) -> list[int]:
    terms = _query_terms(knowledge_bases, query)
    if not terms:
        return []
    total_chunks = sum(row.chunks for row in knowledge_bases.wanted)
    total_tokens = sum(row.tokens for row in knowledge_bases.wanted)
    mean_length = total_tokens / total_chunks if total_chunks and total_tokens else 1.0
    params: dict = {
        "kbs": knowledge_bases.ids,
        "lexemes": [term.lexeme for term in terms],
        "idfs": [term.idf for term in terms],
        "k1": parameters.k1,
        "k1_plus_1": parameters.k1 + 1.0,
        "one_minus_b": 1.0 - parameters.b,
        "b_per_length": parameters.b / mean_length,
        "title_extra": parameters.title_weight - 1.0,
        "heading_extra": parameters.heading_weight - 1.0,
        "depth": depth,
    }
    document_filter = ""
    if document_ids is not None:
        document_filter, params["documents"] = "AND c.document_id = ANY(%(documents)s)", list(document_ids)
    sql = _BM25_QUERY.format(document_filter=document_filter)
    upper_bounds = [term.idf * (parameters.k1 + 1.0) for term in terms]
    scores: dict[int, float] = {}

    def score(tsquery: str) -> bool:
        """Score the matches of ``tsquery`` within the remaining budget; False when it cut them short."""
        remaining = MAX_SCORED_MATCHES - trace.scored_matches
        cursor.execute(sql, {**params, "tsquery": tsquery, "budget": remaining})
        rows = cursor.fetchall()
        scores.update((chunk_id, float(value)) for chunk_id, value, _, _ in rows)
        document_of.update((row[0], row[3]) for row in rows)
        matched = rows[0][2] if rows else 0
        trace.scored_matches += matched
        return matched < remaining

    # Chunks holding every lexeme first: usually the best, and scored even when a budget cut follows.
    everything = " & ".join(f"({_tsquery_text([term.lexeme])})" for term in terms) if len(terms) > 1 else ""
    searched = 0  # terms whose matches are all scored
    with connection.cursor() as cursor:
        if everything and not score(everything):
            trace.text_exact = False
            return _ranked(scores, depth)
        while searched < len(terms):
            # The next lexemes, rarest first, as many as fit this pass and the budget (one at least).
            added, expected = 0, 0
            room = min(MATCHES_PER_PASS, MAX_SCORED_MATCHES - trace.scored_matches)
            while searched + added < len(terms):
                matches = terms[searched + added].matches
                if added and expected + matches > room:
                    break
                added, expected = added + 1, expected + matches
            new = _tsquery_text([term.lexeme for term in terms[searched : searched + added]])
            if searched:  # matches of the lexemes already searched are scored already
                new = f"({new}) & !({_tsquery_text([term.lexeme for term in terms[:searched]])})"
            if everything:
                new = f"({new}) & !({everything})"
            trace.passes.append(added)
            if not score(new):
                trace.text_exact = False  # the budget is spent: the list ranks what was scored
                break
            searched += added
            kept = sorted(scores.values(), reverse=True)[:depth]
            if len(kept) >= depth and kept[-1] > sum(upper_bounds[searched:]):
                break  # nothing unscored can enter the list
    return _ranked(scores, depth)


def _ranked(scores: dict[int, float], depth: int) -> list[int]:
    return sorted(scores, key=lambda chunk_id: (-scores[chunk_id], chunk_id))[:depth]


# --- vectors ----------------------------------------------------------------------------------------


def query_embedding(embedder_config: dict, query: str) -> list[float]:
    """The query's embedding, cached in Redis (a repeated question skips the model)."""
    embedder = get_embedder(embedder_config)
    digest = hashlib.sha256(f"{embedder.key}\x00{query}".encode()).hexdigest()
    key = tenant_key(connection.schema_name, "qemb", digest)
    redis = get_redis()
    cached = cast(bytes | None, redis.get(key))
    if cached:
        return json.loads(cached)
    vector = embedder.embed_query(query)
    payload = json.dumps([round(value, 7) for value in vector])
    redis.set(key, payload, ex=settings.KNOWLEDGE_QUERY_EMBEDDING_CACHE_SECONDS)
    return vector


def _vector_candidates(
    group: _EmbedderGroup, query, candidates, document_ids, document_of: dict[int, int]
) -> list[tuple[int, float]]:
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
        rows = cursor.fetchall()
    document_of.update((row[0], row[2]) for row in rows)
    return [(row[0], float(row[1])) for row in rows]


def _ef_search(total: int, in_scope: int, candidates: int) -> int:
    """A filter applied after the HNSW scan discards the candidates outside the scope, so the scan
    must look at proportionally more of them to return enough inside it."""
    wanted = max(settings.KNOWLEDGE_HNSW_EF_SEARCH, candidates) * max(1.0, total / in_scope)
    return min(MAX_EF_SEARCH, math.ceil(wanted))


def _fuse(weighted_lists: list[tuple[float, list[int]]], rrf_k: int) -> list[tuple[int, float]]:
    """Weighted reciprocal rank fusion: Σ weight/(rrf_k + rank) over the lists holding the chunk."""
    scores: dict[int, float] = defaultdict(float)
    for weight, ranked in weighted_lists:
        for rank, chunk_id in enumerate(ranked, start=1):
            scores[chunk_id] += weight / (rrf_k + rank)
    ordered = sorted(scores, key=lambda chunk_id: (-scores[chunk_id], chunk_id))
    return [(chunk_id, scores[chunk_id]) for chunk_id in ordered]


def _fuse_documents(
    weighted_lists: list[tuple[float, list[int]]],
    rrf_k: int,
    fused: list[tuple[int, float]],
    document_of: dict[int, int],
) -> list[tuple[int, float]]:
    """Rank documents, not chunks: in each list a document takes the rank of its best chunk (its
    other chunks do not push other documents down), the documents are fused as chunks are, and each
    contributes its best fused chunk in that order; the other chunks follow in fused order. A document
    cut into many chunks otherwise fills a list with itself and spreads its evidence thin."""
    document_lists = []
    for weight, ranked in weighted_lists:
        seen: dict[int, int] = {}
        for chunk_id in ranked:
            seen.setdefault(document_of[chunk_id], chunk_id)
        document_lists.append((weight, list(seen)))
    document_order = [document_id for document_id, _ in _fuse(document_lists, rrf_k)]
    best_chunk: dict[int, tuple[int, float]] = {}
    for chunk_id, score in fused:
        best_chunk.setdefault(document_of[chunk_id], (chunk_id, score))
    leaders = [best_chunk[document_id] for document_id in document_order]
    led = {chunk_id for chunk_id, _ in leaders}
    return [*leaders, *((chunk_id, score) for chunk_id, score in fused if chunk_id not in led)]


# Where a question that names several things splits ("X and Y", "X versus Y", "X or Y", lists).
_PART_SEPARATOR = re.compile(r"\s*(?:\b(?:and|or|versus|vs\.?|compared (?:to|with))\b|[,;?])\s*", re.IGNORECASE)
MAX_QUERY_PARTS = 3


def _query_parts(query: str) -> list[str]:
    """The parts of a question naming several things, each searched too (its lists weighing
    ``part_weight``): one document per part can then reach the top, where the whole question's lists
    favour whichever part its wording leans to. None for a question of one part."""
    parts = [part for part in _PART_SEPARATOR.split(query) if part and any(char.isalnum() for char in part)]
    return parts[:MAX_QUERY_PARTS] if len(parts) > 1 else []


def _details(
    winners: list[tuple[int, float]],
    text_ranked: list[int],
    vector_lists: list[list[int]],
    distances: dict[int, float],
) -> list[RetrievedChunk]:
    if not winners:
        return []
    text_ranks = {chunk_id: rank for rank, chunk_id in enumerate(text_ranked, start=1)}
    vector_ranks: dict[int, int] = {}
    for ranked in vector_lists:
        for rank, chunk_id in enumerate(ranked, start=1):
            vector_ranks.setdefault(chunk_id, rank)
    with connection.cursor() as cursor:
        cursor.execute(_DETAILS_QUERY, [[chunk_id for chunk_id, _ in winners]])
        rows = {row[0]: row for row in cursor.fetchall()}
    results = []
    for chunk_id, score in winners:
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
                score=round(score, 6),
                vector_rank=vector_ranks.get(chunk_id),
                text_rank=text_ranks.get(chunk_id),
                similarity=None if distance is None else round(1.0 - distance, 6),
            )
        )
    return results
