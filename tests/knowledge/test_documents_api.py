"""Knowledge bases and documents over REST: upload → ingestion → search, and every bad input.

Ingestion runs the worker's own service inline (``ingest``) — the Celery task is a thin wrapper
around it, exercised with a real worker in test_ingestion_worker.py.
"""

from __future__ import annotations

import io

import pytest
from django.db import connection
from django.test import Client
from django_tenants.utils import tenant_context

from knowledge import services
from knowledge.models import Chunk, Document, DocumentContent, KnowledgeBase
from tests.factories import bearer, make_api_key
from tests.knowledge.fixtures_docs import (
    DocxBlock,
    PdfPage,
    docx_bytes,
    encrypted_pdf_bytes,
    pdf_bytes,
    zip_bomb_docx_bytes,
)

pytestmark = pytest.mark.django_db

HANDBOOK = (
    "# Returns\n\nCustomers may return any item within 30 days of delivery for a full refund.\n\n"
    "# Shipping\n\nOrders ship from our Rotterdam warehouse within two working days.\n"
)


@pytest.fixture(autouse=True)
def _in_tenant_a(tenant_pair):
    """ORM reads in the tests below look at tenant A's schema (the API calls run there too)."""
    with tenant_context(tenant_pair.a):
        yield
    connection.set_schema_to_public()


@pytest.fixture
def client(tenant_pair):
    """The test client, back in tenant A's schema after each request (the middleware leaves public)."""

    class TenantAClient(Client):
        def request(self, **request):
            try:
                return super().request(**request)
            finally:
                connection.set_tenant(tenant_pair.a)

    return TenantAClient()


@pytest.fixture
def key(tenant_pair):
    return make_api_key(tenant_pair.a)[1]


@pytest.fixture
def kb(client, key):
    response = client.post(
        "/api/v1/knowledge-bases/", {"name": "Handbook"}, content_type="application/json", **bearer(key)
    )
    assert response.status_code == 201, response.content
    return response.json()


def _post_json(client, path, body, key):
    return client.post(path, body, content_type="application/json", **bearer(key))


def _upload(client, kb, key, name: str, data: bytes, content_type: str = "application/octet-stream", **fields):
    upload = io.BytesIO(data)
    upload.name = name
    return client.post(f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"file": upload, **fields}, **bearer(key))


def ingest(document_id: int) -> str:
    document = Document.objects.get(pk=document_id)
    return services.document_ingest(document_id=document.pk, ingestion_id=str(document.ingestion_id))


def _search(client, kb, key, q, **params):
    return client.get(f"/api/v1/knowledge-bases/{kb['id']}/search/", {"q": q, **params}, **bearer(key))


# --- knowledge bases ----------------------------------------------------------------------------


def test_knowledge_base_crud(client, key, kb):
    assert kb["embedder"] == {"kind": "local"}
    assert kb["dimensions"] == 384
    assert kb["version"] == 1

    renamed = client.patch(
        f"/api/v1/knowledge-bases/{kb['id']}/", {"name": "Policies"}, content_type="application/json", **bearer(key)
    )
    listed = client.get("/api/v1/knowledge-bases/", **bearer(key)).json()["data"]
    deleted = client.delete(f"/api/v1/knowledge-bases/{kb['id']}/", **bearer(key))
    after = client.get(f"/api/v1/knowledge-bases/{kb['id']}/", **bearer(key))

    assert renamed.json()["name"] == "Policies"
    assert [item["name"] for item in listed] == ["Policies"]
    assert deleted.status_code == 204
    assert after.status_code == 404


@pytest.mark.parametrize(
    ("embedder", "param"),
    [
        pytest.param({"kind": "magic"}, "embedder", id="unknown_kind_case"),
        pytest.param({"kind": "openai", "model": "m", "dimensions": 384}, "embedder", id="missing_base_url_case"),
        pytest.param(
            {"kind": "openai", "base_url": "http://e.test/v1", "model": "m", "dimensions": 100},
            "embedder",
            id="unindexed_dimensions_case",
        ),
        pytest.param("local", "embedder", id="not_an_object_case"),
    ],
)
def test_bad_embedder_is_refused(client, key, embedder, param):
    response = _post_json(client, "/api/v1/knowledge-bases/", {"name": "x", "embedder": embedder}, key)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert KnowledgeBase.objects.count() == 0


def test_embedder_api_key_is_never_output(client, key):
    embedder = {"kind": "openai", "base_url": "http://e.test/v1", "model": "m", "dimensions": 768, "api_key": "sk-1"}
    body = _post_json(client, "/api/v1/knowledge-bases/", {"name": "x", "embedder": embedder}, key).json()

    assert body["embedder"]["api_key"] == "********"
    assert body["dimensions"] == 768
    assert KnowledgeBase.objects.get(pk=body["id"]).embedder["api_key"] == "sk-1"


def test_reranker_is_set_and_removed_through_the_api_and_its_key_never_output(client, key):
    reranker = {"kind": "http", "base_url": "http://rerank.test/v1", "model": "bge-reranker", "api_key": "rk-1"}
    created = _post_json(client, "/api/v1/knowledge-bases/", {"name": "x", "reranker": reranker}, key).json()
    removed = client.patch(
        f"/api/v1/knowledge-bases/{created['id']}/", {"reranker": {}}, content_type="application/json", **bearer(key)
    )
    refused = client.patch(
        f"/api/v1/knowledge-bases/{created['id']}/",
        {"reranker": {"kind": "http", "base_url": "http://rerank.test", "model": "m", "candidates": 0}},
        content_type="application/json",
        **bearer(key),
    )

    assert created["reranker"] == {
        "kind": "http",
        "base_url": "http://rerank.test/v1",
        "model": "bge-reranker",
        "api": "cohere",
        "candidates": 20,
        "timeout_s": 1.0,
        "api_key": "********",
    }
    assert removed.json()["reranker"] == {}
    assert removed.json()["version"] == 2
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "reranker"
    assert KnowledgeBase.objects.get(pk=created["id"]).reranker == {}


# --- documents ----------------------------------------------------------------------------------


def test_text_document_is_accepted_then_ingested_and_searchable(client, key, kb):
    response = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "Policies.md", "text": HANDBOOK}, key
    )
    accepted = response.json()

    assert response.status_code == 202
    assert accepted["status"] == "queued"
    assert accepted["progress"] == 0.0
    assert Chunk.objects.count() == 0

    assert ingest(accepted["id"]) == "ready"
    document = client.get(f"/api/v1/documents/{accepted['id']}/", **bearer(key)).json()
    hits = _search(client, kb, key, "How long do I have to send an item back?").json()["data"]
    knowledge_base = client.get(f"/api/v1/knowledge-bases/{kb['id']}/", **bearer(key)).json()

    assert document["status"] == "ready"
    assert document["progress"] == 1.0
    assert document["kind"] == "markdown"
    assert document["chunk_count"] == 2
    assert document["error"] is None
    assert hits[0]["document_id"] == accepted["id"]
    assert hits[0]["heading"] == "Returns"
    assert "30 days" in hits[0]["text"]
    assert hits[0]["similarity"] > 0.3
    assert knowledge_base["version"] == 2
    assert knowledge_base["chunk_count"] == 2


def test_semantic_match_without_shared_words_is_found_by_vectors(client, key, kb):
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    ingest(document["id"])

    hits = _search(client, kb, key, "refund window for purchases", k=1).json()["data"]
    hits_ship = _search(client, kb, key, "dispatch time of parcels", k=1).json()["data"]

    assert hits[0]["heading"] == "Returns"
    assert hits_ship[0]["heading"] == "Shipping"
    assert hits_ship[0]["text_rank"] is None  # no shared word: only the vector list found it
    assert hits_ship[0]["vector_rank"] == 1


def test_identical_content_is_not_ingested_twice(client, key, kb):
    path = f"/api/v1/knowledge-bases/{kb['id']}/documents/"
    first = _post_json(client, path, {"title": "a", "text": HANDBOOK}, key)
    second = _post_json(client, path, {"title": "b", "text": HANDBOOK}, key)

    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert Document.objects.count() == 1


def test_pdf_upload_detected_by_content_keeps_pages(client, key, kb):
    data = pdf_bytes(
        [
            PdfPage(heading=None, paragraphs=["Warranty covers manufacturing defects for two years."]),
            PdfPage(heading=None, paragraphs=["Batteries are covered for one year."]),
        ]
    )
    response = _upload(client, kb, key, "notes.txt", data, title="Warranty")

    assert response.status_code == 202
    assert response.json()["kind"] == "pdf"
    assert ingest(response.json()["id"]) == "ready"
    hits = _search(client, kb, key, "How long are batteries covered?", k=1).json()["data"]
    document = Document.objects.get(pk=response.json()["id"])

    assert document.page_count == 2
    assert document.title == "Warranty"
    assert hits[0]["page"] == 2


def test_docx_upload_keeps_headings(client, key, kb):
    data = docx_bytes(
        [DocxBlock("heading", "Security"), DocxBlock("paragraph", "All data is encrypted at rest with AES-256.")]
    )
    response = _upload(client, kb, key, "Security Policy.docx", data)

    assert ingest(response.json()["id"]) == "ready"
    hits = _search(client, kb, key, "encryption at rest", k=1).json()["data"]

    assert response.json()["title"] == "Security Policy"
    assert hits[0]["heading"] == "Security"


def test_progress_is_visible_while_processing(client, key, kb, monkeypatch):
    text = "\n\n".join(f"Paragraph {i} explains topic number {i} of the manual in some detail." for i in range(200))
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "big", "text": text}, key
    ).json()
    seen: list[tuple[str, float]] = []
    real_embed = services._embed

    def watching_embed(embedder, texts, progress):
        def spy(value, **kwargs):
            progress(value, force=True, **kwargs)
            row = client.get(f"/api/v1/documents/{document['id']}/", **bearer(key)).json()
            seen.append((row["status"], row["progress"]))

        return real_embed(embedder, texts, spy)

    monkeypatch.setattr(services, "_embed", watching_embed)
    monkeypatch.setattr(services, "EMBED_BATCH_SIZE", 4)

    assert ingest(document["id"]) == "ready"
    assert len(seen) >= 3
    assert {status for status, _ in seen} == {"processing"}
    assert [value for _, value in seen] == sorted(value for _, value in seen)
    assert 0.2 < seen[0][1] < seen[-1][1] <= 0.95


def test_reingest_replaces_chunks_as_a_whole(client, key, kb):
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    ingest(document["id"])
    before = set(Chunk.objects.values_list("id", flat=True))

    response = client.post(f"/api/v1/documents/{document['id']}/reingest/", **bearer(key))
    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    assert set(Chunk.objects.values_list("id", flat=True)) == before  # still served while queued
    assert ingest(document["id"]) == "ready"

    after = list(Chunk.objects.order_by("position").values_list("id", "position"))
    assert len(after) == 2
    assert not before & {chunk_id for chunk_id, _ in after}
    assert [position for _, position in after] == [0, 1]


def test_failed_reingest_keeps_the_previous_version(client, key, kb):
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    ingest(document["id"])
    before = list(Chunk.objects.values_list("id", "text"))
    version = KnowledgeBase.objects.get().version
    DocumentContent.objects.filter(document_id=document["id"]).update(data=b"%PDF-1.7 truncated garbage")
    Document.objects.filter(pk=document["id"]).update(kind="pdf")

    client.post(f"/api/v1/documents/{document['id']}/reingest/", **bearer(key))
    outcome = ingest(document["id"])
    row = client.get(f"/api/v1/documents/{document['id']}/", **bearer(key)).json()

    assert outcome == "failed"
    assert row["status"] == "failed"
    assert row["error"]["code"] == "corrupt_file"
    assert list(Chunk.objects.values_list("id", "text")) == before
    assert KnowledgeBase.objects.get().version == version
    assert _search(client, kb, key, "return an item").json()["data"]


def test_a_stale_run_writes_nothing(client, key, kb):
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    old_run = str(Document.objects.get(pk=document["id"]).ingestion_id)
    client.post(f"/api/v1/documents/{document['id']}/reingest/", **bearer(key))  # 409: still queued
    Document.objects.filter(pk=document["id"]).update(status="failed")
    client.post(f"/api/v1/documents/{document['id']}/reingest/", **bearer(key))

    assert services.document_ingest(document_id=document["id"], ingestion_id=old_run) == "stale"
    assert Chunk.objects.count() == 0
    assert Document.objects.get(pk=document["id"]).status == "queued"


def test_reingest_while_queued_is_a_conflict(client, key, kb):
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()

    response = client.post(f"/api/v1/documents/{document['id']}/reingest/", **bearer(key))

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "ingestion_in_progress"


def test_deleting_a_document_removes_its_chunks_and_bumps_the_version(client, key, kb):
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    ingest(document["id"])
    version = KnowledgeBase.objects.get().version

    response = client.delete(f"/api/v1/documents/{document['id']}/", **bearer(key))

    assert response.status_code == 204
    assert Chunk.objects.count() == 0
    assert DocumentContent.objects.count() == 0
    assert KnowledgeBase.objects.get().version == version + 1
    assert _search(client, kb, key, "return an item").json()["data"] == []


def test_search_can_be_limited_to_documents(client, key, kb):
    path = f"/api/v1/knowledge-bases/{kb['id']}/documents/"
    returns = _post_json(client, path, {"title": "r", "text": "Returns are accepted within 30 days."}, key).json()
    shipping = _post_json(client, path, {"title": "s", "text": "Shipping takes two days."}, key).json()
    ingest(returns["id"])
    ingest(shipping["id"])

    hits = _search(client, kb, key, "returns", document=str(shipping["id"])).json()["data"]

    assert {hit["document_id"] for hit in hits} == {shipping["id"]}


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        pytest.param("empty.txt", b"", 400, "empty_document", id="empty_file_case"),
        pytest.param("blank.txt", b"  \n\t ", 400, "empty_document", id="whitespace_only_case"),
        pytest.param(
            "image.pdf", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 415, "unsupported_type", id="png_named_pdf_case"
        ),
        pytest.param("archive.docx", b"PK\x03\x04" + b"\x00" * 64, 415, "unsupported_type", id="zip_not_docx_case"),
        pytest.param("bad.txt", b"caf\xe9 au lait", 400, "invalid_text", id="invalid_utf8_case"),
    ],
)
def test_bad_uploads_are_refused_at_once(client, key, kb, name, data, status, code):
    response = _upload(client, kb, key, name, data)

    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert Document.objects.count() == 0


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("nul\x00byte", id="nul_byte_case"),
        pytest.param("lone \ud800 surrogate", id="lone_surrogate_case"),
        pytest.param("", id="empty_case"),
    ],
)
def test_bad_pasted_text_is_refused(client, key, kb, text):
    response = _post_json(client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "t", "text": text}, key)

    assert response.status_code == 400
    assert Document.objects.count() == 0


def test_file_over_the_plan_limit_is_refused(client, key, kb, monkeypatch):
    monkeypatch.setattr(
        services,
        "plan_limits",
        lambda: services.PlanLimits(max_upload_bytes=1000, max_documents=10, max_storage_bytes=10**9),
    )

    response = _upload(client, kb, key, "big.txt", b"word " * 400)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert Document.objects.count() == 0


def test_document_count_limit_of_the_plan(client, key, kb, monkeypatch):
    monkeypatch.setattr(
        services,
        "plan_limits",
        lambda: services.PlanLimits(max_upload_bytes=10**6, max_documents=1, max_storage_bytes=10**9),
    )
    path = f"/api/v1/knowledge-bases/{kb['id']}/documents/"
    _post_json(client, path, {"title": "a", "text": "first"}, key)

    response = _post_json(client, path, {"title": "b", "text": "second"}, key)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "plan_limit_reached"
    assert Document.objects.count() == 1


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        pytest.param(
            "secret.pdf",
            encrypted_pdf_bytes(pdf_bytes([PdfPage(None, ["Top secret."])]), user_password="s3cret"),
            "encrypted_pdf",
            id="encrypted_pdf_case",
        ),
        pytest.param("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog", "corrupt_file", id="corrupt_pdf_case"),
        pytest.param("bomb.docx", None, "archive_too_large", id="zip_bomb_docx_case"),
    ],
)
def test_bad_files_fail_in_the_worker_and_touch_nothing_else(client, key, kb, name, data, code):
    good = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    ingest(good["id"])
    chunks_before = list(Chunk.objects.values_list("id", flat=True))
    version = KnowledgeBase.objects.get().version

    response = _upload(client, kb, key, name, data if data is not None else zip_bomb_docx_bytes())
    assert response.status_code == 202, response.content
    outcome = ingest(response.json()["id"])
    row = client.get(f"/api/v1/documents/{response.json()['id']}/", **bearer(key)).json()

    assert outcome == "failed"
    assert row["status"] == "failed"
    assert row["error"]["code"] == code
    assert row["error"]["message"]
    assert list(Chunk.objects.values_list("id", flat=True)) == chunks_before
    assert KnowledgeBase.objects.get().version == version


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:8000/admin", id="loopback_case"),
        pytest.param("http://localhost/", id="localhost_case"),
        pytest.param("http://169.254.169.254/latest/meta-data/", id="cloud_metadata_case"),
        pytest.param("http://10.1.2.3/", id="private_case"),
        pytest.param("file:///etc/passwd", id="file_scheme_case"),
        pytest.param("http://user:pw@example.com/", id="credentials_case"),
    ],
)
def test_unsafe_urls_are_refused(client, key, kb, url):
    response = _post_json(client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"url": url}, key)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "url"
    assert Document.objects.count() == 0


def test_unknown_fields_and_ambiguous_bodies_are_refused(client, key, kb):
    path = f"/api/v1/knowledge-bases/{kb['id']}/documents/"
    both = _post_json(client, path, {"text": "a", "url": "https://example.com/"}, key)
    neither = _post_json(client, path, {"title": "a"}, key)
    typo = _post_json(client, path, {"txt": "a"}, key)
    no_file = client.post(path, {"title": "x"}, **bearer(key))

    assert [r.status_code for r in (both, neither, typo, no_file)] == [400, 400, 400, 400]
    assert typo.json()["error"]["param"] == "txt"
    assert Document.objects.count() == 0


@pytest.mark.parametrize(
    ("params", "param"),
    [
        pytest.param({}, "q", id="missing_q_case"),
        pytest.param({"q": "x", "k": "0"}, "k", id="k_zero_case"),
        pytest.param({"q": "x", "k": "51"}, "k", id="k_too_big_case"),
        pytest.param({"q": "x", "document": "a,b"}, "document", id="bad_document_ids_case"),
    ],
)
def test_bad_search_parameters(client, key, kb, params, param):
    response = client.get(f"/api/v1/knowledge-bases/{kb['id']}/search/", params, **bearer(key))

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_scopes_are_enforced(client, tenant_pair, kb):
    reader = make_api_key(tenant_pair.a, scopes=["knowledge:read"])[1]
    chatter = make_api_key(tenant_pair.a, scopes=["chat"])[1]
    path = f"/api/v1/knowledge-bases/{kb['id']}/documents/"

    listed = client.get(path, **bearer(reader))
    refused = _post_json(client, path, {"title": "t", "text": "hello"}, reader)
    hidden = client.get(f"/api/v1/knowledge-bases/{kb['id']}/search/", {"q": "x"}, **bearer(chatter))

    assert listed.status_code == 200
    assert refused.status_code == 403
    assert hidden.status_code == 403
    assert Document.objects.count() == 0


def test_other_tenants_knowledge_is_invisible(client, tenant_pair, key, kb):
    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    other = make_api_key(tenant_pair.b)[1]

    responses = [
        client.get(f"/api/v1/knowledge-bases/{kb['id']}/", **bearer(other)),
        client.get(f"/api/v1/documents/{document['id']}/", **bearer(other)),
        client.get(f"/api/v1/knowledge-bases/{kb['id']}/search/", {"q": "returns"}, **bearer(other)),
        client.delete(f"/api/v1/documents/{document['id']}/", **bearer(other)),
    ]

    assert [response.status_code for response in responses] == [404, 404, 404, 404]
    with tenant_context(tenant_pair.a):
        assert Document.objects.filter(pk=document["id"]).exists()
    connection.set_schema_to_public()


def test_query_embeddings_are_cached_under_the_tenant(client, tenant_pair, key, kb):
    from tenants.redis import get_redis

    document = _post_json(
        client, f"/api/v1/knowledge-bases/{kb['id']}/documents/", {"title": "p", "text": HANDBOOK}, key
    ).json()
    ingest(document["id"])
    _search(client, kb, key, "anything at all")

    keys = get_redis().keys("t:*:qemb:*")
    assert len(keys) == 1
    assert keys[0].startswith(f"t:{tenant_pair.a.schema_name}:qemb:".encode())
