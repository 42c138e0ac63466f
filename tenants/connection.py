"""The default database connection, typed as the django-tenants backend makes it.

``django.db.connection`` is typed by django-stubs as a plain ``BaseDatabaseWrapper``; the
configured engine (``django_tenants.postgresql_backend``) adds the schema switching below, for
which django-tenants ships no types. ``connection`` here is that same proxy object, described
truthfully: import it instead of ``django.db.connection`` wherever the schema is read or set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from django.db import connection as _connection

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from tenants.models import Tenant

    class TenantDatabaseWrapper(BaseDatabaseWrapper):
        # The active schema: the public one, or a tenant's (``set_tenant``, ``schema_context``).
        schema_name: str
        # The tenant set by ``set_tenant`` (the tenant middleware, ``tenant_context``); under a
        # bare ``schema_context`` it is django-tenants' stand-in, which carries only the schema.
        tenant: Tenant

        def set_tenant(self, tenant: Tenant, include_public: bool = True) -> None: ...

        def set_schema_to_public(self) -> None: ...


connection = cast("TenantDatabaseWrapper", _connection)
