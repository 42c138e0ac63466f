"""Admin site: API keys (shown once, scopes, expiry, revoke), members (invite by email, accept,
roles, remove, the last owner stays) and usage & plan."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.utils import timezone

from billing.models import UsageDaily
from tenants.models import ApiKey, Invitation, Membership, User
from tenants.services import api_key_hash
from tests.factories import PASSWORD, make_api_key, make_member, make_user
from tests.site import BASE_QUERIES, captured_queries, site_client

pytestmark = pytest.mark.django_db


# --- API keys -----------------------------------------------------------------------------------


def test_created_key_is_shown_once_and_only_its_hash_is_stored(tenant_pair):
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    expires = (timezone.now() + timedelta(days=30)).date()

    response = client.post(
        "/settings/api-keys/", {"name": "Backend", "scopes": ["chat", "knowledge:read"], "expires_on": expires}
    )
    again = client.get("/settings/api-keys/")

    raw = re.search(r'<code id="new-api-key">(prly_[^<]+)</code>', response.content.decode()).group(1)
    key = ApiKey.objects.get(tenant=tenant_pair.a, name="Backend")
    assert response.status_code == 201
    assert 'data-copy="new-api-key"' in response.content.decode()
    assert key.secret_hash == api_key_hash(raw)
    assert key.scopes == ["chat", "knowledge:read"]
    assert key.expires_at.date() == expires
    assert key.created_by == tenant_pair.owner_a
    assert raw not in again.content.decode()
    assert key.prefix in again.content.decode()


def test_bad_key_input_shows_errors_and_creates_nothing(tenant_pair):
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    yesterday = (timezone.now() - timedelta(days=1)).date()

    no_scopes = client.post("/settings/api-keys/", {"name": "K"})
    past = client.post("/settings/api-keys/", {"name": "K", "scopes": ["chat"], "expires_on": yesterday})

    assert no_scopes.status_code == 400
    assert 'id="id_scopes_error"' in no_scopes.content.decode()
    assert past.status_code == 400
    assert 'id="id_expires_on_error"' in past.content.decode()
    assert not ApiKey.objects.filter(tenant=tenant_pair.a, name="K").exists()


def test_revoke_key_and_list_shows_last_use(tenant_pair):
    key, _ = make_api_key(tenant_pair.a, name="Old")
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now() - timedelta(hours=2))
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    before = client.get("/settings/api-keys/").content.decode()
    response = client.post(f"/settings/api-keys/{key.pk}/revoke/")
    after = client.get("/settings/api-keys/").content.decode()

    key.refresh_from_db()
    assert response.status_code == 302
    assert key.revoked_at is not None
    row = before.split(f"<code>{key.prefix}</code>")[1].split("</tr>")[0]
    assert "never" in row  # no expiry
    assert row.count("never") == 1  # but it was used
    assert '<span class="badge revoked">revoked</span>' in after


def test_api_keys_page_query_count_is_fixed(tenant_pair):
    for index in range(4):
        make_api_key(tenant_pair.a, name=f"k{index}")
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    client.get("/settings/api-keys/")

    with captured_queries() as queries:
        client.get("/settings/api-keys/")

    assert len(queries) == BASE_QUERIES + 1


def test_member_cannot_create_or_revoke_keys(tenant_pair):
    key, _ = make_api_key(tenant_pair.a, name="Precious")
    member = make_member(tenant_pair.a)
    client = site_client(tenant_pair.a, member)

    create = client.post("/settings/api-keys/", {"name": "Mine", "scopes": ["admin"]})
    revoke = client.post(f"/settings/api-keys/{key.pk}/revoke/")

    key.refresh_from_db()
    assert (create.status_code, revoke.status_code) == (403, 403)
    assert key.revoked_at is None
    assert not ApiKey.objects.filter(name="Mine").exists()


def test_other_tenants_key_cannot_be_revoked(tenant_pair):
    key, _ = make_api_key(tenant_pair.a)

    response = site_client(tenant_pair.b, tenant_pair.owner_b).post(f"/settings/api-keys/{key.pk}/revoke/")

    key.refresh_from_db()
    assert response.status_code == 404
    assert key.revoked_at is None


# --- members and invitations --------------------------------------------------------------------


@pytest.fixture
def invite(django_capture_on_commit_callbacks):
    """Post the invitation form; the email leaves on commit, so run the commit callbacks then."""

    def post(client, email, role="member"):
        with django_capture_on_commit_callbacks(execute=True):
            return client.post("/settings/members/", {"email": email, "role": role})

    return post


def _accept_link() -> str:
    (message,) = mail.outbox
    return re.search(r"http://acme\.localhost(/invitations/[^/\s]+/)", message.body).group(1)


def test_invitation_of_a_new_person_end_to_end(tenant_pair, invite):
    admin = site_client(tenant_pair.a, tenant_pair.owner_a)

    invited = invite(admin, "New.Person@Example.test", role="admin")
    link = _accept_link()
    page = site_client(tenant_pair.a).get(link)
    mismatch = site_client(tenant_pair.a).post(link, {"password1": "x-Long-password-1", "password2": "other"})
    newcomer = site_client(tenant_pair.a)
    accepted = newcomer.post(
        link, {"full_name": "New", "password1": "x-Long-password-1", "password2": "x-Long-password-1"}
    )
    reused = site_client(tenant_pair.a).get(link)

    assert invited.status_code == 302
    assert mail.outbox[0].to == ["new.person@example.test"]
    assert "Acme" in mail.outbox[0].subject
    assert page.status_code == 200
    assert "Choose a password" in page.content.decode()
    assert mismatch.status_code == 400
    assert accepted.status_code == 302
    assert accepted["Location"] == "/"
    user = User.objects.get(email="new.person@example.test")
    assert user.check_password("x-Long-password-1")
    assert Membership.objects.get(user=user, tenant=tenant_pair.a).role == "admin"
    assert newcomer.get("/").status_code == 200  # signed in
    assert reused.status_code == 404
    stored = Invitation.objects.get(email="new.person@example.test")
    assert link.split("/")[2] not in stored.token_hash  # only the hash is stored


def test_invitation_of_an_existing_user_asks_for_their_password(tenant_pair, invite):
    existing = make_user(email="known@example.test")
    invite(site_client(tenant_pair.a, tenant_pair.owner_a), "known@example.test")
    link = _accept_link()

    wrong = site_client(tenant_pair.a).post(link, {"password": "wrong"})
    after_wrong = Membership.objects.filter(user=existing, tenant=tenant_pair.a).exists()
    right = site_client(tenant_pair.a).post(link, {"password": PASSWORD})

    assert wrong.status_code == 400
    assert "not the password" in wrong.content.decode()
    assert after_wrong is False
    assert right.status_code == 302
    assert Membership.objects.get(user=existing, tenant=tenant_pair.a).role == "member"


def test_invitation_link_is_bound_to_its_tenant(tenant_pair, invite):
    invite(site_client(tenant_pair.a, tenant_pair.owner_a), "someone@example.test")
    link = _accept_link()

    response = site_client(tenant_pair.b).get(link)

    assert response.status_code == 404


def test_inviting_a_member_again_is_an_error_on_the_field(tenant_pair, invite):
    member = make_member(tenant_pair.a)

    response = invite(site_client(tenant_pair.a, tenant_pair.owner_a), member.email)

    assert response.status_code == 400
    assert 'id="id_email_error"' in response.content.decode()
    assert mail.outbox == []


def test_role_change_and_removal(tenant_pair):
    member = make_member(tenant_pair.a)
    other = make_member(tenant_pair.a)
    membership = Membership.objects.get(user=member, tenant=tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    promoted = client.post(f"/settings/members/{membership.pk}/role/", {"role": "admin"})
    removed = client.post(f"/settings/members/{Membership.objects.get(user=other).pk}/remove/")

    assert (promoted.status_code, removed.status_code) == (302, 302)
    assert Membership.objects.get(pk=membership.pk).role == "admin"
    assert not Membership.objects.filter(user=other).exists()


def test_last_owner_can_be_neither_demoted_nor_removed(tenant_pair):
    owner = Membership.objects.get(user=tenant_pair.owner_a, tenant=tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    demoted = client.post(f"/settings/members/{owner.pk}/role/", {"role": "member"}, follow=True)
    removed = client.post(f"/settings/members/{owner.pk}/remove/", follow=True)

    assert "at least one owner" in demoted.content.decode()
    assert "at least one owner" in removed.content.decode()
    assert Membership.objects.get(pk=owner.pk).role == "owner"


def test_admin_cannot_touch_owners(tenant_pair, invite):
    admin = make_member(tenant_pair.a, role="admin")
    owner = Membership.objects.get(user=tenant_pair.owner_a, tenant=tenant_pair.a)
    client = site_client(tenant_pair.a, admin)

    demote = client.post(f"/settings/members/{owner.pk}/role/", {"role": "member"})
    remove = client.post(f"/settings/members/{owner.pk}/remove/")
    invite_owner = invite(client, "boss@example.test", role="owner")

    assert (demote.status_code, remove.status_code, invite_owner.status_code) == (403, 403, 400)
    assert Membership.objects.get(pk=owner.pk).role == "owner"
    assert mail.outbox == []


def test_member_cannot_manage_members(tenant_pair, invite):
    member = make_member(tenant_pair.a)
    target = Membership.objects.get(user=tenant_pair.owner_a, tenant=tenant_pair.a)
    client = site_client(tenant_pair.a, member)

    responses = [
        invite(client, "friend@example.test", role="owner"),
        client.post(f"/settings/members/{target.pk}/remove/"),
        client.post(f"/settings/members/{Membership.objects.get(user=member).pk}/role/", {"role": "owner"}),
    ]

    assert [r.status_code for r in responses] == [403, 403, 403]
    assert Membership.objects.get(user=member).role == "member"
    assert Membership.objects.filter(pk=target.pk).exists()
    assert mail.outbox == []


def test_other_tenants_membership_is_not_found(tenant_pair):
    membership = Membership.objects.get(user=tenant_pair.owner_a, tenant=tenant_pair.a)

    response = site_client(tenant_pair.b, tenant_pair.owner_b).post(f"/settings/members/{membership.pk}/remove/")

    assert response.status_code == 404
    assert Membership.objects.filter(pk=membership.pk).exists()


def test_forms_require_csrf(tenant_pair):
    client = site_client(tenant_pair.a, tenant_pair.owner_a, enforce_csrf_checks=True)

    response = client.post("/settings/api-keys/", {"name": "K", "scopes": ["chat"]})

    assert response.status_code == 403
    assert not ApiKey.objects.filter(name="K").exists()


# --- usage & plan -------------------------------------------------------------------------------


def test_usage_page_shows_plan_usage_breakdowns_and_export(tenant_pair):
    key, _ = make_api_key(tenant_pair.a, name="Server")
    today = datetime.now(tz=UTC).date()
    UsageDaily.objects.create(
        tenant=tenant_pair.a, day=today, bot="bot_x", api_key_id=key.pk, requests=3, tokens_in=100, tokens_out=50
    )
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    html = client.get("/usage/").content.decode()

    assert "Included tokens per month" in html
    assert f"Server ({key.prefix})" in html
    assert "bot_x" in html
    assert f'href="/api/v1/usage/export.csv?from={today.replace(day=1).isoformat()}&amp;to={today.isoformat()}"' in html
    export = client.get(f"/api/v1/usage/export.csv?from={today.replace(day=1).isoformat()}&to={today.isoformat()}")
    assert export.status_code == 200
    assert export["Content-Type"] == "text/csv; charset=utf-8"
