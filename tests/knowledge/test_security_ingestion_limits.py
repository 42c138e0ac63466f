"""Security: an ingestion task cannot hold a worker forever (issue 18, Low 16): soft and hard
time limits, and a document that hits the soft one fails at once instead of being retried."""

from __future__ import annotations

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connection
from django_tenants.utils import tenant_context

from knowledge import services
from knowledge.models import Chunk
from knowledge.tasks import document_ingest_task

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _in_tenant_a(tenant_pair):
    with tenant_context(tenant_pair.a):
        yield
    connection.set_schema_to_public()


def test_ingestion_task_has_soft_and_hard_time_limits():
    assert document_ingest_task.soft_time_limit == settings.KNOWLEDGE_INGEST_SOFT_TIME_LIMIT_SECONDS
    assert document_ingest_task.time_limit == settings.KNOWLEDGE_INGEST_TIME_LIMIT_SECONDS
    assert 0 < document_ingest_task.soft_time_limit < document_ingest_task.time_limit


def test_document_over_the_soft_limit_fails_without_retry(monkeypatch):
    kb = services.knowledge_base_create(name="kb")
    document, _ = services.document_create(knowledge_base=kb, title="t", data=b"A crafted document.")
    calls = []

    def too_slow(**kwargs):
        calls.append(kwargs)
        raise SoftTimeLimitExceeded

    monkeypatch.setattr(services, "document_ingest", too_slow)

    document_ingest_task.apply(kwargs={"document_id": document.pk, "ingestion_id": str(document.ingestion_id)})

    document.refresh_from_db()
    assert len(calls) == 1
    assert document.status == "failed"
    assert document.error_code == "time_limit"
    assert Chunk.objects.count() == 0
