"""Tenant isolation, table-driven: every API endpoint, every way of reaching another tenant.

Add a row to ENDPOINTS for each new endpoint; every scenario below then covers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.utils import timezone

from tenants.models import ApiKey
from tenants.services import api_key_revoke
from tests.factories import bearer, host_of, make_api_key

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Endpoint:
    label: str
    method: str
    path: str  # "{b_key}" is replaced by an object of tenant B
    scope: str | None  # the scope it needs; None = any authenticated caller
    body: dict | None = None
    success: int = 200


ENDPOINTS = [
    Endpoint("models", "get", "/v1/models", "chat"),
    Endpoint("me", "get", "/api/v1/me/", None),
    Endpoint("api_keys_list", "get", "/api/v1/api-keys/", "admin"),
    Endpoint("api_keys_create", "post", "/api/v1/api-keys/", "admin", {"name": "x", "scopes": ["chat"]}, 201),
    Endpoint("api_key_get", "get", "/api/v1/api-keys/{own_key}/", "admin"),
    Endpoint("api_key_revoke", "delete", "/api/v1/api-keys/{own_key}/", "admin"),
]
OBJECT_ENDPOINTS = [e for e in ENDPOINTS if "{own_key}" in e.path]
ids = [e.label for e in ENDPOINTS]


def _call(client, endpoint: Endpoint, path: str, **extra):
    method = getattr(client, endpoint.method)
    if endpoint.body is not None:
        return method(path, data=endpoint.body, content_type="application/json", **extra)
    return method(path, **extra)


def _assert_error(response, status: int, *, must_not_contain: tuple[str, ...] = ()):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    for secret in must_not_contain:
        assert secret not in response.content.decode()


@pytest.fixture
def keys(tenant_pair):
    """A's full key, B's full key (with one object of B to aim at), and A's own victim object."""
    _, a_raw = make_api_key(tenant_pair.a, name="a-main")
    b_key, b_raw = make_api_key(tenant_pair.b, name="b-main-secret-name")
    a_target, _ = make_api_key(tenant_pair.a, name="a-target")
    return {"a": a_raw, "b": b_raw, "b_key": b_key, "a_target": a_target}


def _path(endpoint: Endpoint, own_key: ApiKey) -> str:
    return endpoint.path.replace("{own_key}", str(own_key.pk))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_success_case_own_tenant(client, tenant_pair, keys, endpoint):
    response = _call(client, endpoint, _path(endpoint, keys["a_target"]), **bearer(keys["a"]))

    assert response.status_code == endpoint.success, response.content


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_no_credentials_case(client, tenant_pair, keys, endpoint):
    count = ApiKey.objects.count()

    response = _call(client, endpoint, _path(endpoint, keys["a_target"]), HTTP_HOST=host_of(tenant_pair.a))

    _assert_error(response, 401)
    assert ApiKey.objects.count() == count


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_a_credentials_on_b_host_case(client, tenant_pair, keys, endpoint):
    before = list(ApiKey.objects.values_list("pk", "revoked_at"))

    response = _call(
        client, endpoint, _path(endpoint, keys["b_key"]), HTTP_HOST=host_of(tenant_pair.b), **bearer(keys["a"])
    )

    _assert_error(response, 401, must_not_contain=("b-main-secret-name", keys["b_key"].prefix))
    assert list(ApiKey.objects.values_list("pk", "revoked_at")) == before


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS, ids=[e.label for e in OBJECT_ENDPOINTS])
def test_naming_b_object_with_a_credentials_case(client, tenant_pair, keys, endpoint):
    response = _call(client, endpoint, _path(endpoint, keys["b_key"]), **bearer(keys["a"]))

    _assert_error(response, 404, must_not_contain=("b-main-secret-name", keys["b_key"].prefix))
    keys["b_key"].refresh_from_db()
    assert keys["b_key"].revoked_at is None


@pytest.mark.parametrize("key_state", ["revoked", "expired", "garbage", "wrong_secret"], ids=lambda s: f"{s}_case")
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_unusable_key_case(client, tenant_pair, keys, endpoint, key_state):
    api_key, raw = make_api_key(tenant_pair.a, name="doomed")
    if key_state == "revoked":
        api_key_revoke(api_key=api_key)
    elif key_state == "expired":
        ApiKey.objects.filter(pk=api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        from tenants.resolution import api_key_cache_invalidate

        api_key_cache_invalidate(api_key.prefix)
    elif key_state == "garbage":
        raw = "prly_zzzzzzzz_" + "x" * 43
    else:
        raw = raw[:-4] + ("aaaa" if not raw.endswith("aaaa") else "bbbb")
    count = ApiKey.objects.count()

    response = _call(client, endpoint, _path(endpoint, keys["a_target"]), **bearer(raw))

    _assert_error(response, 401)
    assert ApiKey.objects.count() == count


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.scope], ids=[e.label for e in ENDPOINTS if e.scope])
def test_wrong_scope_case(client, tenant_pair, keys, endpoint):
    other_scopes = [s for s in ApiKey.Scope.values if s not in (endpoint.scope, "admin")]
    _, raw = make_api_key(tenant_pair.a, scopes=other_scopes)
    target_before = ApiKey.objects.get(pk=keys["a_target"].pk).revoked_at

    response = _call(client, endpoint, _path(endpoint, keys["a_target"]), **bearer(raw))

    _assert_error(response, 403)
    assert response.json()["error"]["code"] == "insufficient_scope"
    assert ApiKey.objects.get(pk=keys["a_target"].pk).revoked_at == target_before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ids)
def test_a_jwt_on_b_host_case(client, tenant_pair, keys, endpoint):
    from tenants.services import membership_set

    # Even a person who belongs to both tenants cannot use A's token on B.
    membership_set(user=tenant_pair.owner_a, tenant=tenant_pair.b, role="owner")
    token = client.post(
        "/api/v1/auth/token/",
        {"email": tenant_pair.owner_a.email, "password": "correct-horse-battery-staple"},
        content_type="application/json",
        HTTP_HOST=host_of(tenant_pair.a),
    ).json()["access"]

    response = _call(
        client,
        endpoint,
        _path(endpoint, keys["b_key"]),
        HTTP_HOST=host_of(tenant_pair.b),
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )

    _assert_error(response, 401)
