"""Tenant-schema knowledge models: knowledge bases, documents (with their source bytes) and chunks."""

from __future__ import annotations

import uuid

from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from django.db.models import F, Func, Value
from django.utils import timezone
from pgvector.django import VectorField

EMBEDDING_DIMENSIONS = 384  # all-MiniLM-L6-v2, the bundled default embedder


def default_embedder() -> dict:
    return {"kind": "local"}


class KnowledgeBase(models.Model):
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    # Validated by knowledge.embedders.validate_embedder_config; may hold an API key (never output).
    embedder = models.JSONField(default=default_embedder)
    dimensions = models.PositiveSmallIntegerField(default=EMBEDDING_DIMENSIONS)
    # Validated by knowledge.reranking.validate_reranker_config; {} means no reranking. May hold an
    # API key (never output).
    reranker = models.JSONField(default=dict, blank=True)
    # Bumped whenever the content that retrieval can return changes (caches key on it).
    version = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Document(models.Model):
    class Source(models.TextChoices):
        FILE = "file"
        TEXT = "text"
        URL = "url"

    class Status(models.TextChoices):
        QUEUED = "queued"
        PROCESSING = "processing"
        READY = "ready"
        FAILED = "failed"

    knowledge_base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=500)
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.TEXT)
    source_url = models.URLField(max_length=2048, blank=True, default="")
    filename = models.CharField(max_length=255, blank=True, default="")
    kind = models.CharField(max_length=20, blank=True, default="")  # detected from content: pdf, docx, …
    size_bytes = models.BigIntegerField(default=0)
    # SHA-256 of the source bytes; identical content in the same knowledge base is not ingested twice.
    checksum = models.CharField(max_length=64, blank=True, default="", db_index=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True, default="")
    error_code = models.CharField(max_length=40, blank=True, default="")
    progress = models.FloatField(default=0.0)
    page_count = models.PositiveIntegerField(default=0)
    chunk_count = models.PositiveIntegerField(default=0)
    token_count = models.PositiveIntegerField(default=0)
    # Each (re)ingestion request gets a fresh id; a task carrying an older one is stale and exits.
    ingestion_id = models.UUIDField(default=uuid.uuid4)
    # The embedder key the current chunks were embedded with (re-embedding compares against it).
    embedded_with = models.CharField(max_length=300, blank=True, default="")
    # Written while processing; a document whose heartbeat stops is handed to another worker.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    ingested_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="document_status_heartbeat")]

    def __str__(self) -> str:
        return self.title


class DocumentContent(models.Model):
    """The document's source bytes, kept in PostgreSQL so any worker (and re-ingestion) can read them:
    web processes stay stateless without a shared filesystem. Separate from Document so that
    listing documents never reads them."""

    document = models.OneToOneField(Document, on_delete=models.CASCADE, primary_key=True, related_name="content")
    data = models.BinaryField()

    def __str__(self) -> str:
        return f"content of {self.document_id}"


# PostgreSQL's parser reads "numpy.linspace", "refund_policy.pdf" or "docs/setup" as one token (a
# host or file name): none of their words would match a question naming them. A dot, underscore or
# slash before a letter becomes a space, in the indexed fields and in the query alike; "3.5" stays.
SEARCHABLE_TEXT_PATTERN = "[._/]+(?=[[:alpha:]])"


def searchable_text(field_name: str) -> Func:
    return Func(
        F(field_name),
        Value(SEARCHABLE_TEXT_PATTERN),
        Value(" "),
        Value("g"),
        function="regexp_replace",
        output_field=models.TextField(),
    )


class Chunk(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    # Denormalised from the document: retrieval filters on it without a join.
    knowledge_base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="chunks")
    position = models.PositiveIntegerField()
    text = models.TextField()
    page = models.PositiveIntegerField(null=True, blank=True)
    heading = models.CharField(max_length=500, blank=True, default="")
    # Denormalised from the document when the chunk is written: full text weighs a title's words
    # without a join (a document's title is set before its chunks are, and never changed after).
    title = models.CharField(max_length=500, blank=True, default="")
    token_count = models.PositiveIntegerField(default=0)
    # One untyped vector column for every embedder; the ANN indexes are partial expression indexes,
    # one per supported dimension (see migration 0003), selected by ``dimensions``.
    dimensions = models.PositiveSmallIntegerField()
    embedding = VectorField()
    # Three fields for BM25F (knowledge.retrieval): the weight label says which field a position is in.
    # Dotted and snake_case names are split first (see searchable_text), as the query is.
    search_vector = models.GeneratedField(
        expression=SearchVector(searchable_text("title"), weight="A", config="english")
        + SearchVector(searchable_text("heading"), weight="B", config="english")
        + SearchVector(searchable_text("text"), weight="D", config="english"),
        output_field=SearchVectorField(),
        db_persist=True,
    )

    class Meta:
        ordering = ["document_id", "position"]
        constraints = [models.UniqueConstraint(fields=["document", "position"], name="chunk_document_position_unique")]
        indexes = [
            GinIndex(name="chunk_search_vector_gin", fields=["search_vector"]),
            models.Index(fields=["knowledge_base", "dimensions"], name="chunk_kb_dimensions"),
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"


# One partial HNSW index per dimension, in every tenant schema (migration 0003); keep in step with
# knowledge.embedders.SUPPORTED_DIMENSIONS.
ANN_INDEXED_DIMENSIONS = (384, 768, 1024, 1536)


class DocumentTerm(models.Model):
    """In how many of a document's chunks each lexeme occurs: BM25's document frequencies for a
    knowledge base are the sums over its documents. Kept per document so that ingesting one document
    writes only its own rows (no counter shared by concurrent ingestions), and written in the same
    transaction as the chunks (knowledge.services.document_terms_refresh)."""

    knowledge_base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="+")
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="terms")
    lexeme = models.TextField()
    chunks = models.PositiveIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["document", "lexeme"], name="document_term_unique")]
        # Retrieval sums one lexeme's rows of a knowledge base from this index alone.
        indexes = [
            models.Index(fields=["knowledge_base", "lexeme"], include=["chunks"], name="document_term_kb_lexeme")
        ]

    def __str__(self) -> str:
        return f"{self.document_id}:{self.lexeme}"
