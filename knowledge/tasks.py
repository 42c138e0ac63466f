"""Knowledge background tasks: ingestion and its recovery sweep. Ids in, idempotent, tenant-aware
(tenant-schemas-celery runs each task in the schema that queued it)."""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError
from django_tenants.utils import get_tenant_model, schema_context

from knowledge import services
from knowledge.embedders.base import EmbedderError
from knowledge.fetching import FetchError
from tenants.connection import connection

TRANSIENT_ERRORS = (EmbedderError, FetchError, OperationalError)
MAX_RETRIES = 5


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MAX_RETRIES,
    ignore_result=True,
    # A crafted document (a decompression bomb, a pathological PDF) must not hold a worker forever.
    soft_time_limit=settings.KNOWLEDGE_INGEST_SOFT_TIME_LIMIT_SECONDS,
    time_limit=settings.KNOWLEDGE_INGEST_TIME_LIMIT_SECONDS,
)
def document_ingest_task(self, *, document_id: int, ingestion_id: str) -> str:
    """At least once: a redelivered or duplicated message re-runs the whole document, and the
    chunks are swapped in one transaction keyed by the ingestion id, so nothing is duplicated."""
    try:
        return services.document_ingest(document_id=document_id, ingestion_id=ingestion_id)
    except SoftTimeLimitExceeded:
        # Not retried: the same document would take as long again.
        services.document_ingest_failed(
            document_id=document_id,
            ingestion_id=ingestion_id,
            message=f"Processing took longer than {self.soft_time_limit} s; the document was not ingested.",
            code="time_limit",
        )
        return "failed"
    except TRANSIENT_ERRORS as error:
        if self.request.retries >= self.max_retries:
            services.document_ingest_failed(
                document_id=document_id,
                ingestion_id=ingestion_id,
                message=f"Gave up after {self.max_retries} retries: {error}",
                code=getattr(error, "code", "") or "transient_error",
            )
            return "failed"
        # Exponential backoff with jitter: 2, 4, 8, 16, 32 s (± Celery's jitter).
        raise self.retry(exc=error, countdown=2 ** (self.request.retries + 1)) from error


@shared_task(ignore_result=True)
def documents_requeue_stalled_task() -> int:
    """Beat, in the public schema: sweep every active tenant for documents whose worker died."""
    total = 0
    tenants = get_tenant_model().objects.filter(status="active").exclude(schema_name="public")
    for schema_name in tenants.values_list("schema_name", flat=True):
        with schema_context(schema_name):
            total += services.documents_requeue_stalled()
    connection.set_schema_to_public()
    return total
