"""Authentication: JWT per tenant, session login with CSRF and throttling, password reset, OAuth2."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from urllib.parse import parse_qs, urlparse

import pytest
from django.core import mail
from django.test import Client
from django_tenants.utils import tenant_context

from tests.factories import PASSWORD, host_of, make_member

pytestmark = pytest.mark.django_db


def _tokens(client, tenant, email, password=PASSWORD):
    return client.post(
        "/api/v1/auth/token/",
        {"email": email, "password": password},
        content_type="application/json",
        HTTP_HOST=host_of(tenant),
    )


# --- JWT ----------------------------------------------------------------------------------------


def test_jwt_obtain_and_use_on_own_tenant(client, tenant_pair):
    tokens = _tokens(client, tenant_pair.a, tenant_pair.owner_a.email).json()

    response = client.get(
        "/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {tokens['access']}"
    )

    assert response.status_code == 200
    assert response.json() == {
        "tenant": "acme",
        "kind": "jwt",
        "scopes": ["admin", "chat", "knowledge:read", "knowledge:write"],
        "email": tenant_pair.owner_a.email,
        "api_key_id": None,
    }


def test_jwt_member_role_gets_member_scopes(client, tenant_pair):
    member = make_member(tenant_pair.a, role="member")
    access = _tokens(client, tenant_pair.a, member.email).json()["access"]

    me = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")
    keys = client.get("/api/v1/api-keys/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")

    assert me.json()["scopes"] == ["chat", "knowledge:read"]
    assert keys.status_code == 403


def test_jwt_not_issued_to_non_member(client, tenant_pair):
    response = _tokens(client, tenant_pair.b, tenant_pair.owner_a.email)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_credentials"


def test_jwt_wrong_password(client, tenant_pair):
    response = _tokens(client, tenant_pair.a, tenant_pair.owner_a.email, password="nope")

    assert response.status_code == 401


def test_jwt_not_issued_on_public_host(client, tenant_pair):
    response = client.post(
        "/api/v1/auth/token/",
        {"email": tenant_pair.owner_a.email, "password": PASSWORD},
        content_type="application/json",
    )

    assert response.status_code == 404


def test_jwt_refresh_only_on_issuing_tenant(client, tenant_pair):
    from tenants.services import membership_set

    membership_set(user=tenant_pair.owner_a, tenant=tenant_pair.b, role="member")
    refresh = _tokens(client, tenant_pair.a, tenant_pair.owner_a.email).json()["refresh"]

    on_b = client.post(
        "/api/v1/auth/token/refresh/",
        {"refresh": refresh},
        content_type="application/json",
        HTTP_HOST=host_of(tenant_pair.b),
    )
    on_a = client.post(
        "/api/v1/auth/token/refresh/",
        {"refresh": refresh},
        content_type="application/json",
        HTTP_HOST=host_of(tenant_pair.a),
    )

    assert on_b.status_code == 401
    assert on_a.status_code == 200
    assert set(on_a.json()) == {"access", "refresh"}


def test_jwt_refused_after_membership_removed(client, tenant_pair):
    from tenants.models import Membership

    member = make_member(tenant_pair.a, role="admin")
    access = _tokens(client, tenant_pair.a, member.email).json()["access"]
    Membership.objects.filter(user=member).delete()

    response = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")

    assert response.status_code == 401


def test_tampered_jwt_refused(client, tenant_pair):
    access = _tokens(client, tenant_pair.a, tenant_pair.owner_a.email).json()["access"]
    header, payload, signature = access.split(".")

    response = client.get(
        "/api/v1/me/",
        HTTP_HOST=host_of(tenant_pair.a),
        HTTP_AUTHORIZATION=f"Bearer {header}.{payload}.{signature[::-1]}",
    )

    assert response.status_code == 401


# --- session login --------------------------------------------------------------------------------


def test_session_login_and_logout(tenant_pair):
    client = Client()

    response = client.post(
        "/accounts/login/",
        {"username": tenant_pair.owner_a.email, "password": PASSWORD},
        HTTP_HOST=host_of(tenant_pair.a),
    )
    home = client.get("/", HTTP_HOST=host_of(tenant_pair.a))
    client.post("/accounts/logout/", HTTP_HOST=host_of(tenant_pair.a))
    after = client.get("/", HTTP_HOST=host_of(tenant_pair.a))

    assert response.status_code == 302
    assert home.status_code == 200
    assert b"Acme" in home.content
    assert after.status_code == 302
    assert after["Location"].startswith("/accounts/login/")


def test_session_of_a_member_is_anonymous_on_other_tenant(tenant_pair):
    client = Client()
    client.post(
        "/accounts/login/",
        {"username": tenant_pair.owner_a.email, "password": PASSWORD},
        HTTP_HOST=host_of(tenant_pair.a),
    )

    # The same session cookie presented on B's host (cookies are per host in browsers; here we force it).
    response = client.get("/", HTTP_HOST=host_of(tenant_pair.b))
    api = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.b))

    assert response.status_code == 302
    assert api.status_code == 401


def test_session_api_call_requires_csrf_for_writes(tenant_pair):
    client = Client(enforce_csrf_checks=True)
    client.force_login(tenant_pair.owner_a)

    read = client.get("/api/v1/api-keys/", HTTP_HOST=host_of(tenant_pair.a))
    write = client.post(
        "/api/v1/api-keys/",
        {"name": "x", "scopes": ["chat"]},
        content_type="application/json",
        HTTP_HOST=host_of(tenant_pair.a),
    )

    assert read.status_code == 200
    assert write.status_code == 403


def test_login_form_requires_csrf(tenant_pair):
    client = Client(enforce_csrf_checks=True)

    response = client.post(
        "/accounts/login/",
        {"username": tenant_pair.owner_a.email, "password": PASSWORD},
        HTTP_HOST=host_of(tenant_pair.a),
    )

    assert response.status_code == 403


def test_login_throttled_after_repeated_failures(tenant_pair, settings):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post(
            "/accounts/login/",
            {"username": tenant_pair.owner_a.email, "password": "wrong"},
            HTTP_HOST=host_of(tenant_pair.a),
        )

    locked = client.post(
        "/accounts/login/",
        {"username": tenant_pair.owner_a.email, "password": PASSWORD},
        HTTP_HOST=host_of(tenant_pair.a),
    )

    assert locked.status_code == 429
    assert b"Too many sign-in attempts" in locked.content
    assert "_auth_user_id" not in client.session


def test_jwt_endpoint_throttled_too(client, tenant_pair, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _tokens(client, tenant_pair.a, tenant_pair.owner_a.email, password="wrong")

    response = _tokens(client, tenant_pair.a, tenant_pair.owner_a.email)

    assert response.status_code in (401, 429)
    assert "access" not in response.json()


def test_password_reset_sends_tenant_link_to_members_only(client, tenant_pair):
    member = make_member(tenant_pair.a, role="member")
    client.post("/accounts/password-reset/", {"email": member.email}, HTTP_HOST=host_of(tenant_pair.a))
    client.post("/accounts/password-reset/", {"email": tenant_pair.owner_b.email}, HTTP_HOST=host_of(tenant_pair.a))

    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == [member.email]
    link = re.search(r"http://\S+", mail.outbox[0].body).group(0)
    assert urlparse(link).hostname == host_of(tenant_pair.a)

    form = client.get(urlparse(link).path, HTTP_HOST=host_of(tenant_pair.a), follow=True)
    done = client.post(
        form.redirect_chain[-1][0],
        {"new_password1": "N3w-long-passphrase", "new_password2": "N3w-long-passphrase"},
        HTTP_HOST=host_of(tenant_pair.a),
    )
    member.refresh_from_db()

    assert done.status_code == 302
    assert member.check_password("N3w-long-passphrase")


# --- OAuth2 ---------------------------------------------------------------------------------------


def _application(tenant, **fields):
    from oauth2_provider.models import Application

    secret = secrets.token_urlsafe(24)
    with tenant_context(tenant):
        app = Application.objects.create(client_secret=secret, hash_client_secret=True, **fields)
    return app, secret


def test_oauth2_client_credentials_scoped_to_tenant(client, tenant_pair):
    from oauth2_provider.models import Application

    app, secret = _application(
        tenant_pair.a,
        name="integration",
        user=tenant_pair.owner_a,  # client credentials act within their owner's role
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
    )
    basic = base64.b64encode(f"{app.client_id}:{secret}".encode()).decode()

    token = client.post(
        "/o/token/",
        {"grant_type": "client_credentials", "scope": "chat"},
        HTTP_HOST=host_of(tenant_pair.a),
        HTTP_AUTHORIZATION=f"Basic {basic}",
    )
    access = token.json()["access_token"]
    on_a = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")
    on_b = client.get("/api/v1/me/", HTTP_HOST=host_of(tenant_pair.b), HTTP_AUTHORIZATION=f"Bearer {access}")
    keys = client.get("/api/v1/api-keys/", HTTP_HOST=host_of(tenant_pair.a), HTTP_AUTHORIZATION=f"Bearer {access}")
    on_b_token = client.post(
        "/o/token/",
        {"grant_type": "client_credentials"},
        HTTP_HOST=host_of(tenant_pair.b),
        HTTP_AUTHORIZATION=f"Basic {basic}",
    )

    assert token.status_code == 200
    assert on_a.status_code == 200
    assert on_a.json()["kind"] == "oauth2"
    assert on_a.json()["scopes"] == ["chat"]
    assert on_b.status_code == 401
    assert keys.status_code == 403
    assert on_b_token.status_code == 401


def test_oauth2_authorization_code_with_pkce(tenant_pair):
    from oauth2_provider.models import Application

    redirect_uri = "http://client.example.test/callback"
    app, secret = _application(
        tenant_pair.a,
        name="third-party",
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=redirect_uri,
        skip_authorization=True,
    )
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    client = Client()
    client.force_login(tenant_pair.owner_a)
    host = host_of(tenant_pair.a)

    def authorize_code() -> str:
        response = client.get(
            "/o/authorize/",
            {
                "response_type": "code",
                "client_id": app.client_id,
                "redirect_uri": redirect_uri,
                "scope": "chat",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
            HTTP_HOST=host,
        )
        return parse_qs(urlparse(response["Location"]).query)["code"][0]

    def exchange(code: str, code_verifier: str):
        return Client().post(
            "/o/token/",
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": app.client_id,
                "client_secret": secret,
                "code_verifier": code_verifier,
            },
            HTTP_HOST=host,
        )

    without_pkce = client.get(
        "/o/authorize/",
        {"response_type": "code", "client_id": app.client_id, "redirect_uri": redirect_uri, "scope": "chat"},
        HTTP_HOST=host,
    )
    wrong_verifier = exchange(authorize_code(), "x" * 50)

    assert "code=" not in without_pkce.get("Location", "")
    assert wrong_verifier.status_code == 400
    # The code was burnt by the failed attempt (RFC 6749 §4.1.2); a fresh one works.
    token = exchange(authorize_code(), verifier)
    assert token.status_code == 200, token.content
    access = token.json()["access_token"]
    me = Client().get("/api/v1/me/", HTTP_HOST=host, HTTP_AUTHORIZATION=f"Bearer {access}")
    assert me.status_code == 200
    assert me.json()["email"] == tenant_pair.owner_a.email
    assert me.json()["kind"] == "oauth2"
