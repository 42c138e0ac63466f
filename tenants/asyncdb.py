"""Database work from async code, always inside a named tenant's schema.

Django's ORM is synchronous and its connection is per thread. Async code (generation workers,
SSE views, consumers) runs ORM work through ``sync_to_async(thread_sensitive=True)``, where one
thread serves many tenants in turn; setting the schema for exactly one call, and restoring it,
means no call can ever run in a schema left behind by another (and ``thread_sensitive=False``,
which runs on a fresh connection in the public schema, is never used for tenant data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django_tenants.utils import schema_context

T = TypeVar("T")


async def in_tenant(schema_name: str, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    def call() -> T:
        with schema_context(schema_name):
            return function(*args, **kwargs)

    return await sync_to_async(call, thread_sensitive=True)()
