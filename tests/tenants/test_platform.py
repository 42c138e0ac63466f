"""Health, readiness, metrics, resolution caching, structured logs, pgvector in every schema."""

from __future__ import annotations

import logging

import pytest
from django.db import connection
from django_tenants.utils import tenant_context

from knowledge.models import Chunk, Document, KnowledgeBase
from tenants.resolution import api_key_resolve, tenant_resolve_by_host, tenant_resolve_by_public_bot
from tenants.services import public_bot_register
from tests.factories import bearer, host_of, make_api_key

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "host", ["localhost", "acme.localhost", "10.1.2.3", "unknown.example"], ids=lambda h: f"{h}_case"
)
def test_healthz_on_every_host(client, tenant_pair, host):
    response = client.get("/healthz", HTTP_HOST=host)

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_database_and_redis(client):
    from tenants import health

    health.readiness_cache_clear()
    response = client.get("/readyz")

    body = response.json()
    assert response.status_code == 200
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is True


def test_readyz_unavailable_when_redis_down(client, monkeypatch):
    import redis

    from tenants import health

    health.readiness_cache_clear()  # the probe's answer is reused for a second
    monkeypatch.setattr(health, "get_redis", lambda: redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["redis"]["ok"] is False
    assert response.json()["checks"]["database"]["ok"] is True


@pytest.mark.parametrize("host", ["localhost", "acme.localhost"], ids=lambda h: f"{h}_case")
def test_metrics_exposed(client, tenant_pair, host):
    client.get("/healthz")

    response = client.get("/metrics", HTTP_HOST=host)

    assert response.status_code == 200
    assert b"django_http_requests_total_by_method_total" in response.content


def test_openapi_schema_and_docs(client):
    schema = client.get("/api/schema/")
    docs = client.get("/api/docs/")

    assert schema.status_code == 200
    assert b"/api/v1/api-keys/" in schema.content
    assert docs.status_code == 200


def test_resolution_is_cached_with_no_queries(tenant_pair, django_assert_num_queries):
    api_key, _ = make_api_key(tenant_pair.a)
    tenant_resolve_by_host(host_of(tenant_pair.a))
    api_key_resolve(api_key.prefix)

    with django_assert_num_queries(0):
        tenant = tenant_resolve_by_host(host_of(tenant_pair.a))
        record = api_key_resolve(api_key.prefix)

    assert tenant.pk == tenant_pair.a.pk
    assert record.tenant.pk == tenant_pair.a.pk


def test_unknown_lookups_are_negatively_cached(django_assert_num_queries):
    tenant_resolve_by_host("nobody.localhost")

    with django_assert_num_queries(0):
        assert tenant_resolve_by_host("nobody.localhost") is None


def test_revocation_and_suspension_invalidate_cache(client, tenant_pair):
    from tenants.services import api_key_revoke

    api_key, raw = make_api_key(tenant_pair.a)
    assert client.get("/api/v1/me/", **bearer(raw)).status_code == 200  # now cached

    api_key_revoke(api_key=api_key)

    assert client.get("/api/v1/me/", **bearer(raw)).json()["error"]["code"] == "api_key_revoked"


def test_widget_bot_public_id_resolves_tenant(client, tenant_pair):
    public_bot_register(tenant=tenant_pair.b, public_id="bot_globex_help")

    assert tenant_resolve_by_public_bot("bot_globex_help").pk == tenant_pair.b.pk
    page = client.get("/accounts/login/", HTTP_X_PARLEY_BOT="bot_globex_help")
    assert b"Globex" in page.content


def test_log_lines_carry_request_id_and_tenant(client, tenant_pair, caplog):
    _, raw = make_api_key(tenant_pair.a)

    with caplog.at_level(logging.INFO, logger="django_structlog"):
        client.get("/api/v1/me/", **bearer(raw))

    events = [record.msg for record in caplog.records if isinstance(record.msg, dict)]
    assert events, "django-structlog emitted no structured events"
    for event in events:
        assert event["tenant"] == "acme"
        assert event["request_id"]


# --- pgvector ---------------------------------------------------------------------------------


def test_vector_extension_lives_in_public():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'vector'"
        )
        assert cursor.fetchall() == [("public",)]


def test_every_tenant_schema_has_vector_column_and_hnsw_indexes(tenant_pair):
    for schema in ("tenant_template", tenant_pair.a.schema_name, tenant_pair.b.schema_name):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attname = 'embedding'",
                [f"{schema}.knowledge_chunk"],
            )
            assert cursor.fetchone() == ("vector",)
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s "
                "AND indexname LIKE 'chunk_embedding_hnsw_%%' ORDER BY indexname",
                [schema],
            )
            indexes = cursor.fetchall()
        assert [name for name, _ in indexes] == [f"chunk_embedding_hnsw_{d}" for d in (1024, 1536, 384, 768)]
        for name, indexdef in indexes:
            dimensions = name.rsplit("_", 1)[1]
            assert f"USING hnsw (((embedding)::vector({dimensions})) vector_cosine_ops)" in indexdef
            assert f"WHERE (dimensions = {dimensions})" in indexdef


def test_hnsw_index_serves_nearest_neighbour_queries(tenant_pair):
    with tenant_context(tenant_pair.a):
        knowledge_base = KnowledgeBase.objects.create(name="kb")
        document = Document.objects.create(knowledge_base=knowledge_base, title="d")
        for position in range(3):
            vector = [0.0] * 384
            vector[position] = 1.0
            Chunk.objects.create(
                document=document,
                knowledge_base=knowledge_base,
                position=position,
                text=f"chunk {position}",
                dimensions=384,
                embedding=vector,
            )
        query = "[" + ",".join("1" if i == 2 else "0" for i in range(384)) + "]"
        sql = (
            "SELECT text FROM knowledge_chunk WHERE dimensions = 384 "
            "ORDER BY embedding::vector(384) <=> %s::vector(384) LIMIT 1"
        )
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(sql, [query])
            nearest = cursor.fetchone()[0]
            cursor.execute("EXPLAIN " + sql, [query])
            plan = "\n".join(row[0] for row in cursor.fetchall())

    assert nearest == "chunk 2"
    assert "chunk_embedding_hnsw_384" in plan
