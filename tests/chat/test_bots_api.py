"""Bots, conversations and messages over REST: behaviour, validation, end-user scoping."""

from __future__ import annotations

import pytest
from django_tenants.utils import tenant_context

from chat.models import Bot, Conversation, Message
from knowledge.models import KnowledgeBase
from tenants.models import PublicBot
from tests.factories import bearer, make_api_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_key(tenant_pair):
    return make_api_key(tenant_pair.a)[1]


def _post(client, path, body, raw):
    return client.post(path, body, content_type="application/json", **bearer(raw))


def _patch(client, path, body, raw):
    return client.patch(path, body, content_type="application/json", **bearer(raw))


def test_create_bot_defaults_and_public_id(client, tenant_pair, admin_key):
    response = _post(
        client, "/api/v1/bots/", {"name": "Support", "allowed_origins": ["https://Shop.Example.com/"]}, admin_key
    )

    body = response.json()
    assert response.status_code == 201
    assert body["id"].startswith("bot_")
    assert body["provider_route"] == {"targets": [{"kind": "local"}]}
    assert body["generation"] == {"temperature": 0.2, "top_p": 1.0, "max_tokens": 512}
    assert body["allowed_origins"] == ["https://shop.example.com"]
    assert body["version"] == 1
    assert PublicBot.objects.filter(public_id=body["id"], tenant=tenant_pair.a).exists()
    models = client.get("/v1/models", **bearer(admin_key)).json()["data"]
    assert [m["id"] for m in models if m["id"] == body["id"]] == [body["id"]]


def test_update_bumps_version_only_for_answer_fields(client, tenant_pair, admin_key):
    bot_id = _post(client, "/api/v1/bots/", {"name": "Support"}, admin_key).json()["id"]

    cosmetic = _patch(
        client, f"/api/v1/bots/{bot_id}/", {"greeting": "Hi!", "theme": {"primary_color": "#000"}}, admin_key
    )
    prompt = _patch(client, f"/api/v1/bots/{bot_id}/", {"system_prompt": "Be terse."}, admin_key)
    same = _patch(client, f"/api/v1/bots/{bot_id}/", {"system_prompt": "Be terse."}, admin_key)

    assert cosmetic.json()["version"] == 1
    assert prompt.json()["version"] == 2
    assert same.json()["version"] == 2


def test_attaching_knowledge_base_bumps_version(client, tenant_pair, admin_key):
    with tenant_context(tenant_pair.a):
        kb = KnowledgeBase.objects.create(name="handbook")
    bot_id = _post(client, "/api/v1/bots/", {"name": "Support"}, admin_key).json()["id"]

    response = _patch(client, f"/api/v1/bots/{bot_id}/", {"knowledge_bases": [kb.pk]}, admin_key)

    assert response.json()["knowledge_bases"] == [kb.pk]
    assert response.json()["version"] == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"name": ""}, "name", id="empty_name_case"),
        pytest.param({"name": "b", "provider_route": {"targets": []}}, "provider_route.targets", id="empty_route_case"),
        pytest.param(
            {"name": "b", "provider_route": {"targets": [{"kind": "magic"}]}},
            "provider_route.targets.0.kind",
            id="unknown_provider_case",
        ),
        pytest.param(
            {"name": "b", "provider_route": {"targets": [{"kind": "openai"}]}},
            "provider_route.targets.0.base_url",
            id="openai_without_url_case",
        ),
        pytest.param(
            {"name": "b", "generation": {"temperature": 7}},
            "generation.temperature",
            id="temperature_out_of_range_case",
        ),
        pytest.param(
            {"name": "b", "generation": {"max_tokens": "lots"}},
            "generation.max_tokens",
            id="max_tokens_not_number_case",
        ),
        pytest.param({"name": "b", "generation": {"temprature": 1}}, "generation.temprature", id="typo_param_case"),
        pytest.param(
            {"name": "b", "allowed_origins": ["https://shop.example.com/path"]},
            "allowed_origins",
            id="origin_with_path_case",
        ),
        pytest.param(
            {"name": "b", "allowed_origins": ["javascript:alert(1)"]}, "allowed_origins", id="origin_bad_scheme_case"
        ),
        pytest.param({"name": "b", "knowledge_bases": [999999]}, "knowledge_bases", id="unknown_kb_case"),
        pytest.param({"name": "b", "history_strategy": "forever"}, "history_strategy", id="bad_strategy_case"),
        pytest.param({"name": "b", "colour": "red"}, "colour", id="unknown_field_case"),
    ],
)
def test_bad_bot_input_case(client, tenant_pair, admin_key, body, param):
    with tenant_context(tenant_pair.a):
        count = Bot.objects.count()

    response = _post(client, "/api/v1/bots/", body, admin_key)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param
    with tenant_context(tenant_pair.a):
        assert Bot.objects.count() == count


def test_bad_update_changes_nothing(client, tenant_pair, admin_key):
    bot_id = _post(client, "/api/v1/bots/", {"name": "Support", "system_prompt": "keep me"}, admin_key).json()["id"]

    response = _patch(
        client, f"/api/v1/bots/{bot_id}/", {"system_prompt": "changed", "generation": {"top_p": 9}}, admin_key
    )

    assert response.status_code == 400
    with tenant_context(tenant_pair.a):
        bot = Bot.objects.get(public_id=bot_id)
    assert (bot.system_prompt, bot.version) == ("keep me", 1)


def test_delete_bot_removes_public_id(client, tenant_pair, admin_key):
    bot_id = _post(client, "/api/v1/bots/", {"name": "Support"}, admin_key).json()["id"]

    response = client.delete(f"/api/v1/bots/{bot_id}/", **bearer(admin_key))

    assert response.status_code == 204
    assert not PublicBot.objects.filter(public_id=bot_id).exists()
    assert client.get(f"/api/v1/bots/{bot_id}/", **bearer(admin_key)).status_code == 404


def test_chat_keys_see_only_their_own_conversations(client, tenant_pair, admin_key):
    bot_id = _post(client, "/api/v1/bots/", {"name": "Support"}, admin_key).json()["id"]
    _, alice_key = make_api_key(tenant_pair.a, scopes=["chat"])
    _, bob_key = make_api_key(tenant_pair.a, scopes=["chat"])
    alice_conversation = _post(client, f"/api/v1/bots/{bot_id}/conversations/", {"title": "alice"}, alice_key).json()

    bob_get = client.get(f"/api/v1/conversations/{alice_conversation['id']}/", **bearer(bob_key))
    bob_delete = client.delete(f"/api/v1/conversations/{alice_conversation['id']}/", **bearer(bob_key))
    bob_list = client.get(f"/api/v1/bots/{bot_id}/conversations/", **bearer(bob_key)).json()["data"]
    alice_list = client.get(f"/api/v1/bots/{bot_id}/conversations/", **bearer(alice_key)).json()["data"]
    admin_list = client.get(f"/api/v1/bots/{bot_id}/conversations/", **bearer(admin_key)).json()["data"]

    assert bob_get.status_code == 404
    assert bob_delete.status_code == 404
    assert bob_list == []
    assert [c["title"] for c in alice_list] == ["alice"]
    assert [c["title"] for c in admin_list] == ["alice"]


def test_api_caller_can_name_its_end_users(client, tenant_pair):
    _, key = make_api_key(tenant_pair.a, scopes=["chat"])
    with tenant_context(tenant_pair.a):
        from chat.services import bot_create

        bot = bot_create(name="Support")
    _post(client, f"/api/v1/bots/{bot.public_id}/conversations/", {"user": "customer-1"}, key)
    _post(client, f"/api/v1/bots/{bot.public_id}/conversations/", {"user": "customer-2"}, key)

    first = client.get(f"/api/v1/bots/{bot.public_id}/conversations/?user=customer-1", **bearer(key)).json()["data"]

    assert len(first) == 1
    assert first[0]["end_user_id"].endswith(":customer-1")


def test_messages_listed_in_creation_order(client, tenant_pair, admin_key):
    from datetime import timedelta

    from django.utils import timezone

    with tenant_context(tenant_pair.a):
        from chat.services import bot_create

        bot = bot_create(name="Support")
        conversation = Conversation.objects.create(bot=bot, end_user_kind="api", end_user_id="x")
        start = timezone.now()
        for index, role in enumerate(["user", "assistant", "user", "assistant"]):
            Message.objects.create(
                conversation=conversation,
                role=role,
                content=f"m{index}",
                created_at=start + timedelta(milliseconds=index),
            )

    response = client.get(f"/api/v1/conversations/{conversation.pk}/messages/", **bearer(admin_key))

    assert [m["content"] for m in response.json()["data"]] == ["m0", "m1", "m2", "m3"]


def test_malformed_conversation_id_is_404(client, tenant_pair, admin_key):
    response = client.get("/api/v1/conversations/not-a-uuid/", **bearer(admin_key))

    assert response.status_code == 404


def test_provider_api_keys_are_never_returned_and_survive_a_round_trip(client, tenant_pair, admin_key):
    """A bot's route reads back with its provider keys masked (any chat-scope key may read bots);
    sending the masked route back keeps the stored key, a new key replaces it, and a mask with no
    stored key behind it is refused, changing nothing."""
    route = {
        "targets": [{"kind": "openai", "base_url": "https://llm.example.com/v1", "api_key": "sk-real", "model": "m"}]
    }
    created = _post(client, "/api/v1/bots/", {"name": "Keyed", "provider_route": route}, admin_key)
    bot_id = created.json()["id"]
    path = f"/api/v1/bots/{bot_id}/"
    read = client.get(path, **bearer(admin_key)).json()
    listed = [bot for bot in client.get("/api/v1/bots/", **bearer(admin_key)).json()["data"] if bot["id"] == bot_id]
    masked = read["provider_route"]["targets"][0]

    kept = _patch(client, path, {"provider_route": read["provider_route"], "name": "Kept"}, admin_key)
    with tenant_context(tenant_pair.a):
        after_keep = Bot.objects.get(public_id=bot_id).provider_route["targets"][0]["api_key"]
    refused = _patch(client, path, {"provider_route": {"targets": [masked, dict(masked)]}}, admin_key)
    copied = _post(client, "/api/v1/bots/", {"name": "Copy", "provider_route": read["provider_route"]}, admin_key)
    replaced = _patch(client, path, {"provider_route": {"targets": [{**masked, "api_key": "sk-new"}]}}, admin_key)
    with tenant_context(tenant_pair.a):
        after_replace = Bot.objects.get(public_id=bot_id).provider_route

    assert created.status_code == 201
    for body in (created.json(), read, *listed, kept.json(), replaced.json()):
        assert body["provider_route"]["targets"][0]["api_key"] == "********"
        assert "sk-real" not in str(body)
        assert "sk-new" not in str(body)
    assert (kept.status_code, after_keep) == (200, "sk-real")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "provider_route.targets[1].api_key"
    assert copied.status_code == 400  # a mask is never stored as a key
    assert after_replace["targets"] == [{**route["targets"][0], "api_key": "sk-new"}]
