"""The admin site in a real Chromium against a live daphne: sign in, create a bot and see its
embed snippet, chat in the preview, upload a document and watch it become ready, charts on the
dashboard, a member refused the API keys page.

No Celery worker runs here: the upload queues its task in Redis as usual, and the test runs the
worker's own ingestion service inline (what a worker would do), while the page polls for status.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django_tenants.utils import tenant_context
from playwright.sync_api import Page, expect

from chat.models import Bot
from chat.providers.local import LocalProvider
from knowledge.models import Document, KnowledgeBase
from knowledge.services import document_ingest, knowledge_base_create
from tenants.models import User
from tests.browser.conftest import tenant_url
from tests.chat.turn_fixtures import WorkerThread
from tests.factories import PASSWORD, make_member

pytestmark = pytest.mark.browser


@pytest.fixture
def db(django_db_blocker) -> Iterator[None]:
    """Committed data: the live server reads it from its own connections."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def clean_acme(db, tenant_pair) -> Iterator[None]:
    yield
    with tenant_context(tenant_pair.a):
        Bot.objects.filter(name__startswith="Browser ").delete()
        KnowledgeBase.objects.filter(name__startswith="Browser ").delete()


def sign_in(page: Page, server, tenant, email: str) -> None:
    page.goto(tenant_url(server, tenant, "/accounts/login/"))
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def test_create_bot_see_snippet_and_chat_in_preview(page, parley_server, tenant_pair, clean_acme, django_db_blocker):
    sign_in(page, parley_server, tenant_pair.a, tenant_pair.owner_a.email)
    page.get_by_role("link", name="Bots").click()
    page.get_by_role("link", name="New bot").click()
    page.get_by_label("Name").fill("Browser support")
    page.get_by_label("Greeting").fill("Hi, ask me anything.")
    page.get_by_role("button", name="Create bot").click()

    expect(page.get_by_role("heading", name="Browser support")).to_be_visible()
    with tenant_context(tenant_pair.a):
        bot = Bot.objects.get(name="Browser support")
    snippet = page.locator("#embed-snippet")
    expect(snippet).to_have_text(
        f'<script src="http://acme.localhost:{parley_server.port}/static/widget/parley.js" '
        f'data-bot="{bot.public_id}" async></script>'
    )
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    expect(page.locator("#preview-log")).to_contain_text("Hi, ask me anything.")

    with WorkerThread(lambda _config: LocalProvider(seconds_per_word=0.0)):
        page.get_by_label("Message").fill("Hello <b>there</b>")
        page.get_by_role("button", name="Send").click()
        answer = page.locator(".bubble.assistant .meta")
        expect(answer).to_contain_text("TTFT", timeout=20_000)
    expect(page.locator(".bubble.user")).to_have_text("Hello <b>there</b>")
    assert page.locator(".preview-log b").count() == 0  # text, never markup


def test_upload_a_document_and_watch_it_become_ready(page, parley_server, tenant_pair, clean_acme, tmp_path):
    with tenant_context(tenant_pair.a):
        kb = knowledge_base_create(name="Browser handbook")
    source = tmp_path / "returns.txt"
    source.write_text("Customers may return any item within 30 days of delivery for a full refund.")
    sign_in(page, parley_server, tenant_pair.a, tenant_pair.owner_a.email)
    page.goto(tenant_url(parley_server, tenant_pair.a, f"/knowledge/{kb.pk}/"))

    page.get_by_label("Files").set_input_files([str(source)])
    page.get_by_role("button", name="Upload").click()

    row = page.locator("#documents tr", has_text="returns")
    expect(row.locator(".badge")).to_have_text("Queued")
    with tenant_context(tenant_pair.a):
        document = Document.objects.get(knowledge_base=kb)
        assert document_ingest(document_id=document.pk, ingestion_id=str(document.ingestion_id)) == "ready"
    # No reload: the page's poll picks the new status up.
    expect(row.locator(".badge")).to_have_text("Ready", timeout=10_000)
    expect(row.locator("td.num")).to_have_text("1")

    page.get_by_label("Search this knowledge base").fill("how long do I have to return an item")
    page.get_by_role("button", name="Search").click()
    expect(page.locator(".result").first).to_contain_text("within 30 days")
    expect(page.locator(".result").first).to_contain_text(re.compile(r"score 0\.\d{4}"))


def test_dashboard_shows_charts(page, parley_server, tenant_pair, db):
    sign_in(page, parley_server, tenant_pair.a, tenant_pair.owner_a.email)

    page.get_by_role("link", name="30 days").click()

    expect(page.locator("figure.chart svg[role=img]")).to_have_count(6)
    expect(page.get_by_role("link", name="30 days")).to_have_attribute("aria-current", "true")
    expect(page.get_by_role("img", name=re.compile("^Messages per day"))).to_be_visible()


def test_member_cannot_see_api_keys(page, parley_server, tenant_pair, db):
    member = make_member(tenant_pair.a, role="member")
    try:
        sign_in(page, parley_server, tenant_pair.a, member.email)

        expect(page.get_by_role("link", name="API keys")).to_have_count(0)
        response = page.goto(tenant_url(parley_server, tenant_pair.a, "/settings/api-keys/"))

        assert response.status == 403
        expect(page.get_by_role("heading", name="You can't do that here")).to_be_visible()
    finally:
        User.objects.filter(pk=member.pk).delete()


def test_create_an_api_key_see_it_once_and_revoke_it(page, parley_server, tenant_pair, db):
    from tenants.models import ApiKey

    page.on("dialog", lambda dialog: dialog.accept())  # the revoke confirmation
    sign_in(page, parley_server, tenant_pair.a, tenant_pair.owner_a.email)
    page.get_by_role("link", name="API keys").click()
    try:
        page.get_by_label("Name").fill("Browser backend key")
        page.get_by_role("button", name="Create key").click()

        secret = page.locator("#new-api-key").inner_text()
        key = ApiKey.objects.get(name="Browser backend key")
        assert secret.startswith(key.prefix)
        page.goto(page.url)  # shown once: gone from the next visit to the page
        expect(page.locator("#new-api-key")).to_have_count(0)

        row = page.locator("tr", has_text="Browser backend key")
        row.get_by_role("button", name="Revoke").click()
        expect(page.locator("tr", has_text="Browser backend key").get_by_role("button", name="Revoke")).to_have_count(0)
        key.refresh_from_db()
        assert key.revoked_at is not None
        assert ApiKey.objects.filter(name="Browser backend key").count() == 1
    finally:
        ApiKey.objects.filter(name="Browser backend key").delete()


def test_invite_a_member(page, parley_server, tenant_pair, db):
    from tenants.models import Invitation

    sign_in(page, parley_server, tenant_pair.a, tenant_pair.owner_a.email)
    page.get_by_role("link", name="Members").click()
    try:
        page.get_by_label("Email").fill("new.colleague@example.test")
        page.get_by_label("Role", exact=True).select_option("admin")
        page.get_by_role("button", name="Send invitation").click()

        expect(page.locator("table", has_text="new.colleague@example.test")).to_be_visible()
        invitation = Invitation.objects.get(tenant=tenant_pair.a, email="new.colleague@example.test")
        assert invitation.role == "admin"
        assert invitation.accepted_at is None
    finally:
        Invitation.objects.filter(email="new.colleague@example.test").delete()


MAIN_PAGES = {
    "dashboard": "/",
    "bots": "/bots/",
    "knowledge": "/knowledge/",
    "conversations": "/conversations/",
    "api-keys": "/settings/api-keys/",
    "members": "/settings/members/",
    "usage": "/usage/",
}


def test_main_pages_render_and_are_captured(page, parley_server, tenant_pair, db):
    """Every main page answers for an owner; screenshots go to var/screenshots (git-ignored)."""
    from tests.browser.test_widget import SCREENSHOTS

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    sign_in(page, parley_server, tenant_pair.a, tenant_pair.owner_a.email)
    for name, path in MAIN_PAGES.items():
        response = page.goto(tenant_url(parley_server, tenant_pair.a, path))
        assert response.status == 200, (name, response.status)
        expect(page.locator("main h1").first).to_be_visible()
        page.screenshot(path=SCREENSHOTS / f"admin-{name}.png", full_page=True)
