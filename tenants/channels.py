"""Tenancy for Channels: resolve the tenant at connect, run every database call inside it.

Channels runs all ``database_sync_to_async`` calls of a process on one shared thread, so a
consumer that switched the connection's schema and left it switched would leak its tenant into
the next consumer's query. ``tenant_database_sync_to_async`` sets the schema for exactly one call
and restores it afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from django_tenants.utils import tenant_context

from tenants.models import Tenant
from tenants.resolution import (
    bot_public_id_from_path,
    tenant_hostname,
    tenant_resolve_by_host,
    tenant_resolve_by_public_bot,
)


def tenant_of_scope(scope: dict[str, Any]) -> Tenant | None:
    """The same order as the HTTP edge: the host, then the bot public id in the path."""
    host = tenant_hostname(dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1"))
    tenant = tenant_resolve_by_host(host) if host else None
    if tenant is None:
        public_id = bot_public_id_from_path(scope.get("path", ""))
        tenant = tenant_resolve_by_public_bot(public_id) if public_id else None
    return tenant


class TenantWebsocketMiddleware:
    """Puts ``scope["tenant"]`` on every WebSocket connection, or refuses it (403 at handshake)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send):
        tenant = await database_sync_to_async(tenant_of_scope)(scope)
        if tenant is None or not tenant.is_active:
            await receive()  # the websocket.connect event
            await send({"type": "websocket.close", "code": 4403})
            return None
        return await self.inner(dict(scope, tenant=tenant), receive, send)


def tenant_database_sync_to_async(func: Callable) -> Callable:
    """Decorate a consumer's sync method that touches the database: it runs in the thread pool
    with the connection set to ``self.scope["tenant"]``'s schema for that call only."""

    @functools.wraps(func)
    async def wrapper(self, *args, **kwargs):
        tenant = self.scope["tenant"]

        def call():
            with tenant_context(tenant):
                return func(self, *args, **kwargs)

        return await database_sync_to_async(call)()

    return wrapper
