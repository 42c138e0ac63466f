"""Writes of the knowledge app: knowledge bases, documents, and the ingestion pipeline.

Ingestion runs in a Celery worker (``knowledge.tasks``): fetch → detect → extract → chunk → embed in
batches → swap the document's chunks in one transaction. Readers therefore see either the previous
version of a document or the new one, never half of either; a failure at any step leaves the
previous chunks in place. Every (re)ingestion request gets a fresh ``ingestion_id``: a task carrying
an older id (a retry that lost the race, a redelivery after a crash) exits without writing.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Sum
from django.utils import timezone

from knowledge.chunking import chunk_sections
from knowledge.embedders import embedder_dimensions, get_embedder, validate_embedder_config
from knowledge.embedders.base import EmbedderError
from knowledge.extractors import ExtractionError, detect_kind, extract
from knowledge.fetching import FetchError, fetch_url, validate_url
from knowledge.models import Chunk, Document, DocumentContent, KnowledgeBase
from knowledge.reranking import validate_reranker_config
from tenants.config_epoch import config_changed
from tenants.errors import Conflict, ParleyError, ValidationFailed
from tenants.outbound import OutboundRefused, validate_outbound_url

logger = structlog.get_logger(__name__)

# Embedding batch: big enough to amortise the model call, small enough that progress moves and a
# killed worker loses little (the whole document is redone on redelivery anyway).
EMBED_BATCH_SIZE = 64
PROGRESS_WRITE_SECONDS = 1.0
# Where each stage ends on the 0..1 progress bar (embedding takes most of the time).
PROGRESS_FETCHED, PROGRESS_EXTRACTED, PROGRESS_CHUNKED, PROGRESS_EMBEDDED = 0.05, 0.15, 0.2, 0.95
UPLOAD_ERROR_STATUS = {
    "empty_document": 400,
    "invalid_text": 400,
    "unsupported_type": 415,
}


class PayloadTooLarge(ParleyError):
    status_code = 413
    code = "file_too_large"


class UnsupportedDocumentType(ParleyError):
    status_code = 415
    code = "unsupported_type"


class PlanLimitReached(ParleyError):
    status_code = 403
    error_type = "permission_error"
    code = "plan_limit_reached"


@dataclass(frozen=True, slots=True)
class PlanLimits:
    max_upload_bytes: int
    max_documents: int
    max_storage_bytes: int


def plan_limits() -> PlanLimits:
    """The active tenant's plan limits (a tenant without a plan gets the default plan's values)."""
    from billing.models import Plan

    plan = getattr(getattr(connection, "tenant", None), "plan", None) or Plan()
    return PlanLimits(
        max_upload_bytes=plan.max_upload_bytes,
        max_documents=plan.max_documents,
        max_storage_bytes=plan.max_storage_bytes,
    )


# --- knowledge bases ----------------------------------------------------------------------------


def knowledge_base_create(
    *, name: str, description: str = "", embedder: dict | None = None, reranker: dict | None = None
) -> KnowledgeBase:
    if not name.strip():
        raise ValidationFailed("Knowledge base name must not be empty.", param="name")
    config = _resolved(validate_embedder_config(embedder if embedder is not None else {"kind": "local"}), "embedder")
    return KnowledgeBase.objects.create(
        name=name.strip()[:200],
        description=description,
        embedder=config,
        dimensions=embedder_dimensions(config),
        reranker=_resolved(validate_reranker_config(reranker or {}), "reranker"),
    )


def _resolved(config: dict, param: str) -> dict:
    """``config`` (validated offline) once its base URL's host is looked up too: being saved, a
    name that resolves to an internal address is refused now (tenants.outbound)."""
    if config.get("base_url"):
        try:
            validate_outbound_url(config["base_url"], resolve=True)
        except OutboundRefused as error:
            raise ValidationFailed(f"{param}: 'base_url' {error}", param=param) from None
    return config


def knowledge_base_update(
    *,
    knowledge_base: KnowledgeBase,
    name: str | None = None,
    description: str | None = None,
    embedder=None,
    reranker: dict | None = None,
) -> KnowledgeBase:
    """Rename/describe, set or remove the reranker (``{}``), or switch the embedder: the documents are
    then re-embedded in the background (full-text search keeps serving them meanwhile; vector search
    covers each as it is redone)."""
    if reranker is not None:
        knowledge_base.reranker = _resolved(validate_reranker_config(reranker), "reranker")
        knowledge_base.version = F("version") + 1  # answers cached under the old order are stale
    if name is not None:
        if not name.strip():
            raise ValidationFailed("Knowledge base name must not be empty.", param="name")
        knowledge_base.name = name.strip()[:200]
    if description is not None:
        knowledge_base.description = description
    reembed = False
    if embedder is not None:
        config = _resolved(validate_embedder_config(embedder), "embedder")
        if config != knowledge_base.embedder:
            knowledge_base.embedder = config
            knowledge_base.dimensions = embedder_dimensions(config)
            knowledge_base.version = F("version") + 1
            reembed = True
    with transaction.atomic():
        knowledge_base.save()
        if reembed:
            for document in knowledge_base.documents.exclude(status=Document.Status.QUEUED).only("pk"):
                _queue_ingestion(document)
    knowledge_base.refresh_from_db()
    return knowledge_base


def knowledge_base_delete(*, knowledge_base: KnowledgeBase) -> None:
    """Documents, their content and chunks go with it (bots simply lose the attachment)."""
    knowledge_base.delete()


def _bump_version(knowledge_base_id: int) -> None:
    KnowledgeBase.objects.filter(pk=knowledge_base_id).update(version=F("version") + 1, updated_at=timezone.now())
    config_changed()  # an update() sends no signal: bots' cached snapshots carry this version


# --- documents: accepting -----------------------------------------------------------------------


def _check_plan(*, knowledge_base: KnowledgeBase, size: int) -> None:
    limits = plan_limits()
    if size > limits.max_upload_bytes:
        raise PayloadTooLarge(
            f"The file is {size:,} bytes; your plan allows files up to {limits.max_upload_bytes:,} bytes.",
            param="file",
        )
    if Document.objects.count() >= limits.max_documents:
        raise PlanLimitReached(f"Your plan allows {limits.max_documents:,} documents; delete some or upgrade.")
    stored = Document.objects.aggregate(total=Sum("size_bytes"))["total"] or 0
    if stored + size > limits.max_storage_bytes:
        raise PlanLimitReached(
            f"This document would take storage to {stored + size:,} bytes; your plan allows "
            f"{limits.max_storage_bytes:,} bytes."
        )


def _queue_ingestion(document: Document) -> None:
    """Mark the document queued under a fresh ingestion id and send the task once committed."""
    from knowledge.tasks import document_ingest_task

    ingestion_id = uuid.uuid4()
    Document.objects.filter(pk=document.pk).update(
        status=Document.Status.QUEUED,
        ingestion_id=ingestion_id,
        progress=0.0,
        error="",
        error_code="",
        heartbeat_at=None,
        updated_at=timezone.now(),
    )
    document.status, document.ingestion_id, document.progress = Document.Status.QUEUED, ingestion_id, 0.0
    document.error = document.error_code = ""
    transaction.on_commit(lambda: document_ingest_task.delay(document_id=document.pk, ingestion_id=str(ingestion_id)))


def document_create(
    *,
    knowledge_base: KnowledgeBase,
    title: str = "",
    data: bytes | None = None,
    filename: str = "",
    declared_type: str = "",
    url: str = "",
    source: str | None = None,
) -> tuple[Document, bool]:
    """Accept a document for ingestion; returns ``(document, created)``.

    Cheap checks happen here so a bad upload is refused at once with a 4xx (plan limits, empty or
    unsupported content, invalid text, an unsafe URL); parsing happens in the worker. Identical
    content already in the knowledge base is not ingested twice: that document is returned.
    """
    if url:
        try:
            url = validate_url(url)
        except FetchError as error:
            raise ValidationFailed(str(error), code=error.code, param="url") from error
        _check_plan(knowledge_base=knowledge_base, size=0)
        with transaction.atomic():
            document = Document.objects.create(
                knowledge_base=knowledge_base,
                title=(title.strip() or url)[:500],
                source=Document.Source.URL,
                source_url=url,
            )
            _queue_ingestion(document)
        return document, True

    data = data or b""
    _check_plan(knowledge_base=knowledge_base, size=len(data))
    try:
        kind = detect_kind(data, filename=filename, declared_type=declared_type)
    except ExtractionError as error:
        status = UPLOAD_ERROR_STATUS.get(error.code, 400)
        if status == 415:
            raise UnsupportedDocumentType(str(error), param="file") from error
        raise ValidationFailed(str(error), code=error.code, param="file" if filename else "text") from error
    checksum = hashlib.sha256(data).hexdigest()
    with transaction.atomic():
        # Serialise uploads into one knowledge base so two identical ones cannot both be created.
        KnowledgeBase.objects.select_for_update().filter(pk=knowledge_base.pk).first()
        existing = Document.objects.filter(knowledge_base=knowledge_base, checksum=checksum).first()
        if existing is not None:
            return existing, False
        document = Document.objects.create(
            knowledge_base=knowledge_base,
            title=(title.strip() or _title_from_filename(filename) or "Untitled")[:500],
            source=source or (Document.Source.FILE if filename else Document.Source.TEXT),
            filename=filename[:255],
            kind=kind,
            size_bytes=len(data),
            checksum=checksum,
        )
        DocumentContent.objects.create(document=document, data=data)
        _queue_ingestion(document)
    return document, True


def _title_from_filename(filename: str) -> str:
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return stem.replace("_", " ").replace("-", " ").strip()


def document_reingest(*, document: Document) -> Document:
    if document.status in (Document.Status.QUEUED, Document.Status.PROCESSING) and not _is_stalled(document):
        raise Conflict("The document is already being ingested.", code="ingestion_in_progress")
    with transaction.atomic():
        _queue_ingestion(document)
    return document


def document_delete(*, document: Document) -> None:
    knowledge_base_id = document.knowledge_base_id
    with transaction.atomic():
        document.delete()
        _bump_version(knowledge_base_id)


# --- documents: ingesting (Celery) --------------------------------------------------------------


class StaleIngestion(Exception):
    """The document was deleted or re-queued meanwhile: this run's work must not be written."""


class _Progress:
    """Writes progress and a heartbeat at most once a second, and notices a superseded run."""

    def __init__(self, document_id: int, ingestion_id: uuid.UUID) -> None:
        self.document_id = document_id
        self.ingestion_id = ingestion_id
        self.last_write = 0.0

    def __call__(self, value: float, *, force: bool = False, **fields) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < PROGRESS_WRITE_SECONDS:
            return
        self.last_write = now
        updated = Document.objects.filter(pk=self.document_id, ingestion_id=self.ingestion_id).update(
            progress=round(value, 4), heartbeat_at=timezone.now(), updated_at=timezone.now(), **fields
        )
        if not updated:
            raise StaleIngestion


def document_ingest(*, document_id: int, ingestion_id: str) -> str:
    """Run one ingestion to its end; returns the outcome (``ready``, ``failed``, ``stale``, ``unchanged``).

    Permanent problems (bad content, refused URL, bad embedder config) end as ``failed`` with a
    message for the tenant. Transient ones (timeouts, a provider's 5xx) raise, for the task to retry.
    """
    run_id = uuid.UUID(ingestion_id)
    document = Document.objects.select_related("knowledge_base").filter(pk=document_id).first()
    if document is None or document.ingestion_id != run_id:
        return "stale"
    if document.status == Document.Status.READY and document.progress >= 1.0:
        return "stale"  # a redelivered task whose run already finished
    progress = _Progress(document.pk, run_id)
    try:
        progress(0.01, force=True, status=Document.Status.PROCESSING)
        return _ingest(document, progress)
    except StaleIngestion:
        return "stale"
    except (ExtractionError, FetchError, EmbedderError) as error:
        if getattr(error, "is_transient", False):
            raise
        _fail(document, run_id, str(error), getattr(error, "code", "") or "embedder_error")
        return "failed"


def document_ingest_failed(*, document_id: int, ingestion_id: str, message: str, code: str) -> None:
    """The task gave up retrying a transient error: record it (the previous chunks stay)."""
    _fail_by_id(document_id, uuid.UUID(ingestion_id), message, code)


def _fail(document: Document, run_id: uuid.UUID, message: str, code: str) -> None:
    _fail_by_id(document.pk, run_id, message, code)


def _fail_by_id(document_id: int, run_id: uuid.UUID, message: str, code: str) -> None:
    logger.info("document_ingest_failed", document_id=document_id, code=code, error=message)
    Document.objects.filter(pk=document_id, ingestion_id=run_id).update(
        status=Document.Status.FAILED,
        error=message[:2000],
        error_code=code[:40],
        progress=0.0,
        heartbeat_at=None,
        updated_at=timezone.now(),
    )


def _source_bytes(document: Document, progress: _Progress) -> tuple[bytes, str, str] | None:
    """The bytes to ingest, their detected kind and checksum; ``None`` when a URL's content is
    unchanged since the last successful ingestion with the same embedder."""
    if document.source != Document.Source.URL:
        data = bytes(DocumentContent.objects.get(document_id=document.pk).data)
        return data, document.kind or detect_kind(data, filename=document.filename), document.checksum
    limits = plan_limits()
    fetched = fetch_url(
        document.source_url, max_bytes=limits.max_upload_bytes, timeout_s=settings.KNOWLEDGE_FETCH_TIMEOUT_SECONDS
    )
    data = fetched.content
    kind = detect_kind(data, filename=fetched.filename, declared_type=fetched.content_type)
    checksum = hashlib.sha256(data).hexdigest()
    embedder_key = get_embedder(document.knowledge_base.embedder).key
    if checksum == document.checksum and document.chunk_count and document.embedded_with == embedder_key:
        return None
    with transaction.atomic():
        DocumentContent.objects.update_or_create(document_id=document.pk, defaults={"data": data})
        progress(PROGRESS_FETCHED, force=True, kind=kind, size_bytes=len(data), filename=fetched.filename[:255])
    return data, kind, checksum


def _ingest(document: Document, progress: _Progress) -> str:
    knowledge_base = document.knowledge_base
    source = _source_bytes(document, progress)
    if source is None:
        progress(1.0, force=True, status=Document.Status.READY, ingested_at=timezone.now())
        return "unchanged"
    data, kind, checksum = source
    extracted = extract(data, kind=kind, max_pages=settings.KNOWLEDGE_MAX_PAGES)
    progress(PROGRESS_EXTRACTED, force=True, page_count=extracted.page_count)
    pieces = chunk_sections(
        extracted.sections, max_tokens=settings.KNOWLEDGE_CHUNK_TOKENS, overlap_tokens=settings.KNOWLEDGE_CHUNK_OVERLAP
    )
    if not pieces:
        raise ExtractionError("The document has no text to index.", code="empty_document")
    progress(PROGRESS_CHUNKED)
    embedder = get_embedder(knowledge_base.embedder)
    vectors = _embed(embedder, [piece.text for piece in pieces], progress)

    title = document.title
    if document.source == Document.Source.URL and extracted.title and title == document.source_url:
        title = extracted.title[:500]
    with transaction.atomic():
        locked = Document.objects.select_for_update().filter(pk=document.pk, ingestion_id=progress.ingestion_id)
        if not locked.exists():
            raise StaleIngestion
        Chunk.objects.filter(document_id=document.pk).delete()
        Chunk.objects.bulk_create(
            [
                Chunk(
                    document_id=document.pk,
                    knowledge_base_id=knowledge_base.pk,
                    position=piece.position,
                    text=piece.text,
                    page=piece.page,
                    heading=(piece.heading or "")[:500],
                    title=title,
                    token_count=piece.token_count,
                    dimensions=embedder.dimensions,
                    embedding=vector,
                )
                for piece, vector in zip(pieces, vectors, strict=True)
            ],
            batch_size=500,
        )
        document_terms_refresh(document_id=document.pk)
        locked.update(
            status=Document.Status.READY,
            title=title,
            kind=kind,
            checksum=checksum,
            progress=1.0,
            page_count=extracted.page_count,
            chunk_count=len(pieces),
            token_count=sum(piece.token_count for piece in pieces),
            embedded_with=embedder.key,
            ingested_at=timezone.now(),
            heartbeat_at=None,
            error="",
            error_code="",
            updated_at=timezone.now(),
        )
        _bump_version(knowledge_base.pk)
    logger.info("document_ingested", document_id=document.pk, chunks=len(pieces), pages=extracted.page_count)
    return "ready"


_TERMS_DELETE = "DELETE FROM knowledge_documentterm WHERE document_id = %s"
_TERMS_INSERT = """
INSERT INTO knowledge_documentterm (knowledge_base_id, document_id, lexeme, chunks)
SELECT c.knowledge_base_id, c.document_id, t.lexeme, count(*)
FROM knowledge_chunk c CROSS JOIN LATERAL unnest(c.search_vector) t
WHERE c.document_id = %s
GROUP BY c.knowledge_base_id, c.document_id, t.lexeme
"""


def document_terms_refresh(*, document_id: int) -> None:
    """Recount the document's lexemes from its chunks (BM25's statistics, see DocumentTerm).

    Call it in the transaction that replaced the chunks, so that readers never see chunks and
    statistics of two different versions. The rows go with the document when it is deleted.
    """
    with connection.cursor() as cursor:
        cursor.execute(_TERMS_DELETE, [document_id])
        cursor.execute(_TERMS_INSERT, [document_id])


def _embed(embedder, texts: list[str], progress: Callable[..., None]) -> list[list[float]]:
    vectors: list[list[float]] = []
    span = PROGRESS_EMBEDDED - PROGRESS_CHUNKED
    for start in range(0, len(texts), EMBED_BATCH_SIZE):
        vectors.extend(embedder.embed_documents(texts[start : start + EMBED_BATCH_SIZE]))
        progress(PROGRESS_CHUNKED + span * len(vectors) / len(texts))
    return vectors


# --- recovery -----------------------------------------------------------------------------------


def _is_stalled(document: Document) -> bool:
    limit = timezone.now() - timedelta(seconds=settings.KNOWLEDGE_STALLED_SECONDS)
    reference = document.heartbeat_at or document.updated_at
    return reference is not None and reference < limit


def documents_requeue_stalled() -> int:
    """Re-queue documents whose worker died (no heartbeat for a while) or whose task was lost.

    A killed worker's message comes back through Celery's own redelivery too; this sweep covers the
    cases it cannot (a message lost with a Redis failover, a worker killed with its whole host).
    """
    limit = timezone.now() - timedelta(seconds=settings.KNOWLEDGE_STALLED_SECONDS)
    stalled = list(
        Document.objects.filter(status__in=[Document.Status.QUEUED, Document.Status.PROCESSING])
        .filter(updated_at__lt=limit)
        .filter(heartbeat_at__isnull=True)
        .union(
            Document.objects.filter(status=Document.Status.PROCESSING, heartbeat_at__lt=limit),
        )
        .values_list("pk", flat=True)
    )
    with transaction.atomic():
        for document in Document.objects.filter(pk__in=stalled).only("pk"):
            _queue_ingestion(document)
    if stalled:
        logger.warning("documents_requeued", count=len(stalled))
    return len(stalled)


def document_create_from_text(*, knowledge_base: KnowledgeBase, title: str, text: str) -> Document:
    """Pasted text: the same path as an upload (validated, queued, ingested by a worker)."""
    document, _ = document_create(
        knowledge_base=knowledge_base,
        title=title,
        data=text.encode(),
        declared_type="text/markdown" if title.endswith(".md") else "text/plain",
        source=Document.Source.TEXT,
    )
    return document
