"""Shared fixtures: a reusable test database with two committed tenants, clean Redis per test."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client

from tests.factories import TenantPair, ensure_tenant_pair


def pytest_configure() -> None:
    assert settings.IS_TEST, "Run the tests with PARLEY_ENV=test (make test does)."


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """The template schema is (re)captured once per session: cheap when nothing changed."""
    from tenants.services import tenant_template_sync

    with django_db_blocker.unblock():
        tenant_template_sync()


@pytest.fixture(scope="session")
def tenant_pair(django_db_setup, django_db_blocker) -> TenantPair:
    """Two committed tenants (acme, globex), created once and reused across runs."""
    with django_db_blocker.unblock():
        return ensure_tenant_pair()


@pytest.fixture(autouse=True)
def _clean_redis():
    from tenants.redis import get_redis

    get_redis().flushdb()


@pytest.fixture
def client() -> Client:
    return Client()
