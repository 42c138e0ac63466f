"""Edge middleware: health probes, tenant resolution, tenant membership of session users.

The tenant is resolved once, here, and handed down as ``request.tenant`` with the database
connection switched to its schema; nothing below re-derives it.
"""

from __future__ import annotations

from typing import cast

import structlog
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import set_urlconf
from django.utils.functional import SimpleLazyObject

from tenants.connection import connection
from tenants.errors import TenantSuspended, error_response, store_unavailable
from tenants.health import readiness
from tenants.models import Membership, Tenant, User
from tenants.redis import REDIS_UNAVAILABLE
from tenants.resolution import (
    ApiKeyRecord,
    bot_public_id_from_path,
    is_bot_public_id,
    public_tenant,
    tenant_and_key_resolve,
    tenant_hostname,
    tenant_resolve_by_public_bot,
)
from tenants.services import api_key_parse_prefix

logger = structlog.get_logger(__name__)


class HealthCheckMiddleware:
    """Answers /healthz and /readyz before host validation, so that probes by pod IP work."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/healthz":
            return JsonResponse({"status": "ok"})
        if request.path == "/readyz":
            checks = readiness()
            healthy = all(check["ok"] for check in checks.values())
            return JsonResponse(
                {"status": "ok" if healthy else "unavailable", "checks": checks}, status=200 if healthy else 503
            )
        return self.get_response(request)


class TenantRequest(HttpRequest):
    """A request as it leaves ``TenantResolutionMiddleware``: what views below it may read. For
    type checkers only (views declare ``request: TenantRequest``); requests keep their own class."""

    tenant: Tenant  # the public stand-in (``public_tenant()``) where no tenant was found
    api_key_record: ApiKeyRecord | None  # set only where ``Authorization`` carried a key's prefix


class TenantResolutionMiddleware:
    """Host first (``<slug>.<PARLEY_BASE_DOMAIN>``), then — on any host — the API key prefix in
    ``Authorization: Bearer``, then a widget bot's public id (path or ``X-Parley-Bot``).

    On a tenant host the host decides; an API key of another tenant is then refused by
    authentication, never used to switch tenants.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: TenantRequest) -> HttpResponse:
        structlog.contextvars.clear_contextvars()
        connection.set_schema_to_public()
        try:
            return self._resolve_and_respond(request)
        except REDIS_UNAVAILABLE:
            # Redis away (a restart, a failover): a 503 to retry, in the API's error shape, not a 500.
            logger.warning("store_unavailable", path=request.path, exc_info=True)
            return error_response(store_unavailable())

    def _resolve_and_respond(self, request: TenantRequest) -> HttpResponse:
        prefix = self._api_key_prefix(request)
        tenant, record = tenant_and_key_resolve(tenant_hostname(request.get_host()), prefix)
        if prefix is not None:
            request.api_key_record = record
            if tenant is None and record is not None:
                tenant = record.tenant
        if tenant is None:
            public_id = self._bot_public_id(request)
            if public_id:
                tenant = tenant_resolve_by_public_bot(public_id)

        if tenant is None:
            structlog.contextvars.bind_contextvars(tenant="public")
            request.tenant = public_tenant()
            request.urlconf = settings.PUBLIC_SCHEMA_URLCONF
            set_urlconf(request.urlconf)
            return self.get_response(request)

        structlog.contextvars.bind_contextvars(tenant=tenant.slug)
        if not tenant.is_active:
            return error_response(
                TenantSuspended(
                    f"The workspace '{tenant.slug}' is suspended; contact your administrator or Parley support."
                )
            )
        request.tenant = tenant
        connection.set_tenant(tenant)
        request.urlconf = settings.ROOT_URLCONF
        set_urlconf(request.urlconf)
        try:
            return self.get_response(request)
        finally:
            connection.set_schema_to_public()

    @staticmethod
    def _api_key_prefix(request: HttpRequest) -> str | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return api_key_parse_prefix(token.strip())

    @staticmethod
    def _bot_public_id(request: HttpRequest) -> str | None:
        from_path = bot_public_id_from_path(request.path)
        if from_path:
            return from_path
        header = request.headers.get("X-Parley-Bot") or ""
        return header if is_bot_public_id(header) else None  # a malformed id is never looked up


class TenantMembershipMiddleware:
    """A session user counts as signed in on a tenant's host only if they belong to that tenant.

    Lazy, like Django's own ``request.user``: API requests never pay for the membership query.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        session_user = request.user
        tenant = getattr(request, "tenant", None)
        if tenant is not None and tenant.schema_name != "public":
            # A lazy stand-in for the user, as Django's own AuthenticationMiddleware sets.
            request.user = cast(
                "User | AnonymousUser", SimpleLazyObject(lambda: _member_or_anonymous(session_user, tenant))
            )
        return self.get_response(request)


def _member_or_anonymous(user: User | AnonymousUser, tenant: Tenant) -> User | AnonymousUser:
    if not user.is_authenticated:
        return user
    if Membership.objects.filter(user_id=user.pk, tenant_id=tenant.pk).exists():
        return user
    return AnonymousUser()
