"""Security: provider secrets (keys and header values) never leave, are not re-aimed at another
server through the mask, and routes and system prompts are for admins only (issue 18, Medium 4, 5)."""

from __future__ import annotations

import pytest
from django_tenants.utils import tenant_context

from chat.models import Bot
from chat.services import bot_create
from tests.factories import bearer, make_api_key, make_member
from tests.site import site_client

pytestmark = pytest.mark.django_db

MASK = "********"
OPENAI = {
    "kind": "openai",
    "base_url": "https://llm.example.com/v1",
    "api_key": "sk-real",
    "model": "m",
    "headers": {"api-key": "azure-secret", "Authorization": "Bearer header-secret"},
}
POOL = {"kind": "vllm_pool", "endpoints": ["https://gpu1.example.com"], "api_key": "sk-pool", "model": "m"}
SECRETS = ("sk-real", "azure-secret", "header-secret", "sk-pool")


@pytest.fixture
def admin_key(tenant_pair):
    return make_api_key(tenant_pair.a)[1]


def _create(tenant, target: dict) -> Bot:
    with tenant_context(tenant):
        return bot_create(name="Keyed", system_prompt="Secret sauce: be terse.", provider_route={"targets": [target]})


def _patch(client, bot, body, raw):
    return client.patch(f"/api/v1/bots/{bot.public_id}/", body, content_type="application/json", **bearer(raw))


def _stored(tenant, bot) -> dict:
    with tenant_context(tenant):
        return Bot.objects.get(pk=bot.pk).provider_route["targets"][0]


@pytest.mark.parametrize(
    ("target", "change", "param"),
    [
        pytest.param(OPENAI, {"base_url": "https://attacker.example.net/v1"}, "api_key", id="base_url_case"),
        pytest.param(OPENAI, {"base_url": "https://llm.example.com/v2"}, "api_key", id="base_path_case"),
        pytest.param(
            POOL,
            {"endpoints": ["https://gpu1.example.com", "https://attacker.example.net"]},
            "api_key",
            id="endpoints_case",
        ),
        pytest.param(
            OPENAI,
            {"kind": "vllm_pool", "endpoints": ["https://attacker.example.net"], "base_url": None, "headers": None},
            "api_key",
            id="kind_case",
        ),
    ],
)
def test_masked_secret_not_restored_when_the_target_changes(client, tenant_pair, admin_key, target, change, param):
    bot = _create(tenant_pair.a, target)
    read = client.get(f"/api/v1/bots/{bot.public_id}/", **bearer(admin_key)).json()["provider_route"]["targets"][0]
    sent = {key: value for key, value in {**read, **change}.items() if value is not None}

    response = _patch(client, bot, {"provider_route": {"targets": [sent]}}, admin_key)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == f"provider_route.targets[0].{param}"
    assert _stored(tenant_pair.a, bot) == target


def test_masked_header_value_not_restored_when_base_url_changes(client, tenant_pair, admin_key):
    bot = _create(tenant_pair.a, OPENAI)
    read = client.get(f"/api/v1/bots/{bot.public_id}/", **bearer(admin_key)).json()["provider_route"]["targets"][0]
    sent = {**read, "api_key": "sk-mine", "base_url": "https://attacker.example.net/v1"}

    response = _patch(client, bot, {"provider_route": {"targets": [sent]}}, admin_key)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "provider_route.targets[0].headers.api-key"
    assert _stored(tenant_pair.a, bot) == OPENAI


def test_every_header_value_masked_and_kept_on_an_unchanged_round_trip(client, tenant_pair, admin_key):
    bot = _create(tenant_pair.a, OPENAI)
    read = client.get(f"/api/v1/bots/{bot.public_id}/", **bearer(admin_key)).json()
    listed = client.get("/api/v1/bots/", **bearer(admin_key)).json()

    kept = _patch(client, bot, {"provider_route": read["provider_route"], "name": "Kept"}, admin_key)

    assert read["provider_route"]["targets"][0]["headers"] == {"api-key": MASK, "Authorization": MASK}
    for body in (read, listed, kept.json()):
        assert not any(secret in str(body) for secret in SECRETS)
    assert kept.status_code == 200
    assert _stored(tenant_pair.a, bot) == OPENAI


def test_route_and_system_prompt_only_for_admin_scope(client, tenant_pair, admin_key):
    bot = _create(tenant_pair.a, OPENAI)
    chat_key = make_api_key(tenant_pair.a, scopes=["chat"])[1]

    as_chat = client.get(f"/api/v1/bots/{bot.public_id}/", **bearer(chat_key)).json()
    listed_as_chat = client.get("/api/v1/bots/", **bearer(chat_key)).json()["data"]
    as_admin = client.get(f"/api/v1/bots/{bot.public_id}/", **bearer(admin_key)).json()

    for body in (as_chat, *listed_as_chat):
        assert "provider_route" not in body
        assert "system_prompt" not in body
    assert as_chat["id"] == bot.public_id
    assert as_admin["system_prompt"] == "Secret sauce: be terse."
    assert as_admin["provider_route"]["targets"][0]["api_key"] == MASK


def test_site_shows_route_and_prompt_to_admins_only_and_never_a_header_secret(tenant_pair):
    bot = _create(tenant_pair.a, OPENAI)
    member = make_member(tenant_pair.a)

    as_member = site_client(tenant_pair.a, member).get(f"/bots/{bot.public_id}/").content.decode()
    as_owner = site_client(tenant_pair.a, tenant_pair.owner_a).get(f"/bots/{bot.public_id}/").content.decode()
    editing = site_client(tenant_pair.a, tenant_pair.owner_a).get(f"/bots/{bot.public_id}/edit/").content.decode()

    assert "Secret sauce" not in as_member
    assert "llm.example.com" not in as_member
    assert "Secret sauce" in as_owner
    for page in (as_member, as_owner, editing):
        assert not any(secret in page for secret in SECRETS)
