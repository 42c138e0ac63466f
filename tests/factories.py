"""Object factories for tests: plain functions with sensible defaults."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings

from tenants.models import ApiKey, Membership, Tenant, User
from tenants.services import api_key_create, membership_set, tenant_create, user_create

PASSWORD = "correct-horse-battery-staple"
_sequence = itertools.count()


@dataclass
class TenantPair:
    a: Tenant
    b: Tenant
    owner_a: User
    owner_b: User


def host_of(tenant: Tenant) -> str:
    return f"{tenant.slug}.{settings.PARLEY_BASE_DOMAIN}"


def make_user(*, email: str | None = None, password: str = PASSWORD) -> User:
    return user_create(email=email or f"user{next(_sequence)}@example.test", password=password)


def make_member(tenant: Tenant, *, role: str = Membership.Role.MEMBER, email: str | None = None) -> User:
    user = make_user(email=email)
    membership_set(user=user, tenant=tenant, role=role)
    return user


def make_api_key(
    tenant: Tenant, *, scopes: list[str] | None = None, expires_at: datetime | None = None, name: str = "test key"
) -> tuple[ApiKey, str]:
    created = api_key_create(
        tenant=tenant, name=name, scopes=scopes or list(ApiKey.Scope.values), expires_at=expires_at
    )
    return created.api_key, created.raw_key


def bearer(raw: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def _owner(email: str) -> User:
    return User.objects.filter(email=email).first() or make_user(email=email)


def ensure_tenant_pair() -> TenantPair:
    owner_a = _owner("owner@acme.test")
    owner_b = _owner("owner@globex.test")
    a = Tenant.objects.filter(slug="acme").first() or tenant_create(name="Acme", slug="acme", owner=owner_a)
    b = Tenant.objects.filter(slug="globex").first() or tenant_create(name="Globex", slug="globex", owner=owner_b)
    for tenant in (a, b):
        if not tenant.is_active:
            Tenant.objects.filter(pk=tenant.pk).update(status=Tenant.Status.ACTIVE)
            tenant.refresh_from_db()
    return TenantPair(a=a, b=b, owner_a=owner_a, owner_b=owner_b)


def ingest_text(knowledge_base, title: str, text: str):
    """A text document ingested right here (the worker's own service, run inline): chunks exist on return."""
    from knowledge.models import Document
    from knowledge.services import document_create_from_text, document_ingest

    document = document_create_from_text(knowledge_base=knowledge_base, title=title, text=text)
    outcome = document_ingest(document_id=document.pk, ingestion_id=str(document.ingestion_id))
    assert outcome == "ready", outcome
    return Document.objects.get(pk=document.pk)
