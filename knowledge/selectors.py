"""Reads of the knowledge app. A missing id and another tenant's id look the same: 404."""

from __future__ import annotations

from django.db.models import Count, QuerySet, Sum

from knowledge.models import Document, KnowledgeBase
from tenants.errors import NotFound


def knowledge_base_list() -> QuerySet[KnowledgeBase]:
    return KnowledgeBase.objects.annotate(
        document_count=Count("documents", distinct=True), chunk_count=Sum("documents__chunk_count")
    ).order_by("id")


def knowledge_base_get(*, knowledge_base_id) -> KnowledgeBase:
    knowledge_base = knowledge_base_list().filter(pk=_as_id(knowledge_base_id)).first()
    if knowledge_base is None:
        raise NotFound(f"No knowledge base with id {knowledge_base_id!r}.", param="id")
    return knowledge_base


def document_list(*, knowledge_base: KnowledgeBase, status: str | None = None) -> QuerySet[Document]:
    documents = Document.objects.filter(knowledge_base=knowledge_base)
    if status:
        documents = documents.filter(status=status)
    return documents.order_by("-created_at", "-id")


def document_get(*, document_id) -> Document:
    document = Document.objects.select_related("knowledge_base").filter(pk=_as_id(document_id)).first()
    if document is None:
        raise NotFound(f"No document with id {document_id!r}.", param="id")
    return document


def _as_id(value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 0
    return number if 0 < number < 2**63 else 0
