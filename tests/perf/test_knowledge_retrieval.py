"""Retrieval latency and ANN recall at 10,000 and 100,000 chunks in one knowledge base
(targets at 100k: ``retrieve`` p95 < 30 ms with HNSW recall@10 ≥ 0.95).

Data. Embedding 100,000 chunks with the local model on two cores would take an hour, so the
chunks are built from real embeddings:

- 3,000 base passages: generated handbook prose (tests/perf/knowledge_corpus.py, 24 topics) cut
  by the real chunker, embedded once with the local all-MiniLM-L6-v2 and cached under
  var/bench/ (the generator is seeded, so the cache is only a shortcut);
- chunks 1-3,000 are those passages with their real embeddings; every further chunk takes a base
  passage ``b`` at random and a partner ``p`` from the same topic and gets
  ``normalise(e_b + w·e_p + g)``, w ~ U(0, 0.5) and ``g`` isotropic Gaussian noise of expected
  norm 0.5, and as text a shuffle of sentences of the two passages (the same topic's words,
  for the full-text half). The report gives the resulting similarity structure, since HNSW
  recall depends on it (a variant built from mixtures of three same-topic passages, with less
  noise, gave the same recall within 0.01);
- 200 queries ("questions"): single sentences newly generated from the same topics (in no chunk),
  embedded by ``retrieve`` itself through ``query_embedding`` (cold, timed), then cached in Redis;
- for recall only, 200 new paragraphs ("passages", shaped like the chunks), embedded once and
  cached: HNSW recall depends on how far the queries lie from the indexed vectors, and a short
  question lies much farther from 100-word chunks than a passage does.

The chunks live in one knowledge base of a tenant of their own (``bench-retrieval``), created
for the run and deleted at the end (dropping its schema is the fastest clean-up), so the scope
is the whole tenant and ``retrieve`` scales nothing by selectivity. Rows are loaded with a binary
COPY; the HNSW index is dropped for each load and rebuilt with the exact definition it had
(CREATE INDEX, maintenance_work_mem raised for the build), then VACUUM ANALYZE. The table grows
from 10k to 100k: the same tenant and knowledge base serve both levels.

Measured per level, after untimed warm-up calls:

- ``retrieve(...)`` (limit 5, the chat engine's call), query embeddings cached, once per
  question (within a time budget), with its parts timed by wrapping them (full-text candidates,
  vector candidates, fusion, knowledge-base lookup);
- the vector SQL exactly as ``retrieve`` builds it (``knowledge.retrieval._VECTOR_QUERY``):
  approximate (HNSW) at several ``hnsw.ef_search`` values, and exact (ordered by
  ``(distance) + 0``, which keeps the planner off the index), LIMIT of retrieve's candidates per list;
- recall@10 of each approximate run against the exact run of the same query, for the questions
  and for the passages;
- EXPLAIN ANALYZE of the vector SQL (the HNSW index must be used) and of the full-text statements
  retrieve actually sent.

The generated corpus has a small vocabulary (every lexeme recurs in thousands of chunks), so the
full-text passes match far more rows than they would in real documents: their times here are an
upper bound.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import tenant_context
from pgvector.psycopg import register_vector
from psycopg import sql

from knowledge import retrieval
from knowledge.chunking import chunk_sections
from knowledge.embedders import get_embedder
from knowledge.models import Chunk, Document
from knowledge.retrieval import RetrievalTrace, query_embedding, retrieve
from knowledge.services import document_terms_refresh, knowledge_base_create
from tenants.models import Tenant
from tenants.services import tenant_create, tenant_delete
from tests.perf import knowledge_corpus
from tests.perf.reporting import (
    JSON_DIRECTORY,
    environment_markdown,
    markdown_table,
    percentile,
    report_write,
    run_environment,
    text_table,
)

SEED = 20261122
BASE_PAGES = 800  # ~3,100 chunks; the first BASE_PASSAGES are used
BASE_PASSAGES = 3000
QUERY_COUNT = 200
LEVELS = (10_000, 100_000)
CHUNKS_PER_DOCUMENT = 1000
PARTNER_WEIGHT_MAX = 0.5
NOISE_NORM = 0.5
EF_SEARCH_VALUES = (40, 100, 200, 400)
RETRIEVE_LIMIT = 5
RETRIEVE_WARMUP_QUERIES = 20
# retrieve() is timed on the queries in turn until all are done or this budget is spent (a slow
# level then reports fewer samples rather than running for many minutes).
RETRIEVE_BUDGET_SECONDS = 60.0
RECALL_AT = 10
SIMILARITY_SAMPLE = 300  # chunks whose nearest neighbours describe the data
TENANT_SLUG = "bench-retrieval"
DIMENSIONS = 384
INDEX_NAME = f"chunk_embedding_hnsw_{DIMENSIONS}"
# The HNSW graph of 100k x 384 floats takes ~200 MB while it is built; with the server's default
# 64 MB pgvector falls back to a much slower on-disk build.
BUILD_MAINTENANCE_WORK_MEM = "1GB"
EMBED_BATCH = 256
LOCAL_EMBEDDER = {"kind": "local"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BasePassages:
    texts: list[str]
    headings: list[str]
    pages: list[int]
    token_counts: list[int]
    topics: np.ndarray  # topic number per passage
    vectors: np.ndarray  # float32, unit length, one row per passage
    embedding_seconds: float  # 0 when read from the cache


def _base_passages() -> BasePassages:
    pages = list(knowledge_corpus.pages(SEED, BASE_PAGES))
    pieces = chunk_sections(
        knowledge_corpus.sections(pages),
        max_tokens=settings.KNOWLEDGE_CHUNK_TOKENS,
        overlap_tokens=settings.KNOWLEDGE_CHUNK_OVERLAP,
    )[:BASE_PASSAGES]
    assert len(pieces) == BASE_PASSAGES
    topic_names = [topic.name for topic in knowledge_corpus.TOPICS]
    topics = np.array([topic_names.index(piece.heading.split(" \u203a ")[0]) for piece in pieces])
    embedder = get_embedder(LOCAL_EMBEDDER)
    name = knowledge_corpus.fingerprint(
        SEED, BASE_PAGES, BASE_PASSAGES, settings.KNOWLEDGE_CHUNK_TOKENS, settings.KNOWLEDGE_CHUNK_OVERLAP, embedder.key
    )
    path = JSON_DIRECTORY / f"knowledge-passages-{name}.npy"
    embedding_seconds = 0.0
    if path.exists():
        vectors = np.load(path)
    else:
        started = time.perf_counter()
        texts = [piece.text for piece in pieces]
        vectors = np.concatenate(
            [
                np.asarray(embedder.embed_documents(texts[start : start + EMBED_BATCH]), dtype=np.float32)
                for start in range(0, len(texts), EMBED_BATCH)
            ]
        )
        embedding_seconds = time.perf_counter() - started
        JSON_DIRECTORY.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, vectors)
        partial.rename(path)
    assert vectors.shape == (BASE_PASSAGES, DIMENSIONS)
    return BasePassages(
        texts=[piece.text for piece in pieces],
        headings=[piece.heading or "" for piece in pieces],
        pages=[piece.page or 1 for piece in pieces],
        token_counts=[piece.token_count for piece in pieces],
        topics=topics,
        vectors=vectors,
        embedding_seconds=embedding_seconds,
    )


@dataclass(frozen=True, slots=True)
class Corpus:
    base_of: np.ndarray  # base passage of each chunk
    vectors: np.ndarray  # float32 (chunks x DIMENSIONS), unit length
    texts: list[str]


def _corpus(base: BasePassages, count: int) -> Corpus:
    """Chunks 0..count-1: the base passages themselves, then mixtures of same-topic pairs plus noise."""
    generator = np.random.default_rng(SEED)
    synthetic = count - BASE_PASSAGES
    members = {topic: np.flatnonzero(base.topics == topic) for topic in np.unique(base.topics)}
    base_of = generator.integers(0, BASE_PASSAGES, synthetic)
    partner_of = np.array([generator.choice(members[base.topics[index]]) for index in base_of])
    weights = generator.uniform(0.0, PARTNER_WEIGHT_MAX, (synthetic, 1)).astype(np.float32)
    noise = generator.standard_normal((synthetic, DIMENSIONS), dtype=np.float32) * (NOISE_NORM / math.sqrt(DIMENSIONS))
    mixed = base.vectors[base_of] + weights * base.vectors[partner_of] + noise
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)

    text_random = random.Random(SEED)
    sentences = [_SENTENCE_END.split(text) for text in base.texts]
    texts = list(base.texts)
    for index, partner in zip(base_of, partner_of, strict=True):
        own = sentences[index]
        pool = own + sentences[partner]
        texts.append(" ".join(text_random.sample(pool, len(own))))
    return Corpus(
        base_of=np.concatenate([np.arange(BASE_PASSAGES), base_of]),
        vectors=np.concatenate([base.vectors, mixed]),
        texts=texts,
    )


def _query_texts() -> list[str]:
    """One new sentence per query, topics in turn: like a user's question, in no chunk."""
    generator = random.Random(SEED + 1)
    topics = knowledge_corpus.TOPICS
    return [knowledge_corpus.sentence(generator, topics[number % len(topics)]) for number in range(QUERY_COUNT)]


def _passage_queries() -> tuple[list[str], np.ndarray]:
    """New paragraphs (3-7 sentences) from the topics in turn, embedded with the local model (cached):
    queries shaped like the chunks themselves, for comparison with the one-sentence questions."""
    generator = random.Random(SEED + 3)
    topics = knowledge_corpus.TOPICS
    texts = [knowledge_corpus.paragraph(generator, topics[number % len(topics)]) for number in range(QUERY_COUNT)]
    embedder = get_embedder(LOCAL_EMBEDDER)
    name = knowledge_corpus.fingerprint(SEED + 3, QUERY_COUNT, embedder.key)
    path = JSON_DIRECTORY / f"knowledge-passage-queries-{name}.npy"
    if path.exists():
        return texts, np.load(path)
    vectors = np.asarray(embedder.embed_documents(texts), dtype=np.float32)
    JSON_DIRECTORY.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, vectors)
    partial.rename(path)
    return texts, vectors


def _query_similarities(corpus: Corpus, count: int, vectors: np.ndarray) -> dict[str, float]:
    """Cosine similarity of the queries to their nearest and 10th nearest chunk (exact, in numpy)."""
    ordered = np.sort(np.asarray(vectors, dtype=np.float32) @ corpus.vectors[:count].T, axis=1)
    return {
        "nearest_p50": round(float(np.median(ordered[:, -1])), 3),
        "tenth_nearest_p50": round(float(np.median(ordered[:, -RECALL_AT])), 3),
    }


# --- loading ------------------------------------------------------------------------------------


def _bulk_connection(schema_name: str) -> psycopg.Connection:
    """A connection of its own for COPY and DDL, so nothing is registered on Django's."""
    settings_dict = connection.settings_dict
    bulk = psycopg.connect(
        host=settings_dict["HOST"] or None,
        port=settings_dict["PORT"] or None,
        user=settings_dict["USER"] or None,
        password=settings_dict.get("PASSWORD") or None,
        dbname=settings_dict["NAME"],
        autocommit=True,
    )
    bulk.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(schema_name)))
    register_vector(bulk)
    return bulk


@dataclass(frozen=True, slots=True)
class LoadTimings:
    copy_s: float
    terms_s: float  # document_terms_refresh of the new documents
    index_build_s: float
    vacuum_analyze_s: float
    table_mb: float
    index_mb: float


def _load(
    bulk: psycopg.Connection,
    *,
    schema_name: str,
    knowledge_base_id: int,
    base: BasePassages,
    corpus: Corpus,
    start: int,
    end: int,
) -> LoadTimings:
    """Chunks start..end-1 into the knowledge base (documents of CHUNKS_PER_DOCUMENT chunks), the HNSW
    index rebuilt afterwards with its own definition."""
    documents = Document.objects.bulk_create(
        [
            Document(
                knowledge_base_id=knowledge_base_id,
                title=f"Handbook part {number + 1}",
                kind="pdf",
                status=Document.Status.READY,
                progress=1.0,
                chunk_count=CHUNKS_PER_DOCUMENT,
                page_count=CHUNKS_PER_DOCUMENT // 4,
                embedded_with=get_embedder(LOCAL_EMBEDDER).key,
            )
            for number in range(start // CHUNKS_PER_DOCUMENT, end // CHUNKS_PER_DOCUMENT)
        ]
    )
    (definition,) = bulk.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s", [schema_name, INDEX_NAME]
    ).fetchone()
    bulk.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema_name, INDEX_NAME)))

    started = time.perf_counter()
    columns = "document_id, knowledge_base_id, position, text, page, heading, title, token_count, dimensions, embedding"
    with bulk.cursor() as cursor, cursor.copy(f"COPY knowledge_chunk ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "int8", "int4", "text", "int4", "varchar", "varchar", "int4", "int2", "vector"])
        for index in range(start, end):
            base_index = int(corpus.base_of[index])
            copy.write_row(
                (
                    documents[(index - start) // CHUNKS_PER_DOCUMENT].pk,
                    knowledge_base_id,
                    index % CHUNKS_PER_DOCUMENT,
                    corpus.texts[index],
                    base.pages[base_index],
                    base.headings[base_index],
                    documents[(index - start) // CHUNKS_PER_DOCUMENT].title,
                    base.token_counts[base_index],
                    DIMENSIONS,
                    corpus.vectors[index],
                )
            )
    copy_seconds = time.perf_counter() - started

    # BM25F's statistics, as ingestion writes them (in its transaction, here after the COPY).
    started = time.perf_counter()
    for document in documents:
        first = start + documents.index(document) * CHUNKS_PER_DOCUMENT
        tokens = sum(
            base.token_counts[int(corpus.base_of[index])] for index in range(first, first + CHUNKS_PER_DOCUMENT)
        )
        Document.objects.filter(pk=document.pk).update(token_count=tokens)
        document_terms_refresh(document_id=document.pk)
    terms_seconds = time.perf_counter() - started

    started = time.perf_counter()
    bulk.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(BUILD_MAINTENANCE_WORK_MEM)))
    bulk.execute(definition)
    index_seconds = time.perf_counter() - started
    (rebuilt,) = bulk.execute(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = %s", [schema_name, INDEX_NAME]
    ).fetchone()
    assert rebuilt == definition

    started = time.perf_counter()
    bulk.execute("VACUUM ANALYZE knowledge_chunk")
    bulk.execute("VACUUM ANALYZE knowledge_document")
    vacuum_seconds = time.perf_counter() - started
    table_bytes, index_bytes = bulk.execute(
        "SELECT pg_table_size('knowledge_chunk'), pg_relation_size(%s::regclass)", [f"{schema_name}.{INDEX_NAME}"]
    ).fetchone()
    return LoadTimings(
        copy_s=copy_seconds,
        terms_s=terms_seconds,
        index_build_s=index_seconds,
        vacuum_analyze_s=vacuum_seconds,
        table_mb=table_bytes / 1024**2,
        index_mb=index_bytes / 1024**2,
    )


# --- measuring ----------------------------------------------------------------------------------


def _vector_sql(*, exact: bool) -> str:
    """The vector query exactly as retrieve builds it for one knowledge base, no document filter."""
    distance = f"c.embedding::vector({DIMENSIONS}) <=> %s::vector({DIMENSIONS})"
    order = f"({distance}) + 0, c.id" if exact else distance
    return retrieval._VECTOR_QUERY.format(dimensions=DIMENSIONS, document_filter="", order=order)


def _literal(vector: list[float]) -> str:
    return "[" + ",".join(repr(float(value)) for value in vector) + "]"


def _vector_search(
    literal: str, knowledge_base_id: int, *, ef_search: int | None, limit: int
) -> tuple[list[int], float]:
    """Chunk ids nearest first, and the seconds the SELECT took (exact when ``ef_search`` is None)."""
    with transaction.atomic(), connection.cursor() as cursor:
        if ef_search is not None:
            cursor.execute("SET LOCAL hnsw.ef_search = %s", [ef_search])
        started = time.perf_counter()
        cursor.execute(_vector_sql(exact=ef_search is None), [literal, [knowledge_base_id], literal, limit])
        rows = cursor.fetchall()
        return [row[0] for row in rows], time.perf_counter() - started


def _explain(literal: str, knowledge_base_id: int, *, ef_search: int | None, limit: int) -> str:
    with transaction.atomic(), connection.cursor() as cursor:
        if ef_search is not None:
            cursor.execute("SET LOCAL hnsw.ef_search = %s", [ef_search])
        cursor.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + _vector_sql(exact=ef_search is None),
            [literal, [knowledge_base_id], literal, limit],
        )
        return "\n".join(row[0] for row in cursor.fetchall())


def _explain_statement(statement: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement)
        return "\n".join(row[0] for row in cursor.fetchall())


class PartClock:
    """Seconds of each call of the wrapped functions, by name (installed with monkeypatch)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.recording = False

    def timed(self, name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self.recording:
                    self.samples[name].append(time.perf_counter() - started)

        return wrapper

    @contextmanager
    def recorded(self) -> Iterator[None]:
        self.samples.clear()
        self.recording = True
        try:
            yield
        finally:
            self.recording = False


def _retrieve_path(knowledge_base_id: int, query: str) -> dict:
    """Which vector search retrieve ran for this scope (exact, or HNSW with which ef_search), and the
    full-text statements it ran (one per pass), as sent."""
    with CaptureQueriesContext(connection) as captured:
        retrieve(knowledge_base_ids=[knowledge_base_id], query=query, limit=RETRIEVE_LIMIT)
    statements = [captured_query["sql"] for captured_query in captured.captured_queries]
    vector_sql = next(statement for statement in statements if "<=>" in statement)
    ef_search = next(
        (
            int(match.group(1))
            for statement in statements
            if (match := re.search(r"hnsw\.ef_search = (\d+)", statement))
        ),
        None,
    )
    exact = ") + 0" in vector_sql
    return {
        "path": "exact" if exact else "hnsw",
        "ef_search": ef_search,
        "statements": len(statements),
        "label": "exact scan" if exact else f"HNSW, ef_search {ef_search}",
        "text_statements": [statement for statement in statements if "@@" in statement],
    }


def _latency(samples: list[float]) -> dict[str, float | int]:
    ordered = sorted(samples)
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) * 1e3, 3),
        "p95_ms": round(percentile(ordered, 0.95) * 1e3, 3),
        "p99_ms": round(percentile(ordered, 0.99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
        "mean_ms": round(sum(ordered) / len(ordered) * 1e3, 3),
    }


def _nearest_similarities(corpus: Corpus, count: int) -> dict[str, float]:
    """Cosine similarity of a sample of chunks to their 1st and 10th nearest other chunk."""
    generator = np.random.default_rng(SEED + 2)
    sample = generator.choice(count, SIMILARITY_SAMPLE, replace=False)
    similarities = corpus.vectors[sample] @ corpus.vectors[:count].T
    similarities[np.arange(SIMILARITY_SAMPLE), sample] = -1.0
    ordered = np.sort(similarities, axis=1)
    return {
        "nearest_p50": round(float(np.median(ordered[:, -1])), 3),
        "nearest_p5": round(float(np.percentile(ordered[:, -1], 5)), 3),
        "nearest_p95": round(float(np.percentile(ordered[:, -1], 95)), 3),
        "tenth_nearest_p50": round(float(np.median(ordered[:, -RECALL_AT])), 3),
    }


def _recall(literals: list[str], knowledge_base_id: int, candidates: int) -> tuple[list[float], dict[int, dict]]:
    """Exact search times, and per ef_search the recall@10 of the HNSW search against it and its times."""
    exact_ids: list[list[int]] = []
    exact_samples: list[float] = []
    _vector_search(literals[-1], knowledge_base_id, ef_search=None, limit=candidates)  # warm-up
    for literal in literals:
        ids, seconds = _vector_search(literal, knowledge_base_id, ef_search=None, limit=candidates)
        exact_ids.append(ids[:RECALL_AT])
        exact_samples.append(seconds)
    assert all(len(ids) == RECALL_AT for ids in exact_ids)

    approximate: dict[int, dict] = {}
    for ef_search in EF_SEARCH_VALUES:
        for literal in literals:  # warm-up: the index pages this ef_search visits
            _vector_search(literal, knowledge_base_id, ef_search=ef_search, limit=candidates)
        recalls, samples = [], []
        for literal, truth in zip(literals, exact_ids, strict=True):
            ids, seconds = _vector_search(literal, knowledge_base_id, ef_search=ef_search, limit=candidates)
            recalls.append(len(set(ids[:RECALL_AT]) & set(truth)) / RECALL_AT)
            samples.append(seconds)
        assert all(0.0 <= recall <= 1.0 for recall in recalls)
        approximate[ef_search] = {
            "recall_at_10": round(sum(recalls) / len(recalls), 4),
            "recall_at_10_min": min(recalls),
            "queries_recall_below_0_9": sum(recall < 0.9 for recall in recalls),
            "sql": _latency(samples),
        }
    return exact_samples, approximate


def _measure_level(
    level: int,
    knowledge_base_id: int,
    queries: list[str],
    vectors: list[list[float]],
    passage_vectors: np.ndarray,
    clock: PartClock,
) -> dict:
    literals = [_literal(vector) for vector in vectors]
    path = _retrieve_path(knowledge_base_id, queries[0])

    for query in queries[-RETRIEVE_WARMUP_QUERIES:]:  # warm-up: buffers, plans, the Redis connection
        retrieve(knowledge_base_ids=[knowledge_base_id], query=query, limit=RETRIEVE_LIMIT)
    retrieve_samples: list[float] = []
    traces: list[RetrievalTrace] = []
    budget_ends = time.perf_counter() + RETRIEVE_BUDGET_SECONDS
    with clock.recorded():
        for query in queries:
            trace = RetrievalTrace()
            started = time.perf_counter()
            retrieve(knowledge_base_ids=[knowledge_base_id], query=query, limit=RETRIEVE_LIMIT, trace=trace)
            retrieve_samples.append(time.perf_counter() - started)
            traces.append(trace)
            if started > budget_ends:
                break
        parts = {name: list(samples) for name, samples in clock.samples.items()}

    candidates = max(RETRIEVE_LIMIT, retrieval.DEFAULT_PARAMETERS.depth)
    exact_samples, approximate = _recall(literals, knowledge_base_id, candidates)
    passage_literals = [_literal(vector) for vector in passage_vectors]
    _, passage_approximate = _recall(passage_literals, knowledge_base_id, candidates)

    default_ef = settings.KNOWLEDGE_HNSW_EF_SEARCH
    plans = {
        "approximate": _explain(literals[0], knowledge_base_id, ef_search=default_ef, limit=candidates),
        "exact": _explain(literals[0], knowledge_base_id, ef_search=None, limit=candidates),
        **{
            f"text pass {number}": _explain_statement(statement)
            for number, statement in enumerate(path.pop("text_statements"), start=1)
        },
    }
    assert INDEX_NAME in plans["approximate"], plans["approximate"]
    assert INDEX_NAME not in plans["exact"], plans["exact"]
    return {
        "chunks": level,
        "retrieve_path": path,
        "retrieve": _latency(retrieve_samples),
        "retrieve_parts": {name: _latency(samples) for name, samples in parts.items()},
        "full_text": {
            "scored_matches_mean": round(sum(trace.scored_matches for trace in traces) / len(traces), 1),
            "scored_matches_max": max(trace.scored_matches for trace in traces),
            "exact_share": round(sum(trace.text_exact for trace in traces) / len(traces), 4),
            "passes_mean": round(sum(len(trace.passes) for trace in traces) / len(traces), 2),
        },
        "exact_sql": _latency(exact_samples),
        "approximate": {str(ef): figures for ef, figures in approximate.items()},
        "approximate_passage_queries": {str(ef): figures for ef, figures in passage_approximate.items()},
        "plans": plans,
    }


def _plan_summary(plan: str) -> str:
    """The plan's scan of the chunks and the rows it produced, its execution time, and whether JIT ran."""
    lines = plan.splitlines()
    scan = next((line.strip() for line in lines if "Scan" in line and " on knowledge_chunk" in line), lines[0].strip())
    rows = re.search(r"actual time=\S+ rows=(\d+)", scan)
    execution = next((line.strip() for line in lines if line.startswith("Execution Time")), "")
    jit = " JIT compiled." if any(line.startswith("JIT:") for line in lines) else ""
    node = re.sub(r"  \(cost=.*", "", scan.lstrip("-> "))
    produced = f" ({int(rows.group(1)):,} rows)" if rows else ""
    return f"{node}{produced}; {execution}.{jit}"


# --- the benchmark ------------------------------------------------------------------------------


def test_knowledge_retrieval_latency_and_recall(tenant_pair, django_db_blocker, monkeypatch, request):
    clock = PartClock()
    for name in ("_text_candidates", "_vector_candidates", "_fuse", "_details", "_knowledge_bases"):
        monkeypatch.setattr(retrieval, name, clock.timed(name, getattr(retrieval, name)))

    run_started = time.perf_counter()
    base = _base_passages()
    corpus = _corpus(base, max(LEVELS))
    queries = _query_texts()
    passage_queries, passage_vectors = _passage_queries()
    embedder = get_embedder(LOCAL_EMBEDDER)
    embedder.embed_query("The model loads once per process.")

    with django_db_blocker.unblock():
        environment = run_environment(request.config)
        stale = Tenant.objects.filter(slug=TENANT_SLUG).first()
        if stale is not None:  # left by an interrupted run
            tenant_delete(tenant=stale)
        tenant = tenant_create(name="Benchmark: retrieval", slug=TENANT_SLUG)
        bulk = _bulk_connection(tenant.schema_name)
        levels: dict[int, dict] = {}
        loads: dict[int, LoadTimings] = {}
        try:
            with tenant_context(tenant):
                knowledge_base = knowledge_base_create(name="Handbook")
                cold: list[float] = []
                for query in queries:  # the query embeddings, computed by the model (cache misses)
                    started = time.perf_counter()
                    query_embedding(LOCAL_EMBEDDER, query)
                    cold.append(time.perf_counter() - started)
                warm: list[float] = []
                vectors = []
                for query in queries:
                    started = time.perf_counter()
                    vectors.append(query_embedding(LOCAL_EMBEDDER, query))
                    warm.append(time.perf_counter() - started)
                loaded = 0
                for level in LEVELS:
                    loads[level] = _load(
                        bulk,
                        schema_name=tenant.schema_name,
                        knowledge_base_id=knowledge_base.pk,
                        base=base,
                        corpus=corpus,
                        start=loaded,
                        end=level,
                    )
                    loaded = level
                    assert Chunk.objects.filter(knowledge_base_id=knowledge_base.pk).count() == level
                    levels[level] = _measure_level(level, knowledge_base.pk, queries, vectors, passage_vectors, clock)
                    levels[level]["load"] = loads[level]
                    levels[level]["similarity"] = _nearest_similarities(corpus, level)
                    levels[level]["query_similarity"] = {
                        "questions": _query_similarities(corpus, level, np.asarray(vectors)),
                        "passages": _query_similarities(corpus, level, passage_vectors),
                    }
        finally:
            bulk.close()
            connection.set_schema_to_public()
            tenant_delete(tenant=tenant)
    total_seconds = time.perf_counter() - run_started

    _report(
        environment=environment,
        base=base,
        queries=queries,
        passage_queries=passage_queries,
        cold=cold,
        warm=warm,
        levels=levels,
        total_seconds=total_seconds,
    )


def _report(
    *, environment, base: BasePassages, queries, passage_queries, cold, warm, levels: dict[int, dict], total_seconds
) -> None:
    default_ef = settings.KNOWLEDGE_HNSW_EF_SEARCH
    latency_headers = ["chunks", "what", "path", "calls", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    latency_rows = []
    part_labels = {
        "_text_candidates": "of which: full-text candidates (BM25F, SQL)",
        "_vector_candidates": "of which: vector candidates (cached embedding, counts, SQL)",
        "_fuse": "of which: fusion",
        "_details": "of which: chunk details (SQL)",
        "_knowledge_bases": "of which: knowledge-base lookup (SQL)",
    }
    for level, figures in levels.items():
        rows = [("retrieve(), limit 5, warm embedding cache", figures["retrieve_path"]["label"], figures["retrieve"])]
        rows += [
            (label, "", figures["retrieve_parts"][name])
            for name, label in part_labels.items()
            if name in figures["retrieve_parts"]
        ]
        rows += [
            (
                f"vector SQL, approximate, LIMIT {retrieval.DEFAULT_PARAMETERS.depth}",
                f"HNSW, ef_search {default_ef}",
                figures["approximate"][str(default_ef)]["sql"],
            ),
            (f"vector SQL, exact, LIMIT {retrieval.DEFAULT_PARAMETERS.depth}", "exact scan", figures["exact_sql"]),
        ]
        for what, path, latency in rows:
            latency_rows.append(
                [f"{level:,}", what, path or "-", latency["count"]]
                + [f"{latency[key]:.2f}" for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
            )
    recall_headers = [
        "chunks",
        "queries",
        "ef_search",
        "recall@10",
        "min",
        "queries < 0.9",
        "p50 ms",
        "p95 ms",
        "p99 ms",
    ]
    query_kinds = {"approximate": "questions", "approximate_passage_queries": "passages"}
    recall_rows = [
        [
            f"{level:,}",
            query_kinds[kind],
            ef_search,
            f"{approximate['recall_at_10']:.3f}",
            f"{approximate['recall_at_10_min']:.1f}",
            approximate["queries_recall_below_0_9"],
            *(f"{approximate['sql'][key]:.2f}" for key in ("p50_ms", "p95_ms", "p99_ms")),
        ]
        for level, figures in levels.items()
        for kind in query_kinds
        for ef_search, approximate in figures[kind].items()
    ]
    data_headers = [
        "chunks",
        "load (COPY) s",
        "BM25 statistics s",
        "HNSW build s",
        "VACUUM ANALYZE s",
        "table MB",
        "index MB",
        "nearest p5/p50/p95",
        "10th nearest p50",
        "questions: nearest / 10th p50",
        "passages: nearest / 10th p50",
    ]
    data_rows = [
        [
            f"{level:,}",
            f"{figures['load'].copy_s:.1f}",
            f"{figures['load'].terms_s:.1f}",
            f"{figures['load'].index_build_s:.1f}",
            f"{figures['load'].vacuum_analyze_s:.1f}",
            f"{figures['load'].table_mb:.0f}",
            f"{figures['load'].index_mb:.0f}",
            "{nearest_p5:.2f} / {nearest_p50:.2f} / {nearest_p95:.2f}".format(**figures["similarity"]),
            f"{figures['similarity']['tenth_nearest_p50']:.2f}",
            "{nearest_p50:.2f} / {tenth_nearest_p50:.2f}".format(**figures["query_similarity"]["questions"]),
            "{nearest_p50:.2f} / {tenth_nearest_p50:.2f}".format(**figures["query_similarity"]["passages"]),
        ]
        for level, figures in levels.items()
    ]
    cold_latency, warm_latency = _latency(cold), _latency(warm)
    embedding_line = (
        f"Query embedding (`query_embedding`, {len(queries)} queries of {_mean_words(queries):.0f} words): cold "
        f"(the model, cache miss) p50 {cold_latency['p50_ms']:.1f} ms, p95 {cold_latency['p95_ms']:.1f} ms, "
        f"p99 {cold_latency['p99_ms']:.1f} ms; from the Redis cache p50 {warm_latency['p50_ms']:.2f} ms, "
        f"p95 {warm_latency['p95_ms']:.2f} ms. The latencies above use the cache."
    )
    target = levels[max(levels)]
    target_ef = target["approximate"].get(str(default_ef), {})
    verdict = (
        f"At {max(levels):,} chunks: retrieve p95 {target['retrieve']['p95_ms']:.1f} ms (target < 30 ms), "
        f"HNSW recall@10 {target_ef.get('recall_at_10', float('nan')):.3f} at the default ef_search {default_ef} "
        f"(target ≥ 0.95)."
    )
    full_text_line = " ".join(
        f"Full text at {level:,} chunks: {figures['full_text']['scored_matches_mean']:.0f} matches scored per "
        f"question on average (max {figures['full_text']['scored_matches_max']}, bound "
        f"{retrieval.MAX_SCORED_MATCHES}), {figures['full_text']['passes_mean']:.1f} MaxScore passes, list proven "
        f"exact for {figures['full_text']['exact_share']:.0%} of the questions."
        for level, figures in levels.items()
    )
    method = (
        f"{BASE_PASSAGES:,} base passages (generated handbook prose, 24 topics, cut by the real chunker, "
        f"{_mean_words(base.texts):.0f} words each) embedded with the local all-MiniLM-L6-v2"
        + (f" in {base.embedding_seconds:.0f} s" if base.embedding_seconds else " (read from the cache in var/bench/)")
        + f"; chunks beyond them are normalise(e_b + w·e_p + g): a random base passage b, a partner p of the same "
        f"topic, w ~ U(0, {PARTNER_WEIGHT_MAX}), g isotropic Gaussian noise of norm ~{NOISE_NORM}, text a shuffle "
        f"of the two passages' sentences. One knowledge base in a tenant of its own, loaded by COPY, HNSW index "
        f'rebuilt with its own definition (m 16, ef_construction 64), VACUUM ANALYZE. Queries ("questions"): '
        f"{len(queries)} new single sentences from the same topics ({_mean_words(queries):.0f} words), in no chunk; "
        f'for recall also {len(passage_queries)} new paragraphs ("passages", {_mean_words(passage_queries):.0f} '
        f"words), shaped like the chunks. retrieve timed on each in turn after {RETRIEVE_WARMUP_QUERIES} "
        f"untimed calls, for at most {RETRIEVE_BUDGET_SECONDS:.0f} s per level (the calls column says how many "
        f"that made); the SQL variants timed on every query after a warm-up. {total_seconds:.0f} s in all."
    )
    plan_lines = [
        f"- {level:,} chunks, {kind}: {_plan_summary(figures['plans'][kind])}"
        for level, figures in levels.items()
        for kind in figures["plans"]
    ]

    print(f"\nKnowledge retrieval: {method}")
    print(text_table(latency_headers, latency_rows))
    print()
    print(text_table(recall_headers, recall_rows))
    print()
    print(text_table(data_headers, data_rows))
    print(embedding_line)
    print(full_text_line)
    print(verdict)
    print("\n".join(plan_lines))

    results = {
        "environment": environment,
        "method": {
            "base_passages": BASE_PASSAGES,
            "base_embedding_s": round(base.embedding_seconds, 1),
            "synthetic_vectors": f"normalise(e_b + U(0,{PARTNER_WEIGHT_MAX})*e_p + N(0, ({NOISE_NORM}^2/384) I))",
            "synthetic_text": "shuffle of sentences of the base passage and its partner",
            "queries": len(queries),
            "query_words_mean": round(_mean_words(queries), 1),
            "passage_queries": len(passage_queries),
            "passage_query_words_mean": round(_mean_words(passage_queries), 1),
            "retrieve_limit": RETRIEVE_LIMIT,
            "retrieve_warmup_queries": RETRIEVE_WARMUP_QUERIES,
            "retrieve_budget_s": RETRIEVE_BUDGET_SECONDS,
            "ef_search_values": list(EF_SEARCH_VALUES),
            "default_ef_search": default_ef,
            "exact_search_max_chunks": settings.KNOWLEDGE_EXACT_SEARCH_MAX_CHUNKS,
            "build_maintenance_work_mem": BUILD_MAINTENANCE_WORK_MEM,
        },
        "query_embedding_cold": cold_latency,
        "query_embedding_cached": warm_latency,
        "levels": {
            str(level): {
                **{key: value for key, value in figures.items() if key != "load"},
                "load": {
                    "copy_s": round(figures["load"].copy_s, 2),
                    "terms_s": round(figures["load"].terms_s, 2),
                    "index_build_s": round(figures["load"].index_build_s, 2),
                    "vacuum_analyze_s": round(figures["load"].vacuum_analyze_s, 2),
                    "table_mb": round(figures["load"].table_mb, 1),
                    "index_mb": round(figures["load"].index_mb, 1),
                },
            }
            for level, figures in levels.items()
        },
        "target": {"retrieve_p95_ms": 30, "recall_at_10": 0.95, "chunks": max(levels)},
        "total_s": round(total_seconds, 1),
    }
    markdown = "\n\n".join(
        [
            environment_markdown(environment),
            method,
            verdict,
            full_text_line,
            markdown_table(latency_headers, latency_rows),
            "Recall@10 of the HNSW search against the exact search of the same query, and its SQL time:",
            markdown_table(recall_headers, recall_rows),
            "The data (nearest: cosine similarity of a sample of chunks to their nearest and 10th nearest other "
            "chunk; and of the queries to their nearest and 10th nearest chunk, exact):",
            markdown_table(data_headers, data_rows),
            embedding_line,
            "Plans (EXPLAIN ANALYZE of the first query; the full plans are in the JSON):\n\n" + "\n".join(plan_lines),
        ]
    )
    report_write(
        name="knowledge_retrieval", title="Knowledge retrieval latency and recall", results=results, markdown=markdown
    )


def _mean_words(texts: list[str]) -> float:
    return sum(len(text.split()) for text in texts) / len(texts)
