"""Admin site: bots (list, create, edit, delete, embed snippet, preview) and conversations."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.utils import timezone
from django_tenants.utils import tenant_context

from chat.models import Bot, Conversation, Message
from chat.services import bot_create, conversation_create
from knowledge.services import knowledge_base_create
from tests.factories import make_member
from tests.site import BASE_QUERIES, captured_queries, site_client

pytestmark = pytest.mark.django_db


def _bot_form(**overrides) -> dict:
    form = {
        "name": "Support",
        "system_prompt": "Be brief.",
        "provider_route": json.dumps({"targets": [{"kind": "local"}]}),
        "temperature": "0.3",
        "top_p": "0.9",
        "max_tokens": "256",
        "history_strategy": "window",
        "history_window": "8",
        "allowed_origins": "https://shop.example.com\nhttps://www.example.com",
        "greeting": "Hi! How can I help?",
        "primary_color": "#112233",
        "text_color": "#ffffff",
        "position": "left",
    }
    form.update(overrides)
    return form


def _make_bot(tenant, **kwargs) -> Bot:
    with tenant_context(tenant):
        return bot_create(name=kwargs.pop("name", "Helper"), **kwargs)


def _bots(tenant) -> list[tuple[str, int]]:
    with tenant_context(tenant):
        return list(Bot.objects.order_by("name").values_list("name", "version"))


# --- bots ---------------------------------------------------------------------------------------


def test_admin_creates_a_bot_from_the_form(tenant_pair):
    with tenant_context(tenant_pair.a):
        kb = knowledge_base_create(name="Handbook")
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    response = client.post("/bots/new/", _bot_form(knowledge_bases=[str(kb.pk)]))

    with tenant_context(tenant_pair.a):
        bot = Bot.objects.get()
        assert response.status_code == 302
        assert response["Location"] == f"/bots/{bot.public_id}/"
        assert bot.name == "Support"
        assert bot.generation == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 256}
        assert bot.allowed_origins == ["https://shop.example.com", "https://www.example.com"]
        assert bot.theme == {"primary_color": "#112233", "text_color": "#ffffff", "position": "left"}
        assert bot.history_window == 8
        assert list(bot.knowledge_bases.values_list("pk", flat=True)) == [kb.pk]


def test_bot_page_shows_embed_snippet_and_preview(tenant_pair):
    bot = _make_bot(tenant_pair.a, greeting="Hello there")
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    response = client.get(f"/bots/{bot.public_id}/")

    html = response.content.decode()
    assert response.status_code == 200
    snippet = (
        f"&lt;script src=&quot;http://acme.localhost/static/widget/parley.js&quot; data-bot=&quot;{bot.public_id}"
        "&quot; async&gt;&lt;/script&gt;"
    )
    assert snippet in html
    assert 'data-copy="embed-snippet"' in html
    assert f'data-bot="{bot.public_id}"' in html
    assert 'data-greeting="Hello there"' in html


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("provider_route", "{not json", "Not valid JSON"),
        ("provider_route", json.dumps({"targets": [{"kind": "nope"}]}), "provider_route.targets.0.kind"),
        ("allowed_origins", "ftp://files.example.com", "is not an origin like https://www.example.com"),
        ("temperature", "7", "Ensure this value is less than or equal to 2"),
        ("name", "", "This field is required"),
    ],
    ids=["bad_json_case", "unknown_provider_case", "bad_origin_case", "temperature_range_case", "no_name_case"],
)
def test_bad_bot_input_shows_the_error_on_its_field_and_changes_nothing(tenant_pair, field, value, message):
    bot = _make_bot(tenant_pair.a, name="Keeper", system_prompt="Original")
    before = _bots(tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    response = client.post(f"/bots/{bot.public_id}/edit/", _bot_form(**{field: value, "system_prompt": "Changed"}))

    html = response.content.decode()
    assert response.status_code == 400
    assert f'id="id_{field}_error"' in html
    assert message in html
    assert "Changed" in html  # what was typed is kept in the form
    assert _bots(tenant_pair.a) == before
    with tenant_context(tenant_pair.a):
        assert Bot.objects.get(pk=bot.pk).system_prompt == "Original"


def test_edit_keeps_masked_provider_secret(tenant_pair):
    route = {
        "targets": [{"kind": "openai", "base_url": "https://llm.example.com/v1", "api_key": "sk-real", "model": "m"}]
    }
    bot = _make_bot(tenant_pair.a, provider_route=route)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    page = client.get(f"/bots/{bot.public_id}/edit/").content.decode()
    masked = json.dumps({"targets": [{**route["targets"][0], "api_key": "********"}]})
    response = client.post(f"/bots/{bot.public_id}/edit/", _bot_form(provider_route=masked))

    assert "sk-real" not in page
    assert response.status_code == 302
    with tenant_context(tenant_pair.a):
        assert Bot.objects.get(pk=bot.pk).provider_route["targets"][0]["api_key"] == "sk-real"


def test_delete_asks_for_confirmation_then_deletes(tenant_pair):
    bot = _make_bot(tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    confirm = client.get(f"/bots/{bot.public_id}/delete/")
    response = client.post(f"/bots/{bot.public_id}/delete/")

    assert confirm.status_code == 200
    assert "cannot be undone" in confirm.content.decode()
    assert response.status_code == 302
    assert _bots(tenant_pair.a) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/bots/new/"),
        ("post", "/bots/new/"),
        ("get", "/bots/{id}/edit/"),
        ("post", "/bots/{id}/edit/"),
        ("get", "/bots/{id}/delete/"),
        ("post", "/bots/{id}/delete/"),
        ("get", "/conversations/"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_member_is_refused_admin_bot_pages_and_nothing_changes(tenant_pair, method, path):
    bot = _make_bot(tenant_pair.a, name="Untouched")
    member = make_member(tenant_pair.a, role="member")
    client = site_client(tenant_pair.a, member)

    response = getattr(client, method)(
        path.format(id=bot.public_id), _bot_form(name="Hacked") if method == "post" else None
    )

    assert response.status_code == 403
    assert "owners and admins" in response.content.decode()
    assert _bots(tenant_pair.a) == [("Untouched", 1)]


def _identity_secret(tenant, bot) -> str:
    with tenant_context(tenant):
        return Bot.objects.get(pk=bot.pk).identity_secret


def test_admin_turns_identity_verification_on_and_sees_the_secret_once(tenant_pair):
    bot = _make_bot(tenant_pair.a)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    before = client.get(f"/bots/{bot.public_id}/").content.decode()
    rotated = client.post(f"/bots/{bot.public_id}/identity-secret/")
    secret = _identity_secret(tenant_pair.a, bot)
    again = client.post(f"/bots/{bot.public_id}/identity-secret/")
    later = client.get(f"/bots/{bot.public_id}/").content.decode()

    assert "off — anonymous visitors only" in before
    assert rotated.status_code == 200
    assert len(secret) >= 40
    assert f'<code id="new-identity-secret">{secret}</code>' in rotated.content.decode()
    assert _identity_secret(tenant_pair.a, bot) not in (secret, "")  # rotated: the old one stops verifying
    assert secret not in again.content.decode()
    assert _identity_secret(tenant_pair.a, bot) not in later  # shown once, never on the page again
    assert "Status: on" in later


def test_identity_secret_is_admin_only_post_only_and_per_tenant(tenant_pair):
    bot = _make_bot(tenant_pair.a)
    member = make_member(tenant_pair.a, role="member")
    path = f"/bots/{bot.public_id}/identity-secret/"

    refused = site_client(tenant_pair.a, member).post(path)
    detail = site_client(tenant_pair.a, member).get(f"/bots/{bot.public_id}/").content.decode()
    other_tenant = site_client(tenant_pair.b, tenant_pair.owner_b).post(path)
    by_get = site_client(tenant_pair.a, tenant_pair.owner_a).get(path)

    assert refused.status_code == 403
    assert "Identity verification" not in detail
    assert other_tenant.status_code == 404
    assert by_get.status_code == 302
    assert _identity_secret(tenant_pair.a, bot) == ""


def test_member_sees_bots_read_only(tenant_pair):
    bot = _make_bot(tenant_pair.a)
    member = make_member(tenant_pair.a, role="member")
    client = site_client(tenant_pair.a, member)

    listing = client.get("/bots/").content.decode()
    detail = client.get(f"/bots/{bot.public_id}/").content.decode()

    assert bot.public_id in listing
    assert "New bot" not in listing
    assert "/edit/" not in detail


def test_other_tenants_bot_is_not_found(tenant_pair):
    bot = _make_bot(tenant_pair.a)
    client = site_client(tenant_pair.b, tenant_pair.owner_b)

    for path in (f"/bots/{bot.public_id}/", f"/bots/{bot.public_id}/edit/", f"/bots/{bot.public_id}/delete/"):
        assert client.get(path).status_code == 404
    assert client.post(f"/bots/{bot.public_id}/delete/").status_code == 404
    assert _bots(tenant_pair.a) == [("Helper", 1)]


def test_anonymous_and_non_members_are_sent_to_sign_in(tenant_pair):
    outsider = make_member(tenant_pair.b)

    for client in (site_client(tenant_pair.a), site_client(tenant_pair.a, outsider)):
        response = client.get("/bots/")
        assert response.status_code == 302
        assert response["Location"] == "/accounts/login/?next=/bots/"


def test_bot_list_query_count_does_not_grow_with_bots(tenant_pair):
    with tenant_context(tenant_pair.a):
        kb = knowledge_base_create(name="KB")
    for index in range(5):
        _make_bot(tenant_pair.a, name=f"Bot {index}", knowledge_bases=[kb.pk])
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    client.get("/bots/")  # warm the session cache

    with captured_queries() as queries:
        response = client.get("/bots/")

    assert response.status_code == 200
    assert len(queries) == BASE_QUERIES + 2  # bots, their knowledge bases (prefetched)


_TRANSCRIPT_LINK = re.compile(r'href="/conversations/[0-9a-f-]{36}/"')


# --- conversations ------------------------------------------------------------------------------


def _conversation(bot, *, kind="visitor", created_at=None, feedback="", cached=False, answer="Paris.") -> Conversation:
    conversation = conversation_create(bot=bot, end_user_kind=kind, end_user_id=f"{kind}-1", title="Capital")
    if created_at is not None:
        Conversation.objects.filter(pk=conversation.pk).update(created_at=created_at)
    Message.objects.create(conversation=conversation, role="user", content="Capital of France?")
    Message.objects.create(
        conversation=conversation,
        role="assistant",
        content=answer,
        tokens_in=12,
        tokens_out=3,
        ttft_ms=120.0,
        total_ms=340.0,
        provider="local",
        model="echo-1",
        is_cached=cached,
        cache_layer="exact" if cached else "",
        citations=[{"index": 1, "document_id": 7, "title": "Atlas", "page": 12, "section": "Europe"}],
        finish_reason="stop",
        feedback=feedback,
        feedback_comment="Too short" if feedback == "down" else "",
    )
    return conversation


def test_conversation_filters(tenant_pair):
    with tenant_context(tenant_pair.a):
        support = bot_create(name="Support")
        sales = bot_create(name="Sales")
        plain = _conversation(support)
        disliked = _conversation(support, feedback="down")
        cached = _conversation(sales, cached=True, kind="api")
        old = _conversation(sales, created_at=timezone.now() - timedelta(days=40))
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    def listed(query: str) -> set:
        html = client.get(f"/conversations/?{query}").content.decode()
        return {c.pk for c in (plain, disliked, cached, old) if f"/conversations/{c.pk}/" in html}

    week_ago = (timezone.now() - timedelta(days=7)).date().isoformat()
    assert listed("") == {plain.pk, disliked.pk, cached.pk, old.pk}
    assert listed(f"bot={support.pk}") == {plain.pk, disliked.pk}
    assert listed("negative=on") == {disliked.pk}
    assert listed("cached=on") == {cached.pk}
    assert listed("kind=api") == {cached.pk}
    assert listed(f"date_from={week_ago}") == {plain.pk, disliked.pk, cached.pk}


def test_conversation_list_paginates_with_pinned_queries(tenant_pair):
    with tenant_context(tenant_pair.a):
        bot = bot_create(name="Support")
        for _ in range(30):
            conversation_create(bot=bot, end_user_kind="visitor", end_user_id="v")
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    client.get("/conversations/")

    with captured_queries() as queries:
        first = client.get("/conversations/")
    query_count = len(queries)
    second = client.get("/conversations/?page=2")

    assert len(_TRANSCRIPT_LINK.findall(first.content.decode())) == 25
    assert len(_TRANSCRIPT_LINK.findall(second.content.decode())) == 5
    assert "Page 2 of 2" in second.content.decode()
    assert query_count == BASE_QUERIES + 3  # bots of the filter, count, page


def test_transcript_shows_citations_timings_cache_and_feedback(tenant_pair):
    with tenant_context(tenant_pair.a):
        conversation = _conversation(bot_create(name="Support"), feedback="down", cached=True)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    html = client.get(f"/conversations/{conversation.pk}/").content.decode()

    assert "Capital of France?" in html
    assert "Paris." in html
    assert "TTFT 120 ms" in html
    assert "total 340 ms" in html
    assert "local · echo-1" in html
    assert "cache hit: exact" in html
    assert "Not helpful" in html
    assert "Too short" in html
    assert "Atlas, page 12 — Europe" in html


def test_transcript_escapes_model_output(tenant_pair):
    with tenant_context(tenant_pair.a):
        conversation = _conversation(bot_create(name="Support"), answer='<img src=x onerror="alert(1)">')
    client = site_client(tenant_pair.a, tenant_pair.owner_a)

    html = client.get(f"/conversations/{conversation.pk}/").content.decode()

    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html


def test_other_tenants_conversation_is_not_found(tenant_pair):
    with tenant_context(tenant_pair.a):
        conversation = _conversation(bot_create(name="Support"))
    client = site_client(tenant_pair.b, tenant_pair.owner_b)

    assert client.get(f"/conversations/{conversation.pk}/").status_code == 404
    assert client.get("/conversations/not-a-uuid/").status_code == 404
