"""Writes of the knowledge app."""

from __future__ import annotations

import re

from django.contrib.postgres.search import SearchVector
from django.db import transaction

from knowledge.models import Chunk, Document, KnowledgeBase
from tenants.errors import ValidationFailed

_PARAGRAPHS = re.compile(r"\n\s*\n")


def knowledge_base_create(*, name: str) -> KnowledgeBase:
    if not name.strip():
        raise ValidationFailed("Knowledge base name must not be empty.", param="name")
    return KnowledgeBase.objects.create(name=name.strip()[:200])


@transaction.atomic
def document_create_from_text(*, knowledge_base: KnowledgeBase, title: str, text: str) -> Document:
    """Store a plain-text document as paragraph chunks, searchable at once by full text.

    Embeddings are left for the ingestion pipeline to fill in batches.
    """
    paragraphs = [paragraph.strip() for paragraph in _PARAGRAPHS.split(text) if paragraph.strip()]
    if not paragraphs:
        raise ValidationFailed("The document has no text.", param="text")
    document = Document.objects.create(knowledge_base=knowledge_base, title=title.strip()[:500] or "Untitled")
    Chunk.objects.bulk_create(
        Chunk(document=document, position=position, text=paragraph) for position, paragraph in enumerate(paragraphs)
    )
    Chunk.objects.filter(document=document).update(search_vector=SearchVector("text", config="english"))
    KnowledgeBase.objects.filter(pk=knowledge_base.pk).update(version=knowledge_base.version + 1)
    return document
