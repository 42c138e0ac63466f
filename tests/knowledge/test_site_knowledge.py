"""Admin site: knowledge bases, documents (upload, paste, URL, live status fragment, delete,
re-ingest) and search with scores."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django_tenants.utils import tenant_context

from knowledge.models import Document, KnowledgeBase
from knowledge.services import knowledge_base_create
from tests.factories import ingest_text, make_member
from tests.site import BASE_QUERIES, captured_queries, site_client

pytestmark = pytest.mark.django_db


def _kb(tenant, name="Handbook") -> KnowledgeBase:
    with tenant_context(tenant):
        return knowledge_base_create(name=name)


def _documents(tenant) -> list[tuple[str, str]]:
    with tenant_context(tenant):
        return list(Document.objects.order_by("title").values_list("title", "status"))


def test_admin_creates_a_knowledge_base(tenant_pair):
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    response = client.post("/knowledge/", {"name": "Policies", "description": "HR"})

    with tenant_context(tenant_pair.a):
        kb = KnowledgeBase.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/knowledge/{kb.pk}/"
    assert (kb.name, kb.description) == ("Policies", "HR")


def test_blank_knowledge_base_name_shows_error(tenant_pair):
    response = site_client(tenant_pair.a, tenant_pair.owner_a).post("/knowledge/", {"name": ""})

    assert response.status_code == 400
    assert 'id="id_name_error"' in response.content.decode()
    with tenant_context(tenant_pair.a):
        assert KnowledgeBase.objects.count() == 0


def test_upload_several_files_at_once_queues_each(tenant_pair, django_capture_on_commit_callbacks):
    kb = _kb(tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    files = [
        SimpleUploadedFile("returns.txt", b"Returns are accepted within 30 days.", content_type="text/plain"),
        SimpleUploadedFile("shipping.md", b"# Shipping\nWe ship worldwide.", content_type="text/markdown"),
    ]

    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(f"/knowledge/{kb.pk}/upload/", {"files": files})

    assert response.status_code == 302
    assert _documents(tenant_pair.a) == [("returns", "queued"), ("shipping", "queued")]
    assert len(callbacks) == 2  # one ingestion task each, sent after commit


def test_one_refused_file_does_not_lose_the_others(tenant_pair):
    kb = _kb(tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    files = [
        SimpleUploadedFile("empty.txt", b"", content_type="text/plain"),
        SimpleUploadedFile("ok.txt", b"Opening hours are nine to five.", content_type="text/plain"),
    ]

    response = client.post(f"/knowledge/{kb.pk}/upload/", {"files": files}, follow=True)

    html = response.content.decode()
    assert _documents(tenant_pair.a) == [("ok", "queued")]
    assert "empty.txt:" in html
    assert "Added: ok." in html


def test_paste_text_and_add_url(tenant_pair, settings):
    kb = _kb(tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    text = client.post(f"/knowledge/{kb.pk}/text/", {"title": "FAQ", "text": "Q: Hours? A: Nine to five."})
    bad_url = client.post(f"/knowledge/{kb.pk}/url/", {"url": "http://127.0.0.1/admin"})

    assert text.status_code == 302
    assert bad_url.status_code == 400
    assert 'id="id_url_error"' in bad_url.content.decode()
    assert _documents(tenant_pair.a) == [("FAQ", "queued")]


def test_documents_fragment_reports_live_status(tenant_pair):
    kb = _kb(tenant_pair.a)
    with tenant_context(tenant_pair.a):
        queued = Document.objects.create(knowledge_base=kb, title="Queued doc", status="processing", progress=0.4)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    client.get(f"/knowledge/{kb.pk}/documents/")

    with captured_queries() as queries:
        busy = client.get(f"/knowledge/{kb.pk}/documents/")
    query_count = len(queries)
    with tenant_context(tenant_pair.a):
        Document.objects.filter(pk=queued.pk).update(status="ready", progress=1.0, chunk_count=3)
    done = client.get(f"/knowledge/{kb.pk}/documents/").content.decode()

    assert query_count == BASE_QUERIES + 2  # the knowledge base, its documents
    assert busy["Cache-Control"] == "no-store"
    assert 'data-status="processing" class="busy"' in busy.content.decode()
    assert 'value="40"' in busy.content.decode()
    assert 'data-status="ready"' in done
    assert "busy" not in done
    assert "<html" not in done


def test_page_polls_while_documents_are_busy(tenant_pair):
    kb = _kb(tenant_pair.a)

    html = site_client(tenant_pair.a, tenant_pair.owner_a).get(f"/knowledge/{kb.pk}/").content.decode()

    assert f'data-poll="/knowledge/{kb.pk}/documents/" data-poll-while="tr.busy"' in html
    assert 'enctype="multipart/form-data"' in html
    assert "multiple" in html


def test_delete_and_reingest(tenant_pair, django_capture_on_commit_callbacks):
    kb = _kb(tenant_pair.a)
    with tenant_context(tenant_pair.a):
        keep = Document.objects.create(knowledge_base=kb, title="Keep", status="failed", error="boom")
        gone = Document.objects.create(knowledge_base=kb, title="Gone", status="ready")
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    with django_capture_on_commit_callbacks() as callbacks:
        reingest = client.post(f"/knowledge/documents/{keep.pk}/reingest/")
    delete = client.post(f"/knowledge/documents/{gone.pk}/delete/")

    assert (reingest.status_code, delete.status_code) == (302, 302)
    assert len(callbacks) == 1
    assert _documents(tenant_pair.a) == [("Keep", "queued")]


def test_search_shows_chunks_with_scores(tenant_pair):
    kb = _kb(tenant_pair.a)
    with tenant_context(tenant_pair.a):
        ingest_text(kb, "Returns policy", "Customers may return any item within 30 days of delivery for a refund.")
        ingest_text(kb, "Shipping", "Parcels ship within two working days to every country in Europe.")
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    html = client.get(f"/knowledge/{kb.pk}/", {"q": "how many days to return an item"}).content.decode()

    assert "2 results" in html
    assert html.index("1. Returns policy") < html.index("2. Shipping")
    assert "return any item within 30 days" in html
    assert "score 0.1818" in html  # first in both lists: 1/(10 + 1) twice (RRF k 10)
    assert "vector rank 1" in html


@pytest.mark.parametrize(
    "path",
    [
        "/knowledge/{kb}/upload/",
        "/knowledge/{kb}/text/",
        "/knowledge/{kb}/url/",
        "/knowledge/{kb}/delete/",
        "/knowledge/documents/{doc}/delete/",
        "/knowledge/documents/{doc}/reingest/",
        "/knowledge/",
    ],
)
def test_member_is_refused_knowledge_writes_and_nothing_changes(tenant_pair, path):
    kb = _kb(tenant_pair.a)
    with tenant_context(tenant_pair.a):
        document = Document.objects.create(knowledge_base=kb, title="Stays", status="ready")
    member = make_member(tenant_pair.a, role="member")

    response = site_client(tenant_pair.a, member).post(
        path.format(kb=kb.pk, doc=document.pk), {"name": "X", "title": "X", "text": "X", "url": "https://e.com"}
    )

    assert response.status_code == 403
    assert _documents(tenant_pair.a) == [("Stays", "ready")]
    with tenant_context(tenant_pair.a):
        assert list(KnowledgeBase.objects.values_list("name", flat=True)) == ["Handbook"]


def test_member_can_read_and_search(tenant_pair):
    kb = _kb(tenant_pair.a)
    member = make_member(tenant_pair.a, role="member")

    html = site_client(tenant_pair.a, member).get(f"/knowledge/{kb.pk}/").content.decode()

    assert "Handbook" in html
    assert "Upload files" not in html
    assert 'role="search"' in html


def test_other_tenants_knowledge_is_not_found(tenant_pair):
    kb = _kb(tenant_pair.a)
    with tenant_context(tenant_pair.a):
        document = Document.objects.create(knowledge_base=kb, title="Secret", status="ready")
    client = site_client(tenant_pair.b, tenant_pair.owner_b)

    assert client.get(f"/knowledge/{kb.pk}/").status_code == 404
    assert client.get(f"/knowledge/{kb.pk}/documents/").status_code == 404
    assert client.post(f"/knowledge/documents/{document.pk}/delete/").status_code == 404
    assert client.post(f"/knowledge/{kb.pk}/delete/").status_code == 404
    assert _documents(tenant_pair.a) == [("Secret", "ready")]
