"""Shared fixtures: a reusable test database with two committed tenants, clean Redis per test."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client

from chat.mock_server import MockServerHandle, mock_servers_in_thread
from tests.factories import TenantPair, ensure_tenant_pair

# Fixtures that run whole chat turns (a generation worker thread, a committed bot).
pytest_plugins = ["tests.chat.turn_fixtures"]


def pytest_configure() -> None:
    assert settings.IS_TEST, "Run the tests with PARLEY_ENV=test (make test does)."


@pytest.fixture(scope="session")
def django_db_setup(
    request,
    django_test_environment,
    django_db_blocker,
    django_db_keepdb,
    django_db_createdb,
    django_db_modify_db_settings,
):
    """Always set up the test database, then (re)capture the template schema (cheap when unchanged).

    pytest-django sets up only the databases that collected tests mark with ``django_db``; tests
    that commit data from several threads carry no such mark, so run alone they would reach the
    development database. Here the test database is set up whatever was collected.
    """
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    from tenants.services import tenant_template_sync

    keepdb = django_db_keepdb and not django_db_createdb
    with django_db_blocker.unblock():
        config = setup_databases(
            verbosity=request.config.option.verbose,
            interactive=False,
            keepdb=keepdb,
            aliases={"default"},
            serialized_aliases=set(),
        )
        assert connection.settings_dict["NAME"] == settings.DATABASES["default"]["TEST"]["NAME"]
        tenant_template_sync()
    yield
    if not keepdb:
        with django_db_blocker.unblock():
            teardown_databases(config, verbosity=request.config.option.verbose)


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


MOCK_SERVER_COUNT = 3  # enough for a route of two targets, or a pool of three replicas


@pytest.fixture(scope="session")
def _mock_llm_servers():
    """Started once per session, in a background thread: a few milliseconds per test saved."""
    with mock_servers_in_thread(MOCK_SERVER_COUNT) as servers:
        yield servers


@pytest.fixture
def mock_llms(_mock_llm_servers) -> list[MockServerHandle]:
    """Mock OpenAI-compatible servers, with their start configuration and zeroed counters."""
    for server in _mock_llm_servers:
        server.reset()
    return _mock_llm_servers


@pytest.fixture
def mock_llm(mock_llms) -> MockServerHandle:
    return mock_llms[0]
