"""Tenant-schema knowledge models: knowledge bases, documents and their embedded chunks."""

from __future__ import annotations

from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.utils import timezone
from pgvector.django import HnswIndex, VectorField

EMBEDDING_DIMENSIONS = 384  # all-MiniLM-L6-v2, the bundled default embedder


class KnowledgeBase(models.Model):
    name = models.CharField(max_length=200)
    embedder = models.CharField(max_length=100, default="local")
    dimensions = models.PositiveIntegerField(default=EMBEDDING_DIMENSIONS)
    version = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


class Document(models.Model):
    knowledge_base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=500)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.title


class Chunk(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    position = models.PositiveIntegerField()
    text = models.TextField()
    # Null until the chunk has been embedded (ingestion embeds in batches after storing the text).
    embedding = VectorField(dimensions=EMBEDDING_DIMENSIONS, null=True)
    search_vector = SearchVectorField(null=True)

    class Meta:
        ordering = ["document_id", "position"]
        indexes = [
            # The operator class is schema-qualified: pgvector lives in `public`, and tenant
            # schemas are cloned from a template by code that runs with a narrowed search_path.
            HnswIndex(
                name="chunk_embedding_hnsw",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["public.vector_cosine_ops"],
            ),
            GinIndex(name="chunk_search_vector_gin", fields=["search_vector"]),
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"
