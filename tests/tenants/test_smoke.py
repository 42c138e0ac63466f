import pytest

from tests.factories import bearer, host_of, make_api_key

pytestmark = pytest.mark.django_db


def test_me_with_api_key_on_any_host(client, tenant_pair):
    _, raw = make_api_key(tenant_pair.a)

    response = client.get("/api/v1/me/", **bearer(raw))

    assert response.status_code == 200
    assert response.json()["tenant"] == "acme"


def test_key_of_a_refused_on_b_host(client, tenant_pair):
    _, raw = make_api_key(tenant_pair.a)

    response = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.b), **bearer(raw))

    assert response.status_code == 401
