"""Tenant lifecycle end to end, and the operator commands that script it."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django_tenants.utils import schema_exists, tenant_context

from knowledge.models import KnowledgeBase
from tenants.models import ApiKey, Domain, Membership, Tenant
from tenants.redis import get_redis, tenant_key
from tenants.services import tenant_activate, tenant_create, tenant_delete, tenant_suspend
from tests.factories import bearer, make_api_key, make_user

pytestmark = pytest.mark.django_db


def test_create_use_suspend_refuse_delete_gone(client, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    owner = make_user()
    tenant = tenant_create(name="Initech", slug="initech", owner=owner)
    _, raw = make_api_key(tenant)
    host = "initech.localhost"
    with tenant_context(tenant):
        KnowledgeBase.objects.create(name="handbook")
    get_redis().set(tenant_key(tenant.schema_name, "hot", 1), "x")
    (tmp_path / tenant.schema_name).mkdir()
    (tmp_path / tenant.schema_name / "upload.txt").write_text("data")

    used = client.get("/api/v1/me/", **bearer(raw))
    page = client.get("/accounts/login/", HTTP_HOST=host)
    assert used.status_code == 200
    assert page.status_code == 200

    tenant_suspend(tenant=tenant, reason="unpaid invoice")
    refused_api = client.get("/api/v1/me/", **bearer(raw))
    refused_page = client.get("/accounts/login/", HTTP_HOST=host)
    assert refused_api.status_code == 403
    assert refused_api.json()["error"]["code"] == "tenant_suspended"
    assert "suspended" in refused_api.json()["error"]["message"]
    assert refused_page.status_code == 403

    tenant_activate(tenant=tenant)
    assert client.get("/api/v1/me/", **bearer(raw)).status_code == 200

    result = tenant_delete(tenant=Tenant.objects.get(pk=tenant.pk))

    assert result.redis_keys_deleted == 1
    assert not schema_exists("t_initech")
    assert not Tenant.objects.filter(slug="initech").exists()
    assert not Domain.objects.filter(domain=host).exists()
    assert not ApiKey.objects.filter(tenant_id=tenant.pk).exists()
    assert not Membership.objects.filter(tenant_id=tenant.pk).exists()
    assert get_redis().keys(tenant_key(tenant.schema_name, "*")) == []
    assert not (tmp_path / tenant.schema_name).exists()
    gone = client.get("/api/v1/me/", **bearer(raw))
    assert gone.status_code == 401


def test_new_tenant_schema_is_complete_and_empty(tenant_pair):
    tenant = tenant_create(name="Hooli", slug="hooli")

    with tenant_context(tenant):
        assert KnowledgeBase.objects.count() == 0
        KnowledgeBase.objects.create(name="first")
        assert KnowledgeBase.objects.count() == 1
    with tenant_context(tenant_pair.a):
        assert not KnowledgeBase.objects.filter(name="first").exists()


@pytest.mark.parametrize(
    ("slug", "label"),
    [
        ("a", "too_short"),
        ("Bad_Slug", "uppercase_underscore"),
        ("www", "reserved"),
        ("-lead", "leading_hyphen"),
        ("x" * 60, "too_long"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.isidentifier() else None,
)
def test_invalid_slug_refused_case(slug, label):
    from tenants.errors import ValidationFailed

    count = Tenant.objects.count()
    with pytest.raises(ValidationFailed):
        tenant_create(name="X", slug=slug)
    assert Tenant.objects.count() == count


def test_duplicate_slug_conflict_leaves_original(tenant_pair):
    from tenants.errors import Conflict

    with pytest.raises(Conflict):
        tenant_create(name="Another Acme", slug="acme")
    assert Tenant.objects.get(slug="acme").name == "Acme"


# --- operator commands ---------------------------------------------------------------------------


def _run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_commands_script_the_whole_lifecycle(client):
    created = _run(
        "tenant_create",
        "umbrella",
        "--name",
        "Umbrella",
        "--owner-email",
        "boss@umbrella.test",
        "--owner-password",
        "long-enough-password",
    )
    key_output = _run("api_key_create", "umbrella", "--name", "ci", "--scopes", "chat")
    raw = key_output.strip().splitlines()[-1]

    assert "created tenant umbrella" in created
    assert raw.startswith("prly_")
    me = client.get("/api/v1/me/", **bearer(raw))
    assert me.status_code == 200
    assert me.json()["scopes"] == ["chat"]

    _run("tenant_suspend", "umbrella", "--reason", "test")
    assert client.get("/api/v1/me/", **bearer(raw)).status_code == 403
    _run("tenant_suspend", "umbrella", "--reactivate")
    assert client.get("/api/v1/me/", **bearer(raw)).status_code == 200

    with pytest.raises(CommandError):
        _run("tenant_delete", "umbrella")
    _run("tenant_delete", "umbrella", "--yes")
    assert not schema_exists("t_umbrella")
    assert client.get("/api/v1/me/", **bearer(raw)).status_code == 401


def test_command_errors_are_clear():
    with pytest.raises(CommandError, match="No tenant with slug 'nope'"):
        _run("api_key_create", "nope", "--name", "x")
    with pytest.raises(CommandError, match="Scopes must be"):
        _run("api_key_create", "acme", "--name", "x", "--scopes", "everything")


def test_provisioned_schema_has_no_foreign_keys_into_public(tenant_pair):
    from django.db import connection

    tenant = tenant_create(name="Wayne", slug="wayne")

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace JOIN pg_class r ON r.oid = c.confrelid "
            "JOIN pg_namespace rn ON rn.oid = r.relnamespace "
            "WHERE c.contype = 'f' AND n.nspname = %s AND rn.nspname = 'public'",
            [tenant.schema_name],
        )
        assert cursor.fetchone() == (0,)
        cursor.execute(
            "SELECT count(*) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE c.contype = 'f' AND n.nspname = %s",
            [tenant.schema_name],
        )
        assert cursor.fetchone()[0] > 0  # foreign keys inside the schema are kept


def test_user_delete_removes_their_tokens_in_every_tenant(tenant_pair):
    from datetime import timedelta

    from django.utils import timezone
    from oauth2_provider.models import AccessToken, Application

    from tenants.models import User
    from tenants.services import membership_set, user_delete

    person = make_user()
    membership_set(user=person, tenant=tenant_pair.a, role="member")
    for tenant in (tenant_pair.a, tenant_pair.b):
        with tenant_context(tenant):
            application = Application.objects.create(
                name="app", client_type="confidential", authorization_grant_type="client-credentials", user=person
            )
            AccessToken.objects.create(
                user=person,
                application=application,
                token=f"token-{tenant.slug}",
                expires=timezone.now() + timedelta(hours=1),
                scope="chat",
            )

    user_delete(user=person)

    assert not User.objects.filter(pk=person.pk).exists()
    for tenant in (tenant_pair.a, tenant_pair.b):
        with tenant_context(tenant):
            assert not AccessToken.objects.filter(user_id=person.pk).exists()
            assert not Application.objects.filter(user_id=person.pk).exists()
