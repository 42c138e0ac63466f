"""Tenant isolation, table-driven: every API endpoint against every way of reaching another tenant.

Add a row to ENDPOINTS for each new endpoint; every scenario below then covers it. Paths name
objects with placeholders ({key}, {bot}, {conversation}, {kb}, {document}, …) filled from tenant A (own) or B (foreign).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.utils import timezone
from django_tenants.utils import tenant_context

from chat.callers import caller_of_api_key_context
from chat.models import Bot, Conversation
from chat.services import bot_create, conversation_create
from chat.turn_core import ConversationRef, ConversationTurn, turn_begin
from knowledge.models import Document, KnowledgeBase
from knowledge.services import document_create_from_text, knowledge_base_create
from tenants.authentication import AuthContext
from tenants.models import ApiKey
from tenants.resolution import api_key_cache_invalidate
from tenants.services import api_key_revoke, membership_set
from tests.factories import PASSWORD, bearer, host_of, make_api_key

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Endpoint:
    label: str
    method: str
    path: str
    scope: str | None  # the scope it needs; None = any authenticated caller
    body: dict | None = None
    success: int = 200


ENDPOINTS = [
    Endpoint("models", "get", "/v1/models", "chat"),
    Endpoint("me", "get", "/api/v1/me/", None),
    Endpoint("api_keys_list", "get", "/api/v1/api-keys/", "admin"),
    Endpoint("api_keys_create", "post", "/api/v1/api-keys/", "admin", {"name": "x", "scopes": ["chat"]}, 201),
    Endpoint("api_key_get", "get", "/api/v1/api-keys/{key}/", "admin"),
    Endpoint("api_key_revoke", "delete", "/api/v1/api-keys/{key}/", "admin"),
    Endpoint("bots_list", "get", "/api/v1/bots/", "chat"),
    Endpoint("bots_create", "post", "/api/v1/bots/", "admin", {"name": "new bot"}, 201),
    Endpoint("bot_get", "get", "/api/v1/bots/{bot}/", "chat"),
    Endpoint("bot_update", "patch", "/api/v1/bots/{bot}/", "admin", {"name": "renamed"}),
    Endpoint("bot_delete", "delete", "/api/v1/bots/{bot}/", "admin", None, 204),
    Endpoint("conversations_list", "get", "/api/v1/bots/{bot}/conversations/", "chat"),
    Endpoint("conversations_create", "post", "/api/v1/bots/{bot}/conversations/", "chat", {"title": "t"}, 201),
    Endpoint("conversation_get", "get", "/api/v1/conversations/{conversation}/", "chat"),
    Endpoint("conversation_delete", "delete", "/api/v1/conversations/{conversation}/", "chat", None, 204),
    Endpoint("messages_list", "get", "/api/v1/conversations/{conversation}/messages/", "chat"),
    # Streaming variants answer at once (the turn runs in a generation worker; none runs here).
    Endpoint(
        "message_post",
        "post",
        "/api/v1/conversations/{conversation}/messages/",
        "chat",
        {"content": "hi", "stream": True},
    ),
    Endpoint("generation_events", "get", "/api/v1/generations/{generation}/events/", "chat"),
    Endpoint("generation_cancel", "post", "/api/v1/generations/{generation}/cancel/", "chat", None, 202),
    Endpoint(
        "chat_completions",
        "post",
        "/v1/chat/completions",
        "chat",
        {"model": "{bot}", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ),
    Endpoint("knowledge_bases_list", "get", "/api/v1/knowledge-bases/", "knowledge:read"),
    Endpoint("knowledge_bases_create", "post", "/api/v1/knowledge-bases/", "knowledge:write", {"name": "kb"}, 201),
    Endpoint("knowledge_base_get", "get", "/api/v1/knowledge-bases/{kb}/", "knowledge:read"),
    Endpoint("knowledge_base_update", "patch", "/api/v1/knowledge-bases/{kb}/", "knowledge:write", {"name": "r"}),
    Endpoint("knowledge_base_delete", "delete", "/api/v1/knowledge-bases/{kb}/", "knowledge:write", None, 204),
    Endpoint("documents_list", "get", "/api/v1/knowledge-bases/{kb}/documents/", "knowledge:read"),
    Endpoint(
        "documents_create",
        "post",
        "/api/v1/knowledge-bases/{kb}/documents/",
        "knowledge:write",
        {"title": "t", "text": "new text"},
        202,
    ),
    Endpoint("knowledge_search", "get", "/api/v1/knowledge-bases/{kb}/search/?q=secret", "knowledge:read"),
    Endpoint("document_get", "get", "/api/v1/documents/{document}/", "knowledge:read"),
    Endpoint("document_delete", "delete", "/api/v1/documents/{document}/", "knowledge:write", None, 204),
    Endpoint("document_reingest", "post", "/api/v1/documents/{document}/reingest/", "knowledge:write", None, 202),
]
OBJECT_ENDPOINTS = [e for e in ENDPOINTS if "{" in e.path]
SCOPED_ENDPOINTS = [e for e in ENDPOINTS if e.scope]


def _ids(endpoints):
    return [e.label for e in endpoints]


@dataclass
class TenantObjects:
    key: ApiKey
    raw_key: str
    bot: Bot
    conversation: Conversation
    generation_id: str
    knowledge_base: KnowledgeBase
    document: Document


def _objects(tenant, label: str, *, id_floor: int = 0) -> TenantObjects:
    key, raw = make_api_key(tenant, name=f"{label}-main-secret-name")
    with tenant_context(tenant):
        bot = bot_create(name=f"{label}-secret-bot")
        conversation = conversation_create(bot=bot, end_user_kind="api", end_user_id=f"key:{key.pk}")
        caller = caller_of_api_key_context(
            tenant=tenant,
            epoch=None,  # read by the core
            context=AuthContext(kind="api_key", tenant=tenant, scopes=frozenset({"chat"}), api_key_id=key.pk),
            client_ip="127.0.0.1",
        )
        turn = ConversationTurn(
            bot_public_id=bot.public_id, body={"content": "hello"}, conversation=ConversationRef.of(conversation)
        )
        generation_id = async_to_sync(turn_begin)(caller, turn).generation_id
        if id_floor:
            # Integer ids count per schema: without this, B's knowledge base could have the same
            # id as A's, and "B's id" would name A's own object.
            with connection.cursor() as cursor:
                for table in ("knowledge_knowledgebase", "knowledge_document"):
                    cursor.execute("SELECT setval(pg_get_serial_sequence(%s, 'id'), %s)", [table, id_floor])
        knowledge_base = knowledge_base_create(name=f"{label}-secret-kb")
        document = document_create_from_text(knowledge_base=knowledge_base, title=f"{label}-secret-doc", text="x")
        Document.objects.filter(pk=document.pk).update(status=Document.Status.FAILED)  # re-ingestable
    return TenantObjects(
        key=key,
        raw_key=raw,
        bot=bot,
        conversation=conversation,
        generation_id=generation_id,
        knowledge_base=knowledge_base,
        document=document,
    )


@pytest.fixture
def world(tenant_pair):
    a = _objects(tenant_pair.a, "a")
    floor = max(a.knowledge_base.pk, a.document.pk) + 1000
    return {"a": a, "b": _objects(tenant_pair.b, "b", id_floor=floor)}


def _fill(text: str, objects: TenantObjects) -> str:
    return (
        text.replace("{key}", str(objects.key.pk))
        .replace("{bot}", objects.bot.public_id)
        .replace("{conversation}", str(objects.conversation.pk))
        .replace("{generation}", objects.generation_id)
        .replace("{kb}", str(objects.knowledge_base.pk))
        .replace("{document}", str(objects.document.pk))
    )


def _path(endpoint: Endpoint, objects: TenantObjects) -> str:
    return _fill(endpoint.path, objects)


def _call(client, endpoint: Endpoint, path: str, objects: TenantObjects | None = None, **extra):
    method = getattr(client, endpoint.method)
    if endpoint.body is not None:
        body = json.loads(_fill(json.dumps(endpoint.body), objects)) if objects else endpoint.body
        return method(path, data=body, content_type="application/json", **extra)
    return method(path, **extra)


def _snapshot(tenant_pair, world) -> dict:
    """Everything an attack on tenant B could change."""
    b = world["b"]
    with tenant_context(tenant_pair.b):
        bots = list(Bot.objects.order_by("pk").values_list("pk", "name", "version"))
        conversations = list(Conversation.objects.order_by("pk").values_list("pk", "title"))
        knowledge = list(KnowledgeBase.objects.order_by("pk").values_list("pk", "name", "version"))
        documents = list(Document.objects.order_by("pk").values_list("pk", "title", "status", "ingestion_id"))
    keys = list(ApiKey.objects.filter(tenant=tenant_pair.b).order_by("pk").values_list("pk", "revoked_at"))
    return {
        "bots": bots,
        "conversations": conversations,
        "knowledge": knowledge,
        "documents": documents,
        "keys": keys,
        "b_key": b.key.prefix,
    }


def _assert_error(response, status: int, world):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    body = response.content.decode()
    b = world["b"]
    for secret in (
        "b-main-secret-name",
        "b-secret-bot",
        b.key.prefix,
        b.bot.public_id,
        str(b.conversation.pk),
        b.generation_id,
        "b-secret-kb",
        "b-secret-doc",
    ):
        assert secret not in body


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_ids(ENDPOINTS))
def test_success_case_own_tenant(client, world, endpoint):
    response = _call(client, endpoint, _path(endpoint, world["a"]), world["a"], **bearer(world["a"].raw_key))

    assert response.status_code == endpoint.success, response.content


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_ids(ENDPOINTS))
def test_no_credentials_case(client, tenant_pair, world, endpoint):
    before = _snapshot(tenant_pair, world)

    response = _call(client, endpoint, _path(endpoint, world["b"]), world["b"], HTTP_HOST=host_of(tenant_pair.b))

    _assert_error(response, 401, world)
    assert _snapshot(tenant_pair, world) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_ids(ENDPOINTS))
def test_a_credentials_on_b_host_case(client, tenant_pair, world, endpoint):
    before = _snapshot(tenant_pair, world)

    response = _call(
        client,
        endpoint,
        _path(endpoint, world["b"]),
        world["b"],
        HTTP_HOST=host_of(tenant_pair.b),
        **bearer(world["a"].raw_key),
    )

    _assert_error(response, 401, world)
    assert _snapshot(tenant_pair, world) == before


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS, ids=_ids(OBJECT_ENDPOINTS))
def test_naming_b_object_with_a_credentials_case(client, tenant_pair, world, endpoint):
    before = _snapshot(tenant_pair, world)

    response = _call(client, endpoint, _path(endpoint, world["b"]), world["b"], **bearer(world["a"].raw_key))

    assert response.status_code == 404, response.content
    assert response.json()["error"]["type"] == "not_found_error"
    assert _snapshot(tenant_pair, world) == before


@pytest.mark.parametrize("key_state", ["revoked", "expired", "garbage", "wrong_secret"], ids=lambda s: f"{s}_case")
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_ids(ENDPOINTS))
def test_unusable_key_case(client, tenant_pair, world, endpoint, key_state):
    api_key, raw = make_api_key(tenant_pair.a, name="doomed")
    if key_state == "revoked":
        api_key_revoke(api_key=api_key)
    elif key_state == "expired":
        ApiKey.objects.filter(pk=api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        api_key_cache_invalidate(api_key.prefix)
    elif key_state == "garbage":
        raw = "prly_zzzzzzzz_" + "x" * 43
    else:
        raw = raw[:-4] + ("aaaa" if not raw.endswith("aaaa") else "bbbb")
    count = ApiKey.objects.count()

    response = _call(client, endpoint, _path(endpoint, world["a"]), world["a"], **bearer(raw))

    _assert_error(response, 401, world)
    assert ApiKey.objects.count() == count


@pytest.mark.parametrize("endpoint", SCOPED_ENDPOINTS, ids=_ids(SCOPED_ENDPOINTS))
def test_wrong_scope_case(client, tenant_pair, world, endpoint):
    other_scopes = [s for s in ApiKey.Scope.values if s not in (endpoint.scope, "admin", "chat")]
    _, raw = make_api_key(tenant_pair.a, scopes=other_scopes)
    with tenant_context(tenant_pair.a):
        bots_before = list(Bot.objects.values_list("pk", "name"))

    response = _call(client, endpoint, _path(endpoint, world["a"]), world["a"], **bearer(raw))

    assert response.status_code == 403, response.content
    assert response.json()["error"]["code"] == "insufficient_scope"
    with tenant_context(tenant_pair.a):
        assert list(Bot.objects.values_list("pk", "name")) == bots_before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=_ids(ENDPOINTS))
def test_a_jwt_on_b_host_case(client, tenant_pair, world, endpoint):
    # Even a person who belongs to both tenants cannot use A's token on B.
    membership_set(user=tenant_pair.owner_a, tenant=tenant_pair.b, role="owner")
    token = client.post(
        "/api/v1/auth/token/",
        {"email": tenant_pair.owner_a.email, "password": PASSWORD},
        content_type="application/json",
        HTTP_HOST=host_of(tenant_pair.a),
    ).json()["access"]
    before = _snapshot(tenant_pair, world)

    response = _call(
        client,
        endpoint,
        _path(endpoint, world["b"]),
        HTTP_HOST=host_of(tenant_pair.b),
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )

    _assert_error(response, 401, world)
    assert _snapshot(tenant_pair, world) == before
