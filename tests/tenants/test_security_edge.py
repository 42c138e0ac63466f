"""Security: the readiness probe leaks nothing and costs little; header values used for lookups
are checked before any lookup (issue 18, Low 15)."""

from __future__ import annotations

import pytest

from tenants import health, middleware
from tenants.resolution import tenant_hostname

pytestmark = pytest.mark.django_db
SECRET_DETAIL = 'password authentication failed for user "parley" at 10.0.0.5'


def test_readyz_reports_no_internal_error_text(client, monkeypatch):
    def broken() -> None:
        raise RuntimeError(SECRET_DETAIL)

    health.readiness_cache_clear()
    monkeypatch.setattr(health, "_database", broken)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["database"] == {"ok": False}
    assert "10.0.0.5" not in response.content.decode()
    assert "password" not in response.content.decode()


def test_readyz_checks_the_database_at_most_once_a_second(client, monkeypatch):
    calls = []
    real = health._database
    health.readiness_cache_clear()
    monkeypatch.setattr(health, "_database", lambda: calls.append(1) or real())

    statuses = [client.get("/readyz").status_code for _ in range(20)]

    assert statuses == [200] * 20
    assert len(calls) == 1


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("x" * 5000, id="long_case"),
        pytest.param("bot_abc'; DROP TABLE", id="characters_case"),
        pytest.param("b", id="short_case"),
    ],
)
def test_bot_header_checked_before_any_lookup(client, monkeypatch, value):
    looked_up = []
    monkeypatch.setattr(middleware, "tenant_resolve_by_public_bot", lambda public_id: looked_up.append(public_id))

    client.get("/api/v1/widget/config/", HTTP_HOST="localhost", HTTP_X_PARLEY_BOT=value)

    assert looked_up == []


def test_wellformed_bot_header_is_looked_up(client, monkeypatch):
    looked_up = []
    monkeypatch.setattr(middleware, "tenant_resolve_by_public_bot", lambda public_id: looked_up.append(public_id))

    client.get("/api/v1/widget/config/", HTTP_HOST="localhost", HTTP_X_PARLEY_BOT="bot_Abc123-xyz")

    assert looked_up == ["bot_Abc123-xyz"]


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("a" * 64 + ".localhost", id="long_label_case"),
        pytest.param("acme." * 60 + "localhost", id="long_name_case"),
        pytest.param("ac me.localhost", id="space_case"),
        pytest.param("acme.localhost\x00evil", id="nul_case"),
        pytest.param("acme_1.localhost", id="underscore_case"),
        pytest.param("acme.localhost:80:80", id="ports_case"),
    ],
)
def test_malformed_host_names_no_tenant(host):
    assert tenant_hostname(host) is None


def test_wellformed_host_names_a_tenant():
    assert tenant_hostname("Acme.LocalHost:8000") == "acme.localhost"
    assert tenant_hostname("www.acme.localhost") == "acme.localhost"
