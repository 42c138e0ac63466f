"""Ingestion paths beyond the upload API: URLs, retries, re-embedding, recovery of stalled documents."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone
from django_tenants.utils import tenant_context

from knowledge import services
from knowledge.models import Chunk, Document, KnowledgeBase
from knowledge.tasks import MAX_RETRIES, document_ingest_task

pytestmark = pytest.mark.django_db

PAGE = b"""<!doctype html><html><head><title>Care guide</title></head><body>
<nav>Home | Shop</nav><h1>Care guide</h1><p>Wash the jacket at 30 degrees, inside out.</p>
<script>alert(1)</script></body></html>"""


@pytest.fixture(autouse=True)
def _in_tenant_a(tenant_pair):
    with tenant_context(tenant_pair.a):
        yield
    connection.set_schema_to_public()


@pytest.fixture
def kb():
    return services.knowledge_base_create(name="kb")


@pytest.fixture
def site():
    """A local web server; allowed as a URL source (it is private, so only by the allowlist)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    with override_settings(KNOWLEDGE_FETCH_ALLOWED_HOSTS=[host]):
        yield f"http://{host}"
    server.shutdown()


@pytest.fixture
def silent_site():
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    with override_settings(KNOWLEDGE_FETCH_ALLOWED_HOSTS=[host], KNOWLEDGE_FETCH_TIMEOUT_SECONDS=0.5):
        yield f"http://{host}"
    listener.close()


def _run(document: Document) -> str:
    document.refresh_from_db()
    return services.document_ingest(document_id=document.pk, ingestion_id=str(document.ingestion_id))


def test_url_document_is_fetched_cleaned_and_titled(kb, site):
    document, created = services.document_create(knowledge_base=kb, url=f"{site}/care")

    assert created
    assert document.title == f"{site}/care"
    assert _run(document) == "ready"
    document.refresh_from_db()
    chunks = list(Chunk.objects.filter(document=document).values_list("text", "heading"))
    assert document.title == "Care guide"
    assert document.kind == "html"
    assert chunks == [("Wash the jacket at 30 degrees, inside out.", "Care guide")]


def test_unchanged_url_content_is_not_reingested(kb, site):
    document, _ = services.document_create(knowledge_base=kb, url=f"{site}/care")
    _run(document)
    chunk_ids = set(Chunk.objects.values_list("id", flat=True))
    version = KnowledgeBase.objects.get(pk=kb.pk).version

    services.document_reingest(document=Document.objects.get(pk=document.pk))

    assert _run(document) == "unchanged"
    assert set(Chunk.objects.values_list("id", flat=True)) == chunk_ids
    assert KnowledgeBase.objects.get(pk=kb.pk).version == version
    assert Document.objects.get(pk=document.pk).status == "ready"


def test_url_that_never_answers_is_retried_then_failed(kb, silent_site):
    document, _ = services.document_create(knowledge_base=kb, url=f"{silent_site}/slow")

    # Eager: each retry runs at once (the countdown is Celery's, not slept here).
    document_ingest_task.apply(kwargs={"document_id": document.pk, "ingestion_id": str(document.ingestion_id)})

    document.refresh_from_db()
    assert document.status == "failed"
    assert document.error_code == "timeout"
    assert document.error.startswith(f"Gave up after {MAX_RETRIES} retries")
    assert Chunk.objects.count() == 0


def test_changing_the_embedder_reembeds_every_document(kb, mock_llm):
    document, _ = services.document_create(knowledge_base=kb, title="t", data=b"Gift cards never expire.")
    _run(document)
    version = KnowledgeBase.objects.get(pk=kb.pk).version
    embedder = {
        "kind": "openai",
        "base_url": mock_llm.base_url,
        "model": "mock-embed",
        "dimensions": 768,
        "send_dimensions": True,
    }

    updated = services.knowledge_base_update(knowledge_base=kb, embedder=embedder)
    document.refresh_from_db()
    assert updated.dimensions == 768
    assert updated.version == version + 1
    assert document.status == "queued"
    assert set(Chunk.objects.values_list("dimensions", flat=True)) == {384}  # still served meanwhile

    assert _run(document) == "ready", Document.objects.get(pk=document.pk).error
    assert set(Chunk.objects.values_list("dimensions", flat=True)) == {768}
    assert mock_llm.count("embeddings") >= 1
    hits = services_retrieve(kb, "Do gift cards expire?")
    assert hits[0].similarity is not None


def services_retrieve(kb, query):
    from knowledge.retrieval import retrieve

    return retrieve(knowledge_base_ids=[kb.pk], query=query, limit=3)


def test_stalled_documents_are_requeued(kb):
    document, _ = services.document_create(knowledge_base=kb, title="t", data=b"Stalled text.")
    stale = timezone.now() - timedelta(hours=1)
    Document.objects.filter(pk=document.pk).update(status="processing", heartbeat_at=stale, updated_at=stale)
    fresh, _ = services.document_create(knowledge_base=kb, title="u", data=b"Fresh text.")
    Document.objects.filter(pk=fresh.pk).update(status="processing", heartbeat_at=timezone.now())
    old_run = document.ingestion_id

    assert services.documents_requeue_stalled() == 1

    document.refresh_from_db()
    assert document.status == "queued"
    assert document.ingestion_id != old_run
    assert Document.objects.get(pk=fresh.pk).status == "processing"
    assert services.document_ingest(document_id=document.pk, ingestion_id=str(old_run)) == "stale"
