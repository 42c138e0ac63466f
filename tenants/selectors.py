"""Reads of the platform models, each scoped to the tenant the caller already proved."""

from __future__ import annotations

from django.db.models import QuerySet

from tenants.errors import NotFound
from tenants.models import ApiKey, Tenant


def api_key_list(*, tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant).order_by("-created_at")


def api_key_get(*, tenant: Tenant, api_key_id: int) -> ApiKey:
    api_key = ApiKey.objects.filter(tenant=tenant, pk=api_key_id).first()
    if api_key is None:
        raise NotFound("No such API key.")
    return api_key


def tenant_get_by_slug(*, slug: str) -> Tenant:
    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None:
        raise NotFound(f"No tenant with slug {slug!r}.")
    return tenant
