"""Security: a member cannot reach admin scope through OAuth2 (issue 18, High 1)."""

from __future__ import annotations

import base64
import secrets

import pytest
from django.test import Client
from django_tenants.utils import tenant_context

from tenants.models import ApiKey, Membership
from tenants.services import membership_remove, membership_role_change
from tests.factories import host_of, make_api_key, make_member

pytestmark = pytest.mark.django_db


def _client_credentials_app(tenant, *, owner):
    from oauth2_provider.models import Application

    secret = secrets.token_urlsafe(24)
    with tenant_context(tenant):
        app = Application.objects.create(
            name="integration",
            user=owner,
            client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
            client_secret=secret,
            hash_client_secret=True,
        )
    return app, base64.b64encode(f"{app.client_id}:{secret}".encode()).decode()


def _token(client, tenant, basic, scope):
    response = client.post(
        "/o/token/",
        {"grant_type": "client_credentials", "scope": scope},
        HTTP_HOST=host_of(tenant),
        HTTP_AUTHORIZATION=f"Basic {basic}",
    )
    return response.json().get("access_token")


@pytest.mark.parametrize(
    "path_case",
    ["/o/applications/", "/o/applications/register/", "/o/authorized_tokens/", "/o/device/"],
)
def test_oauth2_management_pages_not_mounted(tenant_pair, path_case):
    member = make_member(tenant_pair.a)
    browser = Client()
    browser.force_login(member)

    response = browser.get(path_case, HTTP_HOST=host_of(tenant_pair.a))

    assert response.status_code == 404


def test_member_cannot_register_an_oauth2_application(tenant_pair):
    from oauth2_provider.models import Application

    member = make_member(tenant_pair.a)
    browser = Client()
    browser.force_login(member)

    response = browser.post(
        "/o/applications/register/",
        {"name": "x", "client_type": "confidential", "authorization_grant_type": "client-credentials"},
        HTTP_HOST=host_of(tenant_pair.a),
    )

    assert response.status_code == 404
    with tenant_context(tenant_pair.a):
        assert not Application.objects.filter(user=member).exists()


def test_client_credentials_token_capped_by_owner_role(client, tenant_pair):
    member = make_member(tenant_pair.a)
    _app, basic = _client_credentials_app(tenant_pair.a, owner=member)
    access = _token(client, tenant_pair.a, basic, "admin chat")

    me = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")
    keys = client.get("/api/v1/api-keys/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")

    assert me.status_code == 200
    assert me.json()["scopes"] == ["chat"]
    assert keys.status_code == 403


def test_client_credentials_token_follows_owner_demotion(client, tenant_pair):
    admin = make_member(tenant_pair.a, role=Membership.Role.ADMIN)
    _app, basic = _client_credentials_app(tenant_pair.a, owner=admin)
    access = _token(client, tenant_pair.a, basic, "admin")
    before = client.get("/api/v1/api-keys/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")

    membership_role_change(membership=Membership.objects.get(user=admin), role=Membership.Role.MEMBER)
    after = client.get("/api/v1/api-keys/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")

    assert before.status_code == 200
    assert after.status_code == 403


def test_client_credentials_token_of_ownerless_application_refused(client, tenant_pair):
    _app, basic = _client_credentials_app(tenant_pair.a, owner=None)
    access = _token(client, tenant_pair.a, basic, "chat")

    me = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")

    assert me.status_code == 401


def test_membership_remove_revokes_oauth_applications_tokens_and_api_keys(client, tenant_pair):
    from oauth2_provider.models import AccessToken, Application

    admin = make_member(tenant_pair.a, role=Membership.Role.ADMIN)
    app, basic = _client_credentials_app(tenant_pair.a, owner=admin)
    access = _token(client, tenant_pair.a, basic, "chat")
    api_key, raw_key = make_api_key(tenant_pair.a, scopes=["chat"])
    ApiKey.objects.filter(pk=api_key.pk).update(created_by=admin)
    _other_key, other_raw = make_api_key(tenant_pair.a, scopes=["chat"])

    membership_remove(membership=Membership.objects.get(user=admin))
    with_token = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")
    with_key = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    with_other = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {other_raw}")
    new_token = client.post(
        "/o/token/",
        {"grant_type": "client_credentials", "scope": "chat"},
        HTTP_HOST=host_of(tenant_pair.a),
        HTTP_AUTHORIZATION=f"Basic {basic}",
    )

    assert with_token.status_code == 401
    assert with_key.status_code == 401
    assert with_other.status_code == 200
    assert new_token.status_code == 401
    with tenant_context(tenant_pair.a):
        assert not Application.objects.filter(pk=app.pk).exists()
        assert not AccessToken.objects.filter(application_id=app.pk).exists()
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
