"""Isolation at scale: with 50 tenants each holding knowledge, retrieval in one tenant never returns
another tenant's chunk — whichever path it takes (exact scan, HNSW, full text).

The 50 tenants are created once and kept (committed), like the acme/globex pair.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import override_settings
from django_tenants.utils import tenant_context

from knowledge.models import Chunk, KnowledgeBase
from knowledge.retrieval import retrieve
from knowledge.services import knowledge_base_create
from tenants.models import Tenant
from tenants.services import tenant_create
from tests.factories import _owner, ingest_text

TENANTS = 50
# Every tenant's document shares most words with every other's, so that each query matches all
# 50 tenants' chunks equally well by text and by meaning; only the schema keeps them apart.
TEXT = "The warehouse access code for {slug} is {code}. Staff of {slug} open the loading dock with it."


def _code(index: int) -> str:
    return f"zx{index:02d}q"


@pytest.fixture(scope="session")
def many_tenants(django_db_setup, django_db_blocker) -> list[Tenant]:
    tenants = []
    with django_db_blocker.unblock():
        owner = _owner("owner@scale.test")
        for index in range(TENANTS):
            slug = f"scale-{index:02d}"
            tenant = Tenant.objects.filter(slug=slug).first() or tenant_create(name=slug, slug=slug, owner=owner)
            with tenant_context(tenant):
                if not KnowledgeBase.objects.filter(name="secrets").exists():
                    knowledge_base = knowledge_base_create(name="secrets")
                    ingest_text(knowledge_base, f"{slug} codes", TEXT.format(slug=slug, code=_code(index)))
            tenants.append(tenant)
        connection.set_schema_to_public()
    return tenants


@pytest.mark.parametrize("exact_max", [20_000, 0], ids=["exact_scan_case", "hnsw_case"])
def test_retrieval_never_crosses_tenants(many_tenants, django_db_blocker, exact_max):
    leaks = []
    with django_db_blocker.unblock(), override_settings(KNOWLEDGE_EXACT_SEARCH_MAX_CHUNKS=exact_max):
        for index, tenant in enumerate(many_tenants):
            other = (index + 17) % TENANTS
            with tenant_context(tenant):
                knowledge_base_ids = list(KnowledgeBase.objects.values_list("pk", flat=True))
                own_chunks = set(Chunk.objects.values_list("id", flat=True))
                own = retrieve(knowledge_base_ids=knowledge_base_ids, query=f"access code {_code(index)}", limit=10)
                foreign = retrieve(
                    knowledge_base_ids=knowledge_base_ids,
                    query=f"What is the access code for scale-{other:02d}? {_code(other)}",
                    limit=10,
                )
            # Chunk ids count per schema (every tenant has a chunk 1): the text tells whose it is.
            for hit in own + foreign:
                if hit.chunk_id not in own_chunks or f"scale-{index:02d}" not in hit.text:
                    leaks.append((tenant.slug, hit.text))
            assert own, tenant.slug
            assert _code(index) in own[0].text
        connection.set_schema_to_public()

    assert leaks == []
